#!/usr/bin/env python3
"""Reproduce results/calibration/: mixed precision (LampQ against uniform bits and a naive
mixed baseline at equal BOPs) and activation scales (static min-max / percentile, dynamic,
ScalePredictor) on the reference model, every policy converted and run through the runtime
on all 10,000 Fashion-MNIST test images.

    python tools/calibration_results.py                  # shipped model -> results/calibration/
    python tools/calibration_results.py --checkpoint /tmp/tinyref/fmnist_vit.safetensors \\
        --out /tmp/calres --test-limit 2000              # any reference-format checkpoint

What is measured, per policy: top-1 on the test images, BOPs per image as the runtime
counted them (= ``bops.static``: no exits here), model-file tensor bytes, and latency per
image at batch 1 (median over ``--latency-images`` test images, every model timed in turn
on the same image so machine-load drift hits all of them alike).

Groups:
* ``uniform``: fp32, W8A8, W8A6, W4A8, W4A6, W4A4 (dynamic scales).
* ``weights``: weight bits in {4, 8}, activations 8-bit, at budgets spread between the all-W4A8
  and all-W8A8 BOPs: LampQ, the naive weight-range allocation (same ILP, same budget), a
  random allocation (same ILP with random layer errors), and LampQ without the type factor.
* ``weights+acts``: weight bits {4, 8} and activation bits {4, 6, 8} at exactly the BOPs of
  uniform W8A6 and W4A8 -- LampQ and naive against the uniform policy of equal BOPs.
* ``scales``: W8 with 8-, 6- and 4-bit activations: dynamic, static min-max, static
  percentile (99.99), and ScalePredictor (predicted deeper scales over the percentile base).

Calibration: ``--images`` (1,024) training images, seed ``--seed``. Converted files and a
row cache live in ``--workdir`` (default: a temporary directory); with ``--workdir`` a rerun
reuses finished rows.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pyruntime.calibrate import ilp  # noqa: E402
from pyruntime.calibrate.common import (CostModel, calibration_data, normalize,  # noqa: E402
                                        policy_cost, reference_source, run_batches, scope_layers)
from pyruntime.calibrate.lampq import LampQConfig, calibrate_lampq, feasible_range, options  # noqa: E402
from pyruntime.calibrate.naive import calibrate_naive  # noqa: E402
from pyruntime.calibrate.scalepredictor import calibrate_scalepredictor  # noqa: E402
from pyruntime.calibrate.static import static_policy  # noqa: E402
from pyruntime.calibrate.uniform import uniform_policy  # noqa: E402
from pyruntime.policy import LayerPolicy, Policy  # noqa: E402

FIELDS = ("group", "policy", "method", "budget", "a_bits", "scale", "top1", "bops", "bops_vs_fp32", "bytes",
          "latency_ms", "w4_layers", "calib_s", "eval_s")


@dataclass
class Row:
    group: str
    policy: str
    method: str
    budget: str          # budget label ("", "0.40 of W4A8..W8A8", "= W8A6")
    a_bits: str
    scale: str
    top1: float = float("nan")
    bops: int = 0
    bops_vs_fp32: float = float("nan")
    bytes: int = 0
    latency_ms: float = float("nan")
    w4_layers: str = ""
    calib_s: float = 0.0   # wall time of the policy's calibration (shared steps count once, first use)
    eval_s: float = 0.0    # wall time of converting and running the test images


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="reference-format checkpoint (default: the shipped reference model)")
    p.add_argument("--out", type=Path, default=REPO / "results" / "calibration")
    p.add_argument("--workdir", type=Path, help="keep converted files and the row cache here")
    p.add_argument("--images", type=int, default=1024, help="calibration images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="runtime and torch threads")
    p.add_argument("--test-limit", type=int, help="first N test images only (default: all 10,000)")
    p.add_argument("--latency-images", type=int, default=200)
    p.add_argument("--budgets", default="0.33,0.67",
                   help="weights-only sweep: fractions of the way from all-W4A8 to all-W8A8 BOPs")
    p.add_argument("--no-ablations", action="store_true", help="skip the random allocation and LampQ without alpha_t")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


# --- calibration: one function per group, each yielding (Row, a function making its policy) ----------

def _w4(policy: Policy, source) -> str:
    layers = policy.resolve(source.layer_names(), source.depth)
    q = [lp for lp in layers.values() if lp.w_bits != 32]
    return f"{sum(lp.w_bits == 4 for lp in q)}/{len(q)}"


def uniform_rows(source, data, show):
    yield Row("uniform", "fp32", "fp32", "", "-", "-"), lambda: Policy(name="fp32")
    for w, a in ((8, 8), (8, 6), (4, 8), (4, 6), (4, 4)):
        yield Row("uniform", f"w{w}a{a}", "uniform", "", str(a), "dynamic"), lambda w=w, a=a: uniform_policy(w, a)


def random_allocation(source, budget: float, cfg: LampQConfig, seed: int) -> Policy:
    """The ILP with random layer errors: a random feasible allocation that uses the budget."""
    opts = options(cfg)
    names = scope_layers(source.layer_names(), cfg.scope)
    costs = CostModel(source, cfg.cost)
    fixed = costs.fixed(names, Policy(name="fp32"))
    rng = np.random.default_rng(seed)
    choices = []
    for n in names:
        e = np.sort(rng.uniform(0, 1, len(opts)))[::-1]  # more bits, less error, random sizes
        order = np.argsort([costs.cost(n, w, a) for w, a in opts])
        err = np.empty(len(opts))
        err[order] = e
        choices.append([(costs.cost(n, w, a), float(err[j])) for j, (w, a) in enumerate(opts)])
    pick = ilp.solve(choices, budget, fixed_cost=fixed)
    layers = {n: LayerPolicy(*opts[j]) for n, j in zip(names, pick)}
    return Policy(layers=layers, name="random", meta={"method": "random", "budget": budget})


TRACES: Dict[str, float] = {}  # Fisher traces do not depend on the options: computed once


class LampQSweep:
    """LampQ at several budgets, sharing the Fisher traces and first-round errors."""

    def __init__(self, source, data, cfg: LampQConfig):
        self.source, self.data, self.cfg = source, data, cfg
        self.errors = None

    def __call__(self, budget: float, **overrides):
        cfg = LampQConfig(**{**asdict(self.cfg), **overrides})
        res = calibrate_lampq(self.source, self.data, budget, cfg, traces=TRACES or None,
                              initial_errors=self.errors)
        TRACES.update(res.traces)
        self.errors = self.errors or res.initial_errors
        return res


def mixed_rows(group, source, data, cfg: LampQConfig, budgets, ablations):
    """LampQ, naive (and with ``ablations`` random and LampQ without alpha_t) at each
    ``(label, budget)``."""
    sweep = LampQSweep(source, data, cfg)
    tag = "w" if cfg.a_bits == (8,) else "wa"

    def lampq(budget, label):
        res = sweep(budget)
        print(f"\nLampQ ({group}) at {label} ({ilp.format_amount(round(budget))} BOPs):\n{res.report()}", flush=True)
        return res.policy

    a_label = "/".join(str(a) for a in cfg.a_bits)
    for label, short, budget in budgets:
        yield Row(group, f"lampq-{tag}{short}", "lampq", label, a_label, "dynamic"), \
            lambda b=budget, l=label: lampq(b, l)
        yield Row(group, f"naive-{tag}{short}", "naive (weight range)", label, a_label, "dynamic"), \
            lambda b=budget: calibrate_naive(source, b, cfg)[0]
        if ablations:
            yield Row(group, f"random-{tag}{short}", "random (same ILP)", label, a_label, "dynamic"), \
                lambda b=budget: random_allocation(source, b, cfg, seed=round(b) % 1000)
            yield Row(group, f"lampq-no-alpha-{tag}{short}", "lampq without alpha_t", label, a_label, "dynamic"), \
                lambda b=budget: sweep(b, type_aware=False).policy


def weight_act_budgets(source):
    """At the BOPs of uniform W4A6, W4A8 (= W8A4) and W8A6, and halfway from W4A4 to W4A6."""
    cost = {(w, a): policy_cost(source, uniform_policy(w, a), "bops") for w, a in ((4, 4), (4, 6), (4, 8), (8, 6))}
    mid = (cost[4, 4] + cost[4, 6]) / 2
    return [("W4A4..W4A6 midpoint", "@mid", mid), ("= W4A6", "=w4a6", cost[4, 6]),
            ("= W4A8 (= W8A4)", "=w4a8", cost[4, 8]), ("= W8A6", "=w8a6", cost[8, 6])]


def weight_budgets(source, fractions):
    lo, hi = feasible_range(source, LampQConfig())
    return [(f"{f:.2f} of W4A8..W8A8", f"@{f:.2f}", lo + f * (hi - lo)) for f in fractions]


def scale_rows(source, data, show):
    memo = {}

    def percentile(a):
        if a not in memo:
            memo[a] = static_policy(source, data, uniform_policy(8, a), "percentile", 99.99, show_progress=show)
        return memo[a]

    def predicted(a):
        base = percentile(a)
        res = calibrate_scalepredictor(source, data, base, block=0, chunk=64, show_progress=show)
        print(f"\nScalePredictor at W8A{a}:\n{res.report()}", flush=True)
        return res.policy

    for a in (8, 6, 4):
        yield Row("scales", f"w8a{a}-dynamic", "dynamic", "", str(a), "dynamic"), lambda a=a: uniform_policy(8, a)
        yield Row("scales", f"w8a{a}-minmax", "static min-max", "", str(a), "static"), \
            lambda a=a: static_policy(source, data, uniform_policy(8, a), "minmax", show_progress=show)
        yield Row("scales", f"w8a{a}-percentile", "static percentile", "", str(a), "static"), \
            lambda a=a: percentile(a)
        yield Row("scales", f"w8a{a}-predicted", "ScalePredictor", "", str(a), "predicted"), lambda a=a: predicted(a)


# --- evaluation -----------------------------------------------------------------------------------

def evaluate(model, x: np.ndarray, show: bool):
    """(predicted classes, mean BOPs per image) over all images, batches of 500."""
    logits, _, bops, _ = run_batches(model, x, 500, desc="test images", enabled=show)
    return logits.argmax(1), int(round(float(bops.mean())))


def latencies(models: List, x: np.ndarray, warmup: int = 3) -> List[float]:
    """Median ms per image at batch 1; each image runs through every model in turn."""
    for m in models:
        for i in range(warmup):
            m.run(x[i:i + 1])
    times = [[] for _ in models]
    for i in range(len(x)):
        for j, m in enumerate(models):
            t = time.perf_counter()
            m.run(x[i:i + 1])
            times[j].append(time.perf_counter() - t)
    return [float(np.median(t) * 1e3) for t in times]


# --- outputs ----------------------------------------------------------------------------------------

def write_csv(rows: List[Row], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            d = asdict(r)
            d["top1"] = f"{r.top1:.4f}"
            d["bops_vs_fp32"] = f"{r.bops_vs_fp32:.4f}"
            d["latency_ms"] = f"{r.latency_ms:.3f}"
            d["calib_s"] = f"{r.calib_s:.1f}"
            d["eval_s"] = f"{r.eval_s:.1f}"
            w.writerow(d)
    tmp.replace(path)


def table(rows: List[Row]) -> str:
    head = ("| group | policy | method | budget | a bits | scale | top-1 | GBOPs | BOPs/fp32 | bytes | ms/image | "
            "4-bit layers |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r.group} | {r.policy} | {r.method} | {r.budget} | {r.a_bits} | {r.scale} | "
                     f"{100 * r.top1:.2f}% | {r.bops / 1e9:.4f} | {r.bops_vs_fp32:.3f} | {r.bytes} | "
                     f"{r.latency_ms:.3f} | {r.w4_layers} |")
    return "\n".join(lines)


def _by(rows: List[Row]) -> Dict[str, Row]:
    return {r.policy: r for r in rows}


def paired(preds: Dict[str, np.ndarray], y: np.ndarray, a: str, b: str) -> str:
    """How many images only ``a`` gets right vs only ``b``, with the exact two-sided
    McNemar (binomial) p-value of that split."""
    from scipy.stats import binomtest

    if a not in preds or b not in preds:
        return "paired counts unavailable"
    ra, rb = preds[a] == y, preds[b] == y
    only_a, only_b = int((ra & ~rb).sum()), int((~ra & rb).sum())
    p = binomtest(only_a, only_a + only_b).pvalue if only_a + only_b else 1.0
    return f"{only_a} vs {only_b} images right only by one, p = {p:.2g}"


def _pct(r: Row) -> str:
    return f"{100 * r.top1:.2f}%"


def mixed_findings(rows: List[Row], preds, y) -> List[str]:
    out, R = [], _by(rows)
    uniform = [r for r in rows if r.group == "uniform"]
    stats = {"naive": [0, 0], "uniform": [0, 0], "random": [0, 0], "no-alpha": [0, 0]}
    for l in (r for r in rows if r.method == "lampq"):
        same = [r for r in rows if r.group == l.group and r.budget == l.budget and r is not l]
        # budgets named "= W4A6 ..." are the BOPs of that uniform policy
        u = next((r for r in uniform if l.budget.startswith("= ") and l.budget[2:].split(" ")[0].lower() == r.policy),
                 None)
        parts = [f"{l.group}, budget {l.budget} ({l.bops / 1e9:.4f} GBOPs): LampQ {_pct(l)}"]
        if u:
            parts.append(f"uniform {u.policy.upper()} {_pct(u)} ({u.bops / 1e9:.4f} GBOPs; {paired(preds, y, l.policy, u.policy)})")
            stats["uniform"][0] += l.top1 > u.top1
            stats["uniform"][1] += 1
        for r in same:
            key = {"naive (weight range)": "naive", "random (same ILP)": "random",
                   "lampq without alpha_t": "no-alpha"}.get(r.method)
            parts.append(f"{r.method} {_pct(r)} ({paired(preds, y, l.policy, r.policy)})")
            if key:
                stats[key][0] += l.top1 > r.top1
                stats[key][1] += 1
        out.append("; ".join(parts) + ".")
    for key, (won, n) in stats.items():
        if n:
            out.append(f"LampQ has the higher top-1 against {key} at {won} of {n} equal-BOPs points.")
    return out


def scale_findings(rows: List[Row], preds, y) -> List[str]:
    out, R = [], _by(rows)
    for a in (8, 6, 4):
        d, mm, pc, pr = (R.get(f"w8a{a}-{k}") for k in ("dynamic", "minmax", "percentile", "predicted"))
        if d and mm and pc and pr:
            out.append(f"W8A{a} scales: dynamic {_pct(d)}, static min-max {_pct(mm)}, static percentile {_pct(pc)}, "
                       f"predicted {_pct(pr)} (vs percentile: {paired(preds, y, pr.policy, pc.policy)}; vs dynamic: "
                       f"{paired(preds, y, pr.policy, d.policy)}). Latency per image: predicted "
                       f"{pr.latency_ms:.3f} ms, static {pc.latency_ms:.3f} ms "
                       f"({100 * (pr.latency_ms / pc.latency_ms - 1):+.1f}%), dynamic {d.latency_ms:.3f} ms "
                       f"({100 * (d.latency_ms / pc.latency_ms - 1):+.1f}%).")
    return out


def findings(rows: List[Row], preds: Dict[str, np.ndarray], y: np.ndarray) -> List[str]:
    """Plain statements computed from the numbers (no claims beyond them)."""
    R = _by(rows)
    out = []
    if "fp32" in R and "w4a4" in R:
        out.append("Uniform: " + ", ".join(f"{r.policy.upper()} {_pct(r)}" for r in rows if r.group == "uniform")
                   + ". Quantising the block linears costs "
                   f"{100 * (R['fp32'].top1 - R['w4a4'].top1):.2f} pt at W4A4 on this model.")
    return out + mixed_findings(rows, preds, y) + scale_findings(rows, preds, y)


def plot(rows: List[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    ax = axes[0]
    styles = {"uniform": ("k", "s"), "lampq": ("C0", "o"), "naive (weight range)": ("C1", "^"),
              "random (same ILP)": ("C2", "x"), "lampq without alpha_t": ("C3", "v")}
    for method, (color, marker) in styles.items():
        for group, ls, suffix in (("uniform", "none", ""), ("weights+acts", "-", " (w 4/8, a 4/6/8)"),
                                  ("weights", ":", " (w 4/8, a 8)")):
            pts = sorted((r.bops / 1e9, 100 * r.top1) for r in rows if r.method == method and r.group == group)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, marker=marker, ls=ls,
                        mfc="none" if group == "weights" else color, label=method + suffix)
    for r in rows:
        if r.group == "uniform" and r.policy != "fp32":
            ax.annotate(r.policy, (r.bops / 1e9, 100 * r.top1), textcoords="offset points", xytext=(4, -10),
                        fontsize=8)
    fp32 = next((r for r in rows if r.policy == "fp32"), None)
    if fp32:
        ax.axhline(100 * fp32.top1, color="gray", ls="--", lw=0.8,
                   label=f"fp32 ({fp32.bops / 1e9:.1f} GBOPs)")
    ax.set(xlabel="GBOPs per image (runtime count)", ylabel="top-1 (%)", title="Mixed precision at equal BOPs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[1]
    modes = [("dynamic", "C7"), ("static min-max", "C1"), ("static percentile", "C2"), ("ScalePredictor", "C0")]
    bits = ["8", "6", "4"]
    width = 0.2
    for k, (mode, color) in enumerate(modes):
        vals = [next((r for r in rows if r.group == "scales" and r.method == mode and r.a_bits == b), None)
                for b in bits]
        xs = np.arange(len(bits)) + (k - 1.5) * width
        bars = ax.bar(xs, [100 * v.top1 if v else 0 for v in vals], width, color=color, label=mode)
        for bar, v in zip(bars, vals):
            if v:
                ax.annotate(f"{v.latency_ms:.2f}ms", (bar.get_x() + width / 2, bar.get_height()),
                            textcoords="offset points", xytext=(0, 2), ha="center", fontsize=6, rotation=90)
    tops = [100 * r.top1 for r in rows if r.group == "scales"]
    if tops:
        ax.set_ylim(max(0.0, min(tops) - 3), min(100.0, max(tops) + 1.5))
    ax.set_xticks(range(len(bits)), [f"W8A{b}" for b in bits])
    ax.set(ylabel="top-1 (%)", title="Activation scales (latency per image above bars)")
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def write_md(rows: List[Row], path: Path, context: dict, preds: Dict[str, np.ndarray], y: np.ndarray) -> None:
    lines = ["# Calibration results", "",
             f"Model: `{context['checkpoint']}` (sha256 {context['sha256'][:16]}...), "
             f"{context['test_images']} Fashion-MNIST test images, every policy converted and run through the "
             f"pyruntime executor ({context['threads']} threads, ISA {context['isa']}). Calibration: "
             f"{context['calib_images']} training images (seed {context['seed']}). Latency: batch 1, median over "
             f"{context['latency_images']} test images, models interleaved image by image. Machine: "
             f"{context['machine']}; generated by `tools/calibration_results.py` in {context['minutes']:.1f} min "
             f"(calibration {context['calib_minutes']:.1f} min and test evaluation {context['eval_minutes']:.1f} min "
             f"in all, the rest latency and plotting).",
             "", "BOPs are per image for the whole model (patch embedding and head fp32, attention matmuls fp32, "
             "as `pyruntime.bops.static`). LampQ and its baselines choose per layer from w in {4, 8} and "
             "a in {4, 6, 8} (group weights+acts) or w in {4, 8} at a = 8 (group weights); budgets named "
             "\"= W4A6\" etc. are exactly that uniform policy's BOPs, the others fractions of the way from the "
             "all-W4A8 to the all-W8A8 cost. Paired counts: test images only one of two policies classifies "
             "correctly, with the exact two-sided McNemar p-value.", "",
             "## Findings (computed from the table)", ""]
    lines += [f"- {s}" for s in findings(rows, preds, y)]
    lines += ["", "## Table", "", table(rows), "", "![results](results.png)", ""]
    path.write_text("\n".join(lines))


# --- driver -----------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    import torch

    import pyruntime
    from pyruntime.datasets import fashion_mnist

    torch.set_num_threads(args.threads)
    show = not args.no_progress
    fractions = [float(v) for v in args.budgets.split(",") if v]
    source = reference_source(args.checkpoint)
    mean, std = source.preprocess["mean"], source.preprocess["std"]
    data = calibration_data(args.images, args.seed, mean, std)
    tx, ty = fashion_mnist("test")
    if args.test_limit:
        tx, ty = tx[:args.test_limit], ty[:args.test_limit]
    x = normalize(tx, mean, std)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="calres-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        cache_path = work / "rows.json"
        cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
        ablations = not args.no_ablations
        groups = [uniform_rows(source, data, show),
                  mixed_rows("weights+acts", source, data, LampQConfig(a_bits=(4, 6, 8), show_progress=show),
                             weight_act_budgets(source), ablations),
                  mixed_rows("weights", source, data, LampQConfig(show_progress=show),
                             weight_budgets(source, fractions), False),
                  scale_rows(source, data, show)]
        rows, models, preds = [], [], {}
        fp32_bops = None
        for gen in groups:
            for row, make in gen:
                path = work / f"{row.policy}.pyrt"
                pred_path = work / f"{row.policy}.pred.npy"
                if row.policy in cache and path.is_file() and pred_path.is_file():
                    row = Row(**cache[row.policy])
                    preds[row.policy] = np.load(pred_path)
                else:
                    t0 = time.time()
                    policy = make()
                    row.calib_s = time.time() - t0
                    t0 = time.time()
                    source.convert(path, policy)
                    model = pyruntime.load(path, num_threads=args.threads)
                    preds[row.policy], row.bops = evaluate(model, x, show)
                    row.top1 = float((preds[row.policy] == ty).mean())
                    np.save(pred_path, preds[row.policy])
                    row.eval_s = time.time() - t0
                    row.bytes = policy_cost(source, policy, "bytes")
                    row.w4_layers = _w4(policy, source)
                    policy.save(work / f"{row.policy}.json")
                fp32_bops = fp32_bops or row.bops
                row.bops_vs_fp32 = row.bops / fp32_bops
                print(f"{row.policy:24s} top-1 {100 * row.top1:6.2f}%  {row.bops / 1e9:8.4f} GBOPs  "
                      f"calib {row.calib_s:6.1f}s", flush=True)
                rows.append(row)
                models.append(pyruntime.load(path, num_threads=args.threads))
                cache[row.policy] = asdict(row)
                cache_path.write_text(json.dumps(cache, indent=1))
        print(f"latency: {len(models)} models x {args.latency_images} images, batch 1", flush=True)
        for row, ms in zip(rows, latencies(models, x[:args.latency_images])):
            row.latency_ms = ms
        isa = models[0].run(x[:1]).isa
    context = {"checkpoint": str(Path(source.checkpoint).relative_to(REPO)) if str(source.checkpoint).startswith(str(REPO))
               else str(source.checkpoint),
               "sha256": __import__("hashlib").sha256(Path(source.checkpoint).read_bytes()).hexdigest(),
               "test_images": len(ty), "threads": args.threads, "isa": isa, "calib_images": len(data),
               "seed": args.seed, "latency_images": args.latency_images,
               "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs (shared with other jobs)",
               "minutes": (time.time() - t_start) / 60,
               "calib_minutes": sum(r.calib_s for r in rows) / 60, "eval_minutes": sum(r.eval_s for r in rows) / 60}
    write_csv(rows, args.out / "results.csv")
    write_md(rows, args.out / "results.md", context, preds, ty)
    plot(rows, args.out / "results.png")
    print("\n" + table(rows) + "\n")
    print("\n".join(findings(rows, preds, ty)))
    print(f"\nwrote {args.out}/results.csv, results.md, results.png in {(time.time() - t_start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
