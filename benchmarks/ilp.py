"""The ``ilp`` solver against plain OR-Tools scripts doing the same solves.

Run:  python benchmarks/ilp.py            (full, about a minute on a quiet machine)
      python benchmarks/ilp.py --quick    (smoke run, seconds)
      python -m benchmarks --only ilp     (in the project's suite)

Every row compares ``ilp.map`` with a peer doing the same solve; ratio = peer time ÷
our time ("× faster"; above 1 we are faster), the convention of benchmarks/_common.py.
Torch at one thread; all contenders in one process; interleaved (one call of each
per round, the order rotated; in round r every contender gets the same θ, drawn
ahead); medians over rounds.  Before timing, the contenders are checked to reach
the same objective values.  The peers use the solver's integer scaling of θ
(round(θ·2^(30−k)), max|θ| = f·2^k), so they solve the same problem.

* shortest path on a 5×5 grid (3×3 with ``--quick``) written as flow rows: 40 edge
  variables (right and down edges), one equality row per node (+1 at the source,
  −1 at the sink, 0 elsewhere); θ = −(edge length), lengths ~ U(0, 1).
    - ``ilp`` (routed to min-cost flow) vs a plain min-cost-flow script (per call:
      scale θ, fill ``SimpleMinCostFlow`` with vectorised calls, solve, read the
      flows as a tensor); target: ratio ≥ 0.5 (one instance per call ≤ 2× its time);
    - ``ilp`` vs a plain GLOP script (``pywraplp``, model built once, the objective
      set per call, solved, values read) and ``ilp method="lp-first"`` vs the same;
    - a batch of 32 (8) in one ``map`` call vs as many calls of the plain
      min-cost-flow script, time per instance; target: ratio ≥ 1/1.2; the case names
      CPU time ÷ wall time of the batch call (≈ the number of busy cores).
* knapsack: n = 200, 20 rows (40 and 6 with ``--quick``), weights U{1..100},
  capacity half of each row's total: ``ilp`` (CP-SAT) vs a plain CP-SAT script
  building its model per call, and vs one keeping its model and replacing the
  objective (the floor for any wrapper); then a batch of 32 (8) in one call with
  ``num_threads=2`` vs the model-reusing script looping over them, with CPU ÷ wall.
* assignment 30×30 (12×12 with ``--quick``): ``ilp`` (routed to linear sum
  assignment) vs a plain linear-sum-assignment script and a plain CP-SAT script;
  ``ilp method="cp-sat"`` vs the plain CP-SAT script.

Timings on a shared machine are noisy; the medians and interleaving only damp it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import structgrad as sg  # noqa: E402
from benchmarks._common import interleaved, machine, markdown, row, setup  # noqa: E402

BITS = 30


# ----------------------------------------------------------------------------- timing
def race(fns: dict[str, Callable], thetas: list, rounds: int) -> dict[str, float]:
    """Median seconds per call, interleaved (benchmarks._common.interleaved); in round r
    every contender gets thetas[r % len(thetas)], so the same θ within a round."""
    def feed(fn: Callable) -> Callable[[], object]:
        count = iter(range(10**9))
        return lambda: fn(thetas[next(count) % len(thetas)])

    return interleaved({k: feed(f) for k, f in fns.items()}, rounds)


def cpu_per_wall(fn: Callable, theta: torch.Tensor, repeats: int) -> float:
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(repeats):
        fn(theta)
    return (time.process_time() - c0) / (time.perf_counter() - t0)


def scaled(theta: np.ndarray) -> np.ndarray:
    """round(θ · 2^(BITS − k)) with max|θ| = f·2^k, f ∈ [1/2, 1): the ilp solver's scaling."""
    _, k = np.frexp(np.abs(theta).max())
    return np.rint(np.ldexp(theta, BITS - k)).astype(np.int64)


