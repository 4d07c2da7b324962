"""The compiled executor against the numpy reference forward pass, and the load/run API.

Torch-free on purpose: this file also runs on emulated arm64 Python.
"""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

import pyruntime
from pyruntime import _numpy_ref, bops
from pyruntime.modelfile import write_model

from _graphs import FP32, W4A8, W8A8, random_tensors, tiny_graph

ISAS = pyruntime.available_isas()

ARCH_VARIANTS = {
    "cls": {},
    "avg_fc_norm": dict(global_pool="avg", fc_norm=True, final_norm=False, cls_token=False),
    "avg_with_cls": dict(global_pool="avg", fc_norm=True, final_norm=False),
    "dist": dict(dist_token=True),
    "registers": dict(reg_tokens=2, no_embed_class=True),
    "layer_scale": dict(layer_scale=True),
    "norm_pre": dict(norm_pre=True),
    "rect_3ch": dict(img_size=[8, 12], patch_size=[4, 2], in_chans=3, num_heads=4),
}


def save(tmp_path, graph, tensors, name="m.pyrt"):
    path = tmp_path / name
    write_model(path, graph, tensors, "{}", {"source": "test"})
    return path


def images(graph, n=5, seed=1):
    a = graph["arch"]
    return np.random.default_rng(seed).standard_normal((n, a["in_chans"], *a["img_size"])).astype(np.float32)


def mixed_layers(graph):
    """Every precision the runtime has, spread over the layers."""
    choices = [FP32, W8A8, W4A8, dict(W8A8, a_bits=6), dict(W4A8, a_bits=5), dict(W8A8, a_bits=4)]
    return {name: choices[i % len(choices)] for i, name in enumerate(sorted(graph["layers"]))}


def int8_attention(graph):
    graph["attention"] = {"bits": 8}
    return graph


@pytest.mark.parametrize("variant", sorted(ARCH_VARIANTS))
@pytest.mark.parametrize("precision", ["fp32", "w8a8", "w4a8", "mixed", "fp32-attn8", "mixed-attn8"])
def test_executor_matches_numpy_reference(variant, precision, tmp_path):
    graph = tiny_graph(**ARCH_VARIANTS[variant])
    base, _, attn = precision.partition("-")
    lp = {"fp32": FP32, "w8a8": W8A8, "w4a8": W4A8}.get(base)
    layers = mixed_layers(graph) if base == "mixed" else {n: lp for n in graph["layers"]}
    graph = tiny_graph(layers=layers, **ARCH_VARIANTS[variant])
    if attn:
        int8_attention(graph)
    tensors = random_tensors(graph, seed=3)
    x = images(graph)
    r = pyruntime.load(save(tmp_path, graph, tensors)).run(x)
    logits, exit_block, bops_ref = _numpy_ref.forward(graph, tensors, x)
    tol = 1e-5 if precision == "fp32" else 2e-3  # quantised: a rounding tie may land either side
    assert np.abs(r.logits - logits).max() <= tol * max(1.0, np.abs(logits).max())
    assert np.array_equal(r.exit_block, exit_block)
    assert np.array_equal(r.bops, bops_ref)


def test_static_and_predicted_scales(tmp_path):
    base = tiny_graph(depth=3)
    names = sorted(base["layers"])
    layers = {n: dict(W8A8, scale="static", static_scale=0.02) for n in names if n.startswith("blocks.0")}
    later = [n for n in names if n.startswith(("blocks.1", "blocks.2", "head"))]
    layers.update({n: dict(W8A8, a_bits=5, scale="predicted") for n in later})
    predictor = {"block": 0, "chunk": 4, "coeffs": {n: [0.001, 0.01, 0.002] for n in later}}
    graph = tiny_graph(depth=3, layers=layers, predictor=predictor)
    tensors = random_tensors(graph, seed=4)
    x = images(graph, 6)
    r = pyruntime.load(save(tmp_path, graph, tensors)).run(x)
    logits, _, _ = _numpy_ref.forward(graph, tensors, x)
    assert np.abs(r.logits - logits).max() <= 2e-3 * np.abs(logits).max()
    assert np.isfinite(r.stat).all() and (r.stat > 0).all()


