"""ScalePredictor: activation scales of deeper layers predicted per image from a range
statistic of a shallow block (Li et al., 2026; see /work/shared/papers.md).

[stated] The activation range of shallow layers predicts the best quantisation scales of
deeper layers; the robust statistic splits a shallow activation into blocks and averages the
per-block extremes; a polynomial maps it to the scales of all deeper layers in one pass;
activations only.

What we do [ours]:

1. **Statistic** r(x): exactly the runtime's (docs/model_format.md): after block ``block``,
   the mean over chunks of ``chunk`` consecutive values of the flattened [T, D] output tokens
   of max |x|. It is not recomputed here: the calibration images are run through the
   *runtime* with the base policy plus a predictor that predicts nothing, and
   ``RunResult.stat`` is what the polynomials are fitted on -- the same number, bit for bit,
   that the converted model computes (tests check it).
2. **Targets**: for every quantised layer after ``block`` and every calibration image, the
   scale minimising that layer's input quantisation error ||Q(x; s) - x||^2 on that image,
   searched over a grid of clip ratios rho of the image's max: s = rho * max|x| / qmax,
   rho on the grid ``ratios`` (default 9 values in [0.2, 1]), then refined in 4 steps either
   side of the best grid point (resolution 0.025). Inputs come from the torch emulation of
   the base policy (other layers quantised as in the base).
3. **Fit**: per layer, s(r) = sum_k a_k r^k by least squares (all coefficients, a_0
   included: with one statistic the intercept is identifiable, so we do not pin it to the
   static scale), degree 1..3 chosen on held-out calibration images (``holdout`` of them)
   by the relative squared error of the predicted scale (the lowest degree within 1% of the
   best), evaluated with float32-rounded coefficients as the runtime holds them; a degree whose
   polynomial is not positive over
   [r_min / 2, 1.5 r_max] is skipped (the runtime would clamp it to 1e-12; should every
   degree be skipped, the layer gets a constant, the mean target scale). The chosen
   degree is refitted on all calibration images and written into the policy
   (``PredictorPolicy(block, chunk, coeffs)``, layers with ``scale: "predicted"``).
4. **Straight-through refinement** (``ScalePredictorConfig.ste_steps`` > 0; papers.md's
   optional step): all predicted layers' coefficients together, by Adam on minibatches of
   the calibration images through the emulated quantised model, rounding passed straight
   through (the gradient of round(x/s) * s with respect to s is round(x/s) - x/s inside the
   grid and +-qmax where it clips, as in LSQ). Loss: distillation, KL(fp32 softmax ||
   quantised softmax), learning rate decayed to 0 on a cosine [ours: the point of scales is to reproduce the fp32 model; its soft
   outputs carry more per image than one label, and fitting labels on a few hundred
   calibration images can move the model away from the function it was trained to be].
   The coefficients are optimised in a normalised form (r / mean r, scale / mean target) so
   one learning rate suits every degree; the result is kept per layer only where it stays
   positive over the guard interval, and as a whole only if it lowers the distillation loss
   on all calibration images (both recorded in the report).

Layers at or before ``block`` keep the base policy's scales (static or dynamic).

Attention precision: the base policy's (``attention`` 8 turns a base at fp32 attention to
int8; a base with int8 attention and ``attention=32`` conflict). The runtime statistic and
the targets are both taken with it (int8 attention emulated), and the result keeps it.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..policy import LayerPolicy, Policy, PredictorPolicy, layer_block
from .common import CalibrationData, Source, batches, progress, resolve_attention, run_batches
from .emulate import QuantModel, dynamic_scale, layer_module

__all__ = ["ScalePredictorConfig", "ste_refine", "DEFAULT_RATIOS", "best_scales", "fit_polynomial", "evaluate_polynomial", "choose_degree",
           "runtime_statistic", "predicted_layers", "ScalePredictorResult", "calibrate_scalepredictor"]

DEFAULT_RATIOS = tuple(float(v) for v in np.linspace(0.2, 1.0, 9))  # coarse grid, step 0.1
REFINE = 4  # the best coarse ratio is refined in steps of 0.1 / 4 out to its neighbours


# --- per-image target scales -------------------------------------------------------------------

def _errors(x, dyn, cand, a_bits: int):
    """[B, C] float64: ||Q(x; cand * dyn) - x||^2 per image for per-image ratios ``cand``
    [B, C] (x [B, M] float32, dyn [B] the dynamic scale)."""
    import torch

    qmax = float((1 << (a_bits - 1)) - 1)
    out = torch.empty(cand.shape, dtype=torch.float64)
    for c in range(cand.shape[1]):
        s = (dyn * cand[:, c].float()).clamp_min(1e-30)[:, None]
        e = torch.round(x * (1.0 / s)).clamp_(-qmax, qmax).mul_(s).sub_(x)
        out[:, c] = e.square_().sum(1, dtype=torch.float64)
    return out


def _last_argmin(errs):
    """Index of the minimum per row, the last one on ties (the larger ratio)."""
    import torch

    return errs.shape[1] - 1 - torch.flip(errs, [1]).argmin(1)


def best_scales(x, a_bits: int, ratios: Sequence[float] = DEFAULT_RATIOS, refine: int = REFINE):
    """[B] float64: per image, the scale rho * max|x| / qmax with the least ||Q(x; s) - x||^2,
    rho searched on the grid ``ratios`` and then on ``refine`` subdivisions either side of
    the best grid point (ties: the larger scale)."""
    import torch

    x = x.detach().flatten(1).float()
    dyn = dynamic_scale(x, a_bits)
    grid = torch.as_tensor(np.asarray(ratios, np.float64))
    cand = grid[None].expand(x.shape[0], -1)
    rho = grid[_last_argmin(_errors(x, dyn, cand, a_bits))]
    if refine > 0 and len(ratios) > 1:
        step = float(np.min(np.diff(np.asarray(ratios, np.float64)))) / refine
        offsets = torch.arange(-refine, refine + 1, dtype=torch.float64) * step
        cand = (rho[:, None] + offsets[None]).clamp(float(min(ratios)), float(max(ratios)))
        rho = cand[torch.arange(len(rho)), _last_argmin(_errors(x, dyn, cand, a_bits))]
    return (dyn.double() * rho.float().double()).numpy()


# --- polynomials ------------------------------------------------------------------------------------

def fit_polynomial(r: np.ndarray, s: np.ndarray, degree: int) -> np.ndarray:
    """Least-squares monomial coefficients [a_0..a_degree] of s ~ sum_k a_k r^k (fitted in a
    scaled variable for conditioning, then converted)."""
    from numpy.polynomial import Polynomial

    r, s = np.asarray(r, np.float64), np.asarray(s, np.float64)
    if len(r) <= degree:
        raise ValueError(f"need more than {degree} points to fit degree {degree}, got {len(r)}")
    coef = Polynomial.fit(r, s, degree).convert().coef
    return np.pad(coef, (0, degree + 1 - len(coef)))


def evaluate_polynomial(coeffs: Sequence[float], r: np.ndarray) -> np.ndarray:
    """The runtime's evaluation: float32 coefficients, Horner in double, clamp >= 1e-12,
    rounded to float32."""
    c = np.asarray(coeffs, np.float32).astype(np.float64)
    rr = np.asarray(r, np.float64)
    s = np.zeros_like(rr)
    for a in c[::-1]:
        s = s * rr + a
    return np.maximum(s, 1e-12).astype(np.float32)


def _rel_err(pred: np.ndarray, target: np.ndarray) -> float:
    return float(np.mean((pred.astype(np.float64) / target - 1.0) ** 2))


def _positive(coeffs, r: np.ndarray) -> bool:
    grid = np.linspace(0.5 * float(r.min()), 1.5 * float(r.max()), 64)
    c = np.asarray(coeffs, np.float32).astype(np.float64)
    return bool(np.all(np.polynomial.polynomial.polyval(grid, c) > 0))


DEGREE_MARGIN = 0.01  # a higher degree must beat the lower ones' held-out error by 1%


def choose_degree(r_fit, s_fit, r_held, s_held, degrees: Sequence[int] = (1, 2, 3),
                  margin: float = DEGREE_MARGIN) -> Tuple[int, Dict[int, float]]:
    """(degree, {degree: held-out relative scale error}): the lowest degree whose held-out
    error is within ``margin`` (relative) of the best [ours: guards against overfitting small
    calibration sets]; degrees not positive over the guard interval score inf."""
    scores = {}
    for d in sorted(degrees):
        c = fit_polynomial(r_fit, s_fit, d)
        ok = _positive(c, np.concatenate([r_fit, r_held]))
        scores[d] = _rel_err(evaluate_polynomial(c, r_held), s_held) if ok else float("inf")
    best = min(scores.values())
    chosen = min(d for d in scores if scores[d] <= best * (1 + margin) + 1e-30)
    return chosen, scores


# --- the runtime's statistic ---------------------------------------------------------------------------

def runtime_statistic(source: Source, policy: Policy, data: CalibrationData, workdir: Optional[Path] = None,
                      show_progress: bool = True) -> np.ndarray:
    """r of every calibration image as the runtime computes it (``RunResult.stat``) for
    ``policy`` (which must have a predictor)."""
    from ..runtime import load

    if policy.predictor is None:
        raise ValueError("runtime_statistic needs a policy with a predictor")
    with tempfile.TemporaryDirectory(prefix="pyruntime-sp-") as tmp:
        path = source.convert(Path(workdir or tmp) / "scalepredictor_probe.pyrt", policy)
        model = load(path)
        _, _, _, stat = run_batches(model, data.images, desc="runtime statistic", enabled=show_progress)
    return stat


def predicted_layers(layers: Mapping[str, LayerPolicy], block: int, depth: int) -> List[str]:
    """The quantised layers after ``block`` (the ones whose scale is predicted)."""
    return [n for n, lp in layers.items() if lp.w_bits != 32 and layer_block(n, depth) > block]


def collect_targets(source: Source, layers: Mapping[str, LayerPolicy], names: Sequence[str], data: CalibrationData,
                    ratios: Sequence[float], batch: int = 128, show_progress: bool = True,
                    attn_bits: int = 32) -> Dict[str, np.ndarray]:
    """{layer: [N] best per-image scale} with the base layers quantised as given and
    attention at ``attn_bits``."""
    import torch

    want = set(names)
    out: Dict[str, List[np.ndarray]] = {n: [] for n in names}

    def tap(name, x):
        if name in want:
            out[name].append(best_scales(x, layers[name].a_bits, ratios))

    qm = QuantModel(source.model.eval())
    spans = batches(len(data), batch)
    with torch.no_grad(), qm.emulate(layers, taps=(tap,), attn_bits=attn_bits):
        for lo, hi in progress(spans, "target scales", len(spans), show_progress):
            qm.model(torch.from_numpy(data.images[lo:hi]))
    return {n: np.concatenate(v) for n, v in out.items()}


# --- straight-through refinement -----------------------------------------------------------------------

@dataclass(frozen=True)
class ScalePredictorConfig:
    """Options beyond the closed-form fit (defaults: none of them, the closed form alone)."""

    ste_steps: int = 0        # Adam steps of the straight-through refinement (0: off)
    ste_lr: float = 0.01      # on the normalised coefficients (see the module docstring)
    ste_batch: int = 64       # calibration images per step
    ste_seed: int = 0         # minibatch order

    def __post_init__(self) -> None:
        if isinstance(self.ste_steps, bool) or not isinstance(self.ste_steps, int) or self.ste_steps < 0:
            raise ValueError(f"ste_steps must be an integer >= 0, got {self.ste_steps!r}")
        if not (isinstance(self.ste_lr, (int, float)) and 0 < self.ste_lr < float("inf")):
            raise ValueError(f"ste_lr must be a positive finite number, got {self.ste_lr!r}")
        if isinstance(self.ste_batch, bool) or not isinstance(self.ste_batch, int) or self.ste_batch < 1:
            raise ValueError(f"ste_batch must be an integer >= 1, got {self.ste_batch!r}")


def ste_quant(x, s, a_bits: int):
    """Fake quantisation of x at per-image scales s [B] whose value is the runtime's
    clip(round(x / s), -qmax, qmax) * s and whose gradient passes round straight through."""
    import torch

    qmax = float((1 << (a_bits - 1)) - 1)
    v = x / s.reshape(-1, *([1] * (x.dim() - 1)))
    v = v + (torch.round(v) - v).detach()
    return torch.clamp(v, -qmax, qmax) * s.reshape(-1, *([1] * (x.dim() - 1)))


def _kd_loss(student, teacher_prob):
    """Mean over images of KL(teacher || student), teacher given as probabilities."""
    import torch

    logp = torch.log_softmax(student.double(), 1)
    return (teacher_prob * (torch.log(teacher_prob.clamp_min(1e-30)) - logp)).sum(1).mean()


class _SteModel:
    """The emulated quantised model with the predicted layers' scales s_l(r) = sbar_l *
    sum_k theta_lk (r / rbar)^k differentiable in theta (every other layer as ``layers``)."""

    def __init__(self, source: Source, layers: Mapping[str, LayerPolicy], names: Sequence[str], block: int,
                 chunk: int, coeffs: Mapping[str, Sequence[float]], rbar: float, sbar: Mapping[str, float],
                 attn_bits: int):
        import torch

        self.source, self.layers, self.names, self.attn_bits = source, layers, list(names), attn_bits
        self.block, self.chunk, self.rbar, self.sbar = block, chunk, float(rbar), dict(sbar)
        self.qm = QuantModel(source.model.eval())
        self.theta = {n: torch.tensor([float(np.float32(a)) * self.rbar ** k / self.sbar[n]
                                       for k, a in enumerate(coeffs[n])], dtype=torch.float64, requires_grad=True)
                      for n in self.names}

    def coeffs(self) -> Dict[str, List[float]]:
        """The current polynomials in the runtime's form (float32 monomial coefficients of r)."""
        return {n: [float(np.float32(float(t) * self.sbar[n] / self.rbar ** k)) for k, t in enumerate(th.detach())]
                for n, th in self.theta.items()}

    def _scale(self, name: str, r):
        import torch

        u = r.double() / self.rbar
        s = torch.zeros_like(u)
        for t in reversed(list(self.theta[name])):
            s = s * u + t
        return torch.clamp(s * self.sbar[name], min=1e-12).float()

    def forward(self, images):
        """Logits of ``images`` (float32 numpy) with the current theta (grad enabled)."""
        import torch

        rest = {n: lp for n, lp in self.layers.items() if n not in self.names}
        model = self.source.model
        swapped, handles = [], []
        with self.qm.emulate(rest, PredictorPolicy(self.block, self.chunk, {}), attn_bits=self.attn_bits) as state:
            try:
                for n in self.names:
                    lp, mod = self.layers[n], layer_module(model, n)
                    swapped.append((mod, mod.weight.data))
                    mod.weight.data = self.qm.weight(n, lp.w_bits, lp.block_size)
                    handles.append(mod.register_forward_pre_hook(
                        lambda m, args, n=n, a=lp.a_bits: (ste_quant(args[0], self._scale(n, state["r"]), a),)
                        + tuple(args[1:])))
                return model(torch.from_numpy(images))
            finally:
                for h in handles:
                    h.remove()
                for mod, w in swapped:
                    mod.weight.data = w

    def loss(self, images, teacher_prob, batch: int = 256) -> float:
        """Distillation loss over all ``images`` (no gradient)."""
        import torch

        total = 0.0
        with torch.no_grad():
            for lo, hi in batches(len(images), batch):
                total += float(_kd_loss(self.forward(images[lo:hi]), teacher_prob[lo:hi])) * (hi - lo)
        return total / len(images)


