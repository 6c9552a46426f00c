"""Two-view contrastive learning on scikit-learn's digits: DPM (NUCLR) against InfoNCE.

Each 8×8 digit is cut into two views, the top half x and the bottom half y (32 pixels
each).  Two small MLP encoders map them to the unit sphere and sim[i, j] = <f(x_i), g(y_j)>.
They are trained with

* ``InfoNCE``: the CLIP loss, symmetric cross-entropy of sim/τ against the diagonal;
* ``SogCLR``: :class:`structgrad.DPMLoss` with ζ = 0 and no offset (ξ = inf);
* ``DPM``:    :class:`structgrad.DPMLoss`, learnable ζ and offset (the NUCLR algorithm),

over several seeds, with the same encoders, optimiser, batches and temperature.  Batches
of ``--batch-size`` are drawn without replacement each epoch and the last, shorter batch
is kept (DPMLoss takes any B).  Reported on the held-out pairs: cross-view retrieval R@1
(top → bottom and bottom → top, among all test pairs) and the accuracy of a linear probe
(logistic regression) on the frozen top-half features.  Everything runs on the CPU in
seconds to a minute; the data set ships with scikit-learn (no download).

    python examples/dpm_digits.py                 # 3 seeds, 30 epochs
    python examples/dpm_digits.py --quick         # smoke run
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from tqdm import tqdm  # noqa: E402

import structgrad as sg  # noqa: E402

METHODS = ("InfoNCE", "SogCLR", "DPM")


def load_views(test_size: float = 0.25):
    """Top and bottom halves of the digits, scaled to [0, 1], split into train/test."""
    d = load_digits()
    img = torch.tensor(d.images / 16.0, dtype=torch.float32)  # (1797, 8, 8)
    top, bottom = img[:, :4].reshape(len(img), -1), img[:, 4:].reshape(len(img), -1)
    idx_tr, idx_te = train_test_split(np.arange(len(img)), test_size=test_size, random_state=0, stratify=d.target)
    tr, te = torch.tensor(idx_tr), torch.tensor(idx_te)
    y = torch.tensor(d.target)
    return (top[tr], bottom[tr], y[tr]), (top[te], bottom[te], y[te])


class Encoder(torch.nn.Module):
    def __init__(self, d_in: int, d_out: int, hidden: int):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(d_in, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, d_out)
        )

    def forward(self, x):
        return F.normalize(self.net(x), dim=-1)


def info_nce(sim: torch.Tensor, tau: float) -> torch.Tensor:
    """CLIP loss: symmetric cross-entropy of sim/τ against the matching pairs."""
    labels = torch.arange(sim.shape[0], device=sim.device)
    logits = sim / tau
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


@torch.no_grad()
def evaluate(fx, gy, train, test):
    """R@1 both ways among the test pairs, and a linear probe on the top-half features."""
    xt, yt, lt = test
    zx, zy = fx(xt), gy(yt)
    sim = zx @ zy.T
    target = torch.arange(len(xt))
    r1_xy = (sim.argmax(1) == target).float().mean().item()
    r1_yx = (sim.argmax(0) == target).float().mean().item()
    probe = LogisticRegression(max_iter=2000)
    probe.fit(fx(train[0]).numpy(), train[2].numpy())
    acc = probe.score(zx.numpy(), lt.numpy())
    return r1_xy, r1_yx, acc


def train_one(method, seed, train, test, args, bar):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y, _ = train
    n = len(x)
    fx, gy = Encoder(x.shape[1], args.dim, args.hidden), Encoder(y.shape[1], args.dim, args.hidden)
    opt = torch.optim.Adam(list(fx.parameters()) + list(gy.parameters()), lr=args.lr)
    crit = None
    if method == "DPM":
        crit = sg.DPMLoss(n, tau=args.tau, gamma=args.gamma, xi=0.0, zeta=0.0, zeta_lr=args.zeta_lr,
                          zeta_momentum=0.9, zeta_start_step=args.zeta_start_epoch * math.ceil(n / args.batch_size))
    elif method == "SogCLR":
        crit = sg.DPMLoss(n, tau=args.tau, gamma=args.gamma, xi=math.inf, zeta=0.0, zeta_lr=0.0)
    curve, objective = [], []
    for epoch in range(args.epochs):
        perm = torch.randperm(n, generator=gen)
        obj = []
        for start in range(0, n, args.batch_size):
            idx = perm[start : start + args.batch_size]  # the last batch is shorter: fine
            if len(idx) < 2:
                continue
            sim = fx(x[idx]) @ gy(y[idx]).T
            if crit is None:
                loss = info_nce(sim, args.tau)
                obj.append(loss.item())
            else:
                out = crit(sim, idx)
                loss = out.surrogate  # its gradient is the seed's Ĝ_w; its value is no objective
                obj.append(out.objective.item())
            opt.zero_grad()
            loss.backward()
            opt.step()
        if crit is not None:
            crit.update_xi()
        objective.append(float(np.mean(obj)))
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            curve.append((epoch + 1, *evaluate(fx, gy, train, test)))
        bar.update(1)
        bar.set_postfix(method=method, seed=seed, R1=f"{curve[-1][1]:.3f}" if curve else "-")
    zeta = None if crit is None else (crit.zeta_y.mean().item(), crit.zeta_y.std().item(), crit.xi_y.item())
    return {"curve": curve, "objective": objective, "final": curve[-1][1:], "zeta": zeta}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 2 epochs")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"), help="folder for the plot")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--tau", type=float, default=0.1)
    p.add_argument("--gamma", type=float, default=0.8)
    p.add_argument("--zeta-lr", type=float, default=0.002)
    p.add_argument("--zeta-start-epoch", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--eval-every", type=int, default=5)
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.eval_every = 1, 2, 2
    torch.set_num_threads(1)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    train, test = load_views()
    print(f"digits: {len(train[0])} training pairs, {len(test[0])} test pairs (top half -> bottom half), "
          f"batch {args.batch_size}, tau {args.tau}, {args.epochs} epochs, {args.seeds} seeds")
    results = {m: [] for m in METHODS}
    t0 = time.perf_counter()
    with tqdm(total=len(METHODS) * args.seeds * args.epochs, desc="training", leave=False, disable=None) as bar:
        for seed in range(args.seeds):
            for m in METHODS:
                results[m].append(train_one(m, seed, train, test, args, bar))
    elapsed = time.perf_counter() - t0

    print(f"\n{'method':<8} {'R@1 top->bottom':>17} {'R@1 bottom->top':>17} {'linear probe acc':>17}")
    for m in METHODS:
        f = np.array([r["final"] for r in results[m]])
        cells = [f"{f[:, k].mean():.3f} ± {f[:, k].std():.3f}" for k in range(3)]
        print(f"{m:<8} {cells[0]:>17} {cells[1]:>17} {cells[2]:>17}")
    z = np.array([r["zeta"] for r in results["DPM"]])
    print(f"DPM zeta of the bottom halves after training: mean {z[:, 0].mean():.3f}, std {z[:, 1].mean():.3f}, "
          f"xi {z[:, 2].mean():.3f}")
    print(f"({elapsed:.1f} s; mean ± std over {args.seeds} seed(s))")

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for m in METHODS:
        c = np.array([r["curve"] for r in results[m]])  # (seeds, points, 4)
        ax[0].plot(c[0, :, 0], c[:, :, 1].mean(0), marker="o", label=m)
        obj = np.array([r["objective"] for r in results[m]]).mean(0)
        ax[1].plot(np.arange(1, len(obj) + 1), obj, label=m)
    ax[0].set(xlabel="epoch", ylabel="test R@1 (top -> bottom)", title="retrieval")
    ax[1].set(xlabel="epoch", ylabel="each method's own objective",
              title="InfoNCE loss; DPMLoss objective estimate (drops as ξ rises)")
    finals = np.array([[r["final"] for r in results[m]] for m in METHODS])  # (methods, seeds, 3)
    w = 0.25
    for k, name in enumerate(("R@1 top->bottom", "R@1 bottom->top", "linear probe")):
        ax[2].bar(np.arange(len(METHODS)) + (k - 1) * w, finals[:, :, k].mean(1), w,
                  yerr=finals[:, :, k].std(1), label=name)
    ax[2].set_xticks(np.arange(len(METHODS)), METHODS)
    ax[2].set(ylim=(0, 1), title=f"test metrics ({args.seeds} seeds)")
    for a in ax:
        a.legend()
    fig.tight_layout()
    path = out_dir / "dpm_digits.png"
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
