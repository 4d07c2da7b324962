"""QuEE gates on the Python side: the model file, the policy, the converter, BOPs and the numpy
reference agree with the executor (tests/test_gates.py holds the executor to the format).

The gated graph: depth 5, a gate after block 1, a confidence exit after block 2 and a gate
after block 3; reduced copies (int4, 8-bit fp32 and one int8 with 5-bit activations) of block
linears after block 1. The gate MLPs read the entropy, so decisions vary per image.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest

import pyruntime
from pyruntime import _core, _numpy_ref, bops
from pyruntime.errors import FormatError, PolicyError
from pyruntime.modelfile import (check_graph, expected_tensors, graph_layer_names, graph_layer_shapes, read_model, with_ops,
                                 write_model)
from pyruntime.policy import ExitPolicy, GatePolicy, LayerPolicy, Policy, PredictorPolicy

from _graphs import FP32, W4A8, W8A8, random_tensors, tiny_graph

DEPTH, GATES = 5, (1, 3)
BLOCK_KINDS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
W4A6 = dict(W4A8, a_bits=6)


def block_linears(blocks):
    return [f"blocks.{b}.{k}" for b in blocks for k in BLOCK_KINDS]


def gated_graph(lam=0.0, cost=None, reduced=None, topk=2, hidden=2):
    exits = [{"block": 1, "rule": "gate", "threshold": 0.0},
             {"block": 2, "rule": "confidence", "threshold": 0.8},
             {"block": 3, "rule": "gate", "threshold": 0.0}]
    g = tiny_graph(depth=DEPTH, exits=exits, layers={n: W8A8 for n in block_linears(range(DEPTH))})
    if reduced is None:
        reduced = {n: dict(W4A6) for n in block_linears(range(2, DEPTH))}
        reduced["blocks.2.mlp.fc1"] = dict(FP32)
        reduced["blocks.4.attn.proj"] = dict(W8A8, a_bits=5)
    g["gates"] = {"lambda": lam, "topk": topk, "hidden": hidden,
                  "cost": cost or {"1": [0.0, 0.6, 0.35], "3": [0.0, 0.3, 0.2]}, "reduced": copy.deepcopy(reduced)}
    return g


def entropy_gates(tensors, graph, x, k=40.0):
    """Gate MLPs on the entropy h: e_exit = sigmoid(k (h - lo)), e_full = 0.5,
    e_reduced = sigmoid(-k/2 (h - hi)), lo/hi the gate's 33%/66% entropy quantiles, so the
    images split three ways at each gate."""
    g = copy.deepcopy(graph)
    g.pop("gates")
    for e in g["exits"]:
        e.update(rule="confidence", threshold=1.0)
    t = {n: v for n, v in tensors.items() if ":lo" not in n and not n.startswith("gates.")}
    r = _core.Executor(g, t).run(x, collect_exits=True)
    out = {}
    for i, e in enumerate(graph["exits"]):
        if e["rule"] != "gate":
            continue
        z = r["exit_logits"][i].astype(np.float64)
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        ent = -(p * np.log(p)).sum(1)
        lo, hi = np.quantile(ent, [0.33, 0.66])
        topk, hidden = graph["gates"]["topk"], graph["gates"]["hidden"]
        w1 = np.zeros((hidden, topk + 1), np.float32)
        w1[0, -1] = 1.0
        w2 = np.zeros((3, hidden), np.float32)
        w2[:, 0] = [k, 0.0, -k / 2]
        b = e["block"]
        out.update({f"gates.{b}.fc1.weight": w1, f"gates.{b}.fc1.bias": np.zeros(hidden, np.float32),
                    f"gates.{b}.fc2.weight": w2,
                    f"gates.{b}.fc2.bias": np.array([-k * lo, 0.0, k / 2 * hi], np.float32)})
    return out


def images(graph, n=40, seed=5):
    a = graph["arch"]
    return np.random.default_rng(seed).standard_normal((n, a["in_chans"], *a["img_size"])).astype(np.float32)


@pytest.fixture(scope="module")
def gated():
    graph = gated_graph()
    tensors = random_tensors(graph, seed=13)  # (seed 11 has an int8 rounding tie: logits 8e-3 apart)
    x = images(graph)
    tensors.update(entropy_gates(tensors, graph, x))
    return graph, tensors, x


def save(tmp_path, graph, tensors, name="g.pyrt"):
    path = tmp_path / name
    write_model(path, graph, tensors, "{}", {"source": "test"})
    return path


# --- the model file -----------------------------------------------------------------------------

def test_expected_tensors_of_a_gated_graph():
    g = gated_graph(topk=2, hidden=3)
    specs = expected_tensors(g)
    assert specs["gates.1.fc1.weight"].shape == (3, 3) and specs["gates.3.fc1.bias"].shape == (3,)
    assert specs["gates.3.fc2.weight"].shape == (3, 3) and specs["gates.1.fc2.bias"].shape == (3,)
    assert not any(n.startswith("gates.2.") for n in specs)  # block 2 is a confidence exit
    assert specs["blocks.3.attn.qkv:lo.weight.q4"].shape == (24, 4)  # K = 8 -> 4 bytes
    assert specs["blocks.3.attn.qkv:lo.weight.scale"].shape == (24, 1)
    assert specs["blocks.2.mlp.fc1:lo.weight"].shape == (16, 8)  # an fp32 copy
    assert specs["blocks.4.attn.proj:lo.weight.q8"].shape == (8, 8)
    assert not any(n.startswith(("blocks.0.", "blocks.1.")) and ":lo" in n for n in specs)
    assert not any(":lo.bias" in n for n in specs)  # the bias is shared
    ungated = {k: v for k, v in specs.items() if ":lo" not in k and not k.startswith("gates.")}
    plain = copy.deepcopy(g)
    plain.pop("gates")
    for e in plain["exits"]:
        e.update(rule="confidence", threshold=0.5)
    assert ungated == expected_tensors(plain)


def test_layer_names_with_reduced_copies():
    g = gated_graph()
    names = graph_layer_names(g)
    assert not any(":lo" in n for n in names) and set(names) == set(g["layers"])
    lo = graph_layer_names(g, reduced=True)
    assert [n for n in lo if ":lo" not in n] == names
    assert lo[lo.index("blocks.2.attn.qkv") + 1] == "blocks.2.attn.qkv:lo"
    assert sum(n.endswith(":lo") for n in lo) == 12
    shapes = graph_layer_shapes(g, reduced=True)
    assert shapes["blocks.2.mlp.fc2:lo"] == shapes["blocks.2.mlp.fc2"] == (8, 16)
    assert graph_layer_names(tiny_graph(), reduced=True) == graph_layer_names(tiny_graph())


def test_file_round_trip_and_load(gated, tmp_path):
    graph, tensors, x = gated
    path = save(tmp_path, graph, tensors)
    g2, t2, _, _ = read_model(path)
    assert g2 == with_ops(graph)
    assert set(t2) == set(tensors) and all(np.array_equal(t2[k], tensors[k]) for k in tensors)
    model = pyruntime.load(path)
    r = model.run(x[:4])
    assert r.block_path.shape == (4, DEPTH)


def test_files_without_gates_stay_valid(tmp_path):
    g = tiny_graph(exits=[{"block": 0, "rule": "confidence", "threshold": 0.5}])
    check_graph(g)
    check_graph(dict(g, gates=None))
    g2, _, _, _ = read_model(save(tmp_path, g, random_tensors(g)))
    assert "gates" not in g2


def test_executor_equals_numpy_reference(gated, tmp_path):
    graph, tensors, x = gated
    r = pyruntime.load(save(tmp_path, graph, tensors)).run(x)
    logits, exit_block, per, paths = _numpy_ref.forward(graph, tensors, x, paths=True)
    # every kind of decision happens: exits at both gates and at the confidence exit,
    # full and reduced continuations, switches both ways at the second gate
    assert {1, 2, 3, DEPTH - 1} <= set(exit_block.tolist())
    assert {1, 2} <= set(paths[:, 2].tolist()) and {1, 2} <= set(paths[:, 4].tolist())
    assert ((paths[:, 2] == 1) & (paths[:, 4] == 2)).any() and ((paths[:, 2] == 2) & (paths[:, 4] == 1)).any()
    assert np.abs(r.logits - logits).max() <= 2e-3 * max(1.0, np.abs(logits).max())
    np.testing.assert_array_equal(r.exit_block, exit_block)
    np.testing.assert_array_equal(r.block_path, paths)
    np.testing.assert_array_equal(r.bops, per)
    np.testing.assert_array_equal(bops.per_image(graph, r.exit_block, r.block_path), r.bops)
    rf, rr = bops.reach_from_paths(graph, r.exit_block, r.block_path)
    assert bops.expected_by_precision(graph, rf, rr) == pytest.approx(r.bops.mean(), rel=1e-12)


def test_gate_path_follows_the_rule_on_every_image(gated, tmp_path):
    """The runtime's decision at each gate is argmin sigmoid(MLP(f)) + lambda * cost."""
    graph, tensors, x = gated
    for lam in (0.0, 0.3, 5.0):
        g = copy.deepcopy(graph)
        g["gates"]["lambda"] = lam
        r = _core.Executor(g, tensors).run(x)
        logits, exit_block, _, paths = _numpy_ref.forward(g, tensors, x, paths=True)
        np.testing.assert_array_equal(r["block_path"], paths)
        np.testing.assert_array_equal(r["exit_block"], exit_block)
    assert (exit_block == 1).all()  # lambda 5: exiting (cost 0) wins everywhere


