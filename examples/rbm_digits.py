"""Bernoulli RBM on scikit-learn's digits: structgrad (CD-1 / PCD-1 by autodiff of the free
energy) against ``sklearn.neural_network.BernoulliRBM``, compared by AIS log-likelihood.

The 8×8 digits (1797 images, bundled with scikit-learn; no download) are binarised at
half intensity and split 75 / 25.  Three RBMs with the same number of hidden units are
trained for the same number of epochs with plain SGD at the same learning rate and batch
size on the same data:

* ``sklearn``: ``BernoulliRBM.fit`` as shipped (persistent CD with one Gibbs step per
  update, batch-mean update, batches in a fixed order);
* ``structgrad PCD-1``: ``BernoulliRBM.cd_loss(v, k=1, persistent=True)`` + ``torch.optim.SGD``;
* ``structgrad CD-1``: ``cd_loss(v, k=1)``.

scikit-learn's parameters are loaded into a ``structgrad.BernoulliRBM`` (weight =
``components_.T``, visible bias = ``intercept_visible_``, hidden bias =
``intercept_hidden_``) and all three are scored by the average log-likelihood
log p(v) = −F(v) − log Z of the held-out images, with log Z from annealed importance
sampling (base model: the training pixels' log-odds), printed with its standard error.

    python examples/rbm_digits.py            # about 15 s on one CPU core
    python examples/rbm_digits.py --quick    # smoke run, seconds
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.neural_network import BernoulliRBM as SkBernoulliRBM  # noqa: E402
from tqdm import tqdm  # noqa: E402

import structgrad as sg  # noqa: E402


def load_binary_digits(seed: int, test_fraction: float = 0.25):
    d = load_digits()
    X = torch.tensor(d.data / 16.0 >= 0.5, dtype=torch.float32)  # (1797, 64) in {0, 1}
    perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * X.shape[0]))
    return X[perm[n_test:]], X[perm[:n_test]]


def train_structgrad(train, args, persistent: bool, bar) -> sg.BernoulliRBM:
    g = torch.Generator().manual_seed(args.seed)
    m = sg.BernoulliRBM(train.shape[1], args.hidden, generator=g)
    opt = torch.optim.SGD(m.parameters(), lr=args.lr)
    for _ in range(args.epochs):
        order = torch.randperm(train.shape[0], generator=g)
        for i in range(0, train.shape[0], args.batch_size):
            opt.zero_grad()
            m.cd_loss(train[order[i : i + args.batch_size]], k=1, persistent=persistent, generator=g).backward()
            opt.step()
        bar.update(1)
    return m


def train_sklearn(train, args, bar) -> sg.BernoulliRBM:
    """scikit-learn's own training loop (its fixed batch order), then its parameters in a structgrad model."""
    sk = SkBernoulliRBM(n_components=args.hidden, learning_rate=args.lr, batch_size=args.batch_size,
                        n_iter=args.epochs, random_state=args.seed)
    sk.fit(train.numpy().astype(np.float64))
    bar.update(args.epochs)
    m = sg.BernoulliRBM(train.shape[1], args.hidden)
    with torch.no_grad():
        m.weight.copy_(torch.tensor(sk.components_.T, dtype=torch.float32))
        m.visible_bias.copy_(torch.tensor(sk.intercept_visible_, dtype=torch.float32))
        m.hidden_bias.copy_(torch.tensor(sk.intercept_hidden_, dtype=torch.float32))
    return m


