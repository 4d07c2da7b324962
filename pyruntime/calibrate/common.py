"""What every calibration method shares: the calibration images, the model being
calibrated, which layers a method may touch, and the cost (BOPs, bytes or measured latency)
of a policy.

* Calibration data [ours]: for the reference model, Fashion-MNIST *training* images (1,024
  by default), a subset drawn without replacement by ``numpy.random.default_rng(seed)``,
  normalised exactly as :meth:`pyruntime.runtime.Model.preprocess` does, so the same float32
  array feeds the runtime and the torch emulation. For any other model, the user's image
  folder or ``.npz`` (:func:`user_calibration_data`), prepared by
  :mod:`pyruntime.imagedata` with the preprocessing the converted file records and kept as
  uint8: :class:`NormalisedImages` hands out float32 per batch, so memory grows with
  N x C x H x W *bytes*, not four times that.
* A :class:`Source` is the torch model plus how to convert it (checkpoint, mean/std);
  :func:`reference_source` builds it from a reference-format checkpoint (the shipped one by
  default, or one written by ``tools/train_reference.py --tiny``).
* Costs are those of ``pyruntime.bops`` (BOPs = MACs x b_w x b_a, fp32 = 32 x 32), of
  the model file (bytes of every tensor the converted file holds) and of a
  :class:`pyruntime.latency.LatencyTable` measured on the device (seconds per image at
  batch 1, ``pyruntime bench MODEL --profile --latency-table T.json``); a method's per-layer
  costs plus the fixed rest add up exactly to :func:`policy_cost` of the resulting policy.
* Attention precision: every method takes ``attention`` (32, the default: fp32 attention
  matmuls; 8: int8, docs/model_format.md "attention"), emulates it while it measures, writes
  it into the policy (``Policy.attn_bits``) and costs the graph with it: the attention
  matmuls are part of the fixed cost, counted at 8 x 8 BOPs instead of 32 x 32.
"""
from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .. import bops
from ..modelfile import expected_tensors, graph_layer_names, graph_layer_shapes, set_attention_bits
from ..reference import HOLDOUT_IMAGES
from ..policy import Policy, check_attn_bits

if TYPE_CHECKING:  # pragma: no cover
    from ..latency import LatencyTable

__all__ = [
    "DEFAULT_CALIBRATION_IMAGES", "REFERENCE_TRAIN_IMAGES", "REFERENCE_PARTS", "COST_KINDS", "COST_UNITS", "LAYER_TYPES", "CalibrationData", "calibration_data",
    "NormalisedImages", "user_calibration_data", "source_preprocess", "timm_source", "heads_needed",
    "normalize", "Source", "reference_source", "torch_source", "layer_type", "scope_layers",
    "model_graph", "policy_cost", "CostModel", "progress", "run_batches", "resolve_attention",
]

