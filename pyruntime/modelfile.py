"""Reader and writer of the pyruntime model file (docs/model_format.md, format version 4).

The container is safetensors; everything pyruntime-specific lives in its ``__metadata__``.
The reader trusts nothing: it checks sizes before parsing, the magic and version before the
graph, the header's SHA-256 (version 3), every tensor's CRC-32, the runtime's size limits,
the graph's op list (version 4, ``pyruntime.graph``; older graphs are lowered to one), and
that the graph and the tensors agree exactly (names, dtypes, shapes), so that the C++
executor is only ever handed a consistent model. Every problem is a
:class:`~pyruntime.errors.FormatError` naming the file and what is wrong.

NumPy and safetensors, plus the compiled extension's ``limits()`` (the one source of the size
limits); no torch.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import graph as opgraph
from ._atomic import atomic_path
from .errors import FormatError, PolicyError
from .policy import ATTN_BITS, GATE_TENSORS, ExitPolicy, GatePolicy, LayerPolicy, Policy, PredictorPolicy, check_attn_bits

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "Header",
    "write_model",
    "read_model",
    "read_header",
    "check_graph",
    "check_tensors",
    "expected_tensors",
    "graph_layer_names",
    "graph_layer_shapes",
    "graph_reduced_layers",
    "header_digest",
    "check_block_size",
    "limits",
    "attention_bits",
    "set_attention_bits",
    "format_version",
    "layer_precision",
    "linear_tensors",
    "num_patches",
    "num_prefix_tokens",
    "num_tokens",
    "pack_int4",
    "unpack_int4",
]

MAGIC = "pyruntime-vit"
# 2 added graph.attention; 3 added the header checksum (KEY_HEADER_SHA256); 4 added
# graph.ops, the typed op list (pyruntime.graph). Every file is written as 4; 2 and 3 load
# through the lowering of their arch to ops.
FORMAT_VERSION = 4
HEADER_CHECKSUM_VERSION = 3
OPS_VERSION = 4

KEY_MAGIC = "pyruntime.magic"
KEY_VERSION = "pyruntime.format_version"
KEY_GRAPH = "pyruntime.graph"
KEY_POLICY = "pyruntime.policy"
KEY_PROVENANCE = "pyruntime.provenance"
KEY_CHECKSUMS = "pyruntime.checksums"
KEY_HEADER_SHA256 = "pyruntime.header_sha256"
_DIGEST_PLACEHOLDER = "0" * 64  # same length as the hex digest, so sealing shifts no byte

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit

_GRAPH_KEYS = ("arch", "preprocess", "layers", "exits", "predictor")
# Absent or null: none (gates: files written before gates stay valid; attention: fp32).
_OPTIONAL_GRAPH_KEYS = ("gates", "attention", "ops")
_GRAPH_GATE_KEYS = ("lambda", "topk", "hidden", "cost", "reduced")
_LAYER_KEYS = ("w_bits", "a_bits", "scale", "static_scale", "block_size")
_LAYER_OPTIONAL_KEYS = ("clip",)  # written only when not its default (dynamic-scale clip 1)


def _layer_keys_ok(v: Any) -> bool:
    return isinstance(v, Mapping) and set(_LAYER_KEYS) <= set(v) <= set(_LAYER_KEYS + _LAYER_OPTIONAL_KEYS)
_PREPROCESS_KEYS = ("mean", "std", "input_size")
# timm's eval transform for images of another size (pyruntime.imagedata.Preprocess); files
# written before it have none of these keys and resize nothing differently: bilinear, crop 1.
_PREPROCESS_RESIZE_KEYS = ("crop_pct", "interpolation", "crop_mode")
_BOOL, _POS_INT, _NONNEG_INT, _PAIR = "bool", "positive int", "non-negative int", "pair"
ARCH_KEYS = {
    "img_size": _PAIR, "patch_size": _PAIR, "in_chans": _POS_INT, "embed_dim": _POS_INT,
    "depth": _POS_INT, "num_heads": _POS_INT, "mlp_hidden": _POS_INT, "num_classes": _NONNEG_INT,
    "cls_token": _BOOL, "dist_token": _BOOL, "reg_tokens": _NONNEG_INT, "no_embed_class": _BOOL,
    "global_pool": "token|avg|map", "fc_norm": _BOOL, "final_norm": _BOOL, "norm_pre": _BOOL,
    "layer_scale": _BOOL, "qkv_bias": _BOOL, "eps": "float in [1e-30, 1]",
}

_F32, _I8, _U8 = np.dtype("<f4"), np.dtype("i1"), np.dtype("u1")

# Preprocessing and LayerNorm bounds (docs/model_format.md). Within them every pixel value
# 0..255 maps to a distinct finite float32 (the float32 spacing at 1e4 is 2^-10, finer than a
# pixel step 1/255; |x| <= (1e4 + 1) / 1e-6 stays far below float32's max), so a file cannot
# make every image look the same to the network; eps <= 1 keeps LayerNorm from flattening
# its input and eps >= 1e-30 keeps it a non-zero float32.
MAX_ABS_MEAN = 1e4
STD_RANGE = (1e-6, 1e6)
EPS_RANGE = (1e-30, 1.0)


@functools.lru_cache(maxsize=1)
def limits() -> Dict[str, int]:
    """The runtime's size limits (csrc/runtime_limits.h), as the compiled extension reports them."""
    from . import _core

    return dict(_core.limits())


