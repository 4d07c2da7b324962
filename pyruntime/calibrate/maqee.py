"""APQ / MAQEE: exit thresholds and per-layer bits chosen together, each layer's cost
weighted by how often images reach it (Fang et al., 2026; /work/shared/papers.md). Only the
abstract is available; everything marked [ours] is our reading.

[stated] A layer's precision matters in proportion to how often images reach it, and exit
decisions become unstable under quantisation noise. MAQEE is bi-level: an outer search over
exit thresholds controlled by a risk metric (Boundary Sensitivity Risk), and an inner
re-allocation of per-layer bits by utilisation and accumulated distortion (Quantization-
Induced Drift), alternated until stable.

What we built [ours]:

* **Model**: the source with exit heads after ``exit_blocks`` (default: every block but the
  last, as the reference model ships them), rule ``confidence`` (max softmax) or ``margin``.
* **Promise**: top-1 at most ``max_drop`` below the fp32 model run to full depth (no exits).
* **Fit and validation** [ours]: the calibration images split by a fixed permutation
  (``seed``) into a *fit* part (Fisher traces, layer errors, the bit alternation and its
  provisional thresholds) and a *validation* part (``holdout``, a quarter by default) that
  alone chooses the operating point: the exit thresholds of the policy, its promise check and
  the expected cost the budget is held to. The policy's meta records ``chosen_on:
  "validation"`` and both sizes.
* **Measurements** come from the runtime itself (:mod:`.probe`): the quantised model with
  every exit head evaluated and nobody leaving gives each head's score on each image, so any
  thresholds can be replayed exactly as the executor decides (:mod:`.thresholds`).
* **Cost** (:class:`.common.CostModel`, ``bops`` or ``latency``): the expected cost per image
  ``CostModel.expected(graph, reach)`` -- for BOPs exactly ``pyruntime.bops.expected``: the
  patch embedding and block 0 for everyone, block b and its exit head for the fraction
  ``reach[b]`` of images that get there, the final head for those reaching the last block.
  It is affine in reach, so the search evaluates it as ``c0 + sum_b reach[b] * c_b``.
* **BSR** (risk): with the quantised model's scores s_e(i), a decision at head e is *at risk*
  if the image reaches head e and |s_e(i) - tau_e| < delta_e, where delta_e (default) is the
  ``bsr_quantile`` (0.9) quantile over the fit images of |s_e^q(i) - s_e^fp32(i)|: how far
  quantisation moves that head's score. BSR = at-risk decisions per image (the sum over heads
  of the share of images at risk there); heads with tau = 1 (never exit) carry no risk.
* **Outer** (thresholds for fixed bits): minimise expected cost subject to BSR <=
  ``bsr_max`` and the fit drop's upper confidence bound <= ``max_drop``: the mean of the paired
  per-image differences d_i = [fp32 right] - [policy right] plus ``z`` (1.645) standard
  errors. One threshold shared by every head, from a grid of score quantiles; ``sweeps`` > 0
  adds passes of coordinate descent over per-head thresholds (each head at its own score
  quantiles and at 1). Measured on the reference model (768 fit images, budget 0.4-0.5x
  W8A8): per-head thresholds exploit the fit images -- fit top-1 *above* fp32, yet 0.7-1.1
  points lost on the 10,000 test images for a 0.5-point promise -- while the shared
  threshold kept it (-0.33 points), so shared is the default.
* **Inner** (bits for fixed reach): LampQ's ILP (:func:`.ilp.solve`) with per-layer weights
  r_l = reach of the layer's block (at least one image's worth, 1/N): minimise
  sum_l r_l * Omega_l * E_l(w, a) subject to expected cost <= ``budget``. Omega_l is LampQ's
  type-aware Fisher sensitivity; E_l(w, a) the relative output error of layer l at (w, a)
  with the current allocation quantised upstream (:func:`.lampq.measure_errors`) -- the
  accumulated drift, our QID. Weighting both error and cost by r_l leaves every layer's error
  per unit of cost as it was, so reach acts through the budget: the same expected budget buys
  more 8-bit layers when images leave early (the exits pay for the bits).
* **Options** (default): weights 4 or 8 bits, activations 8. Offering 4- and 6-bit activations
  too (``a_bits=(4, 6, 8)``) lets the ILP trade them against 4-bit weights on the layer-error
  proxy, which on the reference model picks allocations that cannot keep a 0.5-point promise
  at 0.4x W8A8's BOPs, while weights-only allocation keeps it there (85.80% at 1.48 GBOPs on the
  10,000 test images against fp32's 86.18%).
* **Alternation** (fit images): start from every allocated layer at its most expensive option
  (W8A8: round 0 is "PTQ + exits"), outer, inner, ... until the bits repeat or ``rounds``.
* **Operating point** (validation images): for every evaluated bit allocation the outer search
  runs again on the validation images' scores (their own BSR deltas and fp32 reference); the
  answer is the allocation and thresholds with the least expected cost on validation that keep
  the drop bound (``z`` standard errors above the validation drop) at most ``max_drop``, BSR at
  most ``bsr_max`` and the budget. The chosen policy then runs with real exits on the
  validation images (the runtime's exits, BOPs and top-1: ``MaqeeResult.held_*``);
  ``promise_kept`` says whether the validation drop bound is within ``max_drop`` (true by
  construction, kept as a check that the replay and the runtime agree). The fit-image numbers
  of the same thresholds are reported beside it. Images calibration never saw are the real
  judge (with a few hundred validation images the bound is about a point wide).
* **Attention** (``attention``, default 32): with 8, every quantised state runs its attention
  matmuls on int8 operands -- in the runtime that measures the exits, in the emulation that
  measures the layer errors -- and the expected cost counts them at 8 x 8 BOPs (or asks the
  latency table for a graph with int8 attention, which a table that does not cover it
  refuses). The promise's reference stays the fp32 model, attention included.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..policy import ExitPolicy, Policy, check_attn_bits
from . import ilp
from .common import COST_UNITS, CalibrationData, CostModel, Source, model_graph, scope_layers
from .emulate import QuantModel
from .ilp import format_amount
from .lampq import bits_policy, fisher_traces_for, measure_errors, options, type_aware_sensitivity
from .probe import executor, materialise, run
from ..bops import reach_from_exits
from .thresholds import scores, simulate

__all__ = ["MaqeeConfig", "MaqeeResult", "Replay", "search_thresholds", "layer_reach", "allocate_bits", "calibrate_maqee",
           "BudgetNotMet"]

Bits = Tuple[int, int]


class BudgetNotMet(ValueError):
    """No evaluated state met the expected-cost budget while keeping the accuracy promise."""


@dataclass
class MaqeeConfig:
    """The knobs of MAQEE (see the module docstring)."""

    max_drop: float = 0.005              # top-1 (fraction) the policy may lose against fp32 full depth
    rule: str = "confidence"             # exit rule: "confidence" | "margin"
    exit_blocks: Optional[Sequence[int]] = None   # default: 0 .. depth-2
    bsr_max: float = 0.25                # at-risk exit decisions per image
    bsr_delta: Optional[float] = None    # one delta for every head; default per head from the drift
    bsr_quantile: float = 0.9
    z: float = 1.645                     # standard errors added to the fit drop (one-sided 95%)
    w_bits: Sequence[int] = (4, 8)
    a_bits: Sequence[int] = (8,)         # 4/6-bit activations: see the module docstring
    scope: str = "blocks"
    cost: str = "bops"                   # "bops" | "latency" (needs a latency table)
    rounds: int = 6                      # inner re-allocations at most
    grid: int = 64                       # score quantiles tried per head
    sweeps: int = 0                      # coordinate-descent passes over per-head thresholds
    holdout: float = 0.25                # validation fraction of the calibration images
    seed: int = 0
    fisher_batch: int = 64
    error_images: int = 256
    error_batch: int = 128
    block_size: int = 32
    attention: int = 32                  # attention matmuls of the quantised states: 32 fp32, 8 int8
    batch: int = 256                     # runtime batch
    num_threads: Optional[int] = None    # runtime threads
    show_progress: bool = True


# --- replaying thresholds on collected exit scores -------------------------------------------------

@dataclass
class Operating:
    """Thresholds and what they do on the fit images."""

    thresholds: List[float]
    top1: float
    drop_bound: float        # upper confidence bound of the top-1 drop against fp32 full depth
    cost: float
    bsr: float
    reach: np.ndarray
    feasible: bool


class Replay:
    """Every head's score and correctness on a set of images under one quantised model, and
    the model's expected cost as an affine function of reach; evaluates thresholds exactly as
    the executor applies them."""

    def __init__(self, exit_logits: np.ndarray, final_logits: np.ndarray, labels: np.ndarray, rule: str,
                 blocks: Sequence[int], depth: int, step_costs: Sequence[float], delta: np.ndarray,
                 reference_correct: np.ndarray, z: float = 1.645):
        self.scores = scores(exit_logits, rule)                                   # [E, N]
        logits = np.concatenate([exit_logits, final_logits[None]], 0)
        self.correct = logits.argmax(-1) == np.asarray(labels)[None]               # [E+1, N]
        self.reference = np.asarray(reference_correct, np.float64)                 # fp32 full depth, [N]
        self.z = float(z)
        self.blocks = np.array(list(blocks) + [depth - 1])
        self.depth = depth
        s = np.asarray(step_costs, np.float64)       # cost when exactly blocks 0..k-1 run, k = 1..depth
        self.c0, self.dc = s[0], np.diff(s)          # cost = c0 + sum_{b>=1} reach[b] * dc[b-1]
        self.delta = np.asarray(delta, np.float64)

    @property
    def n(self) -> int:
        return self.scores.shape[1]

    def evaluate(self, thresholds: Sequence[float]) -> Tuple[float, float, float, float, np.ndarray]:
        """(top-1, drop bound, expected cost, BSR, reach) of ``thresholds``. The drop bound is
        the one-sided upper confidence bound (``z`` standard errors) of the mean paired
        difference fp32-right minus policy-right: what the images were not fitted on may see."""
        t = np.asarray(thresholds, np.float64)
        head = simulate(self.scores, t)
        right = self.correct[head, np.arange(self.n)]
        top1 = float(right.mean())
        drop, se = _paired_drop(self.reference, right)
        bound = drop + self.z * se
        eb = self.blocks[head]
        reach = (eb[None, :] >= np.arange(self.depth)[:, None]).mean(1)
        cost = float(self.c0 + np.dot(reach[1:], self.dc))
        reaching = head[None, :] >= np.arange(len(t))[:, None]
        risky = reaching & (np.abs(self.scores - t[:, None]) < self.delta[:, None]) & (t[:, None] < 1.0)
        return top1, bound, cost, float(risky.sum() / self.n), reach

    def candidates(self, grid: int) -> List[np.ndarray]:
        """Per head: ``grid`` quantiles of its scores in [0, 1], and 1 (never exit)."""
        q = np.linspace(0.0, 1.0, grid)
        return [np.unique(np.clip(np.concatenate([np.quantile(s, q), [1.0]]), 0.0, 1.0)) for s in self.scores]


def search_thresholds(replay: Replay, max_drop: float, bsr_max: float, grid: int = 64, sweeps: int = 2) -> Operating:
    """The outer step: thresholds with the least expected cost whose drop bound is at most
    ``max_drop`` and BSR at most ``bsr_max``; if none is (even never exiting loses too much),
    the never-exit thresholds, marked infeasible."""
    E = replay.scores.shape[0]

    def op(t) -> Operating:
        top1, bound, cost, bsr, reach = replay.evaluate(t)
        return Operating([float(v) for v in t], top1, bound, cost, bsr, reach,
                         bound <= max_drop + 1e-12 and bsr <= bsr_max + 1e-12)

    def better(a: Operating, b: Operating) -> bool:
        return a.feasible and (a.cost < b.cost or (a.cost == b.cost and a.top1 > b.top1))

    best = op([1.0] * E)
    if E == 0:
        return best
    cands = replay.candidates(grid)
    for t in np.unique(np.concatenate(cands)):
        o = op([t] * E)
        if better(o, best) or (o.feasible and not best.feasible):
            best = o
    for _ in range(sweeps):
        changed = False
        for e in range(E):
            for c in cands[e]:
                if c == best.thresholds[e]:
                    continue
                t = list(best.thresholds)
                t[e] = float(c)
                o = op(t)
                if better(o, best):
                    best, changed = o, True
        if not changed:
            break
    return best


# --- reach-weighted bits -------------------------------------------------------------------------

def layer_reach(names: Sequence[str], reach: Sequence[float]) -> List[float]:
    """r_l of each layer: its block's reach (patch embedding 1, the final heads the last block's)."""
    r = np.asarray(reach, np.float64)
    out = []
    for n in names:
        if n.startswith(("blocks.", "exits.")):
            out.append(float(r[int(n.split(".")[1])]))
        elif n == "patch_embed":
            out.append(1.0)
        else:
            out.append(float(r[-1]))
    return out


def allocate_bits(costs: CostModel, graph: Mapping, names: Sequence[str], opts: Sequence[Bits],
                  pick: Mapping[str, Bits], omega: Mapping[str, float], errors: Mapping[str, Sequence[float]],
                  reach: Sequence[float], budget: float, floor: float = 0.0, block_size: int = 32) -> Dict[str, Bits]:
    """The inner step: (w, a) per layer minimising sum r_l * Omega_l * E_l(w, a) subject to
    the expected cost ``costs.expected`` <= ``budget``, where ``graph`` holds the current
    ``pick`` (for the cost of everything not allocated) and r_l = max(reach of l, ``floor``).
    A budget the reach cannot meet gives every layer its cheapest option."""
    r = layer_reach(names, reach)
    w = [max(v, floor) for v in r]
    choices = [[(costs.cost(n, a, b, block_size), omega[n] * errors[n][j]) for j, (a, b) in enumerate(opts)]
               for n in names]
    # what the allocated layers do not pay; the floor on r_l only makes the ILP's cost a hair
    # above the true expected cost, which is safe
    fixed = costs.expected(graph, reach) - math.fsum(ri * costs.cost(n, *pick[n], block_size) for ri, n in zip(r, names))
    try:
        sel = ilp.solve(choices, budget, weights=w, fixed_cost=fixed, unit=costs.unit())
    except ilp.InfeasibleBudget:
        sel = [int(np.argmin([c for c, _ in ch])) for ch in choices]
    return {n: opts[j] for n, j in zip(names, sel)}


def _policy(names: Sequence[str], pick: Mapping[str, Bits], exits: Sequence[ExitPolicy], block_size: int,
            name: str = "maqee", meta: Optional[dict] = None, attn_bits: int = 32) -> Policy:
    return bits_policy({n: pick[n] for n in names}, block_size, name, meta, exits, attn_bits)


def _exits(blocks: Sequence[int], rule: str, thresholds: Sequence[float]) -> List[ExitPolicy]:
    return [ExitPolicy(int(b), rule, float(t)) for b, t in zip(blocks, thresholds)]


def _step_costs(costs: CostModel, graph: Mapping) -> List[float]:
    """Expected cost when exactly blocks 0..k-1 run, for k = 1..depth (reach is a step)."""
    depth = graph["arch"]["depth"]
    return [costs.expected(graph, [1.0] * k + [0.0] * (depth - k)) for k in range(1, depth + 1)]


@dataclass
class State:
    """One evaluated (bits, thresholds) pair of the alternation."""

    round: int
    pick: Dict[str, Bits]
    op: Operating
    within_budget: bool

    def summary(self) -> dict:
        w4 = sum(1 for w, _ in self.pick.values() if w == 4)
        abits = sorted({a for _, a in self.pick.values()})
        return {"round": self.round, "w4_layers": w4, "a_bits": abits, "thresholds": [round(t, 6) for t in self.op.thresholds],
                "fit_top1": round(self.op.top1, 5), "cost": self.op.cost, "bsr": round(self.op.bsr, 4),
                "feasible": self.op.feasible, "within_budget": self.within_budget}


@dataclass
class MaqeeResult:
    policy: Policy
    pick: Dict[str, Bits]
    thresholds: List[float]
    exit_blocks: List[int]
    budget: float
    cost_kind: str
    fit_cost: float                  # expected cost per image on the fit images (cost model)
    fit_top1: float
    fit_reference_top1: float        # fp32, full depth, fit images
    bsr: float
    held_top1: float                 # held_*: the validation images (held out from the bits), which chose the thresholds
    held_reference_top1: float
    held_drop: float                 # fp32 top-1 minus the policy's on the validation images
    held_drop_se: float              # its standard error (paired)
    held_cost: float                 # expected cost on the validation images (runtime's exits)
    held_bops: float                 # mean BOPs per validation image, as the runtime counted them
    promise_kept: bool               # the validation drop's upper bound is within max_drop
    history: List[dict]
    fit_images: int = 0
    validation_images: int = 0
    held_exit_block: Optional[np.ndarray] = None    # per validation image, the runtime's exit block
    held_block_path: Optional[np.ndarray] = None
    held_logits: Optional[np.ndarray] = None
    held_labels: Optional[np.ndarray] = None
    held_rows: Optional[np.ndarray] = None          # the validation images' rows in the calibration data
    omega: Dict[str, float] = field(default_factory=dict)
    traces: Dict[str, float] = field(default_factory=dict)

    def report(self) -> str:
        unit = COST_UNITS[self.cost_kind]
        lines = ["round  w4  a-bits   fit top-1  expected cost     BSR  ok"]
        for h in self.history:
            lines.append(f"{h['round']:5d} {h['w4_layers']:3d}  {','.join(map(str, h['a_bits'])):7s} {h['fit_top1']:9.4f}  "
                         f"{h['cost']:13.6g} {h['bsr']:7.3f}  {'yes' if h['feasible'] and h['within_budget'] else 'no'}")
        lines.append("thresholds " + " ".join(f"b{b}:{t:.4f}" for b, t in zip(self.exit_blocks, self.thresholds))
                     + f" (chosen on the {self.validation_images} validation images)")
        lines.append(f"fit ({self.fit_images} images): top-1 {self.fit_top1:.4f} (fp32 full depth "
                     f"{self.fit_reference_top1:.4f}), expected {format_amount(self.fit_cost)} {unit}")
        lines.append(f"validation (held-out from the bits, {self.validation_images} images): top-1 {self.held_top1:.4f} "
                     f"(fp32 full depth {self.held_reference_top1:.4f}, drop {100 * self.held_drop:.2f} +- "
                     f"{100 * self.held_drop_se:.2f} points), expected {format_amount(self.held_cost)} {unit} of budget "
                     f"{format_amount(self.budget)}, BSR {self.bsr:.3f}; promise "
                     f"{'kept' if self.promise_kept else 'NOT kept'}")
        if self.held_exit_block is not None:
            from .routes import route_lines

            lines += route_lines(self.held_exit_block, self.held_block_path, self.held_logits, self.held_labels,
                                 self.exit_blocks, gates=False)
        return "\n".join(lines)


def _paired_drop(reference_right: np.ndarray, right: np.ndarray) -> Tuple[float, float]:
    """Mean and standard error of [reference right] - [policy right] over the same images."""
    d = np.asarray(reference_right, np.float64) - np.asarray(right, np.float64)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0


def _deltas(cfg: MaqeeConfig, q_logits: np.ndarray, fp_logits: np.ndarray) -> np.ndarray:
    if cfg.bsr_delta is not None:
        return np.full(q_logits.shape[0], float(cfg.bsr_delta))
    drift = np.abs(scores(q_logits, cfg.rule) - scores(fp_logits, cfg.rule))
    return np.quantile(drift, cfg.bsr_quantile, axis=1) if drift.size else np.zeros(q_logits.shape[0])


def _check(cfg: MaqeeConfig, depth: int, budget: float) -> List[int]:
    if not 0 <= cfg.max_drop < 1:
        raise ValueError(f"max_drop is a fraction in [0, 1), got {cfg.max_drop}")
    if cfg.rule not in ("confidence", "margin"):
        raise ValueError(f"exit rule must be 'confidence' or 'margin', got {cfg.rule!r}")
    if not cfg.bsr_max >= 0:
        raise ValueError(f"bsr_max must be >= 0, got {cfg.bsr_max}")
    if not 0 < cfg.bsr_quantile <= 1:
        raise ValueError(f"bsr_quantile must lie in (0, 1], got {cfg.bsr_quantile}")
    if not (math.isfinite(budget) and budget > 0):
        raise ValueError(f"budget must be a positive expected cost per image, got {budget}")
    check_attn_bits(cfg.attention)
    blocks = sorted(set(range(depth - 1) if cfg.exit_blocks is None else (int(b) for b in cfg.exit_blocks)))
    if not blocks or blocks[0] < 0 or blocks[-1] > depth - 2:
        raise ValueError(f"exit blocks {blocks} must be non-empty and lie in 0..{depth - 2}")
    return blocks


def calibrate_maqee(source: Source, data: CalibrationData, budget: float, cfg: Optional[MaqeeConfig] = None, *,
                    costs: Optional[CostModel] = None, exits=None,
                    traces: Optional[Mapping[str, float]] = None) -> MaqeeResult:
    """A MAQEE policy (bits + exit thresholds) for ``source`` whose expected cost per image is
    at most ``budget`` (BOPs, or seconds with ``cfg.cost = "latency"``) and whose top-1 is at
    most ``cfg.max_drop`` below fp32 at full depth.

    costs: the cost model (default ``CostModel(source, cfg.cost)``; pass one built with a
        latency table for ``latency``). exits: exit-head weights when the checkpoint lacks
        them (as :func:`pyruntime.convert.convert`). traces: Fisher traces from an earlier
        result on the same data (``res.traces``), to sweep budgets without recomputing them.
    Raises :class:`BudgetNotMet` if no evaluated state meets the budget and the promise.
    """
    import torch

    cfg = cfg or MaqeeConfig()
    depth = source.depth
    blocks = _check(cfg, depth, float(budget))
    costs = costs or CostModel(source, cfg.cost)
    opts = options(cfg)
    all_layers = source.layer_names()
    names = scope_layers(all_layers, cfg.scope)
    fit_rows, val_rows = data.split_rows(cfg.holdout, cfg.seed)
    fit, val = data.take(fit_rows, "fit"), data.take(val_rows, "validation")

    closed = _exits(blocks, cfg.rule, [1.0] * len(blocks))  # every head evaluated, nobody leaving
    # fp32 at full depth: the reference top-1, and the exit scores the drift is measured against
    fp_ex = executor(*materialise(source, _policy([], {}, closed, 32, "fp32"), exits))
    fp_fit = run(fp_ex, fit.images, True, cfg.batch, cfg.num_threads)
    fp_val = run(fp_ex, val.images, True, cfg.batch, cfg.num_threads)
    del fp_ex
    fp_right = fp_fit["logits"].argmax(-1) == fit.labels
    ref_fit = float(fp_right.mean())
    fp_val_right = fp_val["logits"].argmax(-1) == val.labels

    model = source.model.eval()
    traces = dict(traces) if traces is not None else fisher_traces_for(model, names, fit, cfg)
    omega = type_aware_sensitivity(traces, True)
    qm = QuantModel(model)
    err_data = fit.take(np.arange(min(cfg.error_images, len(fit))), "fit")
    pick: Dict[str, Bits] = {n: (max(cfg.w_bits), max(cfg.a_bits)) for n in names}

    def quantised(pick: Mapping[str, Bits], exits_: Sequence[ExitPolicy], meta: Optional[dict] = None) -> Policy:
        """A state's policy: ``pick``'s bits, the exits, attention at ``cfg.attention``."""
        return _policy(names, pick, exits_, cfg.block_size, "maqee", meta, cfg.attention)

    def replay(pick: Mapping[str, Bits], part: CalibrationData, fp: Mapping, fp_right_: np.ndarray) -> Replay:
        """Convert with ``pick`` and collect every head on ``part``'s images."""
        policy = quantised(pick, closed)
        r = run(executor(*materialise(source, policy, exits)), part.images, True, cfg.batch, cfg.num_threads)
        return Replay(r["exit_logits"], r["logits"], part.labels, cfg.rule, blocks, depth,
                      _step_costs(costs, model_graph(source, policy)), _deltas(cfg, r["exit_logits"], fp["exit_logits"]),
                      fp_right_, cfg.z)

    def reallocate(pick: Mapping[str, Bits], reach: np.ndarray) -> Dict[str, Bits]:
        errors = measure_errors(qm, names, opts, err_data, pick, all_layers, cfg.block_size, cfg.error_batch,
                                cfg.show_progress, cfg.attention)
        graph = model_graph(source, quantised(pick, closed))
        return allocate_bits(costs, graph, names, opts, pick, omega, errors, reach, budget, 1.0 / len(fit), cfg.block_size)

    with torch.no_grad():
        states: List[State] = []
        fit_replays: List[Replay] = []
        seen = set()
        for k in range(cfg.rounds + 1):
            fit_replays.append(replay(pick, fit, fp_fit, fp_right))
            op = search_thresholds(fit_replays[-1], cfg.max_drop, cfg.bsr_max, cfg.grid, cfg.sweeps)
            states.append(State(k, dict(pick), op, op.cost <= budget * (1 + 1e-12)))
            seen.add(tuple(sorted(pick.items())))
            if k == cfg.rounds:
                break
            new = reallocate(pick, op.reach)
            if tuple(sorted(new.items())) in seen:
                break
            pick = new

    # the operating point: every allocation's thresholds searched again on the validation images
    val_ops = [search_thresholds(replay(s.pick, val, fp_val, fp_val_right), cfg.max_drop, cfg.bsr_max, cfg.grid,
                                 cfg.sweeps) for s in states]
    ok = [i for i, o in enumerate(val_ops) if o.feasible and o.cost <= budget * (1 + 1e-12)]
    if not ok:
        feas = [o for o in val_ops if o.feasible]
        cheapest = min((o.cost for o in feas), default=float("nan"))
        raise BudgetNotMet(
            f"budget {format_amount(budget)} {costs.unit()} per image (expected) cannot be met while keeping top-1 "
            f"within {100 * cfg.max_drop:g} points of fp32 (BSR <= {cfg.bsr_max}) on the {len(val)} validation images: "
            f"the cheapest policy found that keeps the promise costs {format_amount(cheapest)} {costs.unit()}" if feas else
            f"budget {format_amount(budget)} {costs.unit()} per image (expected) cannot be met: no policy keeps top-1 "
            f"within {100 * cfg.max_drop:g} points of fp32 on the {len(val)} validation images at BSR <= {cfg.bsr_max} "
            f"(fp32 validation top-1 {fp_val_right.mean():.4f}; more validation images narrow the bound)")
    best = min(ok, key=lambda i: (val_ops[i].cost, -val_ops[i].top1))
    pick, op = states[best].pick, val_ops[best]
    fit_top1, _, fit_cost, _, _ = fit_replays[best].evaluate(op.thresholds)

    policy = quantised(pick, _exits(blocks, cfg.rule, op.thresholds))
    g, t = materialise(source, policy, exits)
    h = run(executor(g, t), val.images, False, cfg.batch, cfg.num_threads)
    held_right = h["logits"].argmax(-1) == val.labels
    drop, se = _paired_drop(fp_val_right, held_right)
    kept = drop + cfg.z * se <= cfg.max_drop + 1e-12
    held_reach = reach_from_exits(g, h["exit_block"])
    held_cost = costs.expected(model_graph(source, policy), held_reach)
    meta = {"calibration": dict(data.summary), "method": "maqee", "cost_kind": costs.kind, "budget": float(budget),
            "chosen_on": "validation", "fit_images": len(fit), "validation_images": len(val),
            "split_seed": cfg.seed, "expected_cost_validation": float(held_cost), "expected_cost_fit": fit_cost,
            "max_drop": cfg.max_drop, "z": cfg.z, "bsr": op.bsr, "bsr_max": cfg.bsr_max,
            "rule": cfg.rule, "options": [list(o) for o in opts], "fit_top1": fit_top1, "fp32_fit_top1": ref_fit,
            "validation_top1": float(held_right.mean()), "fp32_validation_top1": float(fp_val_right.mean()),
            "validation_drop": drop, "validation_drop_se": se, "rounds": [s.summary() for s in states]}
    policy = quantised(pick, _exits(blocks, cfg.rule, op.thresholds), meta)
    return MaqeeResult(policy, dict(pick), list(op.thresholds), blocks, float(budget), costs.kind, fit_cost, fit_top1,
                       ref_fit, op.bsr, float(held_right.mean()), float(fp_val_right.mean()), drop, se,
                       float(held_cost), float(h["bops"].mean()), kept, [s.summary() for s in states],
                       len(fit), len(val), h["exit_block"], h["block_path"], h["logits"], np.asarray(val.labels),
                       val_rows, omega, traces)
