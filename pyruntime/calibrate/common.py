"""What every calibration method shares: the calibration images, the model being
calibrated, which layers a method may touch, and the cost (BOPs, bytes or measured latency)
of a policy.

* Calibration data [ours]: at most 1,024 Fashion-MNIST *training* images, a subset drawn
  without replacement by ``numpy.random.default_rng(seed)``, normalised exactly as
  :meth:`pyruntime.runtime.Model.preprocess` does, so the same float32 array feeds the
  runtime and the torch emulation.
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
from ..policy import Policy, check_attn_bits

if TYPE_CHECKING:  # pragma: no cover
    from ..latency import LatencyTable

__all__ = [
    "MAX_CALIBRATION_IMAGES", "COST_KINDS", "COST_UNITS", "LAYER_TYPES", "CalibrationData", "calibration_data",
    "normalize", "Source", "reference_source", "torch_source", "layer_type", "scope_layers",
    "model_graph", "policy_cost", "CostModel", "progress", "run_batches", "resolve_attention",
]

MAX_CALIBRATION_IMAGES = 1024
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


@dataclass
class CalibrationData:
    """Normalised float32 images [N, C, H, W], int64 labels [N], and a summary for the
    policy's provenance (split, seed, count, a hash of the indices)."""

    images: np.ndarray
    labels: np.ndarray
    summary: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def split(self, holdout: float, seed: int = 0) -> Tuple["CalibrationData", "CalibrationData"]:
        """(fit, held-out) by a fixed permutation; ``holdout`` is the held-out fraction."""
        n = len(self)
        k = max(1, int(round(holdout * n)))
        if not 0 < k < n:
            raise ValueError(f"cannot hold out {holdout:.0%} of {n} images")
        perm = np.random.default_rng(seed).permutation(n)
        fit, held = np.sort(perm[k:]), np.sort(perm[:k])
        return (CalibrationData(self.images[fit], self.labels[fit], dict(self.summary, part="fit")),
                CalibrationData(self.images[held], self.labels[held], dict(self.summary, part="held-out")))


@functools.lru_cache(maxsize=1)
def _train_split() -> Tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST's training split, read once per process (read-only arrays)."""
    from ..datasets import fashion_mnist

    images, labels = fashion_mnist("train")
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def calibration_data(n: int = MAX_CALIBRATION_IMAGES, seed: int = 0, mean=None, std=None) -> CalibrationData:
    """``n`` (<= 1,024) Fashion-MNIST training images picked by ``seed``, normalised with
    ``mean``/``std`` (one value or one per channel; default: the training-set statistics the
    reference model uses)."""
    from ..datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD

    if not 1 <= n <= MAX_CALIBRATION_IMAGES:
        raise ValueError(f"calibration uses 1..{MAX_CALIBRATION_IMAGES} images, got {n}")
    images, labels = _train_split()
    pick = np.sort(np.random.default_rng(seed).choice(len(images), n, replace=False))
    mean = [FASHION_MNIST_MEAN] if mean is None else list(np.atleast_1d(mean))
    std = [FASHION_MNIST_STD] if std is None else list(np.atleast_1d(std))
    summary = {"dataset": "fashion-mnist", "split": "train", "images": int(n), "seed": int(seed),
               "indices_sha256": hashlib.sha256(pick.astype("<i8").tobytes()).hexdigest()[:16]}
    return CalibrationData(normalize(images[pick], mean, std), labels[pick].astype(np.int64), summary)


# --- the model being calibrated ------------------------------------------------------------------

@dataclass
class Source:
    """A timm ViT in eval mode plus what :func:`pyruntime.convert` needs to write it."""

    model: "object"
    checkpoint: Optional[Path] = None
    preprocess: Optional[dict] = None
    name: str = "model"

    @property
    def arch(self) -> dict:
        from ..convert import model_arch

        return model_arch(self.model)

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    def layer_names(self) -> List[str]:
        """Every linear layer of the backbone (no exit heads), in execution order."""
        return graph_layer_names({"arch": self.arch, "exits": []})

    def convert(self, out: PathLike, policy: Policy) -> Path:
        from ..convert import convert

        return convert(self.model, out, checkpoint=self.checkpoint, policy=policy, preprocess=self.preprocess)


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


def torch_source(model, preprocess: Optional[Mapping] = None, name: str = "model") -> Source:
    """A timm VisionTransformer already holding its weights (e.g. randomly initialised)."""
    model.eval()
    return Source(model, None, dict(preprocess) if preprocess else None, name)


# --- layers and their types -------------------------------------------------------------------

def layer_type(name: str) -> str:
    """LampQ's type of a linear layer: qkv, proj, fc1, fc2, patch_embed or head (the final
    heads and exit heads)."""
    if name == "patch_embed":
        return "patch_embed"
    for suffix, kind in ((".attn.qkv", "qkv"), (".attn.proj", "proj"), (".mlp.fc1", "fc1"), (".mlp.fc2", "fc2")):
        if name.endswith(suffix):
            return kind
    if name in ("head", "head_dist") or name.startswith("exits."):
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
    graph = {"arch": arch, "exits": [e.to_dict() for e in sorted(policy.exits, key=lambda e: e.block)]}
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
