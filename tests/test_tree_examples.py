"""The tree-MRF example and the tree benchmark run end to end (``--quick``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_tree_mrf_quick(tmp_path):
    r = _run(str(ROOT / "examples" / "tree_mrf.py"), "--quick", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    for text in ("Chow-Liu tree:", "true edges recovered", "held-out nll per sample: learned", "max |learned - true| node marginal"):
        assert text in r.stdout, text
    # the learned marginals end close to the true ones (far closer than at the start)
    err = float(r.stdout.split("max |learned - true| node marginal: ")[1].split()[0])
    assert err < 0.06
    assert (tmp_path / "tree_mrf.png").stat().st_size > 10_000


def test_tree_benchmark_quick():
    """Against pgmpy when it is importable; structgrad alone otherwise (then the peer half is skipped)."""
    bench = str(ROOT / "benchmarks" / "tree.py")
    r = _run(bench, "--quick")
    peer = not (r.returncode != 0 and "missing peer" in r.stderr)
    if not peer:
        r = _run(bench, "--quick", "--alone-only")
    assert r.returncode == 0, r.stderr[-3000:]
    for op in ("marginals", "log_partition forward+backward", "map", "sample (16 draws)"):
        assert f"| {op} |" in r.stdout, op
    if not peer:
        pytest.skip("pgmpy (the benchmark's peer) is not importable: the comparison half was not run")
    assert "pgmpy BeliefPropagation.calibrate" in r.stdout and "pgmpy BeliefPropagationWithMessagePassing.query" in r.stdout
    assert "× faster" in r.stdout
