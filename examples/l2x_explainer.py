"""Learning to explain (L2X) with I-MLE over k-subsets, on a planted-signal task.

A sequence of T tokens gets a score y; only k of its tokens carry the signal.  The
data are generated here: a vocabulary of V token types, each with a fixed random
feature vector x_v ∈ R^d; the first V_s types are *signal* tokens with a value
⟨u, x_v⟩, the others are distractors.  Each sequence has exactly k signal tokens at
random positions, the rest drawn from the distractors, and

    y = (1/k) Σ_{signal positions t} ⟨u, x_t⟩.

The explainer scores every position, θ_t = f(x_t) (an MLP), selects k positions
z ∈ {0,1}^T, Σz = k, with the ``ksubset`` solver, and the predictor sees only the
selected tokens: ŷ = g((1/k) Σ_t z_t x_t) (another MLP).  Training minimises the
MSE of ŷ, so the selection must be learnt through the discrete choice.  Three
estimators are compared, each with S = 1 sample per sequence:

* I-MLE (``structgrad.imle``, Gumbel noise at τ = 0.5, central differences,
  λ = 100 for the batch-mean loss: measured better than one-sided differences and
  τ = 1 on this task, see the closing notes);
* exact-marginal straight-through (SIMPLE, ``structgrad.marginal_straight_through``):
  exact samples, gradient through the exact marginals;
* straight-through with perturb-and-MAP (``structgrad.straight_through``).

Reported on held-out sequences, with the MAP selection (no noise): the subset
precision (share of selected positions that are planted signal positions) and the
MSE; for reference, the MSE of the oracle selection and of a random one.

Run:  python examples/l2x_explainer.py            (about 40 seconds)
      python examples/l2x_explainer.py --quick    (seconds)
Writes learning curves to --out (default examples/out/l2x_explainer.png).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import structgrad as sg  # noqa: E402


def make_data(n: int, T: int, k: int, feats: torch.Tensor, u: torch.Tensor, num_signal: int, g: torch.Generator):
    """Token ids (n, T), planted mask (n, T) with k ones, targets y (n,)."""
    V = feats.shape[0]
    tokens = torch.randint(num_signal, V, (n, T), generator=g)
    pos = torch.rand(n, T, generator=g).argsort(-1)[:, :k]
    planted = torch.zeros(n, T).scatter_(1, pos, 1.0)
    signal = torch.randint(0, num_signal, (n, k), generator=g)
    tokens.scatter_(1, pos, signal)
    values = feats @ u  # (V,)
    y = values[signal].mean(-1)
    return tokens, planted, y


class Explainer(torch.nn.Module):
    """θ_t = f(x_t): a score per position from the token's features."""

    def __init__(self, d: int, h: int = 32):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(d, h), torch.nn.ReLU(), torch.nn.Linear(h, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T)
        return self.net(x).squeeze(-1)


class Predictor(torch.nn.Module):
    """ŷ = g(mean of the selected tokens' features)."""

    def __init__(self, d: int, k: int, h: int = 32):
        super().__init__()
        self.k = k
        self.net = torch.nn.Sequential(torch.nn.Linear(d, h), torch.nn.ReLU(), torch.nn.Linear(h, 1))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # z (..., B, T), x (B, T, d)
        bag = (z.unsqueeze(-1) * x).sum(-2) / self.k
        return self.net(bag).squeeze(-1)


def select(method: str, theta: torch.Tensor, solver, args, g: torch.Generator) -> torch.Tensor:
    """(1, B, T) selections with the method's gradient."""
    if method == "imle":
        return sg.imle(theta, solver, lam=args.lam, samples=1, noise_temperature=args.tau,
                       two_sided=args.two_sided, generator=g)
    if method == "simple":
        return sg.marginal_straight_through(theta, solver, samples=1, generator=g)
    return sg.straight_through(theta, solver, samples=1, generator=g)


LABELS = {"imle": "I-MLE (Gumbel)", "simple": "exact-marginal ST (SIMPLE)", "st": "straight-through (P&M)"}