def test_gate_path_ties_go_to_the_lower_path():
    gate = {"fc1.weight": np.zeros((1, 3), np.float32), "fc1.bias": np.zeros(1, np.float32),
            "fc2.weight": np.zeros((3, 1), np.float32), "fc2.bias": np.zeros(3, np.float32),
            "cost": np.zeros(3, np.float32)}
    z = np.array([0.1, 2.0, -1.0], np.float32)
    assert _numpy_ref.gate_path(z, gate, 0.0, 2) == 0
    gate["cost"] = np.array([0.2, 0.1, 0.1], np.float32)
    assert _numpy_ref.gate_path(z, gate, 1.0, 2) == 1


# --- BOPs with block paths ----------------------------------------------------------------------

def test_per_image_with_block_path_by_hand():
    g = gated_graph()
    full, red = bops.block_bops(g)
    T = 5
    # block 2: qkv 4x6, proj 4x6, fc1 fp32, fc2 4x6 instead of 8x8 everywhere
    macs = {"attn.qkv": T * 24 * 8, "attn.proj": T * 8 * 8, "mlp.fc1": T * 16 * 8, "mlp.fc2": T * 8 * 16}
    assert full[2] - red[2] == (macs["attn.qkv"] + macs["attn.proj"] + macs["mlp.fc2"]) * (64 - 24) \
        + macs["mlp.fc1"] * (64 - 1024)
    assert full[4] - red[4] == (macs["attn.qkv"] + macs["mlp.fc1"] + macs["mlp.fc2"]) * 40 + macs["attn.proj"] * 24
    assert full[0] == red[0] and full[1] == red[1]
    exit_block = np.array([4, 4, 3, 1])
    path = np.array([[1, 1, 1, 1, 1], [1, 1, 2, 2, 1], [1, 1, 2, 2, 0], [1, 1, 0, 0, 0]], np.uint8)
    per = bops.per_image(g, exit_block, path)
    base = bops.per_image(g, exit_block)
    np.testing.assert_array_equal(per[[0, 3]], base[[0, 3]])
    assert per[1] == base[1] - (full[2] - red[2]) - (full[3] - red[3])
    assert per[2] == base[2] - (full[2] - red[2]) - (full[3] - red[3])
    lb = bops.layer_bops(g, reduced=True)
    assert lb["blocks.2.mlp.fc1:lo"] == macs["mlp.fc1"] * 1024 and lb["blocks.2.mlp.fc1"] == macs["mlp.fc1"] * 64
    assert sum(v for k, v in lb.items() if ":lo" not in k) == sum(bops.layer_bops(g).values())