def exit_graph(rule="confidence", thresholds=(0.5, 0.6), depth=4, blocks=(0, 2)):
    exits = [{"block": b, "rule": rule, "threshold": t} for b, t in zip(blocks, thresholds)]
    return tiny_graph(depth=depth, exits=exits)


@pytest.mark.parametrize("rule", ["confidence", "margin"])
def test_images_exit_exactly_where_the_rule_says(rule, tmp_path):
    graph = exit_graph(rule)
    tensors = random_tensors(graph, seed=5)
    x = images(graph, 64, seed=2)
    # Thresholds at the medians of each head's score split the batch between exits.
    model = pyruntime.load(save(tmp_path, graph, tensors))
    scores = {}
    for e in graph["exits"]:
        probe = tiny_graph(depth=e["block"] + 1, exits=[])
        sub = {k: v for k, v in tensors.items() if not k.startswith(("blocks.", "exits.", "head", "norm."))}
        sub.update({k: v for k, v in tensors.items() if k.startswith("blocks.") and int(k.split(".")[1]) <= e["block"]})
        sub["norm.weight"] = tensors[f"exits.{e['block']}.norm.weight"]
        sub["norm.bias"] = tensors[f"exits.{e['block']}.norm.bias"]
        sub["head.weight"] = tensors[f"exits.{e['block']}.fc.weight"]
        sub["head.bias"] = tensors[f"exits.{e['block']}.fc.bias"]
        # The exit head reads the raw block output; the probe's final norm plays the exit norm.
        logits = pyruntime.load(save(tmp_path, probe, sub, f"probe{e['block']}.pyrt")).run(x).logits
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        top = np.sort(p, 1)[:, ::-1]
        scores[e["block"]] = top[:, 0] if rule == "confidence" else top[:, 0] - top[:, 1]
    graph["exits"][0]["threshold"] = float(np.median(scores[0]))
    graph["exits"][1]["threshold"] = float(np.median(scores[2]))
    model = pyruntime.load(save(tmp_path, graph, tensors, "exits.pyrt"))
    r = model.run(x)
    first = scores[0] >= graph["exits"][0]["threshold"]
    second = ~first & (scores[2] >= graph["exits"][1]["threshold"])
    expect = np.where(first, 0, np.where(second, 2, 3))
    assert np.array_equal(r.exit_block, expect)
    assert 0 < first.sum() < len(x) and second.sum() > 0
    ref_logits, ref_exit, _ = _numpy_ref.forward(graph, tensors, x)
    assert np.array_equal(ref_exit, expect)
    # Collecting: nobody leaves, and each head's logits are those the leavers answered with.
    rc = model.run(x, collect_exits=True)
    assert (rc.exit_block == 3).all() and rc.exit_logits.shape == (2, len(x), 3)
    assert np.array_equal(rc.exit_logits[0][first], r.logits[first])
    assert np.array_equal(rc.exit_logits[1][second], r.logits[second])
    assert np.allclose(r.logits, ref_logits, rtol=1e-5, atol=1e-5)


def test_threshold_extremes(tmp_path):
    graph = exit_graph(thresholds=(0.0, 0.0))
    tensors = random_tensors(graph, seed=6)
    x = images(graph, 7)
    assert (pyruntime.load(save(tmp_path, graph, tensors)).run(x).exit_block == 0).all()
    graph = exit_graph(thresholds=(1.0, 1.0))
    assert (pyruntime.load(save(tmp_path, graph, tensors, "none.pyrt")).run(x).exit_block == 3).all()


