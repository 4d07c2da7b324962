"""Per-layer latency measured on this device, so calibrators can optimise seconds, not BOPs.

BOPs say how much arithmetic a policy asks for; on a small model at batch 1 the time is
dominated by per-layer overheads that BOPs do not see (README: W8A8 is no faster than fp32 on
the reference model). A :class:`LatencyTable` holds what this device actually spends, per
image at batch 1, measured by :func:`profile_latency` (``pyruntime bench MODEL --profile
--latency-table OUT.json``) from the executor's own per-op timers:

* every linear layer (``patch_embed``, each block's qkv/proj/fc1/fc2, the exit heads
  ``exits.<b>.fc``, ``head`` and ``head_dist``) at each profiled weight bit-width (32, 8, 4);
* per block, its attention core (q.k^T, softmax, attn.v) at each profiled attention precision:
  fp32 (averaged over the weight precisions' runs, the same code in each) and, unless left out,
  int8 (``attention.bits`` 8, timed in a W8A8 run with int8 attention);
* per block, its other non-linear ops (norm1, residual adds, norm2, GELU), the same code at
  every bit-width, so averaged over the profiled precisions;
* the embedding's non-linear ops (patch unfold, token assembly + position embedding).

A graph whose attention precision the table did not profile is refused by
:meth:`LatencyTable.check` rather than predicted with the wrong attention time. A version-1
table (before attention was kept apart) reads with its fp32 attention inside ``blocks`` and
``attention`` {32: zeros}: the same sums for fp32 attention, and int8 attention refused.

Only the weight bits change the kernel: activations are stored as int8 whatever ``a_bits``
(4..8) says, so ``a_bits`` changes values, not time, and the table is keyed by ``w_bits``
alone. The int4 kernel is measured at block size 32 and activation scales are dynamic (a
static or predicted scale skips one absmax pass over the row: negligible).

The executor times an exit head (pooling, its LayerNorm, its linear) and the final head
(final norm, pooling, fc_norm, head, head_dist) as one op each, so there is no separately
timed fixed part to split off: the whole op is charged to the head's linear (split evenly
between ``head`` and ``head_dist``, which have one shape). That changes no total, because a
head's norm is paid by exactly the images that pay its linear.

Who pays for what is that of ``pyruntime.bops`` (embedding + block 0: every image; block b:
``reach[b]``; the exit head after block b: the images that executed block b; the final
head: the images that executed the last block). QuEE reduced copies are not profiled;
:meth:`LatencyTable.static` and :meth:`~LatencyTable.expected` run every block at its
``layers`` bits.

Seconds are kept on a grid of 2**-40 s (about 1 ps, far below the timer's resolution), so
every sum of table entries (below 2**13 s) is exact in float64 whatever its order: a calibrator's
``fixed + sum(cost)`` equals :meth:`LatencyTable.static` of the resulting graph bit for bit.

Profiling needs an fp32 model file: it re-quantises the fp32 weights in-process to each
precision with the converter's own code (:func:`requantize`), and builds every exit head
(0..depth-2) so that the table covers any exit placement -- heads the file lacks are
synthesised (their values do not change the time). NumPy only; no torch.
"""
from __future__ import annotations

import copy
import datetime
import json
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import graph as opgraph
from ._atomic import atomic_write_bytes
from .bops import GraphOrPath, _check_reach, _graph
from .modelfile import attention_bits, check_graph, graph_layer_names, linear_tensors, read_model, set_attention_bits
from .policy import ATTN_BITS, LayerPolicy, Policy

__all__ = ["TABLE_VERSION", "PRECISIONS", "LatencyTable", "requantize", "profiling_model", "profile_latency",
           "uniform_graph", "cpu_model"]

TABLE_FORMAT = "pyruntime-latency-table"
TABLE_VERSION = 2  # 2: attention kept apart from blocks, per attention precision; 1 still reads
PRECISIONS = {"fp32": 32, "w8a8": 8, "w4a8": 4}  # profiled precision -> the weight bits it measures
ATTN8_RUN = "w8a8-attn8"  # the extra profiled run whose attention cores give attention[8]
TICK = 2.0 ** -40  # seconds; see the module docstring
PathLike = Union[str, "os.PathLike[str]"]


