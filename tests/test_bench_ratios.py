"""The benchmark's summary arithmetic (bench/_peers.py): ratios, shares of the int8 peak, the
share the 0.5x-of-ORT-int8 target would need, and which targets a cell misses. Timings are
not tested anywhere (bench/ measures them); this checks what is computed from them."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import _peers  # noqa: E402


def _cells(**ms):
    macs = 1_000_000_000  # 2 GOP per image
    cells = {}
    for rt, t in ms.items():
        c = _peers.Cell("m", rt.replace("_", "-"), 1, 1, [t * 1e-3])
        cells[c.runtime] = c.summary(macs)
    return cells


def test_ratios_and_peak_shares():
    cells = _cells(ort_int8=20.0, pyruntime_w8a8=8.0, pyruntime_w8a8_attn8=12.0, ort_fp32=30.0, pyruntime_fp32=33.0)
    r = _peers.ratios(cells, peak_gops=400.0)
    assert r["w8a8_over_ort_int8"] == pytest.approx(0.4)
    assert r["w8a8_attn8_over_ort_int8"] == pytest.approx(0.6)
    assert r["fp32_over_ort_fp32"] == pytest.approx(1.1)
    # 2 GOP in 8 ms = 250 GOPS of a 400 GOPS peak; ORT int8: 100 GOPS
    assert r["w8a8_frac_of_int8_peak"] == pytest.approx(0.625)
    assert r["ort_int8_frac_of_int8_peak"] == pytest.approx(0.25)
    assert r["half_ort_int8_needs_frac_of_int8_peak"] == pytest.approx(0.5)
    assert set(r["misses"]) == {"w8a8 %pk8<65%", "w8a8-attn8/ort-i8>0.5", "w8a8-attn8 %pk8<65%", "fp32/ort-fp32>1.0"}


def test_missing_peers_and_peak_give_none():
    r = _peers.ratios(_cells(pyruntime_w8a8=8.0), peak_gops=None)
    assert r["w8a8_over_ort_int8"] is None and r["ort_int8_frac_of_int8_peak"] is None
    assert r["half_ort_int8_needs_frac_of_int8_peak"] is None and r["w8a8_frac_of_int8_peak"] is None
    assert r["misses"] == []
    lines = _peers.format_summary_table([{"model": "m", "batch": 1, "threads": 1, "cells": _cells(pyruntime_w8a8=8.0),
                                          "ratios": r}])
    assert "need%" in lines[1] and lines[-1].rstrip().endswith("|")
