"""Exit heads fitted on a frozen backbone: ``pyruntime exits fit``.

    pyruntime exits fit vit_small_patch16_224 --checkpoint mine.pth --model-kwargs '{"num_classes": 5}' \\
        --data photos/ --blocks 3,6,9 --out heads.safetensors
    pyruntime convert vit_small_patch16_224 model.pyrt --checkpoint mine.pth \\
        --model-kwargs '{"num_classes": 5}' --exits heads.safetensors --policy calibrated.json

An exit head after block ``b`` is exactly what the runtime evaluates there: the block's output
pooled the model's own way (the class token for ``global_pool='token'``, the mean of the patch
tokens -- every prefix token left out, as timm's pooling does -- for ``'avg'``), then
``LayerNorm(eps=1e-6)``, then ``Linear(embed_dim, num_classes)``
(:func:`pyruntime.reference.make_exit_head`).

:func:`fit_exit_heads` runs the backbone once (``torch.no_grad``, in batches) and caches
every exit block's pooled features: ``N x embed_dim x len(blocks)`` float32 values (10,000
images of ViT-S/16, D = 384, with 4 exits: 61 MB), then trains all heads together (Adam,
cross-entropy, cosine learning rate) on a fixed-seed part of the images and keeps, per head,
the weights of the epoch with the lowest cross-entropy on the held-out rest (early stopping).
:func:`save_exit_heads` writes ``exits.<b>.<param>`` tensors (what ``convert --exits`` reads).

``tools/train_reference.py`` fits the shipped reference model's exit heads with the same
:func:`fit_exit_heads`.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch
    import torch.nn as nn

__all__ = ["fit_exit_heads", "pooled_block_features", "check_blocks", "save_exit_heads", "ExitFitReport",
           "EXIT_HEADS_FORMAT", "add_parser", "add_model_arguments", "load_user_model"]

PathLike = Union[str, "os.PathLike[str]"]
EXIT_HEADS_FORMAT = "pyruntime-exit-heads-v1"
DEFAULT_EPOCHS = 30
DEFAULT_PATIENCE = 5
FEATURE_BATCH = 64


def _progress(it, desc: str, total: Optional[int], enabled: bool):
    """The calibrators' progress bar (tqdm on stderr)."""
    from .calibrate.common import progress

    return progress(it, desc, total=total, enabled=enabled)


# --- features -------------------------------------------------------------------------------------

def _pooling(model: "nn.Module") -> Tuple[str, int]:
    """(global_pool, prefix tokens left out of an average) of the model, as the runtime pools."""
    pool = getattr(model, "global_pool", None)
    if pool not in ("token", "avg") or getattr(model, "attn_pool", None) is not None:
        what = " (an attention-pooling head, SigLIP's MAP)" if getattr(model, "attn_pool", None) is not None else ""
        raise ValueError(f"exit heads need global_pool 'token' or 'avg', the model has {pool!r}{what}: exit heads "
                         f"on it are not supported")
    if getattr(model, "pool_include_prefix", False):
        raise ValueError("exit heads do not support pool_include_prefix (the runtime averages patch tokens only)")
    if pool == "token" and getattr(model, "cls_token", None) is None:
        raise ValueError("global_pool 'token' needs a class token")
    return pool, int(getattr(model, "num_prefix_tokens", 0))


def check_blocks(blocks: Sequence[int], depth: int) -> List[int]:
    """Sorted distinct exit blocks, each in 0..depth-2 (after the last block the model's head answers)."""
    out = sorted({int(b) for b in blocks})
    if not out:
        raise ValueError("no exit blocks given")
    bad = [b for b in out if not 0 <= b <= depth - 2]
    if bad:
        raise ValueError(f"exit blocks {bad} are out of range: exits go after blocks 0..{depth - 2} (depth {depth}; "
                         f"after the last block the model's own head answers)")
    return out


class _Stop(Exception):
    """Raised by the last wanted block's hook: the rest of the backbone is not run."""


def walk_blocks(model: "nn.Module", x: "torch.Tensor", on_block, last: Optional[int] = None):
    """Run timm's ``forward_features`` on ``x``, calling ``on_block(i, h)`` with each block's
    output ``h`` (before any final norm) as it is computed; stop after block ``last`` (and
    return None), or with ``last`` None run to the end and return the features.

    Forward hooks on ``model.blocks`` rather than a copy of the loop: each family passes its
    blocks its own extra arguments (Eva's RoPE table, per block for 'mixed' RoPE; BEiT's
    shared relative position bias), and timm's own forward knows them."""
    depth = len(model.blocks)
    stop = depth - 1 if last is None else int(last)
    if not 0 <= stop < depth:
        raise ValueError(f"block {last} is out of range (depth {depth})")

    def hook(i):
        def fn(module, args, out):
            on_block(i, out)
            if last is not None and i == stop:
                raise _Stop
        return fn

    handles = [blk.register_forward_hook(hook(i)) for i, blk in enumerate(model.blocks[: stop + 1])]
    try:
        return model.forward_features(x)
    except _Stop:
        return None
    finally:
        for h in handles:
            h.remove()


