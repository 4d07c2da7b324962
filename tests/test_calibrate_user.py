"""``pyruntime calibrate`` on a user's own timm ViT and data: a small RGB model without a
class token (global average pooling, fc_norm), 32 x 32 input, patch 8, depth 4, 3 classes,
trained for a few steps on a learnable synthetic task with exit heads written in the
``exits.<b>.*`` safetensors format; calibration images as a PNG class-folder tree and as an
``.npz``. Every method runs through the CLI (a subprocess); the policies convert with the
same model, heads and preprocessing and do on the validation images exactly what calibration
reported; MAQEE keeps its promise on images calibration never saw; bad data is a one-line
error."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("scipy.optimize")
pytest.importorskip("PIL")

import pyruntime  # noqa: E402
from pyruntime import bops  # noqa: E402
from pyruntime.calibrate.cli import main  # noqa: E402
from pyruntime.convert import convert  # noqa: E402
from pyruntime.calibrate.uniform import uniform_policy  # noqa: E402
from pyruntime.policy import Policy  # noqa: E402

pytestmark = pytest.mark.torch

NAME = "vit_tiny_patch16_224"
KWARGS = {"img_size": 32, "patch_size": 8, "in_chans": 3, "num_classes": 3, "embed_dim": 32, "depth": 4,
          "num_heads": 2, "mlp_ratio": 2.0, "class_token": False, "global_pool": "avg", "fc_norm": True}
EXITS = [0, 1, 2]
CLASSES = ["apple", "berry", "cherry"]


def synthetic(n: int, seed: int):
    """uint8 [n, 32, 32, 3] images and labels: class c brightens channel c by a random
    strength, on noise -- weak strengths are hard, strong ones easy (so early exits pay)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    strength = rng.uniform(0.0, 1.0, n)
    x = 110 + 60 * rng.standard_normal((n, 32, 32, 3))
    x[np.arange(n), :, :, y] += 12 * strength[:, None, None]
    return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)


def _pooled(model, x):
    """Every block's mean patch token (the exit heads' input) and the final logits."""
    h = model.patch_embed(x)
    h = model._pos_embed(h)
    pooled = []
    for blk in model.blocks:
        h = blk(h)
        pooled.append(h.mean(1))
    return pooled, model.forward_head(model.norm(h))


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """(root, checkpoint, heads file, folder, calibration npz, unseen test npz, kwargs JSON)."""
    import timm
    from PIL import Image
    from safetensors.torch import save_file

    from pyruntime.imagedata import Preprocess

    root = tmp_path_factory.mktemp("user")
    torch.manual_seed(0)
    model = timm.create_model(NAME, pretrained=False, **KWARGS)
    heads = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.LayerNorm(32, eps=1e-6), torch.nn.Linear(32, 3))
                                for _ in EXITS)
    pre = Preprocess.from_timm(model)
    x_u8, y = synthetic(1024, 10)
    x, yt = torch.from_numpy(pre.normalize(x_u8)), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    head_opt = torch.optim.Adam(heads.parameters(), lr=2e-3)
    model.train()
    for step in range(60):
        idx = torch.from_numpy(np.random.default_rng(step).choice(len(x), 64, replace=False))
        pooled, logits = _pooled(model, x[idx])
        loss = torch.nn.functional.cross_entropy(logits, yt[idx])
        if step >= 50:  # heads fitted briefly on the frozen features: weaker than the final head, so exits cost
            for b, head in zip(EXITS, heads):
                loss = loss + torch.nn.functional.cross_entropy(head(pooled[b].detach()), yt[idx])
        opt.zero_grad()
        head_opt.zero_grad()
        loss.backward()
        opt.step()
        head_opt.step()
    model.eval()
    ckpt = root / "model.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    exit_tensors = {}
    for b, head in zip(EXITS, heads):
        for dst, mod in (("norm", head[0]), ("fc", head[1])):
            for p in ("weight", "bias"):
                exit_tensors[f"exits.{b}.{dst}.{p}"] = getattr(mod, p).detach().contiguous()
    heads_file = root / "heads.safetensors"
    save_file(exit_tensors, str(heads_file))

    cal_x, cal_y = synthetic(240, 1)
    folder = root / "images"
    for i, (img, label) in enumerate(zip(cal_x, cal_y)):
        d = folder / CLASSES[label]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:04d}.png")
    cal_npz = root / "cal.npz"
    np.savez(cal_npz, images=cal_x, labels=cal_y)
    test_npz = root / "test.npz"
    np.savez(test_npz, *(), **dict(zip(("images", "labels"), synthetic(800, 2))))
    return {"root": root, "ckpt": ckpt, "heads": heads_file, "folder": folder, "npz": cal_npz, "test": test_npz,
            "kwargs": json.dumps(KWARGS)}