def _on_grid(seconds: float) -> float:
    """``seconds`` rounded to a multiple of :data:`TICK` (exact sums, see the module docstring)."""
    return round(seconds / TICK) * TICK


# --- graphs and re-quantisation ----------------------------------------------------------------

def uniform_graph(arch: Mapping, w_bits: int, exit_blocks: Sequence[int] = ()) -> dict:
    """A graph of ``arch`` with every linear at ``w_bits`` (a_bits 8, dynamic scales) and
    exit heads after ``exit_blocks`` (rule confidence, threshold 1: nobody leaves)."""
    C = arch["in_chans"]
    graph = {"arch": copy.deepcopy(dict(arch)),
             "preprocess": {"mean": [0.0] * C, "std": [1.0] * C, "input_size": [C, *arch["img_size"]]},
             "exits": [{"block": int(b), "rule": "confidence", "threshold": 1.0} for b in sorted(exit_blocks)],
             "predictor": None}
    lp = LayerPolicy(w_bits=w_bits).to_dict()
    graph["layers"] = {n: dict(lp) for n in graph_layer_names(graph)}
    check_graph(graph)
    return graph


def _all_exits(arch: Mapping) -> List[int]:
    """Every block an exit head may follow: 0..depth-2."""
    return list(range(arch["depth"] - 1))


def _require_fp32(graph: Mapping) -> None:
    for name in graph_layer_names(graph):
        bits = graph["layers"][name]["w_bits"]
        if bits != 32:
            raise ValueError(f"layer {name!r} is stored at {bits}-bit weights, so it cannot be re-quantised: "
                             f"latency profiling needs an fp32 model file (convert with policy 'fp32')")


def requantize(graph: Mapping, tensors: Mapping[str, np.ndarray], policy) -> Tuple[dict, Dict[str, np.ndarray]]:
    """(graph, tensors) of an fp32 model with every linear re-quantised to ``policy``'s bits
    and its attention at the policy's precision (a Policy, shorthand or JSON path), identical
    to what ``pyruntime.convert`` writes for that policy. Only bits change: a policy with
    exits, a predictor or gates needs the converter, and so does a model with QuEE gates."""
    from .convert import as_policy

    pol = as_policy(policy)
    if pol.exits or pol.predictor is not None or pol.gates is not None:
        raise ValueError(f"policy {pol.name!r} has exits, a predictor or gates; re-quantising changes "
                         f"bits only (use pyruntime.convert for the rest)")
    if graph.get("gates"):
        raise ValueError("the model has QuEE gates; re-quantising needs a gate-free fp32 model")
    _require_fp32(graph)
    names = graph_layer_names(graph)
    layers = pol.resolve(names, graph["arch"]["depth"])
    out = dict(tensors)
    for name in names:
        w, bias = out.pop(f"{name}.weight"), out.pop(f"{name}.bias", None)
        out.update(linear_tensors(name, w, bias, layers[name]))
    g = copy.deepcopy(dict(graph))
    g["layers"] = {name: layers[name].to_dict() for name in names}
    return set_attention_bits(g, pol.attn_bits), out


def _synthetic_exit(arch: Mapping, block: int) -> Dict[str, np.ndarray]:
    """An exit head's tensors with made-up values (the timing does not depend on them)."""
    D, n = arch["embed_dim"], arch["num_classes"]
    rng = np.random.default_rng(block)
    return {f"exits.{block}.norm.weight": np.ones(D, np.float32), f"exits.{block}.norm.bias": np.zeros(D, np.float32),
            f"exits.{block}.fc.weight": (0.02 * rng.standard_normal((n, D))).astype(np.float32),
            f"exits.{block}.fc.bias": np.zeros(n, np.float32)}


