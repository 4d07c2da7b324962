"""Exit heads and the calibrators on the families beyond the plain ViT: EVA-02 (RoPE, split
q/k/v, split SwiGLU), a 'mixed'-RoPE ViT, BEiT (q/v biases, relative position bias), parallel
blocks and SigLIP's attention-pooling head. What makes them calibratable is checked where it
can fail: the fused model keeps timm's function, every layer of the converter's program is one
module its forward calls once, the emulation follows the runtime, exit heads fitted through
timm's own forward are the ones the runtime evaluates, and each method's policy converts and
runs within its budget."""
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import pyruntime  # noqa: E402
from pyruntime.calibrate.common import CalibrationData, policy_cost, run_batches, torch_source  # noqa: E402
from pyruntime.calibrate.emulate import QuantModel, layer_module  # noqa: E402
from pyruntime.convert import convert  # noqa: E402
from pyruntime.exits import fit_exit_heads, pooled_block_features  # noqa: E402
from pyruntime.policy import ExitPolicy, LayerPolicy, Policy, PredictorPolicy  # noqa: E402

pytestmark = pytest.mark.torch

CLASSES = 3
SMALL = dict(depth=3, embed_dim=32, num_heads=2, num_classes=CLASSES, in_chans=1)
FAMILIES = {
    "eva02": ("eva02_tiny_patch14_224", dict(SMALL, img_size=28)),           # split q/k/v and SwiGLU, RoPE
    "rope_mixed": ("vit_small_patch16_rope_mixed_224", dict(SMALL, img_size=32)),
    "beit": ("beit_base_patch16_224", dict(SMALL, img_size=32)),             # q/v biases, rel. position bias
    "parallel": ("vit_small_patch16_18x2_224", dict(SMALL, img_size=32)),     # two branches per block
    "siglip_map": ("vit_base_patch16_siglip_224", dict(SMALL, img_size=32)),  # attention-pooling head
}
PRE = {"mean": [0.5], "std": [0.25]}


def family_model(case: str):
    """The case's tiny model, the same on every call, its weights perturbed so blocks matter."""
    name, kwargs = FAMILIES[case]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def teacher_data(model, n: int, seed: int = 0) -> CalibrationData:
    """Random images labelled by the model's own fp32 predictions."""
    H, W = model.patch_embed.img_size
    x = np.random.default_rng(seed).standard_normal((n, 1, H, W)).astype(np.float32)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(-1).numpy().astype(np.int64)
    return CalibrationData(x, y, {"dataset": "teacher", "images": n, "seed": seed})


@pytest.mark.parametrize("case", sorted(FAMILIES))
def test_fused_model_keeps_its_function_and_calls_each_layer_once(case, tmp_path):
    original = family_model(case)
    src = torch_source(copy.deepcopy(original), PRE, name=case)
    x = torch.from_numpy(teacher_data(original, 4).images)
    with torch.no_grad():
        want, got = original.forward_features(x), src.model.forward_features(x)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    calls = {n: 0 for n in src.layer_names()}
    hooks = [layer_module(src.model, n).register_forward_pre_hook(
        lambda m, a, n=n: calls.__setitem__(n, calls[n] + 1)) for n in calls]
    with torch.no_grad():
        src.model(x)
    for h in hooks:
        h.remove()
    assert calls == {n: 1 for n in calls}
    # the fused model converts to the same program and numbers as timm's own form
    a = pyruntime.load(convert(original, tmp_path / "a.pyrt", preprocess=PRE)).run(x.numpy(), tokens=True)
    b = pyruntime.load(src.convert(tmp_path / "b.pyrt", Policy())).run(x.numpy(), tokens=True)
    np.testing.assert_allclose(b.tokens, a.tokens, rtol=1e-5, atol=1e-5 * np.abs(a.tokens).max())


