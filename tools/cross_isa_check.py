#!/usr/bin/env python3
"""Cross-ISA agreement: the same model files and inputs on two machines give the same answers.

Two steps, normally driven by tools/arm64_python_test.sh:

  write DIR   (on the host, x86): writes, per model, DIR/<name>.pyrt, DIR/<name>.inputs.npy
              and DIR/<name>.expected.npz (logits, exit blocks and top-1 of every ISA the host
              has), then DIR/manifest.json.
  check DIR   (anywhere, e.g. arm64 under qemu): loads those models and inputs, runs every ISA
              available there and compares it with the host. Exits 1 on a failed check.

Models (all seeded: the same files on every run):

  mixed      random-tensor graph from tests/_graphs.py: 28x28 images, patch 7, embed 64,
             depth 4, fp32 / W8A8 / W4A8 (a_bits 8, 6, 5) layers mixed, int8 attention, a
             confidence exit after block 1 whose threshold is the median exit confidence (so
             half the images leave early); 256 random float images.
  fp32       the same architecture, every layer fp32 (no activation quantisation at all).
  reference  only when pyruntime/data/reference/fmnist_vit.safetensors (or --reference CKPT)
             exists and torch + timm import on the host (``--mode auto``, the default): the
             reference ViT converted to W8A8 with confidence exits at 0.9 after every block but
             the last; the first 256 Fashion-MNIST test images (uint8) when the data set is
             installed, else random uint8 images.

Checks, per model, with tol = --tol (default 1e-4, relative to the host's max |logit|):

  Every ISA here against every ISA of the host -- ``ref`` against ``ref`` (the same scalar
  C++ on both) and each SIMD ISA against each of the host's, alike: top-1 and exit blocks
  identical, logits within tol. Every kernel is bit-identical across ISAs: the integer GEMMs,
  and also the float ops around them (LayerNorm, softmax, GELU, fp32 GEMM), which follow one
  canonical evaluation order on every ISA (csrc/kernels/kernels.h). That matters for the
  quantised models: a float op that differed in the last bit between ISAs could move an
  activation across a rounding tie of the 8-bit quantiser on one ISA and not on another, and
  one integer step moves the logits by ~1e-3 (it did, before the float kernels were made
  canonical: ~6e-3 between ref and avx2 on the host). The host's own spread (largest
  difference between its ISAs) must be within tol too; in practice every difference is 0.
  How many images lie within tol is printed.

check needs numpy, safetensors and pyruntime only; write adds torch + timm for ``reference``.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

REPO = Path(__file__).resolve().parent.parent
# tests/ for _graphs only: never the repository root, which would shadow the pyruntime
# package the caller put on sys.path (the arm64 run uses a staged copy with the arm64 _core).
sys.path.insert(0, str(REPO / "tests"))

import pyruntime  # noqa: E402

N_IMAGES = 256
ARCH = dict(img_size=[28, 28], patch_size=[7, 7], embed_dim=64, depth=4, num_heads=4,
            mlp_hidden=128, num_classes=10)


def _random_model(path: Path, n: int, mixed: bool) -> tuple:
    from _graphs import FP32, W4A8, W8A8, random_tensors, tiny_graph
    from pyruntime.modelfile import write_model

    exits = [{"block": 1, "rule": "confidence", "threshold": 1.0}]
    layers = None
    if mixed:
        base = tiny_graph(exits=exits, **ARCH)
        choices = [FP32, W8A8, W4A8, dict(W8A8, a_bits=6), dict(W4A8, a_bits=5)]
        layers = {name: choices[i % len(choices)] for i, name in enumerate(sorted(base["layers"]))}
    graph = tiny_graph(exits=exits, layers=layers, **ARCH)
    if mixed:
        graph["attention"] = {"bits": 8}
    tensors = random_tensors(graph, seed=1234)
    x = np.random.default_rng(4321).standard_normal((n, 1, 28, 28)).astype(np.float32)
    # The exit threshold: the median confidence of the exit head, measured on the scalar
    # reference kernels with the exit disabled (threshold 1), so about half the images leave.
    prov = {"source": "tools/cross_isa_check.py"}
    write_model(path, graph, tensors, "{}", prov)
    z = pyruntime.load(path, isa="ref").run(x, collect_exits=True).exit_logits[0].astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    threshold = float(np.median((p / p.sum(1, keepdims=True)).max(1)))
    graph["exits"][0]["threshold"] = threshold
    write_model(path, graph, tensors, "{}", prov)
    kind = "mixed fp32/w8a8/w4a8, int8 attention" if mixed else "all fp32"
    return x, f"random graph 28x28/7 D=64 depth 4, {kind}, exit after block 1 at {threshold:.4f}; {n} random images"


def _reference_available(ckpt: Path) -> bool:
    if not ckpt.is_file():
        return False
    try:
        import timm  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _reference_model(path: Path, n: int, ckpt: Path) -> tuple:
    from pyruntime.convert import convert
    from pyruntime.demo import exit_policy
    from pyruntime.reference import build_timm_model, read_metadata

    meta = read_metadata(ckpt)
    depth = int(meta["timm_kwargs"].get("depth", 12))
    model = build_timm_model(meta["timm_kwargs"])
    convert(model, path, checkpoint=ckpt, policy=exit_policy("w8a8", depth, 0.9),
            preprocess={"mean": meta["mean"], "std": meta["std"]})
    try:
        from pyruntime.datasets import fashion_mnist

        x = np.ascontiguousarray(fashion_mnist("test")[0][:n])
        what = f"first {n} Fashion-MNIST test images"
    except FileNotFoundError:
        x = np.random.default_rng(4321).integers(0, 256, (n, 28, 28)).astype(np.uint8)
        what = f"{n} random uint8 images (Fashion-MNIST is not installed)"
    return x, f"reference ViT ({ckpt.name}), W8A8 + confidence exits at 0.9; {what}"


def run_all(model_path: Path, x: np.ndarray) -> dict:
    out = {}
    for isa in pyruntime.available_isas():
        model = pyruntime.load(model_path, isa=isa)
        t = time.perf_counter()
        r = model.run(x)
        out[isa] = (r, time.perf_counter() - t)
    return out


def _rel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per image: max |a - b| relative to the max |b| over the whole batch."""
    scale = max(float(np.abs(b).max()), 1e-30)
    return np.abs(a.astype(np.float64) - b.astype(np.float64)).max(axis=1) / scale


