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
"""
from __future__ import annotations

from typing import Dict, Sequence

from .common import CalibrationData, batches, progress
from .emulate import layer_module

__all__ = ["fisher_traces", "per_sample_weight_grads", "per_sample_sq_norms"]


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


def _activations_and_grads(model, names: Sequence[str], x, y):
    """({layer: input [B, rows, K]}, {layer: output gradient [B, rows, N]}) from one backward
    pass of the summed cross-entropy."""
    import torch
    import torch.nn.functional as F

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
            logits = model(torch.as_tensor(x))
            loss = F.cross_entropy(logits, torch.as_tensor(y), reduction="sum")
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


def per_sample_sq_norms(model, names: Sequence[str], x, y) -> Dict[str, "object"]:
    """{layer: [B] ||G_n^T A_n||_F^2}, without forming the gradients: with few rows per image
    (tokens), sum((G_n G_n^T) * (A_n A_n^T)) is far cheaper than N x K per image."""
    import torch

    a, g = _activations_and_grads(model, names, x, y)
    out = {}
    for n in names:
        ga, aa = g[n].double(), a[n].double()
        out[n] = (torch.bmm(ga, ga.transpose(1, 2)) * torch.bmm(aa, aa.transpose(1, 2))).sum((1, 2))
    return out


def fisher_traces(model, names: Sequence[str], data: CalibrationData, batch_size: int = 64,
                  show_progress: bool = True) -> Dict[str, float]:
    """tr(F_i) = sum_n ||grad_W loss_n||^2 over the calibration images, per layer (float)."""
    import torch

    model.eval()
    totals = {n: 0.0 for n in names}
    spans = batches(len(data), batch_size)
    for lo, hi in progress(spans, "Fisher (per-sample grads)", len(spans), show_progress):
        sq = per_sample_sq_norms(model, names, torch.from_numpy(data.images[lo:hi]),
                                 torch.from_numpy(data.labels[lo:hi]))
        for n in names:
            totals[n] += float(sq[n].sum())
    return totals
