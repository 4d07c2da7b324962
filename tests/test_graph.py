"""The typed op list (pyruntime.graph): the lowering of format-3 graphs, the checker's errors,
format 4 files against format 3 files of the same model, and the numpy oracle interpreting
the op list against the C++ executor."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest

import pyruntime
from pyruntime import _numpy_ref, bops, graph as opgraph, modelfile
from pyruntime.errors import FormatError
from pyruntime.modelfile import graph_layer_names, read_header, read_model, with_ops, write_model

from _graphs import W4A8, W8A8, random_tensors, tiny_graph

VARIANTS = {
    "cls": {},
    "avg_fc_norm": {"global_pool": "avg", "fc_norm": True, "final_norm": False},
    "registers_layer_scale": {"reg_tokens": 2, "layer_scale": True, "norm_pre": True},
    "distilled": {"dist_token": True},
    "no_embed_class": {"no_embed_class": True, "qkv_bias": False},
}


def _graph(name: str, **kw) -> dict:
    return tiny_graph(exits=[{"block": 0, "rule": "confidence", "threshold": 0.6}],
                      layers={"blocks.0.attn.qkv": W8A8, "blocks.1.mlp.fc1": W4A8}, **VARIANTS[name], **kw)


def _images(graph, n=6, seed=0):
    a = graph["arch"]
    return np.random.default_rng(seed).standard_normal((n, a["in_chans"], *a["img_size"])).astype(np.float32)


# --- the lowering and the facts derived from it -------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lowering_is_a_valid_program_with_format_3_layers(variant):
    g = _graph(variant)
    ops = opgraph.lower(g)
    opgraph.check_ops(ops)
    a = g["arch"]
    expect = ["patch_embed"]
    for i in range(a["depth"]):
        expect += [f"blocks.{i}.{k}" for k in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
        expect += ["exits.0.fc"] if i == 0 else []
    expect += ["head", "head_dist"] if a["dist_token"] else ["head"]
    assert graph_layer_names(g) == expect
    assert opgraph.num_tokens(ops) == modelfile.num_tokens(a)
    assert opgraph.depth(ops) == a["depth"]
    kinds = {op["op"] for op in ops}
    assert ("layer_scale" in kinds) == a["layer_scale"] and ("average" in kinds) == a["dist_token"]
    # no_embed_class: the position embedding is added to the patches before the prefix tokens
    order = [op["op"] for op in ops[:3]]
    assert order == (["patch_embed", "pos_embed", "prefix_tokens"] if a["no_embed_class"]
                     else ["patch_embed", "prefix_tokens", "pos_embed"])


def test_macs_per_op_are_the_bops_modules_macs():
    g = _graph("registers_layer_scale")
    per_op = {k: v for _, m in opgraph.op_macs(opgraph.lower(g)) for k, v in m.items()}
    assert per_op == bops.layer_macs(g)
    T, D = modelfile.num_tokens(g["arch"]), g["arch"]["embed_dim"]
    assert per_op["blocks.1.attn.qk"] == T * T * D and per_op["blocks.1.mlp.fc1"] == T * 16 * D


# --- the checker ---------------------------------------------------------------------------------

def _ops():
    return opgraph.lower(tiny_graph())


def _index(ops, name):
    return next(i for i, op in enumerate(ops) if op["name"] == name)


def _broken(edit):
    ops = _ops()
    edit(ops)
    return ops


@pytest.mark.parametrize("edit, message", [
    (lambda ops: ops[_index(ops, "blocks.0.mlp.gelu")].update(op="swish"),
     r"op #\d+ 'blocks.0.mlp.gelu' \(swish\): unknown op kind 'swish'"),
    (lambda ops: ops[_index(ops, "blocks.1.norm2")].update({"in": ["blocks.1.nowhere"]}),
     r"'blocks.1.norm2' \(layernorm\): input tensor 'blocks.1.nowhere' is produced by no earlier op"),
    (lambda ops: ops[_index(ops, "blocks.0.attn")]["attrs"].update(heads=0),
     r"'blocks.0.attn' \(attention\): attrs.heads must be a positive int, got 0"),
    (lambda ops: ops[_index(ops, "blocks.0.attn")]["attrs"].update(heads=5),
     r"'blocks.0.attn' \(attention\): input width 24 is not 3 x heads \(5\)"),
    (lambda ops: ops[_index(ops, "norm")]["attrs"].update(eps=2.0), r"'norm' \(layernorm\): attrs.eps must be"),
    (lambda ops: ops[_index(ops, "norm")]["attrs"].update(momentum=0.1), r"'norm' \(layernorm\): attrs must be exactly"),
    (lambda ops: ops[_index(ops, "norm")].pop("block"), r"'norm' \(layernorm\): an op must be an object with exactly"),
    (lambda ops: ops[_index(ops, "norm")]["weights"].pop("bias"), r"'norm' \(layernorm\): weights must map the roles"),
    (lambda ops: ops[_index(ops, "head")]["attrs"].update(in_features=9), r"'head' \(linear\): input has 8 features"),
    (lambda ops: ops[_index(ops, "blocks.1.mlp.gelu")].update(out=["blocks.1.norm1"]),
     r"'blocks.1.mlp.gelu' \(gelu\): output tensor 'blocks.1.norm1' is already defined"),
    (lambda ops: ops[_index(ops, "blocks.1.norm1")].update(block=3), r"block 3 out of order \(expected block 1\)"),
    (lambda ops: ops[_index(ops, "blocks.0.attn")].update(block=None), r"attention ops must belong to a block"),
    (lambda ops: ops[_index(ops, "head")]["weights"].update(layer="blocks.0.attn.qkv"),
     r"'head' \(linear\): layer 'blocks.0.attn.qkv' is used twice"),
    (lambda ops: ops[_index(ops, "head")]["weights"].update(layer="head:lo"), r"must not contain ':'"),
    (lambda ops: ops.pop(), r"must end with exactly one output op"),
    (lambda ops: ops.pop(0), r"must start with patch_embed"),
    (lambda ops: ops[_index(ops, "pool")]["attrs"].update(start=99), r"'pool' \(pool\): start 99 is outside the 5 tokens"),
])
def test_checker_names_the_op_and_the_problem(edit, message):
    with pytest.raises(FormatError, match=message):
        opgraph.check_ops(_broken(edit))


def test_checker_refuses_non_lists_and_too_many_ops():
    for bad in (None, {}, [], "ops"):
        with pytest.raises(FormatError, match="graph.ops must be a non-empty list"):
            opgraph.check_ops(bad)
    with pytest.raises(FormatError, match="more than the 10"):
        opgraph.check_ops(_ops(), max_ops=10)
    with pytest.raises(FormatError, match="op #0: an op must be an object"):
        opgraph.check_ops([1, 2])


# --- format 4 files ----------------------------------------------------------------------------

def _write_v3(path, graph, tensors):
    """The file format 3 wrote: no op list (the writer without validation seals it as 3)."""
    assert "ops" not in graph
    modelfile._save(path, graph, tensors, "{}", {"source": "test"})
    return path


def _seal_graph(path, graph, version="4"):
    """Replace a file's graph (and version), re-sealed, to reach the graph checks."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    meta = header["__metadata__"]
    meta["pyruntime.graph"] = json.dumps(graph)
    meta["pyruntime.format_version"] = version
    meta[modelfile.KEY_HEADER_SHA256] = modelfile.header_digest(meta, {k: v for k, v in header.items() if k != "__metadata__"})
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + n:])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_v3_file_loads_and_gives_the_v4_files_logits(tmp_path, variant):
    g = _graph(variant)
    t = random_tensors(g, seed=3)
    v3 = _write_v3(tmp_path / "v3.pyrt", g, t)
    v4 = tmp_path / "v4.pyrt"
    write_model(v4, g, t, "{}", {"source": "test"})
    h3, h4 = read_header(v3), read_header(v4)
    assert (h3.version, h4.version) == (3, 4)
    assert "ops" not in json.loads(_metadata(v3)["pyruntime.graph"])
    assert h3.graph == h4.graph == with_ops(g)  # the old file is lowered to the same program
    x = _images(g)
    r3, r4 = pyruntime.load(v3).run(x, tokens=True), pyruntime.load(v4).run(x, tokens=True)
    for field in ("logits", "exit_block", "bops", "features", "tokens"):
        np.testing.assert_array_equal(getattr(r3, field), getattr(r4, field))


