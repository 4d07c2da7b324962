#!/usr/bin/env python3
"""Coverage-guided fuzzing of the model-file loader with atheris.

Two targets. ``bytes`` (default): every input is written to a file and given to
``pyruntime.load``; a valid model also runs one image. ``--graph``: the input perturbs a valid
model's graph (sizes, bits, exits, predictor, QuEE gates) and tensors are rewritten with fresh checksums,
so the fuzzer reaches the graph validation and the executor's own checks behind the CRCs. The only acceptable failures are the named ones (FormatError / ValueError); any other
exception, a crash or a hang is a bug. Seeds: a small valid model and a few mutilated copies.

    python tools/fuzz_loader.py -runs=2000          # bounded
    python tools/fuzz_loader.py --graph -runs=2000  # graph/executor validation
    python tools/fuzz_loader.py corpus_dir/          # open-ended, libFuzzer flags apply
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    import numpy as np

    import pyruntime
    from pyruntime.modelfile import write_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _graphs import W4A8, random_tensors, tiny_graph  # noqa: E402

WORK = Path(tempfile.mkdtemp(prefix="pyrt-fuzz-"))
TARGET = WORK / "input.pyrt"


def seed_model() -> bytes:
    graph = tiny_graph(exits=[{"block": 0, "rule": "margin", "threshold": 0.3}],
                       layers={"blocks.1.mlp.fc1": W4A8})
    path = WORK / "seed.pyrt"
    write_model(path, graph, random_tensors(graph), "{}", {"source": "fuzz"})
    return path.read_bytes()


def test_one_input(data: bytes) -> None:
    TARGET.write_bytes(data)
    try:
        model = pyruntime.load(TARGET, num_threads=1)
    except ValueError:  # FormatError is a ValueError
        return
    model.run(np.zeros((1, *model.input_shape), np.float32))


ARCH_INTS = ("embed_dim", "depth", "num_heads", "mlp_hidden", "num_classes", "in_chans", "reg_tokens")
BOOLS = ("cls_token", "dist_token", "no_embed_class", "fc_norm", "final_norm", "norm_pre", "layer_scale")


def gated_graph(fdp) -> dict:
    """A QuEE-gated graph (depth 3, gate after block 0 or 1), mostly well-formed, so that the
    executor's side of gates is reached and not only the validation."""
    gate = fdp.PickValueInList([0, 0, 1])
    exits = [{"block": gate, "rule": "gate", "threshold": fdp.PickValueInList([0.0] * 7 + [0.5])}]
    if fdp.ConsumeBool():
        exits.append({"block": 1 - gate, "rule": fdp.PickValueInList(["gate", "confidence"]), "threshold": 0.0})
        exits.sort(key=lambda e: e["block"])
    blocks = [f"blocks.{b}.{k}" for b in range(3) for k in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    graph = tiny_graph(depth=3, exits=exits, layers={n: dict(W4A8, w_bits=8) for n in blocks})
    value = lambda: fdp.PickValueInList([0.0, 0.3, 1.0, 2.5, 0.0, 0.7, 0.1, 0.05, 0.2, 1e-3, 4.0, 0.0, 0.5, 0.6, 0.15,
                                         -1.0, float("nan"), float("inf")])
    reduced = {}
    names = [n for n in blocks if int(n.split(".")[1]) > gate]
    names.append(fdp.PickValueInList([None] * 5 + ["head", "blocks.2.*", "blocks.0.mlp.fc1"]))
    for name in names:
        if name is not None and fdp.ConsumeBool():
            reduced[name] = dict(W4A8, w_bits=fdp.PickValueInList([4, 8, 32, 4, 8, 4, 8, 5]),
                                 a_bits=fdp.PickValueInList([4, 6, 8, 5, 8, 8, 8, 9]),
                                 scale=fdp.PickValueInList(["dynamic"] * 5 + ["static", "predicted"]),
                                 static_scale=fdp.PickValueInList([None] * 6 + [0.05, -1.0]),
                                 block_size=fdp.PickValueInList([32] * 6 + [64, 48]))
            if reduced[name]["scale"] == "static" and reduced[name]["static_scale"] is None:
                reduced[name]["static_scale"] = 0.05
    gate_blocks = [e["block"] for e in exits if e["rule"] == "gate"]
    cost_keys = gate_blocks if fdp.ConsumeIntInRange(0, 3) else [fdp.PickValueInList(["0", "1", "2", "00"])]
    graph["gates"] = {"lambda": value(), "topk": fdp.PickValueInList([1, 2, 3, 3, 1, 2, 0, 4]),
                      "hidden": fdp.PickValueInList([1, 2, 5, 1, 2, 3, 4, 0]),
                      "cost": {str(k): [value() for _ in range(fdp.PickValueInList([3, 3, 3, 2, 4]))] for k in cost_keys},
                      "reduced": reduced}
    if fdp.ConsumeBool():
        graph["predictor"] = {"block": fdp.PickValueInList([0, 1, 2]), "chunk": fdp.ConsumeIntInRange(1, 9),
                              "coeffs": {f"{n}:lo": [0.01, 0.001] for n in reduced}}
    return graph


def perturbed_graph(data: bytes):
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeIntInRange(0, 3) == 0:
        return gated_graph(fdp)
    graph = tiny_graph()
    a = graph["arch"]
    for key in ARCH_INTS:
        if fdp.ConsumeBool():
            a[key] = fdp.ConsumeIntInRange(-1, 20)
    for key in BOOLS:
        if fdp.ConsumeBool():
            a[key] = fdp.ConsumeBool()
    if fdp.ConsumeBool():
        a["img_size"] = [fdp.ConsumeIntInRange(0, 16), fdp.ConsumeIntInRange(0, 16)]
        a["patch_size"] = [fdp.ConsumeIntInRange(0, 8), fdp.ConsumeIntInRange(0, 8)]
    a["global_pool"] = fdp.PickValueInList(["token", "avg", "map", ""])
    for lp in graph["layers"].values():
        if fdp.ConsumeBool():
            lp["w_bits"] = fdp.PickValueInList([4, 8, 32, 16, 0])
            lp["a_bits"] = fdp.ConsumeIntInRange(2, 9)
            lp["scale"] = fdp.PickValueInList(["dynamic", "static", "predicted", "bogus"])
            lp["static_scale"] = fdp.PickValueInList([None, 0.0, -1.0, 0.1, float("nan")])
            lp["block_size"] = fdp.PickValueInList([32, 64, 48, 0])
    if fdp.ConsumeBool():
        graph["exits"] = [{"block": fdp.ConsumeIntInRange(-1, 4),
                           "rule": fdp.PickValueInList(["confidence", "margin", "gate", "x"]),
                           "threshold": fdp.ConsumeFloat()}
                          for _ in range(fdp.ConsumeIntInRange(0, 3))]
    if fdp.ConsumeBool():
        graph["predictor"] = {"block": fdp.ConsumeIntInRange(-1, 3), "chunk": fdp.ConsumeIntInRange(-1, 9), "coeffs": {}}
    return graph


def test_one_graph(data: bytes) -> None:
    graph = perturbed_graph(data)
    try:
        tensors = random_tensors(graph)
    except Exception:  # the generator itself cannot fit an impossible graph: write the seed's
        tensors = random_tensors(tiny_graph())
    try:
        write_model(TARGET, graph, tensors, "{}", {"source": "fuzz"})
    except ValueError:
        return  # the writer refused an invalid graph: fine, that is what it is for
    test_one_input(TARGET.read_bytes())


def main() -> None:
    corpus = WORK / "corpus"
    corpus.mkdir()
    seed = seed_model()
    (corpus / "seed").write_bytes(seed)
    (corpus / "truncated").write_bytes(seed[: len(seed) // 2])
    (corpus / "header").write_bytes(seed[:200])
    graph_mode = "--graph" in sys.argv
    args = [a for a in sys.argv[1:] if a.startswith("-") and a != "--graph"]
    dirs = [a for a in sys.argv[1:] if not a.startswith("-")] or ([] if graph_mode else [str(corpus)])
    atheris.Setup([sys.argv[0], *args, *dirs], test_one_graph if graph_mode else test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    os.environ.setdefault("PYRUNTIME_ISA", "")
    main()
