"""ScalePredictor: polynomial fits recover exact polynomials, the target search finds the
grid minimum, and the calibrated policy runs with the runtime computing exactly the
statistic the fit used. Also the static-scale baselines."""
import numpy as np
import pytest

from pyruntime._numpy_ref import _predicted_scale
from pyruntime.calibrate.scalepredictor import choose_degree, evaluate_polynomial, fit_polynomial

TRUE = {1: [0.02, 0.5], 2: [0.1, -0.03, 0.04], 3: [0.3, 0.2, -0.05, 0.01]}


@pytest.mark.parametrize("degree", [1, 2, 3])
def test_fit_recovers_an_exact_polynomial_and_its_degree(degree):
    rng = np.random.default_rng(degree)
    r = rng.uniform(0.5, 4.0, 200)
    s = np.polynomial.polynomial.polyval(r, TRUE[degree])
    coeffs = fit_polynomial(r, s, degree)
    np.testing.assert_allclose(coeffs, TRUE[degree], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(evaluate_polynomial(coeffs, r), s.astype(np.float32), rtol=1e-6)
    chosen, scores = choose_degree(r[:150], s[:150], r[150:], s[150:])
    assert chosen == degree, scores


def test_evaluation_is_the_runtimes():
    coeffs = np.float32([0.013, 0.2, -0.011, 0.0007]).tolist()
    for r in np.linspace(0.1, 9.0, 17, dtype=np.float32):
        assert evaluate_polynomial(coeffs, np.array([r]))[0] == _predicted_scale(np.float32(coeffs), r)


def test_polynomials_that_turn_negative_near_the_data_are_refused():
    from pyruntime.calibrate.scalepredictor import _fit_layer

    r = np.linspace(1.0, 2.0, 80)
    s = 0.1 - 0.09 * (r - 1.0)  # positive on the data, negative by r = 2.2 (guard: up to 3.0)
    _, scores = choose_degree(r[::2], s[::2], r[1::2], s[1::2])
    assert scores[1] == float("inf")
    fit = _fit_layer("blocks.1.attn.qkv", r, s, np.arange(0, 80, 2), np.arange(1, 80, 2), (1, 2, 3))
    assert fit.degree == 0 and fit.coeffs == [pytest.approx(float(np.mean(s)))]  # a constant


torch = pytest.importorskip("torch")
pytest.importorskip("timm")

import pyruntime  # noqa: E402
from pyruntime.calibrate.common import run_batches  # noqa: E402
from pyruntime.calibrate.emulate import QuantModel, fake_quant  # noqa: E402
from pyruntime.calibrate.scalepredictor import (best_scales, calibrate_scalepredictor,  # noqa: E402
                                                collect_targets, DEFAULT_RATIOS)
from pyruntime.calibrate.static import collect_ranges, static_policy  # noqa: E402
from pyruntime.calibrate.uniform import uniform_policy  # noqa: E402

from test_calibrate_common import tiny_data, tiny_source  # noqa: E402


def test_best_scale_is_the_grid_minimum():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_t(3, (6, 5, 40)).astype(np.float32))
    got = best_scales(x, 4)

    def err(b, s):
        xb = x[b:b + 1]
        return float((fake_quant(xb, torch.tensor([np.float32(s)]), 4) - xb).double().pow(2).sum())

    for b in range(6):
        dyn = np.float32(x[b].abs().max()) / np.float32(7)
        fine = np.linspace(0.2, 1.0, 129)  # every ratio the two-stage search can reach, and more
        grid = [err(b, dyn * np.float32(rho)) for rho in fine]
        assert err(b, got[b]) <= min(err(b, dyn * np.float32(rho)) for rho in DEFAULT_RATIOS) * (1 + 1e-9)
        assert err(b, got[b]) <= min(grid) * 1.02  # the refinement lands at (or next to) the best
        assert got[b] < dyn  # heavy tails: clipping beats the max