@pytest.mark.parametrize("path, match", [
    ([[1, 1, 1, 0, 0]], "disagrees"),
    ([[1, 1, 3, 1, 1]], "0 \\(not run\\)"),
    ([[1, 1, 1, 1]], "shape"),
])
def test_per_image_rejects_bad_paths(path, match):
    with pytest.raises(ValueError, match=match):
        bops.per_image(gated_graph(), [4], np.array(path, np.uint8))


def test_expected_with_reduced_reach():
    g = gated_graph()
    full, red = bops.block_bops(g)
    reach = [1.0, 1.0, 0.5, 0.5, 0.25]
    rr = [0.0, 0.0, 0.25, 0.25, 0.0]
    saved = 0.25 * (full[2] - red[2]) + 0.25 * (full[3] - red[3])
    assert bops.expected(g, reach, rr) == pytest.approx(bops.expected(g, reach) - saved)
    assert bops.expected_by_precision(g, np.subtract(reach, rr), rr) == pytest.approx(bops.expected(g, reach, rr))
    with pytest.raises(ValueError, match="reach_reduced"):
        bops.expected(g, reach, [0.0, 0.0, 0.75, 0.0, 0.0])


# --- validation ---------------------------------------------------------------------------------

def _edit(fn, **kw):
    g = gated_graph(**kw)
    fn(g)
    return g


