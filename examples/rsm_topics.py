"""Replicated Softmax topic model on Reuters, trained by CD through autodiff of the free energy.

Data: the 395 Reuters news stories (counts over a 4258-word vocabulary) that ship inside
the ``lda`` package (``lda.datasets.load_reuters``), so nothing is downloaded.  40 stories
are held out; documents have 36 to 541 words (median ≈ 220), which is what makes the
RSM's hidden bias stiff (it enters the energy as D·h·a).

Two parts:

1. **The stiff hidden bias (seed 002), measured.**  A small RSM (``--study-hidden``, 10
   units by default, so the exact held-out perplexity is computed by enumerating the 2^10
   hidden states) is trained by CD-1 with the exact autodiff gradient and

   * SGD, one learning rate for everything;
   * SGD, the hidden bias with its own learning rate η / mean(D);
   * SGD, the hidden bias frozen at 0;
   * Adam;
   * SGD on the asker's "working" energy F̃(v) = −v·b − B Σ softplus(a/B + vW), literally,
     at two batch sizes (an RSM without the D factor, hidden bias c = a/B).

   It prints the held-out perplexity per scheme, the number of stuck hidden units (off,
   or on, for every held-out document) and the range of the hidden-bias input s(D)·a.
   Then it checks both AIS paths against the exact log Z_D of the Adam model: annealing
   the document length (the default) and annealing the temperature (Salakhutdinov &
   Murray's path, which misses the dominant topic of long documents).

2. **A bigger RSM** (``--hidden``, 50 units) trained with Adam; its held-out perplexity is
   estimated with AIS over the document length (one run covers every test length) and
   compared with a unigram model; the top words of the strongest hidden units are printed.

    python examples/rsm_topics.py            # about 90 s on one CPU core
    python examples/rsm_topics.py --quick    # smoke run, seconds
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

import lda.datasets  # noqa: E402

import structgrad as sg  # noqa: E402


def load_reuters(num_test: int, seed: int):
    """Counts (float32), vocabulary, and a fixed train/test split."""
    X = torch.tensor(lda.datasets.load_reuters(), dtype=torch.float32)
    vocab = list(lda.datasets.load_reuters_vocab())
    perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(seed))
    return X[perm[num_test:]], X[perm[:num_test]], vocab


def unigram_log_probs(train: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Add-α smoothed log word frequencies of the training documents."""
    counts = train.sum(0)
    return torch.log((counts + alpha) / (counts.sum() + alpha * train.shape[1]))


def unigram_perplexity(log_p: torch.Tensor, docs: torch.Tensor) -> float:
    """exp(−(1/N) Σ_n log p(V_n) / D_n), the RSM paper's per-document average."""
    return math.exp(-float(((docs @ log_p) / docs.sum(-1)).mean()))


def stuck_units(model: sg.ReplicatedSoftmax, docs: torch.Tensor) -> int:
    """Hidden units that carry nothing: p(h_j = 1 | v) < 0.01 on every document, or > 0.99 on every one."""
    with torch.no_grad():
        p = model.hidden_marginals(docs)
    return int(((p < 0.01).all(0) | (p > 0.99).all(0)).sum())


