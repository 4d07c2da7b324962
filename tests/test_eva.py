"""EVA-02 and the RoPE ViTs built on timm's ``Eva`` (docs/families.md): RoPE on q and k of the
patch tokens, SwiGLU MLPs (split or packed), sub-LN, the attention-output norm, layer scale.
Each converts, and the runtime matches timm's fp32 logits, features and tokens to 1e-5
relative and the numpy oracle when quantised; the new op kinds (``rope``, ``swiglu``) hold
their oracle to timm's formulas and the checker refuses malformed ones; what stays out is
refused in one line naming the feature. Tiny models, timm's random initialisation
(pretrained=False: nothing is downloaded), perturbed so that no term (zero biases, unit
norms) hides."""
from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import pyruntime  # noqa: E402
from pyruntime import _numpy_ref, bops  # noqa: E402
from pyruntime.convert import convert, describe_model  # noqa: E402
from pyruntime.errors import FormatError  # noqa: E402
from pyruntime.modelfile import check_graph, check_tensors, read_model  # noqa: E402
from pyruntime.policy import ExitPolicy, LayerPolicy, Policy  # noqa: E402

from _helpers import assert_matches_timm, assert_near_oracle, images, perturbed, rel_err, timm_outputs  # noqa: E402

pytestmark = pytest.mark.torch
torch.set_num_threads(1)

SMALL = dict(depth=2, num_classes=10)
# name -> (timm model name, kwargs): every supported variant at a tiny size
CASES = {
    # packed SwiGLU (GluMlp), shared 'cat' RoPE (interleaved), avg pool + fc_norm, no final norm
    "eva02_tiny": ("eva02_tiny_patch14_224", dict(SMALL, img_size=56, embed_dim=64, num_heads=2)),
    # split SwiGLU (fc1_g, fc1_x) with sub-LN (scale_mlp), unfused q/k/v projections
    "eva02_base": ("eva02_base_patch14_224", dict(SMALL, img_size=28, embed_dim=96, num_heads=3)),
    # the attention-output norm, layer scale, RoPE in halves, class-token pooling + final norm
    "eva02_small_ln_ls_half": ("eva02_small_patch14_224", dict(SMALL, img_size=28, embed_dim=96, num_heads=3,
                                                              scale_attn_inner=True, init_values=0.5,
                                                              rope_rotate_half=True, global_pool="token")),
    # CLIP's EVA-02 tower as a feature extractor (num_classes=0)
    "eva02_clip_features": ("eva02_base_patch16_clip_224", dict(depth=2, img_size=32, embed_dim=64, num_heads=2,
                                                               num_classes=0)),
    # EVA-01: no RoPE, GELU MLP, fused qkv with q and v biases (k none)
    "eva_giant": ("eva_giant_patch14_224", dict(SMALL, img_size=28, embed_dim=64, num_heads=2)),
    # vit_*_rope_*: AttentionRope, no absolute position embedding
    "vit_rope": ("vit_small_patch16_rope_224", dict(SMALL, img_size=32, embed_dim=64, num_heads=2)),
    # 'mixed' RoPE: learnt frequencies, a table per block and head
    "vit_rope_mixed": ("vit_small_patch16_rope_mixed_224", dict(SMALL, img_size=32, embed_dim=64, num_heads=2)),
    # a register token (two prefix tokens left unrotated), avg pooling
    "vit_rope_reg_gap": ("vit_base_patch16_rope_reg1_gap_256", dict(SMALL, img_size=32, embed_dim=64, num_heads=2)),
    # post-norm blocks (EVA-02-CLIP enormous), token pooling, a final norm
    "eva02_enormous_post_norm": ("eva02_enormous_patch14_clip_224", dict(SMALL, img_size=28, embed_dim=64,
                                                                        num_heads=2)),
    # 2-D MRoPE (Qwen2-VL style interleaved sections, rotate-half)
    "vit_mrope": ("vit_small_patch16_rope_224", dict(SMALL, img_size=32, embed_dim=64, num_heads=2, rope_type="mrope",
                                                     rope_grid_indexing="ij")),
    # the Perception Encoder: RoPE, layer scale, norm_pre, SigLIP's attention-pooling (MAP) head
    "pe_core_map_head": ("vit_pe_core_tiny_patch16_384", dict(SMALL, img_size=32, embed_dim=64, num_heads=2)),
    # DINOv3's RoPE (rotate-half, its own periods), four registers, layer scale, at a fixed size
    "dinov3_fixed_size": ("vit_small_patch16_dinov3", dict(SMALL, img_size=32, embed_dim=64, num_heads=2,
                                                           dynamic_img_size=False)),
}


