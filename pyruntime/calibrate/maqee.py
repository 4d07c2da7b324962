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
* **Promise** (risk) [ours, after Jazbec et al. 2024, "Fast yet Safe: early-exiting with risk
  control"]: the risk of a policy is the share of *lost images* -- images the fp32 model at full
  depth gets right and the policy gets wrong. Each image's loss is 0/1, so the number lost on n
  images is exactly binomial and the exact (Clopper-Pearson) test applies without a normal
  approximation; and since top-1(fp32) - top-1(policy) = lost share - gained share, the risk
  bounds the top-1 drop from above. (The drop itself is a difference of two dependent rates, not
  a binomial count: it has no exact test, and bounding it would let images the policy gains
  hide ones it loses.) ``max_drop`` is the allowed risk epsilon, ``delta`` the probability the
  certificate may fail. The APQ paper speaks of "explicit risk control" without its exact risk
  in the text we have; this is our reading.
* **Fit and validation**: the *fit* images (Fisher traces, layer errors, the bit alternation
  and its provisional thresholds) and the *validation* images that alone choose the operating
  point. ``validation`` passed in (the reference model: training images 55000..59999, which
  it never saw), or else ``holdout`` (a quarter) of the calibration images split off by a fixed
  permutation (``seed``). The policy's meta records ``chosen_on: "validation"`` and both sizes.
* **Measurements** come from the runtime itself (:mod:`.probe`): the quantised model with
  every exit head evaluated and nobody leaving gives each head's score on each image, so any
  thresholds can be replayed exactly as the executor decides (:mod:`.thresholds`).
* **Cost** (:class:`.common.CostModel`, ``bops`` or ``latency``): the expected cost per image
  ``CostModel.expected(graph, reach)`` -- for BOPs exactly ``pyruntime.bops.expected``: the
  patch embedding and block 0 for everyone, block b and its exit head for the fraction
  ``reach[b]`` of images that get there, the final head for those reaching the last block.
  It is affine in reach, so the search evaluates it as ``c0 + sum_b reach[b] * c_b``.
* **Threshold grid** (:func:`threshold_grid`): one threshold shared by every head, tried from
  safest (1: nobody leaves) to boldest over 1 and ``grid`` quantiles of the *fp32* model's exit
  scores on the fit images -- fixed before validation is seen and the same for every
  allocation and for the PTQ+exits baselines (tools/results_maqee.py).
* **BSR**: with the quantised model's scores s_e(i), a decision at head e is *at risk* if the
  image reaches head e and |s_e(i) - tau_e| < delta_e, where delta_e (default) is the
  ``bsr_quantile`` (0.9) quantile over the images of |s_e^q(i) - s_e^fp32(i)|: how far
  quantisation moves that head's score. BSR = at-risk decisions per image; heads with tau = 1
  carry no risk. Thresholds whose BSR on the fit images exceeds ``bsr_max`` are left out of the
  sequence (a filter fixed before validation).
* **Outer** (thresholds for fixed bits, :func:`search_thresholds`): Learn-then-Test
  (:func:`certify`, :func:`pyruntime.stats.learn_then_test`): along the grid from safest to
  boldest, test "risk > epsilon" with the exact binomial p-value P[Bin(n, epsilon) <= lost],
  stop at the first candidate that fails; every candidate before it is certified; the answer
  is the cheapest certified one. During the alternation the fit images only set the reach the
  bits are chosen for, and a few hundred of them cannot certify a small risk at all, so there
  the answer is the cheapest threshold whose fit risk is at most :func:`certifiable_rate` --
  the largest share of lost images the validation set will still certify (at the level
  delta / (rounds + 1)): the reach the budget is spent for is the reach validation is expected
  to allow, not a bolder one (which would leave the bits at 8 while validation then certifies
  only dearer thresholds).
* **Sensitivity** (``sensitivity``): ``"exits"`` (default) -- Omega_l is the type-aware trace of
  the Fisher of each image's summed losses over the heads it reaches under the current
  thresholds (:func:`.fisher.exit_fisher_traces`): a layer is weighted by how many images reach
  it *and* by the losses of every exit head that reads it, not only the final head's; its error
  E_l(w, a) is measured on the images that reach it (:func:`reach_errors`). ``"final"`` -- the
  earlier reading, kept for the ablation: Omega_l from the final head's Fisher over every fit
  image, E_l over every error image, both multiplied by r_l.
* **Inner** (bits for fixed reach): LampQ's ILP (:func:`.ilp.solve`): minimise
  sum_l e_l * Omega_l * E_l(w, a) subject to expected cost <= ``budget``, each layer's cost
  counted r_l = reach of its block times (at least one image's worth, 1/N). E_l is the relative
  output error of layer l at (w, a) with the current allocation quantised upstream
  (:func:`.lampq.measure_errors`) -- the accumulated drift, our QID. With ``"final"``, e_l = r_l:
  weighting both error and cost by r_l leaves every layer's error per unit of cost as it was,
  so reach acts only through the budget (the same expected budget buys more 8-bit layers when
  images leave early) -- which is why ``"exits"`` puts reach into Omega and uses e_l = 1, so a
  rarely reached layer is also cheap to get wrong.
* **Options** (default): weights 4 or 8 bits, activations 8. Offering 4- and 6-bit activations
  too (``a_bits=(4, 6, 8)``) lets the ILP trade them against 4-bit weights on the layer-error
  proxy.
* **Alternation** (fit images): start from every allocated layer at its most expensive option
  (W8A8: round 0 is "PTQ + exits"), outer, inner, ... until the bits repeat or ``rounds``.
* **Operating point** (validation images): for each of the S evaluated allocations,
  Learn-then-Test over the grid (BSR filter from the fit images) at level delta / S, so that
  all certified points of all allocations hold together with probability >= 1 - delta
  (Bonferroni); the answer is the certified point with the least expected cost on validation
  within ``budget`` (choosing among certified points keeps the guarantee). The chosen policy
  then runs with real exits on the validation images (the runtime's exits, BOPs, top-1 and
  risk: ``MaqeeResult.held_*``); ``risk_bound`` is its Clopper-Pearson upper bound at level
  delta / S. Few validation images cannot certify a small epsilon at all (no lost image in n
  needs (1 - epsilon)^n <= level): the error says how many would.
* **Attention** (``attention``, default 32): with 8, every quantised state runs its attention
  matmuls on int8 operands -- in the runtime that measures the exits, in the emulation that
  measures the layer errors -- and the expected cost counts them at 8 x 8 BOPs (or asks the
  latency table for a graph with int8 attention, which a table that does not cover it
  refuses). The promise's reference stays the fp32 model, attention included.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..policy import ExitPolicy, Policy, check_attn_bits
from ..stats import binomial_tail_p, clopper_pearson, learn_then_test
from . import ilp
from .common import COST_UNITS, CalibrationData, CostModel, Source, model_graph, scope_layers
from .emulate import QuantModel
from .ilp import format_amount
from .lampq import bits_policy, fisher_traces_for, measure_errors, options, type_aware_sensitivity
from .probe import executor, materialise, run
from ..bops import reach_from_exits
from .thresholds import scores, simulate

__all__ = ["MaqeeConfig", "MaqeeResult", "Replay", "Operating", "SENSITIVITIES", "threshold_grid", "certify",
           "certifiable_rate", "search_thresholds", "layer_reach", "layer_block", "allocate_bits", "calibrate_maqee", "BudgetNotMet"]

Bits = Tuple[int, int]
SENSITIVITIES = ("exits", "final")


class BudgetNotMet(ValueError):
    """No evaluated state met the expected-cost budget with a certified risk."""


@dataclass
class MaqeeConfig:
    """The knobs of MAQEE (see the module docstring)."""

    max_drop: float = 0.01               # epsilon: the risk (lost images, a fraction) certified on validation
    delta: float = 0.05                  # the certificate fails with probability at most delta
    rule: str = "confidence"             # exit rule: "confidence" | "margin"
    exit_blocks: Optional[Sequence[int]] = None   # default: 0 .. depth-2
    sensitivity: str = "exits"           # "exits": reach-weighted Fisher of the exit losses; "final": the final head's
    bsr_max: float = 0.25                # at-risk exit decisions per image (on the fit images)
    bsr_delta: Optional[float] = None    # one delta for every head; default per head from the drift
    bsr_quantile: float = 0.9
    w_bits: Sequence[int] = (4, 8)
    a_bits: Sequence[int] = (8,)         # 4/6-bit activations: see the module docstring
    scope: str = "blocks"
    cost: str = "bops"                   # "bops" | "latency" (needs a latency table)
    rounds: int = 6                      # inner re-allocations at most
    grid: int = 64                       # fp32 fit-score quantiles in the shared threshold grid
    holdout: float = 0.25                # validation fraction of the calibration images (without ``validation``)
    seed: int = 0
    fisher_batch: int = 64
    fisher_images: Optional[int] = None  # the first N fit images give the Fisher traces (default all)
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
    """Shared thresholds and what they do on one set of images."""

    thresholds: List[float]
    top1: float
    risk: float              # lost images: share the fp32 model at full depth gets right and this policy wrong
    risk_bound: float        # Clopper-Pearson upper bound of the risk at the level it was certified (nan: not)
    cost: float
    bsr: float
    reach: np.ndarray
    feasible: bool           # certified (and, where it applies, BSR within its cap)


class Replay:
    """Every head's score and correctness on a set of images under one quantised model, and
    the model's expected cost as an affine function of reach; evaluates thresholds exactly as
    the executor applies them."""

    def __init__(self, exit_logits: np.ndarray, final_logits: np.ndarray, labels: np.ndarray, rule: str,
                 blocks: Sequence[int], depth: int, step_costs: Sequence[float], delta: np.ndarray,
                 reference_correct: np.ndarray):
        self.scores = scores(exit_logits, rule)                                   # [E, N]
        logits = np.concatenate([exit_logits, final_logits[None]], 0)
        self.correct = logits.argmax(-1) == np.asarray(labels)[None]               # [E+1, N]
        self.reference = np.asarray(reference_correct, bool)                       # fp32 full depth, [N]
        self.blocks = np.array(list(blocks) + [depth - 1])
        self.depth = depth
        s = np.asarray(step_costs, np.float64)       # cost when exactly blocks 0..k-1 run, k = 1..depth
        self.c0, self.dc = s[0], np.diff(s)          # cost = c0 + sum_{b>=1} reach[b] * dc[b-1]
        self.delta = np.asarray(delta, np.float64)

    @property
    def n(self) -> int:
        return self.scores.shape[1]

    def last_blocks(self, thresholds: Sequence[float]) -> np.ndarray:
        """Per image, the last block it runs (its exit head's block, depth - 1 for the final head)."""
        return self.blocks[simulate(self.scores, np.asarray(thresholds, np.float64))]

    def right(self, thresholds: Sequence[float]) -> np.ndarray:
        """Per image: the head that answers it under ``thresholds`` is right."""
        head = simulate(self.scores, np.asarray(thresholds, np.float64))
        return self.correct[head, np.arange(self.n)]

    def lost(self, thresholds: Sequence[float]) -> np.ndarray:
        """Per image: the fp32 model at full depth is right and the policy is wrong."""
        return self.reference & ~self.right(thresholds)

    def evaluate(self, thresholds: Sequence[float]) -> Tuple[float, float, float, float, np.ndarray]:
        """(top-1, risk, expected cost, BSR, reach) of ``thresholds``; risk = the share of
        lost images (:meth:`lost`)."""
        t = np.asarray(thresholds, np.float64)
        head = simulate(self.scores, t)
        right = self.correct[head, np.arange(self.n)]
        eb = self.blocks[head]
        reach = (eb[None, :] >= np.arange(self.depth)[:, None]).mean(1)
        cost = float(self.c0 + np.dot(reach[1:], self.dc))
        reaching = head[None, :] >= np.arange(len(t))[:, None]
        risky = reaching & (np.abs(self.scores - t[:, None]) < self.delta[:, None]) & (t[:, None] < 1.0)
        risk = float((self.reference & ~right).mean())
        return float(right.mean()), risk, cost, float(risky.sum() / self.n), reach


def threshold_grid(fp_exit_scores: np.ndarray, grid: int) -> np.ndarray:
    """The shared thresholds tried, safest first: 1 (nobody leaves), then ``grid`` quantiles of
    the fp32 model's exit scores on the fit images (every head pooled), descending. It depends
    on neither the validation images nor the quantised model, so the same grid serves every
    method compared and the Learn-then-Test sequence is fixed before validation is seen."""
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    s = np.asarray(fp_exit_scores, np.float64).ravel()
    q = np.quantile(s, np.linspace(0.0, 1.0, grid)) if s.size else np.zeros(0)
    return np.unique(np.clip(np.concatenate([q, [1.0]]), 0.0, 1.0))[::-1]


def _check_risk(max_risk: float, delta: float) -> None:
    if not (isinstance(max_risk, (int, float)) and 0 < max_risk < 1):
        raise ValueError(f"the allowed risk (max_drop, epsilon) must be a fraction in (0, 1), got {max_risk}")
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"delta must lie in (0, 1), got {delta}")


def certify(replay: Replay, grid: Sequence[float], max_risk: float, delta: float,
            allowed: Optional[Sequence[bool]] = None) -> List[Operating]:
    """Learn-then-Test over the shared thresholds ``grid`` (safest first), restricted to
    ``allowed`` (a mask fixed before these images were seen; default all): the exact binomial
    test of "risk > ``max_risk``" for each in turn at level ``delta``, stopping at the first
    that fails (:func:`pyruntime.stats.learn_then_test`). Every returned point's risk is at most
    ``max_risk`` with probability >= 1 - delta, jointly; each carries its Clopper-Pearson upper
    bound at level delta."""
    _check_risk(max_risk, delta)
    grid = np.asarray(grid, np.float64)
    keep = np.ones(len(grid), bool) if allowed is None else np.asarray(allowed, bool)
    E = replay.scores.shape[0]
    cands = [[float(t)] * E for t in grid[keep]]
    lost = [int(replay.lost(t).sum()) for t in cands]
    out = []
    for j in learn_then_test(lost, replay.n, max_risk, delta):
        top1, risk, cost, bsr, reach = replay.evaluate(cands[j])
        bound = clopper_pearson(lost[j], replay.n, delta, "upper")[1]
        out.append(Operating(cands[j], top1, risk, bound, cost, bsr, reach, True))
    return out


def certifiable_rate(n: int, max_risk: float, level: float) -> float:
    """The largest share of lost images on ``n`` images that Learn-then-Test still certifies
    at most ``max_risk`` at ``level`` (-1 if not even none does): the fit images' stand-in for
    what the validation images will certify."""
    _check_risk(max_risk, level)
    k = -1
    while k + 1 <= n and binomial_tail_p(k + 1, n, max_risk) <= level:
        k += 1
    return k / n if k >= 0 else -1.0


def search_thresholds(replay: Replay, grid: Sequence[float], max_risk: float, delta: Optional[float], bsr_max: float,
                      allowed: Optional[Sequence[bool]] = None) -> Operating:
    """The outer step: the cheapest certified shared threshold (:func:`certify`) whose BSR on
    ``replay``'s images is at most ``bsr_max`` (``allowed``: that mask taken from other images
    instead); if none is certified, never exiting, marked infeasible. ``delta`` None: the
    cheapest whose risk *on these images* is at most ``max_risk``, no certificate (the fit
    images' provisional thresholds: a few hundred images cannot certify a small risk at all,
    and they only set the reach the bits are chosen for)."""
    E = replay.scores.shape[0]
    if allowed is None:
        allowed = [replay.evaluate([t] * E)[3] <= bsr_max + 1e-12 for t in grid]
    if delta is None:
        if not 0 <= max_risk < 1:
            raise ValueError(f"the fit risk must be a fraction in [0, 1), got {max_risk}")
        ops = [replay.evaluate([float(t)] * E) for t, a in zip(grid, allowed) if a]
        ok = [Operating([float(t)] * E, top1, risk, float("nan"), cost, bsr, reach, True)
              for t, (top1, risk, cost, bsr, reach) in zip([t for t, a in zip(grid, allowed) if a], ops)
              if risk <= max_risk]
    else:
        ok = certify(replay, grid, max_risk, delta, allowed)
    if ok:
        return min(ok, key=lambda o: (o.cost, -o.top1))
    never = [1.0] * replay.scores.shape[0]
    top1, risk, cost, bsr, reach = replay.evaluate(never)
    return Operating(never, top1, risk, float("nan"), cost, bsr, reach, False)


# --- reach-weighted bits -------------------------------------------------------------------------

def layer_block(name: str, depth: int) -> int:
    """The block whose reach a layer shares: its own (``blocks.b``, ``exits.b``), 0 for the patch
    embedding (everyone runs it), the last block for the final head."""
    if name.startswith(("blocks.", "exits.")):
        return int(name.split(".")[1])
    return 0 if name == "patch_embed" else depth - 1


def layer_reach(names: Sequence[str], reach: Sequence[float]) -> List[float]:
    """r_l of each layer: its block's reach (patch embedding 1, the final heads the last block's)."""
    r = np.asarray(reach, np.float64)
    return [1.0 if n == "patch_embed" else float(r[layer_block(n, len(r))]) for n in names]


def allocate_bits(costs: CostModel, graph: Mapping, names: Sequence[str], opts: Sequence[Bits],
                  pick: Mapping[str, Bits], omega: Mapping[str, float], errors: Mapping[str, Sequence[float]],
                  reach: Sequence[float], budget: float, floor: float = 0.0, block_size: int = 32,
                  error_weights: Optional[Sequence[float]] = None) -> Dict[str, Bits]:
    """The inner step: (w, a) per layer minimising sum e_l * Omega_l * E_l(w, a) subject to
    the expected cost ``costs.expected`` <= ``budget``, where ``graph`` holds the current
    ``pick`` (for the cost of everything not allocated), a layer's cost counts r_l = max(reach
    of l, ``floor``) times and e_l is ``error_weights`` (default r_l: sensitivity "final";
    "exits" passes 1, its Omega already carries reach). A budget the reach cannot meet gives
    every layer its cheapest option."""
    r = layer_reach(names, reach)
    w = [max(v, floor) for v in r]
    e = w if error_weights is None else [float(v) for v in error_weights]
    choices = [[(wi * costs.cost(n, a, b, block_size), ei * omega[n] * errors[n][j]) for j, (a, b) in enumerate(opts)]
               for n, wi, ei in zip(names, w, e)]
    # what the allocated layers do not pay; the floor on r_l only makes the ILP's cost a hair
    # above the true expected cost, which is safe
    fixed = costs.expected(graph, reach) - math.fsum(ri * costs.cost(n, *pick[n], block_size) for ri, n in zip(r, names))
    try:
        sel = ilp.solve(choices, budget, fixed_cost=fixed, unit=costs.unit())
    except ilp.InfeasibleBudget:
        sel = [int(np.argmin([c for c, _ in ch])) for ch in choices]
    return {n: opts[j] for n, j in zip(names, sel)}


def reach_errors(measure, names: Sequence[str], last_block: np.ndarray, depth: int) -> Dict[str, List[float]]:
    """Each layer's error measured on the images that reach it: ``measure(names, rows)`` once
    per distinct set of reaching images (layers of blocks with no exit between them share one);
    a layer no image reaches is measured on all of them (its sensitivity is then zero anyway)."""
    groups: Dict[bytes, Tuple[np.ndarray, List[str]]] = {}
    everyone = np.arange(len(last_block))
    for n in names:
        rows = np.flatnonzero(last_block >= layer_block(n, depth))
        rows = rows if rows.size else everyone
        groups.setdefault(rows.tobytes(), (rows, []))[1].append(n)
    out: Dict[str, List[float]] = {}
    for rows, group in groups.values():
        out.update(measure(group, rows))
    return out


def _policy(names: Sequence[str], pick: Mapping[str, Bits], exits: Sequence[ExitPolicy], block_size: int,
            name: str = "maqee", meta: Optional[dict] = None, attn_bits: int = 32) -> Policy:
    return bits_policy({n: pick[n] for n in names}, block_size, name, meta, exits, attn_bits)


def _exits(blocks: Sequence[int], rule: str, thresholds: Sequence[float]) -> List[ExitPolicy]:
    return [ExitPolicy(int(b), rule, float(t)) for b, t in zip(blocks, thresholds)]


def _step_costs(costs: CostModel, graph: Mapping) -> List[float]:
    """Expected cost when exactly blocks 0..k-1 run, for k = 1..depth (reach is a step)."""
    depth = graph["arch"]["depth"]
    return [costs.expected(graph, [1.0] * k + [0.0] * (depth - k)) for k in range(1, depth + 1)]


def head_params(source: Source, exits=None) -> Dict[int, Dict[str, np.ndarray]]:
    """The exit heads the converted model will carry ({block: params}): ``exits``, else the
    source's, else the checkpoint's ``exits.*`` tensors."""
    from ..convert import _exit_heads, _read_state_dict, _split_exits

    heads = exits if exits is not None else source.exits
    if heads is None and source.checkpoint is not None:
        heads = _split_exits(_read_state_dict(Path(source.checkpoint)))[1]
    return _exit_heads(heads, source.arch)


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
                "fit_top1": round(self.op.top1, 5), "fit_risk": round(self.op.risk, 5), "cost": self.op.cost,
                "bsr": round(self.op.bsr, 4), "feasible": self.op.feasible, "within_budget": self.within_budget}


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
    bsr: float                       # on the validation images
    held_top1: float                 # held_*: the validation images, which chose the operating point
    held_reference_top1: float
    held_drop: float                 # fp32 top-1 minus the policy's on the validation images
    held_risk: float                 # lost images (fp32 right, policy wrong), share of the validation images
    risk_bound: float                # its Clopper-Pearson upper bound at the certificate's level
    risk_level: float                # that level: delta / the allocations tested (Bonferroni)
    held_cost: float                 # expected cost on the validation images (runtime's exits)
    held_bops: float                 # mean BOPs per validation image, as the runtime counted them
    history: List[dict]
    max_drop: float = 0.01
    delta: float = 0.05
    sensitivity: str = "exits"
    certified: int = 0               # candidates certified over every allocation
    fit_images: int = 0
    validation_images: int = 0
    held_exit_block: Optional[np.ndarray] = None    # per validation image, the runtime's exit block
    held_block_path: Optional[np.ndarray] = None
    held_logits: Optional[np.ndarray] = None
    held_labels: Optional[np.ndarray] = None
    held_rows: Optional[np.ndarray] = None          # the validation images' rows in their data
    omega: Dict[str, float] = field(default_factory=dict)    # the sensitivity of the last re-allocation
    traces: Dict[str, float] = field(default_factory=dict)   # final-head Fisher traces (sensitivity "final")

    def report(self) -> str:
        unit = COST_UNITS[self.cost_kind]
        lines = [f"sensitivity: {self.sensitivity}",
                 "round  w4  a-bits   fit top-1  fit risk  expected cost     BSR  ok"]
        for h in self.history:
            lines.append(f"{h['round']:5d} {h['w4_layers']:3d}  {','.join(map(str, h['a_bits'])):7s} {h['fit_top1']:9.4f}  "
                         f"{h['fit_risk']:8.4f}  {h['cost']:13.6g} {h['bsr']:7.3f}  "
                         f"{'yes' if h['feasible'] and h['within_budget'] else 'no'}")
        lines.append("thresholds " + " ".join(f"b{b}:{t:.4f}" for b, t in zip(self.exit_blocks, self.thresholds))
                     + f" (chosen on the {self.validation_images} validation images)")
        lines.append(f"fit ({self.fit_images} images): top-1 {self.fit_top1:.4f} (fp32 full depth "
                     f"{self.fit_reference_top1:.4f}), expected {format_amount(self.fit_cost)} {unit}")
        lines.append(f"validation (held-out from the bits, {self.validation_images} images): top-1 {self.held_top1:.4f} "
                     f"(fp32 full depth {self.held_reference_top1:.4f}, drop {100 * self.held_drop:.2f} points), "
                     f"expected {format_amount(self.held_cost)} {unit} of budget {format_amount(self.budget)}, "
                     f"BSR {self.bsr:.3f}")
        lines.append(f"risk (images fp32 gets right and the policy wrong): {100 * self.held_risk:.2f}% on validation, "
                     f"Clopper-Pearson upper bound {100 * self.risk_bound:.2f}% at level {self.risk_level:.3g}; "
                     f"certified <= {100 * self.max_drop:g}% with probability >= {1 - self.delta:g} "
                     f"(Learn-then-Test, {self.certified} candidates certified)")
        if self.held_exit_block is not None:
            from .routes import route_lines

            lines += route_lines(self.held_exit_block, self.held_block_path, self.held_logits, self.held_labels,
                                 self.exit_blocks, gates=False)
        return "\n".join(lines)


