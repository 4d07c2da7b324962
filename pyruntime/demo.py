"""``pyruntime demo``: the README's main job, on the shipped reference model.

Converts the reference ViT (trained on Fashion-MNIST, shipped in the package) under a few
policies -- fp32, W8A8, W4A8, and W8A8 with confidence exits whose one shared threshold is
chosen on held-out validation images -- runs all 10,000 test images through the runtime, and prints
one table: top-1, mean exit block, BOPs relative to fp32 at full depth, and latency per image
(batch 1) beside PyTorch fp32 on the same images. Saves a PNG of accuracy against BOPs and
against latency; ``--json`` writes the table.

Needs the ``convert`` extra (torch, timm) to convert, Debian's dataset-fashion-mnist for the
images, and matplotlib for the plot.
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np

from . import bops
from ._atomic import atomic_write_bytes
from .calibrate.common import REFERENCE_PARTS, batches, progress
from .calibrate.thresholds import shared_threshold
from .datasets import fashion_mnist
from .policy import ExitPolicy, Policy
from .reference import convert_reference
from .runtime import Model, load

CALIBRATION_IMAGES = 2000
MAX_CALIBRATION_DROP = 0.005  # top-1 the exits may lose on the calibration images
LATENCY_IMAGES = 200


@dataclass
class Row:
    policy: str
    top1: float
    mean_exit_block: float
    bops_ratio: float
    latency_ms: float
    torch_latency_ms: float


def evaluate(model: Model, images: np.ndarray, labels: np.ndarray, desc: str, batch: int = 500):
    """(top-1, exit blocks, BOPs per image) over all images, in batches."""
    preds, exits, costs = [], [], []
    spans = batches(len(images), batch)
    for lo, hi in progress(spans, desc, len(spans)):
        r = model.run(images[lo:hi])
        preds.append(r.predictions)
        exits.append(r.exit_block)
        costs.append(r.bops)
    pred, exit_block, cost = np.concatenate(preds), np.concatenate(exits), np.concatenate(costs)
    return float((pred == labels).mean()), exit_block, cost


def latency_ms(run_one, images: np.ndarray) -> float:
    """Median wall time of one image at a time (batch 1), after two warm-up runs."""
    for i in range(2):
        run_one(images[i : i + 1])
    ts = []
    for i in range(len(images)):
        t = time.perf_counter()
        run_one(images[i : i + 1])
        ts.append(time.perf_counter() - t)
    return float(np.median(ts) * 1e3)


def torch_runner(threads: Optional[int]):
    """PyTorch fp32 eager on the reference model, fed the same uint8 images."""
    import torch

    from .reference import load_reference_timm, read_metadata

    model, _ = load_reference_timm()
    meta = read_metadata()
    mean, std = float(np.mean(meta["mean"])), float(np.mean(meta["std"]))
    if threads:
        torch.set_num_threads(threads)

    def run(u8: np.ndarray):
        x = torch.from_numpy(u8).float().div_(255.0).sub_(mean).div_(std).unsqueeze(1)
        with torch.inference_mode():
            return model(x)

    return run


def exit_policy(base: str, depth: int, threshold: float) -> Policy:
    policy = Policy.shorthand(base)
    policy.exits = [ExitPolicy(block=b, rule="confidence", threshold=threshold) for b in range(depth - 1)]
    policy.name = f"{base}+exits"
    return policy


def calibrate_exits(workdir: Path, depth: int, threads: Optional[int]) -> Policy:
    """Shared confidence threshold for W8A8 + exits, chosen on validation images: training
    images the reference model was not trained on (on the ones it was, its exits are
    overconfident and the threshold too bold for unseen images)."""
    train_x, train_y = fashion_mnist("train")
    lo, hi = REFERENCE_PARTS["validation"]
    pick = lo + np.random.default_rng(0).choice(hi - lo, CALIBRATION_IMAGES, replace=False)
    path = convert_reference(workdir / "w8a8_exits_probe.pyrt", exit_policy("w8a8", depth, 1.0))
    model = load(path, num_threads=threads)
    r = model.run(train_x[pick], collect_exits=True)
    op = shared_threshold(model.graph, r.exit_logits, r.logits, train_y[pick], MAX_CALIBRATION_DROP)
    print(f"exit threshold {op.threshold:.4f}: calibration top-1 {op.top1:.4f} "
          f"(full depth {op.full_depth_top1:.4f}), mean exit block {op.mean_exit_block:.2f}")
    return exit_policy("w8a8", depth, op.threshold)


def print_table(rows: List[Row]) -> None:
    head = f"{'policy':14s} {'top-1':>7s} {'mean exit':>10s} {'BOPs/fp32':>10s} {'ms/image':>9s} {'torch fp32':>11s}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r.policy:14s} {100 * r.top1:6.2f}% {r.mean_exit_block:10.2f} {r.bops_ratio:10.3f} "
              f"{r.latency_ms:9.3f} {r.torch_latency_ms:10.3f}")


def plot(rows: List[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    # A legend, not labels at the points: several policies sit within 0.1 pt of each other.
    for r in rows:
        axes[0].scatter(r.bops_ratio, 100 * r.top1, s=50, label=r.policy)
        axes[1].scatter(r.latency_ms, 100 * r.top1, s=50, label=r.policy)
    axes[1].axvline(rows[0].torch_latency_ms, color="gray", ls="--", label="PyTorch fp32")
    axes[0].legend(loc="lower right", fontsize=8)
    axes[0].set(xlabel="BOPs relative to fp32, full depth", ylabel="top-1 (%)", title="Accuracy vs BOPs")
    axes[1].set(xlabel="latency per image, batch 1 (ms, log scale)", ylabel="top-1 (%)", title="Accuracy vs latency",
                xscale="log")
    axes[1].legend(loc="lower right", fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle("pyruntime reference ViT, Fashion-MNIST test set (10,000 images)")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def main(args) -> int:
    test_x, test_y = fashion_mnist("test")
    if args.limit:
        test_x, test_y = test_x[: args.limit], test_y[: args.limit]
    threads = args.threads
    with tempfile.TemporaryDirectory(prefix="pyruntime-demo-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        fp32_path = convert_reference(workdir / "fp32.pyrt", "fp32")
        depth = load(fp32_path).depth
        policies = [("fp32", fp32_path),
                    ("w8a8", convert_reference(workdir / "w8a8.pyrt", "w8a8")),
                    ("w8a8-attn8", convert_reference(workdir / "w8a8_attn8.pyrt", "w8a8-attn8")),
                    ("w4a8", convert_reference(workdir / "w4a8.pyrt", "w4a8")),
                    ("w8a8+exits", convert_reference(workdir / "w8a8_exits.pyrt", calibrate_exits(workdir, depth, threads)))]
        full_bops = bops.static(fp32_path)
        torch_run = torch_runner(threads)
        torch_ms = latency_ms(torch_run, test_x[:LATENCY_IMAGES])
        rows = []
        for name, path in policies:
            model = load(path, num_threads=threads)
            top1, exit_block, cost = evaluate(model, test_x, test_y, name)
            ms = latency_ms(lambda x: model.run(x), test_x[:LATENCY_IMAGES])
            rows.append(Row(name, top1, float(exit_block.mean()), float(cost.mean() / full_bops), ms, torch_ms))
    print(f"\nreference ViT on Fashion-MNIST test ({len(test_x)} images); latency: batch 1, "
          f"median of {LATENCY_IMAGES} images, {threads or 'default'} threads")
    print_table(rows)
    if args.plot:
        plot(rows, Path(args.plot))
        print(f"plot: {args.plot}")
    if args.json:
        atomic_write_bytes(args.json, (json.dumps([asdict(r) for r in rows], indent=2) + "\n").encode())
        print(f"json: {args.json}")
    return 0
