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
(:meth:`~_RBMBase.persistent_negatives` says which chain serves which row).  The
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

Example:
    >>> import torch, structgrad as sg
    >>> g = torch.Generator().manual_seed(0)
    >>> rsm = sg.ReplicatedSoftmax(num_visible=6, num_hidden=3, generator=g)
    >>> docs = torch.tensor([[2., 0., 1., 0., 0., 3.], [0., 1., 0., 4., 1., 0.]])
    >>> opt = torch.optim.SGD(rsm.parameters(), lr=0.01)
    >>> loss = rsm.cd_loss(docs, k=1, generator=g); loss.backward(); opt.step()
    >>> rsm.log_prob(docs).shape          # exact (2^3 hidden states)
    torch.Size([2])
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import nn

from . import checks as V
from .errors import DeviceError, DomainError, DTypeError, ShapeError
from .logspace import logaddexp, logsumexp, multinomial_counts
from .registry import get_solver

__all__ = ["AISEstimate", "BernoulliRBM", "ReplicatedSoftmax", "ais_betas"]

_REDUCTIONS = ("mean", "sum")


class AISEstimate(NamedTuple):
    """Result of annealed importance sampling.

    Attributes:
        log_z: the estimate log Ẑ = log Z_0 + log mean_m w_m (detached).
        stderr: its standard error by the delta method, std(w) / (√M · mean(w)).
        log_weights: ``(num_chains, *log_z.shape)`` the log importance weights log w_m.

    All three are computed in float64 and returned in the model's dtype (so ``log_z``
    can be passed to ``log_prob``).
    """

    log_z: torch.Tensor
    stderr: torch.Tensor
    log_weights: torch.Tensor


def ais_betas(num_betas: int, *, dtype: torch.dtype = torch.float64, device: Any = None) -> torch.Tensor:
    """The default AIS temperature schedule 0 = β_0 < … < β_{K−1} = 1.

    Salakhutdinov & Murray's proportions (500 : 4000 : 10000 steps on [0, 0.5],
    [0.5, 0.9], [0.9, 1]) scaled to ``num_betas`` points: the annealing slows
    down where the distribution changes fastest.

    Args:
        num_betas: K ≥ 2 intermediate distributions, endpoints included.
    Returns:
        ``(num_betas,)`` increasing, from 0 to 1.
    Example:
        >>> ais_betas(5)
        tensor([0.0000, 0.5000, 0.9000, 0.9500, 1.0000], dtype=torch.float64)
    """
    num_betas = V.check_positive_int(num_betas, "num_betas", minimum=2)
    total = num_betas - 1  # number of steps
    n1 = max(1, round(total * 500 / 14500))
    n2 = max(1, round(total * 4000 / 14500)) if total - n1 >= 2 else 0
    n3 = total - n1 - n2
    if n3 < 1:  # very short schedules
        return torch.linspace(0.0, 1.0, num_betas, dtype=dtype, device=device)
    parts = [torch.linspace(0.0, 0.5, n1 + 1, dtype=dtype, device=device)[:-1]]
    if n2:
        parts.append(torch.linspace(0.5, 0.9, n2 + 1, dtype=dtype, device=device)[:-1])
        parts.append(torch.linspace(0.9, 1.0, n3 + 1, dtype=dtype, device=device))
    else:
        parts.append(torch.linspace(0.5, 1.0, n3 + 1, dtype=dtype, device=device))
    return torch.cat(parts)


