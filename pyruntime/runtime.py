"""Loading a model file and running images through the compiled executor.

``pyruntime.load(path).run(images)``: numpy in, numpy out, no torch.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional, Union

if TYPE_CHECKING:  # pragma: no cover
    from .imagedata import Preprocess

import numpy as np

from . import _core
from .errors import FormatError
from .modelfile import limits, read_model

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class RunResult:
    """What one :meth:`Model.run` returns, one entry per image.

    ``logits`` float32 [B, classes] from the head that answered; ``exit_block`` int32 [B]: the
    block after which that head sits (``depth - 1`` for the final head); ``bops`` int64 [B]:
    bit operations actually executed for the image; ``stat`` float32 [B]: the scale
    predictor's statistic (NaN without a predictor); ``isa``: the kernel table that ran;
    ``block_path`` uint8 [B, depth]: per block, 0 not run, 1 run at the policy's (full)
    precision, 2 run at the reduced precision a QuEE gate switched the image to;
    ``exit_logits`` float32 [exits, B, classes]: every exit head's logits, only from
    ``run(..., collect_exits=True)``, where no image leaves early;
    ``features`` float32 [B, D]: the pre-logits features of the head that answered -- for the
    final head timm's ``forward_head(x, pre_logits=True)`` (pooled, fc_norm'ed; a distilled
    model: the mean of its class and distillation tokens), for an image that exited early its
    exit head's LayerNorm'ed pooled features;
    ``tokens`` float32 [B, T, D], only from ``run(..., tokens=True)``: timm's
    ``forward_features`` (every token, prefix tokens first, after the final norm); an image that
    exited early gives the tokens after its exit block (``exit_block``), through the final norm.
    An image whose forward pass met a non-finite value has NaN logits, features and tokens.
    """

    logits: np.ndarray
    exit_block: np.ndarray
    bops: np.ndarray
    stat: np.ndarray
    isa: str
    block_path: Optional[np.ndarray] = None
    exit_logits: Optional[np.ndarray] = None
    features: Optional[np.ndarray] = None
    tokens: Optional[np.ndarray] = None

    @property
    def predictions(self) -> np.ndarray:
        return self.logits.argmax(axis=1)


@dataclass
class Model:
    """A loaded model. Create with :func:`load`."""

    path: Path
    graph: dict
    policy_json: str
    provenance: dict
    num_threads: Optional[int]
    isa: Optional[str]
    load_seconds: float
    _executor: "_core.Executor" = field(repr=False)

    @property
    def arch(self) -> dict:
        return self.graph["arch"]

    @property
    def depth(self) -> int:
        return int(self.arch["depth"])

    @property
    def input_shape(self) -> tuple:
        """(C, H, W) of the float input :meth:`run` takes."""
        a = self.arch
        return (int(a["in_chans"]), int(a["img_size"][0]), int(a["img_size"][1]))

    @property
    def weight_bytes(self) -> int:
        return int(self._executor.weight_bytes)

    @property
    def preprocessing(self) -> "Preprocess":
        """The file's :class:`pyruntime.imagedata.Preprocess`: input size, mean/std, and timm's
        eval resize and crop for images of another size."""
        from .imagedata import Preprocess

        return Preprocess.from_dict(self.graph["preprocess"])

    def preprocess(self, images) -> np.ndarray:
        """uint8 images -- [B, H, W, C] (or [B, H, W] for one channel), at the model's input
        size or any other (resized and centre-cropped as timm's eval transform does, the file's
        ``crop_pct`` and interpolation; needs Pillow), or a list of such images of mixed
        sizes -- to the normalised float32 [B, C, H, W] the network takes."""
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # reported just below
            x = self.preprocessing(images)
        if not np.isfinite(x).all():
            pre = self.graph["preprocess"]
            raise ValueError(f"preprocessing with the file's mean {pre.get('mean')} and std {pre.get('std')} "
                             "gives NaN or Inf")
        return x

    def _check_input(self, x) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            raise TypeError(f"images must be a numpy.ndarray, got {type(x).__name__}")
        x = np.asarray(x)  # the data of a masked array: its mask must not hide a NaN
        if x.dtype == np.uint8:
            return self.preprocess(x)
        if x.dtype != np.float32:
            raise TypeError(f"images must be float32 [B, C, H, W] (normalised) or uint8 [B, H, W, C]; got {x.dtype}")
        C, H, W = self.input_shape
        if x.ndim != 4 or x.shape[1:] != (C, H, W):
            raise ValueError(f"float32 images must have shape [B, {C}, {H}, {W}], got {list(x.shape)}")
        if not np.isfinite(x).all():
            raise ValueError("images contain NaN or Inf")
        return np.ascontiguousarray(x)

    def run(self, x: np.ndarray, *, num_threads: Optional[int] = None, isa: Optional[str] = None,
            collect_exits: bool = False, tokens: bool = False) -> RunResult:
        """Run a batch. ``x``: float32 [B, C, H, W] already normalised, or uint8 [B, H, W, C]
        (any H, W: see :meth:`preprocess`).

        ``collect_exits=True`` evaluates every exit head without letting any image leave and
        returns their logits in ``exit_logits`` (for calibrating thresholds); QuEE gates then
        decide nothing either, so every image runs every block at full precision.
        ``tokens=True`` also returns every token (:class:`RunResult`), for dense heads.
        """
        x = self._check_input(x)
        threads = num_threads if num_threads is not None else self.num_threads
        _check_threads(threads)
        out = self._executor.run(x, None if threads is None else int(threads), isa or self.isa, bool(collect_exits),
                                 bool(tokens))
        return RunResult(out["logits"], out["exit_block"], out["bops"], out["stat"], out["isa"],
                         out["block_path"], out.get("exit_logits"), out["features"], out.get("tokens"))

    def profile(self, on: bool = True) -> None:
        """Start (or stop) accumulating per-op time; read it with :meth:`layer_times`."""
        self._executor.reset_profile()
        self._executor.set_profiling(on)

    def layer_times(self) -> Dict[str, float]:
        """Seconds per op since :meth:`profile` was turned on."""
        return dict(self._executor.profile())


def _check_threads(n) -> None:
    """``None`` (the pool's default) or a thread count within the runtime's limit."""
    if n is None:
        return
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"num_threads must be a positive int, got {n!r}")
    cap = limits()["max_threads"]
    if n > cap:
        raise ValueError(f"num_threads {n} exceeds the runtime's limit max_threads={cap}")


def load(path: PathLike, num_threads: Optional[int] = None, isa: Optional[str] = None) -> Model:
    """Load a model file (memory-mapped, validated) and pack its weights for this CPU.

    Raises :class:`pyruntime.FormatError` naming the problem for a file that is not a valid
    pyruntime model (truncated, corrupt, newer format version, inconsistent graph).
    """
    _check_threads(num_threads)
    if isa is not None and isa not in _core.available_isas():
        raise ValueError(f"ISA '{isa}' is not available here (available: {', '.join(_core.available_isas())})")
    path = Path(path)
    t0 = time.perf_counter()
    graph, tensors, policy_json, provenance = read_model(path)
    try:
        executor = _core.Executor(graph, tensors)
    except ValueError as e:
        raise FormatError(f"{path}: {e}") from None
    return Model(path, graph, policy_json, provenance, num_threads, isa, time.perf_counter() - t0, executor)