def _set_gates(**kv):
    return lambda g: g["gates"].update(kv)


@pytest.mark.parametrize("graph, match", [
    (_edit(lambda g: g.pop("gates")), "no gates"),
    (_edit(_set_gates(**{"lambda": -0.1})), "lambda must be >= 0"),
    (_edit(_set_gates(**{"lambda": float("nan")})), "finite"),
    (_edit(_set_gates(**{"lambda": float("inf")})), "finite"),
    (_edit(_set_gates(**{"lambda": 1e39})), "finite as a float32"),
    (_edit(_set_gates(cost={"1": [0.0, 1e39, 0.1], "3": [0.0, 0.3, 0.2]})), "finite as a float32"),
    (_edit(_set_gates(topk=0)), "topk"),
    (_edit(_set_gates(topk=4)), "topk 4 exceeds num_classes 3"),
    (_edit(_set_gates(hidden=0)), "hidden"),
    (_edit(_set_gates(hidden=1.5)), "hidden"),
    (_edit(_set_gates(cost={"1": [0.0, 0.5], "3": [0.0, 0.3, 0.2]})), "3 numbers"),
    (_edit(_set_gates(cost={"1": [0.0, -0.5, 0.1], "3": [0.0, 0.3, 0.2]})), ">= 0"),
    (_edit(_set_gates(cost={"1": [0.0, float("inf"), 0.1], "3": [0.0, 0.3, 0.2]})), "finite"),
    (_edit(_set_gates(cost={"1": [0.0, 0.5, 0.1]})), "exactly one cost entry"),
    (_edit(_set_gates(cost={"1": [0.0, 0.5, 0.1], "2": [0.0, 0.5, 0.1], "3": [0.0, 0.3, 0.2]})), "exactly one cost"),
    (_edit(_set_gates(cost={"01": [0.0, 0.5, 0.1], "3": [0.0, 0.3, 0.2]})), "decimal string"),
    (_edit(lambda g: g["gates"]["reduced"].update({"blocks.1.mlp.fc1": W4A8})), "after the first gate"),
    (_edit(lambda g: g["gates"]["reduced"].update({"blocks.0.attn.qkv": W4A8})), "after the first gate"),
    (_edit(lambda g: g["gates"]["reduced"].update({"head": W4A8})), "after the first gate"),
    (_edit(lambda g: g["gates"]["reduced"].update({"exits.3.fc": W4A8})), "after the first gate"),
    (_edit(lambda g: g["gates"]["reduced"].update({"blocks.9.mlp.fc1": W4A8})), "after the first gate"),
    (_edit(lambda g: g["gates"]["reduced"].update({"blocks.*": W4A8})), "pattern"),
    (_edit(lambda g: g["gates"]["reduced"]["blocks.3.mlp.fc1"].pop("block_size")), "exactly the keys"),
    (_edit(lambda g: g["gates"]["reduced"].update({"blocks.3.mlp.fc1": dict(W8A8, w_bits=16)})), "w_bits"),
    (_edit(lambda g: g["gates"]["reduced"].update({"blocks.3.mlp.fc1": dict(W8A8, a_bits=9)})), "a_bits"),
    (_edit(lambda g: g["gates"]["reduced"].update({"blocks.3.mlp.fc1": dict(W8A8, scale="predicted")})),
     "no predictor"),
    (_edit(lambda g: g["gates"].update({"weights": {}})), "exactly the keys"),
    (_edit(lambda g: g["gates"].pop("reduced")), "exactly the keys"),
    (_edit(lambda g: g.update({"gates": [1]})), "null or an object"),
    (_edit(lambda g: g["exits"][0].update({"threshold": 0.5})), "must be 0"),
    (_edit(lambda g: g["exits"][0].update({"rule": "gated"})), "rule"),
])
def test_bad_gates_are_rejected(graph, match, tmp_path):
    with pytest.raises(FormatError, match=match):
        check_graph(graph)
    with pytest.raises(FormatError):
        write_model(tmp_path / "g.pyrt", graph, {}, "{}", {})
    assert not (tmp_path / "g.pyrt").exists()


