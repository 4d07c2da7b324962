"""LampQ: the Fisher trace is what it claims (finite differences, explicit per-sample
loop), the type weightings are what they say, the QAT step lowers the calibration loss and
converts to a runtime file that computes what the trained fake-quant model computes, bad
config values name their field, and the policy converts, runs with the allocated bits and
keeps its budget. Also the naive, random and uniform baselines' budgets."""
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("scipy.optimize")

import pyruntime
from pyruntime import bops
from pyruntime.calibrate.common import CostModel, layer_type, policy_cost, scope_layers
from pyruntime.calibrate.emulate import QuantModel, layer_module
from pyruntime.calibrate.fisher import fisher_traces, per_sample_weight_grads
from pyruntime.calibrate.lampq import (LampQConfig, _layer_policies, calibrate_lampq, distillation_loss,
                                       feasible_range, model_errors, model_layers, options, qat_finetune,
                                       save_checkpoint, teacher_logits, type_aware_sensitivity, weight_energy)
from pyruntime.calibrate.naive import calibrate_naive, calibrate_random
from pyruntime.calibrate.uniform import uniform_policy, uniform_under_budget

from test_calibrate_common import tiny_data, tiny_source, tiny_vit
from _helpers import require_data

ALL = ["patch_embed", "blocks.0.attn.qkv", "blocks.1.mlp.fc2", "blocks.2.attn.proj", "head"]


def sample_loss(model, x, y):
    return torch.nn.functional.cross_entropy(model(x[None]), y[None])


def test_per_sample_gradients_match_finite_differences():
    model = tiny_vit().double()
    data = tiny_data(4)
    x, y = torch.from_numpy(data.images).double(), torch.from_numpy(data.labels)
    grads = per_sample_weight_grads(model, ALL, x, y)
    rng = np.random.default_rng(0)
    eps = 1e-6
    for name in ALL:
        w = layer_module(model, name).weight
        flat = w.data.view(w.shape[0], -1)
        for _ in range(3):
            n, i, k = int(rng.integers(4)), int(rng.integers(flat.shape[0])), int(rng.integers(flat.shape[1]))
            old = float(flat[i, k])
            with torch.no_grad():
                flat[i, k] = old + eps
                up = float(sample_loss(model, x[n], y[n]))
                flat[i, k] = old - eps
                down = float(sample_loss(model, x[n], y[n]))
                flat[i, k] = old
            fd = (up - down) / (2 * eps)
            assert float(grads[name][n, i, k]) == pytest.approx(fd, rel=1e-5, abs=1e-8), (name, n, i, k)


def test_fisher_trace_equals_an_explicit_per_sample_loop():
    model = tiny_vit().double()
    data = tiny_data(10)
    names = scope_layers(tiny_source().layer_names(), "all")
    explicit = dict.fromkeys(names, 0.0)
    for n in range(len(data)):
        model.zero_grad()
        x = torch.from_numpy(data.images[n]).double()
        sample_loss(model, x, torch.tensor(data.labels[n])).backward()
        for name in names:
            explicit[name] += float(layer_module(model, name).weight.grad.pow(2).sum())
    data.images = data.images.astype(np.float64)
    got = fisher_traces(model, names, data, batch_size=4, show_progress=False)
    for name in names:
        assert got[name] == pytest.approx(explicit[name], rel=1e-9)


def test_type_aware_sensitivity_normalises_each_type():
    traces = {"blocks.0.attn.qkv": 2.0, "blocks.1.attn.qkv": 6.0, "blocks.0.mlp.fc1": 100.0,
              "blocks.1.mlp.fc1": 300.0, "head": 7.0}
    omega = type_aware_sensitivity(traces)
    assert omega["blocks.0.attn.qkv"] == pytest.approx(0.5) and omega["blocks.1.attn.qkv"] == pytest.approx(1.5)
    assert omega["blocks.0.mlp.fc1"] == pytest.approx(0.5) and omega["head"] == pytest.approx(1.0)
    for t in {layer_type(n) for n in traces}:
        assert np.mean([omega[n] for n in traces if layer_type(n) == t]) == pytest.approx(1.0)
    assert type_aware_sensitivity(traces, "none") == traces == type_aware_sensitivity(traces, False)
    assert type_aware_sensitivity(traces, True) == omega


