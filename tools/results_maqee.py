#!/usr/bin/env python3
"""Reproduce results/maqee/: MAQEE (APQ, Fang et al. 2026) against PTQ + exits at equal cost,
every operating point certified by the same Learn-then-Test rule on the validation images and
reported on the Fashion-MNIST test images, each policy converted and run by the runtime.

    python tools/results_maqee.py --checkpoint /work/ref30/fmnist_vit.safetensors --out results/maqee
    python tools/results_maqee.py --test-limit 2000 --budgets 0.4 --out /tmp/mq     # quicker look

Splits: fit = ``--images`` Fashion-MNIST training images of the calibration part (50000..54999:
Fisher traces, layer errors, the bit alternation); validation = ``--validation-images`` of the
validation part (55000..59999): every operating point below -- MAQEE's and the baselines' -- is
chosen there; test = the test split, only reported. Every row says ``chosen_on``.

Methods:

* ``maqee (exits)``: :func:`pyruntime.calibrate.maqee.calibrate_maqee`, sensitivity from the
  reach-weighted Fisher of the exit-head losses; ``maqee (final)``: the final-head ablation.
  One run per expected-BOPs budget (``--budgets``, fractions of W8A8's full-depth BOPs).
* ``ptq+exits W8A8`` / ``ptq+exits W4A8``: uniform PTQ with every exit head, ONE threshold shared
  by the heads, from the SAME grid (:func:`.maqee.threshold_grid` on the same fit images), the
  SAME BSR filter from the fit images and the SAME Learn-then-Test certificate on the same
  validation images (risk: images fp32 gets right and the policy gets wrong, at most
  ``--risk``, with probability >= 1 - ``--delta``). A baseline tests one allocation, so its
  level is delta; MAQEE's is delta / (allocations it tested).

Equal cost: for each MAQEE point, each baseline's certified point with the least validation
expected BOPs at or above MAQEE's (within 1% below counts as equal); a baseline with no
certified point that expensive offers its most expensive one, flagged ``cheaper``. The
strongest baseline is the one with the higher *validation* top-1 at that point. Test
comparison: :func:`pyruntime.stats.compare` (paired bootstrap interval of the top-1
difference, exact McNemar p, verdict) over the test images.

Measurements: MAQEE's points and each baseline's own Learn-then-Test choice are converted and
run with real exits (top-1, the runtime's mean BOPs per image). The baselines' other grid
points (the frontier, the matched points) are replayed from the runtime's collected exit logits
on the test images -- the executor's decisions exactly (tests/test_calibrate_maqee.py), checked
here against the converted run of the baseline's own choice. ``--workdir`` keeps converted
files and MAQEE policies, so a rerun reuses finished points.
"""
from __future__ import annotations

import argparse
import csv
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
from pyruntime import stats  # noqa: E402
from pyruntime.calibrate.common import CostModel, model_graph, policy_cost, run_batches  # noqa: E402
from pyruntime.calibrate.maqee import (BudgetNotMet, MaqeeConfig, Replay, _deltas, _step_costs,  # noqa: E402
                                       calibrate_maqee, certify, threshold_grid)
from pyruntime.calibrate.probe import executor, materialise, run  # noqa: E402
from pyruntime.calibrate.thresholds import scores  # noqa: E402
from pyruntime.calibrate.uniform import uniform_policy  # noqa: E402
from pyruntime.policy import ExitPolicy, Policy  # noqa: E402

BASES = {"ptq+exits W8A8": (8, 8), "ptq+exits W4A8": (4, 8)}
VARIANTS = ("exits", "final")
CLAIM = ("APQ/MAQEE (Fang et al. 2026, abstract): up to 95% fewer BOPs at maintained accuracy; up to 20% better "
         "than strong baselines (PTQ + early exits) -- ImageNet-scale ViTs, classification/detection/segmentation")
