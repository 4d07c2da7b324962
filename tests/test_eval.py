"""``pyruntime eval`` and ``pyruntime run`` on the user's own labelled images, torch-free.

Small model files are built from hand-made graphs (tests/_graphs.py); the data are PNG class
folders (Pillow) and ``.npz`` files written here. Every number ``evaluate`` reports is checked
against an independent computation: predictions from ``Model.run`` on the same images, BOPs
from ``RunResult.bops``, and the ratio against a separately constructed fp32 full-depth graph.
"""
import json
import re
import subprocess
import sys

import numpy as np
import pytest

import pyruntime
from pyruntime import bops
from pyruntime.evaluate import evaluate, fp32_full_depth_bops, wilson_interval
from pyruntime.imagedata import DataError, Preprocess, read_dataset
from pyruntime.modelfile import write_model

from _graphs import W8A8, random_tensors, tiny_graph

Image = pytest.importorskip("PIL.Image")

REQUIRED = {"top1", "mean_exit_block", "bops_per_image", "bops_ratio", "ms_per_image", "images"}
RESIZE = {"crop_pct": 0.875, "interpolation": "bicubic", "crop_mode": "center"}
ARCH = dict(depth=3, in_chans=3, img_size=[16, 16], num_classes=3)


def _graph(exits=(), in_chans=3):
    """W8A8 blocks (so BOPs fall below fp32), int8 attention, timm's resize recorded."""
    g = tiny_graph(exits=exits, **dict(ARCH, in_chans=in_chans))
    layers = {n: W8A8 for n in g["layers"] if n.startswith("blocks.")}
    g = tiny_graph(exits=exits, layers=layers, **dict(ARCH, in_chans=in_chans))
    g["attention"] = {"bits": 8}
    g["preprocess"].update(RESIZE)
    return g


def _write(path, graph, seed=3):
    write_model(path, graph, random_tensors(graph, seed=seed), "{}", {"source": "test"})
    return path


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    return tmp_path_factory.mktemp("eval")


@pytest.fixture(scope="module")
def model_path(d):
    return _write(d / "m.pyrt", _graph())


@pytest.fixture(scope="module")
def gray_model_path(d):
    return _write(d / "gray.pyrt", _graph(in_chans=1))


