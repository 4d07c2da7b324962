"""Fixtures and the end-of-session report for the kernel benchmarks (see bench/README.md).

The machine peaks are measured once per session, in the same run as the kernels, so each
kernel figure is also given as a fraction of what this CPU does right now (the machine may be
shared or throttled; a datasheet number would hide that). At the end of the session a table
per shape and thread count is printed and written to ``bench/results/kernels.json``.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pytest

import pyruntime
from pyruntime import _core

from _peers import cpu_model as _cpu_model, loadavg as _loadavg

try:  # optional: lets the numpy baseline run on the same number of threads as the runtime
    import threadpoolctl
except ImportError:  # pragma: no cover - depends on the environment
    threadpoolctl = None

RESULTS_PATH = Path(__file__).parent / "results" / "kernels.json"
PEAK_SECONDS = 0.3

# Figures to show next to the results; the benchmarks never assert on them.
TARGETS = {
    "int8_frac_of_int8_peak": {"1": 0.70, "2": 0.60, "applies_to": "M >= 197"},
    "int8_over_numpy_fp32": 1.6,
    "int4_over_int8_min": 0.85,
}
TARGET_MIN_M = 197

# Environment variables that change what numpy's BLAS does; recorded, never changed here.
BLAS_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
            "MKL_NUM_THREADS", "PYRUNTIME_ISA")

_results_key = pytest.StashKey[Dict[Tuple[str, int, int, int, int], Dict[str, Any]]]()
_session_key = pytest.StashKey[Dict[str, Any]]()


def blas_info() -> Dict[str, Any]:
    """Which BLAS numpy uses (and how it was built), from numpy and threadpoolctl."""
    info: Dict[str, Any] = {"numpy_version": np.__version__}
    try:
        deps = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info["build"] = {k: deps.get(k) for k in ("name", "version", "openblas configuration") if k in deps}
    except Exception as e:  # older numpy has no mode="dicts"
        info["build"] = f"unavailable ({type(e).__name__})"
    if threadpoolctl is not None:
        info["threadpoolctl"] = threadpoolctl.__version__
        info["runtime"] = [
            {k: d.get(k) for k in ("internal_api", "version", "architecture", "num_threads",
                                   "threading_layer", "filepath")}
            for d in threadpoolctl.threadpool_info() if d.get("user_api") == "blas"
        ]
    else:
        info["threadpoolctl"] = None
    info["env"] = {k: os.environ.get(k) for k in BLAS_ENV}
    return info


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_results_key] = {}
    config.stash[_session_key] = {"loadavg_start": _loadavg()}


class Peaks:
    """peaks[threads] -> {"int8": GOPS, "fp32": GFLOP/s}, each thread count measured once per
    session (at its first use, i.e. before the first benchmark on that many threads)."""

    def __init__(self, store: Dict[int, Dict[str, float]]):
        self._store = store

    def __getitem__(self, threads: int) -> Dict[str, float]:
        if threads not in self._store:
            self._store[threads] = {"int8": _core.int8_peak_gops(threads, PEAK_SECONDS),
                                    "fp32": _core.fp32_peak_gflops(threads, PEAK_SECONDS)}
        return self._store[threads]


@pytest.fixture(scope="session")
def peaks(pytestconfig: pytest.Config) -> Peaks:
    return Peaks(pytestconfig.stash[_session_key].setdefault("peaks", {}))


@pytest.fixture(scope="session")
def numpy_blas(pytestconfig: pytest.Config) -> Dict[str, Any]:
    info = blas_info()
    pytestconfig.stash[_session_key]["numpy"] = info
    return info


@pytest.fixture(scope="session")
def runtime_isa() -> str:
    try:
        return pyruntime.isa()
    except ValueError as e:  # PYRUNTIME_ISA names an ISA this CPU lacks
        pytest.skip(f"pyruntime cannot pick an ISA: {e}")


@pytest.fixture
def record(pytestconfig: pytest.Config):
    """record(kind, M, K, N, threads, fields): keep a result for the summary and the JSON."""
    results = pytestconfig.stash[_results_key]

    def _record(kind: str, M: int, K: int, N: int, threads: int, fields: Dict[str, Any]) -> None:
        results[(kind, M, K, N, threads)] = fields

    return _record


@pytest.fixture
def lookup(pytestconfig: pytest.Config):
    """lookup(kind, M, K, N, threads) -> the recorded result or None (when not run yet)."""
    results = pytestconfig.stash[_results_key]
    return lambda kind, M, K, N, threads: results.get((kind, M, K, N, threads))


# ----------------------------------------------------------------------------- summary


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def summary_rows(results, peaks) -> List[Dict[str, Any]]:
    shapes = sorted({(K, N, M, t) for (_, M, K, N, t) in results})
    rows = []
    for K, N, M, t in shapes:
        def gops(kind):
            r = results.get((kind, M, K, N, t))
            return r["gops"] if r else None

        pk = peaks.get(t, {}) if peaks else {}
        i8, i4, npf, f32 = gops("int8"), gops("int4"), gops("numpy_fp32"), gops("fp32")
        rows.append({
            "M": M, "K": K, "N": N, "threads": t,
            "int8_gops": i8, "int8_frac_of_peak": _ratio(i8, pk.get("int8")),
            "int4_gops": i4, "int4_over_int8": _ratio(i4, i8),
            "numpy_fp32_gops": npf, "int8_over_numpy": _ratio(i8, npf),
            "fp32_gops": f32, "fp32_frac_of_peak": _ratio(f32, pk.get("fp32")),
            "int8_peak_gops": pk.get("int8"), "fp32_peak_gflops": pk.get("fp32"),
            "numpy_threads": (results.get(("numpy_fp32", M, K, N, t)) or {}).get("numpy_threads"),
        })
    return rows


def _misses(row: Dict[str, Any]) -> List[str]:
    """Targets this row misses (only rows the targets apply to)."""
    out = []
    if row["M"] < TARGET_MIN_M:
        return out
    want = TARGETS["int8_frac_of_int8_peak"].get(str(row["threads"]))
    if want is not None and row["int8_frac_of_peak"] is not None and row["int8_frac_of_peak"] < want:
        out.append(f"int8<{want:.0%}pk")
    if row["int8_over_numpy"] is not None and row["int8_over_numpy"] < TARGETS["int8_over_numpy_fp32"]:
        out.append(f"int8<{TARGETS['int8_over_numpy_fp32']}x np")
    if row["int4_over_int8"] is not None and row["int4_over_int8"] < TARGETS["int4_over_int8_min"]:
        out.append("int4<0.85x int8")
    return out


def _fmt(v: Optional[float], spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(rows: List[Dict[str, Any]]) -> List[str]:
    head = (f"{'M':>5} {'K':>4} {'N':>5} {'t':>2} | {'int8':>7} {'%pk8':>5} | {'int4':>7} {'i4/i8':>5} | "
            f"{'numpy':>7} {'i8/np':>5} | {'fp32':>7} {'%pk32':>5} | misses")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['M']:>5} {r['K']:>4} {r['N']:>5} {r['threads']:>2} | "
            f"{_fmt(r['int8_gops'], '7.1f')} {_fmt(r['int8_frac_of_peak'] and 100 * r['int8_frac_of_peak'], '5.0f')} | "
            f"{_fmt(r['int4_gops'], '7.1f')} {_fmt(r['int4_over_int8'], '5.2f')} | "
            f"{_fmt(r['numpy_fp32_gops'], '7.1f')} {_fmt(r['int8_over_numpy'], '5.2f')} | "
            f"{_fmt(r['fp32_gops'], '7.1f')} {_fmt(r['fp32_frac_of_peak'] and 100 * r['fp32_frac_of_peak'], '5.0f')} | "
            f"{', '.join(_misses(r))}")
    return lines


def _write_json_atomically(path: Path, payload: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    results = config.stash.get(_results_key, None)
    if not results:
        return
    session = config.stash[_session_key]
    peaks = session.get("peaks", {})
    rows = summary_rows(results, peaks)
    try:
        isa = pyruntime.isa()
    except ValueError as e:
        isa = f"unusable ({e})"
    numpy_info = session.get("numpy") or blas_info()

    tr = terminalreporter
    tr.section("pyruntime kernel summary (GOPS = 2*M*N*K / mean time)")
    pk = "; ".join(f"{t} thread{'s' if t > 1 else ''}: int8 {p['int8']:.1f} GOPS, fp32 {p['fp32']:.1f} GFLOP/s"
                   for t, p in sorted(peaks.items()))
    tr.write_line(f"isa {isa}; measured peaks: {pk or 'not measured'}")
    runtime = numpy_info.get("runtime") or []
    blas = ", ".join(f"{d['internal_api']} {d['version']} ({d['architecture']})" for d in runtime) \
        or str(numpy_info.get("build"))
    env = {k: v for k, v in numpy_info.get("env", {}).items() if v is not None}
    tr.write_line(f"numpy {np.__version__} on {blas}; threads "
                  + ("= runtime's (threadpoolctl)" if threadpoolctl else "= BLAS default (no threadpoolctl)")
                  + (f"; env {env}" if env else ""))
    tr.write_line("targets (figures, not assertions), M >= 197: int8 >= 70% of int8 peak on 1 thread, "
                  ">= 60% on 2; int8 >= 1.6x numpy fp32; int4 >= 0.85x int8")
    load = (session.get("loadavg_start"), _loadavg())
    tr.write_line(f"load average at start {load[0]}, at end {load[1]} (a busy machine lowers every figure)")
    if load[0] and load[0][0] >= 1.0:
        tr.write_line("WARNING: other processes were busy when the run started; figures are unreliable "
                      "(compare with gops_best in the JSON, or rerun on an idle machine)", yellow=True)
    for line in format_table(rows):
        tr.write_line(line)

    payload = {
        "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpu": _cpu_model(),
            "physical_cores": _core.physical_cores(),
            "cpu_features": dict(_core.cpu_features()),
            "loadavg_start": load[0],
            "loadavg_end": load[1],
        },
        "pyruntime": {"version": pyruntime.__version__, "isa": isa,
                      "available_isas": pyruntime.available_isas()},
        "peaks": {str(t): {"int8_gops": p["int8"], "fp32_gflops": p["fp32"]} for t, p in peaks.items()},
        "numpy": numpy_info,
        "targets": TARGETS,
        "rows": [dict(r, misses=_misses(r)) for r in rows],
        "results": [dict(v, kind=k[0], M=k[1], K=k[2], N=k[3], threads=k[4]) for k, v in sorted(results.items())],
    }
    _write_json_atomically(RESULTS_PATH, payload)
    tr.write_line(f"written {RESULTS_PATH}")
