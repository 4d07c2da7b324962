"""``pyruntime calibrate`` end to end on a tiny reference-format checkpoint and real
Fashion-MNIST calibration images (skipped without torch/timm or the data set)."""
import argparse
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("scipy.optimize")

import pyruntime
from pyruntime import bops
from pyruntime.calibrate.cli import add_parser, main
from pyruntime.calibrate.common import calibration_data, reference_source
from pyruntime.policy import LayerPolicy, Policy

from test_calibrate_common import write_reference_checkpoint
from _helpers import require_data


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    require_data()
    return write_reference_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture(scope="module")
def exit_checkpoint(checkpoint, tmp_path_factory):
    """A depth-4 tiny checkpoint with exit heads after blocks 0..2 (copies of the final norm
    and head), for maqee and quee."""
    from safetensors.torch import save_file
    from timm.models.vision_transformer import VisionTransformer

    kwargs = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=16, depth=4, num_heads=2,
                  mlp_ratio=2.0, qkv_bias=True, class_token=True, global_pool="token")
    torch.manual_seed(0)
    model = VisionTransformer(**kwargs)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    for b in (0, 1, 2):
        for src, dst in (("norm", "norm"), ("head", "fc")):
            for p in ("weight", "bias"):
                tensors[f"exits.{b}.{dst}.{p}"] = tensors[f"{src}.{p}"].clone()
    meta = {"timm_kwargs": json.dumps(kwargs), "mean": "0.2860405969887955", "std": "0.35302424451492254",
            "exit_blocks": "[0, 1, 2, 3]", "extra_exit_blocks": "[0, 1, 2]",
            "classes": json.dumps([str(i) for i in range(10)]), "format": "pyruntime-reference-v1"}
    path = tmp_path_factory.mktemp("ckpt-exits") / "tiny-exits.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path


def calibrate(checkpoint, out, *args, images=64):
    return main(["calibrate", *args, "--checkpoint", str(checkpoint), "--images", str(images), "--out", str(out),
                 "--no-progress"])


# small and fast: two weight options, one re-allocation, a generous promise (the tiny model is random)
MAQEE = ("--method", "maqee", "--w-bits", "4,8", "--a-bits", "8", "--rounds", "1", "--max-drop", "50", "--threads", "1")


def test_lampq_from_the_command_line(checkpoint, tmp_path, capsys):
    out = tmp_path / "lampq.json"
    assert calibrate(checkpoint, out, "--method", "lampq", "--budget-bops", "0.97x", "--report", "--rounds", "1") == 0
    text = capsys.readouterr().out
    assert "Omega" in text and "blocks.0.attn.qkv" in text and f"wrote {out}" in text
    policy = Policy.load(out)
    src = reference_source(checkpoint)
    path = src.convert(tmp_path / "m.pyrt", policy)
    assert bops.static(path) == policy.meta["cost"] <= policy.meta["budget"]
    x = calibration_data(8, mean=src.preprocess["mean"], std=src.preprocess["std"]).images
    assert np.isfinite(pyruntime.load(path).run(x).logits).all()


def test_impossible_budget_is_a_one_line_error(checkpoint, tmp_path, capsys):
    assert calibrate(checkpoint, tmp_path / "p.json", "--method", "lampq", "--budget-bops", "1000") == 2
    err = capsys.readouterr().err
    assert "pyruntime calibrate: error: budget 1000 BOPs cannot be met: the smallest feasible budget is" in err
    assert not (tmp_path / "p.json").exists()
    assert calibrate(checkpoint, tmp_path / "p.json", "--method", "uniform", "--budget-bytes", "10") == 2
    assert "smallest feasible budget is" in capsys.readouterr().err


def test_uniform_static_and_scalepredictor(checkpoint, tmp_path):
    static = tmp_path / "w8a4.json"
    assert calibrate(checkpoint, static, "--method", "uniform", "--w-bits", "8", "--a-bits", "4",
                     "--scale", "percentile") == 0
    pol = Policy.load(static)
    assert {lp.scale for lp in pol.layers.values() if lp.w_bits != 32} == {"static"}
    pred = tmp_path / "pred.json"
    assert calibrate(checkpoint, pred, "--method", "scalepredictor", "--base", str(static), "--chunk", "32") == 0
    p = Policy.load(pred)
    assert p.predictor.block == 0 and p.predictor.chunk == 32
    assert {lp.scale for n, lp in p.layers.items() if n.startswith("blocks.1.")} == {"predicted"}
    assert calibrate(checkpoint, pred, "--method", "scalepredictor", "--budget-bops", "1e9") == 2


