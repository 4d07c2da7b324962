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
   best), evaluated with float32-rounded coefficients as the runtime holds them (the
   optional straight-through refinement papers.md mentions is not done); a degree whose
   polynomial is not positive over
   [r_min / 2, 1.5 r_max] is skipped (the runtime would clamp it to 1e-12; should every
   degree be skipped, the layer gets a constant, the mean target scale). The chosen
   degree is refitted on all calibration images and written into the policy
   (``PredictorPolicy(block, chunk, coeffs)``, layers with ``scale: "predicted"``).

Layers at or before ``block`` keep the base policy's scales (static or dynamic).

Attention precision: the base policy's (``attention`` 8 turns a base at fp32 attention to
int8; a base with int8 attention and ``attention=32`` conflict). The runtime statistic and
the targets are both taken with it (int8 attention emulated), and the result keeps it.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..policy import LayerPolicy, Policy, PredictorPolicy, layer_block
from .common import CalibrationData, Source, batches, progress, resolve_attention, run_batches
from .emulate import QuantModel, dynamic_scale

__all__ = ["DEFAULT_RATIOS", "best_scales", "fit_polynomial", "evaluate_polynomial", "choose_degree",
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

    def report(self) -> str:
        p = self.policy.predictor
        lines = [f"statistic after block {p.block}, chunk {p.chunk}: r in [{self.r.min():.4g}, {self.r.max():.4g}] "
                 f"over {len(self.r)} calibration images",
                 f"{'layer':22s} {'deg':>3s} {'corr(r,s*)':>10s} {'fit err':>9s}  held-out err by degree"]
        for n, f in self.fits.items():
            ho = "  ".join(f"d{d}:{e:.3g}" for d, e in f.heldout.items())
            lines.append(f"{n:22s} {f.degree:3d} {f.corr:10.3f} {f.fit_error:9.3g}  {ho}")
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
                             name: Optional[str] = None, attention: Optional[int] = None) -> ScalePredictorResult:
    """``base`` with the scales of its quantised layers after ``block`` predicted per image;
    attention at ``attention`` bits (default: the base's; see the module docstring)."""
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
    meta = dict(base.meta, method="scalepredictor", calibration=dict(data.summary),
                scalepredictor={"block": block, "chunk": chunk, "holdout": holdout, "degrees": list(degrees),
                                "chosen_degrees": {nm: fits[nm].degree for nm in names}})
    policy = Policy(layers=out_layers, exits=list(base.exits), predictor=pred,
                    name=name or f"{base.name}-predicted", meta=meta, attn_bits=attn_bits)
    return ScalePredictorResult(policy, r.astype(np.float32), targets, fits)
