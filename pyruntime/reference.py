"""The shipped reference model: a small timm ViT trained on Fashion-MNIST.

``reference_path()`` needs nothing but the standard library.  The torch-side
helpers import torch / timm / safetensors lazily, so importing this module never
pulls them (nor the compiled extension) in.

File layout (``fmnist_vit.safetensors``, all tensors fp16):

* the backbone ``state_dict`` exactly as timm names it
  (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.<i>.*``,
  ``norm.*``, ``head.*``);
* early-exit heads ``exits.<b>.norm.{weight,bias}`` (LayerNorm) and
  ``exits.<b>.fc.{weight,bias}`` (Linear) applied to the class-token output of
  block ``b``, for every block except the last; the last block's exit is the
  model's own ``norm`` + ``head``.

Metadata (all strings): ``timm_kwargs`` (JSON of the ``VisionTransformer``
constructor arguments), ``mean`` / ``std`` (input normalisation of pixels in
[0, 1]), ``exit_blocks`` (JSON list of every block with an exit, the last one
included), ``extra_exit_blocks`` (JSON list of blocks with ``exits.<b>.*`` keys),
``classes`` (JSON list of class names), ``format``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple, Union

from .modelfile import safetensors_metadata

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "REFERENCE_FILENAME",
    "reference_dir",
    "reference_path",
    "read_metadata",
    "build_timm_model",
    "make_exit_head",
    "load_reference_timm",
    "block_cls_features",
    "exit_logits",
    "convert_reference",
]

REFERENCE_FILENAME = "fmnist_vit.safetensors"
FORMAT = "pyruntime-reference-v1"
#: The last HOLDOUT_IMAGES Fashion-MNIST training images are kept out of the reference
#: model's training: calibration and validation data it has never been fitted on.
HOLDOUT_IMAGES = 10000


def _sibling(name: str):
    """Import a sibling module of this package, also when loaded by file path."""
    import importlib
    import importlib.util
    import sys

    if __package__:
        return importlib.import_module(f"{__package__}.{name}")
    key = f"_pyruntime_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).resolve().parent / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


def reference_dir() -> Path:
    """Directory holding the shipped reference model, card and training log."""
    return Path(__file__).resolve().parent / "data" / "reference"


def reference_path() -> Path:
    """Path of the shipped reference checkpoint (``fmnist_vit.safetensors``)."""
    return reference_dir() / REFERENCE_FILENAME


def read_metadata(path: Union[str, Path, None] = None) -> dict:
    """Decoded safetensors metadata of a reference checkpoint (no torch needed)."""
    path = Path(path) if path is not None else reference_path()
    meta = safetensors_metadata(path)
    out: dict = {}
    for k, v in meta.items():
        if k in ("timm_kwargs", "exit_blocks", "extra_exit_blocks", "classes"):
            out[k] = json.loads(v)
        elif k in ("mean", "std"):
            out[k] = float(v)
        else:
            out[k] = v
    return out


def build_timm_model(timm_kwargs: dict):
    """A randomly initialised timm ``VisionTransformer`` with these kwargs."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**timm_kwargs)


def make_exit_head(embed_dim: int, num_classes: int, eps: float = 1e-6):
    """LayerNorm + Linear exit head; parameter names ``norm.*`` and ``fc.*``.

    ``eps`` matches timm's ViT LayerNorm (1e-6).
    """
    from collections import OrderedDict

    import torch.nn as nn

    return nn.Sequential(
        OrderedDict(norm=nn.LayerNorm(embed_dim, eps=eps), fc=nn.Linear(embed_dim, num_classes))
    )


def load_reference_timm(
    path: Union[str, Path, None] = None,
) -> Tuple["torch.nn.Module", Dict[int, "torch.nn.Module"]]:
    """Load the reference checkpoint as a timm model (fp32, eval mode) plus exit heads.

    Returns ``(model, exits)`` where ``exits[b]`` maps the class token output of
    block ``b`` (shape ``[B, embed_dim]``) to logits.  ``exits`` has an entry for
    every block; the last one is ``Sequential(model.norm, model.head)``, sharing
    the model's modules.
    """
    import torch
    import torch.nn as nn
    from safetensors.torch import load_file

    path = Path(path) if path is not None else reference_path()
    if not path.is_file():
        raise FileNotFoundError(f"reference checkpoint not found: {path}")
    meta = read_metadata(path)
    kwargs = meta["timm_kwargs"]
    tensors = {k: v.float() for k, v in load_file(str(path)).items()}

    model = build_timm_model(kwargs)
    backbone = {k: v for k, v in tensors.items() if not k.startswith("exits.")}
    model.load_state_dict(backbone, strict=True)
    model.eval()

    depth = len(model.blocks)
    extra = sorted({int(k.split(".")[1]) for k in tensors if k.startswith("exits.")})
    exits: Dict[int, nn.Module] = {}
    for b in extra:
        head = make_exit_head(kwargs["embed_dim"], kwargs["num_classes"])
        prefix = f"exits.{b}."
        head.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
        exits[b] = head.eval()
    exits[depth - 1] = nn.Sequential(model.norm, model.head).eval()
    return model, exits


def block_cls_features(model, x: "torch.Tensor") -> List["torch.Tensor"]:
    """Class-token output of every block (before any final norm), list of ``[B, D]``."""
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    feats = []
    for blk in model.blocks:
        x = blk(x)
        feats.append(x[:, 0])
    return feats


def exit_logits(model, exits: Dict[int, "torch.nn.Module"], x: "torch.Tensor") -> Dict[int, "torch.Tensor"]:
    """Logits of every exit for a normalised input batch ``x`` ``[B, C, H, W]``."""
    feats = block_cls_features(model, x)
    return {b: exits[b](feats[b]) for b in sorted(exits)}


def evaluate_top1(
    model,
    exits: Dict[int, "torch.nn.Module"],
    images,
    labels,
    batch_size: int = 500,
    mean: Optional[float] = None,
    std: Optional[float] = None,
) -> Dict[int, float]:
    """Top-1 accuracy of every exit on uint8 images ``[N, 28, 28]`` (numpy or torch)."""
    import numpy as np
    import torch

    if mean is None or std is None:
        ds = _sibling("datasets")
        FASHION_MNIST_MEAN, FASHION_MNIST_STD = ds.FASHION_MNIST_MEAN, ds.FASHION_MNIST_STD
        mean = FASHION_MNIST_MEAN if mean is None else mean
        std = FASHION_MNIST_STD if std is None else std
    imgs = torch.as_tensor(np.asarray(images))
    lbls = torch.as_tensor(np.asarray(labels)).long()
    correct = {b: 0 for b in exits}
    with torch.inference_mode():
        for i in range(0, len(imgs), batch_size):
            x = imgs[i:i + batch_size].float().div_(255.0).sub_(mean).div_(std).unsqueeze(1)
            y = lbls[i:i + batch_size]
            for b, logits in exit_logits(model, exits, x).items():
                correct[b] += int((logits.argmax(-1) == y).sum())
    return {b: correct[b] / len(imgs) for b in sorted(correct)}


def convert_reference(out: Union[str, Path], policy="fp32", path: Union[str, Path, None] = None) -> Path:
    """Convert the reference checkpoint (exit heads and normalisation included) to a pyruntime
    model file under ``policy`` (a Policy, a policy JSON path or a shorthand). Needs torch."""
    from .convert import convert

    path = Path(path) if path is not None else reference_path()
    meta = read_metadata(path)
    model = build_timm_model(meta["timm_kwargs"])
    return convert(model, out, checkpoint=path, policy=policy, preprocess={"mean": meta["mean"], "std": meta["std"]})
