"""Exit thresholds from collected exit-head logits (the "confidence thresholds bolted onto a
quantised model" baseline of the APQ and QuEE papers).

Run a model whose policy has exit heads with ``run(x, collect_exits=True)``: every head's
logits for every image, nobody leaving. :func:`simulate` then replays any thresholds on those
logits exactly as the executor would decide (first head whose score reaches its threshold
answers), and :func:`shared_threshold` picks the one threshold for all heads that spends the
fewest BOPs while losing at most ``max_drop`` top-1 against running every image to the end.
Numpy only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from .. import bops

__all__ = ["scores", "simulate", "Operating", "shared_threshold"]


def scores(logits: np.ndarray, rule: str) -> np.ndarray:
    """The exit rule's score of each row of logits [..., C]: max softmax ("confidence") or
    top-1 minus top-2 softmax ("margin"), in float64 like the executor."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if rule == "confidence":
        return p.max(-1)
    if rule == "margin":
        top2 = np.sort(p, -1)[..., -2:]
        return top2[..., 1] - top2[..., 0]
    raise ValueError(f"unknown exit rule {rule!r}")


def simulate(exit_scores: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Index of the head that answers each image: the first e with score[e] >= thresholds[e],
    else len(thresholds) (the final head). exit_scores: [E, N]."""
    E, N = exit_scores.shape
    passed = exit_scores >= np.asarray(thresholds, np.float64)[:, None]
    first = np.where(passed.any(0), passed.argmax(0), E)
    return first


@dataclass
class Operating:
    """One operating point of thresholds on calibration images."""

    threshold: float
    top1: float
    full_depth_top1: float
    mean_bops: float
    mean_exit_block: float


def _evaluate(graph: Mapping, exit_logits, final_logits, labels, exit_scores, thresholds) -> tuple:
    blocks = np.array([e["block"] for e in graph["exits"]] + [graph["arch"]["depth"] - 1])
    head = simulate(exit_scores, thresholds)
    all_logits = np.concatenate([exit_logits, final_logits[None]], 0)
    pred = all_logits[head, np.arange(len(labels))].argmax(-1)
    exit_block = blocks[head]
    return float((pred == labels).mean()), float(bops.per_image(graph, exit_block).mean()), float(exit_block.mean())


def shared_threshold(graph: Mapping, exit_logits: np.ndarray, final_logits: np.ndarray, labels: np.ndarray,
                     max_drop: float, rule: str = "confidence", grid: int = 200) -> Operating:
    """The single threshold for every head with the fewest expected BOPs whose top-1 on these
    images is at most ``max_drop`` (a fraction, e.g. 0.005) below full depth.

    ``graph``: the model's graph (its exits define which blocks the heads follow);
    ``exit_logits`` [E, N, C] and ``final_logits`` [N, C] from ``run(collect_exits=True)``.
    """
    E = len(graph["exits"])
    if exit_logits.shape[0] != E or exit_logits.shape[1:] != final_logits.shape:
        raise ValueError(f"exit_logits must be [{E}, N, C] matching final_logits {final_logits.shape}")
    if not 0 <= max_drop < 1:
        raise ValueError(f"max_drop is a fraction in [0, 1), got {max_drop}")
    labels = np.asarray(labels)
    s = scores(exit_logits, rule)
    full_top1 = float((final_logits.argmax(-1) == labels).mean())
    # Candidate thresholds: quantiles of the observed scores, plus 1 (exit only when certain).
    candidates = np.unique(np.concatenate([np.quantile(s, np.linspace(0, 1, grid)), [1.0]]))
    best = None
    for t in candidates:
        top1, mean_bops, mean_exit = _evaluate(graph, exit_logits, final_logits, labels, s, [t] * E)
        if top1 >= full_top1 - max_drop - 1e-12 and (best is None or mean_bops < best.mean_bops):
            best = Operating(float(t), top1, full_top1, mean_bops, mean_exit)
    if best is None:
        raise ValueError(f"no exit threshold keeps top-1 within {max_drop:.2%} of full depth on these images")
    return best
