#!/usr/bin/env python3
"""Reproduce results/quee/: QuEE gates (Regol et al., 2024; pyruntime.calibrate.quee) against
post-training quantisation plus confidence exits, on the reference model, leak-free.

    python tools/results_quee.py --checkpoint P --out results/quee --workdir /tmp/quee-work
    python tools/results_quee.py --test-limit 2000 --val-images 1000 --grid 6 --out /tmp/q   # quicker look

Splits: gates are fitted on ``--images`` calibration images (training images 50000..54999);
every operating point -- QuEE's lambda, a baseline's exit threshold -- is chosen on
``--val-images`` validation images (55000..59999) by one rule (:func:`quee.select_point`):
for an allowed drop, the cheapest point within it of fp32 at full depth on the validation
images; for a budget (a fraction of W8A8 at full depth), the most accurate point within it.
Test images (the Fashion-MNIST test split) are only reported.

Methods, per gate configuration (gate blocks, reduced precision; base W8A8):

* ``quee-static``: targets measured on the full-precision trajectory (``targets="segment"``);
* ``quee-path``: targets measured on the trajectories images take under the gates already
  trained (``targets="path"``);
* ``ptq+exits W8A8 @gates`` / ``W4A8 @gates``: uniform PTQ with confidence exits at the same
  blocks as the gates; ``... @every block``: exits after every block but the last (the
  strongest PTQ+exits baseline of results/exits). Their candidates are evaluated from one run
  per image set with nobody leaving (every exit head's logits; the executor's rule applied in
  numpy, BOPs by ``bops.per_image``); every point a table uses is run again by the runtime and
  must agree image for image.

Every candidate set has ``--grid`` interior points, derived from the calibration images the
same way: QuEE's lambdas are quantiles of the values at which its gate decisions flip
(``default_lambdas``), a baseline's thresholds quantiles of its exit heads' max softmax; both
add the two ends (nobody leaves early / everybody leaves at the first exit).

Equal cost: each QuEE point chosen on validation is compared on the test images with each
baseline at the same cost: from a fine sweep of its threshold (``MATCH_GRID`` quantiles; the
match uses only the test images' BOPs, no labels), the threshold of least test BOPs that is
at least 99% of QuEE's (equal or higher cost, nothing interpolated); the strongest baseline
is the one with the highest test top-1 among those matches (a choice on test labels that can
only favour the baseline). Interval: paired
bootstrap of the top-1 difference over the test images, exact McNemar p, verdict.

Figures: ``curves.png`` (test top-1 against mean BOPs per image, every candidate, one panel
per gate configuration), ``calibration.png`` (QuEE's predicted error of each path against the
observed error, binned, on the test images at the lambda chosen for the first drop target;
split by whether the image arrived at the gate with a reduced segment behind it).

Every QuEE point is run by the runtime (the in-memory executor of the converted graph); the
chosen points are also converted to model files and loaded with ``pyruntime.load``, and must
give the same logits and BOPs. Baseline points the tables use are rerun by the runtime on the
first ``CONFIRM_IMAGES`` test images and compared image by image with the simulation (listed in
results.md). ``--workdir`` caches the exit heads' logits and the measured curves, so
a rerun with more ``--configs`` only measures what is new. On the shared 2-core machine (load
~18) one configuration takes ~15-20 min; on an idle one a few minutes.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from _protocol import add_protocol_args, check_protocol_args, holdout_lines, load_protocol  # noqa: E402
from pyruntime.calibrate.common import policy_cost  # noqa: E402
from pyruntime.calibrate.probe import executor, materialise  # noqa: E402
from pyruntime.calibrate.probe import run as probe_run  # noqa: E402
from pyruntime.calibrate.quee import (LambdaNotFound, default_lambdas, fit_quee, gate_decisions,  # noqa: E402
                                      gate_features, path_predictions, select_point)
from pyruntime.calibrate.uniform import uniform_policy  # noqa: E402
from pyruntime.policy import ExitPolicy, LayerPolicy, Policy  # noqa: E402
from pyruntime.stats import compare  # noqa: E402

DROPS = (0.005, 0.01)                   # allowed top-1 drop against fp32 at full depth (validation)
BUDGETS = (0.3, 0.4, 0.55, 0.7)         # mean BOPs per image, fractions of W8A8 at full depth
CONFIRM_IMAGES = 2000                   # test images each baseline point a table uses is rerun on by the runtime
MATCH_GRID = 200                        # baseline thresholds swept on the test images' BOPs to match a cost
CLAIM = ("QuEE (Regol et al., 2024), as the seeds state it: small predictors of each path's probability of error "
         "let every image exit, continue at full precision or continue at reduced precision, which beats "
         "quantisation plus early exits at the same cost (no number in the seeds; /work/shared/papers.md)")
FIELDS = ("config", "method", "target", "point", "chosen_on", "val_top1", "val_bops", "top1", "bops", "bops_vs_w8a8",
          "vs", "vs_point", "vs_top1", "vs_bops", "diff_pp", "ci_low_pp", "ci_high_pp", "mcnemar_p", "verdict", "note")


# --- candidates: (label, run on images) -------------------------------------------------------------

@dataclass
class Curve:
    """One method's candidates measured on validation and test images."""

    method: str
    config: str
    labels: List[str]
    val: List[dict] = field(default_factory=list)      # {"top1", "mean_bops"} per candidate
    test: List[dict] = field(default_factory=list)
    correct: Optional[np.ndarray] = None               # [candidates, test images] bool

    def points(self, part: str) -> List["Cand"]:
        return [Cand(lab, p["top1"], p["mean_bops"], i) for i, (lab, p) in
                enumerate(zip(self.labels, self.val if part == "val" else self.test))]