def test_fisher_type_weighting_is_half_the_types_weight_energy():
    """"fisher": alpha_t = 1/2 mean over the type of mean(W^2) -- the second-order loss model
    of a relative error; the ranking within a type is the traces', across types the energy's."""
    traces = {"blocks.0.attn.qkv": 2.0, "blocks.1.attn.qkv": 6.0, "blocks.0.mlp.fc1": 100.0, "blocks.1.mlp.fc1": 300.0}
    energy = {"blocks.0.attn.qkv": 0.01, "blocks.1.attn.qkv": 0.03, "blocks.0.mlp.fc1": 1e-4, "blocks.1.mlp.fc1": 3e-4}
    omega = type_aware_sensitivity(traces, "fisher", energy)
    assert omega["blocks.0.attn.qkv"] == pytest.approx(0.5 * 0.02 * 2.0)
    assert omega["blocks.1.mlp.fc1"] == pytest.approx(0.5 * 2e-4 * 300.0)
    # mean1 puts qkv and fc1 on the same footing; fisher ranks qkv (larger weights) above:
    # (1/2 * 0.02 * 6) / (1/2 * 2e-4 * 300) = 2
    mean1 = type_aware_sensitivity(traces, "mean1")
    assert mean1["blocks.1.attn.qkv"] == pytest.approx(mean1["blocks.1.mlp.fc1"])
    assert omega["blocks.1.attn.qkv"] / omega["blocks.1.mlp.fc1"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="weight energy"):
        type_aware_sensitivity(traces, "fisher")
    with pytest.raises(ValueError, match="type weighting must be one of"):
        type_aware_sensitivity(traces, "equal")
    src = tiny_source()
    names = scope_layers(src.layer_names(), "blocks")
    e = weight_energy(src.model, names)
    w = layer_module(src.model, names[0]).weight.detach().double()
    assert e[names[0]] == pytest.approx(float((w ** 2).mean()))


@pytest.mark.parametrize("field,value", [("qat_steps", -1), ("qat_steps", 1.5), ("qat_lr", 0.0),
                                         ("qat_lr", float("nan")), ("qat_lr", "1e-4"), ("qat_batch", 0),
                                         ("type_weighting", "mean"), ("rounds", -2), ("error_images", 0)])
def test_bad_config_values_name_their_field(field, value):
    with pytest.raises(ValueError, match=f"LampQConfig.{field} "):
        LampQConfig(**{field: value})


def test_qat_lowers_the_calibration_loss_of_the_quantised_model():
    """Without QAT the quantised model's distillation loss is loss_before (measured on the
    untouched model); a few STE steps at the same bits lower it, and the fp32 teacher stays."""
    src, data = tiny_source(), tiny_data(64)
    names = scope_layers(src.layer_names(), "blocks")
    pick = {n: (4, 4) for n in names}
    teacher = teacher_logits(src.model, data)
    untouched = distillation_loss(src.model, pick, data, teacher)
    assert untouched > 0
    model = copy.deepcopy(src.model)
    res = qat_finetune(model, pick, data, teacher, steps=15, lr=1e-4, batch=32, show_progress=False)
    assert res.loss_before == pytest.approx(untouched, rel=1e-6)
    assert res.loss_after < 0.8 * res.loss_before
    assert res.loss_after == pytest.approx(distillation_loss(model, pick, data, teacher), rel=1e-6)
    assert not any(type(m).__name__ == "ParametrizationList" for m in model.modules())  # STE removed
    # the master weights moved, and the source model did not
    w0 = layer_module(src.model, names[0]).weight
    assert not torch.equal(layer_module(model, names[0]).weight, w0)
    assert torch.equal(teacher, teacher_logits(src.model, data))


def test_qat_that_raises_the_loss_is_reverted():
    src, data = tiny_source(), tiny_data(32)
    pick = {n: (8, 8) for n in scope_layers(src.layer_names(), "blocks")}
    model = copy.deepcopy(src.model)
    res = qat_finetune(model, pick, data, teacher_logits(src.model, data), steps=3, lr=0.5, batch=16,
                       show_progress=False)
    assert res.reverted and res.loss_after == res.loss_before
    original = src.model.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k]), k


