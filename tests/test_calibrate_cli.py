"""``pyruntime calibrate`` end to end on a tiny reference-format checkpoint and real
Fashion-MNIST calibration images (skipped without torch/timm or the data set)."""
import argparse

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("scipy.optimize")

import pyruntime
from pyruntime import bops
from pyruntime.calibrate.cli import add_parser, main
from pyruntime.calibrate.common import calibration_data, reference_source
from pyruntime.policy import Policy

from test_calibrate_common import write_reference_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    try:
        from pyruntime.datasets import fashion_mnist_dir

        fashion_mnist_dir()
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST is not installed")
    return write_reference_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def calibrate(checkpoint, out, *args):
    return main(["calibrate", *args, "--checkpoint", str(checkpoint), "--images", "64", "--out", str(out),
                 "--no-progress"])


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


def test_add_parser_registers_the_subcommand():
    p = argparse.ArgumentParser(prog="pyruntime")
    add_parser(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["calibrate", "--method", "lampq", "--budget-bops", "2e9", "--out", "x.json",
                         "--w-bits", "4,8", "--a-bits", "6,8"])
    assert args.w_bits == [4, 8] and args.a_bits == [6, 8] and callable(args.func)
    with pytest.raises(SystemExit):
        p.parse_args(["calibrate", "--method", "lampq", "--budget-bops", "1", "--budget-bytes", "1", "--out", "x"])
