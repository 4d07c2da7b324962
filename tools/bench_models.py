#!/usr/bin/env python3
"""Whole-model latency of pyruntime (fp32 / W8A8 / W4A8) against PyTorch, ONNX Runtime (and
ExecuTorch when installed) on timm DeiT-Ti / DeiT-S, in one run on the same inputs.

    python tools/bench_models.py                      # the full matrix, ~5-10 min on 2 cores
    python tools/bench_models.py --models tiny --quick  # a quick look

Prints a table per (model, runtime, batch, threads) -- median and p90 batch latency, ms per
image -- and a summary per (model, batch, threads) with the ratios the targets are about
(pyruntime W8A8 / ORT int8, pyruntime fp32 / ORT fp32, W8A8 effective GOPS as a fraction of
the int8 peak measured in the same run), writes the numbers to bench/results/models.json and
a bar chart to bench/results/models.png (both atomically). See bench/README.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import _peers  # noqa: E402
from _peers import (BATCHES, DISPLAY, JSON_PATH, MODELS, PNG_PATH, PYRUNTIME_POLICY, RUNTIMES,  # noqa: E402
                    SEED, THREADS, Cell, ModelPeers, Unavailable)


def _model_names(spec: str) -> List[str]:
    out = []
    for s in spec.split(","):
        s = s.strip()
        full = [m for m in MODELS if s in (m, _peers.SHORT[m], _peers.SHORT[m].split("_")[1])]
        out.append(full[0] if full else s)
    return out


def _ints(spec: str) -> List[int]:
    return [int(v) for v in spec.split(",") if v.strip()]


def profile_ops(peers: ModelPeers, x, threads: int, runs: int) -> Dict[str, Dict[str, float]]:
    """Per-op time of each pyruntime variant, summed over blocks (ms per run), slowest first."""
    out = {}
    for rt, policy in PYRUNTIME_POLICY.items():
        m = peers.pyruntime_model(policy)
        m.run(x, num_threads=threads)
        m.profile(True)
        for _ in range(runs):
            m.run(x, num_threads=threads)
        times = m.layer_times()
        m.profile(False)
        agg: Dict[str, float] = {}
        for name, s in times.items():
            parts = name.split(".")
            key = ".".join(parts[2:]) if parts[0] == "blocks" and len(parts) > 2 else name
            agg[key] = agg.get(key, 0.0) + s * 1e3 / runs
        out[rt] = dict(sorted(agg.items(), key=lambda kv: -kv[1]))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny,small", help="comma list: tiny, small or timm names")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--threads", default=",".join(map(str, THREADS)))
    p.add_argument("--runtimes", default=",".join(RUNTIMES), help="comma list, default all")
    p.add_argument("--budget", type=float, default=1.5, help="seconds of timed runs per cell (default 1.5)")
    p.add_argument("--min-runs", type=int, default=5)
    p.add_argument("--max-runs", type=int, default=20)
    p.add_argument("--max-cell", type=float, default=6.0,
                   help="a cell whose runs are slow gets fewer (at least 3) to stay near this many seconds")
    p.add_argument("--rounds", type=int, default=2,
                   help="the runs of each cell are split over this many passes over the runtimes "
                        "(alternating order), so slow drifts in machine load hit every runtime alike")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed runs before each pass (default 1; none when a run takes >= 0.5 s)")
    p.add_argument("--quick", action="store_true", help="3 runs per cell, one pass (a smoke test)")
    p.add_argument("--profile", action="store_true",
                   help="also print pyruntime's per-op times (largest batch and thread count)")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--json", default=str(JSON_PATH))
    p.add_argument("--png", default=str(PNG_PATH))
    p.add_argument("--no-write", action="store_true", help="print only; write no JSON / PNG")
    args = p.parse_args(argv)
    if args.quick:
        args.min_runs = args.max_runs = 3
        args.rounds = 1
    models, batches, threads_list = _model_names(args.models), _ints(args.batches), _ints(args.threads)
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    bad = [r for r in runtimes if r not in RUNTIMES]
    if bad:
        p.error(f"unknown runtimes {bad}; choose from {', '.join(RUNTIMES)}")

    load_start, t_start = _peers.loadavg(), time.perf_counter()
    env = _peers.environment()
    print(f"pyruntime model benchmark: {env['cpu']}, {env['logical_cpus']} logical CPUs, isa {env['isa']}; "
          f"load average {load_start}")
    if load_start and env["logical_cpus"] and load_start[0] >= 0.5 * env["logical_cpus"]:
        print("WARNING: the machine is busy (load average vs CPUs): latencies are inflated and noisy")

    configs: List[Dict[str, Any]] = []
    cells_out: List[Dict[str, Any]] = []
    agreement: Dict[str, Any] = {}
    prepare: Dict[str, Any] = {}
    profiles: Dict[str, Any] = {}
    notes: List[str] = []
    for model in models:
        print(f"\n== {model}: preparing peers (cache {_peers.cache_root()})")
        peers = ModelPeers(model, seed=args.seed, log=print)
        x_all = _peers.make_inputs(max(batches), args.seed)
        try:
            with _peers.quiet():
                agreement[model] = peers.agreement(x_all, threads=max(threads_list),
                                                   runtimes=[r for r in DISPLAY if r in runtimes])
                macs = peers.macs_per_image()
        except Unavailable as e:
            print(f"  cannot benchmark {model}: {e}")
            notes.append(f"{model}: {e}")
            continue
        prepare[model] = {"seconds": dict(peers.prepare_seconds), "onnx_export": peers.export_method,
                          "weights_fingerprint": peers.weights_fingerprint(), "macs_per_image": macs}
        for line in _peers.format_agreement({model: agreement[model]}):
            print("  " + line)
        fp = agreement[model].get("pyruntime-fp32", {})
        if fp.get("ok") is False:
            notes.append(f"{model}: pyruntime-fp32 disagrees with torch fp32 ({fp})")
            print(f"  WARNING: pyruntime fp32 disagrees with torch fp32: {fp}")

        for B in batches:
            x = _peers.make_inputs(B, args.seed)
            for t in threads_list:
                peak, peak_note = _peers.int8_peak(t)
                if peak_note:
                    notes.append(peak_note)
                cells = {rt: Cell(model, rt, B, t) for rt in runtimes}
                bound = {}
                plans = {}
                with _peers.quiet():
                    for rt in runtimes:
                        try:
                            fn = peers.bind(rt, t, x)
                            first = _peers.time_calls(fn, 1)[0]  # also the first warm-up
                        except Unavailable as e:
                            cells[rt].unavailable = str(e)
                            continue
                        bound[rt] = fn
                        plans[rt] = (_peers.plan_runs(first, args.budget, args.min_runs, args.max_runs,
                                                      args.max_cell),
                                     args.warmup if first < 0.5 else 0)  # a slow first run warmed it
                    for r in range(args.rounds):
                        order = list(bound) if r % 2 == 0 else list(reversed(bound))
                        for rt in order:
                            runs, warmup = plans[rt]
                            n = runs // args.rounds + (1 if r < runs % args.rounds else 0)
                            if n == 0:
                                continue
                            _peers.time_calls(bound[rt], warmup)
                            cells[rt].samples += _peers.time_calls(bound[rt], n)
                summaries = {rt: c.summary(macs) for rt, c in cells.items()}
                ratios = _peers.ratios(summaries, peak)
                configs.append({"model": model, "batch": B, "threads": t, "int8_peak_gops": peak,
                                "int8_peak_note": peak_note, "loadavg": _peers.loadavg(),
                                "cells": summaries, "ratios": ratios})
                cells_out.extend(summaries[rt] for rt in DISPLAY if rt in summaries)
                done = " ".join(f"{_peers.ABBREV[rt]} {s['ms_per_image']:.1f}" for rt, s in summaries.items()
                                if "ms_per_image" in s)
                print(f"  B={B} t={t}: ms/img {done}  (load {_peers.loadavg()})")
        if args.profile:
            with _peers.quiet():
                profiles[model] = profile_ops(peers, _peers.make_inputs(max(batches), args.seed),
                                              max(threads_list), runs=3)
        peers.close()

    load_end, elapsed = _peers.loadavg(), time.perf_counter() - t_start
    unavailable = sorted({(c["runtime"], c["unavailable"]) for c in cells_out if "unavailable" in c})
    print()
    for line in _peers.format_latency_table(cells_out):
        print(line)
    print()
    for line in _peers.format_summary_table(configs):
        print(line)
    print()
    for line in _peers.format_agreement(agreement):
        print(line)
    for rt, why in unavailable:
        print(f"unavailable: {rt}: {why}")
    for n in sorted(set(notes)):
        print(f"note: {n}")
    for model, prof in profiles.items():
        print(f"\npyruntime per-op time, {model}, batch {max(batches)}, {max(threads_list)} threads "
              "(ms per run, summed over blocks, slowest first):")
        for rt, ops in prof.items():
            total = sum(ops.values())
            print(f"  {rt:15} total {total:8.1f} ms: " + ", ".join(f"{k} {v:.1f}" for k, v in list(ops.items())[:6]))
    print(f"\nload average at start {load_start}, at end {load_end}; {elapsed:.0f} s in all")

    if not args.no_write:
        title = (f"{env['cpu']}, isa {env['isa']}; load average {load_start[0] if load_start else '?'} -> "
                 f"{load_end[0] if load_end else '?'} on {env['logical_cpus']} CPUs; {_peers.now_utc()}")
        payload = {
            "generated": _peers.now_utc(),
            "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
            "environment": env,
            "loadavg_start": load_start, "loadavg_end": load_end, "elapsed_s": round(elapsed, 1),
            "settings": {"seed": args.seed, "budget_s": args.budget, "min_runs": args.min_runs,
                         "max_runs": args.max_runs, "max_cell_s": args.max_cell, "rounds": args.rounds,
                         "warmup_per_round": args.warmup,
                         "onnx_opset": _peers.ONNX_OPSET, "ort_int4": _peers.ORT_INT4,
                         "input": "float32 standard normal [B,3,224,224], batch 1 = first image of batch 8"},
            "targets": _peers.TARGETS,
            "prepare": prepare,
            "agreement": agreement,
            "configs": configs,
            "unavailable": {rt: why for rt, why in unavailable},
            "notes": sorted(set(notes)),
            "profiles_ms": profiles,
        }
        _peers.write_json(Path(args.json), payload)
        why = _peers.plot(configs, Path(args.png), title=title)
        print(f"wrote {args.json}" + (f" and {args.png}" if why is None else f" (no plot: {why})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