def _metadata(path):
    raw = path.read_bytes()
    return json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])["__metadata__"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_oracle_interpreting_the_op_list_matches_the_executor(tmp_path, variant):
    g = _graph(variant)
    t = random_tensors(g, seed=5)
    path = tmp_path / "m.pyrt"
    write_model(path, g, t, "{}", {"source": "test"})
    graph, tensors, _, _ = read_model(path)
    x = _images(g, n=8, seed=1)
    ref = _numpy_ref.forward(graph, tensors, x, outputs=True)
    r = pyruntime.load(path).run(x, tokens=True)
    np.testing.assert_array_equal(r.exit_block, ref["exit_block"])
    np.testing.assert_array_equal(r.bops, ref["bops"])
    np.testing.assert_array_equal(r.bops, bops.per_image(graph, r.exit_block))
    for field in ("logits", "features", "tokens"):
        want = ref[field]
        assert np.abs(getattr(r, field) - want).max() <= 2e-3 * max(1.0, np.abs(want).max()), field


def test_every_op_kind_has_an_oracle_function():
    assert set(_numpy_ref._OPS) == set(opgraph.OP_KINDS)


@pytest.mark.parametrize("edit, message", [
    (lambda ops: ops[_index(ops, "blocks.0.mlp.gelu")].update(op="conv2d"), r"unknown op kind 'conv2d'"),
    (lambda ops: ops[_index(ops, "head")].update({"in": ["pooled"]}), r"input tensor 'pooled' is produced by no earlier op"),
])
def test_a_file_with_a_bad_op_list_is_refused(tmp_path, edit, message):
    g = tiny_graph()
    path = tmp_path / "m.pyrt"
    write_model(path, g, random_tensors(g), "{}", {"source": "test"})
    bad = with_ops(g)
    edit(bad["ops"])
    _seal_graph(path, bad)
    with pytest.raises(FormatError, match=rf"m.pyrt: op #\d+ .*{message}"):
        pyruntime.load(path)


def test_a_valid_program_other_than_the_arch_is_refused(tmp_path):
    """A well-formed op list the executor would not run as written (here: no final norm)."""
    g = tiny_graph()
    path = tmp_path / "m.pyrt"
    write_model(path, g, random_tensors(g), "{}", {"source": "test"})
    other = with_ops(g)
    other["ops"] = opgraph.lower(dict(g, arch=dict(g["arch"], final_norm=False)))
    _seal_graph(path, other)
    with pytest.raises(FormatError, match=r"graph.ops disagree with graph.arch and graph.exits at op #\d+"):
        read_header(path)


def test_versions_and_op_lists_must_agree(tmp_path):
    g = tiny_graph()
    path = tmp_path / "m.pyrt"
    write_model(path, g, random_tensors(g), "{}", {"source": "test"})
    _seal_graph(path, g, version="4")
    with pytest.raises(FormatError, match=r"graph.ops is missing \(format version 4 requires it\)"):
        read_header(path)
    _seal_graph(path, with_ops(g), version="3")
    with pytest.raises(FormatError, match=r"format version 3 cannot hold this graph \(graph.ops needs version 4\)"):
        read_header(path)


def test_writer_adds_the_op_list_without_touching_the_callers_graph(tmp_path):
    g = tiny_graph(exits=[{"block": 0, "rule": "margin", "threshold": 0.3}])
    before = copy.deepcopy(g)
    write_model(tmp_path / "m.pyrt", g, random_tensors(g), "{}", {})
    assert g == before
    assert read_header(tmp_path / "m.pyrt").graph["ops"] == opgraph.lower(g)


# --- the C++ executor runs the op list, not arch -----------------------------------------------

def test_executor_runs_the_programs_ops_not_the_arch():
    """Given a program that differs from its arch (no final norm, average pooling), the
    executor follows the ops: it answers as the model whose arch says so."""
    from pyruntime import _core

    plain = tiny_graph(exits=[{"block": 0, "rule": "confidence", "threshold": 0.6}], layer_scale=True)
    other = dict(plain, arch=dict(plain["arch"], final_norm=False, global_pool="avg"))
    t = random_tensors(plain, seed=2)
    t_other = {k: v for k, v in t.items() if not k.startswith("norm.")}
    x = _images(plain, n=5)
    by_arch = _core.Executor(other, t_other).run(x, tokens=True)
    by_ops = _core.Executor(dict(plain, ops=opgraph.lower(other)), t_other).run(x, tokens=True)
    for field in ("logits", "exit_block", "bops", "features", "tokens"):
        np.testing.assert_array_equal(by_ops[field], by_arch[field])
    assert not np.array_equal(by_ops["logits"], _core.Executor(plain, t).run(x)["logits"])


@pytest.mark.parametrize("edit, message", [
    (lambda ops: ops[_index(ops, "blocks.0.mlp.gelu")].update(op="swish"), r"op 'blocks.0.mlp.gelu': unknown op kind 'swish'"),
    (lambda ops: ops[_index(ops, "head")].update({"in": ["pooled"]}), r"op 'head': input tensor 'pooled' is produced by no earlier op"),
    (lambda ops: ops[_index(ops, "blocks.1.attn")]["attrs"].update(heads=5), r"op 'blocks.1.attn': input width is not 3 x heads"),
])
def test_executor_parses_the_op_list_with_clear_errors(edit, message):
    from pyruntime import _core

    g = tiny_graph()
    ops = opgraph.lower(g)
    edit(ops)
    with pytest.raises(ValueError, match=message):
        _core.Executor(dict(g, ops=ops), random_tensors(g))


def test_profile_names_are_the_latency_tables_ops():
    """Every op the executor times has a place in the latency table, and nothing else."""
    from pyruntime import latency

    g = tiny_graph(exits=[{"block": 0, "rule": "confidence", "threshold": 1.0}], layer_scale=True, dist_token=True)
    ex = pyruntime._core.Executor(g, random_tensors(g))
    ex.set_profiling(True)
    ex.run(_images(g, n=2))
    assert set(ex.profile()) == set(latency._op_owner(g))
