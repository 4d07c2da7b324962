#!/usr/bin/env python3
"""What is left of the old results/calibration/ script: two pieces tools/results_lampq.py
imports. Its tables moved, each to the script that now measures them under the protocol
(calibration part to fit, validation part to choose, test only reported, paired intervals):

* uniform bits, 4/5/6/8-bit activation grids, static against per-image scales:
  ``tools/regimes_results.py`` -> results/regimes/;
* LampQ against uniform, naive and random allocations at equal BOPs: ``tools/results_lampq.py``;
* static / dynamic / predicted activation scales: ``tools/results_scalepredictor.py``.

Running this file says so and exits with status 2.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pyruntime.calibrate.common import run_batches  # noqa: E402
from pyruntime.calibrate.lampq import LampQConfig, feasible_range  # noqa: E402

REPLACEMENTS = ("tools/regimes_results.py", "tools/results_lampq.py", "tools/results_scalepredictor.py")


def evaluate(model, x: np.ndarray, show: bool) -> Tuple[np.ndarray, int]:
    """(predicted classes, mean BOPs per image) over all images, batches of 500."""
    logits, _, bops, _ = run_batches(model, x, 500, desc="test images", enabled=show)
    return logits.argmax(1), int(round(float(bops.mean())))


def weight_budgets(source, fractions: Sequence[float]) -> List[Tuple[str, str, float]]:
    """(label, short label, BOPs) at each fraction of the way from all-W4A8 to all-W8A8."""
    lo, hi = feasible_range(source, LampQConfig())
    return [(f"{f:.2f} of W4A8..W8A8", f"@{f:.2f}", lo + f * (hi - lo)) for f in fractions]


def main(argv=None) -> int:
    print("calibration_results.py: its tables moved under the validation protocol; run "
          + ", ".join(REPLACEMENTS), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
