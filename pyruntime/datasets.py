"""Real data sets used by tests, examples and the shipped reference model.

NumPy only (no torch): this module must import on a bare install.

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package, which
installs the four original IDX files (gzip-compressed) under
``/usr/share/datasets/fashion-mnist/``.  The directory can be overridden with
the ``PYRUNTIME_FASHION_MNIST_DIR`` environment variable.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import Tuple

import numpy as np

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "FASHION_MNIST_DEFAULT_DIR",
    "FASHION_MNIST_ENV",
    "fashion_mnist",
    "fashion_mnist_dir",
    "normalize_fashion_mnist",
]

FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "PYRUNTIME_FASHION_MNIST_DIR"

#: Class names, index = label.
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

#: Mean / std of the 60,000 training images after scaling pixels to [0, 1]
#: (single channel).  Inputs to the reference model are ``(x/255 - MEAN) / STD``.
#: Computed exactly over the training split (see tests/test_train_reference.py).
FASHION_MNIST_MEAN = 0.2860405969887955
FASHION_MNIST_STD = 0.35302424451492254

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}

_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dims
_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dim


def fashion_mnist_dir() -> Path:
    """Directory holding the Fashion-MNIST IDX files (env override honoured)."""
    d = Path(os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DEFAULT_DIR)
    if not d.is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST directory not found: {d} "
            f"(set {FASHION_MNIST_ENV} to another directory, or "
            "install it with: apt-get install dataset-fashion-mnist)"
        )
    return d


def _read_gz(path: Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST file missing: {path} "
            "(install it with: apt-get install dataset-fashion-mnist)"
        )
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"corrupt Fashion-MNIST file {path}: {e}") from e


def _parse_idx(data: bytes, path: Path, magic: int, ndim: int, count: int) -> np.ndarray:
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"corrupt Fashion-MNIST file {path}: truncated header ({len(data)} bytes)")
    got_magic = int.from_bytes(data[0:4], "big")
    if got_magic != magic:
        raise ValueError(
            f"corrupt Fashion-MNIST file {path}: bad magic 0x{got_magic:08x}, expected 0x{magic:08x}"
        )
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if dims[0] != count:
        raise ValueError(f"corrupt Fashion-MNIST file {path}: {dims[0]} items, expected {count}")
    if ndim == 3 and dims[1:] != (28, 28):
        raise ValueError(f"corrupt Fashion-MNIST file {path}: image size {dims[1:]}, expected (28, 28)")
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise ValueError(
            f"corrupt Fashion-MNIST file {path}: {len(data) - header} payload bytes, expected {expected}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def fashion_mnist(split: str = "train") -> Tuple[np.ndarray, np.ndarray]:
    """Load a Fashion-MNIST split.

    Returns ``(images, labels)``: ``uint8 [N, 28, 28]`` and ``int64 [N]``
    with N = 60000 for ``"train"`` and 10000 for ``"test"``.
    """
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
    img_name, lbl_name, n = _FILES[split]
    d = fashion_mnist_dir()
    img_path, lbl_path = d / img_name, d / lbl_name
    images = _parse_idx(_read_gz(img_path), img_path, _IMAGES_MAGIC, 3, n).copy()
    labels = _parse_idx(_read_gz(lbl_path), lbl_path, _LABELS_MAGIC, 1, n).astype(np.int64)
    if labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"corrupt Fashion-MNIST file {lbl_path}: label {labels.max()} out of range")
    return images, labels


def normalize_fashion_mnist(images: np.ndarray) -> np.ndarray:
    """uint8 ``[N, 28, 28]`` → float32 ``[N, 1, 28, 28]`` normalised with the train mean/std."""
    x = np.asarray(images, dtype=np.float32) / 255.0
    x = (x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return x.reshape(x.shape[0], 1, 28, 28) if x.ndim == 3 else x
