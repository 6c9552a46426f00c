"""Train a linear-chain CRF tagger (structgrad.nn.LinearChainCRF) on data from a random HMM.

A hidden Markov model (C tags, V word types, initial π, transitions A, emissions B)
is drawn at random and generates variable-length tagged sentences.  A tagger with
word-tag scores W (V, C) feeding a ``LinearChainCRF`` layer (transitions U (C, C),
start s (C,), end e (C,)),

    score(y | x) = s[y_0] + Σ_t W[x_t, y_t] + Σ_t U[y_t, y_{t+1}] + e[y_{L−1}],

is trained by minimising the layer's negative log-likelihood A − score(gold) (gradient:
model marginals − gold, seed 001; the layer runs the ``chain`` solver).  The CRF family
contains the HMM's own posterior (s = log π, W = log B, U = log A, e = 0), so its
accuracy is bounded by the generating HMM's Viterbi decoder, which is reported next to
it: the HMM is itself loaded into a ``LinearChainCRF`` and decoded the same way.

Run:  python examples/crf_tagger.py            (about 20 seconds)
      python examples/crf_tagger.py --quick    (seconds)
Writes a learning-curve plot to --out (default examples/out/).
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


def random_hmm(C: int, V: int, g: torch.Generator):
    """π (C,), A (C, C), B (C, V): peaked Dirichlet rows so that tags are predictable."""
    dirichlet = lambda conc, shape: torch._standard_gamma(torch.full(shape, conc), generator=g)  # noqa: E731
    pi = dirichlet(1.0, (C,))
    A = dirichlet(0.3, (C, C))
    B = dirichlet(0.1, (C, V))
    return pi / pi.sum(), A / A.sum(-1, keepdim=True), B / B.sum(-1, keepdim=True)


def sample_corpus(hmm, n: int, min_len: int, max_len: int, g: torch.Generator):
    """n sentences: words (n, T_max), tags (n, T_max) padded with 0, lengths (n,)."""
    pi, A, B = hmm
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g)
    T = int(lengths.max())
    tags = torch.zeros(n, T, dtype=torch.long)
    words = torch.zeros(n, T, dtype=torch.long)
    y = torch.multinomial(pi.expand(n, -1), 1, generator=g).squeeze(1)
    for t in range(T):
        if t > 0:
            y = torch.multinomial(A[y], 1, generator=g).squeeze(1)
        tags[:, t] = y
        words[:, t] = torch.multinomial(B[y], 1, generator=g).squeeze(1)
    mask = torch.arange(T) < lengths[:, None]
    return words * mask, tags * mask, lengths


class Tagger(torch.nn.Module):
    """Word-tag scores W (an embedding of width C) and a CRF layer on top."""

    def __init__(self, V: int, C: int):
        super().__init__()
        self.W = torch.nn.Embedding(V, C)
        torch.nn.init.zeros_(self.W.weight)
        self.crf = sg.nn.LinearChainCRF(C)

    def forward(self, words, tags, lengths):
        return self.crf(self.W(words), tags, lengths, reduction="token_mean")  # nll per token

    def decode(self, words, lengths, method="viterbi"):
        return self.crf.decode(self.W(words), lengths, method=method)


def hmm_as_crf(hmm):
    """The generating HMM as a CRF layer: its posterior p(y | x) is this CRF's, with
    emissions log B[:, x_t]."""
    pi, A, B = hmm
    crf = sg.nn.LinearChainCRF(A.shape[0])
    with torch.no_grad():
        crf.transitions.copy_(A.log())
        crf.start.copy_(pi.log())
    return crf, B.log().t()  # layer, word -> emission scores (V, C)


def accuracy(pred, tags, lengths) -> float:
    """Token accuracy of predicted tags (B, T) (−1 past each length)."""
    mask = torch.arange(tags.shape[1]) < lengths[:, None]
    return float(((pred == tags) & mask).sum() / mask.sum())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small data, 2 epochs")
    ap.add_argument("--tags", type=int, default=10)
    ap.add_argument("--words", type=int, default=200)
    ap.add_argument("--train", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    args = ap.parse_args(argv)
    if args.quick:
        args.train, args.epochs, args.words = 400, 2, 60
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(args.seed)
    hmm = random_hmm(args.tags, args.words, g)
    train = sample_corpus(hmm, args.train, 8, 40, g)
    test = sample_corpus(hmm, max(500, args.train // 4), 8, 40, g)

    # the Bayes-optimal reference: the generating HMM's own Viterbi and max-marginal decoders
    hmm_crf, hmm_emission = hmm_as_crf(hmm)
    hmm_em = hmm_emission[test[0]]
    acc_hmm_viterbi = accuracy(hmm_crf.decode(hmm_em, test[2]), test[1], test[2])
    acc_hmm_marginal = accuracy(hmm_crf.decode(hmm_em, test[2], method="marginal"), test[1], test[2])

    model = Tagger(args.words, args.tags)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    words, tags, lengths = train
    n = words.shape[0]
    curve = {"step": [], "nll": [], "epoch": [], "test_acc": []}
    step, t0 = 0, time.perf_counter()
    bar = tqdm(total=args.epochs * ((n + args.batch - 1) // args.batch), desc="training CRF", unit="batch", disable=not sys.stderr.isatty())
    for epoch in range(args.epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, args.batch):
            idx = perm[i : i + args.batch]
            L = lengths[idx]
            Tb = int(L.max())
            w, y = words[idx, :Tb], tags[idx, :Tb]
            loss = model(w, y, L)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            curve["step"].append(step)
            curve["nll"].append(loss.item())
            bar.update(1)
            bar.set_postfix(nll=f"{curve['nll'][-1]:.3f}")
        with torch.no_grad():
            acc = accuracy(model.decode(test[0], test[2]), test[1], test[2])
        curve["epoch"].append(step)
        curve["test_acc"].append(acc)
        bar.write(f"epoch {epoch + 1}: test token accuracy {acc:.4f}")
    bar.close()
    elapsed = time.perf_counter() - t0

    os.makedirs(args.out, exist_ok=True)
    with torch.no_grad():
        acc_crf_marginal = accuracy(model.decode(test[0], test[2], method="marginal"), test[1], test[2])

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.4))
    a1.plot(curve["step"], curve["nll"], lw=0.8)
    a1.set_xlabel("step")
    a1.set_ylabel("nll per token (train batch)")
    a1.set_title("CRF training")
    a2.plot(curve["epoch"], curve["test_acc"], "o-", label="CRF (Viterbi)")
    a2.axhline(acc_hmm_viterbi, color="k", ls="--", label="generating HMM, Viterbi")
    a2.axhline(acc_hmm_marginal, color="gray", ls=":", label="generating HMM, max-marginal")
    a2.set_xlabel("step")
    a2.set_ylabel("test token accuracy")
    a2.plot(curve["epoch"][-1:], [acc_crf_marginal], "s", color="C1", label="CRF (max-marginal), last epoch")
    a2.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize="small")  # below the axes
    fig.tight_layout()
    path = os.path.join(args.out, "crf_tagger_learning_curve.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)

    result = {
        "crf_viterbi": curve["test_acc"][-1],
        "crf_max_marginal": acc_crf_marginal,
        "hmm_viterbi": acc_hmm_viterbi,
        "hmm_max_marginal": acc_hmm_marginal,
        "train_seconds": elapsed,
    }
    print(
        f"test token accuracy: CRF {result['crf_viterbi']:.4f} | generating HMM Viterbi {acc_hmm_viterbi:.4f} "
        f"(max-marginal {acc_hmm_marginal:.4f}) | gap {acc_hmm_viterbi - result['crf_viterbi']:+.4f} | "
        f"CRF max-marginal {acc_crf_marginal:.4f}"
    )
    print(f"trained {args.epochs} epochs on {n} sentences in {elapsed:.1f}s; plot: {path}")
    return result


if __name__ == "__main__":
    main()
