"""LampQ: layer-wise mixed precision from a type-aware Fisher sensitivity, allocated by
integer linear programming under a BOPs or size budget (Kim et al., AAAI 2026; see
/work/shared/papers.md -- only abstracts are available, so most details are ours).

Steps, with what the paper states and what we chose:

1. Sensitivity [stated]: Omega_i = alpha_t * tr(F_i), F_i the diagonal empirical Fisher of
   layer i's weights from squared gradients of the loss on calibration images
   (:mod:`.fisher`: exact per-sample gradients, summed over images).
   alpha_t per layer type t in {qkv, proj, fc1, fc2, patch_embed, head} ("type-aware":
   [stated] so that components of different types are measured on one scale; the paper's
   form is Omega_i = alpha_t tr(F_i), its alpha_t is not in the abstract). ``type_weighting``:
   * ``"mean1"`` [ours, the default]: alpha_t = 1 / mean tr(F) over the allocated layers of
     type t -- every type's mean sensitivity is 1, so types count alike whatever their
     Fisher magnitude.
   * ``"fisher"`` [ours: the second-order reading of "Fisher-based"]: the loss increase of
     weight noise delta is ~ 1/2 sum_j F_jj delta_j^2 (diagonal Fisher in place of the
     Hessian); with E_i the layer's *relative* error, delta_j^2 ~ E_i * mean(W_i^2), so
     alpha_t = 1/2 * mean over the type's layers of mean(W^2). Types are then compared on
     the loss scale, weighted by their Fisher information, instead of being forced to mean 1.
   * ``"none"``: alpha = 1 (the ablation: raw traces).
2. Layer error E_i(w, a) [ours]: the relative squared error of the layer's output,
   ||y_q - y_fp||^2 / ||y_fp||^2, over the first ``error_images`` (256) calibration images
   (every image contributes tokens x outputs values, so a few hundred suffice), where y_q is the layer at
   w-bit weights (the runtime's quantiser) and a-bit dynamic activations. ``initial=
   "measured"`` measures round 0 with every other layer in fp32; ``"model"`` starts from the
   Delta^2/12 model instead (relative weight error from the runtime's weight step sizes plus
   1/(4 qmax_a^2) for activations spread over their range).
3. Allocation [stated: ILP]: one option (w, a) per layer from ``w_bits`` x ``a_bits``,
   minimise sum Omega_i * E_i(w, a) subject to the cost budget (:func:`.ilp.solve`, exact).
   Cost [ours]: ``pyruntime.bops`` (MACs x w x a, the whole model, fixed fp32 parts
   included) or the model file's bytes.
4. Refinement [stated: "refined iteratively using the measured quantisation error (a few
   rounds)"]: re-measure every E_i(w, a) with the *current allocation of the other layers
   in place* (layer i's input comes from the quantised model; y_fp from the fp32 model),
   re-solve, stop when the allocation repeats or after ``rounds`` rounds. After a QAT step
   (5.) y_fp is the *trained* model's fp32 output: E_i stays the error quantising layer i adds.

5. QAT [stated: LampQ "integrates quantization-aware training with iterative bit-width
   refinement"; the step is ours] with ``qat_steps`` > 0: before every re-measurement, and
   once more at the end if the last allocation changed, :func:`qat_finetune` trains a copy of
   the model for ``qat_steps`` Adam steps on the calibration images with every allocated
   layer fake-quantised at its current (w, a): weights through the runtime's own quantiser
   (``pyruntime.kernels.quantize_weights`` then ``dequantize``: int8 per output channel
   max/127, int4 per block of ``block_size`` max/8 -- the exact grid the converted file
   holds), activations at a-bit dynamic per-image scales, both with a straight-through
   estimator. Scales are *recomputed* from the weights at every step, not learned: the
   runtime derives them from max |W| when it converts, so a learned scale would not survive
   conversion, while a recomputed one makes the converted file compute exactly what the
   trained fake-quant model computes. Loss [ours]: distillation, KL(p_fp32 || p_quant) of
   the *original* fp32 model's softmax against the quantised student's over the calibration
   images, rather than cross-entropy on their labels: a few hundred to a thousand labels
   overfit within minutes, while the teacher's full distribution carries more signal per
   image and asks only that quantisation change nothing. A step that does not lower that
   loss on the calibration images is undone (Adam's fixed-size steps add noise where the
   quantised model already matches the teacher). All parameters train (biases and
   LayerNorms can absorb quantisation bias); the result's ``source`` holds the trained model
   (convert that, not the original). With ``attention`` 8 the step trains with fp32
   attention (int8 attention's rounding has no useful gradient; its forward error is left out
   of the step, the re-measurement and the conversion include it).

Scales stay dynamic (``scale="dynamic"``); compose with :mod:`.static` or
:mod:`.scalepredictor` for other scale modes. ``attention`` 8 [ours] measures every E_i
with int8 attention emulated (against the fp32 model's outputs, so the drift the attention
adds upstream counts), writes it into the policy and costs the attention matmuls at 8 x 8 in
the fixed part of the budget; the Fisher traces stay those of the fp32 model (rint has no
useful gradient).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..modelfile import graph_layer_names
from ..policy import LayerPolicy, Policy
from . import ilp
from .ilp import format_amount
from .common import COST_UNITS, CalibrationData, CostModel, Source, batches, layer_type, progress, scope_layers
from .emulate import QuantModel, apply_layer, dynamic_scale, fake_quant, layer_module

__all__ = ["LampQConfig", "LampQResult", "TYPE_WEIGHTINGS", "bits_policy", "fp32_base", "type_aware_sensitivity",
           "weight_energy", "options", "measure_errors", "model_errors", "allocate", "feasible_range", "calibrate_lampq",
           "QATResult", "qat_finetune", "teacher_logits", "distillation_loss", "qat_source", "save_checkpoint"]

TYPE_WEIGHTINGS = ("mean1", "fisher", "none")

Bits = Tuple[int, int]  # (w_bits, a_bits)


@dataclass
class LampQConfig:
    """The knobs of LampQ (see the module docstring)."""

    w_bits: Sequence[int] = (4, 8)
    a_bits: Sequence[int] = (8,)
    scope: str = "blocks"           # "blocks": qkv/proj/fc1/fc2; "all": + patch_embed and heads
    cost: str = "bops"              # "bops" | "bytes"
    rounds: int = 3                 # refinement rounds after the first allocation
    initial: str = "measured"       # "measured" | "model" (Delta^2/12)
    type_weighting: str = "mean1"  # "mean1" | "fisher" | "none" (see the module docstring)
    qat_steps: int = 0              # QAT steps per round (0: no QAT, bits only)
    qat_lr: float = 1e-4            # Adam learning rate of the QAT step
    qat_batch: int = 64             # calibration images per QAT step
    qat_seed: int = 0               # order of the QAT mini-batches
    fisher_batch: int = 64
    error_images: int = 256         # calibration images the layer errors are measured on
    error_batch: int = 128
    block_size: int = 32            # int4 weight block
    attention: int = 32             # attention matmuls: 32 fp32, 8 int8 (emulated, costed, in the policy)
    show_progress: bool = True

    def __post_init__(self):
        _check_config(self)


def _check_int(cfg, name: str, lo: int) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"LampQConfig.{name} must be an integer >= {lo}, got {v!r}")


def _check_config(cfg: "LampQConfig") -> None:
    """ValueError naming the field of a LampQConfig value no step could use."""
    if cfg.type_weighting not in TYPE_WEIGHTINGS:
        raise ValueError(f"LampQConfig.type_weighting must be one of {TYPE_WEIGHTINGS}, got {cfg.type_weighting!r}")
    for name, lo in (("qat_steps", 0), ("qat_batch", 1), ("qat_seed", 0), ("rounds", 0), ("error_images", 1),
                     ("error_batch", 1), ("fisher_batch", 1)):
        _check_int(cfg, name, lo)
    lr = cfg.qat_lr
    if isinstance(lr, bool) or not isinstance(lr, (int, float, np.floating)) or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"LampQConfig.qat_lr must be a finite number > 0, got {lr!r}")


@dataclass
class LampQResult:
    policy: Policy
    layers: List[str]
    options: List[Bits]
    traces: Dict[str, float]
    omega: Dict[str, float]
    errors: Dict[str, List[float]]          # E_i per option, as measured in the last round
    pick: Dict[str, Bits]
    history: List[Dict[str, Bits]]          # the allocation after each round
    budget: float
    cost: Union[int, float]                 # int BOPs / bytes, float seconds
    cost_kind: str
    feasible: Tuple[float, float]           # (smallest, largest) cost over all allocations
    initial_errors: Dict[str, List[float]] = field(default_factory=dict)  # E_i of the first round
    source: Optional[Source] = None         # what to convert: the QAT-trained model, or the input source
    qat: List["QATResult"] = field(default_factory=list)  # one per QAT step, in order

    def report(self) -> str:
        """Each layer's sensitivity and chosen bits, most sensitive first."""
        unit = COST_UNITS[self.cost_kind]
        head = f"{'layer':22s} {'type':>11s} {'tr(F)':>10s} {'Omega':>8s} " + " ".join(
            f"{f'E(w{w}a{a})':>10s}" for w, a in self.options) + f" {'bits':>6s}"
        lines = [head, "-" * len(head)]
        for n in sorted(self.layers, key=lambda n: -self.omega[n]):
            w, a = self.pick[n]
            lines.append(f"{n:22s} {layer_type(n):>11s} {self.traces[n]:10.3e} {self.omega[n]:8.3f} "
                         + " ".join(f"{e:10.3e}" for e in self.errors[n]) + f" {f'w{w}a{a}':>6s}")
        lines.append(f"cost {format_amount(self.cost)} {unit} of budget {format_amount(self.budget)} (feasible "
                     f"{format_amount(self.feasible[0])} .. {format_amount(self.feasible[1])}); rounds {len(self.history)}; "
                     f"{sum(1 for b in self.pick.values() if b[0] == 4)} of {len(self.pick)} layers at 4-bit weights")
        for q in self.qat:
            lines.append(f"QAT {q.steps} steps at lr {q.lr:g}: calibration distillation loss of the quantised model "
                         f"{q.loss_before:.4g} -> {q.loss_after:.4g} ({q.seconds:.0f} s)"
                         + ("; reverted: the step raised it" if q.reverted else ""))
        return "\n".join(lines)