@dataclass
class SteReport:
    steps: int
    loss_closed_form: float       # distillation loss on all calibration images, closed-form fit
    loss_refined: float           # the same after refinement (before the accept/reject choice)
    accepted: bool                # refined coefficients kept (lower loss, every layer positive)
    kept_closed_form: List[str]   # layers whose refined polynomial was not positive (closed form kept)
    seconds: float


def ste_refine(source: Source, data: CalibrationData, layers: Mapping[str, LayerPolicy], predictor: PredictorPolicy,
               names: Sequence[str], r: np.ndarray, targets: Mapping[str, np.ndarray], cfg: ScalePredictorConfig,
               attn_bits: int = 32, show_progress: bool = True) -> Tuple[Dict[str, List[float]], SteReport]:
    """(coefficients, report): ``predictor``'s polynomials for ``names`` refined through
    the straight-through estimator (module docstring, step 4), or returned unchanged when the
    refinement does not lower the calibration distillation loss."""
    import torch

    t0 = time.time()
    sbar = {n: float(np.mean(targets[n])) for n in names}
    net = _SteModel(source, layers, names, predictor.block, predictor.chunk, predictor.coeffs, float(np.mean(r)), sbar,
                    attn_bits)
    model = source.model.eval()
    grads = [p.requires_grad for p in model.parameters()]
    with torch.no_grad():
        teacher = torch.cat([torch.softmax(model(torch.from_numpy(data.images[lo:hi])).double(), 1)
                             for lo, hi in batches(len(data), 256)])
    before = net.loss(data.images, teacher)
    opt = torch.optim.Adam(list(net.theta.values()), lr=cfg.ste_lr)
    # cosine decay to 0: the last steps settle instead of jittering at the full step size
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + np.cos(np.pi * i / cfg.ste_steps)))
    rng = np.random.default_rng(cfg.ste_seed)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        order = np.empty(0, np.int64)
        for _ in progress(range(cfg.ste_steps), "STE refinement", cfg.ste_steps, show_progress):
            if len(order) < cfg.ste_batch:
                order = np.concatenate([order, rng.permutation(len(data))])
            idx, order = np.sort(order[:cfg.ste_batch]), order[cfg.ste_batch:]
            opt.zero_grad()
            _kd_loss(net.forward(data.images[idx]), teacher[idx]).backward()
            opt.step()
            sched.step()
    finally:
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
    refined = net.coeffs()
    kept = [n for n in names if not _positive(refined[n], r)]
    for n in kept:
        refined[n] = list(predictor.coeffs[n])
    net.theta = {n: torch.tensor([float(np.float32(a)) * net.rbar ** k / sbar[n] for k, a in enumerate(refined[n])],
                                 dtype=torch.float64) for n in names}
    after = net.loss(data.images, teacher)
    accepted = after < before
    report = SteReport(cfg.ste_steps, before, after, accepted, kept, time.time() - t0)
    return (refined if accepted else {n: list(predictor.coeffs[n]) for n in names}), report


