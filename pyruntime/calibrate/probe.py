"""The runtime itself as the calibrators' measuring instrument: convert a policy in memory,
build the executor from it, and run many images through it.

Exit-aware calibrators (QuEE, MAQEE) measure what the *quantised* model does -- its exit
heads' logits, which images leave where, the BOPs it spends -- with the same C++ executor that
later serves the policy, so the numbers they fit on are the numbers users get.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import numpy as np

from ..modelfile import read_model
from ..policy import Policy
from .common import Source, batches

__all__ = ["materialise", "executor", "run"]


def materialise(source: Source, policy: Policy, exits=None, workdir: Optional[Path] = None) -> Tuple[dict, Dict[str, np.ndarray]]:
    """(graph, tensors) of ``source`` converted under ``policy``, owning their memory (the
    temporary file is gone when this returns). ``exits`` as :func:`pyruntime.convert.convert`
    (default: the source's own, :attr:`Source.exits`)."""
    from ..convert import convert

    with tempfile.TemporaryDirectory(prefix="pyruntime-probe-", dir=workdir) as tmp:
        path = convert(source.model, Path(tmp) / "probe.pyrt", checkpoint=source.checkpoint, policy=policy,
                       exits=source.exits if exits is None else exits, preprocess=source.preprocess)
        graph, tensors, _, _ = read_model(path)
        return graph, {k: np.array(v) for k, v in tensors.items()}


def executor(graph: Mapping, tensors: Mapping[str, np.ndarray]):
    """A compiled executor straight from a graph and its tensors (no file)."""
    from .. import _core

    return _core.Executor(dict(graph), dict(tensors))


def run(ex, x: np.ndarray, collect_exits: bool = False, batch: int = 256,
        threads: Optional[int] = None) -> Dict[str, np.ndarray]:
    """Normalised images through an executor in batches: logits, exit_block, bops, block_path
    and, with ``collect_exits`` (nobody leaves), exit_logits [exits, N, classes]."""
    outs = [ex.run(np.ascontiguousarray(x[lo:hi]), threads, None, collect_exits) for lo, hi in batches(len(x), batch)]
    keys = ["logits", "exit_block", "bops", "block_path"] + (["exit_logits"] if collect_exits else [])
    return {k: np.concatenate([o[k] for o in outs], axis=1 if k == "exit_logits" else 0) for k in keys}