@pytest.mark.parametrize("precision", ["fp32", "mixed", "mixed-attn8"])
def test_an_image_gets_the_same_bits_alone_or_in_a_batch(precision, tmp_path):
    graph = exit_graph(thresholds=(0.55, 0.5), depth=4)
    if precision.startswith("mixed"):
        graph = tiny_graph(depth=4, exits=graph["exits"], layers=mixed_layers(graph))
    if precision.endswith("attn8"):
        int8_attention(graph)
    tensors = random_tensors(graph, seed=7)
    model = pyruntime.load(save(tmp_path, graph, tensors))
    x = images(graph, 16, seed=3)
    batch = model.run(x, num_threads=1)
    assert len(set(batch.exit_block.tolist())) > 1  # compaction is exercised
    for threads in (1, 2, 3):
        shuffled = np.random.default_rng(threads).permutation(len(x))
        rs = model.run(np.ascontiguousarray(x[shuffled]), num_threads=threads)
        assert np.array_equal(rs.logits, batch.logits[shuffled])
        assert np.array_equal(rs.exit_block, batch.exit_block[shuffled])
        for i in (0, 5, 11):
            one = model.run(x[i : i + 1], num_threads=threads)
            assert np.array_equal(one.logits[0], batch.logits[i])
            assert one.bops[0] == batch.bops[i]


@pytest.mark.parametrize("attn8", [False, True])
def test_bops_match_the_analytic_count(attn8, tmp_path):
    graph = exit_graph(thresholds=(0.55, 0.5), depth=4)
    graph = tiny_graph(depth=4, exits=graph["exits"], layers=mixed_layers(graph))
    if attn8:
        int8_attention(graph)
    tensors = random_tensors(graph, seed=8)
    r = pyruntime.load(save(tmp_path, graph, tensors)).run(images(graph, 40, seed=4))
    assert np.array_equal(r.bops, bops.per_image(graph, r.exit_block))
    reach = bops.reach_from_exits(graph, r.exit_block)
    assert r.bops.mean() == pytest.approx(bops.expected(graph, reach), rel=1e-12)
    full = exit_graph(thresholds=(1.0, 1.0), depth=4)
    full = tiny_graph(depth=4, exits=full["exits"], layers=mixed_layers(full))
    if attn8:
        int8_attention(full)
    rf = pyruntime.load(save(tmp_path, full, tensors, "full.pyrt")).run(images(graph, 3))
    assert (rf.bops == bops.static(full)).all()


@pytest.mark.parametrize("attn8", [False, True])
@pytest.mark.parametrize("isa", ISAS)
def test_every_isa_gives_the_same_answers(isa, attn8, tmp_path):
    graph = tiny_graph(depth=3)
    graph = tiny_graph(depth=3, layers=mixed_layers(graph))
    if attn8:
        int8_attention(graph)
    tensors = random_tensors(graph, seed=9)
    model = pyruntime.load(save(tmp_path, graph, tensors))
    x = images(graph, 4)
    r, ref = model.run(x, isa=isa), model.run(x, isa="ref")
    assert r.isa == isa
    assert np.allclose(r.logits, ref.logits, rtol=1e-3, atol=1e-4)


def test_uint8_images_get_the_files_preprocessing(tmp_path):
    graph = tiny_graph(in_chans=3)
    tensors = random_tensors(graph, seed=10)
    model = pyruntime.load(save(tmp_path, graph, tensors))
    u8 = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3)).astype(np.uint8)
    x = ((u8.transpose(0, 3, 1, 2) / 255.0 - 0.5) / 0.25).astype(np.float32)
    assert np.allclose(model.run(u8).logits, model.run(x).logits, atol=1e-5)
    gray = tiny_graph()
    m1 = pyruntime.load(save(tmp_path, gray, random_tensors(gray), "g.pyrt"))
    assert m1.run(u8[..., 0]).logits.shape == (3, 3)  # [B, H, W] for one channel


