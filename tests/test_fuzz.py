"""A short, bounded atheris run of the loader fuzzer (tools/fuzz_loader.py) in each mode.

Any exception other than the loader's named errors, or a crash, fails the run (libFuzzer
exits non-zero and prints the input). The ranges reach past every runtime limit (int4 blocks
up to 2**62, token counts beyond max_tokens, thread counts beyond max_threads, values that
overflow float32, deeply nested JSON); see tools/fuzz_loader.py."""
import re
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
    done = re.search(r"Done (\d+) runs", out.stderr)  # libFuzzer counts the seed corpus on top
    assert done and int(done.group(1)) >= 600, out.stderr[-3000:]
