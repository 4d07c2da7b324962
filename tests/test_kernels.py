"""The kernel API: every ISA against the scalar reference, and against a numpy emulation.

Integer paths must be bit-identical across ISAs (the exactness contract in
csrc/kernels/kernels.h); fp32 paths agree within a tolerance that grows with K.
"""
import numpy as np
import pytest

import pyruntime
from pyruntime import _core, kernels

ISAS = pyruntime.available_isas()
SIMD = [i for i in ISAS if i != "ref"]
EDGE = list(range(1, 18)) + [31, 32, 33, 63, 64, 65, 127, 129]
VIT = [(197, 192, 576), (197, 384, 1536), (197, 768, 3072)]


def rand(shape, seed, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def emulate_linear(x, qw, bias=None, act_bits=8, act_scale=None):
    """numpy model of kernels.linear: quantise x per tensor, multiply by the dequantised weights."""
    w = kernels.dequantize(qw).astype(np.float64)
    if qw.bits == 32:
        y = x.astype(np.float64) @ w.T
    else:
        qmax = 2 ** (act_bits - 1) - 1
        s = np.float32(np.abs(x).max() / np.float32(qmax)) if act_scale is None else np.float32(act_scale)
        inv = np.float32(1.0) / s if s > 0 else np.float32(0)
        q = np.clip(np.rint(x * inv), -qmax, qmax)
        y = (q.astype(np.float64) * float(s)) @ w.T
    return y + (0 if bias is None else bias)


def test_isa_reporting():
    assert ISAS[0] == "ref"
    assert pyruntime.isa() in ISAS
    assert pyruntime.isa() == ISAS[-1]  # the best one by default


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("isa", SIMD)
def test_integer_linear_bit_exact_edge_shapes(isa, bits):
    seed = 0
    for m in (1, 3, 17, 33):
        for n in EDGE[::3]:
            for k in EDGE[1::3]:
                seed += 1
                x, w, b = rand((m, k), seed), rand((n, k), seed + 1), rand((n,), seed + 2)
                qw = kernels.quantize_weights(w, bits)
                y = kernels.linear(x, qw, b, isa=isa)
                y_ref = kernels.linear(x, qw, b, isa="ref")
                assert np.array_equal(y.view(np.int32), y_ref.view(np.int32)), (isa, m, n, k)


@pytest.mark.parametrize("m,k,n", VIT)
@pytest.mark.parametrize("bits", [8, 4])
def test_integer_linear_vit_shapes_all_isas_and_threads(m, k, n, bits):
    x, w = rand((m, k), 1), rand((n, k), 2, 0.05)
    qw = kernels.quantize_weights(w, bits)
    y_ref = kernels.linear(x, qw, isa="ref", num_threads=1)
    for isa in ISAS:
        for t in (1, 2, 3):
            y = kernels.linear(x, qw, isa=isa, num_threads=t)
            assert np.array_equal(y.view(np.int32), y_ref.view(np.int32)), (isa, t)
    rel = np.abs(y_ref - emulate_linear(x, qw)).max() / np.abs(y_ref).max()
    assert rel < 1e-5


@pytest.mark.parametrize("k", [1, 31, 33, 100, 1031])
@pytest.mark.parametrize("act_bits", [4, 5, 6, 7, 8])
def test_linear_matches_numpy_emulation(k, act_bits):
    x, w, b = rand((9, k), k), rand((20, k), k + 1), rand((20,), 3)
    for bits in (8, 4, 32):
        qw = kernels.quantize_weights(w, bits)
        y = kernels.linear(x, qw, b, act_bits=act_bits)
        ref = emulate_linear(x, qw, b, act_bits)
        tol = 1e-5 * np.sqrt(k) * (np.abs(ref).max() + 1)
        assert np.abs(y - ref).max() <= tol, (bits, act_bits)


def test_static_scale_and_zero_scale():
    x, w = rand((4, 64), 5), rand((8, 64), 6)
    qw = kernels.quantize_weights(w, 8)
    y = kernels.linear(x, qw, act_scale=0.01)
    assert np.allclose(y, emulate_linear(x, qw, act_scale=0.01), rtol=1e-5, atol=1e-4)
    # A zero activation scale quantises everything to zero; zero weights give zero scales.
    assert not kernels.linear(x, qw, act_scale=0.0).any()
    qz = kernels.quantize_weights(np.zeros((8, 64), np.float32), 4)
    assert not kernels.linear(x, qz).any()
    assert not kernels.linear(np.zeros((4, 64), np.float32), qw).any()


@pytest.mark.parametrize("isa", ISAS)
def test_extremes_no_saturation(isa):
    # -128 weights times +-127 activations: AVX2's vpmaddubsw would saturate a naive pair sum
    # (2 x 128 x 127 > 32767); the kernels' sign trick must keep the result exact.
    n, k = 40, 1000
    q = np.where(np.arange(n * k).reshape(n, k) % 3 == 0, 127, -128).astype(np.int8)
    qw = _core.weights_from_int8_unchecked(q, np.ones(n, np.float32))
    for x in (np.full((5, k), 1.0, np.float32), np.full((5, k), -1.0, np.float32)):
        y = kernels.linear(x, qw, isa=isa)  # dynamic scale 1/127: activations are exactly +-127
        expect = (np.sign(x[:1]) * 127).astype(np.int64) @ q.astype(np.int64).T / 127.0
        assert np.array_equal(y, np.broadcast_to(expect, y.shape).astype(np.float32))


@pytest.mark.parametrize("isa", ISAS)
def test_activation_quantiser_rounds_half_to_even(isa):
    x = np.array([[0.5, 1.5, 2.5, -0.5, -1.5, 126.5, 127.5, -1000.0, 3.49999]], np.float32)
    q, s = kernels.quantize_activations(x, 8, scale=1.0, isa=isa)
    assert q.tolist() == [[0, 2, 2, 0, -2, 126, 127, -127, 3]]
    assert s.tolist() == [1.0]
    q4, _ = kernels.quantize_activations(x, 4, scale=1.0, isa=isa)
    assert q4.max() == 7 and q4.min() == -7


def test_weight_quantisation_rules():
    w = rand((6, 70), 9)
    q8, s8 = kernels.quantize_weights(w, 8).canonical()
    assert np.allclose(s8, np.abs(w).max(axis=1) / 127)
    assert np.array_equal(q8, np.clip(np.rint(w / s8[:, None]), -127, 127).astype(np.int8))
    q4, s4 = kernels.quantize_weights(w, 4).canonical()
    assert s4.shape == (6, 3) and q4.min() >= -8 and q4.max() <= 7
    blk = w[:, :32]
    big = blk[np.arange(6), np.abs(blk).argmax(axis=1)]
    assert np.allclose(s4[:, 0], big / -8)
    # Within half a step, except a value of the opposite sign to the block's extreme at +8
    # steps, which clips to 7: at most one step.
    err = np.abs(kernels.dequantize(kernels.quantize_weights(w, 4)) - w).reshape(6, -1)
    step = np.abs(np.repeat(s4, 32, axis=1)[:, :70])
    assert (err <= step * 1.0001).all()
    assert (err <= step * 0.5001).mean() > 0.95
    q64 = kernels.quantize_weights(w, 4, block_size=64)
    assert q64.block_size == 64 and q64.canonical()[1].shape == (6, 2)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (7, 13, 33), (197, 64, 197), (197, 197, 64), (5, 768, 100)])
