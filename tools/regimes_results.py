#!/usr/bin/env python3
"""Reproduce results/regimes/: where on the reference model uniform precision breaks, so the
method tables (tools/results_<method>.py) can be read against regimes where a choice of bits
or scales has something to win.

    python tools/regimes_results.py                       # shipped model -> results/regimes/
    python tools/regimes_results.py --checkpoint /work/ref30/fmnist_vit.safetensors --out /tmp/reg \\
        --workdir /tmp/reg-work                           # any reference-format checkpoint; reruns reuse rows

Every regime is converted and run by the runtime on the validation part (training images
55000..59999, never trained on) and on the Fashion-MNIST test images:

* ``fp32``: fp32, and fp32 linears with int8 attention (``fp32-attn8``).
* ``dynamic``: uniform W{8,4} x A{8,6,5,4}, per-image (dynamic) activation scales.
* ``attn8``: the same grid with int8 attention matmuls (graph attention bits 8).
* ``static``: W{8,4} x A{8,6,4} with one static scale per layer from the calibration part
  (training images 50000..54999): min-max and the 99.99th percentile (one calibration
  pass each, the slow part of the sweep).
* ``ends``: {4, 8}-bit weights by a rule, no method (``uniform.ends_policy``): the first
  and/or last k blocks at 8 bits, the rest at 4, at A8 and A4.

Per row: top-1 with its exact (Clopper-Pearson) 95% interval, the paired bootstrap interval of
top-1 minus fp32's on the same images with the exact McNemar p (``pyruntime.stats.compare``),
BOPs per image as the runtime counted them, the mean |logit - fp32 logit| and the share of
images whose top class changed. Both splits are reported so a reader can check that the
ordering the validation images give is the one the test images give.

Choices -- made on the validation labels only, before the test labels are looked at
(``choose``), and marked ``chosen_on: validation``: the static clip (min-max or a percentile)
of each (W, A), and the operating points "cheapest regime within 0.5 / 1 point of fp32". Every
other row is a fixed grid point (``chosen_on: none``). The test labels only enter ``report``.

Also measured: the activation outliers of the fp32 model, per block and linear: max |x| over
p99.9 |x| of the layer's input, and the largest channel's max |x| over the median channel's,
on ``--outlier-images`` calibration images.
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
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from _protocol import add_protocol_args, check_protocol_args, holdout_lines, load_protocol  # noqa: E402
from pyruntime.calibrate.common import calibration_data, run_batches  # noqa: E402
from pyruntime.calibrate.emulate import layer_module  # noqa: E402
from pyruntime.calibrate.static import static_policy  # noqa: E402
from pyruntime.calibrate.uniform import ends_policy, uniform_policy  # noqa: E402
from pyruntime.policy import Policy  # noqa: E402
from pyruntime.stats import clopper_pearson, compare  # noqa: E402

SPLITS = ("validation", "test")
W_GRID = (8, 4)
A_GRID = (8, 6, 5, 4)
PERCENTILES = (99.99,)
STATIC_A = (8, 6, 4)    # a static clip matters on coarse grids; 5 bits would sit between 6 and 4
ENDS = ((1, 0), (0, 1), (1, 1), (2, 2))   # (first, last) blocks at 8 bits
ENDS_A = (8, 4)
DROPS = (0.005, 0.01)   # operating points: cheapest regime within this much of fp32's validation top-1
OUTLIER_Q = 99.9
FIELDS = ("group", "policy", "w_bits", "a_bits", "scale", "attention", "chosen_on", "gbops", "bops_vs_fp32",
          "val_top1", "val_lo", "val_hi", "val_diff", "val_diff_lo", "val_diff_hi", "val_verdict",
          "test_top1", "test_lo", "test_hi", "test_diff", "test_diff_lo", "test_diff_hi", "test_p", "test_verdict",
          "test_logit_err", "test_flips")


@dataclass(frozen=True)
class Regime:
    group: str
    name: str
    w_bits: int          # 32: fp32 linears; for "ends" the low bits (4)
    a_bits: int          # 32: fp32 activations
    scale: str           # "dynamic", "minmax", "p99.99", ... ("-" for fp32)
    attn_bits: int = 32
    first: int = 0       # ends: blocks 0..first-1 at 8 bits
    last: int = 0        # ends: the last ``last`` blocks at 8 bits


def regimes(depth: int, quick: bool = False) -> List[Regime]:
    """The sweep, fp32 first; ends rules that leave no 4-bit block in ``depth`` blocks are
    dropped (they are uniform W8). ``quick``: W{8,4} x A{8,4} and ends (1, 1) (for tests and a
    first look)."""
    a_grid = (8, 4) if quick else A_GRID
    pcts = PERCENTILES
    ends = ((1, 1),) if quick else ENDS
    out = [Regime("fp32", "fp32", 32, 32, "-"), Regime("fp32", "fp32-attn8", 32, 32, "-", attn_bits=8)]
    grid = [(w, a) for w in W_GRID for a in a_grid]
    out += [Regime("dynamic", f"w{w}a{a}", w, a, "dynamic") for w, a in grid]
    out += [Regime("attn8", f"w{w}a{a}-attn8", w, a, "dynamic", attn_bits=8) for w, a in grid]
    for w, a in ((w, a) for w, a in grid if a in STATIC_A):
        out.append(Regime("static", f"w{w}a{a}-minmax", w, a, "minmax"))
        out += [Regime("static", f"w{w}a{a}-p{p:g}", w, a, f"p{p:g}") for p in pcts]
    out += [Regime("ends", f"f{f}l{l}-w8/4a{a}", 4, a, "dynamic", first=f, last=l)
            for a in ENDS_A if a in a_grid for f, l in ends if f + l < depth]
    return out


def make_policy(r: Regime, source, calib, show: bool) -> Policy:
    if r.group == "fp32":
        return Policy(name=r.name, attn_bits=r.attn_bits)
    if r.group == "ends":
        return ends_policy(source.depth, r.first, r.last, a_bits=r.a_bits, name=r.name)
    base = uniform_policy(r.w_bits, r.a_bits, attn_bits=r.attn_bits)
    if r.scale == "dynamic":
        return base
    if r.scale == "minmax":
        return static_policy(source, calib, base, "minmax", name=r.name, show_progress=show)
    return static_policy(source, calib, base, "percentile", float(r.scale[1:]), name=r.name, show_progress=show)


# --- measuring: label-free (predictions, logit error, BOPs) ---------------------------------------

@dataclass
class Measured:
    regime: Regime
    bops: float                       # mean per test image, as the runtime counted
    pred: Dict[str, np.ndarray]       # split -> predicted class per image
    logit_err: Dict[str, float]       # split -> mean |logit - fp32 logit|
    flips: Dict[str, float]           # split -> share of images whose top class differs from fp32's
    reused: bool = False              # read from --workdir rather than measured in this run


def _run(model, x: np.ndarray, show: bool, desc: str) -> Tuple[np.ndarray, float]:
    logits, _, bops, _ = run_batches(model, x, 500, desc=desc, enabled=show)
    return logits, float(bops.mean())


def measure(sweep: Sequence[Regime], source, calib, images: Mapping[str, np.ndarray], work: Path,
            threads: int, show: bool) -> List[Measured]:
    """Convert and run every regime on every split's images; no labels involved. Rows already
    in ``work`` (same checkpoint and images: ``work/config.json``; static rows also the same
    calibration images, in their file name) are reused."""
    import pyruntime

    fp32_logits: Dict[str, np.ndarray] = {}
    out = []
    for r in sweep:
        cal = f"-cal{calib.summary['indices_sha256']}" if r.group == "static" else ""
        cache = work / f"{r.name.replace('/', '_')}{cal}.npz"
        if cache.is_file():
            z = np.load(cache)
            pred = {s: z[f"pred_{s}"] for s in SPLITS}
            m = Measured(r, float(z["bops"]), pred, {s: float(z[f"err_{s}"]) for s in SPLITS},
                         {s: float(z[f"flips_{s}"]) for s in SPLITS}, reused=True)
            if r.name == "fp32":
                fp32_logits = {s: z[f"logits_{s}"] for s in SPLITS}
        else:
            t0 = time.time()
            path = work / "model.pyrt"
            source.convert(path, make_policy(r, source, calib, show))
            model = pyruntime.load(path, num_threads=threads)
            logits = {}
            for s in SPLITS:
                logits[s], bops = _run(model, images[s], show, f"{r.name} {s}")
            if r.name == "fp32":
                fp32_logits = logits
            pred = {s: logits[s].argmax(1).astype(np.int16) for s in SPLITS}
            err = {s: float(np.abs(logits[s] - fp32_logits[s]).mean()) for s in SPLITS}
            flips = {s: float((pred[s] != fp32_logits[s].argmax(1)).mean()) for s in SPLITS}
            m = Measured(r, bops, pred, err, flips)
            extra = {f"logits_{s}": logits[s] for s in SPLITS} if r.name == "fp32" else {}
            np.savez(cache, bops=bops, **{f"pred_{s}": pred[s] for s in SPLITS},
                     **{f"err_{s}": err[s] for s in SPLITS}, **{f"flips_{s}": flips[s] for s in SPLITS}, **extra)
            print(f"{r.name:22s} {bops / 1e9:8.4f} GBOPs  logit err {err['validation']:.4f}  "
                  f"{time.time() - t0:5.1f}s", flush=True)
        out.append(m)
    return out


# --- choosing: validation labels only -------------------------------------------------------------

def _top1(pred: np.ndarray, labels: np.ndarray) -> float:
    return float((pred == labels).mean())


def choose(measured: Sequence[Measured], val_labels: np.ndarray) -> Tuple[Dict[str, str], List[dict]]:
    """({policy: chosen_on}, operating points) from the validation labels alone.

    The best static clip per (W, A, attention) -- ties go to the earlier grid entry -- and, per
    allowed drop, the cheapest quantised regime whose validation top-1 is within the drop of
    fp32's (ties: the more accurate), both among every regime and among the uniform ones."""
    acc = {m.regime.name: _top1(m.pred["validation"], val_labels) for m in measured}
    chosen = {m.regime.name: "none (grid point)" for m in measured}
    chosen["fp32"] = "none (reference)"
    static: Dict[Tuple[int, int, int], List[Measured]] = {}
    for m in measured:
        if m.regime.group == "static":
            static.setdefault((m.regime.w_bits, m.regime.a_bits, m.regime.attn_bits), []).append(m)
    for group in static.values():
        best = max(group, key=lambda m: acc[m.regime.name])   # max keeps the first of equals
        chosen[best.regime.name] = "validation (best static clip)"
    fp32 = acc["fp32"]
    points = []
    families = {"every regime": [m for m in measured if m.regime.w_bits != 32],
                "uniform (dynamic, attn8, chosen static)": [
                    m for m in measured if m.regime.group in ("dynamic", "attn8")
                    or chosen[m.regime.name].startswith("validation")]}
    for drop in DROPS:
        for family, ms in families.items():
            ok = [m for m in ms if acc[m.regime.name] >= fp32 - drop - 1e-12]
            best = min(ok, key=lambda m: (m.bops, -acc[m.regime.name]), default=None)
            points.append({"drop": drop, "family": family, "policy": best.regime.name if best else None})
    return chosen, points


