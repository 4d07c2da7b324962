"""The latency table: re-quantisation, profiling, who pays for what, JSON, cost model, CLI.

No assertion is about how fast anything is (timings are noisy); only about structure,
validation and exact bookkeeping. Torch is needed only by the tests marked ``torch``.
"""
import copy
import json
import math

import numpy as np
import pytest

from _graphs import W8A8, random_tensors, tiny_graph
from pyruntime import bops
from pyruntime.cli import main
from pyruntime.latency import LatencyTable, profile_latency, profiling_model, requantize, uniform_graph
from pyruntime.modelfile import graph_layer_names, write_model
from pyruntime.policy import ExitPolicy, LayerPolicy, Policy

EXIT = {"block": 0, "rule": "confidence", "threshold": 0.9}


def synthetic_table(arch, seed=0, w_bits=(32, 8, 4), attention_bits=(32, 8)):
    """A table with made-up, non-round seconds for every layer of ``arch``."""
    rng = np.random.default_rng(seed)
    names = graph_layer_names(uniform_graph(arch, 32, range(arch["depth"] - 1)))
    layers = {n: {b: float(rng.random() * 1e-4) for b in w_bits} for n in names}
    blocks = [float(v) for v in rng.random(arch["depth"]) * 1e-4]
    attention = {b: [float(v) for v in rng.random(arch["depth"]) * 1e-4] for b in attention_bits}
    return LatencyTable(arch, tuple(w_bits), layers, blocks, float(rng.random() * 1e-5), {"source": "synthetic"},
                        attention)


def write_file(path, graph, seed=0):
    write_model(path, graph, random_tensors(graph, seed), "{}", {"source": "test"})
    return path


@pytest.fixture(scope="module")
def profiled():
    """A tiny fp32 graph (exit after block 0 of 3) and its profiled table."""
    graph = tiny_graph(depth=3, exits=[EXIT])
    return graph, profile_latency((graph, random_tensors(graph)), runs=3, warmup=1)


# --- profiling -------------------------------------------------------------------------------------

def test_profile_covers_every_layer_and_precision(profiled):
    graph, table = profiled
    assert table.w_bits == (32, 8, 4)
    names = graph_layer_names(uniform_graph(graph["arch"], 32, [0, 1]))
    assert list(table.layers) == names  # exit heads after every block 0..depth-2
    for name in names:
        for b in (32, 8, 4):
            assert table.layer(name, b) > 0, (name, b)
    assert table.embed > 0 and all(s > 0 for s in table.blocks)
    assert list(table.attention) == [32, 8] and all(s > 0 for b in (32, 8) for s in table.attention[b])
    assert table.meta["synthesised_exits"] == [1]  # the graph has its own head at block 0 only
    assert table.meta["batch"] == 1 and table.meta["runs"] == 3 and table.meta["precisions"] == ["fp32", "w8a8", "w4a8"]
    assert table.meta["attention_bits"] == [32, 8]
    assert table.check(graph) is not None
    assert table.static(graph) > 0


def test_profile_of_a_file_at_one_precision_with_a_distilled_head(tmp_path):
    path = write_file(tmp_path / "m.pyrt", tiny_graph(dist_token=True))
    table = profile_latency(path, precisions=["w4a8"], runs=2, warmup=0, num_threads=1, int8_attention=False)
    assert table.w_bits == (4,) and table.meta["model"] == "m.pyrt" and table.meta["threads"] == 1
    assert table.layer("head", 4) == table.layer("head_dist", 4) > 0  # one timed op, split evenly
    with pytest.raises(ValueError, match="no 8-bit weights"):
        table.layer("head", 8)
    assert list(table.attention) == [32] and table.meta["attention_bits"] == [32]
    w4 = uniform_graph(table.arch, 4)
    table.static(w4)
    with pytest.raises(ValueError, match="no 8-bit attention"):
        table.static(dict(w4, attention={"bits": 8}))


def test_quantised_model_file_cannot_be_profiled(tmp_path):
    path = write_file(tmp_path / "q.pyrt", tiny_graph(layers={"blocks.1.mlp.fc1": W8A8}))
    with pytest.raises(ValueError, match=r"'blocks.1.mlp.fc1'.*fp32 model file"):
        profile_latency(path, runs=1)


