"""The kernels of the newer ViT families (SwiGLU, QuickGELU, RoPE, attention bias) against
PyTorch and timm's own functions, and every ISA against the scalar reference bit for bit (the
exactness contract in csrc/kernels/kernels.h).

RoPE is the same arithmetic as timm's eager ``x * cos + rot(x) * sin`` (no fused multiply-add),
so it equals timm's fp32 result exactly. SwiGLU, QuickGELU and the attention softmax use the
runtime's own exp, so they agree with PyTorch to ~1e-6 relative.
"""
import numpy as np
import pytest

import pyruntime
from pyruntime import kernels

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

ISAS = pyruntime.available_isas()
EDGE = [1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 64, 65, 197]


def rand(shape, seed, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def same_bits(a, b):
    return a.shape == b.shape and np.array_equal(a.view(np.int32), b.view(np.int32))


def close(got, want, rtol, atol):
    """|got - want| <= atol + rtol |want|, elementwise, with the worst ratio in the message."""
    err = np.abs(got.astype(np.float64) - want.astype(np.float64))
    bound = atol + rtol * np.abs(want.astype(np.float64))
    return bool((err <= bound).all()), float((err / bound).max()) if err.size else 0.0


def with_extremes(x):
    flat = x.reshape(-1)
    special = [0.0, -0.0, 88.5, -88.5, -87.0, 100.0, -100.0, 3e4, -3e4, 1e-3, -1e-3]
    for i, v in enumerate(special[: flat.size // 3]):
        flat[3 * i + 1] = v
    return x


# ---- SwiGLU and QuickGELU

@pytest.mark.parametrize("n", EDGE)
def test_swiglu_matches_torch_and_is_bit_identical_across_isas(n):
    g, u = with_extremes(rand((5, n), n, 4.0)), rand((5, n), n + 1)
    want = (torch.nn.functional.silu(torch.from_numpy(g)) * torch.from_numpy(u)).numpy()
    ref = kernels.swiglu(g, u, isa="ref")
    ok, worst = close(ref, want, 2e-6, 1e-30)
    assert ok, worst
    packed = np.ascontiguousarray(np.concatenate([g, u], axis=1))  # SwiGLUPacked: gate first
    for isa in ISAS:
        assert same_bits(kernels.swiglu(g, u, isa=isa), ref), isa
        assert same_bits(kernels.swiglu(packed, isa=isa), ref), isa


def test_swiglu_packed_is_timms_gluMlp():
    from timm.layers import SwiGLUPacked

    torch.manual_seed(0)
    mlp = SwiGLUPacked(in_features=24, hidden_features=2 * 40).eval()
    x = torch.randn(7, 24)
    with torch.no_grad():
        h = mlp.fc1(x)
        want = mlp.act(h.chunk(2, -1)[0]) * h.chunk(2, -1)[1]  # GluMlp.forward, gate_last=False
    ok, worst = close(kernels.swiglu(h.numpy()), want.numpy(), 2e-6, 1e-30)
    assert ok, worst


@pytest.mark.parametrize("n", EDGE)
def test_quick_gelu_matches_timm(n):
    from timm.layers.activations import quick_gelu

    x = with_extremes(rand((3, n), 100 + n, 4.0))
    want = quick_gelu(torch.from_numpy(x)).numpy()
    ref = kernels.quick_gelu(x, isa="ref")
    ok, worst = close(ref, want, 2e-6, 1e-30)
    assert ok, worst
    for isa in ISAS:
        assert same_bits(kernels.quick_gelu(x, isa=isa), ref), isa


def test_gated_activation_accuracy_on_a_dense_grid():
    # 1e-6 relative, plus 2e-36 absolute: the runtime's exp is 0 below -87.68, so x sigmoid(z)
    # is 0 where the exact value is below |x| 2^-126 (PyTorch keeps those tiny normals).
    x = np.arange(-60 * 512, 60 * 512 + 1, dtype=np.float32) / np.float32(512)
    x = x.reshape(1, -1)
    t = torch.from_numpy(x.astype(np.float64))
    silu = kernels.swiglu(x, np.ones_like(x))
    ok, worst = close(silu, (t * torch.sigmoid(t)).numpy(), 1e-6, 2e-36)
    assert ok, worst
    z = torch.from_numpy((np.float32(1.702) * x).astype(np.float64))
    ok, worst = close(kernels.quick_gelu(x), (t * torch.sigmoid(z)).numpy(), 1e-6, 2e-36)
    assert ok, worst


NONFINITE = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}


@pytest.mark.parametrize("special", list(NONFINITE))
def test_gated_nonfinite_like_torch(special):
    # The wrappers refuse non-finite input; _core is where the kernels' rules are visible.
    from pyruntime import _core

    v = NONFINITE[special]
    x = rand((3, 9), 7)
    x[1, 4] = v
    u = rand((3, 9), 8)
    want_s = (torch.nn.functional.silu(torch.from_numpy(x)) * torch.from_numpy(u)).numpy()
    from timm.layers.activations import quick_gelu

    want_q = quick_gelu(torch.from_numpy(x)).numpy()
    for isa in ISAS:
        s, q = _core.swiglu(x, u, isa), _core.quick_gelu(x, isa)
        assert np.array_equal(np.isnan(s), np.isnan(want_s)), isa
        assert np.array_equal(np.isinf(s), np.isinf(want_s)), isa
        assert np.array_equal(np.isnan(q), np.isnan(want_q)), isa
        assert np.array_equal(np.isinf(q), np.isinf(want_q)), isa


# ---- RoPE

def rope_tables(n, hd, seed, half, heads=None):
    """sin/cos laid out as timm's RotaryEmbeddingCat emits them: frequencies repeated in pairs
    (interleaved) or in halves."""
    rng = np.random.default_rng(seed)
    shape = (n, hd // 2) if heads is None else (heads, n, hd // 2)
    ang = rng.uniform(-50, 50, shape)
    rep = (lambda a: np.concatenate([a, a], -1)) if half else (lambda a: np.repeat(a, 2, -1))
    return rep(np.sin(ang)).astype(np.float32), rep(np.cos(ang)).astype(np.float32)


@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("T,prefix,heads,hd", [(1, 0, 1, 2), (5, 1, 3, 6), (17, 1, 2, 10), (197, 1, 3, 64),
                                               (20, 4, 2, 34), (50, 5, 4, 16), (9, 9, 2, 8)])
def test_rope_equals_timm_apply_rot_embed_cat(half, T, prefix, heads, hd):
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat

    x = rand((T, heads * hd), T + hd, 3.0)
    sin, cos = rope_tables(T - prefix, hd, hd, half)
    # timm: q [B, H, N, hd], prefix tokens kept, emb = cat(sin, cos) on the last dim (Eva.Attention)
    q = torch.from_numpy(x).reshape(1, T, heads, hd).transpose(1, 2)
    emb = torch.from_numpy(np.concatenate([sin, cos], -1))
    want = torch.cat([q[:, :, :prefix], apply_rot_embed_cat(q[:, :, prefix:], emb, half=half)], dim=2)
    want = want.transpose(1, 2).reshape(T, heads * hd).numpy()
    for isa in ISAS:
        got = kernels.rope(x, sin, cos, heads=heads, prefix=prefix, half=half, isa=isa)
        assert same_bits(got, want), isa


@pytest.mark.parametrize("half", [False, True])
def test_rope_per_head_tables_mixed_mode(half):
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat

    T, prefix, heads, hd = 12, 1, 3, 8
    x = rand((T, heads * hd), 3, 2.0)
    sin, cos = rope_tables(T - prefix, hd, 4, half, heads=heads)
    q = torch.from_numpy(x).reshape(1, T, heads, hd).transpose(1, 2)
    emb = torch.from_numpy(np.concatenate([sin, cos], -1))[None]  # [1, H, N, 2 hd], as 'mixed'
    want = torch.cat([q[:, :, :prefix], apply_rot_embed_cat(q[:, :, prefix:], emb, half=half)], dim=2)
    want = want.transpose(1, 2).reshape(T, heads * hd).numpy()
    for isa in ISAS:
        assert same_bits(kernels.rope(x, sin, cos, heads=heads, prefix=prefix, half=half, isa=isa), want), isa


def test_rope_with_timm_rotary_embedding_cat():
    """The tables of a real timm RotaryEmbeddingCat (EVA-02's), both layouts."""
    from timm.layers.pos_embed_sincos import RotaryEmbeddingCat, apply_rot_embed_cat

    heads, hd, grid = 2, 16, (4, 5)
    for half in (False, True):
        emb = RotaryEmbeddingCat(hd, in_pixels=False, feat_shape=list(grid), rotate_half=half).get_embed()
        sin, cos = (t.contiguous().numpy().astype(np.float32) for t in emb.chunk(2, -1))
        n = grid[0] * grid[1]
        x = rand((n + 1, heads * hd), 9)
        q = torch.from_numpy(x).reshape(1, n + 1, heads, hd).transpose(1, 2)
        want = torch.cat([q[:, :, :1], apply_rot_embed_cat(q[:, :, 1:], emb.float(), half=half)], dim=2)
        want = want.transpose(1, 2).reshape(n + 1, heads * hd).numpy()
        assert same_bits(kernels.rope(x, sin, cos, heads=heads, prefix=1, half=half), want), half


def test_rope_bad_input():
    x = rand((5, 12), 0)
    sin, cos = rope_tables(4, 6, 0, False)
    with pytest.raises(ValueError, match="even head_dim"):
        kernels.rope(rand((5, 10), 0), sin, cos, heads=2, prefix=1)
    with pytest.raises(ValueError, match="sin must have shape"):
        kernels.rope(x, sin, cos, heads=2, prefix=0)
    with pytest.raises(ValueError, match="prefix"):
        kernels.rope(x, sin, cos, heads=2, prefix=6)
    with pytest.raises(ValueError, match="NaN"):
        kernels.rope(x, np.full_like(sin, np.nan), cos, heads=2, prefix=1)


# ---- attention with an additive bias

@pytest.mark.parametrize("H,Tq,T,dh", [(1, 1, 1, 1), (2, 5, 5, 7), (3, 17, 17, 32), (2, 50, 50, 64), (1, 3, 197, 64)])
def test_attention_bias_matches_torch_sdpa(H, Tq, T, dh):
    q, k, v = rand((H, Tq, dh), 1), rand((H, T, dh), 2), rand((H, T, dh), 3)
    bias = rand((H, Tq, T), 4, 2.0)
    tq, tk, tv, tb = (torch.from_numpy(a) for a in (q, k, v, bias))
    want = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tb).numpy()
    ref = kernels.attention(q, k, v, bias=bias, isa="ref")
    ok, worst = close(ref, want, 1e-5, 1e-6)
    assert ok, worst
    want_nb = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv).numpy()
    ok, worst = close(kernels.attention(q, k, v, isa="ref"), want_nb, 1e-5, 1e-6)
    assert ok, worst
    for isa in ISAS:
        assert same_bits(kernels.attention(q, k, v, bias=bias, isa=isa), ref), isa


def test_attention_bias_matches_timm_beit_attention():
    from timm.models.beit import Attention

    torch.manual_seed(0)
    dim, heads, window = 32, 2, (3, 3)
    attn = Attention(dim, num_heads=heads, qkv_bias=True, window_size=window).eval()
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
        T = window[0] * window[1] + 1
        x = torch.randn(1, T, dim)
        want = attn(x).numpy()[0]
        qkv = torch.nn.functional.linear(x, attn.qkv.weight, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
        q, k, v = qkv.reshape(T, 3, heads, -1).permute(1, 2, 0, 3).numpy()
        bias = attn._get_rel_pos_bias()[0].numpy()
    o = kernels.attention(np.ascontiguousarray(q), np.ascontiguousarray(k), np.ascontiguousarray(v),
                          scale=attn.scale, bias=np.ascontiguousarray(bias))
    with torch.no_grad():
        got = attn.proj(torch.from_numpy(o).transpose(0, 1).reshape(T, dim)).numpy()
    ok, worst = close(got, want, 1e-5, 1e-6)
    assert ok, worst


def test_softmax_bias_is_softmax_of_scaled_plus_bias():
    x, b = rand((7, 33), 1, 4.0), rand((7, 33), 2)
    ref = kernels.softmax(x, 0.125, bias=b, isa="ref")
    want = torch.softmax(torch.from_numpy(x) * 0.125 + torch.from_numpy(b), -1).numpy()
    ok, worst = close(ref, want, 2e-6, 1e-12)
    assert ok, worst
    # no bias: exactly the plain softmax, as before biases existed
    assert same_bits(kernels.softmax(x, 0.125), kernels.softmax(x, 0.125, bias=None))
    for isa in ISAS:
        assert same_bits(kernels.softmax(x, 0.125, bias=b, isa=isa), ref), isa
    with pytest.raises(ValueError, match="bias must have"):
        kernels.softmax(x, 0.125, bias=b[:, :5].copy())


def test_bad_input_errors_name_the_problem():
    x = rand((4, 6), 0)
    with pytest.raises(ValueError, match="even last dimension"):
        kernels.swiglu(rand((4, 5), 0))
    with pytest.raises(ValueError, match="shapes differ"):
        kernels.swiglu(x, rand((4, 7), 0))
    with pytest.raises(TypeError, match="float32"):
        kernels.quick_gelu(x.astype(np.float64))
    with pytest.raises(ValueError, match="NaN"):
        kernels.quick_gelu(np.full((2, 3), np.nan, np.float32))
    q, k = rand((2, 3, 8), 1), rand((2, 5, 8), 2)
    with pytest.raises(ValueError, match="k and v"):
        kernels.attention(q, k, rand((2, 4, 8), 3))
    with pytest.raises(ValueError, match="bias must have shape"):
        kernels.attention(q, k, k, bias=rand((2, 3, 4), 4))
    with pytest.raises(ValueError, match="heads"):
        kernels.rope(x, *rope_tables(4, 6, 0, False), heads=0)