# --- reporting: the test labels enter here --------------------------------------------------------

@dataclass
class Row:
    group: str
    policy: str
    w_bits: str
    a_bits: str
    scale: str
    attention: int
    chosen_on: str
    gbops: float
    bops_vs_fp32: float
    val_top1: float
    val_lo: float
    val_hi: float
    val_diff: float
    val_diff_lo: float
    val_diff_hi: float
    val_verdict: str
    test_top1: float
    test_lo: float
    test_hi: float
    test_diff: float
    test_diff_lo: float
    test_diff_hi: float
    test_p: float
    test_verdict: str
    test_logit_err: float
    test_flips: float


def _bits(r: Regime) -> Tuple[str, str]:
    if r.group == "fp32":
        return "32", "32"
    if r.group == "ends":
        return f"8 (first {r.first}, last {r.last}) / 4", str(r.a_bits)
    return str(r.w_bits), str(r.a_bits)


def report(measured: Sequence[Measured], chosen: Mapping[str, str], labels: Mapping[str, np.ndarray]) -> List[Row]:
    """One row per regime: both splits' top-1 with Clopper-Pearson intervals and the paired
    comparison against fp32 on the same images."""
    fp32 = next(m for m in measured if m.regime.name == "fp32")
    rows = []
    for m in measured:
        stats = {}
        for s in SPLITS:
            ok = m.pred[s] == labels[s]
            lo, hi = clopper_pearson(int(ok.sum()), ok.size)
            stats[s] = (float(ok.mean()), lo, hi, compare(ok, fp32.pred[s] == labels[s]))
        w, a = _bits(m.regime)
        v, t = stats["validation"], stats["test"]
        rows.append(Row(m.regime.group, m.regime.name, w, a, m.regime.scale, m.regime.attn_bits,
                        chosen[m.regime.name], m.bops / 1e9, m.bops / fp32.bops,
                        v[0], v[1], v[2], v[3].diff, v[3].low, v[3].high, v[3].verdict,
                        t[0], t[1], t[2], t[3].diff, t[3].low, t[3].high, t[3].p_value, t[3].verdict,
                        m.logit_err["test"], m.flips["test"]))
    return rows


