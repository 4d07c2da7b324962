"""QuEE calibration (pyruntime.calibrate.quee) on a tiny random timm ViT whose labels are its
own fp32 predictions (so the final head is right and the exit heads -- copies of the final
norm + head -- and the 4-bit copies are right only sometimes): the policy converts and runs,
lambda trades accuracy for BOPs in the right direction, the runtime's gate decisions are the
rule applied to the exit heads' features, and the cluster targets are what they claim."""
from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

import pyruntime  # noqa: E402
from pyruntime import _numpy_ref, bops  # noqa: E402
from pyruntime.calibrate.common import CalibrationData, torch_source  # noqa: E402
from pyruntime.calibrate.quee import (LambdaNotFound, choose_lambda, cluster_targets, default_gate_blocks,  # noqa: E402
                                      default_lambdas, fit_quee, gate_decisions, gate_errors, gate_features,
                                      kmeans, path_predictions, quee_curve, reference_points, select_point,
                                      simulate, static_variant, train_gate_mlp)
from pyruntime.convert import convert  # noqa: E402
from pyruntime.modelfile import read_model  # noqa: E402
from pyruntime.policy import ExitPolicy, LayerPolicy, Policy  # noqa: E402

import _teacher  # noqa: E402
from _teacher import teacher_data  # noqa: E402
from test_calibrate_cli import checkpoint, exit_checkpoint  # noqa: E402,F401  (fixtures: the tiny reference checkpoints)

pytestmark = pytest.mark.torch

DEPTH, GATES, CLASSES = 5, [1, 3], 4
PRE = {"mean": [0.5], "std": [0.25]}


def tiny_model():
    return _teacher.tiny_model(DEPTH, CLASSES)


def exit_heads(model):
    return _teacher.exit_heads(model, GATES)


@pytest.fixture(scope="module")
def setup():
    model = tiny_model()
    source = torch_source(model, PRE, name="tiny")
    data, held = teacher_data(model, 320, 0), teacher_data(model, 160, 1)
    fit = fit_quee(source, data, gate_blocks=GATES, reduced=LayerPolicy(4, a_bits=6), topk=2, hidden=8,
                   clusters=12, steps=600, seed=0, exits=exit_heads(model), num_threads=1)  # horizon "final"
    return model, source, data, held, fit


def decided_at(r, block):
    """The path the runtime took at a gate block: 0 exit, 1 full, 2 reduced (-1: never got there)."""
    eb, bp = r["exit_block"], r["block_path"].astype(np.int64)
    reached = bp[:, block] > 0
    return np.where(~reached, -1, np.where(eb == block, 0, bp[:, min(block + 1, bp.shape[1] - 1)]))


# --- pieces -----------------------------------------------------------------------------------

def test_default_gate_blocks():
    assert default_gate_blocks(12, 3) == [2, 5, 8]
    assert default_gate_blocks(6, 2) == [1, 3]
    assert default_gate_blocks(4, 1) == [0, 1, 2]
    with pytest.raises(ValueError):
        default_gate_blocks(2, 3)


def test_gate_features_are_the_executors():
    logits = np.random.default_rng(0).standard_normal((20, 6)).astype(np.float32) * 3
    f = gate_features(logits, 3)
    for i in range(20):
        z = logits[i].astype(np.float64)
        p = np.exp(z - z.max())
        p /= p.sum()
        np.testing.assert_allclose(f[i, :3], np.sort(p)[::-1][:3], rtol=1e-12)
        np.testing.assert_allclose(f[i, 3], -(p * np.log(p)).sum(), rtol=1e-12)