# --- sensitivity ---------------------------------------------------------------------------------

def weight_energy(model, names: Sequence[str]) -> Dict[str, float]:
    """mean(W^2) of each layer's weight: what turns a relative error into weight noise."""
    return {n: float(layer_module(model, n).weight.detach().double().pow(2).mean()) for n in names}


def type_aware_sensitivity(traces: Mapping[str, float], weighting: Union[bool, str] = "mean1",
                           energy: Optional[Mapping[str, float]] = None) -> Dict[str, float]:
    """Omega_i = alpha_t * tr(F_i) with alpha_t by ``weighting`` (module docstring): "mean1"
    1 / mean tr(F) of i's type, "fisher" 1/2 mean over the type of ``energy`` (mean(W^2) per
    layer, :func:`weight_energy`), "none" 1. ``True``/``False`` mean "mean1"/"none"."""
    if isinstance(weighting, bool):
        weighting = "mean1" if weighting else "none"
    if weighting not in TYPE_WEIGHTINGS:
        raise ValueError(f"type weighting must be one of {TYPE_WEIGHTINGS}, got {weighting!r}")
    if weighting == "none":
        return {n: float(t) for n, t in traces.items()}
    if weighting == "fisher" and (energy is None or any(n not in energy for n in traces)):
        raise ValueError("type weighting 'fisher' needs every layer's weight energy mean(W^2) (weight_energy)")
    by_type: Dict[str, List[str]] = {}
    for n in traces:
        by_type.setdefault(layer_type(n), []).append(n)
    if weighting == "mean1":
        means = {k: float(np.mean([traces[n] for n in v])) for k, v in by_type.items()}
        alpha = {k: (1.0 / m if m > 0 else 0.0) for k, m in means.items()}
    else:
        alpha = {k: 0.5 * float(np.mean([energy[n] for n in v])) for k, v in by_type.items()}
    return {n: alpha[layer_type(n)] * float(t) for n, t in traces.items()}