def test_converted_qat_model_predicts_what_the_fake_quant_model_predicts(tmp_path):
    src, data = tiny_source(), tiny_data(64)
    with torch.no_grad():  # a random tiny head's logits are ~0: its KD loss is rounding noise, nothing to train
        src.model.head.weight.mul_(30)
    cfg = LampQConfig(a_bits=(4, 8), rounds=1, error_batch=32, qat_steps=8, qat_lr=1e-4, qat_batch=32,
                      show_progress=False)
    lo, hi = feasible_range(src, cfg)
    res = calibrate_lampq(src, data, lo + 0.4 * (hi - lo), cfg)
    assert res.qat and res.source is not src and res.source.checkpoint is None
    assert res.qat[-1].pick == res.pick  # the weights end trained at the bits they ship with
    assert res.policy.meta["qat"]["steps"] == 8 and "QAT 8 steps" in res.report()
    assert not all(q.reverted for q in res.qat)  # a step lowered the loss: the converted weights are trained ones
    model = pyruntime.load(res.source.convert(tmp_path / "qat.pyrt", res.policy))
    for name, (w, a) in res.pick.items():
        lp = model.graph["layers"][name]
        assert (lp["w_bits"], lp["a_bits"]) == (w, a)
    runtime = model.run(data.images).logits
    qm = QuantModel(res.source.model)
    with torch.no_grad(), qm.emulate(_layer_policies(model_layers(res.source.model), res.pick, cfg.block_size)):
        emulated = res.source.model(torch.from_numpy(data.images)).numpy()
    # 4-bit activations: a float rounding tie (fp32 LayerNorm/softmax order) moves a value by a
    # whole quantisation step on the odd image, so most images, not all, agree to float precision
    close = (np.abs(runtime - emulated) < 1e-3 * max(1.0, np.abs(emulated).max())).all(axis=1)
    assert close.mean() >= 0.9, close.mean()
    assert (runtime.argmax(1) == emulated.argmax(1)).mean() >= 0.98
    # ...and it is not simply the untrained model's answer
    plain = pyruntime.load(src.convert(tmp_path / "plain.pyrt", res.policy)).run(data.images).logits
    assert np.abs(plain - runtime).max() > 1e-5


def test_qat_checkpoint_keeps_the_reference_format(tmp_path):
    """save_checkpoint writes the trained weights with the original metadata, so
    ``convert reference --checkpoint`` reads them back into the same model."""
    from test_calibrate_common import write_reference_checkpoint

    from pyruntime.calibrate.common import reference_source
    from pyruntime.reference import read_metadata

    ckpt = write_reference_checkpoint(tmp_path / "ref.safetensors")
    src = reference_source(ckpt)
    model = copy.deepcopy(src.model)
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight.mul_(1.5)
    out = save_checkpoint(src, model, tmp_path / "qat.safetensors")
    assert read_metadata(out) == read_metadata(ckpt)
    back = reference_source(out)
    assert torch.equal(back.model.blocks[0].mlp.fc1.weight, model.blocks[0].mlp.fc1.weight)


def test_delta_model_errors_shrink_with_bits():
    src = tiny_source()
    names = scope_layers(src.layer_names(), "blocks")
    opts = options(LampQConfig(a_bits=(6, 8)))
    errs = model_errors(QuantModel(src.model), names, opts)
    for n in names:
        e = dict(zip(opts, errs[n]))
        assert e[(4, 6)] > e[(4, 8)] > e[(8, 8)] and e[(8, 6)] > e[(8, 8)]


@pytest.mark.parametrize("kind,scope,a_bits", [("bops", "blocks", (8,)), ("bytes", "all", (6, 8))])
def test_lampq_policy_converts_and_runs_with_its_bits(kind, scope, a_bits, tmp_path):
    src, data = tiny_source(), tiny_data(48)
    cfg = LampQConfig(cost=kind, scope=scope, a_bits=a_bits, rounds=2, error_batch=16, show_progress=False)
    lo, hi = feasible_range(src, cfg)
    budget = lo + 0.5 * (hi - lo)
    res = calibrate_lampq(src, data, budget, cfg)
    assert res.cost <= budget and res.cost == policy_cost(src, res.policy, kind)
    assert 1 <= len(res.history) <= cfg.rounds + 1
    assert {w for w, _ in res.pick.values()} == {4, 8}  # a mid budget mixes
    path = src.convert(tmp_path / "lampq.pyrt", res.policy)
    model = pyruntime.load(path)
    for name, (w, a) in res.pick.items():
        lp = model.graph["layers"][name]
        assert (lp["w_bits"], lp["a_bits"]) == (w, a)
    r = model.run(data.images[:8])
    assert (r.bops == bops.static(path)).all()
    if kind == "bops":
        assert bops.static(path) == res.cost
    assert np.isfinite(r.logits).all()
    report = res.report()
    order = [line.split()[0] for line in report.splitlines()[2:2 + len(res.layers)]]
    assert order == sorted(res.layers, key=lambda n: -res.omega[n])  # most sensitive first


