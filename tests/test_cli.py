"""The ``pyruntime`` command line on a small model file: inspect, run, bench, and its errors.

Torch-free (``convert`` is covered by test_calibrate_cli.py and test_convert.py).
"""
import re
import subprocess
import sys

import numpy as np
import pytest

import pyruntime
from pyruntime import bops
from pyruntime.cli import main
from pyruntime.modelfile import write_model

from _graphs import W4A8, W8A8, random_tensors, tiny_graph


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """Mixed bits, int8 attention, a confidence exit after block 0."""
    graph = tiny_graph(depth=3, exits=[{"block": 0, "rule": "confidence", "threshold": 0.5}])
    layers = {n: (W8A8 if i % 2 else W4A8) for i, n in enumerate(sorted(graph["layers"])) if n.startswith("blocks.")}
    graph = tiny_graph(depth=3, exits=graph["exits"], layers=layers)
    graph["attention"] = {"bits": 8}
    path = tmp_path_factory.mktemp("cli") / "m.pyrt"
    write_model(path, graph, random_tensors(graph, seed=2), "{}", {"source": "test"})
    return path, graph


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    x = np.random.default_rng(0).standard_normal((6, 1, 8, 8)).astype(np.float32)
    path = tmp_path_factory.mktemp("img") / "x.npy"
    np.save(path, x)
    return path, x


def test_run_writes_features_and_tokens(model_file, images, tmp_path, capsys):
    """``run --features F --tokens T``: the RunResult's arrays as float32 .npy, the same as the
    Python API gives (an image that exited: its exit head's features, its tokens at the exit)."""
    path, _ = model_file
    npy, x = images
    f, t = tmp_path / "f.npy", tmp_path / "t.npy"
    assert main(["run", str(path), str(npy), "--threads", "1", "--features", str(f), "--tokens", str(t)]) == 0
    r = pyruntime.load(path, num_threads=1).run(x, tokens=True)
    np.testing.assert_array_equal(np.load(f), r.features)
    np.testing.assert_array_equal(np.load(t), r.tokens)
    assert np.load(f).dtype == np.float32 and np.load(t).shape[:1] == (len(x),)
    capsys.readouterr()
    assert main(["run", str(path), str(npy), "--features", str(npy)]) == 2  # never over its own input
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "x.npy" in err[0]
    np.testing.assert_array_equal(np.load(npy), x)


def test_inspect_names_version_attention_layers_and_bops(model_file, capsys):
    path, graph = model_file
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "format:      version 4" in out  # every file is written as 4 (the op list)
    assert "attention:   q.k^T and attn.v on int8 operands" in out
    assert "after block 0 (confidence >= 0.5)" in out
    for name in graph["layers"]:
        assert re.search(rf"^{re.escape(name)}\s", out, re.M), name
    static = float(re.search(r"static BOPs: ([0-9.]+) G", out).group(1))
    assert static == pytest.approx(bops.static(graph) / 1e9, abs=5e-4)


def test_run_prints_one_prediction_per_image(model_file, images, capsys):
    path, _ = model_file
    npy, x = images
    assert main(["run", str(path), str(npy), "--threads", "1"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("image ")]
    r = pyruntime.load(path).run(x)
    assert len(lines) == len(x)
    for i, ln in enumerate(lines):
        assert ln.startswith(f"image {i}: class {int(r.logits[i].argmax())} ")
        assert f"exit block {r.exit_block[i]} " in ln


def test_bench_reports_latency_exits_and_per_op_times(model_file, capsys):
    path, _ = model_file
    assert main(["bench", str(path), "--batch", "4", "--runs", "3", "--warmup", "1", "--profile"]) == 0
    out = capsys.readouterr().out
    for what in ("load:", "latency:", "p50", "exits:", "BOPs:", "per-op time over 3 runs"):
        assert what in out
    assert re.search(r"blocks\.0\.attn\.core\s+[0-9.]+ ms", out)


def _exit_status(argv):
    """main()'s status; argparse's own errors (bad option values) exit through SystemExit."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("argv, match", [
    (["run", "{model}", "{missing}"], "no such file"),
    (["run", "{model}", "{wrong}"], "shape"),
    (["inspect", "{garbage}"], "truncated|not a safetensors|header"),
    (["bench", "{model}", "--latency-table", "t.json"], "--profile"),
])
def test_errors_are_one_line_and_exit_2(model_file, tmp_path, capsys, argv, match):
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((2, 1, 9, 9), dtype=np.float32))
    garbage = tmp_path / "garbage.pyrt"
    garbage.write_bytes(b"\x01\x02\x03")
    paths = {"model": model_file[0], "missing": tmp_path / "nope.npy", "wrong": wrong, "garbage": garbage}
    assert _exit_status([a.format(**paths) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"pyruntime {argv[0]}: error:") and len(err.splitlines()) == 1
    assert re.search(match, err)


def test_python_dash_m_runs_the_same_cli(model_file):
    out = subprocess.run([sys.executable, "-m", "pyruntime", "inspect", str(model_file[0])],
                         capture_output=True, text=True, check=True).stdout
    assert "attention:" in out and "static BOPs:" in out

