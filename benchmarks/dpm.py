"""DPMLoss forward+backward against the InfoNCE (CLIP) loss, side by side on the CPU.

Both losses get the same (B, B) similarity matrix and are timed from sim to sim.grad:
InfoNCE is the symmetric cross-entropy of sim/τ (two fused log-softmax passes);
DPMLoss runs in training mode with all its work (argument checks, both directions,
moving averages, ζ momentum and step, state writes) on a dataset of n = 100·B pairs.
A second row adds a (B, d) × (d, B) feature product in front of each loss, the
smallest realistic model.  Repeats are interleaved (InfoNCE, DPM, InfoNCE, ...) so
drifting machine load hits both alike; medians and the ratio InfoNCE / DPMLoss
(the suite's convention: peer ÷ ours, "× faster"; below 1, DPMLoss is slower) are
printed.  Target: DPMLoss at most 1.3× InfoNCE's time, i.e. ratio ≥ 0.77 at B = 256 and 512.

    python benchmarks/dpm.py              # B = 256, 512; 60 repeats
    python benchmarks/dpm.py --quick      # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import structgrad as sg  # noqa: E402
from benchmarks._common import machine, markdown, row, setup  # noqa: E402


def info_nce(sim: torch.Tensor, tau: float) -> torch.Tensor:
    labels = torch.arange(sim.shape[0], device=sim.device)
    logits = sim / tau
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def bench(B: int, repeats: int, dtype: torch.dtype, dim: int, features: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n, tau = 100 * B, 0.1
    crit = sg.DPMLoss(n, tau=tau, gamma=0.8, xi=0.0, zeta=-0.05, zeta_lr=1e-3, zeta_start_step=0, dtype=dtype)
    fx = F.normalize(torch.randn(B, dim, generator=g, dtype=dtype), dim=-1)
    fy = F.normalize(fx + 0.5 * torch.randn(B, dim, generator=g, dtype=dtype), dim=-1)
    base = fx @ fy.T

    def make():
        if features:
            a, b = fx.clone().requires_grad_(), fy.clone().requires_grad_()
            return (a, b), lambda: a @ b.T
        s = base.clone().requires_grad_()
        return (s,), lambda: s

    def run_infonce():
        leaves, sim = make()
        t = time.perf_counter()
        info_nce(sim(), tau).backward()
        return time.perf_counter() - t

    def run_dpm():
        leaves, sim = make()
        idx = torch.randperm(n, generator=g)[:B]
        t = time.perf_counter()
        crit(sim(), idx).surrogate.backward()
        return time.perf_counter() - t

    for _ in range(3):  # warm-up (and first visits of the state)
        run_infonce()
        run_dpm()
    t_i, t_d = [], []
    for _ in range(repeats):
        t_i.append(run_infonce())
        t_d.append(run_dpm())
    return statistics.median(t_i), statistics.median(t_d)


def run(quick: bool = False, sizes=(256, 512), repeats: int = 60, dim: int = 256, dtype=torch.float32) -> list[dict]:
    """The suite's entry point: rows with ratio = InfoNCE time / DPMLoss time."""
    if quick:
        sizes, repeats = (64, 128), 5
    rows = []
    for B in sizes:
        for features in (False, True):
            ti, td = bench(B, repeats, dtype, dim, features)
            what = "loss only" if not features else f"with (B,{dim}) features"
            rows.append(row("dpm", f"fwd+bwd B={B}, {what}", "DPMLoss", td, "InfoNCE (CLIP loss)", ti))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: small B, few repeats")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--repeats", type=int, default=60)
    p.add_argument("--dim", type=int, default=256, help="feature dimension of the second row")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = p.parse_args(argv)
    setup("cpu")
    rows = run(args.quick, args.sizes, args.repeats, args.dim, getattr(torch, args.dtype))
    print(f"Measured {machine()}, {args.dtype}; medians of interleaved repeats; ratio = InfoNCE / DPMLoss (target >= 0.77)\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
