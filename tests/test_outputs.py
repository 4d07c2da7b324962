"""Features and tokens: ``RunResult.features`` is timm's ``forward_head(x, pre_logits=True)``
and ``RunResult.tokens`` timm's ``forward_features``, for every supported ViT variant; an
image that exits early answers with its exit head's features and its tokens after the exit
block. Checked against the numpy oracle (no torch) and against timm itself (torch)."""
from __future__ import annotations

import numpy as np
import pytest

import pyruntime
from pyruntime import _numpy_ref
from pyruntime.modelfile import num_tokens

from _graphs import FP32, W4A8, W8A8, random_tensors, tiny_graph
from _graphs import random_images as _images, save_model as _save


ARCHS = {
    "token": {},
    "avg_fc_norm": dict(global_pool="avg", fc_norm=True, final_norm=False, cls_token=False),
    "avg_final_norm": dict(global_pool="avg"),
    "distilled": dict(dist_token=True),
    "registers": dict(reg_tokens=2, no_embed_class=True),
    "no_final_norm": dict(final_norm=False),
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("precision", [FP32, W8A8, W4A8], ids=["fp32", "w8a8", "w4a8"])
def test_features_and_tokens_match_the_oracle(arch, precision, tmp_path):
    g = tiny_graph(**ARCHS[arch])
    g["layers"] = {n: dict(precision) for n in g["layers"]}
    t = random_tensors(g, seed=7)
    x = _images(g, 3)
    r = pyruntime.load(_save(tmp_path, g, t)).run(x, tokens=True)
    want = _numpy_ref.forward(g, t, x, outputs=True)
    T, D = num_tokens(g["arch"]), g["arch"]["embed_dim"]
    assert r.features.shape == (3, D) and r.tokens.shape == (3, T, D)
    tol = 1e-5 if precision is FP32 else 5e-3
    for key in ("features", "tokens", "logits"):
        got, ref = getattr(r, key), want[key]
        assert np.abs(got - ref).max() <= tol * max(1.0, np.abs(ref).max()), key
    # Features are pre-logits: the head applied to them gives the logits (not distilled models,
    # whose logits average two heads).
    if precision is FP32 and not g["arch"]["dist_token"]:
        w, b = t["head.weight"], t.get("head.bias", 0)
        np.testing.assert_allclose(r.features @ w.T + b, r.logits, rtol=1e-4, atol=1e-5)


def test_tokens_are_only_returned_when_asked(tmp_path):
    g = tiny_graph()
    m = pyruntime.load(_save(tmp_path, g, random_tensors(g)))
    r = m.run(_images(g, 2))
    assert r.tokens is None and r.features.shape == (2, g["arch"]["embed_dim"])
    # Asking for tokens changes nothing else.
    r2 = m.run(_images(g, 2), tokens=True)
    np.testing.assert_array_equal(r.logits, r2.logits)
    np.testing.assert_array_equal(r.features, r2.features)


def test_an_early_exit_answers_with_its_own_features_and_tokens(tmp_path):
    g = tiny_graph(depth=3, exits=[{"block": 0, "rule": "confidence", "threshold": 0.0}])  # everyone exits
    t = random_tensors(g, seed=3)
    x = _images(g, 4)
    r = pyruntime.load(_save(tmp_path, g, t)).run(x, tokens=True)
    want = _numpy_ref.forward(g, t, x, outputs=True)
    assert (r.exit_block == 0).all() and (want["exit_block"] == 0).all()
    np.testing.assert_allclose(r.features, want["features"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r.tokens, want["tokens"], rtol=1e-5, atol=1e-6)
    # The exit head's features: its LayerNorm of the pooled class token after block 0, which
    # its classifier maps to the logits.
    np.testing.assert_allclose(r.features @ t["exits.0.fc.weight"].T + t["exits.0.fc.bias"], r.logits,
                               rtol=1e-4, atol=1e-5)


def test_non_finite_images_give_nan_features_and_tokens(tmp_path):
    g = tiny_graph()
    g["layers"] = {n: dict(W8A8) for n in g["layers"]}
    m = pyruntime.load(_save(tmp_path, g, random_tensors(g)))
    x = _images(g, 2)
    x[1] = 3e38
    r = m.run(x, tokens=True)
    assert np.isfinite(r.features[0]).all() and np.isnan(r.features[1]).all() and np.isnan(r.tokens[1]).all()


# --- against timm ---------------------------------------------------------------------------------

@pytest.mark.torch
@pytest.mark.parametrize("variant", ["plain", "avg_fc_norm", "no_cls_avg", "distilled", "reg_tokens", "dinov2_like",
                                     "gray_nonsquare"])
def test_features_and_tokens_match_timm(variant, tmp_path):
    torch = pytest.importorskip("torch")
    from _helpers import images, perturbed
    from test_convert import VARIANTS

    model = perturbed(VARIANTS[variant]())
    path = pyruntime.convert(model, tmp_path / "m.pyrt", policy="fp32")
    x = images(model, 3)
    r = pyruntime.load(path).run(x.numpy(), tokens=True)
    with torch.no_grad():
        tokens = model.forward_features(x)
        features = model.forward_head(tokens, pre_logits=True)
    for got, want in ((r.tokens, tokens.numpy()), (r.features, features.numpy())):
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
