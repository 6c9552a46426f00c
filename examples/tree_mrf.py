"""Learn a tree-structured pairwise MRF from samples: Chow–Liu structure, then maximum likelihood.

A "true" Markov random field on a random tree (N nodes, C labels, node scores and
Potts-like edge couplings) is drawn, and M exact samples are drawn from it with the
``tree`` solver.  From the samples alone:

1. **Structure** (Chow & Liu, 1968): the maximum-likelihood tree is the maximum
   spanning tree of the complete graph weighted by the empirical pairwise mutual
   information I(y_i; y_j) — computed from one-hot counts and handed to
   ``networkx.maximum_spanning_tree``.
2. **Parameters**: θ = (node (N, C), edge (E, C, C)) on the learned tree, fitted by
   minimising the mean negative log-likelihood with ``structgrad.nll`` and Adam.  The
   mean nll over the samples equals the nll at the *mean indicators* (the empirical
   node and pair frequencies: nll is linear in the gold structure), so one solver call
   per step fits all M samples; the gradient is μ(θ) − empirical moments (moment
   matching).

It reports how many true edges Chow–Liu recovered, the held-out nll of the learned
model next to the true model's, and how close the learned node marginals get to the
true ones, and plots the learning curve and learned-vs-true marginals.

Run:  python examples/tree_mrf.py            (about 10 seconds)
      python examples/tree_mrf.py --quick    (seconds)
Writes a plot to --out (default examples/out/).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import networkx as nx  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import structgrad as sg  # noqa: E402


def true_model(N: int, C: int, g: torch.Generator):
    """A random tree and its scores: node ~ N(0, 1); edge = β (C·I − 1)/(C − 1) + N(0, 0.3²),
    β ~ U(1, 2.5) with a random sign (neighbours mostly agree, or mostly differ)."""
    seed = int(torch.randint(2**31 - 1, (1,), generator=g))
    G = nx.random_labeled_tree(N, seed=seed)
    E = G.number_of_edges()
    node = torch.randn(N, C, generator=g, dtype=torch.float64)
    beta = (torch.rand(E, 1, 1, generator=g, dtype=torch.float64) * 1.5 + 1.0)
    beta = beta * torch.where(torch.rand(E, 1, 1, generator=g) < 0.8, 1.0, -1.0).double()
    potts = (C * torch.eye(C, dtype=torch.float64) - 1) / (C - 1)
    edge = beta * potts + 0.3 * torch.randn(E, C, C, generator=g, dtype=torch.float64)
    return G, (node, edge)


def draw(G, theta, M: int, g: torch.Generator) -> torch.Tensor:
    """M exact samples as labels (M, N), by top-down sampling on the tree."""
    z_node, _ = sg.get_solver("tree", graph=G).sample(theta, M, generator=g)
    return z_node.argmax(-1)


def chow_liu(labels: torch.Tensor, C: int) -> tuple[nx.Graph, torch.Tensor]:
    """The maximum spanning tree of the empirical mutual information (and the MI matrix)."""
    M, N = labels.shape
    X = torch.nn.functional.one_hot(labels, C).double()  # (M, N, C)
    p1 = X.mean(0)  # (N, C)
    p2 = torch.einsum("mia,mjb->ijab", X, X) / M  # (N, N, C, C)
    ratio = p2 / (p1[:, None, :, None] * p1[None, :, None, :]).clamp(min=1e-300)
    mi = torch.where(p2 > 0, p2 * ratio.clamp(min=1e-300).log(), torch.zeros_like(p2)).sum((-2, -1))
    K = nx.Graph()
    K.add_nodes_from(range(N))
    K.add_weighted_edges_from((i, j, float(mi[i, j])) for i in range(N) for j in range(i + 1, N))
    T = nx.maximum_spanning_tree(K, weight="weight")
    G = nx.Graph()  # a plain forest on 0..N−1, weights dropped
    G.add_nodes_from(range(N))
    G.add_edges_from(T.edges())
    return G, mi


def moments(labels: torch.Tensor, G: nx.Graph, C: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean indicators over the samples: node (N, C) and pair (E, C, C) frequencies on G's edges."""
    X = torch.nn.functional.one_hot(labels, C).double()
    u, v = torch.tensor(list(G.edges()), dtype=torch.long).reshape(-1, 2).T
    return X.mean(0), torch.einsum("mea,meb->eab", X[:, u], X[:, v]) / labels.shape[0]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small model, few samples and steps")
    ap.add_argument("--nodes", type=int, default=30)
    ap.add_argument("--labels", type=int, default=4)
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    args = ap.parse_args(argv)
    if args.quick:
        args.nodes, args.samples, args.steps = 12, 3000, 60
    torch.manual_seed(args.seed)  # nothing below draws from the global generator; belt and braces
    g = torch.Generator().manual_seed(args.seed)
    N, C = args.nodes, args.labels
    t0 = time.perf_counter()

    # 1. the true model and its samples (train and held out)
    G_true, theta_true = true_model(N, C, g)
    train = draw(G_true, theta_true, args.samples, g)
    test = draw(G_true, theta_true, args.samples // 4, g)
    true_tree = sg.get_solver("tree", graph=G_true)
    mu_true, _ = true_tree.marginals(theta_true)

    # 2. Chow–Liu structure
    G, mi = chow_liu(train, C)
    true_edges = {frozenset(e) for e in G_true.edges()}
    found = sum(frozenset(e) in true_edges for e in G.edges())
    print(f"true tree: {N} nodes, height {true_tree.plan.height} from its centre; {len(train)} training samples")
    print(f"Chow-Liu tree: {found} of {N - 1} true edges recovered")

    # 3. maximum likelihood on the learned tree: nll at the empirical moments
    tree = sg.get_solver("tree", graph=G)
    gold = moments(train, G, C)
    gold_test = moments(test, G, C)
    node = torch.zeros(N, C, dtype=torch.float64, requires_grad=True)
    edge = torch.zeros(G.number_of_edges(), C, C, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([node, edge], lr=args.lr)
    curve = {"step": [], "train nll": [], "marginal error": []}
    bar = tqdm(range(args.steps), desc="fitting tree MRF", unit="step", disable=not sys.stderr.isatty())
    for step in bar:
        opt.zero_grad()
        loss = sg.nll((node, edge), gold, tree)  # mean nll over the training samples
        loss.backward()  # node.grad = μ_node(θ) − empirical node frequencies, and likewise for edges
        opt.step()
        with torch.no_grad():
            err = float((tree.marginals((node, edge))[0] - mu_true).abs().max())
        curve["step"].append(step + 1)
        curve["train nll"].append(loss.item())
        curve["marginal error"].append(err)
        bar.set_postfix(nll=f"{loss.item():.4f}", err=f"{err:.3f}")
    bar.close()

    with torch.no_grad():
        mu_learned, _ = tree.marginals((node, edge))
        nll_learned = float(sg.nll((node, edge), gold_test, tree))
        nll_true = float(sg.nll(theta_true, moments(test, G_true, C), true_tree))
        mu_emp = gold[0]
    first, last = curve["marginal error"][0], curve["marginal error"][-1]
    emp_err = float((mu_emp - mu_true).abs().max())
    print(f"held-out nll per sample: learned {nll_learned:.4f}, true model {nll_true:.4f} (gap {nll_learned - nll_true:+.4f} nats)")
    print(f"max |learned - true| node marginal: {last:.4f} (after step 1: {first:.4f}; empirical frequencies: {emp_err:.4f})")
    print(f"time {time.perf_counter() - t0:.1f} s")

    # 4. plot: learning curve, and learned vs true node marginals
    os.makedirs(args.out, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.4))
    ax1.plot(curve["step"], curve["marginal error"], color="C0", label="max |learned − true| node marginal")
    ax1.axhline(emp_err, color="C0", ls=":", label="same, empirical frequencies")
    ax1.set_xlabel("Adam step")
    ax1.set_ylabel("max abs error of P(y_v = c) (probability)")
    ax1.set_yscale("log")
    ax1b = ax1.twinx()
    ax1b.plot(curve["step"], curve["train nll"], color="C1", label="training nll per sample")
    ax1b.axhline(nll_true, color="C1", ls=":", label="true model, held-out nll")
    ax1b.set_ylabel("nll per sample (nats)")
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = ax1b.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8)
    ax1.set_title(f"fit on the Chow–Liu tree ({found}/{N - 1} true edges)")
    ax2.scatter(mu_true.flatten(), mu_learned.flatten(), s=12, color="C2", label="learned model", zorder=3)
    ax2.scatter(mu_true.flatten(), mu_emp.flatten(), s=22, facecolors="none", edgecolors="0.5", label="empirical frequency")
    ax2.plot([0, 1], [0, 1], color="k", lw=0.8, label="y = x")
    ax2.set_xlabel("true marginal P(y_v = c)")
    ax2.set_ylabel("estimated marginal")
    ax2.set_xlim(0, 1)
    ax2.set_ylim(0, 1)
    ax2.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=8)
    ax2.set_title(f"node marginals, N = {N}, C = {C}")
    fig.tight_layout()
    path = os.path.join(args.out, "tree_mrf.png")
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")


if __name__ == "__main__":
    main()