def build(case: str):
    """The case's model, the same on every run: timm initialises from torch's global generator."""
    name, kwargs = CASES[case]
    torch.manual_seed(0)
    return perturbed(timm.create_model(name, pretrained=False, **kwargs))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{case: (model, fp32 file)}: each case converted once."""
    d = tmp_path_factory.mktemp("eva")
    out = {}
    for case in CASES:
        model = build(case)
        out[case] = model, convert(model, d / f"{case}.pyrt")
    return out


# --- fp32 parity with timm -------------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(CASES))
def test_fp32_matches_timm(case, files):
    model, path = files[case]
    x = images(model)
    assert_matches_timm(pyruntime.load(path).run(x.numpy(), tokens=True), model, x)


@pytest.mark.parametrize("case", ["eva02_tiny", "eva02_small_ln_ls_half", "vit_rope_mixed"])
def test_fp32_oracle_matches_timm(case, files):
    """The numpy oracle is the same model (what the quantised tests hold the runtime to)."""
    model, path = files[case]
    graph, tensors, _, _ = read_model(path)
    x = images(model)
    want = timm_outputs(model, x)
    got = _numpy_ref.forward(graph, tensors, x.numpy(), outputs=True)
    for key in ("logits", "features", "tokens"):
        assert rel_err(got[key], want[key]) <= 1e-5, key


@pytest.mark.parametrize("case", ["eva02_base", "vit_rope_mixed"])
def test_converts_by_name_from_a_checkpoint(case, files, tmp_path):
    """timm name + model kwargs + a state dict (the 'mixed' RoPE's learnt frequencies are in it):
    the same file as converting the module."""
    model, path = files[case]
    name, kwargs = CASES[case]
    torch.save(model.state_dict(), tmp_path / "ckpt.pth")
    by_name = convert(name, tmp_path / "m.pyrt", checkpoint=tmp_path / "ckpt.pth", model_kwargs=kwargs)
    a, b = read_model(by_name), read_model(path)
    assert a[0]["ops"] == b[0]["ops"] and sorted(a[1]) == sorted(b[1])
    for k in a[1]:
        np.testing.assert_array_equal(a[1][k], b[1][k], err_msg=k)


# --- the programs ----------------------------------------------------------------------------------

def block_kinds(graph, b=0):
    return [op["op"] for op in graph["ops"] if op["block"] == b]


def test_eva02_block_program(files):
    """RoPE between the qkv linear and the attention core; SwiGLU's fc1 (gate rows first)
    before the swiglu op; the split SwiGLU's sub-LN before fc2."""
    tiny = read_model(files["eva02_tiny"][1])[0]
    assert block_kinds(tiny) == ["layernorm", "linear", "rope", "attention", "linear", "add", "layernorm", "linear",
                                 "swiglu", "linear", "add"]
    base = read_model(files["eva02_base"][1])[0]
    assert block_kinds(base) == ["layernorm", "linear", "rope", "attention", "linear", "add", "layernorm", "linear",
                                 "swiglu", "layernorm", "linear", "add"]
    small = read_model(files["eva02_small_ln_ls_half"][1])[0]
    assert block_kinds(small) == ["layernorm", "linear", "rope", "attention", "layernorm", "linear", "layer_scale",
                                  "add", "layernorm", "linear", "swiglu", "linear", "layer_scale", "add"]
    rope = next(op for op in small["ops"] if op["op"] == "rope")
    assert rope["attrs"] == {"heads": 3, "prefix": 1, "half": True, "per_head": False}
    assert [op["weights"] for op in small["ops"] if op["op"] == "rope"] == [{"sin": "rope.sin", "cos": "rope.cos"}] * 2
    post = read_model(files["eva02_enormous_post_norm"][1])[0]
    assert block_kinds(post) == ["linear", "attention", "linear", "layernorm", "add", "linear", "gelu", "linear",
                                 "layernorm", "add"]
    giant = read_model(files["eva_giant"][1])[0]
    assert "rope" not in [op["op"] for op in giant["ops"]] and "gelu" in block_kinds(giant)
    assert "pos_embed" not in [op["op"] for op in read_model(files["vit_rope"][1])[0]["ops"]]


def test_rope_tables_are_timms(files):
    model, path = files["eva02_tiny"]
    graph, tensors, _, _ = read_model(path)
    with torch.no_grad():
        emb = model.rope.get_embed()
    sin, cos = emb.chunk(2, dim=-1)
    assert tensors["rope.sin"].shape == (16, 32)  # a 4x4 grid of patches, head width 32
    np.testing.assert_array_equal(tensors["rope.sin"], sin.numpy())
    np.testing.assert_array_equal(tensors["rope.cos"], cos.numpy())
    # 'mixed': a table per block, per head
    model, path = files["vit_rope_mixed"]
    graph, tensors, _, _ = read_model(path)
    with torch.no_grad():
        emb = model.rope.get_embed(shape=model.patch_embed.grid_size)
    for i in range(2):
        op = next(op for op in graph["ops"] if op["op"] == "rope" and op["block"] == i)
        assert op["attrs"]["per_head"] and op["weights"]["sin"] == f"blocks.{i}.attn.rope.sin"
        np.testing.assert_array_equal(tensors[op["weights"]["cos"]], emb[i].chunk(2, dim=-1)[1].numpy())


def test_swiglu_fc1_stacks_gate_then_input(files):
    model, path = files["eva02_base"]
    graph, tensors, _, _ = read_model(path)
    mlp = model.blocks[1].mlp
    with torch.no_grad():
        want = torch.cat([mlp.fc1_g.weight, mlp.fc1_x.weight]).numpy()
        bias = torch.cat([mlp.fc1_g.bias, mlp.fc1_x.bias]).numpy()
    np.testing.assert_array_equal(tensors["blocks.1.mlp.fc1.weight"], want)
    np.testing.assert_array_equal(tensors["blocks.1.mlp.fc1.bias"], bias)
    assert set(graph["layers"]) >= {"blocks.1.mlp.fc1", "blocks.1.mlp.fc2"}
    assert graph["arch"]["mlp_hidden"] == mlp.fc2.in_features


def test_qkv_bias_is_q_zero_v(files):
    model, path = files["eva_giant"]
    tensors = read_model(path)[1]
    attn = model.blocks[0].attn
    D = attn.q_bias.shape[0]
    b = tensors["blocks.0.attn.qkv.bias"]
    np.testing.assert_array_equal(b[:D], attn.q_bias.detach().numpy())
    np.testing.assert_array_equal(b[D:2 * D], np.zeros(D, np.float32))
    np.testing.assert_array_equal(b[2 * D:], attn.v_bias.detach().numpy())


def test_bops_count_swiglu_fc1_as_its_two_projections(files):
    model, path = files["eva02_base"]
    graph = read_model(path)[0]
    macs = bops.layer_macs(graph)
    D, F, T = 96, model.blocks[0].mlp.fc2.in_features, 1 + 4
    assert macs["blocks.0.mlp.fc1"] == T * D * 2 * F  # fc1_g and fc1_x: T x D x F each
    assert macs["blocks.0.attn.qk"] == T * T * D      # RoPE and the gate themselves are free
    assert sum(macs.values()) * 32 * 32 == bops.static(graph)
    r = pyruntime.load(path).run(images(model).numpy())
    assert (r.bops == bops.static(graph)).all()


# --- quantised: the runtime is the oracle's model --------------------------------------------------

@pytest.mark.parametrize("case", ["eva02_tiny", "eva02_base", "eva02_small_ln_ls_half", "eva02_enormous_post_norm",
                                  "vit_rope_mixed", "pe_core_map_head"])
@pytest.mark.parametrize("policy", ["w8a8", "w4a8", "w8a8-attn8"])
def test_quantised_matches_the_oracle(case, policy, files, tmp_path):
    model = files[case][0]
    path = convert(model, tmp_path / "m.pyrt", policy=policy)
    graph, tensors, _, _ = read_model(path)
    x = images(model, 3).numpy()
    r = pyruntime.load(path).run(x, tokens=True)
    want = _numpy_ref.forward(graph, tensors, x, outputs=True)
    assert_near_oracle(r, want)
    np.testing.assert_array_equal(r.bops, want["bops"])
    # still the timm model, with quantisation error (tolerances as tests/test_families.py's)
    assert rel_err(r.logits, timm_outputs(model, torch.from_numpy(x))["logits"]) < (0.25 if policy == "w4a8" else 0.05)


@pytest.mark.parametrize("policy", ["fp32", "w8a8"])
def test_every_isa_gives_the_same_bits(policy, files, tmp_path):
    """RoPE and SwiGLU run on the kernel table of the ISA, whose results are bit-identical."""
    model = files["eva02_base"][0]
    m = pyruntime.load(convert(model, tmp_path / "m.pyrt", policy=policy))
    x = images(model, 3).numpy()
    ref = m.run(x, isa="ref", tokens=True)
    for isa in pyruntime.available_isas():
        r = m.run(x, isa=isa, tokens=True)
        for key in ("logits", "features", "tokens"):
            np.testing.assert_array_equal(getattr(r, key), getattr(ref, key), err_msg=f"{isa} {key}")


# --- exits on an EVA file --------------------------------------------------------------------------

def exit_heads(D: int, n: int, seed: int = 3):
    g = np.random.default_rng(seed)
    return {0: {"norm.weight": (1 + 0.1 * g.standard_normal(D)).astype(np.float32),
                "norm.bias": (0.1 * g.standard_normal(D)).astype(np.float32),
                "fc.weight": g.standard_normal((n, D)).astype(np.float32),
                "fc.bias": g.standard_normal(n).astype(np.float32)}}


@pytest.mark.parametrize("case", ["eva02_tiny", "vit_rope_mixed"])
def test_exit_heads_convert_and_run(case, files, tmp_path):
    """An exit after block 0 (heads given to convert): images leave there or run on, and the
    runtime agrees with the oracle on where and with what."""
    model = files[case][0]
    x = images(model, 8).numpy()

    def converted(threshold: float):
        pol = Policy(layers={"*": LayerPolicy(w_bits=8, a_bits=8)}, exits=[ExitPolicy(0, "confidence", threshold)],
                     name="w8a8-exit")
        return convert(model, tmp_path / "m.pyrt", policy=pol, exits=exit_heads(model.embed_dim, 10))

    # the threshold: the median confidence of the exit head on these images, so both paths run
    z = pyruntime.load(converted(1.0)).run(x, collect_exits=True).exit_logits[0].astype(np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    path = converted(float(np.median((p / p.sum(axis=1, keepdims=True)).max(axis=1))))
    graph, tensors, _, _ = read_model(path)
    assert [op["op"] for op in graph["ops"] if op["block"] == 0][-1] == "exit"
    r = pyruntime.load(path).run(x, tokens=True)
    want = _numpy_ref.forward(graph, tensors, x, outputs=True)
    np.testing.assert_array_equal(r.exit_block, want["exit_block"])
    assert 0 < (r.exit_block == 0).sum() < len(x)  # the threshold splits this batch: both paths ran
    np.testing.assert_array_equal(r.bops, want["bops"])
    assert_near_oracle(r, want)


def test_profiling_model_keeps_the_eva_program(files):
    """latency's profiling copy (an exit after every block) of an EVA file runs."""
    from pyruntime import _core
    from pyruntime.latency import profiling_model

    graph, tensors, _, _ = read_model(files["eva02_base"][1])
    g, t, synthesised = profiling_model(graph, tensors)
    assert {"rope", "swiglu"} <= {op["op"] for op in g["ops"]} and synthesised == [0]
    ex = _core.Executor(g, t)
    ex.set_profiling(True)
    ex.run(images(files["eva02_base"][0]).numpy())
    assert any(k.endswith(".attn.rope") for k in ex.profile())


# --- the op kinds: oracle = timm's formulas, malformed ops refused -----------------------------------

@pytest.mark.parametrize("half", [False, True])
def test_rope_oracle_is_timms_rotation(half):
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat

    g = torch.Generator().manual_seed(0)
    T, H, dh, prefix = 7, 2, 8, 1
    qkv = torch.randn(T, 3 * H * dh, generator=g)
    emb = torch.randn(T - prefix, 2 * dh, generator=g)
    op = {"attrs": {"heads": H, "prefix": prefix, "half": half, "per_head": False}, "weights": {"sin": "s", "cos": "c"}}
    sin, cos = (a.numpy() for a in emb.chunk(2, -1))
    run = type("R", (), {"m": type("M", (), {"weight": lambda self, op, role: {"sin": sin, "cos": cos}[role]})()})()
    got = _numpy_ref._op_rope(run, op, qkv.numpy())[0].reshape(T, 3, H, dh)
    q, k, v = qkv.reshape(T, 3, H, dh).permute(1, 2, 0, 3)  # [H, T, dh]
    for j, t in ((0, q), (1, k)):
        want = torch.cat([t[:, :prefix], apply_rot_embed_cat(t[:, prefix:], emb, half=half)], dim=1)
        np.testing.assert_allclose(got[:, j].transpose(1, 0, 2), want.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[:, 2].transpose(1, 0, 2), v.numpy())


def test_swiglu_oracle_is_silu_gate_times_input():
    x = np.random.default_rng(0).standard_normal((5, 12)).astype(np.float32) * 4
    g, u = x[:, :6].astype(np.float64), x[:, 6:].astype(np.float64)
    got = _numpy_ref._OPS["swiglu"](None, {}, x)[0]
    assert got.shape == (5, 6)
    np.testing.assert_allclose(got, torch.nn.functional.silu(torch.from_numpy(g)).numpy() * u, rtol=1e-6, atol=1e-7)


def eva_graph(files):
    graph, tensors, _, _ = read_model(files["eva02_tiny"][1])
    return copy.deepcopy(graph), dict(tensors)


def op_named(graph, name):
    return next(op for op in graph["ops"] if op["name"] == name)


@pytest.mark.parametrize("edit, message", [
    (lambda op: op["attrs"].update(heads=3), r"input width 192 is not 3 x heads \(3\) x an even head width"),
    (lambda op: op["attrs"].update(prefix=17), r"prefix 17 leaves none of the 17 tokens to rotate"),
    (lambda op: op["attrs"].pop("half"), r"attrs must be exactly \['half', 'heads', 'per_head', 'prefix'\]"),
    (lambda op: op["attrs"].update(per_head=1), r"attrs.per_head must be a bool"),
    (lambda op: op["weights"].pop("cos"), r"weights must map the roles \['sin', 'cos'\]"),
    (lambda op: op.update(block=None), r"rope ops must belong to a block"),
])
def test_malformed_rope_is_refused(edit, message, files):
    graph, _ = eva_graph(files)
    edit(op_named(graph, "blocks.0.attn.rope"))
    with pytest.raises(FormatError, match=r"op #\d+ 'blocks.0.attn.rope' \(rope\): " + message):
        check_graph(graph)


def test_malformed_swiglu_is_refused(files):
    graph, _ = eva_graph(files)
    fc1 = op_named(graph, "blocks.0.mlp.fc1")
    fc1["attrs"]["out_features"] -= 1  # an odd width: no gate/input halves
    with pytest.raises(FormatError, match=r"'blocks.0.mlp.swiglu' \(swiglu\): a packed SwiGLU input needs an even "
                                          r"width \(gate, then input\), got 339"):
        check_graph(graph)


def test_rope_table_of_the_wrong_shape_is_refused(files):
    graph, tensors = eva_graph(files)
    check_tensors(graph, tensors)
    tensors["rope.sin"] = tensors["rope.sin"][:, :16].copy()
    with pytest.raises(FormatError, match=r"tensor 'rope.sin' is float32 \[16, 16\], expected float32 \[16, 32\]"):
        check_tensors(graph, tensors)
    # the executor's own check, for a graph handed to it directly
    from pyruntime import _core

    with pytest.raises(ValueError, match=r"op 'blocks.0.attn.rope': tensors 'rope.sin' and 'rope.cos' must hold 512 "
                                         r"values"):
        _core.Executor(graph, tensors)


def test_executor_refuses_an_odd_swiglu_width(files):
    from pyruntime import _core

    graph, tensors = eva_graph(files)
    op = op_named(graph, "blocks.0.mlp.swiglu")
    op["in"] = ["blocks.0.norm2"]  # 64 wide: fine; its consumer fc2 now misfits
    with pytest.raises(ValueError, match=r"op 'blocks.0.mlp.fc2': input has 32 features, in_features is 170"):
        _core.Executor(graph, tensors)


# --- what stays out: one line naming the feature ------------------------------------------------------

R = dict(depth=2, img_size=32, embed_dim=64, num_heads=2, num_classes=10)
REFUSED = {
    "qk_norm": ("vit_small_patch16_rope_224", dict(R, qk_norm=True), r"qk_norm \(normalisation of queries and keys\)"),
    "gqa": ("vit_small_patch16_rope_224", dict(R, qkv_fused=False, num_kv_heads=1, attn_type="rope"),
            r"grouped-query attention \(num_kv_heads\)"),
    "dinov3": ("vit_small_patch16_dinov3", dict(R), r"dynamic_img_size"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unsupported_eva_variants_are_refused_in_one_line(case, tmp_path):
    name, kwargs, message = REFUSED[case]
    model = timm.create_model(name, pretrained=False, **kwargs)
    with pytest.raises(ValueError, match=message) as e:
        convert(model, tmp_path / "m.pyrt")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "m.pyrt").exists()
    with pytest.raises(ValueError, match=message):
        describe_model(model)
