"""Convert a timm Vision Transformer (+ exit heads + a policy) into a pyruntime model file.

``convert(source, out, checkpoint=..., policy=..., exits=...)`` builds the model with timm
(never downloading weights), loads a checkpoint, checks that the executor can run exactly
what timm computes -- rejecting with a ``ValueError`` that names the feature anything it
cannot (qk-norm, attention pooling, ...) rather than converting it approximately --
maps timm's configuration to the graph of docs/model_format.md, quantises the linear layers
the policy asks for with the runtime's own quantiser (``pyruntime.kernels``), and writes the
file atomically. A policy with QuEE gates also gets the reduced-precision copies of its
``gates.reduced`` layers (``<layer>:lo.weight...``, quantised from the same fp32 weights by
the same quantiser; the bias stays the layer's) and the gate MLPs (``gates.{b}.*``, from the
policy's ``gates.weights``) and costs (written as the policy gives them).

torch and timm are imported inside the functions that need them (``pip install
pyruntime-vit[convert]``). Checkpoints must hold timm-format state dicts (what
``model.state_dict()`` gives); foreign layouts (original DeiT/JAX) go through timm first.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple, Union

import numpy as np

from ._atomic import check_target
from .errors import PolicyError
from . import graph as opgraph
from .modelfile import graph_layer_names, linear_tensors, set_attention_bits, write_model
from .policy import SHORTHANDS, LayerPolicy, Policy

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

__all__ = ["convert", "model_arch", "describe_model", "as_policy"]

PathLike = Union[str, "os.PathLike[str]"]
EXIT_PARAMS = ("norm.weight", "norm.bias", "fc.weight", "fc.bias")
DEFAULT_MEAN_STD = 0.5  # per channel, when the model carries no pretrained_cfg for its channels


# --- the source model -----------------------------------------------------------------------

def create_timm_model(name: str, model_kwargs: Optional[Mapping[str, Any]] = None) -> "nn.Module":
    """``timm.create_model(name, pretrained=False, **model_kwargs)`` in eval mode; an unknown
    name or arguments timm refuses are a ValueError naming them."""
    import timm

    if not isinstance(name, str) or not timm.is_model(name):
        raise ValueError(f"unknown timm model name {name!r} (see timm.list_models())")
    kwargs = dict(model_kwargs or {})
    if "pretrained" in kwargs:
        raise ValueError("model kwargs may not set 'pretrained': weights come from --checkpoint (no hub here)")
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except (RuntimeError, TypeError, ValueError, AssertionError, KeyError) as e:  # timm's refusals
        raise ValueError(f"cannot create timm model {name!r} with {kwargs}: {type(e).__name__}: {e}"
                         .replace("\n", " ")) from None
    return model.eval()


def _source_model(source: Any, model_kwargs: Optional[Mapping[str, Any]] = None) -> Tuple["nn.Module", str]:
    """(model, a name for the provenance) from a timm model name or a module."""
    if isinstance(source, str):
        return create_timm_model(source, model_kwargs), source
    import torch.nn as nn

    if not isinstance(source, nn.Module):
        raise TypeError(f"source must be a timm model name or a torch module, got {type(source).__name__}")
    if model_kwargs:
        raise ValueError("model kwargs apply to a timm model name, not to a module already built")
    cfg = getattr(source, "pretrained_cfg", None) or {}
    return source, cfg.get("architecture") or type(source).__name__


def load_timm(name: str, model_kwargs: Optional[Mapping[str, Any]] = None, checkpoint: Optional[PathLike] = None,
              random_weights: bool = False) -> Tuple["nn.Module", Dict[int, Dict[str, Any]], List[str]]:
    """A user's timm model: ``(model, exit heads found in the checkpoint, notes)``.

    ``checkpoint`` (.safetensors / .pth state dict) is loaded strictly, its position
    embeddings resampled to the model's grid when they differ (timm's
    ``resample_abs_pos_embed``; each resampling is a note). Without a checkpoint the model
    keeps timm's random initialisation, which must be asked for (``random_weights=True``):
    a random model is never made silently."""
    if checkpoint is None and not random_weights:
        raise ValueError(f"no checkpoint for {name!r}: pass a checkpoint (.safetensors / .pth state dict), or "
                         f"random_weights=True (--random-weights) for timm's random initialisation")
    if checkpoint is not None and random_weights:
        raise ValueError("a checkpoint and random weights exclude each other")
    model = create_timm_model(name, model_kwargs)
    if checkpoint is None:
        return model, {}, [f"{name}: random weights (timm's initialisation), no checkpoint"]
    exits, notes = _load_checkpoint(model, checkpoint)
    return model, exits, notes


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_state_dict(path: Path) -> Dict[str, Any]:
    """A flat {name: tensor} from .safetensors or .pth/.pt (``model``/``state_dict`` wrappers ok)."""
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".pth", ".pt", ".bin"):
        raise ValueError(f"checkpoint {path} must be .safetensors, .pth or .pt")
    if not path.is_file():
        raise ValueError(f"checkpoint {path} is not a file")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path)))
        import torch

        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except (ImportError, MemoryError):
        raise
    except Exception as e:  # torch's UnpicklingError/RuntimeError, safetensors' own errors
        raise ValueError(f"checkpoint {path}: cannot read it ({type(e).__name__}: {e})".replace("\n", " ")) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(sd, Mapping) and isinstance(sd.get(wrapper), Mapping):
            sd = sd[wrapper]
    if not isinstance(sd, Mapping) or not all(isinstance(k, str) for k in sd):
        raise ValueError(f"checkpoint {path} does not hold a state dict")
    return dict(sd)


def _split_exits(sd: Mapping[str, Any]) -> Tuple[Dict[str, Any], Dict[int, Dict[str, Any]]]:
    """Backbone keys and ``exits.<b>.<param>`` keys grouped by block."""
    backbone, exits = {}, {}
    for k, v in sd.items():
        if k.startswith("exits."):
            parts = k.split(".", 2)
            if len(parts) != 3 or not parts[1].isdigit():
                raise ValueError(f"exit-head key {k!r} is not of the form exits.<block>.<param>")
            exits.setdefault(int(parts[1]), {})[parts[2]] = v
        else:
            backbone[k] = v
    return backbone, exits


def _resample_pos_embed(model: "nn.Module", backbone: Dict[str, Any]) -> List[str]:
    """Resample the checkpoint's ``pos_embed`` in place when its grid differs from the model's
    (a checkpoint trained at another image size); the notes say what was resampled."""
    pe = backbone.get("pos_embed")
    own = getattr(model, "pos_embed", None)
    if pe is None or own is None or tuple(pe.shape) == tuple(own.shape) or pe.ndim != 3 or pe.shape[2] != own.shape[2]:
        return []  # the same grid, or another width: nothing to resample (a width the strict load names)
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 0))
    old_len = pe.shape[1] - prefix
    side = int(round(old_len ** 0.5))
    if side * side != old_len:
        raise ValueError(f"checkpoint pos_embed {list(pe.shape)} cannot be resampled to the model's {list(own.shape)}")
    grid = tuple(int(v) for v in model.patch_embed.grid_size)
    backbone["pos_embed"] = resample_abs_pos_embed(pe.float(), new_size=list(grid), old_size=[side, side],
                                                   num_prefix_tokens=prefix, verbose=False).to(pe.dtype)
    return [f"pos_embed resampled from a {side}x{side} grid to {grid[0]}x{grid[1]} (timm resample_abs_pos_embed, "
            f"bicubic)"]


def _load_checkpoint(model: "nn.Module", path: PathLike) -> Tuple[Dict[int, Dict[str, Any]], List[str]]:
    """Load the backbone weights into ``model`` (strictly); return the exit heads found and
    notes on what was adapted (position-embedding resampling)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    backbone, exits = _split_exits(_read_state_dict(path))
    notes = _resample_pos_embed(model, backbone)
    try:
        model.load_state_dict(backbone, strict=True)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path} does not fit the model: {e}".replace("\n", " ")) from None
    return exits, notes


# --- what the executor supports ------------------------------------------------------------

def _unsupported(feature: str) -> ValueError:
    return ValueError(f"unsupported by the pyruntime executor: {feature}")


def _layernorm_eps(m: Any, where: str, D: int) -> float:
    import torch.nn as nn

    if not isinstance(m, nn.LayerNorm):
        raise _unsupported(f"{where} is {type(m).__name__}; only LayerNorm normalisation is supported")
    if tuple(m.normalized_shape) != (D,) or m.weight is None or m.bias is None:
        raise _unsupported(f"{where} must be an affine LayerNorm over {D} features with a bias")
    return float(m.eps)


def _optional_norm(m: Any, where: str, D: int, eps: list) -> bool:
    import torch.nn as nn

    if isinstance(m, nn.Identity):
        return False
    eps.append(_layernorm_eps(m, where, D))
    return True


def _family_gap(model: Any) -> Optional[str]:
    """The feature a known timm family that is not a plain ViT needs and the executor lacks
    (docs/families.md), or None for a class the table does not know."""
    kind = type(model).__name__
    return {
        "VisionTransformerSAM": "windowed attention with relative position (SAM's image encoder)",
        "SwinTransformer": "shifted-window attention and patch merging (Swin)",
        "SwinTransformerV2": "shifted-window attention and patch merging (Swin)",
        "NaFlexVit": "variable-resolution patch input (NaFlex)",
    }.get(kind)


