"""The Replicated Softmax topic model (private; the public names live in :mod:`structgrad.rbm`).

The math, the CD gradient and the answer to seed 002's question are in the
docstring of :mod:`structgrad.rbm`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import checks as V
from ._rbm_ais import AISEstimate, length_ais, temperature_ais
from ._rbm_base import RBMBase, check_hidden, check_log_z, hidden_states
from .errors import DeviceError, DomainError, DTypeError
from .logspace import logaddexp, logsumexp, multinomial_counts

__all__ = ["ReplicatedSoftmax"]


class ReplicatedSoftmax(RBMBase):
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
        num_visible: K, the vocabulary size.
        num_hidden: F.
        scale_hidden_bias: multiply the hidden bias by D (default, as in the paper).
        init_std: weights start as N(0, init_std²); biases start at 0 (set
            ``visible_bias`` to the log word frequencies of the data for a better start).
        generator: for the initial weights (``None``: torch's default generator).
        dtype: of the parameters (default: torch's default dtype); inputs must match it.
        device: of the parameters (default: CPU); inputs must be on it.

    Module parameters:
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

    Examples:
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
        h = check_hidden(self, h)
        D = self._check_lengths(lengths, "lengths")
        V.check_shape(D, h.shape[:-1], "lengths", "(the batch shape of h)")
        self._check_generator(generator)
        self._check_parameters()
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
            H = hidden_states(F_, start, min(2**F_, start + chunk), self.dtype, self.device)
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
            self._check_parameters()
            uniq, inverse = torch.unique(D.reshape(-1), return_inverse=True)
            return temperature_ais(self, uniq, tuple(D.shape), inverse, num_chains,
                                   1000 if num_betas is None else num_betas, betas, base_visible_bias, generator)
        for name, val in (("num_betas", num_betas), ("betas", betas), ("base_visible_bias", base_visible_bias)):
            if val is not None:
                raise DomainError(f"{name}: used by path='temperature' only, got it with path='length'")
        self._check_parameters()
        return length_ais(self, D, num_chains, steps_per_word, generator)

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
            log_z = check_log_z(self, log_z, tuple(v.shape[:-1]))
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