@pytest.mark.parametrize("kw, match", [({"precisions": ["w2a8"]}, "precisions"),
                                       ({"precisions": ["fp32", "fp32"]}, "repeat"),
                                       ({"runs": 0}, "runs"),
                                       ({"images": np.zeros((2, 1, 4, 4), np.float32)}, "float32"),
                                       ({"int8_attention": "yes"}, "int8_attention")])
def test_profile_arguments_are_checked(kw, match):
    graph = tiny_graph()
    with pytest.raises(ValueError, match=match):
        profile_latency((graph, random_tensors(graph)), **kw)


def test_profiling_model_has_every_exit_head():
    graph = tiny_graph(depth=3, exits=[{"block": 1, "rule": "margin", "threshold": 0.2}])
    tensors = random_tensors(graph)
    g, t, synthesised = profiling_model(graph, tensors)
    assert [e["block"] for e in g["exits"]] == [0, 1] and synthesised == [0]
    assert {lp["w_bits"] for lp in g["layers"].values()} == {32}
    assert t["exits.1.fc.weight"] is tensors["exits.1.fc.weight"]  # the file's own head is kept
    assert t["exits.0.fc.weight"].shape == tensors["exits.1.fc.weight"].shape


# --- re-quantisation ---------------------------------------------------------------------------------

def test_requantize_changes_only_the_linears():
    graph = tiny_graph(exits=[EXIT])
    tensors = random_tensors(graph)
    g, t = requantize(graph, tensors, "w4a8")
    assert g["layers"]["blocks.0.attn.qkv"]["w_bits"] == 4 and g["layers"]["head"]["w_bits"] == 32
    assert "blocks.0.attn.qkv.weight.q4" in t and "blocks.0.attn.qkv.weight" not in t
    assert t["blocks.0.norm1.weight"] is tensors["blocks.0.norm1.weight"]
    assert graph["layers"]["blocks.0.attn.qkv"]["w_bits"] == 32  # the input is left alone
    assert "attention" not in g
    g8, _ = requantize(graph, tensors, "w4a8-attn8")
    assert g8["attention"] == {"bits": 8} and "attention" not in graph
    assert "attention" not in requantize(dict(graph, attention={"bits": 8}), tensors, "w8a8")[0]


def test_requantize_refuses_what_it_cannot_do():
    graph = tiny_graph(exits=[EXIT])
    tensors = random_tensors(graph)
    with pytest.raises(ValueError, match="bits only"):
        requantize(graph, tensors, Policy(exits=[ExitPolicy(0)]))
    q, qt = requantize(graph, tensors, "w8a8")
    with pytest.raises(ValueError, match="fp32 model file"):
        requantize(q, qt, "w4a8")