def _deltas(cfg: MaqeeConfig, q_logits: np.ndarray, fp_logits: np.ndarray) -> np.ndarray:
    if cfg.bsr_delta is not None:
        return np.full(q_logits.shape[0], float(cfg.bsr_delta))
    drift = np.abs(scores(q_logits, cfg.rule) - scores(fp_logits, cfg.rule))
    return np.quantile(drift, cfg.bsr_quantile, axis=1) if drift.size else np.zeros(q_logits.shape[0])


def _check(cfg: MaqeeConfig, depth: int, budget: float) -> List[int]:
    _check_risk(cfg.max_drop, cfg.delta)
    if cfg.rule not in ("confidence", "margin"):
        raise ValueError(f"exit rule must be 'confidence' or 'margin', got {cfg.rule!r}")
    if cfg.sensitivity not in SENSITIVITIES:
        raise ValueError(f"sensitivity must be one of {SENSITIVITIES}, got {cfg.sensitivity!r}")
    if not cfg.bsr_max >= 0:
        raise ValueError(f"bsr_max must be >= 0, got {cfg.bsr_max}")
    if cfg.fisher_images is not None and cfg.fisher_images < 1:
        raise ValueError(f"fisher_images must be >= 1, got {cfg.fisher_images}")
    if not 0 < cfg.bsr_quantile <= 1:
        raise ValueError(f"bsr_quantile must lie in (0, 1], got {cfg.bsr_quantile}")
    if not (math.isfinite(budget) and budget > 0):
        raise ValueError(f"budget must be a positive expected cost per image, got {budget}")
    check_attn_bits(cfg.attention)
    blocks = sorted(set(range(depth - 1) if cfg.exit_blocks is None else (int(b) for b in cfg.exit_blocks)))
    if not blocks or blocks[0] < 0 or blocks[-1] > depth - 2:
        raise ValueError(f"exit blocks {blocks} must be non-empty and lie in 0..{depth - 2}")
    return blocks


