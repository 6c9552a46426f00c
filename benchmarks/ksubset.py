"""Benchmark: k-subset log Z + marginals, and the exact samplers.

Side by side in one process, repeats interleaved, medians and ratios printed,
one torch thread.

1. ``log Z + marginals`` (forward, then backward of ``A.sum()``: θ.grad = μ) for
   B = 32 instances of n = 1000, k = 50:

   * ``simple-autograd`` (the baseline): the approach of the SIMPLE estimator
     (Ahmed et al., ICLR 2023): the same prefix recursion
     α[i, j] = logaddexp(α[i−1, j], α[i−1, j−1] + θ_i) over the n elements with a
     finite "log 0" in the table, and the marginals by autograd through it;
   * ``structgrad torch rows``: the same recursion, with the analytic backward
     (suffix table + vectorised combination, no autograd graph);
   * ``structgrad torch columns``: the recursion run over the k sizes with
     logcumsumexp scans (the CUDA schedule), analytic backward;
   * ``structgrad numba``: compiled loops (backend="numba").

2. Exact samplers, S samples per instance: conditional-Poisson rejection,
   backward sequential sampling (torch and numba), and ``auto``.

Usage:
    python benchmarks/ksubset.py            # full run (the lead takes the figures)
    python benchmarks/ksubset.py --quick    # seconds-long smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

import torch

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import structgrad as sg  # noqa: E402
from benchmarks._common import interleaved, machine, markdown, row, setup  # noqa: E402


def simple_log_partition(theta: torch.Tensor, k: int) -> torch.Tensor:
    """Baseline: log e_k(exp θ) by the prefix recursion, differentiable by autograd.

    Written as the SIMPLE estimator's reference code does it: a loop over the n
    elements that rebuilds the (B, k+1) row with ``torch.cat`` each step, a large
    finite negative number as log 0 (so that autograd of logaddexp never sees
    −inf − (−inf)), float64 tables.
    """
    x = theta.to(torch.float64)
    B, n = x.shape
    log0 = -1e30
    a = torch.cat([torch.zeros(B, 1, dtype=x.dtype), torch.full((B, k), log0, dtype=x.dtype)], dim=1)
    for i in range(n):
        a = torch.cat([a[:, :1], torch.logaddexp(a[:, 1:], a[:, :-1] + x[:, i : i + 1])], dim=1)
    return a[:, k].to(theta.dtype)


def _report(title: str, med: dict[str, float], base: str) -> None:
    print(f"\n{title}")
    print(f"  {'contender':<30} {'median ms':>10} {'speed-up vs ' + base:>28}")
    for name, sec in med.items():
        print(f"  {name:<30} {sec * 1e3:>10.2f} {med[base] / sec:>27.2f}x")


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="seconds-long smoke run (small sizes, 2 repeats)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--samples", type=int, nargs="+", default=[1, 100], help="S values for the sampler race")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.n, args.k, args.samples, args.repeats = 4, 60, 6, [1, 8], 2
    setup("cpu")
    dtype = getattr(torch, args.dtype)
    B, n, k = args.batch, args.n, args.k
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(B, n, generator=gen).to(dtype)
    print(
        f"k-subset benchmark: B={B}, n={n}, k={k}, theta {args.dtype}, torch {torch.__version__}, "
        f"1 torch thread, load average {os.getloadavg()[0]:.2f}"
    )

    solvers = {
        "structgrad torch rows": sg.get_solver("ksubset", k=k, schedule="rows"),
        "structgrad torch columns": sg.get_solver("ksubset", k=k, schedule="columns"),
        "structgrad numba": sg.get_solver("ksubset", k=k, backend="numba"),
    }

    def grad_of(f: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            x = theta.clone().requires_grad_(True)
            f(x).sum().backward()
            return x.grad

        return run

    contenders = {"simple-autograd": grad_of(lambda x: simple_log_partition(x, k))}
    for name, s in solvers.items():
        contenders[name] = grad_of(s.log_partition)
    # agreement first (in float64, so that rounding to float32 does not hide differences)
    theta64 = theta.double().requires_grad_(True)
    simple_log_partition(theta64, k).sum().backward()
    ref = theta64.grad
    for name, s in solvers.items():
        x = theta.double().requires_grad_(True)
        s.log_partition(x).sum().backward()
        print(f"  max |mu - mu_simple| {name:<28} {float((x.grad - ref).abs().max()):.2e}  (float64)")
    med = interleaved(contenders, args.repeats)
    _report(f"log Z + marginals (forward + backward), B={B} n={n} k={k}", med, "simple-autograd")
    for name, target in () if args.quick else (("structgrad torch rows", 1.5), ("structgrad numba", 2.0)):
        ratio = med["simple-autograd"] / med[name]
        print(f"  target {name}: >= {target}x -> {ratio:.2f}x {'met' if ratio >= target else 'NOT met'}")
    results = {"marginals": med}

    for S in args.samples:
        samplers = {
            "sequential torch": sg.get_solver("ksubset", k=k, sampler="sequential"),
            "rejection torch": sg.get_solver("ksubset", k=k, sampler="rejection"),
            "auto torch": sg.get_solver("ksubset", k=k, sampler="auto"),
            "sequential numba": sg.get_solver("ksubset", k=k, backend="numba", sampler="sequential"),
        }
        race = {
            name: (lambda s=s, S=S: s.sample(theta, S, generator=torch.Generator().manual_seed(1)))
            for name, s in samplers.items()
        }
        for name, fn in race.items():
            z = fn()
            if not bool((z.sum(-1) == k).all()):
                raise RuntimeError(f"{name}: a sample without exactly k ones")
        med = interleaved(race, args.repeats)
        _report(f"exact samples, S={S} per instance (B={B} n={n} k={k})", med, "sequential torch")
        results[f"samples_{S}"] = med
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    return results


def run(quick: bool = False) -> list[dict]:
    """The suite's entry point: B=32, n=1000, k=50 (quick: 4, 60, 6); rows with ratio = baseline / structgrad."""
    args = ["--quick"] if quick else []
    res = main(args)
    case = "B=4, n=60, k=6" if quick else "B=32, n=1000, k=50"
    rows = []
    m = res["marginals"]
    for name in ("structgrad torch rows", "structgrad torch columns", "structgrad numba"):
        rows.append(row("ksubset", f"log Z + marginals, {case}", name.replace("structgrad ", ""), m[name],
                        "autograd through the DP (SIMPLE)", m["simple-autograd"]))
    for key, med in res.items():
        if key.startswith("samples_"):
            S = key.split("_")[1]
            for name in ("rejection torch", "auto torch", "sequential numba"):
                rows.append(row("ksubset", f"exact samples S={S}, {case}", name, med[name], "sequential torch", med["sequential torch"]))
    return rows


if __name__ == "__main__":
    setup("cpu")
    rows = run("--quick" in sys.argv)
    print(f"\nMeasured {machine()}; medians of interleaved rounds; ratio = baseline / structgrad\n")
    print(markdown(rows))