@pytest.fixture(scope="module")
def arrays():
    """40 RGB images at the model's size, labels 0..2."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8), rng.integers(0, 3, 40)


@pytest.fixture(scope="module")
def npz(d, arrays):
    x, y = arrays
    np.savez(d / "data.npz", images=x, labels=y, classes=np.array(["cat", "dog", "eel"]))
    return d / "data.npz"


@pytest.fixture(scope="module")
def folder(d):
    """Class folders of PNGs in several sizes (none at the model's), one of them gray; the
    files' pixels and labels in folder order, read back independently."""
    rng = np.random.default_rng(1)
    root = d / "folder"
    sizes = [(16, 16), (23, 31), (40, 20), (9, 12), (64, 64)]
    pixels, labels = [], []
    for label, name in enumerate(["ant", "bee", "cow"]):
        (root / name).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            if i == 3:
                Image.fromarray(img[..., 0]).save(root / name / f"{i}.png")  # gray: RGB as torchvision loads it
                img = np.repeat(img[..., :1], 3, axis=2)
            else:
                Image.fromarray(img).save(root / name / f"{i}.png")
            pixels.append(img)
            labels.append(label)
    return root, pixels, np.array(labels)


def _independent(model_path, images, labels):
    """top-1, exit blocks and per-image BOPs straight from Model.run (uint8 in: it resizes)."""
    m = pyruntime.load(model_path, num_threads=1)
    r = m.run(m.preprocess(images))
    return float((r.predictions == labels).mean()), r.exit_block, r.bops


def _fp32_graph_bops(in_chans=3):
    """The backbone at fp32, no exits, fp32 attention, built by hand here."""
    return bops.static(tiny_graph(**dict(ARCH, in_chans=in_chans)))


# --- evaluate() ---------------------------------------------------------------------------------

def test_npz_numbers_match_model_run(model_path, npz, arrays):
    x, y = arrays
    res = evaluate(model_path, npz, num_threads=1, batch_size=7)
    assert REQUIRED <= set(res)
    top1, exit_block, cost = _independent(model_path, x, y)
    assert res["images"] == 40
    assert res["top1"] == pytest.approx(top1)
    assert res["mean_exit_block"] == pytest.approx(exit_block.mean()) == 2.0  # no exits: the final head
    assert res["bops_per_image"] == pytest.approx(cost.mean())
    full = _fp32_graph_bops()
    assert res["fp32_full_depth_bops"] == full
    assert res["bops_ratio"] == pytest.approx(cost.mean() / full)
    assert 0 < res["bops_ratio"] < 1  # W8A8 blocks and int8 attention cost less than fp32
    assert res["ms_per_image"] > 0 and res["batch_size"] == 7 and res["threads"] == 1
    lo, hi = res["top1_ci95"]
    assert lo < res["top1"] < hi
    assert res["exit_histogram"] == {"2": 40}
    assert res["top1_per_exit"]["2"] == pytest.approx(top1)


def test_folder_of_other_sizes_is_resized_as_model_preprocess(model_path, folder):
    root, pixels, labels = folder
    m = pyruntime.load(model_path)
    data = read_dataset(root, m.preprocessing, num_classes=3)
    assert data.classes == ["ant", "bee", "cow"]
    np.testing.assert_array_equal(data.labels, labels)
    np.testing.assert_array_equal(data.batch(0, len(data)), m.preprocess(pixels))  # timm's resize, both ways
    res = evaluate(m, root, num_threads=1, batch_size=4)
    top1, exit_block, cost = _independent(model_path, pixels, labels)
    assert res["images"] == len(pixels)
    assert res["top1"] == pytest.approx(top1)
    assert res["bops_per_image"] == pytest.approx(cost.mean())


def test_results_do_not_depend_on_batch_or_how_data_is_passed(model_path, npz):
    m = pyruntime.load(model_path)
    data = read_dataset(npz, m.preprocessing, num_classes=3)
    a = evaluate(m, data, num_threads=1, batch_size=1)
    b = evaluate(model_path, npz, num_threads=2, batch_size=40)
    for k in ("top1", "mean_exit_block", "bops_per_image", "bops_ratio", "images", "exit_histogram"):
        assert a[k] == b[k], k
    assert (a["batch_size"], a["threads"], b["batch_size"], b["threads"]) == (1, 1, 40, 2)


def test_limit_draws_a_subset_by_seed(model_path, npz, arrays):
    x, y = arrays
    res = evaluate(model_path, npz, num_threads=1, limit=10, seed=5)
    pick = np.sort(np.random.default_rng(5).choice(40, 10, replace=False))
    top1, _, cost = _independent(model_path, x[pick], y[pick])
    assert res["images"] == 10
    assert res["top1"] == pytest.approx(top1)
    assert res["bops_per_image"] == pytest.approx(cost.mean())


def test_exits_lower_the_mean_exit_block_and_the_bops(d, arrays):
    x, y = arrays
    probe = _write(d / "probe.pyrt", _graph(exits=[{"block": 0, "rule": "confidence", "threshold": 1.0}]))
    m = pyruntime.load(probe)
    r = m.run(m.preprocess(x), collect_exits=True)
    conf = np.exp(r.exit_logits[0] - r.exit_logits[0].max(1, keepdims=True))
    conf = (conf / conf.sum(1, keepdims=True)).max(1)
    threshold = float(np.median(conf))  # about half the images leave after block 0
    path = _write(d / "exits.pyrt", _graph(exits=[{"block": 0, "rule": "confidence", "threshold": threshold}]))
    res = evaluate(path, _npz(d, x, y), num_threads=1, batch_size=8)
    top1, exit_block, cost = _independent(path, x, y)
    preds = _independent_preds(path, x)
    assert 0 < res["mean_exit_block"] < 2
    assert res["mean_exit_block"] == pytest.approx(exit_block.mean())
    assert res["exit_histogram"] == {str(b): int(c) for b, c in enumerate(np.bincount(exit_block)) if c}
    assert set(res["top1_per_exit"]) == {"0", "2"}
    for b, t in res["top1_per_exit"].items():
        left = exit_block == int(b)
        assert t == pytest.approx(float((preds[left] == y[left]).mean()))
    assert res["top1"] == pytest.approx(top1)
    assert res["bops_per_image"] == pytest.approx(cost.mean())
    full_depth = evaluate(probe, _npz(d, x, y), num_threads=1)  # same weights, nobody leaves
    assert res["bops_per_image"] < full_depth["bops_per_image"]
    assert res["fp32_full_depth_bops"] == full_depth["fp32_full_depth_bops"] == _fp32_graph_bops()


def _independent_preds(path, x):
    m = pyruntime.load(path, num_threads=1)
    return m.run(m.preprocess(x)).predictions


def _npz(d, x, y):
    p = d / "xy.npz"
    np.savez(p, images=x, labels=y)
    return p


def test_fp32_full_depth_ignores_policy_exits_and_attention(d):
    g = _graph(exits=[{"block": 1, "rule": "margin", "threshold": 0.1}])
    assert fp32_full_depth_bops(g) == _fp32_graph_bops() < bops.static(tiny_graph(
        exits=g["exits"], **ARCH))  # the fp32 graph with an exit head costs more


def test_wilson_interval():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0 and 0.2 < hi < 0.35  # 0.2775 for 0 of 10
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


def test_data_prepared_for_another_model_is_refused(model_path, npz):
    m = pyruntime.load(model_path)
    other = Preprocess(m.preprocessing.input_size, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(DataError, match="prepared with"):
        evaluate(m, read_dataset(npz, other))
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(m, npz, batch_size=0)


# --- the CLI ----------------------------------------------------------------------------------------

def cli(*argv):
    return subprocess.run([sys.executable, "-m", "pyruntime"] + [str(a) for a in argv], capture_output=True,
                          text=True, timeout=120)


def test_cli_prints_the_table_and_writes_the_json(model_path, npz, d):
    out = d / "eval.json"
    p = cli("eval", model_path, "--data", npz, "--json", out, "--threads", "1", "--batch", "5", "--no-progress")
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    assert REQUIRED <= set(res)
    ref = evaluate(model_path, npz, num_threads=1, batch_size=5)
    for k in ("top1", "mean_exit_block", "bops_per_image", "bops_ratio", "images", "top1_ci95"):
        assert res[k] == pytest.approx(ref[k]), k
    assert res["batch_size"] == 5 and res["threads"] == 1
    assert f"top-1:       {100 * ref['top1']:.2f}%" in p.stdout
    assert re.search(r"ms/image:\s+[0-9.]+ \(Model.run wall time, batch 5, 1 threads", p.stdout)
    assert f"= {ref['bops_ratio']:.4f} x fp32 full depth" in p.stdout
    assert "images:      40" in p.stdout


def test_cli_images_limits_the_count(model_path, npz):
    p = cli("eval", model_path, "--data", npz, "--images", "7", "--no-progress")
    assert p.returncode == 0, p.stderr
    assert "images:      7" in p.stdout


def _assert_one_line_error(p, *words):
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and len(lines) == 1, p.stderr
    assert lines[0].startswith("pyruntime eval: error: "), lines[0]
    for w in words:
        assert re.search(w, lines[0]), (w, lines[0])


@pytest.fixture(scope="module")
def bad(d, arrays):
    x, y = arrays
    b = d / "bad"
    (b / "empty").mkdir(parents=True)
    (b / "no_images" / "a").mkdir(parents=True)
    (b / "no_images" / "b").mkdir(parents=True)
    (b / "one_class" / "only").mkdir(parents=True)
    Image.fromarray(x[0]).save(b / "one_class" / "only" / "0.png")
    for name in ("a", "b"):
        (b / "corrupt" / name).mkdir(parents=True)
        Image.fromarray(x[1]).save(b / "corrupt" / name / "0.png")
    (b / "corrupt" / "b" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    for name in ("a", "b", "c", "d"):  # four classes for a three-class model
        (b / "four" / name).mkdir(parents=True)
        Image.fromarray(x[2]).save(b / "four" / name / "0.png")
    np.savez(b / "nolabels.npz", images=x)
    np.savez(b / "gray.npz", images=x[..., 0], labels=y)
    np.savez(b / "range.npz", images=x, labels=y + 5)
    np.savez(b / "float.npz", images=x.astype(np.float32), labels=y)
    (b / "notes.txt").write_text("not data")
    (b / "garbage.pyrt").write_bytes(b"\x01\x02\x03 not a model")
    return b


@pytest.mark.parametrize("data, words", [
    ("empty", ["no class sub-folders"]),
    ("no_images", ["no images"]),
    ("one_class", ["only one class"]),
    ("corrupt", [r"1\.png", "cannot read the image"]),
    ("four", [r"labels must lie in \[0, 3\)"]),
    ("nolabels.npz", ["'labels'", r"\['images'\]"]),
    ("gray.npz", ["1 channel", "the model takes 3"]),
    ("range.npz", [r"labels must lie in \[0, 3\)", r"\[5, 7\]"]),
    ("float.npz", ["must be uint8", "float32"]),
    ("notes.txt", ["--data", "expected an image folder"]),
    ("missing", ["--data", "no such file"]),
])
def test_bad_data_is_one_line(model_path, bad, data, words):
    _assert_one_line_error(cli("eval", model_path, "--data", bad / data, "--no-progress"), *words)


def test_colour_images_for_a_gray_model_is_one_line(gray_model_path, bad):
    _assert_one_line_error(cli("eval", gray_model_path, "--data", bad / "corrupt", "--no-progress"),
                           "RGB", "takes 1 channel")


@pytest.mark.parametrize("extra, words", [
    (["--batch", "0"], ["--batch", "positive integer"]),
    (["--threads", "0"], ["--threads", "positive integer"]),
    (["--threads", "100000"], ["--threads", "cap"]),
    (["--images", "-3"], ["--images", "positive integer"]),
    (["--seed", "x"], ["--seed", "integer"]),
    (["--json", "/no/such/dir/o.json"], ["does not exist"]),
])
def test_bad_options_are_one_line(model_path, npz, extra, words):
    _assert_one_line_error(cli("eval", model_path, "--data", npz, *extra), *words)


def test_bad_model_file_is_one_line(bad, npz, d):
    _assert_one_line_error(cli("eval", bad / "garbage.pyrt", "--data", npz), r"garbage\.pyrt")
    _assert_one_line_error(cli("eval", d, "--data", npz), "is a directory")
    _assert_one_line_error(cli("eval", bad / "nothing.pyrt", "--data", npz), "no such file")


# --- run: image files, folders and .npz --------------------------------------------------------------

def test_run_a_class_folder_prints_class_names_labels_and_top1(model_path, folder):
    root, pixels, labels = folder
    p = cli("run", model_path, root, "--threads", "1")
    assert p.returncode == 0, p.stderr
    preds = _independent_preds(model_path, pixels)
    names = ["ant", "bee", "cow"]
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("image ")]
    assert len(lines) == len(pixels)
    for i, ln in enumerate(lines):
        assert ln.startswith(f"image {i}: class {preds[i]} ({names[preds[i]]}) "), ln
        assert f"label {labels[i]} ({names[labels[i]]})" in ln
    correct = int((preds == labels).sum())
    assert f"top-1: {correct}/{len(labels)}" in p.stdout


def test_run_image_files_of_any_size(model_path, folder):
    root, pixels, _ = folder
    files = [root / "ant" / "1.png", root / "cow" / "4.png", root / "bee" / "3.png"]
    p = cli("run", model_path, *files, "--top-k", "2")
    assert p.returncode == 0, p.stderr
    preds = _independent_preds(model_path, [pixels[1], pixels[14], pixels[8]])
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("image ")]
    assert [ln.split(" class ")[0] for ln in lines] == ["image 0: 1.png", "image 1: 4.png", "image 2: 3.png"]
    assert [int(ln.split(" class ")[1].split()[0]) for ln in lines] == list(preds)
    assert "top-1" not in p.stdout  # no labels


def test_run_an_npz_names_its_classes(model_path, npz, arrays):
    x, y = arrays
    p = cli("run", model_path, npz)
    assert p.returncode == 0, p.stderr
    preds = _independent_preds(model_path, x)
    names = ["cat", "dog", "eel"]
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("image ")]
    assert all(f"class {preds[i]} ({names[preds[i]]})" in ln for i, ln in enumerate(lines))


