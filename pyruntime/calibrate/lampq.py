"""LampQ: layer-wise mixed precision from a type-aware Fisher sensitivity, allocated by
integer linear programming under a BOPs or size budget (Kim et al., AAAI 2026; see
/work/shared/papers.md -- only abstracts are available, so most details are ours).

Steps, with what the paper states and what we chose:

1. Sensitivity [stated]: Omega_i = alpha_t * tr(F_i), F_i the diagonal empirical Fisher of
   layer i's weights from squared gradients of the loss on calibration images
   (:mod:`.fisher`: exact per-sample gradients, summed over images).
   alpha_t [ours] = 1 / mean tr(F) over the allocated layers of type t, t in {qkv, proj,
   fc1, fc2, patch_embed, head} ("type-aware", [stated] the largest effect in its ablation).
   ``type_aware=False`` uses alpha = 1 (the ablation).
2. Layer error E_i(w, a) [ours]: the relative squared error of the layer's output,
   ||y_q - y_fp||^2 / ||y_fp||^2, over the first ``error_images`` (256) calibration images
   (every image contributes tokens x outputs values, so a few hundred suffice), where y_q is the layer at
   w-bit weights (the runtime's quantiser) and a-bit dynamic activations. ``initial=
   "measured"`` measures round 0 with every other layer in fp32; ``"model"`` starts from the
   Delta^2/12 model instead (relative weight error from the runtime's weight step sizes plus
   1/(4 qmax_a^2) for activations spread over their range).
3. Allocation [stated: ILP]: one option (w, a) per layer from ``w_bits`` x ``a_bits``,
   minimise sum Omega_i * E_i(w, a) subject to the cost budget (:func:`.ilp.solve`, exact).
   Cost [ours]: ``pyruntime.bops`` (MACs x w x a, the whole model, fixed fp32 parts
   included) or the model file's bytes.
4. Refinement [stated: "refined iteratively using the measured quantisation error (a few
   rounds)"]: re-measure every E_i(w, a) with the *current allocation of the other layers
   in place* (layer i's input comes from the quantised model; y_fp from the fp32 model),
   re-solve, stop when the allocation repeats or after ``rounds`` rounds.

Scales stay dynamic (``scale="dynamic"``); compose with :mod:`.static` or
:mod:`.scalepredictor` for other scale modes. ``attention`` 8 [ours] measures every E_i
with int8 attention emulated (against the fp32 model's outputs, so the drift the attention
adds upstream counts), writes it into the policy and costs the attention matmuls at 8 x 8 in
the fixed part of the budget; the Fisher traces stay those of the fp32 model (rint has no
useful gradient).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..policy import LayerPolicy, Policy
from . import ilp
from .ilp import format_amount
from .common import COST_UNITS, CalibrationData, CostModel, Source, batches, layer_type, progress, scope_layers
from .emulate import QuantModel, apply_layer, dynamic_scale, fake_quant, layer_module

__all__ = ["LampQConfig", "LampQResult", "bits_policy", "fp32_base", "type_aware_sensitivity", "options", "measure_errors",
           "model_errors", "allocate", "feasible_range", "calibrate_lampq"]

Bits = Tuple[int, int]  # (w_bits, a_bits)


@dataclass
class LampQConfig:
    """The knobs of LampQ (see the module docstring)."""

    w_bits: Sequence[int] = (4, 8)
    a_bits: Sequence[int] = (8,)
    scope: str = "blocks"           # "blocks": qkv/proj/fc1/fc2; "all": + patch_embed and heads
    cost: str = "bops"              # "bops" | "bytes"
    rounds: int = 3                 # refinement rounds after the first allocation
    initial: str = "measured"       # "measured" | "model" (Delta^2/12)
    type_aware: bool = True
    fisher_batch: int = 64
    error_images: int = 256         # calibration images the layer errors are measured on
    error_batch: int = 128
    block_size: int = 32            # int4 weight block
    attention: int = 32             # attention matmuls: 32 fp32, 8 int8 (emulated, costed, in the policy)
    show_progress: bool = True


@dataclass
class LampQResult:
    policy: Policy
    layers: List[str]
    options: List[Bits]
    traces: Dict[str, float]
    omega: Dict[str, float]
    errors: Dict[str, List[float]]          # E_i per option, as measured in the last round
    pick: Dict[str, Bits]
    history: List[Dict[str, Bits]]          # the allocation after each round
    budget: float
    cost: Union[int, float]                 # int BOPs / bytes, float seconds
    cost_kind: str
    feasible: Tuple[float, float]           # (smallest, largest) cost over all allocations
    initial_errors: Dict[str, List[float]] = field(default_factory=dict)  # E_i of the first round

    def report(self) -> str:
        """Each layer's sensitivity and chosen bits, most sensitive first."""
        unit = COST_UNITS[self.cost_kind]
        head = f"{'layer':22s} {'type':>11s} {'tr(F)':>10s} {'Omega':>8s} " + " ".join(
            f"{f'E(w{w}a{a})':>10s}" for w, a in self.options) + f" {'bits':>6s}"
        lines = [head, "-" * len(head)]
        for n in sorted(self.layers, key=lambda n: -self.omega[n]):
            w, a = self.pick[n]
            lines.append(f"{n:22s} {layer_type(n):>11s} {self.traces[n]:10.3e} {self.omega[n]:8.3f} "
                         + " ".join(f"{e:10.3e}" for e in self.errors[n]) + f" {f'w{w}a{a}':>6s}")
        lines.append(f"cost {format_amount(self.cost)} {unit} of budget {format_amount(self.budget)} (feasible "
                     f"{format_amount(self.feasible[0])} .. {format_amount(self.feasible[1])}); rounds {len(self.history)}; "
                     f"{sum(1 for b in self.pick.values() if b[0] == 4)} of {len(self.pick)} layers at 4-bit weights")
        return "\n".join(lines)