def pool_tokens(h: "torch.Tensor", pool: str, prefix: int) -> "torch.Tensor":
    """[B, D] of block output tokens [B, T, D], pooled as the runtime's exits (:func:`_pooling`)."""
    return h[:, 0] if pool == "token" else h[:, prefix:].mean(dim=1)


def pooled_block_features(model: "nn.Module", x: "torch.Tensor", blocks: Sequence[int]) -> Dict[int, "torch.Tensor"]:
    """{block: pooled output [B, D]} for a normalised input batch, pooled as the runtime's exits."""
    pool, prefix = _pooling(model)
    want = set(blocks)
    out = {}

    def keep(i, h):
        if i in want:
            out[i] = pool_tokens(h, pool, prefix)

    walk_blocks(model, x, keep, last=max(blocks))
    return out


def _cache_features(model, data, blocks: List[int], batch: int, show_progress: bool) -> "torch.Tensor":
    """float32 [len(blocks), N, D] pooled features of every image, one backbone pass."""
    import torch

    N, D = len(data), int(model.embed_dim)
    feats = torch.empty((len(blocks), N, D), dtype=torch.float32)
    starts = range(0, N, batch)
    model.eval()
    with torch.no_grad():
        for lo in _progress(starts, "exit features", len(starts), show_progress):
            hi = min(N, lo + batch)
            pooled = pooled_block_features(model, torch.from_numpy(data.batch(lo, hi)), blocks)
            for j, b in enumerate(blocks):
                feats[j, lo:hi] = pooled[b].float()
    return feats


# --- training ---------------------------------------------------------------------------------------

@dataclass
class ExitFitReport:
    """What :func:`fit_exit_heads` did: per exit block the held-out top-1 and cross-entropy of
    the kept weights and the epoch they come from (1-based), image counts, cache size, time."""

    top1: Dict[int, float]
    loss: Dict[int, float]
    best_epoch: Dict[int, int]
    epochs_run: int
    train_images: int
    holdout_images: int
    feature_bytes: int
    seconds: float
    history: List[Dict[str, Any]] = field(default_factory=list)

    def lines(self) -> List[str]:
        return [f"exit after block {b}: held-out top-1 {self.top1[b]:.4f} ({self.holdout_images} images), "
                f"cross-entropy {self.loss[b]:.4f}, epoch {self.best_epoch[b]}/{self.epochs_run}"
                for b in sorted(self.top1)]

    def to_dict(self) -> dict:
        return {"top1": {str(b): v for b, v in self.top1.items()}, "loss": {str(b): v for b, v in self.loss.items()},
                "best_epoch": {str(b): v for b, v in self.best_epoch.items()}, "epochs_run": self.epochs_run,
                "train_images": self.train_images, "holdout_images": self.holdout_images,
                "feature_bytes": self.feature_bytes, "seconds": self.seconds}


