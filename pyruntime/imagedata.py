"""Labelled images from a user's folder or ``.npz``, prepared exactly as the model expects.

One implementation (numpy + Pillow) used by calibration, ``pyruntime eval``, ``pyruntime run``
and :meth:`pyruntime.Model.run`, so calibration sees exactly what inference sees:

* :class:`Preprocess` is what a model file records (``graph.preprocess``): the input size,
  mean and std, and timm's eval transform for images of another size (``crop_pct``,
  ``interpolation``, ``crop_mode``). Images already at the input size are used as they are;
  any other size is resized and cropped the way timm's ``transforms_imagenet_eval`` does
  (``crop_mode`` ``center``: the shorter side to ``size / crop_pct``, or both sides scaled by
  the smaller ratio for a non-square input, then a centre crop; ``squash``: both sides to
  ``size / crop_pct``, then a centre crop), with Pillow's resampling as torchvision applies it
  to PIL images -- so the pixels are timm's, bit for bit.
* :func:`read_dataset` reads an image folder (one sub-folder per class, classes sorted by
  name as torchvision's ``ImageFolder`` does) or an ``.npz`` holding ``images`` (uint8
  [N, H, W, C] or [N, H, W]) and ``labels`` (integers [N]), and keeps the prepared images as
  uint8 at the model's input size: 10,000 images at 3 x 224 x 224 take 1.5 GB, and the
  float32 batches a consumer needs are made per batch (:meth:`LabelledImages.batch`).

Every problem with the data is a :class:`DataError` naming the file and what is wrong.
Pillow is needed to decode image files and to resize; arrays already at the input size need
numpy only.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import require_extra

__all__ = ["DataError", "Preprocess", "LabelledImages", "read_dataset", "IMAGE_EXTENSIONS", "INTERPOLATIONS"]

PathLike = Union[str, "os.PathLike[str]"]

# torchvision's ImageFolder extensions.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
CROP_MODES = ("center", "squash")


class DataError(ValueError):
    """Images or labels that cannot be used: the message names the file and the problem."""


def _pil():
    require_extra("images", "reading or resizing images")
    from PIL import Image

    return Image


@dataclass(frozen=True)
class Preprocess:
    """How raw uint8 images become the network's normalised float32 input.

    ``input_size`` (C, H, W); ``mean``/``std`` per channel, applied to pixels / 255;
    ``crop_pct``, ``interpolation`` and ``crop_mode`` describe timm's eval transform for
    images of another size."""

    input_size: Tuple[int, int, int]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    crop_pct: float = 1.0
    interpolation: str = "bilinear"
    crop_mode: str = "center"

    def __post_init__(self):
        C = self.input_size[0]
        if len(self.mean) != C or len(self.std) != C:
            raise ValueError(f"mean and std need {C} values each, got {list(self.mean)} and {list(self.std)}")
        if not (math.isfinite(self.crop_pct) and 0.05 <= self.crop_pct <= 4.0):
            raise ValueError(f"crop_pct must be in [0.05, 4], got {self.crop_pct}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode must be one of {CROP_MODES}, got {self.crop_mode!r}")

    @property
    def channels(self) -> int:
        return self.input_size[0]

    @property
    def size(self) -> Tuple[int, int]:
        return self.input_size[1], self.input_size[2]

    # --- the model file's record --------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Mapping) -> "Preprocess":
        """From ``graph.preprocess`` (files before the resize keys: no resizing recorded, so
        crop_pct 1 and bilinear, timm's defaults for a model without a pretrained config)."""
        return cls(tuple(int(v) for v in d["input_size"]), tuple(float(v) for v in d["mean"]),
                   tuple(float(v) for v in d["std"]), float(d.get("crop_pct", 1.0)),
                   str(d.get("interpolation", "bilinear")), str(d.get("crop_mode", "center")))

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std), "input_size": list(self.input_size),
                "crop_pct": self.crop_pct, "interpolation": self.interpolation, "crop_mode": self.crop_mode}

    @classmethod
    def from_timm(cls, model) -> "Preprocess":
        """timm's eval transform for ``model``, at its real input size (after ``img_size``
        overrides: the patch embedding's, not the pretrained config's default)."""
        from timm.data import resolve_model_data_config

        cfg = resolve_model_data_config(model)
        C = int(getattr(model.patch_embed.proj, "in_channels", cfg["input_size"][0]))
        H, W = (int(v) for v in model.patch_embed.img_size)
        mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
        if len(mean) != C:  # a one-channel model under a three-channel default config
            mean, std = (float(np.mean(mean)),) * C, (float(np.mean(std)),) * C
        mode = cfg.get("crop_mode") or "center"
        return cls((C, H, W), tuple(float(v) for v in mean), tuple(float(v) for v in std),
                   float(cfg.get("crop_pct") or 0.875), str(cfg.get("interpolation") or "bilinear"), mode)

    # --- images ---------------------------------------------------------------------------------

    def resize_crop(self, image: np.ndarray) -> np.ndarray:
        """One uint8 image [h, w, C] to [H, W, C]: as it is when already that size, else timm's
        eval resize and centre crop."""
        H, W = self.size
        if image.shape[:2] == (H, W):
            return image
        Image = _pil()
        filt = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "box": Image.BOX,
                "hamming": Image.HAMMING, "lanczos": Image.LANCZOS}[self.interpolation]
        h, w = image.shape[:2]
        scale = (math.floor(H / self.crop_pct), math.floor(W / self.crop_pct))
        if self.crop_mode == "squash":
            new_h, new_w = scale
        elif scale[0] == scale[1]:  # torchvision Resize(int): the shorter side to that size
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = scale[0], int(scale[0] * long / short)
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        else:  # timm's ResizeKeepRatio: both sides by the smaller ratio
            ratio = min(h / scale[0], w / scale[1])
            new_h, new_w = round(h / ratio), round(w / ratio)
        pil = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)
        out = np.asarray(pil.resize((new_w, new_h), filt))
        out = out[..., None] if out.ndim == 2 else out
        return _center_crop(out, H, W)

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, C] at the input size -> normalised float32 [N, C, H, W]."""
        C = self.channels
        m = np.asarray(self.mean, np.float32).reshape(1, C, 1, 1)
        s = np.asarray(self.std, np.float32).reshape(1, C, 1, 1)
        x = images.transpose(0, 3, 1, 2).astype(np.float32) * np.float32(1 / 255)
        return np.ascontiguousarray((x - m) / s, dtype=np.float32)

    def __call__(self, images: Union[np.ndarray, Sequence[np.ndarray]]) -> np.ndarray:
        """uint8 images -- [N, H, W, C] (or [N, H, W] for one channel) of any size, or a list of
        [h, w, C] / [h, w] arrays of mixed sizes -- to the network's float32 [N, C, H, W]."""
        return self.normalize(self.prepare(images))

    def prepare(self, images: Union[np.ndarray, Sequence[np.ndarray]]) -> np.ndarray:
        """uint8 images of any size -> uint8 [N, H, W, C] at the input size."""
        C, H, W = self.input_size
        if isinstance(images, np.ndarray) and images.ndim in (3, 4) and images.dtype == np.uint8:
            arr = images[..., None] if images.ndim == 3 else images
            if arr.shape[-1] != C:
                raise DataError(f"images have {arr.shape[-1]} channels, the model takes {C}")
            if arr.shape[1:3] == (H, W):
                return np.ascontiguousarray(arr)
            images = list(arr)
        if isinstance(images, np.ndarray):
            raise DataError(f"images must be uint8 [N, H, W, {C}] (or a list of uint8 [h, w, {C}] arrays), "
                            f"got {images.dtype} {list(images.shape)}")
        out = np.empty((len(images), H, W, C), np.uint8)
        for i, img in enumerate(images):
            img = np.asarray(img)
            if img.dtype != np.uint8 or img.ndim not in (2, 3):
                raise DataError(f"image {i} must be uint8 [h, w, {C}], got {img.dtype} {list(img.shape)}")
            img = img[..., None] if img.ndim == 2 else img
            if img.shape[2] != C or min(img.shape[:2]) < 1:
                raise DataError(f"image {i} has shape {list(img.shape)}; the model takes {C} channel(s)")
            out[i] = self.resize_crop(img)
        return out