def test_kmeans_and_cluster_targets_on_a_synthetic_case():
    rng = np.random.default_rng(0)
    centres = np.array([[0.9, 0.1], [0.5, 1.0], [0.2, 2.0]])
    sizes = [10, 20, 30]
    x = np.concatenate([c + 0.01 * rng.standard_normal((n, 2)) for c, n in zip(centres, sizes)])
    truth = np.repeat([0, 1, 2], sizes)
    # errors: path 0 wrong on the first 5 / 4 / 30 images of each blob, path 1 on 0 / 10 / 3, path 2 on 1 / 2 / 3
    errors = np.zeros((60, 3))
    for blob, counts in enumerate([(5, 0, 1), (4, 10, 2), (30, 3, 3)]):
        idx = np.flatnonzero(truth == blob)
        for p, c in enumerate(counts):
            errors[idx[:c], p] = 1
    _, assign = kmeans(x, 3, seed=4)
    # the clusters are the blobs (up to their numbering)
    mapping = {int(assign[truth == b][0]) for b in range(3)}
    assert len(mapping) == 3 and all(len(set(assign[truth == b])) == 1 for b in range(3))
    e_hat, n = cluster_targets(assign, errors, 3, prior=0.0)
    for blob, counts in enumerate([(5, 0, 1), (4, 10, 2), (30, 3, 3)]):
        k = assign[truth == blob][0]
        assert n[k] == sizes[blob]
        np.testing.assert_allclose(e_hat[k], np.array(counts) / sizes[blob])
    # shrinkage: (errors + prior * overall) / (n + prior)
    e2, _ = cluster_targets(assign, errors, 4, prior=3.0)
    overall = errors.mean(0)
    k = assign[truth == 0][0]
    np.testing.assert_allclose(e2[k], (np.array([5, 0, 1]) + 3 * overall) / (10 + 3))
    np.testing.assert_allclose(e2[3], overall)  # an empty cluster falls back to the overall rate
    np.testing.assert_array_equal(kmeans(x, 3, seed=4)[1], assign)  # deterministic


def test_mlp_learns_cluster_targets():
    rng = np.random.default_rng(1)
    x = rng.random((300, 3))
    t = np.stack([x[:, 0] > 0.5, x[:, 1] > 0.3, np.full(300, False)], 1) * 0.8 + 0.1
    w, loss = train_gate_mlp(x, t, hidden=8, steps=1500, lr=0.03, seed=0)
    assert {k: v.dtype for k, v in w.items()} == {k: np.float32 for k in w}
    assert w["fc1.weight"].shape == (8, 3) and w["fc2.weight"].shape == (3, 8)
    assert np.abs(gate_errors(x, w) - t).mean() < 0.08
    w2, loss2 = train_gate_mlp(x, t, hidden=8, steps=1500, lr=0.03, seed=0)
    assert loss == loss2 and all(np.array_equal(w[k], w2[k]) for k in w)


# --- the calibrated model -------------------------------------------------------------------------

def test_costs_are_normalised_bops_to_the_end(setup):
    """Horizon "final": the next segment at the path's precision, the rest at full precision,
    the exit heads (and their gates) on the way and the final head."""
    _, _, _, _, fit = setup
    assert fit.meta["horizon"] == "final"
    full, red = bops.block_bops(fit.graph)
    lb = bops.layer_bops(fit.graph)
    rest = full[4] + lb["exits.3.fc"] + bops.gate_bops(fit.graph) + lb["head"]  # the gate at block 3 decides too
    assert fit.gates[0].cost == pytest.approx((0.0, (full[2:4].sum() + rest) / fit.fp32_bops,
                                               (red[2:4].sum() + rest) / fit.fp32_bops), rel=1e-12)
    assert fit.gates[1].cost == pytest.approx((0.0, (full[4] + lb["head"]) / fit.fp32_bops,
                                               (red[4] + lb["head"]) / fit.fp32_bops), rel=1e-12)
    assert fit.gates[0].cost[2] < fit.gates[0].cost[1]
    fp32 = copy.deepcopy(fit.graph)
    fp32.pop("gates")
    fp32["exits"] = []
    fp32["layers"] = {n: dict(lp, w_bits=32) for n, lp in fp32["layers"].items() if not n.startswith("exits.")}
    assert fit.fp32_bops == bops.static(fp32)


