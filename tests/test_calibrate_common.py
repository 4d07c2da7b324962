"""Shared calibration pieces: costs agree with converted files, the torch emulation agrees
with the runtime, calibration data is a fixed subset. Also the tiny models other
test_calibrate_* files import."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

import pyruntime
from pyruntime import bops
from pyruntime.calibrate.common import (REFERENCE_PARTS, REFERENCE_TRAIN_IMAGES, CalibrationData, CostModel, calibration_data, policy_cost, run_batches,
                                        scope_layers, torch_source)
from pyruntime.calibrate.emulate import QuantModel
from pyruntime.modelfile import read_model
from pyruntime.policy import LayerPolicy, Policy, PredictorPolicy
from _helpers import needs_data

TINY = dict(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=32, depth=3, num_heads=2,
            mlp_ratio=2.0, qkv_bias=True)


def tiny_vit(seed=0, **kw):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(**dict(TINY, **kw)).eval()


def tiny_source(seed=0, **kw):
    return torch_source(tiny_vit(seed, **kw), {"mean": [0.5], "std": [0.25]}, name="tiny")


def tiny_data(n=64, seed=0, classes=3, size=8):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 1, size, size)).astype(np.float32)
    return CalibrationData(x, rng.integers(0, classes, n).astype(np.int64), {"dataset": "random", "images": n})


def write_reference_checkpoint(path, seed=0, **kw):
    """A reference-format checkpoint (28x28 Fashion-MNIST input) of a random tiny ViT."""
    from safetensors.torch import save_file

    kwargs = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=16, depth=2, num_heads=2,
                  mlp_ratio=2.0, qkv_bias=True, class_token=True, global_pool="token")
    kwargs.update(kw)
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(**kwargs)
    meta = {"timm_kwargs": json.dumps(kwargs), "mean": "0.2860405969887955", "std": "0.35302424451492254",
            "exit_blocks": "[1]", "extra_exit_blocks": "[]", "classes": json.dumps([str(i) for i in range(10)]),
            "format": "pyruntime-reference-v1"}
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("kind", ["bops", "bytes"])
def test_cost_model_adds_up_to_the_converted_file(kind, tmp_path):
    src = tiny_source()
    names = scope_layers(src.layer_names(), "all")
    rng = np.random.default_rng(0)
    alloc = {n: (int(rng.choice([4, 8])), int(rng.choice([4, 6, 8]))) for n in names}
    policy = Policy(layers={n: LayerPolicy(w, a) for n, (w, a) in alloc.items()})
    costs = CostModel(src, kind)
    predicted = costs.fixed(names, Policy()) + sum(costs.cost(n, w, a) for n, (w, a) in alloc.items())
    assert predicted == policy_cost(src, policy, kind)
    path = src.convert(tmp_path / "m.pyrt", policy)
    graph, tensors, _, _ = read_model(path)
    if kind == "bops":
        assert predicted == bops.static(path)
        r = pyruntime.load(path).run(tiny_data(4).images)
        assert (r.bops == predicted).all()
    else:
        assert predicted == sum(t.nbytes for t in tensors.values())


def test_policy_cost_of_exits_and_gates_is_the_converted_files(tmp_path):
    """Exit heads (bytes and BOPs) and QuEE gates (reduced copies, gate MLPs) are costed as
    the converted file holds and the runtime counts them."""
    from pyruntime.convert import convert
    from pyruntime.policy import ExitPolicy, GatePolicy

    src = tiny_source()
    arch = src.arch
    D, C = arch["embed_dim"], arch["num_classes"]
    rng = np.random.default_rng(1)
    heads = {b: {"norm.weight": np.ones(D, np.float32), "norm.bias": np.zeros(D, np.float32),
                 "fc.weight": rng.standard_normal((C, D)).astype(np.float32), "fc.bias": np.zeros(C, np.float32)}
             for b in (0,)}
    w = {"fc1.weight": rng.standard_normal((4, 3)).tolist(), "fc1.bias": [0.0] * 4,
         "fc2.weight": rng.standard_normal((3, 4)).tolist(), "fc2.bias": [0.0, 0.0, 0.0]}
    for exits, gates in (([ExitPolicy(0, "confidence", 0.8)], None),
                         ([ExitPolicy(0, "gate")], GatePolicy(0.1, 2, 4, {0: [0.0, 0.5, 0.3]},
                                                              {"blocks.*": LayerPolicy(4, 6)}, {0: w}))):
        policy = Policy(layers={"blocks.*": LayerPolicy(8, 8)}, exits=exits, gates=gates)
        path = convert(src.model, tmp_path / "m.pyrt", policy=policy, exits=heads, preprocess=src.preprocess)
        _, tensors, _, _ = read_model(path)
        assert policy_cost(src, policy, "bytes") == sum(t.nbytes for t in tensors.values())
        assert policy_cost(src, policy, "bops") == bops.static(path)


@pytest.mark.parametrize("w_bits,a_bits,pattern", [(8, 8, "blocks.*"), (4, 6, "blocks.*"), (8, 8, "*")])
def test_emulation_follows_the_runtime(w_bits, a_bits, pattern, tmp_path):
    src = tiny_source()
    data = tiny_data(32)
    policy = Policy(layers={pattern: LayerPolicy(w_bits, a_bits)},
                    predictor=PredictorPolicy(block=0, chunk=16, coeffs={}))
    model = pyruntime.load(src.convert(tmp_path / "m.pyrt", policy))
    logits, _, _, stat = run_batches(model, data.images, enabled=False)
    with torch.no_grad(), QuantModel(src.model).emulate(policy.resolve(src.layer_names(), src.depth),
                                                        policy.predictor) as state:
        ours = src.model(torch.from_numpy(data.images)).numpy()
    np.testing.assert_allclose(ours, logits, atol=0.05 * np.abs(logits).max())
    np.testing.assert_allclose(state["r"].numpy(), stat, rtol=1e-5)


@needs_data
def test_calibration_data_is_a_fixed_subset():
    a, b = calibration_data(16, seed=3), calibration_data(16, seed=3)
    assert np.array_equal(a.images, b.images) and a.summary == b.summary
    assert a.images.shape == (16, 1, 28, 28) and a.images.dtype == np.float32
    assert calibration_data(16, seed=4).summary["indices_sha256"] != a.summary["indices_sha256"]
    with pytest.raises(ValueError, match="has 5000 .* images"):
        calibration_data(5001)
    with pytest.raises(ValueError, match="part must be one of"):
        calibration_data(8, part="test")


def test_reference_parts_are_disjoint_and_held_out_of_training():
    from pyruntime.reference import HOLDOUT_IMAGES

    (c0, c1), (v0, v1) = REFERENCE_PARTS["calibration"], REFERENCE_PARTS["validation"]
    assert c0 == REFERENCE_TRAIN_IMAGES - HOLDOUT_IMAGES and c1 == v0 and v1 == REFERENCE_TRAIN_IMAGES
    cal, val = calibration_data(64, seed=1), calibration_data(64, seed=1, part="validation")
    assert cal.summary["range"] == [c0, c1] and val.summary["range"] == [v0, v1]
    assert cal.summary["indices_sha256"] != val.summary["indices_sha256"]


def test_emulation_quantises_from_fp32_and_restores_the_weights():
    src = tiny_source()
    original = src.model.blocks[0].attn.qkv.weight.detach().clone()
    qm = QuantModel(src.model)
    with qm.emulate(Policy(layers={"blocks.*": LayerPolicy(4, 8)}).resolve(src.layer_names(), src.depth)):
        assert not torch.equal(src.model.blocks[0].attn.qkv.weight, original)  # 4-bit weights in place
        w8 = qm.weight("blocks.0.attn.qkv", 8).clone()  # first asked for while swapped
    assert torch.equal(w8, QuantModel(src.model).weight("blocks.0.attn.qkv", 8))
    assert torch.equal(src.model.blocks[0].attn.qkv.weight, original)
