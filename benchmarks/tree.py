"""Tree-structured MRFs: structgrad's ``tree`` solver against pgmpy 1.1.2's belief propagation.

Run:  python benchmarks/tree.py                  (full: about 2 minutes, pgmpy is slow)
      python benchmarks/tree.py --quick          (smoke run, seconds)
      python benchmarks/tree.py --device cuda    (the structgrad-alone table on the GPU)
      python benchmarks/tree.py --alone-only     (structgrad alone; no peer needed)

Peer (its own dependencies are many; what benchmarks/tree.py needs, without
replacing torch): ``pip install --no-deps pgmpy==1.1.2 scikit-base opt_einsum
statsmodels patsy`` plus numpy, scipy, pandas, scikit-learn, networkx, joblib,
pyparsing and tqdm (already there with structgrad's ``test`` extra).

What is timed (torch at 1 thread, all contenders in one process, calls interleaved
round by round with the order rotated, medians):

* ``all-node marginals``: a random labelled tree (``networkx.random_labeled_tree``)
  with N = 200 nodes and C = 5 labels, random Gaussian node and edge scores, one
  instance, float64.  structgrad, with each backend (``torch``: level-by-level tensor
  ops; ``numba``: compiled node-by-node loops, single-threaded): ``tree.marginals(θ)``
  (node and edge marginals, one upward and one downward pass), and
  ``log_partition(θ).backward()`` (the gradient is the marginals).  pgmpy: ``BeliefPropagation.calibrate()`` on the
  equivalent ``DiscreteMarkovNetwork`` (factors exp(node), exp(edge)), then each node's
  marginal read off a calibrated clique belief; and
  ``BeliefPropagationWithMessagePassing.query(all nodes)`` on the equivalent
  ``FactorGraph`` (a recursive query per variable).  pgmpy's one-off construction of
  its junction tree (``BeliefPropagation(model)``) is not timed, as structgrad's
  ``get_solver("tree", graph=G)`` is not.
* structgrad alone: N = 1000, C = 8, B = 16 instances of a random tree, float32 θ:
  ``marginals``, ``log_partition`` forward + backward, ``map``, ``sample`` (16 draws),
  for each backend on the CPU (the torch backend only on CUDA).

Before timing, every pgmpy marginal is checked against structgrad's (max abs
difference ≤ 1e-9).  Rows follow :mod:`benchmarks._common` (ratio = peer ÷ structgrad).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import networkx as nx  # noqa: E402

import structgrad as sg  # noqa: E402
from benchmarks._common import fmt_ms, interleaved, machine, markdown, row, setup  # noqa: E402


def _peer():
    """pgmpy's classes (its import emits FutureWarnings: silenced here)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from pgmpy.factors.discrete import DiscreteFactor
            from pgmpy.inference import BeliefPropagation, BeliefPropagationWithMessagePassing
            from pgmpy.models import DiscreteMarkovNetwork, FactorGraph
    except ImportError as e:  # pragma: no cover - a clear message for a missing peer
        raise SystemExit(
            f"missing peer ({e}); install: pip install --no-deps pgmpy==1.1.2 scikit-base opt_einsum statsmodels patsy"
        ) from e
    return DiscreteFactor, BeliefPropagation, BeliefPropagationWithMessagePassing, DiscreteMarkovNetwork, FactorGraph


def problem(N: int, C: int, B: int, seed: int, dtype=torch.float64):
    """A random labelled tree and Gaussian scores: (G, (node (B, N, C), edge (B, N−1, C, C)))."""
    G = nx.random_labeled_tree(N, seed=seed)
    g = torch.Generator().manual_seed(seed)
    node = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    edge = torch.randn(B, N - 1, C, C, generator=g, dtype=torch.float64)
    return G, (node.to(dtype), edge.to(dtype))


