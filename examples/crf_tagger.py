"""Train a linear-chain CRF tagger with structgrad.nll on data from a random HMM.

A hidden Markov model (C tags, V word types, initial π, transitions A, emissions B)
is drawn at random and generates variable-length tagged sentences.  A CRF with
word-tag scores W (V, C), start scores s (C) and one shared transition matrix U (C, C),

    score(y | x) = s[y_0] + Σ_t W[x_t, y_t] + Σ_t U[y_t, y_{t+1}],

is trained by minimising nll = A(θ) − ⟨gold, θ⟩ (gradient: model marginals − gold,
seed 001) with the ``chain`` solver.  The CRF family contains the HMM's own posterior
(s = log π, W = log B, U = log A), so its accuracy is bounded by the generating HMM's
Viterbi decoder, which is reported next to it (both decoded with the same solver).

Run:  python examples/crf_tagger.py            (about 20 seconds)
      python examples/crf_tagger.py --quick    (seconds)
Writes a learning-curve plot to --out (default examples/out/).
"""

from __future__ import annotations

import argparse
import os
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


class CRF(torch.nn.Module):
    """Word-tag scores W, start scores s and a shared transition matrix U."""

    def __init__(self, V: int, C: int):
        super().__init__()
        self.W = torch.nn.Parameter(torch.zeros(V, C))
        self.start = torch.nn.Parameter(torch.zeros(C))
        self.U = torch.nn.Parameter(torch.zeros(C, C))

    def forward(self, words: torch.Tensor):
        node = self.W[words]  # (B, T, C)
        node = torch.cat([node[:, :1] + self.start, node[:, 1:]], dim=1)
        return node, self.U


def hmm_potentials(hmm, words):
    pi, A, B = hmm
    node = B.log().t()[words]
    node = torch.cat([node[:, :1] + pi.log(), node[:, 1:]], dim=1)
    return node, A.log()


def accuracy(pred_node, tags, lengths) -> float:
    pred = sg.chain_labels(pred_node)
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
    chain = sg.get_solver("chain")

    # the Bayes-optimal reference: the generating HMM's own Viterbi and max-marginal decoders
    hmm_theta = hmm_potentials(hmm, test[0])
    acc_hmm_viterbi = accuracy(chain.map(hmm_theta, lengths=test[2])[0], test[1], test[2])
    acc_hmm_marginal = accuracy(
        torch.nn.functional.one_hot(chain.marginals(hmm_theta, lengths=test[2])[0].argmax(-1), args.tags).float()
        * (torch.arange(test[1].shape[1]) < test[2][:, None])[..., None],
        test[1],
        test[2],
    )

    model = CRF(args.words, args.tags)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    words, tags, lengths = train
    n = words.shape[0]
    curve = {"step": [], "nll": [], "epoch": [], "test_acc": []}
    step, t0 = 0, time.perf_counter()
    bar = tqdm(total=args.epochs * ((n + args.batch - 1) // args.batch), desc="training CRF", unit="batch")
    for epoch in range(args.epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, args.batch):
            idx = perm[i : i + args.batch]
            L = lengths[idx]
            Tb = int(L.max())
            w, y = words[idx, :Tb], tags[idx, :Tb]
            gold = sg.chain_indicators(y, args.tags, L, shared_edge=True)
            loss = sg.nll(model(w), gold, chain, lengths=L).sum() / L.sum()  # per token
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            curve["step"].append(step)
            curve["nll"].append(loss.item())
            bar.update(1)
            bar.set_postfix(nll=f"{curve['nll'][-1]:.3f}")
        with torch.no_grad():
            acc = accuracy(chain.map(model(test[0]), lengths=test[2])[0], test[1], test[2])
        curve["epoch"].append(step)
        curve["test_acc"].append(acc)
        bar.write(f"epoch {epoch + 1}: test token accuracy {acc:.4f}")
    bar.close()
    elapsed = time.perf_counter() - t0

    os.makedirs(args.out, exist_ok=True)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    a1.plot(curve["step"], curve["nll"], lw=0.8)
    a1.set_xlabel("step")
    a1.set_ylabel("nll per token (train batch)")
    a1.set_title("CRF training")
    a2.plot(curve["epoch"], curve["test_acc"], "o-", label="CRF (Viterbi)")
    a2.axhline(acc_hmm_viterbi, color="k", ls="--", label="generating HMM, Viterbi")
    a2.axhline(acc_hmm_marginal, color="gray", ls=":", label="generating HMM, max-marginal")
    a2.set_xlabel("step")
    a2.set_ylabel("test token accuracy")
    a2.legend(loc="lower right")
    fig.tight_layout()
    path = os.path.join(args.out, "crf_tagger_learning_curve.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)

    result = {
        "crf_viterbi": curve["test_acc"][-1],
        "hmm_viterbi": acc_hmm_viterbi,
        "hmm_max_marginal": acc_hmm_marginal,
        "train_seconds": elapsed,
    }
    print(
        f"test token accuracy: CRF {result['crf_viterbi']:.4f} | generating HMM Viterbi {acc_hmm_viterbi:.4f} "
        f"(max-marginal {acc_hmm_marginal:.4f}) | gap {acc_hmm_viterbi - result['crf_viterbi']:+.4f}"
    )
    print(f"trained {args.epochs} epochs on {n} sentences in {elapsed:.1f}s; plot: {path}")
    return result


if __name__ == "__main__":
    main()