def test_costs_can_be_a_devices_latency(setup):
    """With a latency table the path costs are seconds: the table's blocks at the path's
    precision, the heads on the way, normalised by the fp32 model's seconds."""
    from test_latency import synthetic_table

    from pyruntime.calibrate.common import CostModel, model_graph

    model, source, data, _, fit = setup
    table = synthetic_table(model_graph(source, Policy())["arch"], seed=7)
    small = CalibrationData(data.images[:64], data.labels[:64], data.summary)
    lat = fit_quee(source, small, gate_blocks=GATES, reduced=LayerPolicy(4, a_bits=6), topk=2, hidden=4, clusters=4,
                   steps=50, exits=exit_heads(model), num_threads=1, costs=CostModel(source, "latency", table=table))
    g = lat.graph
    full = table.block_latency(g)
    red = full.copy()
    for name in g["gates"]["reduced"]:
        red[int(name.split(".")[1])] += table.layer(name, 4) - table.layer(name, g["layers"][name]["w_bits"])
    fp32 = copy.deepcopy(g)
    fp32.pop("gates")
    fp32["exits"] = []
    fp32["layers"] = {n: dict(lp, w_bits=32) for n, lp in fp32["layers"].items() if not n.startswith("exits.")}
    norm = table.static(fp32)
    rest = full[4] + table.layer("exits.3.fc", 32) + table.layer("head", 32)
    assert lat.gates[0].cost == pytest.approx((0.0, (full[2:4].sum() + rest) / norm, (red[2:4].sum() + rest) / norm),
                                              rel=1e-12)
    assert lat.meta["cost_kind"] == "latency" and lat.meta["cost_normaliser_fp32"] == pytest.approx(norm)
    assert lat.fp32_bops == fit.fp32_bops  # the BOPs normaliser of the curves stays BOPs


def test_targets_are_the_static_runs_outcomes(setup):
    """ê's inputs: path 0 = the gate head of the full model, path 1 = the final head of the full
    model, path 2 = the final head with the next segment at reduced precision."""
    _, _, data, _, fit = setup
    y = data.labels
    F = fit.static_run(data.images)
    R1 = fit.static_run(data.images, reduced_blocks=[2, 3])
    R2 = fit.static_run(data.images, reduced_blocks=[4])
    err = lambda z: float((z.argmax(-1) != y).mean())
    assert fit.gates[0].path_error == pytest.approx((err(F["exit_logits"][0]), err(F["logits"]), err(R1["logits"])))
    assert fit.gates[1].path_error == pytest.approx((err(F["exit_logits"][1]), err(F["logits"]), err(R2["logits"])))
    assert err(F["logits"]) < 0.1  # the teacher's labels (fp32; this is W8A8)
    # the shrunk cluster tables average back to the overall rates: sum_k (n_k + a) ê_k = (N + K a) ē
    g, a = fit.gates[0], fit.meta["prior"]
    w = g.cluster_sizes + a
    np.testing.assert_allclose((g.e_hat * w[:, None]).sum(0) / w.sum(), g.path_error, atol=1e-12)