# --- graph arithmetic shared by bops, the numpy reference and the converter ---------------

def num_patches(arch: Mapping) -> int:
    (h, w), (ph, pw) = arch["img_size"], arch["patch_size"]
    return (h // ph) * (w // pw)


def num_prefix_tokens(arch: Mapping) -> int:
    return int(arch["cls_token"]) + int(arch["dist_token"]) + int(arch["reg_tokens"])


def num_tokens(arch: Mapping) -> int:
    return num_patches(arch) + num_prefix_tokens(arch)


def graph_reduced_layers(graph: Mapping) -> Dict[str, dict]:
    """``{layer: precision}`` of the layers with a QuEE reduced-precision copy (``gates.reduced``;
    empty without gates)."""
    gates = graph.get("gates")
    return dict(gates.get("reduced") or {}) if isinstance(gates, Mapping) else {}


def graph_layer_names(graph: Mapping, reduced: bool = False) -> List[str]:
    """Every linear layer of the graph, in execution order (from its op list: ``ops``, or the
    lowering of ``arch`` and ``exits``): the keys of ``graph.layers``. With ``reduced=True``
    each layer with a QuEE reduced-precision copy is followed by that copy, named
    ``<layer>:lo`` (its tensors' prefix; never a key of ``graph.layers``: its precision is
    ``gates.reduced[<layer>]``)."""
    return list(graph_layer_shapes(graph, reduced))


def graph_layer_shapes(graph: Mapping, reduced: bool = False) -> Dict[str, Tuple[int, int]]:
    """``{layer: (N, K)}``: output and input features of every linear layer, in execution
    order (and, with ``reduced=True``, of every ``<layer>:lo`` copy: the same as its layer's)."""
    lo = graph_reduced_layers(graph) if reduced else {}
    shapes: Dict[str, Tuple[int, int]] = {}
    for lin in opgraph.linears(opgraph.ops_of(graph)):
        shapes[lin.layer] = (lin.N, lin.K)
        if lin.layer in lo:
            shapes[f"{lin.layer}:lo"] = (lin.N, lin.K)
    return shapes


def layer_precision(graph: Mapping, name: str) -> Mapping:
    """The precision entry of a layer or of a ``<layer>:lo`` reduced copy."""
    if name.endswith(":lo"):
        return graph["gates"]["reduced"][name[:-3]]
    return graph["layers"][name]


# --- int4 nibble packing (the on-disk layout of ``<layer>.weight.q4``) ----------------------

def pack_int4(q: np.ndarray) -> np.ndarray:
    """Canonical int4 values q [N, K] in [-8, 7] -> u8 [N, ceil(K/2)]: each nibble holds
    value + 8, even k in the low nibble; an odd K pads the last high nibble with 8 (value 0)."""
    q = np.asarray(q)
    if q.ndim != 2 or q.size and (q.min() < -8 or q.max() > 7):
        raise ValueError("int4 values must be a 2-D array in [-8, 7]")
    u = (q.astype(np.int16) + 8).astype(np.uint8)
    if u.shape[1] % 2:
        u = np.concatenate([u, np.full((u.shape[0], 1), 8, dtype=np.uint8)], axis=1)
    return np.ascontiguousarray(u[:, 0::2] | (u[:, 1::2] << 4))


def unpack_int4(packed: np.ndarray, K: int) -> np.ndarray:
    """Inverse of :func:`pack_int4`: int8 [N, K]."""
    q = np.empty((packed.shape[0], packed.shape[1] * 2), dtype=np.int8)
    q[:, 0::2] = (packed & 0x0F).astype(np.int8) - 8
    q[:, 1::2] = (packed >> 4).astype(np.int8) - 8
    return q[:, :K]


def linear_tensors(name: str, w: np.ndarray, bias: Optional[np.ndarray], lp: LayerPolicy) -> Dict[str, np.ndarray]:
    """The tensors one linear layer is stored as at precision ``lp``, from its float32
    weight [N, K] (quantised by the runtime's own quantiser, ``pyruntime.kernels``): the one
    definition shared by the converter and in-process re-quantisation (``pyruntime.latency``),
    so both produce identical files."""
    out = {} if bias is None else {f"{name}.bias": bias}
    if lp.w_bits == 32:
        out[f"{name}.weight"] = w
        return out
    from . import kernels

    check_block_size(name, w.shape[1], lp)
    block = lp.block_size if lp.w_bits == 4 else None
    q, scales = kernels.quantize_weights(w, lp.w_bits, block).canonical()
    q, scales = np.asarray(q), np.asarray(scales, dtype=np.float32)
    if lp.w_bits == 8:
        out[f"{name}.weight.q8"] = np.ascontiguousarray(q, dtype=np.int8)
        out[f"{name}.weight.scale"] = scales
    else:
        out[f"{name}.weight.q4"] = pack_int4(q)
        out[f"{name}.weight.scale"] = scales.reshape(w.shape[0], -1)
    return out


# --- graph validation -------------------------------------------------------------------------

def _check_arch_value(key: str, kind: str, v: Any) -> None:
    is_int = isinstance(v, int) and not isinstance(v, bool)
    ok = {
        _BOOL: isinstance(v, bool),
        _POS_INT: is_int and v > 0,
        _NONNEG_INT: is_int and v >= 0,
        _PAIR: isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v),
        "token|avg|map": v in ("token", "avg", "map"),  # map: attention pooling, only with graph.ops
        "float in [1e-30, 1]": isinstance(v, (int, float)) and not isinstance(v, bool) and EPS_RANGE[0] <= v <= EPS_RANGE[1],
    }[kind]
    if not ok:
        raise FormatError(f"arch.{key} must be a {kind}, got {v!r}")


