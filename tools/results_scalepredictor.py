#!/usr/bin/env python3
"""Reproduce results/scalepredictor/: does predicting activation scales per image (Li et al.,
2026) beat scales that need no predictor, once clipping is given to the baselines too?

    python tools/results_scalepredictor.py                 # shipped model -> results/scalepredictor/
    python tools/results_scalepredictor.py --checkpoint /work/ref30/fmnist_vit.safetensors \\
        --workdir /tmp/sp-work --out results/scalepredictor

Per weight/activation precision (``--bits``; weights are 4 or 8 bits in this runtime, so the
issue's W6A6 row is not possible -- W4A6 stands beside W4A4), every block linear quantised,
patch embedding and head fp32:

* ``dynamic``: scale = max |x| / qmax per image (no calibration);
* ``fixed-ratio dynamic``: scale = rho_l * max |x| / qmax, rho_l the least-error ratio on the
  calibration images (``static.clipped_dynamic_policy``; the runtime's ``clip``);
* ``static min-max`` / ``static MSE`` (min-max range times the least-error clip ratio);
* ``static percentile``: p chosen from ``--percentiles`` by top-1 on the validation images;
* ``ScalePredictor``: the closed-form fit (targets: each image's least-error clip ratio),
  statistic after block 0 (chunk 64), over the chosen percentile policy (block 0 keeps it);
* ``ScalePredictor + STE``: the same, refined through the straight-through estimator
  (``--ste-steps``; distillation against the fp32 logits on the calibration images).

Every row says which split chose its free numbers (``chosen_on``). Each policy is converted
and run through the runtime on the validation images (``--val-images``) and on the test
images; the comparison of each ScalePredictor variant is against the strongest baseline of
the same bits *as ranked on the validation images*, with the paired bootstrap interval and
McNemar p over the test images (pyruntime.stats.compare). BOPs are the runtime's; all rows of
one precision have the same BOPs (the statistic is not counted as MACs), checked to 1%.
The figure: the runtime statistic r against each calibration image's least-error scale for
a deep layer, with the closed-form and the refined polynomial.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from _protocol import add_protocol_args, check_protocol_args, holdout_lines, load_protocol  # noqa: E402
from pyruntime.calibrate.common import run_batches  # noqa: E402
from pyruntime.calibrate.scalepredictor import ScalePredictorConfig, calibrate_scalepredictor  # noqa: E402
from pyruntime.calibrate.static import clipped_dynamic_policy, static_policy  # noqa: E402
from pyruntime.calibrate.uniform import uniform_policy  # noqa: E402
from pyruntime.policy import Policy  # noqa: E402
from pyruntime.stats import compare  # noqa: E402

BASELINES = ("dynamic", "fixed-ratio dynamic", "static min-max", "static percentile", "static MSE")
METHODS = ("ScalePredictor", "ScalePredictor + STE")
FIELDS = ("bits", "method", "policy", "chosen_on", "choice", "val_top1", "top1", "bops", "calib_s")


@dataclass
class Row:
    bits: str           # "w8a4"
    method: str
    policy: str         # file stem in the workdir
    chosen_on: str      # which split chose the row's free numbers
    choice: str = ""    # what was chosen (percentile, clip ratios, degrees, STE outcome)
    val_top1: float = float("nan")
    top1: float = float("nan")
    bops: int = 0
    calib_s: float = 0.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_args(p, out="scalepredictor", images=256, val_images=2000,
                      val_help="validation images (choose p, rank baselines)", threads=2,
                      workdir_help="converted files and the row cache (default: <out>/work, not committed)")
    p.add_argument("--bits", default="w8a8,w8a6,w8a4,w4a6,w4a4")
    p.add_argument("--percentiles", default="99.9,99.99,99.999")
    p.add_argument("--ste-steps", type=int, default=40)
    p.add_argument("--deep-layer", default=None, help="layer of the figure (default: the last block's fc1)")
    return check_protocol_args(p, p.parse_args(argv))


def _bits(text: str):
    w, a = text.lstrip("w").split("a")
    return int(w), int(a)


class Runner:
    """Converts and runs policies (cached in the workdir by policy JSON) on the validation
    and test images."""

    def __init__(self, source, work: Path, xv, yv, xt, yt, threads: int, show: bool):
        self.source, self.work, self.threads, self.show = source, work, threads, show
        self.xv, self.yv, self.xt, self.yt = xv, yv, xt, yt
        self.cache_path = work / "runs.json"
        self.cache = json.loads(self.cache_path.read_text()) if self.cache_path.is_file() else {}

    def run(self, stem: str, policy: Policy):
        """(val top-1, test correctness [N] bool, BOPs per test image)."""
        import pyruntime

        key = hashlib.sha256(policy.to_json().encode()).hexdigest()[:16]
        npz = self.work / f"{stem}.{key}.npz"
        if npz.is_file():
            z = np.load(npz)
            return float(z["val"]), z["correct"], int(z["bops"])
        path = self.source.convert(self.work / f"{stem}.pyrt", policy)
        model = pyruntime.load(path, num_threads=self.threads)
        val = float((run_batches(model, self.xv, 500, enabled=False)[0].argmax(1) == self.yv).mean())
        logits, _, bops, _ = run_batches(model, self.xt, 500, desc=stem, enabled=self.show)
        correct = logits.argmax(1) == self.yt
        bops = int(round(float(bops.mean())))
        np.savez(npz, val=val, correct=correct, bops=bops)
        policy.save(self.work / f"{stem}.json")
        return val, correct, bops


def calibrate_rows(source, data, runner: Runner, w: int, a: int, percentiles, ste_steps: int, show: bool,
                   figure: Dict):
    """(rows, {method: test correctness}) for one precision."""
    tag = f"w{w}a{a}"
    base = uniform_policy(w, a)
    rows, correct = [], {}

    def add(method, stem, chosen_on, make, choice_of=lambda p: ""):
        t0 = time.time()
        pol = make()
        row = Row(tag, method, stem, chosen_on, choice_of(pol), calib_s=time.time() - t0)
        row.val_top1, correct[method], row.bops = runner.run(stem, pol)
        row.top1 = float(correct[method].mean())
        rows.append(row)
        print(f"{tag} {method:22s} val {100 * row.val_top1:6.2f}%  test {100 * row.top1:6.2f}%  "
              f"{row.bops / 1e9:.4f} GBOPs  calib {row.calib_s:5.1f}s  {row.choice}", flush=True)
        return pol

    def clips(p):
        c = p.meta["clipped_dynamic"]
        return f"clip in [{min(c.values()):.3f}, {max(c.values()):.3f}], median {np.median(list(c.values())):.3f}"

    def static_ratio(ref):
        def text(p):
            r = [p.layers[n].static_scale / ref.layers[n].static_scale for n in ref.layers
                 if ref.layers[n].scale == "static"]
            return f"scale / min-max in [{min(r):.3f}, {max(r):.3f}], median {np.median(r):.3f}"
        return text

    add("dynamic", f"{tag}-dynamic", "-", lambda: base)
    add("fixed-ratio dynamic", f"{tag}-fixed-ratio", "calibration (least error)",
        lambda: clipped_dynamic_policy(source, data, base, show_progress=show), clips)
    mm = add("static min-max", f"{tag}-minmax", "calibration",
             lambda: static_policy(source, data, base, "minmax", show_progress=show))
    add("static MSE", f"{tag}-mse", "calibration (least error)",
        lambda: static_policy(source, data, base, "mse", show_progress=show), static_ratio(mm))
    # the percentile: every candidate on the validation images, the best kept (ties: the first)
    cands, t0 = [], time.time()
    for p in percentiles:
        pol = static_policy(source, data, base, "percentile", p, show_progress=show)
        cands.append((runner.run(f"{tag}-p{p}", pol)[0], -len(cands), p, pol))
    _, _, p_best, pct = max(cands, key=lambda c: c[:2])
    search_s = time.time() - t0  # calibration and validation runs of every candidate
    add("static percentile", f"{tag}-percentile", "validation (p)", lambda: pct,
        lambda _: f"p = {p_best} (val: " + ", ".join(f"{c[2]}: {100 * c[0]:.2f}%" for c in cands) + ")")
    rows[-1].calib_s = search_s
    results = {}

    def predictor(steps):
        res = calibrate_scalepredictor(source, data, pct, block=0, chunk=64, show_progress=show,
                                       config=ScalePredictorConfig(ste_steps=steps))
        print(res.report(), flush=True)
        results[steps] = res
        return res.policy

    def sp_choice(p):
        m = p.meta["scalepredictor"]
        degs = list(m["chosen_degrees"].values())
        text = f"degrees {min(degs)}..{max(degs)} (held-out calibration); base p = {p_best}"
        if m["ste"]:
            t = m["ste"]
            text += (f"; STE {t['steps']} steps: KD loss {t['loss_closed_form']:.4g} -> {t['loss_refined']:.4g}, "
                     f"{'kept' if t['accepted'] else 'rejected (closed form kept)'}")
        return text

    add("ScalePredictor", f"{tag}-predicted", "calibration (fit, degree); validation (base p)",
        lambda: predictor(0), sp_choice)
    if ste_steps > 0:
        add("ScalePredictor + STE", f"{tag}-predicted-ste", "calibration (fit, degree, STE); validation (base p)",
            lambda: predictor(ste_steps), sp_choice)
    if tag == figure.get("bits") and results:
        figure["results"] = results
    return rows, correct


# --- outputs ------------------------------------------------------------------------------------------------

def comparisons(rows: List[Row], correct: Dict) -> List[dict]:
    """Each ScalePredictor variant against the strongest baseline of its bits (ranked on
    validation), over the test images."""
    out = []
    for tag in dict.fromkeys(r.bits for r in rows):
        here = {r.method: r for r in rows if r.bits == tag}
        base = max((here[m] for m in BASELINES if m in here), key=lambda r: r.val_top1)
        for m in METHODS:
            if m not in here:
                continue
            c = compare(correct[tag][m], correct[tag][base.method])
            out.append(dict(bits=tag, method=m, baseline=base.method, top1=here[m].top1, base_top1=base.top1,
                            bops=here[m].bops, base_bops=base.bops, cmp=c,
                            vs_dynamic=compare(correct[tag][m], correct[tag]["dynamic"])))
    return out


def write_csv(rows: List[Row], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(FIELDS)
        for r in rows:
            d = asdict(r)
            w.writerow([f"{d[k]:.4f}" if k in ("val_top1", "top1") else f"{d[k]:.1f}" if k == "calib_s" else d[k]
                        for k in FIELDS])


def write_md(rows: List[Row], cmps: List[dict], context: dict, path: Path) -> None:
    def pct(v):
        return f"{100 * v:.2f}%"

    lines = ["# ScalePredictor: per-image predicted activation scales against clipped baselines", "",
             f"Model: `{context['checkpoint']}` (sha256 {context['sha256'][:16]}...), {context['test_images']} "
             f"Fashion-MNIST test images through the pyruntime executor ({context['threads']} threads). "
             f"Calibration: {context['calib_images']} images of the calibration part (seed {context['seed']}); "
             f"validation: {context['val_images']} images of the validation part. Generated by "
             f"`{context['command']}` in {context['minutes']:.1f} min on {context['machine']}.", ""]
    lines += holdout_lines(context["holdout_note"])
    lines += ["## The paper's claim and our counterpart", "",
              "| claim (Li et al., 2026, [stated]) | our measurement (equal BOPs) | interval over test images | verdict |",
              "|---|---|---|---|"]
    claim = ("Shallow-layer range statistics predict the best scales of deeper layers; per-image predicted "
             "scales without just-in-time calibration, negligible overhead (ImageNet; no number we can match here)")
    for c in cmps:
        lines.append(f"| {claim if c is cmps[0] else '〃'} | {c['bits'].upper()}: {c['method']} {pct(c['top1'])} vs "
                     f"strongest baseline (by validation) {c['baseline']} {pct(c['base_top1'])} | {c['cmp'].text()} | "
                     f"**{c['cmp'].verdict}** |")
    lines += ["", "Against plain dynamic scales (the runtime's default): " + "; ".join(
        f"{c['bits'].upper()} {c['method']} {c['vs_dynamic'].text()} ({c['vs_dynamic'].verdict})" for c in cmps), ""]
    lines += ["## All rows", "",
              "| bits | method | chosen_on | choice | val top-1 | test top-1 | GBOPs | calib s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.bits.upper()} | {r.method} | {r.chosen_on} | {r.choice} | {pct(r.val_top1)} | {pct(r.top1)} | "
                     f"{r.bops / 1e9:.4f} | {r.calib_s:.0f} |")
    lines += ["", "Notes:", "",
              "- Weights are 4 or 8 bits in this runtime (policy.W_BITS), so there is no W6A6 row; W4A6 stands "
              "beside W4A4.",
              "- Every row of one precision has the same BOPs (the runtime counts the MACs of the linears; the "
              "statistic and the polynomial are not MACs), so every comparison is at equal cost.",
              "- The strongest baseline is the one with the highest *validation* top-1; test images only report.",
              "- STE: Adam on the normalised polynomial coefficients, distillation (KL to the fp32 softmax) on the "
              "calibration images; the refined coefficients are kept only if they lower that loss on all "
              "calibration images (the row's choice column says whether they were).", ""]
    if context.get("figure"):
        lines += [f"![r vs least-error scale]({context['figure']})", "",
                  f"Figure: {context['figure_caption']}", ""]
    path.write_text("\n".join(lines))


def plot(results: Dict, layer: str, path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pyruntime.calibrate.scalepredictor import evaluate_polynomial

    closed = results[0]
    r, s = closed.r.astype(np.float64), closed.targets[layer]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.scatter(r, s, s=8, alpha=0.5, label="least-error scale per calibration image")
    grid = np.linspace(r.min(), r.max(), 100)
    f = closed.fits[layer]
    ax.plot(grid, evaluate_polynomial(closed.policy.predictor.coeffs[layer], grid), "k-",
            label=f"closed-form fit (degree {f.degree}, corr {f.corr:.2f})")
    ste = [v for k, v in results.items() if k > 0]
    if ste and ste[0].ste is not None and ste[0].ste.accepted:
        ax.plot(grid, evaluate_polynomial(ste[0].policy.predictor.coeffs[layer], grid), "r--", label="after STE")
    ax.set(xlabel="statistic r after block 0 (runtime)", ylabel=f"scale of {layer}", title="ScalePredictor")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return (f"{layer}: the runtime's statistic r (after block 0, chunk 64) against each calibration image's "
            f"least-error activation scale (the regression targets), with the fitted polynomial(s); "
            f"Pearson correlation {f.corr:.2f}.")


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    proto = load_protocol(args, args.threads)
    show = not args.no_progress
    source, data, val = proto.source, proto.splits.calibration, proto.splits.validation
    xt, ty = proto.splits.test_images, proto.splits.test_labels
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.workdir or args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    runner = Runner(source, work, val.images, val.labels, xt, ty, args.threads, show)
    percentiles = [float(v) for v in args.percentiles.split(",")]
    depth = source.depth
    layer = args.deep_layer or f"blocks.{depth - 1}.mlp.fc1"
    bits = [_bits(b) for b in args.bits.split(",")]
    figure = {"bits": f"w{bits[-1][0]}a{bits[-1][1]}"}
    rows, correct = [], {}
    for w, a in bits:
        r, c = calibrate_rows(source, data, runner, w, a, percentiles, args.ste_steps, show, figure)
        rows += r
        correct[f"w{w}a{a}"] = c
    for tag in correct:
        b = [r.bops for r in rows if r.bits == tag]
        if max(b) > 1.01 * min(b):
            raise SystemExit(f"{tag}: rows differ in BOPs by more than 1% ({min(b)}..{max(b)}); not equal cost")
    cmps = comparisons(rows, correct)
    context = {"checkpoint": proto.checkpoint_label, "sha256": proto.sha256, "holdout_note": proto.holdout_note,
               "test_images": len(ty), "threads": args.threads, "calib_images": len(data), "val_images": len(val),
               "seed": args.seed, "machine": "2 shared x86_64 vCPUs",
               "command": "python3 tools/results_scalepredictor.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if "results" in figure:
        context["figure"] = "scatter.png"
        context["figure_caption"] = f"{figure['bits'].upper()}, " + plot(figure["results"], layer, args.out / "scatter.png")
    write_csv(rows, args.out / "results.csv")
    context["minutes"] = (time.time() - t_start) / 60
    write_md(rows, cmps, context, args.out / "results.md")
    for c in cmps:
        print(f"{c['bits']} {c['method']} vs {c['baseline']}: {c['cmp'].text()} -> {c['cmp'].verdict}")
    print(f"wrote {args.out}/results.md, results.csv in {context['minutes']:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