FIELDS = ("method", "point", "chosen_on", "risk", "delta", "val_cost", "test_bops", "bops_vs_fp32", "test_top1",
          "val_top1", "val_risk", "risk_bound", "test_risk", "risk_held", "thresholds", "note")


@dataclass
class Row:
    method: str
    point: str
    chosen_on: str
    risk: float = float("nan")
    delta: float = float("nan")
    val_cost: float = float("nan")
    test_bops: float = float("nan")
    bops_vs_fp32: float = float("nan")
    test_top1: float = float("nan")
    val_top1: float = float("nan")
    val_risk: float = float("nan")
    risk_bound: float = float("nan")
    test_risk: float = float("nan")
    risk_held: str = ""
    thresholds: str = ""
    note: str = ""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_args(p, out="maqee", images=512, images_help="fit images (calibration part)", val_images=2000,
                      val_flag="--validation-images", val_help="validation images (validation part)",
                      workdir_help="keep converted files and MAQEE policies here")
    p.add_argument("--fisher-images", type=int, default=128, help="fit images that give the Fisher traces")
    p.add_argument("--error-images", type=int, default=128, help="fit images that give the layer errors")
    p.add_argument("--rounds", type=int, default=2, help="MAQEE bit re-allocations at most")
    p.add_argument("--budgets", type=lambda s: [float(v) for v in s.split(",")], default=[0.35, 0.5],
                   help="MAQEE expected-BOPs budgets, fractions of W8A8's full-depth BOPs (comma-separated)")
    p.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS), help="exits,final")
    p.add_argument("--risk", type=float, default=0.01, help="epsilon: allowed share of lost images (fraction)")
    p.add_argument("--delta", type=float, default=0.05)
    p.add_argument("--bsr-max", type=float, default=MaqeeConfig.bsr_max,
                   help="the BSR filter, for MAQEE and the baselines alike: thresholds with more at-risk exit "
                        "decisions per fit image are left out of the sequence (inf: no filter)")
    args = check_protocol_args(p, p.parse_args(argv))
    if not args.bsr_max >= 0:
        p.error("--bsr-max must be >= 0")
    if any(v not in VARIANTS for v in args.variants):
        p.error(f"--variants: each of {VARIANTS}")
    return args


def closed(policy: Policy, depth: int, thresholds=None) -> Policy:
    """``policy`` with an exit head after every block but the last (threshold 1: nobody leaves)."""
    t = [1.0] * (depth - 1) if thresholds is None else thresholds
    policy.exits = [ExitPolicy(b, "confidence", float(v)) for b, v in zip(range(depth - 1), t)]
    return policy


class Runner:
    """Converts policies into --workdir and runs them on the test images."""

    def __init__(self, source, work: Path, x: np.ndarray, y: np.ndarray, show: bool):
        import pyruntime

        self.source, self.work, self.x, self.y, self.show, self.load = source, work, x, y, show, pyruntime.load

    def test(self, name: str, policy: Policy) -> Dict[str, np.ndarray]:
        """Per test image: correct, BOPs, exit block (a converted file, run with its exits)."""
        path = self.work / f"{name}.pyrt"
        if not path.is_file():
            self.source.convert(path, policy)
        logits, exit_block, per_image, _ = run_batches(self.load(path, num_threads=2), self.x, 500, name, self.show)
        return {"correct": logits.argmax(1) == self.y, "bops": per_image, "exit_block": exit_block}


def replay_for(source, policy: Policy, images, labels, reference_right, fp_exit_logits, cfg: MaqeeConfig) -> Replay:
    """The runtime's every-head logits of ``policy`` on ``images`` as a Replay."""
    depth = source.depth
    r = run(executor(*materialise(source, policy)), images, True, 256, 2)
    costs = CostModel(source, "bops")
    return Replay(r["exit_logits"], r["logits"], labels, "confidence", list(range(depth - 1)), depth,
                  _step_costs(costs, model_graph(source, policy)), _deltas(cfg, r["exit_logits"], fp_exit_logits),
                  reference_right)


