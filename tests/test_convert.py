"""pyruntime.convert against timm: every supported ViT variant, converted to fp32, runs in the
numpy reference with the logits timm computes; quantised layers hold the runtime quantiser's
values; exits, checkpoints and policies are wired through; unsupported models are refused
with an error naming the feature."""
from __future__ import annotations

import hashlib
import json
from functools import partial

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import torch.nn as nn  # noqa: E402
from timm.layers import SwiGLUPacked  # noqa: E402
from timm.models.deit import VisionTransformerDistilled  # noqa: E402
from timm.models.vision_transformer import ResPostBlock, VisionTransformer  # noqa: E402

from pyruntime import _numpy_ref, bops, kernels  # noqa: E402
from pyruntime.convert import convert, model_arch  # noqa: E402
from pyruntime.errors import PolicyError  # noqa: E402
from pyruntime.modelfile import read_model, unpack_int4  # noqa: E402
from pyruntime.policy import ExitPolicy, LayerPolicy, Policy, PredictorPolicy  # noqa: E402

from _helpers import images, perturbed, rel_err  # noqa: E402

pytestmark = pytest.mark.torch

SMALL = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)

VARIANTS = {
    "plain": lambda: VisionTransformer(**SMALL),
    "avg_fc_norm": lambda: VisionTransformer(**SMALL, global_pool="avg"),
    "avg_final_norm": lambda: VisionTransformer(**SMALL, global_pool="avg", fc_norm=False),
    "no_qkv_bias": lambda: VisionTransformer(**SMALL, qkv_bias=False),
    "layer_scale": lambda: VisionTransformer(**SMALL, init_values=1e-1),
    "reg_tokens": lambda: VisionTransformer(**SMALL, reg_tokens=2, no_embed_class=True),
    "dinov2_like": lambda: VisionTransformer(**dict(SMALL, img_size=28, patch_size=14), init_values=1e-1,
                                             no_embed_class=True),
    "dinov2_reg_like": lambda: VisionTransformer(**dict(SMALL, img_size=28, patch_size=14), init_values=1e-1,
                                                 no_embed_class=True, reg_tokens=4),
    "distilled": lambda: VisionTransformerDistilled(**SMALL),
    "gray_nonsquare": lambda: VisionTransformer(**dict(SMALL, img_size=(32, 24), patch_size=(8, 4)), in_chans=1),
    "no_cls_avg": lambda: VisionTransformer(**SMALL, class_token=False, global_pool="avg"),
    "pre_norm_no_patch_bias": lambda: VisionTransformer(**SMALL, pre_norm=True),
    "deeper_eps": lambda: VisionTransformer(**dict(SMALL, depth=3), norm_layer=partial(nn.LayerNorm, eps=1e-5)),
}


