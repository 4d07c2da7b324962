"""SigLIP's attention-pooling ("map") head: the ``attention_pool`` op (one fixed query against
the image's keys and values, then timm's proj / LayerNorm / residual MLP as ordinary ops).
The runtime matches timm's fp32 logits, features and tokens, and the numpy oracle when
quantised, BOPs included; what the head does not support is refused in one line. Models are
timm's random initialisation at tiny sizes (nothing is downloaded), perturbed."""
from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import pyruntime  # noqa: E402
from pyruntime import _core, _numpy_ref, bops  # noqa: E402
from pyruntime import graph as opgraph  # noqa: E402
from pyruntime.convert import convert, describe_model, model_arch  # noqa: E402
from pyruntime.errors import FormatError, PolicyError  # noqa: E402
from pyruntime.modelfile import check_graph, check_tensors, read_model  # noqa: E402
from pyruntime.policy import ExitPolicy, Policy  # noqa: E402

from _helpers import assert_matches_timm, assert_near_oracle, images, perturbed, rel_err  # noqa: E402

pytestmark = pytest.mark.torch

SIGLIP = "vit_base_patch16_siglip_224"


def siglip(num_classes: int = 0, seed: int = 0, **kwargs):
    return perturbed(timm.create_model(SIGLIP, pretrained=False, depth=2, embed_dim=48, num_heads=3, img_size=32,
                                       num_classes=num_classes, **kwargs), seed)


@pytest.mark.parametrize("num_classes", [0, 10])
def test_fp32_matches_timm(num_classes, tmp_path):
    model = siglip(num_classes)
    x = images(model, 3)
    assert_matches_timm(pyruntime.load(convert(model, tmp_path / "m.pyrt")).run(x.numpy(), tokens=True), model, x)


@pytest.mark.parametrize("include_prefix", [False, True])
def test_attention_pooling_with_prefix_tokens(include_prefix, tmp_path):
    """timm pools the patch tokens (``start`` skips the class and register tokens), or every
    token with pool_include_prefix."""
    from timm.models.vision_transformer import VisionTransformer

    model = perturbed(VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5,
                                        global_pool="map", reg_tokens=2, pool_include_prefix=include_prefix), seed=3)
    x = images(model)
    path = convert(model, tmp_path / "m.pyrt")
    r = pyruntime.load(path).run(x.numpy())
    with torch.no_grad():
        assert rel_err(r.logits, model(x).numpy()) <= 1e-5
    pool = next(op for op in read_model(path)[0]["ops"] if op["op"] == "attention_pool")
    assert pool["attrs"]["start"] == (0 if include_prefix else 3)


@pytest.mark.parametrize("policy", ["w8a8", "w4a8", "w8a8-attn8"])
def test_quantised_matches_the_oracle_bops_included(policy, tmp_path):
    model = siglip(10)
    path = convert(model, tmp_path / "m.pyrt", policy=policy)
    graph, tensors, _, _ = read_model(path)
    x = images(model, 3).numpy()
    r = pyruntime.load(path).run(x, tokens=True)
    want = _numpy_ref.forward(graph, tensors, x, outputs=True)
    assert_near_oracle(r, want)
    np.testing.assert_array_equal(r.bops, want["bops"])
    assert int(r.bops[0]) == bops.static(graph)


def test_the_head_is_one_attention_pool_op_and_ordinary_ops(tmp_path):
    model = siglip(10)
    graph, tensors, _, _ = read_model(convert(model, tmp_path / "m.pyrt", policy="w8a8"))
    assert graph["arch"]["global_pool"] == "map" and not graph["arch"]["cls_token"]
    head = [op["op"] for op in graph["ops"] if op["name"].startswith("attn_pool")]
    assert head == ["linear", "attention_pool", "linear", "layernorm", "linear", "gelu", "linear", "add"]
    pool = next(op for op in graph["ops"] if op["op"] == "attention_pool")
    assert pool["attrs"] == {"heads": 3, "start": 0} and pool["block"] is None
    with torch.no_grad():  # the query is fixed: the latent through q, as timm computes it each forward
        want = model.attn_pool.q(model.attn_pool.latent).reshape(-1).numpy()
    np.testing.assert_array_equal(tensors["attn_pool.query"], want)
    # the pooling's linears are layers like the head: the policy's default (fp32 for 'blocks.*' shorthands)
    assert {n for n in graph["layers"] if n.startswith("attn_pool")} == {
        "attn_pool.kv", "attn_pool.proj", "attn_pool.mlp.fc1", "attn_pool.mlp.fc2"}
    assert all(graph["layers"][n]["w_bits"] == 32 for n in graph["layers"] if n.startswith("attn_pool"))


