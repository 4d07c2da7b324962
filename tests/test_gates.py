"""QuEE gates in the executor: per-image precision switching is real and exact.

An image the gate sends down the reduced path must get bit-identical logits to a static
model whose blocks after the gate hold the reduced weights as their only weights; an image
sent down the full path, those of the static full-precision model. Built directly on
``_core.Executor`` (graph dict + tensors), so it needs no file-format support.
"""
import copy

import numpy as np
import pytest

from pyruntime import _core, bops, kernels
from pyruntime.modelfile import pack_int4

from _graphs import W8A8, random_tensors, tiny_graph

DEPTH, GATE = 4, 1
# "grouped": enough tokens and width that the executor runs each block on groups of 3 images
# (its largest intermediate, 257 tokens x 256 hidden floats, is a quarter of the 1 MB group
# budget), so full, reduced and exited images fall on both sides of group boundaries.
ARCHS = {"tiny": {}, "grouped": {"img_size": [64, 64], "embed_dim": 64, "mlp_hidden": 256}}
GROUP_BYTES = 1 << 20  # kBlockGroupBytes in csrc/graph/executor.cc
SWITCHABLE = [f"blocks.{b}.{n}" for b in range(GATE + 1, DEPTH) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
W4 = dict(W8A8, w_bits=4, a_bits=6)


def base_graph(**arch):
    exits = [{"block": GATE, "rule": "confidence", "threshold": 1.0}]
    return tiny_graph(depth=DEPTH, exits=exits, layers={n: W8A8 for n in SWITCHABLE}, **arch)


def reduced_tensors(tensors, seed=3):
    """4-bit copies of the switchable layers' weights (from a float version of the 8-bit ones)."""
    out = {}
    for name in SWITCHABLE:
        w = tensors[f"{name}.weight.q8"].astype(np.float32) * tensors[f"{name}.weight.scale"][:, None]
        w += np.random.default_rng(seed).standard_normal(w.shape).astype(np.float32) * 0.01
        q, s = kernels.quantize_weights(np.ascontiguousarray(w), 4).canonical()
        out[f"{name}:lo.weight.q4"] = pack_int4(q)
        out[f"{name}:lo.weight.scale"] = s
    return out


def gate_tensors(w1, b1, w2, b2):
    f = lambda a: np.asarray(a, np.float32)
    return {f"gates.{GATE}.fc1.weight": f(w1), f"gates.{GATE}.fc1.bias": f(b1),
            f"gates.{GATE}.fc2.weight": f(w2), f"gates.{GATE}.fc2.bias": f(b2)}


def gated_graph(graph, lam=0.0, cost=(0.0, 0.0, 0.0)):
    g = copy.deepcopy(graph)
    g["exits"][0]["rule"] = "gate"
    g["exits"][0]["threshold"] = 0.0
    g["gates"] = {"lambda": lam, "topk": 2, "hidden": 1, "cost": {str(GATE): list(cost)},
                  "reduced": {n: W4 for n in SWITCHABLE}}
    return g


def static_reduced(graph, tensors, lo):
    """The static model that runs the reduced weights as its primary ones after the gate."""
    g, t = copy.deepcopy(graph), dict(tensors)
    for n in SWITCHABLE:
        g["layers"][n] = W4
        del t[f"{n}.weight.q8"]
        t[f"{n}.weight.q4"] = lo[f"{n}:lo.weight.q4"]
        t[f"{n}.weight.scale"] = lo[f"{n}:lo.weight.scale"]
    g["exits"][0]["threshold"] = 1.0
    return g, t


def run(graph, tensors, x, **kw):
    return _core.Executor(graph, tensors).run(x, **kw)


@pytest.fixture(scope="module", params=sorted(ARCHS))
def setup(request):
    graph = base_graph(**ARCHS[request.param])
    tensors = random_tensors(graph, seed=21)
    lo = reduced_tensors(tensors)
    a = graph["arch"]
    x = np.random.default_rng(5).standard_normal((24, 1, *a["img_size"])).astype(np.float32)
    if request.param == "grouped":
        tokens = (a["img_size"][0] // a["patch_size"][0]) * (a["img_size"][1] // a["patch_size"][1]) + 1
        per_image = tokens * max(a["mlp_hidden"], 3 * a["embed_dim"]) * 4
        assert 1 < GROUP_BYTES // per_image < len(x) // 4
    return graph, tensors, lo, x


@pytest.mark.parametrize("path", [0, 1, 2])
def test_a_constant_gate_sends_everyone_down_one_path(setup, path):
    graph, tensors, lo, x = setup
    b2 = [5.0, 5.0, 5.0]
    b2[path] = -5.0
    g = gated_graph(graph)
    r = run(g, {**tensors, **lo, **gate_tensors([[0, 0, 0]], [0], [[0], [0], [0]], b2)}, x)
    full = run(graph, tensors, x, collect_exits=True)
    if path == 0:
        assert (r["exit_block"] == GATE).all()
        assert np.array_equal(r["logits"], full["exit_logits"][0])
        assert (r["block_path"][:, GATE + 1:] == 0).all()
    elif path == 1:
        assert np.array_equal(r["logits"], full["logits"])
        assert (r["block_path"] == 1).all()
    else:
        sg, st = static_reduced(graph, tensors, lo)
        ref = run(sg, st, x)
        assert np.array_equal(r["logits"], ref["logits"])
        assert np.array_equal(r["bops"], ref["bops"] + bops.gate_bops(g))  # + the gate's MLP, once per image
        assert (r["block_path"][:, : GATE + 1] == 1).all() and (r["block_path"][:, GATE + 1:] == 2).all()


def test_mixed_decisions_match_each_paths_static_model(setup):
    graph, tensors, lo, x = setup
    full = run(graph, tensors, x, collect_exits=True)
    p = np.exp(full["exit_logits"][0] - full["exit_logits"][0].max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    entropy = -(p * np.log(p)).sum(1)
    lo_t, hi_t = np.quantile(entropy, [0.33, 0.66])
    # hidden = entropy; exit when it is low, reduced when middling, full when high.
    k = 60.0
    w2 = [[k], [0.0], [-k / 2]]
    b2 = [-k * lo_t, 0.0, k / 2 * hi_t]
    # scores: exit sigmoid(k(H - lo_t)), full sigmoid(0) = 0.5, reduced sigmoid(-k/2 (H - hi_t))
    gt = gate_tensors([[0, 0, 1]], [0], w2, b2)
    r = run(gated_graph(graph), {**tensors, **lo, **gt}, x)
    decided = np.where(r["exit_block"] == GATE, 0, np.where(r["block_path"][:, -1] == 2, 2, 1))
    assert set(decided.tolist()) == {0, 1, 2}
    sg, st = static_reduced(graph, tensors, lo)
    reduced = run(sg, st, x)
    for i, path in enumerate(decided):
        want = full["exit_logits"][0][i] if path == 0 else (full["logits"][i] if path == 1 else reduced["logits"][i])
        assert np.array_equal(r["logits"][i], want), (i, path)
    # Each image alone gets what it got in the batch (whatever group it shared there).
    for i in (0, 4, 11, 23):
        alone = run(gated_graph(graph), {**tensors, **lo, **gt}, x[i:i + 1])
        assert np.array_equal(alone["logits"][0], r["logits"][i]) and alone["exit_block"][0] == r["exit_block"][i]
    # The decision rule: argmin of sigmoid(score) + lambda * cost.
    sig = lambda z: 1 / (1 + np.exp(-z))
    scores = np.stack([sig(k * entropy - k * lo_t), np.full_like(entropy, 0.5), sig(-k / 2 * entropy + k / 2 * hi_t)], 1)
    assert np.array_equal(decided, scores.argmin(1))


def test_cost_and_lambda_move_decisions(setup):
    graph, tensors, lo, x = setup
    gt = gate_tensors([[0, 0, 0]], [0], [[0], [0], [0]], [0.0, -0.1, 0.0])  # full looks best
    r = run(gated_graph(graph, lam=0.0, cost=(0, 1, 0.2)), {**tensors, **lo, **gt}, x)
    assert (r["block_path"][:, -1] == 1).all()
    r = run(gated_graph(graph, lam=1.0, cost=(0, 1, 0.2)), {**tensors, **lo, **gt}, x)
    assert (r["exit_block"] == GATE).all()  # exit 0.5 < reduced 0.5 + 0.2 < full 0.475 + 1


def test_bad_gates_are_rejected(setup):
    graph, tensors, lo, x = setup
    gt = gate_tensors([[0, 0, 0]], [0], [[0], [0], [0]], [0, 0, 0])
    g = gated_graph(graph)
    g["gates"]["cost"] = {}
    with pytest.raises(ValueError, match="cost"):
        _core.Executor(g, {**tensors, **lo, **gt})
    g = gated_graph(graph)
    with pytest.raises(ValueError, match="gates.1.fc2.bias"):
        _core.Executor(g, {**tensors, **lo, **{k: v for k, v in gt.items() if "fc2.bias" not in k}})
    g = gated_graph(graph)
    g["gates"]["topk"] = 99
    with pytest.raises(ValueError, match="gate sizes"):
        _core.Executor(g, {**tensors, **lo, **gt})
