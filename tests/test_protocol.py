"""tools/_protocol.py, the protocol every results script shares: the three splits come from
the documented ranges (calibration: training images 50000..54999, validation: 55000..59999,
test: the test split) and are disjoint; the shared flags keep each script's defaults; bad
counts are refused in one line; the holdout note appears exactly when the checkpoint's
training saw the calibration and validation images. No torch needed."""
import argparse
import sys
from pathlib import Path

import numpy as np
import pytest

from pyruntime import datasets

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import _protocol  # noqa: E402
from _helpers import tool_module  # noqa: E402


MEAN, STD = [datasets.FASHION_MNIST_MEAN], [datasets.FASHION_MNIST_STD]


@pytest.fixture(scope="module")
def train():
    """Fashion-MNIST's training split (images, labels); the test skips without the data set."""
    try:
        return datasets.fashion_mnist("train")
    except FileNotFoundError:
        pytest.skip("dataset-fashion-mnist not installed")


def _parser(**kw) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tool")
    _protocol.add_protocol_args(p, out="x", **kw)
    return p


def _parse(argv, **kw):
    p = _parser(**kw)
    return _protocol.check_protocol_args(p, p.parse_args(argv))


def _train_rows(images_norm: np.ndarray, lo: int, hi: int, raw: np.ndarray) -> np.ndarray:
    """The training index of every normalised image, looked up among raw[lo:hi] (-1: absent)."""
    u8 = np.rint((images_norm[:, 0] * STD[0] + MEAN[0]) * 255).astype(np.uint8)
    where = {raw[i].tobytes(): i for i in range(lo, hi)}
    return np.array([where.get(im.tobytes(), -1) for im in u8])


def test_the_splits_come_from_the_documented_ranges_and_are_disjoint(train):
    args = _parse(["--images", "300", "--val-images", "300", "--test-limit", "40", "--seed", "3"],
                  images=256, val_images=5000)
    s = _protocol.load_splits(args, MEAN, STD)
    raw, labels = train
    cal = _train_rows(np.asarray(s.calibration.images), 50000, 55000, raw)
    val = _train_rows(np.asarray(s.validation.images), 55000, 60000, raw)
    assert (cal >= 0).all() and (val >= 0).all()     # each image found in its own range
    assert len(set(cal)) == 300 and len(set(val)) == 300
    assert not set(cal) & set(val)
    assert (s.calibration.labels == labels[cal]).all() and (s.validation.labels == labels[val]).all()
    # the test split: its first --test-limit images, in order, normalised as the runtime does
    tx, ty = datasets.fashion_mnist("test")
    from pyruntime.calibrate.common import normalize

    assert np.array_equal(s.test_images, normalize(tx[:40], MEAN, STD)) and s.test_images.dtype == np.float32
    assert np.array_equal(s.test_labels, ty[:40]) and s.test_labels.dtype == np.int64
    # the seed draws other images, from the same ranges
    other = _protocol.load_splits(_parse(["--images", "300", "--val-images", "300", "--test-limit", "40"],
                                         images=256, val_images=5000), MEAN, STD)
    assert not np.array_equal(other.calibration.images, s.calibration.images)
    assert other.calibration.summary["range"] == [50000, 55000] and other.validation.summary["range"] == [55000, 60000]


def test_a_script_without_validation_gets_none_and_all_test_images_by_default(train):
    args = _parse(["--images", "5"], images=512)
    assert not hasattr(args, "val_images")
    s = _protocol.load_splits(args, MEAN, STD)
    assert s.validation is None and len(s.calibration) == 5 and len(s.test_labels) == 10000


def test_the_validation_flag_keeps_its_spelling_and_lands_in_val_images():
    args = _parse(["--validation-images", "7"], images=1, val_images=2000, val_flag="--validation-images")
    assert args.val_images == 7
    with pytest.raises(SystemExit):
        _parse(["--val-images", "7"], images=1, val_images=2000, val_flag="--validation-images")


@pytest.mark.parametrize("argv,flag", [(["--test-limit", "0"], "--test-limit"), (["--images", "0"], "--images"),
                                       (["--validation-images", "-1"], "--validation-images"),
                                       (["--threads", "0"], "--threads")])
def test_counts_below_one_are_refused_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        _parse(argv, images=1, val_images=1, val_flag="--validation-images", threads=1)
    assert e.value.code == 2
    assert f"{flag} must be >= 1" in capsys.readouterr().err


# (script, required argv, its protocol defaults: images, validation images, threads, results folder)
SCRIPTS = [("regimes_results", [], 256, 5000, 2, "regimes"),
           ("results_lampq", ["--workdir", "w"], 512, None, 1, "lampq"),
           ("results_scalepredictor", [], 256, 2000, 2, "scalepredictor"),
           ("results_maqee", [], 512, 2000, None, "maqee"),
           ("results_quee", [], 1024, 5000, None, "quee")]


@pytest.mark.parametrize("name,argv,images,val,threads,out", SCRIPTS)
def test_every_results_script_parses_the_shared_flags_with_its_own_defaults(name, argv, images, val, threads, out):
    args = tool_module(name).parse_args(argv)
    assert (args.checkpoint, args.images, args.test_limit, args.seed) == (None, images, None, 0)
    assert getattr(args, "val_images", None) == val and getattr(args, "threads", None) == threads
    assert args.out == REPO / "results" / out
    with pytest.raises(SystemExit):
        tool_module(name).parse_args(argv + ["--test-limit", "0"])


def test_results_maqee_bsr_filter_flag(capsys):
    """--bsr-max: the method's default, inf turns the filter off, a negative value is a one-line error."""
    from pyruntime.calibrate.maqee import MaqeeConfig

    mod = tool_module("results_maqee")
    assert mod.parse_args([]).bsr_max == MaqeeConfig.bsr_max
    assert mod.parse_args(["--bsr-max", "inf"]).bsr_max == float("inf")
    for bad in ("-1", "nan"):
        with pytest.raises(SystemExit):
            mod.parse_args(["--bsr-max", bad])
        assert "--bsr-max must be >= 0" in capsys.readouterr().err


def _checkpoint(path: Path, holdout=None) -> Path:
    from safetensors.numpy import save_file

    meta = {"mean": "0.286", "std": "0.353"}
    if holdout is not None:
        meta["holdout"] = holdout
    save_file({"w": np.zeros(2, np.float32)}, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("held,seen", [(None, "50000..59999"), ("[50000, 60000]", ""), ("[40000, 60000]", ""),
                                       ("[59000, 60000]", "50000..58999"), ("[50000, 55000]", "55000..59999"),
                                       ("[52000, 58000]", "50000..51999 and 58000..59999")])
def test_holdout_note_names_the_trained_on_images_only_when_there_are_some(tmp_path, held, seen):
    note = _protocol.holdout_note(_checkpoint(tmp_path / "c.safetensors", held))
    assert _protocol.holdout_lines(note) == ([note, ""] if seen else [])
    assert bool(note) is bool(seen)
    if seen:
        assert f"was trained on training images {seen}**" in note


def test_checkpoint_label_is_relative_inside_the_repository_only(tmp_path):
    assert _protocol.checkpoint_label(REPO / "results" / "m.safetensors") == "results/m.safetensors"
    assert _protocol.checkpoint_label(tmp_path / "m.safetensors") == str(tmp_path / "m.safetensors")