def check_same_value(fns: dict[str, Callable], theta: torch.Tensor) -> None:
    th = theta.double().numpy()
    vals = {k: (np.asarray(f(theta), dtype=np.float64).reshape(th.shape) * th).sum(-1) for k, f in fns.items()}
    ref = next(iter(vals.values()))
    if any(not np.allclose(v, ref, rtol=1e-6, atol=1e-9) for v in vals.values()):
        raise SystemExit(f"contenders disagree: {vals}")


# ----------------------------------------------------------------------------- peers
def grid_flow(k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Tails, heads of the right/down edges of a k×k grid, and the flow rows (A_eq, b_eq)."""
    tails, heads = [], []
    for r in range(k):
        for c in range(k):
            if c + 1 < k:
                tails.append(r * k + c), heads.append(r * k + c + 1)
            if r + 1 < k:
                tails.append(r * k + c), heads.append((r + 1) * k + c)
    t, h = np.array(tails, dtype=np.int32), np.array(heads, dtype=np.int32)
    A_eq = np.zeros((k * k, len(t)), dtype=np.int64)
    A_eq[t, np.arange(len(t))] = 1
    A_eq[h, np.arange(len(t))] = -1
    b_eq = np.zeros(k * k, dtype=np.int64)
    b_eq[0], b_eq[-1] = 1, -1
    return t, h, A_eq, b_eq


def plain_min_cost_flow(tails, heads, supplies):
    """A plain script: per call, scale θ, fill SimpleMinCostFlow (vectorised), solve, read z."""
    from ortools.graph.python import min_cost_flow

    caps = np.ones(len(tails), dtype=np.int64)
    nodes = np.arange(len(supplies), dtype=np.int32)
    arcs = np.arange(len(tails), dtype=np.int32)

    def solve(theta: torch.Tensor) -> torch.Tensor:
        f = min_cost_flow.SimpleMinCostFlow()
        f.add_arcs_with_capacity_and_unit_cost(tails, heads, caps, -scaled(theta.numpy()))
        f.set_nodes_supplies(nodes, supplies)
        if f.solve() != f.OPTIMAL:
            raise RuntimeError("plain min-cost flow: not optimal")
        return torch.from_numpy(f.flows(arcs).astype(np.float64))

    return solve


def plain_glop(A_eq, b_eq):
    """A plain GLOP script (pywraplp): the model built once; per call set the objective, solve, read."""
    from ortools.linear_solver import pywraplp

    s = pywraplp.Solver.CreateSolver("GLOP")
    x = [s.NumVar(0.0, 1.0, f"x{j}") for j in range(A_eq.shape[1])]
    for row_, rhs in zip(A_eq, b_eq):
        ct = s.Constraint(float(rhs), float(rhs))
        for j in np.flatnonzero(row_):
            ct.SetCoefficient(x[j], float(row_[j]))
    obj = s.Objective()
    obj.SetMaximization()

    def solve(theta: torch.Tensor) -> torch.Tensor:
        for xj, cj in zip(x, scaled(theta.numpy()).tolist()):
            obj.SetCoefficient(xj, cj)
        if s.Solve() != s.OPTIMAL:
            raise RuntimeError("plain GLOP: not optimal")
        return torch.tensor([v.solution_value() for v in x]).round()

    return solve


def plain_cpsat(A, b):
    """A plain CP-SAT script: build the model, solve with one worker, read z (per call)."""
    from ortools.sat.python import cp_model

    def solve(theta: torch.Tensor) -> np.ndarray:
        m = cp_model.CpModel()
        x = [m.new_bool_var(f"x{i}") for i in range(A.shape[1])]
        for row_, rhs in zip(A, b):
            m.add(cp_model.LinearExpr.weighted_sum(x, row_.tolist()) <= int(rhs))
        m.maximize(cp_model.LinearExpr.weighted_sum(x, scaled(theta.double().numpy()).tolist()))
        s = cp_model.CpSolver()
        s.parameters.num_workers = 1
        if s.solve(m) != cp_model.OPTIMAL:
            raise RuntimeError("plain CP-SAT: not optimal")
        return np.array([s.boolean_value(v) for v in x], dtype=np.float64)

    return solve


def plain_cpsat_reused(A, b):
    """The plain script keeping its model and replacing only the objective."""
    from ortools.sat.python import cp_model

    m = cp_model.CpModel()
    x = [m.new_bool_var(f"x{i}") for i in range(A.shape[1])]
    for row_, rhs in zip(A, b):
        m.add(cp_model.LinearExpr.weighted_sum(x, row_.tolist()) <= int(rhs))
    s = cp_model.CpSolver()
    s.parameters.num_workers = 1

    def solve(theta: torch.Tensor) -> np.ndarray:
        th = theta.double().numpy()
        out = []
        for t in th.reshape(-1, th.shape[-1]):
            m.maximize(cp_model.LinearExpr.weighted_sum(x, scaled(t).tolist()))
            s.solve(m)
            out.append(np.array(s.response_proto.solution, dtype=np.float64))
        return np.stack(out).reshape(th.shape)

    return solve


def plain_assignment(k: int):
    """A plain linear-sum-assignment script: per call, fill the k×k arcs, solve, read z."""
    from ortools.graph.python import linear_sum_assignment

    tails = np.repeat(np.arange(k), k).astype(np.int32)
    heads = np.tile(np.arange(k), k).astype(np.int32)

    def solve(theta: torch.Tensor) -> np.ndarray:
        a = linear_sum_assignment.SimpleLinearSumAssignment()
        a.add_arcs_with_cost(tails, heads, -scaled(theta.double().numpy()))
        if a.solve() != a.OPTIMAL:
            raise RuntimeError("plain assignment: not optimal")
        z = np.zeros((k, k))
        z[np.arange(k), [a.right_mate(i) for i in range(k)]] = 1
        return z.ravel()

    return solve


# ----------------------------------------------------------------------------- benchmarks
def run(quick: bool = False, rounds: int | None = None, batch: int | None = None, seed: int = 0) -> list[dict]:
    """Run every comparison; returns rows (benchmarks._common.row: ratio = peer ÷ ours)."""
    setup("cpu")
    rounds = rounds or (5 if quick else 201)
    batch = batch or (8 if quick else 32)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    rows: list[dict] = []

    # ---------------------------------------------------------------- shortest path on a grid
    k = 3 if quick else 5
    tails, heads, A_eq, b_eq = grid_flow(k)
    n = A_eq.shape[1]
    case = f"shortest path {k}x{k} grid as flow rows (n={n})"
    ilp = sg.get_solver("ilp", A_eq=A_eq, b_eq=b_eq)
    lp = sg.get_solver("ilp", A_eq=A_eq, b_eq=b_eq, method="lp-first")
    mcf = plain_min_cost_flow(tails, heads, b_eq)
    glop = plain_glop(A_eq, b_eq)
    fns = {"ours": ilp.map, "lp": lp.map, "mcf": mcf, "glop": glop}
    thetas = [-torch.rand(n, generator=gen, dtype=torch.float64) for _ in range(64)]
    check_same_value(fns, thetas[0])
    med = race(fns, thetas, rounds)
    ours = f"ilp.map ({ilp.method})"
    rows.append(row("ilp", f"{case}, one instance per call", ours, med["ours"], "plain min-cost-flow script", med["mcf"]))
    rows.append(row("ilp", f"{case}, one instance per call", ours, med["ours"], "plain GLOP script", med["glop"]))
    rows.append(row("ilp", f"{case}, one instance per call", 'ilp.map (method="lp-first")', med["lp"], "plain GLOP script", med["glop"]))
    thetas = [-torch.rand(batch, n, generator=gen, dtype=torch.float64) for _ in range(8)]
    loop = lambda th: [mcf(t) for t in th]  # noqa: E731
    check_same_value({"ours": ilp.map, "loop": lambda th: torch.stack(loop(th))}, thetas[0])
    med = race({"ours": ilp.map, "loop": loop}, thetas, max(3, rounds // 10))
    cw = cpu_per_wall(ilp.map, thetas[0], 3 if quick else 30)
    rows.append(row("ilp", f"{case}, batch of {batch} in one call, time per instance (cpu/wall {cw:.2f})", ours,
                    med["ours"] / batch, "plain min-cost-flow script", med["loop"] / batch, cpu_per_wall=cw))

    # ---------------------------------------------------------------- knapsack
    n, m = (40, 6) if quick else (200, 20)
    A = rng.integers(1, 101, size=(m, n))
    b = A.sum(1) // 2
    case = f"knapsack n={n}, m={m}"
    ilp = sg.get_solver("ilp", A=A, b=b)
    fns = {"ours": ilp.map, "plain": plain_cpsat(A, b), "reused": plain_cpsat_reused(A, b)}
    thetas = [torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(16)]
    check_same_value(fns, thetas[0])
    med = race(fns, thetas, max(3, rounds // 10))
    ours = f"ilp.map ({ilp.method})"
    rows.append(row("ilp", f"{case}, one instance per call", ours, med["ours"], "plain CP-SAT script", med["plain"]))
    rows.append(row("ilp", f"{case}, one instance per call", ours, med["ours"], "plain CP-SAT, model reused", med["reused"]))

    # ---------------------------------------------------------------- batch on threads
    kb = 8 if quick else 32
    par = sg.get_solver("ilp", A=A, b=b, num_threads=2)
    reused = plain_cpsat_reused(A, b)
    thetas = [torch.randn(kb, n, generator=gen, dtype=torch.float64) for _ in range(4)]
    check_same_value({"ours": par.map, "reused": reused}, thetas[0])
    med = race({"ours": par.map, "reused": reused}, thetas, max(3, rounds // 40))
    cw = cpu_per_wall(par.map, thetas[0], 1 if quick else 3)
    rows.append(row("ilp", f"{case}, batch of {kb} in one call (cpu/wall {cw:.2f})", "ilp.map (cp-sat, num_threads=2)",
                    med["ours"], "plain CP-SAT, model reused, a loop", med["reused"], cpu_per_wall=cw))

    # ---------------------------------------------------------------- assignment
    k = 12 if quick else 30
    rws = np.kron(np.eye(k, dtype=np.int64), np.ones((1, k), dtype=np.int64))
    cols = np.kron(np.ones((1, k), dtype=np.int64), np.eye(k, dtype=np.int64))
    A_eq, b_eq = np.concatenate([rws, cols]), np.ones(2 * k, dtype=np.int64)
    case = f"assignment {k}x{k}"
    auto = sg.get_solver("ilp", A_eq=A_eq, b_eq=b_eq)
    forced = sg.get_solver("ilp", A_eq=A_eq, b_eq=b_eq, method="cp-sat")
    cpsat_eq = plain_cpsat(np.concatenate([A_eq, -A_eq]), np.concatenate([b_eq, -b_eq]))
    fns = {"auto": auto.map, "forced": forced.map, "lsa": plain_assignment(k), "cpsat": cpsat_eq}
    thetas = [torch.randn(k * k, generator=gen, dtype=torch.float64) for _ in range(8)]
    check_same_value(fns, thetas[0])
    med = race(fns, thetas, max(3, rounds // 30))
    ours = f"ilp.map ({auto.method})"
    rows.append(row("ilp", f"{case}, one instance per call", ours, med["auto"], "plain linear-sum-assignment script", med["lsa"]))
    rows.append(row("ilp", f"{case}, one instance per call", ours, med["auto"], "plain CP-SAT script", med["cpsat"]))
    rows.append(row("ilp", f"{case}, one instance per call", 'ilp.map (method="cp-sat")', med["forced"], "plain CP-SAT script", med["cpsat"]))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run (a few rounds, small instances)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds of the one-instance rows (default 201; 5 with --quick)")
    p.add_argument("--batch", type=int, default=None, help="batch size of the flow batch row (default 32; 8 with --quick)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"Measured {machine()}; ortools {__import__('ortools').__version__}; cores available to this process {cores}; "
          f"load average {os.getloadavg()[0]:.2f}.\n")
    print(markdown(run(args.quick, args.rounds, args.batch, args.seed)))


if __name__ == "__main__":
    main()