def test_predicted_reduced_layers_use_lo_coefficients(tmp_path):
    g = gated_graph()
    g["gates"]["reduced"]["blocks.3.mlp.fc1"] = dict(W8A8, scale="predicted")
    g["predictor"] = {"block": 1, "chunk": 8, "coeffs": {"blocks.3.mlp.fc1": [0.05]}}
    with pytest.raises(FormatError, match="no coeffs"):
        check_graph(g)
    g["predictor"]["coeffs"] = {"blocks.3.mlp.fc1:lo": [0.05, 0.001]}
    check_graph(g)
    g["predictor"]["block"] = 3
    with pytest.raises(FormatError, match="not before"):
        check_graph(g)
    g["predictor"]["block"] = 2
    t = random_tensors(g, seed=2)
    for b in GATES:  # constant gates: everyone continues at reduced precision
        t[f"gates.{b}.fc1.weight"][:] = 0
        t[f"gates.{b}.fc2.weight"][:] = 0
        t[f"gates.{b}.fc2.bias"][:] = [5.0, 5.0, -5.0]
    x = images(g, 12)
    r = pyruntime.load(save(tmp_path, g, t)).run(x)
    logits, exit_block, per, paths = _numpy_ref.forward(g, t, x, paths=True)
    assert (paths == 2).any()
    np.testing.assert_array_equal(r.block_path, paths)
    np.testing.assert_array_equal(r.bops, per)
    assert np.abs(r.logits - logits).max() <= 2e-3 * max(1.0, np.abs(logits).max())


@pytest.mark.parametrize("fn, match", [
    (lambda t: t.pop("gates.3.fc2.bias"), "missing tensor 'gates.3.fc2.bias'"),
    (lambda t: t.pop("blocks.2.attn.qkv:lo.weight.q4"), "missing tensor 'blocks.2.attn.qkv:lo.weight.q4'"),
    (lambda t: t.update({"blocks.2.attn.qkv:lo.bias": np.zeros(24, np.float32)}), "does not use"),
    (lambda t: t.update({"gates.2.fc1.bias": np.zeros(2, np.float32)}), "does not use"),
    (lambda t: t.update({"gates.1.fc1.weight": np.zeros((2, 4), np.float32)}), "expected float32 \\[2, 3\\]"),
])
def test_bad_gate_tensors_are_rejected(gated, fn, match, tmp_path):
    graph, tensors, _ = gated
    t = dict(tensors)
    fn(t)
    with pytest.raises(FormatError, match=match):
        write_model(tmp_path / "g.pyrt", graph, t, "{}", {})


# --- the policy ---------------------------------------------------------------------------------

def gate_weights(topk=2, hidden=3, seed=0):
    rng = np.random.default_rng(seed)
    return {"fc1.weight": rng.standard_normal((hidden, topk + 1)).tolist(), "fc1.bias": rng.standard_normal(hidden).tolist(),
            "fc2.weight": rng.standard_normal((3, hidden)).tolist(), "fc2.bias": rng.standard_normal(3).tolist()}


