"""The ``ilp`` solver against a plain OR-Tools CP-SAT script doing the same solve.

Run:  python benchmarks/ilp.py            (full)
      python benchmarks/ilp.py --quick    (smoke run, seconds)

What is timed (torch at 1 thread; all contenders in one process; interleaved: one
call of each per round with the order rotated; a fresh θ ~ N(0, 1) per round,
shared by the contenders of that round; medians over rounds):

* knapsack: n = 200 binary variables, 20 random knapsack rows (weights U{1..100},
  capacity half of each row's total).
    - ``structgrad ilp``: ``get_solver("ilp", A=A, b=b)`` once, then ``map(θ)`` per call;
    - ``plain CP-SAT script``: what a user writes without structgrad, per call: build
      the CpModel, add the rows, maximise the integer-scaled objective (the same
      scaling, so the same problem), solve with one worker, read the values;
    - ``plain CP-SAT, model reused``: the same script keeping its model and only
      replacing the objective: the floor for any wrapper.
* assignment: a 30 × 30 assignment (12 × 12 with ``--quick``) (60 "exactly one" rows over 900 variables):
  ``structgrad ilp`` (auto-routed to the linear sum assignment solver), ``structgrad
  ilp method="cp-sat"`` and the plain CP-SAT script.
* batch: 32 knapsack instances in one ``map`` call with ``num_threads=1`` and with
  ``num_threads=2``: wall time, CPU time / wall time (≈ the number of busy cores),
  and the serial / parallel ratio.

Before timing, the contenders are checked to reach the same objective value.
Targets: structgrad / plain script ≤ 1.2 per call; the batch keeps 2 cores busy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

import structgrad as sg


def interleaved(fns: dict, thetas: list) -> dict:
    """Median seconds per call of each function; round r calls each one on thetas[r], order rotated."""
    names = list(fns)
    for n in names:  # warm-up
        fns[n](thetas[0])
    times = {n: [] for n in names}
    for r, th in enumerate(thetas):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            fns[n](th)
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(v) for n, v in times.items()}


def scaled_objective(theta: np.ndarray, bits: int = 30) -> list[int]:
    """round(θ · 2^(bits − k)) with max|θ| = f·2^k, f ∈ [1/2, 1): the ilp solver's scaling."""
    _, k = np.frexp(np.abs(theta).max())
    return np.rint(np.ldexp(theta, bits - k)).astype(np.int64).tolist()


def plain_cpsat(A, b, A_eq, b_eq):
    """A plain CP-SAT script: build the model, solve with one worker, read z (per call)."""
    from ortools.sat.python import cp_model

    def solve(theta: torch.Tensor) -> np.ndarray:
        th = theta.detach().double().numpy()
        m = cp_model.CpModel()
        x = [m.new_bool_var(f"x{i}") for i in range(len(th))]
        for row, rhs in zip(A, b):
            m.add(cp_model.LinearExpr.weighted_sum(x, row.tolist()) <= int(rhs))
        for row, rhs in zip(A_eq, b_eq):
            m.add(cp_model.LinearExpr.weighted_sum(x, row.tolist()) == int(rhs))
        m.maximize(cp_model.LinearExpr.weighted_sum(x, scaled_objective(th)))
        s = cp_model.CpSolver()
        s.parameters.num_workers = 1
        status = s.solve(m)
        if status != cp_model.OPTIMAL:
            raise RuntimeError(f"plain CP-SAT: {s.status_name(status)}")
        return np.array([s.boolean_value(v) for v in x], dtype=np.float64)

    return solve


def plain_cpsat_reused(A, b, A_eq, b_eq):
    """The plain script keeping its model and replacing only the objective."""
    from ortools.sat.python import cp_model

    n = A.shape[1] if A is not None and len(A) else A_eq.shape[1]
    m = cp_model.CpModel()
    x = [m.new_bool_var(f"x{i}") for i in range(n)]
    for row, rhs in zip(A, b):
        m.add(cp_model.LinearExpr.weighted_sum(x, row.tolist()) <= int(rhs))
    for row, rhs in zip(A_eq, b_eq):
        m.add(cp_model.LinearExpr.weighted_sum(x, row.tolist()) == int(rhs))
    s = cp_model.CpSolver()
    s.parameters.num_workers = 1

    def solve(theta: torch.Tensor) -> np.ndarray:
        m.maximize(cp_model.LinearExpr.weighted_sum(x, scaled_objective(theta.detach().double().numpy())))
        s.solve(m)
        return np.array(s.response_proto.solution, dtype=np.float64)

    return solve


