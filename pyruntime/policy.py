"""Policies: which bits, activation scales and exits a converted model runs with.

A policy is what calibration produces and what ``pyruntime.convert`` consumes. It is
independent of any one model file (layer names may be ``fnmatch`` patterns), is saved as
versioned JSON, and is resolved against a concrete model's layer names at conversion time,
where every inconsistency is reported as a :class:`~pyruntime.errors.PolicyError`.

JSON schema (version 2)::

    {
      "version": 2,                          # POLICY_VERSION; a newer one is rejected
      "name": "w8a8",                        # free text, recorded in the model's provenance
      "default": <layer>,                    # applied to every linear layer not named below
      "layers": {"<name or pattern>": <layer>, ...},
      "exits": [{"block": 3, "rule": "confidence", "threshold": 0.9}, ...],
      "predictor": null | {"block": 1, "chunk": 64, "coeffs": {"<layer>": [a0, a1, ...]}},
      "gates": <gates>,                      # optional (absent or null: no QuEE gates)
      "attention": {"bits": 8 | 32},         # optional (absent: 32), since version 2
      "meta": {...}                          # free-form JSON (calibration summary, ...)
    }

``attention.bits`` is the operand precision of every block's attention matmuls (q.k^T and
attn.v): 32 keeps them fp32; 8 quantises q, k, the softmax probabilities and v to int8 per
image at run time (docs/model_format.md "attention"). A policy that leaves it at 32 is
written as version 1, which older pyruntime versions still read.

    <layer> = {"w_bits": 4 | 8 | 32,          # required
               "a_bits": 4..8,                # default 8; ignored when w_bits is 32
               "scale": "dynamic" | "static" | "predicted",   # default "dynamic"
               "static_scale": float | null,  # required for "static": >= 1/FLT_MAX (finite
                                              # float32 reciprocal); any value finite in float32
               "block_size": 32 * k,          # int4 block along K, default 32
               "clip": float}                 # optional, "dynamic" only: scale = clip * max|x| / qmax,
                                              # 0 < clip <= 1 (absent: 1, and written only when not 1)

Layer names are timm's (``patch_embed``, ``blocks.{i}.attn.qkv``, ``blocks.{i}.attn.proj``,
``blocks.{i}.mlp.fc1``, ``blocks.{i}.mlp.fc2``, ``head``, ``head_dist``, ``exits.{b}.fc``).
A key of ``layers`` containing ``*``, ``?`` or ``[`` is a pattern (``fnmatch``, where ``*``
also matches dots): an exact name wins over patterns, and a layer matched by two patterns
and named by none is an error (no precedence rules to remember). Every key must match at
least one layer of the model. Unknown keys anywhere are errors, so a typo never silently
falls back to a default.

Every number must be finite as a float32 (the executor holds them so): predictor
coefficients, static scales, gate lambda, costs (and lambda times each cost) and weights.
Exit blocks lie in ``0 .. depth-2`` (after the last block the final head answers anyway);
thresholds lie in [0, 1] for both rules (``margin`` is top-1 minus top-2 probability); an
exit with rule ``gate`` is decided by a QuEE gate and its threshold must be 0 (unused). A
layer with ``scale: "predicted"`` needs a predictor at an earlier block than its own
(``patch_embed`` is before block 0, ``exits.{b}.fc`` belongs to block b, the heads come
after the last block) and coefficients under its exact name. Coefficients for layers whose
scale is not predicted are allowed and unused.

QuEE gates (docs/model_format.md "gates")::

    <gates> = {"lambda": 0.05,               # >= 0: argmin_p e_p + lambda * cost[block][p]
               "topk": 3, "hidden": 16,      # gate MLP: (topk + 1) features -> hidden -> 3
               "cost": {"<block>": [exit, full, reduced], ...},   # one per gate exit, >= 0
               "reduced": {"<name or pattern>": <layer>, ...},    # reduced-precision copies
               "weights": {"<block>": {"fc1.weight": [[..topk+1..] x hidden],
                                       "fc1.bias": [..hidden..],
                                       "fc2.weight": [[..hidden..] x 3],
                                       "fc2.bias": [e0, e1, e2]}, ...}}

Block keys are decimal strings (``"3"``, never ``"03"``). ``cost`` has an entry for exactly
the exits whose rule is ``gate``. ``reduced`` works like ``layers`` but has no default (a
layer it does not name runs its primary weights on both paths) and only block linears of
blocks *after the first gate block* are eligible: an exact name must be eligible, a pattern
matches eligible layers only and must match at least one. A reduced layer with a predicted
scale takes its coefficients under ``"<layer>:lo"`` in the predictor. ``weights`` is the
trained gate MLP of each gate block, stored in the policy so that a calibrated policy is a
complete artefact; the converter writes them as the tensors ``gates.{b}.fc1.weight`` etc.
(float32) and needs them for every gate, but a policy without them still validates (e.g. a
policy under construction). In a model file's graph the gates object is the same without
``weights`` and with ``reduced`` resolved to exact names.
"""
from __future__ import annotations

