"""Kernel-level API: weight quantisation and the int8/int4/fp32 linear kernels.

Everything here validates its arguments and raises ``TypeError``/``ValueError`` naming the
problem; the compiled kernels never see a bad buffer.

Quantisation rules (the same the model converter and the executor use):

* int8 weights: symmetric per output channel, ``scale = max|w| / 127``, ``q`` in [-127, 127].
* int4 weights: per block of ``block_size`` K values (default 32), the value of largest
  magnitude maps to -8 (llama.cpp's q4_0 rule), ``q`` in [-8, 7].
* activations: symmetric per tensor, ``scale = max|x| / (2**(bits-1) - 1)`` unless given,
  ``q = clip(round_half_even(x / scale), -qmax, qmax)`` in int8 storage.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from . import _core

QuantizedWeights = _core.QuantizedWeights
_LIMITS = _core.limits()


def _as_f32_matrix(name: str, a, ndim: int = 2) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.dtype != np.float32:
        raise TypeError(f"{name} must have dtype float32, got {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (use np.ascontiguousarray)")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return a


def _check_isa(isa: Optional[str]) -> Optional[str]:
    if isa is not None and not isinstance(isa, str):
        raise TypeError(f"isa must be a string or None, got {type(isa).__name__}")
    return isa


def _check_threads(num_threads: Optional[int]) -> Optional[int]:
    if num_threads is None:
        return None
    if not isinstance(num_threads, (int, np.integer)) or isinstance(num_threads, bool):
        raise TypeError("num_threads must be an int")
    if not 1 <= num_threads <= _LIMITS["max_threads"]:
        raise ValueError(f"num_threads must be in 1..{_LIMITS['max_threads']}, got {num_threads}")
    return int(num_threads)


def quantize_weights(w: np.ndarray, bits: int, block_size: Optional[int] = None) -> QuantizedWeights:
    """Quantise float32 weights ``w`` [N, K] to ``bits`` (8: per channel; 4: blocks along K;
    32: kept fp32) and pack them once for the kernels."""
    _as_f32_matrix("w", w)
    if w.size == 0:
        raise ValueError("w must not be empty")
    if bits not in (4, 8, 32):
        raise ValueError(f"bits must be 4 or 8 (or 32 to keep fp32), got {bits}")
    if block_size is None:
        block_size = 32
    elif bits != 4:
        raise ValueError("block_size applies to 4-bit weights only")
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size <= 0 or block_size % 32:
        raise ValueError(f"block_size must be a positive multiple of 32, got {block_size}")
    K = w.shape[1]
    if bits != 32 and K > _LIMITS["max_k"]:
        raise ValueError(f"integer weights need K <= {_LIMITS['max_k']} (exact int32 accumulation), got K={K}")
    if block_size > -(-K // 32) * 32:
        # A larger block only pads: one block per row either way, and its padded size can overflow.
        raise ValueError(f"block_size {block_size} exceeds K={K} rounded up to 32 ({-(-K // 32) * 32})")
    return _core.quantize_weights(w, int(bits), int(block_size))


def dequantize(qw: QuantizedWeights) -> np.ndarray:
    """The float32 [N, K] weights that ``qw`` represents."""
    if not isinstance(qw, QuantizedWeights):
        raise TypeError(f"expected QuantizedWeights, got {type(qw).__name__}")
    return _core.dequantize(qw)


def linear(
    x: np.ndarray,
    qw: QuantizedWeights,
    bias: Optional[np.ndarray] = None,
    *,
    act_scale: Optional[float] = None,
    act_bits: int = 8,
    num_threads: Optional[int] = None,
    isa: Optional[str] = None,
) -> np.ndarray:
    """``quantise(x) @ dequantize(qw).T + bias`` for ``x`` float32 [M, K].

    ``act_scale=None`` quantises dynamically per tensor; fp32 weights skip activation
    quantisation. ``isa`` forces one kernel table (see :func:`pyruntime.available_isas`).
    """
    if not isinstance(qw, QuantizedWeights):
        raise TypeError(f"qw must be QuantizedWeights (see quantize_weights), got {type(qw).__name__}")
    _as_f32_matrix("x", x)
    if x.shape[1] != qw.shape[1]:
        raise ValueError(f"x has K={x.shape[1]} columns but the weights expect K={qw.shape[1]}")
    if bias is not None:
        _as_f32_matrix("bias", bias, ndim=1)
        if bias.shape[0] != qw.shape[0]:
            raise ValueError(f"bias has {bias.shape[0]} values, expected N={qw.shape[0]}")
    if isinstance(act_bits, bool) or not isinstance(act_bits, (int, np.integer)) or not 4 <= act_bits <= 8:
        raise ValueError(f"act_bits must be an int in 4..8, got {act_bits!r}")
    if act_scale is not None:
        act_scale = float(act_scale)
        if not np.isfinite(act_scale) or act_scale < 0:
            raise ValueError(f"act_scale must be finite and >= 0, got {act_scale}")
    return _core.linear(x, qw, bias, act_scale, int(act_bits), _check_threads(num_threads), _check_isa(isa))


def quantize_activations(
    x: np.ndarray, bits: int = 8, scale: Optional[float] = None, *, per_row: bool = False,
    isa: Optional[str] = None,
):
    """(q int8 [M, K], scales float32 [M]) as the kernels quantise ``x``; for tests and tools."""
    _as_f32_matrix("x", x)
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    q, s, _ = _core.quantize_acts(x, int(bits), None if scale is None else float(scale), per_row, _check_isa(isa))
    return q, s


def gemm_f32(a: np.ndarray, b: np.ndarray, bias: Optional[np.ndarray] = None, *,
             num_threads: Optional[int] = None, isa: Optional[str] = None) -> np.ndarray:
    """``a @ b + bias`` in fp32 with the runtime's GEMM (a [M, K], b [K, N])."""
    _as_f32_matrix("a", a)
    _as_f32_matrix("b", b)
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"inner sizes differ: a is {a.shape}, b is {b.shape}")
    if bias is not None:
        _as_f32_matrix("bias", bias, ndim=1)
    return _core.gemm_f32(a, b, bias, _check_threads(num_threads), _check_isa(isa))