def test_exits_are_refused(tmp_path):
    """Exit heads on a MAP-head model are refused by name (the calibrators that need no exits
    take it: tests/test_calibrate_families.py)."""
    model = siglip(10)
    pol = Policy(exits=[ExitPolicy(0, "confidence", 0.9)], name="exits")
    with pytest.raises(PolicyError, match=r"exit heads on a model with attention pooling \(SigLIP's MAP head\) are "
                                          r"not supported yet"):
        convert(model, tmp_path / "m.pyrt", policy=pol)
    assert not (tmp_path / "m.pyrt").exists()
    assert model_arch(model)["global_pool"] == describe_model(model)[0]["global_pool"] == "map"


@pytest.mark.parametrize("edit, message", [
    (lambda ap: setattr(ap, "latent_len", 2), r"attention pooling with 2 latents / pool 'token' \(only one latent\)"),
    (lambda ap: setattr(ap, "pool", "avg"), r"attention pooling with 1 latents / pool 'avg'"),
    (lambda ap: setattr(ap, "mlp", None), r"attention pooling without its projection and MLP"),
    (lambda ap: setattr(ap, "q_norm", torch.nn.LayerNorm(16)), r"qk_norm inside the attention pooling"),
    (lambda ap: setattr(ap, "pos_embed", torch.nn.Parameter(torch.zeros(4, 48))), r"a position embedding inside"),
    (lambda ap: setattr(ap.mlp, "act", torch.nn.GELU(approximate="tanh")), r"attn_pool.mlp activation GELU"),
])
def test_a_head_the_op_cannot_run_is_refused_in_one_line(edit, message):
    model = siglip(10)
    edit(model.attn_pool)
    with pytest.raises(ValueError, match=r"unsupported by the pyruntime executor: " + message):
        describe_model(model)


def test_map_has_no_lowering_from_arch(tmp_path):
    graph = read_model(convert(siglip(10), tmp_path / "m.pyrt"))[0]
    check_graph(graph)
    del graph["ops"]
    with pytest.raises(FormatError, match=r"global_pool 'map' \(attention pooling\) has no lowering from arch"):
        check_graph(graph)
    # the converter hands the lowering its head as pool ops; exits cannot pool that way
    from pyruntime.graph import lower

    head = [op for op in read_model(tmp_path / "m.pyrt")[0]["ops"] if op["name"].startswith("attn_pool.")]
    ops = lower(graph, pool_ops=lambda x: head)
    assert [op["name"] for op in ops if op["name"].startswith("attn_pool.")] == [op["name"] for op in head]
    with pytest.raises(ValueError, match="exit heads pool as the model does, 'token' or 'avg'; this model pools 'map'"):
        lower({**graph, "exits": [{"block": 0}]}, pool_ops=lambda x: head)


def test_malformed_attention_pool_ops_are_refused(tmp_path):
    graph, tensors, _, _ = read_model(convert(siglip(10), tmp_path / "m.pyrt"))
    i = next(i for i, op in enumerate(graph["ops"]) if op["op"] == "attention_pool")
    bad = copy.deepcopy(graph)
    bad["ops"][i]["attrs"]["heads"] = 5  # 2D = 96 is not 2 x 5 x head width
    with pytest.raises(FormatError, match=r"op #\d+ 'attn_pool.attn' \(attention_pool\): input width 96 is not 2 x heads"):
        opgraph.check_ops(bad["ops"])
    bad = copy.deepcopy(graph)
    bad["ops"][i]["attrs"]["start"] = 4  # 32x32 images, 16x16 patches: 4 tokens
    with pytest.raises(FormatError, match=r"'attn_pool.attn' \(attention_pool\): start 4 is outside the 4 tokens"):
        opgraph.check_ops(bad["ops"])
    with pytest.raises(ValueError, match=r"'attn_pool.attn': start 4 is outside the tokens"):
        _core.Executor(bad, tensors)
    short = dict(tensors, **{"attn_pool.query": tensors["attn_pool.query"][:40].copy()})
    with pytest.raises(FormatError, match=r"tensor 'attn_pool.query' is float32 \[40\], expected float32 \[48\]"):
        check_tensors(graph, short)
    # the executor checks the graph handed to it directly, too
    with pytest.raises(ValueError, match=r"attn_pool.query' must hold D values"):
        _core.Executor(graph, short)