import fnmatch
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

from ._atomic import atomic_write_bytes
from .errors import PolicyError

__all__ = [
    "POLICY_VERSION",
    "SHORTHANDS",
    "LayerPolicy",
    "ExitPolicy",
    "PredictorPolicy",
    "GatePolicy",
    "GATE_TENSORS",
    "Policy",
    "layer_block",
    "check_attn_bits",
]

POLICY_VERSION = 2
SHORTHANDS = ("fp32", "w8a8", "w4a8", "w8a8-attn8", "w4a8-attn8")
ATTN_BITS = (8, 32)

W_BITS = (4, 8, 32)
SCALE_MODES = ("dynamic", "static", "predicted")
EXIT_RULES = ("confidence", "margin", "gate")
GATE_TENSORS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
GATE_PATHS = 3  # exit, continue at full precision, continue at reduced precision

_LAYER_KEYS = ("w_bits", "a_bits", "scale", "static_scale", "block_size", "clip")
_EXIT_KEYS = ("block", "rule", "threshold")
_PREDICTOR_KEYS = ("block", "chunk", "coeffs")
_GATE_KEYS = ("lambda", "topk", "hidden", "cost", "reduced", "weights")
_POLICY_KEYS = ("version", "name", "default", "layers", "exits", "predictor", "gates", "attention", "meta")
_ATTENTION_KEYS = ("bits",)


# --- small strict type checks (bool is not an int here: ``True`` bits is a bug) -----------

def _int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise PolicyError(f"{what} must be an integer, got {v!r}")
    return int(v)