def layernorm(x, gamma, beta, eps: float = 1e-6, *, isa: Optional[str] = None) -> np.ndarray:
    _as_f32_matrix("x", x)
    _as_f32_matrix("gamma", gamma, 1)
    _as_f32_matrix("beta", beta, 1)
    return _core.layernorm(x, gamma, beta, float(eps), _check_isa(isa))


def softmax(x, scale: float = 1.0, *, bias: Optional[np.ndarray] = None, isa: Optional[str] = None) -> np.ndarray:
    """Row-wise ``softmax(x * scale + bias)`` (``bias`` an additive attention bias of x's shape,
    e.g. BEiT's relative position bias; the product is rounded before the bias is added, as in
    PyTorch)."""
    _as_f32_matrix("x", x)
    if bias is not None:
        _as_f32_matrix("bias", bias)
        if bias.shape != x.shape:
            raise ValueError(f"bias must have x's shape {x.shape}, got {bias.shape}")
    return _core.softmax(x, float(scale), _check_isa(isa), bias)


def gelu(x, *, isa: Optional[str] = None) -> np.ndarray:
    _as_f32_matrix("x", x, x.ndim if isinstance(x, np.ndarray) else 2)
    return _core.gelu(x, _check_isa(isa))


def add(a, b, *, isa: Optional[str] = None) -> np.ndarray:
    _as_f32_matrix("a", a, a.ndim if isinstance(a, np.ndarray) else 2)
    _as_f32_matrix("b", b, b.ndim if isinstance(b, np.ndarray) else 2)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    return _core.add(a, b, _check_isa(isa))


def quick_gelu(x, *, isa: Optional[str] = None) -> np.ndarray:
    """CLIP's QuickGELU, ``x * sigmoid(1.702 x)``, element-wise."""
    _as_f32_matrix("x", x, x.ndim if isinstance(x, np.ndarray) else 2)
    return _core.quick_gelu(x, _check_isa(isa))


