"""pyruntime.exits: exit heads fitted on a user's frozen timm ViT and labelled images compute,
once converted, exactly the runtime's exit logits; they learn a learnable task; the CLI chain
``exits fit`` -> ``convert --exits`` works from an image folder and an .npz; bad input is one
line of error."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
pytest.importorskip("PIL")

from pyruntime import load  # noqa: E402
from pyruntime.cli import main  # noqa: E402
from pyruntime.convert import convert, create_timm_model  # noqa: E402
from pyruntime.exits import check_blocks, fit_exit_heads, pooled_block_features, save_exit_heads  # noqa: E402
from pyruntime.imagedata import Preprocess, read_dataset  # noqa: E402
from pyruntime.policy import ExitPolicy, Policy  # noqa: E402

pytestmark = pytest.mark.torch

NAME = "vit_tiny_patch16_224"
BASE = dict(img_size=32, patch_size=8, embed_dim=48, num_heads=2, depth=3, num_classes=3)
KWARGS = {
    "avg_no_cls": dict(BASE, global_pool="avg", class_token=False, fc_norm=True),
    "token": dict(BASE),
    "avg_cls_reg": dict(BASE, global_pool="avg", reg_tokens=2, no_embed_class=True),
}
BLOCKS = [0, 1]


def colour_images(n: int, size: int, seed: int):
    """uint8 [n, size, size, 3] whose class (0..2) is the channel that is brightest, with
    noise: learnable from pooled features, chance is 1/3."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    images = rng.integers(0, 120, (n, size, size, 3))
    images[np.arange(n), :, :, labels] += 100
    return images.clip(0, 255).astype(np.uint8), labels.astype(np.int64)


def write_folder(root, images, labels):
    from PIL import Image

    for i, (im, y) in enumerate(zip(images, labels)):
        d = root / f"class_{y}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(d / f"{i:03d}.png")
    return root