def _not_yet(model: Any, feature: str) -> ValueError:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture") or "a module built directly"
    return ValueError(f"{type(model).__name__} ({name}): {feature} is not supported yet")


def _check_model_type(model: Any) -> None:
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    from timm.models.vision_transformer_relpos import VisionTransformerRelPos

    if type(model) in (VisionTransformer, VisionTransformerDistilled, VisionTransformerRelPos) or _is_beit(model):
        return
    gap = _family_gap(model)
    if gap is not None:
        raise _not_yet(model, gap)
    if isinstance(model, VisionTransformer):
        raise _unsupported(f"{type(model).__name__} (a VisionTransformer subclass with its own forward pass)")
    raise ValueError(
        f"{type(model).__name__} is not a timm VisionTransformer; pyruntime converts plain ViTs "
        f"(vit_*, deit_*, dinov2-style) only")


# Block types of timm's VisionTransformer other than the pre-norm Block: the feature each needs.
_BLOCK_GAPS = {
    "ParallelScalingBlock": "parallel attention and MLP in one block (ParallelScalingBlock)",
    "ResPostBlock": "post-norm blocks (ResPostBlock: the norm after each branch)",
    "ResPostRelPosBlock": "post-norm blocks (ResPostRelPosBlock, vit_relpos_*_rpn_*: the norm after each branch)",
    "DiffAttentionBlock": "differential attention",
}


def _check_embedding(model: Any) -> Tuple[list, list, int]:
    """(img_size, patch_size, in_chans) of a plain non-overlapping conv patch embedding."""
    import torch.nn as nn
    from timm.layers import PatchEmbed

    pe = model.patch_embed
    if type(pe).__name__ == "HybridEmbed":
        raise _not_yet(model, "a convolutional stem (hybrid ViT, HybridEmbed)")
    if type(pe) is not PatchEmbed or not isinstance(pe.proj, nn.Conv2d):
        raise _unsupported(f"patch embedding {type(pe).__name__}")
    proj = pe.proj
    patch = list(proj.kernel_size)
    if list(proj.stride) != patch or any(proj.padding) or proj.groups != 1 or any(d != 1 for d in proj.dilation):
        raise _unsupported("a patch embedding that is not a non-overlapping convolution (stride == kernel)")
    if not isinstance(pe.norm, nn.Identity):
        raise _unsupported("a normalisation inside the patch embedding (embed_norm_layer)")
    if getattr(pe, "dynamic_img_pad", False) or getattr(model, "dynamic_img_size", False):
        raise _unsupported("dynamic_img_size / dynamic_img_pad (the executor has a fixed input size)")
    img = list(pe.img_size)
    if img[0] % patch[0] or img[1] % patch[1]:
        raise _unsupported(f"image size {img} that is not a multiple of the patch size {patch}")
    if not _has_abs_pos(model) and not (_is_relpos(model) or _is_beit(model) or _is_eva(model)):
        raise _unsupported("a model without absolute position embeddings (pos_embed is None)")
    return img, patch, proj.in_channels


def _check_head(model: Any) -> str:
    import torch.nn as nn

    if getattr(model, "attn_pool", None) is not None:
        return "map"  # the head itself is checked by _check_attn_pool
    if model.global_pool not in ("token", "avg"):
        raise _unsupported(f"global_pool={model.global_pool!r} (only 'token' and 'avg')")
    if getattr(model, "pool_include_prefix", False):
        raise _unsupported("pool_include_prefix (average pooling over prefix tokens)")
    heads = [model.head] + ([model.head_dist] if hasattr(model, "head_dist") else [])
    # num_classes=0 (timm's default for feature extractors): Identity heads, logits = features
    if model.num_classes == 0 and all(isinstance(h, nn.Identity) for h in heads):
        return model.global_pool
    if not all(isinstance(h, nn.Linear) for h in heads):
        raise _unsupported(f"a classifier head that is not linear ({', '.join(type(h).__name__ for h in heads)})")
    return model.global_pool


def _check_attn_pool(model: Any, D: int, eps: list) -> None:
    """SigLIP's MAP head as the ``attention_pool`` op runs it: one latent query, a q and a kv
    projection, no q/k norm or position embedding, then proj, an optional LayerNorm and a
    residual MLP, the one latent row as the pooled features."""
    import torch.nn as nn
    from timm.layers import Mlp

    ap = model.attn_pool
    if type(ap).__name__ != "AttentionPoolLatent":
        raise _unsupported(f"attention pooling {type(ap).__name__} (only timm's AttentionPoolLatent)")
    if ap.latent_len != 1 or ap.pool != "token":
        raise _unsupported(f"attention pooling with {ap.latent_len} latents / pool {ap.pool!r} (only one latent)")
    if ap.pos_embed is not None:
        raise _unsupported("a position embedding inside the attention pooling")
    if not (isinstance(ap.q_norm, nn.Identity) and isinstance(ap.k_norm, nn.Identity)):
        raise _unsupported("qk_norm inside the attention pooling")
    if not isinstance(ap.q, (nn.Linear, nn.Identity)) or not isinstance(ap.kv, nn.Linear):
        raise _unsupported("attention pooling projections that are not linear")
    if ap.kv.in_features != D or ap.kv.out_features != 2 * D or ap.num_heads * ap.head_dim != D:
        raise _unsupported("attention pooling whose width differs from embed_dim")
    if ap.mlp is None or type(ap.mlp) is not Mlp or not isinstance(ap.proj, nn.Linear) or ap.proj.out_features != D:
        raise _unsupported("attention pooling without its projection and MLP (out_features=0) or with another width")
    if not isinstance(ap.mlp.norm, nn.Identity):
        raise _unsupported("a normalisation inside the attention pooling's MLP")
    _mlp_act(ap.mlp.act, "attn_pool.mlp")
    _optional_norm(ap.norm, "attn_pool.norm", D, eps)


def _mlp_act(act: Any, where: str) -> str:
    """The op kind of an MLP activation: exact erf GELU or CLIP's QuickGELU."""
    import torch.nn as nn
    from timm.layers.activations import GELU, QuickGELU

    if isinstance(act, nn.GELU) and act.approximate == "none" or type(act) is GELU:
        return "gelu"
    if type(act) is QuickGELU:
        return "quick_gelu"
    raise _unsupported(f"{where} activation {type(act).__name__} (only exact erf GELU and QuickGELU)")


def _check_block(blk: Any, i: int, D: int, eps: list) -> Tuple[int, int, bool, bool, str]:
    """(num_heads, mlp_hidden, qkv_bias, layer_scale, MLP activation op) of a supported
    pre-norm block."""
    from timm.layers import Attention
    from timm.models.vision_transformer import Block
    from timm.models.vision_transformer_relpos import RelPosAttention, RelPosBlock

    p = f"blocks.{i}"
    if type(blk) not in (Block, RelPosBlock):
        raise _unsupported(f"{p} is {type(blk).__name__} (only the pre-norm timm Block)")
    eps += [_layernorm_eps(blk.norm1, f"{p}.norm1", D), _layernorm_eps(blk.norm2, f"{p}.norm2", D)]
    heads, qkv_bias = _check_attention(blk.attn, {Block: Attention, RelPosBlock: RelPosAttention}[type(blk)], f"{p}.attn", D)
    mlp_hidden, act = _check_mlp(blk.mlp, p)
    return heads, mlp_hidden, qkv_bias, _layer_scale([blk.ls1, blk.ls2], p), act


def _check_attention(attn: Any, kind: type, where: str, D: int) -> Tuple[int, bool]:
    """(num_heads, qkv_bias) of timm's standard multi-head attention (class ``kind``)."""
    import torch.nn as nn

    if type(attn) is not kind:
        raise _unsupported(f"{where} is {type(attn).__name__} (only standard multi-head attention)")
    if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
        raise _unsupported("qk_norm (normalisation of queries and keys)")
    if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
        raise _unsupported("scale_attn_norm (normalisation of the attention output)")
    if getattr(attn, "gate", None) is not None:
        raise _unsupported("gated attention")
    if attn.num_heads * attn.head_dim != D or attn.proj.out_features != D:
        raise _unsupported("attention whose width differs from embed_dim (attn_head_dim)")
    return attn.num_heads, attn.qkv.bias is not None


def _layer_scale(scales: list, p: str) -> bool:
    """Whether a block's branches are layer-scaled (LayerScale on all of them, or on none)."""
    import torch.nn as nn
    from timm.layers import LayerScale

    kinds = {type(m) for m in scales}
    if kinds not in ({LayerScale}, {nn.Identity}):
        raise _unsupported(f"{p}: layer scale must be LayerScale on every branch or on none")
    return kinds == {LayerScale}


def _check_mlp(mlp: Any, p: str) -> Tuple[int, str]:
    """(hidden width, activation op) of a block's fc1-activation-fc2 MLP."""
    import torch.nn as nn
    from timm.layers import Mlp

    if type(mlp) is not Mlp:
        raise _unsupported(f"{p}.mlp is {type(mlp).__name__} (SwiGLU / gated MLPs are not supported; only fc1-GELU-fc2)")
    if not (isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.fc2, nn.Linear)):
        raise _unsupported(f"{p}.mlp uses convolutions")
    act = _mlp_act(mlp.act, f"{p}.mlp")
    if not isinstance(mlp.norm, nn.Identity):
        raise _unsupported("scale_mlp_norm (normalisation inside the MLP)")
    return mlp.fc1.out_features, act


