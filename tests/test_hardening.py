"""Hostile or degenerate calls into the compiled core: each of these crashed the process
(SIGFPE, SIGSEGV), exhausted it, or gave silent garbage before the C++ side checked it. The
calls go straight to ``pyruntime._core`` where the point is that C++ is the backstop (the
Python wrappers check first), and through ``pyruntime.kernels``/``Model.run`` otherwise."""
from __future__ import annotations

import copy

import numpy as np
import pytest

import pyruntime
from pyruntime import _core, kernels

from _graphs import FP32, W4A8, W8A8, random_tensors, tiny_graph
from _graphs import random_images as _images, save_model as _save

LIMITS = _core.limits()


# --- zero-sized kernels calls: parallel_tiles and quantize_acts divided by zero (SIGFPE) -----

@pytest.mark.parametrize("isa", pyruntime.available_isas())
def test_zero_rows_and_columns_do_not_divide_by_zero(isa):
    w = np.random.default_rng(0).standard_normal((5, 40)).astype(np.float32)
    for bits in (8, 4, 32):
        y = kernels.linear(np.zeros((0, 40), np.float32), kernels.quantize_weights(w, bits), isa=isa, num_threads=2)
        assert y.shape == (0, 5)
    assert kernels.gemm_f32(np.zeros((0, 7), np.float32), np.ones((7, 3), np.float32), isa=isa).shape == (0, 3)
    assert kernels.gemm_f32(np.ones((4, 7), np.float32), np.ones((7, 0), np.float32), isa=isa).shape == (4, 0)
    y = kernels.gemm_f32(np.ones((4, 0), np.float32), np.ones((0, 3), np.float32), np.arange(3, dtype=np.float32), isa=isa)
    np.testing.assert_array_equal(y, np.tile(np.arange(3, dtype=np.float32), (4, 1)))
    q, s = kernels.quantize_activations(np.zeros((0, 40), np.float32), 8, isa=isa)
    assert q.shape == (0, 40) and s.shape == (0,)
    q, s, bsum = _core.quantize_acts(np.zeros((0, 40), np.float32), 8, None, True, isa)
    assert q.shape == (0, 40) and bsum.shape == (0, 2)


# --- int4 block sizes: 2**60 wrapped the packed size to 0 (SIGSEGV); 2**20 asked for ~1 GB --

@pytest.mark.parametrize("block", [2 ** 60, 2 ** 20, 64])
def test_int4_block_larger_than_k_is_refused(block):
    w = np.ones((4, 40), np.float32)  # K = 40: blocks of 32 or 64 are fine, nothing above
    if block == 64:
        assert kernels.quantize_weights(w, 4, block_size=64).block_size == 64
        with pytest.raises(ValueError, match="exceeds K=40"):
            kernels.quantize_weights(w, 4, block_size=96)
        return
    with pytest.raises(ValueError, match="block_size"):
        kernels.quantize_weights(w, 4, block_size=block)
    # The compiled core refuses it by itself too.
    with pytest.raises(ValueError, match="at most K rounded up to 32"):
        _core.quantize_weights(w, 4, block)
    with pytest.raises(ValueError, match="at most K rounded up to 32"):
        _core.weights_from_canonical(np.zeros((4, 40), np.int8), np.ones(4, np.float32), 4, block)


def test_a_model_file_with_a_huge_int4_block_is_refused_by_the_core():
    g = tiny_graph(layers={"blocks.0.mlp.fc1": W4A8})
    t = random_tensors(g)
    g2 = copy.deepcopy(g)
    g2["layers"]["blocks.0.mlp.fc1"]["block_size"] = 2 ** 60
    with pytest.raises(ValueError, match="blocks.0.mlp.fc1.*block size"):
        _core.Executor(g2, t)


def test_k_beyond_exact_int32_accumulation_is_refused():
    K = LIMITS["max_k"] + 1
    w = np.zeros((1, K), np.float32)
    with pytest.raises(ValueError, match="K <= "):
        kernels.quantize_weights(w, 8)
    with pytest.raises(ValueError, match="K <= "):
        _core.quantize_weights(w, 8, 32)
    with pytest.raises(ValueError, match="K="):
        _core.quantize_acts(np.zeros((1, K), np.float32), 8, None, False, None)
    assert kernels.quantize_weights(np.zeros((1, LIMITS["max_k"]), np.float32), 8).shape == (1, LIMITS["max_k"])


# --- the Executor constructor as a backstop: types and sizes --------------------------------

