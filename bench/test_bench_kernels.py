"""GEMM benchmarks on ViT-S/B/L linear shapes: the runtime's int8, int4 and fp32 kernels
against numpy's fp32 ``x @ w.T`` on the same shapes and thread counts.

Run with ``pytest bench/ --benchmark-only`` (see bench/README.md). Nothing here asserts on
speed: the figures and the targets are printed at the end of the session and written to
bench/results/kernels.json.
"""
from __future__ import annotations

import contextlib
import math
import time

import numpy as np
import pytest

from pyruntime import kernels

try:  # optional: runs numpy's BLAS on the same number of threads as the runtime
    import threadpoolctl
except ImportError:  # pragma: no cover - depends on the environment
    threadpoolctl = None

# (K, N) of the ViT linear layers: qkv projection of ViT-Ti/16 (192 -> 576), MLP fc1 of
# ViT-S/16 (384 -> 1536) and of ViT-B/16 (768 -> 3072).
KN = [(192, 576), (384, 1536), (768, 3072)]
# M: one token, a few tokens, one 224x224 image (196 patches + cls), a batch of 8 images.
MS = [1, 8, 197, 1576]
THREADS = [1, 2]
# numpy first so the runtime's results can be given as a ratio to it as soon as they run;
# int8 before int4 for the same reason.
KINDS = ["numpy_fp32", "int8", "int4", "fp32"]
WEIGHT_BITS = {"int8": 8, "int4": 4, "fp32": 32}
PEAK_OF = {"numpy_fp32": "fp32", "int8": "int8", "int4": "int8", "fp32": "fp32"}

CASES = [pytest.param(kind, M, K, N, t, id=f"{kind}-M{M}-K{K}-N{N}-t{t}")
         for (K, N) in KN for M in MS for t in THREADS for kind in KINDS]

# Time budget per benchmark: rounds of at least ROUND_S, about TOTAL_S in all.
ROUND_S = 2e-3
TOTAL_S = 0.4
MIN_ROUNDS, MAX_ROUNDS = 3, 200

_weights_cache: dict = {}


def _data(M: int, K: int, N: int):
    rng = np.random.default_rng(1000003 * K + N)
    if (K, N) not in _weights_cache:
        _weights_cache.clear()  # keep one weight set alive at a time
        _weights_cache[(K, N)] = (0.02 * rng.standard_normal((N, K))).astype(np.float32)
    x = rng.standard_normal((M, K)).astype(np.float32)
    return x, _weights_cache[(K, N)]


def _plan(fn) -> tuple:
    """(rounds, iterations) so that a round lasts >= ROUND_S and all rounds about TOTAL_S."""
    fn()  # warm-up: first-touch of buffers, thread pool start, BLAS buffers
    t0 = time.perf_counter()
    fn()
    t1 = max(time.perf_counter() - t0, 1e-7)
    iterations = max(1, math.ceil(ROUND_S / t1))
    rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, TOTAL_S / (t1 * iterations))))
    return rounds, iterations


def _blas_threads(threads: int):
    if threadpoolctl is None:
        return contextlib.nullcontext()
    return threadpoolctl.threadpool_limits(limits=threads, user_api="blas")


def _numpy_threads_now():
    if threadpoolctl is None:
        return "default (threadpoolctl not installed)"
    n = [d["num_threads"] for d in threadpoolctl.threadpool_info() if d.get("user_api") == "blas"]
    return n[0] if len(n) == 1 else n


@pytest.mark.parametrize("kind, M, K, N, threads", CASES)
def test_gemm(benchmark, peaks, numpy_blas, runtime_isa, record, lookup, kind, M, K, N, threads):
    pk = peaks[threads]  # measured once per session, before the first benchmark on `threads`
    x, w = _data(M, K, N)
    benchmark.group = f"M{M} K{K} N{N} t{threads}"
    numpy_threads = None

    if kind == "numpy_fp32":
        wt = w.T
        fn = lambda: x @ wt  # noqa: E731
        limits = _blas_threads(threads)
    else:
        if runtime_isa == "ref":
            pytest.skip("no SIMD kernels on this CPU (isa 'ref'): the scalar reference is not benchmarked")
        try:
            qw = kernels.quantize_weights(w, WEIGHT_BITS[kind])
            kernels.linear(x[:1], qw, num_threads=threads)
        except (RuntimeError, ValueError, NotImplementedError) as e:
            pytest.skip(f"{kind} linear unavailable on isa {runtime_isa}: {e}")
        fn = lambda: kernels.linear(x, qw, num_threads=threads)  # noqa: E731
        limits = contextlib.nullcontext()

    with limits:
        if kind == "numpy_fp32":
            numpy_threads = _numpy_threads_now()
        rounds, iterations = _plan(fn)
        benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=1)

    ops = 2 * M * N * K
    peak_kind = PEAK_OF[kind]
    peak = pk[peak_kind]
    info = {
        "kind": kind, "M": M, "K": K, "N": N, "threads": threads,
        "isa": "numpy" if kind == "numpy_fp32" else runtime_isa,
        "ops": ops,
        "int8_peak_gops": pk["int8"],
        "fp32_peak_gflops": pk["fp32"],
    }
    if kind == "numpy_fp32":
        info["numpy_threads"] = numpy_threads
        info["blas"] = [f"{d['internal_api']} {d['version']} ({d['architecture']})"
                        for d in numpy_blas.get("runtime", [])] or numpy_blas.get("build")

    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: ran once, nothing timed
        benchmark.extra_info.update(info)
        return
    mean, best = stats.stats.mean, stats.stats.min
    gops = ops / mean * 1e-9
    info.update({
        "mean_s": mean,
        "gops": gops,
        "gops_best": ops / best * 1e-9,
        "peak_used": peak_kind,
        "fraction_of_peak": gops / peak if peak else None,
    })
    ref = lookup("numpy_fp32", M, K, N, threads)
    info["numpy_fp32_gops"] = ref["gops"] if ref else None
    info["ratio_to_numpy_fp32"] = gops / ref["gops"] if ref else None
    if kind == "int4":
        i8 = lookup("int8", M, K, N, threads)
        info["ratio_to_int8"] = gops / i8["gops"] if i8 else None
    benchmark.extra_info.update(info)
    record(kind, M, K, N, threads, info)
