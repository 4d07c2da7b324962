"""``pyruntime eval``: a model file measured on the user's own labelled images.

    pyruntime eval model.pyrt --data images/ --json eval.json
    pyruntime eval model.pyrt --data val.npz --batch 1 --threads 4 --images 2000

The data is an image folder (one sub-folder per class, classes sorted by name) or an ``.npz``
holding ``images`` and ``labels`` (:func:`pyruntime.imagedata.read_dataset`), prepared with
the model file's own preprocessing (timm's eval transform), so the numbers are those the
model gives in deployment. :func:`evaluate` returns, and ``--json`` writes:

* ``top1`` -- the fraction of images whose prediction (from the head that answered) is the
  label; ``top1_ci95`` its 95% Wilson score interval (the images are a sample);
* ``mean_exit_block`` -- the mean block after which the answering head sits (``depth - 1``
  for the final head); ``exit_histogram`` and ``top1_per_exit`` per answering block;
* ``bops_per_image`` -- the mean of the executor's per-image BOPs (``RunResult.bops``);
  ``bops_ratio`` -- that over the same backbone's fp32 full-depth BOPs (every linear at
  32 x 32, fp32 attention, no exit heads, no gates), ``fp32_full_depth_bops``;
* ``ms_per_image`` -- wall time of :meth:`pyruntime.Model.run` per image: the sum, over
  every batch of the evaluation pass, of the time of the ``run`` call alone (on batches
  already decoded, resized and normalised, so reading the data is excluded), divided by the
  number of images; one untimed warm-up run of the first batch comes first (thread start-up
  and first-touch allocations). With exits the time depends on which images leave early,
  which is why the whole pass is timed rather than a few repeats of one batch.
  ``batch_size``, ``threads`` and ``isa`` say under what it was measured;
* ``images`` -- how many images were evaluated.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np

from . import _core, bops
from .imagedata import DataError, LabelledImages, read_dataset
from .latency import uniform_graph
from .runtime import Model, load

__all__ = ["evaluate", "wilson_interval", "fp32_full_depth_bops", "add_parser", "cmd_eval", "DEFAULT_BATCH"]

PathLike = Union[str, "os.PathLike[str]"]
DEFAULT_BATCH = 32
Z95 = 1.959963984540054  # the standard normal's 97.5th percentile


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple:
    """Wilson score interval of a binomial proportion: unlike the normal approximation it
    stays inside [0, 1] and is sensible at 0 or n successes, which small user sets hit."""
    if n < 1:
        raise ValueError("an interval needs at least one image")
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def fp32_full_depth_bops(model_or_graph) -> int:
    """BOPs of one image through ``model``'s backbone at fp32 and full depth: every linear at
    32 x 32 bits, fp32 attention, no exit heads and no gates -- the denominator of
    ``bops_ratio``, the same for every policy of one backbone."""
    graph = model_or_graph.graph if isinstance(model_or_graph, Model) else model_or_graph
    return bops.static(uniform_graph(graph["arch"], 32))


def _model(model: Union[Model, PathLike], num_threads: Optional[int]) -> Model:
    return model if isinstance(model, Model) else load(model, num_threads=num_threads)


def _data(model: Model, data: Union[LabelledImages, PathLike], limit: Optional[int], seed: int) -> LabelledImages:
    """``data`` prepared for ``model``; labels checked against the model's classes."""
    pre, classes = model.preprocessing, int(model.arch["num_classes"])
    if not isinstance(data, LabelledImages):
        return read_dataset(data, pre, num_classes=classes, limit=limit, seed=seed)
    if data.preprocess != pre:  # other pixels than the model would see in deployment
        raise DataError(f"the images were prepared with {data.preprocess.to_dict()}, the model expects "
                        f"{pre.to_dict()}: read them with the model's preprocessing")
    if len(data) == 0:
        raise DataError("no images")
    if data.labels.min() < 0 or data.labels.max() >= classes:
        raise DataError(f"labels must lie in [0, {classes}) for this model's {classes} classes; they span "
                        f"[{data.labels.min()}, {data.labels.max()}]")
    if limit is not None and limit < len(data):
        if limit < 1:
            raise DataError(f"a limit of {limit} images leaves none")
        data = data.subset(np.sort(np.random.default_rng(seed).choice(len(data), limit, replace=False)), "limit")
    return data


def _threads_used(model: Model, num_threads: Optional[int]) -> int:
    """The thread count Model.run runs with: the call's, else the model's, else the pool's
    default (the physical cores)."""
    t = num_threads if num_threads is not None else model.num_threads
    return int(t) if t is not None else int(_core.physical_cores())