def test_executor_refuses_non_array_tensors():
    g = tiny_graph()
    t = random_tensors(g)
    for bad in (1, "x", [1.0, 2.0], None):
        t2 = dict(t, pos_embed=bad)
        with pytest.raises(ValueError, match="pos_embed.*not a numpy array"):
            _core.Executor(g, t2)


def test_executor_takes_float32_by_value_not_by_dtype_identity():
    """Arrays that went through pickle (a saved fit, a worker process) carry a float32 dtype
    equal to numpy's but not the same object: they load and run exactly like the originals.
    Other byte orders and widths are still refused."""
    import pickle

    g = tiny_graph(layers={"blocks.0.attn.qkv": W8A8})
    t = random_tensors(g)
    x = _images(g, 2)
    want = _core.Executor(g, t).run(x)
    got = _core.Executor(g, pickle.loads(pickle.dumps(t))).run(x)
    np.testing.assert_array_equal(got["logits"], want["logits"])
    for bad, match in ((t["pos_embed"].astype(">f4"), "pos_embed' must be float32"),
                       (t["pos_embed"].astype(np.float64), "pos_embed' must be float32"),
                       (t["blocks.0.attn.qkv.weight.q8"].astype(np.int16), "weight.q8' has dtype int16")):
        name = "blocks.0.attn.qkv.weight.q8" if bad.dtype == np.int16 else "pos_embed"
        with pytest.raises(ValueError, match=match):
            _core.Executor(g, dict(t, **{name: bad}))


@pytest.mark.parametrize("key,value,match", [
    ("embed_dim", 2 ** 62, "embed_dim must be in"),
    ("mlp_hidden", 2 ** 63 + 5, "mlp_hidden must be in"),
    ("depth", 10 ** 12, "depth must be in"),
    ("num_classes", 2 ** 40, "num_classes must be in"),
    ("img_size", [2 ** 40, 8], "image height"),
    ("patch_size", [1, 1], None),  # 64 tokens + cls: fine
    ("eps", float("nan"), "eps"),
    ("eps", 1e300, "eps"),
])
def test_executor_checks_sizes_before_using_them(key, value, match):
    g = tiny_graph()
    t = random_tensors(g)
    g2 = copy.deepcopy(g)
    g2["arch"][key] = value
    if match is None:
        with pytest.raises(ValueError):  # a valid size, but the tensors no longer fit it
            _core.Executor(g2, t)
        return
    with pytest.raises(ValueError, match=match):
        _core.Executor(g2, t)


