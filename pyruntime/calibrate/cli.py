"""``pyruntime calibrate``: write a policy fitted on calibration images.

    pyruntime calibrate --method lampq --budget-bops 0.75x --out lampq.json --report
    pyruntime calibrate --method uniform --w-bits 8 --a-bits 4 --scale percentile --out w8a4.json
    pyruntime calibrate --method scalepredictor --base w8a4.json --out w8a4-pred.json --report

Methods: ``uniform`` (one bit-width everywhere; with a budget, the most expensive uniform
setting that fits), ``lampq`` (type-aware Fisher sensitivity + ILP), ``naive`` (bits by
weight range, same ILP: LampQ's baseline), ``scalepredictor`` (per-image activation scales
predicted from a shallow block's range statistic). ``--scale minmax|percentile`` turns the
result's activation scales static (calibrated). A budget is a number (whole-model BOPs per
image, or model-file bytes) or ``<f>x``, a multiple of the W8A8 policy's cost.

The model is the shipped reference ViT unless ``--checkpoint`` names another file in its
format (e.g. one from ``tools/train_reference.py --tiny``); calibration images are at most
1,024 Fashion-MNIST training images drawn by ``--seed``.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .ilp import format_amount

__all__ = ["add_parser", "cmd_calibrate", "main"]

METHODS = ("uniform", "lampq", "naive", "scalepredictor")


def _bits(text: str) -> List[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``calibrate`` on an ``argparse`` sub-parser collection."""
    c = subparsers.add_parser("calibrate", help="fit a policy (bits, activation scales) on calibration images",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--method", choices=METHODS, required=True)
    c.add_argument("--out", required=True, help="policy JSON to write")
    c.add_argument("--report", action="store_true", help="print each layer's sensitivity / fit and chosen setting")
    budget = c.add_mutually_exclusive_group()
    budget.add_argument("--budget-bops", help="whole-model BOPs per image, or <f>x of W8A8's")
    budget.add_argument("--budget-bytes", help="model-file tensor bytes, or <f>x of W8A8's")
    c.add_argument("--checkpoint", help="reference-format checkpoint (default: the shipped reference model)")
    c.add_argument("--images", type=int, default=1024, help="calibration images (at most 1024)")
    c.add_argument("--seed", type=int, default=0, help="which training images calibrate")
    c.add_argument("--w-bits", type=_bits, default=None,
                   help="weight bits: candidates for lampq/naive (default 4,8); uniform: one value (default 8)")
    c.add_argument("--a-bits", type=_bits, default=None,
                   help="activation bits: candidates for lampq/naive (default 8); uniform/scalepredictor: one value (default 8)")
    c.add_argument("--scope", choices=("blocks", "all"), default="blocks",
                   help="blocks: qkv/proj/fc1/fc2 (embedding and head stay fp32); all: every linear layer")
    c.add_argument("--scale", choices=("dynamic", "minmax", "percentile"), default="dynamic",
                   help="activation scales of the result (minmax/percentile: static, calibrated)")
    c.add_argument("--percentile", type=float, default=99.99)
    c.add_argument("--rounds", type=int, default=3, help="lampq: refinement rounds")
    c.add_argument("--initial", choices=("measured", "model"), default="measured",
                   help="lampq: first-round layer error measured, or the Delta^2/12 model")
    c.add_argument("--no-type-aware", action="store_true", help="lampq: alpha_t = 1 (ablation)")
    c.add_argument("--base", help="scalepredictor: policy JSON whose scales to predict "
                                  "(default: W8 with --a-bits, static percentile scales)")
    c.add_argument("--block", type=int, default=0, help="scalepredictor: block whose output gives the statistic")
    c.add_argument("--chunk", type=int, default=64, help="scalepredictor: values per chunk of the statistic")
    c.add_argument("--max-degree", type=int, default=3, choices=(1, 2, 3), help="scalepredictor: highest degree tried")
    c.add_argument("--holdout", type=float, default=0.25, help="scalepredictor: held-out fraction for the degree")
    c.add_argument("--threads", type=int, help="torch threads")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(func=cmd_calibrate)
    return c


# --- pieces of the command ----------------------------------------------------------------------------

def _budget(args, source):
    """(kind, budget) from --budget-bops/--budget-bytes, or (kind, None)."""
    from .common import policy_cost
    from .uniform import uniform_policy

    text, kind = (args.budget_bops, "bops") if args.budget_bops is not None else (args.budget_bytes, "bytes")
    if text is None:
        return "bops", None
    t = text.strip().lower()
    try:
        if t.endswith("x"):
            return kind, float(t[:-1]) * policy_cost(source, uniform_policy(8, 8, scope=args.scope), kind)
        return kind, float(t)
    except ValueError:
        raise ValueError(f"budget must be a number or <f>x, got {text!r}") from None


def _one(values: Optional[List[int]], default: int, what: str) -> int:
    if values is None:
        return default
    if len(values) != 1:
        raise ValueError(f"{what} takes one value for this method, got {values}")
    return values[0]


def _with_scales(policy, args, source, data):
    if args.scale == "dynamic":
        return policy
    from .static import static_policy

    return static_policy(source, data, policy, args.scale, args.percentile, name=f"{policy.name}-{args.scale}",
                         show_progress=not args.no_progress)


def _uniform(args, source, data, kind, budget):
    from .common import policy_cost
    from .uniform import uniform_policy, uniform_under_budget

    if budget is not None:
        policy = uniform_under_budget(source, budget, kind, args.scope)
    else:
        w, a = _one(args.w_bits, 8, "--w-bits"), _one(args.a_bits, 8, "--a-bits")
        policy = uniform_policy(w, a, scope=args.scope)
    policy.meta = dict(policy.meta, calibration=dict(data.summary))
    policy = _with_scales(policy, args, source, data)
    report = f"uniform policy {policy.name}: {format_amount(policy_cost(source, policy, kind))} {kind}"
    return policy, report


def _lampq_config(args, kind):
    from .lampq import LampQConfig

    return LampQConfig(w_bits=tuple(args.w_bits or (4, 8)), a_bits=tuple(args.a_bits or (8,)), scope=args.scope,
                       cost=kind, rounds=args.rounds, initial=args.initial, type_aware=not args.no_type_aware,
                       show_progress=not args.no_progress)


def _lampq(args, source, data, kind, budget):
    from .lampq import calibrate_lampq

    if budget is None:
        raise ValueError("lampq needs a budget: --budget-bops X or --budget-bytes X")
    res = calibrate_lampq(source, data, budget, _lampq_config(args, kind))
    return _with_scales(res.policy, args, source, data), res.report()


def _naive(args, source, data, kind, budget):
    from .naive import calibrate_naive

    if budget is None:
        raise ValueError("naive needs a budget: --budget-bops X or --budget-bytes X")
    policy, alloc = calibrate_naive(source, budget, _lampq_config(args, kind))
    policy.meta = dict(policy.meta, calibration=dict(data.summary))
    lines = [f"{n:22s} w{w}a{a}" for n, (w, a) in alloc.items()] + [f"cost {format_amount(policy.meta['cost'])} {kind}"]
    return _with_scales(policy, args, source, data), "\n".join(lines)


def _scalepredictor(args, source, data, kind, budget):
    from ..policy import Policy
    from .scalepredictor import calibrate_scalepredictor
    from .static import static_policy
    from .uniform import uniform_policy

    if budget is not None:
        raise ValueError("scalepredictor changes no bits, so a budget does not apply; "
                         "pass a policy from lampq/uniform as --base")
    if args.base:
        base = Policy.load(args.base)
    else:
        a = _one(args.a_bits, 8, "--a-bits")
        base = static_policy(source, data, uniform_policy(8, a, scope=args.scope), "percentile", args.percentile,
                             name=f"w8a{a}-percentile", show_progress=not args.no_progress)
    res = calibrate_scalepredictor(source, data, base, args.block, args.chunk, tuple(range(1, args.max_degree + 1)),
                                   args.holdout, show_progress=not args.no_progress)
    return res.policy, res.report()


def cmd_calibrate(args) -> int:
    """The ``calibrate`` handler: build the source and data, run the method, save the policy."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from .common import calibration_data, policy_cost, reference_source

    source = reference_source(args.checkpoint)
    kind, budget = _budget(args, source)
    data = calibration_data(args.images, args.seed, source.preprocess["mean"], source.preprocess["std"])
    run = {"uniform": _uniform, "lampq": _lampq, "naive": _naive, "scalepredictor": _scalepredictor}[args.method]
    policy, report = run(args, source, data, kind, budget)
    policy.save(args.out)
    if args.report:
        print(report)
    print(f"wrote {args.out}: policy {policy.name!r}, {format_amount(policy_cost(source, policy, 'bops'))} BOPs per image, "
          f"{format_amount(policy_cost(source, policy, 'bytes'))} bytes")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Stand-alone entry (``python -m pyruntime.calibrate.cli calibrate ...``): ``pyruntime``'s
    own CLI, so parsing and error handling are the same."""
    from ..cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
