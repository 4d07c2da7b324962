"""Diagonal Fisher information of each linear layer's weights, as a trace.

tr(F_i) = sum over calibration images n of || d loss_n / d W_i ||^2  -- the empirical Fisher
[stated: "diagonal, from squared gradients of the loss on calibration data"], with loss_n
the cross-entropy of image n against its label.

**Per-sample gradients, exactly, from batched backward passes** [ours]: the loss of a batch
is the *sum* of the images' losses, and a ViT in eval mode treats images independently
(LayerNorm is per token, attention within the image), so the gradient at a layer's output
for image n is image n's own. A linear layer's weight gradient for image n is then
``G_n^T A_n`` (its output gradient [rows, N] times its input [rows, K], rows = tokens,
patches, or the one pooled vector), and its squared norm is sum((G_n G_n^T) * (A_n A_n^T)),
computed from two small [rows, rows] Gram matrices without forming the gradient. No
small-batch approximation: the result equals one backward pass per image
(tests/test_calibrate_lampq.py checks it against exactly that, and the gradients against
finite differences). ``batch_size`` only trades memory for speed.

**Exit-aware Fisher** [ours, for APQ/MAQEE's utilisation-aware sensitivity]:
:func:`exit_fisher_traces` takes the loss of image n to be the sum of the cross-entropies of
every head image n *reaches* under the exit policy being chosen -- the exit heads after the
blocks it runs and, if it runs to the end, the final head:
``loss_n = sum_{e: b_e <= k_n} CE_e(n)`` with k_n the last block image n runs. A layer in
block b gets gradient only from images with k_n >= b (no head an image reaches reads a block it
never runs), so tr(F) of a layer that few images reach sums few terms: the Fisher of the
reach-weighted sum of the exit-head losses. With nobody leaving (k_n = depth - 1) it is the
Fisher of the sum of all heads' losses; :func:`fisher_traces` is the final head's alone.
"""
from __future__ import annotations

from typing import Dict, Mapping, Sequence

import numpy as np

from .common import CalibrationData, batches, progress
from .emulate import layer_module

__all__ = ["fisher_traces", "exit_fisher_traces", "per_sample_weight_grads", "per_sample_sq_norms"]


def _rows(module, x):
    """A layer's input as [B, rows, K] in the weight's K order (conv: patches in (c, i, j))."""
    import torch.nn.functional as F

    if module.__class__.__name__ == "Conv2d":
        cols = F.unfold(x, kernel_size=module.kernel_size, stride=module.stride)  # [B, K, P]
        return cols.transpose(1, 2)
    return x if x.dim() == 3 else x.unsqueeze(1)


def _grad_rows(module, g):
    """A layer's output gradient as [B, rows, N]."""
    if module.__class__.__name__ == "Conv2d":
        return g.flatten(2).transpose(1, 2)
    return g if g.dim() == 3 else g.unsqueeze(1)


def _final_loss(model, x, y):
    """The summed cross-entropy of the model's own (final) head."""
    import torch.nn.functional as F

    return F.cross_entropy(model(x), y, reduction="sum")


def _activations_and_grads(model, names: Sequence[str], x, y, loss_fn=None):
    """({layer: input [B, rows, K]}, {layer: output gradient [B, rows, N]}) from one backward
    pass of ``loss_fn(model, x, y)`` (default: the summed cross-entropy of the final head), a
    sum of per-image terms."""
    import torch

    inputs, grads, handles = {}, {}, []

    def fwd(name):
        def hook(module, args, out):
            inputs[name] = args[0].detach()
            out.register_hook(lambda g: grads.__setitem__(name, g.detach()))
        return hook

    try:
        for n in names:
            handles.append(layer_module(model, n).register_forward_hook(fwd(n)))
        with torch.enable_grad():
            loss = (loss_fn or _final_loss)(model, torch.as_tensor(x), torch.as_tensor(y))
            # Only the activation gradients are needed; asking for the weights' gradient
            # keeps autograd from skipping the layers, without accumulating into .grad.
            torch.autograd.grad(loss, [layer_module(model, n).weight for n in names])
    finally:
        for h in handles:
            h.remove()
    rows = {n: _rows(layer_module(model, n), inputs[n]) for n in names}
    return rows, {n: _grad_rows(layer_module(model, n), grads[n]) for n in names}


def per_sample_weight_grads(model, names: Sequence[str], x, y) -> Dict[str, "object"]:
    """{layer: [B, N, K] per-image gradients of each image's cross-entropy w.r.t. the layer's
    (flattened) weight}, from one backward pass of the summed loss."""
    import torch

    a, g = _activations_and_grads(model, names, x, y)
    return {n: torch.einsum("brn,brk->bnk", g[n], a[n]) for n in names}


