"""pyruntime: an edge inference runtime for Vision Transformers.

Inference needs numpy and the compiled extension only; torch and timm are needed only to
convert and calibrate models (``pip install "pyruntime-vit[convert]"``).
"""
from __future__ import annotations

import os
import warnings

from . import _core
from . import kernels
from .errors import FormatError, PolicyError
from .runtime import Model, RunResult, load
# The converter imports torch and timm only when called; the name is the function, which
# shadows the submodule of the same name (import it as `from pyruntime.convert import ...`).
from .convert import convert
from .evaluate import evaluate

__version__ = "0.1.0"


def isa() -> str:
    """The ISA used when a call names none: ``PYRUNTIME_ISA`` if set, else the best available.

    Raises ValueError when ``PYRUNTIME_ISA`` names an ISA this CPU or build lacks.
    """
    return _core.isa()


def available_isas() -> list[str]:
    """ISAs compiled into this build and supported by this CPU, from ``"ref"`` to the best."""
    return list(_core.available_isas())


def _warn_if_reference_only() -> None:
    # Users of edge runtimes ask for this: never fall back to the scalar path silently.
    if not os.environ.get("PYRUNTIME_ISA") and available_isas() == ["ref"]:
        warnings.warn(
            "pyruntime: no SIMD kernels for this CPU; running the scalar reference kernels (slow)",
            RuntimeWarning,
            stacklevel=2,
        )


_warn_if_reference_only()



__all__ = ["isa", "available_isas", "kernels", "load", "Model", "RunResult", "convert", "evaluate",
           "FormatError", "PolicyError", "__version__"]