def test_fp32_gemm(isa, m, k, n):
    a, b, bias = rand((m, k), 1), rand((k, n), 2), rand((n,), 3)
    y = kernels.gemm_f32(a, b, bias, isa=isa)
    ref = a.astype(np.float64) @ b + bias
    assert np.abs(y - ref).max() <= 1e-6 * np.sqrt(k) * 8 + 1e-6 * np.abs(ref).max()


@pytest.mark.parametrize("isa", ISAS)
def test_elementwise_ops(isa):
    from math import erf

    x = rand((5, 197), 4, 3.0)
    g, b = rand((197,), 5) + 1, rand((197,), 6)
    ln = kernels.layernorm(x, g, b, 1e-6, isa=isa)
    mu, var = x.mean(1, keepdims=True), x.var(1, keepdims=True)
    assert np.allclose(ln, (x - mu) / np.sqrt(var + 1e-6) * g + b, atol=1e-5)
    sm = kernels.softmax(x, 0.5, isa=isa)
    e = np.exp(0.5 * x - (0.5 * x).max(1, keepdims=True))
    assert np.allclose(sm, e / e.sum(1, keepdims=True), atol=1e-7, rtol=1e-5)
    ge = kernels.gelu(x, isa=isa)
    exact = 0.5 * x * (1 + np.vectorize(erf)(x / np.sqrt(2)))
    # absolute error against 1 + erf in float64 (the canonical GELU measures 2.05e-7 x max(1, |x|))
    assert (np.abs(ge - exact) <= 2.5e-7 * np.maximum(1, np.abs(x))).all()
    assert np.array_equal(kernels.add(x, ln, isa=isa), x + ln)