def gate_policy(**kw):
    base = dict(layers={"blocks.*": LayerPolicy(8)},
                exits=[ExitPolicy(1, "gate"), ExitPolicy(2, "confidence", 0.8), ExitPolicy(3, "gate")],
                gates=GatePolicy(lam=0.1, topk=2, hidden=3, cost={1: [0, 0.6, 0.3], "3": [0, 0.3, 0.1]},
                                 reduced={"blocks.*": LayerPolicy(4, a_bits=6), "blocks.4.mlp.fc2": LayerPolicy(32)},
                                 weights={1: gate_weights(seed=1), 3: gate_weights(seed=3)}),
                name="quee")
    base.update(kw)
    return Policy(**base)


def policy_names():
    return graph_layer_names(tiny_graph(depth=DEPTH, exits=[{"block": b} for b in (1, 2, 3)]))


def test_gate_policy_json_round_trip(tmp_path):
    p = gate_policy()
    q = Policy.from_json(p.to_json())
    assert q == p
    d = json.loads(p.to_json())
    assert d["gates"]["cost"] == {"1": [0.0, 0.6, 0.3], "3": [0.0, 0.3, 0.1]}
    assert set(d["gates"]["weights"]["1"]) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert d["exits"][0] == {"block": 1, "rule": "gate", "threshold": 0.0}
    p.save(tmp_path / "p.json")
    assert Policy.load(tmp_path / "p.json") == p
    assert "gates" not in json.loads(Policy.shorthand("w8a8").to_json())  # gate-free JSON unchanged
    assert Policy.from_dict({"version": 1, "gates": None}).gates is None


def test_gate_weights_are_float32_exact_through_json():
    w = np.random.default_rng(0).standard_normal((3, 3)).astype(np.float32)
    p = gate_policy()
    weights = dict(p.gates.weights)
    weights[1] = dict(weights[1], **{"fc1.weight": w})
    q = Policy.from_json(gate_policy(gates=GatePolicy(0.1, 2, 3, p.gates.cost, p.gates.reduced, weights)).to_json())
    np.testing.assert_array_equal(q.gates.arrays(1)["fc1.weight"], w)


def test_reduced_patterns_resolve_to_layers_after_the_first_gate():
    red = gate_policy().resolve_reduced(policy_names(), DEPTH)
    assert list(red) == block_linears(range(2, DEPTH))
    assert red["blocks.4.mlp.fc2"].w_bits == 32 and red["blocks.2.attn.qkv"] == LayerPolicy(4, a_bits=6)
    assert Policy(layers={"blocks.*": LayerPolicy(8)}).resolve_reduced(policy_names(), DEPTH) == {}


@pytest.mark.parametrize("change, match", [
    (dict(exits=[ExitPolicy(1, "gate")], gates=None), "no gates"),
    (dict(exits=[ExitPolicy(1, "gate"), ExitPolicy(3, "confidence", 0.5)]), "exactly one cost entry"),
    (dict(exits=[ExitPolicy(1, "gate"), ExitPolicy(2, "gate"), ExitPolicy(3, "gate")]), "exactly one cost entry"),
    (dict(gates=GatePolicy(0.1, 2, 3, {1: [0, 1, 1], 3: [0, 1, 1]}, {"blocks.1.*": LayerPolicy(4)})),
     "after the first gate"),
    (dict(gates=GatePolicy(0.1, 2, 3, {1: [0, 1, 1], 3: [0, 1, 1]}, {"head": LayerPolicy(4)})), "after the first gate"),
    (dict(gates=GatePolicy(0.1, 2, 3, {1: [0, 1, 1], 3: [0, 1, 1]}, {}, {2: gate_weights()})), "no gate exit"),
    (dict(gates=GatePolicy(0.1, 2, 3, {1: [0, 1, 1], 3: [0, 1, 1]}, {"blocks.*": LayerPolicy(4),
                                                                     "blocks.[34].*": LayerPolicy(8)})),
     "several patterns"),
    (dict(gates=GatePolicy(0.1, 2, 3, {1: [0, 1, 1], 3: [0, 1, 1]}, {"blocks.3.mlp.fc1": LayerPolicy(8, scale="predicted")}),
          predictor=PredictorPolicy(2, 8, {"blocks.3.mlp.fc1": [0.1]})), "no coeffs"),
])
def test_policy_validation_of_gates(change, match):
    with pytest.raises(PolicyError, match=match):
        gate_policy(**change).validate(policy_names(), DEPTH)