def timm_logits(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(x).numpy()


# --- every supported variant matches timm ------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fp32_matches_timm(variant, tmp_path):
    model = perturbed(VARIANTS[variant]())
    path = convert(model, tmp_path / f"{variant}.pyrt", policy="fp32")
    graph, tensors, _, _ = read_model(path)
    x = images(model, 3)
    logits, exit_block, per = _numpy_ref.forward(graph, tensors, x.numpy())
    assert rel_err(logits, timm_logits(model, x)) <= 1e-4
    assert exit_block.tolist() == [graph["arch"]["depth"] - 1] * 3
    assert per.tolist() == [bops.static(graph)] * 3


def test_arch_mapping():
    a = model_arch(perturbed(VARIANTS["reg_tokens"]()))
    assert a == {
        "img_size": [32, 32], "patch_size": [8, 8], "in_chans": 3, "embed_dim": 48, "depth": 2,
        "num_heads": 3, "mlp_hidden": 192, "num_classes": 10, "cls_token": True, "dist_token": False,
        "reg_tokens": 2, "no_embed_class": True, "global_pool": "token", "fc_norm": False,
        "final_norm": True, "norm_pre": False, "layer_scale": False, "qkv_bias": True, "eps": 1e-6,
    }
    a = model_arch(perturbed(VARIANTS["distilled"]()))
    assert a["dist_token"] and a["cls_token"]
    a = model_arch(perturbed(VARIANTS["no_cls_avg"]()))
    assert (a["cls_token"], a["global_pool"], a["fc_norm"], a["final_norm"]) == (False, "avg", True, False)
    a = model_arch(perturbed(VARIANTS["gray_nonsquare"]()))
    assert (a["img_size"], a["patch_size"], a["in_chans"]) == ([32, 24], [8, 4], 1)
    assert model_arch(VARIANTS["layer_scale"]())["layer_scale"]
    assert not model_arch(VARIANTS["no_qkv_bias"]())["qkv_bias"]


def test_patch_embed_without_bias_is_stored_without_bias(tmp_path):
    graph, tensors, _, _ = read_model(convert(perturbed(VARIANTS["pre_norm_no_patch_bias"]()), tmp_path / "m.pyrt"))
    assert graph["arch"]["norm_pre"] and "patch_embed.bias" not in tensors
    assert tensors["patch_embed.weight"].shape == (48, 3 * 8 * 8)


# --- quantised layers ---------------------------------------------------------------------------

@pytest.mark.parametrize("short, bits, tol", [("w8a8", 8, 0.05), ("w4a8", 4, 0.25)])
def test_quantised_shorthands(short, bits, tol, tmp_path):
    model = perturbed(VARIANTS["layer_scale"]())
    graph, tensors, policy_json, prov = read_model(convert(model, tmp_path / "m.pyrt", policy=short))
    assert prov["policy"] == short and json.loads(policy_json)["name"] == short
    assert graph["layers"]["patch_embed"]["w_bits"] == 32 and graph["layers"]["head"]["w_bits"] == 32
    w = model.blocks[1].mlp.fc1.weight.detach().numpy()
    q_want, s_want = kernels.quantize_weights(w, bits).canonical()
    name = "blocks.1.mlp.fc1"
    if bits == 8:
        np.testing.assert_array_equal(tensors[f"{name}.weight.q8"], q_want)
        np.testing.assert_array_equal(tensors[f"{name}.weight.scale"], s_want)
    else:
        np.testing.assert_array_equal(unpack_int4(tensors[f"{name}.weight.q4"], w.shape[1]), q_want)
        np.testing.assert_array_equal(tensors[f"{name}.weight.scale"], np.asarray(s_want).reshape(w.shape[0], -1))
    x = images(model, 3)
    logits, _, _ = _numpy_ref.forward(graph, tensors, x.numpy())
    assert rel_err(logits, timm_logits(model, x)) < tol
    unq, _, _ = _numpy_ref.forward(graph, tensors, x.numpy(), quantized=False)
    assert rel_err(unq, timm_logits(model, x)) < tol


def test_int4_odd_patch_dim_and_bigger_blocks(tmp_path):
    torch.manual_seed(0)  # timm's init draws from the global generator: the 0.25 bound is for this model
    model = perturbed(VisionTransformer(**dict(SMALL, img_size=28, patch_size=7), in_chans=1))  # K = 49
    pol = Policy(layers={"patch_embed": LayerPolicy(4), "blocks.*": LayerPolicy(4, block_size=64)})
    graph, tensors, _, _ = read_model(convert(model, tmp_path / "m.pyrt", policy=pol))
    assert tensors["patch_embed.weight.q4"].shape == (48, 25)
    assert tensors["patch_embed.weight.scale"].shape == (48, 2)
    assert tensors["blocks.0.mlp.fc2.weight.scale"].shape == (48, 3)  # K = 192 in blocks of 64
    x = images(model, 3)
    assert rel_err(_numpy_ref.forward(graph, tensors, x.numpy())[0], timm_logits(model, x)) < 0.25


def test_static_and_predicted_scales(tmp_path):
    model = perturbed(VARIANTS["plain"]())
    pol = Policy(
        layers={"blocks.1.attn.qkv": LayerPolicy(8, scale="static", static_scale=0.05),
                "blocks.1.mlp.fc1": LayerPolicy(8, scale="predicted")},
        predictor=PredictorPolicy(block=0, chunk=48, coeffs={"blocks.1.mlp.fc1": [0.0, 0.02]}),
        name="scales",
    )
    graph, tensors, _, _ = read_model(convert(model, tmp_path / "m.pyrt", policy=pol))
    assert graph["predictor"] == pol.predictor.to_dict()
    assert graph["layers"]["blocks.1.attn.qkv"]["static_scale"] == 0.05
    x = images(model, 3)
    assert rel_err(_numpy_ref.forward(graph, tensors, x.numpy())[0], timm_logits(model, x)) < 0.1


def test_policy_from_json_file(tmp_path):
    pol_path = tmp_path / "p.json"
    Policy.shorthand("w8a8").save(pol_path)
    graph, _, _, _ = read_model(convert(perturbed(VARIANTS["plain"]()), tmp_path / "m.pyrt", policy=str(pol_path)))
    assert graph["layers"]["blocks.0.attn.qkv"]["w_bits"] == 8


def test_policy_not_shorthand_nor_file(tmp_path):
    with pytest.raises(PolicyError, match="neither a shorthand"):
        convert(VARIANTS["plain"](), tmp_path / "m.pyrt", policy="w2a2")


# --- exits and checkpoints ---------------------------------------------------------------------

def exit_heads(model: nn.Module, blocks, seed: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    D, n = model.embed_dim, model.num_classes
    return {b: {"norm.weight": 1 + 0.1 * torch.randn(D, generator=g), "norm.bias": 0.1 * torch.randn(D, generator=g),
                "fc.weight": 0.2 * torch.randn(n, D, generator=g), "fc.bias": 0.1 * torch.randn(n, generator=g)}
            for b in blocks}


def torch_exit_logits(model: nn.Module, head: dict, block: int, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        for blk in model.blocks[:block + 1]:
            h = blk(h)
        z = nn.functional.layer_norm(h[:, 0], (model.embed_dim,), head["norm.weight"], head["norm.bias"], eps=1e-6)
        return (z @ head["fc.weight"].T + head["fc.bias"]).numpy()


def test_exits_from_dict(tmp_path):
    model = perturbed(VisionTransformer(**dict(SMALL, depth=3)))
    heads = exit_heads(model, [0, 1])
    pol = Policy(exits=[ExitPolicy(1, "margin", 0.0), ExitPolicy(0, "confidence", 0.0)], name="exits")
    graph, tensors, _, _ = read_model(convert(model, tmp_path / "m.pyrt", policy=pol, exits=heads))
    assert [e["block"] for e in graph["exits"]] == [0, 1]  # sorted
    x = images(model, 3)
    logits, exit_block, per = _numpy_ref.forward(graph, tensors, x.numpy())
    assert exit_block.tolist() == [0, 0, 0]
    assert rel_err(logits, torch_exit_logits(model, heads[0], 0, x)) <= 1e-4
    np.testing.assert_array_equal(per, bops.per_image(graph, exit_block))


def test_exit_without_head_is_a_policy_error(tmp_path):
    model = VisionTransformer(**dict(SMALL, depth=3))
    pol = Policy(exits=[ExitPolicy(1, "confidence", 0.9)])
    with pytest.raises(PolicyError, match="without exit-head weights"):
        convert(model, tmp_path / "m.pyrt", policy=pol)
    with pytest.raises(PolicyError, match="without exit-head weights"):
        convert(model, tmp_path / "m.pyrt", policy=pol, exits=exit_heads(model, [0]))
    assert not (tmp_path / "m.pyrt").exists()


def test_exit_head_shapes_checked(tmp_path):
    model = VisionTransformer(**SMALL)
    heads = exit_heads(model, [0])
    heads[0]["fc.weight"] = heads[0]["fc.weight"][:, :10]
    with pytest.raises(ValueError, match=r"exits\.0\.fc\.weight has shape"):
        convert(model, tmp_path / "m.pyrt", exits=heads)


def test_safetensors_checkpoint_with_exit_heads(tmp_path):
    """The shipped reference model's layout: fp16 backbone + ``exits.<b>.*`` in one file."""
    from safetensors.torch import save_file

    src = perturbed(VisionTransformer(**dict(SMALL, depth=3)), seed=3)
    heads = exit_heads(src, [0, 1])
    sd = {k: v.half().contiguous() for k, v in src.state_dict().items()}
    sd.update({f"exits.{b}.{k}": v.half() for b, h in heads.items() for k, v in h.items()})
    ckpt = tmp_path / "ref.safetensors"
    save_file(sd, str(ckpt))

    fresh = VisionTransformer(**dict(SMALL, depth=3))
    pol = Policy(exits=[ExitPolicy(1, "confidence", 0.0)])
    out = convert(fresh, tmp_path / "m.pyrt", checkpoint=ckpt, policy=pol)
    graph, tensors, _, prov = read_model(out)
    assert prov["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert prov["checkpoint"] == "ref.safetensors"
    np.testing.assert_array_equal(tensors["exits.1.fc.weight"], heads[1]["fc.weight"].half().float().numpy())
    x = images(fresh, 3)
    logits, exit_block, _ = _numpy_ref.forward(graph, tensors, x.numpy())
    assert exit_block.tolist() == [1, 1, 1]
    head16 = {k: v.half().float() for k, v in heads[1].items()}
    assert rel_err(logits, torch_exit_logits(fresh, head16, 1, x)) <= 1e-4


def test_exit_heads_from_separate_file(tmp_path):
    from safetensors.torch import save_file

    model = perturbed(VisionTransformer(**SMALL))
    heads = exit_heads(model, [0])
    save_file({f"exits.0.{k}": v for k, v in heads[0].items()}, str(tmp_path / "exits.safetensors"))
    pol = Policy(exits=[ExitPolicy(0, "confidence", 0.0)])
    graph, tensors, _, _ = read_model(convert(model, tmp_path / "m.pyrt", policy=pol,
                                              exits=tmp_path / "exits.safetensors"))
    np.testing.assert_array_equal(tensors["exits.0.norm.bias"], heads[0]["norm.bias"].numpy())


@pytest.mark.parametrize("wrap", [lambda sd: sd, lambda sd: {"model": sd}, lambda sd: {"state_dict": sd, "epoch": 3}])
def test_pth_checkpoint(tmp_path, wrap):
    src = perturbed(VARIANTS["distilled"](), seed=9)
    ckpt = tmp_path / "ckpt.pth"
    torch.save(wrap(src.state_dict()), ckpt)
    fresh = VARIANTS["distilled"]()
    graph, tensors, _, _ = read_model(convert(fresh, tmp_path / "m.pyrt", checkpoint=ckpt))
    x = images(src, 3)
    assert rel_err(_numpy_ref.forward(graph, tensors, x.numpy())[0], timm_logits(src, x)) <= 1e-4


def test_checkpoint_that_does_not_fit(tmp_path):
    ckpt = tmp_path / "other.pth"
    torch.save(VisionTransformer(**dict(SMALL, embed_dim=24)).state_dict(), ckpt)
    with pytest.raises(ValueError, match="does not fit"):
        convert(VisionTransformer(**SMALL), tmp_path / "m.pyrt", checkpoint=ckpt)
    with pytest.raises(ValueError, match=r"\.safetensors, \.pth or \.pt"):
        convert(VisionTransformer(**SMALL), tmp_path / "m.pyrt", checkpoint=__file__)


# --- models by timm name, preprocessing, provenance ------------------------------------------------

def test_timm_name_and_preprocess(tmp_path):
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    with pytest.raises(ValueError, match="random_weights=True"):  # never a random model silently
        convert("deit_tiny_distilled_patch16_224", tmp_path / "m.pyrt")
    graph, tensors, _, prov = read_model(convert("deit_tiny_distilled_patch16_224", tmp_path / "m.pyrt",
                                                 random_weights=True))
    assert graph["arch"]["dist_token"] and graph["arch"]["depth"] == 12
    # timm's data config: its eval resize and crop are recorded with the mean and std.
    assert graph["preprocess"] == {"mean": list(IMAGENET_DEFAULT_MEAN), "std": list(IMAGENET_DEFAULT_STD),
                                   "input_size": [3, 224, 224], "crop_pct": 0.9, "interpolation": "bicubic",
                                   "crop_mode": "center"}
    assert prov["source"] == "deit_tiny_distilled_patch16_224" and prov["checkpoint_sha256"] is None
    assert prov["timm_version"] == timm.__version__


def test_preprocess_default_and_override(tmp_path):
    model = VARIANTS["gray_nonsquare"]()
    graph = read_model(convert(model, tmp_path / "a.pyrt"))[0]
    assert {k: graph["preprocess"][k] for k in ("mean", "std", "input_size")} == \
        {"mean": [0.5], "std": [0.5], "input_size": [1, 32, 24]}
    graph = read_model(convert(model, tmp_path / "b.pyrt", preprocess={"mean": 0.286, "std": [0.353]}))[0]
    assert graph["preprocess"]["mean"] == [0.286] and graph["preprocess"]["std"] == [0.353]
    with pytest.raises(ValueError, match="input_size"):
        convert(model, tmp_path / "c.pyrt", preprocess={"input_size": [1, 28, 28]})


# --- what is refused ------------------------------------------------------------------------------

def _with_head(model: nn.Module, head: nn.Module) -> nn.Module:
    model.head = head
    return model


UNSUPPORTED = {
    "qk_norm": (lambda: VisionTransformer(**SMALL, qk_norm=True), "qk_norm"),
    "swiglu": (lambda: VisionTransformer(**SMALL, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU), "SwiGLU"),
    "gelu_tanh": (lambda: VisionTransformer(**SMALL, act_layer="gelu_tanh"), "GELU"),
    "silu": (lambda: VisionTransformer(**SMALL, act_layer="silu"), "activation"),
    "max_pool": (lambda: VisionTransformer(**SMALL, global_pool="max"), "global_pool='max'"),
    "dynamic_img_size": (lambda: VisionTransformer(**SMALL, dynamic_img_size=True), "dynamic_img_size"),
    "rmsnorm": (lambda: VisionTransformer(**SMALL, norm_layer="rmsnorm"), "LayerNorm"),
    "no_pos_embed": (lambda: VisionTransformer(**SMALL, pos_embed="none"), "pos_embed"),
    "conv_head": (lambda: _with_head(VisionTransformer(**SMALL), nn.Sequential(nn.Linear(48, 10))),
                  "a classifier head that is not linear"),
    "res_post_block": (lambda: VisionTransformer(**SMALL, block_fn=ResPostBlock), "ResPostBlock"),
    "not_a_vit": (lambda: nn.Linear(3, 3), "not a timm VisionTransformer"),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_unsupported_features_are_named(case, tmp_path):
    make, feature = UNSUPPORTED[case]
    with pytest.raises(ValueError, match=feature):
        convert(make(), tmp_path / "m.pyrt")
    assert not (tmp_path / "m.pyrt").exists()


def test_resnet_by_name_is_refused(tmp_path):
    with pytest.raises(ValueError, match="ResNet is not a timm VisionTransformer"):
        convert("resnet18", tmp_path / "m.pyrt")


def test_unknown_model_name(tmp_path):
    with pytest.raises(ValueError, match="unknown timm model name 'vit_nonexistent_tiny'"):
        convert("vit_nonexistent_tiny", tmp_path / "m.pyrt")


def test_non_finite_weights_refused(tmp_path):
    model = VisionTransformer(**SMALL)
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc1\.weight contains NaN"):
        convert(model, tmp_path / "m.pyrt")