def test_token_count_is_capped():
    g = tiny_graph(img_size=[8, 8 * (LIMITS["max_tokens"] // 4)], patch_size=[4, 4])  # 2 x 1024*2 patches
    t = random_tensors(g)
    with pytest.raises(ValueError, match="tokens per image exceed the limit"):
        _core.Executor(g, t)


def test_wrongly_typed_graph_values_are_value_errors():
    g = tiny_graph()
    t = random_tensors(g)
    g2 = copy.deepcopy(g)
    g2["exits"] = {"block": 0}
    with pytest.raises(ValueError):
        _core.Executor(g2, t)
    g3 = copy.deepcopy(g)
    g3["layers"] = [1, 2]
    with pytest.raises(ValueError):
        _core.Executor(g3, t)


# --- threads ----------------------------------------------------------------------------------

def test_thread_counts_are_capped(tmp_path):
    g = tiny_graph()
    m = pyruntime.load(_save(tmp_path, g, random_tensors(g)))
    x = _images(g, 2)
    cap = LIMITS["max_threads"]
    for bad in (0, -1, cap + 1, 10 ** 6, 2 ** 70):
        with pytest.raises((ValueError, TypeError, OverflowError)):
            m._executor.run(x, bad, None, False)
        with pytest.raises(ValueError):
            m.run(x, num_threads=bad)
    with pytest.raises(ValueError, match=f"1..{cap}"):
        _core.linear(np.ones((2, 8), np.float32), kernels.quantize_weights(np.ones((3, 8), np.float32), 8),
                     None, None, 8, cap + 1, None)
    with pytest.raises(ValueError, match="seconds"):
        _core.int8_peak_gops(1, 1e9)
    with pytest.raises(ValueError, match="num_threads"):
        _core.fp32_peak_gflops(10 ** 6, 0.01)
    m.run(x, num_threads=cap)  # the cap itself is allowed


# --- scratch: sized to one image group, released after a huge batch ---------------------------

def test_scratch_does_not_grow_with_the_batch_beyond_the_residual_stream(tmp_path):
    g = tiny_graph(img_size=[32, 32], patch_size=[4, 4], embed_dim=32, mlp_hidden=64, num_heads=2)
    T, D, NC = 65, 32, g["arch"]["num_classes"]
    m = pyruntime.load(_save(tmp_path, g, random_tensors(g)), num_threads=1)

    def beyond_residual(B):  # scratch beyond the batch's residual stream and per-image results
        m.run(_images(g, B))
        return m._executor.scratch_bytes - B * (T * D + 2 * D + 2 * NC) * 4

    small, large = beyond_residual(256), beyond_residual(1024)
    # Group-sized intermediates: the same at 256 and 1024 images (qkv alone for the whole
    # batch of 1024 would be 25 MB), and a few L2-sized groups in all.
    assert large <= small + 4096
    assert large <= 8 * 2 ** 20
    # One huge batch does not keep its workspace.
    m.run(_images(g, 2500))
    assert m._executor.scratch_bytes <= 40 * 2 ** 20


# --- non-finite intermediates surface as NaN, identically on every ISA -------------------------

@pytest.mark.parametrize("precision", [FP32, W8A8, W4A8])
def test_non_finite_intermediates_give_nan_logits_on_every_isa(tmp_path, precision):
    g = tiny_graph(layers={n: precision for n in tiny_graph()["layers"]})
    m = pyruntime.load(_save(tmp_path, g, random_tensors(g, seed=3)))
    x = _images(g, 4, seed=1)
    x[1] = 3e38
    x[2, 0, 0, :] = -3e38
    results = {isa: m.run(x, isa=isa).logits for isa in pyruntime.available_isas()}
    for isa, logits in results.items():
        assert np.isfinite(logits[[0, 3]]).all(), isa
        # An image's logits are all NaN or all finite, never a mix; fp32 and int8 weights
        # overflow on these inputs (int4's smaller products stay finite: a real answer).
        assert all(np.isnan(row).all() or np.isfinite(row).all() for row in logits), isa
        if precision is not W4A8:
            assert np.isnan(logits[[1, 2]]).all(), isa
        np.testing.assert_array_equal(logits, results["ref"])  # NaN == NaN for this function


def test_int8_attention_does_not_launder_overflow(tmp_path):
    g = tiny_graph(layers={n: W8A8 for n in tiny_graph()["layers"]})
    g["attention"] = {"bits": 8}
    t = random_tensors(g, seed=4)
    t["blocks.0.attn.qkv.weight.scale"][:] = 3e37  # qkv overflows to Inf from finite inputs
    m = pyruntime.load(_save(tmp_path, g, t))
    for isa in pyruntime.available_isas():
        assert np.isnan(m.run(_images(g, 3), isa=isa).logits).all(), isa


def test_nan_hidden_by_a_masked_array_is_refused(tmp_path):
    g = tiny_graph()
    m = pyruntime.load(_save(tmp_path, g, random_tensors(g)))
    x = _images(g, 2)
    x[0, 0, 0, 0] = np.nan
    masked = np.ma.masked_array(x, mask=np.isnan(x))
    with pytest.raises(ValueError, match="NaN or Inf"):
        m.run(masked)
    with pytest.raises(ValueError, match="NaN or Inf"):
        m._executor.run(x, 1, None, False)  # the core checks by itself too


# --- QuEE: a block without reduced layers is not recorded as reduced --------------------------

def test_reduced_path_is_recorded_only_where_a_block_has_reduced_layers(tmp_path):
    g = tiny_graph(depth=4, exits=[{"block": 0, "rule": "gate", "threshold": 0.0}],
                   layers={f"blocks.{b}.{k}": W8A8 for b in range(4) for k in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")})
    # Only block 2 has a reduced copy; the gate sends every image down the reduced path.
    g["gates"] = {"lambda": 0.0, "topk": 1, "hidden": 1, "cost": {"0": [0.0, 0.0, 0.0]},
                  "reduced": {"blocks.2.mlp.fc1": W4A8}}
    t = random_tensors(g, seed=2)
    t["gates.0.fc1.weight"][:] = 0.0
    t["gates.0.fc1.bias"][:] = 0.0
    t["gates.0.fc2.weight"][:] = 0.0
    t["gates.0.fc2.bias"][:] = np.array([5.0, 5.0, -5.0], np.float32)  # reduced: lowest predicted error
    r = pyruntime.load(_save(tmp_path, g, t)).run(_images(g, 3))
    assert (r.exit_block == 3).all()
    np.testing.assert_array_equal(r.block_path, np.tile([1, 1, 2, 1], (3, 1)))