def test_bad_input_errors():
    w = rand((8, 16), 1)
    qw = kernels.quantize_weights(w, 8)
    x = rand((2, 16), 2)
    with pytest.raises(TypeError, match="float32"):
        kernels.linear(x.astype(np.float64), qw)
    with pytest.raises(TypeError, match="ndarray"):
        kernels.linear(x.tolist(), qw)
    with pytest.raises(ValueError, match="K=15"):
        kernels.linear(rand((2, 15), 3), qw)
    with pytest.raises(ValueError, match="2-D"):
        kernels.linear(x[None], qw)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.linear(np.asfortranarray(rand((4, 16), 4)), qw)
    bad = x.copy()
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        kernels.linear(bad, qw)
    with pytest.raises(ValueError, match="bits"):
        kernels.quantize_weights(w, 3)
    with pytest.raises(ValueError, match="block_size"):
        kernels.quantize_weights(w, 4, block_size=48)
    with pytest.raises(ValueError, match="act_bits"):
        kernels.linear(x, qw, act_bits=9)
    with pytest.raises(ValueError, match="bias"):
        kernels.linear(x, qw, rand((7,), 1))
    with pytest.raises(ValueError, match="num_threads"):
        kernels.linear(x, qw, num_threads=0)
    with pytest.raises(ValueError, match="not available|unknown"):
        kernels.linear(x, qw, isa="avx512")
    missing = "neon" if "avx2" in ISAS else "avx2"
    with pytest.raises(ValueError, match="not available"):
        kernels.linear(x, qw, isa=missing)
    with pytest.raises(TypeError):
        kernels.dequantize(w)


def test_pyruntime_isa_env_override(monkeypatch):
    import subprocess
    import sys

    code = "import pyruntime; print(pyruntime.isa())"
    env = dict(__import__("os").environ, PYRUNTIME_ISA="ref")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ref"
    env["PYRUNTIME_ISA"] = "sse9"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "unknown ISA 'sse9'" in out.stderr


# Non-finite input (csrc/kernels/kernels.h): every ISA puts NaN exactly where ref does and equals
# it bit for bit elsewhere. pyruntime.kernels refuses NaN input, so these go through _core.
NONFINITE = {
    "nan": np.float32(np.nan),
    "-nan": -np.float32(np.nan),
    "snan": np.array([0x7F800001], np.uint32).view(np.float32)[0],
    "nan-payload": np.array([0xFFFFFFFF], np.uint32).view(np.float32)[0],
    "inf": np.float32(np.inf),
    "-inf": np.float32(-np.inf),
}


def with_special(rows, n, value, seed):
    """rows x n random floats; row 1 gets `value` at its first, middle and last place in turn
    (one place per call of the returned list), rows 0 and 2 stay finite."""
    out = []
    for at in sorted({0, n // 2, n - 1}):
        x = rand((rows, n), seed, 3.0)
        x[1, at] = value
        out.append((x, at))
    return out


def assert_same_nan_pattern(got, want, what):
    assert np.array_equal(np.isnan(got), np.isnan(want)), what
    fin = ~np.isnan(want)
    assert np.array_equal(got[fin].view(np.int32), want[fin].view(np.int32)), what


@pytest.mark.parametrize("n", [1, 7, 8, 9, 17, 33, 65, 197])
@pytest.mark.parametrize("special", list(NONFINITE))
def test_nonfinite_inputs_identical_on_every_isa(special, n):
    value = NONFINITE[special]
    for x, at in with_special(3, n, value, n):
        g, b = rand((n,), 5) + 1, rand((n,), 6)
        want = {
            "gelu": _core.gelu(x, "ref"),
            "softmax": _core.softmax(x, 0.125, "ref"),
            "softmax scale<0": _core.softmax(x, -0.5, "ref"),
            "layernorm": _core.layernorm(x, g, b, 1e-6, "ref"),
        }
        # The rules themselves, on ref: NaN at the NaN element for GELU, whole row for the
        # row-wise ops; the finite rows untouched.
        if np.isnan(value):
            assert np.isnan(want["gelu"][1, at]) and np.isnan(want["gelu"]).sum() == 1
            for op in ("softmax", "softmax scale<0", "layernorm"):
                assert np.isnan(want[op][1]).all() and not np.isnan(want[op][[0, 2]]).any(), op
        if special == "inf":
            assert want["gelu"][1, at] == np.inf
        for isa in ISAS:
            got = {
                "gelu": _core.gelu(x, isa),
                "softmax": _core.softmax(x, 0.125, isa),
                "softmax scale<0": _core.softmax(x, -0.5, isa),
                "layernorm": _core.layernorm(x, g, b, 1e-6, isa),
            }
            for op in want:
                assert_same_nan_pattern(got[op], want[op], (isa, op, special, n, at))
