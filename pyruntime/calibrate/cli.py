"""``pyruntime calibrate``: write a policy fitted on calibration images.

    pyruntime calibrate --method lampq --budget-bops 0.75x --out lampq.json --report
    pyruntime calibrate --method uniform --w-bits 8 --a-bits 4 --scale percentile --out w8a4.json
    pyruntime calibrate --method scalepredictor --base w8a4.json --out w8a4-pred.json --report
    pyruntime calibrate --method maqee --budget-bops 0.5x --max-drop 0.5 --out maqee.json --report
    pyruntime calibrate --method maqee --budget-latency 0.6x --latency-table T.json --out maqee-lat.json
    pyruntime calibrate --method quee --reduced w4a8 --every 3 --lam 0.5 --out quee.json --report
    pyruntime calibrate --method lampq --budget-bops 0.5x --attention 8 --out lampq-attn8.json
    pyruntime calibrate --method lampq --budget-bops 0.6x --qat-steps 100 --qat-checkpoint qat.safetensors --out q.json
    pyruntime calibrate --method maqee --model vit_small_patch16_224 --checkpoint my.safetensors \
        --exits heads.safetensors --data my_images/ --budget-bops 0.5x --max-drop 1 --out p.json --report
    pyruntime calibrate --method quee --model deit_tiny_patch16_224 --checkpoint c.pth --exits heads.safetensors \
        --data val.npz --images 2000 --max-drop 1 --out quee.json --report --report-json routes.json

Methods: ``uniform`` (one bit-width everywhere; with a budget, the most expensive uniform
setting that fits), ``lampq`` (type-aware Fisher sensitivity + ILP; with
``--qat-steps``, a short quantisation-aware training at each round's bits whose weights go to
``--qat-checkpoint``), ``naive`` (bits by
weight range, same ILP: LampQ's baseline), ``scalepredictor`` (per-image activation scales
predicted from a shallow block's range statistic), ``maqee`` (exit thresholds and per-layer
bits chosen together under an *expected* cost per image; its risk -- the share of images fp32
at full depth gets right and the policy gets wrong, which bounds the top-1 drop -- certified
at most ``--max-drop`` points with probability >= 1 - ``--delta`` by Learn-then-Test on the
validation images; ``--sensitivity final`` is the final-head-only ablation), ``quee`` (QuEE
gates after every ``--every``-th block that send each image to exit, continue at ``--base``
precision or continue at ``--reduced`` precision; ``--lam`` trades predicted error for BOPs). ``--scale minmax|percentile|mse`` turns
the result's activation scales static (calibrated; uniform/lampq/naive; ``mse``: the min-max range
times the clip ratio of least quantisation error on the calibration images). A budget is a
number (whole-model BOPs per image, model-file bytes, or, for maqee, seconds per image from
``--latency-table``, as written by ``pyruntime bench MODEL --profile --latency-table T.json``)
or ``<f>x``, a multiple of the W8A8 policy's cost at full depth (with the run's attention
precision). For maqee the budget is the expected cost per image with its exits; for quee
(``--budget-bops`` only) the mean BOPs per image on the validation images. ``--attention 8``
runs every block's attention matmuls (q.k^T, attn.v) on int8 operands: measured so while
calibrating, written into the policy, costed at 8 x 8 BOPs.

Model: ``--model`` names a timm ViT that ``pyruntime convert`` accepts (``--model-kwargs``
JSON for ``timm.create_model``, weights from ``--checkpoint`` or, asked for,
``--random-weights``); omitted (or ``reference``) it is the shipped reference ViT, or
``--checkpoint`` in its format. Exit heads (maqee, quee) come from ``--exits`` (a safetensors
file of ``exits.<b>.norm.weight|norm.bias|fc.weight|fc.bias``, as ``pyruntime exits fit``
writes) or from the checkpoint's ``exits.*`` keys.

Data: ``--data`` is an image folder (one sub-folder per class, classes sorted by name) or an
``.npz`` with ``images`` (uint8 [N, H, W, C]) and ``labels``, prepared with timm's eval
transform exactly as the converted file records it, so calibration sees what inference sees;
``--images N`` takes N of them drawn by ``--seed`` (default: all). Without ``--data`` the
reference model calibrates on 1,024 Fashion-MNIST training images (``--images``).

When to use which (measured on the Fashion-MNIST reference; README "What the four methods
are worth here"): start with uniform (W8A8 with per-image scales ties fp32 on ViTs without
heavy activation outliers, and W4A8 tied it there too; w8a8-attn8 ties and cuts attention's
cost). lampq when the budget forces some layers below 8-bit activations (find where uniform
breaks on your validation images): there it kept +0.23 pt over uniform W4A6, not significant;
elsewhere it tied. --qat-steps helped uniform as much as lampq. scalepredictor for 4-bit
activations: it beat plain dynamic scales by 1.4 pt at W8A4 but only tied a static percentile
clip chosen on validation, so compare with --scale percentile; at 6 bits it gained nothing.
maqee for exits and bits with a certified risk (--max-drop, --delta) on a few hundred images
the model was not trained on, drawn like the deployment's; keep its BSR filter (--bsr-max):
without it, risks certified on training-split images were exceeded on the test split in 3 of
6 cases, and it found W4A8 + exits, no better than PTQ + exits. quee is a research baseline:
a confidence threshold over the same exits beat it at every operating point there.

Fit and validation: maqee and quee (with ``--max-drop``/``--budget-bops``) split the images
by ``--seed`` into a fit part and a validation part (``--holdout``, default a quarter; both
sizes are reported and recorded); the operating point -- maqee's exit thresholds, quee's
lambda -- is chosen on the validation part alone (the policy's meta says ``chosen_on:
validation``). On the reference model without ``--data`` both use images it was not trained
on: quee fits its gates on all the calibration images (training images 50000..54999) and
chooses lambda on ``--holdout`` times as many drawn from the validation images (55000..59999);
maqee fits on 50000..54999 and validates on 55000..59999 (``--images`` split by ``--holdout``
between the two parts). quee's ``--max-drop`` picks the cheapest lambda within that many top-1 points
of fp32 at full depth, ``--budget-bops`` the most accurate within that mean BOPs per image;
``--lam`` sets lambda by hand instead (gates then fitted on all images). ``--report`` adds
which validation images went where (per exit / gate: count, share, top-1);
``--report-json`` writes one row per validation image (index = its position in the data,
after ``--images``; label, prediction, correct, exit block, path F/R per block).

Memory: the images are kept as uint8 at the model's input size and normalised per batch, so
the data take N x C x H x W bytes (10,000 images at 3 x 224 x 224: 1.5 GB) plus the model
and the methods' work, which grows with N only by a few floats per image, class and exit
(collected logits and scores). Measured (maqee, a 4-block width-192 ViT at
3 x 96 x 96, an .npz): peak RSS 1.17 GB with 500 images, 1.32 GB with 2,000, 1.47 GB with
8,000 -- about 40 KB more per image (an image is 27.6 KB as uint8; one float32 copy of the set
would add 110 KB per image). Reading an .npz briefly holds up to three uint8 copies (the
file's array, the drawn subset, a hashing copy) before the method starts. Extrapolated: 10,000
images at 3 x 224 x 224 hold 1.5 GB, up to 4.5 GB while an .npz is read, plus the model's and
method's own (1.1 GB for the model above; more for wider models, whose Fisher gradients are
per image in batches of 64).
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import List, Optional

from ..cli import (check_reference_checkpoint, check_state_dict_file, fraction, input_file, non_negative_float,
                   non_negative_int, output_file, percentile, policy_spec, positive_int, thread_count)
from ..errors import require_extra
from ..exits import add_model_arguments
from .ilp import format_amount
from .static import STATIC_METHODS

__all__ = ["add_parser", "cmd_calibrate", "main"]

METHODS = ("uniform", "lampq", "naive", "scalepredictor", "maqee", "quee")
STATIC_SCALE_METHODS = ("uniform", "lampq", "naive")  # whose result --scale may turn static


def _bits(text: str) -> List[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _attention(text: str) -> int:
    """``--attention``: 32 or 8."""
    from ..policy import check_attn_bits

    try:
        return check_attn_bits(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 32 (fp32 attention) or 8 (int8 attention), got {text!r}") from None


def _precision(text: str):
    """``w4a8`` -> LayerPolicy(4, 8) (``w4`` alone: a8)."""
    import re

    from ..policy import LayerPolicy, PolicyError

    m = re.fullmatch(r"w(\d+)(?:a(\d+))?", text.strip().lower())
    if not m:
        raise argparse.ArgumentTypeError(f"expected a precision like w4a8, got {text!r}")
    try:
        return LayerPolicy(int(m.group(1)), int(m.group(2) or 8))
    except PolicyError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``calibrate`` on an ``argparse`` sub-parser collection."""
    c = subparsers.add_parser("calibrate", help="fit a policy (bits, activation scales) on calibration images",
                              description=__doc__.split("\n\n")[0],
                              epilog="\n\n".join(p for p in __doc__.split("\n\n")
                                                 if p.startswith(("When to use", "Model:", "Data:", "Fit and", "Memory:"))),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--method", choices=METHODS, required=True)
    c.add_argument("--out", type=output_file, required=True, help="policy JSON to write")
    c.add_argument("--report", action="store_true",
                   help="print each layer's sensitivity / fit and chosen setting (maqee: the rounds, thresholds and "
                        "validation check; quee: the gates and lambda); maqee/quee: which validation images exited "
                        "where / took full or reduced paths, with their top-1")
    c.add_argument("--report-json", type=output_file, default=None,
                   help="maqee/quee: write per-image rows (index, label, prediction, correct, exit_block, path) of the "
                        "validation images (quee with --lam: of all calibration images) to this JSON file")
    budget = c.add_mutually_exclusive_group()
    budget.add_argument("--budget-bops", help="whole-model BOPs per image, or <f>x of W8A8's (maqee: expected per image)")
    budget.add_argument("--budget-bytes", help="model-file tensor bytes, or <f>x of W8A8's (not maqee)")
    budget.add_argument("--budget-latency", help="maqee: expected seconds per image from --latency-table, or <f>x of "
                                                 "W8A8's full-depth latency there")
    c.add_argument("--latency-table", type=input_file, help="maqee: latency table JSON for --budget-latency "
                                           "(pyruntime bench MODEL --profile --latency-table T.json)")
    c.add_argument("--model", default=None,
                   help="timm model name (anything pyruntime convert takes); default / 'reference': the reference ViT")
    add_model_arguments(c)  # --checkpoint, --model-kwargs, --random-weights: as exits fit and convert take them
    c.add_argument("--exits", type=input_file, help="exit heads (safetensors, exits.<b>.*) for maqee/quee; default: the "
                                                    "checkpoint's exits.* keys")
    c.add_argument("--data", help="calibration images: a folder with one sub-folder per class, or an .npz with "
                                  "'images' and 'labels' (default, reference model only: Fashion-MNIST training images)")
    c.add_argument("--images", type=positive_int, default=None,
                   help="calibration images drawn by --seed (default: all of --data; 1024 Fashion-MNIST images)")
    c.add_argument("--seed", type=non_negative_int, default=0, help="which images calibrate (maqee/quee: also the "
                                                       "fit/validation split; quee: also k-means and gate training)")
    c.add_argument("--w-bits", type=_bits, default=None,
                   help="weight bits: candidates for lampq/naive/maqee (default 4,8); uniform: one value (default 8)")
    c.add_argument("--a-bits", type=_bits, default=None,
                   help="activation bits: candidates for lampq/naive (default 8) and maqee (default 8); "
                        "uniform/scalepredictor: one value (default 8)")
    c.add_argument("--scope", choices=("blocks", "all"), default="blocks",
                   help="blocks: qkv/proj/fc1/fc2 (embedding and head stay fp32); all: every linear layer")
    c.add_argument("--scale", choices=("dynamic",) + STATIC_METHODS, default="dynamic",
                   help="activation scales of the result (uniform/lampq/naive): dynamic (per image, default), or static "
                        "and calibrated: minmax, percentile (--percentile), mse (the min-max range times the clip "
                        "ratio of least quantisation error)")
    c.add_argument("--percentile", type=percentile, default=99.99)
    c.add_argument("--rounds", type=non_negative_int, default=None,
                   help="lampq: refinement rounds (default 3); maqee: bit re-allocations at most (default 6)")
    c.add_argument("--initial", choices=("measured", "model"), default="measured",
                   help="lampq: first-round layer error measured, or the Delta^2/12 model")
    c.add_argument("--type-weighting", choices=("mean1", "fisher", "none"), default="mean1",
                   help="lampq: per-type factor alpha_t of the Fisher sensitivity: mean1 (each type's mean 1, default), "
                        "fisher (types on the loss scale: 1/2 mean(W^2) of the type), none (alpha_t = 1, ablation)")
    c.add_argument("--qat-steps", type=non_negative_int, default=0,
                   help="lampq: quantisation-aware training steps (straight-through, distillation from the fp32 model "
                        "on the calibration images) at each round's bits; 0 (default): bits only. Needs --qat-checkpoint")
    c.add_argument("--qat-lr", type=non_negative_float, default=1e-4, help="lampq: Adam learning rate of the QAT steps")
    c.add_argument("--qat-checkpoint", type=output_file, default=None,
                   help="lampq with --qat-steps: safetensors file for the trained weights (the original checkpoint's "
                        "format); convert it with the policy: pyruntime convert ... --checkpoint THIS --policy OUT")
    c.add_argument("--base", type=policy_spec, help="scalepredictor: policy JSON whose scales to predict (default: W8 with --a-bits, "
                                  "static percentile scales); quee: full-precision policy, shorthand (w8a8, w4a8) "
                                  "or policy JSON without exits (default w8a8)")
    c.add_argument("--block", type=non_negative_int, default=0, help="scalepredictor: block whose output gives the statistic")
    c.add_argument("--chunk", type=positive_int, default=64, help="scalepredictor: values per chunk of the statistic")
    c.add_argument("--max-degree", type=int, default=3, choices=(1, 2, 3), help="scalepredictor: highest degree tried")
    c.add_argument("--ste-steps", type=non_negative_int, default=0,
                   help="scalepredictor: straight-through refinement of the polynomials, Adam steps on the calibration "
                        "images with a distillation loss against the fp32 model (0: closed-form fit only)")
    c.add_argument("--holdout", type=fraction, default=None,
                   help="held-out fraction: scalepredictor's for the degree; maqee/quee: the validation part that "
                        "chooses the operating point (default 0.25)")
    c.add_argument("--max-drop", type=float, default=None,
                   help="top-1 percentage points the policy may lose against fp32 at full depth: maqee (default 1): "
                        "the risk (images fp32 gets right and the policy wrong) certified on the validation images; "
                        "quee: choose the cheapest lambda within it on the validation images")
    c.add_argument("--delta", type=float, default=None,
                   help="maqee: the probability that its risk certificate fails (Learn-then-Test, exact binomial)")
    c.add_argument("--sensitivity", choices=("exits", "final"), default=None,
                   help="maqee: layer sensitivity from the reach-weighted exit-head losses (exits) or the final head's "
                        "alone (final, the ablation)")
    c.add_argument("--exit-rule", choices=("confidence", "margin"), default="confidence", help="maqee: exit rule")
    c.add_argument("--exit-blocks", type=_bits, default=None,
                   help="maqee: blocks with exit heads (default every block but the last); quee: gate blocks "
                        "(default from --every)")
    c.add_argument("--bsr-max", type=non_negative_float, default=0.25,
                   help="maqee: at-risk exit decisions per image (boundary sensitivity risk) at most")
    c.add_argument("--lam", type=non_negative_float, default=None,
                   help="quee: lambda set by hand, predicted error traded per unit of cost (default 0 unless "
                        "--max-drop/--budget-bops choose it)")
    c.add_argument("--reduced", type=_precision, default=None,
                   help="quee: precision of the reduced path, e.g. w4a8 (default) or w4a6")
    c.add_argument("--every", type=positive_int, default=3, help="quee: a gate after every N-th block (default 3)")
    c.add_argument("--targets", choices=("segment", "static", "path"), default=None,
                   help="quee: where the gates' error targets are measured -- segment (default: each gate on the "
                        "full-precision trajectory), static, or path (gates trained in order on the trajectories "
                        "images take under the gates already trained; up to 2^gates calibration runs)")
    c.add_argument("--attention", type=_attention, default=None, metavar="{32,8}",
                   help="bits of the attention matmuls' operands (q.k^T, attn.v) in the result: 32 fp32 (default), "
                        "8 int8 -- emulated while calibrating, written into the policy, counted at 8x8 BOPs in costs "
                        "and budgets. scalepredictor/quee: default the --base policy's; an int8-attention base "
                        "and --attention 32 conflict")
    c.add_argument("--threads", type=thread_count, help="torch threads (maqee/quee: also the runtime's)")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(func=cmd_calibrate)
    return c


# --- pieces of the command ----------------------------------------------------------------------------

def _budget_text(args):
    """(the budget option's text, its kind), or (None, "bops") without one."""
    for text, kind in ((args.budget_bops, "bops"), (args.budget_bytes, "bytes"), (args.budget_latency, "latency")):
        if text is not None:
            return text, kind
    return None, "bops"


def _budget_number(text: str):
    """(value, is a multiple of W8A8's cost) of a budget ``X`` or ``<f>x``; positive, finite."""
    t = text.strip().lower()
    try:
        value = float(t[:-1] if t.endswith("x") else t)
    except ValueError:
        raise ValueError(f"budget must be a number or <f>x, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"budget must be positive and finite, got {text!r}")
    return value, t.endswith("x")


def _budget(args, source, table=None):
    """(kind, budget) from --budget-bops/--budget-bytes/--budget-latency, or (kind, None)."""
    from .common import policy_cost
    from .uniform import uniform_policy

    text, kind = _budget_text(args)
    if text is None:
        return kind, None
    value, multiple = _budget_number(text)
    if multiple:
        w8a8 = uniform_policy(8, 8, scope=args.scope, attn_bits=_attention_bits(args))
        return kind, value * policy_cost(source, w8a8, kind, table if kind == "latency" else None)
    return kind, value


def _is_reference(args) -> bool:
    return args.model is None or args.model == "reference"


def _check_options(args) -> None:
    """Combinations that make no sense, as one-line errors before anything is loaded."""
    from .common import REFERENCE_PARTS

    if _is_reference(args):
        for flag, value in (("--model-kwargs", args.model_kwargs), ("--random-weights", args.random_weights)):
            if value:
                raise ValueError(f"{flag} applies to a timm --model, not to the reference model")
        lo, hi = REFERENCE_PARTS["calibration"]
        if args.data is None and args.images is not None and args.images > hi - lo:
            raise ValueError(f"--images: the reference model's calibration images are Fashion-MNIST training images "
                             f"{lo}..{hi - 1} (held out of its training), at most {hi - lo}, got {args.images}")
    else:
        if args.data is None:
            raise ValueError(f"--model {args.model} needs --data (an image folder or .npz of your labelled images); "
                             f"Fashion-MNIST calibrates the reference model only")
        if args.checkpoint is None and not args.random_weights:
            raise ValueError(f"--model {args.model} needs --checkpoint (its state dict), or --random-weights for "
                             f"timm's random initialisation")
        if args.checkpoint is not None and args.random_weights:
            raise ValueError("--checkpoint and --random-weights exclude each other")
    if args.exits is not None and args.method not in ("maqee", "quee"):
        raise ValueError(f"--exits applies to maqee and quee, not {args.method}")
    if args.report_json is not None and args.method not in ("maqee", "quee"):
        raise ValueError(f"--report-json applies to maqee and quee, not {args.method}")
    text, _ = _budget_text(args)
    if text is not None:
        _budget_number(text)
    if args.max_drop is not None and not 0 <= args.max_drop < 100:
        raise ValueError(f"--max-drop is in percentage points, 0 <= drop < 100, got {args.max_drop}")
    if args.max_drop is not None and args.method not in ("maqee", "quee"):
        raise ValueError(f"--max-drop applies to maqee and quee, not {args.method}")
    if (args.delta is not None or args.sensitivity is not None) and args.method != "maqee":
        raise ValueError(f"--delta and --sensitivity apply to --method maqee only, not {args.method}")
    if args.method == "maqee" and args.delta is not None and not 0 < args.delta < 1:
        raise ValueError(f"--delta must lie in (0, 1), got {args.delta}")
    if args.method == "maqee" and args.max_drop is not None and not 0 < args.max_drop < 100:
        raise ValueError(f"--max-drop for maqee is a risk in percentage points, in (0, 100), got {args.max_drop}")
    if args.budget_latency is not None and args.method != "maqee":
        raise ValueError("--budget-latency applies to --method maqee only")
    if args.budget_latency is not None and not args.latency_table:
        raise ValueError("--budget-latency needs --latency-table T.json "
                         "(written by pyruntime bench MODEL --profile --latency-table T.json)")
    if args.latency_table and args.budget_latency is None:
        raise ValueError("--latency-table is used with --budget-latency only")
    if args.method not in STATIC_SCALE_METHODS and args.scale != "dynamic":
        raise ValueError(f"--scale {args.scale} applies to {'/'.join(STATIC_SCALE_METHODS)}, not {args.method}")
    if args.method != "scalepredictor" and args.ste_steps:
        raise ValueError(f"--ste-steps applies to scalepredictor, not {args.method}")
    if args.method == "maqee":
        if args.budget_bytes is not None:
            raise ValueError("maqee budgets the expected cost per image (--budget-bops or --budget-latency); "
                             "model-file bytes do not shrink when images exit early, so --budget-bytes does not apply")
        if args.budget_bops is None and args.budget_latency is None:
            raise ValueError("maqee needs a budget: --budget-bops X or --budget-latency X --latency-table T.json")
    if args.method == "quee":
        if args.budget_bytes is not None or args.budget_latency is not None:
            raise ValueError("quee's budget is the mean BOPs per image on the validation images: --budget-bops X "
                             "(or <f>x of W8A8's)")
        if args.lam is not None and (args.max_drop is not None or args.budget_bops is not None):
            raise ValueError("quee: --lam sets lambda by hand; --max-drop / --budget-bops choose it on the validation "
                             "images -- pass one or the other")
    else:
        for flag, value in (("--lam", args.lam), ("--targets", args.targets)):
            if value is not None:
                raise ValueError(f"{flag} applies to quee, not {args.method}")


def _attention_bits(args) -> int:
    """--attention for methods without a base policy (absent: 32)."""
    return 32 if args.attention is None else args.attention


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
        policy = uniform_under_budget(source, budget, kind, args.scope, attention=_attention_bits(args))
    else:
        w, a = _one(args.w_bits, 8, "--w-bits"), _one(args.a_bits, 8, "--a-bits")
        policy = uniform_policy(w, a, scope=args.scope, attn_bits=_attention_bits(args))
    policy.meta = dict(policy.meta, calibration=dict(data.summary))
    policy = _with_scales(policy, args, source, data)
    report = f"uniform policy {policy.name}: {format_amount(policy_cost(source, policy, kind))} {kind}"
    return policy, report


def _lampq_config(args, kind):
    from .lampq import LampQConfig

    if args.method != "lampq" and (args.qat_steps or args.qat_checkpoint is not None or args.type_weighting != "mean1"):
        raise ValueError(f"--qat-steps, --qat-checkpoint and --type-weighting apply to lampq, not {args.method}")
    if bool(args.qat_steps) != (args.qat_checkpoint is not None):
        raise ValueError("lampq: --qat-steps N (N > 0) and --qat-checkpoint PATH go together: QAT changes the "
                         "weights, and the policy alone cannot carry them")
    return LampQConfig(w_bits=tuple(args.w_bits or (4, 8)), a_bits=tuple(args.a_bits or (8,)), scope=args.scope,
                       cost=kind, rounds=3 if args.rounds is None else args.rounds, initial=args.initial,
                       type_weighting=args.type_weighting, qat_steps=args.qat_steps, qat_lr=args.qat_lr,
                       attention=_attention_bits(args), show_progress=not args.no_progress)


def _lampq(args, source, data, kind, budget):
    from .lampq import calibrate_lampq

    if budget is None:
        raise ValueError("lampq needs a budget: --budget-bops X or --budget-bytes X")
    res = calibrate_lampq(source, data, budget, _lampq_config(args, kind))
    report = res.report()
    if res.qat:
        from .lampq import save_checkpoint

        save_checkpoint(source, res.source.model, args.qat_checkpoint)
        report += f"\nQAT weights written to {args.qat_checkpoint} (convert them with this policy)"
    return _with_scales(res.policy, args, res.source, data), report


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
    from .scalepredictor import ScalePredictorConfig, calibrate_scalepredictor
    from .static import static_policy
    from .uniform import uniform_policy

    if budget is not None:
        raise ValueError("scalepredictor changes no bits, so a budget does not apply; "
                         "pass a policy from lampq/uniform as --base")
    if args.base:
        base = Policy.load(args.base)
    else:
        a = _one(args.a_bits, 8, "--a-bits")
        w8 = uniform_policy(8, a, scope=args.scope, attn_bits=_attention_bits(args))
        base = static_policy(source, data, w8, "percentile", args.percentile, name=f"{w8.name}-percentile",
                             show_progress=not args.no_progress)
    res = calibrate_scalepredictor(source, data, base, args.block, args.chunk, tuple(range(1, args.max_degree + 1)),
                                   0.25 if args.holdout is None else args.holdout,
                                   show_progress=not args.no_progress, attention=args.attention,
                                   config=ScalePredictorConfig(ste_steps=args.ste_steps))
    return res.policy, res.report()


def _maqee_validation(args, source, data):
    """(fit, validation) for maqee: on the reference model without --data, --images drawn from
    its calibration part split by --holdout against as many from its validation part; else
    None (calibrate_maqee splits --data itself)."""
    from .common import calibration_data

    if args.data is not None:
        return data, None
    holdout = 0.25 if args.holdout is None else args.holdout
    n_val = max(1, int(round(holdout * len(data))))
    if not 0 < n_val < len(data):
        raise ValueError(f"cannot hold out {holdout:.0%} of {len(data)} images")
    pre = source.preprocess
    return (calibration_data(len(data) - n_val, args.seed, pre["mean"], pre["std"]),
            calibration_data(n_val, args.seed, pre["mean"], pre["std"], part="validation"))


def _maqee(args, source, data, kind, budget, table=None):
    from .common import CostModel, heads_needed
    from .maqee import BudgetNotMet, MaqeeConfig, calibrate_maqee
    from .routes import route_rows

    cfg = MaqeeConfig(max_drop=(1.0 if args.max_drop is None else args.max_drop) / 100.0,
                      delta=0.05 if args.delta is None else args.delta,
                      rule=args.exit_rule, exit_blocks=args.exit_blocks, sensitivity=args.sensitivity or "exits",
                      bsr_max=args.bsr_max, w_bits=tuple(args.w_bits or (4, 8)), a_bits=tuple(args.a_bits or (8,)),
                      scope=args.scope, cost=kind, rounds=6 if args.rounds is None else args.rounds,
                      holdout=0.25 if args.holdout is None else args.holdout,
                      seed=args.seed, attention=_attention_bits(args), num_threads=args.threads,
                      show_progress=not args.no_progress)
    heads_needed(source, args.exit_blocks or list(range(source.depth - 1)), "maqee")
    costs = CostModel(source, kind, table=table)
    fit, validation = _maqee_validation(args, source, data)
    try:
        res = calibrate_maqee(source, fit, budget, cfg, validation=validation, costs=costs)
    except BudgetNotMet as e:
        raise ValueError(" ".join(str(e).split())) from None
    rows = route_rows(res.held_rows, res.held_exit_block, res.held_block_path, res.held_logits, res.held_labels)
    return res.policy, res.report(), rows


def _quee_search(args, source, data, reduced, kind, budget):
    """Gates fitted on the fit part, lambda chosen on the validation part: for the reference
    model the calibration images are the fit part and the validation part is a draw of
    ``--holdout`` times as many from its own validation images (training images the model
    never saw, disjoint from the calibration ones); for user data a ``--holdout`` split."""
    import numpy as np

    from .common import calibration_data
    from .quee import LambdaNotFound, choose_lambda, fit_quee

    holdout = 0.25 if args.holdout is None else args.holdout
    if args.data is None and _is_reference(args):
        fit_data, val_rows = data, np.arange(max(1, int(round(holdout * len(data)))))
        val = calibration_data(len(val_rows), args.seed, source.preprocess["mean"], source.preprocess["std"],
                               part="validation")
    else:
        fit_rows, val_rows = data.split_rows(holdout, args.seed)
        fit_data, val = data.take(fit_rows, "fit"), data.take(val_rows, "validation")
    fit = fit_quee(source, fit_data, base=args.base or "w8a8", reduced=reduced, gate_blocks=args.exit_blocks,
                   every=args.every, seed=args.seed, num_threads=args.threads, attention=args.attention,
                   targets=args.targets or "segment")
    try:
        search = choose_lambda(fit, source, val, None if args.max_drop is None else args.max_drop / 100.0, budget,
                               num_threads=args.threads)
    except LambdaNotFound as e:
        raise ValueError(" ".join(str(e).split())) from None
    meta = dict(chosen_on="validation", fit_images=len(fit_data), validation_images=len(val), split_seed=args.seed,
                validation_data=dict(val.summary),
                max_drop=None if args.max_drop is None else args.max_drop / 100.0, budget_bops=budget,
                lambda_search=search.summary())
    lines = [f"lambda {search.lam:g} chosen on the {len(val)} validation images (gates fitted on {len(fit_data)}): "
             f"top-1 {search.point.top1:.4f} against fp32 full depth {search.reference_top1:.4f} (drop "
             f"{100 * (search.reference_top1 - search.point.top1):.2f} points), mean "
             f"{format_amount(search.point.mean_bops)} BOPs per image",
             "candidates: lambda top-1 mean-BOPs"]
    lines += [f"  {c.lam:10.4g} {c.top1:.4f} {format_amount(c.mean_bops)}" for c in search.curve]
    return fit, search.lam, val, val_rows, lines, meta


def _quee(args, source, data, kind, budget):
    import numpy as np

    from ..policy import LayerPolicy
    from .common import heads_needed
    from .quee import default_gate_blocks, fit_quee
    from .routes import route_lines, route_rows

    reduced = args.reduced or LayerPolicy(4, 8)
    heads_needed(source, args.exit_blocks or default_gate_blocks(source.depth, args.every), "quee")
    if args.max_drop is not None or budget is not None:
        fit, lam, part, rows, search_lines, meta = _quee_search(args, source, data, reduced, kind, budget)
        where = f"{len(part)} validation images"
    else:
        lam = 0.0 if args.lam is None else args.lam
        fit = fit_quee(source, data, base=args.base or "w8a8", reduced=reduced, gate_blocks=args.exit_blocks,
                       every=args.every, seed=args.seed, num_threads=args.threads, attention=args.attention,
                       targets=args.targets or "segment")
        part, rows, search_lines, meta = data, np.arange(len(data)), [], {}
        where = f"{len(data)} calibration images (lambda set by hand; the gates were fitted on them too)"
    policy = fit.policy(lam)
    policy.meta.update(meta)
    r = fit.run(part.images, lam, num_threads=args.threads)
    labels = np.asarray(part.labels)
    top1 = float((r["logits"].argmax(-1) == labels).mean())
    hist = np.bincount(r["exit_block"], minlength=source.depth)
    red = reduced.to_dict()
    lines = [f"quee: base {fit.base.name}, reduced w{red['w_bits']}a{red['a_bits']}, gates after blocks "
             f"{fit.gate_blocks}; costs are fractions of fp32's {format_amount(fit.fp32_bops)} BOPs",
             "gate  cost (exit, full, reduced)   path error (exit, full, reduced)  clusters     bce  fit MAE"]
    for g in fit.meta["gates"]:
        lines.append(f"{g['block']:4d}  {', '.join(f'{c:.4f}' for c in g['cost']):27s} "
                     f"{', '.join(f'{e:.4f}' for e in g['path_error']):33s} {g['clusters']:8d} {g['bce']:7.4f} "
                     f"{g['fit_mae']:8.4f}")
    lines += search_lines
    lines.append(f"lambda {lam:g}: on the {where} top-1 {top1:.4f} (base, no gates "
                 f"{fit.meta['full_top1']:.4f} on the fit images), mean {format_amount(float(r['bops'].mean()))} BOPs "
                 f"per image; exits " + " ".join(f"b{b}:{n}" for b, n in enumerate(hist) if n))
    lines += route_lines(r["exit_block"], r["block_path"], r["logits"], labels, fit.gate_blocks, gates=True)
    return policy, "\n".join(lines), route_rows(rows, r["exit_block"], r["block_path"], r["logits"], labels)


def _source_and_data(args):
    """The model being calibrated and its calibration images (module docstring)."""
    from .common import DEFAULT_CALIBRATION_IMAGES, calibration_data, reference_source, timm_source, user_calibration_data

    if _is_reference(args):
        source = reference_source(args.checkpoint)
        if args.exits is not None:
            source.exits = args.exits
    else:
        source = timm_source(args.model, args.model_kwargs, args.checkpoint, args.random_weights, args.exits)
    if args.data is None:
        n = DEFAULT_CALIBRATION_IMAGES if args.images is None else args.images
        return source, calibration_data(n, args.seed, source.preprocess["mean"], source.preprocess["std"])
    return source, user_calibration_data(args.data, source, args.images, args.seed)


def _write_rows(path, rows, policy) -> None:
    import json

    from .._atomic import atomic_write_bytes

    doc = {"policy": policy.name, "chosen_on": policy.meta.get("chosen_on", "hand-set lambda"), "images": rows}
    atomic_write_bytes(path, (json.dumps(doc, indent=1) + "\n").encode())


def cmd_calibrate(args) -> int:
    """The ``calibrate`` handler: build the source and data, run the method, save the policy."""
    _check_options(args)
    if _is_reference(args):
        check_reference_checkpoint(args.checkpoint)
    else:
        check_state_dict_file(args.checkpoint)
    require_extra("calibrate", "pyruntime calibrate")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from .common import COST_UNITS, policy_cost

    table = None
    if args.latency_table:
        from ..latency import LatencyTable

        table = LatencyTable.load(args.latency_table)
    source, data = _source_and_data(args)
    for note in source.notes:
        print(f"note: {note}")
    kind, budget = _budget(args, source, table)
    rows = None
    if args.method == "maqee":
        policy, report, rows = _maqee(args, source, data, kind, budget, table)
    elif args.method == "quee":
        policy, report, rows = _quee(args, source, data, kind, budget)
    else:
        run = {"uniform": _uniform, "lampq": _lampq, "naive": _naive, "scalepredictor": _scalepredictor}[args.method]
        policy, report = run(args, source, data, kind, budget)
    policy.save(args.out)
    if args.report_json is not None:
        _write_rows(args.report_json, rows, policy)
    if args.report:
        print(report)
    line = (f"wrote {args.out}: policy {policy.name!r}, {format_amount(policy_cost(source, policy, 'bops'))} BOPs "
            f"per image")
    if policy.exits:
        line += " at full depth, every exit head (and gate) evaluated"
    if policy.gates is not None:
        line += f"; gates after blocks {policy.gate_blocks()} at lambda {policy.gates.lam:g}"
    if policy.attn_bits != 32:
        line += f"; int{policy.attn_bits} attention"
    if "expected_cost_validation" in policy.meta:
        unit = COST_UNITS[policy.meta["cost_kind"]]
        line += (f"; expected {format_amount(policy.meta['expected_cost_validation'])} {unit} per image on the "
                 f"{policy.meta['validation_images']} validation images (budget {format_amount(policy.meta['budget'])}; "
                 f"fit on {policy.meta['fit_images']})")
    elif policy.meta.get("chosen_on") == "validation":
        line += (f"; lambda chosen on the {policy.meta['validation_images']} validation images (gates fitted on "
                 f"{policy.meta['fit_images']})")
    if args.report_json is not None:
        line += f"; per-image routes in {args.report_json}"
    print(line + f"; {format_amount(policy_cost(source, policy, 'bytes'))} bytes")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Stand-alone entry (``python -m pyruntime.calibrate.cli calibrate ...``): ``pyruntime``'s
    own CLI, so parsing and error handling are the same."""
    from ..cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
