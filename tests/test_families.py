"""timm families beyond the plain classifier ViT (docs/families.md): each supported one
converts, and the runtime matches timm's fp32 logits, features and tokens to 1e-5 relative
and the numpy oracle when quantised; each family still out is refused in one line naming
the missing feature. Models are built with timm's random initialisation at tiny sizes
(pretrained=False: nothing is downloaded), perturbed so that no term hides."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from timm.models.vision_transformer import VisionTransformer  # noqa: E402

import pyruntime  # noqa: E402
from pyruntime import _numpy_ref  # noqa: E402
from pyruntime import graph as opgraph  # noqa: E402
from pyruntime.convert import convert, describe_model, model_arch  # noqa: E402
from pyruntime.errors import FormatError, PolicyError  # noqa: E402
from pyruntime.modelfile import check_graph, check_tensors, read_model  # noqa: E402
from pyruntime.policy import ExitPolicy, LayerPolicy, Policy  # noqa: E402

from _helpers import assert_matches_timm, assert_near_oracle, images, perturbed, rel_err, timm_outputs  # noqa: E402

pytestmark = pytest.mark.torch

TINY = dict(depth=2, embed_dim=48, num_heads=3)

# name -> (timm model name, kwargs): the supported families, each at a tiny size
SUPPORTED = {
    "dinov2_features": ("vit_small_patch14_dinov2", dict(TINY, img_size=28)),             # num_classes=0 by default
    "dinov2_reg_features": ("vit_small_patch14_reg4_dinov2", dict(TINY, img_size=28)),
    "siglip_avg_features": ("vit_base_patch16_siglip_gap_224", dict(TINY, img_size=32)),  # global_pool='avg'
    "clip_features": ("vit_base_patch32_clip_224", dict(TINY, img_size=64, num_classes=0)),
    "clip_quickgelu": ("vit_base_patch32_clip_quickgelu_224", dict(TINY, img_size=64, num_classes=10)),
    "clip_quickgelu_features": ("vit_base_patch32_clip_quickgelu_224", dict(TINY, img_size=64, num_classes=0)),
    "distilled_features": ("deit_tiny_distilled_patch16_224", dict(TINY, img_size=32, num_classes=0)),
    "relpos_avg": ("vit_relpos_small_patch16_224", dict(TINY, img_size=32, num_classes=10)),     # RelPosMlp, no cls
    "relpos_cls": ("vit_relpos_base_patch16_cls_224", dict(TINY, img_size=32, num_classes=10)),
    "relpos_features": ("vit_relpos_medium_patch16_224", dict(TINY, img_size=32, num_classes=0)),
    "relpos_shared_bias": ("vit_relpos_small_patch16_224", dict(TINY, img_size=32, num_classes=10, rel_pos_type="bias",
                                                                shared_rel_pos=True)),                # RelPosBias, shared
    # BEiT: q/v biases, relative position bias per block, layer scale, mean pooling + fc_norm
    "beit_avg": ("beit_base_patch16_224", dict(TINY, img_size=32, num_classes=10)),
    # the model's shared relative position bias, an absolute position embedding, no layer scale, no q/v
    # biases, token pooling
    "beit_token_shared_abs": ("beit_base_patch16_224", dict(TINY, img_size=32, num_classes=10, global_pool="token",
                                                            use_abs_pos_emb=True, use_rel_pos_bias=False,
                                                            use_shared_rel_pos_bias=True, init_values=0, qkv_bias=False)),
    "beit_both_biases": ("beit_base_patch16_224", dict(TINY, img_size=32, num_classes=10, use_shared_rel_pos_bias=True)),
    "beitv2_features": ("beitv2_base_patch16_224", dict(TINY, img_size=32, num_classes=0)),
    # parallel blocks (ParallelThingsBlock, 2 branches, layer scale)
    "parallel": ("vit_small_patch16_18x2_224", dict(depth=2, embed_dim=64, num_heads=2, img_size=32, num_classes=10)),
}


def build(case: str):
    name, kwargs = SUPPORTED[case]
    return perturbed(timm.create_model(name, pretrained=False, **kwargs))


@pytest.mark.parametrize("case", sorted(SUPPORTED))
def test_fp32_matches_timm(case, tmp_path):
    model = build(case)
    path = convert(model, tmp_path / "m.pyrt")
    x = images(model)
    assert_matches_timm(pyruntime.load(path).run(x.numpy(), tokens=True), model, x)


@pytest.mark.parametrize("case", ["clip_quickgelu", "dinov2_features", "relpos_cls", "beit_avg", "beit_token_shared_abs",
                                  "parallel"])
@pytest.mark.parametrize("policy", ["w8a8", "w4a8", "w8a8-attn8"])
def test_quantised_matches_the_oracle(case, policy, tmp_path):
    model = build(case)
    path = convert(model, tmp_path / "m.pyrt", policy=policy)
    graph, tensors, _, _ = read_model(path)
    x = images(model, 3).numpy()
    r = pyruntime.load(path).run(x, tokens=True)
    assert_near_oracle(r, _numpy_ref.forward(graph, tensors, x, outputs=True))
    # and still close to timm (quantisation error, not a different model; tolerances as tests/test_convert.py's)
    assert rel_err(r.logits, timm_outputs(model, torch.from_numpy(x))["logits"]) < (0.25 if policy == "w4a8" else 0.05)


def test_quickgelu_is_its_own_op_kind(tmp_path):
    graph = read_model(convert(build("clip_quickgelu"), tmp_path / "m.pyrt"))[0]
    kinds = [op["op"] for op in graph["ops"]]
    assert kinds.count("quick_gelu") == 2 and "gelu" not in kinds
    assert graph["arch"]["norm_pre"]  # CLIP's ln_pre


def test_quickgelu_oracle_is_the_formula():
    x = np.linspace(-12, 12, 101, dtype=np.float32)
    want = x.astype(np.float64) / (1 + np.exp(-1.702 * x.astype(np.float64)))
    np.testing.assert_allclose(_numpy_ref._quick_gelu(x), want, rtol=1e-6, atol=1e-7)


def test_feature_extractor_has_no_head_and_its_logits_are_its_features(tmp_path):
    model = build("dinov2_features")
    graph, tensors, _, _ = read_model(convert(model, tmp_path / "m.pyrt"))
    assert graph["arch"]["num_classes"] == 0 and "head" not in graph["layers"]
    assert not any(k.startswith("head") for k in tensors)
    out = graph["ops"][-1]
    assert out["in"][0] == out["in"][1]
    r = pyruntime.load(tmp_path / "m.pyrt").run(images(model).numpy())
    np.testing.assert_array_equal(r.logits, r.features)


def test_feature_extractor_refuses_exits_and_calibration(tmp_path):
    model = build("dinov2_features")
    pol = Policy(exits=[ExitPolicy(0, "confidence", 0.9)], name="exits")
    with pytest.raises(PolicyError, match=r"exits at blocks \[0\], which need class logits.*num_classes=0"):
        convert(model, tmp_path / "m.pyrt", policy=pol)
    assert not (tmp_path / "m.pyrt").exists()
    # what fits exits and calibrates describes the model by model_arch: it needs classes
    with pytest.raises(ValueError, match=r"no classifier \(num_classes=0, a feature extractor\): exit heads and "
                                         r"calibration need class logits"):
        model_arch(model)
    assert describe_model(model)[0]["num_classes"] == 0
    # a file claiming exits on a head-less model is refused too
    graph = read_model(convert(model, tmp_path / "f.pyrt"))[0]
    graph["exits"] = [{"block": 0, "rule": "confidence", "threshold": 0.5}]
    with pytest.raises(FormatError, match=r"exits at blocks \[0\] need class logits"):
        check_graph(graph)


def test_relpos_attention_carries_its_bias(tmp_path):
    model = build("relpos_cls")
    graph, tensors, _, _ = read_model(convert(model, tmp_path / "m.pyrt"))
    kinds = [op["op"] for op in graph["ops"]]
    assert "pos_embed" not in kinds  # vit_relpos has no absolute position embedding
    T = 1 + 2 * 2  # 32x32 images, 16x16 patches, a class token
    for i, blk in enumerate(model.blocks):
        op = next(op for op in graph["ops"] if op["op"] == "attention" and op["block"] == i)
        assert op["weights"] == {"bias": f"blocks.{i}.attn.rel_pos_bias"}
        with torch.no_grad():
            want = blk.attn.rel_pos.get_bias()[0].numpy()
        assert tensors[op["weights"]["bias"]].shape == (3, T, T)
        np.testing.assert_array_equal(tensors[op["weights"]["bias"]], want)


def test_a_bias_of_the_wrong_shape_is_refused(tmp_path):
    graph, tensors, _, _ = read_model(convert(build("relpos_cls"), tmp_path / "m.pyrt"))
    tensors = dict(tensors, **{"blocks.0.attn.rel_pos_bias": tensors["blocks.0.attn.rel_pos_bias"][:, :4, :4].copy()})
    with pytest.raises(FormatError, match=r"tensor 'blocks.0.attn.rel_pos_bias' is float32 \[3, 4, 4\], expected "
                                          r"float32 \[3, 5, 5\]"):
        check_tensors(graph, tensors)


def test_beit_maps_to_the_plain_block_with_its_biases(tmp_path):
    """BEiT's separate q and v biases become the fused qkv bias (k's is zero), gamma_1/gamma_2
    the layer scales, its relative position bias the attention op's bias; no absolute
    position embedding unless the model has one."""
    model = build("beit_both_biases")
    graph, tensors, _, _ = read_model(convert(model, tmp_path / "m.pyrt"))
    kinds = [op["op"] for op in graph["ops"]]
    assert "pos_embed" not in kinds and kinds.count("layer_scale") == 4
    assert graph["arch"]["qkv_bias"] and graph["arch"]["fc_norm"] and not graph["arch"]["final_norm"]
    T, D = 1 + 2 * 2, 48
    with torch.no_grad():
        shared = model.rel_pos_bias()
        for i, blk in enumerate(model.blocks):
            a = blk.attn
            bias = tensors[f"blocks.{i}.attn.qkv.bias"]
            np.testing.assert_array_equal(bias, np.concatenate([a.q_bias.numpy(), np.zeros(D, np.float32), a.v_bias.numpy()]))
            np.testing.assert_array_equal(tensors[f"blocks.{i}.ls1.gamma"], blk.gamma_1.numpy())
            np.testing.assert_array_equal(tensors[f"blocks.{i}.ls2.gamma"], blk.gamma_2.numpy())
            want = (a._get_rel_pos_bias()[0] + shared).numpy()  # the block's own table plus the shared one
            assert want.shape == (3, T, T) and np.abs(shared.numpy()).max() > 0
            np.testing.assert_array_equal(tensors[f"blocks.{i}.attn.rel_pos_bias"], want)
    graph = read_model(convert(build("beit_token_shared_abs"), tmp_path / "a.pyrt"))[0]
    kinds = [op["op"] for op in graph["ops"]]
    assert "pos_embed" in kinds and "layer_scale" not in kinds and not graph["arch"]["qkv_bias"]
    assert all(op["weights"] == {"bias": f"blocks.{op['block']}.attn.rel_pos_bias"}
               for op in graph["ops"] if op["op"] == "attention")


BEIT = dict(TINY, img_size=32)


@pytest.mark.parametrize("kwargs, message", [
    (dict(BEIT, swiglu_mlp=True), r"blocks.0.mlp is SwiGLU \(BEiT's swiglu_mlp\)$"),
    (dict(BEIT, scale_mlp=True), r"scale_mlp_norm \(normalisation inside the MLP\)$"),
    (dict(BEIT, global_pool=""), r"global_pool='' \(only 'token' and 'avg'\)$"),
])
def test_beit_options_the_executor_lacks_are_refused(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=r"^unsupported by the pyruntime executor: " + message) as e:
        convert("beit_base_patch16_224", tmp_path / "m.pyrt", model_kwargs=kwargs, random_weights=True)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "m.pyrt").exists()


def test_beit_attention_wider_than_embed_dim_is_refused(tmp_path):
    from timm.models.beit import Attention

    model = timm.create_model("beit_base_patch16_224", pretrained=False, **BEIT)
    grid = model.patch_embed.grid_size
    model.blocks[1].attn = Attention(48, num_heads=3, qkv_bias=True, window_size=grid, attn_head_dim=32)
    with pytest.raises(ValueError, match=r"blocks.1.attn: attention whose width differs from embed_dim "
                                         r"\(attn_head_dim 32 with 3 heads, embed_dim 48\)"):
        convert(model, tmp_path / "m.pyrt")


def test_parallel_blocks_sum_their_branches_under_timm_names(tmp_path):
    """Each attention and MLP branch is its own pre-norm chain under timm's module names; the
    branches are summed, then added to the block's input. Exits and per-layer bits work on
    the branches' layers: a policy keyed by their names, an exit after block 0, against the
    oracle (exit decisions, BOPs, logits)."""
    model = build("parallel")
    D, n = 64, 10
    rng = np.random.default_rng(0)
    heads = {0: {"norm.weight": np.ones(D, np.float32), "norm.bias": np.zeros(D, np.float32),
                 "fc.weight": rng.standard_normal((n, D)).astype(np.float32), "fc.bias": np.zeros(n, np.float32)}}
    pol = Policy(layers={"blocks.1.attns.1.attn.qkv": LayerPolicy(w_bits=4, a_bits=8, scale="dynamic"),
                         "blocks.0.ffns.0.mlp.fc2": LayerPolicy(w_bits=8, a_bits=8, scale="dynamic")},
                 exits=[ExitPolicy(0, "confidence", 0.3)], name="mixed")
    path = convert(model, tmp_path / "m.pyrt", policy=pol, exits=heads)
    graph, tensors, _, _ = read_model(path)
    block0 = [op["name"] for op in graph["ops"] if op["block"] == 0 and op["op"] != "exit"]  # linear: name = layer
    assert block0[:6] == ["blocks.0.attns.0.norm", "blocks.0.attns.0.attn.qkv", "blocks.0.attns.0.attn",
                          "blocks.0.attns.0.attn.proj", "blocks.0.attns.0.ls", "blocks.0.attns.1.norm"]
    assert block0[9:12] == ["blocks.0.attns.1.ls", "blocks.0.attns.sum1", "blocks.0.residual1"]
    assert block0[-3:] == ["blocks.0.ffns.1.ls", "blocks.0.ffns.sum1", "blocks.0.residual2"]
    assert {k: v["w_bits"] for k, v in graph["layers"].items() if v["w_bits"] != 32} == {
        "blocks.1.attns.1.attn.qkv": 4, "blocks.0.ffns.0.mlp.fc2": 8}
    exit_op = next(op for op in graph["ops"] if op["op"] == "exit")
    assert exit_op["in"] == ["blocks.0.residual2"]
    np.testing.assert_array_equal(tensors["blocks.1.ffns.1.ls.gamma"], model.blocks[1].ffns[1].ls.gamma.detach().numpy())
    x = images(model, 3).numpy()
    r = pyruntime.load(path).run(x, tokens=True)
    want = _numpy_ref.forward(graph, tensors, x, outputs=True)
    np.testing.assert_array_equal(r.exit_block, want["exit_block"])
    np.testing.assert_array_equal(r.bops, want["bops"])
    assert_near_oracle(r, want, keys=("logits",))


# --- the op list is the program; arch only summarises it ------------------------------------------

def test_a_program_other_than_the_lowering_loads_when_arch_agrees(tmp_path):
    """The file's ops need not be the lowering of its arch (convert writes ops per family),
    but arch's summary must agree with them."""
    graph = read_model(convert(build("clip_quickgelu"), tmp_path / "m.pyrt"))[0]
    assert graph["ops"] != opgraph.lower(graph)
    assert graph["ops"] == opgraph.lower(graph, "quick_gelu")
    check_graph(graph)