def test_bad_inputs_are_named(tmp_path):
    graph = tiny_graph()
    model = pyruntime.load(save(tmp_path, graph, random_tensors(graph)))
    x = images(graph, 2)
    with pytest.raises(TypeError, match="float32"):
        model.run(x.astype(np.float64))
    with pytest.raises(TypeError, match="ndarray"):
        model.run(x.tolist())
    with pytest.raises(ValueError, match=r"\[B, 1, 8, 8\]"):
        model.run(x[:, :, :4])
    # uint8 images of another size are resized (timm's eval transform, with Pillow: without
    # it, the install hint); of other channels, refused.
    if importlib.util.find_spec("PIL") is None:
        with pytest.raises(pyruntime.errors.MissingDependency, match=r"pyruntime-vit\[images\]"):
            model.run(np.zeros((2, 9, 9), np.uint8))
    else:
        assert model.run(np.zeros((2, 9, 9), np.uint8)).logits.shape == (2, 3)
    with pytest.raises(ValueError, match="3 channels, the model takes 1"):
        model.run(np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        model.run(np.zeros((2, 8), np.uint8))
    bad = x.copy()
    bad[1, 0, 2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        model.run(bad)
    with pytest.raises(ValueError, match="num_threads"):
        model.run(x, num_threads=0)
    with pytest.raises(ValueError, match="not available"):
        pyruntime.load(tmp_path / "m.pyrt", isa="sse9")
    assert model.run(x[:0]).logits.shape == (0, 3)


def corrupt(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


def test_bad_files_raise_format_error(tmp_path):
    graph = tiny_graph()
    good = save(tmp_path, graph, random_tensors(graph))
    raw = good.read_bytes()
    cases = {
        "truncated": raw[: len(raw) - 100],
        "tiny": raw[:5],
        "flipped": raw[:-40] + bytes([raw[-40] ^ 0x10]) + raw[-39:],
        "newer": raw.replace(b'"pyruntime.format_version":"4"', b'"pyruntime.format_version":"9"'),
        "magic": raw.replace(b"pyruntime-vit", b"pyruntime-xyz"),
        "garbage": b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"{not json at all}" + b"\x00" * 40,
    }
    messages = {"truncated": "truncated", "tiny": "truncated", "flipped": "checksum",
                "newer": "newer", "magic": "not a pyruntime model", "garbage": "JSON"}
    for name, data in cases.items():
        p = tmp_path / f"{name}.pyrt"
        p.write_bytes(data)
        assert data != raw
        with pytest.raises(pyruntime.FormatError, match=messages[name]):
            pyruntime.load(p)
    with pytest.raises(FileNotFoundError):
        pyruntime.load(tmp_path / "missing.pyrt")


def test_inference_never_imports_torch(tmp_path):
    graph = tiny_graph(exits=[{"block": 0, "rule": "confidence", "threshold": 0.5}])
    path = save(tmp_path, graph, random_tensors(graph))
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'timm'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import numpy as np, pyruntime
m = pyruntime.load({str(path)!r})
r = m.run(np.zeros((2, 1, 8, 8), np.float32))
assert 'torch' not in sys.modules
print(r.logits.shape, r.exit_block.tolist())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    assert "(2, 3)" in out.stdout


def test_num_threads_over_the_limit_is_refused_in_load_and_run(tmp_path):
    graph = tiny_graph()
    path = save(tmp_path, graph, random_tensors(graph))
    cap = pyruntime._core.limits()["max_threads"]
    for n in (cap + 1, 2 ** 31, 2 ** 64):
        with pytest.raises(ValueError, match=f"max_threads={cap}"):
            pyruntime.load(path, num_threads=n)
    model = pyruntime.load(path, num_threads=1)
    with pytest.raises(ValueError, match=f"num_threads {cap + 1} exceeds the runtime's limit max_threads={cap}"):
        model.run(images(graph, 1), num_threads=cap + 1)
    with pytest.raises(ValueError, match="max_threads"):
        model.run(images(graph, 1), num_threads=np.int64(2 ** 40))


@pytest.mark.parametrize("pre", [{"std": [1e-45]}, {"mean": [3.5e38]}, {"mean": [float("nan")]}])
def test_uint8_preprocessing_that_overflows_float32_is_named(tmp_path, pre):
    graph = tiny_graph()
    model = pyruntime.load(save(tmp_path, graph, random_tensors(graph)))
    model.graph["preprocess"].update(pre)  # the file's values are bounded; an edited in-memory graph is not
    u8 = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8)
    with pytest.raises(ValueError, match="NaN or Inf"):
        model.run(u8)
