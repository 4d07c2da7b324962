"""MAQEE (pyruntime.calibrate.maqee) on a tiny random timm ViT whose labels are its own fp32
predictions, with exit heads that are copies of the final norm + head: thresholds replayed on
collected scores decide exactly as the runtime does, Learn-then-Test certifies the right prefix
of the threshold grid and the search takes its cheapest point, the exit-aware Fisher weights
each layer by the images that reach it and the heads that read it, layer errors are measured
on the reaching images, and a calibrated policy converts, meets its budget, keeps its certified
risk on the validation images and counts the same expected cost as the runtime's BOPs."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

import pyruntime  # noqa: E402
from pyruntime import bops  # noqa: E402
from pyruntime.convert import convert  # noqa: E402
from pyruntime.calibrate.common import CostModel, model_graph, policy_cost, torch_source  # noqa: E402
from pyruntime.calibrate.fisher import exit_fisher_traces, fisher_traces, per_sample_sq_norms  # noqa: E402
from pyruntime.calibrate.maqee import (BudgetNotMet, MaqeeConfig, Replay, allocate_bits, certifiable_rate,  # noqa: E402
                                       certify, calibrate_maqee, layer_block, layer_reach, reach_errors, search_thresholds,
                                       threshold_grid)
from pyruntime.stats import binomial_tail_p  # noqa: E402
from pyruntime.calibrate.probe import executor, materialise, run  # noqa: E402
from pyruntime.calibrate.thresholds import scores  # noqa: E402
from pyruntime.calibrate.uniform import uniform_policy  # noqa: E402
from pyruntime.policy import ExitPolicy, LayerPolicy, Policy  # noqa: E402

import _teacher  # noqa: E402
from _teacher import teacher_data  # noqa: E402

pytestmark = pytest.mark.torch

DEPTH, EXITS, CLASSES = 4, [0, 1, 2], 4
PRE = {"mean": [0.5], "std": [0.25]}
FISHER: dict = {}  # exit-aware Fisher traces shared by the end-to-end runs (same data, same model)


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


def grid_of(replay, n=32):
    return threshold_grid(replay.scores, n)


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


def test_threshold_grid_runs_from_safest_to_boldest():
    s = np.random.default_rng(0).uniform(0.2, 0.99, (3, 50))
    g = threshold_grid(s, 16)
    assert g[0] == 1.0 and np.all(np.diff(g) < 0) and g[-1] == pytest.approx(s.min())
    with pytest.raises(ValueError, match="grid"):
        threshold_grid(s, 0)


def synthetic_replay(lost_at, n, E=2):
    """A replay whose shared threshold grid[j] loses exactly ``lost_at[j]`` images: with
    thresholds 1 > t_1 > t_2 > ..., image i's exit score is chosen so that it leaves at head 0
    from candidate j on, and its exit head is wrong while the final head is right."""
    grid = np.linspace(1.0, 0.5, len(lost_at))
    s = np.zeros((E, n))
    right = np.ones((E + 1, n), bool)
    start = 0
    for j in range(1, len(lost_at)):
        extra = lost_at[j] - lost_at[j - 1]
        assert extra >= 0
        s[0, start:start + extra] = (grid[j] + grid[j - 1]) / 2  # passes grid[j] and bolder, not grid[j - 1]
        right[0, start:start + extra] = False
        start += extra
    r = Replay.__new__(Replay)
    r.scores, r.correct, r.reference = s, right, np.ones(n, bool)
    r.blocks, r.depth = np.array(list(range(E)) + [E]), E + 1
    r.c0, r.dc, r.delta = 1.0, np.ones(E), np.zeros(E)
    return r, grid


def test_learn_then_test_certifies_the_right_prefix():
    n, eps, delta = 500, 0.05, 0.1
    lost_at = [0, 5, 10, 15, 22, 40, 60]
    replay, grid = synthetic_replay(lost_at, n)
    assert [int(replay.lost([t] * 2).sum()) for t in grid] == lost_at
    p = [binomial_tail_p(k, n, eps) for k in lost_at]
    expect = next(j for j, v in enumerate(p) if v > delta)  # the first that fails ends the sequence
    got = certify(replay, grid, eps, delta)
    assert len(got) == expect and [o.thresholds[0] for o in got] == list(grid[:expect])
    assert all(o.risk_bound <= eps + 1e-12 and o.risk < eps for o in got)
    # a candidate left out by the mask is skipped, not failed; a failing one stops the rest
    mask = np.ones(len(grid), bool)
    mask[expect] = False
    assert len(certify(replay, grid, eps, delta, mask)) >= expect
    cheapest = search_thresholds(replay, grid, eps, delta, bsr_max=10.0)
    assert cheapest.feasible and cheapest.cost == min(o.cost for o in got)


def test_search_takes_the_cheapest_certified_threshold(setup):
    model, source, data = setup
    replay, _ = collected(source, model, data)
    replay.reference = replay.correct[-1].copy()  # risk against the W8A8 model itself
    grid = grid_of(replay)
    eps, delta = 0.1, 0.05
    best = search_thresholds(replay, grid, eps, delta, bsr_max=10.0)
    assert best.feasible
    # brute force: the certified prefix of the grid, then the cheapest
    E = len(EXITS)
    lost = [int(replay.lost([t] * E).sum()) for t in grid]
    prefix = []
    for t, k in zip(grid, lost):
        if binomial_tail_p(k, replay.n, eps) > delta:
            break
        prefix.append(replay.evaluate([t] * E)[2])
    assert best.cost == pytest.approx(min(prefix), rel=1e-12) and best.risk < eps
    # without a certificate (the fit images' provisional thresholds): the cheapest whose risk
    # on these images is within eps, anywhere in the grid
    plain = search_thresholds(replay, grid, eps, None, bsr_max=10.0)
    within = [replay.evaluate([t] * E)[2] for t, k in zip(grid, lost) if k <= eps * replay.n]
    assert plain.cost == pytest.approx(min(within), rel=1e-12) and plain.cost <= best.cost


def test_search_respects_the_bsr_cap_and_reports_infeasible(setup):
    model, source, data = setup
    replay, _ = collected(source, model, data)
    grid = grid_of(replay)
    capped = search_thresholds(replay, grid, 0.5, 0.05, bsr_max=0.0)
    assert capped.bsr == 0.0 and capped.feasible
    # a risk no count of lost images can certify on 400 images leaves every head closed and says so
    never = search_thresholds(replay, grid, 1e-6, 0.05, bsr_max=10.0)
    assert not never.feasible and never.thresholds == [1.0] * len(EXITS)
    assert never.cost == pytest.approx(replay.c0 + replay.dc.sum(), rel=1e-12)


def test_certifiable_rate_is_the_largest_count_the_test_passes():
    n, eps, level = 2000, 0.01, 0.05
    r = certifiable_rate(n, eps, level)
    k = round(r * n)
    assert binomial_tail_p(k, n, eps) <= level < binomial_tail_p(k + 1, n, eps)
    assert certifiable_rate(60, 0.03, 0.05) == -1.0  # 0.97^60 > 0.05: not even no lost image


@pytest.mark.parametrize("eps, delta", [(0.0, 0.05), (1.0, 0.05), (-0.1, 0.05), (0.1, 0.0), (0.1, 1.0)])
def test_bad_risk_and_delta_are_refused(eps, delta):
    replay, grid = synthetic_replay([0, 1], 50)
    with pytest.raises(ValueError, match="risk|delta"):
        certify(replay, grid, eps, delta)


def test_bsr_counts_decisions_near_the_threshold():
    # two heads, four images; scores chosen by hand
    s = np.array([[0.50, 0.61, 0.90, 0.20], [0.10, 0.95, 0.69, 0.72]])
    logits = np.log(np.stack([np.stack([[p, 1 - p] for p in row]) for row in s]))  # 2 classes: max softmax = max(p, 1-p)
    final = np.zeros((4, 2))
    replay = Replay(logits, final, np.zeros(4, np.int64), "confidence", [0, 1], 3, [1.0, 2.0, 3.0],
                    np.array([0.05, 0.05]), np.ones(4, bool))
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


def head0_loss(heads):
    """The cross-entropy of exit head 0 alone, written out independently of fisher.py."""
    import torch.nn.functional as F

    p = {k: torch.as_tensor(np.asarray(v)) for k, v in heads[0].items()}

    def loss(model, x, y):
        h = model.blocks[0](model.norm_pre(model._pos_embed(model.patch_embed(x))))[:, 0]
        z = F.layer_norm(h, (h.shape[-1],), p["norm.weight"], p["norm.bias"], eps=1e-6)
        return F.cross_entropy(F.linear(z, p["fc.weight"], p["fc.bias"]), y, reduction="sum")
    return loss


def test_exit_fisher_is_reach_weighted_and_reads_every_head(setup):
    model, source, data = setup
    part = data.take(np.arange(96), "fit")
    names = [n for n in source.layer_names() if n.startswith("blocks.")]
    heads = {b: {k: v.numpy() for k, v in h.items()} for b, h in exit_heads(model).items()}
    everyone = np.full(96, DEPTH - 1)
    # nobody leaves and no exit heads: the final head's Fisher
    final = fisher_traces(model, names, part, 32, False)
    got = exit_fisher_traces(model, names, part, {}, everyone, 32, False)
    for n in names:
        assert got[n] == pytest.approx(final[n], rel=1e-9)
    # every image leaves at head 0: only block 0 has a Fisher, exactly head 0's loss's
    at0 = exit_fisher_traces(model, names, part, heads, np.zeros(96, int), 32, False)
    x, y = torch.from_numpy(part.images), torch.from_numpy(part.labels)
    b0 = [n for n in names if layer_block(n, DEPTH) == 0]
    ref = per_sample_sq_norms(model, b0, x, y, head0_loss(heads))
    for n in names:
        if n in ref:
            assert at0[n] == pytest.approx(float(ref[n].sum()), rel=1e-9) and at0[n] > 0
        else:
            assert at0[n] == 0.0
    # a third of the images reach the end, the rest leave at head 1: blocks 2-3 see only that
    # third (their trace is the Fisher of all heads over it), blocks 0-1 see everyone
    last = np.where(np.arange(96) < 32, DEPTH - 1, 1)
    mixed = exit_fisher_traces(model, names, part, heads, last, 32, False)
    all_reach = exit_fisher_traces(model, names, part, heads, everyone, 32, False)
    third = exit_fisher_traces(model, names, part.take(np.arange(32), "fit"), heads, everyone[:32], 32, False)
    for n in names:
        if layer_block(n, DEPTH) >= 2:
            assert mixed[n] == pytest.approx(third[n], rel=1e-9) and mixed[n] < all_reach[n]
    # the exit heads' losses count: block 0 is read by every head, not only the final one
    assert any(all_reach[n] != pytest.approx(final[n], rel=1e-3) for n in b0)
    with pytest.raises(ValueError, match="last_block"):
        exit_fisher_traces(model, names, part, heads, np.full(96, DEPTH), 32, False)


def test_layer_errors_are_measured_on_the_images_that_reach_the_layer():
    names = ["blocks.0.attn.qkv", "blocks.1.mlp.fc1", "blocks.2.mlp.fc1", "blocks.3.attn.proj", "blocks.2.attn.qkv"]
    last = np.array([3, 0, 1, 3, 2, 0])
    seen = {}

    def measure(group, rows):
        for n in group:
            seen[n] = list(rows)
        return {n: [float(len(rows))] for n in group}

    errs = reach_errors(measure, names, last, DEPTH)
    assert seen == {"blocks.0.attn.qkv": [0, 1, 2, 3, 4, 5], "blocks.1.mlp.fc1": [0, 2, 3, 4],
                    "blocks.2.mlp.fc1": [0, 3, 4], "blocks.2.attn.qkv": [0, 3, 4], "blocks.3.attn.proj": [0, 3]}
    assert errs["blocks.2.mlp.fc1"] == [3.0]
    # a layer nobody reaches is measured on everyone (its reach-weighted sensitivity is zero)
    reach_errors(measure, ["blocks.3.mlp.fc2"], np.array([0, 1, 2]), DEPTH)
    assert seen["blocks.3.mlp.fc2"] == [0, 1, 2]


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
    cfg = MaqeeConfig(max_drop=0.1, exit_blocks=EXITS, rounds=3, grid=32, show_progress=False, num_threads=1,
                      error_images=128)
    return calibrate_maqee(source, data, 0.9 * w8, cfg, exits=exit_heads(model), fisher_cache=FISHER), 0.9 * w8, cfg


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
    """The operating point is certified on the validation (held-out) images: the runtime's
    risk there is the replay's, below epsilon, its Clopper-Pearson bound at the certificate's
    level (delta / allocations) within epsilon; the meta says where and how many."""
    res, _, cfg = calibrated
    assert res.held_drop == pytest.approx(res.held_reference_top1 - res.held_top1, abs=1e-12)
    assert res.certified >= 1 and res.risk_level == pytest.approx(cfg.delta / len(res.history))
    assert res.held_risk < cfg.max_drop and res.risk_bound <= cfg.max_drop + 1e-12
    n = res.validation_images
    assert binomial_tail_p(round(res.held_risk * n), n, cfg.max_drop) <= res.risk_level
    meta = res.policy.meta
    assert meta["chosen_on"] == "validation" and meta["fit_images"] + meta["validation_images"] == 400
    assert meta["validation_images"] == 100 and meta["expected_cost_validation"] == res.held_cost
    assert meta["sensitivity"] == "exits" and meta["validation_risk"] == res.held_risk
    assert "certified" in res.report()


def test_final_sensitivity_ablation_and_explicit_validation(setup, calibrated):
    """sensitivity='final' (the earlier reading) still calibrates; a separate validation set
    is used as given (nothing split off)."""
    model, source, data = setup
    res0, budget, cfg = calibrated
    fit, val = data.take(np.arange(300), "fit"), teacher_data(model, 200, 7)
    res = calibrate_maqee(source, fit, budget, MaqeeConfig(**{**cfg.__dict__, "sensitivity": "final", "rounds": 1}),
                          validation=val, exits=exit_heads(model))
    assert res.policy.meta["sensitivity"] == "final" and res.traces and res.held_cost <= budget
    assert (res.fit_images, res.validation_images) == (300, 200) and res.held_risk < cfg.max_drop
    # the two sensitivities differ: reach and exit heads move the layers' weights
    assert res0.omega and set(res0.omega) == set(res.omega) and res0.omega != res.omega


def test_too_few_validation_images_say_how_many(setup, calibrated):
    model, source, data = setup
    cfg = MaqeeConfig(**{**calibrated[2].__dict__, "max_drop": 0.01, "rounds": 0})
    with pytest.raises(BudgetNotMet, match="images needed"):
        calibrate_maqee(source, data, calibrated[1], cfg, exits=exit_heads(model))


def test_latency_cost_is_optimised_when_asked(setup, calibrated):
    from test_latency import synthetic_table

    model, source, data = setup
    _, _, cfg = calibrated
    table = synthetic_table(model_graph(source, Policy())["arch"], seed=3)
    costs = CostModel(source, "latency", table=table)
    budget = 1.1 * policy_cost(source, uniform_policy(8, 8), "latency", table=table)
    res = calibrate_maqee(source, data, budget, MaqeeConfig(**{**cfg.__dict__, "cost": "latency", "rounds": 1}),
                          costs=costs, exits=exit_heads(model), fisher_cache=FISHER)
    assert res.cost_kind == "latency" and res.held_cost <= budget
    # the held-out expected latency is the table's, at the reach the runtime's exits give
    _, held = data.split(cfg.holdout, cfg.seed)
    g, t = materialise(source, res.policy, exit_heads(model))
    r = run(executor(g, t), held.images)
    assert res.held_cost == pytest.approx(table.expected(g, bops.reach_from_exits(g, r["exit_block"])), rel=1e-12)


@pytest.mark.parametrize("kw, match", [
    (dict(max_drop=1.5), "max_drop"), (dict(max_drop=0.0), "max_drop"), (dict(delta=0.0), "delta"),
    (dict(delta=1.0), "delta"), (dict(rule="entropy"), "exit rule"), (dict(exit_blocks=[3]), "exit blocks"),
    (dict(bsr_quantile=0.0), "bsr_quantile"), (dict(bsr_max=-1), "bsr_max"), (dict(sensitivity="x"), "sensitivity"),
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
        calibrate_maqee(source, data, 1000.0, cfg, exits=exit_heads(model), fisher_cache=FISHER)
    with pytest.raises(ValueError, match="budget"):
        calibrate_maqee(source, data, -5.0, cfg, exits=exit_heads(model))


# --- int8 attention ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def calibrated_attn8(setup, calibrated):
    model, source, data = setup
    cfg = MaqeeConfig(**{**calibrated[2].__dict__, "attention": 8})
    budget = 0.95 * policy_cost(source, uniform_policy(8, 8, attn_bits=8), "bops")
    return calibrate_maqee(source, data, budget, cfg, exits=exit_heads(model), fisher_cache=FISHER), budget, cfg


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
                        exits=exit_heads(model), fisher_cache=FISHER)
    table = synthetic_table(arch, seed=3)
    budget = 1.1 * policy_cost(source, uniform_policy(8, 8, attn_bits=8), "latency", table=table)
    res = calibrate_maqee(source, data, budget, cfg, costs=CostModel(source, "latency", table=table),
                          exits=exit_heads(model), fisher_cache=FISHER)
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


@pytest.mark.parametrize("argv, match", [
    (["--method", "maqee", "--budget-bops", "1x", "--delta", "0"], "--delta must lie in"),
    (["--method", "maqee", "--budget-bops", "1x", "--delta", "1.5"], "--delta must lie in"),
    (["--method", "maqee", "--budget-bops", "1x", "--max-drop", "0"], "risk in percentage points"),
    (["--method", "lampq", "--budget-bops", "1x", "--sensitivity", "final"], "maqee only"),
])
def test_bad_risk_options_are_one_line_cli_errors(argv, match, tmp_path, capsys):
    from pyruntime.calibrate.cli import main

    assert main(["calibrate", *argv, "--out", str(tmp_path / "p.json"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1
