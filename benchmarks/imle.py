"""Benchmark: the overhead of ``structgrad.imle`` over the MAP calls it makes.

I-MLE's forward + backward makes two batched ``map`` calls of S·B instances (the
perturbed θ + τε in forward, the target αθ − λg + τ′ε in backward).  Everything else
(noise, the target parameters, the difference, autograd) is overhead.  Here

* ``ours``: ``z = imle(θ, solver, samples=S, generator=g)``, then
  ``z.backward(w)`` (imle's forward + backward, Gumbel noise, λ = 1; the loss
  ⟨z, w⟩'s gradient w is given, so no loss is computed);
* ``peer``: the bare two ``solver.map`` calls on exactly the same inputs (the
  round's noise drawn beforehand with the same seed, and the target θ − λw + ε
  built beforehand), i.e. the floor for any implementation.

ratio = peer ÷ ours: 1 means no overhead; the target is ≥ 0.91 (ours ≤ 1.1 × the
two calls).  Cases: ``ksubset`` n = 1000, k = 50, B = 32 instances, S = 1 and 10;
``ilp``, a knapsack with real-valued weights, n = 40, B = 8, S = 2 (CP-SAT, one
thread).  One torch thread; rounds interleaved, medians.  ``--device cuda`` runs the
ksubset cases on the GPU.

Usage:
    python benchmarks/imle.py            # full run
    python benchmarks/imle.py --quick    # seconds-long smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable

import torch

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import structgrad as sg  # noqa: E402
from benchmarks._common import interleaved, machine, markdown, row, setup  # noqa: E402


def _case(solver: Any, theta: torch.Tensor, w: torch.Tensor, S: int, rounds: int) -> tuple[Callable, Callable]:
    """(ours, peer) closures; round r of each uses noise seed r, so both solve the same problems."""
    state = {"ours": 0, "peer": 0}
    lam = 1.0
    device = theta.device
    inputs, gens = [], []
    for r in range(rounds + 4):
        eps = sg.GumbelNoise().sample((S,) + tuple(theta.shape), torch.Generator(device=device).manual_seed(r),
                                      dtype=theta.dtype, device=device)
        inputs.append((theta + eps, theta - lam * w + eps))
        gens.append(torch.Generator(device=device).manual_seed(r))
    grad = w.expand((S,) + tuple(theta.shape)).contiguous()

    def ours() -> None:
        r = state["ours"] % len(inputs)
        state["ours"] += 1
        t = theta.detach().requires_grad_(True)
        z = sg.imle(t, solver, lam=lam, samples=S, generator=gens[r])
        z.backward(grad)

    def peer() -> None:
        r = state["peer"] % len(inputs)
        state["peer"] += 1
        a, b = inputs[r]
        solver.map(a)
        solver.map(b)

    return ours, peer


def _check_same(solver: Any, theta: torch.Tensor, w: torch.Tensor, S: int) -> None:
    """The peer's calls are imle's calls: same forward MAP, same gradient from them."""
    t = theta.detach().requires_grad_(True)
    z = sg.imle(t, solver, lam=1.0, samples=S, generator=torch.Generator(device=theta.device).manual_seed(0))
    (z * w).sum().backward()
    eps = sg.GumbelNoise().sample((S,) + tuple(theta.shape), torch.Generator(device=theta.device).manual_seed(0),
                                  dtype=theta.dtype, device=theta.device)
    za, zb = solver.map(theta + eps), solver.map(theta - w + eps)
    if not (torch.equal(z.detach(), za) and torch.allclose(t.grad, (za - zb).mean(0))):
        raise SystemExit("benchmark set-up error: the peer's map calls are not the ones imle makes")


def run(quick: bool = False, device: str = "cpu") -> list[dict]:
    """Rows ``{"benchmark": "imle", "case", "ours", "ours_ms", "peer", "peer_ms", "ratio"}``."""
    setup(device)
    rows = []
    g = torch.Generator().manual_seed(0)
    n, k, B = (100, 5, 8) if quick else (1000, 50, 32)
    rounds = 5 if quick else 40
    ks = sg.get_solver("ksubset", k=k)
    for S in ((1, 4) if quick else (1, 10)):
        theta = torch.randn(B, n, generator=g).to(device)
        w = torch.randn(n, generator=g).to(device)
        _check_same(ks, theta, w, S)
        ours, peer = _case(ks, theta, w, S, rounds)
        med = interleaved({"ours": ours, "peer": peer}, rounds, warmup=2, budget=5.0 if quick else 30.0)
        rows.append(row("imle", f"ksubset n={n}, k={k}, B={B}, S={S} ({device})", "imle fwd+bwd", med["ours"],
                        "2 bare map calls", med["peer"]))
    if device == "cpu" and importlib.util.find_spec("ortools") is None:
        print("[imle] ortools is not installed: the ilp case is skipped")
    elif device == "cpu":
        n, B, S = (12, 2, 2) if quick else (40, 8, 2)
        # real-valued weights in [1, 10), two decimals (ilp reads them as exact fractions)
        weights = torch.round((torch.rand(n, generator=g, dtype=torch.float64) * 9.0 + 1.0) * 100) / 100
        ilp = sg.get_solver("ilp", A=weights.unsqueeze(0), b=torch.round(weights.sum(-1, keepdim=True) * 50) / 100,
                            num_threads=1)
        theta = torch.rand(B, n, generator=g, dtype=torch.float64) * 10.0
        w = -torch.rand(n, generator=g, dtype=torch.float64)
        _check_same(ilp, theta, w, S)
        ours, peer = _case(ilp, theta, w, S, rounds)
        med = interleaved({"ours": ours, "peer": peer}, rounds, warmup=1, budget=5.0 if quick else 30.0)
        rows.append(row("imle", f"ilp knapsack n={n}, B={B}, S={S}", "imle fwd+bwd", med["ours"],
                        "2 bare map calls", med["peer"]))
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args(argv)
    rows = run(args.quick, args.device)
    print(f"Measured {machine(args.device)}; medians of interleaved rounds; ratio = bare map calls / imle "
          f"(1 = no overhead; target >= 0.91)\n")
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