@pytest.mark.parametrize("kwargs, match", [
    (dict(lam=-1.0), "lambda"),
    (dict(topk=0), "topk"),
    (dict(hidden=True), "integer"),
    (dict(cost={1: [0, 1]}), "3 numbers"),
    (dict(cost={"x": [0, 1, 1]}), "block key"),
    (dict(cost={1: [0, -1, 1]}), ">= 0"),
    (dict(weights={1: {"fc1.weight": [[0.0] * 4] * 3}}), "missing"),
    (dict(weights={1: dict(gate_weights(), **{"fc1.weight": [[0.0] * 4] * 3})}), "fc1.weight \\[3, 3\\]"),
    (dict(weights={1: dict(gate_weights(), **{"fc2.bias": [0.0, float("nan"), 0.0]})}), "finite"),
    (dict(reduced={"blocks.2.attn.qkv": {"w_bits": 5}}), "w_bits"),
])
def test_gate_policy_rejects(kwargs, match):
    base = dict(lam=0.1, topk=2, hidden=3)
    base.update(kwargs)
    with pytest.raises(PolicyError, match=match):
        GatePolicy(**base)


@pytest.mark.parametrize("doc, match", [
    ({"version": 1, "gates": {"lambda": 0, "topk": 1, "hidden": 1, "cost": {}}}, "missing"),
    ({"version": 1, "gates": {"lambda": 0, "topk": 1, "hidden": 1, "cost": {}, "reduced": {}, "mlp": {}}}, "unknown key"),
    ({"version": 1, "exits": [{"block": 0, "rule": "gate", "threshold": 0.3}]}, "must be 0"),
])
def test_gate_policy_json_rejects(doc, match):
    with pytest.raises(PolicyError, match=match):
        Policy.from_json(json.dumps(doc))


# --- the converter --------------------------------------------------------------------------------

def test_convert_writes_reduced_copies_and_gates(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    from pyruntime import kernels
    from pyruntime.convert import convert
    from pyruntime.modelfile import unpack_int4

    torch.manual_seed(0)
    model = VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=32, depth=DEPTH,
                              num_heads=2, mlp_ratio=2.0).eval()
    g = torch.Generator().manual_seed(1)
    heads = {b: {"norm.weight": 1 + 0.1 * torch.randn(32, generator=g), "norm.bias": 0.1 * torch.randn(32, generator=g),
                 "fc.weight": 0.5 * torch.randn(3, 32, generator=g), "fc.bias": 0.1 * torch.randn(3, generator=g)}
             for b in (1, 2, 3)}
    pol = gate_policy()
    path = convert(model, tmp_path / "q.pyrt", policy=pol, exits=heads)
    graph, tensors, policy_json, _ = read_model(path)
    assert Policy.from_json(policy_json) == pol
    assert graph["gates"]["cost"] == {"1": [0.0, 0.6, 0.3], "3": [0.0, 0.3, 0.1]}
    assert graph["gates"]["lambda"] == 0.1 and graph["gates"]["topk"] == 2 and graph["gates"]["hidden"] == 3
    assert list(graph["gates"]["reduced"]) == block_linears(range(2, DEPTH))
    w = model.blocks[3].mlp.fc1.weight.detach().numpy()
    q, s = kernels.quantize_weights(w, 4, 32).canonical()
    np.testing.assert_array_equal(unpack_int4(tensors["blocks.3.mlp.fc1:lo.weight.q4"], w.shape[1]), q)
    np.testing.assert_array_equal(tensors["blocks.3.mlp.fc1:lo.weight.scale"], np.asarray(s).reshape(w.shape[0], -1))
    np.testing.assert_array_equal(tensors["blocks.4.mlp.fc2:lo.weight"], model.blocks[4].mlp.fc2.weight.detach().numpy())
    np.testing.assert_array_equal(tensors["gates.3.fc1.weight"], np.asarray(gate_weights(seed=3)["fc1.weight"], np.float32))
    x = images(graph, 16)
    r = pyruntime.load(path).run(x)
    logits, exit_block, per, paths = _numpy_ref.forward(graph, tensors, x, paths=True)
    np.testing.assert_array_equal(r.block_path, paths)
    np.testing.assert_array_equal(r.bops, per)
    # a gate without weights cannot be converted; topk beyond the classes neither
    no_w = gate_policy(gates=GatePolicy(0.1, 2, 3, pol.gates.cost, pol.gates.reduced, {1: gate_weights(seed=1)}))
    with pytest.raises(PolicyError, match="no MLP weights"):
        convert(model, tmp_path / "x.pyrt", policy=no_w, exits=heads)
    big_k = gate_policy(gates=GatePolicy(0.1, 5, 3, pol.gates.cost, {}, {}))
    with pytest.raises(PolicyError, match="topk"):
        convert(model, tmp_path / "x.pyrt", policy=big_k, exits=heads)
    assert not (tmp_path / "x.pyrt").exists()