def saved_model(tmp_path, kwargs, seed=0, fmt="pth"):
    """A timm model with random weights, saved as a state dict (what a user's fine-tune gives)."""
    torch.manual_seed(seed)
    model = create_timm_model(NAME, kwargs)
    path = tmp_path / f"ckpt.{fmt}"
    if fmt == "pth":
        torch.save(model.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def exit_policy(blocks):
    return Policy(exits=[ExitPolicy(b, "confidence", 1.0) for b in blocks], name="exits")


@pytest.mark.parametrize("variant", sorted(KWARGS))
def test_fitted_heads_are_the_runtime_exits(tmp_path, variant):
    """(a) The torch heads on the pooled features give the runtime's exit logits (fp32)."""
    kwargs = KWARGS[variant]
    model, ckpt = saved_model(tmp_path, kwargs)
    images, labels = colour_images(60, 32, seed=1)
    data = read_dataset(_npz(tmp_path, images, labels), Preprocess.from_timm(model), num_classes=3)
    heads, report = fit_exit_heads(model, data, BLOCKS, epochs=3, show_progress=False)
    assert sorted(heads) == BLOCKS and report.epochs_run >= 1
    path = save_exit_heads(tmp_path / "heads.safetensors", heads, {"variant": variant})
    out = convert(NAME, tmp_path / "m.pyrt", checkpoint=ckpt, policy=exit_policy(BLOCKS), exits=path,
                  model_kwargs=kwargs)
    x = data.batch(0, 8)
    got = load(out).run(x, collect_exits=True).exit_logits
    with torch.no_grad():
        feats = pooled_block_features(model, torch.from_numpy(x), BLOCKS)
        for j, b in enumerate(BLOCKS):
            h = heads[b]
            z = torch.nn.functional.layer_norm(feats[b], (48,), torch.from_numpy(h["norm.weight"]),
                                               torch.from_numpy(h["norm.bias"]), eps=1e-6)
            want = (z @ torch.from_numpy(h["fc.weight"]).T + torch.from_numpy(h["fc.bias"])).numpy()
            np.testing.assert_allclose(got[j], want, rtol=1e-4, atol=1e-4)


def _npz(tmp_path, images, labels, name="data.npz"):
    path = tmp_path / name
    np.savez(path, images=images, labels=labels)
    return path


def test_heads_learn_and_report_held_out_top1(tmp_path):
    """(b) On a learnable task the held-out top-1 beats chance (1/3) clearly; the kept epoch
    is the best held-out one; the backbone is untouched and the caller's RNG is not consumed."""
    model = create_timm_model(NAME, KWARGS["avg_no_cls"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = colour_images(120, 32, seed=2)
    data = read_dataset(_npz(tmp_path, images, labels), Preprocess.from_timm(model), num_classes=3)
    rng_state = torch.get_rng_state()
    heads, report = fit_exit_heads(model, data, [1, 0], epochs=15, batch_size=32, holdout=0.25, seed=3,
                                   show_progress=False)
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert report.holdout_images == 30 and report.train_images == 90
    assert report.feature_bytes == 120 * 48 * 2 * 4
    for b in (0, 1):
        assert report.top1[b] >= 0.8, report.lines()
        losses = [h["loss"][b] for h in report.history]
        assert report.loss[b] == min(losses) and report.best_epoch[b] == 1 + losses.index(min(losses))
        assert heads[b]["fc.weight"].shape == (3, 48) and heads[b]["fc.weight"].dtype == np.float32
    again, report2 = fit_exit_heads(model, data, [0, 1], epochs=15, batch_size=32, holdout=0.25, seed=3,
                                    show_progress=False)
    assert report2.top1 == report.top1 and np.array_equal(again[0]["fc.weight"], heads[0]["fc.weight"])


def test_early_stopping_keeps_the_best_held_out_epoch(tmp_path):
    """Unlearnable (random) labels: the heads overfit, training stops ``patience`` epochs after
    the best held-out epoch, and the weights returned are that epoch's (their held-out
    cross-entropy, recomputed here, is the reported minimum)."""
    from pyruntime.exits import _split

    model = create_timm_model(NAME, KWARGS["token"])
    images, _ = colour_images(80, 32, seed=4)
    labels = np.random.default_rng(4).integers(0, 3, 80)
    data = read_dataset(_npz(tmp_path, images, labels), Preprocess.from_timm(model), num_classes=3)
    heads, report = fit_exit_heads(model, data, [0], epochs=300, holdout=0.3, lr=0.05, batch_size=16, patience=4,
                                   seed=1, show_progress=False)
    best = report.best_epoch[0]
    assert best < report.epochs_run == best + 4 < 300, report.lines()
    held = _split(data.labels, 0.3, 1)[1]
    with torch.no_grad():
        f = pooled_block_features(model, torch.from_numpy(data.batch(0, len(data))[held]), [0])[0]
        h = {k: torch.from_numpy(v) for k, v in heads[0].items()}
        z = torch.nn.functional.layer_norm(f, (48,), h["norm.weight"], h["norm.bias"], eps=1e-6)
        ce = torch.nn.functional.cross_entropy(z @ h["fc.weight"].T + h["fc.bias"], torch.from_numpy(labels[held]))
    assert float(ce) == pytest.approx(report.loss[0], rel=1e-5)
    assert report.loss[0] == min(e["loss"][0] for e in report.history)


def test_bad_arguments_are_named(tmp_path):
    model = create_timm_model(NAME, KWARGS["token"])
    images, labels = colour_images(12, 32, seed=0)
    data = read_dataset(_npz(tmp_path, images, labels), Preprocess.from_timm(model), num_classes=3)
    with pytest.raises(ValueError, match=r"out of range.*0\.\.1"):
        fit_exit_heads(model, data, [2], show_progress=False)
    with pytest.raises(ValueError, match="no exit blocks"):
        check_blocks([], 3)
    with pytest.raises(ValueError, match="cannot be split"):
        fit_exit_heads(model, data, [0], holdout=0.01, show_progress=False)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        fit_exit_heads(create_timm_model(NAME, dict(BASE, num_classes=2)), data, [0], show_progress=False)
    heads, _ = fit_exit_heads(model, data, [0], epochs=1, show_progress=False)
    src = _npz(tmp_path, images, labels, "same.npz")
    with pytest.raises(ValueError, match="refusing to write"):
        save_exit_heads(src, heads, inputs=[src])
    with pytest.raises(ValueError, match="exactly"):
        save_exit_heads(tmp_path / "h.safetensors", {0: {"norm.weight": heads[0]["norm.weight"]}})


# --- the command line -----------------------------------------------------------------------------

def cli(*argv):
    return subprocess.run([sys.executable, "-m", "pyruntime", *map(str, argv)], capture_output=True, text=True,
                          timeout=180)


def assert_one_line_error(out, *words):
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2, out.stderr + out.stdout
    assert "Traceback" not in out.stderr and len(lines) == 1, out.stderr
    assert re.match(r"pyruntime (exits fit|exits|convert): error: ", lines[0]), lines[0]
    for w in words:
        assert re.search(w, lines[0]), (w, lines[0])


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """A user's files: a checkpoint trained at img_size 32 (safetensors), an image folder of
    PNGs at another size (36 x 36: resized as timm's eval transform does) and an .npz."""
    root = tmp_path_factory.mktemp("user")
    _, ckpt = saved_model(root, KWARGS["avg_no_cls"], fmt="safetensors")
    images, labels = colour_images(90, 36, seed=5)
    folder = write_folder(root / "photos", images, labels)
    npz = _npz(root, *colour_images(90, 32, seed=6))
    return {"root": root, "ckpt": ckpt, "folder": folder, "npz": npz, "kwargs": json.dumps(KWARGS["avg_no_cls"])}


# Many bad inputs are run through pyruntime's main() in ONE subprocess (importing torch and timm
# takes seconds); each case's exit status and stderr are captured separately.
DRIVER = r"""
import contextlib, io, json, sys
from pyruntime.cli import main
results = []
for argv in json.loads(sys.stdin.read()):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    results.append({"returncode": rc, "stderr": err.getvalue(), "stdout": out.getvalue()})
print(json.dumps(results))
"""


def run_cases(cases):
    proc = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps([[str(a) for a in c] for c in cases]),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return [subprocess.CompletedProcess(c, r["returncode"], r["stdout"], r["stderr"])
            for c, r in zip(cases, json.loads(proc.stdout))]


@pytest.mark.parametrize("data", ["folder", "npz"])
def test_cli_fit_then_convert(user, data, tmp_path, capsys):
    """(c) exits fit -> convert --exits from a folder and from an .npz: the model file exits where
    asked, with the fitted heads. The .npz run uses img_size 48 with the checkpoint trained at
    32: both commands say the position embeddings were resampled."""
    kwargs = user["kwargs"] if data == "folder" else json.dumps(dict(KWARGS["avg_no_cls"], img_size=48))
    heads = tmp_path / "heads.safetensors"
    fit = cli("exits", "fit", NAME, "--checkpoint", user["ckpt"], "--model-kwargs", kwargs,
              "--data", user[data], "--blocks", "1,0", "--out", heads, "--epochs", "20", "--no-progress",
              "--threads", "2", *(["--images", "60"] if data == "folder" else []))
    assert fit.returncode == 0, fit.stderr
    held = 6 if data == "folder" else 9  # --images 60 of the folder's 90; 10% held out
    tops = re.findall(rf"exit after block (\d): held-out top-1 ([0-9.]+) \({held} images\)", fit.stdout)
    assert [b for b, _ in tops] == ["0", "1"], fit.stdout
    assert all(float(t) > 1 / 3 for _, t in tops), fit.stdout
    policy = tmp_path / "p.json"
    exit_policy([0, 1]).save(policy)
    out = tmp_path / "m.pyrt"
    # convert in this process (torch is imported already): the same main() as `python -m pyruntime`
    assert main(["convert", NAME, str(out), "--checkpoint", str(user["ckpt"]), "--model-kwargs", kwargs,
                 "--exits", str(heads), "--policy", str(policy)]) == 0
    conv = capsys.readouterr().out
    resampled = "note: pos_embed resampled from a 4x4 grid to 6x6"
    assert (resampled in fit.stdout) == (resampled in conv) == (data == "npz"), fit.stdout + conv
    from pyruntime.modelfile import read_model
    from safetensors.numpy import load_file

    graph, tensors = read_model(out)[:2]
    assert [e["block"] for e in graph["exits"]] == [0, 1]
    saved = load_file(str(heads))
    for k in ("exits.0.norm.weight", "exits.1.norm.bias"):
        np.testing.assert_array_equal(tensors[k], saved[k])
    images = np.load(user["npz"])["images"][:4]
    assert load(out).run(images, collect_exits=True).exit_logits.shape == (2, 4, 3)


# (options changed from a good command line: a value, True for a flag, None to drop it; words)
MAP_POOL = '{"num_classes": 3, "img_size": 32, "patch_size": 8, "embed_dim": 48, "num_heads": 2, "depth": 3, ' \
           '"global_pool": "map"}'
FIT_ERRORS = [
    ({"--model-kwargs": "{num_classes: 3}"}, [r"--model-kwargs", "not valid JSON"]),
    ({"--model-kwargs": "[1]"}, [r"--model-kwargs", "JSON object"]),
    ({"MODEL": "vit_nonexistent_model"}, ["unknown timm model name 'vit_nonexistent_model'"]),
    ({"--blocks": "0,2"}, [r"exit blocks \[2\] are out of range", r"0\.\.1"]),
    ({"--blocks": "x"}, ["--blocks", "comma-separated"]),
    ({"--checkpoint": None}, ["no checkpoint for", "--random-weights"]),
    ({"--random-weights": True}, ["exclude each other"]),
    ({"--data": "{root}/missing"}, ["no such folder or file"]),
    ({"--data": "{ckpt}"}, ["image folder .* or an .npz"]),
    ({"--data": "{root}/bad.npz"}, [r"labels must lie in \[0, 3\)"]),
    ({"--checkpoint": None, "--random-weights": True, "--model-kwargs": MAP_POOL}, ["'map' \\(an attention-pooling head, SigLIP's MAP\\)", "not supported"]),
    ({"--model-kwargs": '{"pretrained": true}'}, ["may not set 'pretrained'"]),
    ({"--out": "{ckpt}"}, ["refusing to write", "it is the input"]),
    ({"--holdout": "1.5"}, ["--holdout", "strictly between 0 and 1"]),
    ({"MODEL": "reference"}, ["reference model takes neither"]),
]


def test_cli_errors_are_one_line(user, tmp_path):
    """(d) Every bad input to exits fit is one line naming it, exit status 2."""
    root = user["root"]
    np.savez(root / "bad.npz", images=np.zeros((4, 32, 32, 3), np.uint8), labels=np.array([0, 1, 2, 7]))
    cases = []
    for change, _ in FIT_ERRORS:
        opts = {"MODEL": NAME, "--checkpoint": str(user["ckpt"]), "--model-kwargs": user["kwargs"],
                "--data": str(user["npz"]), "--blocks": "0", "--out": str(tmp_path / "h.safetensors")}
        opts.update({k: v.replace("{root}", str(root)).replace("{ckpt}", str(user["ckpt"])) if isinstance(v, str)
                     else v for k, v in change.items()})
        argv = ["exits", "fit", opts.pop("MODEL"), "--no-progress", "--epochs", "1"]
        for k, v in opts.items():
            argv += [] if v is None else [k] if v is True else [k, v]
        cases.append(argv)
    for (_, words), out in zip(FIT_ERRORS, run_cases(cases)):
        assert_one_line_error(out, *words)
    assert not (tmp_path / "h.safetensors").exists()


def test_cli_convert_options(user, tmp_path):
    """convert takes --model-kwargs and --random-weights; their misuse is one line."""
    m = tmp_path / "m.pyrt"
    errors = [
        (["convert", NAME, m, "--model-kwargs", user["kwargs"]], ["no checkpoint for", "--random-weights"]),
        (["convert", NAME, m, "--model-kwargs", "{bad"], ["not valid JSON"]),
        (["convert", "reference", m, "--model-kwargs", "{}"], ["reference model takes neither"]),
        (["convert", "reference", m, "--random-weights"], ["reference model takes neither"]),
        (["convert", NAME, m, "--checkpoint", user["ckpt"], "--random-weights", "--model-kwargs", user["kwargs"]],
         ["exclude each other"]),
    ]
    *bad, ok = run_cases([argv for argv, _ in errors] + [
        ["convert", NAME, m, "--random-weights", "--model-kwargs", user["kwargs"]]])
    for (_, words), out in zip(errors, bad):
        assert_one_line_error(out, *words)
    assert ok.returncode == 0 and "note: vit_tiny_patch16_224: random weights" in ok.stdout, ok.stderr
    assert load(m).graph["arch"]["global_pool"] == "avg"


def test_cli_fit_reference(tmp_path, capsys):
    """MODEL 'reference': the shipped model with its own normalisation; gray 28 x 28 images."""
    from pyruntime import reference

    if not reference.reference_path().is_file():
        pytest.skip("reference model not trained")
    rng = np.random.default_rng(0)
    npz = _npz(tmp_path, rng.integers(0, 256, (40, 28, 28), dtype=np.uint8), np.arange(40) % 10)
    heads = tmp_path / "ref_heads.safetensors"
    assert main(["exits", "fit", "reference", "--data", str(npz), "--blocks", "3", "--out", str(heads),
                 "--epochs", "1", "--no-progress"]) == 0
    assert "exit after block 3: held-out top-1" in capsys.readouterr().out
    from safetensors import safe_open

    with safe_open(str(heads), "np") as f:
        assert sorted(f.keys()) == [f"exits.3.{k}" for k in ("fc.bias", "fc.weight", "norm.bias", "norm.weight")]
        meta = f.metadata()
    assert meta["format"] == "pyruntime-exit-heads-v1" and json.loads(meta["blocks"]) == [3]
    assert main(["exits", "fit", "reference", "--data", str(npz), "--blocks", "11", "--out", str(heads)]) == 2
    assert "exit blocks [11] are out of range" in capsys.readouterr().err