def check_same_value(fns: dict, theta: torch.Tensor) -> None:
    vals = {k: float(np.asarray(f(theta), dtype=np.float64) @ theta.double().numpy()) for k, f in fns.items()}
    ref = next(iter(vals.values()))
    tol = 1e-6 * max(1.0, abs(ref))
    for k, v in vals.items():
        if abs(v - ref) > tol:
            raise SystemExit(f"contenders disagree: {vals}")


def report(title: str, med: dict, ref: str) -> None:
    print(f"\n{title}")
    for k, v in med.items():
        ratio = "" if k == ref else f"   {v / med[ref]:.3g}x of '{ref}'"
        print(f"  {k:<34s} {v * 1e3:9.3f} ms{ratio}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run (a few rounds, a 12x12 assignment, a small batch)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per contender (default 21; 3 with --quick)")
    p.add_argument("--batch", type=int, default=None, help="batch size of the batch run (default 32; 4 with --quick)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 21)
    batch = args.batch or (4 if args.quick else 32)
    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    print(f"ortools {__import__('ortools').__version__}, torch {torch.__version__}, cores available "
          f"{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.2f}, rounds {rounds}")

    # ---------------------------------------------------------------- knapsack
    n, m = 200, 20
    A = rng.integers(1, 101, size=(m, n))
    b = A.sum(1) // 2
    none = (np.zeros((0, n), dtype=np.int64), np.zeros(0, dtype=np.int64))
    ilp = sg.get_solver("ilp", A=A, b=b)
    fns = {
        "structgrad ilp": lambda th: ilp.map(th).numpy(),
        "plain CP-SAT script": plain_cpsat(A, b, *none),
        "plain CP-SAT, model reused": plain_cpsat_reused(A, b, *none),
    }
    thetas = [torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(rounds)]
    check_same_value(fns, thetas[0])
    med = interleaved(fns, thetas)
    report(f"knapsack n={n}, m={m} (method {ilp.method}): time per call, median of {rounds}", med, "plain CP-SAT script")

    # ---------------------------------------------------------------- assignment
    k = 12 if args.quick else 30
    rows = np.kron(np.eye(k, dtype=np.int64), np.ones((1, k), dtype=np.int64))
    cols = np.kron(np.ones((1, k), dtype=np.int64), np.eye(k, dtype=np.int64))
    A_eq = np.concatenate([rows, cols])
    b_eq = np.ones(2 * k, dtype=np.int64)
    noA = (np.zeros((0, k * k), dtype=np.int64), np.zeros(0, dtype=np.int64))
    auto = sg.get_solver("ilp", A_eq=A_eq, b_eq=b_eq)
    forced = sg.get_solver("ilp", A_eq=A_eq, b_eq=b_eq, method="cp-sat")
    fns = {
        f"structgrad ilp ({auto.method})": lambda th: auto.map(th).numpy(),
        'structgrad ilp method="cp-sat"': lambda th: forced.map(th).numpy(),
        "plain CP-SAT script": plain_cpsat(*noA, A_eq, b_eq),
    }
    thetas = [torch.randn(k * k, generator=gen, dtype=torch.float64) for _ in range(rounds)]
    check_same_value(fns, thetas[0])
    med = interleaved(fns, thetas)
    report(f"assignment {k}x{k}: time per call, median of {rounds}", med, "plain CP-SAT script")

    # ---------------------------------------------------------------- batch
    serial = sg.get_solver("ilp", A=A, b=b, num_threads=1)
    parallel = sg.get_solver("ilp", A=A, b=b, num_threads=2)
    brounds = max(1, rounds // 4)
    thetas = [torch.randn(batch, n, generator=gen, dtype=torch.float64) for _ in range(brounds)]
    if not torch.equal(serial.map(thetas[0]), parallel.map(thetas[0])):
        raise SystemExit("serial and parallel batch results differ")
    wall = {"num_threads=1": [], "num_threads=2": []}
    cpu = {"num_threads=1": [], "num_threads=2": []}
    for r, th in enumerate(thetas):
        pairs = [("num_threads=1", serial), ("num_threads=2", parallel)]
        for name, s in pairs[r % 2:] + pairs[: r % 2]:
            c0, t0 = time.process_time(), time.perf_counter()
            s.map(th)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    print(f"\nbatch of {batch} knapsack instances in one map call, median of {brounds}")
    for name in wall:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(f"  {name:<34s} wall {w * 1e3:9.1f} ms   cpu/wall {c / w:4.2f}")
    ws, wp = statistics.median(wall["num_threads=1"]), statistics.median(wall["num_threads=2"])
    print(f"  serial / parallel wall time: {ws / wp:.2f}x")


if __name__ == "__main__":
    main()
