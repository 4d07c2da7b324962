#!/usr/bin/env python3
"""The README's "your model, your data" example, step 0: make a user's model and images.

A user arrives with a timm ViT they fine-tuned and a folder of their images. This script
plays that user, on data this machine has (Debian's Fashion-MNIST): it writes

* ``DIR/images/{train,val,test}/<class>/<n>.png``: RGB photos of the garments, each tinted by
  a random colour and saved at 36 x 36 (the model takes 32 x 32, so every image goes through
  timm's eval resize and centre crop);
* ``DIR/model.safetensors``: a timm ``vit_tiny_patch16_224`` built with the kwargs in
  ``DIR/model_kwargs.json`` -- 32 x 32 input, patch 4, width 96, 6 blocks, no class token,
  average pooling with ``fc_norm`` -- trained for ``--epochs`` on the train folder as timm
  would see it (its eval transform; no augmentation, to keep this short).

Everything after this is the pyruntime command line, as a user runs it (README):
``pyruntime exits fit``, ``calibrate``, ``convert``, ``eval``.

    python tools/user_model_example.py --out example/   # ~5 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see tools/train_reference.py

import numpy as np

MODEL = "vit_tiny_patch16_224"
MODEL_KWARGS = {"img_size": 32, "patch_size": 4, "num_classes": 10, "embed_dim": 96, "depth": 6, "num_heads": 3,
                "class_token": False, "global_pool": "avg", "fc_norm": True}
SPLITS = {"train": 6000, "val": 1000, "test": 2000}
SIDE = 36


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray, classes, rng) -> None:
    from PIL import Image

    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
    for i, (img, y) in enumerate(zip(images, labels)):
        tint = rng.uniform(0.3, 1.0, 3)
        rgb = (img[..., None].astype(np.float32) * tint).round().astype(np.uint8)
        Image.fromarray(rgb).resize((SIDE, SIDE), Image.BILINEAR).save(root / classes[y] / f"{i:05d}.png")


def make_images(out: Path, seed: int) -> None:
    from pyruntime.datasets import FASHION_MNIST_CLASSES, fashion_mnist

    classes = [c.replace("/", "-").replace(" ", "_").lower() for c in FASHION_MNIST_CLASSES]
    rng = np.random.default_rng(seed)
    x_train, y_train = fashion_mnist("train")
    x_test, y_test = fashion_mnist("test")
    pick = rng.permutation(len(x_train))
    n_train, n_val = SPLITS["train"], SPLITS["val"]
    write_folder(out / "train", x_train[pick[:n_train]], y_train[pick[:n_train]], classes, rng)
    write_folder(out / "val", x_train[pick[n_train:n_train + n_val]], y_train[pick[n_train:n_train + n_val]], classes, rng)
    test = rng.permutation(len(x_test))[:SPLITS["test"]]
    write_folder(out / "test", x_test[test], y_test[test], classes, rng)


def train(out: Path, epochs: int, seed: int) -> None:
    import timm
    import torch
    from safetensors.torch import save_file

    from pyruntime.imagedata import Preprocess, read_dataset

    torch.manual_seed(seed)
    model = timm.create_model(MODEL, pretrained=False, **MODEL_KWARGS)
    pre = Preprocess.from_timm(model)
    data = read_dataset(out / "images" / "train", pre, num_classes=10)
    val = read_dataset(out / "images" / "val", pre, num_classes=10)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    steps = epochs * -(-len(data) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    gen = np.random.default_rng(seed)
    for epoch in range(epochs):
        model.train()
        t0, order = time.time(), gen.permutation(len(data))
        for lo in range(0, len(order), 128):
            idx = np.sort(order[lo:lo + 128])
            x = torch.from_numpy(pre.normalize(data.images[idx]))
            loss = torch.nn.functional.cross_entropy(model(x), torch.from_numpy(data.labels[idx]), label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            pred = np.concatenate([model(torch.from_numpy(b)).argmax(1).numpy() for _, _, b in val.batches(500)])
        print(f"epoch {epoch + 1}/{epochs}: val top-1 {(pred == val.labels).mean():.4f} ({time.time() - t0:.0f} s)",
              flush=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "model_kwargs.json").write_text(json.dumps(MODEL_KWARGS) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not (args.out / "images" / "test").is_dir():
        make_images(args.out / "images", args.seed)
    train(args.out, args.epochs, args.seed)
    print(f"wrote {args.out / 'model.safetensors'} ({MODEL} with {json.dumps(MODEL_KWARGS)}) and {args.out / 'images'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