def model_arch(model: "nn.Module") -> dict:
    """The graph ``arch`` of a timm ViT classifier, or ValueError naming the first unsupported
    feature. What fits exit heads and calibrates (pyruntime.exits, pyruntime.calibrate)
    describes its model by this, and needs class logits: a feature extractor is refused."""
    return require_classifier(describe_model(model)[0], model)


def require_classifier(arch: dict, model: "nn.Module") -> dict:
    """``arch`` if its model has class logits, else ValueError (what exits and calibration need)."""
    if not arch["num_classes"]:
        raise ValueError(f"{type(model).__name__} has no classifier (num_classes=0, a feature extractor): exit heads "
                         f"and calibration need class logits; convert it as it is, or give it num_classes")
    return arch


def program_graph(model: "nn.Module") -> dict:
    """``{"arch", "exits": [], "ops"}``: the program :func:`convert` writes for ``model``
    without exits and tensors (:func:`pyruntime.graph.ops_of` places exits where a graph's
    ``exits`` say), for what costs and names layers before anything is converted."""
    arch, act = describe_model(model)
    skeleton = {"arch": arch, "exits": []}
    return {**skeleton, "ops": _program(model, skeleton, act)}


def fuse_projections(model: "nn.Module") -> "nn.Module":
    """``model`` (changed in place, its function kept) with every layer of its program one
    ``nn.Linear`` that its forward calls as a module, under the program's layer name: Eva's
    separate q/k/v projections and BEiT's or Eva's q/v biases become one ``attn.qkv`` with
    the fused bias; a split SwiGLU (fc1_g, fc1_x) becomes the packed one (``GluMlp``, gate
    rows first), which timm's forwards take as well. The calibrators hook and swap each
    layer's module (pyruntime.calibrate.emulate), and a weight that timm applies through
    ``F.linear`` or splits over three modules has no module of its own. What they write back
    (LampQ's QAT) stays convertible: :func:`convert` reads both forms, and
    :func:`timm_state_dict` gives the weights back in timm's own layout."""
    import torch

    split = model.__dict__.setdefault("_pyruntime_split", {})
    eva = _is_eva(model)
    with torch.no_grad():
        for i, blk in enumerate(model.blocks):
            if eva or _is_beit(model):
                split.update(_fuse_qkv(blk.attn, f"blocks.{i}.attn", eva))
            mlp = getattr(blk, "mlp", None)
            if eva and type(mlp).__name__ == "SwiGLU":
                blk.mlp, split[f"blocks.{i}.mlp.fc1"] = _packed_swiglu(mlp, f"blocks.{i}.mlp")
    return model


# (state-dict key in timm's layout, "weight" | "bias" of the fused layer, first row, end row);
# key None: rows timm's layout has no place for (a zero k bias), which must stay zero
_Split = List[Tuple[Optional[str], str, int, int]]


def timm_state_dict(model: "nn.Module") -> Dict[str, Any]:
    """``model.state_dict()`` in the layout timm builds the model with: the layers
    :func:`fuse_projections` fused are split back (a checkpoint of a calibrated model loads
    strictly into ``timm.create_model`` of its name). ValueError if training moved rows that
    layout cannot hold (see :func:`zero_fused_gaps`)."""
    sd = model.state_dict()
    for fused, parts in model.__dict__.get("_pyruntime_split", {}).items():
        tensors = {"weight": sd.pop(f"{fused}.weight"), "bias": sd.pop(f"{fused}.bias", None)}
        for key, src, lo, hi in parts:
            rows = tensors[src][lo:hi]
            if key is not None:
                sd[key] = rows
            elif bool(rows.any()):
                raise ValueError(f"{fused}.{src} rows {lo}..{hi - 1} are no longer zero, and timm's layout of this "
                                 f"model has no place for them (its k projection has no bias)")
    return sd


def zero_fused_gaps(model: "nn.Module") -> None:
    """Zero the rows of fused layers that timm's layout has no place for (Eva's k bias: with
    RoPE it does not cancel in the softmax), so what trains the fused model (LampQ's QAT)
    keeps it a model timm can hold."""
    import torch

    with torch.no_grad():
        for fused, parts in model.__dict__.get("_pyruntime_split", {}).items():
            mod = model.get_submodule(fused)
            for key, src, lo, hi in parts:
                if key is None:
                    getattr(mod, src)[lo:hi] = 0


def _linear_from(w: np.ndarray, b: Optional[np.ndarray], like: Any) -> "nn.Module":
    import torch
    import torch.nn as nn

    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None).to(like.weight.device, like.weight.dtype)
    lin.weight.copy_(torch.from_numpy(w))
    if b is not None:
        lin.bias.copy_(torch.from_numpy(b))
    lin.weight.requires_grad_(like.weight.requires_grad)
    return lin


def _fuse_qkv(attn: Any, p: str, eva: bool) -> Dict[str, _Split]:
    """One ``qkv`` Linear with the fused bias in place of q/k/v projections or q/v biases;
    {its name: where its rows go in timm's layout} (empty: nothing to fuse). BEiT's and Eva's
    k bias is zero (a buffer, or no bias on k_proj): those rows have no place to go."""
    if attn.qkv is not None and getattr(attn, "q_bias", None) is None:
        return {}
    w, b = _eva_qkv(attn, f"{p}.qkv") if eva else (
        _np(attn.qkv.weight, f"{p}.qkv.weight"), _np(_beit_qkv_bias(attn), f"{p}.qkv.bias"))
    n = w.shape[0] // 3
    if attn.qkv is None:  # q_proj, k_proj, v_proj
        parts = [(f"{p}.{x}_proj.weight", "weight", j * n, (j + 1) * n) for j, x in enumerate("qkv")]
        if b is not None:
            parts += [(None if getattr(attn, f"{x}_proj").bias is None else f"{p}.{x}_proj.bias", "bias", j * n, (j + 1) * n)
                      for j, x in enumerate("qkv")]
    else:  # qkv.weight with q_bias, v_bias
        parts = [(f"{p}.qkv.weight", "weight", 0, 3 * n), (f"{p}.q_bias", "bias", 0, n), (None, "bias", n, 2 * n),
                 (f"{p}.v_bias", "bias", 2 * n, 3 * n)]
    like = attn.qkv if attn.qkv is not None else attn.q_proj
    attn.qkv = _linear_from(w, b, like)
    for name in ("q_proj", "k_proj", "v_proj", "q_bias", "v_bias"):
        if getattr(attn, name, None) is not None:
            setattr(attn, name, None)
    return {f"{p}.qkv": parts}


def _packed_swiglu(mlp: Any, p: str) -> Tuple["nn.Module", _Split]:
    """(timm's packed SwiGLU (GluMlp, SiLU, gate first) holding a split SwiGLU's weights,
    where its fc1 rows go in timm's layout)."""
    import torch.nn as nn
    from timm.layers import GluMlp

    w, b = _eva_fc1(mlp, p)
    h = w.shape[0] // 2
    parts = [(f"{p}.{name}.{src}", src, j * h, (j + 1) * h) for j, name in enumerate(("fc1_g", "fc1_x"))
             for src in ("weight", "bias") if getattr(getattr(mlp, name), src) is not None]
    packed = GluMlp(mlp.fc1_g.in_features, w.shape[0], mlp.fc2.out_features, act_layer=nn.SiLU,
                    bias=b is not None, gate_last=False)
    packed.fc1 = _linear_from(w, b, mlp.fc1_g)
    packed.act, packed.drop1, packed.norm, packed.fc2, packed.drop2 = mlp.act, mlp.drop1, mlp.norm, mlp.fc2, mlp.drop2
    return packed.train(mlp.training), parts


def describe_model(model: "nn.Module") -> Tuple[dict, str]:
    """(graph ``arch``, MLP activation op kind) of a timm ViT, classifier or feature extractor
    (``num_classes`` 0), or ValueError naming the first unsupported feature."""
    if _is_eva(model):
        return _eva_describe(model)
    _check_model_type(model)
    img, patch, in_chans = _check_embedding(model)
    global_pool = _check_head(model)
    D = model.embed_dim
    if len(model.blocks) == 0:
        raise _unsupported("a model without transformer blocks")
    gaps = [_BLOCK_GAPS[type(blk).__name__] for blk in model.blocks if type(blk).__name__ in _BLOCK_GAPS]
    if gaps:
        raise _not_yet(model, gaps[0])
    eps: list = []
    check_block = _beit_check_block if _is_beit(model) else _parallel_check_block if _is_parallel(model) else _check_block
    per_block = {check_block(blk, i, D, eps) for i, blk in enumerate(model.blocks)}
    if len(per_block) != 1:
        raise _unsupported("blocks that differ in heads, MLP width, qkv bias, layer scale or activation")
    if _is_parallel(model):
        _parallel_branches(model)  # as many branches in every block
    num_heads, mlp_hidden, qkv_bias, layer_scale, act = per_block.pop()
    import torch.nn as nn

    flags = {key: _optional_norm(getattr(model, key, None) or nn.Identity(), key, D, eps)
             for key in ("norm_pre", "norm", "fc_norm")}
    if global_pool == "map":
        _check_attn_pool(model, D, eps)
    if len(set(eps)) != 1:
        raise _unsupported(f"LayerNorms with different eps {sorted(set(eps))}")
    return {
        "img_size": img, "patch_size": patch, "in_chans": in_chans,
        "embed_dim": D, "depth": len(model.blocks), "num_heads": num_heads, "mlp_hidden": mlp_hidden,
        "num_classes": model.num_classes,
        "cls_token": model.cls_token is not None,
        "dist_token": getattr(model, "dist_token", None) is not None,
        "reg_tokens": int(getattr(model, "num_reg_tokens", 0)),
        "no_embed_class": bool(getattr(model, "no_embed_class", False)),
        "global_pool": global_pool,
        "fc_norm": flags["fc_norm"], "final_norm": flags["norm"], "norm_pre": flags["norm_pre"],
        "layer_scale": layer_scale, "qkv_bias": qkv_bias, "eps": eps[0],
    }, act


