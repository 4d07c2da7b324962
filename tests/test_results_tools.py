"""tools/regimes_results.py: the sweep runs end to end on a tiny reference-format model, its
intervals contain their point estimates, every row says which split chose it, and the test
labels choose nothing (poisoning them leaves every choice as it was). Also the rule-based
mixed policy it sweeps (``uniform.ends_policy``)."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from pyruntime import datasets  # noqa: E402
from pyruntime.calibrate.uniform import ends_policy  # noqa: E402

from _helpers import needs_data, tool_module  # noqa: E402


def _tool():
    return tool_module("regimes_results")


rr = _tool()


# --- the rule-based mixed policy -------------------------------------------------------------------

def test_ends_policy_puts_the_first_and_last_blocks_at_8_bits():
    from test_calibrate_common import tiny_source

    source = tiny_source()   # depth 3
    layers = ends_policy(3, 1, 1, a_bits=6).resolve(source.layer_names(), 3)
    for name, lp in layers.items():
        if name.startswith("blocks."):
            w = 4 if name.startswith("blocks.1.") else 8
            assert (lp.w_bits, lp.a_bits, lp.scale) == (w, 6, "dynamic"), name
        else:   # patch embedding and head stay fp32
            assert lp.w_bits == 32, name
    assert ends_policy(3, 0, 1).name == "f0l1-w8/4a8"


@pytest.mark.parametrize("first,last", [(-1, 0), (2, 2), (0, 4)])
def test_ends_policy_rejects_impossible_rules(first, last):
    with pytest.raises(ValueError, match="depth 3"):
        ends_policy(3, first, last)


def test_regimes_are_distinct_and_drop_rules_without_4_bit_blocks():
    full = rr.regimes(12)
    names = [r.name for r in full]
    assert len(names) == len(set(names)) and names[0] == "fp32"
    assert {r.group for r in full} == {"fp32", "dynamic", "attn8", "static", "ends"}
    assert all(r.first + r.last < 4 for r in rr.regimes(4) if r.group == "ends")
    assert len(rr.regimes(12, quick=True)) < len(full)


# --- choosing uses the validation labels, and only them --------------------------------------------

def _measured(name, group, w, a, bops, pred_val, pred_test):
    scale = "dynamic" if group != "static" else name.split("-")[-1]
    return rr.Measured(rr.Regime(group, name, w, a, scale), bops, {"validation": np.asarray(pred_val),
                                                                  "test": np.asarray(pred_test)},
                       {"validation": 0.0, "test": 0.0}, {"validation": 0.0, "test": 0.0})


def test_choose_follows_the_validation_labels():
    y = np.array([0, 1, 2, 3])
    ms = [_measured("fp32", "fp32", 32, 32, 100, y, y),
          _measured("w4a4-minmax", "static", 4, 4, 10, [0, 1, 2, 0], y),
          _measured("w4a4-p99.99", "static", 4, 4, 10, [0, 1, 0, 0], y)]
    chosen, points = rr.choose(ms, y)
    assert chosen["w4a4-minmax"].startswith("validation") and chosen["w4a4-p99.99"].startswith("none")
    # other validation labels, other choice: the choice is made from them
    chosen, _ = rr.choose(ms, np.array([0, 1, 0, 0]))
    assert chosen["w4a4-p99.99"].startswith("validation") and chosen["w4a4-minmax"].startswith("none")
    # operating points: nothing within 1 pt of fp32's 100% here
    assert all(p["policy"] is None for p in points)


# --- the whole tool on a tiny model ----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from test_calibrate_common import write_reference_checkpoint

    return write_reference_checkpoint(tmp_path_factory.mktemp("regimes") / "tiny.safetensors", depth=3)


ARGS = ["--quick", "--images", "32", "--val-images", "300", "--test-limit", "300", "--outlier-images", "16",
        "--threads", "1", "--no-progress"]


def _rows(out: Path):
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny_run(tiny_checkpoint, tmp_path_factory):
    base = tmp_path_factory.mktemp("regimes-run")
    assert rr.main(["--checkpoint", str(tiny_checkpoint), "--out", str(base / "out"),
                    "--workdir", str(base / "work"), *ARGS]) == 0
    return base


@needs_data
def test_the_sweep_writes_every_row_with_intervals_around_the_estimates(tiny_run):
    rows = _rows(tiny_run / "out")
    assert [r["policy"] for r in rows] == [r.name for r in rr.regimes(3, quick=True)]
    for r in rows:
        for split in ("val", "test"):
            lo, top1, hi = (float(r[f"{split}_{k}"]) for k in ("lo", "top1", "hi"))
            assert 0 <= lo <= top1 <= hi <= 1, r
            lo, d, hi = (float(r[f"{split}_{k}"]) for k in ("diff_lo", "diff", "diff_hi"))
            assert lo <= d <= hi, r
        assert r["chosen_on"] and float(r["gbops"]) > 0
    fp32 = rows[0]
    assert float(fp32["test_diff"]) == 0 and float(fp32["test_logit_err"]) == 0 and fp32["test_verdict"] == "ties"
    assert any(float(r["test_logit_err"]) > 0 for r in rows[2:])
    # one static clip per (w, a) chosen on validation, nothing chosen on test
    static = [r for r in rows if r["group"] == "static"]
    assert sum(r["chosen_on"].startswith("validation") for r in static) == len(static) // 2
    assert not any("test" in r["chosen_on"] for r in rows)
    md = (tiny_run / "out" / "results.md").read_text()
    assert "## Summary" in md and "Activation outliers" in md and (tiny_run / "out" / "results.png").is_file()
    outliers = json.loads((tiny_run / "out" / "outliers.json").read_text())
    assert len(outliers) == 3 * 4 and all(o["max_over_p"] >= 1 for o in outliers)


@needs_data
def test_poisoned_test_labels_change_no_choice(tiny_run, tiny_checkpoint, monkeypatch):
    real = datasets.fashion_mnist

    def poisoned(split="train"):
        x, y = real(split)
        if split == "test":
            y = (y + 1 + np.random.default_rng(1).integers(0, 9, y.size)) % 10   # every label wrong
        return x, y

    monkeypatch.setattr(datasets, "fashion_mnist", poisoned)
    out = tiny_run / "poisoned"
    assert rr.main(["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--workdir", str(tiny_run / "work"),
                    *ARGS]) == 0
    clean, dirty = _rows(tiny_run / "out"), _rows(out)
    assert json.loads((out / "choices.json").read_text()) == json.loads((tiny_run / "out" / "choices.json").read_text())
    assert [r["chosen_on"] for r in dirty] == [r["chosen_on"] for r in clean]
    assert [r["val_top1"] for r in dirty] == [r["val_top1"] for r in clean]
    # the poison reached the report: other test accuracies
    assert [r["test_top1"] for r in dirty] != [r["test_top1"] for r in clean]


def test_a_workdir_of_another_configuration_is_refused(tmp_path):
    rr._check_workdir(tmp_path, {"sha256": "a"})
    with pytest.raises(SystemExit, match="another configuration"):
        rr._check_workdir(tmp_path, {"sha256": "b"})


# --- results_lampq's budget and evaluation pieces --------------------------------------------------

def _lampq_tool():
    return tool_module("results_lampq")


def test_results_lampq_budgets_and_evaluation(tiny_checkpoint):
    import pyruntime
    from pyruntime.calibrate.common import policy_cost, reference_source
    from pyruntime.calibrate.uniform import uniform_policy

    rl = _lampq_tool()
    source = reference_source(tiny_checkpoint)
    budgets = rl.weight_budgets(source, [0.0, 0.5, 1.0])
    lo, hi = (policy_cost(source, uniform_policy(w, 8), "bops") for w in (4, 8))
    assert [b for _, _, b in budgets] == pytest.approx([lo, (lo + hi) / 2, hi])
    path = source.convert(Path(tiny_checkpoint).with_name("w4a8.pyrt"), uniform_policy(4, 8))
    x = np.random.default_rng(0).standard_normal((7, 1, 28, 28)).astype(np.float32)
    pred, bops = rl.evaluate(pyruntime.load(path), x, False)
    assert pred.shape == (7,) and bops == lo


def test_outlier_verdict_reads_the_layernorm_fed_channels():
    def o(layer, ratio, chan):
        return {"layer": layer, "max_over_p": ratio, "channel_ratio": chan}

    calm = [o("blocks.0.attn.qkv", 1.2, 2.0), o("blocks.0.mlp.fc1", 1.3, 2.1), o("blocks.0.mlp.fc2", 2.5, 14.0)]
    assert "lacks the heavy activation outliers" in rr.outlier_verdict(calm)   # fc2's sparse GELU output alone
    assert "Heavy outliers" in rr.outlier_verdict(calm + [o("blocks.1.mlp.fc1", 1.5, 30.0)])
    assert "Heavy outliers" in rr.outlier_verdict(calm + [o("blocks.1.attn.proj", 12.0, 3.0)])
