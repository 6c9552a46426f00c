"""Decision-focused learning of item values for a knapsack, through the ``ilp`` solver.

Each instance is a 0/1 knapsack over n items with fixed real-valued weights w_i and a
capacity of a quarter of the total weight.  The items' values are unknown: they must be
predicted from features a_i ∈ R^p, and the true values depend on them non-linearly
(the "degree" benchmark of decision-focused learning):

    v_i = (⟨b, a_i⟩/√p + 3)^deg / 3^(deg−1) + 1,  times noise U[1 − ε, 1 + ε].

A *linear* model v̂_i = ⟨W, a_i⟩ + c (misspecified for deg > 1) predicts the values;
the decision is z = MAP(v̂) = argmax {⟨z, v̂⟩ : ⟨w, z⟩ ≤ C, z ∈ {0,1}^n}, solved by
OR-Tools through ``sg.get_solver("ilp", A=w, b=C)``.  Three ways to fit the model:

* two-stage: least squares of v̂ against v (predict, then optimise);
* I-MLE: minimise the decision loss −⟨z, v⟩ / OPT with z = ``imle(v̂, ilp, ...)``
  (Gumbel noise, λ, central differences);
* blackbox differentiation (``sg.blackbox``) on the same loss.

Reported on held-out instances: the normalised regret Σ (OPT − ⟨z(v̂), v⟩) / Σ OPT,
where OPT = max ⟨z, v⟩ with the true values.

Run:  python examples/ilp_cost_learning.py            (about half a minute)
      python examples/ilp_cost_learning.py --quick    (seconds)
Writes the regret curves to --out (default examples/out/ilp_cost_learning.png).
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


def make_data(m: int, n: int, p: int, deg: int, noise: float, B: torch.Tensor, g: torch.Generator):
    """Features (m, n, p) and true values (m, n)."""
    a = torch.randn(m, n, p, generator=g, dtype=torch.float64)
    v = ((a @ B) / p**0.5 + 3.0) ** deg / 3.0 ** (deg - 1) + 1.0
    v = v * (1.0 - noise + 2.0 * noise * torch.rand(m, n, generator=g, dtype=torch.float64))
    return a, v


class Linear(torch.nn.Module):
    """v̂_i = ⟨W, a_i⟩ + c, the same for every item."""

    def __init__(self, p: int):
        super().__init__()
        self.lin = torch.nn.Linear(p, 1, dtype=torch.float64)

    def forward(self, a: torch.Tensor) -> torch.Tensor:  # (m, n, p) -> (m, n)
        return self.lin(a).squeeze(-1)


def regret(model: Linear, a: torch.Tensor, v: torch.Tensor, opt: torch.Tensor, ilp) -> float:
    with torch.no_grad():
        z = ilp.map(model(a))
    return float((opt - (z * v).sum(-1)).sum() / opt.sum())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small data, 2 epochs")
    ap.add_argument("--items", type=int, default=20)
    ap.add_argument("--features", type=int, default=5)
    ap.add_argument("--deg", type=int, default=4, help="degree of the true value function (1 = linear)")
    ap.add_argument("--noise", type=float, default=0.2, help="ε of the multiplicative noise on the values")
    ap.add_argument("--capacity", type=float, default=0.25, help="capacity as a fraction of the total weight")
    ap.add_argument("--train", type=int, default=200)
    ap.add_argument("--test", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--lam", type=float, default=5.0, help="λ of I-MLE and blackbox (loss gradients are ~v/OPT)")
    ap.add_argument("--tau", type=float, default=0.5, help="I-MLE's noise temperature")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    args = ap.parse_args(argv)
    if args.quick:
        args.train, args.test, args.epochs, args.items = 20, 20, 2, 8
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(args.seed)
    n, p = args.items, args.features
    # real-valued weights in [1, 10) with two decimals; the capacity a fraction of their total
    weights = torch.round((1.0 + 9.0 * torch.rand(n, generator=g, dtype=torch.float64)) * 100) / 100
    capacity = round(float(weights.sum()) * args.capacity, 2)
    ilp = sg.get_solver("ilp", A=weights.unsqueeze(0), b=[capacity])
    B = torch.randn(p, generator=g, dtype=torch.float64)
    train = make_data(args.train, n, p, args.deg, args.noise, B, g)
    test = make_data(args.test, n, p, args.deg, args.noise, B, g)
    opt_train = (ilp.map(train[1]) * train[1]).sum(-1)
    opt_test = (ilp.map(test[1]) * test[1]).sum(-1)

    # two-stage: least squares on (features, 1) -> value, then solve
    two_stage = Linear(p)
    X = torch.cat([train[0].reshape(-1, p), torch.ones(args.train * n, 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(X, train[1].reshape(-1, 1)).solution
    with torch.no_grad():
        two_stage.lin.weight.copy_(sol[:p].t())
        two_stage.lin.bias.copy_(sol[p])
    regret_two_stage = regret(two_stage, test[0], test[1], opt_test, ilp)

    steps = (args.train + args.batch - 1) // args.batch
    curves, final = {}, {}
    bar = tqdm(total=2 * args.epochs * steps, desc="knapsack", unit="batch", disable=not sys.stderr.isatty())
    t0 = time.perf_counter()
    for method in ("imle", "blackbox"):
        torch.manual_seed(args.seed)
        model = Linear(p)
        optim = torch.optim.Adam(model.parameters(), lr=args.lr)
        gm = torch.Generator().manual_seed(args.seed + 1)
        curve = {"epoch": [0], "regret": [regret(model, test[0], test[1], opt_test, ilp)]}
        for epoch in range(args.epochs):
            perm = torch.randperm(args.train, generator=gm)
            for i in range(0, args.train, args.batch):
                idx = perm[i : i + args.batch]
                vhat = model(train[0][idx])
                if method == "imle":
                    z = sg.imle(vhat, ilp, lam=args.lam, noise_temperature=args.tau, two_sided=True, generator=gm)[0]
                else:
                    z = sg.blackbox(vhat, ilp, lam=args.lam)
                # decision loss: the value the decision leaves on the table, per unit of optimum
                loss = (-(z * train[1][idx]).sum(-1) / opt_train[idx]).sum()
                optim.zero_grad()
                loss.backward()
                optim.step()
                bar.update(1)
                bar.set_postfix(method=method, value=f"{-loss.item() / len(idx):.3f}")
            curve["epoch"].append(epoch + 1)
            curve["regret"].append(regret(model, test[0], test[1], opt_test, ilp))
        curves[method] = curve
        final[method] = curve["regret"][-1]
    bar.close()
    elapsed = time.perf_counter() - t0

    os.makedirs(args.out, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.4))
    labels = {"imle": "I-MLE (Gumbel, central)", "blackbox": "blackbox differentiation"}
    for method, c in curves.items():
        ax.plot(c["epoch"], [100 * r for r in c["regret"]], "o-", ms=3, label=labels[method])
    ax.axhline(100 * regret_two_stage, color="k", ls="--", label="two-stage (least squares, then solve)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("normalised regret on held-out instances (%, log scale)")
    ax.set_title(f"knapsack, n = {n} items with real-valued weights, true values of degree {args.deg}", fontsize=9)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path = os.path.join(args.out, "ilp_cost_learning.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)

    print(f"{'method':<40} {'normalised regret':>18}")
    print(f"{'two-stage (least squares, then solve)':<40} {100 * regret_two_stage:>17.2f}%")
    for method, r in final.items():
        print(f"{labels[method]:<40} {100 * r:>17.2f}%")
    print(f"trained 2 x {args.epochs} epochs on {args.train} instances in {elapsed:.1f}s; plot: {path}")
    return {"two_stage": regret_two_stage, **final, "seconds": elapsed}


if __name__ == "__main__":
    main()