def _center_crop(img: np.ndarray, H: int, W: int) -> np.ndarray:
    """torchvision's center_crop: zero padding first when the image is smaller."""
    h, w = img.shape[:2]
    if h < H or w < W:
        top, left = max(0, (H - h) // 2), max(0, (W - w) // 2)
        padded = np.zeros((max(h, H), max(w, W), img.shape[2]), img.dtype)
        padded[top:top + h, left:left + w] = img
        img, (h, w) = padded, padded.shape[:2]
    top, left = int(round((h - H) / 2.0)), int(round((w - W) / 2.0))
    return np.ascontiguousarray(img[top:top + H, left:left + W])


@dataclass
class LabelledImages:
    """Prepared uint8 images [N, H, W, C] at the model's input size, int64 labels [N], class
    names, and a summary for provenance (source, count, a hash of the images and labels)."""

    images: np.ndarray
    labels: np.ndarray
    classes: List[str]
    preprocess: Preprocess
    summary: Dict[str, object] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, lo: int, hi: int) -> np.ndarray:
        """Normalised float32 [hi - lo, C, H, W]."""
        return self.preprocess.normalize(self.images[lo:hi])

    def batches(self, size: int) -> Iterator[Tuple[int, int, np.ndarray]]:
        for lo in range(0, len(self), size):
            hi = min(len(self), lo + size)
            yield lo, hi, self.batch(lo, hi)

    def subset(self, index: np.ndarray, part: str) -> "LabelledImages":
        return LabelledImages(self.images[index], self.labels[index], self.classes, self.preprocess,
                              dict(self.summary, part=part, images=int(len(index))))


