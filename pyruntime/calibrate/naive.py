"""Naive mixed-precision baselines for LampQ: bits by weight range, or at random, with the
same ILP under the same budget.

[ours] No data, no gradients: a layer's error at w-bit weights is the Delta^2/12 noise of
per-tensor symmetric quantisation of its weights, numel * (max|W| / qmax_w)^2 / 12, i.e.
layers with a wide weight range (and many weights) get the bits; a-bit activations add
numel * 4^-(a-1) (the same step-size shape on a unit range) when activation bits are
choices too. Every layer counts the
same (no Fisher, no type factor). The allocation is solved by :func:`.ilp.solve` under the
same cost model as LampQ, so the two differ only in how they score layers.

[ours] :func:`calibrate_random`: each layer a random sensitivity s_i ~ Exp(1) (by ``seed``)
times the option's generic error 4^-(w-1) + 4^-(a-1), so the ILP still spends the whole
budget and prefers more bits everywhere, but on layers chosen at random: what any scoring
must beat to show it knows which layers matter.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

from ..policy import LayerPolicy, Policy
from . import ilp
from .common import CostModel, Source, scope_layers
from .emulate import layer_module
from .lampq import LampQConfig, fp32_base, options

__all__ = ["range_errors", "random_errors", "calibrate_naive", "calibrate_random"]


def range_errors(source: Source, names, opts) -> Dict[str, List[float]]:
    """{layer: [numel * (max|W| / qmax_w)^2 / 12 per (w, a) option]}."""
    out = {}
    for n in names:
        w = layer_module(source.model, n).weight.detach().double()
        numel, rng = w.numel(), float(w.abs().max())
        out[n] = [numel * (rng / ((1 << (wb - 1)) - 1)) ** 2 / 12.0 + numel * 2.0 ** (-2 * (ab - 1))
                  for wb, ab in opts]
    return out


def random_errors(names, opts, seed: int) -> Dict[str, List[float]]:
    """{layer: [s_layer * (4^-(w-1) + 4^-(a-1)) per (w, a) option]}, s ~ Exp(1) by ``seed``."""
    rng = np.random.default_rng(seed)
    return {n: [s * (4.0 ** -(w - 1) + 4.0 ** -(a - 1)) for w, a in opts]
            for n, s in zip(names, rng.exponential(1.0, len(names)))}


def _allocate(source: Source, budget: float, cfg: LampQConfig, errors: Mapping[str, List[float]], method: str):
    """(policy, {layer: (w, a)}): the ILP on ``errors`` under ``budget``, attention at
    ``cfg.attention`` bits (costed so; the errors do not depend on it)."""
    opts = options(cfg)
    names = scope_layers(source.layer_names(), cfg.scope)
    costs = CostModel(source, cfg.cost)
    fixed = costs.fixed(names, fp32_base(cfg.attention))  # attention matmuls at cfg.attention bits
    choices = [[(costs.cost(n, w, a, cfg.block_size), errors[n][j]) for j, (w, a) in enumerate(opts)] for n in names]
    pick = ilp.solve(choices, budget, fixed_cost=fixed, unit=costs.unit())
    alloc = {n: opts[j] for n, j in zip(names, pick)}
    cost = fixed + sum(costs.cost(n, *alloc[n], cfg.block_size) for n in names)
    layers = {n: LayerPolicy(w, a, "dynamic", None, cfg.block_size) for n, (w, a) in alloc.items()}
    meta = {"method": method, "cost_kind": cfg.cost, "budget": float(budget), "cost": int(cost)}
    return Policy(layers=layers, name=method, meta=meta, attn_bits=cfg.attention), alloc


def calibrate_naive(source: Source, budget: float, cfg: Optional[LampQConfig] = None) -> Tuple[Policy, Dict[str, Tuple[int, int]]]:
    """(policy, {layer: (w, a)}) allocated by weight range under ``budget``."""
    cfg = cfg or LampQConfig()
    names = scope_layers(source.layer_names(), cfg.scope)
    return _allocate(source, budget, cfg, range_errors(source, names, options(cfg)), "naive-range")


def calibrate_random(source: Source, budget: float, cfg: Optional[LampQConfig] = None,
                     seed: int = 0) -> Tuple[Policy, Dict[str, Tuple[int, int]]]:
    """(policy, {layer: (w, a)}) from random layer sensitivities (``seed``) under ``budget``."""
    cfg = cfg or LampQConfig()
    names = scope_layers(source.layer_names(), cfg.scope)
    policy, alloc = _allocate(source, budget, cfg, random_errors(names, options(cfg), seed), "random")
    policy.meta["seed"] = int(seed)
    return policy, alloc