def write(d: Path, mode: str, n: int, ckpt: Optional[Path]) -> None:
    from pyruntime.reference import reference_path

    ckpt = ckpt or reference_path()
    d.mkdir(parents=True, exist_ok=True)
    if mode == "auto":
        mode = "reference" if _reference_available(ckpt) else "random"
    elif mode == "reference" and not _reference_available(ckpt):
        raise SystemExit(f"cross_isa_check: --mode reference needs {ckpt} and torch + timm")
    makers = {"mixed": lambda p: _random_model(p, n, True), "fp32": lambda p: _random_model(p, n, False)}
    if mode == "reference":
        makers["reference"] = lambda p: _reference_model(p, n, ckpt)
    best = pyruntime.available_isas()[-1]
    manifest = {"machine": platform.machine(), "best": best, "isas": pyruntime.available_isas(), "models": {}}
    print(f"cross-isa write: {platform.machine()}, ISAs {manifest['isas']}, into {d}")
    for name, make in makers.items():
        x, what = make(d / f"{name}.pyrt")
        np.save(d / f"{name}.inputs.npy", x)
        results = run_all(d / f"{name}.pyrt", x)
        arrays = {}
        for isa, (r, _) in results.items():
            arrays[f"{isa}.logits"] = r.logits
            arrays[f"{isa}.exit_block"] = r.exit_block
            arrays[f"{isa}.top1"] = r.predictions
        np.savez(d / f"{name}.expected.npz", **arrays)
        spread = max(float(_rel(results[i][0].logits, results["ref"][0].logits).max()) for i in results)
        manifest["models"][name] = {"description": what, "host_spread": spread}
        print(f"  {name}: {what}")
        for isa, (r, dt) in results.items():
            print(f"    {isa:8s} {dt:7.3f} s, exit blocks {np.bincount(r.exit_block).tolist()}")
        print(f"    host spread (largest difference between the host's ISAs, relative): {spread:.3e}")
    (d / "manifest.json").write_text(json.dumps(manifest, indent=1))