@pytest.mark.parametrize("case", sorted(FAMILIES))
@pytest.mark.parametrize("w_bits,a_bits,pattern", [(8, 8, "blocks.*"), (4, 6, "*")])
def test_emulation_follows_the_runtime(case, w_bits, a_bits, pattern, tmp_path):
    src = torch_source(family_model(case), PRE, name=case)
    data = teacher_data(src.model, 24)
    policy = Policy(layers={pattern: LayerPolicy(w_bits, a_bits)}, predictor=PredictorPolicy(block=0, chunk=16, coeffs={}))
    logits, _, _, stat = run_batches(pyruntime.load(src.convert(tmp_path / "m.pyrt", policy)), data.images,
                                     enabled=False)
    with torch.no_grad(), QuantModel(src.model).emulate(policy.resolve(src.layer_names(), src.depth),
                                                        policy.predictor) as state:
        ours = src.model(torch.from_numpy(data.images)).numpy()
    np.testing.assert_allclose(ours, logits, atol=0.05 * np.abs(logits).max())
    np.testing.assert_allclose(state["r"].numpy(), stat, rtol=1e-5)


@pytest.mark.parametrize("case", sorted(FAMILIES))
def test_int8_attention_emulation_follows_the_runtime(case, tmp_path):
    """Eva's RoPE before the quantised q and k, BEiT's relative position bias on the scores,
    parallel branches; SigLIP's attention-pooling head stays fp32 (as in the runtime)."""
    src = torch_source(family_model(case), PRE, name=case)
    data = teacher_data(src.model, 16)
    policy = Policy(layers={"blocks.*": LayerPolicy(8, 8)}, attn_bits=8)
    logits = run_batches(pyruntime.load(src.convert(tmp_path / "m.pyrt", policy)), data.images, enabled=False)[0]
    layers = policy.resolve(src.layer_names(), src.depth)
    with torch.no_grad(), QuantModel(src.model).emulate(layers, attn_bits=8):
        ours = src.model(torch.from_numpy(data.images)).numpy()
    with torch.no_grad(), QuantModel(src.model).emulate(layers, attn_bits=32):
        fp_attention = src.model(torch.from_numpy(data.images)).numpy()
    scale = np.abs(logits).max()
    np.testing.assert_allclose(ours, logits, atol=0.02 * scale)
    # closer to the runtime than the same model with fp32 attention is
    assert np.abs(ours - logits).max() < np.abs(fp_attention - logits).max()


def test_int8_attention_emulation_refuses_an_attention_that_bypasses_sdpa(monkeypatch):
    """A forward that ignores ``fused_attn`` would silently stay fp32: it is refused instead."""
    src = torch_source(family_model("beit"), PRE, name="beit")
    cls = type(src.model.blocks[0].attn)
    timm_forward = cls.forward

    def manual_forward(self, x, shared_rel_pos_bias=None):
        self.fused_attn = False
        return timm_forward(self, x, shared_rel_pos_bias)

    x = torch.from_numpy(teacher_data(src.model, 2).images)
    monkeypatch.setattr(cls, "forward", manual_forward)
    with pytest.raises(ValueError, match="without F.scaled_dot_product_attention.*attention 32"):
        with torch.no_grad(), QuantModel(src.model).emulate({}, attn_bits=8):
            src.model(x)


