"""A short, bounded atheris run of the loader fuzzer (tools/fuzz_loader.py) in each mode.

Any exception other than the loader's named errors, or a crash, fails the run (libFuzzer
exits non-zero and prints the input)."""
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")
TOOL = Path(__file__).resolve().parent.parent / "tools" / "fuzz_loader.py"


@pytest.mark.parametrize("mode", [[], ["--graph"]])
def test_loader_survives_fuzzing(mode):
    out = subprocess.run([sys.executable, str(TOOL), *mode, "-runs=600", "-seed=1"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Done 600 runs" in out.stderr
