"""A tiny random timm ViT for the exit-aware calibration tests (needs torch + timm), its
shortcut exit heads, and images labelled by its own fp32 predictions -- so the final head is
right and the exit heads and low-bit copies are right only sometimes."""
import numpy as np

from pyruntime.calibrate.common import CalibrationData


def tiny_model(depth: int, classes: int):
    """8x8 single-channel input, patch 4, width 32; weights perturbed so the blocks matter."""
    import torch
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    m = VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=classes, embed_dim=32, depth=depth,
                          num_heads=2, mlp_ratio=2.0).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return m


def exit_heads(model, blocks):
    """The final norm + head after each of ``blocks`` (a shortcut classifier)."""
    return {b: {"norm.weight": model.norm.weight.detach(), "norm.bias": model.norm.bias.detach(),
                "fc.weight": model.head.weight.detach(), "fc.bias": model.head.bias.detach()} for b in blocks}


def teacher_data(model, n: int, seed: int) -> CalibrationData:
    """``n`` random images labelled by the model's own fp32 predictions."""
    import torch

    x = np.random.default_rng(seed).standard_normal((n, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(-1).numpy().astype(np.int64)
    return CalibrationData(x, y, {"dataset": "teacher", "images": n, "seed": seed})