def mosaic(x: torch.Tensor, rows: int, cols: int) -> np.ndarray:
    img = np.full((rows * 9 - 1, cols * 9 - 1), 0.3)  # grey separators
    for i in range(min(rows * cols, x.shape[0])):
        r, c = divmod(i, cols)
        img[r * 9 : r * 9 + 8, c * 9 : c * 9 + 8] = x[i].reshape(8, 8).numpy()
    return img


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run in seconds")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--ais-chains", type=int, default=200)
    p.add_argument("--ais-betas", type=int, default=3000)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.hidden, args.epochs, args.ais_chains, args.ais_betas = 16, 2, 10, 100
    args.out.mkdir(parents=True, exist_ok=True)
    train, test = load_binary_digits(args.seed)
    if args.quick:
        train, test = train[:300], test[:100]
    print(f"digits (scikit-learn), binarised: {train.shape[0]} training / {test.shape[0]} test images of 64 pixels; "
          f"{args.hidden} hidden units, {args.epochs} epochs, SGD lr {args.lr}, batch {args.batch_size}")

    models, times = {}, {}
    with tqdm(total=3 * args.epochs, desc="training", disable=None) as bar:
        t0 = time.perf_counter()
        models["sklearn (PCD-1)"] = train_sklearn(train, args, bar)
        times["sklearn (PCD-1)"] = time.perf_counter() - t0
        for name, persistent in (("structgrad PCD-1", True), ("structgrad CD-1", False)):
            t0 = time.perf_counter()
            models[name] = train_structgrad(train, args, persistent, bar)
            times[name] = time.perf_counter() - t0

    p_bar = (train.sum(0) + 1) / (train.shape[0] + 2)
    base = torch.log(p_bar / (1 - p_bar))  # base-rate model for AIS
    base_ll = float((test @ base - torch.nn.functional.softplus(base).sum()).mean())
    print(f"\naverage held-out log-likelihood (nats per image; AIS {args.ais_chains} chains × {args.ais_betas} "
          f"temperatures); independent-pixel baseline {base_ll:.2f}")
    print(f"  {'model':18s} {'log Z':>9s} {'± se':>6s} {'test LL':>8s} {'train LL':>9s} {'train s':>8s}")
    scores = {}
    for name, m in models.items():
        est = m.ais_log_partition(num_chains=args.ais_chains, num_betas=args.ais_betas, base_visible_bias=base,
                                  generator=torch.Generator().manual_seed(args.seed))
        with torch.no_grad():
            ll_test = float(m.log_prob(test, log_z=est.log_z).mean())
            ll_train = float(m.log_prob(train, log_z=est.log_z).mean())
        scores[name] = ll_test
        print(f"  {name:18s} {float(est.log_z):9.2f} {float(est.stderr):6.3f} {ll_test:8.2f} {ll_train:9.2f} {times[name]:8.1f}")
    # AIS against the exact log Z on a model small enough to enumerate (2^16 hidden states)
    small_args = argparse.Namespace(**{**vars(args), "hidden": 16})
    with tqdm(total=args.epochs, desc="16-unit check", disable=None) as bar:
        small = train_structgrad(train, small_args, False, bar)
    exact = float(small.log_partition().detach())
    est = small.ais_log_partition(num_chains=args.ais_chains, num_betas=args.ais_betas, base_visible_bias=base,
                                  generator=torch.Generator().manual_seed(args.seed))
    print(f"  AIS check, 16 hidden units: exact log Z {exact:.3f}, AIS {float(est.log_z):.3f} ± {float(est.stderr):.3f}")
    sk_ll = scores["sklearn (PCD-1)"]
    for name in ("structgrad PCD-1", "structgrad CD-1"):
        print(f"  {name} − sklearn: {scores[name] - sk_ll:+.2f} nats per image")

    # samples: 1000 Gibbs sweeps from random images, per model
    g = torch.Generator().manual_seed(args.seed)
    start = (torch.rand(32, 64, generator=g) < 0.5).float()
    sweeps = 50 if args.quick else 1000
    fig, ax = plt.subplots(1, 4, figsize=(15, 4))
    ax[0].bar(range(len(scores)), [v - base_ll for v in scores.values()], color=["tab:gray", "tab:blue", "tab:orange"])
    ax[0].set_xticks(range(len(scores)), [n.replace(" (", "\n(").replace("d ", "d\n") for n in scores], fontsize=8)
    ax[0].set_ylabel("held-out log-likelihood gain over\nindependent pixels (AIS), nats/image")
    ax[0].set_title(f"independent pixels: {base_ll:.2f} nats/image", fontsize=9)
    for a, (name, m) in zip(ax[1:], models.items()):
        v = m.gibbs(start, sweeps, generator=g)
        a.imshow(mosaic(v, 4, 8), cmap="gray_r", vmin=0, vmax=1)
        a.set_title(f"{name}: {sweeps} Gibbs sweeps", fontsize=9)
        a.axis("off")
    fig.tight_layout()
    path = args.out / "rbm_digits.png"
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
