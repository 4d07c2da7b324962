"""Static activation scales: one scale per layer from calibration images [ours: the
standard PTQ baselines the ScalePredictor paper compares against, stated only as "static"].

* ``minmax``: s = max over calibration images of max |x| / qmax.
* ``percentile``: s = the p-th percentile of |x| over every value the layer saw on the
  calibration images / qmax (exact: the k-th largest |x| with k = ceil((1 - p/100) * count),
  kept as a running top-k, so no activation is stored).
  Default p = 99.99.

Activations are collected in one pass with the base policy's weight bits in place and every
quantised layer's activations at *dynamic* scales [ours: one pass rather than layer-by-layer
sequential calibration], and with the base's attention precision (int8 attention emulated
when ``base.attn_bits`` is 8; the result keeps it). Dynamic scales need no calibration:
``scale="dynamic"`` in :func:`.uniform.uniform_policy`.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Dict, Mapping, Optional

from ..policy import LayerPolicy, Policy
from .common import CalibrationData, Source, batches, progress
from .emulate import QuantModel

__all__ = ["STATIC_METHODS", "collect_ranges", "static_scales", "static_policy"]

STATIC_METHODS = ("minmax", "percentile")


class _TopK:
    """Running k largest values of a stream (k fixed once the total count is known)."""

    def __init__(self, k: int):
        self.k, self.values = k, None

    def add(self, v) -> None:
        import torch

        v = v.reshape(-1).float()
        if self.values is not None:
            v = torch.cat([self.values, v])
        k = min(self.k, v.numel())
        self.values = torch.topk(v, k, sorted=False).values

    def kth(self) -> float:
        return float(self.values.min())


def _dynamic(layers: Mapping[str, LayerPolicy]) -> Dict[str, LayerPolicy]:
    return {n: (lp if lp.w_bits == 32 else replace(lp, scale="dynamic", static_scale=None)) for n, lp in layers.items()}


def collect_ranges(source: Source, data: CalibrationData, base: Policy, method: str = "percentile",
                   percentile: float = 99.99, batch: int = 128, show_progress: bool = True) -> Dict[str, float]:
    """{layer: max |x| (minmax) or the percentile of |x|} for every quantised layer of ``base``."""
    import torch

    if method not in STATIC_METHODS:
        raise ValueError(f"static method must be one of {STATIC_METHODS}, got {method!r}")
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must lie in (0, 100], got {percentile}")
    layers = _dynamic(base.resolve(source.layer_names(), source.depth))
    quantised = [n for n, lp in layers.items() if lp.w_bits != 32]
    acc: Dict[str, object] = {}

    def tap(name, x):
        if name not in layers or layers[name].w_bits == 32:
            return
        a = x.detach().abs()
        if method == "minmax":
            acc[name] = max(acc.get(name, 0.0), float(a.max()))
            return
        if name not in acc:  # k from the total count: values per image x images
            total = a[0].numel() * len(data)
            acc[name] = _TopK(max(1, math.ceil((100 - percentile) * total / 100 - 1e-9)))
        acc[name].add(a)

    qm = QuantModel(source.model.eval())
    spans = batches(len(data), batch)
    with torch.no_grad(), qm.emulate(layers, taps=(tap,), attn_bits=base.attn_bits):
        for lo, hi in progress(spans, f"static scales ({method})", len(spans), show_progress):
            qm.model(torch.from_numpy(data.images[lo:hi]))
    return {n: (acc[n] if method == "minmax" else acc[n].kth()) for n in quantised}


def static_scales(source: Source, data: CalibrationData, base: Policy, method: str = "percentile",
                  percentile: float = 99.99, show_progress: bool = True) -> Dict[str, float]:
    """{layer: static scale = range / qmax(a_bits)} for every quantised layer of ``base``."""
    layers = base.resolve(source.layer_names(), source.depth)
    ranges = collect_ranges(source, data, base, method, percentile, show_progress=show_progress)
    out = {}
    for n, r in ranges.items():
        qmax = (1 << (layers[n].a_bits - 1)) - 1
        out[n] = float(max(r, 1e-12) / qmax)
    return out


def static_policy(source: Source, data: CalibrationData, base: Policy, method: str = "percentile",
                  percentile: float = 99.99, name: Optional[str] = None, show_progress: bool = True) -> Policy:
    """``base`` with every quantised layer on a calibrated static scale."""
    layers = base.resolve(source.layer_names(), source.depth)
    scales = static_scales(source, data, base, method, percentile, show_progress)
    out = {n: (replace(lp, scale="static", static_scale=scales[n]) if n in scales else lp) for n, lp in layers.items()}
    meta = dict(base.meta, static={"method": method, "percentile": percentile if method == "percentile" else None},
                calibration=dict(data.summary))
    return Policy(layers=out, exits=list(base.exits), name=name or f"{base.name}-{method}", meta=meta,
                  attn_bits=base.attn_bits)