def options(cfg: LampQConfig) -> List[Bits]:
    for w in cfg.w_bits:
        if w not in (4, 8):
            raise ValueError(f"LampQ weight bits are chosen from {{4, 8}}, got {w}")
    for a in cfg.a_bits:
        if not 4 <= a <= 8:
            raise ValueError(f"activation bits must lie in 4..8, got {a}")
    return [(int(w), int(a)) for w in sorted(set(cfg.w_bits)) for a in sorted(set(cfg.a_bits))]


# --- layer errors ---------------------------------------------------------------------------------

def _layer_policies(names: Sequence[str], alloc: Mapping[str, Bits], block_size: int) -> Dict[str, LayerPolicy]:
    out = {}
    for n in names:
        if n in alloc:
            w, a = alloc[n]
            out[n] = LayerPolicy(w_bits=w, a_bits=a, scale="dynamic", block_size=block_size)
        else:
            out[n] = LayerPolicy(w_bits=32)
    return out


def _fp_outputs(model, names: Sequence[str], x) -> Dict[str, "object"]:
    """Every layer's fp32 output on a batch."""
    outs, handles = {}, []
    try:
        for n in names:
            handles.append(layer_module(model, n).register_forward_hook(
                lambda m, a, y, n=n: outs.__setitem__(n, y.detach())))
        model(x)
    finally:
        for h in handles:
            h.remove()
    return outs


