"""QuEE calibration: gates that send each image to exit, continue at full precision, or
continue at reduced precision, by predicted probability of error (Regol et al., 2024;
/work/shared/papers.md, "QuEE"). Everything below marked [ours] is our reading.

Set-up [ours]:

* **Gates** after a few blocks (``gate_blocks``, default every ``every``-th block: blocks
  every-1, 2*every-1, ... up to depth-2). Each is an exit head whose rule is ``gate``.
* **Precisions**: *full* is the base policy (e.g. ``w8a8``: every block linear W8A8);
  *reduced* (``reduced``, e.g. W4A8) is a second copy of every block linear after the first
  gate (``gates.reduced = {"blocks.*": reduced}``). At gate g_j an image takes one of three
  paths: 0 exit at g_j, 1 run the next segment (blocks g_j+1 .. g_{j+1}) at full precision,
  2 run it at reduced precision. It decides again at g_{j+1}; after the last gate the
  segment runs to the end of the network and the final head answers.
* **Costs** (what ``cost[g_j]`` holds): the BOPs a continuing path commits to (the next
  segment at the path's precision, plus what the horizon below adds), divided by the BOPs
  of the whole model in fp32 without exits (``bops.static`` of the fp32 graph); exit = 0.

Targets [ours]: the model is converted once with the reduced copies (the *probe*), and run
*statically* by the runtime itself (``collect_exits``, nobody leaving) on the calibration
images (<= 1,024 Fashion-MNIST training images, fixed seed):

* run F: full precision everywhere -> every gate head's logits and the final logits;
* for each gate g_j (``targets="segment"``, the default), run R_j: full precision up to
  g_j, reduced on blocks g_j+1 .. g_{j+1}, full after -> the final logits (horizon
  ``final``), or only up to the head at g_{j+1} (horizon ``next``; the final head after the
  last gate);
  ``targets="static"`` instead uses one run with every block after the first gate reduced
  (the same for the first gate, more pessimistic for later ones; one run instead of m);
  ``targets="path"`` measures them on the trajectories images actually take (below).

For image i at gate g_j the path errors are e_0 = [head g_j of F is wrong] and, for the
continuing paths, the outcome on the full-precision trajectory (the one every image is on at
the first gate) of running the next segment at the path's precision and then:

* ``horizon="final"`` (default): the rest of the network at full precision, answered by the
  final head: e_1 = [F's final head is wrong], e_2 = [R_j's final head is wrong] (R_j then
  runs to the end); the cost of a continuing path is then everything up to and including
  the final heads (next segment at the path's precision, the rest at full precision, every
  exit head on the way);
* ``horizon="next"``: exit at the next decision point: e_1 = [F's head at the end of the
  segment is wrong], e_2 = [R_j's head there is wrong]; cost = the next segment and its head.

``next`` is the literal "continue for one segment, then exit" reading, but it is myopic: at
lambda = 0 an image leaves whenever its exit head looks no worse than the *next* head, even
when the final head would be right, and with many gates those losses add up (tiny
Fashion-MNIST ViT, depth 6, gates after every block, W8A8 / W4A4: top-1 at lambda = 0 is
0.534 with ``next`` and 0.601 with ``final``, against 0.580 for the static W8A8 model).
The features at gate g_j are those the executor computes from F's exit logits there: the
top-``topk`` softmax probabilities (descending) and the entropy -sum p ln p (float64).

Path targets (``targets="path"``) [ours]. With "segment" targets every gate is trained on the
full-precision trajectory, but the executor decides again at every gate on the features the
image actually arrives with: an image sent reduced at g_j reaches g_{j+1} with reduced-
precision features, which its gate never saw in training. The seed says only that the
predictors estimate the probability of error of each remaining path (papers.md, "QuEE"); our
reading: train the gates in order, following each image through the gates already trained.
Every static run above is one *mask* (the set of segments run reduced), memoised per mask
(:class:`SegmentRuns`; at most ``2^gates`` runs, hence :data:`MAX_PATH_GATES`). The gates are
first fitted with segment targets; the lambdas at which their decisions flip (0 and 8
quantiles, as :func:`default_lambdas`) are the *simulation grid* (``meta["sim_lambdas"]``).
Gate 0 sees one history (everything full precision), so it is the segment fit's. For gate j
> 0, every calibration image is followed through gates 0..j-1 at each simulated lambda (the
executor's rule on the head logits of the image's own mask: :func:`simulate`, checked per
image against the executor); each (image, mask) pair that reaches g_j at some lambda becomes
a training sample with weight = the share of the grid at which it does. Its features are g_j's
head under its mask; its path errors are exit there, or the next segment at full / reduced
precision on top of its mask, then the horizon at full precision. Cluster rates and the MLP's
BCE are weighted by those weights. What stays myopic: beyond the next segment the horizon
still assumes full precision and no exit (the later gates are not trained yet when g_j is).
The MLPs still do not depend on lambda, so one fit serves the whole curve.

Clusters and predictors [ours]: k-means (k-means++ seeding, Lloyd, fixed seed) on the gate's
features with ``clusters`` centres; for cluster k and path p,
ê_{k,p} = (sum_{i in k} e_{i,p} + prior * ē_p) / (n_k + prior), ē_p the gate-wide error rate
of p (``prior`` = 0 gives the raw per-cluster rate; a little shrinkage stops a 3-image
cluster from claiming a 0% error). Each image's target is its cluster's ê. The gate MLP
(features -> ``hidden`` ReLU units -> 3) is trained with full-batch Adam on the binary
cross-entropy between sigmoid(output) -- the executor applies the sigmoid -- and those
targets, in float64 numpy from a seeded initialisation, then stored in float32.

Decision (the executor's): argmin_p ê_p(x) + lambda * cost_p, ties to the lower path.
lambda = 0 spends whatever lowers the predicted error; larger lambda trades error for BOPs.
:func:`quee_curve` sweeps lambda (default: quantiles of the values at which decisions on the
calibration images flip) and measures top-1 and mean BOPs *with the runtime* on held-out
images; :func:`calibrate_quee` returns the policy for one lambda. The gate MLPs do not
depend on lambda, so one :func:`fit_quee` serves the whole curve.

Operating point from the user's data [ours]: :func:`choose_lambda` measures that curve on
*validation* images the gates were not fitted on (for the reference model, training images 55000..59999,
:func:`.common.calibration_data` ``part="validation"``; for user data the CLI's held-out
split) and picks lambda there alone by :func:`select_point` (the rule
``tools/results_quee.py`` also applies to its baselines' thresholds): with ``max_drop`` the cheapest lambda (least mean BOPs
per image) whose top-1 is at most ``max_drop`` below the fp32 model at full depth on the same
images (also within ``budget_bops`` when both are given), with only ``budget_bops`` the most
accurate lambda whose mean BOPs per image is within it. The candidates are 0, quantiles of the
decision-flip values (``default_lambdas``, ``grid`` of them) and one beyond which every image
leaves at the first gate; a target no candidate meets is :class:`LambdaNotFound`, naming what
was reachable. The drop is the measured one (no confidence margin, unlike MAQEE's bound).

Attention [ours]: the base policy's precision (``w8a8-attn8``, or a policy JSON with
``attention``), or ``attention`` 8 on a base at fp32 attention; both paths share it (the
reduced copies change only the linears). Every run above and the path costs use it; the
normaliser stays the fp32 model's, attention included.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .. import bops
from ..modelfile import check_graph, check_tensors, set_attention_bits
from ..policy import GATE_TENSORS, ExitPolicy, GatePolicy, LayerPolicy, Policy
from .common import CalibrationData, CostModel, Source, resolve_attention
from .probe import executor, materialise
from .probe import run as _probe_run

__all__ = [
    "TARGETS", "default_gate_blocks", "gate_features", "gate_errors", "gate_decisions", "kmeans",
    "cluster_targets", "train_gate_mlp", "QueeFit", "fit_quee", "calibrate_quee", "CurvePoint",
    "quee_curve", "default_lambdas", "reference_points", "HORIZONS", "LambdaSearch", "choose_lambda",
    "LambdaNotFound", "SegmentRuns", "path_errors", "simulate", "path_predictions", "select_point", "check_target",
]

TARGETS = ("segment", "static", "path")
HORIZONS = ("next", "final")
PATHS = ("exit", "full", "reduced")


# --- gate arithmetic (numpy, vectorised; the executor's definitions) -----------------------------

def default_gate_blocks(depth: int, every: int = 3) -> List[int]:
    """Blocks every-1, 2*every-1, ... that may hold an exit (<= depth-2)."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    blocks = list(range(every - 1, depth - 1, every))
    if not blocks:
        raise ValueError(f"no gate block for depth {depth} with every={every} (gates go after blocks 0..{depth - 2})")
    return blocks