def _float(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise PolicyError(f"{what} must be a number, got {v!r}")
    v = float(v)
    if not math.isfinite(v):
        raise PolicyError(f"{what} must be finite, got {v!r}")
    return v


_F32_MAX = 3.4028234663852886e38
# The smallest positive normal float32: a clip below it would round towards a zero scale.
_F32_TINY = 1.1754943508222875e-38
# The smallest scale whose float32 reciprocal is finite: the quantiser multiplies by
# float32(1/s), and an infinite one would saturate every activation.
_MIN_SCALE = 1 / _F32_MAX


def _float32(v: Any, what: str) -> float:
    """A number the executor can hold as a finite float32 (it stores every policy value so:
    a float64-only value would become Inf there and silently flatten the output)."""
    x = _float(v, what)
    if abs(x) > _F32_MAX:
        raise PolicyError(f"{what} must be finite as a float32 (|x| <= {_F32_MAX:.7g}), got {x!r}")
    return x


def _mapping(v: Any, what: str, allowed: Sequence[str], required: Sequence[str] = ()) -> Mapping:
    if not isinstance(v, Mapping):
        raise PolicyError(f"{what} must be a JSON object, got {type(v).__name__}")
    unknown = sorted(map(str, set(v) - set(allowed)))
    if unknown:
        raise PolicyError(f"{what} has unknown key(s) {unknown}; allowed: {list(allowed)}")
    missing = [k for k in required if k not in v]
    if missing:
        raise PolicyError(f"{what} is missing key(s) {missing}")
    return v


def _is_pattern(key: str) -> bool:
    return any(c in key for c in "*?[")


def _block_key(k: Any, what: str) -> int:
    """A block number from an int or its canonical decimal string (JSON object keys)."""
    if isinstance(k, str) and k.isdigit() and str(int(k)) == k:
        return int(k)
    if isinstance(k, int) and not isinstance(k, bool) and k >= 0:
        return int(k)
    raise PolicyError(f"{what}: block key {k!r} must be a block number (decimal string such as \"3\")")


def _match(table: Mapping[str, Any], name: str, what: str) -> Any:
    """The entry of ``table`` for ``name``: its exact key, else the one pattern matching it
    (None if none; two patterns and no exact key is an error)."""
    if name in table:
        return table[name]
    hits = [k for k in table if _is_pattern(k) and fnmatch.fnmatchcase(name, k)]
    if len(hits) > 1:
        raise PolicyError(f"{what} {name!r} matches several patterns {hits}; name it exactly")
    return table[hits[0]] if hits else None


# A linear inside block i, whatever its family calls it (the program's ops name the layers:
# attn.qkv, mlp.fc1, ... for the plain block; BEiT's, parallel branches', SwiGLU's fc1_g ...).
_BLOCK_LAYER = re.compile(r"^blocks\.(\d+)\.[A-Za-z_]\w*(\.\w+)*$")
_HEAD_LAYER = re.compile(r"^(head|head_dist|attn_pool\.(kv|proj|mlp\.fc1|mlp\.fc2))$")  # after the last block
_EXIT_LAYER = re.compile(r"^exits\.(\d+)\.fc$")


def check_attn_bits(bits: Any) -> int:
    """``bits`` if it is an attention precision the runtime has (8 or 32), else PolicyError
    (a ValueError) naming it."""
    if isinstance(bits, bool) or bits not in ATTN_BITS:
        raise PolicyError(f"attention bits must be one of {list(ATTN_BITS)} (32: fp32, 8: int8), got {bits!r}")
    return int(bits)


def layer_block(name: str, depth: int) -> int:
    """The block a linear layer belongs to, for ordering against the scale predictor:
    ``patch_embed`` is -1 (before block 0), ``exits.{b}.fc`` is b, ``head``/``head_dist``
    and the attention pooling's ``attn_pool.*`` are ``depth`` (after the last block)."""
    if name == "patch_embed":
        return -1
    if _HEAD_LAYER.match(name):
        return depth
    m = _BLOCK_LAYER.match(name) or _EXIT_LAYER.match(name)
    if not m:
        raise PolicyError(f"{name!r} is not a linear layer name pyruntime knows")
    return int(m.group(1))


# --- the policy pieces ----------------------------------------------------------------------

@dataclass(frozen=True)
class LayerPolicy:
    """Precision of one linear layer; validated on construction."""

    w_bits: int
    a_bits: int = 8
    scale: str = "dynamic"
    static_scale: Optional[float] = None
    block_size: int = 32
    clip: float = 1.0

    def __post_init__(self) -> None:
        if _int(self.w_bits, "w_bits") not in W_BITS:
            raise PolicyError(f"w_bits must be one of {W_BITS}, got {self.w_bits}")
        if not 4 <= _int(self.a_bits, "a_bits") <= 8:
            raise PolicyError(f"a_bits must be in 4..8, got {self.a_bits}")
        if self.scale not in SCALE_MODES:
            raise PolicyError(f"scale must be one of {SCALE_MODES}, got {self.scale!r}")
        if self.static_scale is not None:
            object.__setattr__(self, "static_scale", _float32(self.static_scale, "static_scale"))
        if self.scale == "static" and (self.static_scale is None or self.static_scale < _MIN_SCALE):
            raise PolicyError(f"scale 'static' needs a positive static_scale with a finite float32 reciprocal "
                              f"(>= {_MIN_SCALE:.3g}), got {self.static_scale!r}")
        bs = _int(self.block_size, "block_size")
        if bs <= 0 or bs % 32:
            raise PolicyError(f"block_size must be a positive multiple of 32, got {bs}")
        clip = _float(self.clip, "clip")
        if not _F32_TINY <= clip <= 1.0:
            raise PolicyError(f"clip must lie in (0, 1] (a positive float32), got {clip!r}")
        if clip != 1.0 and self.scale != "dynamic":
            raise PolicyError(f"clip applies to dynamic scales only, got clip {clip} with scale {self.scale!r}")
        object.__setattr__(self, "clip", clip)

    @property
    def quantized(self) -> bool:
        return self.w_bits != 32

    def to_dict(self) -> dict:
        """Without ``clip`` when it is 1, so policies and files that do not clip keep their JSON."""
        return {k: getattr(self, k) for k in _LAYER_KEYS if k != "clip" or self.clip != 1.0}

    @classmethod
    def from_dict(cls, d: Any, what: str = "layer") -> "LayerPolicy":
        d = _mapping(d, what, _LAYER_KEYS, required=("w_bits",))
        try:
            return cls(**d)
        except PolicyError as e:
            raise PolicyError(f"{what}: {e}") from None


@dataclass(frozen=True)
class ExitPolicy:
    """An exit head after ``block``: leave when the rule's score reaches ``threshold``, or,
    with rule ``gate``, when the QuEE gate says so (threshold unused and 0). The default
    threshold is 0.9 for ``confidence``/``margin`` and 0 for ``gate``."""

    block: int
    rule: str = "confidence"
    threshold: Optional[float] = None

    def __post_init__(self) -> None:
        if _int(self.block, "exit block") < 0:
            raise PolicyError(f"exit block must be >= 0, got {self.block}")
        if self.rule not in EXIT_RULES:
            raise PolicyError(f"exit rule must be one of {EXIT_RULES}, got {self.rule!r}")
        if self.threshold is None:
            object.__setattr__(self, "threshold", 0.0 if self.rule == "gate" else 0.9)
        t = _float(self.threshold, "exit threshold")
        if self.rule == "gate" and t != 0.0:
            raise PolicyError(f"an exit with rule 'gate' has no threshold: it must be 0, got {t}")
        if not 0.0 <= t <= 1.0:
            raise PolicyError(f"exit threshold must lie in [0, 1] for rule {self.rule!r}, got {t}")
        object.__setattr__(self, "threshold", t)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in _EXIT_KEYS}

    @classmethod
    def from_dict(cls, d: Any, what: str = "exit") -> "ExitPolicy":
        d = _mapping(d, what, _EXIT_KEYS, required=_EXIT_KEYS)
        try:
            return cls(**d)
        except PolicyError as e:
            raise PolicyError(f"{what}: {e}") from None


