"""The typed graph: a model as an ordered list of ops (docs/model_format.md "Ops").

Each op is ``{"op": kind, "name", "in": [tensor], "out": [tensor], "attrs": {...},
"weights": {role: name}, "block": int | null}``. ``in``/``out`` name activation tensors (the
single graph input is ``"image"``); ``weights`` name the file's tensors, except the role
``"layer"`` of a linear-bearing op, which names a linear layer (its tensors are
``<layer>.weight`` / ``.weight.q8`` / ``.weight.q4`` + ``.weight.scale`` and ``<layer>.bias``,
its precision is ``graph.layers[<layer>]``). ``block`` is the transformer block an op belongs
to (null for the embedding and the final head); an ``exit`` op carries the block it follows.
Precision is not part of an op: it lives in ``graph.layers``, ``graph.gates.reduced`` and
``graph.attention``, so a calibrator changes bits without rewriting the program.

This module holds the one registry of op kinds (:data:`OP_KINDS`: arity, attribute schema,
weight roles, shape rule, linear layers), the checker (:func:`check_ops`: every problem a
FormatError naming the op), the lowering of a format-2/3 graph's ``arch`` to ops
(:func:`lower`), and the facts the rest of pyruntime derives from a program: linear layers
in execution order with their shapes and rows (:func:`linears`), tokens per image
(:func:`num_tokens`), MACs per op (:func:`op_macs`). NumPy-free; no torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from .errors import FormatError

__all__ = ["OP_KINDS", "OP_KEYS", "MLP_ACTS", "IMAGE", "Linear", "check_ops", "check_lowerable", "lower", "parallel_block", "ops_of", "with_exits", "executor_ops", "infer_shapes", "linears",
           "layer_names", "num_tokens", "op_macs", "weight_shapes", "depth", "tokens_chain", "block_ends"]

IMAGE = "image"  # the program's input: one normalised image [C, H, W]
OP_KEYS = ("op", "name", "in", "out", "attrs", "weights", "block")
LAYER = "layer"  # the weight role naming a linear layer rather than a tensor
EPS_RANGE = (1e-30, 1.0)  # modelfile's LayerNorm bound (see there)

Shape = Tuple[Any, ...]  # ("image", C, H, W), (T, D) token rows, or (D,) one vector


class Linear(NamedTuple):
    """One linear layer as an op uses it: y[rows, N] = x[rows, K] W^T (+ bias). ``bias``:
    True/False when the program fixes whether the layer has one, None when the file decides."""

    layer: str
    N: int
    K: int
    rows: int
    bias: Optional[bool]


# --- attribute checkers ------------------------------------------------------------------------

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_ATTR_TYPES: Dict[str, Tuple[str, Callable[[Any], bool]]] = {
    "bool": ("a bool", lambda v: isinstance(v, bool)),
    "pos": ("a positive int", lambda v: _is_int(v) and v > 0),
    "nonneg": ("a non-negative int", lambda v: _is_int(v) and v >= 0),
    "pair": ("a pair of positive ints", lambda v: isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x > 0 for x in v)),
    "eps": (f"a number in [{EPS_RANGE[0]:g}, {EPS_RANGE[1]:g}]",
            lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and EPS_RANGE[0] <= v <= EPS_RANGE[1]),
    "pool": ("'token' or 'avg'", lambda v: v in ("token", "avg")),
    "optbool": ("a bool or null", lambda v: v is None or isinstance(v, bool)),
}


# --- the registry ------------------------------------------------------------------------------

@dataclass(frozen=True)
class OpKind:
    """What the checker, the shape rule and every consumer know of one op kind.

    ``infer(op, in_shapes) -> (out_shapes, {role: tensor shape})`` raises ValueError for
    inputs the kind cannot take; ``linear(op, in_shapes)`` lists the linear layers it runs."""

    n_in: int
    n_out: int
    attrs: Mapping[str, str]
    weights: Tuple[str, ...]                 # required roles
    infer: Callable[[Mapping, List[Shape]], Tuple[List[Shape], Dict[str, Shape]]]
    optional_weights: Tuple[str, ...] = ()
    linear: Optional[Callable[[Mapping, List[Shape]], List[Linear]]] = None
    in_block: Optional[bool] = None          # True: needs a block; False: never in one


def _tokens(s: Shape, what: str = "input") -> Tuple[int, int]:
    if len(s) != 2 or s[0] == IMAGE:
        raise ValueError(f"{what} must be token rows [T, D], got {list(s)}")
    return s


def _vector_or_tokens(s: Shape) -> int:
    if s and s[0] == IMAGE:
        raise ValueError("input must be token rows or a vector, not the image")
    return s[-1]


def _patch_embed(op, ins):
    a = op["attrs"]
    if ins[0] != (IMAGE, a["in_chans"], *a["img_size"]):
        raise ValueError(f"input must be the image [{a['in_chans']}, {a['img_size'][0]}, {a['img_size'][1]}]")
    (h, w), (ph, pw) = a["img_size"], a["patch_size"]
    if h % ph or w % pw:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {ph}x{pw}")
    return [((h // ph) * (w // pw), a["out_features"])], {}


def _patch_embed_linear(op, ins):
    a = op["attrs"]
    (h, w), (ph, pw) = a["img_size"], a["patch_size"]
    return [Linear(op["weights"][LAYER], a["out_features"], a["in_chans"] * ph * pw, (h // ph) * (w // pw), None)]


def _prefix_tokens(op, ins):
    T, D = _tokens(ins[0])
    a, w = op["attrs"], op["weights"]
    roles = [r for r, on in (("cls", a["cls"]), ("dist", a["dist"]), ("reg", a["reg"] > 0)) if on]
    if set(w) != set(roles):
        raise ValueError(f"weights must be exactly {sorted(roles)} (the tokens attrs switch on), got {sorted(w)}")
    shapes = {"cls": (1, 1, D), "dist": (1, 1, D), "reg": (1, a["reg"], D)}
    return [(T + int(a["cls"]) + int(a["dist"]) + a["reg"], D)], {r: shapes[r] for r in roles}


def _pos_embed(op, ins):
    T, D = _tokens(ins[0])
    return [(T, D)], {"pos": (1, T, D)}


def _layernorm(op, ins):
    D = _vector_or_tokens(ins[0])
    return [ins[0]], {"weight": (D,), "bias": (D,)}


def _linear_infer(op, ins):
    a = op["attrs"]
    if _vector_or_tokens(ins[0]) != a["in_features"]:
        raise ValueError(f"input has {ins[0][-1]} features, in_features is {a['in_features']}")
    return [(*ins[0][:-1], a["out_features"])], {}


def _linear_linear(op, ins):
    a = op["attrs"]
    rows = ins[0][0] if len(ins[0]) == 2 else 1
    return [Linear(op["weights"][LAYER], a["out_features"], a["in_features"], rows, a["bias"])]


def _attention(op, ins):
    T, D3 = _tokens(ins[0])
    H = op["attrs"]["heads"]
    if D3 % (3 * H):
        raise ValueError(f"input width {D3} is not 3 x heads ({H}) x head width")
    return [(T, D3 // 3)], {"bias": (H, T, T)} if "bias" in op["weights"] else {}


def _attention_pool(op, ins):
    T, D2 = _tokens(ins[0], "kv")
    H = op["attrs"]["heads"]
    if D2 % (2 * H):
        raise ValueError(f"input width {D2} is not 2 x heads ({H}) x head width")
    if op["attrs"]["start"] >= T:
        raise ValueError(f"start {op['attrs']['start']} is outside the {T} tokens")
    return [(D2 // 2,)], {"query": (D2 // 2,)}


def _same(op, ins):
    _vector_or_tokens(ins[0])
    return [ins[0]], {}


def _rope(op, ins):
    T, D3 = _tokens(ins[0])
    a = op["attrs"]
    H, prefix = a["heads"], a["prefix"]
    if D3 % (3 * H) or (D3 // (3 * H)) % 2:
        raise ValueError(f"input width {D3} is not 3 x heads ({H}) x an even head width")
    if prefix >= T:
        raise ValueError(f"prefix {prefix} leaves none of the {T} tokens to rotate")
    table = (T - prefix, D3 // (3 * H))
    if a["per_head"]:
        table = (H, *table)
    return [(T, D3)], {"sin": table, "cos": table}


def _swiglu(op, ins):
    W = _vector_or_tokens(ins[0])
    if W % 2:
        raise ValueError(f"a packed SwiGLU input needs an even width (gate, then input), got {W}")
    return [(*ins[0][:-1], W // 2)], {}


def _layer_scale(op, ins):
    return [ins[0]], {"gamma": (_vector_or_tokens(ins[0]),)}


def _binary(op, ins):
    _vector_or_tokens(ins[0])
    if ins[0] != ins[1]:
        raise ValueError(f"inputs differ in shape: {list(ins[0])} and {list(ins[1])}")
    return [ins[0]], {}


def _check_start(op, T):
    a = op["attrs"]
    if a["start"] >= T:
        raise ValueError(f"start {a['start']} is outside the {T} tokens")
    if a["mode"] == "avg" and T - a["start"] < 1:
        raise ValueError("avg pooling over no tokens")


def _pool(op, ins):
    T, D = _tokens(ins[0])
    _check_start(op, T)
    return [(D,)], {}


def _exit(op, ins):
    T, D = _tokens(ins[0])
    _check_start(op, T)
    return [(op["attrs"]["out_features"],), (D,)], {"norm.weight": (D,), "norm.bias": (D,)}


def _exit_linear(op, ins):
    return [Linear(op["weights"][LAYER], op["attrs"]["out_features"], ins[0][1], 1, None)]


def _output(op, ins):
    logits, features, tokens = ins
    if len(logits) != 1 or len(features) != 1:
        raise ValueError("logits and features must be vectors")
    if _tokens(tokens, "tokens")[1] != features[0]:
        raise ValueError(f"features ({features[0]}) and tokens ({tokens[1]}) differ in width")
    return [], {}


OP_KINDS: Dict[str, OpKind] = {
    # patchify in (c, i, j) order, then the linear layer "layer": [P, out_features]
    "patch_embed": OpKind(1, 1, {"img_size": "pair", "patch_size": "pair", "in_chans": "pos", "out_features": "pos"},
                          (LAYER,), _patch_embed, linear=_patch_embed_linear, in_block=False),
    # prepend [cls, dist, reg...] tokens
    "prefix_tokens": OpKind(1, 1, {"cls": "bool", "dist": "bool", "reg": "nonneg"}, (), _prefix_tokens,
                            optional_weights=("cls", "dist", "reg"), in_block=False),
    # x + pos[0] (as many rows as x)
    "pos_embed": OpKind(1, 1, {}, ("pos",), _pos_embed, in_block=False),
    "layernorm": OpKind(1, 1, {"eps": "eps"}, ("weight", "bias"), _layernorm),
    # x W^T + b; bias True/False fixed by the program, null: the file may carry one
    "linear": OpKind(1, 1, {"in_features": "pos", "out_features": "pos", "bias": "optbool"}, (LAYER,),
                     _linear_infer, linear=_linear_linear),
    # timm's multi-head self-attention core on fused qkv [T, 3D] ([T, 3, heads, dh] order);
    # "bias" [heads, T, T] (relative position bias) is added to the scaled scores
    "attention": OpKind(1, 1, {"heads": "pos"}, (), _attention, optional_weights=("bias",), in_block=True),
    # RoPE on fused qkv [T, 3D]: q and k of tokens prefix..T-1 rotated in place (timm's
    # apply_rot_embed_cat; half: rope_rotate_half, else interleaved pairs), v and the prefix
    # tokens untouched; sin/cos [T - prefix, dh] shared by the heads, or per_head
    # [heads, T - prefix, dh] (timm's 'mixed' RoPE), fixed for the model's image size
    "rope": OpKind(1, 1, {"heads": "pos", "prefix": "nonneg", "half": "bool", "per_head": "bool"}, ("sin", "cos"),
                   _rope, in_block=True),
    # [.., 2F] -> [.., F]: silu(first half) * second half, the output of one fc1 holding the
    # gate's rows first (timm SwiGLUPacked; timm SwiGLU's fc1_g and fc1_x stacked)
    "swiglu": OpKind(1, 1, {}, (), _swiglu),
    # SigLIP's attention pooling (timm's AttentionPoolLatent, one latent): the fixed query
    # "query" [D] (the latent through its q projection, heads side by side) attends over rows
    # start..T-1 of kv [T, 2D] ([T, 2, heads, dh] order; start skips the prefix tokens) -> [D]
    "attention_pool": OpKind(1, 1, {"heads": "pos", "start": "nonneg"}, ("query",), _attention_pool, in_block=False),
    "gelu": OpKind(1, 1, {}, (), _same),           # exact erf GELU
    "quick_gelu": OpKind(1, 1, {}, (), _same),     # CLIP's x * sigmoid(1.702 x)
    "layer_scale": OpKind(1, 1, {}, ("gamma",), _layer_scale),
    "add": OpKind(2, 1, {}, (), _binary),
    "average": OpKind(2, 1, {}, (), _binary),      # (a + b) / 2
    # token: row `start`; avg: mean of rows start..T-1
    "pool": OpKind(1, 1, {"mode": "pool", "start": "nonneg"}, (), _pool),
    # an exit head after block `block`: pool, LayerNorm, linear -> (logits, features); the
    # image leaves here when graph.exits' rule for the block says so
    "exit": OpKind(1, 2, {"mode": "pool", "start": "nonneg", "eps": "eps", "out_features": "pos"},
                   ("norm.weight", "norm.bias", LAYER), _exit, linear=_exit_linear, in_block=True),
    # the program's results: logits [n], features [D], tokens [T, D]
    "output": OpKind(3, 0, {}, (), _output, in_block=False),
}


# --- checking -----------------------------------------------------------------------------------

def _where(i: int, op: Any) -> str:
    if isinstance(op, Mapping):
        return f"op #{i} {str(op.get('name'))[:80]!r} ({str(op.get('op'))[:40]})"
    return f"op #{i}"


def _check_fields(i: int, op: Any) -> OpKind:
    if not isinstance(op, Mapping) or set(op) != set(OP_KEYS):
        got = sorted(map(str, op)) if isinstance(op, Mapping) else type(op).__name__
        raise FormatError(f"{_where(i, op)}: an op must be an object with exactly the keys {list(OP_KEYS)}, got {got}")
    where = _where(i, op)
    kind = OP_KINDS.get(op["op"]) if isinstance(op["op"], str) else None
    if kind is None:
        raise FormatError(f"{where}: unknown op kind {str(op['op'])[:40]!r} (known: {sorted(OP_KINDS)})")
    if not isinstance(op["name"], str) or not op["name"]:
        raise FormatError(f"{where}: name must be a non-empty string")
    for key, n in (("in", kind.n_in), ("out", kind.n_out)):
        v = op[key]
        if not (isinstance(v, list) and len(v) == n and all(isinstance(t, str) and t for t in v)):
            raise FormatError(f"{where}: '{key}' must be a list of {n} tensor names")
    attrs = op["attrs"]
    if not isinstance(attrs, Mapping) or set(attrs) != set(kind.attrs):
        got = sorted(map(str, attrs)) if isinstance(attrs, Mapping) else type(attrs).__name__
        raise FormatError(f"{where}: attrs must be exactly {sorted(kind.attrs)}, got {got}")
    for key, t in kind.attrs.items():
        desc, ok = _ATTR_TYPES[t]
        if not ok(attrs[key]):
            raise FormatError(f"{where}: attrs.{key} must be {desc}, got {attrs[key]!r:.60}")
    w = op["weights"]
    roles_ok = isinstance(w, Mapping) and set(kind.weights) <= set(w) <= set(kind.weights + kind.optional_weights)
    if not roles_ok or not all(isinstance(v, str) and v for v in w.values()):
        got = sorted(map(str, w)) if isinstance(w, Mapping) else type(w).__name__
        raise FormatError(f"{where}: weights must map the roles {list(kind.weights)} (optionally "
                          f"{list(kind.optional_weights)}) to names, got {got}")
    if LAYER in w and any(c in w[LAYER] for c in ":*?["):
        raise FormatError(f"{where}: layer name {w[LAYER]!r} must not contain ':', '*', '?' or '['")
    b = op["block"]
    if b is not None and not _is_int(b) or _is_int(b) and b < 0:
        raise FormatError(f"{where}: block must be null or a non-negative int, got {b!r:.40}")
    if kind.in_block is True and b is None or kind.in_block is False and b is not None:
        raise FormatError(f"{where}: {op['op']} ops {'must' if kind.in_block else 'must not'} belong to a block")
    return kind


def _check_blocks(ops: Sequence[Mapping]) -> None:
    """Blocks run 0, 1, 2, ... in order, each contiguous, between the embedding and the head;
    an exit op closes its block (nothing of the block after it)."""
    seen: List[int] = []
    after_blocks = exited = False
    for i, op in enumerate(ops):
        b = op["block"]
        if b is None:
            after_blocks = after_blocks or bool(seen)
            continue
        if after_blocks:
            raise FormatError(f"{_where(i, op)}: block {b} after the head's ops started")
        if not seen or b != seen[-1]:
            if b != len(seen):
                raise FormatError(f"{_where(i, op)}: block {b} out of order (expected block {len(seen)})")
            seen.append(b)
            exited = False
        elif exited:
            raise FormatError(f"{_where(i, op)}: op of block {b} after its exit")
        if op["op"] == "exit":
            exited = True
    if not seen:
        raise FormatError("the program has no transformer block (no op with a block index)")


def infer_shapes(ops: Sequence[Mapping], check: bool = True) -> Dict[str, Shape]:
    """{tensor: shape} of every activation tensor (``check``: the structural checks first)."""
    if check:
        check_ops(ops)
    return _infer(ops)


def _infer(ops: Sequence[Mapping]) -> Dict[str, Shape]:
    first = ops[0]["attrs"]
    shapes: Dict[str, Shape] = {IMAGE: (IMAGE, first["in_chans"], *first["img_size"])}
    for i, op in enumerate(ops):
        where = _where(i, op)
        missing = [t for t in op["in"] if t not in shapes]
        if missing:
            raise FormatError(f"{where}: input tensor {missing[0]!r} is produced by no earlier op")
        try:
            outs, _ = OP_KINDS[op["op"]].infer(op, [shapes[t] for t in op["in"]])
        except ValueError as e:
            raise FormatError(f"{where}: {e}") from None
        for t, s in zip(op["out"], outs):
            if t in shapes:
                raise FormatError(f"{where}: output tensor {t!r} is already defined (each tensor is written once)")
            shapes[t] = s
    return shapes


def check_ops(ops: Any, max_ops: Optional[int] = None) -> None:
    """Raise FormatError unless ``ops`` is a well-formed program: known kinds with their
    attributes and weight roles, every input produced by an earlier op, shapes that agree,
    blocks in order, one ``patch_embed`` first and one ``output`` last, unique op names and
    layer names."""
    if not isinstance(ops, list) or not ops:
        raise FormatError("graph.ops must be a non-empty list of ops")
    if max_ops is not None and len(ops) > max_ops:
        raise FormatError(f"graph.ops has {len(ops)} ops, more than the {max_ops} the runtime's limits allow")
    for i, op in enumerate(ops):
        _check_fields(i, op)
    if ops[0]["op"] != "patch_embed" or ops[0]["in"] != [IMAGE]:
        raise FormatError(f"{_where(0, ops[0])}: the program must start with patch_embed of {IMAGE!r}")
    outputs = [i for i, op in enumerate(ops) if op["op"] == "output"]
    if outputs != [len(ops) - 1]:
        raise FormatError("the program must end with exactly one output op")
    for what, key in (("op name", lambda op: [op["name"]]),
                      ("layer", lambda op: [op["weights"][LAYER]] if LAYER in op["weights"] else [])):
        seen: set = set()
        for i, op in enumerate(ops):
            for v in key(op):
                if v in seen:
                    raise FormatError(f"{_where(i, op)}: {what} {v!r} is used twice")
                seen.add(v)
    _check_blocks(ops)
    _infer(ops)


# --- derived facts -------------------------------------------------------------------------------

def ops_of(graph: Mapping) -> List[Mapping]:
    """The program of a graph: its ``ops``, or for a graph without them (format 2/3, or one
    built in memory from ``arch`` and ``exits``) their lowering. ``graph.exits`` says where
    the exit heads are: a graph whose exits were edited (calibrators re-time a copy without
    them) gets its exit ops moved to match (:func:`with_exits`)."""
    ops = graph.get("ops")
    if ops is None:
        return lower(graph)
    return with_exits(ops, [e["block"] for e in graph.get("exits", []) if isinstance(e, Mapping)])


def with_exits(ops: List[Mapping], blocks: Sequence[int]) -> List[Mapping]:
    """``ops`` with exit ops after exactly ``blocks`` (a well-formed program; unchanged when
    they already are). A new exit pools like the program's own ``pool`` and normalises with
    the eps of its last LayerNorm, as the lowering does."""
    have = [op["block"] for op in ops if op["op"] == "exit"]
    if have == list(blocks):
        return ops
    ends = block_ends(ops)
    template = next((op for op in ops if op["op"] == "exit"), None)
    if template is None:
        pool = next(op for op in ops if op["op"] == "pool")
        eps = [op for op in ops if op["op"] == "layernorm"][-1]["attrs"]["eps"]
        n = _infer(ops)[ops[-1]["in"][0]][0]
        attrs = {**pool["attrs"], "eps": eps, "out_features": n}
    else:
        attrs = dict(template["attrs"])
    out: List[Mapping] = []
    wanted = set(blocks)
    for i, op in enumerate(ops):
        if op["op"] == "exit":
            continue
        out.append(op)
        b = op["block"]
        if b in wanted and ends.get(b) == i:
            out.append(_op("exit", f"exits.{b}", [op["out"][0]], dict(attrs),
                           {"norm.weight": f"exits.{b}.norm.weight", "norm.bias": f"exits.{b}.norm.bias",
                            LAYER: f"exits.{b}.fc"}, b, outs=[f"exits.{b}.logits", f"exits.{b}.features"]))
    return out


def linears(ops: Sequence[Mapping]) -> List[Linear]:
    """Every linear layer, in execution order (the program must have been checked)."""
    shapes = _infer(ops)
    out: List[Linear] = []
    for op in ops:
        kind = OP_KINDS[op["op"]]
        if kind.linear is not None:
            out += kind.linear(op, [shapes[t] for t in op["in"]])
    return out


def layer_names(ops: Sequence[Mapping]) -> List[str]:
    return [lin.layer for lin in linears(ops)]


def weight_shapes(ops: Sequence[Mapping]) -> Dict[str, Shape]:
    """{tensor: shape} of every weight tensor the ops name (linear layers excluded), listed
    as format 3 listed them: tensors outside blocks (prefix tokens first), then each
    block's (LayerNorms before the rest), then the exit heads' -- so that anything seeded
    by this order (the tests' random tensors) stays the same."""
    shapes = _infer(ops)
    entries = []
    for i, op in enumerate(ops):
        _, w = OP_KINDS[op["op"]].infer(op, [shapes[t] for t in op["in"]])
        b = op["block"]
        segment = 0 if b is None else 2 if op["op"] == "exit" else 1
        rank = op["op"] != ("layernorm" if segment else "prefix_tokens")
        key = (segment, -1 if b is None else b, rank, i)
        entries += [(key, op["weights"][role], shape) for role, shape in w.items()]
    return {name: shape for _, name, shape in sorted(entries, key=lambda e: e[0])}


def num_tokens(ops: Sequence[Mapping]) -> int:
    """Tokens per image: rows of the program's ``tokens`` output."""
    return _infer(ops)[ops[-1]["in"][2]][0]


def depth(ops: Sequence[Mapping]) -> int:
    return 1 + max(op["block"] for op in ops if op["block"] is not None)


def op_macs(ops: Sequence[Mapping]) -> List[Tuple[Mapping, Dict[str, int]]]:
    """[(op, {what: MACs of one image})]: a linear-bearing op counts each of its layers by
    layer name; ``attention`` counts its two matmuls, ``<name>.qk`` (q.k^T) and ``<name>.av``
    (attn.v), T x T x D each (``attention_pool``: one query row, (T - start) x D each). Every other kind
    is free (LayerNorm, GELU, SwiGLU's gate, RoPE, adds, softmax)."""
    shapes = _infer(ops)
    out = []
    for op in ops:
        ins = [shapes[t] for t in op["in"]]
        kind = OP_KINDS[op["op"]]
        m: Dict[str, int] = {}
        if kind.linear is not None:
            m = {lin.layer: lin.rows * lin.N * lin.K for lin in kind.linear(op, ins)}
        elif op["op"] == "attention":
            T, D = ins[0][0], ins[0][1] // 3
            m = {f"{op['name']}.qk": T * T * D, f"{op['name']}.av": T * T * D}
        elif op["op"] == "attention_pool":  # one query row against T - start keys
            T, D = ins[0][0] - op["attrs"]["start"], ins[0][1] // 2
            m = {f"{op['name']}.qk": T * D, f"{op['name']}.av": T * D}
        out.append((op, m))
    return out


def block_ends(ops: Sequence[Mapping]) -> Dict[int, int]:
    """{block: index of its last op that is not an exit}: where the block's output is ready."""
    return {op["block"]: i for i, op in enumerate(ops) if op["block"] is not None and op["op"] != "exit"}


def tokens_chain(ops: Sequence[Mapping]) -> List[Mapping]:
    """The ops after the last block that turn its output into the ``tokens`` output (the
    final LayerNorm): what an image that leaves at an exit still gets applied to its tokens."""
    last = max(block_ends(ops).values())
    chain: List[Mapping] = []
    t = ops[-1]["in"][2]
    producers = {o: op for op in ops[last + 1:] for o in op["out"]}
    while t in producers:
        op = producers[t]
        if len(op["in"]) != 1:
            raise FormatError(f"op {op['name']!r}: the tokens output must come from the last block through "
                              f"single-input ops")
        chain.insert(0, op)
        t = op["in"][0]
    if t != ops[last]["out"][0]:
        raise FormatError("the tokens output does not come from the last block's output")
    return chain


# --- lowering of a format-2/3 graph ------------------------------------------------------------

def _op(kind: str, name: str, ins: List[str], attrs: Optional[dict] = None, weights: Optional[dict] = None,
        block: Optional[int] = None, outs: Optional[List[str]] = None) -> dict:
    return {"op": kind, "name": name, "in": ins, "out": [name] if outs is None else outs, "attrs": attrs or {},
            "weights": weights or {}, "block": block}


def _norm(name: str, x: str, eps: float, block: Optional[int] = None) -> dict:
    return _op("layernorm", name, [x], {"eps": eps}, {"weight": f"{name}.weight", "bias": f"{name}.bias"}, block)


def _lin(name: str, x: str, K: int, N: int, bias: Optional[bool], block: Optional[int] = None) -> dict:
    return _op("linear", name, [x], {"in_features": K, "out_features": N, "bias": bias}, {LAYER: name}, block)


def _attn_branch(p: str, norm: str, x: str, a: Mapping, i: int, ls: str) -> List[dict]:
    """ls(proj(attention(qkv(norm x)))) under the layer names ``<p>.qkv`` / ``<p>.proj``, the
    LayerNorm ``norm`` and the layer scale ``ls`` (when the arch has layer scale)."""
    D = a["embed_dim"]
    ops = [_norm(norm, x, a["eps"], i), _lin(f"{p}.qkv", norm, D, 3 * D, a["qkv_bias"], i),
           _op("attention", p, [f"{p}.qkv"], {"heads": a["num_heads"]}, block=i), _lin(f"{p}.proj", p, D, D, None, i)]
    if a["layer_scale"]:
        ops.append(_op("layer_scale", ls, [f"{p}.proj"], weights={"gamma": f"{ls}.gamma"}, block=i))
    return ops


def _mlp_branch(p: str, norm: str, x: str, a: Mapping, i: int, ls: str, act: str) -> List[dict]:
    """ls(fc2(act(fc1(norm x)))) under the layer names ``<p>.fc1`` / ``<p>.fc2``."""
    D, F = a["embed_dim"], a["mlp_hidden"]
    ops = [_norm(norm, x, a["eps"], i), _lin(f"{p}.fc1", norm, D, F, None, i), _op(act, f"{p}.{act}", [f"{p}.fc1"], block=i),
           _lin(f"{p}.fc2", f"{p}.{act}", F, D, None, i)]
    if a["layer_scale"]:
        ops.append(_op("layer_scale", ls, [f"{p}.fc2"], weights={"gamma": f"{ls}.gamma"}, block=i))
    return ops


def _block(i: int, x: str, a: Mapping, act: str) -> List[dict]:
    """timm's pre-norm Block: x + ls1(proj(attn(qkv(norm1 x)))), then the same with the MLP
    (fc1, the activation op ``act``, fc2)."""
    p = f"blocks.{i}"
    ops = _attn_branch(f"{p}.attn", f"{p}.norm1", x, a, i, f"{p}.ls1")
    ops.append(_op("add", f"{p}.residual1", [x, ops[-1]["out"][0]], block=i))
    ops += _mlp_branch(f"{p}.mlp", f"{p}.norm2", f"{p}.residual1", a, i, f"{p}.ls2", act)
    ops.append(_op("add", f"{p}.residual2", [f"{p}.residual1", ops[-1]["out"][0]], block=i))
    return ops


def parallel_block(i: int, x: str, a: Mapping, act: str, branches: int) -> List[dict]:
    """timm's ParallelThingsBlock with ``branches`` branches: x + the sum of the attention
    branches (each norm, attention, layer scale), then the same with the MLP branches. Layer
    and tensor names are timm's (``blocks.<i>.attns.<j>.attn.qkv``, ``blocks.<i>.attns.<j>.norm``,
    ``blocks.<i>.ffns.<j>.mlp.fc1``, ``blocks.<i>.ffns.<j>.ls``, ...); the block's output is
    ``blocks.<i>.residual2``, as the plain block's."""
    p = f"blocks.{i}"
    ops: List[dict] = []
    for stage, residual in (("attns", "residual1"), ("ffns", "residual2")):
        outs = []
        for j in range(branches):
            q = f"{p}.{stage}.{j}"
            ops += (_attn_branch(f"{q}.attn", f"{q}.norm", x, a, i, f"{q}.ls") if stage == "attns" else
                    _mlp_branch(f"{q}.mlp", f"{q}.norm", x, a, i, f"{q}.ls", act))
            outs.append(ops[-1]["out"][0])
        total = outs[0]
        for j in range(1, branches):  # timm: torch.stack(branches).sum(0), in branch order
            ops.append(_op("add", f"{p}.{stage}.sum{j}", [total, outs[j]], block=i))
            total = ops[-1]["out"][0]
        ops.append(_op("add", f"{p}.{residual}", [x, total], block=i))
        x = f"{p}.{residual}"
    return ops


def executor_ops(graph: Mapping) -> List[Mapping]:
    """The program the C++ executor parses (csrc/bindings/executor_bindings.cc): a graph
    handed straight to it has not been through modelfile's checks, so the sizes the lowering
    loops over are checked before it runs, with the executor's own messages."""
    if graph.get("ops") is None:
        _check_sizes(graph["arch"])
    return ops_of(graph)


def _check_sizes(a: Mapping) -> None:
    from ._core import limits

    lim = dict(limits())
    bounds = {"depth": lim["max_depth"], "embed_dim": lim["max_dim"], "mlp_hidden": lim["max_dim"],
              "num_classes": lim["max_dim"], "in_chans": lim["max_dim"], "num_heads": lim["max_dim"],
              "reg_tokens": lim["max_tokens"]}
    sides = {"image height": ("img_size", 0), "image width": ("img_size", 1)}
    for what, (key, i) in sides.items():
        v = a[key][i] if isinstance(a.get(key), (list, tuple)) and len(a[key]) == 2 else None
        if not _is_int(v) or not 0 < v <= lim["max_image_side"]:
            raise FormatError(f"arch: {what} must be in 1..{lim['max_image_side']}, got {v!r:.40}")
    for key, most in bounds.items():
        v = a.get(key)
        least = 0 if key in ("reg_tokens", "num_classes") else 1  # num_classes 0: a feature extractor
        if not _is_int(v) or not least <= v <= most:
            raise FormatError(f"arch: {key} must be in {least}..{most}, got {v!r:.40}")


MLP_ACTS = ("gelu", "quick_gelu")  # the op kinds a ViT block's MLP may use between fc1 and fc2


def check_lowerable(arch: Mapping) -> None:
    """FormatError unless :func:`lower` can build the program of ``arch`` (attention pooling
    has hyper-parameters arch does not hold: only a file's own ops describe it)."""
    if arch["global_pool"] == "map":
        raise FormatError("arch.global_pool 'map' (attention pooling) has no lowering from arch: the file must "
                          "carry its program (graph.ops)")


def lower(graph: Mapping, act: str = "gelu",
          pool_ops: Optional[Callable[[str], List[dict]]] = None) -> List[dict]:
    """The program of a timm VisionTransformer described by ``graph.arch`` with exit heads
    after ``graph.exits``' blocks and ``act`` (one of :data:`MLP_ACTS`) in its MLPs: the one
    mapping from those hyper-parameters to ops. A format-2/3 graph is a plain ViT (exact
    GELU); the converter picks ``act`` per family (CLIP's QuickGELU). ``num_classes`` 0 is a
    feature extractor (timm's ``num_classes=0``): no head, its logits are its features.
    ``pool_ops(x)``: the ops that compute tensor ``pool`` from the final tokens ``x``, for a
    pooling arch does not describe (``map``: the converter's attention-pooling head)."""
    if act not in MLP_ACTS:
        raise ValueError(f"MLP activation {act!r} is not one of {list(MLP_ACTS)}")
    a = graph["arch"]
    if pool_ops is None:
        check_lowerable(a)
    D, eps, n = a["embed_dim"], a["eps"], a["num_classes"]
    prefix = int(a["cls_token"]) + int(a["dist_token"]) + a["reg_tokens"]
    exits = {int(e["block"]) for e in graph.get("exits", [])}
    ops = [_op("patch_embed", "patch_embed", [IMAGE], {"img_size": list(a["img_size"]), "patch_size": list(a["patch_size"]),
                                                       "in_chans": a["in_chans"], "out_features": D}, {LAYER: "patch_embed"})]
    tokens = _op("prefix_tokens", "embed.prefix", [], {"cls": a["cls_token"], "dist": a["dist_token"], "reg": a["reg_tokens"]},
                 {r: k for r, k, on in (("cls", "cls_token", a["cls_token"]), ("dist", "dist_token", a["dist_token"]),
                                        ("reg", "reg_token", a["reg_tokens"] > 0)) if on})
    pos = _op("pos_embed", "embed.pos", [], weights={"pos": "pos_embed"})
    # no_embed_class: the position embedding covers the patches only, added before the prefix
    for op in (pos, tokens) if a["no_embed_class"] else (tokens, pos):
        op["in"] = [ops[-1]["out"][0]]
        ops.append(op)
    if a["norm_pre"]:
        ops.append(_norm("norm_pre", ops[-1]["out"][0], eps))
    pool = {"mode": a["global_pool"], "start": 0 if a["global_pool"] == "token" else prefix}
    if exits and a["global_pool"] not in ("token", "avg"):
        raise ValueError(f"exit heads pool as the model does, 'token' or 'avg'; this model pools {a['global_pool']!r}")
    x = ops[-1]["out"][0]
    for i in range(a["depth"]):
        ops += _block(i, x, a, act)
        x = ops[-1]["out"][0]
        if i in exits:
            ops.append(_op("exit", f"exits.{i}", [x], {**pool, "eps": eps, "out_features": n},
                           {"norm.weight": f"exits.{i}.norm.weight", "norm.bias": f"exits.{i}.norm.bias",
                            LAYER: f"exits.{i}.fc"}, i, outs=[f"exits.{i}.logits", f"exits.{i}.features"]))
    if a["final_norm"]:
        ops.append(_norm("norm", x, eps))
        x = "norm"
    tokens_out = x
    ops += [_op("pool", "pool", [x], pool)] if pool_ops is None else pool_ops(x)
    features = "pool"
    if a["fc_norm"]:
        ops.append(_norm("fc_norm", "pool", eps))
        features = "fc_norm"
    logits = None
    if n:
        ops.append(_lin("head", features, D, n, None))
        logits = "head"
    if a["dist_token"]:
        ops.append(_op("pool", "pool_dist", [x], {"mode": "token", "start": 1}))
        if n:
            ops += [_lin("head_dist", "pool_dist", D, n, None), _op("average", "logits", ["head", "head_dist"])]
            logits = "logits"
        ops.append(_op("average", "features", [features, "pool_dist"]))
        features = "features"
    logits = logits or features
    ops.append(_op("output", "output", [logits, features, tokens_out], outs=[]))
    return ops