# --- the program per family ------------------------------------------------------------------

def _is_relpos(model: Any) -> bool:
    return type(model).__name__ == "VisionTransformerRelPos"


def _rel_pos_bias(model: Any, blk: Any) -> Any:
    """[heads, T, T]: what vit_relpos adds to a block's scaled attention scores (its own
    module's bias, or the model's shared one); fixed for the model's image size."""
    rel = blk.attn.rel_pos if blk.attn.rel_pos is not None else model.shared_rel_pos
    if rel is None:
        raise _unsupported("a VisionTransformerRelPos without a relative position module")
    return rel.get_bias()[0]


def _program(model: Any, graph: Mapping, act: str) -> List[dict]:
    """The op list of a supported model: the lowering of its arch, with what its family
    changes (vit_relpos, BEiT: no absolute position embedding where the model has none; each
    attention adds its relative position bias, tensor ``blocks.<i>.attn.rel_pos_bias``;
    parallel blocks; SigLIP's attention-pooling head; Eva's own program)."""
    if _is_eva(model):
        return _eva_program(model, graph)
    ops = opgraph.lower(graph, act, _pool_ops(model, graph["arch"]))
    if not _has_abs_pos(model):
        i = next(i for i, op in enumerate(ops) if op["op"] == "pos_embed")
        pos = ops.pop(i)
        for op in ops:  # whatever read the position embedding reads its input instead
            op["in"] = [pos["in"][0] if t == pos["out"][0] else t for t in op["in"]]
    if _has_rel_pos_bias(model):
        for op in ops:
            if op["op"] == "attention":
                op["weights"] = {"bias": f"blocks.{op['block']}.attn.rel_pos_bias"}
    if _is_parallel(model):
        ops = _parallel_program(ops, graph["arch"], act, _parallel_branches(model))
    return ops


# --- EVA, EVA-02 and the RoPE ViTs built on timm's Eva -------------------------------------------
# An Eva block: x + g1 * proj(norm_a(attn(rope(qkv(norm1 x))))), then
# x + g2 * fc2(norm_m(mlp(norm2 x))), with an optional attention-output norm (scale_attn_inner),
# sub-LN (scale_mlp), layer scale (gamma_1/gamma_2) and an MLP that is SwiGLU, packed SwiGLU or
# fc1-act-fc2; or post-norm (EvaBlockPostNorm): x + norm1(proj(...(qkv x))), then
# x + norm2(fc2(...(x))), no layer scale. The embedding and head are a ViT's (the lowering's);
# the blocks are written here. A SwiGLU's fc1_g and fc1_x become one layer blocks.<i>.mlp.fc1,
# fc1_g's rows first (SwiGLUPacked's layout), before the swiglu op: per-row weight scales and
# one activation scale for the shared input make that exactly the two layers at any one
# precision, in one GEMM (policy.py knows no fc1_g/fc1_x).

def _is_eva(model: Any) -> bool:
    return type(model).__name__ == "Eva"


class _EvaBlock(NamedTuple):
    """What an Eva block's program depends on (equal for every block of a supported model)."""

    heads: int
    mlp: str         # "swiglu" (SwiGLU or SwiGLUPacked) or the Mlp's activation op
    hidden: int      # the MLP's width after the gate (fc2's input)
    attn_norm: bool  # scale_attn_inner: LayerNorm of the attention output, before proj
    mlp_norm: bool   # scale_mlp: LayerNorm of the hidden activations, before fc2 (sub-LN)
    gamma_1: bool    # layer scale of the attention branch
    gamma_2: bool    # layer scale of the MLP branch
    half: bool       # RoPE layout: rope_rotate_half, else interleaved pairs
    post_norm: bool  # EvaBlockPostNorm: norm1/norm2 after each branch instead of before


def _eva_mlp(mlp: Any, p: str) -> Tuple[str, int]:
    """(op kind, hidden width) of an Eva block's MLP."""
    import torch.nn as nn
    from timm.layers import GluMlp, Mlp, SwiGLU

    if type(mlp) is SwiGLU:
        if type(mlp.act) is not nn.SiLU:
            raise _unsupported(f"{p} SwiGLU with activation {type(mlp.act).__name__} (only SiLU)")
        return "swiglu", mlp.fc1_g.out_features
    if type(mlp) is GluMlp:
        if type(mlp.act) is not nn.SiLU or mlp.gate_last or not isinstance(mlp.fc1, nn.Linear):
            raise _unsupported(f"{p} GluMlp other than packed SwiGLU (SiLU, gate first, linear)")
        return "swiglu", mlp.fc1.out_features // 2
    if type(mlp) is Mlp and isinstance(mlp.fc1, nn.Linear):
        return _mlp_act(mlp.act, p), mlp.fc1.out_features
    raise _unsupported(f"{p} is {type(mlp).__name__} (only SwiGLU, packed SwiGLU and fc1-GELU-fc2 MLPs)")


def _eva_check_block(blk: Any, i: int, D: int, prefix: int, eps: list) -> _EvaBlock:
    import torch.nn as nn
    from timm.layers.attention import AttentionRope
    from timm.models.eva import EvaAttention, EvaBlock, EvaBlockPostNorm

    p = f"blocks.{i}"
    if type(blk) not in (EvaBlock, EvaBlockPostNorm):
        raise _unsupported(f"{p} is {type(blk).__name__} (only EvaBlock and EvaBlockPostNorm)")
    eps += [_layernorm_eps(blk.norm1, f"{p}.norm1", D), _layernorm_eps(blk.norm2, f"{p}.norm2", D)]
    attn = blk.attn
    if type(attn) not in (EvaAttention, AttentionRope):
        raise _unsupported(f"{p}.attn is {type(attn).__name__}")
    if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
        raise _unsupported("qk_norm (normalisation of queries and keys)")
    if attn.gate is not None:
        raise _unsupported("gated attention (gated_attn)")
    if getattr(attn, "num_kv_heads", attn.num_heads) != attn.num_heads:
        raise _unsupported("grouped-query attention (num_kv_heads)")
    if attn.num_heads * attn.head_dim != D or attn.proj.out_features != D:
        raise _unsupported("attention whose width differs from embed_dim (attn_head_dim)")
    if attn.num_prefix_tokens != prefix:
        raise _unsupported(f"{p}.attn leaves {attn.num_prefix_tokens} tokens unrotated, the model has {prefix} "
                           f"prefix tokens")
    attn_norm = _optional_norm(attn.norm, f"{p}.attn.norm", D, eps)
    mlp, hidden = _eva_mlp(blk.mlp, f"{p}.mlp")
    mlp_norm = _optional_norm(blk.mlp.norm, f"{p}.mlp.norm", hidden, eps)
    return _EvaBlock(attn.num_heads, mlp, hidden, attn_norm, mlp_norm, getattr(blk, "gamma_1", None) is not None,
                     getattr(blk, "gamma_2", None) is not None, bool(getattr(attn, "rotate_half", False)),
                     type(blk) is EvaBlockPostNorm)


def _eva_rope(model: Any) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """(sin, cos) of the model's RoPE at its fixed grid, what its forward hands every block's
    apply_rot_embed_cat: [patches, dh] shared by blocks and heads, or for 'mixed' RoPE (learnt
    frequencies per block and head) [depth, heads, patches, dh]; None without RoPE."""
    import torch

    rope = getattr(model, "rope", None)
    if rope is None:
        return None
    kind = type(rope).__name__
    if kind not in ("RotaryEmbeddingCat", "RotaryEmbeddingMixed", "RotaryEmbeddingDinoV3", "RotaryEmbeddingMRope"):
        raise _unsupported(f"rotary embedding {kind} (only timm's 'cat', 'mixed', 'dinov3' and 'mrope' RoPE)")
    D, H, depth = model.embed_dim, model.blocks[0].attn.num_heads, len(model.blocks)
    n, dh = model.patch_embed.num_patches, D // H
    with torch.no_grad():  # as Eva._pos_embed asks for it, in eval mode (no coordinate augmentation)
        emb = rope.get_embed() if hasattr(rope, "feat_shape") else rope.get_embed(shape=model.patch_embed.grid_size)
    want = (depth, H, n, 2 * dh) if getattr(model, "rope_mixed", False) else (n, 2 * dh)
    if tuple(emb.shape) != want:
        raise _unsupported(f"a RoPE table of shape {list(emb.shape)} (expected {list(want)})")
    sin, cos = emb.float().chunk(2, dim=-1)
    return _np(sin, "rope sin"), _np(cos, "rope cos")


