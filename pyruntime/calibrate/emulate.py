"""The runtime's quantisation, emulated on the torch model (for calibration only).

Inside ``with QuantModel(model).emulate(layers, predictor):`` every linear layer with integer
weights computes what the executor computes (docs/model_format.md), up to float rounding
order: its weights are the runtime's own quantised-then-dequantised weights
(``pyruntime.kernels``), and its input is quantised per image with the layer's scale
(dynamic max, static, or the predictor's polynomial of the range statistic r, itself
computed after block ``b`` as the executor does). The model's own modules are used, with
forward pre-hooks and weight swaps that are undone on exit.

``taps``: callables ``tap(name, x)`` that see each quantised layer's *input before it is
quantised*; this is how the methods collect activations with other layers' bits in place.
Torch is imported by the caller; this module imports it lazily too.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Dict, Mapping, Optional, Tuple

import numpy as np

from ..policy import LayerPolicy, PredictorPolicy

__all__ = ["QuantModel", "layer_module", "fake_quant", "dynamic_scale", "range_statistic", "predicted_scale",
           "apply_layer"]

Tap = Callable[[str, "object"], None]


def layer_module(model, name: str):
    """The torch module of a pyruntime layer name (``patch_embed`` is the patch conv)."""
    return model.patch_embed.proj if name == "patch_embed" else model.get_submodule(name)


def dynamic_scale(x, a_bits: int):
    """Per-image float32(max |x|) / float32(qmax) over all of the image's rows, shape [B]."""
    qmax = float((1 << (a_bits - 1)) - 1)
    return x.detach().abs().flatten(1).amax(1).float() / qmax


def fake_quant(x, scale, a_bits: int):
    """``clip(rint(x * float32(1/s)), -qmax, qmax) * s`` per image; s [B] float32 (zero or
    non-finite s gives 0, like the runtime)."""
    import torch

    qmax = float((1 << (a_bits - 1)) - 1)
    s = scale.to(torch.float32).reshape(-1, *([1] * (x.dim() - 1)))
    ok = torch.isfinite(s) & (s > 0)
    safe = torch.where(ok, s, torch.ones_like(s))
    q = torch.clamp(torch.round(x * (1.0 / safe)), -qmax, qmax)
    return torch.where(ok, q * safe, torch.zeros_like(q))


def range_statistic(tokens, chunk: int):
    """The executor's r per image: mean over chunks of ``chunk`` consecutive values of the
    flattened [T, D] tokens (last chunk partial) of max |x|; accumulated in double, float32."""
    import torch

    flat = tokens.detach().abs().flatten(1).double()
    B, n = flat.shape
    pad = (-n) % chunk
    if pad:  # |x| >= 0, and a partial chunk has at least one real value, so zeros are neutral
        flat = torch.cat([flat, flat.new_zeros(B, pad)], 1)
    return flat.reshape(B, -1, chunk).amax(2).mean(1).float()


def predicted_scale(coeffs, r):
    """sum_k a_k r^k (Horner, double, float32 coefficients), clamped >= 1e-12, as float32."""
    import torch

    c = np.asarray(coeffs, dtype=np.float32).astype(np.float64)
    rr = r.double()
    s = torch.zeros_like(rr)
    for a in c[::-1]:
        s = s * rr + float(a)
    return torch.clamp(s, min=1e-12).float()


def apply_layer(module, x, weight):
    """The layer's float computation with another weight tensor (same shape as module.weight)."""
    import torch.nn.functional as F

    if module.__class__.__name__ == "Conv2d":
        return F.conv2d(x, weight, module.bias, module.stride, module.padding, module.dilation, module.groups)
    return F.linear(x, weight, module.bias)


class QuantModel:
    """A torch ViT plus a cache of its runtime-quantised weights."""

    def __init__(self, model):
        self.model = model
        self._cache: Dict[Tuple[str, int, int], "object"] = {}
        self._original: Dict[str, "object"] = {}  # fp32 weights of the layers swapped right now

    def weight(self, name: str, w_bits: int, block_size: int = 32):
        """The layer's weight as the runtime holds it: fp32, or dequantised int8/int4."""
        import torch

        mod = layer_module(self.model, name)
        fp32 = self._original.get(name, mod.weight.data).detach()  # never re-quantise a swapped weight
        if w_bits == 32:
            return fp32
        key = (name, w_bits, block_size if w_bits == 4 else 0)
        if key not in self._cache:
            from .. import kernels

            w = np.ascontiguousarray(fp32.reshape(fp32.shape[0], -1).cpu().numpy(), np.float32)
            qw = kernels.quantize_weights(w, w_bits, block_size if w_bits == 4 else None)
            deq = kernels.dequantize(qw)
            self._cache[key] = torch.from_numpy(np.array(deq, np.float32)).reshape(fp32.shape)
        return self._cache[key]

    @contextmanager
    def emulate(self, layers: Mapping[str, LayerPolicy], predictor: Optional[PredictorPolicy] = None,
                taps: Tuple[Tap, ...] = ()):
        """Run the model as the runtime would under ``layers`` (a resolved {name: LayerPolicy}
        of every linear layer; exits are not emulated) and ``predictor``."""
        state = {"r": None}
        handles, saved = [], []
        try:
            if predictor is not None:
                blk = self.model.blocks[predictor.block]
                handles.append(blk.register_forward_hook(self._stat_hook(state, predictor.chunk)))
            for name, lp in layers.items():
                if name.startswith("exits."):
                    continue
                mod = layer_module(self.model, name)
                if lp.w_bits != 32:
                    q = self.weight(name, lp.w_bits, lp.block_size)
                    saved.append((name, mod, mod.weight.data))
                    self._original[name] = mod.weight.data
                    mod.weight.data = q
                coeffs = predictor.coeffs.get(name) if predictor is not None else None
                handles.append(mod.register_forward_pre_hook(self._input_hook(name, lp, coeffs, state, taps)))
            yield state
        finally:
            for h in handles:
                h.remove()
            for name, mod, w in saved:
                mod.weight.data = w
                self._original.pop(name, None)

    @staticmethod
    def _stat_hook(state, chunk: int):
        def hook(module, args, out):
            state["r"] = range_statistic(out, chunk)
        return hook

    @staticmethod
    def _input_hook(name: str, lp: LayerPolicy, coeffs, state, taps):
        def hook(module, args):
            x = args[0]
            for tap in taps:
                tap(name, x)
            if lp.w_bits == 32:
                return None
            if lp.scale == "dynamic":
                s = dynamic_scale(x, lp.a_bits)
            elif lp.scale == "static":
                s = x.new_full((x.shape[0],), float(np.float32(lp.static_scale)))
            else:
                if state["r"] is None or coeffs is None:
                    raise ValueError(f"{name}: predicted scale without a predictor statistic")
                s = predicted_scale(coeffs, state["r"])
            return (fake_quant(x, s, lp.a_bits),) + tuple(args[1:])
        return hook
