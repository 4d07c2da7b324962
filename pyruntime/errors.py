"""Exceptions pyruntime raises for bad inputs it can name precisely, and for a missing extra.

FormatError and PolicyError derive from ``ValueError`` so callers that only know "bad value"
still catch them, while tools (the CLI, calibration) can tell a broken *file* from a broken
*policy*. MissingDependency derives from ``ImportError`` for the same reason: it *is* a failed
import, and it carries the one install hint (:func:`missing_extra`) every caller shows.
"""
from __future__ import annotations

import importlib

__all__ = ["FormatError", "PolicyError", "MissingDependency", "DISTRIBUTION", "EXTRAS", "missing_extra",
           "require_extra"]

# The PyPI distribution (the import name stays ``pyruntime``); install hints name this.
DISTRIBUTION = "pyruntime-vit"

# What each optional extra brings that pyruntime imports without a fallback (tqdm has one).
EXTRAS = {"convert": ("torch", "timm", "PIL"), "calibrate": ("torch", "timm", "scipy", "PIL"), "images": ("PIL",)}


class FormatError(ValueError):
    """A model file that is not a valid pyruntime model: wrong magic, a newer format version,
    truncated or corrupt (checksum mismatch), missing or mis-shaped tensors, or a graph that is
    inconsistent with itself or with its tensors. The message names the file and the problem."""


class PolicyError(ValueError):
    """A policy that cannot be applied to a model: unknown layers, exits out of range, bad
    thresholds, scales or bits, unknown keys, or a policy version newer than this pyruntime."""


class MissingDependency(ImportError):
    """A feature needs an optional extra (``convert``, ``calibrate``) that is not installed."""


def missing_extra(extra: str, what: str, module: str = "") -> MissingDependency:
    """The exception for ``what`` (e.g. "pyruntime convert") lacking ``extra``'s ``module``;
    its message is the install hint, in one line."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; known: {sorted(EXTRAS)}")
    lacking = module or " and ".join(EXTRAS[extra])
    return MissingDependency(f"{what} needs {lacking}, which is not installed: "
                             f"install {DISTRIBUTION}[{extra}] (pip install '{DISTRIBUTION}[{extra}]')")


def require_extra(extra: str, what: str) -> None:
    """Import every module ``extra`` brings, raising :func:`missing_extra`'s exception for the
    first that fails -- before any work starts, rather than midway through it."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; known: {sorted(EXTRAS)}")
    for module in EXTRAS[extra]:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise missing_extra(extra, what, module) from e
