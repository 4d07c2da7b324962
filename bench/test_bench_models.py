"""Whole-model latency: pyruntime fp32 / W8A8 / W4A8 against PyTorch and ONNX Runtime peers.

    pytest bench/test_bench_models.py --benchmark-only                 # deit_tiny (~2-3 min)
    PYRUNTIME_BENCH_SLOW=1 pytest bench/test_bench_models.py --benchmark-only   # + deit_small
    pytest bench/test_bench_models.py --benchmark-only -m slow         # deit_small only

One benchmark per (model, runtime, batch, threads); the peers, inputs and conversions are in
``bench/_peers.py`` (shared with ``tools/bench_models.py``, which writes
bench/results/models.{json,png}). Peers that cannot run here (ExecuTorch not installed, a
quantiser failing, ...) are skipped with the reason. Nothing asserts on speed: the ratios
against the targets are in each benchmark's ``extra_info`` and in the summary printed at the
end. The only assertion is the sanity check that pyruntime fp32 computes what torch does.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # also under --import-mode=importlib
    sys.path.insert(0, _HERE)

import _peers  # noqa: E402
from _peers import BATCHES, MODELS, RUNTIMES, SHORT, THREADS, Cell, ModelPeers, Unavailable  # noqa: E402

SLOW_ENV = "PYRUNTIME_BENCH_SLOW"
DEFAULT_MODEL = MODELS[0]
BUDGET_S = float(os.environ.get("PYRUNTIME_BENCH_BUDGET", "1.0"))  # timed seconds per benchmark
MIN_ROUNDS, MAX_ROUNDS = 5, 20

pytestmark = pytest.mark.torch


def _slow_selected(config: pytest.Config) -> bool:
    if os.environ.get(SLOW_ENV, "") not in ("", "0"):
        return True
    expr = config.getoption("markexpr", "") or ""
    return "slow" in expr and "not slow" not in expr


def _cases():
    for model in MODELS:
        marks = [] if model == DEFAULT_MODEL else [pytest.mark.slow]
        for B in BATCHES:
            for t in THREADS:
                for rt in RUNTIMES:
                    yield pytest.param(model, rt, B, t, id=f"{SHORT[model]}-{rt}-b{B}-t{t}", marks=marks)


class _Session:
    """Per-session state: one model's peers at a time (tests run model by model), the results so
    far (for ratios and the summary) and the int8 peaks measured next to the W8A8 runs."""

    def __init__(self) -> None:
        self._peers: Optional[ModelPeers] = None
        self._broken: Dict[str, str] = {}
        self.cells: Dict[Tuple[str, int, int], Dict[str, Dict[str, Any]]] = {}
        self.peaks: Dict[Tuple[str, int, int], Optional[float]] = {}
        self.agreement: Dict[str, Any] = {}
        self.loadavg_start = _peers.loadavg()

    def peers(self, model: str) -> ModelPeers:
        if model in self._broken:
            pytest.skip(self._broken[model])
        if self._peers is None or self._peers.name != model:
            if self._peers is not None:
                self._peers.close()
            self._peers = ModelPeers(model)
            try:
                with _peers.quiet():
                    self._peers.macs = self._peers.macs_per_image()
                    # Every peer once on the batch-8 inputs: prepares (converts, exports) them
                    # outside the timed runs and checks them against torch fp32.
                    self.agreement[model] = self._peers.agreement(_peers.make_inputs(max(BATCHES)),
                                                                  threads=max(THREADS))
            except Unavailable as e:
                self._broken[model] = str(e)
                self._peers = None
                pytest.skip(str(e))
        return self._peers

    def close(self) -> None:
        if self._peers is not None:
            self._peers.close()
            self._peers = None


class _SummaryPlugin:
    """Prints the model benchmark tables at the end of the session."""

    def __init__(self, state: _Session):
        self.state = state

    def pytest_terminal_summary(self, terminalreporter, exitstatus, config) -> None:
        st = self.state
        if not st.cells and not st.agreement:
            return
        tr = terminalreporter
        tr.section("pyruntime model benchmarks (median of the rounds; ratios of medians)")
        configs = []
        for (model, B, t), cells in st.cells.items():
            configs.append({"model": model, "batch": B, "threads": t, "cells": cells,
                            "ratios": _peers.ratios(cells, st.peaks.get((model, B, t)))})
        flat = [c for cfg in configs for rt in _peers.DISPLAY for c in [cfg["cells"].get(rt)] if c]
        for line in _peers.format_latency_table(flat) + [""] + _peers.format_summary_table(configs):
            tr.write_line(line)
        for line in _peers.format_agreement(st.agreement):
            tr.write_line(line)
        load = (st.loadavg_start, _peers.loadavg())
        tr.write_line(f"load average at start {load[0]}, at end {load[1]}; targets are shown, not asserted")
        if load[0] and load[0][0] >= 0.5 * (os.cpu_count() or 1):
            tr.write_line("WARNING: the machine was busy; latencies are inflated and noisy", yellow=True)


@pytest.fixture(scope="session")
def model_bench(pytestconfig: pytest.Config):
    state = _Session()
    pytestconfig.pluginmanager.register(_SummaryPlugin(state), "pyruntime-model-bench-summary")
    yield state
    state.close()


def _require_model(request: pytest.FixtureRequest, model: str) -> None:
    if model != DEFAULT_MODEL and not _slow_selected(request.config):
        pytest.skip(f"{model} is slow: set {SLOW_ENV}=1 or select it with -m slow")


@pytest.mark.parametrize("model_name", [pytest.param(m, id=SHORT[m], marks=[] if m == DEFAULT_MODEL
                                                     else [pytest.mark.slow]) for m in MODELS])
def test_pyruntime_fp32_matches_torch(request, model_bench, model_name):
    """Sanity check on the benchmark inputs: pyruntime fp32 and eager torch fp32 give the same
    top-1 on every image and logits equal to float rounding (the timings mean nothing otherwise).
    Not a benchmark, so ``--benchmark-only`` skips it; the same check then still shows in the
    summary (flagged MISMATCH) and in the pyruntime-fp32 benchmarks' extra_info."""
    _require_model(request, model_name)
    model_bench.peers(model_name)
    fp = model_bench.agreement[model_name]["pyruntime-fp32"]
    assert "unavailable" not in fp, fp
    assert fp["top1_agree"] == 1.0, f"pyruntime fp32 and torch disagree on top-1: {fp}"
    assert fp["max_abs_diff"] <= fp["tolerance"], f"pyruntime fp32 logits differ from torch: {fp}"