def profiling_model(graph: Mapping, tensors: Mapping[str, np.ndarray]) -> Tuple[dict, Dict[str, np.ndarray], List[int]]:
    """(graph, tensors, synthesised exit blocks) of the fp32 model that profiling times: no
    gates or predictor, an exit head after every block 0..depth-2 (the file's own where it has
    one, synthesised elsewhere). ValueError for a model whose linears are not fp32."""
    _require_fp32(graph)
    arch = graph["arch"]
    have = {e["block"] for e in graph["exits"]}
    g = uniform_graph(arch, 32, _all_exits(arch))
    g["preprocess"] = copy.deepcopy(graph["preprocess"])
    # the file's own program (its family's ops: QuickGELU, relative position bias, ...), not
    # the plain ViT that arch alone lowers to, with an exit after every block
    g["ops"] = copy.deepcopy(opgraph.with_exits(opgraph.ops_of(graph), _all_exits(arch)))
    t = {k: v for k, v in tensors.items() if not k.startswith("gates.") and ":lo" not in k}
    synthesised = [b for b in _all_exits(arch) if b not in have]
    for b in synthesised:
        t.update(_synthetic_exit(arch, b))
    return g, t, synthesised


# --- the table ---------------------------------------------------------------------------------

def _seconds(v, what: str) -> float:
    """A finite, non-negative number of seconds, or ValueError naming ``what``."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ValueError(f"latency table: {what} must be a number of seconds, got {v!r}")
    s = float(v)
    if not math.isfinite(s) or s < 0:
        raise ValueError(f"latency table: {what} must be finite and >= 0, got {s}")
    return _on_grid(s)


@dataclass
class LatencyTable:
    """Seconds per image at batch 1 on the device that profiled it (module docstring).

    ``arch``: the model's graph arch; ``w_bits``: the weight bit-widths profiled;
    ``layers[name][w_bits]``: every linear of ``arch`` with an exit head after every block
    0..depth-2; ``blocks[i]``: block i's non-linear ops but attention; ``embed``: the
    embedding's non-linear ops; ``meta``: how it was measured (ISA, threads, runs, CPU, date,
    ...); ``attention[bits][i]``: block i's attention core at each profiled attention precision
    (32 required; None: {32: zeros}, i.e. ``blocks`` include fp32 attention, as a version-1 table
    does). Validated on construction (ValueError naming the problem); values are put on the
    2**-40 s grid.
    """

    arch: dict
    w_bits: Tuple[int, ...]
    layers: Dict[str, Dict[int, float]]
    blocks: List[float]
    embed: float
    meta: dict = field(default_factory=dict)
    attention: Optional[Dict[int, List[float]]] = None

    def __post_init__(self) -> None:
        try:
            graph = uniform_graph(self.arch, 32, _all_exits(self.arch))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"latency table: invalid arch: {e}") from None
        self.arch = json.loads(json.dumps(graph["arch"]))
        self.w_bits = self._check_bits(self.w_bits)
        self.layers = self._check_layers(self.layers, graph_layer_names(graph))
        depth = self.arch["depth"]
        if not isinstance(self.blocks, (list, tuple)) or len(self.blocks) != depth:
            raise ValueError(f"latency table: blocks must list one value per block ({depth})")
        self.blocks = [_seconds(v, f"block {i}") for i, v in enumerate(self.blocks)]
        self.attention = self._check_attention(self.attention, depth)
        self.embed = _seconds(self.embed, "embed")
        if not isinstance(self.meta, Mapping):
            raise ValueError("latency table: meta must be an object")
        self.meta = dict(self.meta)

    @staticmethod
    def _check_bits(w_bits) -> Tuple[int, ...]:
        bits = tuple(w_bits) if isinstance(w_bits, (list, tuple)) else ()
        if not bits or any(isinstance(b, bool) or b not in PRECISIONS.values() for b in bits) \
                or len(set(bits)) != len(bits):
            raise ValueError(f"latency table: w_bits must be distinct values of {sorted(PRECISIONS.values())}, "
                             f"got {w_bits!r}")
        return tuple(int(b) for b in bits)

    @staticmethod
    def _check_attention(attention, depth: int) -> Dict[int, List[float]]:
        if attention is None:
            return {32: [0.0] * depth}
        if not isinstance(attention, Mapping):
            raise ValueError("latency table: attention must be an object {bits: [seconds per block]}")
        out: Dict[int, List[float]] = {}
        for b, per in attention.items():
            if isinstance(b, bool) or b not in ATTN_BITS:
                raise ValueError(f"latency table: attention bits must be some of {list(ATTN_BITS)}, got {b!r}")
            if not isinstance(per, (list, tuple)) or len(per) != depth:
                raise ValueError(f"latency table: attention at {b} bits must list one value per block ({depth})")
            out[int(b)] = [_seconds(v, f"attention at {b} bits, block {i}") for i, v in enumerate(per)]
        if 32 not in out:
            raise ValueError("latency table: attention must include fp32 (32), which every profile times")
        return dict(sorted(out.items(), reverse=True))

    def _check_layers(self, layers, names: Sequence[str]) -> Dict[str, Dict[int, float]]:
        if not isinstance(layers, Mapping):
            raise ValueError("latency table: layers must be an object {layer: {w_bits: seconds}}")
        for name in names:
            if name not in layers:
                raise ValueError(f"latency table: missing layer {name!r}")
        extra = sorted(set(layers) - set(names))
        if extra:
            raise ValueError(f"latency table: layers {extra} are not linears of its arch")
        out = {}
        for name in names:
            per = layers[name]
            if not isinstance(per, Mapping) or sorted(int(b) for b in per) != sorted(self.w_bits):
                raise ValueError(f"latency table: layer {name!r} must have a value for each of w_bits "
                                 f"{list(self.w_bits)}, got {per!r:.80}")
            out[name] = {int(b): _seconds(v, f"layer {name!r} at {b}-bit weights") for b, v in per.items()}
        return out

    # -- lookups -----------------------------------------------------------------------------

    def layer(self, name: str, w_bits: int, a_bits: int = 8) -> float:
        """Seconds of one image through linear ``name`` at ``w_bits`` weights (``a_bits``
        4..8 does not change the kernel, see the module docstring)."""
        if isinstance(a_bits, bool) or not isinstance(a_bits, (int, np.integer)) or not 4 <= a_bits <= 8:
            raise ValueError(f"a_bits must be in 4..8, got {a_bits!r}")
        if name not in self.layers:
            raise ValueError(f"latency table has no layer {name!r} (a table of a different model?)")
        if w_bits not in self.w_bits:
            raise ValueError(f"latency table has no {w_bits}-bit weights (it profiled w_bits {list(self.w_bits)}); "
                             f"profile that precision too")
        return self.layers[name][w_bits]

    def check(self, graph: GraphOrPath) -> dict:
        """The validated graph, or ValueError if this table was profiled on another model:
        naming the first layer the table lacks, else the arch fields that differ."""
        graph = _graph(graph)
        bits = attention_bits(graph)
        if bits not in self.attention:
            raise ValueError(f"latency table has no {bits}-bit attention (it profiled attention at "
                             f"{list(self.attention)} bits); profile with int8 attention too")
        for name in graph_layer_names(graph):
            if name not in self.layers:
                raise ValueError(f"latency table has no layer {name!r}: it was profiled on another model "
                                 f"(depth {self.arch['depth']})")
        arch = json.loads(json.dumps(graph["arch"]))
        differ = sorted(k for k in set(arch) | set(self.arch) if arch.get(k) != self.arch.get(k))
        if differ:
            raise ValueError(f"latency table was profiled on another model: arch differs in {differ}")
        return graph

    def _buckets(self, graph: GraphOrPath) -> Tuple[float, np.ndarray, Dict[int, float], float]:
        """(embed, per-block [depth], per-exit-block {b}, final heads) seconds at ``graph``'s bits."""
        graph = self.check(graph)
        embed, head = self.embed, 0.0
        blocks = np.asarray(self.blocks, dtype=np.float64) + np.asarray(self.attention[attention_bits(graph)])
        exits: Dict[int, float] = {}
        seen_block = False
        for op in opgraph.ops_of(graph):
            b, name = op["block"], op["weights"].get("layer")
            seen_block = seen_block or b is not None
            if name is None:
                continue
            s = self.layer(name, graph["layers"][name]["w_bits"])
            if b is None and not seen_block:
                embed += s
            elif b is None:
                head += s
            elif op["op"] == "exit":
                exits[b] = s
            else:
                blocks[b] += s
        return embed, blocks, exits, head

    def block_latency(self, graph: GraphOrPath) -> np.ndarray:
        """Seconds of one image through each block (its linears, attention and other non-linear
        ops; no exit heads) at ``graph``'s bits, [depth]."""
        return self._buckets(graph)[1]

    def static(self, graph: GraphOrPath) -> float:
        """Seconds of one image through the whole graph, evaluating every exit head (like
        ``bops.static``); exact (see the module docstring)."""
        embed, blocks, exits, head = self._buckets(graph)
        return math.fsum([embed, *blocks.tolist(), *exits.values(), head])

    def expected(self, graph: GraphOrPath, reach: Sequence[float]) -> float:
        """Amortised seconds per image when a fraction ``reach[b]`` of images executes block b
        (who pays for what as ``bops.expected``)."""
        embed, blocks, exits, head = self._buckets(graph)
        r = _check_reach(reach, len(blocks))
        return math.fsum([embed, *(r * blocks).tolist(), *(r[b] * s for b, s in exits.items()), r[-1] * head])

    # -- JSON ----------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"format": TABLE_FORMAT, "version": TABLE_VERSION, "unit": "s", "arch": self.arch,
                "w_bits": list(self.w_bits), "embed": self.embed, "blocks": list(self.blocks),
                "attention": {str(b): list(per) for b, per in self.attention.items()},
                "layers": {n: {str(b): s for b, s in per.items()} for n, per in self.layers.items()},
                "meta": self.meta}

    @classmethod
    def from_dict(cls, d) -> "LatencyTable":
        if not isinstance(d, Mapping) or d.get("format") != TABLE_FORMAT:
            raise ValueError(f"not a pyruntime latency table (no \"format\": \"{TABLE_FORMAT}\")")
        version = d.get("version")
        if version not in (1, TABLE_VERSION) or isinstance(version, bool):
            raise ValueError(f"latency table version {version!r} is not supported (this pyruntime reads "
                             f"versions 1..{TABLE_VERSION})")
        if version == 1 and "attention" in d:
            raise ValueError("latency table version 1 has no 'attention' (its blocks include fp32 attention)")
        if version >= 2 and "attention" not in d:
            raise ValueError(f"latency table lacks ['attention'] (version {version})")
        missing = [k for k in ("arch", "w_bits", "embed", "blocks", "layers") if k not in d]
        if missing:
            raise ValueError(f"latency table lacks {missing}")
        if d.get("unit", "s") != "s":
            raise ValueError(f"latency table unit must be 's', got {d['unit']!r}")
        layers = d["layers"]
        if isinstance(layers, Mapping):
            try:
                layers = {n: {int(b): s for b, s in per.items()} for n, per in layers.items()}
            except (AttributeError, TypeError, ValueError):
                raise ValueError("latency table: layers must be {layer: {w_bits: seconds}}") from None
        attention = d.get("attention")
        if isinstance(attention, Mapping):
            try:
                attention = {int(b): per for b, per in attention.items()}
            except (TypeError, ValueError):
                raise ValueError("latency table: attention must be {bits: [seconds per block]}") from None
        return cls(arch=d["arch"], w_bits=d["w_bits"], layers=layers, blocks=d["blocks"], embed=d["embed"],
                   meta=d.get("meta", {}), attention=attention)

    def save(self, path: PathLike) -> None:
        """Write the versioned JSON atomically (temporary file + fsync + rename)."""
        atomic_write_bytes(path, (json.dumps(self.to_dict(), indent=1) + "\n").encode("utf-8"))

    @classmethod
    def load(cls, path: PathLike) -> "LatencyTable":
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{path}: latency table is not valid JSON: {e}") from None
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