def test_uniform_with_mse_clipped_static_scales(checkpoint, tmp_path):
    from pyruntime.calibrate.static import static_scales
    from pyruntime.calibrate.uniform import uniform_policy

    out = tmp_path / "w8a4-mse.json"
    assert calibrate(checkpoint, out, "--method", "uniform", "--w-bits", "8", "--a-bits", "4", "--scale", "mse") == 0
    pol = Policy.load(out)
    assert pol.meta["static"]["method"] == "mse"
    src = reference_source(checkpoint)
    data = calibration_data(64, mean=src.preprocess["mean"], std=src.preprocess["std"])
    want = static_scales(src, data, uniform_policy(8, 4), "mse", show_progress=False)
    got = {n: lp.static_scale for n, lp in pol.layers.items() if lp.scale == "static"}
    assert got == pytest.approx(want, rel=1e-6) and len(got) == 4 * 2   # every block linear of the depth-2 model
    minmax = static_scales(src, data, uniform_policy(8, 4), "minmax", show_progress=False)
    assert all(got[n] <= minmax[n] * (1 + 1e-6) for n in got)   # a clip ratio of at most 1
    assert any(got[n] < minmax[n] for n in got)


@pytest.mark.parametrize("argv,words", [
    (("--method", "uniform", "--ste-steps", "5"), "--ste-steps applies to scalepredictor, not uniform"),
    (("--method", "lampq", "--budget-bops", "0.9x", "--ste-steps", "1"), "--ste-steps applies to scalepredictor, not lampq"),
    (("--method", "scalepredictor", "--scale", "mse"), "--scale mse applies to uniform/lampq/naive, not scalepredictor"),
    (("--method", "quee", "--scale", "minmax"), "--scale minmax applies to uniform/lampq/naive, not quee"),
])
def test_options_of_other_methods_are_one_line_errors(checkpoint, tmp_path, capsys, argv, words):
    out = tmp_path / "p.json"
    assert calibrate(checkpoint, out, *argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err == f"pyruntime calibrate: error: {words}\n"
    assert not out.exists()


def test_add_parser_registers_the_subcommand(tmp_path):
    table = tmp_path / "T.json"  # --latency-table must name an existing file
    table.write_text("{}")
    p = argparse.ArgumentParser(prog="pyruntime")
    add_parser(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["calibrate", "--method", "lampq", "--budget-bops", "2e9", "--out", "x.json",
                         "--w-bits", "4,8", "--a-bits", "6,8"])
    assert args.w_bits == [4, 8] and args.a_bits == [6, 8] and callable(args.func) and args.scale == "dynamic"
    assert p.parse_args(["calibrate", "--method", "naive", "--out", "x.json", "--scale", "mse"]).scale == "mse"
    with pytest.raises(SystemExit):
        p.parse_args(["calibrate", "--method", "lampq", "--budget-bops", "1", "--budget-bytes", "1", "--out", "x"])
    args = p.parse_args(["calibrate", "--method", "quee", "--reduced", "w4a6", "--out", "x.json", "--lam", "0.5"])
    assert args.reduced == LayerPolicy(4, 6) and args.lam == 0.5 and args.every == 3 and args.base is None
    args = p.parse_args(["calibrate", "--method", "maqee", "--budget-latency", "2x", "--latency-table", str(table),
                         "--out", "x.json", "--exit-blocks", "0,3", "--delta", "0.1"])
    assert args.exit_blocks == [0, 3] and args.delta == 0.1 and args.max_drop is None and args.holdout is None
    with pytest.raises(SystemExit):
        p.parse_args(["calibrate", "--method", "quee", "--reduced", "int4", "--out", "x"])
    with pytest.raises(SystemExit):
        p.parse_args(["calibrate", "--method", "maqee", "--budget-bops", "1", "--budget-latency", "1", "--out", "x"])


# --- maqee ----------------------------------------------------------------------------------------------

def test_maqee_writes_exits_and_thresholds(exit_checkpoint, tmp_path, capsys):
    out = tmp_path / "maqee.json"
    assert calibrate(exit_checkpoint, out, *MAQEE, "--budget-bops", "1.0x", "--exit-blocks", "0,2", "--report",
                     images=128) == 0
    text = capsys.readouterr().out
    assert "thresholds b0:" in text and "validation (held-out" in text and "routes of the 32 images" in text and f"wrote {out}" in text and "expected" in text
    policy = Policy.load(out)
    assert [(e.block, e.rule) for e in policy.exits] == [(0, "confidence"), (2, "confidence")]
    assert all(0.0 <= e.threshold <= 1.0 for e in policy.exits)
    assert policy.meta["method"] == "maqee" and policy.meta["cost_kind"] == "bops"
    assert policy.meta["max_drop"] == pytest.approx(0.5) and policy.meta["expected_cost_validation"] <= policy.meta["budget"]
    assert {(lp.w_bits, lp.a_bits) for lp in policy.layers.values()} <= {(4, 8), (8, 8)}
    src = reference_source(exit_checkpoint)
    path = src.convert(tmp_path / "m.pyrt", policy)
    x = calibration_data(8, mean=src.preprocess["mean"], std=src.preprocess["std"]).images
    r = pyruntime.load(path).run(x)
    assert np.isfinite(r.logits).all() and set(r.exit_block) <= {0, 2, 3}


def test_maqee_latency_budget(exit_checkpoint, tmp_path, capsys):
    from pyruntime.latency import LatencyTable, uniform_graph
    from pyruntime.modelfile import graph_layer_names

    arch = reference_source(exit_checkpoint).arch
    rng = np.random.default_rng(0)  # made-up seconds, as tests/test_latency.py::synthetic_table
    names = graph_layer_names(uniform_graph(arch, 32, range(arch["depth"] - 1)))
    table = LatencyTable(arch, (32, 8, 4), {n: {b: float(rng.random() * 1e-4) for b in (32, 8, 4)} for n in names},
                         [float(v) for v in rng.random(arch["depth"]) * 1e-4], float(rng.random() * 1e-5),
                         {"source": "synthetic"})
    table.save(tmp_path / "T.json")
    out = tmp_path / "lat.json"
    assert calibrate(exit_checkpoint, out, *MAQEE, "--budget-latency", "1.0x", "--latency-table",
                     str(tmp_path / "T.json"), "--report", images=128) == 0
    assert " s of budget " in capsys.readouterr().out
    policy = Policy.load(out)
    assert policy.meta["cost_kind"] == "latency" and policy.exits
    assert policy.meta["expected_cost_validation"] <= policy.meta["budget"] < 1.0  # seconds, not BOPs


def test_maqee_errors(exit_checkpoint, tmp_path, capsys):
    p = tmp_path / "p.json"
    assert calibrate(exit_checkpoint, p, *MAQEE, "--budget-bops", "1000", images=128) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pyruntime calibrate: error: budget 1000 BOPs per image")
    assert not p.exists()
    assert calibrate(exit_checkpoint, p, *MAQEE, "--budget-latency", "0.5x") == 2
    assert "--latency-table" in capsys.readouterr().err
    assert calibrate(exit_checkpoint, p, *MAQEE, "--budget-bytes", "0.5x") == 2
    assert "--budget-bytes does not apply" in capsys.readouterr().err
    assert calibrate(exit_checkpoint, p, *MAQEE) == 2
    assert "maqee needs a budget" in capsys.readouterr().err
    assert calibrate(exit_checkpoint, p, "--method", "lampq", "--budget-latency", "1e-3") == 2
    assert "maqee only" in capsys.readouterr().err
    assert not p.exists()


# --- quee -----------------------------------------------------------------------------------------------

def test_quee_writes_gates_that_convert(exit_checkpoint, tmp_path, capsys):
    from pyruntime.convert import convert

    out = tmp_path / "quee.json"
    assert calibrate(exit_checkpoint, out, "--method", "quee", "--every", "2", "--reduced", "w4a6", "--lam", "0.25",
                     "--report", "--threads", "1") == 0
    text = capsys.readouterr().out
    assert "lambda 0.25" in text and "gate  cost" in text and f"wrote {out}" in text
    policy = Policy.load(out)
    assert [(e.block, e.rule) for e in policy.exits] == [(1, "gate")]
    assert policy.gates.lam == 0.25 and policy.meta["calibration"]["lambda"] == 0.25
    assert policy.gates.reduced["blocks.*"] == LayerPolicy(4, 6)
    src = reference_source(exit_checkpoint)
    path = convert(src.model, tmp_path / "q.pyrt", checkpoint=exit_checkpoint, policy=str(out),
                   preprocess=src.preprocess)
    x = calibration_data(8, mean=src.preprocess["mean"], std=src.preprocess["std"]).images
    assert np.isfinite(pyruntime.load(path).run(x).logits).all()
    # quee's budget is BOPs per image on the validation images; one no lambda meets names what was reachable
    assert calibrate(exit_checkpoint, tmp_path / "q2.json", "--method", "quee", "--budget-bytes", "0.5x") == 2
    assert "quee's budget is the mean BOPs per image" in capsys.readouterr().err
    assert calibrate(exit_checkpoint, tmp_path / "q2.json", "--method", "quee", "--budget-bops", "0.1x") == 2
    err = capsys.readouterr().err
    assert "no lambda meets the target on the 16 validation images" in err and "the cheapest lambda" in err


def test_convert_reference_with_a_calibrated_policy(exit_checkpoint, tmp_path, capsys):
    """calibrate -> convert -> run from the command line: ``pyruntime convert reference``
    takes the reference-format checkpoint with its exit heads."""
    policy = tmp_path / "maqee.json"
    assert calibrate(exit_checkpoint, policy, *MAQEE, "--budget-bops", "1.0x", "--exit-blocks", "0,2") == 0
    out = tmp_path / "ref.pyrt"
    assert main(["convert", "reference", str(out), "--checkpoint", str(exit_checkpoint), "--policy", str(policy)]) == 0
    m = pyruntime.load(out)
    assert [e["block"] for e in m.graph["exits"]] == [0, 2]
    assert [e["threshold"] for e in m.graph["exits"]] == [e.threshold for e in Policy.load(policy).exits]
    capsys.readouterr()
    assert main(["convert", "reference", str(out), "--checkpoint", str(exit_checkpoint), "--exits", "x.safetensors"]) == 2
    assert "--exits does not apply" in capsys.readouterr().err


# --- --attention ---------------------------------------------------------------------------------------

def test_attention_flag_end_to_end(checkpoint, tmp_path, capsys):
    """``--attention 8``: the policy has int8 attention, ``1x`` is W8A8's cost at int8
    attention, and the printed BOPs are the converted file's."""
    src = reference_source(checkpoint)
    out = tmp_path / "u8.json"
    assert calibrate(checkpoint, out, "--method", "uniform", "--budget-bops", "1x", "--attention", "8") == 0
    text = capsys.readouterr().out
    policy = Policy.load(out)
    assert policy.attn_bits == 8 and policy.name == "w8a8-attn8"
    static = bops.static(src.convert(tmp_path / "u8.pyrt", policy))
    assert policy.meta["cost"] == policy.meta["budget"] == static
    assert f"{static} BOPs per image" in text and "int8 attention" in text
    out = tmp_path / "lampq8.json"
    assert calibrate(checkpoint, out, "--method", "lampq", "--budget-bops", "0.9x", "--rounds", "1",
                     "--attention", "8") == 0
    policy = Policy.load(out)
    assert policy.attn_bits == 8
    assert bops.static(src.convert(tmp_path / "lampq8.pyrt", policy)) == policy.meta["cost"] <= policy.meta["budget"]
    # the default stays fp32 attention, and its JSON has no attention
    out = tmp_path / "u32.json"
    capsys.readouterr()
    assert calibrate(checkpoint, out, "--method", "uniform") == 0
    assert "int8 attention" not in capsys.readouterr().out
    assert Policy.load(out).attn_bits == 32 and "attention" not in json.loads(out.read_text())


@pytest.mark.parametrize("bad", ["16", "int8", "8.0"])
def test_bad_attention_values_are_named(checkpoint, tmp_path, capsys, bad):
    with pytest.raises(SystemExit):
        calibrate(checkpoint, tmp_path / "p.json", "--method", "uniform", "--attention", bad)
    assert "expected 32 (fp32 attention) or 8 (int8 attention)" in capsys.readouterr().err


def test_attention_conflicting_with_the_base_is_an_error(checkpoint, exit_checkpoint, tmp_path, capsys):
    assert calibrate(exit_checkpoint, tmp_path / "q.json", "--method", "quee", "--base", "w8a8-attn8",
                     "--attention", "32", "--threads", "1") == 2
    err = capsys.readouterr().err
    assert "attention bits 32 conflict" in err and "'w8a8-attn8'" in err
    base = tmp_path / "base.json"
    assert calibrate(checkpoint, base, "--method", "uniform", "--attention", "8") == 0
    assert calibrate(checkpoint, tmp_path / "p.json", "--method", "scalepredictor", "--base", str(base),
                     "--attention", "32") == 2
    assert "attention bits 32 conflict" in capsys.readouterr().err
    pred = tmp_path / "pred.json"
    assert calibrate(checkpoint, pred, "--method", "scalepredictor", "--base", str(base)) == 0
    assert Policy.load(pred).attn_bits == 8