def read_dataset(path: PathLike, preprocess: Preprocess, num_classes: Optional[int] = None,
                 limit: Optional[int] = None, seed: int = 0) -> LabelledImages:
    """Labelled images from an image folder or an ``.npz``, prepared for ``preprocess``.

    ``num_classes``: labels must lie in [0, num_classes) (the model's classes). ``limit``: at
    most that many images, a subset drawn by ``seed`` (sorted, so a folder's order stays)."""
    p = Path(path)
    if p.is_dir():
        images, labels, classes = _read_folder(p, preprocess, limit, seed)
    elif p.is_file() and p.suffix.lower() == ".npz":
        images, labels, classes = _read_npz(p, preprocess, limit, seed)
    elif p.exists():
        raise DataError(f"{p}: data must be an image folder (one sub-folder per class) or an .npz with "
                        f"'images' and 'labels'")
    else:
        raise DataError(f"{p}: no such folder or file")
    if num_classes is not None and len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{p}: labels must lie in [0, {num_classes}) for this model's {num_classes} classes; "
                        f"they span [{labels.min()}, {labels.max()}]")
    digest = hashlib.sha256(memoryview(np.ascontiguousarray(images)).cast("B")).hexdigest()[:16]
    summary = {"dataset": str(p), "images": int(len(labels)), "classes": len(classes),
               "sha256": digest, "seed": int(seed)}
    return LabelledImages(images, labels, classes, preprocess, summary)


def _pick(n: int, limit: Optional[int], seed: int) -> np.ndarray:
    if limit is None or limit >= n:
        return np.arange(n)
    if limit < 1:
        raise DataError(f"a limit of {limit} images leaves none")
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def _read_folder(root: Path, pre: Preprocess, limit, seed) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class sub-folders (an image folder holds one sub-folder per class)")
    files: List[Tuple[Path, int]] = []
    for label, name in enumerate(classes):
        found = sorted(f for f in (root / name).rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        files += [(f, label) for f in found]
    if not files:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
    if len(classes) < 2:
        raise DataError(f"{root}: only one class ({classes[0]!r}); classification data needs at least two")
    pick = _pick(len(files), limit, seed)
    Image = _pil()
    C, H, W = pre.input_size
    images = np.empty((len(pick), H, W, C), np.uint8)
    for j, i in enumerate(pick):
        images[j] = pre.resize_crop(_decode(files[i][0], C, Image))
    labels = np.array([files[i][1] for i in pick], np.int64)
    return images, labels, classes


def _decode(path: Path, channels: int, Image) -> np.ndarray:
    """An image file as uint8 [h, w, channels]: RGB models take any image as torchvision's
    loader does (``convert("RGB")``: gray is replicated); a one-channel model takes gray
    images only (turning colour into gray would be a guess the user should make)."""
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if channels == 3:
                arr = np.asarray(im.convert("RGB"))
            elif channels == 1:
                if mode not in ("1", "L", "LA", "I;16", "I"):
                    raise DataError(f"{path}: a {mode} (colour) image, but the model takes 1 channel (gray)")
                arr = np.asarray(im.convert("L"))[..., None]
            else:
                raise DataError(f"{path}: image files give 1 or 3 channels; the model takes {channels}")
    except DataError:
        raise
    except Exception as e:  # PIL's UnidentifiedImageError, truncated data, OSError
        raise DataError(f"{path}: cannot read the image ({type(e).__name__}: {e})") from None
    if min(arr.shape[:2]) < 1:
        raise DataError(f"{path}: an empty image")
    return arr


def _read_npz(path: Path, pre: Preprocess, limit, seed) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            if "images" not in keys or "labels" not in keys:
                raise DataError(f"{path}: an .npz needs arrays 'images' (uint8 [N, H, W, C]) and 'labels' "
                                f"(integers [N]); it has {sorted(keys)}")
            images, labels = z["images"], z["labels"]
            classes = [str(c) for c in z["classes"]] if "classes" in keys else None
    except DataError:
        raise
    except Exception as e:  # not a zip, object arrays (allow_pickle=False), truncated
        raise DataError(f"{path}: cannot read the .npz ({type(e).__name__}: {e})") from None
    C = pre.channels
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise DataError(f"{path}: 'images' must be uint8 [N, H, W, {C}], got {images.dtype} {list(images.shape)}")
    images = images[..., None] if images.ndim == 3 else images
    if images.shape[-1] != C:
        raise DataError(f"{path}: images have {images.shape[-1]} channel(s), the model takes {C}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape != (len(images),):
        raise DataError(f"{path}: 'labels' must be integers [N] with N = {len(images)}, got {labels.dtype} "
                        f"{list(labels.shape)}")
    if len(images) == 0:
        raise DataError(f"{path}: no images")
    labels = labels.astype(np.int64)
    if len(np.unique(labels)) < 2:
        raise DataError(f"{path}: only one class; classification data needs at least two")
    if limit is not None and limit < len(images):  # no copy of the whole set without a limit
        pick = _pick(len(images), limit, seed)
        images, labels = images[pick], labels[pick]
    if classes is None:
        classes = [str(c) for c in range(int(labels.max()) + 1)]
    return pre.prepare(images), labels, classes