def check(d: Path, tol: float) -> int:
    manifest = json.loads((d / "manifest.json").read_text())
    host = manifest["machine"]
    here = platform.machine()
    print(f"cross-isa check: {here} ISAs {pyruntime.available_isas()} (pyruntime from "
          f"{Path(pyruntime.__file__).parent}) against {host} ISAs {manifest['isas']}")
    failures, summary = [], []
    for name, m in manifest["models"].items():
        exp = np.load(d / f"{name}.expected.npz")
        x = np.load(d / f"{name}.inputs.npy")
        print(f"  {name}: {m['description']}")
        if not m["host_spread"] <= tol:
            failures.append(f"{name}: the host's ISAs differ by {m['host_spread']:.3e} > {tol:g} (relative)")
        for isa, (r, dt) in run_all(d / f"{name}.pyrt", x).items():
            for host_isa in manifest["isas"]:
                logits, exits, top1 = (exp[f"{host_isa}.{k}"] for k in ("logits", "exit_block", "top1"))
                rel = _rel(r.logits, logits)
                absd = float(np.abs(r.logits.astype(np.float64) - logits).max())
                same_top1, same_exit = int((r.predictions == top1).sum()), int((r.exit_block == exits).sum())
                print(f"    {here}/{isa:7s} vs {host}/{host_isa:5s}: max |dlogit| {absd:.3e} = {rel.max():.3e} "
                      f"relative; within {tol:g}: {int((rel <= tol).sum())}/{len(x)} images; top-1 equal "
                      f"{same_top1}/{len(x)}; exit equal {same_exit}/{len(x)}"
                      f"  [checked: <= {tol:.3g}]")
                summary.append(f"{name} {isa}/{host_isa} {rel.max():.3e}")
                tag = f"{name}: {here}/{isa} vs {host}/{host_isa}"
                if same_top1 != len(x):
                    failures.append(f"{tag}: top-1 differs on {len(x) - same_top1} images")
                if same_exit != len(x):
                    failures.append(f"{tag}: exit block differs on {len(x) - same_exit} images")
                if not rel.max() <= tol:
                    failures.append(f"{tag}: logits differ by {rel.max():.3e} > {tol:g} (relative)")
            print(f"    {isa:7s} ran {len(x)} images in {dt:.3f} s")
    print("cross-isa max relative logit difference: " + "; ".join(summary))
    if failures:
        print("cross-isa check FAILED:\n  " + "\n  ".join(failures))
        return 1
    print("cross-isa check passed")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write models, inputs and expected outputs (host)")
    w.add_argument("dir", type=Path)
    w.add_argument("--mode", choices=["auto", "random", "reference"], default="auto",
                   help="reference: add the converted reference model (auto: when it can be converted)")
    w.add_argument("--reference", type=Path, default=None, metavar="CKPT",
                   help="reference checkpoint (default: pyruntime/data/reference/fmnist_vit.safetensors)")
    w.add_argument("-n", type=int, default=N_IMAGES, help=f"images per model (default {N_IMAGES})")
    c = sub.add_parser("check", help="compare with the host's outputs (e.g. arm64 under qemu)")
    c.add_argument("dir", type=Path)
    c.add_argument("--tol", type=float, default=1e-4, help="logit tolerance relative to max |logit| (default 1e-4)")
    a = ap.parse_args(argv)
    if a.cmd == "write":
        write(a.dir, a.mode, a.n, a.reference)
        return 0
    return check(a.dir, a.tol)


if __name__ == "__main__":
    sys.exit(main())
