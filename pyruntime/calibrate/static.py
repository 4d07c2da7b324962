"""Static activation scales: one scale per layer from calibration images [ours: the
standard PTQ baselines the ScalePredictor paper compares against, stated only as "static"].

* ``minmax``: s = max over calibration images of max |x| / qmax.
* ``percentile``: s = the p-th percentile of |x| over every value the layer saw on the
  calibration images / qmax (exact: the k-th largest |x| with k = ceil((1 - p/100) * count),
  kept as a running top-k, so no activation is stored).
  Default p = 99.99.
* ``mse``: s = rho * (min-max range) / qmax with the clip ratio rho minimising the layer's
  input quantisation error sum_images ||Q(x; s) - x||^2 over the calibration images, rho
  searched on :data:`CLIP_RATIOS` and then refined like ScalePredictor's per-image targets
  (``scalepredictor.best_scales``) -- the clipping ScalePredictor's targets get, without
  the per-image prediction, so the two gains can be told apart [ours].

:func:`clipped_dynamic_policy` is the dynamic counterpart: every quantised layer keeps a
per-image dynamic scale times a fixed per-layer ratio (``clip`` in the policy), rho_l
chosen the same way (least summed error over the calibration images, each image at its own
max) [ours: "fixed-ratio dynamic", the baseline that clips per image without a predictor].

Activations are collected in one pass with the base policy's weight bits in place and every
quantised layer's activations at *dynamic* scales [ours: one pass rather than layer-by-layer
sequential calibration], and with the base's attention precision (int8 attention emulated
when ``base.attn_bits`` is 8; the result keeps it). Dynamic scales need no calibration:
``scale="dynamic"`` in :func:`.uniform.uniform_policy`.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..policy import LayerPolicy, Policy
from .common import CalibrationData, Source, batches, progress
from .emulate import QuantModel, dynamic_scale, fake_quant

__all__ = ["STATIC_METHODS", "CLIP_RATIOS", "collect_ranges", "clip_errors", "best_clips", "static_scales",
           "static_policy", "clipped_dynamic_policy"]

STATIC_METHODS = ("minmax", "percentile", "mse")
CLIP_RATIOS = tuple(round(0.05 * k, 2) for k in range(1, 21))  # 0.05 .. 1.0, refined around the best
CLIP_REFINE = 4  # the best coarse ratio is refined in steps of 0.05 / 4 out to its neighbours


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

    if method not in ("minmax", "percentile"):
        raise ValueError(f"a range is 'minmax' or 'percentile', got {method!r}")
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


def clip_errors(source: Source, data: CalibrationData, base: Policy, ratios: Mapping[str, Sequence[float]],
                ranges: Optional[Mapping[str, float]] = None, batch: int = 128,
                show_progress: bool = True) -> Dict[str, np.ndarray]:
    """{layer: [len(ratios[layer])] float64}: sum over the calibration images of
    ||Q(x; s) - x||^2 of the layer's input x at each candidate scale s = rho * m / qmax, m
    the layer's calibration ``ranges`` entry (static), or each image's own max |x| when
    ``ranges`` is None (dynamic); collected as :func:`collect_ranges` collects ranges."""
    import torch

    layers = _dynamic(base.resolve(source.layer_names(), source.depth))
    acc = {n: np.zeros(len(r)) for n, r in ratios.items()}

    def tap(name, x):
        if name not in acc:
            return
        x = x.detach().float()
        a_bits = layers[name].a_bits
        if ranges is None:
            ref = dynamic_scale(x, a_bits)
        else:
            ref = x.new_full((x.shape[0],), float(np.float32(max(ranges[name], 1e-12) / ((1 << (a_bits - 1)) - 1))))
        for c, rho in enumerate(ratios[name]):
            e = fake_quant(x, ref * float(np.float32(rho)), a_bits) - x
            acc[name][c] += float(e.double().square().sum())

    qm = QuantModel(source.model.eval())
    spans = batches(len(data), batch)
    with torch.no_grad(), qm.emulate(layers, taps=(tap,), attn_bits=base.attn_bits):
        for lo, hi in progress(spans, "clip errors", len(spans), show_progress):
            qm.model(torch.from_numpy(data.images[lo:hi]))
    return acc


def best_clips(source: Source, data: CalibrationData, base: Policy, ranges: Optional[Mapping[str, float]] = None,
               ratios: Sequence[float] = CLIP_RATIOS, refine: int = CLIP_REFINE,
               show_progress: bool = True) -> Dict[str, Tuple[float, float]]:
    """{layer: (rho, summed error)} for every quantised layer of ``base``: the clip ratio with
    the least :func:`clip_errors` on the grid ``ratios``, then on ``refine`` subdivisions
    either side of it (a second pass; ties: the larger ratio)."""
    layers = base.resolve(source.layer_names(), source.depth)
    names = [n for n, lp in layers.items() if lp.w_bits != 32]
    grid = np.asarray(ratios, np.float64)

    def pick(cands, errs):
        return {n: (float(cands[n][len(errs[n]) - 1 - int(np.argmin(errs[n][::-1]))]), float(np.min(errs[n])))
                for n in names}

    cands = {n: grid for n in names}
    best = pick(cands, clip_errors(source, data, base, cands, ranges, show_progress=show_progress))
    if refine > 0 and len(grid) > 1:
        step = float(np.min(np.diff(grid))) / refine
        cands = {n: np.unique(np.round(np.clip(best[n][0] + step * np.arange(-refine, refine + 1), grid.min(),
                                               grid.max()), 6)) for n in names}
        best = pick(cands, clip_errors(source, data, base, cands, ranges, show_progress=show_progress))
    return best


def static_scales(source: Source, data: CalibrationData, base: Policy, method: str = "percentile",
                  percentile: float = 99.99, show_progress: bool = True) -> Dict[str, float]:
    """{layer: static scale = range / qmax(a_bits)} for every quantised layer of ``base``
    (``mse``: the min-max range times the best clip ratio)."""
    if method not in STATIC_METHODS:
        raise ValueError(f"static method must be one of {STATIC_METHODS}, got {method!r}")
    layers = base.resolve(source.layer_names(), source.depth)
    ranges = collect_ranges(source, data, base, "minmax" if method == "mse" else method, percentile,
                            show_progress=show_progress)
    if method == "mse":
        clips = best_clips(source, data, base, ranges, show_progress=show_progress)
        ranges = {n: r * clips[n][0] for n, r in ranges.items()}
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


def clipped_dynamic_policy(source: Source, data: CalibrationData, base: Policy, name: Optional[str] = None,
                           show_progress: bool = True) -> Policy:
    """``base`` with every quantised layer on a dynamic scale times its best fixed clip ratio."""
    layers = base.resolve(source.layer_names(), source.depth)
    clips = best_clips(source, data, base, None, show_progress=show_progress)
    out = {n: (replace(lp, scale="dynamic", static_scale=None, clip=clips[n][0]) if n in clips else lp)
           for n, lp in layers.items()}
    meta = dict(base.meta, clipped_dynamic={n: c for n, (c, _) in clips.items()}, calibration=dict(data.summary))
    return Policy(layers=out, exits=list(base.exits), name=name or f"{base.name}-clipped-dynamic", meta=meta,
                  attn_bits=base.attn_bits)