def _eva_describe(model: Any) -> Tuple[dict, str]:
    """describe_model for Eva: (arch, the blocks' MLP op kind)."""
    img, patch, in_chans = _check_embedding(model)
    global_pool = _check_head(model)
    D, prefix = model.embed_dim, int(model.num_prefix_tokens)
    if len(model.blocks) == 0:
        raise _unsupported("a model without transformer blocks")
    eps: list = []
    per_block = {_eva_check_block(blk, i, D, prefix, eps) for i, blk in enumerate(model.blocks)}
    if len(per_block) != 1:
        raise _unsupported("Eva blocks that differ in heads, MLP, norms or layer scale")
    blk = per_block.pop()
    _eva_rope(model)  # refuses a RoPE it cannot tabulate
    if global_pool == "map":  # the Perception Encoder's (vit_pe_core_*) head, as SigLIP's
        _check_attn_pool(model, D, eps)
    import torch.nn as nn

    flags = {key: _optional_norm(getattr(model, key, None) or nn.Identity(), key, D, eps)
             for key in ("norm_pre", "norm", "fc_norm")}
    if len(set(eps)) != 1:
        raise _unsupported(f"LayerNorms with different eps {sorted(set(eps))}")
    reg = getattr(model, "reg_token", None)
    return {
        "img_size": img, "patch_size": patch, "in_chans": in_chans,
        "embed_dim": D, "depth": len(model.blocks), "num_heads": blk.heads, "mlp_hidden": blk.hidden,
        "num_classes": model.num_classes,
        "cls_token": model.cls_token is not None, "dist_token": False,
        "reg_tokens": 0 if reg is None else int(reg.shape[1]),
        "no_embed_class": bool(model.no_embed_class),
        "global_pool": global_pool,
        "fc_norm": flags["fc_norm"], "final_norm": flags["norm"], "norm_pre": flags["norm_pre"],
        "layer_scale": blk.gamma_1 or blk.gamma_2, "qkv_bias": _eva_qkv(model.blocks[0].attn, "")[1] is not None,
        "eps": eps[0],
    }, blk.mlp


def _eva_block_ops(i: int, x: str, a: Mapping, blk: _EvaBlock, rope: Optional[str], prefix: int) -> List[dict]:
    """Block i's ops on stream tensor ``x``, ending in ``blocks.<i>.residual2`` (the lowering's
    name for a block's output). ``rope``: None, "shared" (tables ``rope.sin``/``rope.cos``) or
    "per_block" ('mixed' RoPE: ``blocks.<i>.attn.rope.sin``/``.cos``, one table per head)."""
    _op, _norm, _lin = opgraph._op, opgraph._norm, opgraph._lin
    p, D, F, eps, H = f"blocks.{i}", a["embed_dim"], blk.hidden, a["eps"], blk.heads
    ops = [] if blk.post_norm else [_norm(f"{p}.norm1", x, eps, i)]
    ops.append(_lin(f"{p}.attn.qkv", x if blk.post_norm else f"{p}.norm1", D, 3 * D, None, i))
    h = f"{p}.attn.qkv"
    if rope is not None:
        table = f"{p}.attn.rope" if rope == "per_block" else "rope"
        ops.append(_op("rope", f"{p}.attn.rope", [h], {"heads": H, "prefix": prefix, "half": blk.half,
                                                       "per_head": rope == "per_block"},
                       {"sin": f"{table}.sin", "cos": f"{table}.cos"}, i))
        h = f"{p}.attn.rope"
    ops.append(_op("attention", f"{p}.attn", [h], {"heads": H}, block=i))
    h = f"{p}.attn"
    if blk.attn_norm:
        ops.append(_norm(f"{p}.attn.norm", h, eps, i))
        h = f"{p}.attn.norm"
    ops.append(_lin(f"{p}.attn.proj", h, D, D, None, i))
    ops += _eva_branch_end(i, f"{p}.attn.proj", x, blk.post_norm and "norm1", blk.gamma_1 and "gamma_1", "residual1",
                           eps)
    if not blk.post_norm:
        ops.append(_norm(f"{p}.norm2", f"{p}.residual1", eps, i))
    ops += [_lin(f"{p}.mlp.fc1", f"{p}.residual1" if blk.post_norm else f"{p}.norm2", D,
                 2 * F if blk.mlp == "swiglu" else F, None, i),
            _op(blk.mlp, f"{p}.mlp.{blk.mlp}", [f"{p}.mlp.fc1"], block=i)]
    h = f"{p}.mlp.{blk.mlp}"
    if blk.mlp_norm:
        ops.append(_norm(f"{p}.mlp.norm", h, eps, i))
        h = f"{p}.mlp.norm"
    ops.append(_lin(f"{p}.mlp.fc2", h, F, D, None, i))
    ops += _eva_branch_end(i, f"{p}.mlp.fc2", f"{p}.residual1", blk.post_norm and "norm2", blk.gamma_2 and "gamma_2",
                           "residual2", eps)
    return ops


def _eva_branch_end(i: int, h: str, x: str, post_norm: Optional[str], gamma: Optional[str], residual: str,
                    eps: float) -> List[dict]:
    """The end of an Eva block's branch whose output is ``h``: a post-norm block's norm
    (``post_norm``: its name), the layer scale (``gamma``: its name), then the residual add
    onto the stream ``x``, named ``blocks.<i>.<residual>``."""
    p = f"blocks.{i}"
    ops = []
    if post_norm:
        ops.append(opgraph._norm(f"{p}.{post_norm}", h, eps, i))
        h = f"{p}.{post_norm}"
    if gamma:
        ops.append(opgraph._op("layer_scale", f"{p}.{gamma}", [h], weights={"gamma": f"{p}.{gamma}"}, block=i))
        h = f"{p}.{gamma}"
    return ops + [opgraph._op("add", f"{p}.{residual}", [x, h], block=i)]


def _eva_program(model: Any, graph: Mapping) -> List[dict]:
    """The lowering's embedding, exits and head around Eva blocks; without an absolute position
    embedding (RoPE-only models) its op is dropped; a MAP head replaces the pooling."""
    a = graph["arch"]
    blk = _eva_check_block(model.blocks[0], 0, a["embed_dim"], int(model.num_prefix_tokens), [])
    mixed = getattr(model, "rope_mixed", False)
    ops: List[dict] = []
    for op in opgraph.lower(graph, pool_ops=_pool_ops(model, a)):
        b = op["block"]
        if b is None or op["op"] == "exit":
            ops.append(op)
        elif op["name"] == f"blocks.{b}.norm1":  # the block's first op: its input is the stream
            rope = None if model.rope is None else "per_block" if mixed else "shared"
            ops += _eva_block_ops(b, op["in"][0], a, blk, rope, int(model.num_prefix_tokens))
    if model.pos_embed is None:
        i = next(i for i, op in enumerate(ops) if op["op"] == "pos_embed")
        pos = ops.pop(i)
        for op in ops:
            op["in"] = [pos["in"][0] if t == pos["out"][0] else t for t in op["in"]]
    return ops


def _eva_qkv(attn: Any, p: str) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """The fused qkv layer [3D, D] of an Eva attention: its own, or q/k/v projections stacked;
    the bias cat(q, k, v), a missing part (Eva's k: none) zeros, as timm's forward uses it."""
    import torch

    projs = [attn.qkv] if attn.qkv is not None else [attn.q_proj, attn.k_proj, attn.v_proj]
    w = torch.cat([m.weight for m in projs])
    if getattr(attn, "q_bias", None) is not None:  # EvaAttention's fused qkv
        parts = [attn.q_bias, attn.k_bias, attn.v_bias]
    else:
        parts = [m.bias for m in projs]
    if all(b is None for b in parts):
        return _np(w, f"{p}.weight"), None
    n = w.shape[0] // len(parts)
    bias = torch.cat([torch.zeros(n) if b is None else b for b in parts])
    return _np(w, f"{p}.weight"), _np(bias, f"{p}.bias")


def _eva_fc1(mlp: Any, p: str) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """The MLP's fc1: its own, or a SwiGLU's fc1_g and fc1_x stacked (gate rows first)."""
    names = ("fc1_g", "fc1_x") if hasattr(mlp, "fc1_g") else ("fc1",)
    parts = [getattr(mlp, n) for n in names]
    w = np.concatenate([_np(m.weight, f"{p}.{n}.weight") for m, n in zip(parts, names)])
    if all(m.bias is None for m in parts):
        return w, None
    return w, np.concatenate([np.zeros(m.out_features, np.float32) if m.bias is None else _np(m.bias, f"{p}.{n}.bias")
                              for m, n in zip(parts, names)])


def _eva_linears(model: Any) -> Dict[str, Tuple[np.ndarray, Optional[np.ndarray]]]:
    def wb(m: Any, name: str) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        w = _np(m.weight, f"{name}.weight")
        return w.reshape(w.shape[0], -1), None if m.bias is None else _np(m.bias, f"{name}.bias")

    out = {"patch_embed": wb(model.patch_embed.proj, "patch_embed")}
    for i, blk in enumerate(model.blocks):
        p = f"blocks.{i}"
        out[f"{p}.attn.qkv"] = _eva_qkv(blk.attn, f"{p}.attn.qkv")
        out[f"{p}.attn.proj"] = wb(blk.attn.proj, f"{p}.attn.proj")
        out[f"{p}.mlp.fc1"] = _eva_fc1(blk.mlp, f"{p}.mlp")
        out[f"{p}.mlp.fc2"] = wb(blk.mlp.fc2, f"{p}.mlp.fc2")
    out.update(_attn_pool_linears(model, wb))
    if model.num_classes:
        out["head"] = wb(model.head, "head")
    return out