# --- sensitivity ---------------------------------------------------------------------------------

def type_aware_sensitivity(traces: Mapping[str, float], type_aware: bool = True) -> Dict[str, float]:
    """Omega_i = alpha_t * tr(F_i), alpha_t = 1 / mean tr(F) over the layers of i's type."""
    if not type_aware:
        return {n: float(t) for n, t in traces.items()}
    by_type: Dict[str, List[float]] = {}
    for n, t in traces.items():
        by_type.setdefault(layer_type(n), []).append(float(t))
    alpha = {k: (1.0 / np.mean(v) if np.mean(v) > 0 else 0.0) for k, v in by_type.items()}
    return {n: alpha[layer_type(n)] * float(t) for n, t in traces.items()}


def options(cfg: LampQConfig) -> List[Bits]:
    for w in cfg.w_bits:
        if w not in (4, 8):
            raise ValueError(f"LampQ weight bits are chosen from {{4, 8}}, got {w}")
    for a in cfg.a_bits:
        if not 4 <= a <= 8:
            raise ValueError(f"activation bits must lie in 4..8, got {a}")
    return [(int(w), int(a)) for w in sorted(set(cfg.w_bits)) for a in sorted(set(cfg.a_bits))]


# --- layer errors ---------------------------------------------------------------------------------

def _layer_policies(names: Sequence[str], alloc: Mapping[str, Bits], block_size: int) -> Dict[str, LayerPolicy]:
    out = {}
    for n in names:
        if n in alloc:
            w, a = alloc[n]
            out[n] = LayerPolicy(w_bits=w, a_bits=a, scale="dynamic", block_size=block_size)
        else:
            out[n] = LayerPolicy(w_bits=32)
    return out


def _fp_outputs(model, names: Sequence[str], x) -> Dict[str, "object"]:
    """Every layer's fp32 output on a batch."""
    outs, handles = {}, []
    try:
        for n in names:
            handles.append(layer_module(model, n).register_forward_hook(
                lambda m, a, y, n=n: outs.__setitem__(n, y.detach())))
        model(x)
    finally:
        for h in handles:
            h.remove()
    return outs