# --- the method ------------------------------------------------------------------------------------------

@dataclass
class LayerFit:
    layer: str
    degree: int
    coeffs: List[float]
    heldout: Dict[int, float]     # held-out relative scale error per degree
    fit_error: float              # relative scale error on all calibration images (chosen degree)
    corr: float                   # Pearson correlation of r and the target scale


@dataclass
class ScalePredictorResult:
    policy: Policy
    r: np.ndarray                             # runtime statistic per calibration image
    targets: Dict[str, np.ndarray]            # best scale per layer and image
    fits: Dict[str, LayerFit] = field(default_factory=dict)
    ste: Optional[SteReport] = None


    def report(self) -> str:
        p = self.policy.predictor
        lines = [f"statistic after block {p.block}, chunk {p.chunk}: r in [{self.r.min():.4g}, {self.r.max():.4g}] "
                 f"over {len(self.r)} calibration images",
                 f"{'layer':22s} {'deg':>3s} {'corr(r,s*)':>10s} {'fit err':>9s}  held-out err by degree"]
        for n, f in self.fits.items():
            ho = "  ".join(f"d{d}:{e:.3g}" for d, e in f.heldout.items())
            lines.append(f"{n:22s} {f.degree:3d} {f.corr:10.3f} {f.fit_error:9.3g}  {ho}")
        if self.ste is not None:
            t = self.ste
            lines.append(f"STE refinement: {t.steps} steps in {t.seconds:.0f}s, calibration distillation loss "
                         f"{t.loss_closed_form:.5g} (closed form) -> {t.loss_refined:.5g} (refined): "
                         f"{'kept' if t.accepted else 'rejected, closed form kept'}"
                         + (f"; not positive, closed form kept: {t.kept_closed_form}" if t.kept_closed_form else ""))
        return "\n".join(lines)