def evaluate(expl, pred, feats, data, solver):
    tokens, planted, y = data
    x = feats[tokens]
    with torch.no_grad():
        z = solver.map(expl(x))
        mse = float(((pred(z, x) - y) ** 2).mean())
        precision = float((z * planted).sum() / z.sum())
    return mse, precision


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small data, 2 epochs")
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--T", type=int, default=20, help="tokens per sequence")
    ap.add_argument("--k", type=int, default=3, help="signal tokens per sequence (= the subset size)")
    ap.add_argument("--vocab", type=int, default=100)
    ap.add_argument("--signal-vocab", type=int, default=20)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--lam", type=float, default=100.0,
                    help="I-MLE's λ (on the scale of the batch-mean loss's gradient, so about B times a per-sequence λ)")
    ap.add_argument("--tau", type=float, default=0.5, help="I-MLE's noise temperature")
    ap.add_argument("--one-sided", dest="two_sided", action="store_false",
                    help="I-MLE with one-sided differences (default: central)")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    args = ap.parse_args(argv)
    if args.quick:
        args.train, args.test, args.epochs = 300, 200, 2
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(args.seed)
    feats = torch.randn(args.vocab, args.dim, generator=g)
    u = torch.randn(args.dim, generator=g) / args.dim**0.5
    train = make_data(args.train, args.T, args.k, feats, u, args.signal_vocab, g)
    test = make_data(args.test, args.T, args.k, feats, u, args.signal_vocab, g)
    solver = sg.get_solver("ksubset", k=args.k)

    # references: the oracle selection (the planted positions) and a random one, each with its
    # own predictor trained on the selected bags (least squares on the bag features is enough)
    def fixed_selection_mse(sel_train, sel_test):
        Xtr = torch.cat([(sel_train.unsqueeze(-1) * feats[train[0]]).sum(1) / args.k, torch.ones(args.train, 1)], 1)
        Xte = torch.cat([(sel_test.unsqueeze(-1) * feats[test[0]]).sum(1) / args.k, torch.ones(args.test, 1)], 1)
        w = torch.linalg.lstsq(Xtr, train[2].unsqueeze(1)).solution
        return float(((Xte @ w).squeeze(1) - test[2]).pow(2).mean())

    rand_sel = lambda n: solver.map(torch.rand(n, args.T, generator=g))  # noqa: E731
    mse_oracle = fixed_selection_mse(train[1], test[1])
    mse_random = fixed_selection_mse(rand_sel(args.train), rand_sel(args.test))

    steps_per_epoch = (args.train + args.batch - 1) // args.batch
    curves, results = {}, {}
    bar = tqdm(total=3 * args.epochs * steps_per_epoch, desc="L2X", unit="batch", disable=not sys.stderr.isatty())
    t0 = time.perf_counter()
    for method in ("imle", "simple", "st"):
        torch.manual_seed(args.seed)
        expl, pred = Explainer(args.dim), Predictor(args.dim, args.k)
        opt = torch.optim.Adam(list(expl.parameters()) + list(pred.parameters()), lr=args.lr)
        gm = torch.Generator().manual_seed(args.seed + 1)
        curve = {"epoch": [0], "mse": [], "precision": []}
        m, p = evaluate(expl, pred, feats, test, solver)
        curve["mse"].append(m)
        curve["precision"].append(p)
        for epoch in range(args.epochs):
            perm = torch.randperm(args.train, generator=gm)
            for i in range(0, args.train, args.batch):
                idx = perm[i : i + args.batch]
                x = feats[train[0][idx]]
                z = select(method, expl(x), solver, args, gm)  # (1, B, T)
                # sum over the sample dimension (S = 1), mean over the batch
                loss = ((pred(z, x) - train[2][idx]) ** 2).sum(0).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                bar.update(1)
                bar.set_postfix(method=method, loss=f"{loss.item():.3f}")
            m, p = evaluate(expl, pred, feats, test, solver)
            curve["epoch"].append(epoch + 1)
            curve["mse"].append(m)
            curve["precision"].append(p)
        curves[method] = curve
        results[method] = {"precision": curve["precision"][-1], "mse": curve["mse"][-1]}
    bar.close()
    elapsed = time.perf_counter() - t0

    os.makedirs(args.out, exist_ok=True)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.4))
    for method, c in curves.items():
        a1.plot(c["epoch"], c["precision"], "o-", ms=3, label=LABELS[method])
        a2.plot(c["epoch"], c["mse"], "o-", ms=3, label=LABELS[method])
    a1.axhline(args.k / args.T, color="gray", ls=":", label="random selection")
    a1.set_xlabel("epoch")
    a1.set_ylabel("subset precision (held-out, MAP selection)")
    a1.set_ylim(0, 1.02)
    a2.axhline(mse_oracle, color="k", ls="--", lw=2, label="oracle selection + least squares")
    a2.axhline(mse_random, color="gray", ls=":", label="random selection + least squares")
    a2.set_ylim(0, 1.1 * max(mse_random, max(max(c["mse"]) for c in curves.values())))
    a2.set_xlabel("epoch")
    a2.set_ylabel("MSE of the score (held-out, MAP selection)")
    for a in (a1, a2):
        a.grid(alpha=0.3)
    handles, labels = a2.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"L2X on a planted-signal task: T = {args.T} tokens, k = {args.k} signal tokens", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path = os.path.join(args.out, "l2x_explainer.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)

    print(f"{'method':<30} {'subset precision':>17} {'test MSE':>10}")
    for method, r in results.items():
        print(f"{LABELS[method]:<30} {r['precision']:>17.3f} {r['mse']:>10.4f}")
    print(f"{'oracle selection':<30} {1.0:>17.3f} {mse_oracle:>10.4f}")
    print(f"{'random selection':<30} {args.k / args.T:>17.3f} {mse_random:>10.4f}")
    print(f"trained 3 x {args.epochs} epochs on {args.train} sequences in {elapsed:.1f}s; plot: {path}")
    return {"results": results, "mse_oracle": mse_oracle, "mse_random": mse_random, "seconds": elapsed}


if __name__ == "__main__":
    main()
