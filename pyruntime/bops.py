"""Bit operations (BOPs) of a model file's graph, computed analytically.

BOPs(linear) = MACs x b_w x b_a, with fp32 counting 32 x 32 (docs/model_format.md "BOPs").
Per image: the patch embedding, each executed block's linears (qkv, proj, and the MLP's: fc1 and
fc2, or SwiGLU's two input projections fc1_g and fc1_x and fc2) and its two attention
matmuls (q.k^T and attn.v, T*T*D MACs each, at the graph's attention bits: 32 x 32 for fp32
operands, 8 x 8 for int8), every exit head evaluated, and
the final head (plus ``head_dist``), and each QuEE gate MLP that decides for the image (fp32,
counted with its exit head). LayerNorm, softmax, GELU, SwiGLU's gate, RoPE and residual adds
are free (element-wise, no MACs).

Who pays for what, with an image that exits at block b having executed blocks 0..b:

* the patch embedding and block 0 -- every image;
* block b -- the images that reach it (``reach[b]``);
* the exit head after block b -- every image that executed block b (it is evaluated before
  the image knows whether it leaves);
* the final head(s) -- the images that executed the last block (exits lie at blocks
  0..depth-2, so those are exactly the images that did not leave early).

With QuEE gates an image runs each block at full precision (the ``layers`` bits) or, after
a gate switched it, at reduced precision (a block linear with a copy in ``gates.reduced``
counts that copy's bits; the others and the attention matmuls count the same either way).
:func:`per_image` takes the run's ``block_path`` for that; :func:`expected` takes the
fraction of images running each block reduced (``reach_reduced``). Exit heads and final
heads have no reduced copies.

The executor accumulates the same numbers per image while it runs; the tests hold the two
together. NumPy only.
"""
from __future__ import annotations

import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import graph as opgraph
from .modelfile import attention_bits, check_graph, graph_reduced_layers, layer_precision, read_header

__all__ = ["FP32_BITS", "layer_macs", "layer_bops", "static", "block_bops", "expected", "expected_by_precision",
           "per_image", "reach_from_exits", "reach_from_paths", "gate_bops"]

FP32_BITS = 32 * 32
GraphOrPath = Union[Mapping, str, "os.PathLike[str]"]


def _graph(path_or_graph: GraphOrPath) -> Mapping:
    """A validated graph from a graph dict or a model file (header only, no tensor data)."""
    if isinstance(path_or_graph, Mapping):
        check_graph(path_or_graph)
        return path_or_graph
    return read_header(path_or_graph).graph


def _costs(graph: Mapping, reduced: bool = False) -> List[Tuple[Mapping, str, int, int]]:
    """[(op, what, MACs of one image, b_w x b_a)] in execution order: the one place BOPs are
    counted per op kind. Linear-bearing ops count each layer (and, with ``reduced``, its
    QuEE copy ``<layer>:lo`` right after it) at its precision, fp32 as 32 x 32; attention
    counts its two matmuls at the graph's attention bits (attention pooling's at fp32); every
    other kind is free."""
    lo = graph_reduced_layers(graph) if reduced else {}
    attn = attention_bits(graph) ** 2
    out = []
    for op, macs in opgraph.op_macs(opgraph.ops_of(graph)):
        for what, m in macs.items():
            if op["op"] in ("attention", "attention_pool"):  # the pool is always fp32
                out.append((op, what, m, attn if op["op"] == "attention" else FP32_BITS))
                continue
            out.append((op, what, m, _linear_bits(layer_precision(graph, what))))
            if what in lo:
                out.append((op, f"{what}:lo", m, _linear_bits(lo[what])))
    return out


def _linear_bits(lp: Mapping) -> int:
    return FP32_BITS if lp["w_bits"] == 32 else lp["w_bits"] * lp["a_bits"]


def layer_macs(graph: GraphOrPath, reduced: bool = False) -> Dict[str, int]:
    """MACs of one image through every linear layer and attention matmul (pseudo-layers
    ``blocks.{i}.attn.qk`` and ``blocks.{i}.attn.av``), in execution order. ``reduced=True``
    also lists the QuEE reduced copies ``<layer>:lo`` (which an image runs *instead of* their
    layer: never add both)."""
    return {what: m for _, what, m, _ in _costs(_graph(graph), reduced)}


def layer_bops(graph: GraphOrPath, reduced: bool = False) -> Dict[str, int]:
    """BOPs of one image through every layer (see :func:`layer_macs`)."""
    return {what: m * bits for _, what, m, bits in _costs(_graph(graph), reduced)}