def test_policy_converts_and_runs(setup, tmp_path):
    model, source, _, held, fit = setup
    lam = default_lambdas(fit)[len(default_lambdas(fit)) // 2]
    policy = Policy.from_json(fit.policy(lam).to_json())
    assert policy.gates.lam == lam and sorted(policy.gates.weights) == GATES
    assert [(e.block, e.rule) for e in policy.exits] == [(1, "gate"), (3, "gate")]
    assert policy.meta["calibration"]["method"] == "quee" and policy.meta["calibration"]["lambda"] == lam
    path = convert(model, tmp_path / "quee.pyrt", policy=policy, exits=exit_heads(model), preprocess=PRE)
    m = pyruntime.load(path, num_threads=1)
    r = m.run(held.images)
    assert set(np.unique(r.block_path).tolist()) <= {0, 1, 2}
    np.testing.assert_array_equal(bops.per_image(m.graph, r.exit_block, r.block_path), r.bops)
    # the same answers as the in-memory model the curve measures
    mem = fit.run(held.images, lam, num_threads=1)
    np.testing.assert_array_equal(mem["logits"], r.logits)
    np.testing.assert_array_equal(mem["block_path"], r.block_path)
    graph, tensors, _, _ = read_model(path)
    x = held.images[:12]
    _, eb, per, bp = _numpy_ref.forward(graph, tensors, x, paths=True)
    np.testing.assert_array_equal(eb, r.exit_block[:12])
    np.testing.assert_array_equal(bp, r.block_path[:12])


def test_a_pickled_fit_runs_like_the_fresh_one(setup):
    """A fit saved with pickle (or returned by a worker process) runs in memory exactly as the
    fit it was made from."""
    import pickle

    _, _, _, held, fit = setup
    lam = default_lambdas(fit)[len(default_lambdas(fit)) // 2]
    again = pickle.loads(pickle.dumps(fit))
    want, got = fit.run(held.images, lam, num_threads=1), again.run(held.images, lam, num_threads=1)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_lambda_moves_bops_the_right_way(setup):
    _, _, _, held, fit = setup
    lams = default_lambdas(fit)
    curve = quee_curve(fit, held.images, held.labels, lambdas=[0.0, lams[len(lams) // 2], 1e4], num_threads=1)
    zero, mid, big = curve
    assert zero.mean_bops > big.mean_bops and zero.mean_bops >= mid.mean_bops >= big.mean_bops
    assert big.exit_share[GATES[0]] == 1.0 and big.reduced_share == 0.0
    assert zero.top1 >= big.top1
    ref = reference_points(fit, held.images, held.labels, num_threads=1)
    assert ref["full"].top1 > 0.9 and ref["full"].mean_bops > ref["reduced"].mean_bops
    assert big.mean_bops < zero.mean_bops <= ref["full"].mean_bops * 1.001
    # at one gate, a larger lambda never picks a costlier path for an image
    r0, r1 = fit.run(held.images, 0.0), fit.run(held.images, lams[len(lams) // 2])
    cost = np.asarray(fit.gates[0].cost)
    assert (cost[decided_at(r1, GATES[0])] <= cost[decided_at(r0, GATES[0])]).all()


def test_runtime_decisions_follow_the_rule(setup):
    """Recompute every gate decision from the exit heads' logits of the static runs (the image's
    trajectory up to the gate) and compare per image with the gated run."""
    _, _, _, held, fit = setup
    x = held.images
    F = fit.static_run(x)
    R1 = fit.static_run(x, reduced_blocks=[2, 3])  # reduced between the two gates
    lams = default_lambdas(fit)
    for lam in (0.0, lams[len(lams) // 3], lams[2 * len(lams) // 3]):
        r = fit.run(x, lam)
        g1, g2 = fit.gates
        d1 = gate_decisions(gate_features(F["exit_logits"][0], fit.topk), g1.weights, lam, g1.cost)
        np.testing.assert_array_equal(decided_at(r, GATES[0]), d1)
        # at the second gate, the exit logits depend on the path taken at the first
        logits2 = np.where((d1 == 2)[:, None], R1["exit_logits"][1], F["exit_logits"][1])
        d2 = gate_decisions(gate_features(logits2, fit.topk), g2.weights, lam, g2.cost)
        got = decided_at(r, GATES[1])
        np.testing.assert_array_equal(got[d1 != 0], d2[d1 != 0])
        assert (got[d1 == 0] == -1).all()
        # and exactly as the numpy reference's scalar gate decides
        gate = dict(g1.weights, cost=np.asarray(g1.cost, np.float32))
        for i in range(0, len(x), 16):
            assert _numpy_ref.gate_path(F["exit_logits"][0][i], gate, lam, fit.topk) == d1[i]
    # the middle lambda sends images down all three paths somewhere
    r = fit.run(x, lams[len(lams) // 3])
    assert len(set(decided_at(r, GATES[0]).tolist()) | set(decided_at(r, GATES[1]).tolist()) - {-1}) == 3


def test_static_variant_runs_reduced_weights_as_primary(setup):
    _, _, _, held, fit = setup
    g, t = static_variant(fit.graph, fit.tensors, [2, 3], exit_blocks=[])
    assert "gates" not in g and g["exits"] == []
    assert g["layers"]["blocks.2.attn.qkv"]["w_bits"] == 4 and g["layers"]["blocks.4.attn.qkv"]["w_bits"] == 8
    np.testing.assert_array_equal(t["blocks.3.mlp.fc2.weight.q4"], fit.tensors["blocks.3.mlp.fc2:lo.weight.q4"])
    # forcing the reduced path at gate 1 and the full path at gate 2 reproduces it exactly
    gg, tt = fit.model_tensors(0.0)
    for b, path in ((1, 2), (3, 1)):
        tt[f"gates.{b}.fc1.weight"] = np.zeros_like(tt[f"gates.{b}.fc1.weight"])
        tt[f"gates.{b}.fc2.weight"] = np.zeros_like(tt[f"gates.{b}.fc2.weight"])
        bias = np.full(3, 5.0, np.float32)
        bias[path] = -5.0
        tt[f"gates.{b}.fc2.bias"] = bias
    from pyruntime import _core

    forced = _core.Executor(gg, tt).run(held.images)
    static = _core.Executor(g, t).run(held.images)
    np.testing.assert_array_equal(forced["logits"], static["logits"])


def test_options_and_determinism(setup):
    model, source, data, _, fit = setup
    small = CalibrationData(data.images[:96], data.labels[:96], data.summary)
    kw = dict(gate_blocks=GATES, reduced=LayerPolicy(4, a_bits=6), topk=2, hidden=4, clusters=6, steps=100,
              exits=exit_heads(model), num_threads=1)
    a, b = fit_quee(source, small, **kw), fit_quee(source, small, **kw)
    assert all(np.array_equal(x.weights[k], y.weights[k]) for x, y in zip(a.gates, b.gates) for k in x.weights)
    nxt = fit_quee(source, small, horizon="next", **kw)
    assert nxt.meta["horizon"] == "next"
    # charged for the next segment and its head only
    full, red = bops.block_bops(nxt.graph)
    head3 = bops.layer_bops(nxt.graph)["exits.3.fc"] + bops.gate_bops(nxt.graph)
    assert nxt.gates[0].cost == pytest.approx((0.0, (full[2:4].sum() + head3) / nxt.fp32_bops,
                                               (red[2:4].sum() + head3) / nxt.fp32_bops), rel=1e-12)
    assert nxt.gates[0].cost[1] < a.gates[0].cost[1] and nxt.gates[1].cost == pytest.approx(a.gates[1].cost)
    F, R1 = nxt.static_run(small.images), nxt.static_run(small.images, [2, 3])
    err = lambda z: float((z.argmax(-1) != small.labels).mean())
    assert nxt.gates[0].path_error == pytest.approx((err(F["exit_logits"][0]), err(F["exit_logits"][1]),
                                                     err(R1["exit_logits"][1])))
    # one static run with everything after the first gate reduced
    st = fit_quee(source, small, horizon="next", targets="static", **kw)
    R = st.static_run(small.images, [2, 3, 4])
    assert st.gates[1].path_error[2] == pytest.approx(err(R["logits"]))
    assert st.gates[0].path_error == nxt.gates[0].path_error


@pytest.mark.parametrize("kw, match", [
    (dict(gate_blocks=[4]), "0..3"),
    (dict(gate_blocks=[]), "non-empty"),
    (dict(targets="dynamic"), "targets"),
    (dict(horizon="end"), "horizon"),
    (dict(topk=5), "topk"),
    (dict(base=Policy(exits=[ExitPolicy(1, "confidence", 0.5)])), "no exits"),
])
def test_bad_arguments(setup, kw, match):
    model, source, data, _, _ = setup
    with pytest.raises(ValueError, match=match):
        fit_quee(source, data, **dict(dict(gate_blocks=GATES, exits=exit_heads(model)), **kw))


def test_path_targets_refuse_too_many_gates(setup, monkeypatch):
    """Path targets may need one static run per combination of segment precisions (2^gates)."""
    import pyruntime.calibrate.quee as quee

    model, source, data, _, _ = setup
    monkeypatch.setattr(quee, "MAX_PATH_GATES", 1)
    with pytest.raises(ValueError, match=r"targets='path' .*2\^gates.*at most 1 gates, got 2"):
        fit_quee(source, data, gate_blocks=GATES, exits=exit_heads(model), targets="path")


# --- int8 attention ---------------------------------------------------------------------------------

def test_int8_attention_from_the_base_policy(setup):
    """A base with int8 attention (or attention=8) runs and costs every path with it: each
    continuing path saves the attention matmuls of the blocks it commits to (32x32 -> 8x8);
    the fp32 normaliser stays the fp32 model's. A conflicting explicit value is refused."""
    model, source, data, _, _ = setup
    small = CalibrationData(data.images[:64], data.labels[:64], data.summary)
    kw = dict(gate_blocks=GATES, reduced=LayerPolicy(4, a_bits=6), topk=2, hidden=4, clusters=4, steps=50,
              exits=exit_heads(model), num_threads=1)
    q32, q8 = fit_quee(source, small, **kw), fit_quee(source, small, base="w8a8-attn8", **kw)
    assert q32.base.attn_bits == 32 and "attention" not in q32.graph
    assert q8.base.attn_bits == 8 and q8.graph["attention"] == {"bits": 8} and q8.policy(0.1).attn_bits == 8
    assert q8.fp32_bops == q32.fp32_bops
    a = source.arch
    T = (a["img_size"][0] // a["patch_size"][0]) * (a["img_size"][1] // a["patch_size"][1]) + 1
    per_block = 2 * T * T * a["embed_dim"] * (32 * 32 - 8 * 8)
    for g32, g8, blocks in zip(q32.gates, q8.gates, (3, 1)):  # gate 1: blocks 2..4 to the end; gate 3: block 4
        for path in (1, 2):
            assert g32.cost[path] - g8.cost[path] == pytest.approx(blocks * per_block / q32.fp32_bops, rel=1e-9)
    # the policy's BOPs are the converted file's
    from pyruntime.calibrate.common import policy_cost
    from pyruntime.calibrate.probe import materialise

    pol = q8.policy(0.1)
    assert policy_cost(source, pol, "bops") == bops.static(materialise(source, pol, exit_heads(model))[0])
    # attention=8 on an fp32-attention base is the same model
    q8b = fit_quee(source, small, attention=8, **kw)
    assert q8b.base.name == "w8a8-attn8" and [g.cost for g in q8b.gates] == [g.cost for g in q8.gates]
    with pytest.raises(ValueError, match=r"attention bits 32 conflict .*'w8a8-attn8'.*8-bit"):
        fit_quee(source, small, base="w8a8-attn8", attention=32, **kw)
    with pytest.raises(ValueError, match="attention bits must be one of"):
        fit_quee(source, small, attention=4, **kw)


# --- path targets: gates trained on the trajectories images take -------------------------------------

@pytest.fixture(scope="module")
def path_fit(setup):
    model, source, data, _, _ = setup
    return fit_quee(source, data, gate_blocks=GATES, reduced=LayerPolicy(4, a_bits=6), topk=2, hidden=8,
                    clusters=12, steps=600, seed=0, exits=exit_heads(model), num_threads=1, targets="path")


def test_path_targets_follow_the_images_that_went_reduced(setup, path_fit):
    """Gate 0 sees one trajectory (full precision), so it is the segment fit's gate. Gate 1 is
    trained on (image, history) pairs: those sent reduced at gate 0 at some simulated lambda
    arrive with segment 0 (blocks 2, 3) reduced, and their features and path errors are the
    static run's with those blocks reduced -- not the full-precision trajectory's."""
    _, _, data, _, seg = setup
    y = data.labels
    g0s, g0p = seg.gates[0], path_fit.gates[0]
    assert all(np.array_equal(g0s.weights[k], g0p.weights[k]) for k in g0s.weights)
    rows, masks, weight = path_fit.histories[GATES[1]]
    assert set(masks.tolist()) == {0, 1} and (weight > 0).all() and (weight <= 1).all()
    F, R0 = seg.static_run(data.images), seg.static_run(data.images, reduced_blocks=[2, 3])
    R01, R1 = seg.static_run(data.images, reduced_blocks=[2, 3, 4]), seg.static_run(data.images, reduced_blocks=[4])
    red = masks == 1
    np.testing.assert_allclose(path_fit.gates[1].features[red], gate_features(R0["exit_logits"][1][rows[red]], 2))
    np.testing.assert_allclose(path_fit.gates[1].features[~red], gate_features(F["exit_logits"][1][rows[~red]], 2))
    wrong = lambda z, r: (z.argmax(-1) != y[r]).astype(float)
    e = np.where(red[:, None],
                 np.stack([wrong(R0["exit_logits"][1][rows], rows), wrong(R0["logits"][rows], rows),
                           wrong(R01["logits"][rows], rows)], 1),
                 np.stack([wrong(F["exit_logits"][1][rows], rows), wrong(F["logits"][rows], rows),
                           wrong(R1["logits"][rows], rows)], 1))
    assert path_fit.gates[1].path_error == pytest.approx(tuple((e * weight[:, None]).sum(0) / weight.sum()))
    # the targets differ from the static trajectory's where images went reduced
    assert path_fit.gates[1].path_error != pytest.approx(seg.gates[1].path_error)
    assert (e[red] != np.stack([wrong(F["exit_logits"][1][rows[red]], rows[red]), wrong(F["logits"][rows[red]], rows[red]),
                                wrong(R1["logits"][rows[red]], rows[red])], 1)).any()
    # every weight is the share of the simulation grid at which the pair reaches gate 1
    sim = path_fit.meta["sim_lambdas"]
    masks_sim, dec = simulate(path_fit, path_fit.segment_runs(data.images), sim)
    reached = dec[:, 1] >= 0
    for r, mk, w in zip(rows[::17], masks[::17], weight[::17]):
        assert w == pytest.approx((reached[:, r] & (masks_sim[:, 1, r] == mk)).mean())
    assert path_fit.meta["targets"] == "path" and path_fit.meta["static_runs"] == 4


def test_simulated_trajectories_are_the_runtimes(path_fit, setup):
    """simulate() (static runs + the gate rule) predicts, per image, where the executor exits
    and which segments it runs reduced."""
    _, _, _, held, _ = setup
    lams = default_lambdas(path_fit)
    pick = [0.0, lams[len(lams) // 3], lams[2 * len(lams) // 3]]
    runs = path_fit.segment_runs(held.images)
    masks, dec = simulate(path_fit, runs, pick)
    for li, lam in enumerate(pick):
        r = path_fit.run(held.images, lam, num_threads=1)
        for j, b in enumerate(GATES):
            np.testing.assert_array_equal(decided_at(r, b), dec[li, j])
        went_reduced = (r["block_path"][:, 4] == 2) & (r["exit_block"] > 3)
        np.testing.assert_array_equal(went_reduced, dec[li, 1] == 2)
        assert ((masks[li, 1] == 1) == (dec[li, 0] == 2)).all()
    p = path_predictions(path_fit, runs, held.labels, pick[1])
    assert len(p["row"]) == int((dec[1] >= 0).sum()) and p["predicted"].shape == p["observed"].shape == (len(p["row"]), 3)
    assert ((p["predicted"] > 0) & (p["predicted"] < 1)).all() and set(np.unique(p["observed"])) <= {0.0, 1.0}


def test_lambda_chosen_on_validation_meets_the_target_there(setup, path_fit):
    model, source, data, held, _ = setup
    val = CalibrationData(held.images[:96], held.labels[:96], {"part": "validation"})
    curve = quee_curve(path_fit, val.images, val.labels, default_lambdas(path_fit, 6), num_threads=1)
    budget = float(np.median([c.mean_bops for c in curve]))
    s = choose_lambda(path_fit, source, val, budget_bops=budget, grid=6, num_threads=1)
    assert s.point.mean_bops <= budget and s.images == 96
    # the chosen point is the most accurate within the budget, measured on those images again
    again = quee_curve(path_fit, val.images, val.labels, [s.lam], num_threads=1)[0]
    assert again.mean_bops == s.point.mean_bops and again.top1 == s.point.top1
    assert s.point.top1 == max(c.top1 for c in s.curve if c.mean_bops <= budget)
    d = choose_lambda(path_fit, source, val, max_drop=0.2, grid=6, num_threads=1)
    assert d.reference_top1 - d.point.top1 <= 0.2
    assert d.point.mean_bops == min(c.mean_bops for c in d.curve if d.reference_top1 - c.top1 <= 0.2)


@pytest.mark.parametrize("kw, match", [
    (dict(), "needs max_drop or budget_bops"),
    (dict(budget_bops=-1.0), "positive and finite"),
    (dict(budget_bops=float("nan")), "positive and finite"),
    (dict(budget_bops=float("inf")), "positive and finite"),
    (dict(max_drop=1.5), r"fraction in \[0, 1\)"),
    (dict(max_drop=-0.01), r"fraction in \[0, 1\)"),
    (dict(budget_bops=1.0), "no lambda meets the target on the 40 validation images .*mean BOPs <= 1.*the cheapest"),
])
def test_bad_targets_are_refused(setup, path_fit, kw, match):
    _, source, _, held, _ = setup
    val = CalibrationData(held.images[:40], held.labels[:40], {})
    with pytest.raises(ValueError, match=match):
        choose_lambda(path_fit, source, val, grid=3, num_threads=1, **kw)


def test_select_point_is_one_rule_for_any_curve():
    from types import SimpleNamespace as P

    curve = [P(label="a", top1=0.90, mean_bops=10.0), P(label="b", top1=0.89, mean_bops=6.0),
             P(label="c", top1=0.80, mean_bops=3.0), P(label="d", top1=0.89, mean_bops=6.0)]
    assert select_point(curve, 0.9, max_drop=0.015).label == "b"           # cheapest within the drop; first of ties
    assert select_point(curve, 0.9, budget_bops=7.0).label == "b"          # most accurate within the budget
    assert select_point(curve, 0.9, max_drop=0.2, budget_bops=5.0).label == "c"
    with pytest.raises(LambdaNotFound, match="no threshold meets .*the cheapest threshold c"):
        select_point(curve, 0.9, budget_bops=1.0, what="threshold", images=5)


# --- the command line: the reference model's validation images choose lambda ---------------------------

def test_cli_chooses_lambda_on_the_reference_validation_images(exit_checkpoint, tmp_path, capsys):
    """Without --data, quee fits its gates on the calibration images (50000..54999) and picks
    lambda on --holdout x as many validation images (55000..59999); --targets path reaches the
    fit; --targets is refused for other methods."""
    from test_calibrate_cli import calibrate

    ckpt = exit_checkpoint
    out = tmp_path / "q.json"
    assert calibrate(ckpt, out, "--method", "quee", "--every", "1", "--targets", "path", "--budget-bops", "1x",
                     "--threads", "1") == 0
    meta = Policy.load(out).meta
    assert meta["chosen_on"] == "validation" and meta["fit_images"] == 64 and meta["validation_images"] == 16
    assert meta["validation_data"]["part"] == "validation" and meta["validation_data"]["range"] == [55000, 60000]
    assert meta["calibration"]["targets"] == "path" and meta["calibration"]["data"]["part"] == "calibration"
    assert meta["lambda_search"]["mean_bops"] <= meta["budget_bops"]
    capsys.readouterr()
    assert calibrate(ckpt, tmp_path / "u.json", "--method", "uniform", "--targets", "path") == 2
    assert "--targets applies to quee, not uniform" in capsys.readouterr().err
