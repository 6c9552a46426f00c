"""The benchmark suite runs (``python -m benchmarks --quick``) and keeps its one convention."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_common_row_convention():
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks._common import markdown, row
    finally:
        sys.path.remove(str(ROOT))
    r = row("chain", "case", "map", 0.002, "peer", 0.010)
    assert r["ours_ms"] == 2.0 and r["peer_ms"] == 10.0 and r["ratio"] == 5.0  # peer ÷ ours: "× faster"
    assert "**5.00×**" in markdown([r])


def test_suite_quick_run_writes_table_json_and_figure(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    benches = {row["benchmark"] for row in data["rows"]}
    assert {"chain", "ksubset", "dpm"} <= benches
    for row in data["rows"]:
        assert abs(row["ratio"] - row["peer_ms"] / row["ours_ms"]) < 1e-9 * max(1.0, row["ratio"])
    table = (tmp_path / "results.md").read_text()
    assert table.startswith("Measured ") and "| × faster |" in table
    assert (tmp_path / "ratios.png").stat().st_size > 10_000


def test_splice_replaces_only_the_marked_block(tmp_path):
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.__main__ import splice
    finally:
        sys.path.remove(str(ROOT))
    f = tmp_path / "doc.md"
    f.write_text("before\n<!-- benchmarks:begin -->\nold\n<!-- benchmarks:end -->\nafter\n")
    splice(f, "Measured today.\n\n| table |")
    assert f.read_text() == "before\n<!-- benchmarks:begin -->\nMeasured today.\n\n| table |\n<!-- benchmarks:end -->\nafter\n"
