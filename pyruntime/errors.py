"""Exceptions pyruntime raises for bad inputs it can name precisely.

Both derive from ``ValueError`` so callers that only know "bad value" still catch them,
while tools (the CLI, calibration) can tell a broken *file* from a broken *policy*.
"""
from __future__ import annotations

__all__ = ["FormatError", "PolicyError"]


class FormatError(ValueError):
    """A model file that is not a valid pyruntime model: wrong magic, a newer format version,
    truncated or corrupt (checksum mismatch), missing or mis-shaped tensors, or a graph that is
    inconsistent with itself or with its tensors. The message names the file and the problem."""


class PolicyError(ValueError):
    """A policy that cannot be applied to a model: unknown layers, exits out of range, bad
    thresholds, scales or bits, unknown keys, or a policy version newer than this pyruntime."""