def _hidden_states(num_hidden: int, start: int, stop: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Rows ``start..stop-1`` of the 2^F binary hidden configurations (bit j of the index)."""
    idx = torch.arange(start, stop, device=device)
    bits = torch.arange(num_hidden, device=device)
    return ((idx.unsqueeze(-1) >> bits) & 1).to(dtype)


class _RBMBase(nn.Module):
    """Shared machinery: validation, Gibbs sweeps, the CD loss, temperature-path AIS.

    Subclasses define the hooks ``_check_values`` (allowed visible values),
    ``_lengths`` (D per document, or ``None``), ``_input`` (u with
    p(h_j = 1 | v) = σ(u_j), for given parameters), ``_draw_visible`` (a draw from
    p(v | h) given its logits), ``_base_log_z`` (log Z of the AIS base model) and,
    for PCD, ``_pcd_negatives`` (the RSM overrides the default: one chain per
    document of the batch, words drawn at its length).
    """

    def __init__(
        self,
        num_visible: int,
        num_hidden: int,
        *,
        init_std: float = 0.01,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: Any = None,
    ) -> None:
        super().__init__()
        self.num_visible = V.check_positive_int(num_visible, "num_visible")
        self.num_hidden = V.check_positive_int(num_hidden, "num_hidden")
        init_std = V.check_real(init_std, "init_std", lo=0.0, what="a float")
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise DTypeError(
                f"dtype: expected a floating-point torch.dtype (e.g. torch.float32) or None, got {type(dtype).__name__}"
            )
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        if not dtype.is_floating_point:
            raise DTypeError(f"dtype: expected a floating-point dtype, got {dtype}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        V.check_generator(generator, device)
        w = torch.randn(self.num_visible, self.num_hidden, dtype=dtype, device=device, generator=generator)
        self.weight = nn.Parameter(w * init_std)
        self.visible_bias = nn.Parameter(torch.zeros(self.num_visible, dtype=dtype, device=device))
        self.hidden_bias = nn.Parameter(torch.zeros(self.num_hidden, dtype=dtype, device=device))
        # PCD chains: a buffer, so .to() moves it and state_dict() saves it once it exists
        # (see _load_from_state_dict for loading a state dict with or without it).
        self.register_buffer("persistent_chains", None)
        self._bernoulli = get_solver("bernoulli")

    # ------------------------------------------------------------------ properties
    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype (inputs are checked against it)."""
        return self.weight.dtype

    @property
    def device(self) -> torch.device:
        """The parameters' device."""
        return self.weight.device

    def extra_repr(self) -> str:
        return f"num_visible={self.num_visible}, num_hidden={self.num_hidden}"

    # ------------------------------------------------------------------ validation
    def _check_visible(self, v: Any, name: str, *, strict: bool = False) -> torch.Tensor:
        """Type, dtype, device, shape and value checks; integer/bool input is cast."""
        if not isinstance(v, torch.Tensor):
            raise DTypeError(f"{name}: expected a torch.Tensor of shape (*batch, {self.num_visible}), got {type(v).__name__}")
        if v.dtype.is_complex:
            raise DTypeError(f"{name}: expected a real tensor, got dtype {v.dtype}")
        if v.device != self.device:
            raise DeviceError(
                f"{name} is on device {v.device} but the model's parameters are on {self.device}; "
                f"expected the same device (move one with .to())"
            )
        if v.dtype.is_floating_point:
            if v.dtype != self.dtype:
                raise DTypeError(
                    f"{name}: expected dtype {self.dtype} (the model's parameters), got {v.dtype}; "
                    f"convert with {name}.to({self.dtype}) or the model with .to({v.dtype})"
                )
        else:
            v = v.to(self.dtype)  # integer counts / bool bits are exact in any float dtype we accept
        if v.dim() == 0 or v.shape[-1] != self.num_visible:
            raise ShapeError(
                f"{name}: expected shape (*batch, {self.num_visible}) (num_visible = {self.num_visible}), "
                f"got {V.fmt_shape(v.shape)}"
            )
        if v.numel() and not bool(torch.isfinite(v).all()):
            raise DomainError(f"{name}: expected finite values, got NaN or inf")
        self._check_values(v, name, strict)
        return v

    def _check_generator(self, generator: Any) -> None:
        V.check_generator(generator, self.device)

    def _check_k(self, k: Any, minimum: int = 1) -> int:
        return V.check_positive_int(k, "k", minimum=minimum)

    def _check_values(self, v: torch.Tensor, name: str, strict: bool) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _lengths(self, v: torch.Tensor) -> torch.Tensor | None:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ energies
    def _input(
        self, v: torch.Tensor, lengths: torch.Tensor | None, weight: torch.Tensor, hidden_bias: torch.Tensor
    ) -> torch.Tensor:  # pragma: no cover - abstract
        """u with p(h_j = 1 | v) = σ(u_j), for the given weight and hidden bias (AIS passes float64 copies)."""
        raise NotImplementedError

    def _hidden_input(self, v: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        return self._input(v, lengths, self.weight, self.hidden_bias)

    def _visible_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.visible_bias + h @ self.weight.T

    def _free_energy(self, v: torch.Tensor) -> torch.Tensor:
        u = self._hidden_input(v, self._lengths(v))
        return -(v @ self.visible_bias) - self._bernoulli.log_partition(u)

    def free_energy(self, v: torch.Tensor) -> torch.Tensor:
        """F(v) = −log Σ_h exp(−E(v, h)), differentiable in the parameters.

        Args:
            v: ``(*batch, K)`` visible vectors (see the class docstring for values).
        Returns:
            ``(*batch,)`` free energies, in the parameters' dtype.
        Complexity: O(B·K·F).
        """
        return self._free_energy(self._check_visible(v, "v"))

    def hidden_marginals(self, v: torch.Tensor) -> torch.Tensor:
        """p(h_j = 1 | v) = σ(u_j), the ``bernoulli`` solver's marginals of u.

        Args:
            v: ``(*batch, K)``.
        Returns:
            ``(*batch, F)``, differentiable.
        """
        v = self._check_visible(v, "v")
        return self._bernoulli.marginals(self._hidden_input(v, self._lengths(v)))

    def sample_hidden(self, v: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """One draw h ∼ p(h | v) (independent Bernoulli bits).

        Args:
            v: ``(*batch, K)``.
            generator: a ``torch.Generator`` on the model's device (``None``: torch's default).
        Returns:
            ``(*batch, F)`` in {0, 1}, detached.
        """
        v = self._check_visible(v, "v")
        self._check_generator(generator)
        with torch.no_grad():
            return self._sample_hidden(v, self._lengths(v), generator)

    def _sample_hidden(self, v: torch.Tensor, lengths: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
        return self._bernoulli.sample(self._hidden_input(v, lengths), 1, generator=generator)[0]

    def _draw_visible(self, logits: torch.Tensor, lengths: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _gibbs(self, v: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
        lengths = self._lengths(v)
        with torch.no_grad():
            for _ in range(k):
                h = self._sample_hidden(v, lengths, generator)
                v = self._draw_visible(self._visible_logits(h), lengths, generator)
        return v

    def gibbs(self, v: torch.Tensor, k: int = 1, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """k block-Gibbs sweeps v → h ∼ p(h|v) → v' ∼ p(v|h), under ``no_grad``.

        Args:
            v: ``(*batch, K)`` chain starts (not modified).
            k: number of sweeps, ≥ 0 (0 returns a copy).
            generator: a ``torch.Generator`` on the model's device.
        Returns:
            ``(*batch, K)`` the chains after k sweeps, detached (RSM: each document
            keeps its length D).
        Complexity: O(k·B·K·F) (+ O(k·B·max D) for the RSM's word draws).
        """
        v = self._check_visible(v, "v")
        k = self._check_k(k, minimum=0)
        self._check_generator(generator)
        if k == 0:
            return v.detach().clone()
        return self._gibbs(v.detach(), k, generator)

    # ------------------------------------------------------------------ contrastive divergence
    def cd_loss(
        self,
        v0: torch.Tensor,
        k: int = 1,
        *,
        persistent: bool = False,
        negatives: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """Contrastive-divergence surrogate mean_n F(v⁰_n) − mean_m F(v^k_m).

        Its value means nothing; its gradient is the CD-k (or PCD-k) estimate of the
        negative log-likelihood gradient (see the module docstring for the formulas).

        Args:
            v0: ``(*batch, K)`` data.
            k: Gibbs sweeps for the negative phase (≥ 1).
            persistent: ``False``: CD-k, chains start at ``v0``.  ``True``: PCD-k, the
                negatives come from :meth:`persistent_negatives` (chains kept in
                ``self.persistent_chains`` between calls; the RSM draws each negative
                at the length of its own document of ``v0``).  Clear them with
                :meth:`reset_chains`.
            negatives: ``(*batch', K)`` given negative samples (then no sampling;
                ``k`` and ``persistent`` are not used), e.g. from your own sampler.
            generator: a ``torch.Generator`` on the model's device.
            reduction: ``"mean"`` (the default) or ``"sum"`` (= B × mean, B the number
                of data vectors: the same gradient with the learning rate × B).
        Returns:
            A scalar; ``loss.backward()`` gives the CD gradient in ``.grad``.
        Complexity: O(k·B·K·F).
        """
        v0 = self._check_visible(v0, "v0")
        if reduction not in _REDUCTIONS:
            raise DomainError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")
        if not isinstance(persistent, bool):
            raise DTypeError(f"persistent: expected a bool, got {type(persistent).__name__}")
        if v0.numel() == 0:
            raise ShapeError(f"v0: expected at least one data vector, got shape {V.fmt_shape(v0.shape)}")
        self._check_generator(generator)
        if negatives is not None:
            if persistent:
                raise DomainError("negatives: given together with persistent=True; expected one of the two")
            vk = self._check_visible(negatives, "negatives").detach()
            if vk.numel() == 0:
                raise ShapeError(f"negatives: expected at least one vector, got shape {V.fmt_shape(vk.shape)}")
        else:
            k = self._check_k(k)
            if persistent:
                vk = self._pcd_negatives(v0.detach().reshape(-1, self.num_visible), k, generator)
            else:
                vk = self._gibbs(v0.detach(), k, generator)
        loss = self._free_energy(v0).mean() - self._free_energy(vk).mean()
        if reduction == "sum":
            loss = loss * (v0.numel() // self.num_visible)
        return loss

    def persistent_negatives(
        self, v0: torch.Tensor, k: int = 1, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Advance the persistent (PCD) chains by k sweeps and return the negative samples.

        ``cd_loss(v0, k, persistent=True)`` is ``cd_loss(v0, negatives=persistent_negatives(v0, k))``
        (same generator state, same result).  What persists, and how many negatives come
        back, depends on the model:

        * :class:`BernoulliRBM`: ``self.persistent_chains`` ``(M, K)`` holds visible
          states, M set by the first batch (its rows are the chain starts); every call
          runs k sweeps v → h → v on all M chains and returns them, whatever the
          size of ``v0``.
        * :class:`ReplicatedSoftmax`: the negative phase of a document of length D_n is
          under p_{D_n}, so every call draws the words at the current documents'
          lengths.  ``self.persistent_chains`` ``(M, K)`` holds each chain's last
          document (of the length it was last drawn for).  Row n of ``v0``
          (flattened) takes the n-th chain in first-in-first-out order and runs k
          sweeps: h ∼ p(h | chain's document), then D_n words ∼ p(v | h), then
          h ∼ p(h | those words), ...; the k-th draw of D_n words is the negative and
          replaces the chain's document, which goes to the back of the queue, so
          successive smaller batches use the chains in turn.  The chain's old document
          reaches the negative only through h, so the negative has the current length
          D_n.  The chains start at the first batch's
          documents (the first call is CD-k exactly), and when a batch has more rows
          than there are chains, the rows without one start new chains at their data.
          Returns ``v0.shape``: one negative per document, of its length.

        Args:
            v0: ``(*batch, K)`` the current data (for the RSM its lengths; also the
                chain starts on the first call).
            k: sweeps per call, ≥ 1.
            generator: a ``torch.Generator`` on the model's device.
        Returns:
            The negatives, detached: ``(M, K)`` (RBM) or ``v0.shape`` (RSM).
        Complexity: O(k·M·K·F) (RBM), O(k·B·(K·F + max D)) (RSM).
        Example:
            >>> import torch, structgrad as sg
            >>> g = torch.Generator().manual_seed(0)
            >>> rsm = sg.ReplicatedSoftmax(num_visible=4, num_hidden=2, generator=g)
            >>> rsm.persistent_negatives(torch.tensor([[3, 0, 1, 0], [1, 1, 0, 0]]), generator=g).sum(-1)
            tensor([4., 2.])
            >>> rsm.persistent_negatives(torch.tensor([[0, 9, 0, 0]]), generator=g).sum(-1)  # first chain, now 9 words
            tensor([9.])
        """
        v0 = self._check_visible(v0, "v0")
        if v0.numel() == 0:
            raise ShapeError(f"v0: expected at least one data vector, got shape {V.fmt_shape(v0.shape)}")
        k = self._check_k(k)
        self._check_generator(generator)
        vk = self._pcd_negatives(v0.detach().reshape(-1, self.num_visible), k, generator)
        return vk.reshape(v0.shape) if self._pcd_per_document else vk

    _pcd_per_document = False  # True: one PCD negative per data row (the RSM)

    def _pcd_negatives(self, v0: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
        """Default (Bernoulli RBM): persistent visible chains ``(M, K)``, all advanced, all returned."""
        start = self.persistent_chains
        if start is None:
            start = v0
        vk = self._gibbs(start, k, generator)
        self.persistent_chains = vk
        return vk

    def reset_chains(self) -> None:
        """Forget the persistent (PCD) chains; the next ``cd_loss(persistent=True)`` restarts them at its data."""
        self.persistent_chains = None

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # The PCD chains are saved once they exist, and their number M is free: a state
        # dict with chains restores them (whatever M, and also into a fresh model), one
        # without them (an older or partial checkpoint) leaves none, so the next PCD call
        # restarts the chains at its data.  Neither case is a missing or unexpected key.
        key = prefix + "persistent_chains"
        chains = state_dict.get(key)
        if chains is None:
            self.persistent_chains = None
        elif (
            not isinstance(chains, torch.Tensor)
            or not chains.dtype.is_floating_point
            or chains.dim() != 2
            or chains.shape[1] != self.num_visible
        ):
            error_msgs.append(
                f"{key}: expected a floating-point tensor of shape (M, {self.num_visible}), got "
                f"{V.fmt_shape(chains.shape) if isinstance(chains, torch.Tensor) else type(chains).__name__}"
                f"{' of dtype ' + str(chains.dtype) if isinstance(chains, torch.Tensor) else ''}"
            )
            self.persistent_chains = None
            state_dict = {k: t for k, t in state_dict.items() if k != key}
        else:  # a placeholder of the right shape; the base class copies the values into it
            self.persistent_chains = torch.zeros(chains.shape, dtype=self.dtype, device=self.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # ------------------------------------------------------------------ AIS
    def _run_ais(
        self,
        lengths: torch.Tensor | None,
        num_chains: int,
        betas: torch.Tensor,
        base_visible_bias: torch.Tensor,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """Log AIS weights ``(num_chains, R)`` for ``R`` = number of lengths (1 for the RBM).

        Everything (parameters, schedule, chains, increments) is float64 whatever the
        model's dtype: the same parameter values give the same weights in a float32
        and a float64 model.
        """
        f64 = torch.float64
        R = 1 if lengths is None else lengths.numel()
        M = num_chains
        rows = None if lengths is None else lengths.to(f64).reshape(1, R).expand(M, R).reshape(-1)
        b_A = base_visible_bias.detach().to(f64)
        b_B = self.visible_bias.detach().to(f64)
        W = self.weight.detach().to(f64)
        c = self.hidden_bias.detach().to(f64)
        betas = betas.to(f64)
        lw = torch.zeros(M * R, dtype=f64, device=self.device)
        with torch.no_grad():
            v = self._draw_visible(b_A.expand(M * R, self.num_visible), rows, generator)
            for i in range(1, betas.numel()):
                b_prev, b_cur = betas[i - 1], betas[i]
                u = self._input(v, rows, W, c)
                # log p*_β(v) = v·((1−β) b_A + β b) + Σ_j softplus(β u_j)
                inc = (b_cur - b_prev) * (v @ (b_B - b_A)) + (
                    self._bernoulli.log_partition(b_cur * u) - self._bernoulli.log_partition(b_prev * u)
                )
                lw += inc
                if i == betas.numel() - 1:
                    break
                h = self._bernoulli.sample(b_cur * u, 1, generator=generator)[0]
                logits = (1 - b_cur) * b_A + b_cur * (b_B + h @ W.T)
                v = self._draw_visible(logits, rows, generator)
        return lw.reshape(M, R)

    def _ais(
        self,
        lengths: torch.Tensor | None,
        out_shape: tuple[int, ...],
        inverse: torch.Tensor | None,
        num_chains: int,
        num_betas: int,
        betas: torch.Tensor | None,
        base_visible_bias: torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> AISEstimate:
        num_chains = V.check_positive_int(num_chains, "num_chains", minimum=2)
        self._check_generator(generator)
        if betas is None:
            betas = ais_betas(num_betas, dtype=torch.float64, device=self.device)
        else:
            if not isinstance(betas, torch.Tensor) or not betas.dtype.is_floating_point:
                raise DTypeError(f"betas: expected a floating-point tensor, got {type(betas).__name__}")
            if betas.dim() != 1 or betas.numel() < 2:
                raise ShapeError(f"betas: expected shape (K,) with K >= 2, got {V.fmt_shape(betas.shape)}")
            if betas.device != self.device:
                raise DeviceError(f"betas is on device {betas.device} but the model is on {self.device}")
            if float(betas[0]) != 0.0 or float(betas[-1]) != 1.0 or not bool((betas[1:] >= betas[:-1]).all()):
                raise DomainError("betas: expected a non-decreasing schedule from exactly 0 to exactly 1")
        if base_visible_bias is None:
            b_A = self.visible_bias.detach()
        else:
            b_A = base_visible_bias
            if not isinstance(b_A, torch.Tensor) or b_A.dtype != self.dtype:
                raise DTypeError(
                    f"base_visible_bias: expected a tensor of dtype {self.dtype}, got "
                    f"{getattr(b_A, 'dtype', type(b_A).__name__)}"
                )
            V.check_shape(b_A, (self.num_visible,), "base_visible_bias", "(num_visible,)")
            if b_A.device != self.device:
                raise DeviceError(f"base_visible_bias is on device {b_A.device} but the model is on {self.device}")
            if not bool(torch.isfinite(b_A).all()):
                raise DomainError("base_visible_bias: expected finite values")
            b_A = b_A.detach()
        lw = self._run_ais(lengths, num_chains, betas, b_A, generator)  # (M, R), float64
        log_z0 = self._base_log_z(b_A.to(torch.float64), None if lengths is None else lengths.to(torch.float64))
        log_mean = logsumexp(lw, 0) - math.log(num_chains)
        w = torch.exp(lw - lw.amax(0, keepdim=True))
        stderr = w.std(0) / (math.sqrt(num_chains) * w.mean(0))
        log_z = log_z0 + log_mean
        if inverse is not None:
            log_z, stderr, lw = log_z[inverse], stderr[inverse], lw[:, inverse]
        return AISEstimate(
            log_z.to(self.dtype).reshape(out_shape),
            stderr.to(self.dtype).reshape(out_shape),
            lw.to(self.dtype).reshape((num_chains,) + tuple(out_shape)),
        )

    def _base_log_z(self, b_A: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


# ====================================================================== Bernoulli RBM
class BernoulliRBM(_RBMBase):
    r"""Bernoulli–Bernoulli restricted Boltzmann machine (an ``nn.Module``).

    E(v, h) = −v·b − h·c − vᵀW h with v ∈ {0,1}^K, h ∈ {0,1}^F;
    F(v) = −v·b − Σ_j softplus(c_j + (vW)_j); p(v) = e^{−F(v)}/Z.
    p(h_j = 1 | v) = σ(c_j + (vW)_j), p(v_k = 1 | h) = σ(b_k + (Wh)_k), both drawn by
    the ``bernoulli`` solver.

    Args:
        num_visible: K.  num_hidden: F.
        init_std: weights start as N(0, init_std²); biases start at 0.
        generator: for the initial weights (``None``: torch's default generator).
        dtype, device: of the parameters; inputs must match them.
    Parameters:
        ``weight (K, F)`` = W, ``visible_bias (K,)`` = b, ``hidden_bias (F,)`` = c.
        (scikit-learn's ``BernoulliRBM`` stores ``components_`` = Wᵀ,
        ``intercept_visible_`` = b, ``intercept_hidden_`` = c.)
    Buffers:
        ``persistent_chains``: ``None``, or ``(M, K)`` the PCD chains' visible states
        (in the state dict once they exist; see :meth:`persistent_negatives`).
    Shapes:
        v: ``(*batch, K)`` with values in [0, 1] (fractional values act as
        probabilities in the positive phase, as in scikit-learn; chains are
        binary); :meth:`log_prob` needs v ∈ {0, 1}.  Integer and bool inputs are
        cast to the parameters' dtype; other float dtypes are refused.
    Complexity:
        free energy, one Gibbs sweep: O(B·K·F); exact log Z: O(2^min(K,F)·K·F).
    Example:
        >>> import torch, structgrad as sg
        >>> g = torch.Generator().manual_seed(0)
        >>> rbm = sg.BernoulliRBM(num_visible=4, num_hidden=2, generator=g)
        >>> v = torch.tensor([[1., 0., 1., 1.]])
        >>> rbm.cd_loss(v, k=1, generator=g).backward()
        >>> bool(rbm.log_prob(v) < 0)        # exact: 2^2 hidden states
        True
    """

    def _check_values(self, v: torch.Tensor, name: str, strict: bool) -> None:
        if not v.numel():
            return
        if strict:
            bad = (v != 0) & (v != 1)
            if bool(bad.any()):
                raise DomainError(
                    f"{name}: expected binary values in {{0, 1}} for an exact likelihood, got e.g. "
                    f"{v[bad].flatten()[:3].tolist()}"
                )
        elif float(v.min()) < 0 or float(v.max()) > 1:
            raise DomainError(
                f"{name}: expected values in [0, 1], got min {float(v.min()):g} and max {float(v.max()):g}"
            )

    def _lengths(self, v: torch.Tensor) -> None:
        return None

    def _input(
        self, v: torch.Tensor, lengths: torch.Tensor | None, weight: torch.Tensor, hidden_bias: torch.Tensor
    ) -> torch.Tensor:
        return hidden_bias + v @ weight

    def _draw_visible(self, logits: torch.Tensor, lengths: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
        return self._bernoulli.sample(logits, 1, generator=generator)[0]

    def sample_visible(self, h: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """One draw v ∼ p(v | h) = Π_k Bernoulli(σ(b_k + (W h)_k)).

        Args:
            h: ``(*batch, F)`` hidden states (float in the model's dtype).
        Returns:
            ``(*batch, K)`` in {0, 1}, detached.
        """
        h = _check_hidden(self, h)
        self._check_generator(generator)
        with torch.no_grad():
            return self._draw_visible(self._visible_logits(h), None, generator)

    def _base_log_z(self, b_A: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        # Z_0 = 2^F Π_k (1 + e^{b_A,k}): W = 0 and c = 0 at β = 0.
        return (self.num_hidden * math.log(2.0) + self._bernoulli.log_partition(b_A)).reshape(1)

    def log_partition(self, *, max_states: int = 2**22) -> torch.Tensor:
        """Exact log Z by enumerating the smaller layer (2^min(K, F) states).

        log Z = logsumexp_h [h·c + Σ_k softplus(b_k + (Wh)_k)]
              = logsumexp_v [−F(v)].

        Args:
            max_states: refuse (``DomainError``) when 2^min(K, F) exceeds this.
        Returns:
            A 0-dim tensor, differentiable: its gradient is the expected sufficient
            statistics (E[v hᵀ], E[v], E[h]).
        Complexity: O(2^min(K,F)·K·F) time, chunked memory.
        """
        n = min(self.num_visible, self.num_hidden)
        max_states = V.check_positive_int(max_states, "max_states")
        if 2**n > max_states:
            raise DomainError(
                f"log_partition: exact enumeration needs 2^{n} states (min(num_visible, num_hidden) = {n}), "
                f"more than max_states = {max_states}; use ais_log_partition()"
            )
        by_hidden = self.num_hidden <= self.num_visible
        other = self.num_visible if by_hidden else self.num_hidden
        chunk = max(1, 2**22 // max(other, 1))
        acc = None
        for start in range(0, 2**n, chunk):
            S = _hidden_states(n, start, min(2**n, start + chunk), self.dtype, self.device)
            if by_hidden:
                s = S @ self.hidden_bias + self._bernoulli.log_partition(self.visible_bias + S @ self.weight.T)
            else:
                s = -self._free_energy(S)
            part = logsumexp(s, -1)
            acc = part if acc is None else logaddexp(acc, part)
        return acc

    def ais_log_partition(
        self,
        *,
        num_chains: int = 100,
        num_betas: int = 1000,
        betas: torch.Tensor | None = None,
        base_visible_bias: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> AISEstimate:
        """Annealed importance sampling estimate of log Z, with its standard error.

        Intermediate distributions (Salakhutdinov & Murray 2008), β from 0 to 1:
        p*_β(v) = exp(v·((1−β) b_A + β b)) Π_j (1 + exp(β (c_j + (vW)_j))), from the
        base model (W = 0, c = 0, visible bias b_A: Z_0 = 2^F Π_k (1 + e^{b_A,k}))
        to the RBM.  Each chain starts with an exact draw from the base, moves by
        one Gibbs sweep at each β and accumulates log w += log p*_{β_i}(v) − log p*_{β_{i−1}}(v);
        log Ẑ = log Z_0 + log mean_m w_m (unbiased in Z, biased low in log Z).  The
        run is in float64 whatever the model's dtype; the result is returned in the
        model's dtype.

        Args:
            num_chains: M ≥ 2 independent runs.
            num_betas: schedule length for :func:`ais_betas` (ignored when ``betas`` is given).
            betas: ``(K,)`` a custom non-decreasing schedule from 0 to 1.
            base_visible_bias: ``(K,)`` b_A; default: the model's visible bias.
                A good base is the data's log-odds, log(p̄/(1−p̄)).
            generator: a ``torch.Generator`` on the model's device.
        Returns:
            :class:`AISEstimate` with 0-dim ``log_z`` and ``stderr`` and ``(M,)`` log weights.
        Complexity: O(num_betas·M·K·F).
        """
        return self._ais(None, (), None, num_chains, num_betas, betas, base_visible_bias, generator)

    def log_prob(self, v: torch.Tensor, *, log_z: torch.Tensor | None = None) -> torch.Tensor:
        """log p(v) = −F(v) − log Z.

        Args:
            v: ``(*batch, K)`` binary vectors.
            log_z: a 0-dim tensor (e.g. ``ais_log_partition().log_z``); ``None``:
                the exact :meth:`log_partition`.
        Returns:
            ``(*batch,)``, differentiable in the parameters.
        """
        v = self._check_visible(v, "v", strict=True)
        if log_z is None:
            log_z = self.log_partition()
        else:
            log_z = _check_log_z(self, log_z, ())
        return -self._free_energy(v) - log_z


# ====================================================================== Replicated Softmax
class ReplicatedSoftmax(_RBMBase):
    r"""Replicated Softmax topic model (Salakhutdinov & Hinton, NIPS 2009), an ``nn.Module``.

    A document is its word-count vector v ∈ ℕ^K (D = Σ_k v_k ≥ 1 words);
    E(V, h) = −v·b − s(D)·h·a − vᵀW h with s(D) = D (the paper's scaling;
    ``scale_hidden_bias=False`` gives s(D) = 1);
    F(v) = −v·b − Σ_j softplus(s(D) a_j + (vW)_j); p(V) = e^{−F(v)} / Z_D with
    Z_D = Σ_h e^{s(D) h·a} (Σ_k e^{b_k + (Wh)_k})^D, the probability of the ordered
    word sequence.  p(h | v) through the ``bernoulli`` solver; p(v | h) is D words
    from softmax(b + W h) drawn with :func:`~structgrad.logspace.multinomial_counts`
    (a different D per document of a batch).  See the module docstring for the CD
    gradient and the answer to the seed's question on the D factor.

    Args:
        num_visible: K, the vocabulary size.  num_hidden: F.
        scale_hidden_bias: multiply the hidden bias by D (default, as in the paper).
        init_std: weights start as N(0, init_std²); biases start at 0 (set
            ``visible_bias`` to the log word frequencies of the data for a better start).
        generator: for the initial weights (``None``: torch's default generator).
        dtype, device: of the parameters; inputs must match them.
    Parameters:
        ``weight (K, F)`` = W, ``visible_bias (K,)`` = b, ``hidden_bias (F,)`` = a.
    Buffers:
        ``persistent_chains``: ``None``, or ``(M, K)`` the PCD chains' last documents;
        each PCD call draws h from them and then the words at the current documents'
        lengths (in the state dict once they exist; see :meth:`persistent_negatives`).
    Shapes:
        v: ``(*batch, K)`` non-negative integer counts (integer dtype, or the
        parameters' float dtype with integral values), each document of length ≥ 1.
    Complexity:
        free energy, one Gibbs sweep: O(B·K·F) (+ O(B·max D) per sweep for the word
        draws); exact log Z_D for L lengths: O(2^F·K·F + 2^F·L).
    Example:
        >>> import torch, structgrad as sg
        >>> g = torch.Generator().manual_seed(0)
        >>> rsm = sg.ReplicatedSoftmax(num_visible=5, num_hidden=2, generator=g)
        >>> docs = torch.tensor([[3, 0, 1, 0, 0], [0, 0, 2, 2, 1]])
        >>> rsm.gibbs(docs, k=2, generator=g).sum(-1)       # lengths are kept
        tensor([4., 5.])
        >>> rsm.log_partition(torch.tensor([4, 5])).shape  # exact log Z_D
        torch.Size([2])
    """

    def __init__(
        self,
        num_visible: int,
        num_hidden: int,
        *,
        scale_hidden_bias: bool = True,
        init_std: float = 0.01,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: Any = None,
    ) -> None:
        if not isinstance(scale_hidden_bias, bool):
            raise DTypeError(f"scale_hidden_bias: expected a bool, got {type(scale_hidden_bias).__name__}")
        super().__init__(num_visible, num_hidden, init_std=init_std, generator=generator, dtype=dtype, device=device)
        self.scale_hidden_bias = scale_hidden_bias

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scale_hidden_bias={self.scale_hidden_bias}"

    def _check_values(self, v: torch.Tensor, name: str, strict: bool) -> None:
        if not v.numel():
            return
        if float(v.min()) < 0:
            raise DomainError(f"{name}: expected non-negative word counts, got a minimum of {float(v.min()):g}")
        frac = v != torch.round(v)
        if bool(frac.any()):
            raise DomainError(
                f"{name}: expected integer word counts, got non-integer values e.g. {v[frac].flatten()[:3].tolist()}"
            )
        D = v.sum(-1)
        if bool((D < 1).any()):
            where = torch.nonzero(D < 1)[0].tolist()
            raise DomainError(
                f"{name}: expected documents of length D = sum of counts >= 1, got a document of length 0 "
                f"at batch index {tuple(where)}"
            )

    def _lengths(self, v: torch.Tensor) -> torch.Tensor:
        return v.sum(-1)

    def _input(
        self, v: torch.Tensor, lengths: torch.Tensor | None, weight: torch.Tensor, hidden_bias: torch.Tensor
    ) -> torch.Tensor:
        if self.scale_hidden_bias:
            return lengths.unsqueeze(-1) * hidden_bias + v @ weight
        return hidden_bias + v @ weight

    def _draw_visible(self, logits: torch.Tensor, lengths: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
        return multinomial_counts(logits, lengths.round().to(torch.long), generator=generator)

    _pcd_per_document = True

    def _pcd_negatives(self, v0: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
        # Row n takes chain n of the FIFO queue of stored documents; each sweep draws h from
        # the chain's current document (its own length, the current parameters) and then
        # the words at the row's length D_n; the chain goes to the back of the queue.
        D = self._lengths(v0)
        B = v0.shape[0]
        with torch.no_grad():
            chains = self.persistent_chains
            M = 0 if chains is None else chains.shape[0]
            if B > M:  # new chains start at the data of the rows that take them
                chains = v0[M:] if chains is None else torch.cat([chains, v0[M:]])
            v = chains[:B]
            for _ in range(k):
                h = self._sample_hidden(v, self._lengths(v), generator)
                v = self._draw_visible(self._visible_logits(h), D, generator)
            self.persistent_chains = torch.cat([chains[B:], v])
        return v

    def sample_visible(
        self, h: torch.Tensor, lengths: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """One draw of D_n words per document from softmax(b + W h_n), as counts.

        Args:
            h: ``(*batch, F)`` hidden states (float in the model's dtype).
            lengths: ``(*batch,)`` integer document lengths D_n ≥ 1.
        Returns:
            ``(*batch, K)`` counts summing to ``lengths``, detached.
        """
        h = _check_hidden(self, h)
        D = self._check_lengths(lengths, "lengths")
        V.check_shape(D, h.shape[:-1], "lengths", "(the batch shape of h)")
        self._check_generator(generator)
        with torch.no_grad():
            return self._draw_visible(self._visible_logits(h), D, generator)

    def _check_lengths(self, lengths: Any, name: str) -> torch.Tensor:
        if not isinstance(lengths, torch.Tensor):
            if isinstance(lengths, bool) or not hasattr(lengths, "__index__"):
                raise DTypeError(f"{name}: expected an integer or a tensor of integers, got {type(lengths).__name__}")
            lengths = torch.tensor(int(lengths), device=self.device)
        if lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise DTypeError(f"{name}: expected integer lengths, got dtype {lengths.dtype}")
        if lengths.device != self.device:
            raise DeviceError(f"{name} is on device {lengths.device} but the model is on {self.device}")
        if lengths.dtype.is_floating_point and bool((lengths != torch.round(lengths)).any()):
            raise DomainError(f"{name}: expected integer lengths, got non-integer values")
        if lengths.numel() and bool((lengths < 1).any()):
            raise DomainError(f"{name}: expected document lengths >= 1, got a minimum of {lengths.min().item():g}")
        return lengths.to(self.dtype)

    def _base_log_z(self, b_A: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        # Z_0 = 2^F (Σ_k e^{b_A,k})^D: W = 0 and a = 0 at β = 0.
        return self.num_hidden * math.log(2.0) + lengths * logsumexp(b_A, -1)

    def log_partition(self, lengths: Any, *, max_states: int = 2**22) -> torch.Tensor:
        """Exact log Z_D by enumerating the 2^F hidden states.

        log Z_D = logsumexp_h [ s(D)·h·a + D · logsumexp_k (b_k + (Wh)_k) ]: the
        words are independent given h, so any vocabulary size and length works.

        Args:
            lengths: document lengths D ≥ 1, an int or an integer tensor of any shape.
            max_states: refuse (``DomainError``) when 2^F exceeds this.
        Returns:
            ``lengths.shape`` log partition functions, differentiable (gradient:
            E_{p_D}[v hᵀ], E_{p_D}[v], s(D)·E_{p_D}[h]).
        Complexity: O(2^F·(K·F + L)) time for L lengths; memory chunked.
        """
        D = self._check_lengths(lengths, "lengths")
        max_states = V.check_positive_int(max_states, "max_states")
        F_ = self.num_hidden
        if 2**F_ > max_states:
            raise DomainError(
                f"log_partition: exact enumeration needs 2^{F_} hidden states (num_hidden = {F_}), "
                f"more than max_states = {max_states}; use ais_log_partition()"
            )
        flat = D.reshape(-1)
        sD = flat if self.scale_hidden_bias else torch.ones_like(flat)
        chunk = max(1, 2**22 // max(self.num_visible + flat.numel(), 1))
        acc = None
        for start in range(0, 2**F_, chunk):
            H = _hidden_states(F_, start, min(2**F_, start + chunk), self.dtype, self.device)
            ha = H @ self.hidden_bias  # (C,)
            lv = logsumexp(self.visible_bias + H @ self.weight.T, -1)  # (C,)
            s = sD.unsqueeze(0) * ha.unsqueeze(1) + flat.unsqueeze(0) * lv.unsqueeze(1)  # (C, L)
            part = logsumexp(s, 0)
            acc = part if acc is None else logaddexp(acc, part)
        return acc.reshape(D.shape)

    def ais_log_partition(
        self,
        lengths: Any,
        *,
        path: str = "length",
        num_chains: int = 100,
        steps_per_word: int | None = None,
        num_betas: int | None = None,
        betas: torch.Tensor | None = None,
        base_visible_bias: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> AISEstimate:
        """Annealed importance sampling estimate of log Z_D, with its standard error.

        Two annealing paths:

        ``path="length"`` (default): anneal the document length.  With the words
        summed out, Z_t = Σ_h π*_t(h), π*_t(h) = exp(s(t)·h·a + t·lse_k(b_k + (Wh)_k)),
        goes from t = 0 (Z_0 = 2^F, or Π_j(1 + e^{a_j}) without the D scaling) to
        t = D on a grid of ``steps_per_word`` points per word.  The weight grows by
        Δt·r(h) with r(h) = log π*_{t+1}(h) − log π*_t(h) = lse_k(b_k + (Wh)_k) (+ h·a
        with the D scaling); the move at t is the model's own Gibbs sweep for a
        document of ⌊t⌋ words (h → ⌊t⌋ words → h'), accepted with probability
        min(1, exp((t − ⌊t⌋)(r(h') − r(h)))) (Metropolis–Hastings; always at whole
        t).  One run serves every length up to max(D).  The modes of a trained RSM
        (topics) separate in proportion to D, so chains choose among them while
        documents are still short: on a 10-unit Reuters model (100 chains) this
        path is 0.37 nats off the exact log Z_369 (standard error 0.20) where the
        temperature path (1000 β) is 67 nats low.

        ``path="temperature"``: Salakhutdinov & Murray's path, β from 0 to 1,
        p*_β(V) = exp(v·((1−β) b_A + β b)) Π_j (1 + exp(β (s(D) a_j + (vW)_j))), from the
        base (W = 0, a = 0, visible bias b_A: Z_0 = 2^F (Σ_k e^{b_A,k})^D) to the RSM,
        one Gibbs sweep per β, one run per distinct length.

        Either way log Ẑ = log Z_0 + log mean_m w_m: unbiased in Z, biased low in
        log Z when the chains miss a mode, which the standard error cannot show.
        Both paths run in float64 whatever the model's dtype (parameters, chains,
        r(h) and the temperature increments); the result is returned in the model's
        dtype.

        Args:
            lengths: document lengths D ≥ 1, an int or an integer tensor of any shape.
            path: ``"length"`` or ``"temperature"``.
            num_chains: M ≥ 2 runs (per distinct length for the temperature path).
            steps_per_word: length path only: grid points per word (default 1).
            num_betas: temperature path only: schedule length for :func:`ais_betas`
                (default 1000; ignored when ``betas`` is given).
            betas: temperature path only: ``(K,)`` a non-decreasing schedule from 0 to 1.
            base_visible_bias: temperature path only: ``(K,)`` b_A; default: the
                model's visible bias.  A good base is the log unigram frequencies.
            generator: a ``torch.Generator`` on the model's device.
        Returns:
            :class:`AISEstimate` with ``log_z`` and ``stderr`` of ``lengths.shape``
            and log weights ``(M, *lengths.shape)``.
        Complexity: length path O(steps_per_word·max D·M·(K·F + max D));
        temperature path O(num_betas·M·U·(K·F + max D)) for U distinct lengths.
        """
        D = self._check_lengths(lengths, "lengths")
        if path not in ("length", "temperature"):
            raise DomainError(f"path: expected 'length' or 'temperature', got {path!r}")
        if path == "temperature":
            if steps_per_word is not None:
                raise DomainError("steps_per_word: used by path='length' only, got it with path='temperature'")
            uniq, inverse = torch.unique(D.reshape(-1), return_inverse=True)
            return self._ais(uniq, tuple(D.shape), inverse, num_chains,
                             1000 if num_betas is None else num_betas, betas, base_visible_bias, generator)
        for name, val in (("num_betas", num_betas), ("betas", betas), ("base_visible_bias", base_visible_bias)):
            if val is not None:
                raise DomainError(f"{name}: used by path='temperature' only, got it with path='length'")
        num_chains = V.check_positive_int(num_chains, "num_chains", minimum=2)
        steps = V.check_positive_int(1 if steps_per_word is None else steps_per_word, "steps_per_word")
        self._check_generator(generator)
        flat = D.reshape(-1).round().to(torch.long)
        d_max = int(flat.max()) if flat.numel() else 0
        lw = self._run_length_ais(d_max, num_chains, steps, generator)  # (d_max + 1, M)
        if self.scale_hidden_bias:
            log_z0 = torch.tensor(self.num_hidden * math.log(2.0), dtype=torch.float64, device=self.device)
        else:
            log_z0 = self._bernoulli.log_partition(self.hidden_bias.detach().to(torch.float64))
        sel = lw[flat]  # (L, M)
        log_z = log_z0 + logsumexp(sel, -1) - math.log(num_chains)
        w = torch.exp(sel - sel.amax(-1, keepdim=True))
        stderr = w.std(-1) / (math.sqrt(num_chains) * w.mean(-1))
        shape = tuple(D.shape)
        return AISEstimate(
            log_z.to(self.dtype).reshape(shape),
            stderr.to(self.dtype).reshape(shape),
            sel.T.to(self.dtype).reshape((num_chains,) + shape),
        )

    def _run_length_ais(self, d_max: int, M: int, steps: int, generator: torch.Generator | None) -> torch.Tensor:
        """Cumulative log AIS weights ``(d_max + 1, M)`` at the whole lengths 0..d_max, all in float64."""
        f64 = torch.float64
        W, b, a = (p.detach().to(f64) for p in (self.weight, self.visible_bias, self.hidden_bias))
        scaled = self.scale_hidden_bias

        def r(h: torch.Tensor) -> torch.Tensor:  # log π*_{t+1}(h) − log π*_t(h)
            out = logsumexp(b + h @ W.T, -1)
            return out + h @ a if scaled else out

        def gibbs_h(h: torch.Tensor, d: int) -> torch.Tensor:  # h → d words → h'
            if d == 0:
                u = torch.zeros_like(h) if scaled else a.expand_as(h)
            else:
                tot = torch.full((M,), d, dtype=torch.long, device=self.device)
                v = multinomial_counts(b + h @ W.T, tot, generator=generator)
                u = (d * a if scaled else a) + v @ W
            return self._bernoulli.sample(u, 1, generator=generator)[0]

        out = torch.zeros(d_max + 1, M, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            h = gibbs_h(torch.zeros(M, self.num_hidden, dtype=f64, device=self.device), 0)  # exact π_0
            r_h = r(h)
            lw = torch.zeros(M, dtype=torch.float64, device=self.device)
            n = d_max * steps
            for i in range(1, n + 1):
                lw += r_h / steps
                d, frac = divmod(i, steps)
                if frac == 0:
                    out[d] = lw
                if i == n:
                    break
                prop = gibbs_h(h, d)
                r_p = r(prop)
                if frac == 0:
                    h, r_h = prop, r_p
                else:
                    u = torch.rand(M, dtype=torch.float64, device=self.device, generator=generator)
                    acc = torch.log(u) < (frac / steps) * (r_p - r_h)
                    h = torch.where(acc.unsqueeze(-1), prop, h)
                    r_h = torch.where(acc, r_p, r_h)
        return out

    def log_prob(self, v: torch.Tensor, *, log_z: torch.Tensor | None = None, counts: bool = False) -> torch.Tensor:
        """log p(V) = −F(v) − log Z_D of each document's word sequence.

        Args:
            v: ``(*batch, K)`` word counts.
            log_z: ``(*batch,)`` log Z_{D_n} of each document's length (e.g. from
                :meth:`ais_log_partition` of ``v.sum(-1)``); ``None``: exact.
            counts: add log(D! / Π_k v_k!) to get the probability of the count
                vector instead of the ordered sequence.
        Returns:
            ``(*batch,)``, differentiable in the parameters.
        """
        v = self._check_visible(v, "v")
        if not isinstance(counts, bool):
            raise DTypeError(f"counts: expected a bool, got {type(counts).__name__}")
        D = v.sum(-1)
        if log_z is None:
            log_z = self.log_partition(D)
        else:
            log_z = _check_log_z(self, log_z, tuple(v.shape[:-1]))
        out = -self._free_energy(v) - log_z
        if counts:
            out = out + torch.lgamma(D + 1) - torch.lgamma(v + 1).sum(-1)
        return out

    def perplexity(self, v: torch.Tensor, *, log_z: torch.Tensor | None = None) -> torch.Tensor:
        """Test perplexity exp(−(1/N) Σ_n log p(V_n) / D_n), as in the RSM paper.

        Args:
            v: ``(*batch, K)`` held-out documents.
            log_z: ``(*batch,)`` log Z_{D_n} (e.g. AIS); ``None``: exact.
        Returns:
            A 0-dim tensor (detached).
        """
        with torch.no_grad():
            lp = self.log_prob(v, log_z=log_z)
            v = self._check_visible(v, "v")
            return torch.exp(-(lp / v.sum(-1)).mean())


# ====================================================================== helpers
def _check_hidden(model: _RBMBase, h: Any) -> torch.Tensor:
    if not isinstance(h, torch.Tensor):
        raise DTypeError(f"h: expected a torch.Tensor of shape (*batch, {model.num_hidden}), got {type(h).__name__}")
    if h.device != model.device:
        raise DeviceError(f"h is on device {h.device} but the model is on {model.device}")
    if h.dtype != model.dtype:
        if h.dtype.is_floating_point or h.dtype.is_complex:
            raise DTypeError(f"h: expected dtype {model.dtype} (the model's parameters), got {h.dtype}")
        h = h.to(model.dtype)
    if h.dim() == 0 or h.shape[-1] != model.num_hidden:
        raise ShapeError(f"h: expected shape (*batch, {model.num_hidden}) (num_hidden), got {V.fmt_shape(h.shape)}")
    if h.numel() and bool(((h != 0) & (h != 1)).any()):
        raise DomainError("h: expected hidden states in {0, 1}")
    return h


def _check_log_z(model: _RBMBase, log_z: Any, shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(log_z, torch.Tensor) or log_z.dtype != model.dtype:
        raise DTypeError(
            f"log_z: expected a tensor of dtype {model.dtype}, got {getattr(log_z, 'dtype', type(log_z).__name__)}"
        )
    if log_z.device != model.device:
        raise DeviceError(f"log_z is on device {log_z.device} but the model is on {model.device}")
    V.check_shape(log_z, shape, "log_z", "(one value per document)" if shape else "(a 0-dim tensor)")
    return log_z