def _split(labels: np.ndarray, holdout: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices: a ``holdout`` fraction drawn by ``seed``, at least one image each."""
    N = len(labels)
    if not 0 < holdout < 1:
        raise ValueError(f"holdout must lie strictly between 0 and 1, got {holdout}")
    n_hold = int(round(N * holdout))
    if n_hold < 1 or N - n_hold < 1:
        raise ValueError(f"{N} images cannot be split into training and held-out parts with holdout {holdout}")
    perm = np.random.default_rng(seed).permutation(N)
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


def _labels(data, num_classes: int) -> np.ndarray:
    y = np.asarray(data.labels)
    if y.ndim != 1 or len(y) != len(data) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers [N] with N = {len(data)}")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}) for the model's {num_classes} classes; "
                         f"they span [{y.min()}, {y.max()}]")
    return y.astype(np.int64)


def _new_heads(blocks: List[int], D: int, n: int, seed: int) -> Dict[int, "nn.Module"]:
    import torch

    from .reference import make_exit_head

    with torch.random.fork_rng(devices=[]):  # seeded heads without touching the caller's RNG
        torch.manual_seed(seed)
        return {b: make_exit_head(D, n) for b in blocks}


def _evaluate(heads, feats, blocks, y) -> Tuple[Dict[int, float], Dict[int, float]]:
    """(top-1, mean cross-entropy) of each head on cached features."""
    import torch
    import torch.nn.functional as F

    top1, loss = {}, {}
    with torch.no_grad():
        for j, b in enumerate(blocks):
            logits = heads[b](feats[j])
            top1[b] = float((logits.argmax(-1) == y).float().mean())
            loss[b] = float(F.cross_entropy(logits, y))
    return top1, loss


def _cosine(lr: float, step: int, total: int) -> float:
    """Cosine decay from ``lr`` to ``lr / 100`` over ``total`` steps."""
    return lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))


def fit_exit_heads(model: "nn.Module", data, blocks: Sequence[int], *, epochs: int = DEFAULT_EPOCHS,
                   holdout: float = 0.1, lr: float = 2e-3, weight_decay: float = 0.0, label_smoothing: float = 0.0,
                   batch_size: int = 256, patience: int = DEFAULT_PATIENCE, seed: int = 0,
                   show_progress: bool = True, feature_batch: int = FEATURE_BATCH,
                   log=None) -> Tuple[Dict[int, Dict[str, np.ndarray]], ExitFitReport]:
    """Fit a LayerNorm + Linear exit head after each of ``blocks`` on the frozen ``model``.

    data: a :class:`pyruntime.imagedata.LabelledImages` (anything with integer ``labels``
        [N], ``len()`` and ``batch(lo, hi)`` giving normalised float32 [hi - lo, C, H, W]).
    The pooled features of every exit block are cached first (``N x D x len(blocks)``
    float32, less than the uint8 images themselves for any real image size); the heads then train together (AdamW -- Adam when ``weight_decay`` is 0 --,
    cross-entropy with ``label_smoothing``, cosine learning rate from ``lr`` to ``lr / 100``)
    on all but a ``holdout`` fraction drawn by ``seed``, for at most ``epochs`` epochs, stopping
    when no head's held-out cross-entropy improved for ``patience`` epochs. Each head keeps the
    weights of its best held-out epoch. ``log``: a callable given one line per epoch.

    Returns ``({block: {"norm.weight", "norm.bias", "fc.weight", "fc.bias"} float32 arrays},
    report)``; the report has each exit's held-out top-1 with the kept weights.
    """
    import torch
    import torch.nn.functional as F

    t0 = time.perf_counter()
    for name, v in (("epochs", epochs), ("batch_size", batch_size), ("patience", patience),
                    ("feature_batch", feature_batch)):
        if int(v) < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if not (math.isfinite(lr) and lr > 0) or not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"lr must be > 0 and weight_decay >= 0, got {lr} and {weight_decay}")
    blocks = check_blocks(blocks, len(model.blocks))
    _pooling(model)  # a model whose exits cannot be pooled is refused before the backbone runs
    D, n = int(model.embed_dim), int(model.num_classes)
    if n < 2:
        raise ValueError(f"exit heads classify: the model needs at least 2 classes, it has {n}")
    y_all = _labels(data, n)
    train, held = _split(y_all, holdout, seed)
    feats = _cache_features(model, data, blocks, feature_batch, show_progress)
    y, train_t, held_t = torch.from_numpy(y_all), torch.from_numpy(train), torch.from_numpy(held)
    f_held, y_held = feats[:, held_t], y[held_t]  # a copy of the held-out part only

    heads = _new_heads(blocks, D, n, seed)
    opt = torch.optim.AdamW([p for h in heads.values() for p in h.parameters()], lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total = steps_per_epoch * epochs
    gen = torch.Generator().manual_seed(seed)
    best = {b: (math.inf, 0.0, 0, {k: v.clone() for k, v in heads[b].state_dict().items()}) for b in blocks}
    history, step, stale, epoch = [], 0, 0, 0
    for epoch in _progress(range(1, epochs + 1), "exit heads", epochs, show_progress):
        for h in heads.values():
            h.train()
        perm = torch.randperm(len(train), generator=gen)
        for i in range(steps_per_epoch):
            idx = train_t[perm[i * batch_size:(i + 1) * batch_size]]
            for g in opt.param_groups:
                g["lr"] = _cosine(lr, step, total)
            loss = sum(F.cross_entropy(heads[b](feats[j, idx]), y[idx], label_smoothing=label_smoothing)
                       for j, b in enumerate(blocks))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        for h in heads.values():
            h.eval()
        top1, ce = _evaluate(heads, f_held, blocks, y_held)
        improved = [b for b in blocks if ce[b] < best[b][0]]
        for b in improved:
            best[b] = (ce[b], top1[b], epoch, {k: v.detach().clone() for k, v in heads[b].state_dict().items()})
        history.append({"epoch": epoch, "top1": dict(top1), "loss": dict(ce)})
        if log is not None:
            log(f"exit heads epoch {epoch}/{epochs}  held-out cross-entropy / top-1: "
                + " ".join(f"{b}:{ce[b]:.3f}/{top1[b]:.3f}" for b in blocks))
        stale = 0 if improved else stale + 1
        if stale >= patience:
            break
    out = {b: {k: np.ascontiguousarray(v.numpy(), dtype=np.float32) for k, v in best[b][3].items()} for b in blocks}
    report = ExitFitReport(top1={b: best[b][1] for b in blocks}, loss={b: best[b][0] for b in blocks},
                           best_epoch={b: best[b][2] for b in blocks}, epochs_run=epoch, train_images=len(train),
                           holdout_images=len(held), feature_bytes=len(y_all) * D * len(blocks) * 4,
                           seconds=time.perf_counter() - t0, history=history)
    return out, report


# --- the heads file -----------------------------------------------------------------------------------

def save_exit_heads(path: PathLike, heads: Mapping[int, Mapping[str, Any]], meta: Optional[Mapping[str, Any]] = None,
                    inputs: Sequence[PathLike] = ()) -> Path:
    """Write ``exits.<b>.<param>`` float32 tensors (safetensors) atomically, with ``meta``
    (values JSON-encoded unless strings) and ``format``; refuses to replace any of ``inputs``."""
    from safetensors.numpy import save

    from ._atomic import atomic_write_bytes
    from .convert import EXIT_PARAMS

    if not heads:
        raise ValueError("no exit heads to save")
    tensors, shapes = {}, set()
    for b, params in sorted(heads.items()):
        if set(params) != set(EXIT_PARAMS):
            raise ValueError(f"exit head {b} must have exactly {list(EXIT_PARAMS)}, got {sorted(params)}")
        arrays = {k: np.ascontiguousarray(np.asarray(v), dtype=np.float32) for k, v in params.items()}
        D, n = arrays["norm.weight"].shape[0], arrays["fc.bias"].shape[0]
        expected = {"norm.weight": (D,), "norm.bias": (D,), "fc.weight": (n, D), "fc.bias": (n,)}
        for k, a in arrays.items():
            if a.shape != expected[k] or not np.isfinite(a).all():
                raise ValueError(f"exits.{b}.{k}: shape {list(a.shape)} (expected {list(expected[k])}) or not finite")
            tensors[f"exits.{int(b)}.{k}"] = a
        shapes.add((D, n))
    if len(shapes) != 1:
        raise ValueError(f"exit heads differ in width or classes: {sorted(shapes)}")
    metadata = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in (meta or {}).items()}
    metadata["format"] = EXIT_HEADS_FORMAT
    atomic_write_bytes(path, save(tensors, metadata=metadata), inputs=inputs)
    return Path(path)


# --- the command line: ``pyruntime exits fit`` ------------------------------------------------------

def _block_list(text: str) -> List[int]:
    import argparse

    try:
        blocks = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block indices, got {text!r}") from None
    if not blocks or min(blocks) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative block indices, got {text!r}")
    return blocks


def model_kwargs(text: str) -> dict:
    """``--model-kwargs``: a JSON object of ``timm.create_model`` arguments."""
    import argparse

    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"num_classes\": 10}}', got {text!r}")
    return value


def add_model_arguments(p) -> None:
    """The options that name the user's model: shared by ``exits fit`` and ``convert``."""
    from .cli import input_file

    p.add_argument("--checkpoint", type=input_file,
                   help=".safetensors/.pth/.pt state dict of the timm model (may also hold exits.* heads); "
                        "for 'reference': another checkpoint in its format")
    p.add_argument("--model-kwargs", type=model_kwargs, default=None, metavar="JSON",
                   help="timm.create_model arguments as a JSON object, e.g. '{\"num_classes\": 5, \"img_size\": 160}'")
    p.add_argument("--random-weights", action="store_true",
                   help="no checkpoint: timm's random initialisation (for trying things out)")


def load_user_model(args) -> Tuple["nn.Module", Optional[dict], List[str]]:
    """(model, preprocess override for the converted file, notes) of MODEL and its options:
    ``reference`` (the shipped model or --checkpoint in its format) or a timm name
    (:func:`pyruntime.convert.load_timm`)."""
    from .cli import check_reference_checkpoint, check_state_dict_file

    if args.source == "reference":
        if args.model_kwargs is not None or args.random_weights:
            raise ValueError("the reference model takes neither --model-kwargs nor --random-weights")
        check_reference_checkpoint(args.checkpoint)
        from .convert import _load_checkpoint
        from .reference import build_timm_model, read_metadata, reference_path

        path = args.checkpoint or reference_path()
        meta = read_metadata(path)
        model = build_timm_model(meta["timm_kwargs"])
        _load_checkpoint(model, path)  # as convert reference loads it: a misfit is a ValueError naming the file
        return model.eval(), {"mean": meta["mean"], "std": meta["std"]}, []
    check_state_dict_file(args.checkpoint)
    from .convert import load_timm

    model, _, notes = load_timm(args.source, args.model_kwargs, args.checkpoint, args.random_weights)
    return model, None, notes


def cmd_exits_fit(args) -> int:
    from ._atomic import check_target
    from .errors import require_extra

    inputs = [p for p in (args.checkpoint, args.data) if p]
    check_target(args.out, inputs)  # before any work: never replace a file the heads are made from
    require_extra("convert", "pyruntime exits fit")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from .convert import _preprocess, model_arch
    from .imagedata import Preprocess, read_dataset

    model, override, notes = load_user_model(args)
    arch = model_arch(model)  # a model the runtime cannot run is named before any work
    _pooling(model)
    blocks = check_blocks(args.blocks, arch["depth"])
    # The heads learn on exactly the pixels the converted file will be given.
    pre = Preprocess.from_dict(_preprocess(model, arch, override))
    data = read_dataset(args.data, pre, num_classes=arch["num_classes"], limit=args.images, seed=args.seed)
    for note in notes:
        print(f"note: {note}")
    print(f"{len(data)} images, {len(data.classes)} classes; caching {len(blocks)} x {len(data)} x "
          f"{arch['embed_dim']} pooled features ({len(data) * arch['embed_dim'] * len(blocks) * 4 / 1e6:.1f} MB)")
    heads, report = fit_exit_heads(model, data, blocks, epochs=args.epochs, holdout=args.holdout, lr=args.lr,
                                   batch_size=args.batch_size, seed=args.seed, show_progress=not args.no_progress)
    meta = {"source": args.source, "model_kwargs": args.model_kwargs or {},
            "checkpoint": Path(args.checkpoint).name if args.checkpoint else None,
            "blocks": blocks, "data": data.summary, "fit": report.to_dict(), "notes": notes}
    save_exit_heads(args.out, heads, meta, inputs=inputs)
    for line in report.lines():
        print(line)
    print(f"wrote {args.out} ({len(blocks)} exit heads; {report.epochs_run} epochs, {report.seconds:.1f} s)")
    return 0


def add_parser(subparsers):
    """Register ``exits`` (``exits fit``) on an ``argparse`` sub-parser collection."""
    import argparse

    from .cli import fraction, non_negative_int, output_file, positive_int, thread_count

    e = subparsers.add_parser("exits", help="exit heads for your own model (exits fit)",
                              description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = e.add_subparsers(dest="exits_command", required=True)
    f = sub.add_parser("fit", help="fit LayerNorm + Linear exit heads on the frozen model and labelled images",
                       description=__doc__.split("\n\n")[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("source", metavar="MODEL", help="timm model name, or 'reference' for the shipped reference ViT")
    add_model_arguments(f)
    f.add_argument("--data", required=True, help="image folder (one sub-folder per class) or .npz (images, labels)")
    f.add_argument("--blocks", type=_block_list, required=True, help="comma-separated blocks to put exits after")
    f.add_argument("--out", type=output_file, required=True, help="safetensors file of the heads (exits.<b>.*)")
    f.add_argument("--epochs", type=positive_int, default=DEFAULT_EPOCHS, help="at most this many epochs")
    f.add_argument("--holdout", type=fraction, default=0.1, help="held-out fraction for early stopping and top-1")
    f.add_argument("--lr", type=_positive_float, default=2e-3)
    f.add_argument("--batch-size", type=positive_int, default=256)
    f.add_argument("--seed", type=non_negative_int, default=0, help="held-out split, --images subset, head init")
    f.add_argument("--images", type=positive_int, help="use at most N images (a subset drawn by --seed)")
    f.add_argument("--threads", type=thread_count, help="torch threads")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")
    f.set_defaults(func=cmd_exits_fit)
    return e


def _positive_float(text: str) -> float:
    import argparse

    from .cli import _finite

    v = _finite(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v:g}")
    return v