def _eva_float_tensors(model: Any, arch: Mapping) -> Dict[str, np.ndarray]:
    out = {} if model.pos_embed is None else {"pos_embed": _np(model.pos_embed, "pos_embed")}
    for key, present in (("cls_token", arch["cls_token"]), ("reg_token", arch["reg_tokens"])):
        if present:
            out[key] = _np(getattr(model, key), key)
    norms = [key for flag, key in (("norm_pre", "norm_pre"), ("final_norm", "norm"), ("fc_norm", "fc_norm"))
             if arch[flag]]
    for i, blk in enumerate(model.blocks):
        p = f"blocks.{i}"
        norms += [f"{p}.norm1", f"{p}.norm2"]
        norms += [f"{p}.{n}" for n in ("attn.norm", "mlp.norm") if hasattr(model.get_submodule(f"{p}.{n}"), "weight")]
        for g in ("gamma_1", "gamma_2"):
            if getattr(blk, g, None) is not None:
                out[f"{p}.{g}"] = _np(getattr(blk, g), f"{p}.{g}")
    for key in norms:
        m = model.get_submodule(key)
        out[f"{key}.weight"], out[f"{key}.bias"] = _np(m.weight, f"{key}.weight"), _np(m.bias, f"{key}.bias")
    rope = _eva_rope(model)
    if rope is not None:
        sin, cos = rope
        if getattr(model, "rope_mixed", False):
            for i in range(len(model.blocks)):
                out[f"blocks.{i}.attn.rope.sin"], out[f"blocks.{i}.attn.rope.cos"] = sin[i], cos[i]
        else:
            out["rope.sin"], out["rope.cos"] = sin, cos
    if arch["global_pool"] == "map":
        out.update(_attn_pool_tensors(model))
    return out


# --- SigLIP's attention-pooling (MAP) head ---------------------------------------------------------

def _pool_ops(model: Any, arch: Mapping) -> Optional[Callable[[str], List[dict]]]:
    """For :func:`pyruntime.graph.lower`: SigLIP's MAP head as the ops computing ``pool`` from
    the final tokens, for a ``map`` model; None (the lowering's own pool op) otherwise."""
    if arch["global_pool"] != "map":
        return None
    return lambda x: _attn_pool_ops(model, x)


def _attn_pool_ops(model: Any, x: str) -> List[dict]:
    """SigLIP's MAP head on the final tokens ``x``; its result is the tensor ``pool`` (what
    fc_norm and the head read)."""
    import torch.nn as nn
    from .graph import _lin, _norm, _op

    ap = model.attn_pool
    D, F, H = ap.kv.in_features, ap.mlp.fc1.out_features, ap.num_heads
    act = _mlp_act(ap.mlp.act, "attn_pool.mlp")
    # Eva's pool hands the MAP head every token; a VisionTransformer's only the patches unless
    # pool_include_prefix
    start = 0 if _is_eva(model) or getattr(model, "pool_include_prefix", False) else int(model.num_prefix_tokens)
    head = [_lin("attn_pool.kv", x, D, 2 * D, None),
            _op("attention_pool", "attn_pool.attn", ["attn_pool.kv"], {"heads": H, "start": start},
                {"query": "attn_pool.query"}),
            _lin("attn_pool.proj", "attn_pool.attn", D, D, None)]
    h = "attn_pool.proj"
    if not isinstance(ap.norm, nn.Identity):
        head.append(_norm("attn_pool.norm", h, float(ap.norm.eps)))
        h = "attn_pool.norm"
    head += [_lin("attn_pool.mlp.fc1", h, D, F, None), _op(act, f"attn_pool.mlp.{act}", ["attn_pool.mlp.fc1"]),
             _lin("attn_pool.mlp.fc2", f"attn_pool.mlp.{act}", F, D, None),
             _op("add", "attn_pool.residual", ["attn_pool.proj", "attn_pool.mlp.fc2"], outs=["pool"])]
    return head


def _attn_pool_tensors(model: Any) -> Dict[str, np.ndarray]:
    """The MAP head's fixed query (its latent through q, as timm computes it each forward)
    and LayerNorm; its linears are with the backbone's."""
    ap = model.attn_pool
    out = {"attn_pool.query": _np(ap.q(ap.latent).reshape(-1), "attn_pool.query")}
    if getattr(ap.norm, "weight", None) is not None:
        out["attn_pool.norm.weight"] = _np(ap.norm.weight, "attn_pool.norm.weight")
        out["attn_pool.norm.bias"] = _np(ap.norm.bias, "attn_pool.norm.bias")
    return out


def _has_abs_pos(model: Any) -> bool:
    return getattr(model, "pos_embed", None) is not None


def _has_rel_pos_bias(model: Any) -> bool:
    return _is_relpos(model) or _is_beit(model) and _beit_has_rel_pos_bias(model)


def _attention_bias(model: Any, blk: Any) -> Any:
    """[heads, T, T] added to a block's scaled attention scores (a family with relative position bias)."""
    return _beit_rel_pos_bias(model, blk) if _is_beit(model) else _rel_pos_bias(model, blk)


# --- BEiT (timm.models.beit.Beit) ------------------------------------------------------------
# A pre-norm ViT whose attention takes separate q and v biases (k has none) and a relative
# position bias (per block, shared by all blocks, or both, summed), whose layer scales are
# gamma_1 / gamma_2, and whose absolute position embedding is optional. Its block maps to the
# plain lowering: the fused qkv bias is cat(q_bias, k_bias (zeros), v_bias), the relative
# position bias is gathered at conversion to the attention op's ``bias`` [heads, T, T].

def _is_beit(model: Any) -> bool:
    return type(model).__name__ == "Beit"


def _beit_check_block(blk: Any, i: int, D: int, eps: list) -> Tuple[int, int, bool, bool, str]:
    """(num_heads, mlp_hidden, qkv_bias, layer_scale, MLP activation op) of a BEiT block."""
    from timm.models.beit import Attention, Block

    p = f"blocks.{i}"
    if type(blk) is not Block or type(blk.attn) is not Attention:
        raise _unsupported(f"{p} is {type(blk).__name__} with {type(blk.attn).__name__} (only BEiT's own Block)")
    eps += [_layernorm_eps(blk.norm1, f"{p}.norm1", D), _layernorm_eps(blk.norm2, f"{p}.norm2", D)]
    attn = blk.attn
    if attn.qkv.out_features != 3 * D or attn.proj.in_features != D or D % attn.num_heads:
        raise _unsupported(f"{p}.attn: attention whose width differs from embed_dim (attn_head_dim "
                           f"{attn.qkv.out_features // 3 // attn.num_heads} with {attn.num_heads} heads, embed_dim {D})")
    if (attn.q_bias is None) != (attn.v_bias is None) or (attn.qkv.bias is not None and attn.q_bias is not None):
        raise _unsupported(f"{p}.attn: a qkv bias other than BEiT's q_bias and v_bias (or one fused qkv bias)")
    if attn.scale != (D // attn.num_heads) ** -0.5:
        raise _unsupported(f"{p}.attn: attention scale {attn.scale} other than head_dim ** -0.5")
    if type(blk.mlp).__name__ == "SwiGLU":
        raise _unsupported(f"{p}.mlp is SwiGLU (BEiT's swiglu_mlp)")
    mlp_hidden, act = _check_mlp(blk.mlp, p)
    if (blk.gamma_1 is None) != (blk.gamma_2 is None):
        raise _unsupported(f"{p}: layer scale must be on both branches or on neither")
    return attn.num_heads, mlp_hidden, _beit_qkv_bias(attn) is not None, blk.gamma_1 is not None, act


def _beit_has_rel_pos_bias(model: Any) -> bool:
    own = {blk.attn.relative_position_bias_table is not None for blk in model.blocks}
    if len(own) != 1:
        raise _unsupported("BEiT blocks of which only some have a relative position bias table")
    return model.rel_pos_bias is not None or own.pop()


def _beit_rel_pos_bias(model: Any, blk: Any) -> Any:
    """[heads, T, T]: the block's own relative position bias plus the model's shared one, as
    timm's fused attention sums them; fixed for the model's image size."""
    own = blk.attn._get_rel_pos_bias()[0] if blk.attn.relative_position_bias_table is not None else None
    shared = model.rel_pos_bias() if model.rel_pos_bias is not None else None
    if own is None or shared is None:
        return own if shared is None else shared
    return own + shared


def _beit_qkv_bias(attn: Any) -> Any:
    """The fused qkv bias cat(q, k (zeros), v), as timm's forward uses it; or the qkv layer's
    own bias (:func:`fuse_projections` moves q/v biases there); None without either."""
    import torch

    if attn.q_bias is None:
        return attn.qkv.bias
    return torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))


# --- parallel blocks (timm VisionTransformer with block_fn=ParallelThingsBlock) ----------------
# x + sum_j attn_j(norm_j x), then x + sum_j mlp_j(norm_j x) (graph.parallel_block). Layers
# and tensors keep timm's module names: blocks.<i>.attns.<j>.attn.qkv, blocks.<i>.attns.<j>.norm,
# blocks.<i>.attns.<j>.ls, blocks.<i>.ffns.<j>.mlp.fc1, ...

def _is_parallel(model: Any) -> bool:
    return any(type(blk).__name__ == "ParallelThingsBlock" for blk in model.blocks)