def test_lampq_fits_a_latency_table():
    """With a device's latency table the ILP spends seconds: the policy's table latency is
    within the budget, and a table where 4-bit weights are *slower* than 8-bit (as the
    patch embedding measured) keeps 8-bit weights where they are both faster and better."""
    from test_latency import synthetic_table

    from pyruntime.calibrate.common import model_graph
    from pyruntime.policy import Policy

    src, data = tiny_source(), tiny_data(48)
    table = synthetic_table(model_graph(src, Policy())["arch"], seed=5)
    for n in table.layers:  # make int4 slower than int8 everywhere
        table.layers[n][4] = table.layers[n][8] * 2
    costs = CostModel(src, "latency", table=table)
    cfg = LampQConfig(cost="latency", rounds=1, error_batch=16, show_progress=False)
    lo, hi = feasible_range(src, cfg, costs)
    res = calibrate_lampq(src, data, lo + 0.5 * (hi - lo), cfg, costs=costs)
    assert res.cost_kind == "latency" and res.policy.meta["cost_kind"] == "latency"
    assert res.cost == policy_cost(src, res.policy, "latency", table=table) <= lo + 0.5 * (hi - lo)
    assert {w for w, _ in res.pick.values()} == {8}  # 4-bit: slower and worse
    assert "s of budget" in res.report()


def test_impossible_budget_names_the_smallest_feasible():
    src = tiny_source()
    lo, _ = feasible_range(src, LampQConfig())
    assert lo == int(lo)
    with pytest.raises(ValueError, match=f"budget {int(lo) - 1} BOPs cannot be met: the smallest feasible budget is {int(lo)} BOPs"):
        calibrate_lampq(src, tiny_data(8), lo - 1, LampQConfig(show_progress=False))
    with pytest.raises(ValueError, match=f"smallest feasible budget is {int(lo)} BOPs"):
        calibrate_naive(src, lo - 1)
    w4a4 = policy_cost(src, uniform_policy(4, 4), "bops")
    with pytest.raises(ValueError, match=f"smallest feasible budget is {w4a4} BOPs"):
        uniform_under_budget(src, w4a4 - 1)
    _, hi = feasible_range(src, LampQConfig(cost="bytes"))
    with pytest.raises(ValueError, match="smallest feasible budget is [0-9]+ bytes"):
        calibrate_lampq(src, tiny_data(8), 100, LampQConfig(cost="bytes", show_progress=False))


def test_baselines_keep_the_budget():
    src = tiny_source()
    cfg = LampQConfig()
    lo, hi = feasible_range(src, cfg)
    for f in (0.0, 0.3, 0.7, 1.0):
        budget = lo + f * (hi - lo)
        policy, alloc = calibrate_naive(src, budget, cfg)
        assert policy_cost(src, policy, "bops") <= budget
        rnd, ralloc = calibrate_random(src, budget, cfg, seed=3)
        assert policy_cost(src, rnd, "bops") <= budget and set(ralloc) == set(alloc)
        u = uniform_under_budget(src, budget)
        assert policy_cost(src, u, "bops") <= budget
    assert uniform_under_budget(src, hi).name == "w8a8"
    costs = CostModel(src, "bops")
    assert costs.unit() == "BOPs"


def test_cli_qat_writes_a_checkpoint_that_converts_with_the_policy(tmp_path, capsys):
    """``calibrate --method lampq --qat-steps N --qat-checkpoint C``: the policy and the trained
    weights; ``convert reference --checkpoint C --policy P`` gives the allocated bits. Without
    the checkpoint path the flags are a one-line error."""
    from test_calibrate_common import write_reference_checkpoint

    from pyruntime.calibrate.cli import main
    from pyruntime.policy import Policy
    from pyruntime.reference import convert_reference

    require_data()
    ckpt = write_reference_checkpoint(tmp_path / "tiny.safetensors")
    common = ["calibrate", "--method", "lampq", "--checkpoint", str(ckpt), "--images", "48", "--budget-bops", "0.95x", "--a-bits", "4,8",
              "--rounds", "0", "--no-progress", "--out", str(tmp_path / "p.json")]
    assert main(common + ["--qat-steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "--qat-checkpoint PATH go together" in err and len(err.strip().splitlines()) == 1
    assert main(common + ["--qat-steps", "2", "--qat-checkpoint", str(tmp_path / "qat.safetensors")]) == 0
    from safetensors.torch import load_file

    before, after = load_file(str(ckpt)), load_file(str(tmp_path / "qat.safetensors"))
    policy = Policy.load(tmp_path / "p.json")
    qat = policy.meta["qat"]
    assert qat["steps"] == 2 and 0 <= qat["reverted"] <= qat["trainings"]
    # the checkpoint holds the trained weights, or the originals when every step was undone
    changed = any(not torch.equal(before[k], after[k]) for k in before)
    assert set(before) == set(after) and changed == (qat["reverted"] < qat["trainings"])
    model = pyruntime.load(convert_reference(tmp_path / "q.pyrt", policy, path=tmp_path / "qat.safetensors"))
    for name, lp in policy.layers.items():
        assert model.graph["layers"][name]["w_bits"] == lp.w_bits
