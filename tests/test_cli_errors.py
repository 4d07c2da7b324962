"""Every bad input to ``pyruntime`` (and ``pyruntime calibrate``) ends as ONE line on stderr,
exit status 2, naming the problem -- never a traceback.

The CLI runs in a subprocess (``python -m pyruntime``), as a user runs it. Commands that need
an optional extra run with ``import torch`` / ``import timm`` blocked by a meta-path finder, so
the install hint is checked whether or not torch is installed here. Paths that only fail once
torch is imported are marked ``torch``.
"""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from pyruntime import _core
from pyruntime.cli import main
from pyruntime.modelfile import write_model

from _graphs import random_tensors, tiny_graph

BLOCK_TORCH = """
import runpy, sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'timm'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, _Block())
runpy.run_module('pyruntime', run_name='__main__', alter_sys=True)
"""


def cli(*argv, block_torch=False, cwd=None):
    cmd = [sys.executable, "-c", BLOCK_TORCH] if block_torch else [sys.executable, "-m", "pyruntime"]
    return subprocess.run(cmd + [str(a) for a in argv], capture_output=True, text=True, cwd=cwd, timeout=120)


def assert_one_line_error(out, *words):
    """Status 2, one non-empty stderr line, no traceback, the given words (regexes) in it."""
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("pyruntime"), lines[0]
    assert ": error: " in lines[0], lines[0]
    for w in words:
        assert re.search(w, lines[0]), (w, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli-errors")
    graph = tiny_graph(depth=2)
    model = d / "m.pyrt"
    write_model(model, graph, random_tensors(graph, seed=1), "{}", {"source": "test"})
    (d / "garbage.bin").write_bytes(b"garbage, not a checkpoint at all")
    (d / "garbage.safetensors").write_bytes(b"\xff" * 64)
    np.save(d / "x.npy", np.zeros((2, 1, 8, 8), np.float32))
    np.save(d / "int64.npy", np.zeros((2, 1, 8, 8), np.int64))
    (d / "empty.npy").write_bytes(b"")
    (d / "adir").mkdir()
    bad_images = d / "images"
    bad_images.mkdir()
    (bad_images / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing a PNG holds")
    (d / "policy.json").write_text("{not json")
    return {"model": model, "dir": d / "adir", "garbage": d / "garbage.bin", "garbage_st": d / "garbage.safetensors",
            "npy": d / "x.npy", "int64": d / "int64.npy", "empty": d / "empty.npy", "bad_images": bad_images,
            "bad_policy": d / "policy.json", "root": d}


# --- convert: checkpoints, exits, policy and output checked before torch is needed ------------------

@pytest.mark.parametrize("which, words", [
    ("garbage", [r"garbage\.bin", "not a safetensors file"]),
    ("npy", [r"x\.npy", "not a safetensors file"]),
    ("model", [r"m\.pyrt", "not a reference-format checkpoint"]),  # a safetensors file, not the reference's
    ("dir", ["--checkpoint", "is a directory"]),
])
def test_convert_reference_bad_checkpoint(files, tmp_path, which, words):
    assert_one_line_error(cli("convert", "reference", tmp_path / "o.pyrt", "--checkpoint", files[which]), *words)


@pytest.mark.parametrize("which, words", [
    ("garbage_st", [r"garbage\.safetensors", "not a safetensors file"]),
    ("npy", [r"x\.npy", r"must be \.safetensors, \.pth"]),
    ("dir", ["--checkpoint", "is a directory"]),
])
def test_convert_timm_bad_checkpoint(files, tmp_path, which, words):
    assert_one_line_error(cli("convert", "vit_tiny_patch16_224", tmp_path / "o.pyrt", "--checkpoint", files[which]),
                          *words)


@pytest.mark.parametrize("which, words", [
    ("garbage", ["--exits|not a safetensors file"]),
    ("dir", ["--exits", "is a directory"]),
])
def test_convert_bad_exits(files, tmp_path, which, words):
    assert_one_line_error(cli("convert", "vit_tiny_patch16_224", tmp_path / "o.pyrt", "--exits", files[which]),
                          *words)


def test_convert_bad_policy(files, tmp_path):
    assert_one_line_error(cli("convert", "reference", tmp_path / "o.pyrt", "--policy", "w3a1"),
                          "neither a policy shorthand", "w3a1")
    assert_one_line_error(cli("convert", "reference", tmp_path / "o.pyrt", "--policy", files["bad_policy"]),
                          "policy is not valid JSON")


@pytest.mark.parametrize("out, words", [
    ("", ["empty output path"]),
    ("{dir}", ["is a directory"]),
    ("{root}/no/such/dir/o.pyrt", ["does not exist"]),
])
def test_convert_bad_output_path(files, out, words):
    assert_one_line_error(cli("convert", "reference", out.format(**files)), *words)


# --- run / inspect / bench ----------------------------------------------------------------------------

def test_corrupt_png_in_an_image_folder(files):
    pytest.importorskip("PIL")
    assert_one_line_error(cli("run", files["model"], files["bad_images"]), r"a\.png", "cannot read the image")


@pytest.mark.parametrize("which, words", [
    ("int64", ["int64", "uint8", "float32"]),
    ("empty", [r"empty\.npy", "not a readable .npy"]),
    ("garbage", ["expected a .npy file or a folder"]),
])
def test_bad_image_arrays(files, which, words):
    assert_one_line_error(cli("run", files["model"], files[which]), *words)


@pytest.mark.parametrize("command", ["run", "inspect", "bench"])
def test_a_directory_as_model_is_named_a_directory(files, command):
    argv = [command, files["dir"]] + ([files["npy"]] if command == "run" else [])
    line = assert_one_line_error(cli(*argv), "is a directory")
    assert "no such" not in line


def test_a_missing_model_and_a_garbage_model(files):
    assert_one_line_error(cli("inspect", files["root"] / "nope.pyrt"), "no such file")
    assert_one_line_error(cli("run", files["garbage"], files["npy"]), r"garbage\.bin", "not a safetensors")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_refused_not_read(files):
    fifo = files["root"] / "fifo"
    if not fifo.exists():
        os.mkfifo(fifo)
    assert_one_line_error(cli("inspect", fifo), "not a regular file")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_file_is_named(files, tmp_path):
    p = tmp_path / "locked.pyrt"
    p.write_bytes(files["model"].read_bytes())
    p.chmod(0)
    assert_one_line_error(cli("inspect", p), "cannot read", "[Pp]ermission denied")


def test_an_unreadable_file_is_named_in_process(files, monkeypatch, capsys):
    """Root can read a mode-000 file, so here open() is made to fail as it does for other users."""
    import pyruntime.cli as cli_module

    def denied(path, *a, **k):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(cli_module, "open", denied, raising=False)
    with pytest.raises(SystemExit) as e:
        main(["inspect", str(files["model"])])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot read" in err and "Permission denied" in err


@pytest.mark.parametrize("argv, words", [
    (["run", "{model}", "{npy}", "--top-k", "0"], ["--top-k", "positive integer"]),
    (["bench", "{model}", "--runs", "0"], ["--runs", "positive integer"]),
    (["bench", "{model}", "--runs", "-1"], ["--runs", "positive integer"]),
    (["bench", "{model}", "--warmup", "-5"], ["--warmup", "non-negative integer"]),
    (["bench", "{model}", "--batch", "0"], ["--batch", "positive integer"]),
    (["bench", "{model}", "--top", "0"], ["--top", "positive integer"]),
    (["bench", "{model}", "--profile", "--latency-table", "{dir}"], ["--latency-table", "is a directory"]),
    (["run", "{model}", "{npy}", "--threads", "0"], ["--threads", "positive integer"]),
    (["run", "{model}", "{npy}", "--threads", "many"], ["--threads", "expected an integer"]),
    (["demo", "--limit", "-5"], ["--limit", "positive integer"]),
    (["demo", "--json", "{dir}"], ["--json", "is a directory"]),
    (["demo", "--workdir", "{npy}"], ["--workdir", "not a directory"]),
])
def test_bad_option_values(files, argv, words):
    assert_one_line_error(cli(*[a.format(**files) for a in argv]), *words)


@pytest.mark.parametrize("command", ["run", "bench", "demo"])
def test_threads_beyond_the_cap_name_the_cap(files, command):
    cap = _core.limits()["max_threads"]
    argv = {"run": ["run", files["model"], files["npy"]], "bench": ["bench", files["model"]], "demo": ["demo"]}[command]
    assert_one_line_error(cli(*argv, "--threads", "99999999999"), "99999999999", f"cap of {cap}", "max_threads")


# --- the optional extras: one install hint ----------------------------------------------------------

@pytest.mark.parametrize("argv, extra", [
    (["convert", "reference", "{root}/o.pyrt"], "convert"),
    (["convert", "vit_tiny_patch16_224", "{root}/o.pyrt", "--policy", "w8a8"], "convert"),
    (["demo", "--limit", "10", "--plot", ""], "convert"),
    (["calibrate", "--method", "uniform", "--out", "{root}/p.json"], "calibrate"),
])
def test_missing_torch_names_the_extra_to_install(files, argv, extra):
    out = cli(*[a.format(**files) for a in argv], block_torch=True)
    assert_one_line_error(out, "needs torch", "not installed", re.escape(f"install pyruntime-vit[{extra}]"))
    assert not (files["root"] / "o.pyrt").exists()


def test_missing_extra_is_an_import_error_with_the_hint():
    from pyruntime.errors import MissingDependency, missing_extra, require_extra

    e = missing_extra("calibrate", "pyruntime calibrate", "scipy")
    assert isinstance(e, ImportError) and isinstance(e, MissingDependency)
    assert str(e).count("\n") == 0 and "scipy" in str(e) and "pyruntime-vit[calibrate]" in str(e)
    with pytest.raises(ValueError, match="unknown extra"):
        missing_extra("gpu", "x")
    with pytest.raises(ValueError, match="unknown extra"):
        require_extra("gpu", "x")


# --- calibrate ------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["--out", ""], ["--out", "empty output path"]),
    (["--out", "{dir}"], ["--out", "is a directory"]),
    (["--out", "{root}/p.json", "--checkpoint", "{model}"], ["not a reference-format checkpoint"]),
    (["--out", "{root}/p.json", "--checkpoint", "{garbage}"], ["not a safetensors file"]),
    (["--out", "{root}/p.json", "--checkpoint", "{dir}"], ["--checkpoint", "is a directory"]),
    (["--out", "{root}/p.json", "--images", "0"], ["--images", "positive integer"]),
    (["--out", "{root}/p.json", "--images", "5001"], ["--images", "at most 5000"]),
    (["--out", "{root}/p.json", "--seed", "-1"], ["--seed", "non-negative"]),
    (["--out", "{root}/p.json", "--holdout", "1.5"], ["--holdout", "between 0 and 1"]),
    (["--out", "{root}/p.json", "--percentile", "0"], ["--percentile", r"\(0, 100\]"]),
    (["--out", "{root}/p.json", "--chunk", "0"], ["--chunk", "positive integer"]),
    (["--out", "{root}/p.json", "--every", "0"], ["--every", "positive integer"]),
    (["--out", "{root}/p.json", "--lam", "-1"], ["--lam", ">= 0"]),
    (["--out", "{root}/p.json", "--lam", "nan"], ["--lam", "finite"]),
    (["--out", "{root}/p.json", "--threads", "99999999999"], ["--threads", "cap of"]),
    (["--out", "{root}/p.json", "--base", "nope"], ["--base", "neither a policy shorthand"]),
    (["--out", "{root}/p.json", "--budget-bops", "-1"], ["budget must be positive"]),
    (["--out", "{root}/p.json", "--budget-bops", "infx"], ["budget must be positive and finite"]),
])
def test_calibrate_bad_options(files, args, words):
    method = "lampq" if any(a.startswith("--budget") for a in args) else "uniform"
    out = cli("calibrate", "--method", method, *[a.format(**files) for a in args], block_torch=True)
    assert_one_line_error(out, *words)


