"""Which images chose what: where each validation image left (MAQEE's exits) or which path it
took at each gate (QuEE: exit, full or reduced precision), read off the runtime's own
``exit_block`` and ``block_path``, and the accuracy of each group.

* :func:`route_lines` -- the ``--report`` table: per exit (or gate) the count and share of the
  images that got there and of those that left there / continued at full / at reduced
  precision, with their top-1 (the answer each image finally got).
* :func:`route_rows` -- one row per image for ``--report-json``: its row in the calibration
  data, label, prediction, correct, exit block and path (one letter per block run:
  ``F`` full precision, ``R`` reduced).
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

__all__ = ["route_lines", "route_rows", "decisions"]

PATH_LETTERS = {1: "F", 2: "R"}


def _acc(right: np.ndarray, mask: np.ndarray) -> str:
    return f"{right[mask].mean():.4f}" if mask.any() else "   -  "


def decisions(exit_block: np.ndarray, block_path: np.ndarray, block: int) -> np.ndarray:
    """[N] at the exit or gate after ``block``: -1 never got there, 0 left there, 1 went on at
    full precision, 2 went on at reduced precision."""
    eb = np.asarray(exit_block)
    bp = np.asarray(block_path)
    out = np.full(len(eb), -1, np.int64)
    reached = eb >= block
    out[reached & (eb == block)] = 0
    going = reached & (eb > block)
    out[going] = bp[going, block + 1].astype(np.int64)
    return out


def route_lines(exit_block: np.ndarray, block_path: np.ndarray, logits: np.ndarray, labels: np.ndarray,
                blocks: Sequence[int], gates: bool) -> List[str]:
    """The report table over the images given (the validation images)."""
    right = np.asarray(logits).argmax(-1) == np.asarray(labels)
    n = len(right)
    depth = np.asarray(block_path).shape[1]
    lines = [f"routes of the {n} images (top-1 of each group in brackets):"]
    if gates:
        lines.append("gate  reached        exit                full                reduced")
    else:
        lines.append("exit  reached        left there")
    for b in blocks:
        d = decisions(exit_block, block_path, b)
        reached = d >= 0
        cells = [f"{int(reached.sum()):5d} ({reached.mean():6.1%})"]
        for p in ((0, 1, 2) if gates else (0,)):
            m = d == p
            cells.append(f"{int(m.sum()):5d} {m.mean():6.1%} [{_acc(right, m)}]")
        lines.append(f"{b:4d}  " + "  ".join(cells))
    end = np.asarray(exit_block) == depth - 1
    reduced_blocks = int((np.asarray(block_path) == 2).sum())
    ran = int((np.asarray(block_path) > 0).sum())
    lines.append(f"end   {int(end.sum()):5d} ({end.mean():6.1%}) ran to the last block [{_acc(right, end)}]; overall top-1 "
                 f"{right.mean():.4f}" + (f"; {reduced_blocks / max(1, ran):.1%} of the blocks run were reduced"
                                          if gates else ""))
    return lines


def route_rows(rows: np.ndarray, exit_block: np.ndarray, block_path: np.ndarray, logits: np.ndarray,
               labels: np.ndarray) -> List[Dict[str, object]]:
    """One dict per image: index (its row in the calibration data), label, prediction,
    correct, exit_block, path."""
    pred = np.asarray(logits).argmax(-1)
    out = []
    for i, r in enumerate(np.asarray(rows)):
        path = "".join(PATH_LETTERS.get(int(v), "") for v in np.asarray(block_path)[i])
        out.append({"index": int(r), "label": int(labels[i]), "prediction": int(pred[i]),
                    "correct": bool(pred[i] == labels[i]), "exit_block": int(exit_block[i]), "path": path})
    return out
