#!/usr/bin/env python3
"""Coverage-guided fuzzing of the model-file loader with atheris.

Two targets. ``bytes`` (default): every input is written to a file and given to
``pyruntime.load``; a valid model also runs one image. ``--graph``: the input perturbs a valid
model's graph (sizes, bits, exits, predictor, QuEE gates, preprocessing) and tensors are
rewritten with fresh checksums, so the fuzzer reaches the graph validation and the executor's
own checks behind the CRCs. Ranges go past the runtime's limits (``_core.limits()``): int4
blocks up to 2**62, token counts beyond max_tokens, dimensions and depths beyond max_dim and
max_depth, thread counts beyond max_threads, values finite in float64 but not in float32, and
deeply nested JSON. Some files are written sealed but unvalidated (``modelfile._save``), so
the loader's checks are reached even where the writer would have refused. The only acceptable
failures are the named ones (FormatError / ValueError / FileNotFoundError); any other
exception, a crash or a hang is a bug. Seeds: a small valid model and a few mutilated copies
(truncated, deeply nested header, deeply nested metadata).

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
    from pyruntime import modelfile
    from pyruntime.modelfile import expected_tensors, write_model

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


LIMITS = pyruntime._core.limits()
EXPECTED = (ValueError, FileNotFoundError)  # FormatError and PolicyError are ValueErrors
MAX_FUZZ_TENSOR_BYTES = 32 << 20  # a graph whose tensors would be bigger gets none (the loader must refuse it first)
THREADS = [1] * 12 + [2, None, 0, -1, LIMITS["max_threads"] + 1, 2 ** 31, 2 ** 64, True, 1.5]
# Finite in float64; many not in float32 (Inf, 0, or a reciprocal that is Inf).
WILD = [1e300, -1e300, 1e-50, 1e-40, 3.5e38, 1e39, 1e5, float("nan"), float("inf"), 0.0, -0.5, 2.0]
DEEP = 100_000
GRAPH_SEEDS = 300


def load_and_run(path: Path, num_threads=1) -> None:
    try:
        model = pyruntime.load(path, num_threads=num_threads)
        model.run(np.zeros((1, *model.input_shape), np.float32))
        C, H, W = model.input_shape
        model.run(np.full((1, H, W, C), 200, np.uint8))
    except EXPECTED:
        return


def test_one_input(data: bytes) -> None:
    TARGET.write_bytes(data)
    load_and_run(TARGET)


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


def big_int(fdp) -> int:
    """Mostly small, sometimes around or far past a limit."""
    return fdp.PickValueInList([fdp.ConsumeIntInRange(-1, 20)] * 6 + [
        LIMITS["max_dim"], LIMITS["max_dim"] + 1, LIMITS["max_depth"] + 1, 2 ** 31, 2 ** 63, 10 ** 12])


def sizes(fdp, a: dict) -> None:
    """Image and patch sizes: small ones, and token counts and sides past the limits (a side of
    65537 or 4097 tokens must be refused before any tensor is made)."""
    choice = fdp.ConsumeIntInRange(0, 4)
    if choice == 0:
        a["img_size"] = [fdp.ConsumeIntInRange(0, 16), fdp.ConsumeIntInRange(0, 16)]
        a["patch_size"] = [fdp.ConsumeIntInRange(0, 8), fdp.ConsumeIntInRange(0, 8)]
    elif choice == 1:  # max_tokens: 64*64 + cls = 4097, 128*128/4 + cls = 4097, 64*65 ...
        a["img_size"], a["patch_size"] = fdp.PickValueInList([([64, 64], [1, 1]), ([128, 128], [2, 2]), ([64, 65], [1, 1]),
                                                              ([63, 65], [1, 1]), ([72, 72], [1, 1])])
    elif choice == 2:  # max_image_side and giant patch dims
        side = fdp.PickValueInList([LIMITS["max_image_side"], LIMITS["max_image_side"] + 1, 2 ** 40])
        a["img_size"], a["patch_size"] = [side, side], [side, side]


def layer_precision(fdp, lp: dict) -> None:
    lp["w_bits"] = fdp.PickValueInList([4, 8, 32, 16, 0])
    lp["a_bits"] = fdp.ConsumeIntInRange(2, 9)
    lp["scale"] = fdp.PickValueInList(["dynamic", "static", "predicted", "bogus"])
    lp["static_scale"] = fdp.PickValueInList([None, 0.0, -1.0, 0.1, float("nan"), 1e-40, 1e300, 3.5e38, 1e-45])
    lp["block_size"] = fdp.PickValueInList([32, 64, 48, 0, 96, 2 ** 20, 2 ** 32, 2 ** 62, 2 ** 70])


def perturbed_graph(fdp):
    if fdp.ConsumeIntInRange(0, 3) == 0:
        return gated_graph(fdp)
    graph = tiny_graph()
    a = graph["arch"]
    for key in ARCH_INTS:  # rarely each, so that many graphs stay valid and reach the executor
        if fdp.ConsumeIntInRange(0, 5) == 0:
            a[key] = big_int(fdp)
    for key in BOOLS:
        if fdp.ConsumeIntInRange(0, 3) == 0:
            a[key] = fdp.ConsumeBool()
    sizes(fdp, a)
    a["global_pool"] = fdp.PickValueInList(["token"] * 5 + ["avg", "map", ""])
    if fdp.ConsumeIntInRange(0, 3) == 0:
        a["eps"] = fdp.PickValueInList(WILD)
    pre = graph["preprocess"]
    pre["input_size"] = [a["in_chans"], *a["img_size"]]
    pre["mean"] = [0.5] * a["in_chans"] if isinstance(a["in_chans"], int) and 0 < a["in_chans"] < 64 else [0.5]
    pre["std"] = [0.25] * len(pre["mean"])
    if fdp.ConsumeIntInRange(0, 2) == 0:
        pre[fdp.PickValueInList(["mean", "std"])] = [fdp.PickValueInList(WILD)] * len(pre["mean"])
    for lp in graph["layers"].values():
        if fdp.ConsumeIntInRange(0, 3) == 0:
            layer_precision(fdp, lp)
    if fdp.ConsumeBool():
        graph["exits"] = [{"block": fdp.ConsumeIntInRange(-1, 4),
                           "rule": fdp.PickValueInList(["confidence", "margin", "gate", "x"]),
                           "threshold": fdp.PickValueInList([fdp.ConsumeFloat(), 0.5, 1e300])}
                          for _ in range(fdp.ConsumeIntInRange(0, 3))]
    if fdp.ConsumeBool():
        graph["predictor"] = {"block": fdp.ConsumeIntInRange(-1, 3), "chunk": fdp.ConsumeIntInRange(-1, 9),
                              "coeffs": {"head": [fdp.PickValueInList([0.01] * 4 + WILD)]}}
        graph["layers"]["head"]["scale"] = fdp.PickValueInList(["predicted", "dynamic"])
    return graph


def fitting_tensors(graph: dict) -> dict:
    """Tensors the graph expects when they are small enough to make, else the seed's (an
    impossible or oversized graph must be refused by the loader before it looks at tensors)."""
    depth = graph["arch"].get("depth")
    if not (isinstance(depth, int) and 0 < depth <= 32):  # listing the tensors of 2**63 blocks would not end
        return random_tensors(tiny_graph())
    try:
        specs = expected_tensors(graph)
        size = sum(int(np.prod(s.shape, dtype=np.float64)) * s.dtype.itemsize for s in specs.values())
        if size <= MAX_FUZZ_TENSOR_BYTES:
            return random_tensors(graph)
    except Exception:  # noqa: BLE001 -- the generator cannot fit an impossible graph
        pass
    return random_tensors(tiny_graph())


def write_deep(path: Path, graph: dict, tensors: dict, key: str) -> None:
    """A sealed file whose metadata ``key`` is JSON nested DEEP levels (json.dumps cannot
    write such a value, so the metadata string is made by hand)."""
    modelfile._save(path, graph, tensors, "{}", {"source": "fuzz"})
    from safetensors.numpy import save_file

    meta = modelfile._read_raw_header(path)[0]["__metadata__"]
    meta[key] = "[" * DEEP + "]" * DEEP
    meta[modelfile.KEY_HEADER_SHA256] = modelfile._DIGEST_PLACEHOLDER
    save_file(tensors, str(path), metadata=meta)
    modelfile._seal(path)


def test_one_graph(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    graph = perturbed_graph(fdp)
    threads = fdp.PickValueInList(THREADS)
    how = fdp.ConsumeIntInRange(0, 5)
    tensors = fitting_tensors(graph)
    try:
        if how <= 2:  # the writer validates: a refusal is what it is for
            write_model(TARGET, graph, tensors, "{}", {"source": "fuzz"})
        elif how <= 4:  # sealed but unvalidated: the loader's own checks must refuse
            modelfile._save(TARGET, graph, tensors, "{}", {"source": "fuzz"})
        else:
            write_deep(TARGET, graph, tensors, fdp.PickValueInList(
                [modelfile.KEY_GRAPH, modelfile.KEY_POLICY, modelfile.KEY_PROVENANCE, modelfile.KEY_CHECKSUMS]))
    except EXPECTED:
        return
    load_and_run(TARGET, threads)


def main() -> None:
    corpus = WORK / "corpus"
    corpus.mkdir()
    seed = seed_model()
    (corpus / "seed").write_bytes(seed)
    (corpus / "truncated").write_bytes(seed[: len(seed) // 2])
    (corpus / "header").write_bytes(seed[:200])
    deep = b"[" * DEEP
    (corpus / "deep-header").write_bytes(len(deep).to_bytes(8, "little") + deep)
    graph = tiny_graph()
    write_deep(WORK / "deep.pyrt", graph, random_tensors(graph), modelfile.KEY_GRAPH)
    (corpus / "deep-graph").write_bytes((WORK / "deep.pyrt").read_bytes())
    graph_mode = "--graph" in sys.argv
    if graph_mode:  # random byte strings long enough to drive every choice, not only the first few
        corpus = WORK / "graph-corpus"
        corpus.mkdir()
        rng = np.random.default_rng(0)
        for i in range(GRAPH_SEEDS):
            (corpus / f"r{i}").write_bytes(rng.integers(0, 256, 256, dtype=np.uint8).tobytes())
    args = [a for a in sys.argv[1:] if a.startswith("-") and a != "--graph"]
    dirs = [a for a in sys.argv[1:] if not a.startswith("-")] or [str(corpus)]
    atheris.Setup([sys.argv[0], *args, *dirs], test_one_graph if graph_mode else test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    os.environ.setdefault("PYRUNTIME_ISA", "")
    main()