def paired_on_test(measured: Sequence[Measured], a: str, b: str, labels: np.ndarray):
    by = {m.regime.name: m for m in measured}
    return compare(by[a].pred["test"] == labels, by[b].pred["test"] == labels)


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b of two orderings (scipy's)."""
    from scipy.stats import kendalltau

    return float(kendalltau(x, y).statistic)


# --- activation outliers ------------------------------------------------------------------------

def activation_outliers(source, images: np.ndarray, q: float = OUTLIER_Q) -> List[dict]:
    """Per block linear of the fp32 model: max |x| / p``q`` |x| of its input over ``images``,
    and the largest channel's max |x| over the median channel's (outliers in real ViTs sit in
    a few channels)."""
    import torch

    found: Dict[str, dict] = {}

    def hook(name):
        def fn(module, args):
            a = args[0].detach().abs().float().reshape(-1, args[0].shape[-1])
            flat = a.reshape(-1)
            k = max(1, int(np.ceil(q / 100 * flat.numel())))
            pq = float(flat.kthvalue(k).values)
            ch = a.amax(0)
            found[name] = {"layer": name, "max": float(flat.max()), f"p{q:g}": pq,
                           "max_over_p": float(flat.max()) / max(pq, 1e-30),
                           "channel_ratio": float(ch.max() / ch.median().clamp_min(1e-30))}
        return fn

    names = [n for n in source.layer_names() if n.startswith("blocks.")]
    model = source.model.eval()
    handles = [layer_module(model, n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            model(torch.from_numpy(np.ascontiguousarray(images)))
    finally:
        for h in handles:
            h.remove()
    return [found[n] for n in names]


# --- outputs ----------------------------------------------------------------------------------------

def write_csv(rows: Sequence[Row], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in asdict(r).items()})
    tmp.replace(path)


def _pp(x: float) -> str:
    return f"{100 * x:+.2f}"


def _row_line(r: Row) -> str:
    return (f"| {r.group} | {r.policy} | {r.w_bits} | {r.a_bits} | {r.scale} | {r.attention} | {r.chosen_on} | "
            f"{r.gbops:.4f} | {r.bops_vs_fp32:.4f} | {100 * r.val_top1:.2f} | {_pp(r.val_diff)} "
            f"[{_pp(r.val_diff_lo)}, {_pp(r.val_diff_hi)}] | {100 * r.test_top1:.2f} [{100 * r.test_lo:.2f}, "
            f"{100 * r.test_hi:.2f}] | {_pp(r.test_diff)} [{_pp(r.test_diff_lo)}, {_pp(r.test_diff_hi)}] | "
            f"{r.test_p:.2g} | {r.test_verdict} | {r.test_logit_err:.4f} | {100 * r.test_flips:.2f} |")


TABLE_HEAD = ("| group | policy | w bits | a bits | scale | attention | chosen_on | GBOPs | BOPs/fp32 | val top-1 | "
              "val vs fp32 (pp) | test top-1 [95% CP] | test vs fp32 (pp) [95% paired] | McNemar p | verdict | "
              "mean abs logit err | top-1 flips % |")


def summary(rows: Sequence[Row], points: Sequence[dict], measured, labels, outliers: Sequence[dict]) -> List[str]:
    """The statements at the top of results.md, computed from the rows."""
    R = {r.policy: r for r in rows}
    fp = R["fp32"]
    q = [r for r in rows if r.policy != "fp32"]
    loses = sorted((r for r in q if r.test_verdict == "loses"), key=lambda r: r.gbops)
    out = [f"fp32: {100 * fp.test_top1:.2f}% on {len(labels['test'])} test images "
           f"[{100 * fp.test_lo:.2f}, {100 * fp.test_hi:.2f}], {100 * fp.val_top1:.2f}% on "
           f"{len(labels['validation'])} validation images."]
    if loses:
        out.append(f"**Precision without a method (uniform bits or a fixed rule) loses significantly against fp32** "
                   f"(test paired 95% interval below 0) in "
                   f"{len(loses)} of {len(q)} regimes: " + "; ".join(
                       f"{r.policy} {_pp(r.test_diff)} pp [{_pp(r.test_diff_lo)}, {_pp(r.test_diff_hi)}]"
                       + (f" (McNemar p={r.test_p:.2g}: at the edge)" if r.test_p > 0.05 else "")
                       for r in loses) + ". These are where bit allocation and scale choice have something to win.")
    else:
        out.append(f"No regime loses significantly against fp32 on the test images ({len(q)} regimes): the model "
                   f"is insensitive to every precision swept here.")
    worst = min(q, key=lambda r: r.test_diff)
    out.append(f"Largest drop: {worst.policy} {_pp(worst.test_diff)} pp [{_pp(worst.test_diff_lo)}, "
               f"{_pp(worst.test_diff_hi)}] at {worst.gbops:.3f} GBOPs. Regimes tying fp32: "
               f"{sum(r.test_verdict == 'ties' for r in q)}; beating it: {sum(r.test_verdict == 'beats' for r in q)}.")
    agree = sum(r.val_verdict == r.test_verdict for r in q)
    out.append(f"Validation against test: Kendall tau of the {len(q)} regimes' top-1 = "
               f"{kendall_tau([r.val_top1 for r in q], [r.test_top1 for r in q]):.2f}, of their drop against fp32 = "
               f"{kendall_tau([r.val_diff for r in q], [r.test_diff for r in q]):.2f}; the verdict against fp32 "
               f"agrees on {agree} of {len(q)}.")
    out += choice_lines(R, measured, labels)
    for p in points:
        r = R.get(p["policy"]) if p["policy"] else None
        out.append(f"Operating point (chosen on validation), {p['family']}, within {100 * p['drop']:g} pt of fp32: "
                   + (f"{r.policy} at {r.gbops:.3f} GBOPs ({r.bops_vs_fp32:.3f} of fp32), test {100 * r.test_top1:.2f}%, "
                      f"{_pp(r.test_diff)} pp [{_pp(r.test_diff_lo)}, {_pp(r.test_diff_hi)}] vs fp32 ({r.test_verdict})"
                      if r else "none qualifies") + ".")
    out.append(outlier_verdict(outliers))
    return out


def choice_lines(R: Mapping[str, Row], measured, labels) -> List[str]:
    """Where a choice between regimes of (nearly) equal cost changes test top-1: static vs
    dynamic scales, int8 vs fp32 attention, a rule's 8-bit blocks vs uniform 4-bit weights."""
    lines = []
    y = labels["test"]
    for r in R.values():
        pairs = []
        if r.group == "static" and r.chosen_on.startswith("validation"):
            pairs.append((f"w{r.w_bits}a{r.a_bits}", f"{r.policy} (static, chosen) vs dynamic"))
        if r.group == "attn8" and r.policy.replace("-attn8", "") in R:
            pairs.append((r.policy.replace("-attn8", ""), "int8 vs fp32 attention"))
        if r.group == "ends" and f"w4a{r.a_bits}" in R:
            pairs.append((f"w4a{r.a_bits}", f"rule vs uniform W4A{r.a_bits} "
                          f"(+{100 * (r.gbops / R[f'w4a{r.a_bits}'].gbops - 1):.1f}% BOPs)"))
        for base, what in pairs:
            c = paired_on_test(measured, r.policy, base, y)
            if c.verdict != "ties":
                lines.append(f"Choice matters: {r.policy} {c.verdict} {base} ({what}): {c.text()}.")
    return lines or ["No static-vs-dynamic, attention or rule-vs-uniform pair differs significantly on the test images."]


def outlier_verdict(outliers: Sequence[dict]) -> str:
    """Heavy outliers [ours: a threshold of 10 on either ratio]: a value 10x the 99.9th
    percentile, or a LayerNorm-fed input (qkv, fc1 -- where large ViTs' outlier channels
    sit) with one channel 10x the median channel. fc2's input (after GELU) is reported apart:
    sparse by construction, a high channel ratio there is not the LayerNorm outlier."""
    worst = max(outliers, key=lambda o: o["max_over_p"])
    ln_fed = [o for o in outliers if o["layer"].endswith(("attn.qkv", "mlp.fc1"))] or list(outliers)
    chan = max(ln_fed, key=lambda o: o["channel_ratio"])
    fc2 = [o for o in outliers if o["layer"].endswith("mlp.fc2")]
    text = (f"Activation outliers (fp32, block linears' inputs): max |x| / p{OUTLIER_Q:g} |x| is at most "
            f"{worst['max_over_p']:.1f} ({worst['layer']}), median {np.median([o['max_over_p'] for o in outliers]):.1f}; "
            f"on the LayerNorm-fed inputs (qkv, fc1) the largest channel's max over the median channel's is at most "
            f"{chan['channel_ratio']:.1f} ({chan['layer']})")
    if fc2:
        text += f"; after GELU (fc2's input) up to {max(o['channel_ratio'] for o in fc2):.1f}, sparse activations"
    heavy = worst["max_over_p"] >= 10 or chan["channel_ratio"] >= 10
    return text + (". Heavy outliers (a ratio >= 10, our threshold): a per-image 4-bit grid spends its levels "
                   "on a handful of values there." if heavy else
                   ". No ratio reaches 10 (our threshold): this model lacks the heavy activation outliers that make "
                   "low-bit activations hard in large ViTs.")


def outlier_table(outliers: Sequence[dict]) -> List[str]:
    by = {o["layer"]: o for o in outliers}
    blocks = sorted({int(o["layer"].split(".")[1]) for o in outliers})
    kinds = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    lines = ["| block | " + " | ".join(f"{k} max/p{OUTLIER_Q:g} (channel ratio)" for k in kinds) + " |",
             "|---|" + "---|" * len(kinds)]
    for b in blocks:
        cells = []
        for k in kinds:
            o = by.get(f"blocks.{b}.{k}")
            cells.append(f"{o['max_over_p']:.1f} ({o['channel_ratio']:.1f})" if o else "-")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return lines


def write_md(rows, points, measured, labels, outliers, ctx: dict, path: Path) -> None:
    lines = ["# Where uniform precision breaks (regimes)", "",
             f"Model `{ctx['checkpoint']}` (sha256 {ctx['sha256'][:16]}...). Every regime converted and run by "
             f"the pyruntime executor ({ctx['threads']} threads, ISA {ctx['isa']}) on {ctx['val_images']} validation "
             f"images (training images 55000..59999, seed {ctx['seed']}) and {ctx['test_images']} Fashion-MNIST test "
             f"images. Static scales: {ctx['calib_images']} calibration images (50000..54999). Generated by "
             f"`{ctx['command']}` in {ctx['minutes']:.1f} min on {ctx['machine']} ({ctx['reused']} of {len(rows)} "
             f"rows reused from its --workdir, measured by earlier runs of the same command).", "",
             "Intervals: top-1 with its exact 95% Clopper-Pearson interval; \"vs fp32\": the 95% paired bootstrap "
             "interval of top-1 minus fp32's on the same images, the exact McNemar p, and the verdict (loses: the "
             "interval lies below 0). BOPs: the runtime's per-image count (patch embedding and head fp32; attention "
             "matmuls 32 x 32 unless int8). chosen_on: the split whose labels chose the row (validation), or none "
             "for fixed grid points; the test labels choose nothing.", ""]
    lines += holdout_lines(ctx["holdout_note"])
    lines += ["## Summary", ""]
    lines += [f"- {s}" for s in summary(rows, points, measured, labels, outliers)]
    lines += ["", "## Regimes", "", TABLE_HEAD, "|" + "---|" * (TABLE_HEAD.count("|") - 1)]
    lines += [_row_line(r) for r in rows]
    lines += ["", f"## Activation outliers of the fp32 model ({ctx['outlier_images']} calibration images)", "",
              f"Per block linear's input: max |x| / p{OUTLIER_Q:g} |x| over every value, and in parentheses the "
              "largest per-channel max |x| over the median channel's.", ""]
    lines += outlier_table(outliers)
    lines += ["", "![regimes](results.png)", ""]
    path.write_text("\n".join(lines))


def plot(rows: Sequence[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6))
    styles = {"fp32": ("k", "*"), "dynamic": ("C0", "o"), "attn8": ("C1", "s"), "static": ("C2", "^"),
              "ends": ("C3", "D")}
    for group, (color, marker) in styles.items():
        rs = [r for r in rows if r.group == group]
        if not rs:
            continue
        ax.errorbar([r.gbops for r in rs], [100 * r.test_diff for r in rs],
                    yerr=[[100 * (r.test_diff - r.test_diff_lo) for r in rs],
                          [100 * (r.test_diff_hi - r.test_diff) for r in rs]],
                    fmt=marker, color=color, ms=5, capsize=2, label=group, alpha=0.8)
    for r in rows:
        if r.test_verdict == "loses":
            ax.annotate(r.policy, (r.gbops, 100 * r.test_diff), textcoords="offset points", xytext=(4, -3), fontsize=6)
    ax.axhline(0, color="gray", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set(xlabel="GBOPs per image (runtime count, log)", ylabel="test top-1 minus fp32 (pp), 95% paired interval",
           title="Where uniform precision breaks")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


# --- driver -----------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_args(p, out="regimes", images=256, images_help="calibration images for the static scales",
                      val_images=5000, val_help="validation images (at most 5000)", threads=2,
                      threads_help="runtime and torch threads",
                      workdir_help="keep measured rows here (a rerun reuses them)")
    p.add_argument("--outlier-images", type=int, default=256)
    p.add_argument("--quick", action="store_true", help="a small grid: W{8,4} x A{8,4}, ends (1, 1)")
    return check_protocol_args(p, p.parse_args(argv), "outlier_images")


def _check_workdir(work: Path, config: dict) -> None:
    """Cached rows are only valid for the same checkpoint, images and grid."""
    path = work / "config.json"
    if path.is_file() and json.loads(path.read_text()) != config:
        raise SystemExit(f"regimes_results.py: {work} holds rows of another configuration ({path}); "
                         f"use a fresh --workdir")
    path.write_text(json.dumps(config, indent=1))


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    from pyruntime import isa

    proto = load_protocol(args, args.threads)
    show = not args.no_progress
    source, calib, val = proto.source, proto.splits.calibration, proto.splits.validation
    mean, std = source.preprocess["mean"], source.preprocess["std"]
    ty = proto.splits.test_labels
    images = {"validation": np.asarray(val.images), "test": proto.splits.test_images}
    sha = proto.sha256
    sweep = regimes(source.depth, args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="regimes-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        _check_workdir(work, {"sha256": sha, "validation": val.summary, "test_images": len(ty)})
        measured = measure(sweep, source, calib, images, work, args.threads, show)
    chosen, points = choose(measured, val.labels)                 # validation labels only
    labels = {"validation": val.labels, "test": ty}
    rows = report(measured, chosen, labels)                      # the test labels enter here
    outliers = activation_outliers(source, np.asarray(calibration_data(args.outlier_images, args.seed, mean, std).images))
    ckpt = proto.checkpoint
    ctx = {"checkpoint": proto.checkpoint_label, "sha256": sha,
           "threads": args.threads, "isa": isa(), "val_images": len(val), "test_images": len(ty),
           "calib_images": len(calib), "seed": args.seed, "outlier_images": args.outlier_images,
           "command": "python tools/regimes_results.py" + (f" --checkpoint {ckpt}" if args.checkpoint else "")
           + (" --quick" if args.quick else ""),
           "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs (shared)",
           "minutes": (time.time() - t_start) / 60, "holdout_note": proto.holdout_note,
           "reused": sum(m.reused for m in measured)}
    write_csv(rows, args.out / "results.csv")
    (args.out / "outliers.json").write_text(json.dumps(outliers, indent=1))
    (args.out / "choices.json").write_text(json.dumps({"chosen_on": chosen, "operating_points": points}, indent=1))
    write_md(rows, points, measured, labels, outliers, ctx, args.out / "results.md")
    plot(rows, args.out / "results.png")
    print("\n".join(summary(rows, points, measured, labels, outliers)))
    print(f"\nwrote {args.out}/results.md, results.csv, results.png in {(time.time() - t_start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
