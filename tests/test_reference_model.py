"""The shipped reference model, measured through the runtime on all 10,000 test images.

The card's per-exit accuracy is reproduced from the shipped file, and the quantised and
early-exit policies of the demo are held to what the README claims for them.
"""
import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("timm")

import pyruntime  # noqa: E402
from pyruntime import bops, datasets, demo, reference  # noqa: E402
from _helpers import needs_data  # noqa: E402

pytestmark = [
    pytest.mark.torch,
    pytest.mark.skipif(not reference.reference_path().is_file(), reason="reference model not trained yet"),
    needs_data,
]


@pytest.fixture(scope="module")
def card():
    return json.loads((reference.reference_dir() / "card.json").read_text())


@pytest.fixture(scope="module")
def test_set():
    return datasets.fashion_mnist("test")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    depth = reference.read_metadata()["timm_kwargs"]["depth"]
    return {
        "fp32_exits": reference.convert_reference(d / "fp32_exits.pyrt", demo.exit_policy("fp32", depth, 1.0)),
        "w8a8": reference.convert_reference(d / "w8a8.pyrt", "w8a8"),
        "w8a8-attn8": reference.convert_reference(d / "w8a8_attn8.pyrt", "w8a8-attn8"),
        "w4a8": reference.convert_reference(d / "w4a8.pyrt", "w4a8"),
    }


def top1(path, x, y):
    return demo.evaluate(pyruntime.load(path), x, y, "")[0]


def test_card_numbers_reproduced_from_the_shipped_file(card, test_set, converted):
    x, y = test_set
    model = pyruntime.load(converted["fp32_exits"])
    exit_logits, final = [], []
    for lo in range(0, len(x), 1000):
        r = model.run(x[lo : lo + 1000], collect_exits=True)
        exit_logits.append(r.exit_logits)
        final.append(r.logits)
    exit_logits, final = np.concatenate(exit_logits, 1), np.concatenate(final)
    depth = card["arch"]["depth"]
    for b in range(depth - 1):
        acc = float((exit_logits[b].argmax(1) == y).mean())
        assert abs(acc - card["exit_top1"][str(b)]) <= 0.002, (b, acc)
    acc = float((final.argmax(1) == y).mean())
    assert abs(acc - card["final_top1"]) <= 0.002


def test_quantised_policies_stay_close_to_fp32(card, test_set, converted):
    x, y = test_set
    fp32 = card["final_top1"]
    assert top1(converted["w8a8"], x, y) >= fp32 - 0.005
    assert top1(converted["w8a8-attn8"], x, y) >= fp32 - 0.005
    assert top1(converted["w4a8"], x, y) >= fp32 - 0.02


# The demo's threshold is the boldest within 0.5 pt of full depth on 2000 validation images
# (measured: 90.45% vs 90.90% there); on the test images it lost 1.20 pt (89.90% vs 91.10%):
# the boldest of many thresholds is chosen where validation noise favoured it. The bound
# below catches a broken pipeline, not that selection effect.
def test_calibrated_exits_halve_bops_within_two_points(test_set, converted, tmp_path):
    x, y = test_set
    depth = pyruntime.load(converted["w8a8"]).depth
    policy = demo.calibrate_exits(tmp_path, depth, None)
    path = reference.convert_reference(tmp_path / "exits.pyrt", policy)
    acc, exit_block, cost = demo.evaluate(pyruntime.load(path), x, y, "")
    w8a8 = top1(converted["w8a8"], x, y)
    full = bops.static(converted["w8a8"])
    assert cost.mean() <= 0.5 * full
    assert acc >= w8a8 - 0.02
    assert exit_block.mean() < depth - 1