@dataclass
class Cand:
    label: str
    top1: float
    mean_bops: float
    index: int


def measure(run, x: np.ndarray, y: np.ndarray) -> Tuple[dict, np.ndarray]:
    r = run(x)
    right = r["logits"].argmax(-1) == y
    return {"top1": float(right.mean()), "mean_bops": float(r["bops"].mean())}, right


def quee_candidates(fit, grid: int) -> Tuple[List[str], List, List[float]]:
    lams = default_lambdas(fit, grid)
    return [f"lambda={lam:g}" for lam in lams], [lambda x, lam=lam: fit.run(x, lam, num_threads=2) for lam in lams], lams


class ExitBaseline:
    """Uniform PTQ W{w_bits}A8 with confidence exits: every exit head's logits come from one
    run with nobody leaving (exits after every block but the last), so any exit set and
    threshold is evaluated exactly as the executor decides (max softmax in float64 >= the
    threshold in float32) and costed by ``bops.per_image`` of that variant's graph; the points
    the tables use are run again by the runtime itself (:meth:`runtime`)."""

    def __init__(self, source, w_bits: int, work: Path):
        self.source, self.w_bits, self.work = source, w_bits, work
        self.depth = source.depth
        self.every = list(range(self.depth - 1))
        self.graph, self.tensors = self.variant(self.every)
        self.heads: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
        self.graphs: Dict[Tuple[int, ...], Tuple[dict, dict]] = {tuple(self.every): (self.graph, self.tensors)}

    def variant(self, blocks: Sequence[int]) -> Tuple[dict, dict]:
        pol = uniform_policy(self.w_bits, 8)
        pol.exits = [ExitPolicy(b, "confidence", 1.0) for b in blocks]
        return materialise(self.source, pol, workdir=self.work)

    def collect(self, name: str, x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        if name not in self.heads:
            key = self.work / f"heads-W{self.w_bits}A8-{name}-{len(x)}-{_digest(x)}.npz"
            if not key.is_file():
                r = probe_run(executor(self.graph, self.tensors), x, True, 256, 2)
                np.savez(key, exit_logits=r["exit_logits"], logits=r["logits"])
            z = np.load(key)
            self.heads[name] = (z["exit_logits"], z["logits"])
        return self.heads[name]

    def thresholds(self, blocks: Sequence[int], calib_x: np.ndarray, grid: int) -> List[float]:
        """0, ``grid`` quantiles of the calibration images' max softmax at ``blocks``, 1."""
        heads, _ = self.collect("calibration", calib_x)
        conf = np.concatenate([gate_features(heads[b], 1)[:, 0] for b in blocks])
        return [0.0] + sorted(set(float(f"{v:.4g}") for v in np.quantile(conf, np.linspace(0.02, 0.98, grid)))) + [1.0]

    def simulate(self, name: str, x: np.ndarray, y: np.ndarray, blocks: Sequence[int], t: float):
        from pyruntime import bops

        heads, final = self.collect(name, x)
        key = tuple(blocks)
        if key not in self.graphs:
            self.graphs[key] = self.variant(blocks)
        exit_block = np.full(len(y), self.depth - 1)
        logits = final.copy()
        left = np.zeros(len(y), bool)
        for b in blocks:
            go = ~left & (gate_features(heads[b], 1)[:, 0] >= float(np.float32(t)))
            exit_block[go], logits[go] = b, heads[b][go]
            left |= go
        right = logits.argmax(-1) == y
        per = bops.per_image(self.graphs[key][0], exit_block)
        self.last_per_image = per
        return {"top1": float(right.mean()), "mean_bops": float(per.mean())}, right

    def runtime(self, x: np.ndarray, blocks: Sequence[int], t: float) -> Dict[str, np.ndarray]:
        g, tensors = self.graphs[tuple(blocks)]
        g = json.loads(json.dumps(g))
        for e in g["exits"]:
            e["threshold"] = float(t)
        return probe_run(executor(g, tensors), x, False, 256, 2)


def baseline_curve(base: ExitBaseline, blocks: Sequence[int], where: str, calib_x, val, tx, ty, grid: int,
                   parts: Sequence[str] = ("val", "test")) -> Curve:
    """The baseline's candidates (``grid`` interior thresholds) measured on ``parts``."""
    ts = base.thresholds(blocks, calib_x, grid)
    c = Curve(f"ptq+exits W{base.w_bits}A8 {where}", "", [f"t={t:g}" for t in ts])
    rights = []
    for t in ts:
        if "val" in parts:
            c.val.append(base.simulate("validation", val.images, val.labels, blocks, t)[0])
        p, right = base.simulate("test", tx, ty, blocks, t)
        c.test.append(p)
        rights.append(right)
    c.correct = np.array(rights)
    c.blocks, c.base, c.thresholds = list(blocks), base, ts
    return c


_CONFIRMED = set()
CHECKS: List[str] = []


def confirm_by_runtime(c: Curve, cand: "Cand", tx, ty, n: int = CONFIRM_IMAGES) -> None:
    """A baseline point a table uses, run by the runtime on the first ``n`` test images: each
    image's answer and BOPs must be what the simulation said."""
    key = (c.method, len(c.labels), cand.label)
    if not hasattr(c, "base") or key in _CONFIRMED:
        return
    _CONFIRMED.add(key)
    t = c.thresholds[cand.index]
    r = c.base.runtime(tx[:n], c.blocks, t)
    _, right = c.base.simulate("test", tx, ty, c.blocks, t)
    per = c.base.last_per_image
    differ = int(((r["logits"].argmax(-1) == ty[:n]) != right[:n]).sum() + (r["bops"] != per[:n]).sum())
    CHECKS.append(f"{c.method} {cand.label}: {n} test images rerun by the runtime, "
                  + ("answers and BOPs identical to the simulation" if differ == 0 else
                     f"{differ} per-image answers or BOPs DIFFER from the simulation"))
    if differ:
        print(f"WARNING: {CHECKS[-1]}", flush=True)


def _digest(x) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()[:12]


def exit_selection(fit, runs, y: np.ndarray, lam: float) -> dict:
    """At the first gate (every image arrives there on the same trajectory): the images the
    gate lets exit at ``lam``, against the same number of most confident images (what a
    confidence threshold would let exit): the error rate of each set at that head."""
    head = runs.heads(0)[0]
    f = gate_features(head, fit.topk)
    d = gate_decisions(f, fit.gates[0].weights, lam, fit.gates[0].cost)
    wrong = head.argmax(-1) != y
    k = int((d == 0).sum())
    top = np.argsort(-f[:, 0], kind="stable")[:k]
    return {"images": len(y), "exit": k, "quee_wrong": float(wrong[d == 0].mean()) if k else float("nan"),
            "confident_wrong": float(wrong[top].mean()) if k else float("nan"),
            "overlap": float(np.isin(np.flatnonzero(d == 0), top).mean()) if k else float("nan")}


def measured_curve(method: str, config: str, labels, runs, val, tx, ty, cache: Path) -> Curve:
    key = cache / f"{config}__{method}".replace(" ", "_").replace("@", "at").replace(",", "-").replace(":", "_")
    if key.with_suffix(".json").is_file():
        doc = json.loads(key.with_suffix(".json").read_text())
        if doc["labels"] == labels:
            return Curve(method, config, labels, doc["val"], doc["test"], np.load(key.with_suffix(".npy")))
    c = Curve(method, config, list(labels))
    rights = []
    for lab, run in zip(labels, runs):
        c.val.append(measure(run, val.images, val.labels)[0])
        p, right = measure(run, tx, ty)
        c.test.append(p)
        rights.append(right)
        print(f"  {config} {method} {lab}: val {c.val[-1]['top1']:.4f} / {c.val[-1]['mean_bops'] / 1e9:.3f} G, "
              f"test {p['top1']:.4f} / {p['mean_bops'] / 1e9:.3f} G", flush=True)
    c.correct = np.array(rights)
    key.with_suffix(".json").write_text(json.dumps({"labels": c.labels, "val": c.val, "test": c.test}))
    np.save(key.with_suffix(".npy"), c.correct)
    return c


# --- choosing and comparing ---------------------------------------------------------------------------

def targets(w8_bops: float) -> List[Tuple[str, Optional[float], Optional[float]]]:
    return ([(f"drop<={100 * d:g}pt", d, None) for d in DROPS]
            + [(f"bops<={b:g}xW8A8", None, b * w8_bops) for b in BUDGETS])


def choose(curve: Curve, ref_val: float, drop, budget, n_val: int) -> Optional[Cand]:
    try:
        return select_point(curve.points("val"), ref_val, drop, budget, curve.method, n_val)
    except LambdaNotFound as e:
        print(f"  {curve.config} {curve.method}: {e}", flush=True)
        return None


def equal_cost_match(base: Curve, bops: float) -> Optional[Cand]:
    """The baseline candidate of least test BOPs that costs at least 99% of ``bops``."""
    ok = [c for c in base.points("test") if c.mean_bops >= 0.99 * bops]
    return min(ok, key=lambda c: (c.mean_bops, -c.top1)) if ok else None


def row(config, method, target, cand: Optional[Cand], curve: Curve, w8: float, note: str = "") -> dict:
    r = {k: "" for k in FIELDS}
    r.update(config=config, method=method, target=target, chosen_on="validation", note=note)
    if cand is None:
        r.update(point="none", note=note or "no candidate meets the target on validation")
        return r
    t = curve.test[cand.index]
    r.update(point=cand.label, val_top1=cand.top1, val_bops=cand.mean_bops, top1=t["top1"], bops=t["mean_bops"],
             bops_vs_w8a8=t["mean_bops"] / w8)
    return r


def with_comparison(r: dict, quee: Curve, cand: Cand, base: Curve, bcand: Optional[Cand]) -> dict:
    r = dict(r)
    r["vs"] = base.method
    if bcand is None:
        r["note"] = f"{base.method} has no candidate at >= 99% of this cost"
        return r
    cmp = compare(quee.correct[cand.index], base.correct[bcand.index])
    r.update(vs_point=bcand.label, vs_top1=bcand.top1, vs_bops=bcand.mean_bops, diff_pp=100 * cmp.diff,
             ci_low_pp=100 * cmp.low, ci_high_pp=100 * cmp.high, mcnemar_p=cmp.p_value, verdict=cmp.verdict)
    return r


# --- the calibration of predicted error ---------------------------------------------------------------

def calibration_table(fit, runs, ty, lam) -> Tuple[List[dict], dict]:
    p = path_predictions(fit, runs, ty, lam)
    out = []
    for hist, sel in (("full-precision history", p["mask"] == 0), ("a reduced segment behind", p["mask"] != 0)):
        for k, name in enumerate(("exit", "full", "reduced")):
            if sel.any():
                pred, obs = p["predicted"][sel, k], p["observed"][sel, k]
                out.append({"history": hist, "path": name, "pairs": int(sel.sum()), "predicted": float(pred.mean()),
                            "observed": float(obs.mean()), "ece": ece(pred, obs)})
    return out, p


def ece(pred: np.ndarray, obs: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: sum over equal-width bins of |mean predicted - observed| x share."""
    idx = np.minimum((pred * bins).astype(int), bins - 1)
    return float(sum(abs(pred[idx == b].mean() - obs[idx == b].mean()) * (idx == b).mean()
                     for b in range(bins) if (idx == b).any()))


def why_lines(rows: List[dict], curves: Dict[str, List[Curve]], selections: Dict[str, dict],
              calib: Dict[str, List[dict]]) -> List[str]:
    """Why QuEE loses (or wins), from this run's own numbers."""
    out = ["**Why, from the measurements above and below.**", ""]
    for config, cs in curves.items():
        tops = {c.method: max(p["top1"] for p in c.test) for c in cs}
        q = max(tops[m] for m in ("quee-static", "quee-path"))
        b = max(v for m, v in tops.items() if not m.startswith("quee"))
        out.append(f"* gates {config}: the most accurate QuEE candidate reaches {100 * q:.2f}% test top-1, the most "
                   f"accurate baseline candidate {100 * b:.2f}%. Even at lambda = 0 a gate lets an image exit whenever "
                   f"its predicted exit error is no higher than continuing's, so QuEE's curve stops below the "
                   f"baselines' top.")
    for name, d in selections.items():
        out.append(f"* {name.replace(' | ', ', ')}: at the first gate (same trajectory for every image) it lets "
                   f"{d['exit']} of {d['images']} test images exit, {100 * d['quee_wrong']:.2f}% of them wrong; the "
                   f"{d['exit']} most confident images are {100 * d['confident_wrong']:.2f}% wrong."
                   + (" The gate sees only the head's softmax (top-k, entropy) -- what the confidence rule sees -- "
                      "through cluster error rates of ~1,000 calibration images, here a coarser ranking than the max "
                      "softmax itself." if d["quee_wrong"] > d["confident_wrong"] else
                      " Here its exit set is as good as the confidence rule's; the loss comes from elsewhere."))
    for name, tab in calib.items():
        red = [t for t in tab if t["history"].startswith("a reduced")]
        if red:
            out.append(f"* {name.replace(' | ', ', ')}: for images with a reduced segment behind, predicted vs "
                       f"observed error " + ", ".join(f"{t['path']} {t['predicted']:.3f} vs {t['observed']:.3f}"
                                                      for t in red) + ".")
    pv = [r for r in rows if r["method"] == "quee-path vs quee-static" and r["verdict"]]
    if pv:
        counts = {v: sum(r["verdict"] == v for r in pv) for v in ("beats", "ties", "loses")}
        out.append(f"* path targets against static-trajectory targets at equal or higher cost: beats "
                   f"{counts['beats']}, ties {counts['ties']}, loses {counts['loses']} of {len(pv)} targets.")
    for config, cs in curves.items():
        full = {c.method: c.test[0]["top1"] for c in cs if c.method.startswith("quee")}  # lambda = 0
        out.append(f"* gates {config} at lambda = 0: static targets {100 * full['quee-static']:.2f}%, path targets "
                   f"{100 * full['quee-path']:.2f}% test top-1 (the reduced path's own cost in accuracy is what "
                   f"the path targets can add information about).")
    return out


# --- output ---------------------------------------------------------------------------------------------

def _f(v, pct=False, digits=4):
    if v == "" or v is None:
        return "-"
    return f"{100 * v:.2f}%" if pct else f"{v:.{digits}g}"


def write_md(path: Path, rows: List[dict], headline: List[str], calib: Dict[str, List[dict]], ctx: dict,
             selections: Dict[str, dict]) -> None:
    lines = ["# QuEE against PTQ + exits (reference model, leak-free)", "",
             f"Generated by `{ctx['command']}` in {ctx['minutes']:.1f} min; checkpoint `{ctx['checkpoint']}`; "
             f"gates fitted on {ctx['images']} calibration images (training 50000..54999), every operating point "
             f"chosen on {ctx['val_images']} validation images (training 55000..59999), reported on "
             f"{ctx['test_images']} Fashion-MNIST test images. fp32 at full depth: validation {ctx['fp32_val']:.4f}, "
             f"test {ctx['fp32_test']:.4f}; W8A8 at full depth {ctx['w8'] / 1e9:.3f} GBOPs per image.", ""]
    lines += holdout_lines(ctx["holdout_note"])
    lines += ["## The paper's claim and our counterpart", "", f"**Claim.** {CLAIM}.", ""]
    lines += headline + [""]
    lines += ["## Operating points (chosen on validation) and equal-cost comparisons (test)", "",
              "`bops` = mean BOPs per image as the runtime counts them on the test images; `vs` = the baseline "
              "candidate of least test BOPs >= 99% of the QuEE point's; diff = QuEE - baseline, 95% paired "
              "bootstrap interval, exact McNemar p.", "",
              "| config | method | target | point | chosen_on | val top-1 | test top-1 | GBOPs | xW8A8 | vs | vs point "
              "| vs top-1 | vs GBOPs | diff pp [95% CI] | p | verdict | note |",
              "|" + "---|" * 17]
    for r in rows:
        ci = "-" if r["diff_pp"] == "" else f"{r['diff_pp']:+.2f} [{r['ci_low_pp']:+.2f}, {r['ci_high_pp']:+.2f}]"
        g = lambda v: "-" if v == "" else f"{v / 1e9:.3f}"
        lines.append(f"| {r['config']} | {r['method']} | {r['target']} | {r['point']} | {r['chosen_on']} | "
                     f"{_f(r['val_top1'], True)} | {_f(r['top1'], True)} | {g(r['bops'])} | {_f(r['bops_vs_w8a8'])} | "
                     f"{r['vs'] or '-'} | {r['vs_point'] or '-'} | {_f(r['vs_top1'], True)} | {g(r['vs_bops'])} | {ci} | "
                     f"{_f(r['mcnemar_p'], digits=3)} | {r['verdict'] or '-'} | {r['note']} |")
    lines += ["", "## Calibration of predicted error (test images, `calibration.png`)", "",
              "Per (image, gate) pair the gates bring together at the lambda chosen for the first drop target: the "
              "MLP's predicted error of each path and that path's observed error (exit: the gate's head wrong; "
              "full / reduced: the next segment at that precision, then the rest at full precision, the final head "
              "wrong), split by the image's history. ECE: 10 equal-width bins.", "",
              "| config | targets | history | path | pairs | mean predicted | observed | ECE |", "|" + "---|" * 8]
    for name, tab in calib.items():
        for t in tab:
            lines.append(f"| {name.split(' | ')[0]} | {name.split(' | ')[1]} | {t['history']} | {t['path']} | "
                         f"{t['pairs']} | {t['predicted']:.4f} | {t['observed']:.4f} | {t['ece']:.4f} |")
    lines += ["", "## Who the first gate lets exit (test images)", "",
              "At the first gate every image arrives on the same trajectory, so the gate's exit set can be set "
              "against the confidence rule's: the images the gate lets exit at the chosen lambda, against as many "
              "of the most confident images (max softmax of the same head) -- the set a confidence threshold lets "
              "exit at that rate. Error rate of each set at that head:", "",
              "| config | fit (lambda) | images | exit there | error of QuEE's exits | error of the as-many most "
              "confident | overlap |", "|---|---|---|---|---|---|---|"]
    for name, d in selections.items():
        cfg, fit_name = name.split(" | ")
        lines.append(f"| {cfg} | {fit_name} | {d['images']} | {d['exit']} | {_f(d['quee_wrong'], True)} | "
                     f"{_f(d['confident_wrong'], True)} | {_f(d['overlap'], True)} |")
    lines += ["", "## Runtime checks of the simulated baselines", ""] + [f"* {c}" for c in CHECKS]
    lines += ["", f"Figures: `curves.png` (every candidate on the test images), `calibration.png`. Machine: "
              f"{ctx['machine']}.", ""]
    path.write_text("\n".join(lines))


def write_csv(path: Path, rows: List[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def plot_curves(path: Path, curves: Dict[str, List[Curve]], w8: float, fp32_test: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.6), squeeze=False)
    for ax, (config, cs) in zip(axes[0], curves.items()):
        for c in cs:
            pts = sorted(zip([p["mean_bops"] / w8 for p in c.test], [100 * p["top1"] for p in c.test]))
            ax.plot(*zip(*pts), marker="o" if c.method.startswith("quee") else ".", ms=4,
                    lw=2 if c.method.startswith("quee") else 1, label=c.method)
        ax.axhline(100 * fp32_test, color="k", ls=":", lw=0.8, label="fp32 full depth")
        ax.set_title(f"gates {config}")
        ax.set_xlabel("mean BOPs per image / W8A8 full depth (test)")
        ax.set_ylabel("test top-1 (%)")
        ax.set_ylim(100 * fp32_test - 8, 100 * fp32_test + 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_calibration(path: Path, preds: Dict[str, dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    edges = np.linspace(0, 1, 11)
    for k, (ax, name) in enumerate(zip(axes, ("exit", "full", "reduced"))):
        for (label, p), color in zip(preds.items(), ("C0", "C3", "C2", "C1")):
            for hist, sel, ls in (("full history", p["mask"] == 0, "-"), ("reduced behind", p["mask"] != 0, "--")):
                pred, obs = p["predicted"][sel, k], p["observed"][sel, k]
                idx = np.digitize(pred, edges[1:-1])
                xs = [pred[idx == b].mean() for b in range(10) if (idx == b).sum() >= 20]
                ys = [obs[idx == b].mean() for b in range(10) if (idx == b).sum() >= 20]
                if xs:
                    ax.plot(xs, ys, ls, marker="o", ms=3, color=color, label=f"{label}, {hist}")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set_title(f"path: {name}")
        ax.set_xlabel("predicted error (bins with >= 20 pairs)")
        ax.set_ylabel("observed error (test)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- main -------------------------------------------------------------------------------------------------

def parse_config(text: str) -> Tuple[List[int], LayerPolicy, str]:
    """``2,5,8:w4a8`` -> gate blocks, reduced precision, label."""
    from pyruntime.calibrate.cli import _precision as layer_precision

    blocks, _, red = text.partition(":")
    try:
        gates = [int(b) for b in blocks.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"config {text!r}: gate blocks are comma-separated integers") from None
    reduced = layer_precision(red or "w4a8")
    return gates, reduced, f"{','.join(map(str, gates))} {red or 'w4a8'}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_args(p, out="quee", images=1024, images_help="calibration images (fit the gates)", val_images=5000,
                      val_help="validation images (choose the operating point)",
                      workdir_help="cache the measured curves here", progress=False)
    p.add_argument("--calib-images", type=int, default=2000, help="test images for the calibration figure")
    p.add_argument("--grid", type=int, default=8, help="interior candidates per method")
    p.add_argument("--configs", nargs="+", default=["2,5,8:w4a8", "3,7:w4a4"],
                   help="gate blocks:reduced precision, one QuEE configuration each")
    return check_protocol_args(p, p.parse_args(argv))


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    import platform

    import pyruntime

    configs = [parse_config(c) for c in args.configs]
    proto = load_protocol(args, 2)
    source, calib, val = proto.source, proto.splits.calibration, proto.splits.validation
    tx, ty = proto.splits.test_images, proto.splits.test_labels
    w8 = float(policy_cost(source, uniform_policy(8, 8), "bops"))
    args.out.mkdir(parents=True, exist_ok=True)
    rows: List[dict] = []
    curves: Dict[str, List[Curve]] = {}
    calib_tables: Dict[str, List[dict]] = {}
    calib_preds: Dict[str, dict] = {}
    selections: Dict[str, dict] = {}
    headline: List[str] = []
    with tempfile.TemporaryDirectory(prefix="quee-results-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        fp = Policy(name="fp32")
        g, t = materialise(source, fp, workdir=work)
        fp32_val = float((probe_run(executor(g, t), val.images, False, 256, 2)["logits"].argmax(-1) == val.labels).mean())
        fp32_test = float((probe_run(executor(g, t), tx, False, 256, 2)["logits"].argmax(-1) == ty).mean())
        print(f"fp32 full depth: validation {fp32_val:.4f}, test {fp32_test:.4f}; W8A8 {w8 / 1e9:.3f} GBOPs", flush=True)
        every_block = list(range(source.depth - 1))
        shared: Dict[str, Curve] = {}
        bases_by_bits: Dict[int, ExitBaseline] = {}
        dense: Dict[str, Curve] = {}
        for gates, reduced, config in configs:
            print(f"config {config}", flush=True)
            fits, cs = {}, []
            for name, kind in (("quee-static", "segment"), ("quee-path", "path")):
                fit = fit_quee(source, calib, base="w8a8", reduced=reduced, gate_blocks=gates, targets=kind,
                               seed=args.seed, num_threads=2, workdir=work)
                fits[name] = fit
                labels, runs, _ = quee_candidates(fit, args.grid)
                cs.append(measured_curve(name, config, labels, runs, val, tx, ty, work))
            for w_bits in (8, 4):
                if w_bits not in bases_by_bits:
                    bases_by_bits[w_bits] = ExitBaseline(source, w_bits, work)
                for where, blocks in ((f"@gates {','.join(map(str, gates))}", gates), ("@every block", every_block)):
                    name = f"ptq+exits W{w_bits}A8 {where}"
                    if name not in shared:
                        shared[name] = baseline_curve(bases_by_bits[w_bits], blocks, where, calib.images, val, tx, ty,
                                                      args.grid)
                        dense[name] = baseline_curve(bases_by_bits[w_bits], blocks, where, calib.images, val, tx, ty,
                                                     MATCH_GRID, parts=("test",))
                    cs.append(shared[name])
            curves[config] = cs
            quees, bases = cs[:2], cs[2:]
            for target, drop, budget in targets(w8):
                for q in quees:
                    qc = choose(q, fp32_val, drop, budget, len(val))
                    base_row = row(config, q.method, target, qc, q, w8)
                    if qc is None:
                        rows.append(base_row)
                        continue
                    bops = q.test[qc.index]["mean_bops"]
                    matches = [(dense[b.method], equal_cost_match(dense[b.method], bops)) for b in bases]
                    found = [(b, m) for b, m in matches if m is not None]
                    if not found:
                        rows.append(with_comparison(base_row, q, qc, bases[0], None))
                        continue
                    strongest, sm = max(found, key=lambda bm: (bm[1].top1, -bm[1].mean_bops))
                    confirm_by_runtime(strongest, sm, tx, ty)
                    r = with_comparison(base_row, q, qc, strongest, sm)
                    r["vs"] = f"strongest: {strongest.method}"
                    rows.append(r)
                    if q.method == "quee-path":
                        other = quees[0]
                        om = equal_cost_match(other, bops)
                        if om is not None:
                            rr = with_comparison(row(config, "quee-path vs quee-static", target, qc, q, w8),
                                                 q, qc, other, om)
                            rr["chosen_on"] = "validation (quee-path); quee-static at equal test cost"
                            rows.append(rr)
                for b in bases:  # the baselines' own validation choices, for the record
                    bc = choose(b, fp32_val, drop, budget, len(val))
                    if bc is not None:
                        confirm_by_runtime(b, bc, tx, ty)
                    rows.append(row(config, b.method, target, bc, b, w8))
            # calibration of predicted error at the first drop target's lambda
            n_cal = min(args.calib_images, len(tx))
            for name in ("quee-static", "quee-path"):
                q = next(c for c in quees if c.method == name)
                qc = choose(q, fp32_val, DROPS[0], None, len(val)) or choose(q, fp32_val, DROPS[-1], None, len(val))
                if qc is None:
                    continue
                lam = float(qc.label.split("=")[1])
                runs = fits[name].segment_runs(tx[:n_cal], num_threads=2)
                tab, p = calibration_table(fits[name], runs, ty[:n_cal], lam)
                calib_tables[f"{config} | {name} (lambda {lam:g})"] = tab
                selections[f"{config} | {name} (lambda {lam:g})"] = exit_selection(fits[name], runs, ty[:n_cal], lam)
                if config == configs[0][2]:
                    calib_preds[f"{name} (lambda {lam:g})"] = p
            # the chosen QuEE points, converted to files and loaded: the same answers as in memory
            for name in ("quee-static", "quee-path"):
                q = next(c for c in quees if c.method == name)
                qc = choose(q, fp32_val, DROPS[-1], None, len(val))
                if qc is None:
                    continue
                lam = float(qc.label.split("=")[1])
                pth = source.convert(work / f"{config.replace(',', '-').replace(' ', '_')}_{name}.pyrt",
                                     fits[name].policy(lam))
                m = pyruntime.load(pth, num_threads=2)
                out = m.run(tx[:500])
                mem = fits[name].run(tx[:500], lam, num_threads=2)
                if not (np.array_equal(out.logits, mem["logits"]) and np.array_equal(out.bops, mem["bops"])):
                    raise AssertionError(f"{pth}: the converted file disagrees with the in-memory model")
        # headline: the first configuration's quee-path rows against the strongest baseline
        first = configs[0][2]
        heads = [r for r in rows if r["config"] == first and r["method"] == "quee-path" and r["verdict"]]
        counts = {v: sum(r["verdict"] == v for r in heads) for v in ("beats", "ties", "loses")}
        headline.append(f"**Measured (gates {first}, QuEE with path targets, every target of the table).** Against "
                        f"the strongest PTQ+exits baseline at equal or higher test cost: beats {counts['beats']}, "
                        f"ties {counts['ties']}, loses {counts['loses']} of {len(heads)} operating points.")
        headline.append("")
        headline.append("| target | chosen_on | QuEE-path test top-1 | GBOPs | strongest baseline (point) | its top-1 | "
                        "its GBOPs | diff pp [95% CI] | McNemar p | verdict |")
        headline.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in heads:
            headline.append(f"| {r['target']} | validation | {100 * r['top1']:.2f}% | {r['bops'] / 1e9:.3f} | "
                            f"{r['vs'].replace('strongest: ', '')} ({r['vs_point']}) | {100 * r['vs_top1']:.2f}% | "
                            f"{r['vs_bops'] / 1e9:.3f} | {r['diff_pp']:+.2f} [{r['ci_low_pp']:+.2f}, "
                            f"{r['ci_high_pp']:+.2f}] | {r['mcnemar_p']:.3g} | {r['verdict']} |")
        headline += [""] + why_lines(rows, curves, selections, calib_tables)
        ctx = {"command": "python tools/results_quee.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "minutes": (time.time() - t0) / 60, "images": len(calib), "val_images": len(val),
               "test_images": len(tx), "fp32_val": fp32_val, "fp32_test": fp32_test, "w8": w8,
               "checkpoint": proto.checkpoint_label, "holdout_note": proto.holdout_note,
               "machine": f"{platform.machine()}, {pyruntime.isa()}"}
        write_csv(args.out / "results.csv", rows)
        write_md(args.out / "results.md", rows, headline, calib_tables, ctx, selections)
        plot_curves(args.out / "curves.png", curves, w8, fp32_test)
        if calib_preds:
            plot_calibration(args.out / "calibration.png", calib_preds)
    print(f"wrote {args.out}/results.{{md,csv}}, curves.png, calibration.png in {(time.time() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