def measure_errors(qm: QuantModel, names: Sequence[str], opts: Sequence[Bits], data: CalibrationData,
                   alloc: Mapping[str, Bits], all_layers: Sequence[str], block_size: int = 32,
                   batch: int = 128, show_progress: bool = True, attn_bits: int = 32) -> Dict[str, List[float]]:
    """E_i(w, a) = ||y_q - y_fp||^2 / ||y_fp||^2 per layer and option, with the layers in
    ``alloc`` quantised as allocated upstream (others fp32) and attention at ``attn_bits``;
    y_fp is the fp32 model's (fp32 attention)."""
    import torch

    err = {n: np.zeros(len(opts)) for n in names}
    ref = {n: 0.0 for n in names}
    layers = _layer_policies(all_layers, alloc, block_size)
    want = set(names)
    spans = batches(len(data), batch)
    with torch.no_grad():
        for lo, hi in progress(spans, "layer errors", len(spans), show_progress):
            x = torch.from_numpy(data.images[lo:hi])
            y_fp = _fp_outputs(qm.model, names, x)

            def tap(name, inp):
                if name not in want:
                    return
                mod, y0 = layer_module(qm.model, name), y_fp[name]
                ref[name] += float(y0.pow(2).sum(dtype=torch.float64))
                for j, (w, a) in enumerate(opts):
                    y = apply_layer(mod, fake_quant(inp, dynamic_scale(inp, a), a), qm.weight(name, w, block_size))
                    err[name][j] += float((y - y_fp[name]).pow(2).sum(dtype=torch.float64))

            with qm.emulate(layers, taps=(tap,), attn_bits=attn_bits):
                qm.model(x)
    return {n: list(err[n] / max(ref[n], 1e-300)) for n in names}


def model_errors(qm: QuantModel, names: Sequence[str], opts: Sequence[Bits], block_size: int = 32) -> Dict[str, List[float]]:
    """The Delta^2/12 model: sum of the weights' quantisation noise (step sizes of the runtime's
    quantiser) relative to their energy, plus 1/(4 qmax_a^2) for the activations."""
    out = {}
    for n in names:
        w32 = qm.weight(n, 32).double().reshape(qm.weight(n, 32).shape[0], -1)
        energy = float(w32.pow(2).mean())
        row = []
        for w, a in opts:
            step = _weight_steps(w32.numpy(), w, block_size)
            qa = (1 << (a - 1)) - 1
            row.append(float(np.mean(step ** 2) / 12 / max(energy, 1e-300) + 1.0 / (4 * qa * qa)))
        out[n] = row
    return out