@dataclass(frozen=True)
class PredictorPolicy:
    """ScalePredictor: after ``block``, r = mean over chunks of ``chunk`` values of the chunk
    max |x|; layer scale = sum_k coeffs[layer][k] * r**k (see docs/model_format.md)."""

    block: int
    chunk: int
    coeffs: Dict[str, List[float]]

    def __post_init__(self) -> None:
        if _int(self.block, "predictor block") < 0:
            raise PolicyError(f"predictor block must be >= 0, got {self.block}")
        if _int(self.chunk, "predictor chunk") < 1:
            raise PolicyError(f"predictor chunk must be >= 1, got {self.chunk}")
        if not isinstance(self.coeffs, Mapping):
            raise PolicyError("predictor coeffs must be an object {layer: [a0, a1, ...]}")
        clean = {}
        for name, cs in self.coeffs.items():
            if not isinstance(cs, (list, tuple)) or not cs:
                raise PolicyError(f"predictor coeffs for {name!r} must be a non-empty list")
            clean[str(name)] = [_float32(c, f"predictor coeff of {name!r}") for c in cs]
        object.__setattr__(self, "coeffs", clean)

    def to_dict(self) -> dict:
        return {"block": self.block, "chunk": self.chunk, "coeffs": {k: list(v) for k, v in self.coeffs.items()}}

    @classmethod
    def from_dict(cls, d: Any, what: str = "predictor") -> "PredictorPolicy":
        d = _mapping(d, what, _PREDICTOR_KEYS, required=_PREDICTOR_KEYS)
        try:
            return cls(**d)
        except PolicyError as e:
            raise PolicyError(f"{what}: {e}") from None