@pytest.mark.parametrize("block,chunk", [(0, 16), (1, 50)])
def test_predictor_runs_and_the_runtime_statistic_is_the_fitted_one(block, chunk, tmp_path):
    src, data = tiny_source(), tiny_data(64)
    base = static_policy(src, data, uniform_policy(8, 6), "percentile", 99.9, show_progress=False)
    res = calibrate_scalepredictor(src, data, base, block=block, chunk=chunk, show_progress=False)
    pol = res.policy
    assert pol.predictor.block == block and pol.predictor.chunk == chunk
    predicted = [n for n, lp in pol.layers.items() if lp.scale == "predicted"]
    assert predicted and all(int(n.split(".")[1]) > block for n in predicted)
    assert all(1 <= res.fits[n].degree <= 3 or res.fits[n].degree == 0 for n in predicted)
    path = src.convert(tmp_path / "pred.pyrt", pol)
    model = pyruntime.load(path)
    logits, _, _, stat = run_batches(model, data.images, enabled=False)
    assert np.array_equal(stat, res.r)  # bit for bit the statistic the polynomials were fitted on
    assert np.isfinite(logits).all()
    assert model.graph["predictor"]["coeffs"].keys() == set(predicted)
    # The emulation with the fitted predictor uses the same scales the runtime does (up to
    # float rounding of r), so predictions mostly agree.
    with torch.no_grad(), QuantModel(src.model).emulate(pol.resolve(src.layer_names(), src.depth),
                                                        pol.predictor):
        ours = src.model(torch.from_numpy(data.images)).numpy()
    assert (ours.argmax(1) == logits.argmax(1)).mean() >= 0.9


def test_a_layer_fit_reproduces_exact_targets():
    """Exact polynomial targets through the per-layer fit (degree choice on held-out images,
    refit on all, float32 coefficients) come back as that polynomial."""
    from pyruntime.calibrate import scalepredictor as sp

    r = np.linspace(1.0, 3.0, 48)
    targets = 0.01 + 0.02 * r - 0.001 * r ** 2
    fit = sp._fit_layer("blocks.2.mlp.fc1", r, targets, np.arange(0, 48, 2), np.arange(1, 48, 2), (1, 2, 3))
    assert fit.degree == 2
    np.testing.assert_allclose(fit.coeffs, [0.01, 0.02, -0.001], rtol=1e-5)
    np.testing.assert_allclose(evaluate_polynomial(fit.coeffs, r), targets, rtol=1e-5)


def test_static_ranges_are_exact():
    src, data = tiny_source(), tiny_data(20)
    base = uniform_policy(8, 8)
    layers = base.resolve(src.layer_names(), src.depth)
    seen = {}

    def tap(name, x):
        if layers[name].w_bits != 32:
            seen.setdefault(name, []).append(x.detach().abs().reshape(-1).numpy())

    with torch.no_grad(), QuantModel(src.model).emulate(layers, taps=(tap,)):
        src.model(torch.from_numpy(data.images))
    mm = collect_ranges(src, data, base, "minmax", batch=7, show_progress=False)
    pc = collect_ranges(src, data, base, "percentile", 99.0, batch=7, show_progress=False)
    for name, parts in seen.items():
        v = np.sort(np.concatenate(parts))[::-1]
        k = int(np.ceil(0.01 * v.size))
        assert mm[name] == pytest.approx(float(v[0]), rel=1e-6)
        assert pc[name] == pytest.approx(float(v[k - 1]), rel=1e-6)
    pol = static_policy(src, data, base, "percentile", 99.0, show_progress=False)
    assert all(pol.layers[n].scale == "static" and pol.layers[n].static_scale == pytest.approx(pc[n] / 127)
               for n in pc)


def test_targets_lie_on_the_clip_grid():
    src, data = tiny_source(), tiny_data(16)
    layers = uniform_policy(8, 4).resolve(src.layer_names(), src.depth)
    t = collect_targets(src, layers, ["blocks.1.attn.qkv"], data, DEFAULT_RATIOS, show_progress=False)
    assert t["blocks.1.attn.qkv"].shape == (16,) and (t["blocks.1.attn.qkv"] > 0).all()


