"""Exit thresholds replayed from collected logits decide exactly as the executor does."""
import numpy as np
import pytest

import pyruntime
from pyruntime import bops
from pyruntime.calibrate.thresholds import scores, shared_threshold, simulate
from pyruntime.modelfile import write_model

from _graphs import random_tensors, tiny_graph


def model_with(tmp_path, thresholds, rule, name):
    exits = [{"block": b, "rule": rule, "threshold": float(t)} for b, t in zip((0, 1, 2), thresholds)]
    graph = tiny_graph(depth=4, exits=exits)
    path = tmp_path / name
    write_model(path, graph, random_tensors(graph, seed=11), "{}", {})
    return pyruntime.load(path)


@pytest.mark.parametrize("rule", ["confidence", "margin"])
def test_simulation_matches_the_executor(rule, tmp_path):
    x = np.random.default_rng(0).standard_normal((80, 1, 8, 8)).astype(np.float32)
    probe = model_with(tmp_path, (1, 1, 1), rule, "probe.pyrt")
    r = probe.run(x, collect_exits=True)
    s = scores(r.exit_logits, rule)
    thresholds = np.quantile(s, 0.6, axis=1)
    head = simulate(s, thresholds)
    model = model_with(tmp_path, thresholds, rule, "real.pyrt")
    got = model.run(x)
    blocks = np.array([0, 1, 2, 3])
    assert np.array_equal(got.exit_block, blocks[head])
    assert len(np.unique(head)) >= 3
    all_logits = np.concatenate([r.exit_logits, r.logits[None]])
    assert np.array_equal(got.logits, all_logits[head, np.arange(len(x))])


def test_shared_threshold_keeps_its_promise_and_minimises_bops(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 1, 8, 8)).astype(np.float32)
    probe = model_with(tmp_path, (1, 1, 1), "confidence", "probe.pyrt")
    r = probe.run(x, collect_exits=True)
    labels = r.logits.argmax(1)  # full depth is right by construction
    labels[:20] = (labels[:20] + 1) % 3
    for drop in (0.0, 0.05, 0.2):
        op = shared_threshold(probe.graph, r.exit_logits, r.logits, labels, drop)
        assert op.top1 >= op.full_depth_top1 - drop - 1e-12
        model = model_with(tmp_path, (op.threshold,) * 3, "confidence", f"m{drop}.pyrt")
        got = model.run(x)
        assert (got.predictions == labels).mean() == pytest.approx(op.top1)
        assert got.bops.mean() == pytest.approx(op.mean_bops)
    loose = shared_threshold(probe.graph, r.exit_logits, r.logits, labels, 0.99)
    assert loose.mean_bops <= op.mean_bops
    assert loose.mean_bops == pytest.approx(bops.per_image(probe.graph, np.zeros(200, int)).mean())
    with pytest.raises(ValueError, match="max_drop"):
        shared_threshold(probe.graph, r.exit_logits, r.logits, labels, 1.5)