DEFAULT_CALIBRATION_IMAGES = 1024  # the reference model's default count (no upper limit)
REFERENCE_TRAIN_IMAGES = 60000     # Fashion-MNIST's training split
# The reference model never trains on the last reference.HOLDOUT_IMAGES training images; they
# are split in two disjoint halves: "calibration" (fit a policy) and "validation" (choose its
# operating point). The test split only ever reports.
_HOLDOUT_START = REFERENCE_TRAIN_IMAGES - HOLDOUT_IMAGES
REFERENCE_PARTS = {"calibration": (_HOLDOUT_START, _HOLDOUT_START + HOLDOUT_IMAGES // 2),
                   "validation": (_HOLDOUT_START + HOLDOUT_IMAGES // 2, REFERENCE_TRAIN_IMAGES)}
COST_KINDS = ("bops", "bytes", "latency")
COST_UNITS = {"bops": "BOPs", "bytes": "bytes", "latency": "s"}  # what each kind's amounts count
LAYER_TYPES = ("qkv", "proj", "fc1", "fc2", "patch_embed", "head")
SCOPES = ("blocks", "all")
PathLike = Union[str, "os.PathLike[str]"]


# --- progress bars ---------------------------------------------------------------------------

def progress(it: Iterable, desc: str, total: Optional[int] = None, enabled: bool = True):
    """A tqdm bar on stderr (if tqdm is installed and ``enabled``), else the iterable."""
    if not enabled or os.environ.get("PYRUNTIME_NO_PROGRESS"):
        return it
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return it
    return tqdm(it, desc=desc, total=total, leave=False, mininterval=1.0)


def batches(n: int, size: int) -> List[Tuple[int, int]]:
    return [(i, min(n, i + size)) for i in range(0, n, size)]


# --- calibration data --------------------------------------------------------------------------

def normalize(images_u8: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 [N, H, W] or [N, H, W, C] to float32 [N, C, H, W], bit for bit as the runtime's
    ``Model.preprocess``."""
    x = images_u8[..., None] if images_u8.ndim == 3 else images_u8
    C = x.shape[-1]
    m = np.asarray(mean, np.float32).reshape(1, C, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, C, 1, 1)
    x = x.transpose(0, 3, 1, 2).astype(np.float32) * np.float32(1 / 255)
    return np.ascontiguousarray((x - m) / s, dtype=np.float32)


class NormalisedImages:
    """A read-only float32 [N, C, H, W] view of uint8 images [M, H, W, C] (rows ``index``):
    slicing or indexing with an integer array normalises just those images (``normalize``),
    so a method's ``images[lo:hi]`` costs one batch of float32, never the whole set."""

    def __init__(self, raw: np.ndarray, mean: Sequence[float], std: Sequence[float],
                 index: Optional[np.ndarray] = None):
        if raw.dtype != np.uint8 or raw.ndim != 4:
            raise ValueError(f"raw images must be uint8 [N, H, W, C], got {raw.dtype} {list(raw.shape)}")
        self.raw, self.mean, self.std = raw, list(mean), list(std)
        self.index = np.arange(len(raw)) if index is None else np.asarray(index, np.int64)

    dtype = np.dtype(np.float32)
    ndim = 4

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        _, H, W, C = self.raw.shape
        return len(self.index), C, H, W

    @property
    def nbytes_raw(self) -> int:
        return int(self.raw.nbytes)

    def __len__(self) -> int:
        return len(self.index)

    def take(self, rows: np.ndarray) -> "NormalisedImages":
        """The lazy view of ``rows`` (positions in this view)."""
        return NormalisedImages(self.raw, self.mean, self.std, self.index[np.asarray(rows, np.int64)])

    def __getitem__(self, key):
        if isinstance(key, tuple):
            return self[key[0]][(slice(None),) + key[1:]] if not np.isscalar(key[0]) else self[key[0]][key[1:]]
        if isinstance(key, (int, np.integer)):
            return normalize(self.raw[self.index[key]][None], self.mean, self.std)[0]
        return normalize(self.raw[self.index[key]], self.mean, self.std)

    def __array__(self, dtype=None, copy=None):
        x = self[:]
        return x if dtype is None else x.astype(dtype)


@dataclass
class CalibrationData:
    """Normalised float32 images [N, C, H, W] -- an array, or a :class:`NormalisedImages`
    view that normalises per slice -- int64 labels [N], and a summary for the policy's
    provenance (data set, seed, count, a hash)."""

    images: Union[np.ndarray, NormalisedImages]
    labels: np.ndarray
    summary: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, lo: int, hi: int) -> np.ndarray:
        """float32 images ``lo:hi`` (what :func:`pyruntime.exits.fit_exit_heads` reads)."""
        return np.asarray(self.images[lo:hi], np.float32)

    def take(self, rows: np.ndarray, part: str) -> "CalibrationData":
        rows = np.asarray(rows, np.int64)
        images = self.images.take(rows) if isinstance(self.images, NormalisedImages) else self.images[rows]
        return CalibrationData(images, self.labels[rows], dict(self.summary, part=part))

    def split_rows(self, holdout: float, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
        """(fit rows, held-out rows), sorted, by a fixed permutation; ``holdout`` is the
        held-out fraction."""
        n = len(self)
        k = max(1, int(round(holdout * n)))
        if not 0 < k < n:
            raise ValueError(f"cannot hold out {holdout:.0%} of {n} images")
        perm = np.random.default_rng(seed).permutation(n)
        return np.sort(perm[k:]), np.sort(perm[:k])

    def split(self, holdout: float, seed: int = 0) -> Tuple["CalibrationData", "CalibrationData"]:
        """(fit, held-out) by :meth:`split_rows`."""
        fit, held = self.split_rows(holdout, seed)
        return self.take(fit, "fit"), self.take(held, "held-out")


@functools.lru_cache(maxsize=1)
def _train_split() -> Tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST's training split, read once per process (read-only arrays)."""
    from ..datasets import fashion_mnist

    images, labels = fashion_mnist("train")
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def calibration_data(n: int = DEFAULT_CALIBRATION_IMAGES, seed: int = 0, mean=None, std=None,
                     part: str = "calibration") -> CalibrationData:
    """``n`` Fashion-MNIST training images of ``part`` (:data:`REFERENCE_PARTS`: images the
    reference model was not trained on) picked by ``seed``, normalised with ``mean``/``std``
    (one value or one per channel; default: the training-set statistics the reference model
    uses). A float32 array: 3 KB per 28 x 28 image."""
    from ..datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD

    if part not in REFERENCE_PARTS:
        raise ValueError(f"part must be one of {sorted(REFERENCE_PARTS)}, got {part!r}")
    lo, hi = REFERENCE_PARTS[part]
    images, labels = _train_split()
    if not 1 <= n <= hi - lo:
        raise ValueError(f"the {part} part has {hi - lo} Fashion-MNIST training images "
                         f"({lo}..{hi - 1}); asked for {n}")
    pick = lo + np.sort(np.random.default_rng(seed).choice(hi - lo, n, replace=False))
    mean = [FASHION_MNIST_MEAN] if mean is None else list(np.atleast_1d(mean))
    std = [FASHION_MNIST_STD] if std is None else list(np.atleast_1d(std))
    summary = {"dataset": "fashion-mnist", "split": "train", "part": part, "range": [lo, hi], "images": int(n),
               "seed": int(seed), "indices_sha256": hashlib.sha256(pick.astype("<i8").tobytes()).hexdigest()[:16]}
    return CalibrationData(normalize(images[pick], mean, std), labels[pick].astype(np.int64), summary)


def source_preprocess(source: "Source"):
    """The :class:`pyruntime.imagedata.Preprocess` the converted file will record for
    ``source`` (convert's own resolution of timm's data config and the source's override), so
    calibration sees exactly the pixels inference sees."""
    from ..convert import _preprocess
    from ..imagedata import Preprocess

    return Preprocess.from_dict(_preprocess(source.model, source.arch, source.preprocess))


def user_calibration_data(path: PathLike, source: "Source", n: Optional[int] = None, seed: int = 0) -> CalibrationData:
    """The user's labelled images (an image folder, one sub-folder per class, or an ``.npz``
    with ``images`` and ``labels``) prepared for ``source``: at most ``n`` of them drawn by
    ``seed`` (all by default). Kept as uint8 at the model's input size (N x C x H x W bytes);
    the float32 images are made per batch. Bad data is a :class:`pyruntime.imagedata.DataError`."""
    from ..imagedata import read_dataset

    pre = source_preprocess(source)
    li = read_dataset(path, pre, num_classes=source.arch["num_classes"], limit=n, seed=seed)
    view = NormalisedImages(li.images, pre.mean, pre.std)
    summary = dict(li.summary, class_names=list(li.classes)[:64])
    return CalibrationData(view, li.labels.astype(np.int64), summary)


# --- the model being calibrated ------------------------------------------------------------------

@dataclass
class Source:
    """A timm ViT in eval mode plus what :func:`pyruntime.convert` needs to write it."""

    model: "object"
    checkpoint: Optional[Path] = None
    preprocess: Optional[dict] = None
    name: str = "model"
    exits: "object" = None   # exit heads as convert takes them (a file or {block: params}); None: the checkpoint's
    notes: List[str] = field(default_factory=list)   # what loading adapted (e.g. resampled position embeddings)
    # the converter's program of the model, without exits ({"arch", "exits", "ops"}); the same
    # before and after fusing (convert reads both forms)
    program: dict = field(init=False, repr=False)

    def __post_init__(self):
        from ..convert import fuse_projections, program_graph, require_classifier

        # an unsupported family (or a feature extractor) is named before anything changes the model
        self.program = program_graph(self.model)
        require_classifier(self.program["arch"], self.model)
        fuse_projections(self.model)  # every layer one module the methods can hook

    @property
    def arch(self) -> dict:
        return self.program["arch"]

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    def layer_names(self) -> List[str]:
        """Every linear layer of the backbone (no exit heads), in execution order."""
        return graph_layer_names(self.program)

    def convert(self, out: PathLike, policy: Policy) -> Path:
        from ..convert import convert

        return convert(self.model, out, checkpoint=self.checkpoint, policy=policy, preprocess=self.preprocess,
                       exits=self.exits)

    def exit_head_blocks(self) -> List[int]:
        """Blocks with exit-head weights: those of ``exits``, else the checkpoint's ``exits.*``
        keys (none without either)."""
        if isinstance(self.exits, Mapping):
            return sorted(int(b) for b in self.exits)
        if self.exits is not None:
            return sorted(_exit_keys_blocks(Path(self.exits)))
        if self.checkpoint is None:
            return []
        return sorted(_exit_keys_blocks(Path(self.checkpoint)))


def _exit_keys_blocks(path: Path) -> set:
    """Blocks b with ``exits.<b>.*`` keys in a state-dict file (safetensors: the keys alone)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "np") as f:
                keys = list(f.keys())
        except Exception as e:  # safetensors' own errors, OSError
            raise ValueError(f"{path}: cannot read its tensor names ({type(e).__name__}: {e})") from None
    else:
        from ..convert import _read_state_dict

        keys = list(_read_state_dict(path))
    return {int(k.split(".")[1]) for k in keys if k.startswith("exits.") and k.split(".")[1].isdigit()}


def heads_needed(source: Source, blocks: Sequence[int], method: str) -> None:
    """ValueError (one line) unless ``source`` has exit heads at every block of ``blocks``."""
    have = set(source.exit_head_blocks())
    missing = [b for b in blocks if b not in have]
    if missing:
        raise ValueError(f"{method} needs exit heads at blocks {list(blocks)}; the model has none at {missing} "
                         f"(heads at {sorted(have) or 'no block'}): fit them with `pyruntime exits fit MODEL "
                         f"--checkpoint C --data D --blocks {','.join(map(str, missing))} --out heads.safetensors` "
                         f"and pass --exits heads.safetensors, or choose --exit-blocks among {sorted(have)}")


def reference_source(path: Optional[PathLike] = None) -> Source:
    """The reference model (or any checkpoint in its format) as a calibration source."""
    from ..reference import load_reference_timm, read_metadata, reference_path

    path = Path(path) if path is not None else reference_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"reference checkpoint not found: {path} (train one with tools/train_reference.py, "
            f"or pass --checkpoint)")
    meta = read_metadata(path)
    model, _ = load_reference_timm(path)
    return Source(model, path, {"mean": meta["mean"], "std": meta["std"]}, name=path.stem)


def timm_source(name: str, model_kwargs: Optional[Mapping] = None, checkpoint: Optional[PathLike] = None,
                random_weights: bool = False, exits: Optional[PathLike] = None) -> Source:
    """A user's timm ViT (:func:`pyruntime.convert.load_timm`) as a calibration source: the
    checkpoint's weights (or, asked for, timm's random ones), exit heads from ``exits`` (a
    safetensors file of ``exits.<b>.*``) or else the checkpoint's, and timm's eval
    preprocessing, as :func:`pyruntime.convert.convert` records it."""
    from ..convert import _exit_heads, _read_exit_file, load_timm

    model, ckpt_heads, notes = load_timm(name, model_kwargs, checkpoint, random_weights)
    # the Source names an unsupported family before the exit file is read
    src = Source(model.eval(), Path(checkpoint) if checkpoint is not None else None, None, name=name,
                 notes=list(notes))
    heads = _read_exit_file(exits) if exits is not None else ckpt_heads
    src.exits = _exit_heads(heads, src.arch) or None  # shapes checked now, not in the middle of a method
    return src


def torch_source(model, preprocess: Optional[Mapping] = None, name: str = "model") -> Source:
    """A timm ViT (any family :func:`pyruntime.convert.convert` takes, with class logits)
    already holding its weights (e.g. randomly initialised). Its split projections are fused
    in place (:func:`pyruntime.convert.fuse_projections`: same function, one module per layer)."""
    model.eval()
    return Source(model, None, dict(preprocess) if preprocess else None, name)


# --- layers and their types -------------------------------------------------------------------

def layer_type(name: str) -> str:
    """LampQ's type of a linear layer: qkv, proj, fc1, fc2, patch_embed or head (the final
    heads, exit heads and an attention-pooling head's layers). A block's layers are typed by
    their last two names in every family: parallel branches' ``attns.<j>.attn.qkv`` is a qkv;
    a SwiGLU's gate and value projections are one fc1 (the converter stacks them: one GEMM,
    one precision)."""
    if name == "patch_embed":
        return "patch_embed"
    if name.startswith("blocks."):
        for suffix, kind in ((".attn.qkv", "qkv"), (".attn.proj", "proj"), (".mlp.fc1", "fc1"), (".mlp.fc2", "fc2")):
            if name.endswith(suffix):
                return kind
    if name in ("head", "head_dist") or name.startswith(("exits.", "attn_pool.")):
        return "head"
    raise ValueError(f"{name!r} is not a linear layer name")


def scope_layers(names: Sequence[str], scope: str) -> List[str]:
    """The layers a method allocates: ``blocks`` (qkv, proj, fc1, fc2 of every block; the
    patch embedding and heads stay fp32, as usual for ViT PTQ) or ``all``."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if scope == "all":
        return list(names)
    return [n for n in names if n.startswith("blocks.")]


# --- costs ----------------------------------------------------------------------------------------

def model_graph(source: Source, policy: Policy) -> dict:
    """The graph the converter would write for ``policy`` (no tensors), for BOPs and bytes."""
    arch = source.arch
    graph = {**source.program, "exits": [e.to_dict() for e in sorted(policy.exits, key=lambda e: e.block)]}
    layers = policy.resolve(graph_layer_names(graph), arch["depth"])
    C = arch["in_chans"]
    graph.update(layers={k: v.to_dict() for k, v in layers.items()},
                 preprocess={"mean": [0.0] * C, "std": [1.0] * C, "input_size": [C, *arch["img_size"]]},
                 predictor=None if policy.predictor is None else policy.predictor.to_dict())
    if policy.gates is not None:
        from ..convert import gates_graph

        graph["gates"] = gates_graph(policy, graph_layer_names(graph), arch)
    return set_attention_bits(graph, policy.attn_bits)


def resolve_attention(base: Policy, attention: Optional[int], what: str = "base policy") -> int:
    """The attention bits of a method that starts from ``base``: ``attention`` when given
    (8 or 32), else the base's. A base with int8 attention and an explicit 32 conflict (a base
    at fp32 attention, the policy default, takes an explicit 8): ValueError naming both."""
    if attention is None:
        return base.attn_bits
    attention = check_attn_bits(attention)
    if base.attn_bits != 32 and attention != base.attn_bits:
        raise ValueError(f"attention bits {attention} conflict with the {what} {base.name!r}, whose attention is "
                         f"{base.attn_bits}-bit; pass attention {base.attn_bits} or leave it out")
    return attention


def _has_bias(source: Source, name: str) -> bool:
    if name.startswith("exits."):
        return True  # exit heads are LayerNorm + Linear with bias, from the checkpoint or ``exits``
    mod = source.model.patch_embed.proj if name == "patch_embed" else source.model.get_submodule(name)
    return getattr(mod, "bias", None) is not None


def _tensor_bytes(graph: Mapping, source: Source) -> Dict[str, int]:
    """Bytes of every tensor the converted file holds (optional biases when the model has them)."""
    out = {}
    for name, spec in expected_tensors(graph).items():
        if not spec.required and not _has_bias(source, name[: -len(".bias")]):
            continue
        out[name] = int(np.prod(spec.shape)) * spec.dtype.itemsize
    return out


def _check_kind(kind: str, table: Optional["LatencyTable"]) -> None:
    """A known cost kind, with a latency table exactly when the kind is ``latency``."""
    if kind not in COST_KINDS:
        raise ValueError(f"cost kind must be one of {COST_KINDS}, got {kind!r}")
    if kind == "latency" and table is None:
        raise ValueError("cost kind 'latency' needs a latency table (pyruntime bench MODEL --profile "
                         "--latency-table T.json on an fp32 model file)")
    if kind != "latency" and table is not None:
        raise ValueError(f"a latency table is used by cost kind 'latency' only, not {kind!r}")


def policy_cost(source: Source, policy: Policy, kind: str, table: Optional["LatencyTable"] = None) -> Union[int, float]:
    """BOPs of one image through the whole converted model (``bops.static``), the bytes of
    all tensors in its model file, or its seconds per image from a latency ``table``
    (``LatencyTable.static``: full depth, every exit head evaluated)."""
    _check_kind(kind, table)
    graph = model_graph(source, policy)
    if kind == "bops":
        return bops.static(graph)
    if kind == "bytes":
        return sum(_tensor_bytes(graph, source).values())
    return table.static(graph)


class CostModel:
    """Per-layer cost of (w_bits, a_bits) and the fixed cost of everything else, such that
    ``fixed(layers) + sum(cost(layer, bits))`` equals :func:`policy_cost` exactly.

    Kind ``latency`` takes the seconds of a :class:`~pyruntime.latency.LatencyTable`
    profiled on the source's architecture (``table``); its values lie on a binary grid, so
    the sums are exact in float64 too. Latency depends on the weight bits only (activations
    are int8 in memory whatever ``a_bits``), and int4 was timed at block size 32.
    """

    def __init__(self, source: Source, kind: str, table: Optional["LatencyTable"] = None):
        _check_kind(kind, table)
        self.source, self.kind, self.table = source, kind, table
        fp32 = model_graph(source, Policy(name="fp32"))
        if table is not None:
            table.check(fp32)
        self.macs = bops.layer_macs(fp32)
        self.shapes = graph_layer_shapes(fp32)

    def cost(self, name: str, w_bits: int, a_bits: int, block_size: int = 32) -> Union[int, float]:
        if self.kind == "latency":
            return self.table.layer(name, w_bits, a_bits)
        if self.kind == "bops":
            bits = bops.FP32_BITS if w_bits == 32 else w_bits * a_bits
            return self.macs[name] * bits
        N, K = self.shapes[name]
        if w_bits == 32:
            return 4 * N * K
        if w_bits == 8:
            return N * K + 4 * N
        return N * (-(-K // 2)) + 4 * N * (-(-K // block_size))

    def fixed(self, allocated: Sequence[str], base: Policy) -> Union[int, float]:
        """Cost of ``base`` without the layers in ``allocated``."""
        total = policy_cost(self.source, base, self.kind, self.table)
        layers = base.resolve(self.source.layer_names(), self.source.depth)
        return total - sum(self.cost(n, layers[n].w_bits, layers[n].a_bits, layers[n].block_size) for n in allocated)

    def expected(self, graph: Mapping, reach: Sequence[float]) -> float:
        """Amortised cost per image of ``graph`` (its bits and exits) when a fraction
        ``reach[b]`` of images executes block b: ``bops.expected`` for BOPs, the table's
        ``expected`` for latency. Bytes do not amortise (every image needs the whole file)."""
        if self.kind == "bops":
            return bops.expected(graph, reach)
        if self.kind == "latency":
            return self.table.expected(graph, reach)
        raise ValueError(f"cost kind {self.kind!r} has no expected (reach-weighted) value")

    def unit(self) -> str:
        return COST_UNITS[self.kind]


# --- the runtime on many images -------------------------------------------------------------------

def run_batches(model, images: np.ndarray, batch: int = 500, desc: str = "runtime", enabled: bool = True):
    """Run ``images`` through a loaded runtime model in batches: (logits, exit_block, bops, stat)."""
    outs = [model.run(images[lo:hi]) for lo, hi in progress(batches(len(images), batch), desc,
                                                             enabled=enabled)]
    return (np.concatenate([o.logits for o in outs]), np.concatenate([o.exit_block for o in outs]),
            np.concatenate([o.bops for o in outs]), np.concatenate([o.stat for o in outs]))