def matched(certified, cost: float):
    """The certified point with the least validation cost >= ``cost`` (1% below counts as
    equal), else the most expensive one, flagged."""
    above = [o for o in certified if o.cost >= 0.99 * cost]
    if above:
        return min(above, key=lambda o: o.cost), ""
    return max(certified, key=lambda o: o.cost), "cheaper: no certified point at equal cost"


def main(argv=None) -> int:
    import tempfile

    args = parse_args(argv)
    t_start = time.time()
    proto = load_protocol(args, 2)
    show = not args.no_progress
    source, fit, val = proto.source, proto.splits.calibration, proto.splits.validation
    depth = source.depth
    x, y = proto.splits.test_images, proto.splits.test_labels
    cfg = MaqeeConfig(max_drop=args.risk, delta=args.delta, rounds=args.rounds, fisher_images=args.fisher_images,
                      error_images=args.error_images, num_threads=2, show_progress=show, seed=args.seed,
                      bsr_max=args.bsr_max)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="maqeeres-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        runner = Runner(source, work, x, y, show)
        fp32 = runner.test("fp32", Policy(name="fp32"))
        fp_bops = float(fp32["bops"].mean())
        rows: List[Row] = [Row("fp32", "full depth", "none (fixed)", test_bops=fp_bops, bops_vs_fp32=1.0,
                               test_top1=float(fp32["correct"].mean()))]

        def test_risk(correct):
            return float((fp32["correct"] & ~correct).mean())

        # the fp32 model's heads on fit/validation/test: the reference, the grid, the drift
        fp_probe = closed(Policy(name="fp32"), depth)
        fp_ex = executor(*materialise(source, fp_probe))
        fp_fit, fp_val = run(fp_ex, fit.images, True, 256, 2), run(fp_ex, val.images, True, 256, 2)
        del fp_ex
        grid = threshold_grid(scores(fp_fit["exit_logits"], "confidence"), cfg.grid)
        fp_fit_right = fp_fit["logits"].argmax(-1) == fit.labels
        fp_val_right = fp_val["logits"].argmax(-1) == val.labels

        # --- baselines: PTQ + exits, the same grid and certificate -------------------------------
        base_cert, base_test = {}, {}
        for method, (w, a) in BASES.items():
            policy = closed(uniform_policy(w, a), depth)
            fr = replay_for(source, policy, fit.images, fit.labels, fp_fit_right, fp_fit["exit_logits"], cfg)
            vr = replay_for(source, policy, val.images, val.labels, fp_val_right, fp_val["exit_logits"], cfg)
            allowed = [fr.evaluate([t] * (depth - 1))[3] <= cfg.bsr_max + 1e-12 for t in grid]
            base_cert[method] = certify(vr, grid, args.risk, args.delta, allowed)
            r = run(executor(*materialise(source, policy)), x, True, 256, 2)
            costs = CostModel(source, "bops")
            tr = Replay(r["exit_logits"], r["logits"], y, "confidence", list(range(depth - 1)), depth,
                        _step_costs(costs, model_graph(source, policy)), np.zeros(depth - 1), fp32["correct"])
            base_test[method] = tr
            for t in grid:  # the frontier: every grid threshold on the test images (replayed)
                top1, risk, cost, _, _ = tr.evaluate([t] * (depth - 1))
                rows.append(Row(method, f"t={t:.4f}", "none (sweep, test-reported)", test_bops=cost,
                                bops_vs_fp32=cost / fp_bops, test_top1=top1, test_risk=risk))
            if not base_cert[method]:
                rows.append(Row(method, "LTT choice", "validation", args.risk, args.delta,
                                note="nothing certified on validation"))
                continue
            best = min(base_cert[method], key=lambda o: (o.cost, -o.top1))
            got = runner.test(f"{method.replace(' ', '_').replace('+', '')}_t{best.thresholds[0]:.6f}",
                              closed(uniform_policy(w, a), depth, best.thresholds))
            rep = tr.evaluate(best.thresholds)
            if abs(rep[0] - got["correct"].mean()) > 1e-12 or abs(rep[2] - got["bops"].mean()) > 1e-6 * rep[2]:
                raise AssertionError(f"{method}: replayed test top-1/BOPs {rep[:3]} != runtime's "
                                     f"{got['correct'].mean()}, {got['bops'].mean()}")
            tr_ = test_risk(got["correct"])
            rows.append(Row(method, "LTT choice (cheapest certified)", "validation", args.risk, args.delta, best.cost,
                            float(got["bops"].mean()), float(got["bops"].mean()) / fp_bops,
                            float(got["correct"].mean()), best.top1, best.risk, best.risk_bound, tr_,
                            "yes" if tr_ <= args.risk else "no", f"{best.thresholds[0]:.6f}"))

        # --- MAQEE --------------------------------------------------------------------------------
        w8 = policy_cost(source, uniform_policy(8, 8), "bops")
        cache: dict = {}
        final_traces = None
        comparisons = []
        for variant in args.variants:
            for f in args.budgets:
                label = f"{f}x W8A8"
                method = f"maqee ({variant})"
                pfile = work / f"maqee_{variant}_{f}.json"
                t0 = time.time()
                if pfile.is_file():
                    policy = Policy.load(pfile)
                else:
                    try:
                        res = calibrate_maqee(source, fit, f * w8, MaqeeConfig(**{**cfg.__dict__, "sensitivity": variant}),
                                              validation=val, fisher_cache=cache, traces=final_traces)
                    except BudgetNotMet as e:
                        rows.append(Row(method, label, "validation", args.risk, args.delta,
                                        note=" ".join(str(e).split())))
                        print(f"{method} {label}: {e}", flush=True)
                        continue
                    if variant == "final":
                        final_traces = res.traces
                    print(f"\n{method} at {label}:\n{res.report()}", flush=True)
                    policy = res.policy
                    policy.save(pfile)
                m = policy.meta
                got = runner.test(f"maqee_{variant}_{f}", policy)
                tr_ = test_risk(got["correct"])
                row = Row(method, label, "validation", args.risk, args.delta, m["expected_cost_validation"],
                          float(got["bops"].mean()), float(got["bops"].mean()) / fp_bops, float(got["correct"].mean()),
                          m["validation_top1"], m["validation_risk"], m["risk_bound"], tr_,
                          "yes" if tr_ <= args.risk else "no", " ".join(f"{e.threshold:.4f}" for e in policy.exits),
                          f"{sum(1 for lp in policy.layers.values() if lp.w_bits == 4)} of {len(policy.layers)} "
                          f"layers at 4-bit weights; {m['certified']} certified; calibration {time.time() - t0:.0f} s")
                rows.append(row)
                # equal cost against each baseline, the strongest chosen on validation top-1
                cands = []
                for b in BASES:
                    if base_cert[b]:
                        op, flag = matched(base_cert[b], row.val_cost)
                        cands.append((op.top1, b, op, flag))
                if not cands:
                    continue
                _, b, op, flag = max(cands, key=lambda c: c[0])
                tr = base_test[b]
                head_right = tr.right(op.thresholds)
                btop1, brisk, bcost, _, _ = tr.evaluate(op.thresholds)
                cmp = stats.compare(got["correct"], head_right)
                comparisons.append({"maqee": row, "baseline": b, "threshold": op.thresholds[0], "base_val_cost": op.cost,
                                    "base_test_bops": bcost, "base_top1": btop1, "base_val_top1": op.top1,
                                    "base_test_risk": brisk, "flag": flag, "cmp": cmp})
        for r in rows:
            if np.isfinite(r.test_bops):
                r.bops_vs_fp32 = r.test_bops / fp_bops
        ctx = {"checkpoint": proto.checkpoint_label, "holdout_note": proto.holdout_note, "test_images": len(x),
               "fit": args.images, "validation": args.val_images, "fisher": args.fisher_images, "errors": args.error_images,
               "rounds": args.rounds, "risk": args.risk, "delta": args.delta, "grid": len(grid), "seed": args.seed,
               "minutes": (time.time() - t_start) / 60, "fp32_top1": rows[0].test_top1, "fp32_bops": fp_bops,
               "bsr_max": args.bsr_max,
               "command": "python tools/results_maqee.py " + " ".join(argv if argv is not None else sys.argv[1:])}
        write_csv(rows, args.out / "results.csv")
        write_md(rows, comparisons, args.out / "results.md", ctx)
        plot(rows, args.out / "frontier.png", ctx)
        (args.out / "comparisons.json").write_text(json.dumps(
            [{**{k: v for k, v in c.items() if k not in ("maqee", "cmp")}, "maqee": asdict(c["maqee"]),
              "compare": asdict(c["cmp"])} for c in comparisons], indent=1, default=float))
    print(f"wrote {args.out}/results.{{csv,md}}, frontier.png in {(time.time() - t_start) / 60:.1f} min")
    return 0


