"""Uniform-precision baselines: the same (w_bits, a_bits) on every allocated layer.

W8A8, W4A8 and W4A4-grid (4-bit weights, 4-bit activation grid) with dynamic scales are
the usual PTQ reference points [ours: the baselines the LampQ and ScalePredictor results are
measured against]; :func:`uniform_under_budget` picks the most expensive uniform setting
that fits a budget, so ``pyruntime calibrate --method uniform --budget-bops X`` is the
uniform answer to the same question LampQ answers. ``attn_bits`` / ``attention`` 8 also runs
the attention matmuls on int8 operands (and costs them so).

:func:`ends_policy` is the simplest non-uniform rule [ours: the "keep the first and last
blocks at higher precision" habit of PTQ practice, no measurement involved]: the first and
last blocks' linears at 8-bit weights, the rest at 4, so a bit-allocation method has a
rule of thumb to beat at the same BOPs, not only uniform bits.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

from ..policy import LayerPolicy, Policy, check_attn_bits
from . import ilp
from .common import CostModel, Source, policy_cost

__all__ = ["uniform_policy", "uniform_under_budget", "ends_policy", "UNIFORM_CANDIDATES"]

#: (w_bits, a_bits) tried by :func:`uniform_under_budget`, cheapest BOPs first.
UNIFORM_CANDIDATES: Tuple[Tuple[int, int], ...] = ((4, 4), (4, 6), (8, 4), (4, 8), (8, 6), (8, 8))


def uniform_policy(w_bits: int, a_bits: int = 8, scale: str = "dynamic", scope: str = "blocks",
                   static_scales: Optional[Dict[str, float]] = None, block_size: int = 32,
                   name: Optional[str] = None, attn_bits: int = 32) -> Policy:
    """Every linear layer in ``scope`` at ``w_bits``/``a_bits`` (others fp32), attention at
    ``attn_bits`` (name suffix ``-attn8`` when 8). ``scale`` "static" needs
    ``static_scales`` {layer: scale} (see :mod:`.static`)."""
    pattern = "blocks.*" if scope == "blocks" else "*"
    if scope not in ("blocks", "all"):
        raise ValueError(f"scope must be 'blocks' or 'all', got {scope!r}")
    attn_bits = check_attn_bits(attn_bits)
    bs = block_size if w_bits == 4 else 32
    name = name or (f"w{w_bits}a{a_bits}" + ("" if scale == "dynamic" else f"-{scale}")
                    + ("" if attn_bits == 32 else f"-attn{attn_bits}"))
    if scale == "static":
        if not static_scales:
            raise ValueError("a static uniform policy needs static_scales {layer: scale}")
        layers = {n: LayerPolicy(w_bits, a_bits, "static", float(s), bs) for n, s in static_scales.items()}
        return Policy(layers=layers, name=name, attn_bits=attn_bits)
    return Policy(layers={pattern: LayerPolicy(w_bits, a_bits, scale, None, bs)}, name=name, attn_bits=attn_bits)


def uniform_under_budget(source: Source, budget: float, kind: str = "bops", scope: str = "blocks",
                         candidates: Sequence[Tuple[int, int]] = UNIFORM_CANDIDATES, attention: int = 32) -> Policy:
    """The uniform setting with the largest cost within ``budget`` (ties: more weight bits),
    attention at ``attention`` bits (costed so); ValueError naming the smallest feasible
    budget if none fits."""
    def policy(w: int, a: int) -> Policy:
        return uniform_policy(w, a, scope=scope, attn_bits=attention)

    costed = sorted(((policy_cost(source, policy(w, a), kind), w, a) for w, a in candidates),
                    key=lambda t: (t[0], t[1]))
    fitting = [c for c in costed if c[0] <= budget]
    if not fitting:
        raise ilp.InfeasibleBudget(budget, costed[0][0], CostModel(source, kind).unit())
    cost, w, a = fitting[-1]
    out = policy(w, a)
    out.meta = {"method": "uniform", "cost_kind": kind, "budget": float(budget), "cost": int(cost)}
    return out


def ends_policy(depth: int, first: int, last: int, a_bits: int = 8, hi_bits: int = 8, lo_bits: int = 4,
                attn_bits: int = 32, block_size: int = 32, name: Optional[str] = None) -> Policy:
    """Blocks ``0..first-1`` and the last ``last`` blocks at ``hi_bits`` weights, every other
    block at ``lo_bits``, all at ``a_bits`` activations with dynamic scales (patch embedding and
    head fp32, as :func:`uniform_policy` with scope "blocks"). Named ``f{first}l{last}-w{hi}/{lo}a{a}``."""
    if not (isinstance(depth, int) and depth >= 1):
        raise ValueError(f"depth must be a positive int, got {depth!r}")
    if not (0 <= first and 0 <= last and first + last <= depth):
        raise ValueError(f"first ({first}) and last ({last}) blocks must be >= 0 and add up to at most depth {depth}")
    attn_bits = check_attn_bits(attn_bits)
    high = set(range(first)) | set(range(depth - last, depth))

    def layer(w: int) -> LayerPolicy:
        return LayerPolicy(w, a_bits, "dynamic", None, block_size if w == 4 else 32)

    layers = {f"blocks.{b}.*": layer(hi_bits if b in high else lo_bits) for b in range(depth)}
    name = name or (f"f{first}l{last}-w{hi_bits}/{lo_bits}a{a_bits}" + ("" if attn_bits == 32 else f"-attn{attn_bits}"))
    return Policy(layers=layers, name=name, attn_bits=attn_bits)