@pytest.mark.parametrize("key, value, message", [
    ("embed_dim", 96, r"'patch_embed': arch.embed_dim says 96, the program has 48"),
    ("depth", 3, r"arch.depth says 3, the program has 2"),
    ("num_heads", 6, r"arch.num_heads says \[6\], the program has \[3\]"),
    ("num_classes", 7, r"arch.num_classes says 7, the program has 10"),
    ("reg_tokens", 1, r"arch.tokens says 6, the program has 5"),
    ("final_norm", False, r"arch.final_norm says False, the program has True"),
])
def test_arch_that_disagrees_with_the_ops_is_refused(key, value, message, tmp_path):
    graph = read_model(convert(build("clip_quickgelu"), tmp_path / "m.pyrt"))[0]
    graph["arch"] = dict(graph["arch"], **{key: value})
    with pytest.raises(FormatError, match=r"graph.ops disagree with graph.arch and graph.exits at op #\d+ .*" + message):
        check_graph(graph)


def test_lowering_refuses_an_unknown_activation():
    graph = {"arch": describe_model(build("clip_quickgelu"))[0], "exits": []}
    with pytest.raises(ValueError, match=r"MLP activation 'silu' is not one of \['gelu', 'quick_gelu'\]"):
        opgraph.lower(graph, "silu")