def gate_features(logits: np.ndarray, topk: int) -> np.ndarray:
    """[N, topk + 1] float64: the top-``topk`` softmax probabilities of each row of logits
    (descending) and the softmax's entropy -sum p ln p."""
    z = np.asarray(logits, dtype=np.float32).astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top = -np.sort(-p, axis=-1)[..., :topk]
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(-1)
    return np.concatenate([top, ent[..., None]], axis=-1)


def _as64(w: Mapping[str, Any]) -> Tuple[np.ndarray, ...]:
    return tuple(np.asarray(w[k], dtype=np.float32).astype(np.float64) for k in GATE_TENSORS)


def gate_errors(features: np.ndarray, weights: Mapping[str, Any]) -> np.ndarray:
    """[N, 3]: the gate MLP's predicted error probabilities sigmoid(W2 relu(W1 f + b1) + b2)
    (weights taken as float32, like the executor, evaluated in float64)."""
    w1, b1, w2, b2 = _as64(weights)
    h = np.maximum(features @ w1.T + b1, 0.0)
    return 1.0 / (1.0 + np.exp(-(h @ w2.T + b2)))


def gate_decisions(features: np.ndarray, weights: Mapping[str, Any], lam: float, cost: Sequence[float]) -> np.ndarray:
    """[N] path per image: argmin_p e_p + lambda * cost_p, ties to the lower path (lambda and
    costs rounded to float32 first, as the executor stores them)."""
    c = np.asarray(cost, dtype=np.float32).astype(np.float64)
    score = gate_errors(features, weights) + float(np.float32(lam)) * c[None, :]
    return np.argmin(score, axis=1)


# --- clusters and targets -----------------------------------------------------------------------