def test_run_bad_inputs_are_one_line(model_path, npz, bad):
    p = cli("run", model_path, npz, npz)
    assert p.returncode == 2 and "must be the only input" in p.stderr
    p = cli("run", model_path, bad / "notes.txt")
    assert p.returncode == 2 and "expected a .npy file or a folder" in p.stderr
    p = cli("run", model_path, bad / "corrupt" / "b" / "1.png")
    assert p.returncode == 2 and "cannot read the image" in p.stderr and len(p.stderr.splitlines()) == 1


# --- a converted timm model against timm itself ----------------------------------------------------

def _timm_case(tmp_path, sizes):
    """A converted timm ViT, a PNG class folder of ``sizes``, and timm's own predictions for
    the files through its eval transform (fp32 torch)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("timm")
    from timm.data import create_transform, resolve_model_data_config
    from timm.models.vision_transformer import VisionTransformer

    from pyruntime.convert import convert

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=4,
                            reg_tokens=1).eval()
    with torch.no_grad():  # timm's small head init answers one class for every image
        vit.head.weight.normal_(0, 2.0)
    rng = np.random.default_rng(2)
    files, labels = [], []
    for label in range(4):
        (tmp_path / "data" / f"c{label}").mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            f = tmp_path / "data" / f"c{label}" / f"{i}.png"
            tint = rng.integers(0, 128, 3, dtype=np.uint8)  # images differ in more than noise
            Image.fromarray(tint + rng.integers(0, 128, (h, w, 3), dtype=np.uint8)).save(f)
            files.append(f)
            labels.append(label)
    cfg = dict(resolve_model_data_config(vit), input_size=(3, 32, 32))  # the model's real size, not the default 224
    transform = create_transform(**cfg, is_training=False)
    with torch.inference_mode():
        timm_preds = vit(torch.stack([transform(Image.open(f).convert("RGB")) for f in files])).argmax(1).numpy()
    assert len(set(timm_preds.tolist())) > 1  # else top-1 would not tell predictions apart
    # mean/std as timm's transform has them: for a bare module convert records 0.5 (see its _preprocess)
    fp32 = convert(vit, tmp_path / "fp32.pyrt", policy="fp32", preprocess={"mean": cfg["mean"], "std": cfg["std"]})
    return vit, fp32, timm_preds, np.array(labels)


@pytest.mark.torch
def test_converted_timm_model_against_timm_on_a_folder(tmp_path):
    """top-1 as timm computes it on the PNG files, and the BOPs ratio against the separately
    converted fp32 file."""
    from pyruntime.convert import convert

    vit, fp32, timm_preds, labels = _timm_case(tmp_path, [(45, 37), (20, 60), (33, 29)])
    w8 = convert(vit, tmp_path / "w8.pyrt", policy="w8a8-attn8")
    res32 = evaluate(fp32, tmp_path / "data", num_threads=1)
    res8 = evaluate(w8, tmp_path / "data", num_threads=1)
    assert res32["images"] == res8["images"] == len(labels)
    m = pyruntime.load(fp32)
    data = read_dataset(tmp_path / "data", m.preprocessing, num_classes=4)
    np.testing.assert_array_equal(m.run(data.batch(0, len(data))).predictions, timm_preds)
    assert res32["top1"] == float((timm_preds == labels).mean())
    assert res32["bops_ratio"] == 1.0 and res32["bops_per_image"] == bops.static(fp32)
    assert res8["fp32_full_depth_bops"] == bops.static(fp32)
    assert res8["bops_ratio"] == pytest.approx(res8["bops_per_image"] / bops.static(fp32)) and res8["bops_ratio"] < 0.2


@pytest.mark.torch
def test_files_at_the_input_size_are_used_as_they_are(tmp_path):
    """A deliberate difference from timm's eval transform (which would resize a 32x32 image to
    32 / crop_pct and crop it back): an image already at the model's input size is the user's
    own preparation and is only normalised."""
    _, fp32, _, _ = _timm_case(tmp_path, [(32, 32), (32, 32)])
    m = pyruntime.load(fp32)
    data = read_dataset(tmp_path / "data", m.preprocessing, num_classes=4)
    first = sorted((tmp_path / "data").rglob("*.png"))[0]
    np.testing.assert_array_equal(data.images[0], np.asarray(Image.open(first).convert("RGB")))