def _embed_ops(graph: Mapping) -> set:
    """Names of the ops before the first block."""
    ops = opgraph.ops_of(graph)
    first = next(i for i, op in enumerate(ops) if op["block"] is not None)
    return {op["name"] for op in ops[:first]}


def _buckets(graph: Mapping):
    """(embed BOPs, per-block BOPs [depth], per-exit-block BOPs {b}, final-head BOPs), by the
    ops' blocks: ops before the first block are the embedding, after the last the head."""
    embed, head = 0, 0
    blocks = np.zeros(graph["arch"]["depth"], dtype=np.int64)
    exits: Dict[int, int] = {}
    in_head, embed_ops = False, _embed_ops(graph)
    for op, _, m, bits in _costs(graph):
        b = op["block"]
        in_head = in_head or b is None and op["name"] not in embed_ops
        if b is None and not in_head:
            embed += m * bits
        elif b is None:
            head += m * bits
        elif op["op"] == "exit":
            exits[b] = exits.get(b, 0) + m * bits
        else:
            blocks[b] += m * bits
    for e in graph["exits"]:
        if e["rule"] == "gate":
            exits[e["block"]] = exits.get(e["block"], 0) + gate_bops(graph)
    return embed, blocks, exits, head


def gate_bops(graph: Mapping) -> int:
    """BOPs of one QuEE gate deciding for one image: its MLP (top-k + entropy features ->
    ``hidden`` -> 3 paths) in fp32; 0 without gates."""
    g = graph.get("gates")
    if not g:
        return 0
    return (g["hidden"] * (g["topk"] + 1) + 3 * g["hidden"]) * FP32_BITS


def _reduced_blocks(graph: Mapping, blocks: np.ndarray) -> np.ndarray:
    """Per-block BOPs of an image running each block at reduced precision."""
    out = blocks.copy()
    full = {}
    for op, what, m, bits in _costs(graph, reduced=True):
        if what.endswith(":lo"):
            out[op["block"]] += m * bits - full[what[:-3]]
        full[what] = m * bits
    return out


def block_bops(path_or_graph: GraphOrPath) -> Tuple[np.ndarray, np.ndarray]:
    """(full [depth], reduced [depth]): BOPs of one image through each block (its
    linears and the attention matmuls; no exit heads) at full and at reduced precision
    (equal for blocks without reduced copies)."""
    graph = _graph(path_or_graph)
    _, blocks, _, _ = _buckets(graph)
    return blocks, _reduced_blocks(graph, blocks)


def static(path_or_graph: GraphOrPath) -> int:
    """BOPs of one image that runs the whole network (evaluating every exit head on the way)."""
    embed, blocks, exits, head = _buckets(_graph(path_or_graph))
    return int(embed + blocks.sum() + sum(exits.values()) + head)


def _check_reach(reach: Sequence[float], depth: int) -> np.ndarray:
    r = np.asarray(reach, dtype=np.float64)
    if r.shape != (depth,):
        raise ValueError(f"reach must have one value per block ({depth}), got shape {r.shape}")
    if not np.all(np.isfinite(r)) or r.min() < 0 or r.max() > 1:
        raise ValueError("reach values must be fractions in [0, 1]")
    if abs(r[0] - 1.0) > 1e-9:
        raise ValueError(f"every image executes block 0, so reach[0] must be 1, got {r[0]}")
    if np.any(np.diff(r) > 1e-12):
        raise ValueError("reach must be non-increasing: an image cannot reach a block it skipped")
    return r


def expected(path_or_graph: GraphOrPath, reach: Sequence[float],
             reach_reduced: Optional[Sequence[float]] = None) -> float:
    """Amortised BOPs per image when a fraction ``reach[b]`` of images executes block b, of
    which a fraction ``reach_reduced[b]`` (of all images, <= reach[b]; default none) runs it
    at the reduced precision of QuEE gates."""
    graph = _graph(path_or_graph)
    embed, blocks, exits, head = _buckets(graph)
    depth = graph["arch"]["depth"]
    r = _check_reach(reach, depth)
    total = float(embed) + float(np.dot(r, blocks.astype(np.float64)))
    if reach_reduced is not None:
        rr = np.asarray(reach_reduced, dtype=np.float64)
        if rr.shape != (depth,):
            raise ValueError(f"reach_reduced must have one value per block ({depth}), got shape {rr.shape}")
        if not np.all(np.isfinite(rr)) or rr.min() < 0 or np.any(rr > r + 1e-12):
            raise ValueError("reach_reduced values must be fractions in [0, reach[b]]")
        total += float(np.dot(rr, (_reduced_blocks(graph, blocks) - blocks).astype(np.float64)))
    total += sum(r[b] * float(v) for b, v in exits.items())
    return total + r[-1] * float(head)


