#!/usr/bin/env python3
"""Reproduce results/exits/: accuracy against expected BOPs and against measured latency per
image for every way this project spends fewer bits or less depth, on the reference model and
all 10,000 Fashion-MNIST test images, each policy converted and run by the runtime.

    python tools/exit_results.py                          # -> results/exits/{results.csv,results.md,results.png}
    python tools/exit_results.py --test-limit 2000 --out /tmp/ex --latency-images 200   # quicker look

Curves (one per method; every point a converted model file run by the runtime):

* ``uniform``: fp32, W8A8, W8A6, W4A8, W4A6, W4A4 (block linears; no exits).
* ``lampq``: LampQ (w 4/8, a 4/6/8) at the BOPs of uniform W8A6, W4A8, W4A6 and halfway from
  W4A4 to W4A6 (quantisation only).
* ``exits-only``: fp32 with confidence exits after blocks 0..10, one shared threshold swept.
* ``ptq+exits W8A8`` / ``ptq+exits W4A8``: the same thresholds bolted onto uniform W8A8 / W4A8
  (the APQ and QuEE papers' baseline).
* ``maqee``: :mod:`pyruntime.calibrate.maqee` (4/8-bit weights, 8-bit activations) at
  expected-BOPs budgets (fractions of W8A8's full-depth BOPs) for promises of 0.5 and 1 point
  against fp32; a budget it cannot meet while keeping the promise is reported and skipped.
* ``maqee-latency``: the same fitted to this machine's latency table (``profile_latency`` of
  the fp32 model at batch 1, the thread count of the latency measurement), budgets as
  fractions of W8A8's full-depth latency in the table.
* ``quee``: :mod:`pyruntime.calibrate.quee` gates (W8A8 full, W4A8 reduced, gates after
  blocks 2, 5, 8) across its lambda sweep.

Measured per point: top-1 on the test images; expected BOPs = the runtime's mean per-image
count (checked equal to ``bops.expected`` at the reach the runtime's exits give); the mean exit
block; latency per image at batch 1 on ``--threads`` threads -- the mean over
``--latency-images`` test images, each image run through every model in turn and the best of
``--latency-passes`` passes kept per (model, image), so load drift hits every model alike.
Operating points: per method, the cheapest point (by BOPs, and separately by latency) within
0.5 and 1 point of fp32's top-1 on the test images.

Calibration: 1,024 training images (seed 0) for every method. ``--workdir`` keeps converted
files, policies and rows, so a rerun reuses finished points (the latency pass always reruns).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pyruntime import bops  # noqa: E402
from pyruntime.calibrate.common import (CostModel, calibration_data, normalize, policy_cost,  # noqa: E402
                                        reference_source, run_batches)
from pyruntime.calibrate.lampq import LampQConfig, calibrate_lampq  # noqa: E402
from pyruntime.calibrate.maqee import BudgetNotMet, MaqeeConfig, calibrate_maqee  # noqa: E402
from pyruntime.calibrate.quee import default_lambdas, fit_quee  # noqa: E402
from pyruntime.calibrate.uniform import uniform_policy  # noqa: E402
from pyruntime.policy import ExitPolicy, Policy  # noqa: E402

FIELDS = ("method", "point", "top1", "bops", "bops_vs_fp32", "mean_exit_block", "latency_ms", "table_latency_ms",
          "promise", "calib_s")
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999)
MAQEE_BUDGETS = (0.35, 0.4, 0.45, 0.5, 0.6)
MAQEE_DROPS = (0.005, 0.01)
LATENCY_BUDGETS = (0.45, 0.5, 0.55, 0.6)
STYLES = {"uniform": ("k", "s", "none"), "lampq": ("C0", "o", "-"), "exits-only": ("C7", "^", "-"),
          "ptq+exits W8A8": ("C1", "v", "-"), "ptq+exits W4A8": ("C5", "<", "-"), "maqee": ("C3", "D", "-"),
          "maqee-latency": ("C4", "P", "-"), "quee": ("C2", "X", "-")}


@dataclass
class Row:
    method: str
    point: str
    top1: float = float("nan")
    bops: float = float("nan")
    bops_vs_fp32: float = float("nan")
    mean_exit_block: float = float("nan")
    latency_ms: float = float("nan")
    table_latency_ms: float = float("nan")  # the latency table's expected ms at the test reach (maqee-latency)
    promise: str = ""                       # maqee: the drop promised and whether the test images kept it
    calib_s: float = 0.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="reference-format checkpoint (default: the shipped reference model)")
    p.add_argument("--out", type=Path, default=REPO / "results" / "exits")
    p.add_argument("--workdir", type=Path, help="keep converted files, policies and rows here")
    p.add_argument("--images", type=int, default=1024, help="calibration images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="runtime threads for the latency measurement and table")
    p.add_argument("--test-limit", type=int, help="first N test images only (default: all 10,000)")
    p.add_argument("--latency-images", type=int, default=1000)
    p.add_argument("--latency-passes", type=int, default=2)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _with_exits(policy: Policy, depth: int, threshold: float, name: str) -> Policy:
    policy.exits = [ExitPolicy(b, "confidence", float(threshold)) for b in range(depth - 1)]
    policy.name = name
    return policy


# --- the points: (method, label, make) with make() -> Policy ------------------------------------------

Point = Tuple[str, str, Callable[[], Policy]]


def uniform_points() -> Iterator[Point]:
    yield "uniform", "fp32", lambda: Policy(name="fp32")
    for w, a in ((8, 8), (8, 6), (4, 8), (4, 6), (4, 4)):
        yield "uniform", f"W{w}A{a}", lambda w=w, a=a: uniform_policy(w, a)


def lampq_points(source, data, show: bool, traces: dict) -> Iterator[Point]:
    cost = {(w, a): policy_cost(source, uniform_policy(w, a), "bops") for w, a in ((4, 4), (4, 6), (4, 8), (8, 6))}
    budgets = [("W4A4..W4A6 mid", (cost[4, 4] + cost[4, 6]) / 2), ("= W4A6", cost[4, 6]), ("= W4A8", cost[4, 8]),
               ("= W8A6", cost[8, 6])]
    for label, b in budgets:
        def make(b=b):
            res = calibrate_lampq(source, data, b, LampQConfig(a_bits=(4, 6, 8), show_progress=show),
                                  traces=traces or None)
            traces.update(res.traces)
            return res.policy
        yield "lampq", label, make


def threshold_points(depth: int) -> Iterator[Point]:
    for method, base in (("exits-only", (32, 8)), ("ptq+exits W8A8", (8, 8)), ("ptq+exits W4A8", (4, 8))):
        for t in THRESHOLDS:
            def make(base=base, t=t, method=method):
                p = Policy(name="fp32") if base[0] == 32 else uniform_policy(*base)
                return _with_exits(p, depth, t, f"{method} t={t}")
            yield method, f"t={t}", make


def maqee_points(source, data, show: bool, traces: dict, costs: Optional[CostModel], method: str,
                 budgets, drops) -> Iterator[Point]:
    kind = "bops" if costs is None else "latency"
    w8 = policy_cost(source, uniform_policy(8, 8), kind, None if costs is None else costs.table)
    for drop in drops:
        for f in budgets:
            def make(f=f, drop=drop):
                cfg = MaqeeConfig(max_drop=drop, cost=kind, show_progress=show)
                res = calibrate_maqee(source, data, f * w8, cfg, costs=costs, traces=traces or None)
                traces.update(res.traces)
                print(f"\n{method} at {f}x W8A8 ({kind}), promise {100 * drop:g} pt:\n{res.report()}", flush=True)
                return res.policy
            yield method, f"{f}x, {100 * drop:g} pt", make


# --- measuring ---------------------------------------------------------------------------------------

def evaluate(model, x: np.ndarray, y: np.ndarray, show: bool) -> Tuple[float, float, float, np.ndarray]:
    """(top-1, mean BOPs, mean exit block, reach) over all test images, checking the runtime's
    per-image BOPs against ``bops.expected`` at the reach its exits give."""
    logits, exit_block, per_image, _ = run_batches(model, x, 500, desc="test images", enabled=show)
    reach = bops.reach_from_exits(model.graph, exit_block) if model.graph["exits"] else np.ones(model.depth)
    mean_bops = float(per_image.mean())
    if model.graph.get("gates") is None:
        expected = bops.expected(model.graph, reach)
        if abs(expected - mean_bops) > 1e-9 * mean_bops:
            raise AssertionError(f"{model.path}: runtime mean BOPs {mean_bops} != bops.expected {expected}")
    return float((logits.argmax(1) == y).mean()), mean_bops, float(exit_block.mean()), reach


def latencies(models: List, x: np.ndarray, passes: int, warmup: int = 5) -> List[float]:
    """Mean ms per image at batch 1: each image through every model in turn, the best of
    ``passes`` kept per (model, image)."""
    for m in models:
        for i in range(warmup):
            m.run(x[i:i + 1])
    best = np.full((len(models), len(x)), np.inf)
    for _ in range(passes):
        for i in range(len(x)):
            xi = x[i:i + 1]
            for j, m in enumerate(models):
                t = time.perf_counter()
                m.run(xi)
                best[j, i] = min(best[j, i], time.perf_counter() - t)
    return [float(v) for v in best.mean(1) * 1e3]


def operating_points(rows: List[Row], fp32_top1: float) -> List[dict]:
    """Per method and allowed drop (0.5, 1 point): the cheapest point by BOPs and by latency."""
    out = []
    for method in STYLES:
        pts = [r for r in rows if r.method == method]
        for drop in (0.005, 0.01):
            ok = [r for r in pts if r.top1 >= fp32_top1 - drop - 1e-12]
            by_bops = min(ok, key=lambda r: r.bops, default=None)
            by_lat = min(ok, key=lambda r: r.latency_ms, default=None)
            out.append({"method": method, "drop": drop, "by_bops": by_bops, "by_latency": by_lat})
    return out


def equal_accuracy(rows: List[Row]) -> List[str]:
    """Per MAQEE / QuEE point: the cheapest (BOPs) point of each other method with top-1 >= its."""
    out = []
    for r in (r for r in rows if r.method in ("maqee", "maqee-latency", "quee")):
        parts = []
        for method in STYLES:
            if method == r.method:
                continue
            ok = [o for o in rows if o.method == method and o.top1 >= r.top1 - 1e-12]
            best = min(ok, key=lambda o: o.bops, default=None)
            if best is not None:
                parts.append(f"{method} {best.bops / r.bops:.2f}x the BOPs, {best.latency_ms / r.latency_ms:.2f}x the "
                             f"latency ({best.point})")
        out.append(f"{r.method} {r.point} ({100 * r.top1:.2f}%, {r.bops / 1e9:.3f} GBOPs, {r.latency_ms:.3f} ms): "
                   + ("; ".join(parts) if parts else "no other point is as accurate"))
    return out


# --- outputs -----------------------------------------------------------------------------------------

def write_csv(rows: List[Row], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            d = asdict(r)
            for k, fmt in (("top1", "{:.4f}"), ("bops", "{:.0f}"), ("bops_vs_fp32", "{:.4f}"), ("mean_exit_block", "{:.2f}"),
                           ("latency_ms", "{:.4f}"), ("table_latency_ms", "{:.4f}"), ("calib_s", "{:.1f}")):
                d[k] = fmt.format(d[k])
            w.writerow(d)
    tmp.replace(path)


def _fmt(r: Optional[Row], fp32: Row, kind: str) -> str:
    if r is None:
        return "none"
    if kind == "bops":
        return f"{r.point}: {100 * r.top1:.2f}%, {100 * r.bops_vs_fp32:.2f}% of fp32 BOPs ({fp32.bops / r.bops:.1f}x fewer)"
    return f"{r.point}: {100 * r.top1:.2f}%, {r.latency_ms:.3f} ms ({fp32.latency_ms / r.latency_ms:.2f}x faster)"


def write_md(rows: List[Row], ops: List[dict], path: Path, ctx: dict) -> None:
    fp32 = next(r for r in rows if r.method == "uniform" and r.point == "fp32")
    lines = ["# Exit-aware precision: all methods on the reference model", "",
             f"Model `{ctx['checkpoint']}`; {ctx['test_images']} Fashion-MNIST test images, every policy converted "
             f"and run by the pyruntime executor (ISA {ctx['isa']}). BOPs: the runtime's mean per-image count "
             f"(= `bops.expected` at the reach its exits give; fp32 full depth = {fp32.bops / 1e9:.2f} GBOPs). "
             f"Latency: batch 1, {ctx['threads']} thread(s), mean over {ctx['latency_images']} test images "
             f"(best of {ctx['latency_passes']} passes per image, models interleaved image by image). "
             f"Calibration: {ctx['calib_images']} training images (seed {ctx['seed']}). Machine: {ctx['machine']}; "
             f"`python tools/exit_results.py` took {ctx['minutes']:.1f} min.", "",
             "## Operating points (cheapest point within 0.5 / 1 point of fp32's test top-1 "
             f"{100 * fp32.top1:.2f}%)", "",
             "Read off each curve with the test labels: for the swept methods (uniform bits, thresholds, "
             "QuEE's lambda) that picks their best setting *on the test images*; MAQEE's points were chosen on "
             "calibration images alone, each with its own promise (next section).", "",
             "| method | drop | cheapest by BOPs | cheapest by latency |", "|---|---|---|---|"]
    for o in ops:
        lines.append(f"| {o['method']} | {100 * o['drop']:g} pt | {_fmt(o['by_bops'], fp32, 'bops')} | "
                     f"{_fmt(o['by_latency'], fp32, 'latency')} |")
    kept = [r for r in rows if r.promise]
    if kept:
        lines += ["", "## MAQEE promises on the test images", "",
                  "Each MAQEE point promises a top-1 drop against fp32 at full depth, fitted on 768 calibration "
                  "images and checked on 256 held-out ones; here is what the 10,000 test images say.", "",
                  "| method | point | test top-1 | drop (pt) | promise |", "|---|---|---|---|---|"]
        for r in kept:
            lines.append(f"| {r.method} | {r.point} | {100 * r.top1:.2f}% | {100 * (fp32.top1 - r.top1):.2f} | "
                         f"{r.promise} |")
    lines += ["", "## Against the other methods at equal accuracy", "",
              "For each calibrated point (MAQEE, QuEE): the cheapest point of every other curve that is at least "
              "as accurate on the test images.", ""]
    lines += [f"- {line}" for line in equal_accuracy(rows)]
    lat = [r for r in rows if r.method == "maqee-latency" and np.isfinite(r.table_latency_ms)]
    if lat:
        lines += ["", "Latency table against measurement (maqee-latency points): "
                  + "; ".join(f"{r.point}: table {r.table_latency_ms:.3f} ms, measured {r.latency_ms:.3f} ms"
                              for r in lat) + "."]
    lines += ["", "## All points", "", "| method | point | top-1 | GBOPs | BOPs/fp32 | mean exit block | ms/image | "
              "calibration s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.method} | {r.point} | {100 * r.top1:.2f}% | {r.bops / 1e9:.4f} | {r.bops_vs_fp32:.4f} | "
                     f"{r.mean_exit_block:.2f} | {r.latency_ms:.3f} | {r.calib_s:.1f} |")
    lines += ["", "![results](results.png)", ""]
    path.write_text("\n".join(lines))


def plot(rows: List[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fp32 = next(r for r in rows if r.method == "uniform" and r.point == "fp32")
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    for ax, key, xlabel in ((axes[0], "bops_vs_fp32", "expected BOPs per image / fp32 full depth (log)"),
                            (axes[1], "latency_ms", "measured latency per image, batch 1 (ms)")):
        for method, (color, marker, ls) in STYLES.items():
            pts = [r for r in rows if r.method == method]
            if method.startswith("maqee"):
                groups = {}
                for r in pts:
                    groups.setdefault(r.point.split(", ")[1], []).append(r)
            else:
                groups = {"": pts}
            for g, rs in groups.items():
                rs = sorted(rs, key=lambda r: getattr(r, key))
                if not rs:
                    continue
                ax.plot([getattr(r, key) for r in rs], [100 * r.top1 for r in rs], color=color, marker=marker,
                        ls=ls if not g.startswith("1") else ":", ms=5,
                        label=method + (f" ({g} promise)" if g else ""))
        for d, ls in ((0.0, "--"), (0.005, ":"), (0.01, ":")):
            ax.axhline(100 * (fp32.top1 - d), color="gray", ls=ls, lw=0.8)
        ax.set(xlabel=xlabel, ylabel="top-1 on 10,000 test images (%)")
        ax.set_ylim(100 * fp32.top1 - 4, 100 * fp32.top1 + 0.6)
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log")
    axes[0].set_title("accuracy against expected BOPs (dashed: fp32; dotted: -0.5 / -1 point)")
    axes[1].set_title("accuracy against measured latency")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


# --- driver ------------------------------------------------------------------------------------------

def _machine() -> str:
    from pyruntime.latency import cpu_model

    return f"{cpu_model()}, {os.cpu_count()} CPUs"


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    import torch

    import pyruntime
    from pyruntime.datasets import fashion_mnist
    from pyruntime.latency import LatencyTable, profile_latency

    torch.set_num_threads(2)
    show = not args.no_progress
    source = reference_source(args.checkpoint)
    mean, std = source.preprocess["mean"], source.preprocess["std"]
    data = calibration_data(args.images, args.seed, mean, std)
    tx, ty = fashion_mnist("test")
    if args.test_limit:
        tx, ty = tx[:args.test_limit], ty[:args.test_limit]
    x = normalize(tx, mean, std)
    depth = source.depth
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="exitres-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        table_path = work / "latency_table.json"
        if not table_path.is_file():
            probe = _with_exits(Policy(name="fp32"), depth, 1.0, "fp32-probe")
            source.convert(work / "fp32_probe.pyrt", probe)
            profile_latency(work / "fp32_probe.pyrt", runs=300, warmup=20, num_threads=args.threads).save(table_path)
        table = LatencyTable.load(table_path)
        lat_costs = CostModel(source, "latency", table=table)
        traces: dict = {}
        points = [*uniform_points(), *lampq_points(source, data, show, traces), *threshold_points(depth),
                  *maqee_points(source, data, show, traces, None, "maqee", MAQEE_BUDGETS, MAQEE_DROPS),
                  *maqee_points(source, data, show, traces, lat_costs, "maqee-latency", LATENCY_BUDGETS, (0.005,))]
        cache_path = work / "rows.json"
        cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
        rows: List[Row] = []
        models = []
        for method, label, make in points:
            key = f"{method}|{label}"
            path = work / (key.replace("|", "__").replace(" ", "_").replace(",", "") + ".pyrt")
            if key in cache and path.is_file():
                row = Row(**cache[key])
            else:
                row = Row(method, label)
                t0 = time.time()
                try:
                    policy = make()
                except BudgetNotMet as e:
                    print(f"{key}: {e}", flush=True)
                    continue
                row.calib_s = time.time() - t0
                source.convert(path, policy)
                m = pyruntime.load(path, num_threads=2)
                row.top1, row.bops, row.mean_exit_block, reach = evaluate(m, x, ty, show)
                if method.startswith("maqee"):
                    drop = policy.meta["max_drop"]
                    kept = row.top1 >= fp32_top1(rows) - drop - 1e-12
                    row.promise = f"{100 * drop:g} pt: {'kept' if kept else 'broken'}"
                if method == "maqee-latency":
                    row.table_latency_ms = 1e3 * table.expected(m.graph, reach)
                cache[key] = asdict(row)
                cache_path.write_text(json.dumps(cache, indent=1))
            rows.append(row)
            models.append(pyruntime.load(path, num_threads=args.threads))
            print(f"{key}: top-1 {100 * row.top1:.2f}%, {row.bops / 1e9:.4f} GBOPs, exit {row.mean_exit_block:.2f}",
                  flush=True)
        # QuEE: one fit, its lambda sweep
        quee_points = [(k, r) for k, r in cache.items() if k.startswith("quee|")]
        if not quee_points or not all((work / f"quee__{r['point']}.pyrt").is_file() for _, r in quee_points):
            t0 = time.time()
            fit = fit_quee(source, data, base="w8a8", num_threads=2)
            fit_s = time.time() - t0
            for lam in default_lambdas(fit, n=8):
                label = f"lambda={lam:g}"
                path = work / f"quee__{label}.pyrt"
                source.convert(path, fit.policy(lam))
                m = pyruntime.load(path, num_threads=2)
                row = Row("quee", label, calib_s=fit_s)
                row.top1, row.bops, row.mean_exit_block, _ = evaluate(m, x, ty, show)
                cache[f"quee|{label}"] = asdict(row)
            cache_path.write_text(json.dumps(cache, indent=1))
        for key, r in cache.items():
            if key.startswith("quee|"):
                row = Row(**r)
                rows.append(row)
                models.append(pyruntime.load(work / f"quee__{row.point}.pyrt", num_threads=args.threads))
        fp = next(r for r in rows if r.method == "uniform" and r.point == "fp32")
        for r in rows:
            r.bops_vs_fp32 = r.bops / fp.bops
        n_lat = min(args.latency_images, len(x))
        print(f"latency: {len(models)} models x {n_lat} images x {args.latency_passes} passes", flush=True)
        for r, ms in zip(rows, latencies(models, x[:n_lat], args.latency_passes)):
            r.latency_ms = ms
        ctx = {"checkpoint": str(source.checkpoint.relative_to(REPO)) if source.checkpoint and
               REPO in source.checkpoint.parents else str(source.checkpoint), "test_images": len(x),
               "isa": pyruntime.isa(), "threads": args.threads, "latency_images": n_lat,
               "latency_passes": args.latency_passes, "calib_images": args.images, "seed": args.seed,
               "machine": _machine(), "minutes": (time.time() - t_start) / 60}
        write_csv(rows, args.out / "results.csv")
        ops = operating_points(rows, fp.top1)
        write_md(rows, ops, args.out / "results.md", ctx)
        plot(rows, args.out / "results.png")
        table.save(args.out / "latency_table.json")
    print(f"wrote {args.out}/results.{{csv,md,png}} and latency_table.json in {(time.time() - t_start) / 60:.1f} min")
    return 0


def fp32_top1(rows: List[Row]) -> float:
    return next(r.top1 for r in rows if r.method == "uniform" and r.point == "fp32")


if __name__ == "__main__":
    sys.exit(main())