@pytest.mark.torch
def test_requantized_tensors_equal_what_convert_writes(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("timm")
    from test_calibrate_common import tiny_vit

    from pyruntime.convert import convert
    from pyruntime.modelfile import read_model

    model = tiny_vit()
    D, n = model.embed_dim, model.head.out_features
    g = torch.Generator().manual_seed(0)
    heads = {1: {"norm.weight": 1 + 0.1 * torch.randn(D, generator=g), "norm.bias": 0.1 * torch.randn(D, generator=g),
                 "fc.weight": 0.2 * torch.randn(n, D, generator=g), "fc.bias": 0.1 * torch.randn(n, generator=g)}}
    bits = Policy(layers={"patch_embed": LayerPolicy(8), "blocks.0.*": LayerPolicy(4, 6),
                          "blocks.1.mlp.fc2": LayerPolicy(4, block_size=64),
                          "blocks.2.attn.qkv": LayerPolicy(8, scale="static", static_scale=0.05),
                          "exits.1.fc": LayerPolicy(4), "head": LayerPolicy(8)}, name="mixed", attn_bits=8)
    with_exit = copy.deepcopy(bits)
    with_exit.exits = [ExitPolicy(1)]
    fp32 = Policy(exits=[ExitPolicy(1)], name="fp32")
    g32, t32, _, _ = read_model(convert(model, tmp_path / "fp32.pyrt", policy=fp32, exits=heads))
    want_g, want_t, _, _ = read_model(convert(model, tmp_path / "mixed.pyrt", policy=with_exit, exits=heads))
    got_g, got_t = requantize(g32, t32, bits)
    assert got_g == want_g
    assert sorted(got_t) == sorted(want_t)
    for k in want_t:
        assert got_t[k].dtype == want_t[k].dtype and np.array_equal(got_t[k], want_t[k]), k


# --- who pays for what ---------------------------------------------------------------------------------

def test_expected_with_everyone_reaching_everything_is_static():
    graph = tiny_graph(depth=3, exits=[EXIT, dict(EXIT, block=1)], layers={"blocks.1.mlp.fc1": W8A8})
    table = synthetic_table(graph["arch"])
    assert table.expected(graph, [1.0, 1.0, 1.0]) == table.static(graph)
    assert table.block_latency(graph).shape == (3,)


def test_expected_matches_a_hand_sum_and_falls_with_reach():
    graph = tiny_graph(depth=3, exits=[EXIT], layers={"blocks.2.attn.proj": dict(W8A8, w_bits=4), "head": W8A8})
    t = synthetic_table(graph["arch"])

    def block(i):
        return t.blocks[i] + t.attention[32][i] + sum(t.layer(f"blocks.{i}.{k}", 4 if (i, k) == (2, "attn.proj") else 32)
                                 for k in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))

    reach = [1.0, 0.5, 0.25]
    want = (t.embed + t.layer("patch_embed", 32) + block(0) + 0.5 * block(1) + 0.25 * block(2)
            + 1.0 * t.layer("exits.0.fc", 32) + 0.25 * t.layer("head", 8))
    assert t.expected(graph, reach) == pytest.approx(want, rel=1e-12)
    assert np.allclose(t.block_latency(graph), [block(0), block(1), block(2)], rtol=1e-12)
    values = [t.expected(graph, r) for r in ([1, 1, 1], [1, 1, 0.5], [1, 0.5, 0.5], [1, 0.2, 0.1], [1, 0, 0])]
    assert all(a > b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError, match="reach"):
        t.expected(graph, [0.5, 0.5, 0.5])


@pytest.mark.parametrize("attn_bits", [32, 8])
def test_static_is_an_exact_sum(attn_bits):
    graph = tiny_graph(depth=3, exits=[EXIT])
    if attn_bits == 8:
        graph["attention"] = {"bits": 8}
    t = synthetic_table(graph["arch"])
    parts = [t.embed, *t.blocks, *t.attention[attn_bits]] + [t.layer(n, 32) for n in graph_layer_names(graph)]
    assert t.static(graph) == math.fsum(parts) == sum(parts) == sum(reversed(parts))


def test_table_of_another_model_is_refused():
    t = synthetic_table(tiny_graph(depth=2)["arch"])
    with pytest.raises(ValueError, match="no layer 'blocks.2.attn.qkv'"):
        t.static(tiny_graph(depth=3))
    with pytest.raises(ValueError, match=r"arch differs in \['mlp_hidden'\]"):
        t.static(tiny_graph(mlp_hidden=32))


def test_int8_attention_takes_its_own_times_and_is_refused_where_not_profiled():
    graph = tiny_graph(depth=2)
    t = synthetic_table(graph["arch"])
    fp32_attention = t.static(graph)
    graph["attention"] = {"bits": 8}
    d = [a8 - a32 for a8, a32 in zip(t.attention[8], t.attention[32])]
    assert t.static(graph) == pytest.approx(fp32_attention + sum(d), rel=1e-12)
    assert np.allclose(t.block_latency(graph) - t.block_latency(tiny_graph(depth=2)), d, rtol=0, atol=1e-15)
    t32 = synthetic_table(graph["arch"], attention_bits=(32,))
    with pytest.raises(ValueError, match="no 8-bit attention"):
        t32.static(graph)


# --- JSON -------------------------------------------------------------------------------------------

def test_save_load_round_trip(profiled, tmp_path):
    _, table = profiled
    table.save(tmp_path / "t.json")
    back = LatencyTable.load(tmp_path / "t.json")
    assert back == table
    assert back.to_dict() == table.to_dict()


