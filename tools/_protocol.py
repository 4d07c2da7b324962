"""The evaluation protocol the results scripts share (``tools/results_*.py``,
``tools/regimes_results.py``; issue 17): which model is measured, and three disjoint splits of
Fashion-MNIST, each with one job --

* calibration: ``--images`` training images of 50000..54999 (``REFERENCE_PARTS``), drawn by
  ``--seed``: what a method fits on;
* validation: ``--val-images`` training images of 55000..59999, drawn by ``--seed``: what
  chooses an operating point (a threshold, a lambda, a clip);
* test: the Fashion-MNIST test split (its first ``--test-limit`` images): only reported.

The reference model leaves 50000..59999 out of its training only where its metadata says so
(``holdout``); :func:`holdout_note` is the warning a results page carries where it does not.
Each script keeps its own defaults (how many images, threads) and its own further flags; what
the shared flags mean lives here, so the five scripts cannot drift apart.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pyruntime.calibrate.common import REFERENCE_PARTS, CalibrationData, calibration_data, normalize  # noqa: E402

if TYPE_CHECKING:  # pragma: no cover
    from pyruntime.calibrate.common import Source

__all__ = ["add_protocol_args", "check_protocol_args", "Splits", "load_splits", "load_test_split", "Protocol",
           "load_protocol", "checkpoint_label", "holdout_note", "holdout_lines"]


# --- the command line ------------------------------------------------------------------------------

def add_protocol_args(p: argparse.ArgumentParser, *, out: str, images: int, images_help: str = "calibration images",
                      val_images: Optional[int] = None, val_flag: str = "--val-images",
                      val_help: str = "validation images", threads: Optional[int] = None,
                      threads_help: Optional[str] = None, workdir_help: Optional[str] = None,
                      workdir_required: bool = False, progress: bool = True) -> None:
    """The shared flags with one script's defaults: ``--checkpoint``, ``--out`` (default
    results/``out``), ``--workdir``, ``--images``, the validation count (``val_images`` None: the
    script chooses nothing on validation and has no such flag; ``val_flag`` its spelling, the
    value always lands in ``args.val_images``), ``--test-limit``, ``--seed``, ``--threads``
    (where ``threads`` is given) and ``--no-progress``."""
    p.add_argument("--checkpoint", help="reference-format checkpoint (default: the shipped reference model)")
    p.add_argument("--out", type=Path, default=REPO / "results" / out)
    p.add_argument("--workdir", type=Path, required=workdir_required, help=workdir_help)
    p.add_argument("--images", type=int, default=images, help=images_help)
    if val_images is not None:
        p.add_argument(val_flag, dest="val_images", type=int, default=val_images, help=val_help,
                       metavar=val_flag.lstrip("-").replace("-", "_").upper())
    p.add_argument("--test-limit", type=int, help="first N test images only (default: all 10,000)")
    p.add_argument("--seed", type=int, default=0)
    if threads is not None:
        p.add_argument("--threads", type=int, default=threads, help=threads_help)
    if progress:
        p.add_argument("--no-progress", action="store_true")


def check_protocol_args(p: argparse.ArgumentParser, args: argparse.Namespace, *more: str) -> argparse.Namespace:
    """Refuse counts below 1 (the shared ones and the script's ``more``) in one line: a
    --test-limit of 0 would otherwise mean every test image, a negative one all but the last."""
    for name in ("images", "val_images", "threads", "test_limit", *more):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            flag = next((a.option_strings[0] for a in p._actions if a.dest == name), f"--{name.replace('_', '-')}")
            p.error(f"{flag} must be >= 1")
    return args


# --- the splits ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Splits:
    calibration: CalibrationData             # fit
    validation: Optional[CalibrationData]    # choose (None: the script chooses nothing)
    test_images: np.ndarray                  # report only: float32 [N, C, H, W] as the runtime normalises
    test_labels: np.ndarray                  # int64 [N]


def load_test_split(limit: Optional[int], mean: Sequence[float], std: Sequence[float]):
    """(normalised images, int64 labels) of the first ``limit`` Fashion-MNIST test images
    (all 10,000 for None)."""
    from pyruntime.datasets import fashion_mnist   # looked up per call: tests swap it for poisoned labels

    tx, ty = fashion_mnist("test")
    if limit:
        tx, ty = tx[:limit], ty[:limit]
    return normalize(tx, mean, std), np.asarray(ty, np.int64)


def load_splits(args: argparse.Namespace, mean: Sequence[float], std: Sequence[float]) -> Splits:
    """The three splits ``args`` (``add_protocol_args``) ask for, normalised with ``mean``/``std``."""
    calib = calibration_data(args.images, args.seed, mean, std, part="calibration")
    n_val = getattr(args, "val_images", None)
    val = calibration_data(n_val, args.seed, mean, std, part="validation") if n_val is not None else None
    return Splits(calib, val, *load_test_split(args.test_limit, mean, std))


# --- the model -------------------------------------------------------------------------------------

def checkpoint_label(path: Path) -> str:
    """The checkpoint as a results page names it: relative to the repository when inside it."""
    full = Path(path).resolve()
    return str(full.relative_to(REPO)) if REPO in full.parents else str(path)


def holdout_note(checkpoint: Path) -> str:
    """A warning when the checkpoint's training saw the calibration and validation parts (its
    metadata records no holdout covering them, as the shipped model's does not); "" otherwise."""
    from pyruntime.reference import read_metadata

    held = read_metadata(checkpoint).get("holdout")
    held = json.loads(held) if isinstance(held, str) else held
    lo, hi = REFERENCE_PARTS["calibration"][0], REFERENCE_PARTS["validation"][1]
    if held and held[0] <= lo and held[1] >= hi:
        return ""
    seen = [(a, b) for a, b in ((lo, min(hi, held[0])), (max(lo, held[1]), hi)) if a < b] if held else [(lo, hi)]
    why = (f"its metadata's holdout, {held[0]}..{held[1] - 1}, does not cover {lo}..{hi - 1}" if held
           else "its metadata records no holdout covering them")
    return (f"**This checkpoint was trained on training images {' and '.join(f'{a}..{b - 1}' for a, b in seen)}** "
            f"({why}): its calibration and validation parts hold images it has seen, so validation top-1 "
            f"is optimistic. The test split is unaffected.")


def holdout_lines(note: str) -> list:
    """The note as a results page's paragraph (nothing when there is no note)."""
    return [note, ""] if note else []


@dataclass(frozen=True)
class Protocol:
    """The model a results script measures and its three splits."""
    source: "Source"
    splits: Splits

    @property
    def checkpoint(self) -> Path:
        return Path(self.source.checkpoint)

    @property
    def checkpoint_label(self) -> str:
        return checkpoint_label(self.checkpoint)

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.checkpoint.read_bytes()).hexdigest()

    @property
    def holdout_note(self) -> str:
        return holdout_note(self.checkpoint)


def load_protocol(args: argparse.Namespace, threads: int) -> Protocol:
    """The reference-format model of ``--checkpoint`` (the shipped one by default) and its
    splits, normalised with the model's own mean and std; torch set to ``threads`` threads
    first, so every torch pass of the script runs on them."""
    import torch

    from pyruntime.calibrate.common import reference_source

    torch.set_num_threads(threads)
    source = reference_source(args.checkpoint)
    return Protocol(source, load_splits(args, source.preprocess["mean"], source.preprocess["std"]))
