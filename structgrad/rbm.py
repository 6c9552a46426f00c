r"""Restricted Boltzmann machines trained by contrastive divergence through autodiff
of the free energy: :class:`BernoulliRBM` and the Replicated Softmax topic model
:class:`ReplicatedSoftmax` (seed 002).

The models
----------
A Bernoulli RBM has binary visible units v ∈ {0,1}^K and hidden units h ∈ {0,1}^F::

    E(v, h) = −v·b − h·c − vᵀW h,        F(v) = −log Σ_h e^{−E(v,h)} = −v·b − Σ_j softplus(c_j + (vW)_j).

The Replicated Softmax (RSM; Salakhutdinov & Hinton 2009) models a document of D
words V = (w_1..w_D) over a vocabulary of K words through its count vector
v ∈ ℕ^K, D = Σ_k v_k.  The hidden bias is scaled by the document length::

    E(V, h) = −v·b − D·h·a − vᵀW h,      F(v) = −v·b − Σ_j softplus(D·a_j + (vW)_j),
    p(V) = e^{−F(v)} / Z_D,   Z_D = Σ_h e^{D·h·a} (Σ_k e^{b_k + (Wh)_k})^D.

One RBM per length D, all sharing (W, a, b).  p(V) is the probability of the
ordered word sequence (what perplexity uses); the probability of the count vector
carries the extra multinomial coefficient D! / Π_k v_k!.

Both conditionals are exponential families, and are sampled through the library's
one kernel for each: p(h | v) = Π_j Bernoulli(σ(u_j)), u = D·a + vW, through the
``bernoulli`` solver (its ``log_partition`` Σ_j softplus(u_j) is the hidden part of
F, its ``marginals`` σ(u) the hidden probabilities); p(v | h) is D i.i.d. draws
from softmax(b + W h), a different D per document of a batch, through
:func:`structgrad.logspace.multinomial_counts` (the Bernoulli RBM's p(v | h) is
the ``bernoulli`` solver again).

Contrastive divergence by autodiff
----------------------------------
For any model p(v) = e^{−F(v)}/Z,  −∂ log p(v)/∂θ = ∂F(v)/∂θ − E_{v'∼p}[∂F(v')/∂θ]
(for the RSM the expectation is under p_D with the document's own D).  CD-k
replaces the expectation by the end v^k of a k-step Gibbs chain started at the
data, so with v^k drawn under ``no_grad``, autograd of the surrogate

    cd_loss = (1/B) Σ_n [F(v⁰_n) − F(v^k_n)]

is the CD-k update.  For the RSM, with σ⁰ = σ(D_n a + v⁰_n W), σ^k likewise::

    ∂/∂W = −(1/B) Σ_n [v⁰_n σ⁰ᵀ − v^k_n σ^kᵀ]
    ∂/∂b = −(1/B) Σ_n [v⁰_n − v^k_n]
    ∂/∂a = −(1/B) Σ_n D_n [σ⁰ − σ^k]           (the chain keeps the length D_n)

(drop the D_n for the Bernoulli RBM).  The loss *value* is no log-likelihood;
only its gradient means something.  ``persistent=True`` keeps the chains between
calls (PCD, Tieleman 2008).  The RSM's negative for document n must come from
p_{D_n}, its own length, whatever the lengths of the batches before: a chain is
carried from call to call as its last document, but only its hidden layer carries
over: each call draws h from the chain's document (with the current parameters),
then the words of row n at the current length D_n, k sweeps in all
(:meth:`~ReplicatedSoftmax.persistent_negatives` says which chain serves which row).  The
chains are a buffer, ``persistent_chains``: ``state_dict()`` saves them and
``load_state_dict`` restores them, so a resumed run continues its chains (a state
dict without them restarts the chains at the next batch).

Likelihood
----------
``log_partition`` is exact: for the RSM the words are independent given h, so
log Z_D = logsumexp_h [D·h·a + D·logsumexp_k(b_k + (Wh)_k)] costs 2^F terms for any
vocabulary and length (the Bernoulli RBM enumerates the smaller layer).
``ais_log_partition`` estimates it by annealed importance sampling, with a
standard error, for larger models.  AIS runs in float64 whatever the model's dtype
(parameters, schedule, chains and the log-weight increments, which are small
differences of large log-partition terms); the result is rounded once to the
model's dtype, so a float32 model gives the float64 model's estimate (same
parameter values, same generator) to float32 precision.  For the RSM the default path anneals the
document length t = 0 → D with the words summed out (π_t(h) ∝ e^{t·(h·a + lse(b + Wh))}),
one run for every length; the classic path anneals a temperature β = 0 → 1 from
a base-rate model (Salakhutdinov & Murray 2008).  A trained RSM's topics
separate in proportion to D, and on long documents the temperature path's
chains stay in the wrong topic: on a 10-unit Reuters model it is 67 nats low
at D = 369 where the length path is 0.37 nats off, within its standard error of
0.20 (examples/rsm_topics.py, 100 chains).

The seed's question (autodiff "gives nonsense", the hand-coded update "works")
---------------------------------------------------------------------------
1. *The asker's free energy, and its D_n on the hidden-bias gradient, are
   correct.*  a enters the energy as D·h·a, so ∂F/∂a_j = −D σ(u_j); autodiff of
   F(v⁰) − F(v^k) gives exactly the CD update above, and nothing needs hand-coding.
2. *Sum or mean* over the B documents of a batch: Σ_n = B·mean_n for every
   parameter, the same direction with the learning rate multiplied by B.
   Neither is wrong; with a sum the learning rate must shrink with B.
3. *The update "seen everywhere"* (sum for W, mean for the biases, no D_n).  For W
   and b it is the exact gradient with per-parameter learning rates, B·η for W and
   η for b.  For a it is not, in general: it steps along Σ_n (σ⁰_n − σ^k_n) where
   the gradient is Σ_n D_n (σ⁰_n − σ^k_n).  Only when every document of the batch
   has the same length D is that a learning rate, η/D.  With different lengths in
   one batch it weighs document n by 1/D_n against the others: a different
   direction, not a diagonal preconditioner, whose fixed point (mean_n σ⁰_n matched
   by mean_n E_{p_{D_n}}[σ], instead of the length-weighted means) is in general
   not a stationary point of the likelihood.  The asker's TensorFlow energy
   F̃(v) = −v·b − B Σ_j softplus(a/B + vW) drops the D altogether: with c = a/B,
   ∂F̃/∂W = B·∂F_c/∂W, ∂F̃/∂b = ∂F_c/∂b, ∂F̃/∂a = ∂F_c/∂c, where
   F_c(v) = −v·b − Σ_j softplus(c_j + (vW)_j) is an RSM whose hidden bias is not
   scaled by D (``ReplicatedSoftmax(..., scale_hidden_bias=False)``), a model whose
   hidden-bias gradient has no D_n.  A step η on (W, b, a) is therefore SGD on
   (W, b, c) of that other model with learning rates (B·η, η, η/B): for F_c a
   diagonal preconditioner, not another gradient.  Since the ratio of W's and c's
   rates is B², and the stored a = B·c means a different bias for another B,
   the model that comes out depends on the batch size.
4. *Why the exact gradient failed: the hidden bias is stiff.*  Its gradient
   carries D_n (≈ 200 words per document on Reuters) and the curvature of the
   log-likelihood in a_j is D² Var(h_j), against about (D p_k)² Var(h_j) for the
   weight W_kj of a word of frequency p_k.  A learning rate that suits W throws
   the hidden input D·a to hundreds: every hidden unit is stuck off (or on) for
   every document, the hidden layer carries nothing, and all "topics" look
   alike.  Keep the exact gradient and fix the step: give a its own learning rate
   ≈ η / mean(D) (an optimizer parameter group), freeze a
   (``model.hidden_bias.requires_grad_(False)``), or use Adam, whose
   per-parameter step does not depend on the gradient's scale.  Measured on
   Reuters (examples/rsm_topics.py: 10 hidden units, CD-1, SGD η = 0.03, 20
   epochs, exact held-out perplexity, mean ± sd of 3 seeds; unigram 2517): one
   learning rate 2521 ± 4 with 10 of 10 units stuck; own rate 2192 ± 60; frozen
   2173 ± 37; Adam (lr 0.01) 2015 ± 81.

References:
    R. Salakhutdinov and G. Hinton, "Replicated Softmax: an Undirected Topic Model", NIPS 2009.
    G. Hinton, "Training products of experts by minimizing contrastive divergence", Neural Comput. 2002.
    T. Tieleman, "Training RBMs using approximations to the likelihood gradient" (PCD), ICML 2008.
    R. Salakhutdinov and I. Murray, "On the quantitative analysis of deep belief networks" (AIS), ICML 2008.
    R. Neal, "Annealed importance sampling", Statistics and Computing 2001.

Examples:
    >>> import torch, structgrad as sg
    >>> g = torch.Generator().manual_seed(0)
    >>> rsm = sg.ReplicatedSoftmax(num_visible=6, num_hidden=3, generator=g)
    >>> docs = torch.tensor([[2., 0., 1., 0., 0., 3.], [0., 1., 0., 4., 1., 0.]])
    >>> opt = torch.optim.SGD(rsm.parameters(), lr=0.01)
    >>> loss = rsm.cd_loss(docs, k=1, generator=g); loss.backward(); opt.step()
    >>> rsm.log_prob(docs).shape          # exact (2^3 hidden states)
    torch.Size([2])

Layout: this module is the public face; the code lives in private modules, one
concept each: ``_rbm_base`` (parameters, checks, free energy, Gibbs sweeps, CD and
PCD), ``_rbm_bernoulli`` (:class:`BernoulliRBM`), ``_rbm_softmax``
(:class:`ReplicatedSoftmax`) and ``_rbm_ais`` (annealed importance sampling,
:class:`AISEstimate`, :func:`ais_betas`).
"""

from __future__ import annotations

from ._rbm_ais import AISEstimate, ais_betas
from ._rbm_bernoulli import BernoulliRBM
from ._rbm_softmax import ReplicatedSoftmax

__all__ = ["AISEstimate", "BernoulliRBM", "ReplicatedSoftmax", "ais_betas"]