# --- paths that fail only once torch is imported ---------------------------------------------------

@pytest.mark.torch
def test_convert_garbage_pth_checkpoint(files, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("timm")
    ckpt = tmp_path / "garbage.pth"
    ckpt.write_bytes(b"garbage, not a torch checkpoint")
    assert_one_line_error(cli("convert", "vit_tiny_patch16_224", tmp_path / "o.pyrt", "--checkpoint", ckpt),
                          r"garbage\.pth")


@pytest.mark.torch
def test_convert_reference_checkpoint_that_does_not_fit(tmp_path):
    """A reference-format file missing a tensor: load_state_dict's multi-line message, in one line."""
    pytest.importorskip("torch")
    pytest.importorskip("timm")
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from test_calibrate_common import write_reference_checkpoint

    good = write_reference_checkpoint(tmp_path / "good.safetensors")
    with safe_open(str(good), framework="numpy") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "head.bias"}
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    assert_one_line_error(cli("convert", "reference", tmp_path / "o.pyrt", "--checkpoint", bad),
                          r"bad\.safetensors", "does not fit the model", "head.bias")


# --- main()'s handler: Ctrl-C, and bugs that must keep their traceback -------------------------------

def test_ctrl_c_is_status_130_in_one_line(files, monkeypatch, capsys):
    import pyruntime.cli as cli_module

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "cmd_inspect", interrupted)
    assert main(["inspect", str(files["model"])]) == 130
    assert capsys.readouterr().err.strip() == "pyruntime inspect: interrupted"


def test_an_unexpected_exception_is_not_swallowed(files, monkeypatch):
    """A RuntimeError/KeyError/TypeError out of a command is a pyruntime bug, not bad input: it
    keeps its traceback instead of becoming a vague one-line 'error'."""
    import pyruntime.cli as cli_module

    def bug(args):
        raise KeyError("a bug")

    monkeypatch.setattr(cli_module, "cmd_inspect", bug)
    with pytest.raises(KeyError, match="a bug"):
        main(["inspect", str(files["model"])])