def _parallel_check_block(blk: Any, i: int, D: int, eps: list) -> Tuple[int, int, bool, bool, str]:
    """(num_heads, mlp_hidden, qkv_bias, layer_scale, MLP activation op) of a parallel block
    whose branches are each a pre-norm attention or MLP, all alike."""
    from timm.layers import Attention
    from timm.models.vision_transformer import ParallelThingsBlock

    p = f"blocks.{i}"
    if type(blk) is not ParallelThingsBlock:
        raise _unsupported(f"{p} is {type(blk).__name__} in a model of parallel blocks (ParallelThingsBlock)")
    if len(blk.attns) != len(blk.ffns) or not blk.attns:
        raise _unsupported(f"{p}: a parallel block with {len(blk.attns)} attention and {len(blk.ffns)} MLP branches")
    branches = set()
    for j, (a, f) in enumerate(zip(blk.attns, blk.ffns)):
        eps += [_layernorm_eps(a.norm, f"{p}.attns.{j}.norm", D), _layernorm_eps(f.norm, f"{p}.ffns.{j}.norm", D)]
        branches.add((*_check_attention(a.attn, Attention, f"{p}.attns.{j}.attn", D), *_check_mlp(f.mlp, f"{p}.ffns.{j}")))
    if len(branches) != 1:
        raise _unsupported(f"{p}: parallel branches that differ in heads, qkv bias, MLP width or activation")
    heads, qkv_bias, mlp_hidden, act = branches.pop()
    return heads, mlp_hidden, qkv_bias, _layer_scale([m.ls for m in (*blk.attns, *blk.ffns)], p), act


def _parallel_branches(model: Any) -> int:
    counts = {len(blk.attns) for blk in model.blocks}
    if len(counts) != 1:
        raise _unsupported(f"parallel blocks with different numbers of branches {sorted(counts)}")
    return counts.pop()


def _parallel_program(ops: List[dict], arch: Mapping, act: str, branches: int) -> List[dict]:
    """``ops`` (the lowering) with each block's body replaced by the parallel block's; the
    block's input and output tensors, and so its exit, stay where they were."""
    out: List[dict] = []
    for op in ops:
        b = op["block"]
        if b is None or op["op"] == "exit":
            out.append(op)
        elif op["name"] == f"blocks.{b}.norm1":  # the block's first op: it reads the block's input
            out += opgraph.parallel_block(b, op["in"][0], arch, act, branches)
    return out


def _parallel_block_tensors(blk: Any, i: int, arch: Mapping) -> Dict[str, np.ndarray]:
    out = {}
    for stage in ("attns", "ffns"):
        for j, branch in enumerate(getattr(blk, stage)):
            q = f"blocks.{i}.{stage}.{j}"
            out[f"{q}.norm.weight"], out[f"{q}.norm.bias"] = _np(branch.norm.weight, q), _np(branch.norm.bias, q)
            if arch["layer_scale"]:
                out[f"{q}.ls.gamma"] = _np(branch.ls.gamma, f"{q}.ls.gamma")
    return out


def _parallel_block_linears(blk: Any, i: int) -> List[Tuple[str, Any]]:
    out = []
    for j, (a, f) in enumerate(zip(blk.attns, blk.ffns)):
        out += [(f"blocks.{i}.attns.{j}.attn.{n}", getattr(a.attn, n)) for n in ("qkv", "proj")]
        out += [(f"blocks.{i}.ffns.{j}.mlp.{n}", getattr(f.mlp, n)) for n in ("fc1", "fc2")]
    return out


# --- tensors ---------------------------------------------------------------------------------

def _np(t: Any, name: str) -> np.ndarray:
    """float32 C-contiguous numpy copy of a tensor/array, rejecting NaN/Inf."""
    a = t.detach().cpu().float().numpy() if hasattr(t, "detach") else np.asarray(t)
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return a


def _float_tensors(model: "nn.Module", arch: Mapping) -> Dict[str, np.ndarray]:
    """Everything but the linear layers and exit heads, under the model file's names."""
    if _is_eva(model):
        return _eva_float_tensors(model, arch)
    out = {"pos_embed": _np(model.pos_embed, "pos_embed")} if _has_abs_pos(model) else {}
    for key, present in (("cls_token", arch["cls_token"]), ("dist_token", arch["dist_token"]),
                         ("reg_token", arch["reg_tokens"])):
        if present:
            out[key] = _np(getattr(model, key), key)
    for flag, key in (("norm_pre", "norm_pre"), ("final_norm", "norm"), ("fc_norm", "fc_norm")):
        if arch[flag]:
            m = getattr(model, key)
            out[f"{key}.weight"], out[f"{key}.bias"] = _np(m.weight, key), _np(m.bias, key)
    for i, blk in enumerate(model.blocks):
        if _is_parallel(model):
            out.update(_parallel_block_tensors(blk, i, arch))
            continue
        for n in ("norm1", "norm2"):
            m = getattr(blk, n)
            out[f"blocks.{i}.{n}.weight"] = _np(m.weight, f"blocks.{i}.{n}.weight")
            out[f"blocks.{i}.{n}.bias"] = _np(m.bias, f"blocks.{i}.{n}.bias")
        if _has_rel_pos_bias(model):
            out[f"blocks.{i}.attn.rel_pos_bias"] = _np(_attention_bias(model, blk), f"blocks.{i}.attn.rel_pos_bias")
        if arch["layer_scale"]:
            gammas = (blk.gamma_1, blk.gamma_2) if _is_beit(model) else (blk.ls1.gamma, blk.ls2.gamma)
            for n, g in zip(("ls1", "ls2"), gammas):
                out[f"blocks.{i}.{n}.gamma"] = _np(g, f"blocks.{i}.{n}.gamma")
    if arch["global_pool"] == "map":
        out.update(_attn_pool_tensors(model))
    return out


def _backbone_linears(model: "nn.Module") -> Dict[str, Tuple[np.ndarray, Optional[np.ndarray]]]:
    """{layer: (weight [N, K], bias or None)}; the patch conv is flattened in (c, i, j) order."""
    if _is_eva(model):
        return _eva_linears(model)

    def wb(m: Any, name: str) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        w = _np(m.weight, f"{name}.weight")
        return w.reshape(w.shape[0], -1), None if m.bias is None else _np(m.bias, f"{name}.bias")

    out = {"patch_embed": wb(model.patch_embed.proj, "patch_embed")}
    for i, blk in enumerate(model.blocks):
        if _is_parallel(model):
            out.update({name: wb(m, name) for name, m in _parallel_block_linears(blk, i)})
            continue
        for sub, m in (("attn.qkv", blk.attn.qkv), ("attn.proj", blk.attn.proj),
                       ("mlp.fc1", blk.mlp.fc1), ("mlp.fc2", blk.mlp.fc2)):
            out[f"blocks.{i}.{sub}"] = wb(m, f"blocks.{i}.{sub}")
        if _is_beit(model) and blk.attn.q_bias is not None:
            out[f"blocks.{i}.attn.qkv"] = (out[f"blocks.{i}.attn.qkv"][0],
                                           _np(_beit_qkv_bias(blk.attn), f"blocks.{i}.attn.qkv.bias"))
    out.update(_attn_pool_linears(model, wb))
    if model.num_classes:
        out["head"] = wb(model.head, "head")
        if getattr(model, "head_dist", None) is not None:
            out["head_dist"] = wb(model.head_dist, "head_dist")
    return out


def _attn_pool_linears(model: Any, wb: Any) -> Dict[str, Tuple[np.ndarray, Optional[np.ndarray]]]:
    """The MAP head's linears (none without one), by ``wb(module, name)``."""
    ap = getattr(model, "attn_pool", None)
    if ap is None:
        return {}
    return {f"attn_pool.{sub}": wb(m, f"attn_pool.{sub}")
            for sub, m in (("kv", ap.kv), ("proj", ap.proj), ("mlp.fc1", ap.mlp.fc1), ("mlp.fc2", ap.mlp.fc2))}


def _read_exit_file(path: PathLike) -> Dict[int, Dict[str, Any]]:
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors' own error types, OSError
        raise ValueError(f"exit heads {path}: cannot read them ({type(e).__name__}: {e})") from None
    return _split_exits({k: v for k, v in tensors.items() if k.startswith("exits.")})[1]


def _exit_heads(exits: Any, arch: Mapping) -> Dict[int, Dict[str, np.ndarray]]:
    """Validated exit heads {block: {norm.weight, norm.bias, fc.weight, fc.bias}} in float32."""
    if exits is None:
        return {}
    if isinstance(exits, (str, os.PathLike)):
        exits = _read_exit_file(exits)
    D, n = arch["embed_dim"], arch["num_classes"]
    shapes = {"norm.weight": (D,), "norm.bias": (D,), "fc.weight": (n, D), "fc.bias": (n,)}
    heads = {}
    for b, params in exits.items():
        if set(params) != set(EXIT_PARAMS):
            raise ValueError(f"exit head {b} must have exactly {list(EXIT_PARAMS)}, got {sorted(params)}")
        head = {k: _np(v, f"exits.{b}.{k}") for k, v in params.items()}
        for k, a in head.items():
            if a.shape != shapes[k]:
                raise ValueError(f"exits.{b}.{k} has shape {list(a.shape)}, expected {list(shapes[k])}")
        heads[int(b)] = head
    return heads


# --- policy, preprocessing, provenance --------------------------------------------------------

def as_policy(policy: Any) -> Policy:
    """A Policy from a Policy, a shorthand name ("fp32", "w8a8", "w4a8") or a JSON file path."""
    if policy is None:
        return Policy.shorthand("fp32")
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, str) and policy in SHORTHANDS:
        return Policy.shorthand(policy)
    if isinstance(policy, (str, os.PathLike)):
        if not Path(policy).is_file():
            raise PolicyError(f"policy {str(policy)!r} is neither a shorthand {list(SHORTHANDS)} nor a file")
        return Policy.load(policy)
    raise TypeError(f"policy must be a Policy, a shorthand or a path, got {type(policy).__name__}")


