"""The executor's forward pass written plainly in numpy: the oracle the tests hold the C++
executor and the converter to (docs/model_format.md is the contract all three follow).

One image at a time, activations stored in float32 between ops like the executor, each op
computed in float64 and rounded to float32 at its output like the scalar reference kernels.
Quantised layers emulate the runtime exactly: a per-image activation scale (dynamic, static
or predicted), ``q = clip(rint(x * float32(1/scale)), -qmax, qmax)``, exact integer
products, and the kernels' float32 epilogues. QuEE gates decide as the executor does, in
Python floats (IEEE double, the same libm exp/log) in the executor's order of operations,
so the decisions agree bit for bit. Not fast, not for production; no torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Tuple

import numpy as np

from .bops import FP32_BITS
from . import graph as opgraph
from .modelfile import attention_bits, check_graph, check_tensors, graph_layer_shapes, graph_reduced_layers, unpack_int4
from .policy import GATE_TENSORS

__all__ = ["forward", "gate_path"]

_F32 = np.float32

try:  # scipy is optional; math.erf vectorised is the same function, only slower
    from scipy.special import erf as _erf
except ImportError:  # pragma: no cover
    _erf = np.vectorize(math.erf, otypes=[np.float64])


@dataclass
class _Linear:
    """One linear layer as the runtime holds it."""

    name: str
    bits: int
    a_bits: int
    scale_mode: str
    static_scale: Optional[float]
    block_size: int
    weight: np.ndarray            # fp32 [N, K]: the stored or the dequantised weights
    q: Optional[np.ndarray]       # int64 [N, K] canonical integers (None for fp32)
    w_scale: Optional[np.ndarray] # f32 [N] or [N, nblocks]
    bias: Optional[np.ndarray]
    coeffs: Optional[np.ndarray]  # predicted scale polynomial, float32 like the executor
    clip: float = 1.0             # dynamic: scale = (max |x| / qmax) * float32(clip)

    @property
    def bops_per_row(self) -> int:
        N, K = self.weight.shape
        return N * K * (FP32_BITS if self.bits == 32 else self.bits * self.a_bits)


def _dequantize(q: np.ndarray, scale: np.ndarray, block: int) -> np.ndarray:
    if scale.ndim == 1:
        return (q * scale[:, None].astype(np.float64)).astype(_F32)
    per_k = np.repeat(scale.astype(np.float64), block, axis=1)[:, : q.shape[1]]
    return (q * per_k).astype(_F32)


def _load_linear(graph: Mapping, tensors: Mapping[str, np.ndarray], name: str) -> _Linear:
    """A layer, or with ``name`` = ``<layer>:lo`` its QuEE reduced copy (own weights and
    precision, the layer's bias, predictor coefficients under ``<layer>:lo``)."""
    base = name.split(":")[0]
    lp = graph["gates"]["reduced"][base] if name.endswith(":lo") else graph["layers"][name]
    pred = graph["predictor"]
    coeffs = None
    if lp["scale"] == "predicted" and pred is not None:
        coeffs = np.asarray(pred["coeffs"][name], dtype=_F32)
    q = w_scale = None
    if lp["w_bits"] == 32:
        weight = tensors[f"{name}.weight"]
    else:
        w_scale = tensors[f"{name}.weight.scale"]
        if lp["w_bits"] == 8:
            q = tensors[f"{name}.weight.q8"].astype(np.int64)
        else:
            q = unpack_int4(tensors[f"{name}.weight.q4"], graph_layer_shapes(graph)[base][1]).astype(np.int64)
        weight = _dequantize(q, w_scale, lp["block_size"])
    return _Linear(name, lp["w_bits"], lp["a_bits"], lp["scale"], lp["static_scale"], lp["block_size"],
                   weight, q, w_scale, tensors.get(f"{base}.bias"), coeffs, lp.get("clip", 1.0))


# --- the float ops, each float64 inside and float32 out -----------------------------------

def _layernorm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=-1, keepdims=True)
    var = ((x64 - mean) ** 2).mean(axis=-1, keepdims=True)
    return ((x64 - mean) / np.sqrt(var + eps) * w + b).astype(_F32)


