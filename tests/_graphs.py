"""Tiny hand-made graphs and random tensors that fit them, for tests that need no torch.

Tensors are generated from ``pyruntime.modelfile.expected_tensors``, so they fit any graph
the format allows (int8 weights in [-127, 127], positive scales, LayerNorm weights near 1).
"""
from __future__ import annotations

import copy
from typing import Dict, Iterable, Mapping, Optional

import numpy as np

from pyruntime.modelfile import expected_tensors, graph_layer_names

FP32 = {"w_bits": 32, "a_bits": 8, "scale": "dynamic", "static_scale": None, "block_size": 32}
W8A8 = dict(FP32, w_bits=8)
W4A8 = dict(FP32, w_bits=4)

BASE_ARCH = {
    "img_size": [8, 8], "patch_size": [4, 4], "in_chans": 1,
    "embed_dim": 8, "depth": 2, "num_heads": 2, "mlp_hidden": 16, "num_classes": 3,
    "cls_token": True, "dist_token": False, "reg_tokens": 0, "no_embed_class": False,
    "global_pool": "token", "fc_norm": False, "final_norm": True, "norm_pre": False,
    "layer_scale": False, "qkv_bias": True, "eps": 1e-6,
}


def tiny_graph(exits: Iterable[Mapping] = (), layers: Optional[Mapping[str, Mapping]] = None,
               predictor: Optional[Mapping] = None, **arch) -> dict:
    """A valid graph: BASE_ARCH with ``arch`` overrides, fp32 everywhere unless ``layers``
    overrides some layers (exact names)."""
    graph = {
        "arch": dict(copy.deepcopy(BASE_ARCH), **arch),
        "preprocess": None,
        "layers": {},
        "exits": [dict(e) for e in exits],
        "predictor": None if predictor is None else copy.deepcopy(dict(predictor)),
    }
    a = graph["arch"]
    graph["preprocess"] = {"mean": [0.5] * a["in_chans"], "std": [0.25] * a["in_chans"],
                           "input_size": [a["in_chans"], *a["img_size"]]}
    for name in graph_layer_names(graph):
        graph["layers"][name] = dict(FP32)
    for name, lp in (layers or {}).items():
        graph["layers"][name] = dict(lp)
    return graph


def random_tensors(graph: Mapping, seed: int = 0, with_biases: bool = True) -> Dict[str, np.ndarray]:
    """Random tensors of exactly the names, dtypes and shapes ``graph`` expects."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, spec in expected_tensors(graph).items():
        if not spec.required and not with_biases:
            continue
        if spec.dtype == np.int8:
            out[name] = rng.integers(-127, 128, size=spec.shape).astype(np.int8)
        elif spec.dtype == np.uint8:
            out[name] = rng.integers(0, 256, size=spec.shape).astype(np.uint8)
        elif name.endswith(".weight.scale"):
            out[name] = (0.002 + 0.01 * rng.random(spec.shape)).astype(np.float32)
        elif name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "norm_pre.weight")):
            out[name] = (1.0 + 0.1 * rng.standard_normal(spec.shape)).astype(np.float32)
        else:
            out[name] = (0.3 * rng.standard_normal(spec.shape)).astype(np.float32)
    return out


def save_model(tmp_path, graph: Mapping, tensors: Mapping[str, np.ndarray], name: str = "m.pyrt"):
    """Write a model file of ``graph`` and ``tensors`` under ``tmp_path``; its path."""
    from pyruntime.modelfile import write_model

    path = tmp_path / name
    write_model(path, graph, tensors, "{}", {"source": "test"})
    return path


def random_images(graph: Mapping, n: int, seed: int = 0) -> np.ndarray:
    """``n`` normalised float32 images [n, C, H, W] of the graph's input size."""
    a = graph["arch"]
    return np.random.default_rng(seed).standard_normal((n, a["in_chans"], *a["img_size"])).astype(np.float32)