def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 100) -> Tuple[np.ndarray, np.ndarray]:
    """(centres [k', d], assignment [N]) by k-means++ seeding and Lloyd iterations with a
    seeded generator; k' = min(k, number of distinct points). Deterministic."""
    x = np.asarray(x, dtype=np.float64)
    rng = np.random.default_rng(seed)
    k = int(min(k, len(np.unique(x, axis=0))))
    if k < 1:
        raise ValueError("k-means needs at least one point")
    centres = [x[rng.integers(len(x))]]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        c = x[rng.choice(len(x), p=d2 / d2.sum())]
        centres.append(c)
        d2 = np.minimum(d2, ((x - c) ** 2).sum(1))
    centres = np.array(centres)
    assign = np.full(len(x), -1)
    for _ in range(iters):
        new = ((x[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
        if np.array_equal(new, assign):
            break
        assign = new
        for j in range(k):
            if (assign == j).any():  # an emptied cluster keeps its centre
                centres[j] = x[assign == j].mean(0)
    return centres, assign


def cluster_targets(assign: np.ndarray, errors: np.ndarray, k: int, prior: float = 0.0,
                    weight: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(ê [k, P], sizes [k]): per cluster and path, the error rate of the path over the
    cluster's images, shrunk towards the overall rate by ``prior`` pseudo-images:
    ê_{k,p} = (sum_{i in k} e_{i,p} + prior * ē_p) / (n_k + prior). An empty cluster gets ē.
    With ``weight`` (>= 0 per sample: how often a path target's (image, history) pair occurs)
    every sum and count is weighted, and sizes are the weighted counts (float64)."""
    errors = np.asarray(errors, dtype=np.float64)
    if errors.ndim != 2 or len(errors) != len(assign):
        raise ValueError(f"errors must be [N, paths] with N = {len(assign)}, got {errors.shape}")
    if prior < 0:
        raise ValueError(f"prior must be >= 0, got {prior}")
    w = _sample_weight(weight, len(errors))
    overall = (errors * w[:, None]).sum(0) / w.sum()
    sizes = np.bincount(assign, weights=w, minlength=k)
    sums = np.zeros((k, errors.shape[1]))
    np.add.at(sums, assign, errors * w[:, None])
    denom = sizes + prior
    safe = np.where(denom > 0, denom, 1.0)
    e_hat = np.where(denom[:, None] > 0, (sums + prior * overall[None]) / safe[:, None], overall[None])
    return e_hat, (sizes.astype(np.int64) if weight is None else sizes)


def _sample_weight(weight: Optional[np.ndarray], n: int) -> np.ndarray:
    """Per-sample weights as float64 (ones by default); negative, non-finite or all-zero refused."""
    if weight is None:
        return np.ones(n)
    w = np.asarray(weight, dtype=np.float64)
    if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weight must be [{n}] finite, >= 0 and not all zero")
    return w


def train_gate_mlp(features: np.ndarray, targets: np.ndarray, hidden: int, steps: int = 2000, lr: float = 0.02,
                   seed: int = 0, weight: Optional[np.ndarray] = None) -> Tuple[Dict[str, np.ndarray], float]:
    """(float32 weights by GATE_TENSORS name, final BCE loss): full-batch Adam on
    BCE(sigmoid(W2 relu(W1 f + b1) + b2), targets), float64, seeded initialisation; with
    ``weight`` the BCE is the weighted mean over samples."""
    x = np.asarray(features, dtype=np.float64)
    t = np.clip(np.asarray(targets, dtype=np.float64), 0.0, 1.0)
    n, d = x.shape
    P = t.shape[1]
    w = _sample_weight(weight, n)
    w = w / w.sum()
    rng = np.random.default_rng(seed)
    mu = (x * w[:, None]).sum(0)  # train on standardised inputs, fold back at the end
    sd = np.sqrt((w[:, None] * (x - mu) ** 2).sum(0)) + 1e-6
    t_mean = np.clip((t * w[:, None]).sum(0), 1e-3, 1 - 1e-3)
    xs = (x - mu) / sd
    params = [rng.standard_normal((hidden, d)) * np.sqrt(2.0 / d), np.full(hidden, 0.1),
              rng.standard_normal((P, hidden)) * 0.1 / np.sqrt(hidden),
              np.log(t_mean / (1 - t_mean))]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    b1_, b2_ = 0.9, 0.999

    def forward(ps):
        w1, b1, w2, b2 = ps
        z = xs @ w1.T + b1
        h = np.maximum(z, 0.0)
        o = h @ w2.T + b2
        return z, h, o

    for step in range(1, steps + 1):
        w1, b1, w2, b2 = params
        z, h, o = forward(params)
        g_o = (1.0 / (1.0 + np.exp(-o)) - t) * (w[:, None] / P)
        g_w2, g_b2 = g_o.T @ h, g_o.sum(0)
        g_z = (g_o @ w2) * (z > 0)
        g_w1, g_b1 = g_z.T @ xs, g_z.sum(0)
        for i, g in enumerate((g_w1, g_b1, g_w2, g_b2)):
            m[i] = b1_ * m[i] + (1 - b1_) * g
            v[i] = b2_ * v[i] + (1 - b2_) * g * g
            params[i] = params[i] - lr * (m[i] / (1 - b1_ ** step)) / (np.sqrt(v[i] / (1 - b2_ ** step)) + 1e-8)
    w1, b1, w2, b2 = params
    # fold the standardisation into the first layer: W1 (f - mu) / sd + b1
    w1f = w1 / sd[None, :]
    b1f = b1 - w1f @ mu
    weights = {"fc1.weight": w1f, "fc1.bias": b1f, "fc2.weight": w2, "fc2.bias": b2}
    weights = {k: np.ascontiguousarray(a, dtype=np.float32) for k, a in weights.items()}
    pred = gate_errors(x, weights)
    eps = 1e-12
    loss = float(-(w[:, None] * (t * np.log(pred + eps) + (1 - t) * np.log(1 - pred + eps))).sum() / P)
    return weights, loss


# --- the probe model and its static variants ------------------------------------------------------

def static_variant(graph: Mapping, tensors: Mapping[str, np.ndarray], reduced_blocks: Sequence[int] = (),
                   exit_blocks: Optional[Sequence[int]] = None, threshold: float = 1.0) -> Tuple[dict, dict]:
    """A gate-free (graph, tensors) from a gated probe: the block linears of
    ``reduced_blocks`` run their reduced copies as their only weights, exits only at
    ``exit_blocks`` (default: every exit of the probe) with rule confidence and
    ``threshold`` (0: everyone leaves at the first one)."""
    g = copy.deepcopy(dict(graph))
    reduced = g.pop("gates", None) or {"reduced": {}}
    keep = [e["block"] for e in g["exits"]] if exit_blocks is None else sorted(exit_blocks)
    t = {k: v for k, v in tensors.items() if not k.startswith("gates.") and ":lo" not in k}
    for e in g["exits"]:
        if e["block"] not in keep:
            g["layers"].pop(f"exits.{e['block']}.fc")
            t = {k: v for k, v in t.items() if not k.startswith(f"exits.{e['block']}.")}
    g["exits"] = [{"block": b, "rule": "confidence", "threshold": float(threshold)} for b in keep]
    blocks = set(reduced_blocks)
    for name, lp in reduced["reduced"].items():
        if int(name.split(".")[1]) not in blocks:
            continue
        g["layers"][name] = dict(lp)
        for suffix in (".weight", ".weight.q8", ".weight.q4", ".weight.scale"):
            t.pop(name + suffix, None)
            if f"{name}:lo{suffix}" in tensors:
                t[name + suffix] = tensors[f"{name}:lo{suffix}"]
    check_graph(g)
    check_tensors(g, t)
    return g, t


# --- fitting ----------------------------------------------------------------------------------------

@dataclass
class GateFit:
    """What calibration learnt at one gate."""

    block: int
    cost: Tuple[float, float, float]
    weights: Dict[str, np.ndarray]
    path_error: Tuple[float, float, float]   # ē_p on the calibration images
    e_hat: np.ndarray                        # [clusters, 3]
    cluster_sizes: np.ndarray                # [clusters]
    loss: float                              # final BCE against the cluster targets
    fit_mae: float                           # mean |MLP - cluster target| on the calibration images
    features: np.ndarray = field(default=None, repr=False)   # the inputs it was trained on

    def summary(self) -> dict:
        return {"block": self.block, "cost": [round(c, 6) for c in self.cost],
                "path_error": [round(e, 4) for e in self.path_error], "clusters": int((self.cluster_sizes > 0).sum()),
                "bce": round(self.loss, 5), "fit_mae": round(self.fit_mae, 5)}


@dataclass
class QueeFit:
    """A calibrated set of gates; :meth:`policy` gives the policy for any lambda."""

    base: Policy                      # the full-precision policy (its exits are the gates)
    reduced: LayerPolicy
    topk: int
    hidden: int
    gates: List[GateFit]
    graph: dict                       # the probe's graph (gates with placeholder weights)
    tensors: Dict[str, np.ndarray]    # the probe's tensors
    fp32_bops: int                    # BOPs of the fp32 model without exits (bops_ratio's normaliser)
    features: Dict[int, np.ndarray]   # calibration features per gate (for default_lambdas)
    meta: dict = field(default_factory=dict)
    # targets="path": per gate, the (image row, mask of segments run reduced before it, weight)
    # of every pair its MLP was trained on
    histories: Dict[int, Tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def gate_blocks(self) -> List[int]:
        return [g.block for g in self.gates]

    def gate_policy(self, lam: float) -> GatePolicy:
        return GatePolicy(lam=float(lam), topk=self.topk, hidden=self.hidden,
                          cost={g.block: list(g.cost) for g in self.gates},
                          reduced={"blocks.*": self.reduced},
                          weights={g.block: {k: v.tolist() for k, v in g.weights.items()} for g in self.gates})

    def policy(self, lam: float) -> Policy:
        """The complete, convertible policy: base precisions, gate exits, gates at ``lam``."""
        p = copy.deepcopy(self.base)
        p.gates = self.gate_policy(lam)
        p.name = f"quee-{self.base.name}-lambda{lam:g}"
        p.meta = {"calibration": dict(self.meta, **{"lambda": float(lam)})}
        return p

    def model_tensors(self, lam: float) -> Tuple[dict, dict]:
        """(graph, tensors) of the calibrated model at ``lam`` without converting again."""
        g = copy.deepcopy(self.graph)
        g["gates"]["lambda"] = float(lam)
        g["gates"]["cost"] = {str(gf.block): list(gf.cost) for gf in self.gates}
        t = dict(self.tensors)
        for gf in self.gates:
            for k, v in gf.weights.items():
                t[f"gates.{gf.block}.{k}"] = v
        return g, t

    def run(self, x: np.ndarray, lam: float, batch: int = 256, num_threads: Optional[int] = None) -> Dict[str, np.ndarray]:
        """The runtime on normalised images with the gates at ``lam``: logits, exit_block,
        bops, block_path."""
        g, t = self.model_tensors(lam)
        return _probe_run(executor(g, t), x, False, batch, num_threads)

    def static_run(self, x: np.ndarray, reduced_blocks: Sequence[int] = (), batch: int = 256,
                   num_threads: Optional[int] = None) -> Dict[str, np.ndarray]:
        """Every gate head's logits (``exit_logits`` [gates, N, C]) and the final logits,
        nobody leaving, with the block linears of ``reduced_blocks`` at reduced precision."""
        g, t = static_variant(self.graph, self.tensors, reduced_blocks)
        return _probe_run(executor(g, t), x, True, batch, num_threads)

    def segment_runs(self, x: np.ndarray, batch: int = 256, num_threads: Optional[int] = None) -> "SegmentRuns":
        """Memoised static runs of the probe on normalised images ``x``, one per combination of
        segment precisions asked for (:func:`simulate`, :func:`path_predictions`)."""
        return SegmentRuns(self.graph, self.tensors, _segments(self.gate_blocks, self.graph["arch"]["depth"]), x,
                           batch, num_threads)


def _segments(gates: Sequence[int], depth: int) -> List[Tuple[int, int]]:
    """(first, last) block of the segment after each gate."""
    ends = list(gates[1:]) + [depth - 1]
    return [(g + 1, e) for g, e in zip(gates, ends)]


def _cost_terms(graph: Mapping, costs: Optional[CostModel]) -> Tuple[np.ndarray, np.ndarray, Dict[str, float], float]:
    """(per block at full precision [depth], at reduced precision [depth], per head (exit
    heads with their gates, final heads), one image through the whole model in fp32 without
    exits): BOPs (default), or seconds from ``costs``' latency table."""
    fp32 = copy.deepcopy(dict(graph))
    fp32.pop("gates", None)
    set_attention_bits(fp32, 32)  # the normaliser is the fp32 model, attention matmuls included
    fp32["exits"] = []
    fp32["predictor"] = None
    fp32["layers"] = {n: {"w_bits": 32, "a_bits": 8, "scale": "dynamic", "static_scale": None, "block_size": 32}
                      for n in fp32["layers"] if not n.startswith("exits.")}
    heads = [n for n in graph["layers"] if n.startswith("exits.") or not n.startswith(("blocks.", "patch_embed"))]
    if costs is None or costs.kind == "bops":
        full, red = bops.block_bops(graph)
        lb = bops.layer_bops(graph)
        per_head = {n: float(lb[n] + (bops.gate_bops(graph) if n.startswith("exits.") else 0)) for n in heads}
        return full.astype(np.float64), red.astype(np.float64), per_head, float(bops.static(fp32))
    if costs.kind != "latency":
        raise ValueError(f"QuEE path costs are BOPs or latency, not {costs.kind!r}")
    table = costs.table
    bits = lambda n: graph["layers"][n]["w_bits"]
    full = table.block_latency(graph)
    red = full.copy()
    for name, lp in (graph.get("gates") or {}).get("reduced", {}).items():
        red[int(name.split(".")[1])] += table.layer(name, lp["w_bits"]) - table.layer(name, bits(name))
    # a gate's MLP runs inside its exit head's timed op, so the head's time includes it
    return full, red, {n: table.layer(n, bits(n)) for n in heads}, table.static(fp32)


def _costs(graph: Mapping, gates: Sequence[int], horizon: str = "final",
           costs: Optional[CostModel] = None) -> Tuple[List[Tuple[float, float, float]], float]:
    """Normalised (exit, full, reduced) cost per gate, and the fp32 normaliser. ``next``: the
    next segment and the head at its end; ``final``: the next segment at the path's precision
    and everything after it at full precision, every exit head (and gate) on the way and the
    final heads. BOPs, or seconds with a latency ``costs``."""
    full, red, head_cost, norm = _cost_terms(graph, costs)
    final_heads = sum(v for n, v in head_cost.items() if not n.startswith("exits."))
    depth = graph["arch"]["depth"]
    out = []
    for (first, last), g in zip(_segments(gates, depth), gates):
        end = last if horizon == "next" else depth - 1
        heads = sum(head_cost[f"exits.{b}.fc"] for b in gates if first <= b <= end)
        heads += final_heads if end == depth - 1 else 0
        rest = float(full[last + 1:end + 1].sum())
        cf = (float(full[first:last + 1].sum()) + rest + heads) / norm
        cr = (float(red[first:last + 1].sum()) + rest + heads) / norm
        out.append((0.0, float(cf), float(cr)))
    return out, norm


MAX_PATH_GATES = 6


class SegmentRuns:
    """Static runs of the probe on the calibration images with a fixed precision per segment
    (bit s of ``mask`` set: the segment after gate s runs reduced), memoised: every gate
    head's logits, then the final logits."""

    def __init__(self, graph, tensors, segs, x, batch, num_threads):
        self.graph, self.tensors, self.segs, self.x = graph, tensors, segs, x
        self.batch, self.num_threads = batch, num_threads
        self.cache: Dict[int, List[np.ndarray]] = {}

    def heads(self, mask: int) -> List[np.ndarray]:
        if mask not in self.cache:
            blocks = [b for s, (first, last) in enumerate(self.segs) if mask >> s & 1 for b in range(first, last + 1)]
            g, t = static_variant(self.graph, self.tensors, blocks)
            r = _probe_run(executor(g, t), self.x, True, self.batch, self.num_threads)
            self.cache[mask] = list(r["exit_logits"]) + [r["logits"]]
        return self.cache[mask]

    def logits(self, rows: np.ndarray, masks: np.ndarray, head: int) -> np.ndarray:
        """[len(rows), classes]: head ``head``'s logits of each image under its own mask."""
        out = np.empty((len(rows), self.heads(0)[-1].shape[-1]), np.float32)
        for m in np.unique(masks):
            sel = masks == m
            out[sel] = self.heads(int(m))[head][rows[sel]]
        return out


def path_errors(runs: SegmentRuns, rows: np.ndarray, masks: np.ndarray, j: int, labels: np.ndarray, horizon: str,
                red_next: Optional[int] = None) -> np.ndarray:
    """[len(rows), 3] float64: whether each path at gate j is wrong for the images ``rows``
    arriving with the segments of ``masks`` reduced: exit there, or the next segment at full /
    reduced precision (``red_next``: the segments that then run reduced, default the next one)
    and the horizon at full precision, answered by the final head (``final``) or the next head."""
    after = len(runs.segs) if horizon == "final" else j + 1
    red_next = 1 << j if red_next is None else red_next
    wrong = lambda logits: (logits.argmax(-1) != labels).astype(np.float64)
    return np.stack([wrong(runs.logits(rows, masks, j)), wrong(runs.logits(rows, masks, after)),
                     wrong(runs.logits(rows, masks | red_next, after))], 1)


def _fit_gate(j: int, block: int, runs: SegmentRuns, rows: np.ndarray, masks: np.ndarray, weight, y, topk, hidden,
              clusters, prior, horizon, targets, steps, lr, seed, cost) -> GateFit:
    """Gate j's MLP trained on the images ``rows``, each arriving with the segments of its
    ``masks`` run reduced: features from gate j's head under that mask; path errors: exit
    there, or the next segment at full / reduced precision, then the horizon at full precision."""
    red_next = (1 << j) if targets != "static" else sum(1 << s for s in range(len(runs.segs)))
    errors = path_errors(runs, rows, masks, j, y[rows], horizon, red_next)
    f = gate_features(runs.logits(rows, masks, j), topk)
    _, assign = kmeans(f, clusters, seed=seed + j)
    k = int(assign.max()) + 1
    e_hat, sizes = cluster_targets(assign, errors, k, prior, weight)
    target = e_hat[assign]
    weights, loss = train_gate_mlp(f, target, hidden, steps=steps, lr=lr, seed=seed + j, weight=weight)
    w = np.ones(len(rows)) if weight is None else np.asarray(weight, np.float64)
    mae = float((np.abs(gate_errors(f, weights) - target).mean(1) * w).sum() / w.sum())
    path_error = tuple(float(v) for v in (errors * w[:, None]).sum(0) / w.sum())
    return GateFit(block, cost, weights, path_error, e_hat, sizes, loss, mae, f)


def _advance(gf: GateFit, j: int, runs: SegmentRuns, mask: np.ndarray, alive: np.ndarray, lams: Sequence[float],
             topk: int) -> np.ndarray:
    """Gate j's decisions [L, N] (-1: not there) at each lambda, as the executor makes them on
    the logits of each image's own trajectory; leaving images stop being ``alive``, images
    going on reduced get bit j in ``mask`` (both updated in place)."""
    decisions = np.full(mask.shape, -1, np.int64)
    for li, lam in enumerate(lams):
        here = np.flatnonzero(alive[li])
        f = gate_features(runs.logits(here, mask[li, here], j), topk)
        d = gate_decisions(f, gf.weights, lam, gf.cost)
        decisions[li, here] = d
        alive[li, here[d == 0]] = False
        mask[li, here[d == 2]] |= 1 << j
    return decisions


def simulate(fit: "QueeFit", runs: SegmentRuns, lams: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
    """(masks, decisions), each [lambdas, gates, N]: the segments each image had run reduced on
    arriving at each gate and what the gate then decided (-1: never got there), computed from
    static runs (``fit.segment_runs``) -- what the executor does at each lambda, without it."""
    L, n, m = len(lams), runs.x.shape[0], len(fit.gates)
    mask, alive = np.zeros((L, n), np.int64), np.ones((L, n), bool)
    masks, decisions = np.zeros((L, m, n), np.int64), np.zeros((L, m, n), np.int64)
    for j, gf in enumerate(fit.gates):
        masks[:, j] = mask
        decisions[:, j] = _advance(gf, j, runs, mask, alive, lams, fit.topk)
    return masks, decisions


def path_predictions(fit: "QueeFit", runs: SegmentRuns, labels: np.ndarray, lam: float) -> Dict[str, np.ndarray]:
    """Every (image, gate) pair the gates at ``lam`` bring together on ``runs``' images: gate
    index, image row, arrival mask, decision, the MLP's predicted error of each path [.., 3]
    and the path's observed error [.., 3] (:func:`path_errors`, the fit's horizon): the
    material of a reliability plot."""
    labels = np.asarray(labels)
    masks, decisions = simulate(fit, runs, [lam])
    out = {k: [] for k in ("gate", "row", "mask", "decision", "predicted", "observed")}
    for j, gf in enumerate(fit.gates):
        rows = np.flatnonzero(decisions[0, j] >= 0)
        mk = masks[0, j, rows]
        out["gate"].append(np.full(len(rows), j))
        out["row"].append(rows)
        out["mask"].append(mk)
        out["decision"].append(decisions[0, j, rows])
        out["predicted"].append(gate_errors(gate_features(runs.logits(rows, mk, j), fit.topk), gf.weights))
        out["observed"].append(path_errors(runs, rows, mk, j, labels[rows], fit.meta["horizon"]))
    return {k: np.concatenate(v) for k, v in out.items()}


def _path_fits(seg_fits: List[GateFit], fit_gate, runs: SegmentRuns, n: int, topk: int, path_costs, sim_points: int = 8):
    """Gates trained in order on the trajectories images take (targets="path"): each image is
    followed through the gates already trained at every lambda of a simulation grid (0 and
    quantiles of the decision flips of the gates fitted on the full-precision trajectory);
    gate j is trained on every (image, history) pair that reaches it at some lambda, weighted
    by the share of the grid at which it does. Gate 0 sees one history (all full precision),
    so it is the segment fit's."""
    sim = _flip_lambdas(seg_fits, sim_points)
    L, m = len(sim), len(seg_fits)
    mask = np.zeros((L, n), np.int64)
    alive = np.ones((L, n), bool)
    fits, histories = [], {}
    for j in range(m):
        keys, counts = np.unique((np.arange(n)[None, :] * (1 << m) + mask)[alive], return_counts=True)
        if keys.size == 0:  # every image left before this gate at every lambda: nothing to learn from
            fits.append(seg_fits[j])
            continue
        rows, masks, weight = keys >> m, keys & ((1 << m) - 1), counts / L
        gf = seg_fits[j] if j == 0 else fit_gate(j, rows, masks, weight)
        fits.append(gf)
        histories[gf.block] = (rows, masks, weight)
        _advance(gf, j, runs, mask, alive, sim, topk)
    return fits, histories, sim


def _base_policy(base: Any, attention: Optional[int] = None) -> Policy:
    """A copy of ``base`` (no exits, no gates) with its attention bits resolved against
    ``attention`` (:func:`.common.resolve_attention`); turned to int8 attention, its name says so."""
    from ..convert import as_policy

    p = copy.deepcopy(as_policy(base))
    if p.exits or p.gates is not None:
        raise ValueError("the base policy must have no exits and no gates (QuEE places its own gate exits)")
    bits = resolve_attention(p, attention, "QuEE base policy")
    if bits != p.attn_bits:
        p.attn_bits, p.name = bits, f"{p.name}-attn{bits}"
    return p


def fit_quee(source: Source, data: CalibrationData, *, base: Any = "w8a8",
             reduced: LayerPolicy = LayerPolicy(w_bits=4, a_bits=8), gate_blocks: Optional[Sequence[int]] = None,
             every: int = 3, topk: int = 3, hidden: int = 12, clusters: int = 32, prior: float = 2.0,
             targets: str = "segment", horizon: str = "final", steps: int = 2000, lr: float = 0.02, seed: int = 0, exits: Any = None,
             batch: int = 256, num_threads: Optional[int] = None, workdir: Optional[Path] = None,
             costs: Optional[CostModel] = None, attention: Optional[int] = None) -> QueeFit:
    """Calibrate QuEE gates (module docstring) on ``data`` (normalised images + labels).

    source: the model (:mod:`.common`); its exit heads come from its checkpoint, or from
        ``exits`` ({block: {"norm.weight", "norm.bias", "fc.weight", "fc.bias"}}) as in
        :func:`pyruntime.convert.convert`.
    base: full-precision policy (shorthand, Policy or path; no exits). reduced: precision of
        the reduced copies of the block linears after the first gate.
    gate_blocks / every: where the gates go. topk, hidden: gate features and MLP width.
    clusters, prior: k-means centres per gate and the shrinkage of their error rates.
    targets: "segment" (default), "static" or "path"; horizon: "final" (default) or "next"
        (see the module docstring).
    steps, lr, seed: MLP training (Adam, full batch) and every random choice.
    costs: what a path costs -- BOPs (default) or, with a cost model built on a device's
        :class:`~pyruntime.latency.LatencyTable`, its seconds (normalised by the fp32 model's).
    attention: attention bits, 8 or 32 (default: the base's); ValueError if the base has int8
        attention and this says 32.
    """
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")
    if horizon not in HORIZONS:
        raise ValueError(f"horizon must be one of {HORIZONS}, got {horizon!r}")
    if len(data) < 1:
        raise ValueError("QuEE calibration needs at least one image")
    depth = source.depth
    gates = sorted(set(default_gate_blocks(depth, every) if gate_blocks is None else [int(b) for b in gate_blocks]))
    if not gates or gates[0] < 0 or gates[-1] > depth - 2:
        raise ValueError(f"gate blocks {gates} must be non-empty and lie in 0..{depth - 2}")
    if len(gates) > MAX_PATH_GATES and targets == "path":
        raise ValueError(f"targets='path' may run the calibration images once per combination of segment "
                         f"precisions (2^gates); at most {MAX_PATH_GATES} gates, got {len(gates)}")
    n_classes = source.arch["num_classes"]
    if not 1 <= topk <= n_classes:
        raise ValueError(f"topk must lie in 1..{n_classes}, got {topk}")
    base_pol = _base_policy(base, attention)
    base_pol.exits = [ExitPolicy(b, "gate") for b in gates]
    zeros = {"fc1.weight": np.zeros((hidden, topk + 1)), "fc1.bias": np.zeros(hidden),
             "fc2.weight": np.zeros((3, hidden)), "fc2.bias": np.zeros(3)}
    probe = copy.deepcopy(base_pol)
    probe.gates = GatePolicy(0.0, topk, hidden, {b: [0.0, 0.0, 0.0] for b in gates}, {"blocks.*": reduced},
                             {b: zeros for b in gates})
    probe.name = "quee-probe"
    graph, tensors = materialise(source, probe, exits, workdir)
    path_costs, fp32_cost = _costs(graph, gates, horizon, costs)
    fp32_bops = int(_cost_terms(graph, None)[3])

    y = np.asarray(data.labels)
    runs = SegmentRuns(graph, tensors, _segments(gates, depth), data.images, batch, num_threads)
    fit_gate = lambda j, rows, mask, w: _fit_gate(j, gates[j], runs, rows, mask, w, y, topk, hidden, clusters,
                                                   prior, horizon, targets, steps, lr, seed, path_costs[j])
    everyone = np.arange(len(y))
    fits = [fit_gate(j, everyone, np.zeros(len(y), np.int64), None) for j in range(len(gates))]
    histories, sim = {}, []
    if targets == "path":
        fits, histories, sim = _path_fits(fits, fit_gate, runs, len(y), topk, path_costs)
    feats = {gf.block: gf.features for gf in fits}
    full = runs.heads(0)

    meta = {
        "method": "quee", "base": base_pol.name, "reduced": reduced.to_dict(), "gate_blocks": gates,
        "targets": targets, "horizon": horizon, "topk": topk, "hidden": hidden, "clusters": clusters, "prior": prior, "steps": steps,
        "lr": lr, "seed": seed, "data": dict(data.summary), "cost_kind": "bops" if costs is None else costs.kind,
        "cost_normaliser_fp32": fp32_cost,
        "full_top1": float((full[-1].argmax(-1) == y).mean()), "static_runs": len(runs.cache),
        "sim_lambdas": sim,
        "gates": [gf.summary() for gf in fits],
    }
    return QueeFit(base_pol, reduced, topk, hidden, fits, graph, tensors, fp32_bops, feats, meta, histories)


def calibrate_quee(source: Source, data: CalibrationData, lam: float = 0.0, **kwargs) -> Policy:
    """The QuEE policy for one lambda (:func:`fit_quee` with ``kwargs``, then ``.policy(lam)``)."""
    return fit_quee(source, data, **kwargs).policy(lam)


# --- the accuracy-BOPs curve ---------------------------------------------------------------------

@dataclass
class CurvePoint:
    """One lambda measured by the runtime."""

    lam: float
    top1: float
    mean_bops: float
    bops_ratio: float          # mean BOPs / fp32 BOPs of the whole model without exits
    mean_exit_block: float
    exit_share: Dict[int, float]        # fraction of images leaving at each gate (depth-1: the end)
    reduced_share: float                # fraction of executed blocks run at reduced precision


def default_lambdas(fit: QueeFit, n: int = 12) -> List[float]:
    """0 and ``n`` quantiles of the positive lambdas at which a gate's decision flips on the
    calibration images (where (e_p - e_q) / (c_q - c_p) > 0), plus one beyond which every
    image exits at the first gate."""
    return _flip_lambdas(fit.gates, n)


def _flip_lambdas(gates: Sequence[GateFit], n: int) -> List[float]:
    """:func:`default_lambdas` over the gates' own training features."""
    cands = []
    for gf in gates:
        e = gate_errors(gf.features, gf.weights)
        c = np.asarray(gf.cost)
        for p in range(3):
            for q in range(p + 1, 3):
                dc = c[q] - c[p]
                if dc != 0:
                    lam = (e[:, p] - e[:, q]) / dc
                    cands.append(lam[lam > 0])
    cands = np.concatenate(cands) if cands else np.zeros(0)
    if cands.size == 0:
        return [0.0]
    qs = np.quantile(cands, np.linspace(0.02, 0.98, n))
    top = float(cands.max()) * 1.5
    return [0.0] + sorted(set(float(f"{v:.4g}") for v in qs)) + [float(f"{top:.4g}")]


def quee_curve(fit: QueeFit, images: np.ndarray, labels: np.ndarray, lambdas: Optional[Sequence[float]] = None,
               batch: int = 256, num_threads: Optional[int] = None) -> List[CurvePoint]:
    """top-1 and mean BOPs measured by the runtime on (held-out) normalised ``images`` for
    each lambda (default :func:`default_lambdas`)."""
    labels = np.asarray(labels)
    depth = fit.graph["arch"]["depth"]
    out = []
    for lam in (default_lambdas(fit) if lambdas is None else lambdas):
        r = fit.run(images, lam, batch, num_threads)
        eb = r["exit_block"]
        ran = r["block_path"] > 0
        out.append(CurvePoint(
            lam=float(lam), top1=float((r["logits"].argmax(-1) == labels).mean()), mean_bops=float(r["bops"].mean()),
            bops_ratio=float(r["bops"].mean() / fit.fp32_bops), mean_exit_block=float(eb.mean()),
            exit_share={int(b): float((eb == b).mean()) for b in fit.gate_blocks + [depth - 1]},
            reduced_share=float((r["block_path"] == 2).sum() / max(1, ran.sum()))))
    return out


def reference_points(fit: QueeFit, images: np.ndarray, labels: np.ndarray, batch: int = 256,
                     num_threads: Optional[int] = None) -> Dict[str, CurvePoint]:
    """The static models without gates on the same images, for comparison: ``full`` (base
    precision everywhere, no exits) and ``reduced`` (reduced copies after the first gate)."""
    labels = np.asarray(labels)
    depth = fit.graph["arch"]["depth"]
    out = {}
    for name, blocks in (("full", ()), ("reduced", range(fit.gate_blocks[0] + 1, depth))):
        g, t = static_variant(fit.graph, fit.tensors, blocks, exit_blocks=[])
        r = _probe_run(executor(g, t), images, False, batch, num_threads)
        out[name] = CurvePoint(float("nan"), float((r["logits"].argmax(-1) == labels).mean()), float(r["bops"].mean()),
                               float(r["bops"].mean() / fit.fp32_bops), float(depth - 1), {depth - 1: 1.0},
                               len(blocks) / depth)
    return out


# --- lambda from the user's validation images ----------------------------------------------------

class LambdaNotFound(ValueError):
    """No candidate lambda meets the accuracy or cost target on the validation images."""


@dataclass
class LambdaSearch:
    """The chosen lambda, its point and every candidate's, measured on the validation images."""

    lam: float
    point: CurvePoint
    reference_top1: float          # fp32 at full depth, no exits, on the same images
    curve: List[CurvePoint]
    images: int

    def summary(self) -> dict:
        return {"lambda": self.lam, "top1": self.point.top1, "fp32_top1": self.reference_top1,
                "mean_bops": self.point.mean_bops, "images": self.images,
                "candidates": [{"lambda": c.lam, "top1": c.top1, "mean_bops": c.mean_bops} for c in self.curve]}


def fp32_top1(source: Source, images, labels: np.ndarray, batch: int = 256, num_threads: Optional[int] = None) -> float:
    """top-1 of the fp32 model at full depth (no exits) on normalised ``images``, by the runtime."""
    g, t = materialise(source, Policy(name="fp32"))
    r = _probe_run(executor(g, t), images, False, batch, num_threads)
    return float((r["logits"].argmax(-1) == np.asarray(labels)).mean())


def check_target(max_drop: Optional[float], budget_bops: Optional[float]) -> None:
    """ValueError naming the problem unless the target is usable: at least one of ``max_drop``
    (a fraction in [0, 1)) and ``budget_bops`` (positive, finite)."""
    if max_drop is None and budget_bops is None:
        raise ValueError("choosing an operating point needs max_drop or budget_bops")
    if max_drop is not None and not (np.isfinite(max_drop) and 0 <= max_drop < 1):
        raise ValueError(f"max_drop is a fraction in [0, 1), got {max_drop}")
    if budget_bops is not None and not (np.isfinite(budget_bops) and budget_bops > 0):
        raise ValueError(f"budget_bops must be positive and finite, got {budget_bops}")


def select_point(curve: Sequence[Any], reference_top1: float, max_drop: Optional[float] = None,
                 budget_bops: Optional[float] = None, what: str = "lambda", images: Optional[int] = None):
    """The operating point of ``curve`` (items with ``top1`` and ``mean_bops`` measured on
    validation images) for a target: with ``max_drop`` the cheapest point whose top-1 is at most
    that far below ``reference_top1`` (and within ``budget_bops`` when given), with only
    ``budget_bops`` the most accurate point within it; ties to the earlier point. The one rule
    QuEE's lambda and its baselines' thresholds are chosen by. :class:`LambdaNotFound` names what
    was reachable when no point qualifies."""
    check_target(max_drop, budget_bops)
    curve = list(curve)
    if not curve:
        raise ValueError("select_point needs at least one candidate")

    def meets(c) -> bool:
        return ((max_drop is None or reference_top1 - c.top1 <= max_drop + 1e-12)
                and (budget_bops is None or c.mean_bops <= budget_bops * (1 + 1e-12)))

    order = {id(c): i for i, c in enumerate(curve)}
    ok = [c for c in curve if meets(c)]
    if not ok:
        best_acc = max(curve, key=lambda c: (c.top1, -c.mean_bops))
        cheapest = min(curve, key=lambda c: (c.mean_bops, -c.top1))
        name = lambda c: f"{what} {getattr(c, 'lam', getattr(c, 'label', '?'))}"
        target = " and ".join(t for t in (f"top-1 drop <= {100 * max_drop:g} points" if max_drop is not None else "",
                                           f"mean BOPs <= {budget_bops:.4g}" if budget_bops is not None else "") if t)
        raise LambdaNotFound(
            f"no {what} meets the target on the {images if images is not None else '?'} validation images ({target}; "
            f"fp32 full depth top-1 {reference_top1:.4f}): the most accurate {name(best_acc)} reaches top-1 "
            f"{best_acc.top1:.4f} (drop {100 * (reference_top1 - best_acc.top1):.2f} points) at "
            f"{best_acc.mean_bops:.4g} BOPs per image, the cheapest {name(cheapest)} costs {cheapest.mean_bops:.4g} "
            f"BOPs at top-1 {cheapest.top1:.4f}")
    if max_drop is not None:
        return min(ok, key=lambda c: (c.mean_bops, -c.top1, order[id(c)]))
    return max(ok, key=lambda c: (c.top1, -c.mean_bops, -order[id(c)]))


def choose_lambda(fit: QueeFit, source: Source, val: CalibrationData, max_drop: Optional[float] = None,
                  budget_bops: Optional[float] = None, grid: int = 24, batch: int = 256,
                  num_threads: Optional[int] = None) -> LambdaSearch:
    """lambda for ``fit`` from the validation images ``val`` alone (module docstring) by
    :func:`select_point`: the cheapest one within ``max_drop`` (a fraction: 0.01 is one top-1
    point) of fp32 at full depth, also within ``budget_bops`` when given, or with ``budget_bops``
    alone the most accurate one whose mean BOPs per image is within it."""
    check_target(max_drop, budget_bops)
    ref = fp32_top1(source, val.images, val.labels, batch, num_threads)
    curve = quee_curve(fit, val.images, val.labels, default_lambdas(fit, grid), batch, num_threads)
    chosen = select_point(curve, ref, max_drop, budget_bops, "lambda", len(val))
    return LambdaSearch(chosen.lam, chosen, ref, curve, len(val))