def _gelu(x: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    return (0.5 * x64 * (1.0 + _erf(x64 * 0.70710678118654752440))).astype(_F32)


def _quick_gelu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(1.702 x), with 1.702 x rounded to float32 first as the kernel does."""
    z = (x * _F32(1.702)).astype(np.float64)
    return (x.astype(np.float64) / (1.0 + np.exp(-z))).astype(_F32)


def _silu_mul(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """SwiGLU's gate: silu(g) * u = g * sigmoid(g) * u."""
    g64 = g.astype(np.float64)
    return (g64 / (1.0 + np.exp(-g64)) * u.astype(np.float64)).astype(_F32)


def _rotate(x: np.ndarray, sin: np.ndarray, cos: np.ndarray, half: bool) -> np.ndarray:
    """timm's apply_rot_embed: x cos + rot(x) sin over the last axis (head width), rot the
    interleaved pair rotation [-x1, x0, -x3, x2, ...] or, ``half``, [-x_hi, x_lo]. In float32,
    each product rounded and then the sum, as the kernels and PyTorch compute it: exact, so a
    quantised layer after it sees the runtime's very values (no rounding-boundary flips)."""
    if half:
        lo, hi = np.split(x, 2, axis=-1)
        rot = np.concatenate([-hi, lo], axis=-1)
    else:
        rot = np.stack([-x[..., 1::2], x[..., 0::2]], axis=-1).reshape(x.shape)
    return x * cos + rot * sin


def _softmax(x: np.ndarray, scale: np.float32) -> np.ndarray:
    z = x.astype(np.float64) * float(scale)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return (z / z.sum(axis=-1, keepdims=True)).astype(_F32)


def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a.astype(np.float64) @ b.astype(np.float64)).astype(_F32)


# --- quantised linear ---------------------------------------------------------------------

def _predicted_scale(coeffs: np.ndarray, r: float) -> np.float32:
    """sum_k a_k r^k by Horner in double (coefficients float32), clamped to >= 1e-12."""
    s = 0.0
    for c in coeffs[::-1]:
        s = s * float(r) + float(c)
    return _F32(max(s, 1e-12))


def _act_scale(lin: _Linear, x: np.ndarray, stat: Optional[np.float32]) -> np.float32:
    """The activation scale of one image's input rows ``x`` to ``lin``."""
    qmax = _F32((1 << (lin.a_bits - 1)) - 1)
    if lin.scale_mode == "static":
        return _F32(lin.static_scale)
    if lin.scale_mode == "predicted":
        if stat is None:
            raise ValueError(f"{lin.name}: predicted scale before the predictor ran")
        return _predicted_scale(lin.coeffs, stat)
    return (_F32(np.abs(x).max()) / qmax) * _F32(lin.clip)


def _quantize_acts(x: np.ndarray, s: np.float32, a_bits: int) -> Tuple[np.ndarray, np.float32]:
    """(q int64, the scale actually used): a zero or non-finite scale quantises to 0."""
    qmax = (1 << (a_bits - 1)) - 1
    if not (s > 0 and np.isfinite(s)):
        return np.zeros(x.shape, dtype=np.int64), _F32(0)
    inv = _F32(1) / _F32(s)
    q = np.clip(np.rint(x.astype(_F32) * inv), -qmax, qmax).astype(np.int64)
    return q, _F32(s)


def _linear_q(lin: _Linear, q: np.ndarray, s: np.float32) -> np.ndarray:
    """Integer GEMM + the kernels' float32 epilogue (per-channel int8 or per-block int4)."""
    if lin.bits == 8:
        acc = (q @ lin.q.T).astype(_F32)
        y = acc * (s * lin.w_scale.astype(_F32))
    else:
        bs = lin.block_size
        y = np.zeros((q.shape[0], lin.q.shape[0]), dtype=_F32)
        for b in range(lin.w_scale.shape[1]):
            acc = (q[:, b * bs:(b + 1) * bs] @ lin.q[:, b * bs:(b + 1) * bs].T).astype(_F32)
            y = y + acc * lin.w_scale[:, b].astype(_F32)
        y = y * s
    return y if lin.bias is None else y + lin.bias