def make_rsm(K: int, F_: int, log_p: torch.Tensor, seed: int, scale_hidden_bias: bool = True) -> sg.ReplicatedSoftmax:
    m = sg.ReplicatedSoftmax(K, F_, scale_hidden_bias=scale_hidden_bias, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        m.visible_bias.copy_(log_p)  # start at the unigram model
    return m


def train_scheme(scheme: str, train, test, log_p, args, batch_size: int, seed: int, bar) -> dict:
    """Train the small RSM with one hidden-bias scheme; exact test perplexity per epoch."""
    K, F_ = train.shape[1], args.study_hidden
    g = torch.Generator().manual_seed(seed)
    asker = scheme.startswith("asker")
    m = make_rsm(K, F_, log_p, seed, scale_hidden_bias=not asker)
    lr = args.lr
    mean_d = float(train.sum(-1).mean())
    if scheme == "SGD, one lr":
        opt = torch.optim.SGD(m.parameters(), lr=lr)
    elif scheme == "SGD, own lr for a":
        opt = torch.optim.SGD([
            {"params": [m.weight, m.visible_bias]},
            {"params": [m.hidden_bias], "lr": lr / mean_d},
        ], lr=lr)
    elif scheme == "SGD, a frozen":
        m.hidden_bias.requires_grad_(False)
        opt = torch.optim.SGD([m.weight, m.visible_bias], lr=lr)
    elif scheme == "Adam":
        opt = torch.optim.Adam(m.parameters(), lr=args.adam_lr)
    else:  # the asker's energy, literally: parameters (W, b, bh), model hidden bias c = bh / B
        bh = torch.nn.Parameter(torch.zeros(F_))
        opt = torch.optim.SGD([m.weight, m.visible_bias, bh], lr=args.asker_lr)
    history = []
    for _ in range(args.study_epochs):
        order = torch.randperm(train.shape[0], generator=g)
        for i in range(0, train.shape[0], batch_size):
            v0 = train[order[i : i + batch_size]]
            opt.zero_grad()
            if asker:
                # the asker's code takes B from the batch's shape, so a shorter last batch would
                # even change the model's hidden bias for one step; the nominal B is kept here
                B = float(batch_size)
                with torch.no_grad():
                    m.hidden_bias.copy_(bh / B)
                vk = m.gibbs(v0, 1, generator=g)

                def f_tilde(x):
                    return -(x @ m.visible_bias) - B * F.softplus(bh / B + x @ m.weight).sum(-1)

                (f_tilde(v0).mean() - f_tilde(vk).mean()).backward()
            else:
                m.cd_loss(v0, k=1, generator=g).backward()
            opt.step()
        if asker:
            with torch.no_grad():
                m.hidden_bias.copy_(bh / batch_size)
        history.append(float(m.perplexity(test)))
        bar.update(1)
    a = m.hidden_bias.detach()
    eff = a * train.sum(-1).mean() if m.scale_hidden_bias else a  # typical hidden-bias input s(D)·a
    return {"model": m, "history": history, "stuck": stuck_units(m, test), "a_input": (float(eff.min()), float(eff.max()))}


def top_words(model: sg.ReplicatedSoftmax, vocab, num_units: int, num_words: int) -> list[str]:
    W = model.weight.detach()
    strongest = W.norm(dim=0).argsort(descending=True)[:num_units]
    lines = []
    for j in strongest.tolist():
        idx = W[:, j].argsort(descending=True)[:num_words]
        lines.append(f"  unit {j:3d}: " + " ".join(vocab[i] for i in idx.tolist()))
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run in seconds")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-test", type=int, default=40)
    p.add_argument("--study-hidden", type=int, default=10)
    p.add_argument("--study-epochs", type=int, default=20)
    p.add_argument("--study-seeds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.03, help="SGD learning rate of the study")
    p.add_argument("--adam-lr", type=float, default=0.01)
    p.add_argument("--asker-lr", type=float, default=0.003, help="SGD rate on the asker's energy")
    p.add_argument("--asker-batch-sizes", type=int, nargs=2, default=(10, 50))
    p.add_argument("--hidden", type=int, default=50)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--main-lr", type=float, default=0.003, help="Adam rate of the bigger RSM (0.01 overfits at F=50)")
    p.add_argument("--cd-k", type=int, default=1)
    p.add_argument("--ais-chains", type=int, default=100)
    p.add_argument("--ais-betas", type=int, default=1000, help="temperatures of the temperature-path check")
    p.add_argument("--ais-steps-per-word", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    train, test, vocab = load_reuters(args.num_test, args.seed)
    if args.quick:
        train, test = train[:60], test[:6]
        args.study_hidden, args.study_epochs, args.hidden, args.epochs, args.study_seeds = 4, 2, 6, 2, 1
        args.ais_chains, args.ais_betas, args.asker_batch_sizes = 4, 20, (10, 30)
        args.ais_steps_per_word = 1
    args.out.mkdir(parents=True, exist_ok=True)
    K = train.shape[1]
    lengths = train.sum(-1)
    print(f"Reuters (lda package): {train.shape[0]} training / {test.shape[0]} held-out documents, K = {K} words, "
          f"D from {int(lengths.min())} to {int(lengths.max())} (mean {float(lengths.mean()):.0f})")
    log_p = unigram_log_probs(train)
    ppl_uni = unigram_perplexity(log_p, test)
    print(f"unigram (add-0.5) held-out perplexity: {ppl_uni:.1f}")

    # ------------------------------------------------------------------ 1. the stiff hidden bias
    b1, b2 = args.asker_batch_sizes
    schemes = [("SGD, one lr", args.batch_size), ("SGD, own lr for a", args.batch_size),
               ("SGD, a frozen", args.batch_size), ("Adam", args.batch_size),
               (f"asker F~, B={b1}", b1), (f"asker F~, B={b2}", b2)]
    seeds = [args.seed + i for i in range(args.study_seeds)]
    runs = {name: [] for name, _ in schemes}
    t0 = time.perf_counter()
    with tqdm(total=len(schemes) * len(seeds) * args.study_epochs, desc="hidden-bias study", disable=None) as bar:
        for seed in seeds:
            for name, bs in schemes:
                runs[name].append(train_scheme(name, train, test, log_p, args, bs, seed, bar))
    print(f"\nStiff hidden bias: RSM with {args.study_hidden} hidden units, CD-1, {args.study_epochs} epochs, "
          f"{len(seeds)} seed(s), exact held-out perplexity (2^{args.study_hidden} hidden states); SGD lr {args.lr}, "
          f"own lr for a = {args.lr}/mean(D), Adam lr {args.adam_lr}, asker's energy lr {args.asker_lr} "
          f"({time.perf_counter() - t0:.0f} s)")
    print(f"  {'scheme':22s} {'final perplexity':>22s} {'best':>8s} {'stuck units':>12s}  hidden-bias input s(D)·a")
    for name, rs in runs.items():
        final = torch.tensor([r["history"][-1] for r in rs])
        best = min(min(r["history"]) for r in rs)
        stuck = sum(r["stuck"] for r in rs) / len(rs)
        lo, hi = min(r["a_input"][0] for r in rs), max(r["a_input"][1] for r in rs)
        spread = f"± {float(final.std()):6.1f}" if len(rs) > 1 else " " * 8
        print(f"  {name:22s} {float(final.mean()):13.1f} {spread} {best:8.1f} {stuck:7.1f} / {args.study_hidden:<3d} "
              f"[{lo:+.3g}, {hi:+.3g}]")
    print(f"  {'unigram':22s} {ppl_uni:13.1f}")
    results = {name: rs[0] for name, rs in runs.items()}  # the first seed's models and curves

    # AIS against the exact log Z on the small Adam model: the two annealing paths
    small = results["Adam"]["model"]
    test_len = test.sum(-1)
    uniq = torch.unique(test_len)
    exact = small.log_partition(uniq).detach()
    t0 = time.perf_counter()
    by_len = small.ais_log_partition(uniq, num_chains=args.ais_chains, steps_per_word=args.ais_steps_per_word,
                                     generator=torch.Generator().manual_seed(args.seed))
    t_len = time.perf_counter() - t0
    pick = uniq[torch.linspace(0, len(uniq) - 1, min(4, len(uniq))).round().long()]  # a few lengths, up to the longest
    t0 = time.perf_counter()
    by_temp = small.ais_log_partition(pick, path="temperature", num_chains=args.ais_chains, num_betas=args.ais_betas,
                                      base_visible_bias=log_p, generator=torch.Generator().manual_seed(args.seed))
    t_temp = time.perf_counter() - t0
    ex_pick = small.log_partition(pick).detach()
    print(f"\nAIS against the exact log Z_D on the Adam model above ({args.ais_chains} chains):")
    print(f"  length path ({args.ais_steps_per_word} steps/word, all {len(uniq)} test lengths, {t_len:.0f} s): "
          f"max |AIS − exact| = {float((by_len.log_z - exact).abs().max()):.3f} nats "
          f"(largest stderr {float(by_len.stderr.max()):.3f})")
    print(f"  temperature path ({args.ais_betas} temperatures, base = unigram, {t_temp:.0f} s):")
    for D, e_t, se_t, ex in zip(pick.tolist(), by_temp.log_z.tolist(), by_temp.stderr.tolist(), ex_pick.tolist()):
        i = int(torch.searchsorted(uniq, torch.tensor(D)))
        print(f"    D = {int(D):3d}: exact {ex:8.2f}   temperature {e_t - ex:+8.2f} (se {se_t:.2f})   "
              f"length {float(by_len.log_z[i]) - ex:+6.2f} (se {float(by_len.stderr[i]):.2f})")

    # ------------------------------------------------------------------ 2. the bigger RSM, AIS perplexity
    g = torch.Generator().manual_seed(args.seed + 1)
    model = make_rsm(K, args.hidden, log_p, args.seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=args.main_lr)
    t0 = time.perf_counter()
    for _ in tqdm(range(args.epochs), desc=f"RSM F={args.hidden}", disable=None):
        order = torch.randperm(train.shape[0], generator=g)
        for i in range(0, train.shape[0], args.batch_size):
            opt.zero_grad()
            model.cd_loss(train[order[i : i + args.batch_size]], k=args.cd_k, generator=g).backward()
            opt.step()
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    est = model.ais_log_partition(test_len, num_chains=args.ais_chains, steps_per_word=args.ais_steps_per_word,
                                  generator=torch.Generator().manual_seed(args.seed))
    t_ais = time.perf_counter() - t0
    with torch.no_grad():
        lp = model.log_prob(test, log_z=est.log_z)  # (N,) log p(V_n)
        per_word = lp / test_len
        ppl = math.exp(-float(per_word.mean()))
        # delta method: d ppl = ppl · sqrt(Σ (se_n / D_n)²) / N
        ppl_se = ppl * float(((est.stderr / test_len) ** 2).sum().sqrt()) / test.shape[0]
    print(f"\nRSM with {args.hidden} hidden units, Adam lr {args.main_lr}, CD-{args.cd_k}, {args.epochs} epochs "
          f"({t_train:.0f} s); AIS over the length, {args.ais_chains} chains × {args.ais_steps_per_word} steps/word "
          f"({t_ais:.0f} s)")
    print(f"  held-out perplexity: RSM {ppl:.1f} ± {ppl_se:.1f}   unigram {ppl_uni:.1f}   "
          f"(ratio {ppl / ppl_uni:.3f})")
    print("  top words of the strongest hidden units:")
    for line in top_words(model, vocab, num_units=min(10, args.hidden), num_words=8):
        print(line)

    # ------------------------------------------------------------------ plot
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, rs in runs.items():
        curve = torch.tensor([r["history"] for r in rs]).mean(0)
        ax[0].plot(range(1, len(curve) + 1), curve.numpy(), marker=".", label=name)
    ax[0].axhline(ppl_uni, color="k", ls="--", lw=1, label="unigram")
    ax[0].set_xlabel("epoch")
    ax[0].set_ylabel(f"held-out perplexity (exact, mean of {len(seeds)} seeds)")
    ax[0].set_title(f"stiff hidden bias: RSM F={args.study_hidden}")
    ax[0].legend(fontsize=8)
    uni_word = (test @ log_p) / test_len
    ax[1].scatter(uni_word.numpy(), per_word.numpy(), s=12)
    lo = float(min(uni_word.min(), per_word.min()))
    hi = float(max(uni_word.max(), per_word.max()))
    ax[1].plot([lo, hi], [lo, hi], "k--", lw=1)
    ax[1].set_xlabel("unigram log p / word")
    ax[1].set_ylabel(f"RSM (F={args.hidden}, AIS) log p / word")
    ax[1].set_title("held-out documents")
    fig.tight_layout()
    path = args.out / "rsm_topics.png"
    fig.savefig(path, dpi=110)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