def swiglu(x, up: Optional[np.ndarray] = None, *, isa: Optional[str] = None) -> np.ndarray:
    """SwiGLU's gate ``silu(x) * up`` (timm ``SwiGLU``); with ``up=None``, ``x`` is the packed
    ``[..., 2n]`` output of timm's ``SwiGLUPacked`` fc1 (gate first), giving ``[..., n]``."""
    _as_f32_matrix("x", x, x.ndim if isinstance(x, np.ndarray) else 2)
    if x.ndim == 0:
        raise ValueError("x must have at least one dimension")
    if up is None:
        if x.shape[-1] % 2:
            raise ValueError(f"a packed SwiGLU input needs an even last dimension, got {x.shape[-1]}")
    else:
        _as_f32_matrix("up", up, up.ndim if isinstance(up, np.ndarray) else 2)
        if up.shape != x.shape:
            raise ValueError(f"shapes differ: {x.shape} vs {up.shape}")
    return _core.swiglu(x, up, _check_isa(isa))


def rope(x, sin, cos, *, heads: int, prefix: int = 0, half: bool = False,
         isa: Optional[str] = None) -> np.ndarray:
    """Rotary position embedding as timm's ``apply_rot_embed_cat``: ``x * cos + rot(x) * sin``
    for each of ``heads`` heads of ``x`` [T, heads * head_dim], tokens ``prefix..T-1`` (class and
    register tokens stay as they are). ``half=False``: interleaved pairs (timm ``rot``);
    ``half=True``: halves (``rope_rotate_half``). ``sin``/``cos``: [T - prefix, head_dim] for
    every head, or [heads, T - prefix, head_dim] per head (timm's 'mixed' RoPE)."""
    _as_f32_matrix("x", x)
    if isinstance(heads, bool) or not isinstance(heads, (int, np.integer)) or heads < 1:
        raise ValueError(f"heads must be a positive int, got {heads!r}")
    if isinstance(prefix, bool) or not isinstance(prefix, (int, np.integer)) or not 0 <= prefix <= x.shape[0]:
        raise ValueError(f"prefix must be an int in 0..{x.shape[0]}, got {prefix!r}")
    if x.shape[1] % heads or (x.shape[1] // heads) % 2:
        raise ValueError(f"x's width {x.shape[1]} must be heads ({heads}) x an even head_dim")
    hd, n = x.shape[1] // heads, x.shape[0] - prefix
    want = [(n, hd), (heads, n, hd)]
    for name, t in (("sin", sin), ("cos", cos)):
        _as_f32_matrix(name, t, t.ndim if isinstance(t, np.ndarray) else 2)
        if t.shape not in want:
            raise ValueError(f"{name} must have shape {want[0]} or {want[1]}, got {t.shape}")
    if sin.shape != cos.shape:
        raise ValueError(f"sin and cos shapes differ: {sin.shape} vs {cos.shape}")
    return _core.rope(x, sin, cos, int(heads), int(prefix), bool(half), _check_isa(isa))


def attention(q, k, v, scale: Optional[float] = None, *, bias: Optional[np.ndarray] = None,
              isa: Optional[str] = None) -> np.ndarray:
    """fp32 multi-head attention ``softmax(q k^T * scale + bias) v`` per head, as the runtime
    computes it: q [H, Tq, dh], k and v [H, T, dh], bias [H, Tq, T] (BEiT's relative position
    bias) or None; ``scale`` defaults to ``dh ** -0.5``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _as_f32_matrix(name, t, 3)
    H, Tq, dh = q.shape
    if k.shape[0] != H or k.shape[2] != dh or v.shape != k.shape:
        raise ValueError(f"k and v must be [{H}, T, {dh}] alike, got {k.shape} and {v.shape}")
    if k.shape[1] == 0 or dh == 0:
        raise ValueError("attention needs at least one key and a non-empty head")
    if bias is not None:
        _as_f32_matrix("bias", bias, 3)
        if bias.shape != (H, Tq, k.shape[1]):
            raise ValueError(f"bias must have shape {(H, Tq, k.shape[1])}, got {bias.shape}")
    scale = float(dh) ** -0.5 if scale is None else float(scale)
    if not np.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return _core.attention(q, k, v, scale, bias, _check_isa(isa))