def measure_errors(qm: QuantModel, names: Sequence[str], opts: Sequence[Bits], data: CalibrationData,
                   alloc: Mapping[str, Bits], all_layers: Sequence[str], block_size: int = 32,
                   batch: int = 128, show_progress: bool = True, attn_bits: int = 32) -> Dict[str, List[float]]:
    """E_i(w, a) = ||y_q - y_fp||^2 / ||y_fp||^2 per layer and option, with the layers in
    ``alloc`` quantised as allocated upstream (others fp32) and attention at ``attn_bits``;
    y_fp is the fp32 model's (fp32 attention)."""
    import torch

    err = {n: np.zeros(len(opts)) for n in names}
    ref = {n: 0.0 for n in names}
    layers = _layer_policies(all_layers, alloc, block_size)
    want = set(names)
    spans = batches(len(data), batch)
    with torch.no_grad():
        for lo, hi in progress(spans, "layer errors", len(spans), show_progress):
            x = torch.from_numpy(data.images[lo:hi])
            y_fp = _fp_outputs(qm.model, names, x)

            def tap(name, inp):
                if name not in want:
                    return
                mod, y0 = layer_module(qm.model, name), y_fp[name]
                ref[name] += float(y0.pow(2).sum(dtype=torch.float64))
                for j, (w, a) in enumerate(opts):
                    y = apply_layer(mod, fake_quant(inp, dynamic_scale(inp, a), a), qm.weight(name, w, block_size))
                    err[name][j] += float((y - y_fp[name]).pow(2).sum(dtype=torch.float64))

            with qm.emulate(layers, taps=(tap,), attn_bits=attn_bits):
                qm.model(x)
    return {n: list(err[n] / max(ref[n], 1e-300)) for n in names}