def _broken(table, edit):
    d = json.loads(json.dumps(table.to_dict()))
    edit(d)
    return d


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.update(version=3), "version 3 is not supported"),
    (lambda d: d.pop("attention"), r"lacks \['attention'\]"),
    (lambda d: d["attention"].pop("32"), "must include fp32"),
    (lambda d: d["attention"].update({"16": d["attention"]["8"]}), "attention bits must be"),
    (lambda d: d["attention"]["8"].pop(), "attention at 8 bits must list one value per block"),
    (lambda d: d["attention"]["8"].__setitem__(0, float("nan")), "attention at 8 bits, block 0 must be finite"),
    (lambda d: d.update(version=1), "version 1 has no 'attention'"),
    (lambda d: d.update(format="something"), "not a pyruntime latency table"),
    (lambda d: d.pop("blocks"), r"lacks \['blocks'\]"),
    (lambda d: d["layers"].pop("blocks.1.mlp.fc2"), "missing layer 'blocks.1.mlp.fc2'"),
    (lambda d: d["layers"]["head"].pop("8"), "layer 'head' must have a value for each"),
    (lambda d: d["layers"]["blocks.0.attn.qkv"].update({"4": -1e-6}), r"'blocks.0.attn.qkv' at 4-bit.*>= 0"),
    (lambda d: d["layers"]["patch_embed"].update({"32": float("nan")}), r"'patch_embed' at 32-bit.*finite"),
    (lambda d: d["blocks"].__setitem__(1, float("inf")), "block 1 must be finite"),
    (lambda d: d.update(embed="fast"), "embed must be a number"),
    (lambda d: d["blocks"].pop(), "one value per block"),
    (lambda d: d.update(w_bits=[32, 16]), "w_bits"),
    (lambda d: d["arch"].update(depth=0), "invalid arch"),
])
def test_invalid_tables_are_named(profiled, tmp_path, edit, match):
    _, table = profiled
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_broken(table, edit)))
    with pytest.raises(ValueError, match=match):
        LatencyTable.load(path)


def _as_version_1(table):
    """``table`` as a version-1 file has it: fp32 attention folded into blocks."""
    d = json.loads(json.dumps(table.to_dict()))
    d["version"] = 1
    d["blocks"] = [b + a for b, a in zip(d["blocks"], d.pop("attention")["32"])]
    return d


def test_version_1_tables_still_read(tmp_path):
    graph = tiny_graph(depth=3, exits=[EXIT])
    t = synthetic_table(graph["arch"])
    (tmp_path / "v1.json").write_text(json.dumps(_as_version_1(t)))
    v1 = LatencyTable.load(tmp_path / "v1.json")
    assert list(v1.attention) == [32] and v1.attention[32] == [0.0] * 3
    assert v1.static(graph) == pytest.approx(t.static(graph), rel=1e-12)
    graph["attention"] = {"bits": 8}
    with pytest.raises(ValueError, match="no 8-bit attention"):
        v1.static(graph)
    assert LatencyTable.from_dict(v1.to_dict()) == v1 and v1.to_dict()["version"] == 2


def test_the_committed_version_1_table_reads():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "results" / "exits" / "latency_table.json"
    if json.loads(path.read_text())["version"] != 1:
        pytest.skip("results/exits/latency_table.json has been re-profiled since version 1")
    table = LatencyTable.load(path)
    assert table.static(uniform_graph(table.arch, 8)) > 0