def _uncertifiable(n: int, max_risk: float, level: float) -> str:
    """Why nothing can be certified with ``n`` images, when even zero lost images would not do."""
    need = math.ceil(math.log(level) / math.log1p(-max_risk))
    return (f"; with {n} validation images even no lost image certifies a risk of {100 * max_risk:g}% at level "
            f"{level:.3g} (at least {need} images needed)" if n < need else "")


def calibrate_maqee(source: Source, data: CalibrationData, budget: float, cfg: Optional[MaqeeConfig] = None, *,
                    validation: Optional[CalibrationData] = None, costs: Optional[CostModel] = None, exits=None,
                    traces: Optional[Mapping[str, float]] = None, fisher_cache: Optional[dict] = None) -> MaqeeResult:
    """A MAQEE policy (bits + exit thresholds) for ``source`` whose expected cost per image is
    at most ``budget`` (BOPs, or seconds with ``cfg.cost = "latency"``) and whose risk -- the
    share of images the fp32 model at full depth gets right that the policy gets wrong, which
    bounds its top-1 drop -- is certified at most ``cfg.max_drop`` with probability at least
    1 - ``cfg.delta`` on the validation images.

    validation: the images that choose the operating point (default: ``cfg.holdout`` of
        ``data``, split off by ``cfg.seed``; ``data`` then fits). costs: the cost model
        (default ``CostModel(source, cfg.cost)``; pass one built with a latency table for
        ``latency``). exits: exit-head weights when the checkpoint lacks them (as
        :func:`pyruntime.convert.convert`). traces: final-head Fisher traces from an earlier
        result on the same data (``res.traces``). fisher_cache: a dict this call reads and
        fills with the exit-aware Fisher traces per reach pattern, to sweep budgets cheaply.
    Raises :class:`BudgetNotMet` if no evaluated state meets the budget with a certified risk.
    """
    import torch

    cfg = cfg or MaqeeConfig()
    depth = source.depth
    blocks = _check(cfg, depth, float(budget))
    costs = costs or CostModel(source, cfg.cost)
    opts = options(cfg)
    all_layers = source.layer_names()
    names = scope_layers(all_layers, cfg.scope)
    if validation is None:
        fit_rows, val_rows = data.split_rows(cfg.holdout, cfg.seed)
        fit, val = data.take(fit_rows, "fit"), data.take(val_rows, "validation")
    else:
        fit, val, val_rows = data, validation, np.arange(len(validation))
    fisher_cache = {} if fisher_cache is None else fisher_cache

    closed = _exits(blocks, cfg.rule, [1.0] * len(blocks))  # every head evaluated, nobody leaving
    # fp32 at full depth: the reference top-1, and the exit scores the drift is measured against
    fp_ex = executor(*materialise(source, _policy([], {}, closed, 32, "fp32"), exits))
    fp_fit = run(fp_ex, fit.images, True, cfg.batch, cfg.num_threads)
    fp_val = run(fp_ex, val.images, True, cfg.batch, cfg.num_threads)
    del fp_ex
    fp_right = fp_fit["logits"].argmax(-1) == fit.labels
    ref_fit = float(fp_right.mean())
    fp_val_right = fp_val["logits"].argmax(-1) == val.labels
    grid = threshold_grid(scores(fp_fit["exit_logits"], cfg.rule), cfg.grid)

    model = source.model.eval()
    fisher_rows = np.arange(len(fit) if cfg.fisher_images is None else min(cfg.fisher_images, len(fit)))
    fisher_data = fit.take(fisher_rows, "fit")
    if cfg.sensitivity == "final":
        traces = dict(traces) if traces is not None else fisher_traces_for(model, names, fisher_data, cfg)
        omega = type_aware_sensitivity(traces, True)
    else:
        traces, omega = {}, {}
        heads = {b: h for b, h in head_params(source, exits).items() if b in blocks}
        fit_hash = hashlib.sha256(np.ascontiguousarray(np.asarray(fisher_data.images[:len(fisher_data)]), np.float32)
                                  .tobytes() + np.asarray(fisher_data.labels, np.int64).tobytes()).hexdigest()
    qm = QuantModel(model)
    err_rows = np.arange(min(cfg.error_images, len(fit)))
    err_data = fit.take(err_rows, "fit")
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
                      fp_right_)

    def errors_on(pick: Mapping[str, Bits], group: Sequence[str], rows: np.ndarray) -> Dict[str, List[float]]:
        return measure_errors(qm, group, opts, err_data.take(rows, "fit"), pick, all_layers, cfg.block_size,
                              cfg.error_batch, cfg.show_progress, cfg.attention)

    def exit_omega(last_block: np.ndarray) -> Dict[str, float]:
        from .fisher import exit_fisher_traces

        key = ("exits", fit_hash, tuple(names), tuple(sorted(heads)), last_block.tobytes())
        if key not in fisher_cache:
            fisher_cache[key] = exit_fisher_traces(model, names, fisher_data, heads, last_block, cfg.fisher_batch,
                                                   cfg.show_progress)
        return type_aware_sensitivity(fisher_cache[key], True)

    def reallocate(pick: Mapping[str, Bits], fit_replay: Replay, op: Operating) -> Dict[str, Bits]:
        nonlocal omega
        graph = model_graph(source, quantised(pick, closed))
        if cfg.sensitivity == "final":
            errors = errors_on(pick, names, np.arange(len(err_data)))
            return allocate_bits(costs, graph, names, opts, pick, omega, errors, op.reach, budget, 1.0 / len(fit),
                                 cfg.block_size)
        last = fit_replay.last_blocks(op.thresholds)
        omega = exit_omega(last[fisher_rows])
        errors = reach_errors(lambda group, rows: errors_on(pick, group, rows), names, last[err_rows], depth)
        return allocate_bits(costs, graph, names, opts, pick, omega, errors, op.reach, budget, 1.0 / len(fit),
                             cfg.block_size, error_weights=[1.0] * len(names))

    # the fit images aim at what validation will certify: a fit risk no larger than the share of
    # lost validation images that still passes the test at the level the states will share
    fit_risk = max(certifiable_rate(len(val), cfg.max_drop, cfg.delta / (cfg.rounds + 1)), 0.0)
    with torch.no_grad():
        states: List[State] = []
        fit_replays: List[Replay] = []
        seen = set()
        for k in range(cfg.rounds + 1):
            fit_replays.append(replay(pick, fit, fp_fit, fp_right))
            op = search_thresholds(fit_replays[-1], grid, fit_risk, None, cfg.bsr_max)
            states.append(State(k, dict(pick), op, op.cost <= budget * (1 + 1e-12)))
            seen.add(tuple(sorted(pick.items())))
            if k == cfg.rounds:
                break
            new = reallocate(pick, fit_replays[-1], op)
            if tuple(sorted(new.items())) in seen:
                break
            pick = new

    # The operating point: Learn-then-Test on the validation images for every allocation, at
    # level delta / (allocations) so that every certified point of every allocation holds
    # jointly (Bonferroni); the candidates and their BSR filter come from the fit images.
    level = cfg.delta / len(states)
    E = len(blocks)
    certified: List[Tuple[int, Operating]] = []
    for i, (s, fr) in enumerate(zip(states, fit_replays)):
        allowed = [fr.evaluate([t] * E)[3] <= cfg.bsr_max + 1e-12 for t in grid]
        certified += [(i, o) for o in certify(replay(s.pick, val, fp_val, fp_val_right), grid, cfg.max_drop, level,
                                              allowed)]
    ok = [(i, o) for i, o in certified if o.cost <= budget * (1 + 1e-12)]
    if not ok:
        cheapest = min((o.cost for _, o in certified), default=float("nan"))
        raise BudgetNotMet(
            f"budget {format_amount(budget)} {costs.unit()} per image (expected) cannot be met with a certified risk of "
            f"at most {100 * cfg.max_drop:g}% lost images (delta {cfg.delta:g}) on the {len(val)} validation images: "
            f"the cheapest certified policy costs {format_amount(cheapest)} {costs.unit()}" if certified else
            f"budget {format_amount(budget)} {costs.unit()} per image (expected) cannot be met: no policy's risk is "
            f"certified at most {100 * cfg.max_drop:g}% lost images (delta {cfg.delta:g}, level {level:.3g}) on the "
            f"{len(val)} validation images (fp32 validation top-1 {fp_val_right.mean():.4f})"
            + _uncertifiable(len(val), cfg.max_drop, level))
    best, op = min(ok, key=lambda io: (io[1].cost, -io[1].top1))
    pick = states[best].pick
    fit_top1, _, fit_cost, _, _ = fit_replays[best].evaluate(op.thresholds)

    policy = quantised(pick, _exits(blocks, cfg.rule, op.thresholds))
    g, t = materialise(source, policy, exits)
    h = run(executor(g, t), val.images, False, cfg.batch, cfg.num_threads)
    held_right = h["logits"].argmax(-1) == val.labels
    held_risk = float((fp_val_right & ~held_right).mean())
    drop = float(fp_val_right.mean() - held_right.mean())
    held_reach = reach_from_exits(g, h["exit_block"])
    held_cost = costs.expected(model_graph(source, policy), held_reach)
    meta = {"calibration": dict(data.summary), "method": "maqee", "cost_kind": costs.kind, "budget": float(budget),
            "chosen_on": "validation", "validation": dict(val.summary), "fit_images": len(fit),
            "validation_images": len(val), "split_seed": cfg.seed, "expected_cost_validation": float(held_cost),
            "expected_cost_fit": fit_cost, "max_drop": cfg.max_drop, "delta": cfg.delta, "risk_level": level,
            "risk": "lost images: fp32 at full depth right, policy wrong", "validation_risk": held_risk,
            "risk_bound": op.risk_bound, "certified": len(certified), "sensitivity": cfg.sensitivity,
            "bsr": op.bsr, "bsr_max": cfg.bsr_max, "rule": cfg.rule, "options": [list(o) for o in opts],
            "fit_top1": fit_top1, "fp32_fit_top1": ref_fit, "validation_top1": float(held_right.mean()),
            "fp32_validation_top1": float(fp_val_right.mean()), "validation_drop": drop,
            "rounds": [s.summary() for s in states]}
    policy = quantised(pick, _exits(blocks, cfg.rule, op.thresholds), meta)
    return MaqeeResult(policy, dict(pick), list(op.thresholds), blocks, float(budget), costs.kind, fit_cost, fit_top1,
                       ref_fit, op.bsr, float(held_right.mean()), float(fp_val_right.mean()), drop, held_risk,
                       op.risk_bound, level, float(held_cost), float(h["bops"].mean()), [s.summary() for s in states],
                       cfg.max_drop, cfg.delta, cfg.sensitivity, len(certified), len(fit), len(val), h["exit_block"],
                       h["block_path"], h["logits"], np.asarray(val.labels), val_rows, omega, traces)