def _channels(v: Any, C: int, what: str) -> list:
    vals = [float(x) for x in np.atleast_1d(np.asarray(v, dtype=np.float64))]
    if len(vals) == 1:
        vals = vals * C
    if len(vals) != C:
        raise ValueError(f"preprocess {what} has {len(vals)} values for {C} channels")
    return vals


def _preprocess(model: "nn.Module", arch: Mapping, override: Optional[Mapping]) -> dict:
    """timm's eval data config for the model (mean/std when they fit the channels, else 0.5;
    crop_pct, interpolation, crop_mode), with ``override``; input_size is always the model's
    own [C, H, W]."""
    from .imagedata import Preprocess

    C = arch["in_chans"]
    input_size = [C, *arch["img_size"]]
    try:
        timm_pre = Preprocess.from_timm(model).to_dict()
    except Exception:  # a module without a timm data config: timm's defaults without pretrained_cfg
        timm_pre = {"mean": [DEFAULT_MEAN_STD] * C, "std": [DEFAULT_MEAN_STD] * C, "crop_pct": 0.875,
                    "interpolation": "bilinear", "crop_mode": "center"}
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None or len(mean) != C or len(std) != C:
        mean, std = [DEFAULT_MEAN_STD] * C, [DEFAULT_MEAN_STD] * C
    out = dict(timm_pre, mean=list(mean), std=list(std))
    if override:
        unknown = set(override) - {"mean", "std", "input_size", "crop_pct", "interpolation", "crop_mode"}
        if unknown:
            raise ValueError(f"preprocess has unknown keys {sorted(unknown)}")
        if "input_size" in override and list(override["input_size"]) != input_size:
            raise ValueError(f"preprocess input_size {list(override['input_size'])} differs from the model's {input_size}")
        out.update({k: v for k, v in override.items() if k != "input_size"})
    out.update(mean=_channels(out["mean"], C, "mean"), std=_channels(out["std"], C, "std"), input_size=input_size)
    return Preprocess.from_dict(out).to_dict()  # validated


def _provenance(source_name: str, model: Any, checkpoint: Optional[PathLike], policy: Policy) -> dict:
    import timm
    import torch

    from . import __version__

    ckpt = Path(checkpoint) if checkpoint is not None else None
    return {
        "source": source_name,
        "source_class": type(model).__name__,
        "checkpoint": ckpt.name if ckpt else None,
        "checkpoint_sha256": _sha256(ckpt) if ckpt else None,
        "converter": "pyruntime.convert",
        "pyruntime_version": __version__,
        "timm_version": timm.__version__,
        "torch_version": torch.__version__,
        "policy": policy.name,
        "calibration": policy.meta.get("calibration"),
    }


# --- the converter -----------------------------------------------------------------------------

def _exit_tensors(heads: Mapping[int, Mapping[str, np.ndarray]], blocks: list) -> Tuple[dict, dict]:
    """(norm tensors, {exits.b.fc: (w, b)}) of the exit heads the policy uses."""
    missing = [b for b in blocks if b not in heads]
    if missing:
        have = sorted(heads) or "none"
        raise PolicyError(f"policy has exits at blocks {missing} without exit-head weights (heads given: {have})")
    norms, linears = {}, {}
    for b in blocks:
        h = heads[b]
        norms[f"exits.{b}.norm.weight"], norms[f"exits.{b}.norm.bias"] = h["norm.weight"], h["norm.bias"]
        linears[f"exits.{b}.fc"] = (h["fc.weight"], h["fc.bias"])
    return norms, linears


def gates_graph(pol: Policy, names: list, arch: Mapping) -> dict:
    """The graph's "gates" entry of a policy with QuEE gates (no tensors)."""
    g = pol.gates
    if g.topk > arch["num_classes"]:
        raise PolicyError(f"gates topk {g.topk} exceeds the model's {arch['num_classes']} classes")
    reduced = pol.resolve_reduced(names, arch["depth"])
    return {"lambda": g.lam, "topk": g.topk, "hidden": g.hidden,
            "cost": {str(b): list(c) for b, c in sorted(g.cost.items())},
            "reduced": {name: lp.to_dict() for name, lp in reduced.items()}}


def _gates(pol: Policy, names: list, arch: Mapping, linears: Mapping) -> Tuple[dict, dict]:
    """(graph "gates", tensors) of a policy with QuEE gates: reduced copies + gate MLPs."""
    graph = gates_graph(pol, names, arch)
    g = pol.gates
    missing = [b for b in pol.gate_blocks() if b not in g.weights]
    if missing:
        raise PolicyError(f"gates at blocks {missing} have no MLP weights in the policy (gates.weights); "
                          f"calibrate them (pyruntime.calibrate.quee) before converting")
    tensors = {}
    for name, lp in graph["reduced"].items():
        tensors.update(linear_tensors(f"{name}:lo", linears[name][0], None, LayerPolicy.from_dict(lp)))
    for b in pol.gate_blocks():
        for k, a in g.arrays(b).items():
            tensors[f"gates.{b}.{k}"] = np.ascontiguousarray(a, dtype=np.float32)
    return graph, tensors


def convert(source: Any, out: PathLike, *, checkpoint: Optional[PathLike] = None, policy: Any = None,
            exits: Any = None, preprocess: Optional[Mapping] = None, model_kwargs: Optional[Mapping] = None,
            random_weights: bool = False) -> Path:
    """Write the pyruntime model file ``out`` for a timm ViT and return its path.

    source: a timm model name (created with ``pretrained=False`` and ``model_kwargs``, what
        ``timm.create_model`` takes: ``img_size``, ``num_classes``, ``global_pool``, ...,
        ``pretrained_cfg_overlay``) or a timm VisionTransformer (which is put in eval mode, and
        into which ``checkpoint`` is loaded). A name needs ``checkpoint`` or, for timm's random
        initialisation, ``random_weights=True``.
    checkpoint: ``.safetensors`` / ``.pth`` / ``.pt`` state dict loaded strictly into the model;
        ``exits.<b>.*`` keys in it are the exit heads unless ``exits`` is given.
    policy: a Policy, a shorthand ("fp32" default, "w8a8", "w4a8", "w8a8-attn8", "w4a8-attn8")
        or a policy JSON path.
    exits: {block: {"norm.weight", "norm.bias", "fc.weight", "fc.bias"}} arrays or tensors, or a
        safetensors file with ``exits.<b>.*`` keys. Only the blocks the policy exits at are used.
    preprocess: override of {"mean", "std"} (per channel, or one value for all) and of timm's
        eval transform for images of another size ({"crop_pct", "interpolation", "crop_mode"});
        by default all of it is timm's data config for the model (``pretrained_cfg_overlay`` is
        timm's own way to set it), at the model's real input size.
    """
    # Before any work: the output must not replace a device/symlink or a file it is made from.
    inputs = [p for p in (checkpoint, policy, exits) if isinstance(p, (str, os.PathLike))]
    check_target(out, inputs)
    import torch

    model, source_name = _source_model(source, model_kwargs)
    arch, act = describe_model(model)  # an unsupported family is named before anything else
    if isinstance(source, str) and checkpoint is None and not random_weights:
        raise ValueError(f"no checkpoint for {source!r}: pass checkpoint=... (--checkpoint), or random_weights=True "
                         f"(--random-weights) to convert timm's random initialisation")
    ckpt_exits = _load_checkpoint(model, checkpoint)[0] if checkpoint is not None else {}
    model.eval()
    pol = as_policy(policy)
    heads = _exit_heads(ckpt_exits if exits is None else exits, arch)
    exit_blocks = sorted(e.block for e in pol.exits)
    if exit_blocks and not arch["num_classes"]:
        raise PolicyError(f"policy {pol.name!r} has exits at blocks {exit_blocks}, which need class logits; this "
                          f"model has none (num_classes=0, a feature extractor)")
    if exit_blocks and arch["global_pool"] == "map":
        raise PolicyError(f"policy {pol.name!r} has exits at blocks {exit_blocks}; exit heads on a model with attention "
                          f"pooling (SigLIP's MAP head) are not supported yet")
    skeleton = {"arch": arch, "exits": [{"block": b} for b in exit_blocks]}
    program = _program(model, skeleton, act)
    layers = pol.resolve(graph_layer_names({**skeleton, "ops": program}), arch["depth"])
    norms, exit_linears = _exit_tensors(heads, exit_blocks)
    with torch.no_grad():
        tensors = {**_float_tensors(model, arch), **norms}
        linears = {**_backbone_linears(model), **exit_linears}
    for name, lp in layers.items():
        tensors.update(linear_tensors(name, *linears[name], lp))
    graph = {
        "arch": arch,
        "preprocess": _preprocess(model, arch, preprocess),
        "layers": {name: lp.to_dict() for name, lp in layers.items()},
        "exits": [e.to_dict() for e in sorted(pol.exits, key=lambda e: e.block)],
        "predictor": None if pol.predictor is None else pol.predictor.to_dict(),
    }
    if pol.gates is not None:
        graph["gates"], gate_tensors = _gates(pol, list(layers), arch, linears)
        tensors.update(gate_tensors)
    set_attention_bits(graph, pol.attn_bits)
    graph["ops"] = program  # the model as the program the runtime executes
    write_model(out, graph, tensors, pol.to_json(), _provenance(source_name, model, checkpoint, pol), inputs=inputs)
    return Path(out)