@pytest.mark.parametrize("case", ["eva02", "rope_mixed", "beit", "parallel"])
def test_exit_heads_fit_through_timms_forward_are_what_the_runtime_evaluates(case, tmp_path):
    model = family_model(case)
    data = teacher_data(model, 96)
    heads, report = fit_exit_heads(model, data, [0, 1], epochs=2, show_progress=False)
    assert set(report.top1) == {0, 1}
    x = data.images[:8]
    with torch.no_grad():
        pooled = pooled_block_features(model, torch.from_numpy(x), [1])[1]
        h = heads[1]
        z = torch.nn.functional.layer_norm(pooled, (pooled.shape[-1],), torch.from_numpy(h["norm.weight"]),
                                           torch.from_numpy(h["norm.bias"]), eps=1e-6)
        want = (z @ torch.from_numpy(h["fc.weight"]).T + torch.from_numpy(h["fc.bias"])).numpy()
    policy = Policy(exits=[ExitPolicy(1, "confidence", 0.0)])  # every image leaves at block 1
    r = pyruntime.load(convert(model, tmp_path / "m.pyrt", policy=policy, exits=heads, preprocess=PRE)).run(x)
    assert (r.exit_block == 1).all()
    np.testing.assert_allclose(r.logits, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_exit_heads_refuse_attention_pooling():
    model = family_model("siglip_map")
    with pytest.raises(ValueError, match="global_pool 'token' or 'avg'.*'map' \\(an attention-pooling head"):
        fit_exit_heads(model, teacher_data(model, 16), [0], show_progress=False)


@pytest.mark.parametrize("case", ["eva02", "beit", "parallel", "siglip_map"])
def test_lampq_policy_converts_meets_its_budget_and_runs(case, tmp_path):
    from pyruntime.calibrate.lampq import LampQConfig, calibrate_lampq, feasible_range

    src = torch_source(family_model(case), PRE, name=case)
    data = teacher_data(src.model, 48)
    cfg = LampQConfig(scope="all", a_bits=(6, 8), rounds=1, error_images=32, error_batch=32, fisher_batch=32,
                      show_progress=False)
    lo, hi = feasible_range(src, cfg)
    res = calibrate_lampq(src, data, lo + 0.5 * (hi - lo), cfg)
    bits = {lp.w_bits for n, lp in res.policy.layers.items()}
    assert bits == {4, 8}, res.policy.layers  # a mid budget mixes the two
    assert policy_cost(src, res.policy, "bops") <= lo + 0.5 * (hi - lo)
    r = pyruntime.load(src.convert(tmp_path / "m.pyrt", res.policy)).run(data.images[:4])
    assert r.logits.shape == (4, CLASSES) and np.isfinite(r.logits).all()


@pytest.mark.parametrize("case", ["eva02", "beit"])
def test_maqee_calibrates_a_family_with_exit_heads(case, tmp_path):
    from pyruntime.calibrate.maqee import MaqeeConfig, calibrate_maqee
    from pyruntime.calibrate.uniform import uniform_policy

    model = family_model(case)
    data = teacher_data(model, 320)
    heads, _ = fit_exit_heads(model, data, [0, 1], epochs=5, show_progress=False)
    src = torch_source(model, PRE, name=case)
    budget = policy_cost(src, uniform_policy(8, 8), "bops")
    cfg = MaqeeConfig(max_drop=0.2, exit_blocks=[0, 1], rounds=2, grid=16, show_progress=False, num_threads=1,
                      error_images=64, fisher_images=64)
    res = calibrate_maqee(src, data, budget, cfg, exits=heads)
    r = pyruntime.load(convert(model, tmp_path / "m.pyrt", policy=res.policy, exits=heads, preprocess=PRE)).run(
        data.images[:32])
    assert np.isfinite(r.logits).all() and set(np.unique(r.exit_block)) <= {0, 1, 2}


@pytest.mark.parametrize("case", ["eva02", "beit"])
def test_scalepredictor_predicts_scales_on_a_family(case, tmp_path):
    from pyruntime.calibrate.scalepredictor import calibrate_scalepredictor
    from pyruntime.calibrate.uniform import uniform_policy

    src = torch_source(family_model(case), PRE, name=case)
    data = teacher_data(src.model, 64)
    res = calibrate_scalepredictor(src, data, uniform_policy(8, 6), block=0, chunk=16, show_progress=False)
    pol = res.policy
    assert pol.predictor is not None and pol.predictor.block == 0
    predicted = {n for n, lp in pol.resolve(src.layer_names(), src.depth).items() if lp.scale == "predicted"}
    assert predicted and all(int(n.split(".")[1]) >= 1 for n in predicted)  # the layers after the statistic
    r = pyruntime.load(src.convert(tmp_path / "m.pyrt", pol)).run(data.images[:8])
    assert np.isfinite(r.logits).all()


def test_quee_gates_a_family(tmp_path):
    from pyruntime.calibrate.quee import fit_quee

    model = family_model("eva02")
    data = teacher_data(model, 160)
    heads, _ = fit_exit_heads(model, data, [0, 1], epochs=5, show_progress=False)
    src = torch_source(model, PRE, name="eva02")
    fit = fit_quee(src, data, gate_blocks=[0, 1], reduced=LayerPolicy(4, a_bits=8), topk=2, hidden=4, clusters=4,
                   steps=50, exits=heads, num_threads=1)
    policy = fit.policy(0.1)
    r = pyruntime.load(convert(model, tmp_path / "m.pyrt", policy=policy, exits=heads, preprocess=PRE)).run(
        data.images[:32])
    assert np.isfinite(r.logits).all() and r.logits.shape == (32, CLASSES)


@pytest.mark.parametrize("name, case", [("beit_base_patch16_224", "beit"), ("vit_small_patch16_18x2_224", "parallel"),
                                        ("eva02_tiny_patch14_224", "eva02")])
def test_a_timm_source_lists_and_types_the_programs_layers(name, case):
    """What `pyruntime calibrate --model` builds: the converter's layer names, each typed."""
    from pyruntime.calibrate.common import layer_type, timm_source
    from pyruntime.convert import program_graph
    from pyruntime.modelfile import graph_layer_names

    src = timm_source(name, FAMILIES[case][1], random_weights=True)
    names = src.layer_names()
    assert names == graph_layer_names(program_graph(family_model(case)))
    kinds = [layer_type(n) for n in names]
    assert kinds[0] == "patch_embed" and kinds[-1] == "head"
    branches = 2 if case == "parallel" else 1
    per_block = sorted(["qkv", "proj", "fc1", "fc2"] * branches)
    blocks = [kinds[1 + i * len(per_block): 1 + (i + 1) * len(per_block)] for i in range(SMALL["depth"])]
    assert [sorted(b) for b in blocks] == [per_block] * SMALL["depth"] and len(kinds) == 2 + SMALL["depth"] * len(per_block)


@pytest.mark.parametrize("case", ["eva02", "beit", "rope_mixed"])
def test_fused_weights_go_back_into_timms_layout(case):
    """A calibrated (here: changed) fused model's weights load strictly into the model timm
    builds, and compute what the fused model computes (LampQ's --qat-checkpoint)."""
    from pyruntime.convert import timm_state_dict

    from pyruntime.convert import zero_fused_gaps

    src = torch_source(family_model(case), PRE, name=case)
    with torch.no_grad():
        for name in src.layer_names():
            mod = layer_module(src.model, name)
            mod.weight.mul_(1.5)
            if mod.bias is not None:
                mod.bias.add_(0.25)
    if case == "eva02":  # its k projection has no bias: a moved k bias has no place in timm's layout
        with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv\.bias rows 32\.\.63 are no longer zero"):
            timm_state_dict(src.model)
    zero_fused_gaps(src.model)
    fresh = timm.create_model(FAMILIES[case][0], pretrained=False, **FAMILIES[case][1]).eval()
    fresh.load_state_dict(timm_state_dict(src.model), strict=True)
    x = torch.from_numpy(teacher_data(fresh, 4).images)
    with torch.no_grad():
        want, got = src.model(x), fresh(x)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_lampq_qat_on_eva_keeps_a_checkpoint_timm_loads(tmp_path):
    """QAT trains every parameter of the fused model; Eva's fused k-bias rows stay zero, so the
    trained weights are saved in timm's layout and load strictly into the model timm builds."""
    from safetensors.torch import load_file

    from pyruntime.calibrate.lampq import LampQConfig, calibrate_lampq, feasible_range, save_checkpoint

    src = torch_source(family_model("eva02"), PRE, name="eva02")
    data = teacher_data(src.model, 48)
    cfg = LampQConfig(rounds=1, error_images=32, error_batch=32, fisher_batch=32, qat_steps=8, qat_lr=1e-4,
                      qat_batch=16, show_progress=False)
    lo, hi = feasible_range(src, cfg)
    res = calibrate_lampq(src, data, lo, cfg)  # every layer at 4 bits: QAT has error to remove
    assert not res.qat[0].reverted, res.qat[0]
    trained = res.source.model
    assert res.source is not src and not torch.equal(trained.blocks[0].attn.qkv.weight, src.model.blocks[0].attn.qkv.weight)
    path = save_checkpoint(src, trained, tmp_path / "qat.safetensors")
    fresh = timm.create_model(FAMILIES["eva02"][0], pretrained=False, **FAMILIES["eva02"][1]).eval()
    fresh.load_state_dict(load_file(str(path)), strict=True)
    x = torch.from_numpy(data.images[:4])
    with torch.no_grad():
        np.testing.assert_allclose(fresh(x).numpy(), trained(x).numpy(), rtol=1e-5, atol=1e-5)
