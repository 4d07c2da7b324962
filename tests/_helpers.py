"""Helpers several test files share: the timm parity checks of the family tests (a perturbed
timm model, fixed-seed images, timm's outputs, the runtime held to timm or to the numpy
oracle) and the Fashion-MNIST skip marker.

Imports nothing beyond numpy and pytest at import time: torch is imported by the helpers that
need it, and pyruntime modules are found even without the compiled extension, so that the
torch-free tests (tests/test_train_reference.py) can import this module too.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
OUTPUTS = ("logits", "features", "tokens")


# --- timm parity ---------------------------------------------------------------------------------

def perturbed(model, seed: int = 0):
    """Randomise every parameter (LayerNorm weights, biases, tokens too) so that no term
    (zero biases, unit norms) hides; returns the model in eval mode."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def images(model, n: int = 2, seed: int = 1):
    """``n`` normal random images of the model's input size and channels, the same for a seed."""
    import torch

    H, W = model.patch_embed.img_size
    return torch.randn(n, model.patch_embed.proj.in_channels, H, W, generator=torch.Generator().manual_seed(seed))


def timm_outputs(model, x) -> dict:
    """timm's logits, pre-logits features and output tokens for the images ``x``, as numpy."""
    import torch

    with torch.no_grad():
        tokens = model.forward_features(x)
        return {"logits": model(x).numpy(), "features": model.forward_head(tokens, pre_logits=True).numpy(),
                "tokens": tokens.numpy()}


def rel_err(got, want) -> float:
    """The largest absolute error, relative to the largest magnitude of ``want``."""
    return float(np.abs(got - want).max() / np.abs(want).max())


def assert_matches_timm(result, model, x) -> None:
    """An fp32 run (``tokens=True``) on ``x`` has timm's output shapes and values to 1e-5 relative."""
    want = timm_outputs(model, x)
    for key in OUTPUTS:
        got = getattr(result, key)
        assert got.shape == want[key].shape, (key, got.shape, want[key].shape)
        assert rel_err(got, want[key]) <= 1e-5, (key, rel_err(got, want[key]))


def assert_near_oracle(result, want: dict, keys=OUTPUTS) -> None:
    """A run's outputs (``keys``) are the numpy oracle's (``want``) to 5e-3 of the larger of 1
    and the oracle's magnitude."""
    for key in keys:
        got, ref = getattr(result, key), want[key]
        err, bound = np.abs(got - ref).max(), 5e-3 * max(1.0, np.abs(ref).max())
        assert err <= bound, (key, err, bound)


# --- pyruntime modules and data ------------------------------------------------------------------

def pyruntime_module(name: str):
    """``pyruntime.<name>``: from the package when it imports, otherwise straight from its file
    (for numpy-only modules such as datasets, when the compiled extension is not built)."""
    try:
        return importlib.import_module(f"pyruntime.{name}")
    except Exception:
        key = f"_pyruntime_{name}"
        if key not in sys.modules:
            spec = importlib.util.spec_from_file_location(key, REPO / "pyruntime" / f"{name}.py")
            mod = importlib.util.module_from_spec(spec)
            sys.modules[key] = mod
            spec.loader.exec_module(mod)
        return sys.modules[key]


def tool_module(name: str):
    """tools/<name>.py imported as module ``name`` (registered in sys.modules first: the
    scripts' dataclasses look their module up while they are built)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _have_dataset() -> bool:
    try:
        pyruntime_module("datasets").fashion_mnist_dir()
        return True
    except FileNotFoundError:
        return False


needs_data = pytest.mark.skipif(not _have_dataset(), reason="dataset-fashion-mnist not installed")


def require_data() -> None:
    """``needs_data`` for fixtures (marks do not apply to them): skip without the data set."""
    if not _have_dataset():
        pytest.skip("dataset-fashion-mnist not installed")
