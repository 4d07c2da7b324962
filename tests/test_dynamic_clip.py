"""The ``clip`` ratio of dynamic activation scales (scale = clip * max|x| / qmax): the
executor and the numpy reference agree with clip < 1, the clip changes the output, files
and policies without it are as before, and bad values are refused with a clear message."""
from __future__ import annotations

import json

import numpy as np
import pytest

import pyruntime
from _graphs import W8A8, random_images, random_tensors, save_model, tiny_graph
from pyruntime import _numpy_ref
from pyruntime.errors import FormatError, PolicyError
from pyruntime.modelfile import read_model
from pyruntime.policy import LayerPolicy, Policy


def clipped_graph(clip):
    g = tiny_graph(depth=3)
    layers = {n: dict(W8A8, a_bits=5) for n in g["layers"] if n.startswith("blocks.")}
    if clip is not None:
        for i, n in enumerate(sorted(layers)):
            layers[n]["clip"] = clip if i % 2 else 1.0  # some clipped, some at an explicit 1
    return tiny_graph(depth=3, layers=layers)


def test_runtime_matches_the_oracle_with_clip(tmp_path):
    graph = clipped_graph(0.55)
    tensors = random_tensors(graph, seed=5)
    x = random_images(graph, 12, seed=1)
    r = pyruntime.load(save_model(tmp_path, graph, tensors)).run(x)
    logits, exit_block, bops = _numpy_ref.forward(graph, tensors, x)
    assert np.array_equal(r.bops, bops)
    # fp32 parts (LayerNorm, softmax, GELU) round differently; quantised: a tie may land either side
    tol = 2e-3 * max(1.0, np.abs(logits).max())
    assert np.abs(r.logits - logits).max() <= tol
    unclipped = pyruntime.load(save_model(tmp_path, clipped_graph(None), tensors, "u.pyrt")).run(x).logits
    assert np.abs(unclipped - r.logits).max() > 20 * tol  # the clip really acts


def test_quantised_layer_with_clip_is_the_oracles_bit_for_bit():
    """One layer through the kernels with the scale the executor computes for a clip, and
    the oracle's _linear: the same integer codes and the same float32 output."""
    from pyruntime import kernels

    rng = np.random.default_rng(3)
    w = rng.standard_normal((16, 64)).astype(np.float32)
    x = (rng.standard_t(3, (7, 64))).astype(np.float32)
    qw = kernels.quantize_weights(w, 8)
    q, s = qw.canonical()
    lin = _numpy_ref._Linear("l", 8, 6, "dynamic", None, 32, kernels.dequantize(qw), np.asarray(q, np.int64),
                             np.asarray(s, np.float32).reshape(-1), None, None, clip=0.3)
    scale = (np.float32(np.abs(x).max()) / np.float32(31)) * np.float32(0.3)
    assert _numpy_ref._act_scale(lin, x, None) == scale
    want = kernels.linear(x, qw, None, act_bits=6, act_scale=float(scale), isa="ref")
    got = _numpy_ref._linear(lin, x, True, None)
    assert np.array_equal(got, want)


def test_files_without_clip_load_as_before(tmp_path):
    g = clipped_graph(None)
    assert all("clip" not in lp for lp in g["layers"].values())
    t = random_tensors(g)
    path = save_model(tmp_path, g, t)
    graph = read_model(path)[0]
    assert all("clip" not in lp for lp in graph["layers"].values())
    x = random_images(g, 5)
    explicit = {n: dict(lp, clip=1.0) if lp["w_bits"] != 32 else lp for n, lp in g["layers"].items()}
    ones = pyruntime.load(save_model(tmp_path, dict(g, layers=explicit), t, "ones.pyrt")).run(x)
    assert np.array_equal(pyruntime.load(path).run(x).logits, ones.logits)  # clip 1 is the old scale exactly
    pol = Policy(layers={"blocks.*": LayerPolicy(8, 6)})
    assert "clip" not in json.dumps(pol.to_dict())  # written only when not 1
    assert Policy.from_json(pol.to_json()).layers["blocks.*"].clip == 1.0
    clipped = Policy(layers={"blocks.*": LayerPolicy(8, 6, clip=0.7)})
    assert Policy.from_json(clipped.to_json()).layers["blocks.*"].clip == 0.7


@pytest.mark.parametrize("clip", [0, -0.5, 1.5, float("nan"), float("inf"), 1e-60, True, "0.5"])
def test_bad_clip_is_refused(clip, tmp_path):
    with pytest.raises(PolicyError, match="clip"):
        LayerPolicy(8, 8, clip=clip)
    g = clipped_graph(clip)
    with pytest.raises((FormatError, PolicyError, ValueError), match="clip"):
        pyruntime.load(save_model(tmp_path, g, random_tensors(g)))


def test_clip_is_for_dynamic_scales_only():
    with pytest.raises(PolicyError, match="dynamic scales only"):
        LayerPolicy(8, 8, scale="static", static_scale=0.1, clip=0.5)
    assert LayerPolicy(8, 8, scale="static", static_scale=0.1, clip=1.0).clip == 1.0


def test_the_emulation_uses_the_clip():
    torch = pytest.importorskip("torch")
    from pyruntime.calibrate.emulate import dynamic_scale

    x = torch.from_numpy(np.random.default_rng(0).standard_normal((3, 5, 8)).astype(np.float32))
    for clip in (1.0, 0.45):
        want = [(np.float32(np.abs(x[b].numpy()).max()) / np.float32(7)) * np.float32(clip) for b in range(3)]
        assert dynamic_scale(x, 4, clip).numpy().tolist() == want
