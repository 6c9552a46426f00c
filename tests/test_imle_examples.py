"""The I-MLE examples and benchmark run end to end (--quick)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args, timeout=300):
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


def test_l2x_explainer_quick(tmp_path):
    out = _run([str(ROOT / "examples" / "l2x_explainer.py"), "--quick", "--out", str(tmp_path)])
    for label in ("I-MLE (Gumbel)", "exact-marginal ST (SIMPLE)", "straight-through (P&M)", "oracle selection"):
        assert label in out
    assert "subset precision" in out and "test MSE" in out
    assert (tmp_path / "l2x_explainer.png").stat().st_size > 10_000


def test_ilp_cost_learning_quick(tmp_path):
    out = _run([str(ROOT / "examples" / "ilp_cost_learning.py"), "--quick", "--out", str(tmp_path)])
    for label in ("two-stage", "I-MLE", "blackbox", "normalised regret"):
        assert label in out
    assert (tmp_path / "ilp_cost_learning.png").stat().st_size > 10_000


def test_imle_benchmark_rows():
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import imle as bench
    finally:
        sys.path.remove(str(ROOT))
    rows = bench.run(quick=True)
    assert {r["benchmark"] for r in rows} == {"imle"}
    for r in rows:
        assert abs(r["ratio"] - r["peer_ms"] / r["ours_ms"]) < 1e-9 and r["ours_ms"] > 0
