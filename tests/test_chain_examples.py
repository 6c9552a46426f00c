"""The CRF tagger example and the chain and CRF-layer benchmarks run end to end (--quick)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_crf_tagger_quick(tmp_path):
    r = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "crf_tagger.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "test token accuracy: CRF" in r.stdout and "generating HMM Viterbi" in r.stdout
    assert "CRF max-marginal" in r.stdout
    assert (tmp_path / "crf_tagger_learning_curve.png").stat().st_size > 10_000


def test_chain_benchmark_quick():
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "chain.py"), "--quick"], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]  # run() raises if the contenders disagree
    for text in ("log Z + marginals", "Viterbi", "nll fwd+bwd", "× faster", "| chain |"):
        assert text in r.stdout


def test_crf_benchmark_quick():
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "crf.py"), "--quick"], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]  # run() raises if the contenders disagree
    for text in ("fwd+bwd", "decode", "pytorch-crf", "torch-struct", "BIO", "| crf |", "× faster"):
        assert text in r.stdout