@pytest.mark.parametrize("model_name, runtime, batch, threads", list(_cases()))
def test_model_latency(request, benchmark, model_bench, model_name, runtime, batch, threads):
    _require_model(request, model_name)
    peers = model_bench.peers(model_name)
    x = _peers.make_inputs(batch)
    try:
        with _peers.quiet():
            fn = peers.bind(runtime, threads, x)
    except Unavailable as e:
        pytest.skip(f"{runtime}: {e}")

    benchmark.group = f"{SHORT[model_name]} batch {batch} threads {threads}"
    info: Dict[str, Any] = {"model": model_name, "runtime": runtime, "batch": batch, "threads": threads,
                            "isa": _peers.pyruntime.isa(), "macs_per_image": peers.macs}
    key = (model_name, batch, threads)
    if runtime == "pyruntime-w8a8":  # the peak, measured right before the run it is compared with
        peak, note = _peers.int8_peak(threads)
        model_bench.peaks[key] = peak
        info["int8_peak_gops"] = peak
        if note:
            info["int8_peak_note"] = note
    with _peers.quiet():
        first = _peers.time_calls(fn, 1)[0]  # first call: warm-up, and sizes the rounds
        rounds = _peers.plan_runs(first, BUDGET_S, MIN_ROUNDS, MAX_ROUNDS)
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)

    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: ran once, nothing timed
        benchmark.extra_info.update(info)
        return
    summary = Cell(model_name, runtime, batch, threads, list(stats.stats.data)).summary(peers.macs)
    cells = model_bench.cells.setdefault(key, {})
    cells[runtime] = summary
    info.update({k: summary[k] for k in ("median_ms", "p90_ms", "ms_per_image", "effective_gops") if k in summary})
    r = _peers.ratios(cells, model_bench.peaks.get(key))
    wanted = {
        "pyruntime-w8a8": ("w8a8_over_ort_int8", "w8a8_over_torch_int8", "w8a8_effective_gops",
                           "w8a8_frac_of_int8_peak"),
        "pyruntime-w8a8-attn8": ("w8a8_attn8_over_ort_int8", "w8a8_attn8_over_torch_int8",
                                 "w8a8_attn8_effective_gops", "w8a8_attn8_frac_of_int8_peak"),
        "pyruntime-fp32": ("fp32_over_ort_fp32", "fp32_over_torch_fp32"),
        "pyruntime-w4a8": ("w4a8_over_ort_int4",),
        "ort-int8": ("ort_int8_frac_of_int8_peak", "half_ort_int8_needs_frac_of_int8_peak"),
    }.get(runtime, ())
    for k in wanted:
        info[k] = r[k]
    agree = model_bench.agreement.get(model_name, {}).get(runtime)
    if agree:
        info["vs_torch_fp32"] = agree
    if wanted:
        info["targets"] = _peers.TARGETS
        info["misses"] = r["misses"]
    benchmark.extra_info.update(info)