def _summed_error(src, data, base, name, scale_of):
    """sum over images of ||Q(x; s) - x||^2 for layer ``name`` with s = scale_of(x) [B]."""
    from pyruntime.calibrate.static import _dynamic

    layers = _dynamic(base.resolve(src.layer_names(), src.depth))
    total = [0.0]

    def tap(n, x):
        if n == name:
            total[0] += float((fake_quant(x, scale_of(x), layers[n].a_bits) - x).double().square().sum())

    with torch.no_grad(), QuantModel(src.model).emulate(layers, taps=(tap,)):
        src.model(torch.from_numpy(data.images))
    return total[0]


def test_mse_static_clip_is_below_minmax_with_less_error():
    src, data = tiny_source(), tiny_data(24)
    base = uniform_policy(8, 4)
    mm = static_policy(src, data, base, "minmax", show_progress=False)
    mse = static_policy(src, data, base, "mse", show_progress=False)
    clipped = 0
    for n, lp in mse.layers.items():
        if lp.w_bits == 32:
            continue
        s_mm, s_mse = mm.layers[n].static_scale, lp.static_scale
        assert 0 < s_mse <= s_mm * (1 + 1e-7)
        e = {s: _summed_error(src, data, base, n, lambda x, s=s: x.new_full((x.shape[0],), float(np.float32(s))))
             for s in (s_mm, s_mse)}
        assert e[s_mse] <= e[s_mm] * (1 + 1e-9)
        clipped += s_mse < s_mm and e[s_mse] < e[s_mm]
    assert clipped >= 3  # at 4 bits clipping pays on most layers


def test_fixed_ratio_dynamic_clip_is_the_least_error_ratio():
    from pyruntime.calibrate.emulate import dynamic_scale
    from pyruntime.calibrate.static import clipped_dynamic_policy

    src, data = tiny_source(), tiny_data(24)
    base = uniform_policy(8, 4)
    pol = clipped_dynamic_policy(src, data, base, show_progress=False)
    n = "blocks.1.mlp.fc1"
    rho = pol.layers[n].clip
    assert pol.layers[n].scale == "dynamic" and 0 < rho < 1
    err = {c: _summed_error(src, data, base, n, lambda x, c=c: dynamic_scale(x, 4, c)) for c in (rho, 1.0, 0.5, 0.95)}
    assert all(err[rho] <= e * (1 + 1e-9) for e in err.values()), err


def test_ste_lowers_the_calibration_loss(tmp_path):
    from pyruntime.calibrate.scalepredictor import ScalePredictorConfig

    src, data = tiny_source(), tiny_data(256)
    with torch.no_grad():  # confident logits, so that 4-bit activations cost a measurable distillation loss
        src.model.head.weight.mul_(30)
    base = static_policy(src, data, uniform_policy(8, 4), "percentile", 99.9, show_progress=False)
    closed = calibrate_scalepredictor(src, data, base, block=0, chunk=16, show_progress=False)
    res = calibrate_scalepredictor(src, data, base, block=0, chunk=16, show_progress=False,
                                   config=ScalePredictorConfig(ste_steps=30, ste_batch=64, ste_lr=0.01))
    t = res.ste
    assert t.accepted and t.loss_refined < t.loss_closed_form
    changed = [n for n in res.policy.predictor.coeffs
               if res.policy.predictor.coeffs[n] != closed.policy.predictor.coeffs[n]]
    assert changed
    assert res.policy.meta["scalepredictor"]["ste"]["steps"] == 30
    # the refined policy converts and runs
    logits = pyruntime.load(src.convert(tmp_path / "ste.pyrt", res.policy)).run(data.images).logits
    assert np.isfinite(logits).all()


@pytest.mark.parametrize("kw", [dict(ste_steps=-1), dict(ste_steps=1.5), dict(ste_lr=0), dict(ste_lr=float("nan")),
                                dict(ste_batch=0)])
def test_bad_ste_options_are_refused(kw):
    from pyruntime.calibrate.scalepredictor import ScalePredictorConfig

    with pytest.raises(ValueError, match=next(iter(kw))):
        ScalePredictorConfig(**kw)
