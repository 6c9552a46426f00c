"""What every benchmark shares: interleaved timing, the row format, the report.

Conventions (one for the whole project):

* all contenders run in one process, torch at 1 thread (:func:`setup`), repeats
  interleaved round by round with the order rotated, medians reported;
* a *row* is ``{"benchmark", "case", "ours", "ours_ms", "peer", "peer_ms", "ratio"}``
  with ``ratio = peer_ms / ours_ms``: "× faster", higher is better, < 1 means the
  peer is faster (:func:`row`);
* :func:`markdown` renders rows as the table README.md shows, :func:`machine`
  says where they were measured.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from typing import Callable

import torch

__all__ = ["setup", "interleaved", "row", "markdown", "machine", "fmt_ms", "cli"]

_sync: Callable[[], None] = lambda: None  # noqa: E731


def setup(device: str = "cpu") -> None:
    """torch at 1 thread; on CUDA, synchronise around every timed call."""
    global _sync
    torch.set_num_threads(1)
    _sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, *, warmup: int = 1, budget: float = 60.0) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved round by round.

    ``warmup`` untimed rounds first (numba compiles, caches fill); then at most
    ``rounds`` timed rounds, cut (to no fewer than 3) so that they take about
    ``budget`` seconds in all.  Round r starts with contender r mod K.
    """
    names = list(fns)
    t0 = time.perf_counter()
    for _ in range(max(warmup, 1)):
        for n in names:
            fns[n]()
    _sync()
    per_round = (time.perf_counter() - t0) / max(warmup, 1)
    rounds = max(3, min(rounds, int(budget / max(per_round, 1e-9))))
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            _sync()
            t = time.perf_counter()
            fns[n]()
            _sync()
            times[n].append(time.perf_counter() - t)
    return {n: statistics.median(v) for n, v in times.items()}


def row(benchmark: str, case: str, ours: str, ours_s: float, peer: str, peer_s: float, **extra) -> dict:
    """One result row; times in seconds in, milliseconds out; ratio = peer / ours."""
    return {
        "benchmark": benchmark,
        "case": case,
        "ours": ours,
        "ours_ms": 1e3 * ours_s,
        "peer": peer,
        "peer_ms": 1e3 * peer_s,
        "ratio": peer_s / ours_s if ours_s > 0 else float("inf"),
        **extra,
    }


def fmt_ms(ms: float) -> str:
    """3 significant figures, in ms, or s above 10 s."""
    if ms >= 10_000:
        return f"{ms / 1e3:.1f} s"
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 10:
        return f"{ms:.1f} ms"
    return f"{ms:.2f} ms" if ms >= 1 else f"{ms:.3f} ms"


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table (ratio = peer ÷ structgrad, "× faster")."""
    lines = [
        "| benchmark | case | structgrad | time | peer | peer time | × faster |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['benchmark']} | {r['case']} | {r['ours']} | {fmt_ms(r['ours_ms'])} | {r['peer']} | "
            f"{fmt_ms(r['peer_ms'])} | **{r['ratio']:.2f}×** |"
        )
    return "\n".join(lines)


def machine(device: str = "cpu") -> str:
    """Date, torch version and the machine, for the header of a results table."""
    when = datetime.date.today().isoformat()
    if device == "cuda":
        where = f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    else:
        where = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} thread"
    return f"{when}, {where}"


def cli(run: Callable[..., list[dict]], doc: str, argv: list[str] | None = None) -> None:
    """The command line of a benchmark module whose ``run(quick, device, rounds)`` returns rows."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds (smoke run)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args(argv)
    setup(args.device)
    rows = run(args.quick, args.device, args.rounds)
    print(f"Measured {machine(args.device)}; medians of interleaved rounds; ratio = peer / structgrad\n")
    print(markdown(rows))
