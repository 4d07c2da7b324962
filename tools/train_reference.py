#!/usr/bin/env python3
"""Train the shipped reference model: a small timm ViT on Fashion-MNIST, plus
an early-exit head after every block.

    python tools/train_reference.py                 # full run -> pyruntime/data/reference/
                                                    # (45 epochs, about 4.5 h on 2 cores; resumable)
    python tools/train_reference.py --tiny --out D  # seconds-long smoke run (tests)

Stage 1 trains the backbone (AdamW, cosine schedule with linear warmup, label
smoothing, random crop with padding 2 + horizontal flip on tensors).  The full
run's schedule has one warm restart: a cosine over the first 30 epochs, then,
from epoch 31, the cosine stretched to all 45 (the learning rate jumps back to
about a quarter of its peak).  That is how the shipped model was trained: the
30-epoch model stopped at 90.84% held-out, still underfitting (train accuracy
equal to held-out), and training on was decided on held-out accuracy alone.  The
weights are then rounded to fp16 (what is shipped); stage 2 fits one
LayerNorm + Linear exit head per block except the last (whose exit is the
model's own norm + head) on the frozen rounded backbone with
``pyruntime.exits.fit_exit_heads`` -- the code ``pyruntime exits fit`` runs:
class-token features cached once (no augmentation), 10% of the training images
held out, each head keeping its epoch of lowest held-out cross-entropy.  Every exit is evaluated on the test images
using the fp16-rounded weights cast back to fp32, i.e. the shipped file.

Outputs (in --out): fmnist_vit.safetensors, card.md, card.json, train_log.txt,
all written atomically (temporary file + os.replace).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

# libgomp's default spin-waiting makes a 2-thread torch process burn ~8x the CPU
# per step when the cores are shared with other jobs (measured: 4.7 vs 0.57
# CPU-s per step at load 10 on 2 cores).  Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def _load_pkg_module(name: str):
    """Import pyruntime.<name> without needing the compiled extension.

    Tries the regular package first; if the package (its __init__, the
    extension) cannot be imported, loads the module straight from its file.
    """
    try:
        return importlib.import_module(f"pyruntime.{name}")
    except Exception:
        key = f"_pyruntime_{name}"
        if key in sys.modules:
            return sys.modules[key]
        spec = importlib.util.spec_from_file_location(key, REPO / "pyruntime" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
        return mod


datasets = _load_pkg_module("datasets")
reference = _load_pkg_module("reference")
exits = _load_pkg_module("exits")
imagedata = _load_pkg_module("imagedata")

HEADS_BATCH = 256
HEADS_HOLDOUT = 0.1


# --------------------------------------------------------------------------- io
def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


class Log:
    """Per-epoch log, echoed to stdout and rewritten atomically after each line.  A resumed
    run keeps the lines already there, so the log covers every epoch of the model."""

    def __init__(self, path: Path, keep: bool = False):
        self.path = path
        self.lines: list[str] = path.read_text().splitlines() if keep and path.is_file() else []

    def __call__(self, msg: str) -> None:
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
        self.lines.append(line)
        print(line, flush=True)
        atomic_write_text(self.path, "\n".join(self.lines) + "\n")


# ------------------------------------------------------------------------ args
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="output directory (default: pyruntime/data/reference)")
    p.add_argument("--tiny", action="store_true", help="tiny smoke run (width 32, depth 4, subset); needs --out")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--first-cycle-epochs", type=int, default=None,
                   help="warm restart: the first N epochs follow a cosine over N epochs, the rest the cosine "
                        "over --epochs (full run: 30; 0 = one cosine over --epochs)")
    p.add_argument("--embed-dim", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--num-heads", type=int, default=None, help="default: embed_dim // 32 (at least 1)")
    p.add_argument("--patch-size", type=int, default=None, help="full run: 4 (49 patches); --tiny: 7")
    p.add_argument("--mlp-ratio", type=float, default=4.0)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=None)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--drop-path", type=float, default=0.0)
    p.add_argument("--random-erasing", type=float, default=0.0, help="probability of light random erasing")
    p.add_argument("--head-epochs", type=int, default=None, help="epochs for the exit heads on cached features")
    p.add_argument("--holdout", type=int, default=None,
                   help="keep the last N training images out of all training (backbone and exit heads) for "
                        "calibration and validation; the per-epoch accuracy is measured on them, never on the "
                        "test images (default: 10000; 0 trains on every image)")
    p.add_argument("--train-subset", type=int, default=None, help="use the first N training images")
    p.add_argument("--test-subset", type=int, default=None, help="evaluate on the first N test images")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt", type=Path, default=None,
                   help="per-epoch training checkpoint for --resume (default: <out>/.train_ckpt.pt, removed at the end)")
    p.add_argument("--resume", action="store_true", help="resume backbone training from --ckpt")
    p.add_argument("--no-progress", action="store_true", help="disable the tqdm bar")
    a = p.parse_args(argv)

    if a.tiny:
        if a.out is None:
            p.error("--tiny needs --out DIR (it must not overwrite the shipped model)")
        defaults = dict(epochs=3, embed_dim=32, depth=4, patch_size=7, batch_size=64,
                        lr=2e-3, warmup_epochs=0.2, head_epochs=3, train_subset=6000, test_subset=1000)
    else:
        defaults = dict(epochs=45, embed_dim=128, depth=12, patch_size=4, batch_size=128,
                        lr=1e-3, warmup_epochs=1.0, head_epochs=10, train_subset=None, test_subset=None)
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.num_heads is None:
        a.num_heads = max(1, a.embed_dim // 32) if not a.tiny else 2
    if a.embed_dim % a.num_heads:
        p.error("--embed-dim must be divisible by --num-heads")
    if a.patch_size < 1 or 28 % a.patch_size:
        p.error("--patch-size must divide 28")
    if a.epochs < 1:
        p.error("--epochs must be >= 1")
    if a.first_cycle_epochs is None:
        # the shipped recipe's restart, only where it fits (an explicit --epochs 10 gets one cosine)
        a.first_cycle_epochs = 30 if not a.tiny and a.epochs > 30 else 0
    if not 0 <= a.first_cycle_epochs < a.epochs:
        p.error(f"--first-cycle-epochs must be in [0, --epochs) (got {a.first_cycle_epochs}, epochs {a.epochs})")
    if a.holdout is None:
        a.holdout = 0 if a.tiny else reference.HOLDOUT_IMAGES
    if a.holdout < 0:
        p.error("--holdout must be >= 0")
    if a.out is None:
        a.out = reference.reference_dir()
    if a.ckpt is None:
        a.ckpt = a.out / ".train_ckpt.pt"
    return a


# ------------------------------------------------------------------ training
def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
    except Exception:  # pragma: no cover
        pass


def augment(x_u8, gen, pad: int = 2, erase_p: float = 0.0):
    """Random crop (zero padding ``pad``) + horizontal flip (+ optional light
    random erasing) on a uint8 batch ``[B, 28, 28]``; returns uint8."""
    import torch
    import torch.nn.functional as F

    B, H, W = x_u8.shape
    padded = F.pad(x_u8, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (B,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (B,), generator=gen)
    rows = (dy[:, None] + torch.arange(H))[:, :, None]
    cols = (dx[:, None] + torch.arange(W))[:, None, :]
    out = padded[torch.arange(B)[:, None, None], rows, cols]
    flip = torch.rand(B, generator=gen) < 0.5
    out = torch.where(flip[:, None, None], out.flip(-1), out)
    if erase_p > 0:
        # one rectangle of 4..10 x 4..10 pixels set to 0 with probability erase_p
        do = torch.rand(B, generator=gen) < erase_p
        eh = torch.randint(4, 11, (B,), generator=gen)
        ew = torch.randint(4, 11, (B,), generator=gen)
        ey = (torch.rand(B, generator=gen) * (H - eh + 1)).long()
        ex = (torch.rand(B, generator=gen) * (W - ew + 1)).long()
        r = torch.arange(H)[None, :, None]
        c = torch.arange(W)[None, None, :]
        m = ((r >= ey[:, None, None]) & (r < (ey + eh)[:, None, None])
             & (c >= ex[:, None, None]) & (c < (ex + ew)[:, None, None]) & do[:, None, None])
        out = out.masked_fill(m, 0)
    return out


def to_input(x_u8, mean: float, std: float):
    return x_u8.float().div_(255.0).sub_(mean).div_(std).unsqueeze(1)


def cosine_steps(epoch: int, epochs: int, first_cycle_epochs: int, steps_per_epoch: int) -> int:
    """The length of the cosine that ``epoch`` (0-based) follows: the first cycle's, then the whole run's."""
    if first_cycle_epochs and epoch < first_cycle_epochs:
        return first_cycle_epochs * steps_per_epoch
    return epochs * steps_per_epoch


def lr_at(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * min(1.0, t)))


def evaluate_final(model, x_u8, y, mean, std, batch_size=500):
    import torch

    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(x_u8), batch_size):
            logits = model(to_input(x_u8[i:i + batch_size], mean, std))
            correct += int((logits.argmax(-1) == y[i:i + batch_size]).sum())
    return correct / len(x_u8)


def fp16_round(state: dict) -> dict:
    return {k: v.detach().to(dtype=__import__("torch").float16).contiguous() for k, v in state.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import torch.nn.functional as F
    import timm
    from safetensors.torch import save as st_save

    t_start = time.time()
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "train_log.txt", keep=args.resume and args.ckpt.is_file())
    mean, std = float(datasets.FASHION_MNIST_MEAN), float(datasets.FASHION_MNIST_STD)

    xtr, ytr = datasets.fashion_mnist("train")
    xte, yte = datasets.fashion_mnist("test")
    n_train = len(xtr) - args.holdout
    if n_train <= 0:
        raise SystemExit(f"--holdout {args.holdout} leaves no training images (the split has {len(xtr)})")
    xho, yho = xtr[n_train:], ytr[n_train:]
    xtr, ytr = xtr[:n_train], ytr[:n_train]
    if args.train_subset:
        xtr, ytr = xtr[: args.train_subset], ytr[: args.train_subset]
    if args.test_subset:
        xte, yte = xte[: args.test_subset], yte[: args.test_subset]
    xtr_t, ytr_t = torch.from_numpy(np.ascontiguousarray(xtr)), torch.from_numpy(ytr)
    xte_t, yte_t = torch.from_numpy(np.ascontiguousarray(xte)), torch.from_numpy(yte)
    # What the per-epoch accuracy is measured on: the held-out training images, so that
    # no choice made while training (epochs, recipe) looks at the test labels.
    xmon_t, ymon_t = (torch.from_numpy(np.ascontiguousarray(xho)), torch.from_numpy(yho)) if len(xho) else (None, None)

    timm_kwargs = dict(
        img_size=28, patch_size=args.patch_size, in_chans=1, num_classes=10,
        embed_dim=args.embed_dim, depth=args.depth, num_heads=args.num_heads,
        mlp_ratio=args.mlp_ratio, qkv_bias=True, class_token=True, global_pool="token",
    )
    model = timm.models.vision_transformer.VisionTransformer(**timm_kwargs, drop_path_rate=args.drop_path)
    n_params = sum(p.numel() for p in model.parameters())
    decay, no_decay = [], []
    for n, p_ in model.named_parameters():
        (no_decay if p_.ndim <= 1 or n in ("cls_token", "pos_embed") else decay).append(p_)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.999))

    N = len(xtr_t)
    steps_per_epoch = N // args.batch_size  # drop the last partial batch
    warmup_steps = int(round(args.warmup_epochs * steps_per_epoch))
    log(f"torch {torch.__version__}, timm {timm.__version__}, threads {torch.get_num_threads()}, "
        f"seed {args.seed}, host {platform.machine()}")
    log(f"model {json.dumps(timm_kwargs)}, params {n_params} ({n_params / 1e6:.2f}M)")
    log(f"train {N} images, held out {len(xho)} (train[{n_train}:]), test {len(xte_t)} images, batch {args.batch_size}, epochs {args.epochs}"
        + (f" (warm restart after {args.first_cycle_epochs})" if args.first_cycle_epochs else "") + ", "
        f"{steps_per_epoch} steps/epoch, warmup {warmup_steps} steps, lr {args.lr}, wd {args.weight_decay}, "
        f"label smoothing {args.label_smoothing}, drop path {args.drop_path}, erasing {args.random_erasing}")

    gen = torch.Generator().manual_seed(args.seed)
    start_epoch = 0
    history = []
    train_seconds = 0.0  # over every run that trained this model (resumed runs included)
    run_train_seconds = 0.0
    if args.resume and args.ckpt.is_file():
        ck = torch.load(args.ckpt, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"])
        torch.set_rng_state(ck["torch_rng"])
        start_epoch, history, train_seconds = ck["epoch"], ck["history"], ck["train_seconds"]
        log(f"resumed from {args.ckpt} at epoch {start_epoch}")

    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None

    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, args.epochs):
        model.train()
        t0 = time.time()
        perm = torch.randperm(N, generator=gen)
        loss_sum, correct, seen = 0.0, 0, 0
        it = range(steps_per_epoch)
        cycle_steps = cosine_steps(epoch, args.epochs, args.first_cycle_epochs, steps_per_epoch)
        bar = None
        if tqdm is not None and not args.no_progress:
            bar = tqdm(it, desc=f"epoch {epoch + 1}/{args.epochs}", mininterval=5.0, leave=False,
                       dynamic_ncols=True, file=sys.stderr)
            it = bar
        for i in it:
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            x = to_input(augment(xtr_t[idx], gen, erase_p=args.random_erasing), mean, std)
            y = ytr_t[idx]
            lr = lr_at(step, cycle_steps, warmup_steps, args.lr, args.lr * 0.01)
            for g in opt.param_groups:
                g["lr"] = lr
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(-1) == y).sum())
            seen += len(y)
            if bar is not None and (i % 20 == 0):
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}", lr=f"{lr:.2e}")
        if bar is not None:
            bar.close()
        dt = time.time() - t0
        train_seconds += dt
        run_train_seconds += dt
        held_acc = evaluate_final(model, xmon_t, ymon_t, mean, std) if xmon_t is not None else float("nan")
        rec = dict(epoch=epoch + 1, loss=loss_sum / seen, train_acc=correct / seen, heldout_acc=held_acc,
                   seconds=dt, img_per_s=seen / dt, lr=lr)
        history.append(rec)
        log(f"epoch {epoch + 1:3d}/{args.epochs}  loss {rec['loss']:.4f}  train_acc {rec['train_acc']:.4f}  "
            f"heldout_acc {held_acc:.4f}  {dt:.0f}s  {rec['img_per_s']:.0f} img/s  lr {lr:.2e}")
        if not args.tiny or args.resume:
            ck = dict(model=model.state_dict(), opt=opt.state_dict(), gen=gen.get_state(),
                      torch_rng=torch.get_rng_state(), epoch=epoch + 1, history=history,
                      train_seconds=train_seconds)
            tmp = args.ckpt.with_suffix(".tmp")
            torch.save(ck, tmp)
            os.replace(tmp, args.ckpt)

    # ---- stage 2: round to fp16 (what ships), fit exit heads on the frozen rounded backbone
    t_heads = time.time()
    backbone16 = fp16_round(model.state_dict())
    model = timm.models.vision_transformer.VisionTransformer(**timm_kwargs)
    model.load_state_dict({k: v.float() for k, v in backbone16.items()}, strict=True)
    model.eval()
    depth = len(model.blocks)
    extra_blocks = list(range(depth - 1))
    log(f"exit heads: caching {len(extra_blocks)} x {N} x {args.embed_dim} class-token features "
        f"({len(extra_blocks) * N * args.embed_dim * 4 / 1e6:.0f} MB)")
    # The runtime's own normalisation (Preprocess.normalize), as the converted file will apply it.
    pre = imagedata.Preprocess(input_size=(1, 28, 28), mean=(mean,), std=(std,), crop_pct=1.0)
    train_images = imagedata.LabelledImages(xtr[..., None], ytr, list(datasets.FASHION_MNIST_CLASSES), pre)
    heads, heads_report = exits.fit_exit_heads(
        model, train_images, extra_blocks, epochs=args.head_epochs, holdout=HEADS_HOLDOUT, lr=2e-3,
        weight_decay=1e-4, label_smoothing=args.label_smoothing, batch_size=HEADS_BATCH, seed=args.seed,
        show_progress=not args.no_progress, feature_batch=500, log=log)
    for line in heads_report.lines():
        log(line)
    heads_seconds = time.time() - t_heads

    # ---- assemble the shipped tensors (fp16) and evaluate exactly what ships
    tensors = dict(backbone16)
    for b in extra_blocks:
        for k, v in heads[b].items():
            tensors[f"exits.{b}.{k}"] = torch.from_numpy(v).to(torch.float16).contiguous()
    metadata = {
        "format": reference.FORMAT,
        "timm_kwargs": json.dumps(timm_kwargs, sort_keys=True),
        "mean": repr(mean),
        "std": repr(std),
        "exit_blocks": json.dumps(list(range(depth))),
        "extra_exit_blocks": json.dumps(extra_blocks),
        "classes": json.dumps(list(datasets.FASHION_MNIST_CLASSES)),
        "dataset": "fashion-mnist",
        "holdout": json.dumps([n_train, n_train + len(xho)]),
    }
    st_path = out / reference.REFERENCE_FILENAME
    atomic_write_bytes(st_path, st_save(tensors, metadata=metadata))

    smodel, sexits = reference.load_reference_timm(st_path)
    exit_top1 = reference.evaluate_top1(smodel, sexits, xte, yte, mean=mean, std=std)
    final_top1 = evaluate_final(smodel, xte_t, yte_t, mean, std)
    assert abs(final_top1 - exit_top1[depth - 1]) < 1e-9, (final_top1, exit_top1[depth - 1])
    for b in range(depth):
        log(f"exit after block {b:2d}: test top-1 {exit_top1[b]:.4f}")
    # earlier runs' training, plus all of this run (its training, data, exit heads, evaluation)
    total_seconds = train_seconds - run_train_seconds + (time.time() - t_start)
    file_bytes = st_path.stat().st_size

    card = {
        "arch": dict(timm_kwargs, model="timm.models.vision_transformer.VisionTransformer",
                     params=n_params, exit_head="LayerNorm(embed_dim, eps=1e-6) + Linear(embed_dim, 10) "
                     "on the class token output of the block; last block: model.norm + model.head"),
        "exit_blocks": list(range(depth)),
        "extra_exit_blocks": extra_blocks,
        "exit_top1": {str(b): exit_top1[b] for b in range(depth)},
        "exit_heads_fit": heads_report.to_dict(),
        "final_top1": final_top1,
        "train_seconds": train_seconds,
        "heads_seconds": heads_seconds,
        "total_seconds": total_seconds,
        "file": reference.REFERENCE_FILENAME,
        "file_bytes": file_bytes,
        "dtype": "float16",
        "data": {"dataset": "fashion-mnist", "source": str(datasets.fashion_mnist_dir()),
                 "train_images": N, "test_images": len(xte),
                 "holdout": [n_train, n_train + len(xho)], "mean": mean, "std": std,
                 "input": "(pixel/255 - mean) / std, shape [B, 1, 28, 28]",
                 "classes": list(datasets.FASHION_MNIST_CLASSES)},
        "recipe": {"epochs": args.epochs, "batch_size": args.batch_size, "optimizer": "AdamW",
                   "lr": args.lr, "lr_floor": args.lr * 0.01, "betas": [0.9, 0.999],
                   "weight_decay": args.weight_decay, "no_decay": "biases, norms, cls_token, pos_embed",
                   "schedule": "linear warmup then cosine, per step"
                               + (f"; warm restart: the first {args.first_cycle_epochs} epochs follow a cosine over "
                                  f"{args.first_cycle_epochs}, the rest the cosine over {args.epochs}"
                                  if args.first_cycle_epochs else ""),
                   "first_cycle_epochs": args.first_cycle_epochs, "warmup_epochs": args.warmup_epochs,
                   "label_smoothing": args.label_smoothing, "grad_clip": 1.0, "drop_path": args.drop_path,
                   "augmentation": f"random crop 28 from zero-padded 32 (pad 2), horizontal flip p=0.5"
                                   + (f", random erasing p={args.random_erasing}" if args.random_erasing else ""),
                   "exit_heads": f"pyruntime.exits.fit_exit_heads: backbone frozen (fp16-rounded); cached cls "
                                 f"features, no augmentation; AdamW lr 2e-3 cosine, wd 1e-4, batch {HEADS_BATCH}, "
                                 f"at most {args.head_epochs} epochs, label smoothing {args.label_smoothing}; "
                                 f"{HEADS_HOLDOUT:.0%} of the training images held out, each head keeps its "
                                 f"epoch of lowest held-out cross-entropy",
                   "seed": args.seed, "threads": args.threads, "tiny": args.tiny},
        "evaluation": "top-1 on the test images with the shipped fp16 weights cast to fp32",
        "history": history,
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()},
    }
    atomic_write_text(out / "card.json", json.dumps(card, indent=2) + "\n")
    atomic_write_text(out / "card.md", render_card(card))
    log(f"final top-1 {final_top1:.4f}; wrote {st_path} ({file_bytes / 1e6:.2f} MB), card.md, card.json; "
        f"train {train_seconds:.0f}s, heads {heads_seconds:.0f}s, total {total_seconds:.0f}s")
    if args.ckpt.is_file() and args.ckpt.parent == out:
        args.ckpt.unlink()
    return 0


def render_card(c: dict) -> str:
    a, r, d = c["arch"], c["recipe"], c["data"]
    lines = [
        "# Reference model: ViT on Fashion-MNIST",
        "",
        f"`{c['file']}` ({c['file_bytes'] / 1e6:.2f} MB, {c['dtype']}) — trained by `tools/train_reference.py`"
        + (" (**--tiny smoke run**)" if r["tiny"] else "") + ".",
        "",
        "## Architecture",
        "",
        "| field | value |",
        "|---|---|",
    ]
    for k in ("model", "img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads",
              "mlp_ratio", "qkv_bias", "class_token", "global_pool", "params"):
        lines.append(f"| {k} | `{a[k]}` |")
    lines += [
        f"| exits | after every block ({len(c['exit_blocks'])}); {a['exit_head']} |",
        "",
        "Construct with `VisionTransformer(**json.loads(metadata['timm_kwargs']))`; exit heads are stored as "
        "`exits.<block>.norm.{weight,bias}` and `exits.<block>.fc.{weight,bias}` for blocks "
        f"{c['extra_exit_blocks'][0] if c['extra_exit_blocks'] else '-'}..{c['extra_exit_blocks'][-1] if c['extra_exit_blocks'] else '-'}; "
        "the last block's exit is the model's `norm` + `head`.",
        "",
        "## Data",
        "",
        f"Fashion-MNIST from Debian's `dataset-fashion-mnist` (`{d['source']}`): {d['train_images']} training "
        f"images used for training, {d['test_images']} test images; training images "
        f"{d['holdout'][0]}..{d['holdout'][1] - 1} held out of all training (calibration and validation "
        f"data for `tools/*_results.py`; the per-epoch accuracy below is measured on them). Input: {d['input']}, mean = {d['mean']:.6f}, std = {d['std']:.6f}.",
        "",
        "## Training recipe",
        "",
        "| field | value |",
        "|---|---|",
    ]
    for k, v in r.items():
        lines.append(f"| {k} | {v} |")
    lines += [
        "",
        f"Wall time: backbone {c['train_seconds']:.0f} s, exit heads {c['heads_seconds']:.0f} s, "
        f"total {c['total_seconds']:.0f} s ({r['threads']} threads; torch {c['versions']['torch']}, "
        f"timm {c['versions']['timm']}).",
        "",
        "## Test accuracy",
        "",
        f"{c['evaluation']}, {d['test_images']} images.",
        "",
        "| exit (after block) | top-1 |",
        "|---|---|",
    ]
    last = len(c["exit_blocks"]) - 1
    for b, acc in c["exit_top1"].items():
        tag = " (final: model norm + head)" if int(b) == last else ""
        lines.append(f"| {b}{tag} | {100 * acc:.2f}% |")
    lines += [
        "",
        f"Final top-1: **{100 * c['final_top1']:.2f}%**",
        "",
        "## Training log (per epoch)",
        "",
        "| epoch | loss | train acc (augmented) | held-out acc | seconds | img/s |",
        "|---|---|---|---|---|---|",
    ]
    for h in c["history"]:
        lines.append(f"| {h['epoch']} | {h['loss']:.4f} | {100 * h['train_acc']:.2f}% | {100 * h['heldout_acc']:.2f}% "
                     f"| {h['seconds']:.0f} | {h['img_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