def calibrate_cli(user, *args, data="npz"):
    """``pyruntime calibrate`` in a subprocess on the user's model (PYTHONPATH inherited)."""
    cmd = [sys.executable, "-m", "pyruntime", "calibrate", "--model", NAME, "--model-kwargs", user["kwargs"],
           "--checkpoint", str(user["ckpt"]), "--data", str(user[data]), "--no-progress", "--threads", "2", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    return out.stdout


def converted(user, policy, tmp_path, name="m.pyrt"):
    path = convert(NAME, tmp_path / name, checkpoint=user["ckpt"], model_kwargs=KWARGS, exits=user["heads"],
                   policy=policy)
    return pyruntime.load(path)


def npz(path):
    with np.load(path) as z:
        return z["images"], z["labels"]


def folder_order(user):
    """The folder's images and labels in read order (classes by name, files sorted)."""
    from PIL import Image

    files = [(f, c) for c, name in enumerate(CLASSES) for f in sorted((user["folder"] / name).iterdir())]
    return np.stack([np.asarray(Image.open(f)) for f, _ in files]), np.array([c for _, c in files])


# --- methods through the CLI ------------------------------------------------------------------------

def test_uniform_and_lampq_on_a_folder(user, tmp_path):
    u = tmp_path / "u.json"
    calibrate_cli(user, "--method", "uniform", "--out", str(u), data="folder")
    policy = Policy.load(u)
    assert policy.meta["calibration"]["dataset"] == str(user["folder"])
    assert policy.meta["calibration"]["images"] == 240 and policy.meta["calibration"]["classes"] == 3
    m = converted(user, u, tmp_path, "u.pyrt")
    assert {lp["w_bits"] for n, lp in m.graph["layers"].items() if n.startswith("blocks.")} == {8}

    lq = tmp_path / "l.json"
    # the patch embedding and head of so small a model weigh a lot: allocate them too
    text = calibrate_cli(user, "--method", "lampq", "--scope", "all", "--budget-bops", "0.9x", "--rounds", "1",
                         "--images", "120", "--out", str(lq), data="folder")
    policy = Policy.load(lq)
    assert policy.meta["calibration"]["images"] == 120 and "wrote" in text
    m = converted(user, lq, tmp_path, "l.pyrt")
    w8 = converted(user, uniform_policy(8, 8, scope="all"), tmp_path, "w8.pyrt")
    assert bops.static(m.graph) <= 0.9 * bops.static(w8.graph)
    assert {lp["w_bits"] for lp in m.graph["layers"].values()} == {4, 8}
    # calibration prepared the images as the file does: the converted fp32 model gets them right
    x, y = folder_order(user)
    assert (converted(user, "fp32", tmp_path, "f.pyrt").run(x).logits.argmax(-1) == y).mean() > 0.7


def test_maqee_chooses_on_validation_and_keeps_its_promise_on_unseen_images(user, tmp_path):
    p, routes = tmp_path / "maqee.json", tmp_path / "routes.json"
    text = calibrate_cli(user, "--method", "maqee", "--exits", str(user["heads"]), "--budget-bops", "0.9x",
                         "--max-drop", "10", "--rounds", "2", "--out", str(p), "--report", "--report-json", str(routes))
    policy = Policy.load(p)
    meta = policy.meta
    assert meta["chosen_on"] == "validation" and (meta["fit_images"], meta["validation_images"]) == (180, 60)
    assert "routes of the 60 images" in text and "validation" in text
    m = converted(user, p, tmp_path)
    assert [e.block for e in policy.exits] == EXITS
    # what calibration reported for each validation image is what the converted model does
    rows = json.loads(routes.read_text())["images"]
    assert len(rows) == 60 and json.loads(routes.read_text())["chosen_on"] == "validation"
    x, y = npz(user["npz"])
    idx = np.array([r["index"] for r in rows])
    r = m.run(x[idx])
    assert [row["exit_block"] for row in rows] == r.exit_block.tolist()
    assert [row["prediction"] for row in rows] == r.logits.argmax(-1).tolist()
    assert [row["label"] for row in rows] == y[idx].tolist()
    assert np.mean(r.bops) == pytest.approx(meta["expected_cost_validation"], rel=1e-9)
    assert meta["expected_cost_validation"] <= meta["budget"]
    # the promise on 800 images calibration never saw, and the exits are used
    tx, ty = npz(user["test"])
    fp32 = converted(user, "fp32", tmp_path, "fp32.pyrt").run(tx)
    r = m.run(tx)
    drop = (fp32.logits.argmax(-1) == ty).mean() - (r.logits.argmax(-1) == ty).mean()
    assert drop <= 0.03
    assert (r.exit_block < 3).mean() > 0.2


@pytest.mark.parametrize("target", [("--max-drop", "2"), ("--budget-bops", "0.9x")])
def test_quee_finds_lambda_on_validation(user, tmp_path, target):
    p, routes = tmp_path / "quee.json", tmp_path / "routes.json"
    text = calibrate_cli(user, "--method", "quee", "--exits", str(user["heads"]), "--every", "1", *target,
                         "--out", str(p), "--report", "--report-json", str(routes), data="folder")
    policy = Policy.load(p)
    meta = policy.meta
    assert meta["chosen_on"] == "validation" and (meta["fit_images"], meta["validation_images"]) == (180, 60)
    search = meta["lambda_search"]
    assert policy.gates.lam == search["lambda"] and len(search["candidates"]) > 3
    assert "gate  reached" in text and "chosen on the 60 validation images" in text
    m = converted(user, p, tmp_path)
    rows = json.loads(routes.read_text())["images"]
    x, y = folder_order(user)
    idx = np.array([r["index"] for r in rows])
    r = m.run(x[idx])
    assert [row["exit_block"] for row in rows] == r.exit_block.tolist()
    assert [row["path"] for row in rows] == ["".join("-FR"[v] for v in bp if v) for bp in r.block_path]
    top1 = float((r.logits.argmax(-1) == y[idx]).mean())
    assert top1 == pytest.approx(search["top1"], abs=1e-12)
    assert float(r.bops.mean()) == pytest.approx(search["mean_bops"], rel=1e-9)
    if target[0] == "--max-drop":
        assert search["fp32_top1"] - top1 <= 0.02 + 1e-12
        # the cheapest within the drop: no cheaper candidate meets it
        ok = [c for c in search["candidates"] if search["fp32_top1"] - c["top1"] <= 0.02 + 1e-12]
        assert search["mean_bops"] == min(c["mean_bops"] for c in ok)
    else:
        budget = 0.9 * bops.static(converted(user, "w8a8", tmp_path, "w8.pyrt").graph)
        assert meta["budget_bops"] == pytest.approx(budget, rel=1e-12) and r.bops.mean() <= budget
        ok = [c for c in search["candidates"] if c["mean_bops"] <= budget]
        assert search["top1"] == max(c["top1"] for c in ok)
        # this operating point uses every path, so the per-image rows were checked on all three
        assert {row["exit_block"] for row in rows} >= {0, 3} and any("R" in row["path"] for row in rows)


# --- errors ------------------------------------------------------------------------------------------

def one_line_error(capsys, argv, *words):
    assert main(["calibrate", *argv]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and ": error: " in err[0], err
    for w in words:
        assert w in err[0], (w, err[0])


def base_argv(user, data, tmp_path, method="uniform"):
    return ["--method", method, "--model", NAME, "--model-kwargs", user["kwargs"], "--checkpoint", str(user["ckpt"]),
            "--data", str(data), "--out", str(tmp_path / "p.json"), "--no-progress"]


def test_bad_data_is_a_one_line_error(user, tmp_path, capsys):
    from PIL import Image

    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    (empty / "b").mkdir()
    one = tmp_path / "one"
    (one / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(one / "a" / "x.png")
    corrupt = tmp_path / "corrupt"
    for c in "ab":
        (corrupt / c).mkdir(parents=True)
        Image.fromarray(np.full((32, 32, 3), 9, np.uint8)).save(corrupt / c / "ok.png")
    (corrupt / "b" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    x, y = npz(user["npz"])
    gray = tmp_path / "gray.npz"
    np.savez(gray, images=x[..., 0], labels=y)
    out_of_range = tmp_path / "range.npz"
    np.savez(out_of_range, images=x, labels=y + 5)
    unlabelled = tmp_path / "nolabels.npz"
    np.savez(unlabelled, images=x)
    for data, words in ((empty, ["no images"]), (one, ["only one class"]), (corrupt, ["bad.png", "cannot read"]),
                        (gray, ["1 channel", "takes 3"]), (out_of_range, ["labels must lie in [0, 3)"]),
                        (unlabelled, ["'labels'"]), (tmp_path / "nowhere", ["no such folder or file"])):
        one_line_error(capsys, base_argv(user, data, tmp_path), *words)


def test_missing_heads_and_model_options_are_one_line_errors(user, tmp_path, capsys):
    # the checkpoint has no exits.* keys and no --exits: maqee/quee say how to get heads
    one_line_error(capsys, base_argv(user, user["npz"], tmp_path, "maqee") + ["--budget-bops", "0.9x"],
                   "maqee needs exit heads", "pyruntime exits fit")
    one_line_error(capsys, base_argv(user, user["npz"], tmp_path, "quee") + ["--max-drop", "1"],
                   "quee needs exit heads", "pyruntime exits fit")
    # a hand-set lambda and a searched one exclude each other
    one_line_error(capsys, base_argv(user, user["npz"], tmp_path, "quee") + ["--exits", str(user["heads"]), "--lam",
                                                                              "0.1", "--max-drop", "1"], "--lam")
    one_line_error(capsys, ["--method", "uniform", "--model", NAME, "--model-kwargs", user["kwargs"],
                            "--checkpoint", str(user["ckpt"]), "--out", str(tmp_path / "p.json")], "needs --data")
    one_line_error(capsys, ["--method", "uniform", "--model", NAME, "--model-kwargs", user["kwargs"],
                            "--data", str(user["npz"]), "--out", str(tmp_path / "p.json")], "--random-weights")
    one_line_error(capsys, base_argv(user, user["npz"], tmp_path, "quee")[:-3] + [
        "--exits", str(user["heads"]), "--budget-bytes", "0.5x", "--out", str(tmp_path / "p.json")], "--budget-bops")


# --- the lazy image view -------------------------------------------------------------------------------

def test_images_stay_uint8_and_are_normalised_per_slice():
    from pyruntime.calibrate.common import CalibrationData, NormalisedImages
    from pyruntime.imagedata import Preprocess

    raw = np.random.default_rng(0).integers(0, 256, (10, 5, 6, 3), dtype=np.uint8)
    pre = Preprocess((3, 5, 6), (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    view = NormalisedImages(raw, pre.mean, pre.std)
    full = pre.normalize(raw)
    assert view.shape == (10, 3, 5, 6) and len(view) == 10 and view.dtype == np.float32
    assert np.array_equal(view[2:5], full[2:5]) and np.array_equal(view[[4, 1]], full[[4, 1]])
    assert np.array_equal(view[3], full[3]) and np.array_equal(np.asarray(view), full)
    data = CalibrationData(view, np.arange(10) % 3, {"dataset": "x"})
    fit, held = data.split(0.3, seed=1)
    rows_fit, rows_held = data.split_rows(0.3, seed=1)
    assert isinstance(fit.images, NormalisedImages) and fit.images.raw is raw  # no copy of the images
    assert np.array_equal(held.images[:], full[rows_held]) and np.array_equal(fit.images[1:4], full[rows_fit[1:4]])
    assert held.summary["part"] == "held-out" and len(fit) + len(held) == 10


def test_random_weights_are_asked_for_and_said(user, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["calibrate", "--method", "uniform", "--model", NAME, "--model-kwargs", user["kwargs"],
                 "--random-weights", "--data", str(user["npz"]), "--images", "16", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "note: vit_tiny_patch16_224: random weights" in text and f"wrote {out}" in text
    assert Policy.load(out).meta["calibration"]["images"] == 16


# --- the whole command line, as a user runs it --------------------------------------------------------

@pytest.mark.parametrize("data", ["folder", "npz"])
def test_the_whole_cli_chain(user, tmp_path, data):
    """exits fit -> calibrate -> convert -> eval, each a ``pyruntime`` subprocess, on folder and
    .npz data; eval's numbers are the converted model's own on images calibration never saw."""
    def cli(*args):
        cmd = [sys.executable, "-m", "pyruntime", *map(str, args)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ))
        assert out.returncode == 0, (args[0], out.stderr)
        return out.stdout

    model = ["--checkpoint", user["ckpt"], "--model-kwargs", user["kwargs"]]
    heads, policy, out, report = (tmp_path / n for n in ("heads.safetensors", "p.json", "m.pyrt", "eval.json"))
    fit = cli("exits", "fit", NAME, *model, "--data", user[data], "--blocks", "0,2", "--out", heads, "--epochs", "5",
              "--no-progress")
    assert "exit after block 0: held-out top-1" in fit and "exit after block 2" in fit
    cli("calibrate", "--method", "maqee", "--model", NAME, *model, "--exits", heads, "--exit-blocks", "0,2",
        "--data", user[data], "--budget-bops", "1x", "--max-drop", "5", "--out", policy, "--no-progress")
    assert Policy.load(policy).meta["chosen_on"] == "validation"
    cli("convert", NAME, out, *model, "--exits", heads, "--policy", policy)
    cli("eval", out, "--data", user["test"], "--json", report, "--threads", "2", "--no-progress")
    res = json.loads(report.read_text())
    assert {"top1", "mean_exit_block", "bops_per_image", "bops_ratio", "ms_per_image", "images"} <= set(res)
    x, y = npz(user["test"])
    r = pyruntime.load(out).run(x)
    assert res["images"] == len(y) and res["top1"] == pytest.approx(float((r.predictions == y).mean()))
    assert res["mean_exit_block"] == pytest.approx(float(r.exit_block.mean()))
    assert res["bops_per_image"] == pytest.approx(float(r.bops.mean())) and 0 < res["bops_ratio"] < 1
