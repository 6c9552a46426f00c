"""The RBM examples run end to end (``--quick``) and print the figures that matter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, out: Path) -> str:
    r = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_rsm_topics_quick(tmp_path):
    out = _run("rsm_topics.py", tmp_path)
    for text in ("unigram", "SGD, one lr", "SGD, own lr for a", "SGD, a frozen", "Adam", "asker F~",
                 "AIS against the exact", "length path", "temperature path", "held-out perplexity: RSM", "top words"):
        assert text in out, text
    assert (tmp_path / "rsm_topics.png").exists()


def test_rbm_digits_quick(tmp_path):
    out = _run("rbm_digits.py", tmp_path)
    for text in ("sklearn (PCD-1)", "structgrad PCD-1", "structgrad CD-1", "log-likelihood", "− sklearn"):
        assert text in out, text
    assert (tmp_path / "rbm_digits.png").exists()