def model_errors(qm: QuantModel, names: Sequence[str], opts: Sequence[Bits], block_size: int = 32) -> Dict[str, List[float]]:
    """The Delta^2/12 model: sum of the weights' quantisation noise (step sizes of the runtime's
    quantiser) relative to their energy, plus 1/(4 qmax_a^2) for the activations."""
    out = {}
    for n in names:
        w32 = qm.weight(n, 32).double().reshape(qm.weight(n, 32).shape[0], -1)
        energy = float(w32.pow(2).mean())
        row = []
        for w, a in opts:
            step = _weight_steps(w32.numpy(), w, block_size)
            qa = (1 << (a - 1)) - 1
            row.append(float(np.mean(step ** 2) / 12 / max(energy, 1e-300) + 1.0 / (4 * qa * qa)))
        out[n] = row
    return out


def _weight_steps(w: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """Step size of every weight under the runtime's rule (int8: max/127 per row; int4: max/8
    per block)."""
    if bits == 8:
        return np.repeat(np.abs(w).max(1, keepdims=True) / 127.0, w.shape[1], 1)
    N, K = w.shape
    pad = (-K) % block_size
    wp = np.pad(np.abs(w), ((0, 0), (0, pad)))
    m = wp.reshape(N, -1, block_size).max(2) / 8.0
    return np.repeat(m, block_size, 1)[:, :K]


# --- QAT ---------------------------------------------------------------------------------------------

@dataclass
class QATResult:
    pick: Dict[str, Bits]     # the allocation trained at
    steps: int
    lr: float
    loss_before: float        # distillation loss of the quantised model on the calibration images
    loss_after: float
    seconds: float
    reverted: bool = False    # training raised the loss: the weights were put back


def teacher_logits(model, data: CalibrationData, batch: int = 256):
    """The fp32 model's logits on every calibration image (torch float32 [N, classes])."""
    import torch

    with torch.no_grad():
        return torch.cat([model(torch.from_numpy(np.asarray(data.images[lo:hi]))) for lo, hi in batches(len(data), batch)])


def _kl(student, teacher):
    """Mean over images of KL(softmax(teacher) || softmax(student))."""
    import torch.nn.functional as F

    return F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")


def distillation_loss(model, pick: Mapping[str, Bits], data: CalibrationData, teacher, block_size: int = 32,
                      attn_bits: int = 32, batch: int = 256) -> float:
    """Mean KL(fp32 teacher || quantised model) over the calibration images, the model run as
    the runtime would under ``pick`` (:meth:`.emulate.QuantModel.emulate`, attention at
    ``attn_bits``): the QAT step's loss, measured without the straight-through estimator."""
    import torch

    qm = QuantModel(model)
    total = 0.0
    with torch.no_grad(), qm.emulate(_layer_policies(list(model_layers(model)), pick, block_size), attn_bits=attn_bits):
        for lo, hi in batches(len(data), batch):
            total += float(_kl(model(torch.from_numpy(np.asarray(data.images[lo:hi]))), teacher[lo:hi])) * (hi - lo)
    return total / len(data)


def model_layers(model) -> List[str]:
    """Every linear layer name of a torch ViT (as :meth:`.common.Source.layer_names`)."""
    from ..convert import program_graph

    return graph_layer_names(program_graph(model))


def _runtime_weight(w, bits: int, block_size: int):
    """``w`` through the runtime's quantiser and back (exactly what the converted file holds),
    as a constant tensor of w's shape."""
    import torch

    from .. import kernels

    flat = np.ascontiguousarray(w.detach().reshape(w.shape[0], -1).cpu().numpy(), np.float32)
    deq = kernels.dequantize(kernels.quantize_weights(flat, bits, block_size if bits == 4 else None))
    return torch.from_numpy(np.array(deq, np.float32)).reshape(w.shape)


def _ste_weight(bits: int, block_size: int):
    """A torch parametrisation: the runtime's fake-quantised weight forward, identity backward."""
    import torch

    class STEWeight(torch.nn.Module):
        def forward(self, w):
            return w + (_runtime_weight(w, bits, block_size) - w).detach()

    return STEWeight()


def _ste_input_hook(a_bits: int):
    def hook(module, args):
        x = args[0]
        q = fake_quant(x, dynamic_scale(x, a_bits), a_bits)
        return (x + (q - x).detach(),) + tuple(args[1:])
    return hook


def qat_finetune(model, pick: Mapping[str, Bits], data: CalibrationData, teacher, steps: int, lr: float,
                 batch: int = 64, block_size: int = 32, seed: int = 0, attn_bits: int = 32,
                 show_progress: bool = True) -> QATResult:
    """Train ``model`` in place for ``steps`` Adam steps on mini-batches of ``data`` with
    every layer of ``pick`` fake-quantised at its (w, a) (straight-through estimator; weights
    through the runtime's quantiser, scales recomputed), against ``teacher`` logits
    (:func:`teacher_logits` of the fp32 model). The master weights stay fp32; converting the
    model quantises them onto the very grid the step trained on. If the step does not lower
    the calibration loss the weights are restored (``reverted``)."""
    import time

    import torch
    from torch.nn.utils import parametrize

    from ..convert import zero_fused_gaps

    t0 = time.time()
    before = distillation_loss(model, pick, data, teacher, block_size, attn_bits)
    start = copy.deepcopy(model.state_dict())
    rng = np.random.default_rng(seed)
    handles = []
    try:
        for n, (w, a) in pick.items():
            mod = layer_module(model, n)
            parametrize.register_parametrization(mod, "weight", _ste_weight(w, block_size))
            handles.append(mod.register_forward_pre_hook(_ste_input_hook(a)))
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
        order = np.zeros(0, np.int64)
        for _ in progress(range(steps), "QAT", steps, show_progress):
            if len(order) < min(batch, len(data)):
                order = np.concatenate([order, rng.permutation(len(data))])
            idx, order = np.sort(order[:batch]), order[batch:]
            x = torch.from_numpy(np.asarray(data.images[idx]))
            with torch.enable_grad():
                loss = _kl(model(x), teacher[torch.from_numpy(idx)])
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            zero_fused_gaps(model)  # e.g. Eva's k bias: timm's layout of the model has none
    finally:
        for h in handles:
            h.remove()
        for n in pick:
            mod = layer_module(model, n)
            if parametrize.is_parametrized(mod, "weight"):
                parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
    model.zero_grad(set_to_none=True)
    after = distillation_loss(model, pick, data, teacher, block_size, attn_bits)
    # Where the quantised model already matches the teacher closely, Adam's fixed-size steps
    # can only add noise (measured: W4A8 on the reference model, 2.5e-4 -> 1.3e-3); keep
    # the step only if it lowered the calibration loss it optimises.
    reverted = not after < before
    if reverted:
        model.load_state_dict(start)
    return QATResult(dict(pick), int(steps), float(lr), before, min(before, after), time.time() - t0, reverted)


def qat_source(source: Source, model, tag: str = "qat") -> Source:
    """A :class:`Source` that converts ``model`` (trained weights) with ``source``'s
    preprocessing and exit heads: no checkpoint, which convert would load over the weights."""
    return Source(model, None, source.preprocess, name=f"{source.name}-{tag}", exits=source.exits,
                  notes=list(source.notes) + [f"weights trained by QAT ({tag}); converted from memory"])


def save_checkpoint(source: Source, model, path) -> Path:
    """``model``'s weights as a safetensors state dict at ``path`` (in timm's layout: what
    :func:`pyruntime.convert.fuse_projections` fused is split back), keeping the original
    checkpoint's metadata and exit-head tensors when it is a safetensors file (so a
    reference-format checkpoint stays one: ``pyruntime convert reference --checkpoint``)."""
    from safetensors.torch import save

    from .._atomic import atomic_write_bytes
    from ..modelfile import safetensors_metadata

    from ..convert import timm_state_dict

    tensors = {k: v.detach().contiguous().clone() for k, v in timm_state_dict(model).items()}
    meta = None
    ckpt = source.checkpoint
    if ckpt is not None and Path(ckpt).suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        meta = dict(safetensors_metadata(ckpt)) or None
        tensors.update({k: v for k, v in load_file(str(ckpt)).items() if k.startswith("exits.")})
    atomic_write_bytes(path, save(tensors, metadata=meta))
    return Path(path)


# --- allocation ------------------------------------------------------------------------------------

def allocate(names: Sequence[str], opts: Sequence[Bits], omega: Mapping[str, float],
             errors: Mapping[str, Sequence[float]], costs: CostModel, budget: float, fixed: float,
             block_size: int = 32) -> Dict[str, Bits]:
    """Solve the ILP: the (w, a) per layer minimising sum Omega_i * E_i under the budget."""
    choices = [[(costs.cost(n, w, a, block_size), omega[n] * errors[n][j]) for j, (w, a) in enumerate(opts)]
               for n in names]
    pick = ilp.solve(choices, budget, fixed_cost=fixed, unit=costs.unit())
    return {n: opts[j] for n, j in zip(names, pick)}


def _choices_bounds(names, opts, costs: CostModel, fixed, block_size) -> Tuple[float, float]:
    choices = [[(costs.cost(n, w, a, block_size), 0.0) for w, a in opts] for n in names]
    return ilp.min_cost(choices, fixed_cost=fixed), ilp.max_cost(choices, fixed_cost=fixed)


def bits_policy(pick: Mapping[str, Bits], block_size: int, name: str, meta: Optional[dict] = None,
                exits: Sequence = (), attn_bits: int = 32) -> Policy:
    """The policy of an allocation: each layer at its (w, a) with dynamic activation scales,
    attention at ``attn_bits``."""
    layers = {n: LayerPolicy(w_bits=w, a_bits=a, scale="dynamic", block_size=block_size) for n, (w, a) in pick.items()}
    return Policy(layers=layers, exits=list(exits), name=name, meta=dict(meta or {}), attn_bits=attn_bits)


def fp32_base(attention: int = 32) -> Policy:
    """Every layer fp32, attention at ``attention`` bits: what the allocated layers' fixed
    cost is taken from (the attention matmuls are part of it)."""
    return Policy(name="fp32", attn_bits=attention)


def feasible_range(source: Source, cfg: LampQConfig, costs: Optional[CostModel] = None) -> Tuple[float, float]:
    """(smallest, largest) whole-model cost any allocation of ``cfg`` can have."""
    costs = costs or CostModel(source, cfg.cost)
    names = scope_layers(source.layer_names(), cfg.scope)
    fixed = costs.fixed(names, fp32_base(cfg.attention))
    return _choices_bounds(names, options(cfg), costs, fixed, cfg.block_size)


def calibrate_lampq(source: Source, data: CalibrationData, budget: float, cfg: Optional[LampQConfig] = None,
                    traces: Optional[Mapping[str, float]] = None,
                    initial_errors: Optional[Mapping[str, Sequence[float]]] = None,
                    costs: Optional[CostModel] = None) -> LampQResult:
    """A LampQ policy for ``source`` under ``budget`` (whole-model BOPs, bytes or seconds, as
    ``cfg.cost``); ValueError naming the smallest feasible budget if it cannot be met.
    ``costs``: the cost model (default ``CostModel(source, cfg.cost)``; pass one built with a
    :class:`~pyruntime.latency.LatencyTable` to fit the policy to a device's latency).

    ``traces`` and ``initial_errors`` (from an earlier result with the same data and
    options: ``res.traces``, ``res.initial_errors``) skip recomputing what does not depend
    on the budget, e.g. when sweeping budgets (they stay the fp32 model's with QAT too).

    With ``cfg.qat_steps`` the weights are trained on a copy: convert ``res.source`` (the
    trained model, no checkpoint); ``source`` itself is left as it was."""
    cfg = cfg or LampQConfig()
    opts = options(cfg)
    all_layers = source.layer_names()
    names = scope_layers(all_layers, cfg.scope)
    costs = costs or CostModel(source, cfg.cost)
    fixed = costs.fixed(names, fp32_base(cfg.attention))
    lo, hi = _choices_bounds(names, opts, costs, fixed, cfg.block_size)
    if not budget >= lo:  # fail before any expensive step
        raise ilp.InfeasibleBudget(budget, lo, costs.unit())
    model = source.model.eval()
    traces = dict(traces) if traces is not None else fisher_traces_for(model, names, data, cfg)
    omega = type_aware_sensitivity(traces, cfg.type_weighting, weight_energy(model, names))
    err_data = data if len(data) <= cfg.error_images else CalibrationData(
        data.images[:cfg.error_images], data.labels[:cfg.error_images], data.summary)
    qat = _QATRounds(source, data, cfg)

    def measured(alloc):
        return measure_errors(QuantModel(qat.model), names, opts, err_data, alloc, all_layers, cfg.block_size,
                              cfg.error_batch, cfg.show_progress, cfg.attention)

    if initial_errors is None:
        initial_errors = measured({}) if cfg.initial == "measured" else model_errors(QuantModel(model), names, opts,
                                                                                     cfg.block_size)
    errors = {n: list(v) for n, v in initial_errors.items()}
    pick = allocate(names, opts, omega, errors, costs, budget, fixed, cfg.block_size)
    history = [pick]
    for _ in range(cfg.rounds):
        qat.train(pick)
        errors = measured(pick)
        new = allocate(names, opts, omega, errors, costs, budget, fixed, cfg.block_size)
        history.append(new)
        if new == pick:
            break
        pick = new
    qat.train(pick)  # the weights end trained at the bits they ship with (no-op if they are)
    cost = fixed + sum(costs.cost(n, *pick[n], cfg.block_size) for n in names)
    meta = {"calibration": dict(data.summary), "method": "lampq", "cost_kind": costs.kind, "budget": float(budget),
            "cost": _amount(cost, costs.kind), "rounds": len(history), "options": [list(o) for o in opts],
            "type_weighting": cfg.type_weighting, "initial": cfg.initial,
            "sensitivity": {n: float(omega[n]) for n in names}}
    if qat.results:
        meta["qat"] = {"steps": cfg.qat_steps, "lr": cfg.qat_lr, "batch": cfg.qat_batch, "loss": "distillation KL",
                       "loss_before": qat.results[0].loss_before, "loss_after": qat.results[-1].loss_after,
                       "trainings": len(qat.results), "reverted": sum(r.reverted for r in qat.results)}
    policy = bits_policy({n: pick[n] for n in names}, cfg.block_size, "lampq", meta, attn_bits=cfg.attention)
    out_source = qat_source(source, qat.model) if qat.results else source
    return LampQResult(policy, list(names), opts, traces, omega, errors, pick, history, float(budget), _amount(cost, costs.kind),
                       costs.kind, (lo, hi), dict(initial_errors), out_source, list(qat.results))


class _QATRounds:
    """The QAT steps of one LampQ run: a copy of the model trained at each allocation in
    turn (the fp32 teacher stays the original), nothing when ``cfg.qat_steps`` is 0."""

    def __init__(self, source: Source, data: CalibrationData, cfg: LampQConfig):
        self.cfg, self.data, self.results = cfg, data, []
        self.model = source.model
        self.trained_at: Optional[Dict[str, Bits]] = None
        self.teacher = None
        if cfg.qat_steps:
            self.teacher = teacher_logits(source.model, data)
            self.model = copy.deepcopy(source.model).eval()

    def train(self, pick: Mapping[str, Bits]) -> None:
        if not self.cfg.qat_steps or pick == self.trained_at:
            return
        c = self.cfg
        self.results.append(qat_finetune(self.model, pick, self.data, self.teacher, c.qat_steps, c.qat_lr, c.qat_batch,
                                         c.block_size, c.qat_seed + len(self.results), c.attention, c.show_progress))
        self.trained_at = dict(pick)


def _amount(cost: float, kind: str) -> Union[int, float]:
    """BOPs and bytes are integers; seconds are not."""
    return float(cost) if kind == "latency" else int(cost)


def fisher_traces_for(model, names, data, cfg: LampQConfig) -> Dict[str, float]:
    from .fisher import fisher_traces

    return fisher_traces(model, names, data, cfg.fisher_batch, cfg.show_progress)
