"""The runtime's quantisation, emulated on the torch model (for calibration only).

Inside ``with QuantModel(model).emulate(layers, predictor):`` every linear layer with integer
weights computes what the executor computes (docs/model_format.md), up to float rounding
order: its weights are the runtime's own quantised-then-dequantised weights
(``pyruntime.kernels``), and its input is quantised per image with the layer's scale
(dynamic max, static, or the predictor's polynomial of the range statistic r, itself
computed after block ``b`` as the executor does). The model's own modules are used, with
forward pre-hooks and weight swaps that are undone on exit.

With ``attn_bits=8`` every block's attention core also computes what the executor's int8
attention computes (docs/model_format.md "attention"): per image and head, q and k quantised
per token (1/sqrt(dh) folded into q's scale), the scores as exact integer products times the
int8 GEMM's epilogue, ``softmax_q8``'s int8 probabilities (the kernels' exp2 polynomial,
evaluated like ``pyruntime._numpy_ref``), v quantised per channel, and attn.v likewise; a
relative position bias (BEiT) is added to the dequantised scores, RoPE (Eva) is applied
before q and k are quantised, as the executor does. Every block's attention runs timm's own
forward on its fused path (``fused_attn``), and the ``F.scaled_dot_product_attention`` it
calls is the int8 core for the duration (:func:`_int8_attention`), so q/k norms, RoPE,
gates, projections and the linear layers' hooks stay timm's. Integer products are taken in
float64, so they are exact whatever the head width.

``taps``: callables ``tap(name, x)`` that see each quantised layer's *input before it is
quantised*; this is how the methods collect activations with other layers' bits in place.
Torch is imported by the caller; this module imports it lazily too.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Callable, Dict, Mapping, Optional, Tuple

import numpy as np

from .._numpy_ref import _EXP2_POLY  # the kernels' exp2 coefficients: one definition for both emulations
from ..policy import LayerPolicy, PredictorPolicy, check_attn_bits

__all__ = ["QuantModel", "layer_module", "fake_quant", "dynamic_scale", "range_statistic", "predicted_scale",
           "apply_layer", "quantize_rows_q8", "softmax_q8", "attention_q8"]

Tap = Callable[[str, "object"], None]


def layer_module(model, name: str):
    """The torch module of a pyruntime layer name (``patch_embed`` is the patch conv)."""
    return model.patch_embed.proj if name == "patch_embed" else model.get_submodule(name)


def dynamic_scale(x, a_bits: int, clip: float = 1.0):
    """Per-image (float32(max |x|) / float32(qmax)) * float32(clip) over all of the image's
    rows, shape [B] (the runtime's order of float32 operations)."""
    qmax = float((1 << (a_bits - 1)) - 1)
    s = x.detach().abs().flatten(1).amax(1).float() / qmax
    return s if clip == 1.0 else s * float(np.float32(clip))


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


# --- int8 attention (docs/model_format.md "attention") ----------------------------------------

LOG2E = 1.44269504088896341


def quantize_rows_q8(x):
    """(integers as float64, float32 scale [..., 1]): each row of the last axis on its own
    dynamic scale float32(max |x|) / 127, ``clip(rint(x * float32(1/s)), -127, 127)``; a zero
    or non-finite scale gives zeros and scale 0, like the runtime."""
    import torch

    x = x.float()
    s = x.abs().amax(-1, keepdim=True) / 127.0
    ok = torch.isfinite(s) & (s > 0)
    inv = 1.0 / torch.where(ok, s, torch.ones_like(s))
    q = torch.clamp(torch.round(x * inv), -127.0, 127.0)
    return torch.where(ok, q, torch.zeros_like(q)).double(), torch.where(ok, s, torch.zeros_like(s))


def _fma32(a, b, c):
    """float32 a * b + c with one rounding of the sum (the product of two float32 is exact in
    float64), as the numpy reference evaluates the kernels' fma."""
    return (a.double() * b.double() + c).float()


def softmax_q8(s):
    """Rows of float32 scores to (int8 probabilities as float64 in [0, 127], float32 row scale
    [..., 1]): y = max((s - max s) * log2 e, -126), e = P(y - rint y) * 2^rint(y) with the
    kernels' degree-4 polynomial, p = min(rint(127 e), 127), scale 1 / float32(sum p)."""
    import torch

    s = s.float()
    y = (s - s.amax(-1, keepdim=True)) * torch.tensor(LOG2E, dtype=torch.float32)
    y = torch.clamp_min(y, -126.0)
    n = torch.round(y)
    f = y - n
    p = torch.full_like(f, _EXP2_POLY[3])
    for c in _EXP2_POLY[2::-1]:
        p = _fma32(p, f, float(torch.tensor(c, dtype=torch.float32)))
    p = _fma32(p, f, 1.0)
    e = (p.double() * torch.pow(2.0, n.double())).float()  # times 2^n: exact, rounded once if subnormal
    q = torch.clamp_max(torch.round(e * 127.0), 127.0).double()
    return q, 1.0 / q.sum(-1, keepdim=True).float()


def attention_q8(q, k, v, bias=None):
    """The executor's int8 attention on [B, H, T, dh] q, k, v (before any softmax scale):
    [B, H, T, dh] float32. ``bias`` (broadcast to [B, H, T, T]: a relative position bias) is
    added to the dequantised scores before the softmax, as the executor adds the attention
    op's ``bias``."""
    import torch

    dh = q.shape[-1]
    scale = 1.0 / torch.sqrt(torch.tensor(float(dh), dtype=torch.float32))  # float32(1/sqrt(float32(dh)))
    qi, sq = quantize_rows_q8(q)
    ki, sk = quantize_rows_q8(k)
    a = sq * scale                                                    # [B, H, T, 1] float32
    scores = (qi @ ki.transpose(-2, -1)).float() * (a * sk.transpose(-2, -1))
    if bias is not None:
        scores = scores + bias.float()
    p, sp = softmax_q8(scores)
    vi, sv = quantize_rows_q8(v.transpose(-2, -1))                    # per channel: rows of v^T
    return (p @ vi.transpose(-2, -1)).float() * (sp * sv.transpose(-2, -1))


def _attention_modules(model):
    """Every block's attention module (one per block, one per branch of a parallel block):
    what a block calls ``attn``. Each must compute its core through
    ``F.scaled_dot_product_attention`` when ``fused_attn`` is set, as timm's ``Attention``,
    Eva's (RoPE) and BEiT's (relative position bias, the SDPA mask) do."""
    mods = []
    for i, blk in enumerate(model.blocks):
        found = [(n, m) for n, m in blk.named_modules() if n.rsplit(".", 1)[-1] == "attn"]
        bad = [(n, m) for n, m in found if not hasattr(m, "fused_attn")]
        if not found or bad:
            what = f"blocks.{i}.{bad[0][0]} is {type(bad[0][1]).__name__}" if bad else f"blocks.{i} has none"
            raise ValueError(f"int8 attention emulation needs timm attention modules with a fused (SDPA) path ({what}); "
                             f"calibrate this model with fp32 attention (attention 32)")
        mods += [m for _, m in found]
    return mods


@contextmanager
def _int8_attention(model):
    """Inside, every block's attention core computes :func:`attention_q8`: each block
    attention runs timm's own forward on its fused path (q/k norms, RoPE, gates, projections
    and their hooks as timm has them), and ``F.scaled_dot_product_attention``, called from
    within one of them, is the int8 core with the SDPA mask (BEiT's relative position bias)
    as its score bias. Any other SDPA call (an attention-pooling head: fp32 in the runtime
    too) goes to torch's own. An attention module that returns without calling SDPA (a
    forward that ignores ``fused_attn``) is a ValueError, never silently fp32. The patch is
    process-wide for the duration: one emulation at a time."""
    import torch
    import torch.nn.functional as F

    mods = _attention_modules(model)
    original = F.scaled_dot_product_attention
    calls: list = []  # per attention forward in progress: its int8 SDPA calls so far

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if not calls:
            return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)
        if is_causal or dropout_p or kw.get("enable_gqa") or (attn_mask is not None and attn_mask.dtype == torch.bool):
            raise ValueError("int8 attention emulation has no causal, boolean-masked, grouped-query or dropout "
                             "attention (the runtime's ViTs attend over every token)")
        if scale is not None and float(scale) != q.shape[-1] ** -0.5:
            raise ValueError(f"int8 attention emulation needs the softmax scale head_dim ** -0.5, got {scale}")
        calls[-1] += 1
        return attention_q8(q, k, v, attn_mask).to(q.dtype)

    def enter(module, args):
        calls.append(0)

    def leave(module, args, out):
        if calls.pop() == 0:
            raise ValueError(f"{type(module).__name__} computed its attention without F.scaled_dot_product_attention: "
                             f"int8 attention cannot be emulated for it; calibrate with fp32 attention (attention 32)")

    saved = [(m, m.fused_attn) for m in mods]
    handles = []
    try:
        if getattr(original, "_pyruntime_int8", False):
            raise ValueError("int8 attention emulation is already active (nested emulation?)")
        for m in mods:
            m.fused_attn = True
            handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
        sdpa._pyruntime_int8 = True
        F.scaled_dot_product_attention = sdpa
        yield
    finally:
        F.scaled_dot_product_attention = original
        for h in handles:
            h.remove()
        for m, fused in saved:
            m.fused_attn = fused


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
                taps: Tuple[Tap, ...] = (), attn_bits: int = 32):
        """Run the model as the runtime would under ``layers`` (a resolved {name: LayerPolicy}
        of every linear layer; exits are not emulated), ``predictor`` and attention at
        ``attn_bits`` (32: the model's own fp32 attention; 8: int8, see the module docstring)."""
        check_attn_bits(attn_bits)
        state = {"r": None}
        handles, saved = [], []
        with ExitStack() as stack:
            if attn_bits == 8:
                stack.enter_context(_int8_attention(self.model))
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
                s = dynamic_scale(x, lp.a_bits, lp.clip)
            elif lp.scale == "static":
                s = x.new_full((x.shape[0],), float(np.float32(lp.static_scale)))
            else:
                if state["r"] is None or coeffs is None:
                    raise ValueError(f"{name}: predicted scale without a predictor statistic")
                s = predicted_scale(coeffs, state["r"])
            return (fake_quant(x, s, lp.a_bits),) + tuple(args[1:])
        return hook