def _check_arch(arch: Any) -> None:
    if not isinstance(arch, Mapping):
        raise FormatError("graph.arch must be an object")
    unknown = sorted(map(str, set(arch) - set(ARCH_KEYS)))
    missing = sorted(set(ARCH_KEYS) - set(arch))
    if unknown or missing:
        raise FormatError(f"graph.arch has unknown keys {unknown} / misses keys {missing}")
    for key, kind in ARCH_KEYS.items():
        _check_arch_value(key, kind, arch[key])
    (h, w), (ph, pw) = arch["img_size"], arch["patch_size"]
    if h % ph or w % pw:
        raise FormatError(f"image size {h}x{w} is not a multiple of the patch size {ph}x{pw}")
    if arch["embed_dim"] % arch["num_heads"]:
        raise FormatError(f"embed_dim {arch['embed_dim']} is not a multiple of num_heads {arch['num_heads']}")
    if arch["global_pool"] == "token" and not arch["cls_token"]:
        raise FormatError("global_pool 'token' needs a class token")
    if arch["dist_token"] and not (arch["cls_token"] and arch["global_pool"] == "token"):
        raise FormatError("a distillation token needs a class token and global_pool 'token'")
    _check_arch_limits(arch)


def _check_arch_limits(arch: Mapping) -> None:
    """The runtime's size limits, checked on the graph before any tensor is read or allocated."""
    lim = limits()
    for side in (*arch["img_size"], *arch["patch_size"]):
        if side > lim["max_image_side"]:
            raise FormatError(f"image/patch side {side} exceeds the runtime's limit max_image_side={lim['max_image_side']}")
    if arch["depth"] > lim["max_depth"]:
        raise FormatError(f"depth {arch['depth']} exceeds the runtime's limit max_depth={lim['max_depth']}")
    for key in ("embed_dim", "mlp_hidden", "num_classes", "in_chans", "reg_tokens"):
        if arch[key] > lim["max_dim"]:
            raise FormatError(f"arch.{key} {arch[key]} exceeds the runtime's limit max_dim={lim['max_dim']}")
    T = num_tokens(arch)
    if T > lim["max_tokens"]:
        raise FormatError(f"{T} tokens per image (patches + prefix tokens) exceed the runtime's limit "
                          f"max_tokens={lim['max_tokens']}")


