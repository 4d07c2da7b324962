"""pyruntime.bops against hand-computed counts, and static / expected / per_image agreeing.

The tiny graph: 8x8 image, 4x4 patches, 1 channel -> P = 4 patches of 16 values, class
token -> T = 5, D = 8, MLP 16, 3 classes, depth 2.
  patch_embed 4*8*16 = 512 MACs; per block: qkv 5*24*8 = 960, proj 5*8*8 = 320,
  fc1 5*16*8 = 640, fc2 5*8*16 = 640, q.k^T and attn.v 5*5*8 = 200 each; head 3*8 = 24;
  an exit head 3*8 = 24.
"""
from __future__ import annotations

import numpy as np
import pytest

from _graphs import W8A8, random_tensors, tiny_graph
from pyruntime import _numpy_ref, bops
from pyruntime.modelfile import write_model

F = 32 * 32
EMBED, BLOCK_LIN, ATTN, HEAD = 512, 960 + 320 + 640 + 640, 2 * 200, 24


def w8a8_blocks(**kw):
    layers = {f"blocks.{i}.{s}": W8A8 for i in range(2) for s in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    return tiny_graph(layers=layers, **kw)


def test_layer_macs_by_hand():
    macs = bops.layer_macs(tiny_graph())
    assert macs["patch_embed"] == 512
    assert macs["blocks.0.attn.qkv"] == 960 and macs["blocks.1.attn.proj"] == 320
    assert macs["blocks.0.mlp.fc1"] == 640 and macs["blocks.0.mlp.fc2"] == 640
    assert macs["blocks.0.attn.qk"] == 200 and macs["blocks.1.attn.av"] == 200
    assert macs["head"] == 24
    assert sum(macs.values()) == EMBED + 2 * (BLOCK_LIN + ATTN) + HEAD == 6456
    # execution order, attention pseudo-layers right after qkv
    assert list(macs)[:4] == ["patch_embed", "blocks.0.attn.qkv", "blocks.0.attn.qk", "blocks.0.attn.av"]


def test_static_fp32_by_hand():
    assert bops.static(tiny_graph()) == 6456 * F


def test_static_w8a8_by_hand():
    block = BLOCK_LIN * 64 + ATTN * F
    assert bops.static(w8a8_blocks()) == EMBED * F + 2 * block + HEAD * F == 1695744


def test_int8_attention_by_hand():
    g = w8a8_blocks()
    g["attention"] = {"bits": 8}
    assert bops.layer_bops(g)["blocks.1.attn.qk"] == 200 * 64
    assert bops.static(g) == EMBED * F + 2 * (BLOCK_LIN + ATTN) * 64 + HEAD * F == 927744


def test_mixed_bits_by_hand():
    g = tiny_graph(layers={"blocks.0.mlp.fc1": dict(W8A8, w_bits=4, a_bits=6)})
    assert bops.layer_bops(g)["blocks.0.mlp.fc1"] == 640 * 4 * 6
    assert bops.static(g) == 6456 * F - 640 * F + 640 * 24


def test_exit_heads_counted_in_static():
    g = tiny_graph(exits=[{"block": 0, "rule": "confidence", "threshold": 0.5}])
    assert bops.layer_macs(g)["exits.0.fc"] == 24
    assert bops.static(g) == (6456 + 24) * F


def test_distilled_counts_both_heads_and_token():
    g = tiny_graph(dist_token=True)  # T = 6
    T = 6
    block = T * (24 * 8 + 8 * 8 + 16 * 8 + 8 * 16) + 2 * T * T * 8
    assert bops.static(g) == (512 + 2 * block + 2 * 24) * F


def test_expected_all_reach_equals_static():
    g = w8a8_blocks(exits=[{"block": 0, "rule": "margin", "threshold": 0.2}])
    assert bops.expected(g, [1.0, 1.0]) == pytest.approx(bops.static(g), rel=0, abs=0)


def test_expected_by_hand():
    g = w8a8_blocks(exits=[{"block": 0, "rule": "margin", "threshold": 0.2}])
    block = BLOCK_LIN * 64 + ATTN * F
    # all images: embed, block 0, exit head 0; a quarter: block 1 and the final head
    want = EMBED * F + block + HEAD * F + 0.25 * (block + HEAD * F)
    assert bops.expected(g, [1.0, 0.25]) == pytest.approx(want)


def test_per_image_by_hand():
    g = w8a8_blocks(exits=[{"block": 0, "rule": "margin", "threshold": 0.2}])
    block = BLOCK_LIN * 64 + ATTN * F
    early = EMBED * F + block + HEAD * F
    full = early + block + HEAD * F
    np.testing.assert_array_equal(bops.per_image(g, [0, 1, -1, 0]), [early, full, full, early])
    assert bops.per_image(g, -1)[0] == bops.static(g)


def test_per_image_consistent_with_expected():
    g = tiny_graph(depth=5, exits=[{"block": b, "rule": "confidence", "threshold": 0.5} for b in (0, 2, 3)],
                   layers={"blocks.3.mlp.fc1": dict(W8A8, w_bits=4)})
    rng = np.random.default_rng(0)
    exit_block = rng.choice([0, 2, 3, 4, -1], size=101)
    per = bops.per_image(g, exit_block)
    reach = bops.reach_from_exits(g, exit_block)
    assert reach[0] == 1.0 and np.all(np.diff(reach) <= 0)
    assert per.mean() == pytest.approx(bops.expected(g, reach), rel=1e-12)


def test_static_from_file_equals_graph(tmp_path):
    g = w8a8_blocks(exits=[{"block": 0, "rule": "margin", "threshold": 0.2}])
    path = tmp_path / "m.pyrt"
    write_model(path, g, random_tensors(g), '{"version": 1}', {})
    assert bops.static(path) == bops.static(g)
    assert bops.expected(str(path), [1.0, 0.5]) == bops.expected(g, [1.0, 0.5])


@pytest.mark.parametrize("reach, match", [
    ([1.0], "one value per block"),
    ([1.0, 0.5, 0.2], "one value per block"),
    ([0.9, 0.5], "reach\\[0\\] must be 1"),
    ([1.0, 1.2], "\\[0, 1\\]"),
    ([1.0, -0.1], "\\[0, 1\\]"),
    ([1.0, float("nan")], "\\[0, 1\\]"),
])
def test_expected_rejects_bad_reach(reach, match):
    with pytest.raises(ValueError, match=match):
        bops.expected(tiny_graph(), reach)


def test_expected_rejects_increasing_reach():
    with pytest.raises(ValueError, match="non-increasing"):
        bops.expected(tiny_graph(depth=3), [1.0, 0.4, 0.6])


def test_per_image_rejects_blocks_without_a_head():
    g = tiny_graph(depth=3, exits=[{"block": 1, "rule": "margin", "threshold": 0.2}])
    with pytest.raises(ValueError, match="name no head"):
        bops.per_image(g, [0])
    with pytest.raises(ValueError, match="integers"):
        bops.per_image(g, [1.0])


def test_numpy_reference_accumulates_the_same_bops():
    g = w8a8_blocks(depth=3, exits=[{"block": 0, "rule": "confidence", "threshold": 0.45},
                                    {"block": 1, "rule": "margin", "threshold": 0.2}])
    x = np.random.default_rng(3).standard_normal((16, 1, 8, 8)).astype(np.float32)
    _, exit_block, per = _numpy_ref.forward(g, random_tensors(g, seed=4), x)
    assert len(set(exit_block.tolist())) > 1  # the thresholds split this batch
    np.testing.assert_array_equal(per, bops.per_image(g, exit_block))
    assert per.mean() == pytest.approx(bops.expected(g, bops.reach_from_exits(g, exit_block)))