# --- profiling -------------------------------------------------------------------------------------

def _precision_bits(precisions: Sequence[str]) -> Dict[str, int]:
    names = [precisions] if isinstance(precisions, str) else list(precisions)
    unknown = [p for p in names if p not in PRECISIONS]
    if not names or unknown:
        raise ValueError(f"precisions must be some of {list(PRECISIONS)}, got {names!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"precisions repeat: {names}")
    return {p: PRECISIONS[p] for p in names}


def _profile_images(graph: Mapping, images: Optional[np.ndarray]) -> np.ndarray:
    """float32 [N, C, H, W] normalised images (default: 8 seeded random ones)."""
    a = graph["arch"]
    shape = (a["in_chans"], *a["img_size"])
    if images is None:
        return np.random.default_rng(0).standard_normal((8, *shape)).astype(np.float32)
    x = np.asarray(images)
    if x.dtype != np.float32 or x.ndim != 4 or x.shape[1:] != shape or len(x) == 0:
        raise ValueError(f"profiling images must be normalised float32 [N, {', '.join(map(str, shape))}], "
                         f"got {x.dtype} {list(x.shape)}")
    if not np.isfinite(x).all():
        raise ValueError("profiling images contain NaN or Inf")
    return np.ascontiguousarray(x)


def _op_owner(graph: Mapping) -> Dict[str, Tuple[str, object]]:
    """Where each timed op's seconds go: ("embed", None), ("block", i), ("attention", i) or
    ("layers", [names]), from the graph's op list and the names the executor times them by:
    the patch unfold apart from the patch linear, the token assembly (prefix tokens,
    position embedding, norm_pre) as one "embed", every block op by its name (the attention
    core as ``<name>.core``), an exit head whole by its name, and everything after the last
    block as one "head" (csrc/bindings/executor_bindings.cc, ``timer_name``)."""
    owner: Dict[str, Tuple[str, object]] = {}
    head: List[str] = []
    seen_block = False
    for op in opgraph.ops_of(graph):
        kind, b, name = op["op"], op["block"], op["name"]
        layer = op["weights"].get("layer")
        seen_block = seen_block or b is not None
        if kind == "patch_embed":
            owner["patch_embed.unfold"] = ("embed", None)
            owner[name] = ("layers", [layer])
        elif b is None and not seen_block:
            owner["embed"] = ("embed", None)
        elif b is None:
            head += [layer] if layer else []
        elif kind == "attention":
            owner[f"{name}.core"] = ("attention", b)
        elif layer is not None:
            owner[name] = ("layers", [layer])
        else:
            owner[name] = ("block", b)
    owner["head"] = ("layers", head)
    return owner


def _timed_runs(executors: Mapping[str, object], x: np.ndarray, runs: int, warmup: int,
                num_threads: Optional[int], isa: Optional[str]) -> Tuple[Dict[str, Dict[str, List[float]]], str]:
    """Per precision, per op, the seconds of each of ``runs`` batch-1 runs (every exit head
    evaluated). Precisions take turns run by run, starting with a different one each time,
    so drift in the machine's load hits them alike."""
    order = list(executors)
    samples: Dict[str, Dict[str, List[float]]] = {p: {} for p in order}
    ran_isa = ""
    for ex in executors.values():
        ex.set_profiling(True)
    for r in range(warmup + runs):
        img = x[r % len(x)][None]
        k = r % len(order)
        for p in order[k:] + order[:k]:
            ex = executors[p]
            ex.reset_profile()
            ran_isa = ex.run(img, num_threads, isa, True)["isa"]
            if r >= warmup:
                for op, s in ex.profile().items():
                    samples[p].setdefault(op, []).append(s)
    return samples, ran_isa


def cpu_model() -> str:
    """The CPU's name from /proc/cpuinfo (x86 "model name"; on ARM "Model", "Hardware" or the
    "CPU part" number, in that preference), else what ``platform`` knows."""
    found = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            found.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    for key in ("model name", "Model", "Hardware", "CPU part"):
        if found.get(key):
            return found[key]
    return platform.processor() or platform.machine()


def _table(graph: Mapping, medians: Mapping[str, Mapping[str, float]], bits: Mapping[str, int],
           meta: dict, attn8: Optional[Mapping[str, float]] = None) -> LatencyTable:
    """Median per-op seconds per precision -> a table: each linear op charged to its
    layer(s), the other ops averaged over the precisions into their block, attention or the
    embedding. ``attn8``: the median per-op seconds of a run with int8 attention, of which only
    the attention cores are kept."""
    owner = _op_owner(graph)
    for p, ops in [*medians.items(), *([("int8 attention", attn8)] if attn8 is not None else [])]:
        if set(ops) != set(owner):
            raise ValueError(f"the executor timed ops {sorted(set(ops) ^ set(owner))} that the latency table does "
                             f"not expect (precision {p})")
    depth = graph["arch"]["depth"]
    layers: Dict[str, Dict[int, float]] = {}
    blocks = [0.0] * depth
    attention = {32: [0.0] * depth, **({8: [0.0] * depth} if attn8 is not None else {})}
    embed = 0.0
    for op, (kind, where) in owner.items():
        if kind == "layers":
            for name in where:
                layers[name] = {bits[p]: medians[p][op] / len(where) for p in medians}
            continue
        s = float(np.mean([medians[p][op] for p in medians]))
        if kind == "block":
            blocks[where] += s
        elif kind == "attention":
            attention[32][where] = s
            if attn8 is not None:
                attention[8][where] = attn8[op]
        else:
            embed += s
    return LatencyTable(graph["arch"], tuple(bits.values()), layers, blocks, embed, meta, attention)


def _read(source) -> Tuple[dict, Dict[str, np.ndarray], str]:
    """(graph, tensors, a name for meta) from a model file path or a (graph, tensors) pair."""
    if isinstance(source, (str, os.PathLike)):
        graph, tensors, _, _ = read_model(source)
        return graph, tensors, Path(source).name
    graph, tensors = source
    check_graph(graph)
    return dict(graph), dict(tensors), "in-process"


def profile_latency(source, precisions: Sequence[str] = ("fp32", "w8a8", "w4a8"), runs: int = 100,
                    warmup: int = 5, num_threads: Optional[int] = None, isa: Optional[str] = None,
                    images: Optional[np.ndarray] = None, int8_attention: bool = True) -> LatencyTable:
    """Measure a :class:`LatencyTable` of an fp32 model (a file path or ``(graph, tensors)``).

    For each precision every linear -- patch embedding and heads included, so scope ``all``
    allocations are covered -- is re-quantised to its weight bits; batch-1 images (``images``:
    normalised float32 [N, C, H, W], taken in turn; default 8 random ones) run with every exit
    head evaluated and the executor's per-op timers on. ``int8_attention``: also time the
    attention cores with int8 attention (a W8A8 run with ``attention.bits`` 8, interleaved with
    the others). Each value is the median over ``runs`` runs (after ``warmup``) of that op,
    precisions interleaved run by run.
    """
    from . import _core

    for what, v, low in (("runs", runs, 1), ("warmup", warmup, 0)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
            raise ValueError(f"{what} must be an int >= {low}, got {v!r}")
    bits = _precision_bits(precisions)
    graph, tensors, name = _read(source)
    base_graph, base_tensors, synthesised = profiling_model(graph, tensors)
    x = _profile_images(base_graph, images)
    if not isinstance(int8_attention, (bool, np.bool_)):
        raise ValueError(f"int8_attention must be a bool, got {int8_attention!r}")
    executors = {}
    for p, b in bits.items():
        g, t = requantize(base_graph, base_tensors, Policy(default=LayerPolicy(w_bits=b), name=p))
        executors[p] = _core.Executor(g, t)
    if int8_attention:
        g, t = requantize(base_graph, base_tensors, Policy(default=LayerPolicy(w_bits=8), attn_bits=8, name=ATTN8_RUN))
        executors[ATTN8_RUN] = _core.Executor(g, t)
    samples, ran_isa = _timed_runs(executors, x, int(runs), int(warmup), num_threads, isa)
    medians = {p: {op: float(np.median(v)) for op, v in ops.items()} for p, ops in samples.items()}
    attn8 = medians.pop(ATTN8_RUN, None)
    from . import __version__

    meta = {"model": name, "isa": ran_isa, "threads": num_threads if num_threads is not None else "default",
            "physical_cores": int(_core.physical_cores()), "batch": 1, "runs": int(runs), "warmup": int(warmup),
            "statistic": "median per op", "precisions": list(bits),
            "attention_bits": [32, 8] if int8_attention else [32], "cpu": cpu_model(),
            "machine": platform.machine(), "synthesised_exits": synthesised, "pyruntime_version": __version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    return _table(base_graph, medians, bits, meta, attn8)