def per_sample_sq_norms(model, names: Sequence[str], x, y, loss_fn=None) -> Dict[str, "object"]:
    """{layer: [B] ||G_n^T A_n||_F^2}, without forming the gradients: with few rows per image
    (tokens), sum((G_n G_n^T) * (A_n A_n^T)) is far cheaper than N x K per image.
    ``loss_fn(model, x, y)``: a sum of per-image losses (default: the final head's CE)."""
    import torch

    a, g = _activations_and_grads(model, names, x, y, loss_fn)
    out = {}
    for n in names:
        ga, aa = g[n].double(), a[n].double()
        out[n] = (torch.bmm(ga, ga.transpose(1, 2)) * torch.bmm(aa, aa.transpose(1, 2))).sum((1, 2))
    return out


def fisher_traces(model, names: Sequence[str], data: CalibrationData, batch_size: int = 64,
                  show_progress: bool = True) -> Dict[str, float]:
    """tr(F_i) = sum_n ||grad_W loss_n||^2 over the calibration images, per layer (float)."""
    return _traces(model, names, data, batch_size, show_progress, lambda lo, hi: None)


def _traces(model, names, data, batch_size, show_progress, loss_for) -> Dict[str, float]:
    """sum over the images of per_sample_sq_norms with ``loss_for(lo, hi)``'s loss per batch."""
    import torch

    model.eval()
    totals = {n: 0.0 for n in names}
    spans = batches(len(data), batch_size)
    for lo, hi in progress(spans, "Fisher (per-sample grads)", len(spans), show_progress):
        sq = per_sample_sq_norms(model, names, torch.from_numpy(np.asarray(data.images[lo:hi])),
                                 torch.from_numpy(data.labels[lo:hi]), loss_for(lo, hi))
        for n in names:
            totals[n] += float(sq[n].sum())
    return totals


def _exit_loss(heads: Mapping[int, Mapping[str, "object"]], last_block):
    """loss_fn summing, per image, the CE of every head it reaches (module docstring);
    ``last_block`` [B]: the last block each image runs."""
    import torch
    import torch.nn.functional as F

    from ..exits import _pooling, pool_tokens, walk_blocks

    params = {b: {k: torch.as_tensor(np.asarray(v, np.float32)) for k, v in p.items()} for b, p in heads.items()}
    k = torch.as_tensor(np.asarray(last_block, np.int64))

    def loss(model, x, y):
        pool, prefix = _pooling(model)
        depth = len(model.blocks)
        terms = []

        def head_loss(b, h):
            if b in params and b < depth - 1:
                p = params[b]
                z = pool_tokens(h, pool, prefix)
                z = F.layer_norm(z, (z.shape[-1],), p["norm.weight"], p["norm.bias"], eps=1e-6)
                ce = F.cross_entropy(F.linear(z, p["fc.weight"], p["fc.bias"]), y, reduction="none")
                # a multiplied mask (not a selection) keeps every layer in the graph: zero gradients, not none
                terms.append((ce * (k >= b).to(ce.dtype)).sum())

        features = walk_blocks(model, x, head_loss)
        ce = F.cross_entropy(model.forward_head(features), y, reduction="none")
        return sum(terms, x.new_zeros(())) + (ce * (k >= depth - 1).to(ce.dtype)).sum()

    return loss


def exit_fisher_traces(model, names: Sequence[str], data: CalibrationData, heads: Mapping[int, Mapping[str, "object"]],
                       last_block: Sequence[int], batch_size: int = 64, show_progress: bool = True) -> Dict[str, float]:
    """tr(F_i) of the reach-weighted exit-head losses (module docstring), per layer.

    heads: {block: {norm.weight, norm.bias, fc.weight, fc.bias}} (exit heads as
    :func:`pyruntime.convert.convert` takes them; blocks 0..depth-2). last_block: per image of
    ``data``, the last block it runs under the exit policy (depth - 1: to the end)."""
    last_block = np.asarray(last_block, np.int64)
    depth = len(model.blocks)
    if last_block.shape != (len(data),) or (last_block.size and not (0 <= last_block.min() and last_block.max() < depth)):
        raise ValueError(f"last_block needs one block in 0..{depth - 1} per image ({len(data)}), got shape "
                         f"{last_block.shape}")
    if any(not 0 <= int(b) < depth - 1 for b in heads):
        raise ValueError(f"exit heads must follow blocks 0..{depth - 2}, got {sorted(heads)}")
    return _traces(model, names, data, batch_size, show_progress,
                   lambda lo, hi: _exit_loss(heads, last_block[lo:hi]))