def test_not_json(tmp_path):
    (tmp_path / "t.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        LatencyTable.load(tmp_path / "t.json")


# --- the cost model ---------------------------------------------------------------------------------------

@pytest.mark.torch
def test_cost_model_latency_adds_up_exactly():
    pytest.importorskip("torch")
    pytest.importorskip("timm")
    from test_calibrate_common import tiny_source

    from pyruntime.calibrate.common import CostModel, model_graph, policy_cost, scope_layers

    src = tiny_source()
    table = synthetic_table(model_graph(src, Policy())["arch"])
    costs = CostModel(src, "latency", table=table)
    assert costs.unit() == "s"
    names = scope_layers(src.layer_names(), "all")
    rng = np.random.default_rng(0)
    for exits in ([], [ExitPolicy(0), ExitPolicy(1)]):
        alloc = {n: (int(rng.choice([4, 8, 32])), int(rng.choice([4, 6, 8]))) for n in names}
        policy = Policy(layers={n: LayerPolicy(w, a) for n, (w, a) in alloc.items()}, exits=exits)
        predicted = costs.fixed(names, Policy(exits=exits)) + sum(costs.cost(n, w, a) for n, (w, a) in alloc.items())
        assert predicted == policy_cost(src, policy, "latency", table=table)
        assert predicted == table.static(model_graph(src, policy))
    graph = model_graph(src, policy)
    assert costs.expected(graph, [1.0, 0.5, 0.5]) == table.expected(graph, [1.0, 0.5, 0.5])
    assert costs.cost("blocks.0.mlp.fc1", 8, 4) == costs.cost("blocks.0.mlp.fc1", 8, 8)  # a_bits: same kernel


@pytest.mark.torch
def test_cost_model_latency_needs_a_fitting_table():
    pytest.importorskip("torch")
    pytest.importorskip("timm")
    from test_calibrate_common import tiny_source

    from pyruntime.calibrate.common import CostModel, model_graph, policy_cost

    src = tiny_source()
    with pytest.raises(ValueError, match="needs a latency table"):
        CostModel(src, "latency")
    with pytest.raises(ValueError, match="needs a latency table"):
        policy_cost(src, Policy(), "latency")
    arch = model_graph(src, Policy())["arch"]
    with pytest.raises(ValueError, match="only"):
        CostModel(src, "bops", table=synthetic_table(arch))
    with pytest.raises(ValueError, match="no layer 'blocks.2"):
        CostModel(src, "latency", table=synthetic_table(dict(arch, depth=2)))
    assert CostModel(src, "bops").unit() == "BOPs" and CostModel(src, "bytes").unit() == "bytes"


# --- the command line -----------------------------------------------------------------------------------------

def test_cli_writes_a_loadable_table(tmp_path, capsys):
    graph = tiny_graph(depth=3, exits=[EXIT])
    path = write_file(tmp_path / "m.pyrt", graph)
    out = tmp_path / "lat.json"
    assert main(["bench", str(path), "--profile", "--runs", "3", "--warmup", "0", "--latency-table", str(out)]) == 0
    text = capsys.readouterr().out
    assert "per-op time" in text and "w8/fp32" in text and "total w4" in text and f"wrote {out}" in text
    assert "attention (int8) per block" in text and "total w8 + int8 attention" in text
    table = LatencyTable.load(out)
    assert table.meta["runs"] == 3 and table.static(graph) > 0 and list(table.attention) == [32, 8]
    assert table.static(path) == table.static(graph)
    assert table.static(dict(graph, attention={"bits": 8})) > 0
    assert main(["bench", str(path), "--profile", "--runs", "2", "--warmup", "0", "--no-int8-attention",
                 "--latency-table", str(out)]) == 0
    assert "int8" not in capsys.readouterr().out.split("latency table (")[1]
    assert list(LatencyTable.load(out).attention) == [32]


def test_cli_latency_table_needs_profile_and_an_fp32_model(tmp_path, capsys):
    path = write_file(tmp_path / "q.pyrt", tiny_graph(layers={"head": W8A8}))
    out = tmp_path / "lat.json"
    assert main(["bench", str(path), "--runs", "1", "--latency-table", str(out)]) == 2
    assert "--profile" in capsys.readouterr().err
    assert main(["bench", str(path), "--profile", "--runs", "1", "--latency-table", str(out)]) == 2
    assert "fp32 model file" in capsys.readouterr().err and not out.exists()
    assert main(["bench", str(path), "--profile", "--runs", "1", "--precisions", "fp16",
                 "--latency-table", str(out)]) == 2


def test_bops_and_latency_share_the_reach_rules():
    graph = tiny_graph(depth=3, exits=[EXIT])
    t = synthetic_table(graph["arch"])
    with pytest.raises(ValueError) as a:
        t.expected(graph, [1.0, 0.5, 0.7])
    with pytest.raises(ValueError) as b:
        bops.expected(graph, [1.0, 0.5, 0.7])
    assert str(a.value) == str(b.value)
