"""MAQEE (pyruntime.calibrate.maqee) on a tiny random timm ViT whose labels are its own fp32
predictions, with exit heads that are copies of the final norm + head: thresholds replayed on
collected scores decide exactly as the runtime does, the search finds the cheapest feasible
thresholds, the inner step weights layers by reach, and a calibrated policy converts, meets
its budget and counts the same expected cost as the runtime's per-image BOPs."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

import pyruntime  # noqa: E402
from pyruntime import bops  # noqa: E402
from pyruntime.convert import convert  # noqa: E402
from pyruntime.calibrate.common import CostModel, model_graph, policy_cost, torch_source  # noqa: E402
from pyruntime.calibrate.maqee import (BudgetNotMet, MaqeeConfig, Replay, allocate_bits,  # noqa: E402
                                       calibrate_maqee, layer_reach, search_thresholds)
from pyruntime.calibrate.probe import executor, materialise, run  # noqa: E402
from pyruntime.calibrate.thresholds import scores  # noqa: E402
from pyruntime.calibrate.uniform import uniform_policy  # noqa: E402
from pyruntime.policy import ExitPolicy, LayerPolicy, Policy  # noqa: E402

import _teacher  # noqa: E402
from _teacher import teacher_data  # noqa: E402

pytestmark = pytest.mark.torch

DEPTH, EXITS, CLASSES = 4, [0, 1, 2], 4
PRE = {"mean": [0.5], "std": [0.25]}


def tiny_model():
    return _teacher.tiny_model(DEPTH, CLASSES)


def exit_heads(model):
    return _teacher.exit_heads(model, EXITS)


@pytest.fixture(scope="module")
def setup():
    model = tiny_model()
    return model, torch_source(model, PRE, name="tiny"), teacher_data(model, 400, 0)


def exit_policy(base: str, thresholds, rule="confidence") -> Policy:
    p = uniform_policy(*{"fp32": (32, 8), "w8a8": (8, 8), "w4a8": (4, 8)}[base])
    p.exits = [ExitPolicy(b, rule, float(t)) for b, t in zip(EXITS, thresholds)]
    return p


def collected(source, model, data, base="w8a8", rule="confidence"):
    """Scores of every head on ``data`` under ``base`` (nobody leaving), as a Replay."""
    policy = exit_policy(base, [1.0] * len(EXITS), rule)
    g, t = materialise(source, policy, exit_heads(model))
    r = run(executor(g, t), data.images, True)
    steps = [CostModel(source, "bops").expected(model_graph(source, policy), [1.0] * k + [0.0] * (DEPTH - k))
             for k in range(1, DEPTH + 1)]
    return Replay(r["exit_logits"], r["logits"], data.labels, rule, EXITS, DEPTH, steps,
                  np.full(len(EXITS), 0.05), np.ones(len(data), bool)), r


# --- replay and outer search --------------------------------------------------------------------------

@pytest.mark.parametrize("rule", ["confidence", "margin"])
def test_replayed_thresholds_decide_as_the_runtime(setup, rule):
    model, source, data = setup
    replay, _ = collected(source, model, data, rule=rule)
    for thresholds in ([0.5, 0.7, 0.9], [0.95, 0.3, 1.0], [0.0, 1.0, 1.0]):
        top1, _, cost, _, reach = replay.evaluate(thresholds)
        policy = exit_policy("w8a8", thresholds, rule)
        g, t = materialise(source, policy, exit_heads(model))
        r = run(executor(g, t), data.images, False)
        assert top1 == pytest.approx(float((r["logits"].argmax(-1) == data.labels).mean()), abs=1e-12)
        np.testing.assert_allclose(reach, bops.reach_from_exits(g, r["exit_block"]), atol=1e-12)
        # the affine cost of the replay is the runtime's own per-image count, averaged
        assert cost == pytest.approx(float(r["bops"].mean()), rel=1e-12)
        assert cost == pytest.approx(bops.expected(g, reach), rel=1e-12)


def test_search_finds_the_cheapest_feasible_shared_threshold(setup):
    model, source, data = setup
    replay, _ = collected(source, model, data)
    replay.reference = replay.correct[-1].astype(np.float64)  # promise: against the W8A8 model itself
    replay.z = 0.0
    max_drop = 0.03
    best = search_thresholds(replay, max_drop, bsr_max=10.0, grid=32, sweeps=0)
    assert best.feasible and best.drop_bound <= max_drop + 1e-12
    # brute force over the same candidates
    cands = np.unique(np.concatenate(replay.candidates(32)))
    feasible = []
    for t in cands:
        top1, bound, cost, bsr, _ = replay.evaluate([t] * len(EXITS))
        if bound <= max_drop + 1e-12:
            feasible.append(cost)
    assert best.cost == pytest.approx(min(feasible), rel=1e-12)
    # coordinate descent only ever improves on the shared threshold
    per_head = search_thresholds(replay, max_drop, 10.0, grid=32, sweeps=2)
    assert per_head.feasible and per_head.cost <= best.cost


def test_search_respects_the_risk_cap_and_reports_infeasible(setup):
    model, source, data = setup
    replay, _ = collected(source, model, data)
    capped = search_thresholds(replay, 1.0, bsr_max=0.0, grid=32)
    assert capped.bsr == 0.0 and capped.feasible
    # an impossible promise (a gain of 100 points) leaves every head closed and says so
    never = search_thresholds(replay, -1.0, bsr_max=10.0, grid=16)
    assert not never.feasible and never.thresholds == [1.0] * len(EXITS)
    assert never.cost == pytest.approx(replay.c0 + replay.dc.sum(), rel=1e-12)


def test_bsr_counts_decisions_near_the_threshold():
    # two heads, four images; scores chosen by hand
    s = np.array([[0.50, 0.61, 0.90, 0.20], [0.10, 0.95, 0.69, 0.72]])
    logits = np.log(np.stack([np.stack([[p, 1 - p] for p in row]) for row in s]))  # 2 classes: max softmax = max(p, 1-p)
    final = np.zeros((4, 2))
    replay = Replay(logits, final, np.zeros(4, np.int64), "confidence", [0, 1], 3, [1.0, 2.0, 3.0],
                    np.array([0.05, 0.05]), np.ones(4, bool), z=0.0)
    conf = scores(logits, "confidence")
    np.testing.assert_allclose(conf, np.maximum(s, 1 - s), atol=1e-12)
    # tau = 0.62 / 0.70: head 0 at risk for images with |conf - 0.62| < 0.05 -> 0.61 (image 1)
    # image 0 conf 0.5, image 3 conf 0.8 exits at head 0; images 0, 1 reach head 1 (conf 0.9, 0.95 -> exit)
    _, _, _, bsr, reach = replay.evaluate([0.62, 0.70])
    head0 = np.abs(conf[0] - 0.62) < 0.05
    reaching1 = conf[0] < 0.62
    head1 = reaching1 & (np.abs(conf[1] - 0.70) < 0.05)
    assert bsr == pytest.approx((head0.sum() + head1.sum()) / 4)
    # a closed head (threshold 1) carries no risk
    assert replay.evaluate([1.0, 1.0])[3] == 0.0


# --- inner step ----------------------------------------------------------------------------------------

def test_layer_reach():
    names = ["patch_embed", "blocks.0.attn.qkv", "blocks.2.mlp.fc2", "exits.1.fc", "head"]
    assert layer_reach(names, [1.0, 0.6, 0.3, 0.1]) == [1.0, 1.0, 0.3, 0.6, 0.1]


def test_inner_step_buys_more_bits_when_fewer_images_go_deep(setup):
    """Weighting both error and cost by r_l keeps each layer's error per unit cost, so reach
    acts through the budget: the same expected budget buys more 8-bit layers when images
    leave early, and the expected cost stays within it."""
    _, source, _ = setup
    costs = CostModel(source, "bops")
    names = [n for n in source.layer_names() if n.startswith("blocks.")]
    opts = [(4, 8), (8, 8)]
    pick = {n: (8, 8) for n in names}
    omega = {n: 1.0 for n in names}
    rng = np.random.default_rng(0)
    errors = {n: [float(rng.uniform(0.5, 2.0)), 0.0] for n in names}
    policy = exit_policy("w8a8", [0.5] * len(EXITS))
    graph = model_graph(source, policy)
    full_depth = [1.0] * DEPTH
    budget = (costs.expected(graph, full_depth) + costs.expected(model_graph(source, exit_policy("w4a8", [0.5] * 3)),
                                                                  full_depth)) / 2

    def run_alloc(reach):
        alloc = allocate_bits(costs, graph, names, opts, pick, omega, errors, reach, budget)
        spent = costs.expected(model_graph(source, Policy(layers={n: LayerPolicy(*b) for n, b in alloc.items()},
                                                          exits=policy.exits)), reach)
        assert spent <= budget
        return sum(1 for b in alloc.values() if b == (8, 8))

    assert 0 < run_alloc(full_depth) < run_alloc([1.0, 0.8, 0.4, 0.1])
    # a budget the reach cannot meet: everything cheapest
    tiny = allocate_bits(costs, graph, names, opts, pick, omega, errors, full_depth, 1.0)
    assert set(tiny.values()) == {(4, 8)}


# --- end to end --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def calibrated(setup):
    model, source, data = setup
    w8 = policy_cost(source, uniform_policy(8, 8), "bops")
    cfg = MaqeeConfig(max_drop=0.05, exit_blocks=EXITS, rounds=3, grid=32, show_progress=False, num_threads=1,
                      error_images=128)
    return calibrate_maqee(source, data, 0.9 * w8, cfg, exits=exit_heads(model)), 0.9 * w8, cfg


def test_calibrated_policy_converts_meets_its_budget_and_counts_like_the_runtime(setup, calibrated, tmp_path):
    model, source, data = setup
    res, budget, cfg = calibrated
    assert res.held_cost <= budget
    assert res.history[0]["w4_layers"] == 0 and res.history[0]["a_bits"] == [8]  # round 0: PTQ + exits
    assert [e.block for e in res.policy.exits] == EXITS
    assert [e.threshold for e in res.policy.exits] == res.thresholds
    assert res.policy.meta["method"] == "maqee"
    # the held-out images' expected cost (reach from the runtime's exits) is their mean BOPs
    assert res.held_cost == pytest.approx(res.held_bops, rel=1e-12)
    path = convert(model, tmp_path / "maqee.pyrt", policy=res.policy, exits=exit_heads(model), preprocess=PRE)
    m = pyruntime.load(path)
    r = m.run(data.images[:64])
    assert r.bops.mean() == pytest.approx(bops.expected(path, bops.reach_from_exits(path, r.exit_block)), rel=1e-12)
    # the saved policy round-trips
    res.policy.save(tmp_path / "p.json")
    assert Policy.load(tmp_path / "p.json").to_dict() == res.policy.to_dict()
    assert "held-out" in res.report()


def test_validation_check_is_reported(calibrated):
    """The thresholds are chosen on the validation (held-out) images: their drop bound there is
    within the promise, as the runtime measures it, and the meta says where and how many."""
    res, _, cfg = calibrated
    assert res.held_drop == pytest.approx(res.held_reference_top1 - res.held_top1, abs=1e-12)
    assert res.promise_kept == (res.held_drop + cfg.z * res.held_drop_se <= cfg.max_drop + 1e-12)
    assert res.promise_kept
    meta = res.policy.meta
    assert meta["chosen_on"] == "validation" and meta["fit_images"] + meta["validation_images"] == 400
    assert meta["validation_images"] == 100 and meta["expected_cost_validation"] == res.held_cost


def test_latency_cost_is_optimised_when_asked(setup, calibrated):
    from test_latency import synthetic_table

    model, source, data = setup
    _, _, cfg = calibrated
    table = synthetic_table(model_graph(source, Policy())["arch"], seed=3)
    costs = CostModel(source, "latency", table=table)
    budget = 1.1 * policy_cost(source, uniform_policy(8, 8), "latency", table=table)
    res = calibrate_maqee(source, data, budget, MaqeeConfig(**{**cfg.__dict__, "cost": "latency", "rounds": 1}),
                          costs=costs, exits=exit_heads(model), traces=calibrated[0].traces)
    assert res.cost_kind == "latency" and res.held_cost <= budget
    # the held-out expected latency is the table's, at the reach the runtime's exits give
    _, held = data.split(cfg.holdout, cfg.seed)
    g, t = materialise(source, res.policy, exit_heads(model))
    r = run(executor(g, t), held.images)
    assert res.held_cost == pytest.approx(table.expected(g, bops.reach_from_exits(g, r["exit_block"])), rel=1e-12)


@pytest.mark.parametrize("kw, match", [
    (dict(max_drop=1.5), "max_drop"), (dict(rule="entropy"), "exit rule"), (dict(exit_blocks=[3]), "exit blocks"),
    (dict(bsr_quantile=0.0), "bsr_quantile"), (dict(bsr_max=-1), "bsr_max"),
])
def test_bad_configuration_is_named(setup, kw, match):
    model, source, data = setup
    with pytest.raises(ValueError, match=match):
        calibrate_maqee(source, data, 1e9, MaqeeConfig(**{"exit_blocks": EXITS, "show_progress": False, **kw}),
                        exits=exit_heads(model))


def test_impossible_budget_is_named(setup, calibrated):
    model, source, data = setup
    cfg = calibrated[2]
    with pytest.raises(BudgetNotMet, match="budget"):
        calibrate_maqee(source, data, 1000.0, cfg, exits=exit_heads(model), traces=calibrated[0].traces)
    with pytest.raises(ValueError, match="budget"):
        calibrate_maqee(source, data, -5.0, cfg, exits=exit_heads(model))


# --- int8 attention ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def calibrated_attn8(setup, calibrated):
    model, source, data = setup
    cfg = MaqeeConfig(**{**calibrated[2].__dict__, "attention": 8})
    budget = 0.95 * policy_cost(source, uniform_policy(8, 8, attn_bits=8), "bops")
    return calibrate_maqee(source, data, budget, cfg, exits=exit_heads(model), traces=calibrated[0].traces), budget, cfg


def test_int8_attention_is_in_the_policy_and_its_expected_cost(setup, calibrated_attn8, tmp_path):
    """The expected BOPs MAQEE reports on the fit and held-out images are the runtime's own
    mean per-image BOPs, which count the attention matmuls at 8 x 8."""
    model, source, data = setup
    res, budget, cfg = calibrated_attn8
    assert res.policy.attn_bits == 8 and res.held_cost <= budget
    assert res.held_cost == pytest.approx(res.held_bops, rel=1e-12)
    path = convert(model, tmp_path / "maqee8.pyrt", policy=res.policy, exits=exit_heads(model), preprocess=PRE)
    m = pyruntime.load(path)
    assert m.graph["attention"] == {"bits": 8}
    fit, _ = data.split(cfg.holdout, cfg.seed)
    r = m.run(fit.images)
    assert res.fit_cost == pytest.approx(r.bops.mean(), rel=1e-12)
    assert res.fit_cost == pytest.approx(bops.expected(path, bops.reach_from_exits(path, r.exit_block)), rel=1e-12)


def test_int8_attention_reaches_the_latency_table(setup, calibrated):
    """Latency budgets ask the table for the graph with int8 attention: a table without it
    refuses (its ValueError as is), one with it prices the int8 attention cores."""
    from test_latency import synthetic_table

    model, source, data = setup
    arch = model_graph(source, Policy())["arch"]
    cfg = MaqeeConfig(**{**calibrated[2].__dict__, "cost": "latency", "rounds": 1, "attention": 8})
    fp32_only = synthetic_table(arch, seed=3, attention_bits=(32,))
    with pytest.raises(ValueError, match="no 8-bit attention"):
        calibrate_maqee(source, data, 1.0, cfg, costs=CostModel(source, "latency", table=fp32_only),
                        exits=exit_heads(model), traces=calibrated[0].traces)
    table = synthetic_table(arch, seed=3)
    budget = 1.1 * policy_cost(source, uniform_policy(8, 8, attn_bits=8), "latency", table=table)
    res = calibrate_maqee(source, data, budget, cfg, costs=CostModel(source, "latency", table=table),
                          exits=exit_heads(model), traces=calibrated[0].traces)
    assert res.policy.attn_bits == 8 and res.held_cost <= budget
    _, held = data.split(cfg.holdout, cfg.seed)
    g, t = materialise(source, res.policy, exit_heads(model))
    reach = bops.reach_from_exits(g, run(executor(g, t), held.images)["exit_block"])
    assert g["attention"] == {"bits": 8}
    assert res.held_cost == pytest.approx(table.expected(g, reach), rel=1e-12)
    assert res.held_cost != pytest.approx(table.expected({k: v for k, v in g.items() if k != "attention"}, reach))


def test_bad_attention_bits_are_named(setup):
    model, source, data = setup
    with pytest.raises(ValueError, match="attention bits"):
        calibrate_maqee(source, data, 1e9, MaqeeConfig(exit_blocks=EXITS, show_progress=False, attention=16),
                        exits=exit_heads(model))