def _vector(v: Any, n: int, what: str) -> tuple:
    if not isinstance(v, (list, tuple)) or len(v) != n:
        raise PolicyError(f"{what} must be a list of {n} numbers, got {v!r:.80}")
    return tuple(_float32(x, what) for x in v)


def _matrix(v: Any, rows: int, cols: int, what: str) -> tuple:
    if not isinstance(v, (list, tuple)) or len(v) != rows:
        raise PolicyError(f"{what} must be {rows} rows of {cols} numbers")
    return tuple(_vector(r, cols, what) for r in v)


@dataclass(frozen=True)
class GatePolicy:
    """QuEE gates: per-image exit / full / reduced precision decisions (module docstring).

    ``lam`` is the JSON key ``lambda``; ``cost`` and ``weights`` are keyed by gate block;
    ``reduced`` maps layer names or patterns to the precision of their reduced copies;
    ``weights[b]`` holds :data:`GATE_TENSORS` as nested tuples of floats (see
    :meth:`arrays` for float32 numpy arrays).
    """

    lam: float = 0.0
    topk: int = 3
    hidden: int = 8
    cost: Dict[int, tuple] = field(default_factory=dict)
    reduced: Dict[str, LayerPolicy] = field(default_factory=dict)
    weights: Dict[int, Dict[str, tuple]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        lam = _float32(self.lam, "gate lambda")
        if lam < 0:
            raise PolicyError(f"gate lambda must be >= 0, got {lam}")
        object.__setattr__(self, "lam", lam)
        if _int(self.topk, "gate topk") < 1:
            raise PolicyError(f"gate topk must be >= 1, got {self.topk}")
        if _int(self.hidden, "gate hidden") < 1:
            raise PolicyError(f"gate hidden must be >= 1, got {self.hidden}")
        if not isinstance(self.cost, Mapping):
            raise PolicyError("gates cost must be an object {block: [exit, full, reduced]}")
        cost = {}
        for k, v in self.cost.items():
            b = _block_key(k, "gates cost")
            c = _vector(v, GATE_PATHS, f"gates cost of block {b} (exit, full, reduced)")
            if min(c) < 0:
                raise PolicyError(f"gates cost of block {b} must be >= 0, got {list(c)}")
            if lam * max(c) > _F32_MAX:  # the executor adds lambda * cost in float32
                raise PolicyError(f"gate lambda {lam} times the cost {max(c)} of block {b} is not finite as a float32")
            cost[b] = c
        object.__setattr__(self, "cost", cost)
        if not isinstance(self.reduced, Mapping):
            raise PolicyError("gates reduced must be an object {layer: precision}")
        object.__setattr__(self, "reduced", {
            str(k): v if isinstance(v, LayerPolicy) else LayerPolicy.from_dict(v, f"reduced layer {k!r}")
            for k, v in self.reduced.items()})
        if not isinstance(self.weights, Mapping):
            raise PolicyError("gates weights must be an object {block: {tensor: values}}")
        n_in, h = self.topk + 1, self.hidden
        shapes = {"fc1.weight": (h, n_in), "fc1.bias": (h,), "fc2.weight": (GATE_PATHS, h), "fc2.bias": (GATE_PATHS,)}
        weights = {}
        for k, v in self.weights.items():
            b = _block_key(k, "gates weights")
            d = _mapping(v, f"gates weights of block {b}", GATE_TENSORS, required=GATE_TENSORS)
            w = {}
            for name, shape in shapes.items():
                what = f"gates weights of block {b}: {name} [{', '.join(map(str, shape))}]"
                val = d[name].tolist() if hasattr(d[name], "tolist") else d[name]
                w[name] = _matrix(val, *shape, what) if len(shape) == 2 else _vector(val, shape[0], what)
            weights[b] = w
        object.__setattr__(self, "weights", weights)

    def arrays(self, block: int) -> Dict[str, "object"]:
        """The gate MLP of ``block`` as float32 numpy arrays, by :data:`GATE_TENSORS` name."""
        import numpy as np

        return {k: np.asarray(v, dtype=np.float32) for k, v in self.weights[block].items()}

    def to_dict(self) -> dict:
        return {
            "lambda": self.lam, "topk": self.topk, "hidden": self.hidden,
            "cost": {str(b): list(c) for b, c in sorted(self.cost.items())},
            "reduced": {k: v.to_dict() for k, v in self.reduced.items()},
            "weights": {str(b): {k: [list(r) for r in v] if isinstance(v[0], tuple) else list(v) for k, v in w.items()}
                        for b, w in sorted(self.weights.items())},
        }

    @classmethod
    def from_dict(cls, d: Any, what: str = "gates") -> "GatePolicy":
        d = _mapping(d, what, _GATE_KEYS, required=("lambda", "topk", "hidden", "cost", "reduced"))
        try:
            return cls(lam=d["lambda"], topk=d["topk"], hidden=d["hidden"], cost=d["cost"], reduced=d["reduced"],
                       weights=d.get("weights", {}))
        except PolicyError as e:
            raise PolicyError(f"{what}: {e}") from None


def _fp32() -> LayerPolicy:
    return LayerPolicy(w_bits=32)


@dataclass
class Policy:
    """Bits per linear layer, exits and scale predictor; see the module docstring."""

    layers: Dict[str, LayerPolicy] = field(default_factory=dict)
    exits: List[ExitPolicy] = field(default_factory=list)
    predictor: Optional[PredictorPolicy] = None
    default: LayerPolicy = field(default_factory=_fp32)
    name: str = "custom"
    meta: dict = field(default_factory=dict)
    gates: Optional[GatePolicy] = None
    attn_bits: int = 32

    def __post_init__(self) -> None:
        check_attn_bits(self.attn_bits)

    # -- serialisation ------------------------------------------------------------------

    def to_dict(self) -> dict:
        d = {
            "version": POLICY_VERSION if self.attn_bits != 32 else 1,
            "name": self.name,
            "default": self.default.to_dict(),
            "layers": {k: v.to_dict() for k, v in self.layers.items()},
            "exits": [e.to_dict() for e in self.exits],
            "predictor": None if self.predictor is None else self.predictor.to_dict(),
        }
        if self.gates is not None:  # absent when unused: gate-free policies keep their JSON
            d["gates"] = self.gates.to_dict()
        if self.attn_bits != 32:
            d["attention"] = {"bits": self.attn_bits}
        d["meta"] = self.meta
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "Policy":
        d = _mapping(d, "policy", _POLICY_KEYS, required=("version",))
        version = _int(d["version"], "policy version")
        if version > POLICY_VERSION:
            raise PolicyError(
                f"policy version {version} is newer than this pyruntime supports ({POLICY_VERSION}); upgrade pyruntime")
        if version < 1:
            raise PolicyError(f"policy version must be >= 1, got {version}")
        layers = d.get("layers", {})
        if not isinstance(layers, Mapping):
            raise PolicyError("policy 'layers' must be an object {name: layer}")
        exits = d.get("exits", [])
        if not isinstance(exits, list):
            raise PolicyError("policy 'exits' must be a list")
        meta = d.get("meta", {})
        if not isinstance(meta, Mapping):
            raise PolicyError("policy 'meta' must be an object")
        name = d.get("name", "custom")
        if not isinstance(name, str):
            raise PolicyError(f"policy 'name' must be a string, got {name!r}")
        pred, gates = d.get("predictor"), d.get("gates")
        attention = d.get("attention")
        if attention is not None and version < 2:
            raise PolicyError("policy 'attention' needs version 2")
        attn_bits = 32
        if attention is not None:
            attn_bits = _int(_mapping(attention, "policy 'attention'", _ATTENTION_KEYS, required=_ATTENTION_KEYS)["bits"],
                             "attention bits")
        return cls(
            layers={str(k): LayerPolicy.from_dict(v, f"layer {k!r}") for k, v in layers.items()},
            exits=[ExitPolicy.from_dict(e, f"exit #{i}") for i, e in enumerate(exits)],
            predictor=None if pred is None else PredictorPolicy.from_dict(pred),
            default=LayerPolicy.from_dict(d["default"], "default layer") if "default" in d else _fp32(),
            name=name,
            meta=dict(meta),
            gates=None if gates is None else GatePolicy.from_dict(gates),
            attn_bits=attn_bits,
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Policy":
        try:
            d = json.loads(text)
        except (TypeError, ValueError) as e:
            raise PolicyError(f"policy is not valid JSON: {e}") from None
        except RecursionError:
            raise PolicyError("policy JSON is nested too deeply") from None
        return cls.from_dict(d)

    def save(self, path: Union[str, Path]) -> None:
        """Write the JSON atomically (temporary file + fsync + rename)."""
        atomic_write_bytes(path, (self.to_json() + "\n").encode("utf-8"))

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Policy":
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    # -- the predefined uniform policies ---------------------------------------------------

    @classmethod
    def shorthand(cls, name: str) -> "Policy":
        """``fp32``: everything fp32. ``w8a8`` / ``w4a8``: 8-/4-bit weights and 8-bit dynamic
        activations on every block linear (qkv, proj, fc1, fc2); patch embedding and heads
        stay fp32, as is usual for ViT PTQ. A ``-attn8`` suffix also runs the attention
        matmuls on int8 operands. No exits."""
        if name not in SHORTHANDS:
            raise PolicyError(f"unknown policy shorthand {name!r}; choose one of {list(SHORTHANDS)}")
        base, _, attn = name.partition("-")
        attn_bits = 8 if attn == "attn8" else 32
        if base == "fp32":
            return cls(name=name, attn_bits=attn_bits)
        bits = 8 if base == "w8a8" else 4
        return cls(layers={"blocks.*": LayerPolicy(w_bits=bits, a_bits=8, scale="dynamic")}, name=name,
                   attn_bits=attn_bits)

    # -- resolution against a model --------------------------------------------------------

    def _lookup(self, name: str) -> LayerPolicy:
        lp = _match(self.layers, name, "layer")
        return self.default if lp is None else lp

    def gate_blocks(self) -> List[int]:
        """Blocks of the exits whose rule is ``gate``, sorted."""
        return sorted(e.block for e in self.exits if e.rule == "gate")

    def _check_gates(self, names: Sequence[str], depth: int) -> Dict[str, LayerPolicy]:
        """Gate exits and gates agree; returns the resolved reduced layers {exact name: precision}."""
        blocks = self.gate_blocks()
        g = self.gates
        if g is None:
            if blocks:
                raise PolicyError(f"exits at blocks {blocks} use rule 'gate' but the policy has no gates")
            return {}
        if sorted(g.cost) != blocks:
            raise PolicyError(f"gates cost has entries for blocks {sorted(g.cost)}, but the gate exits are at "
                              f"blocks {blocks}: every gate needs exactly one cost entry")
        stray = sorted(set(g.weights) - set(blocks))
        if stray:
            raise PolicyError(f"gates weights for blocks {stray} which have no gate exit (gates at {blocks})")
        first = blocks[0] if blocks else depth
        eligible = [n for n in names if _BLOCK_LAYER.match(n) and int(_BLOCK_LAYER.match(n).group(1)) > first]
        eligible_set = set(eligible)
        for key in g.reduced:
            ok = any(fnmatch.fnmatchcase(n, key) for n in eligible) if _is_pattern(key) else key in eligible_set
            if not ok:
                where = f"after the first gate (block {first})" if blocks else "(the policy has no gate exits)"
                raise PolicyError(f"gates reduced names {key!r}, which matches no block linear {where}; only "
                                  f"the linears of later blocks can have reduced-precision copies")
        out = {}
        for n in eligible:
            lp = _match(g.reduced, n, "reduced layer")
            if lp is not None:
                out[n] = lp
        return out

    def resolve_reduced(self, layer_names: Iterable[str], depth: int) -> Dict[str, LayerPolicy]:
        """Validate, then give every layer with a reduced-precision copy its precision
        ({exact name: LayerPolicy}, in ``layer_names`` order; empty without gates)."""
        names = list(layer_names)
        self.validate(names, depth)
        return self._check_gates(names, depth)

    def _check_layer_keys(self, names: Sequence[str]) -> None:
        known = set(names)
        for key in self.layers:
            found = any(fnmatch.fnmatchcase(n, key) for n in names) if _is_pattern(key) else key in known
            if not found:
                sample = ", ".join(list(names)[:6]) + (", ..." if len(names) > 6 else "")
                raise PolicyError(f"policy names layer {key!r} which the model lacks (its layers: {sample})")

    def validate_exits(self, depth: int) -> None:
        """Exits at blocks 0..depth-2, at most one per block (also used on file graphs)."""
        seen = set()
        for e in self.exits:
            if not 0 <= e.block <= depth - 2:
                raise PolicyError(
                    f"exit at block {e.block} is out of range: exits go after blocks 0..{depth - 2} "
                    f"(depth {depth}; after the last block the final head answers)")
            if e.block in seen:
                raise PolicyError(f"two exits at block {e.block}")
            seen.add(e.block)

    def _check_predictor(self, names: Sequence[str], depth: int) -> None:
        p = self.predictor
        if p is None:
            return
        if p.block > depth - 1:
            raise PolicyError(f"predictor block {p.block} is out of range (depth {depth})")
        unknown = sorted(set(p.coeffs) - set(names))
        if unknown:
            raise PolicyError(f"predictor has coeffs for layers the model lacks: {unknown}")

    def _check_predicted(self, name: str, lp: LayerPolicy, depth: int) -> None:
        """``name`` may be ``<layer>:lo``, a reduced copy (coefficients under that name)."""
        if lp.scale != "predicted":
            return
        p = self.predictor
        if p is None:
            raise PolicyError(f"layer {name!r} has a predicted scale but the policy has no predictor")
        if name not in p.coeffs:
            raise PolicyError(f"layer {name!r} has a predicted scale but the predictor has no coeffs for it")
        if p.block >= layer_block(name.split(":")[0], depth):
            raise PolicyError(
                f"layer {name!r} has a predicted scale but the predictor runs after block {p.block}, "
                f"which is not before the layer")

    def validate(self, layer_names: Iterable[str], depth: int) -> None:
        """Raise :class:`PolicyError` with the reason if this policy cannot run on a model
        with these linear layers and ``depth`` blocks."""
        names = list(layer_names)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise PolicyError(f"depth must be a positive integer, got {depth!r}")
        for n in names:
            layer_block(n, depth)
        self.validate_exits(depth)
        self._check_layer_keys(names)
        reduced = self._check_gates(names, depth)
        self._check_predictor(names + [f"{n}:lo" for n in reduced], depth)
        for n in names:
            self._check_predicted(n, self._lookup(n), depth)
        for n, lp in reduced.items():
            self._check_predicted(f"{n}:lo", lp, depth)

    def resolve(self, layer_names: Iterable[str], depth: int) -> Dict[str, LayerPolicy]:
        """Validate, then give every layer of the model its precision."""
        names = list(layer_names)
        self.validate(names, depth)
        return {n: self._lookup(n) for n in names}
