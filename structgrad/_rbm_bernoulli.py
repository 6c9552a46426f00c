"""The Bernoulli–Bernoulli RBM (private; the public names live in :mod:`structgrad.rbm`).

The math, the CD gradient and the answer to seed 002's question are in the
docstring of :mod:`structgrad.rbm`.
"""

from __future__ import annotations

import math
import torch

from . import checks as V
from ._rbm_ais import AISEstimate, temperature_ais
from ._rbm_base import RBMBase, check_hidden, check_log_z, hidden_states
from .errors import DomainError
from .logspace import logaddexp, logsumexp

__all__ = ["BernoulliRBM"]


class BernoulliRBM(RBMBase):
    r"""Bernoulli–Bernoulli restricted Boltzmann machine (an ``nn.Module``).

    E(v, h) = −v·b − h·c − vᵀW h with v ∈ {0,1}^K, h ∈ {0,1}^F;
    F(v) = −v·b − Σ_j softplus(c_j + (vW)_j); p(v) = e^{−F(v)}/Z.
    p(h_j = 1 | v) = σ(c_j + (vW)_j), p(v_k = 1 | h) = σ(b_k + (Wh)_k), both drawn by
    the ``bernoulli`` solver.

    Args:
        num_visible: K.
        num_hidden: F.
        init_std: weights start as N(0, init_std²); biases start at 0.
        generator: for the initial weights (``None``: torch's default generator).
        dtype: of the parameters (default: torch's default dtype); inputs must match it.
        device: of the parameters (default: CPU); inputs must be on it.

    Module parameters:
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

    Examples:
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
        h = check_hidden(self, h)
        self._check_generator(generator)
        self._check_parameters()
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
            S = hidden_states(n, start, min(2**n, start + chunk), self.dtype, self.device)
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
        self._check_parameters()
        return temperature_ais(self, None, (), None, num_chains, num_betas, betas, base_visible_bias, generator)

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
            log_z = check_log_z(self, log_z, ())
        return -self._free_energy(v) - log_z