def pgmpy_contenders(G, theta):
    """pgmpy's two ways to all node marginals, as callables returning (N, C) arrays."""
    DiscreteFactor, BP, BPMP, MarkovNetwork, FactorGraph = _peer()
    node, edge = (t[0].numpy() for t in theta)
    N, C = node.shape
    names = [f"x{i}" for i in range(N)]
    edges = list(G.edges())
    factors = [DiscreteFactor([names[v]], [C], np.exp(node[v])) for v in range(N)]
    factors += [DiscreteFactor([names[u], names[v]], [C, C], np.exp(edge[e])) for e, (u, v) in enumerate(edges)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mn = MarkovNetwork()
        mn.add_nodes_from(names)
        mn.add_edges_from([(names[u], names[v]) for u, v in edges])
        mn.add_factors(*factors)
        bp = BP(mn)  # builds the junction tree once (not timed)
        fg = FactorGraph()
        fg.add_nodes_from(names)
        fg.add_factors(*factors)
        fg.add_edges_from([(v, f) for f in factors for v in f.variables])
        bpmp = BPMP(fg)

    def calibrate():
        bp.calibrate()
        out = np.empty((N, C))
        done = set()
        for clique, belief in bp.get_clique_beliefs().items():
            for var in clique:
                if var not in done:
                    f = belief.marginalize([w for w in clique if w != var], inplace=False)
                    f.normalize()
                    out[int(var[1:])] = f.values
                    done.add(var)
        return out

    def message_passing():
        res = bpmp.query(names)
        out = np.empty((N, C))
        for var, f in res.items():
            out[int(var[1:])] = f.values / f.values.sum()
        return out

    return {"pgmpy BeliefPropagation.calibrate": calibrate, "pgmpy BeliefPropagationWithMessagePassing.query": message_passing}


def run(quick: bool = False, rounds: int = 7) -> list[dict]:
    """The suite's entry point: all-node marginals against pgmpy; checks agreement, times, returns rows."""
    N, C = (12, 3) if quick else (200, 5)
    G, theta = problem(N, C, 1, seed=0)
    trees = {b: sg.get_solver("tree", graph=G, backend=b) for b in ("torch", "numba")}
    peers = pgmpy_contenders(G, theta)
    n = theta[0].clone().requires_grad_()
    ours = {}
    for b, tree in trees.items():
        mu = tree.marginals(theta)[0][0].numpy()
        for name, f in peers.items():
            err = float(np.abs(f() - mu).max())
            if err > 1e-9:
                raise RuntimeError(f"tree benchmark: {name} disagrees with structgrad ({b}): max abs difference {err:.3g}")
        ours[f"marginals ({b})"] = lambda tree=tree: tree.marginals(theta)
        ours[f"log_partition+backward ({b})"] = lambda tree=tree: tree.log_partition((n, theta[1])).sum().backward()
    med = interleaved({**ours, **peers}, 3 if quick else rounds, warmup=1, budget=1.0 if quick else 120.0)
    case = f"all-node marginals, random tree N={N} (height {trees['torch'].plan.height}), C={C}"
    rows = []
    for ours_name in ours:
        for peer_name in peers:
            rows.append(row("tree", case, ours_name, med[ours_name], peer_name, med[peer_name]))
    return rows


def alone(quick: bool = False, device: str = "cpu", rounds: int = 15, size: tuple[int, int, int] = (1000, 8, 16)) -> list[dict]:
    """structgrad alone on N = 1000, C = 8, B = 16 (or ``size`` = (N, C, B)), float32 θ:
    rows {case, op, ms}."""
    N, C, B = (30, 4, 4) if quick else size
    G, (node, edge) = problem(N, C, B, seed=1, dtype=torch.float32)
    node, edge = node.to(device), edge.to(device)
    n = node.clone().requires_grad_()
    gen = torch.Generator(device=device).manual_seed(0)
    fns, cases = {}, {}
    for b in ("torch",) if device == "cuda" else ("torch", "numba"):
        tree = sg.get_solver("tree", graph=G, backend=b)
        cases[b] = f"random tree N={N} (height {tree.plan.height}), C={C}, B={B}, float32, {device}, backend {b}"
        fns[(b, "marginals")] = lambda tree=tree: tree.marginals((node, edge))
        fns[(b, "log_partition forward+backward")] = lambda tree=tree: tree.log_partition((n, edge)).sum().backward()
        fns[(b, "log_partition forward")] = lambda tree=tree: tree.log_partition((node, edge))
        fns[(b, "map")] = lambda tree=tree: tree.map((node, edge))
        fns[(b, "sample (16 draws)")] = lambda tree=tree: tree.sample((node, edge), 16, generator=gen)
    setup(device)
    med = interleaved(fns, 3 if quick else rounds, warmup=2, budget=1.0 if quick else 60.0)
    return [{"case": cases[b], "op": op, "ms": 1e3 * s} for (b, op), s in med.items()]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 2 rounds (smoke run)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device of the structgrad-alone table")
    ap.add_argument("--alone-only", action="store_true", help="only the structgrad-alone table (no peer needed)")
    ap.add_argument("--size", type=int, nargs=3, default=(1000, 8, 16), metavar=("N", "C", "B"), help="of the structgrad-alone table")
    args = ap.parse_args(argv)
    setup("cpu")
    print(f"Measured {machine(args.device)}{' (quick smoke run: not figures to quote)' if args.quick else ''}.\n")
    if not args.alone_only:
        print(markdown(run(args.quick)) + "\n")
    lines = ["| structgrad alone | operation | time |", "| --- | --- | --- |"]
    lines += [f"| {r['case']} | {r['op']} | {fmt_ms(r['ms'])} |" for r in alone(args.quick, args.device, size=tuple(args.size))]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