# --- random gated graphs: whatever the reader accepts, the executor runs like the reference ------

def random_gated_graph(rng):
    depth = int(rng.integers(2, 5))
    blocks = block_linears(range(depth))
    gates = sorted(rng.choice(depth - 1, size=int(rng.integers(1, depth)), replace=False).tolist())
    exits = [{"block": b, "rule": "gate", "threshold": 0.0} for b in gates]
    for b in range(depth - 1):
        if b not in gates and rng.random() < 0.3:
            exits.append({"block": b, "rule": "margin", "threshold": float(rng.random() * 0.5)})
    exits.sort(key=lambda e: e["block"])
    precisions = [FP32, W8A8, W4A8, dict(W8A8, a_bits=5), dict(W4A8, a_bits=4)]  # blocks above K rounded up to 32 are refused
    layers = {n: dict(precisions[rng.integers(len(precisions))]) for n in blocks}
    g = tiny_graph(depth=depth, exits=exits, layers=layers, num_classes=int(rng.integers(2, 6)))
    eligible = [n for n in blocks if int(n.split(".")[1]) > gates[0]]
    reduced = {n: dict(precisions[rng.integers(len(precisions))]) for n in eligible if rng.random() < 0.7}
    topk = int(rng.integers(1, g["arch"]["num_classes"] + 1))
    g["gates"] = {"lambda": float(rng.choice([0.0, 0.0, 0.1, 0.5])), "topk": topk, "hidden": int(rng.integers(1, 5)),
                  "cost": {str(b): rng.random(3).round(3).tolist() for b in gates}, "reduced": reduced}
    if rng.random() < 0.3 and reduced:
        pb = int(rng.integers(0, gates[0] + 1))
        name = sorted(reduced)[0]
        g["gates"]["reduced"][name] = dict(W8A8, scale="predicted")
        g["predictor"] = {"block": pb, "chunk": 8, "coeffs": {f"{name}:lo": [0.02, 0.003]}}
    return g


@pytest.mark.parametrize("seed", range(24))
def test_random_gated_graphs_run_like_the_reference(seed, tmp_path):
    rng = np.random.default_rng(seed)
    g = random_gated_graph(rng)
    check_graph(g)
    t = random_tensors(g, seed=seed)
    for k in t:  # gate MLPs whose decisions vary from image to image and gate to gate
        if k.startswith("gates.") and k.endswith("fc1.weight"):
            t[k] = rng.normal(0, 3.0, t[k].shape).astype(np.float32)
        elif k.startswith("gates.") and k.endswith("fc2.bias"):
            t[k] = rng.normal(0, 0.5, 3).astype(np.float32)
    x = images(g, 8, seed)
    r = pyruntime.load(save(tmp_path, g, t), num_threads=1).run(x)
    logits, exit_block, per, paths = _numpy_ref.forward(g, t, x, paths=True)
    np.testing.assert_array_equal(r.exit_block, exit_block)
    np.testing.assert_array_equal(r.block_path, paths)
    np.testing.assert_array_equal(r.bops, per)
    np.testing.assert_array_equal(bops.per_image(g, r.exit_block, r.block_path), r.bops)
    assert np.abs(r.logits - logits).max() <= 5e-3 * max(1.0, np.abs(logits).max())