def _linear(lin: _Linear, x: np.ndarray, quantized: bool, stat: Optional[np.float32]) -> np.ndarray:
    """y = x W^T + b for one image's rows ``x`` [rows, K]."""
    if lin.bits == 32 or not quantized:
        y = x.astype(np.float64) @ lin.weight.astype(np.float64).T
        if lin.bias is not None:
            y = y + lin.bias
        return y.astype(_F32)
    q, s = _quantize_acts(x, _act_scale(lin, x, stat), lin.a_bits)
    return _linear_q(lin, q, s)


# --- int8 attention (docs/model_format.md "attention") -------------------------------------

# 2^f on [-1/2, 1/2], f = 0 exact: the kernels' exp2 polynomial for softmax_q8.
_EXP2_POLY = (0.6931241750717163, 0.24024099111557007, 0.05590642988681793, 0.009582852944731712)


def _fma32(a: np.ndarray, b, c) -> np.ndarray:
    """float32 fused multiply-add: the product of two float32 is exact in float64, so only
    the sum rounds (twice, float64 then float32: off by an ulp in rare ties)."""
    return (a.astype(np.float64) * np.float64(b) + np.asarray(c, dtype=np.float64)).astype(_F32)


def _quantize_rows_q8(x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(q int64, scale f32 [rows]): each row quantised to 8 bits on its own dynamic scale,
    max |x| / 127, by the activation quantiser's rule."""
    rows = [_quantize_acts(r, _F32(np.abs(r).max()) / _F32(127), 8) for r in x]
    return np.stack([q for q, _ in rows]), np.array([s for _, s in rows], dtype=_F32)


def _softmax_q8(s: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Rows of scores to (probabilities as int64 in [0, 127], the scale of each row):
    e = 2^y, y = (s - max) log2 e, by the kernels' polynomial; q = rint(127 e); the row's
    scale is 1 / sum(q), so the dequantised row sums to 1."""
    y = ((s - s.max(axis=-1, keepdims=True)).astype(_F32) * _F32(1.44269504088896341)).astype(_F32)
    y = np.maximum(y, _F32(-126))
    n = np.rint(y)
    f = (y - n).astype(_F32)
    p = np.full(f.shape, _F32(_EXP2_POLY[3]))
    for c in _EXP2_POLY[2::-1]:
        p = _fma32(p, f, _F32(c))
    p = _fma32(p, f, _F32(1))
    e = (p * np.ldexp(_F32(1), n.astype(np.int32))).astype(_F32)
    q = np.minimum(np.rint(e * _F32(127)), 127).astype(np.int64)
    return q, (_F32(1) / q.sum(axis=-1).astype(_F32)).astype(_F32)


def _attention_q8(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: np.float32, bias=None) -> np.ndarray:
    """One head's attention on int8 operands, [T, dh] each: q and k quantised per token (the
    softmax scale folded into q's), s = q.k^T with the int8 GEMM's epilogue, probabilities
    from softmax_q8, v quantised per channel, o = p.v likewise."""
    qi, sq = _quantize_rows_q8(q)
    ki, sk = _quantize_rows_q8(k)
    s = (qi @ ki.T).astype(_F32) * ((sq * scale).astype(_F32)[:, None] * sk[None, :])
    if bias is not None:  # relative position bias, added to the dequantised scores
        s = (s + bias).astype(_F32)
    pi, sp = _softmax_q8(s.astype(_F32))
    vi, sv = _quantize_rows_q8(v.T)
    return (pi @ vi.T).astype(_F32) * (sp[:, None] * sv[None, :])


# --- the model ----------------------------------------------------------------------------

class _Model:
    """Graph + tensors arranged for the forward pass: the op list, linear layers by name."""

    def __init__(self, graph: Mapping, tensors: Mapping[str, np.ndarray]):
        check_graph(graph)
        check_tensors(graph, tensors)
        self.g, self.t, self.a = graph, tensors, graph["arch"]
        self.ops = opgraph.ops_of(graph)
        self.block_ends = {i: b for b, i in opgraph.block_ends(self.ops).items()}
        self.block_starts = {}
        for i, op in enumerate(self.ops):
            if op["block"] is not None:
                self.block_starts.setdefault(op["block"], i)
        self.block_starts = {i: b for b, i in self.block_starts.items()}
        self.depth = opgraph.depth(self.ops)
        self.tokens_chain = opgraph.tokens_chain(self.ops)
        self.lin = {name: _load_linear(graph, tensors, name) for name in graph["layers"]}
        self.lo = {name: _load_linear(graph, tensors, f"{name}:lo") for name in graph_reduced_layers(graph)}
        self.lo_blocks = {op["block"] for op in self.ops if op["weights"].get("layer") in self.lo}
        self.exits = {e["block"]: e for e in graph["exits"]}
        gates = graph.get("gates")
        self.gates = {}
        if gates is not None:
            self.lam = float(_F32(gates["lambda"]))
            self.topk, self.hidden = gates["topk"], gates["hidden"]
            for b, e in self.exits.items():
                if e["rule"] == "gate":
                    w = {k: tensors[f"gates.{b}.{k}"] for k in GATE_TENSORS}
                    w["cost"] = np.asarray(gates["cost"][str(b)], dtype=_F32)
                    self.gates[b] = w
        pred = graph["predictor"]
        self.pred_block = pred["block"] if pred is not None else -1
        self.pred_chunk = pred["chunk"] if pred is not None else 0
        self.attn_bits = attention_bits(graph)

    def weight(self, op: Mapping, role: str) -> np.ndarray:
        return self.t[op["weights"][role]]

    def range_statistic(self, x: np.ndarray) -> np.float32:
        """Mean over chunks of ``chunk`` consecutive values (last one partial) of max |x|."""
        flat, c = np.abs(x.reshape(-1)), self.pred_chunk
        maxima = [float(flat[i:i + c].max()) for i in range(0, flat.size, c)]
        return _F32(np.mean(maxima)) if maxima else _F32(0)


class _Run:
    """One image's pass: the state the ops share (precision path, predictor statistic, BOPs)."""

    def __init__(self, m: _Model, quantized: bool):
        self.m, self.quantized = m, quantized
        self.bops, self.stat = 0, None
        self.precision = 1  # 1 full, 2 reduced (after a gate sent the image down the reduced path)
        self.block_path = np.zeros(m.depth, dtype=np.uint8)

    def linear(self, name: str, x: np.ndarray) -> np.ndarray:
        m = self.m
        layer = m.lo[name] if self.precision == 2 and name in m.lo else m.lin[name]
        self.bops += x.shape[0] * layer.bops_per_row
        return _linear(layer, x, self.quantized, self.stat)


# --- one function per op kind: (run, op, inputs) -> outputs --------------------------------

def _pool(x: np.ndarray, attrs: Mapping) -> np.ndarray:
    if attrs["mode"] == "token":
        return x[attrs["start"]]
    return x[attrs["start"]:].astype(np.float64).mean(axis=0).astype(_F32)


def _op_patch_embed(r: _Run, op: Mapping, img: np.ndarray):
    """[P, C*ph*pw] in (c, i, j) order, patches row-major over the grid, through the layer."""
    a = op["attrs"]
    C, (ph, pw) = a["in_chans"], a["patch_size"]
    gh, gw = a["img_size"][0] // ph, a["img_size"][1] // pw
    p = img.reshape(C, gh, ph, gw, pw).transpose(1, 3, 0, 2, 4)
    return [r.linear(op["weights"]["layer"], np.ascontiguousarray(p.reshape(gh * gw, C * ph * pw)))]


def _op_prefix_tokens(r: _Run, op: Mapping, x: np.ndarray):
    """[cls, dist, reg...] before the rows of ``x``."""
    D = x.shape[1]
    prefix = [r.m.weight(op, role).reshape(-1, D) for role in ("cls", "dist", "reg") if role in op["weights"]]
    return [np.concatenate(prefix + [x], axis=0)]


def _op_pos_embed(r: _Run, op: Mapping, x: np.ndarray):
    return [x + r.m.weight(op, "pos")[0]]


def _op_layernorm(r: _Run, op: Mapping, x: np.ndarray):
    return [_layernorm(x, r.m.weight(op, "weight"), r.m.weight(op, "bias"), float(_F32(op["attrs"]["eps"])))]


def _op_linear(r: _Run, op: Mapping, x: np.ndarray):
    if x.ndim == 1:
        return [r.linear(op["weights"]["layer"], x[None])[0]]
    return [r.linear(op["weights"]["layer"], x)]


def _op_attention(r: _Run, op: Mapping, qkv: np.ndarray):
    """Multi-head self-attention, qkv split as timm does ([T, 3, heads, dh])."""
    T, H = qkv.shape[0], op["attrs"]["heads"]
    D = qkv.shape[1] // 3
    dh = D // H
    r.bops += 2 * T * T * D * r.m.attn_bits ** 2
    q, k, v = qkv.reshape(T, 3, H, dh).transpose(1, 2, 0, 3)  # each [H, T, dh]
    scale = _F32(1) / np.sqrt(_F32(dh))
    bias = r.m.weight(op, "bias") if "bias" in op["weights"] else None  # [H, T, T]
    if r.m.attn_bits == 8:
        return [np.stack([_attention_q8(q[h], k[h], v[h], scale, None if bias is None else bias[h])
                          for h in range(H)]).transpose(1, 0, 2).reshape(T, D)]
    s = _matmul(q, k.transpose(0, 2, 1))
    if bias is not None:  # PyTorch's order: the rounded s * scale, plus the bias, then softmax
        s, scale = ((s * scale).astype(_F32) + bias).astype(_F32), _F32(1)
    attn = _softmax(s, scale)
    return [_matmul(attn, v).transpose(1, 0, 2).reshape(T, D)]


def _op_rope(r: _Run, op: Mapping, qkv: np.ndarray):
    """q and k of the tokens after the prefix rotated, per head; v and the prefix as they were."""
    a = op["attrs"]
    T, H, p = qkv.shape[0], a["heads"], a["prefix"]
    dh = qkv.shape[1] // (3 * H)
    heads = qkv.reshape(T, 3, H, dh).copy()
    sin, cos = (r.m.weight(op, role).astype(_F32) for role in ("sin", "cos"))
    if a["per_head"]:  # [H, n, dh] -> [n, H, dh], to line up with the tokens' heads
        sin, cos = sin.transpose(1, 0, 2), cos.transpose(1, 0, 2)
    else:
        sin, cos = sin[:, None], cos[:, None]
    for j in (0, 1):  # q, k
        heads[p:, j] = _rotate(heads[p:, j], sin, cos, a["half"])
    return [heads.reshape(T, 3 * H * dh)]


def _op_swiglu(r: _Run, op: Mapping, x: np.ndarray):
    gate, up = np.split(x, 2, axis=-1)
    return [_silu_mul(gate, up)]


def _op_attention_pool(r: _Run, op: Mapping, kv: np.ndarray):
    """The fixed query [D] against kv rows start.. split as timm does ([T, 2, heads, dh]);
    always fp32."""
    kv = kv[op["attrs"]["start"]:]
    T, H = kv.shape[0], op["attrs"]["heads"]
    D = kv.shape[1] // 2
    dh = D // H
    r.bops += 2 * T * D * FP32_BITS
    k, v = kv.reshape(T, 2, H, dh).transpose(1, 2, 0, 3)  # each [H, T, dh]
    q = r.m.weight(op, "query").reshape(H, 1, dh)
    attn = _softmax(_matmul(q, k.transpose(0, 2, 1)), _F32(1) / np.sqrt(_F32(dh)))
    return [_matmul(attn, v).reshape(D)]


def _op_gelu(r: _Run, op: Mapping, x: np.ndarray):
    return [_gelu(x)]


def _op_quick_gelu(r: _Run, op: Mapping, x: np.ndarray):
    return [_quick_gelu(x)]


def _op_layer_scale(r: _Run, op: Mapping, x: np.ndarray):
    return [r.m.weight(op, "gamma") * x]


def _op_add(r: _Run, op: Mapping, x: np.ndarray, y: np.ndarray):
    return [x + y]


def _op_average(r: _Run, op: Mapping, x: np.ndarray, y: np.ndarray):
    return [(x + y) / _F32(2)]


def _op_pool(r: _Run, op: Mapping, x: np.ndarray):
    return [_pool(x, op["attrs"])]


def _op_exit(r: _Run, op: Mapping, x: np.ndarray):
    """The exit head's (logits, features); whether the image leaves is the interpreter's."""
    a = op["attrs"]
    features = _layernorm(_pool(x, a), r.m.weight(op, "norm.weight"), r.m.weight(op, "norm.bias"), float(_F32(a["eps"])))
    return [r.linear(op["weights"]["layer"], features[None])[0], features]


def _op_output(r: _Run, op: Mapping, *ins: np.ndarray):
    return []


_OPS = {"patch_embed": _op_patch_embed, "prefix_tokens": _op_prefix_tokens, "pos_embed": _op_pos_embed,
        "layernorm": _op_layernorm, "linear": _op_linear, "attention": _op_attention, "rope": _op_rope,
        "swiglu": _op_swiglu, "attention_pool": _op_attention_pool, "gelu": _op_gelu,
        "quick_gelu": _op_quick_gelu, "layer_scale": _op_layer_scale, "add": _op_add, "average": _op_average, "pool": _op_pool,
        "exit": _op_exit, "output": _op_output}
assert set(_OPS) == set(opgraph.OP_KINDS), "every op kind needs its function here"


def _exit_taken(rule: str, threshold: float, logits: np.ndarray) -> bool:
    z = logits.astype(np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    top = np.sort(p)[::-1]
    score = top[0] if rule == "confidence" else top[0] - (top[1] if top.size > 1 else 0.0)
    return bool(score >= float(_F32(threshold)))


def gate_path(logits: np.ndarray, gate: Mapping[str, np.ndarray], lam: float, topk: int) -> int:
    """The path (0 exit, 1 full, 2 reduced) a QuEE gate sends an image down, from its exit
    head's float32 logits: features (top-``topk`` softmax probabilities, descending, then
    the entropy -sum p ln p), e = sigmoid(W2 relu(W1 f + b1) + b2), argmin e_p + lam * cost_p
    (ties: the lower path). Python floats in the executor's order of operations."""
    z = [float(v) for v in logits]
    mx = max(z)
    p = [math.exp(v - mx) for v in z]
    total = 0.0
    for v in p:
        total += v
    p = [v / total for v in p]
    entropy = 0.0
    for v in p:
        entropy -= v * math.log(v) if v > 0.0 else 0.0
    f = sorted(p, reverse=True)[:topk] + [entropy]
    w1, b1, w2, b2 = (gate[k] for k in GATE_TENSORS)
    hidden = len(b1)
    h = []
    for j in range(hidden):
        s = float(b1[j])
        for i in range(topk + 1):
            s += float(w1[j, i]) * f[i]
        h.append(max(s, 0.0))
    best, best_score = 0, 0.0
    for path in range(3):
        s = float(b2[path])
        for j in range(hidden):
            s += float(w2[path, j]) * h[j]
        score = 1.0 / (1.0 + math.exp(-s)) + float(lam) * float(gate["cost"][path])
        if path == 0 or score < best_score:
            best, best_score = path, score
    return best


def _forward_image(m: _Model, img: np.ndarray, quantized: bool) -> Tuple[np.ndarray, int, int, np.ndarray, np.ndarray, np.ndarray]:
    """Interpret the op list on one image: (logits, exit block, BOPs, block path, features, tokens)."""
    r = _Run(m, quantized)
    env = {opgraph.IMAGE: img}

    def leave(op: Mapping, block: int):
        """An image leaving at ``op``'s exit: its head's outputs, and its tokens through the
        ops that make the program's tokens output (the final LayerNorm)."""
        x = env[op["in"][0]]
        for t_op in m.tokens_chain:
            x = _OPS[t_op["op"]](r, t_op, x)[0]
        return env[op["out"][0]], block, r.bops, r.block_path, env[op["out"][1]], x

    for i, op in enumerate(m.ops):
        if i in m.block_starts:
            b = m.block_starts[i]
            # Reduced only where the block has a reduced copy of some layer (else it ran full weights).
            r.block_path[b] = 2 if r.precision == 2 and b in m.lo_blocks else 1
        outs = _OPS[op["op"]](r, op, *(env[t] for t in op["in"]))
        env.update(zip(op["out"], outs))
        if m.block_ends.get(i) == m.pred_block:
            r.stat = m.range_statistic(env[op["out"][0]])
        if op["op"] == "exit":
            b, logits = op["block"], outs[0]
            e = m.exits[b]
            if e["rule"] == "gate":
                path = gate_path(logits, m.gates[b], m.lam, m.topk)
                r.bops += (m.hidden * (m.topk + 1) + 3 * m.hidden) * FP32_BITS  # the gate's MLP
                if path == 0:
                    return leave(op, b)
                r.precision = path
            elif _exit_taken(e["rule"], e["threshold"], logits):
                return leave(op, b)
    logits, features, tokens = (env[t] for t in m.ops[-1]["in"])
    return logits, m.depth - 1, r.bops, r.block_path, features, tokens


def forward(graph: Mapping, tensors: Mapping[str, np.ndarray], x: np.ndarray, *,
            quantized: bool = True, paths: bool = False, outputs: bool = False):
    """``(logits f32 [B, n], exit_block int32 [B], bops int64 [B])`` for images ``x``
    [B, C, H, W] (already normalised), plus ``block_path`` uint8 [B, depth] (0 not run,
    1 full, 2 reduced precision; as the runtime's) when ``paths=True``. ``quantized=False``
    runs every layer in fp32 with its stored (for integer layers: dequantised) weights, to
    isolate quantisation error; exits still apply and BOPs are still those of the graph's
    precisions. ``outputs=True`` returns a dict instead, with ``features`` [B, D] and
    ``tokens`` [B, T, D] (the runtime's :class:`~pyruntime.RunResult` fields) besides."""
    m = _Model(graph, tensors)
    a = m.a
    x = np.asarray(x, dtype=_F32)
    expect = (a["in_chans"], *a["img_size"])
    if x.ndim != 4 or x.shape[1:] != expect:
        raise ValueError(f"x must have shape [B, {expect[0]}, {expect[1]}, {expect[2]}], got {x.shape}")
    B, n = x.shape[0], opgraph.infer_shapes(m.ops, check=False)[m.ops[-1]["in"][0]][0]
    logits = np.zeros((B, n), dtype=_F32)
    exit_block = np.full(B, m.depth - 1, dtype=np.int32)
    bops = np.zeros(B, dtype=np.int64)
    block_path = np.zeros((B, m.depth), dtype=np.uint8)
    T = opgraph.num_tokens(m.ops)
    features = np.zeros((B, a["embed_dim"]), dtype=_F32)
    tokens = np.zeros((B, T, a["embed_dim"]), dtype=_F32)
    for i in range(B):
        logits[i], exit_block[i], bops[i], block_path[i], features[i], tokens[i] = _forward_image(m, x[i], quantized)
    if outputs:
        return {"logits": logits, "exit_block": exit_block, "bops": bops, "block_path": block_path,
                "features": features, "tokens": tokens}
    return (logits, exit_block, bops, block_path) if paths else (logits, exit_block, bops)