def check_block_size(name: str, K: int, lp: Any) -> None:
    """An int4 layer's block along K must fit in K rounded up to 32 (the kernels pad K to a
    whole block: a larger block only allocates padding); any layer's must fit a C++ size."""
    bits, bs = (lp["w_bits"], lp["block_size"]) if isinstance(lp, Mapping) else (lp.w_bits, lp.block_size)
    cap = -(-K // 32) * 32 if bits == 4 else limits()["max_k"]
    if bs > cap:
        what = f"K={K} rounded up to 32" if bits == 4 else f"the runtime's limit max_k={cap}"
        raise FormatError(f"layer {name!r}: block_size {bs} exceeds {what}")


def _check_layer_limits(graph: Mapping) -> None:
    lim = limits()
    for name, (N, K) in graph_layer_shapes(graph, reduced=True).items():
        lp = layer_precision(graph, name)
        if K > lim["max_dim"]:
            raise FormatError(f"layer {name!r}: K={K} exceeds the runtime's limit max_dim={lim['max_dim']}")
        if lp["w_bits"] != 32 and K > lim["max_k"]:
            raise FormatError(f"layer {name!r}: K={K} exceeds the runtime's limit max_k={lim['max_k']} for integer layers")
        check_block_size(name, K, lp)


def _check_preprocess(pre: Any, arch: Mapping) -> None:
    if not isinstance(pre, Mapping) or not set(_PREPROCESS_KEYS) <= set(pre) <= set(_PREPROCESS_KEYS + _PREPROCESS_RESIZE_KEYS):
        raise FormatError(f"graph.preprocess must be an object with keys {list(_PREPROCESS_KEYS)} "
                          f"(and optionally {list(_PREPROCESS_RESIZE_KEYS)})")
    resize = {k: pre[k] for k in _PREPROCESS_RESIZE_KEYS if k in pre}
    if resize:
        from .imagedata import Preprocess

        crop = resize.get("crop_pct", 1.0)
        if isinstance(crop, bool) or not isinstance(crop, (int, float)) or not all(
                isinstance(resize.get(k, "x"), str) for k in ("interpolation", "crop_mode")):
            raise FormatError(f"preprocess resize keys have the wrong types: {resize!r:.200}")
        try:
            Preprocess((arch["in_chans"], *arch["img_size"]), (0.0,) * arch["in_chans"], (1.0,) * arch["in_chans"],
                       float(crop), resize.get("interpolation", "bilinear"), resize.get("crop_mode", "center"))
        except ValueError as e:
            raise FormatError(f"preprocess: {e}") from None
    C = arch["in_chans"]
    for key in ("mean", "std"):
        v = pre[key]
        if not (isinstance(v, list) and len(v) == C and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
            raise FormatError(f"preprocess.{key} must be a list of {C} numbers, got {v!r:.200}")
    # Comparisons are False for NaN, so each test is written to pass only for good values.
    if not all(abs(x) <= MAX_ABS_MEAN for x in pre["mean"]):
        raise FormatError(f"preprocess.mean must lie in [-{MAX_ABS_MEAN:g}, {MAX_ABS_MEAN:g}], got {pre['mean']}")
    lo, hi = STD_RANGE
    if not all(lo <= x <= hi for x in pre["std"]):
        raise FormatError(f"preprocess.std must lie in [{lo:g}, {hi:g}], got {pre['std']}")
    expect = [C, *arch["img_size"]]
    if pre["input_size"] != expect:
        raise FormatError(f"preprocess.input_size {pre['input_size']} disagrees with arch {expect}")


def _graph_policy(graph: Mapping) -> Policy:
    """The graph's precision, exits and predictor as a fully explicit Policy (no defaults)."""
    layers = graph["layers"]
    if not isinstance(layers, Mapping):
        raise FormatError("graph.layers must be an object {layer: precision}")
    exits = graph["exits"]
    if not isinstance(exits, list):
        raise FormatError("graph.exits must be a list")
    for k, v in layers.items():
        if isinstance(v, Mapping) and not _layer_keys_ok(v):
            raise FormatError(f"graph layer {k!r} must have exactly the keys {list(_LAYER_KEYS)} (no defaults in a file; "
                              f"optionally {list(_LAYER_OPTIONAL_KEYS)})")
    pred = graph["predictor"]
    return Policy(
        layers={k: LayerPolicy.from_dict(v, f"layer {k!r}") for k, v in layers.items()},
        exits=[ExitPolicy.from_dict(e, f"exit #{i}") for i, e in enumerate(exits)],
        predictor=None if pred is None else PredictorPolicy.from_dict(pred),
        gates=_graph_gates(graph.get("gates")),
        attn_bits=attention_bits(graph),
    )


def attention_bits(graph: Mapping) -> int:
    """Operand bits of the graph's attention matmuls: 32 (fp32) unless ``attention`` says 8."""
    att = graph.get("attention")
    if att is None:
        return 32
    if not isinstance(att, Mapping) or set(att) != {"bits"}:
        raise FormatError(f"graph.attention must be {{\"bits\": 8 | 32}}, got {att!r}")
    bits = att["bits"]
    if isinstance(bits, bool) or bits not in ATTN_BITS:
        raise FormatError(f"graph.attention bits must be 8 or 32, got {bits!r}")
    return bits


def set_attention_bits(graph: dict, bits: int) -> dict:
    """``graph`` with its attention at ``bits``, as the converter writes it: no ``attention``
    key for fp32 (32), the form every format version reads; ``{"bits": 8}`` for int8."""
    graph.pop("attention", None)
    if check_attn_bits(bits) != 32:
        graph["attention"] = {"bits": bits}
    return graph


def _feature_version(graph: Mapping) -> int:
    """The oldest format version whose features hold ``graph`` (int8 attention came in 2,
    the op list in 4)."""
    if "ops" in graph:
        return OPS_VERSION
    return 2 if attention_bits(graph) != 32 else 1


def format_version(graph: Mapping) -> int:
    """The format version a file holding ``graph`` is written as: the oldest that holds it
    and carries the header checksum (:func:`write_model` always adds the op list: 4)."""
    return max(HEADER_CHECKSUM_VERSION, _feature_version(graph))


def with_ops(graph: Mapping) -> dict:
    """``graph`` (a copy) with its op list: its own, or the lowering of its ``arch``."""
    return {**graph, "ops": opgraph.ops_of(graph)}


def _max_ops() -> int:
    # A bound on the whole program (per block 13 ops in the lowering, up to 15 for Eva, about
    # 12 per branch for parallel blocks; embedding and head at most 20 with attention pooling),
    # not per block: it keeps a hostile op list from costing more than the largest real one.
    return 16 * (limits()["max_depth"] + 2)


def _check_ops_summary(graph: Mapping) -> None:
    """The rest of pyruntime reads ``arch`` for the model's summary (input, widths, depth,
    heads, tokens, classes, final norm) while the executor runs the op list, which a
    converter may write per family (not only the lowering of ``arch``): the two must
    describe the same model (exit ops are placed by ``graph.exits``, as everywhere)."""
    a, ops = graph["arch"], opgraph.ops_of(graph)
    shapes = opgraph.infer_shapes(ops, check=False)
    out = ops[-1]
    logits, features = (shapes[t][0] for t in out["in"][:2])
    embed = ops[0]["attrs"]
    norm_chain = [op for op in opgraph.tokens_chain(ops) if op["op"] == "layernorm"]
    heads = sorted({op["attrs"]["heads"] for op in ops if op["op"] == "attention"})
    facts = [  # (op the fact is read from, arch key, arch's value, the program's)
        (0, "img_size", list(a["img_size"]), embed["img_size"]), (0, "patch_size", list(a["patch_size"]), embed["patch_size"]),
        (0, "in_chans", a["in_chans"], embed["in_chans"]), (0, "embed_dim", a["embed_dim"], embed["out_features"]),
        (len(ops) - 1, "depth", a["depth"], opgraph.depth(ops)),
        (len(ops) - 1, "num_heads", [a["num_heads"]], heads),
        (len(ops) - 1, "tokens", num_tokens(a), opgraph.num_tokens(ops)),
        (len(ops) - 1, "num_classes", a["num_classes"] or a["embed_dim"], logits),
        (len(ops) - 1, "embed_dim", a["embed_dim"], features),
        (len(ops) - 1, "final_norm", a["final_norm"], bool(norm_chain)),
    ]
    for i, key, want, got in facts:
        if want != got:
            raise FormatError(f"graph.ops disagree with graph.arch and graph.exits at op #{i} {ops[i]['name']!r}: "
                              f"arch.{key} says {want}, the program has {got}")


def _graph_gates(gates: Any) -> Optional[GatePolicy]:
    """The graph's gates (no weights: those are tensors), exact names and keys only."""
    if gates is None:
        return None
    if not isinstance(gates, Mapping) or set(gates) != set(_GRAPH_GATE_KEYS):
        got = sorted(map(str, gates)) if isinstance(gates, Mapping) else type(gates).__name__
        raise FormatError(f"graph.gates must be null or an object with exactly the keys {list(_GRAPH_GATE_KEYS)}, got {got}")
    reduced = gates["reduced"]
    if not isinstance(reduced, Mapping):
        raise FormatError("graph.gates.reduced must be an object {layer: precision}")
    for k, v in reduced.items():
        if not _layer_keys_ok(v):
            raise FormatError(f"graph.gates.reduced {k!r} must have exactly the keys {list(_LAYER_KEYS)} (no defaults in a "
                              f"file; optionally {list(_LAYER_OPTIONAL_KEYS)})")
        if not isinstance(k, str) or any(c in k for c in "*?["):
            raise FormatError(f"graph.gates.reduced {k!r} is a pattern; a file names layers exactly")
    cost = gates["cost"]
    if isinstance(cost, Mapping):
        for k in cost:  # the executor looks costs up by str(block)
            if not (isinstance(k, str) and k.isdigit() and str(int(k)) == k):
                raise FormatError(f"graph.gates.cost key {k!r} must be a block number as a decimal string")
    return GatePolicy.from_dict(dict(gates), "graph.gates")


def check_graph(graph: Any) -> None:
    """Raise FormatError unless ``graph`` is a complete, self-consistent graph."""
    if not isinstance(graph, Mapping):
        raise FormatError("graph must be a JSON object")
    if not set(_GRAPH_KEYS) <= set(graph) <= set(_GRAPH_KEYS + _OPTIONAL_GRAPH_KEYS):
        raise FormatError(f"graph keys are {sorted(map(str, graph))}, expected {sorted(_GRAPH_KEYS)} "
                          f"(and optionally {list(_OPTIONAL_GRAPH_KEYS)})")
    arch = graph["arch"]
    _check_arch(arch)
    _check_preprocess(graph["preprocess"], arch)
    if not isinstance(graph["exits"], list) or not all(isinstance(e, Mapping) and "block" in e for e in graph["exits"]):
        raise FormatError("graph.exits must be a list of exits, each with a block")
    if "ops" in graph:
        opgraph.check_ops(graph["ops"], _max_ops())
    else:
        opgraph.check_lowerable(arch)
    try:
        pol = _graph_policy(graph)
        blocks = [e.block for e in pol.exits]
        if blocks != sorted(set(blocks)):
            raise FormatError(f"graph exits must be sorted by block without repeats, got blocks {blocks}")
        pol.validate_exits(arch["depth"])
        if blocks and not arch["num_classes"]:
            raise FormatError(f"exits at blocks {blocks} need class logits; this model has none (num_classes 0, "
                              f"a feature extractor)")
        # Count before listing names: a hostile depth (say 10**12) must fail fast, not loop
        # (a program of its own is bounded by the op limit already).
        if "ops" in graph:
            needed = len(opgraph.linears(opgraph.ops_of(graph)))
        else:
            needed = 4 * arch["depth"] + 1 + len(blocks) + (1 + int(arch["dist_token"])) * bool(arch["num_classes"])
        if len(pol.layers) != needed:
            raise FormatError(f"graph.layers has {len(pol.layers)} entries; this architecture has {needed} linear layers")
        names = graph_layer_names(graph)
        if set(pol.layers) != set(names):
            missing = sorted(set(names) - set(pol.layers))
            extra = sorted(map(str, set(pol.layers) - set(names)))
            raise FormatError(f"graph.layers misses {missing} / has unknown {extra}")
        pol.validate(names, arch["depth"])
        if pol.gates is not None and pol.gates.topk > arch["num_classes"]:
            raise FormatError(f"gates topk {pol.gates.topk} exceeds num_classes {arch['num_classes']}")
        if pol.gates is not None and pol.gates.hidden > limits()["max_dim"]:
            raise FormatError(f"gates hidden {pol.gates.hidden} exceeds the runtime's limit max_dim={limits()['max_dim']}")
    except PolicyError as e:
        raise FormatError(f"inconsistent graph: {e}") from None
    if "ops" in graph:
        _check_ops_summary(graph)
    _check_layer_limits(graph)


# --- tensor specification ------------------------------------------------------------------

@dataclass(frozen=True)
class TensorSpec:
    dtype: np.dtype
    shape: Tuple[int, ...]
    required: bool = True


def _linear_specs(name: str, N: int, K: int, lp: Mapping, bias: Optional[bool]) -> Dict[str, TensorSpec]:
    """Weights of one linear layer; ``bias`` True/False forces the bias in/out, None: optional."""
    bits = lp["w_bits"]
    if bits == 32:
        specs = {f"{name}.weight": TensorSpec(_F32, (N, K))}
    elif bits == 8:
        specs = {f"{name}.weight.q8": TensorSpec(_I8, (N, K)), f"{name}.weight.scale": TensorSpec(_F32, (N,))}
    else:
        nb = -(-K // lp["block_size"])
        specs = {f"{name}.weight.q4": TensorSpec(_U8, (N, -(-K // 2))), f"{name}.weight.scale": TensorSpec(_F32, (N, nb))}
    if bias is not False:
        specs[f"{name}.bias"] = TensorSpec(_F32, (N,), required=bool(bias))
    return specs


def expected_tensors(graph: Mapping) -> Dict[str, TensorSpec]:
    """Every tensor the graph uses, with dtype and shape, from its op list; ``required=False``
    marks optional biases (a linear op's ``bias`` null: the file decides)."""
    ops = opgraph.ops_of(graph)
    specs: Dict[str, TensorSpec] = {k: TensorSpec(_F32, tuple(shape)) for k, shape in opgraph.weight_shapes(ops).items()}
    lo = graph_reduced_layers(graph)
    for lin in opgraph.linears(ops):
        specs.update(_linear_specs(lin.layer, lin.N, lin.K, graph["layers"][lin.layer], lin.bias))
        if lin.layer in lo:  # a reduced copy: its own weights, the layer's bias
            specs.update(_linear_specs(f"{lin.layer}:lo", lin.N, lin.K, lo[lin.layer], False))
    gates = graph.get("gates")
    if gates is not None:
        h, k1 = gates["hidden"], gates["topk"] + 1
        shapes = dict(zip(GATE_TENSORS, ((h, k1), (h,), (3, h), (3,))))
        for e in graph["exits"]:
            if e["rule"] == "gate":
                for t, shape in shapes.items():
                    specs[f"gates.{e['block']}.{t}"] = TensorSpec(_F32, shape)
    return specs


def check_tensors(graph: Mapping, tensors: Mapping[str, np.ndarray]) -> None:
    """Raise FormatError unless ``tensors`` holds exactly what ``graph`` needs."""
    specs = expected_tensors(graph)
    unknown = sorted(set(tensors) - set(specs))
    if unknown:
        raise FormatError(f"tensors the graph does not use: {unknown}")
    for name, spec in specs.items():
        if name not in tensors:
            if spec.required:
                raise FormatError(f"missing tensor {name!r} ({spec.dtype.name} {list(spec.shape)})")
            continue
        t = tensors[name]
        if not isinstance(t, np.ndarray) or t.dtype != spec.dtype or tuple(t.shape) != spec.shape:
            got = f"{t.dtype.name} {list(t.shape)}" if isinstance(t, np.ndarray) else type(t).__name__
            raise FormatError(f"tensor {name!r} is {got}, expected {spec.dtype.name} {list(spec.shape)}")
        if t.dtype == _I8 and t.size and int(t.min()) < -127:
            raise FormatError(f"tensor {name!r} holds -128; int8 weights must lie in [-127, 127]")


# --- writing ---------------------------------------------------------------------------------

def _crc32(a: np.ndarray) -> int:
    # Flat bytes without a copy; a view, unlike memoryview.cast, also takes zero-size tensors.
    return zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8)) & 0xFFFFFFFF


def write_model(path: Union[str, os.PathLike], graph: Mapping, tensors: Mapping[str, np.ndarray],
                policy_json: str, provenance: Mapping, *, inputs: Sequence[Union[str, os.PathLike]] = ()) -> None:
    """Validate, then write one model file atomically (a failure leaves ``path`` untouched),
    as format version 4: with the graph's op list (the lowering of ``arch`` if it has none).

    ``inputs``: files the model was made from (checkpoint, policy, ...); ``path`` must not be
    one of them (ValueError), nor an existing non-regular file such as a device or a symlink."""
    check_graph(graph)
    graph = with_ops(graph)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    check_tensors(graph, tensors)
    json.loads(policy_json)  # must be JSON; the policy itself was validated by its producer
    _save(path, graph, tensors, policy_json, provenance, inputs=inputs)


def _save(path: Union[str, os.PathLike], graph: Mapping, tensors: Mapping[str, np.ndarray], policy_json: str,
          provenance: Mapping, *, inputs: Sequence[Union[str, os.PathLike]] = ()) -> None:
    """Write without validating (write_model validates first; the fuzzer and tests need files
    that are sealed but wrong, to reach the reader's checks behind the checksums)."""
    from safetensors.numpy import save_file

    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    metadata = {
        KEY_MAGIC: MAGIC,
        KEY_VERSION: str(format_version(graph)),
        KEY_GRAPH: json.dumps(graph, separators=(",", ":")),
        KEY_POLICY: policy_json,
        KEY_PROVENANCE: json.dumps(dict(provenance), separators=(",", ":")),
        KEY_CHECKSUMS: json.dumps({k: _crc32(v) for k, v in sorted(tensors.items())}, separators=(",", ":")),
        KEY_HEADER_SHA256: _DIGEST_PLACEHOLDER,
    }
    with atomic_path(path, inputs=inputs) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        _seal(tmp)


def header_digest(meta: Mapping[str, Any], entries: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a header: every ``pyruntime.*`` metadata entry but the digest itself,
    and every tensor entry (dtype, shape, data_offsets), as canonical JSON
    (docs/model_format.md "Header checksum")."""
    covered = {k: v for k, v in meta.items() if k.startswith("pyruntime.") and k != KEY_HEADER_SHA256}
    blob = json.dumps({"metadata": covered, "tensors": entries}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True)
    return hashlib.sha256(blob.encode("ascii")).hexdigest()


def _seal(path: Path) -> None:
    """Replace the digest placeholder in the header safetensors just wrote by the digest of
    that header. The data offsets are safetensors' to choose, so they can only be hashed once
    written; the placeholder has the digest's length, so no byte moves."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        header = json.loads(raw)
        meta = header.pop("__metadata__")
        slot = json.dumps(KEY_HEADER_SHA256).encode() + b":" + json.dumps(_DIGEST_PLACEHOLDER).encode()
        if raw.count(slot) != 1:
            raise RuntimeError(f"{path}: cannot find the header checksum slot in the header safetensors wrote")
        f.seek(8 + raw.index(slot) + len(slot) - 1 - len(_DIGEST_PLACEHOLDER))
        f.write(header_digest(meta, header).encode("ascii"))


def safetensors_metadata(path: Union[str, os.PathLike]) -> dict:
    """``__metadata__`` of any safetensors file (a checkpoint, exit heads), after checking that
    it is one. The reads are bounded: a foreign file's first 8 bytes are an arbitrary header
    length. ValueError names the file otherwise."""
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little") if size >= 8 else 0
        if not 0 < n <= min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"{path} is not a safetensors file (no valid header length)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError included
        raise ValueError(f"{path} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file (its header is not a JSON object)")
    meta = header.get("__metadata__")
    return meta if isinstance(meta, dict) else {}


# --- reading ---------------------------------------------------------------------------------

@dataclass
class Header:
    """The validated header of a model file (no tensor data read)."""

    graph: dict
    policy_json: str
    provenance: dict
    checksums: Dict[str, int]
    tensors: Dict[str, dict]  # safetensors' per-tensor entries: dtype, shape, data_offsets
    data_offset: int          # where tensor data starts in the file
    version: int = FORMAT_VERSION  # the file's format version


def _fail(path: Path, msg: str) -> FormatError:
    return FormatError(f"{path}: {msg}")


def _read_raw_header(path: Path) -> Tuple[dict, int, int]:
    """(header JSON, header length, file size), sizes checked before anything is parsed."""
    if not path.is_file():
        raise FileNotFoundError(f"no such model file: {path}")
    size = path.stat().st_size
    if size < 8:
        raise _fail(path, f"truncated: {size} bytes is too short for a safetensors file")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > MAX_HEADER_BYTES:
            raise _fail(path, f"header length {n} is implausible; not a safetensors model file")
        if 8 + n > size:
            raise _fail(path, f"truncated: header needs {n} bytes but the file has {size - 8} after the length")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _fail(path, f"header is not valid JSON ({e})") from None
    except RecursionError:
        raise _fail(path, "header JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise _fail(path, "header is not a JSON object")
    return header, n, size


def _check_magic_and_version(path: Path, meta: Mapping) -> int:
    if meta.get(KEY_MAGIC) != MAGIC:
        raise _fail(path, f"not a pyruntime model (metadata {KEY_MAGIC!r} is {meta.get(KEY_MAGIC)!r}, expected {MAGIC!r})")
    raw = meta.get(KEY_VERSION)
    if not (isinstance(raw, str) and raw.isascii() and raw.isdigit() and len(raw) <= 9):
        raise _fail(path, f"format version {raw!r:.40} is not an integer")
    version = int(raw)
    if version > FORMAT_VERSION:
        raise _fail(path, f"format version {version} is newer than this pyruntime supports ({FORMAT_VERSION}); upgrade pyruntime")
    if version < 1:
        raise _fail(path, f"format version {version} is not a valid version")
    return version


def _json_meta(path: Path, meta: Mapping, key: str) -> Any:
    if key not in meta:
        raise _fail(path, f"metadata {key!r} is missing")
    try:
        return json.loads(meta[key])
    except (TypeError, ValueError) as e:
        raise _fail(path, f"metadata {key!r} is not valid JSON ({e})") from None
    except RecursionError:
        raise _fail(path, f"metadata {key!r} is nested too deeply") from None


def _check_header_digest(path: Path, meta: Mapping, entries: Mapping, version: int) -> None:
    """Version 3 files must carry the header checksum; any file that carries one is checked
    (so a flipped version digit cannot skip it)."""
    stored = meta.get(KEY_HEADER_SHA256)
    if stored is None:
        if version >= HEADER_CHECKSUM_VERSION:
            raise _fail(path, f"metadata {KEY_HEADER_SHA256!r} is missing (format version {version} requires it)")
        return
    if stored != header_digest(meta, entries):
        raise _fail(path, "header checksum mismatch: the file's metadata or tensor table is corrupt")


def _check_data_extent(path: Path, entries: Mapping[str, Any], available: int) -> None:
    end = 0
    for name, e in entries.items():
        try:
            end = max(end, int(e["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError, OverflowError):
            raise _fail(path, f"tensor {name!r} has no valid data_offsets") from None
    if end > available:
        raise _fail(path, f"truncated: tensor data needs {end} bytes but the file holds {available}")


def read_header(path: Union[str, os.PathLike]) -> Header:
    """Read and validate everything but the tensor data: sizes, magic, version, header
    checksum, graph."""
    path = Path(path)
    try:
        return _read_header(path)
    except RecursionError:  # a value nested just shallowly enough to parse, too deep to walk
        raise _fail(path, "header JSON is nested too deeply") from None


def _read_header(path: Path) -> Header:
    header, n, size = _read_raw_header(path)
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise _fail(path, "__metadata__ is not an object")
    version = _check_magic_and_version(path, meta)
    _check_header_digest(path, meta, header, version)
    _check_data_extent(path, header, size - 8 - n)
    graph = _json_meta(path, meta, KEY_GRAPH)
    try:
        check_graph(graph)
    except FormatError as e:
        raise _fail(path, str(e)) from None
    _json_meta(path, meta, KEY_POLICY)  # stored for the record; the graph is what runs
    policy_json = meta[KEY_POLICY]
    provenance = _json_meta(path, meta, KEY_PROVENANCE)
    checksums = _json_meta(path, meta, KEY_CHECKSUMS)
    if not isinstance(provenance, dict):
        raise _fail(path, "provenance is not a JSON object")
    if not isinstance(checksums, dict) or set(checksums) != set(header):
        raise _fail(path, "checksums do not list exactly the file's tensors")
    if version < _feature_version(graph):
        what = "graph.ops" if "ops" in graph else "graph.attention"
        raise _fail(path, f"format version {version} cannot hold this graph ({what} needs version "
                          f"{_feature_version(graph)})")
    if version >= OPS_VERSION and "ops" not in graph:
        raise _fail(path, f"graph.ops is missing (format version {version} requires it)")
    # Older files are lowered, so that every reader sees one form: a graph with its op list.
    return Header(with_ops(graph), policy_json, provenance, checksums, header, 8 + n, version)


def _load_tensors(path: Path) -> Dict[str, np.ndarray]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types; never let them escape
        raise _fail(path, f"cannot read tensors: {type(e).__name__}: {e}") from None


def read_model(path: Union[str, os.PathLike]) -> Tuple[dict, Dict[str, np.ndarray], str, dict]:
    """``(graph, tensors, policy_json, provenance)`` of a validated model file."""
    path = Path(path)
    hdr = read_header(path)
    tensors = _load_tensors(path)
    for name, t in tensors.items():
        if _crc32(t) != hdr.checksums[name]:
            raise _fail(path, f"checksum mismatch in tensor {name!r}: the file is corrupt")
    try:
        check_tensors(hdr.graph, tensors)
    except FormatError as e:
        raise _fail(path, str(e)) from None
    return hdr.graph, tensors, hdr.policy_json, hdr.provenance