def test_plain_vit_feature_extractor_built_directly(tmp_path):
    model = perturbed(VisionTransformer(img_size=32, patch_size=8, num_classes=0, global_pool="avg", **TINY))
    path = convert(model, tmp_path / "m.pyrt", policy="w8a8")
    graph, tensors, _, _ = read_model(path)
    x = images(model).numpy()
    r = pyruntime.load(path).run(x, tokens=True)
    want = _numpy_ref.forward(graph, tensors, x, outputs=True)
    assert r.logits.shape == (2, 48)
    np.testing.assert_allclose(r.logits, want["logits"], rtol=0, atol=5e-3 * np.abs(want["logits"]).max())


# --- what is still out: one line naming the missing feature ----------------------------------------

T32 = dict(TINY, img_size=32)
REFUSED = {
    "vit_relpos_small_patch16_rpn_224": (T32, r"VisionTransformerRelPos \(vit_relpos_small_patch16_rpn_224\): post-norm "
                                              r"blocks \(ResPostRelPosBlock"),
    "vit_base_patch16_xp_224": (T32, r"\(vit_base_patch16_xp_224\): parallel attention and MLP in one block"),
    "swin_tiny_patch4_window7_224": (dict(depths=(1, 1), embed_dim=24, num_heads=(1, 1), img_size=56),
                                     r"SwinTransformer \(swin_tiny_patch4_window7_224\): shifted-window attention"),
    "samvit_base_patch16": (dict(TINY, img_size=64, global_attn_indexes=(1,), window_size=2),
                            r"VisionTransformerSAM \(samvit_base_patch16\): windowed attention"),
    "vit_small_r26_s32_224": (dict(TINY, img_size=64), r"\(vit_small_r26_s32_224\): a convolutional stem"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_families_still_out_are_refused_in_one_line(name, tmp_path):
    kwargs, message = REFUSED[name]
    with pytest.raises(ValueError, match=message + r".* is not supported yet$") as e:
        convert(name, tmp_path / "m.pyrt", model_kwargs=kwargs, random_weights=True)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "m.pyrt").exists()
    # by module too: the same line (the class and timm's architecture name)
    with pytest.raises(ValueError, match=message):
        convert(timm.create_model(name, pretrained=False, **kwargs), tmp_path / "m.pyrt")


@pytest.mark.parametrize("case", ["clip_quickgelu", "relpos_cls", "beit_avg"])
def test_profiling_times_the_family_program_not_the_plain_lowering(tmp_path, case):
    """latency's profiling model keeps the file's own ops (QuickGELU, the attention bias) and
    adds an exit after every block; the runtime accepts it."""
    from pyruntime import _core
    from pyruntime.latency import profiling_model

    graph, tensors, _, _ = read_model(convert(build(case), tmp_path / "m.pyrt"))
    g, t, synthesised = profiling_model(graph, tensors)
    kinds = {op["op"] for op in g["ops"]}
    assert ("quick_gelu" in kinds) == (case == "clip_quickgelu")
    assert any(op["op"] == "attention" and op["weights"] for op in g["ops"]) == (case in ("relpos_cls", "beit_avg"))
    depth = graph["arch"]["depth"]
    assert [op["block"] for op in g["ops"] if op["op"] == "exit"] == list(range(depth - 1)) == synthesised
    profile = _core.Executor(g, t)  # what latency.profile times
    profile.set_profiling(True)
    x = np.random.default_rng(0).standard_normal((2, *graph["preprocess"]["input_size"])).astype(np.float32)
    profile.run(x)
    assert any("gelu" in op for op in profile.profile())