def _fit_layer(name: str, r: np.ndarray, s: np.ndarray, fit_idx, held_idx, degrees) -> LayerFit:
    d, scores = choose_degree(r[fit_idx], s[fit_idx], r[held_idx], s[held_idx], degrees)
    if not np.isfinite(scores[d]):  # no degree stays positive: a constant (the mean target)
        coeffs = np.array([float(np.mean(s))])
        d = 0
    else:
        coeffs = fit_polynomial(r, s, d)
    coeffs32 = [float(np.float32(c)) for c in coeffs]
    corr = float(np.corrcoef(r, s)[0, 1]) if np.std(r) > 0 and np.std(s) > 0 else 0.0
    return LayerFit(name, d, coeffs32, scores, _rel_err(evaluate_polynomial(coeffs32, r), s), corr)


def calibrate_scalepredictor(source: Source, data: CalibrationData, base: Policy, block: int = 0, chunk: int = 64,
                             degrees: Sequence[int] = (1, 2, 3), holdout: float = 0.25,
                             ratios: Sequence[float] = DEFAULT_RATIOS, show_progress: bool = True,
                             name: Optional[str] = None, attention: Optional[int] = None,
                             config: Optional[ScalePredictorConfig] = None) -> ScalePredictorResult:
    """``base`` with the scales of its quantised layers after ``block`` predicted per image;
    attention at ``attention`` bits (default: the base's; see the module docstring);
    ``config``: the optional straight-through refinement (default: none)."""
    cfg = config or ScalePredictorConfig()
    depth = source.depth
    if not 0 <= block < depth - 1:
        raise ValueError(f"predictor block must lie in 0..{depth - 2} (a later layer must follow), got {block}")
    if any(not 1 <= d <= 3 for d in degrees):
        raise ValueError(f"polynomial degrees lie in 1..3, got {list(degrees)}")
    attn_bits = resolve_attention(base, attention)
    layers = base.resolve(source.layer_names(), depth)
    names = predicted_layers(layers, block, depth)
    if not names:
        raise ValueError(f"the base policy quantises no layer after block {block}: nothing to predict")
    probe = Policy(layers=dict(layers), exits=list(base.exits), name="probe",
                   predictor=PredictorPolicy(block=block, chunk=chunk, coeffs={}), attn_bits=attn_bits)
    r = runtime_statistic(source, probe, data, show_progress=show_progress).astype(np.float64)
    targets = collect_targets(source, layers, names, data, ratios, show_progress=show_progress, attn_bits=attn_bits)
    n = len(data)
    perm = np.random.default_rng(0).permutation(n)
    k = max(1, int(round(holdout * n)))
    held_idx, fit_idx = np.sort(perm[:k]), np.sort(perm[k:])
    fits = {nm: _fit_layer(nm, r, targets[nm], fit_idx, held_idx, degrees) for nm in names}
    out_layers = dict(layers)
    for nm in names:
        out_layers[nm] = replace(layers[nm], scale="predicted", static_scale=layers[nm].static_scale)
    pred = PredictorPolicy(block=block, chunk=chunk, coeffs={nm: fits[nm].coeffs for nm in names})
    ste = None
    if cfg.ste_steps > 0:
        coeffs, ste = ste_refine(source, data, out_layers, pred, names, r, targets, cfg, attn_bits, show_progress)
        pred = PredictorPolicy(block=block, chunk=chunk, coeffs=coeffs)
    meta = dict(base.meta, method="scalepredictor", calibration=dict(data.summary),
                scalepredictor={"block": block, "chunk": chunk, "holdout": holdout, "degrees": list(degrees),
                                "chosen_degrees": {nm: fits[nm].degree for nm in names},
                                "ste": None if ste is None else dict(asdict(ste), lr=cfg.ste_lr, batch=cfg.ste_batch)})
    policy = Policy(layers=out_layers, exits=list(base.exits), predictor=pred,
                    name=name or f"{base.name}-predicted", meta=meta, attn_bits=attn_bits)
    return ScalePredictorResult(policy, r.astype(np.float32), targets, fits, ste)