def expected_by_precision(path_or_graph: GraphOrPath, reach_full: Sequence[float],
                          reach_reduced: Sequence[float]) -> float:
    """:func:`expected` from the fractions of images running each block at full precision
    and at reduced precision (their sum is the reach)."""
    rf, rr = np.asarray(reach_full, dtype=np.float64), np.asarray(reach_reduced, dtype=np.float64)
    if rf.shape != rr.shape:
        raise ValueError(f"reach_full {rf.shape} and reach_reduced {rr.shape} differ in shape")
    return expected(path_or_graph, rf + rr, rr)


def _exit_indices(graph: Mapping, exit_block) -> np.ndarray:
    """Exit blocks with -1 mapped to depth-1 (the final head), validated against the graph."""
    depth = graph["arch"]["depth"]
    e = np.atleast_1d(np.asarray(exit_block))
    if e.dtype.kind not in "iu":
        raise ValueError(f"exit_block must hold integers, got dtype {e.dtype}")
    e = np.where(e == -1, depth - 1, e).astype(np.int64)
    allowed = {x["block"] for x in graph["exits"]} | {depth - 1}
    bad = sorted(set(e.tolist()) - allowed)
    if bad:
        raise ValueError(f"exit_block values {bad} name no head (exits at {sorted(allowed - {depth - 1})}, "
                         f"final head: -1 or {depth - 1})")
    return e


def _check_paths(block_path, e: np.ndarray, depth: int) -> np.ndarray:
    """block_path [B, depth] in {0, 1, 2}, non-zero exactly on blocks 0..exit_block."""
    p = np.asarray(block_path)
    if p.ndim == 1 and e.size == 1:
        p = p[None]
    if p.shape != (e.size, depth):
        raise ValueError(f"block_path must have shape [{e.size}, {depth}] (images x blocks), got {list(p.shape)}")
    if p.dtype.kind not in "iu" or p.size and (p.min() < 0 or p.max() > 2):
        raise ValueError("block_path values must be 0 (not run), 1 (full) or 2 (reduced)")
    ran = p != 0
    if not np.array_equal(ran, np.arange(depth)[None, :] <= e[:, None]):
        raise ValueError("block_path disagrees with exit_block: an image runs exactly blocks 0..exit_block")
    return p


def per_image(path_or_graph: GraphOrPath, exit_block, block_path=None) -> np.ndarray:
    """BOPs of each image (int64) given the block whose head answered for it (-1 or depth-1:
    the final head) and, for QuEE models, the run's ``block_path`` [B, depth] (1 full,
    2 reduced precision, 0 not run; default: every block run at full precision)."""
    graph = _graph(path_or_graph)
    embed, blocks, exits, head = _buckets(graph)
    e = _exit_indices(graph, exit_block)
    exit_cost = np.zeros(len(blocks), dtype=np.int64)
    for b, v in exits.items():
        exit_cost[b] = v
    cum_exits = np.cumsum(exit_cost)
    final = e == len(blocks) - 1
    if block_path is None:
        run = np.cumsum(blocks)[e]
    else:
        p = _check_paths(block_path, e, len(blocks))
        run = ((p == 1) * blocks[None, :]).sum(1) + ((p == 2) * _reduced_blocks(graph, blocks)[None, :]).sum(1)
    return embed + run + cum_exits[e] + np.where(final, head, 0)


def reach_from_paths(path_or_graph: GraphOrPath, exit_block, block_path) -> Tuple[np.ndarray, np.ndarray]:
    """(reach_full, reach_reduced): fraction of images running each block at each precision,
    from a run's exit blocks and block paths (for :func:`expected_by_precision`)."""
    graph = _graph(path_or_graph)
    e = _exit_indices(graph, exit_block)
    p = _check_paths(block_path, e, graph["arch"]["depth"])
    return (p == 1).mean(0).astype(np.float64), (p == 2).mean(0).astype(np.float64)


def reach_from_exits(path_or_graph: GraphOrPath, exit_block) -> np.ndarray:
    """Fraction of images executing each block, from the images' exit blocks (for
    :func:`expected`)."""
    graph = _graph(path_or_graph)
    e = _exit_indices(graph, exit_block)
    depth = graph["arch"]["depth"]
    return np.array([(e >= b).mean() for b in range(depth)], dtype=np.float64)