def evaluate(model: Union[Model, PathLike], data: Union[LabelledImages, PathLike], *,
             num_threads: Optional[int] = None, batch_size: int = DEFAULT_BATCH, limit: Optional[int] = None,
             seed: int = 0, show_progress: bool = False) -> Dict[str, object]:
    """Top-1, exits, BOPs and time per image of ``model`` (a model file or a loaded
    :class:`pyruntime.Model`) on ``data`` (an image folder, an ``.npz`` or
    :class:`pyruntime.imagedata.LabelledImages` prepared with the model's preprocessing).
    ``limit``: at most that many images, drawn by ``seed``. See the module docstring for the
    keys; bad data raises :class:`pyruntime.imagedata.DataError`."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    m = _model(model, num_threads)
    d = _data(m, data, limit, seed)
    n, depth = len(d), m.depth
    preds = np.empty(n, np.int64)
    exit_block = np.empty(n, np.int64)
    cost = np.empty(n, np.int64)
    m.run(d.batch(0, min(n, batch_size)), num_threads=num_threads)  # warm-up, untimed
    run_s, isa = 0.0, ""
    from .calibrate.common import progress

    for lo, hi, x in progress(d.batches(batch_size), "eval", math.ceil(n / batch_size), show_progress):
        t = time.perf_counter()
        r = m.run(x, num_threads=num_threads)
        run_s += time.perf_counter() - t
        preds[lo:hi], exit_block[lo:hi], cost[lo:hi], isa = r.predictions, r.exit_block, r.bops, r.isa
    correct = preds == d.labels
    full = fp32_full_depth_bops(m)
    hist = np.bincount(exit_block, minlength=depth)
    lo95, hi95 = wilson_interval(int(correct.sum()), n)
    return {
        "top1": float(correct.mean()),
        "mean_exit_block": float(exit_block.mean()),
        "bops_per_image": float(cost.mean()),
        "bops_ratio": float(cost.mean() / full),
        "ms_per_image": 1e3 * run_s / n,
        "images": int(n),
        "top1_ci95": [lo95, hi95],
        "depth": int(depth),
        "exit_histogram": {str(b): int(c) for b, c in enumerate(hist) if c},
        "top1_per_exit": {str(b): float(correct[exit_block == b].mean()) for b in np.flatnonzero(hist)},
        "fp32_full_depth_bops": int(full),
        "batch_size": int(batch_size),
        "threads": _threads_used(m, num_threads),
        "isa": isa,
        "classes": int(len(d.classes)),
        "model": str(m.path),
        "data": {k: v for k, v in d.summary.items() if k != "part"},
    }


# --- the command ----------------------------------------------------------------------------------

def dataset_source(text: str) -> str:
    """``--data``: an image folder or an ``.npz`` file."""
    from .cli import input_file  # the CLI module is imported by the CLI only

    if Path(text).is_dir():
        return text
    input_file(text)
    if Path(text).suffix.lower() != ".npz":
        raise argparse.ArgumentTypeError(f"{text}: expected an image folder (one sub-folder per class) or an .npz "
                                         f"with 'images' and 'labels'")
    return text


def add_parser(subparsers) -> argparse.ArgumentParser:
    from .cli import input_file, non_negative_int, output_file, positive_int, thread_count

    """Register ``eval`` on an ``argparse`` sub-parser collection."""
    e = subparsers.add_parser("eval", help="top-1, exits, BOPs and ms/image of a model file on your labelled images",
                              description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("model", type=input_file, help="model file (.pyrt)")
    e.add_argument("--data", type=dataset_source, required=True,
                   help="image folder (one sub-folder per class) or .npz with 'images' (uint8 [N, H, W(, C)]) and "
                        "'labels' (integers [N]), optionally 'classes'")
    e.add_argument("--json", type=output_file, metavar="OUT.json", help="also write the results as JSON")
    e.add_argument("--threads", type=thread_count, help="runtime threads (default: the physical cores)")
    e.add_argument("--batch", type=positive_int, default=DEFAULT_BATCH,
                   help=f"images per Model.run call; ms/image is measured at this batch (default {DEFAULT_BATCH})")
    e.add_argument("--images", type=positive_int, help="evaluate at most N images, drawn by --seed")
    e.add_argument("--seed", type=non_negative_int, default=0, help="which images --images draws (default 0)")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_eval)
    return e


def print_report(res: Dict[str, object]) -> None:
    lo, hi = res["top1_ci95"]
    print(f"model:       {res['model']}")
    print(f"data:        {res['data'].get('dataset', '?')} ({res['images']} images, {res['classes']} classes)")
    print(f"top-1:       {100 * res['top1']:.2f}%  (95% CI {100 * lo:.2f}-{100 * hi:.2f}%, Wilson)")
    print(f"mean exit:   block {res['mean_exit_block']:.2f} (final head: block {res['depth'] - 1})")
    print(f"BOPs/image:  {res['bops_per_image'] / 1e9:.4f} G = {res['bops_ratio']:.4f} x fp32 full depth "
          f"({res['fp32_full_depth_bops'] / 1e9:.4f} G)")
    print(f"ms/image:    {res['ms_per_image']:.3f} (Model.run wall time, batch {res['batch_size']}, "
          f"{res['threads']} threads, ISA {res['isa']})")
    print(f"images:      {res['images']}")
    per = res["top1_per_exit"]
    print("exits:       " + "  ".join(f"b{b}: {c} ({100 * per[b]:.1f}%)" for b, c in res["exit_histogram"].items()))


def cmd_eval(args) -> int:
    from ._atomic import atomic_write_bytes

    res = evaluate(args.model, args.data, num_threads=args.threads, batch_size=args.batch, limit=args.images,
                   seed=args.seed, show_progress=not args.no_progress)
    print_report(res)
    if args.json:
        atomic_write_bytes(args.json, (json.dumps(res, indent=2) + "\n").encode(), inputs=[args.model])
        print(f"wrote {args.json}")
    return 0