def _weight_steps(w: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """Step size of every weight under the runtime's rule (int8: max/127 per row; int4: max/8
    per block)."""
    if bits == 8:
        return np.repeat(np.abs(w).max(1, keepdims=True) / 127.0, w.shape[1], 1)
    N, K = w.shape
    pad = (-K) % block_size
    wp = np.pad(np.abs(w), ((0, 0), (0, pad)))
    m = wp.reshape(N, -1, block_size).max(2) / 8.0
    return np.repeat(m, block_size, 1)[:, :K]


# --- allocation ------------------------------------------------------------------------------------

def allocate(names: Sequence[str], opts: Sequence[Bits], omega: Mapping[str, float],
             errors: Mapping[str, Sequence[float]], costs: CostModel, budget: float, fixed: float,
             block_size: int = 32) -> Dict[str, Bits]:
    """Solve the ILP: the (w, a) per layer minimising sum Omega_i * E_i under the budget."""
    choices = [[(costs.cost(n, w, a, block_size), omega[n] * errors[n][j]) for j, (w, a) in enumerate(opts)]
               for n in names]
    pick = ilp.solve(choices, budget, fixed_cost=fixed, unit=costs.unit())
    return {n: opts[j] for n, j in zip(names, pick)}


def _choices_bounds(names, opts, costs: CostModel, fixed, block_size) -> Tuple[float, float]:
    choices = [[(costs.cost(n, w, a, block_size), 0.0) for w, a in opts] for n in names]
    return ilp.min_cost(choices, fixed_cost=fixed), ilp.max_cost(choices, fixed_cost=fixed)


def bits_policy(pick: Mapping[str, Bits], block_size: int, name: str, meta: Optional[dict] = None,
                exits: Sequence = (), attn_bits: int = 32) -> Policy:
    """The policy of an allocation: each layer at its (w, a) with dynamic activation scales,
    attention at ``attn_bits``."""
    layers = {n: LayerPolicy(w_bits=w, a_bits=a, scale="dynamic", block_size=block_size) for n, (w, a) in pick.items()}
    return Policy(layers=layers, exits=list(exits), name=name, meta=dict(meta or {}), attn_bits=attn_bits)


def fp32_base(attention: int = 32) -> Policy:
    """Every layer fp32, attention at ``attention`` bits: what the allocated layers' fixed
    cost is taken from (the attention matmuls are part of it)."""
    return Policy(name="fp32", attn_bits=attention)


def feasible_range(source: Source, cfg: LampQConfig, costs: Optional[CostModel] = None) -> Tuple[float, float]:
    """(smallest, largest) whole-model cost any allocation of ``cfg`` can have."""
    costs = costs or CostModel(source, cfg.cost)
    names = scope_layers(source.layer_names(), cfg.scope)
    fixed = costs.fixed(names, fp32_base(cfg.attention))
    return _choices_bounds(names, options(cfg), costs, fixed, cfg.block_size)


def calibrate_lampq(source: Source, data: CalibrationData, budget: float, cfg: Optional[LampQConfig] = None,
                    traces: Optional[Mapping[str, float]] = None,
                    initial_errors: Optional[Mapping[str, Sequence[float]]] = None,
                    costs: Optional[CostModel] = None) -> LampQResult:
    """A LampQ policy for ``source`` under ``budget`` (whole-model BOPs, bytes or seconds, as
    ``cfg.cost``); ValueError naming the smallest feasible budget if it cannot be met.
    ``costs``: the cost model (default ``CostModel(source, cfg.cost)``; pass one built with a
    :class:`~pyruntime.latency.LatencyTable` to fit the policy to a device's latency).

    ``traces`` and ``initial_errors`` (from an earlier result with the same data and
    options: ``res.traces``, ``res.initial_errors``) skip recomputing what does not depend
    on the budget, e.g. when sweeping budgets."""
    cfg = cfg or LampQConfig()
    opts = options(cfg)
    all_layers = source.layer_names()
    names = scope_layers(all_layers, cfg.scope)
    costs = costs or CostModel(source, cfg.cost)
    fixed = costs.fixed(names, fp32_base(cfg.attention))
    lo, hi = _choices_bounds(names, opts, costs, fixed, cfg.block_size)
    if not budget >= lo:  # fail before any expensive step
        raise ilp.InfeasibleBudget(budget, lo, costs.unit())
    model = source.model.eval()
    traces = dict(traces) if traces is not None else fisher_traces_for(model, names, data, cfg)
    omega = type_aware_sensitivity(traces, cfg.type_aware)
    qm = QuantModel(model)
    err_data = data if len(data) <= cfg.error_images else CalibrationData(
        data.images[:cfg.error_images], data.labels[:cfg.error_images], data.summary)

    def measured(alloc):
        return measure_errors(qm, names, opts, err_data, alloc, all_layers, cfg.block_size, cfg.error_batch,
                              cfg.show_progress, cfg.attention)

    if initial_errors is None:
        initial_errors = measured({}) if cfg.initial == "measured" else model_errors(qm, names, opts, cfg.block_size)
    errors = {n: list(v) for n, v in initial_errors.items()}
    pick = allocate(names, opts, omega, errors, costs, budget, fixed, cfg.block_size)
    history = [pick]
    for _ in range(cfg.rounds):
        errors = measured(pick)
        new = allocate(names, opts, omega, errors, costs, budget, fixed, cfg.block_size)
        history.append(new)
        if new == pick:
            break
        pick = new
    cost = fixed + sum(costs.cost(n, *pick[n], cfg.block_size) for n in names)
    meta = {"calibration": dict(data.summary), "method": "lampq", "cost_kind": costs.kind, "budget": float(budget),
            "cost": _amount(cost, costs.kind), "rounds": len(history), "options": [list(o) for o in opts],
            "type_aware": cfg.type_aware, "initial": cfg.initial,
            "sensitivity": {n: float(omega[n]) for n in names}}
    policy = bits_policy({n: pick[n] for n in names}, cfg.block_size, "lampq", meta, attn_bits=cfg.attention)
    return LampQResult(policy, list(names), opts, traces, omega, errors, pick, history, float(budget), _amount(cost, costs.kind),
                       costs.kind, (lo, hi), dict(initial_errors))


def _amount(cost: float, kind: str) -> Union[int, float]:
    """BOPs and bytes are integers; seconds are not."""
    return float(cost) if kind == "latency" else int(cost)


def fisher_traces_for(model, names, data, cfg: LampQConfig) -> Dict[str, float]:
    from .fisher import fisher_traces

    return fisher_traces(model, names, data, cfg.fisher_batch, cfg.show_progress)
