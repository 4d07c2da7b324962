"""tools/ab_bench.py: A/B latency of two builds of the extension, each loaded by path.

No assertion on speed; only that each build runs, the order alternates, the summary is
printed, and bad arguments are named. (Not in the arm64 list: a development tool whose
subprocesses would each start an emulated interpreter.)
"""
import re
import subprocess
import sys

import pyruntime
from pyruntime.modelfile import write_model

import pytest

from _graphs import random_tensors, tiny_graph


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    graph = tiny_graph(depth=2)
    path = tmp_path_factory.mktemp("ab") / "m.pyrt"
    write_model(path, graph, random_tensors(graph, seed=1), "{}", {"source": "test"})
    return path, graph


def _ab_bench(*args):
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "ab_bench.py"
    return subprocess.run([sys.executable, str(tool), *map(str, args)], capture_output=True, text=True)


def test_ab_bench_loads_each_build_by_path_and_summarises(model_file, tmp_path):
    import shutil

    path, _ = model_file
    a = pyruntime._core.__file__
    b = tmp_path / "copy" / "_core_b.so"  # another file of the same build: loaded as pyruntime._core too
    b.parent.mkdir()
    shutil.copy(a, b)
    r = _ab_bench(a, b, path, "--rounds", "2", "--runs", "3")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("round 1: A p50") and lines[1].startswith("round 2: B p50")  # order alternates
    assert f"B ({b}): median of p50s" in r.stdout and re.search(r"B / A: median [0-9.]+, min [0-9.]+", r.stdout)


def test_ab_bench_errors_are_named(model_file, tmp_path):
    path, _ = model_file
    r = _ab_bench(tmp_path / "missing.so", pyruntime._core.__file__, path)
    assert r.returncode == 2 and "missing.so is not a file" in r.stderr
    r = _ab_bench(pyruntime._core.__file__, pyruntime._core.__file__, tmp_path / "nope.pyrt", "--rounds", "1")
    assert r.returncode == 1 and "ab_bench: bench with" in r.stderr and "nope.pyrt" in r.stderr
