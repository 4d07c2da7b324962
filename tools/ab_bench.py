"""A/B latency of two builds of the extension on one model, run by run in alternation.

    python tools/ab_bench.py A.so B.so MODEL [--threads 2] [--batch 1] [--runs 40] [--rounds 8]

Copy each build's ``pyruntime/_core*.so`` somewhere first (``pip install -e .`` writes it into
site-packages). Each round runs ``pyruntime bench MODEL`` once per build, in a fresh process
that loads that file as ``pyruntime._core`` by path; the order alternates from round to round,
so drifts in the machine's load hit both alike. It prints every round's median and min, then
per build the median of the medians and the min of the mins, and B / A of both.

Why by path: with an editable install (``pip install -e .``) the package's import finder
takes precedence over ``PYTHONPATH``, so a copy of the package with another ``_core`` next
to it is silently not loaded, and an A/B run compares a build with itself. The child checks
that the extension it runs is the file it was given.
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

_CHILD = r"""
import importlib.util, os, sys
so = sys.argv[1]
spec = importlib.util.spec_from_file_location("pyruntime._core", so)
mod = importlib.util.module_from_spec(spec)
sys.modules["pyruntime._core"] = mod
spec.loader.exec_module(mod)
import pyruntime
if pyruntime._core is not mod or os.path.realpath(mod.__file__) != os.path.realpath(so):
    sys.exit(f"ab_bench: pyruntime._core is {pyruntime._core.__file__}, not {so}")
from pyruntime.cli import main
sys.exit(main(sys.argv[2:]))
"""

# "latency:   p50 5.60 ms  p90 5.78 ms  p99 6.58 ms  (min 5.46 ms, 40 runs)  = ..."
_LATENCY = re.compile(r"latency:\s+p50 ([0-9.]+) ms .*\(min ([0-9.]+) ms")


def bench_once(so: Path, model: str, bench_args: Sequence[str]) -> Tuple[float, float]:
    """(p50 ms, min ms) of one ``pyruntime bench`` run with the extension ``so``."""
    cmd = [sys.executable, "-c", _CHILD, str(so), "bench", model, *bench_args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    m = _LATENCY.search(r.stdout)
    if r.returncode != 0 or m is None:
        raise RuntimeError(f"bench with {so} failed (exit {r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return float(m.group(1)), float(m.group(2))


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", type=Path, help="build A: a _core*.so file")
    p.add_argument("b", type=Path, help="build B: a _core*.so file")
    p.add_argument("model", help="a model file")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--runs", type=int, default=40, help="timed runs per bench call")
    p.add_argument("--rounds", type=int, default=8)
    args = p.parse_args(argv)
    for so in (args.a, args.b):
        if not so.is_file():
            p.error(f"{so} is not a file")
    if args.rounds < 1 or args.runs < 1:
        p.error("--rounds and --runs must be >= 1")
    bench_args = ["--threads", str(args.threads), "--batch", str(args.batch), "--runs", str(args.runs)]
    results = {"A": [], "B": []}  # type: dict
    builds = {"A": args.a, "B": args.b}
    for i in range(args.rounds):
        order = ["A", "B"] if i % 2 == 0 else ["B", "A"]
        line = []
        for k in order:
            try:
                p50, mn = bench_once(builds[k], args.model, bench_args)
            except RuntimeError as e:
                print(f"ab_bench: {e}", file=sys.stderr)
                return 1
            results[k].append((p50, mn))
            line.append(f"{k} p50 {p50:.3f} min {mn:.3f}")
        print(f"round {i + 1}: " + "   ".join(line), flush=True)
    summary = {k: (statistics.median(v[0] for v in rs), min(v[1] for v in rs)) for k, rs in results.items()}
    for k in ("A", "B"):
        print(f"{k} ({builds[k]}): median of p50s {summary[k][0]:.3f} ms, min {summary[k][1]:.3f} ms")
    print(f"B / A: median {summary['B'][0] / summary['A'][0]:.3f}, min {summary['B'][1] / summary['A'][1]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
