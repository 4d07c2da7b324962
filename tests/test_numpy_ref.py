"""pyruntime._numpy_ref without torch: quantised layers emulate the kernels, exits and scale
modes behave as docs/model_format.md says, and images do not influence each other."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from _graphs import W4A8, W8A8, random_tensors, tiny_graph
from pyruntime import _numpy_ref, kernels
from pyruntime.modelfile import pack_int4

RNG = np.random.default_rng(7)


def images(n: int, graph: dict) -> np.ndarray:
    a = graph["arch"]
    return RNG.standard_normal((n, a["in_chans"], *a["img_size"])).astype(np.float32)


def ref_linear(w, bias, bits, *, a_bits=8, scale="dynamic", static_scale=None, block=32):
    """The numpy reference's view of ``w`` quantised by the runtime's quantiser."""
    qw = kernels.quantize_weights(w, bits, block if bits == 4 else None)
    q, s = qw.canonical()
    s = np.asarray(s, np.float32).reshape(w.shape[0], -1)
    return _numpy_ref._Linear("layer", bits, a_bits, scale, static_scale, block, kernels.dequantize(qw),
                              np.asarray(q, np.int64), s if bits == 4 else s[:, 0], bias, None)


@pytest.mark.parametrize("bits, K, a_bits", [(8, 48, 8), (8, 37, 6), (4, 64, 8), (4, 70, 5)])
def test_quantised_linear_matches_the_kernels(bits, K, a_bits):
    w = RNG.standard_normal((24, K)).astype(np.float32)
    b = RNG.standard_normal(24).astype(np.float32)
    x = (RNG.standard_normal((9, K)) * 3).astype(np.float32)
    qw = kernels.quantize_weights(w, bits, 32 if bits == 4 else None)
    want = kernels.linear(x, qw, b, act_bits=a_bits, isa="ref")
    got = _numpy_ref._linear(ref_linear(w, b, bits, a_bits=a_bits), x, True, None)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_static_scale_matches_the_kernels():
    w = RNG.standard_normal((16, 32)).astype(np.float32)
    x = RNG.standard_normal((5, 32)).astype(np.float32)
    qw = kernels.quantize_weights(w, 8)
    want = kernels.linear(x, qw, None, act_scale=0.01, isa="ref")  # clips most values
    got = _numpy_ref._linear(ref_linear(w, None, 8, scale="static", static_scale=0.01), x, True, None)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_batch_does_not_change_an_image():
    g = tiny_graph(layers={"blocks.0.attn.qkv": W8A8, "blocks.1.mlp.fc1": W4A8, "head": W8A8},
                   exits=[{"block": 0, "rule": "confidence", "threshold": 0.5}])
    t = random_tensors(g)
    x = images(6, g)
    logits, exit_block, bops = _numpy_ref.forward(g, t, x)
    for i in range(6):
        li, ei, bi = _numpy_ref.forward(g, t, x[i:i + 1])
        np.testing.assert_array_equal(li[0], logits[i])
        assert ei[0] == exit_block[i] and bi[0] == bops[i]


def test_exit_thresholds():
    g = tiny_graph(depth=3, exits=[{"block": 0, "rule": "confidence", "threshold": 0.0},
                                   {"block": 1, "rule": "margin", "threshold": 0.0}])
    t = random_tensors(g)
    x = images(4, g)
    _, exit_block, _ = _numpy_ref.forward(g, t, x)
    assert exit_block.tolist() == [0, 0, 0, 0]
    g["exits"][0]["threshold"] = 1.0
    _, exit_block, _ = _numpy_ref.forward(g, t, x)
    assert exit_block.tolist() == [1, 1, 1, 1]
    g["exits"][1]["threshold"] = 1.0
    logits, exit_block, _ = _numpy_ref.forward(g, t, x)
    assert exit_block.tolist() == [2, 2, 2, 2]
    no_exits = tiny_graph(depth=3)
    t_no = {k: v for k, v in t.items() if not k.startswith("exits.")}
    np.testing.assert_array_equal(_numpy_ref.forward(no_exits, t_no, x)[0], logits)


def test_constant_prediction_equals_static_scale():
    layer = "blocks.1.mlp.fc1"
    static = tiny_graph(layers={layer: dict(W8A8, scale="static", static_scale=0.02)})
    predicted = tiny_graph(layers={layer: dict(W8A8, scale="predicted")},
                           predictor={"block": 0, "chunk": 16, "coeffs": {layer: [0.02]}})
    t = random_tensors(static)
    x = images(3, static)
    np.testing.assert_array_equal(_numpy_ref.forward(static, t, x)[0], _numpy_ref.forward(predicted, t, x)[0])


def test_range_statistic_partial_last_chunk():
    g = tiny_graph(predictor={"block": 0, "chunk": 3, "coeffs": {}})
    m = _numpy_ref._Model(g, random_tensors(g))
    x = np.array([[1.0, -4.0, 2.0, 0.5, -0.25, 0.0, 3.0]], np.float32)
    assert m.range_statistic(x) == np.float32((4.0 + 0.5 + 3.0) / 3)


def test_unquantised_mode_equals_dequantised_fp32_model():
    g = tiny_graph(layers={"blocks.0.mlp.fc2": W8A8, "blocks.1.attn.qkv": W4A8})
    t = random_tensors(g)
    fp = copy.deepcopy(tiny_graph())
    tf = {k: v for k, v in t.items() if ".weight." not in k}
    m = _numpy_ref._Model(g, t)
    for name in ("blocks.0.mlp.fc2", "blocks.1.attn.qkv"):
        tf[f"{name}.weight"] = m.lin[name].weight
    x = images(2, g)
    np.testing.assert_array_equal(_numpy_ref.forward(g, t, x, quantized=False)[0], _numpy_ref.forward(fp, tf, x)[0])


def test_int4_dequantisation_uses_blocks():
    w = RNG.standard_normal((4, 70)).astype(np.float32)
    q, s = kernels.quantize_weights(w, 4, 64).canonical()
    s = np.asarray(s).reshape(4, -1)
    deq = _numpy_ref._dequantize(np.asarray(q, np.int64), s, 64)
    np.testing.assert_allclose(deq, kernels.dequantize(kernels.quantize_weights(w, 4, 64)), rtol=1e-6)
    assert pack_int4(q).shape == (4, 35)


def test_rejects_wrong_input_shape():
    g = tiny_graph()
    with pytest.raises(ValueError, match="shape"):
        _numpy_ref.forward(g, random_tensors(g), np.zeros((1, 3, 8, 8), np.float32))