# --- outputs -----------------------------------------------------------------------------------------

def write_csv(rows: List[Row], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in asdict(r).items()})


def _pct(v: float) -> str:
    return f"{100 * v:.2f}%" if np.isfinite(v) else "-"


def write_md(rows: List[Row], comparisons: List[dict], path: Path, ctx: dict) -> None:
    fp = rows[0]
    lines = ["# MAQEE (APQ) against PTQ + exits, at equal cost, risk certified on validation", "",
             f"Model `{ctx['checkpoint']}`: fp32 full depth {_pct(fp.test_top1)} top-1 on {ctx['test_images']} "
             f"Fashion-MNIST test images, {fp.test_bops / 1e9:.3f} GBOPs per image. Fit: {ctx['fit']} training images "
             f"of the calibration part (Fisher on {ctx['fisher']}, layer errors on {ctx['errors']}, {ctx['rounds']} "
             f"re-allocations at most); validation: {ctx['validation']} of the validation part (55000..59999), which "
             f"chooses every operating point; test: only reported. Risk = share of images fp32 gets right and the "
             f"policy gets wrong (bounds the top-1 drop); certified <= {100 * ctx['risk']:g}% with probability >= "
             f"{1 - ctx['delta']:g} by Learn-then-Test over the same {ctx['grid']}-threshold grid for every method, "
             f"thresholds with more than {ctx['bsr_max']:g} at-risk exit decisions per fit image (BSR) left out for "
             f"every method. `{ctx['command'].strip()}` took {ctx['minutes']:.1f} min.", ""]
    lines += holdout_lines(ctx["holdout_note"])
    lines += ["## The paper's claim and our counterpart", "",
              "| claim | our measurement | interval (test, paired) | verdict |", "|---|---|---|---|"]
    maqee = [r for r in rows if r.method.startswith("maqee") and np.isfinite(r.test_top1)]
    if maqee:
        cheapest = min(maqee, key=lambda r: r.test_bops)
        c = next((c for c in comparisons if c["maqee"] is cheapest), None)
        ours = (f"{cheapest.method} {cheapest.point}: {100 * (1 - cheapest.bops_vs_fp32):.1f}% fewer BOPs than fp32 "
                f"at {_pct(cheapest.test_top1)} ({100 * (cheapest.test_top1 - fp.test_top1):+.2f} pp vs fp32)")
        if c:
            ours += (f"; vs {c['baseline']} at t={c['threshold']:.4f} ({c['base_test_bops'] / 1e9:.3f} GBOPs, "
                     f"{_pct(c['base_top1'])}{', ' + c['flag'] if c['flag'] else ''})")
            lines.append(f"| {CLAIM} | {ours} | {c['cmp'].text()} | {c['cmp'].verdict} |")
        else:
            lines.append(f"| {CLAIM} | {ours} | no certified baseline point | - |")
    else:
        lines.append(f"| {CLAIM} | no MAQEE point met its budget with a certified risk | - | - |")
    lines += ["", "## Each MAQEE point against the strongest baseline at equal cost", "",
              "Baseline point: each PTQ+exits curve's certified point with the least validation cost at or above "
              "MAQEE's; of the two, the one with the higher validation top-1 (chosen_on: validation).", "",
              "| MAQEE point | chosen_on | test top-1 | GBOPs | baseline (threshold) | chosen_on | its top-1 | its GBOPs "
              "| MAQEE - baseline [95% CI], McNemar p | verdict |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in comparisons:
        r = c["maqee"]
        lines.append(f"| {r.method} {r.point} | {r.chosen_on} | {_pct(r.test_top1)} | {r.test_bops / 1e9:.4f} | "
                     f"{c['baseline']} (t={c['threshold']:.4f}{', ' + c['flag'] if c['flag'] else ''}) | validation | "
                     f"{_pct(c['base_top1'])} | {c['base_test_bops'] / 1e9:.4f} | {c['cmp'].text()} | "
                     f"{c['cmp'].verdict} |")
    lines += ["", "## Risk certificates on the test images", "",
              "| method | point | chosen_on | validation risk | CP bound | test risk | held (<= epsilon) |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.chosen_on == "validation":
            lines.append(f"| {r.method} | {r.point} | {r.chosen_on} | {_pct(r.val_risk)} | {_pct(r.risk_bound)} | "
                         f"{_pct(r.test_risk)} | {r.risk_held or '-'} |")
    lines += ["", "## All chosen rows", "", "The baselines' threshold sweeps (the frontier's thin lines, chosen_on: "
              "none, every grid threshold on the test images) are in results.csv.", "",
              "| method | point | chosen_on | test top-1 | GBOPs | BOPs/fp32 | val GBOPs | "
              "thresholds | note |", "|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if not r.chosen_on.startswith("none (sweep")):
        lines.append(f"| {r.method} | {r.point} | {r.chosen_on} | {_pct(r.test_top1)} | "
                     f"{r.test_bops / 1e9:.4f} | {r.bops_vs_fp32:.4f} | {r.val_cost / 1e9:.4f} | {r.thresholds} | "
                     f"{r.note} |")
    lines += ["", "![frontier](frontier.png)", ""]
    path.write_text("\n".join(lines))


def plot(rows: List[Row], path: Path, ctx: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    styles = {"ptq+exits W8A8": ("C1", "v"), "ptq+exits W4A8": ("C5", "<"), "maqee (exits)": ("C3", "D"),
              "maqee (final)": ("C4", "P")}
    for method, (color, marker) in styles.items():
        sweep = sorted((r for r in rows if r.method == method and r.chosen_on.startswith("none")),
                       key=lambda r: r.test_bops)
        if sweep:
            ax.plot([r.bops_vs_fp32 for r in sweep], [100 * r.test_top1 for r in sweep], color=color, lw=1,
                    alpha=0.6, label=f"{method}: threshold sweep (test)")
        chosen = sorted((r for r in rows if r.method == method and r.chosen_on == "validation"
                         and np.isfinite(r.test_top1)), key=lambda r: r.test_bops)
        if chosen:
            ax.plot([r.bops_vs_fp32 for r in chosen], [100 * r.test_top1 for r in chosen], color=color, marker=marker,
                    ls="--" if method.startswith("maqee") else "none", ms=7, label=f"{method}: chosen on validation")
    fp = ctx["fp32_top1"]
    ax.axhline(100 * fp, color="gray", ls="--", lw=0.8)
    ax.axhline(100 * (fp - ctx["risk"]), color="gray", ls=":", lw=0.8)
    ax.set(xscale="log", xlabel="expected BOPs per image / fp32 full depth (runtime, test images)",
           ylabel=f"top-1 on {ctx['test_images']} test images (%)",
           title="APQ frontier: MAQEE vs PTQ + exits (dashed: fp32; dotted: fp32 - epsilon)")
    ax.set_ylim(100 * fp - 5, 100 * fp + 0.8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
