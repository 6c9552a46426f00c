"""The DPM contrastive objective (NUCLR) with per-sample moving averages and learnable ζ (seed 000).

Discriminative probabilistic modelling of paired data (x_i, y_i), i = 1..n, with a
score ``E_w(x, y)`` (``sim[i, j] = E_w(x_i, y_j)`` for a batch).  For anchor x_i the
candidates y_j are weighted by a softmax over the dataset with a learnable
per-candidate log-normaliser ζ_j and an extra, invisible outcome of weight
``exp(−ξ/τ)`` standing in for the positive:

    L_ij = (E_ij − E_ii − ζ_j) / τ,
    p_ij = exp(L_ij) / (exp(−ξ/τ) + Σ_{j'≠i} exp(L_ij'))            (j ≠ i),
    G_w  = (1/n) Σ_i Σ_{j≠i} p_ij (∇E_ij − ∇E_ii)  = ∇_w F_x,
    F_x  = (1/n) Σ_i τ log(exp(−ξ/τ) + Σ_{j≠i} exp(L_ij)).

p_ij are categorical marginals with an offset (:func:`structgrad.logspace.softmax_with_offset`).
A batch 𝓑 of B pairs cannot see the whole sum, so each anchor keeps a moving average

    s_i ← (1 − γ) s_i + γ Σ_{j∈𝓑∖{i}} exp(L_ij)      (first visit: s_i = the batch value),

an estimate of ((B−1)/(n−1)) Σ_{j'≠i} exp(L_ij').  (The state keeps s_i/(B−1), the same
thing for a fixed B, so that a short last batch or a varying B updates one estimate of
(1/(n−1)) Σ_{j'≠i} exp(L_ij') instead of mixing sums over different numbers of
negatives.)  The stochastic gradient is

    Ĝ_w = (1/B) Σ_{i∈𝓑} Σ_{j∈𝓑∖{i}} W_ij (∇E_ij − ∇E_ii),   W_ij = exp(L_ij) / (offset + s_i),
    offset = ((B−1)/(n−1)) exp(−ξ/τ).

ζ descends the ζ objective Φ(ζ) = (1/n) Σ_i τ log((1/(n−1)) Σ_{j'} exp(L'_ij')) + (1/n) Σ_j ζ_j
(L' is L with the diagonal L'_ii = −ζ_i/τ kept), whose gradient is
G_ζj = −(1/n) Σ_i P_ij + 1/n with P the row softmax of L'; at a fixed point every
column of P sums to 1.  With s̃_i = exp(−ζ_i/τ)/(n−1) + s_i/(B−1) (``offset_tilde`` is
the first term) and q_ij = exp(L'_ij) / ((n−1) s̃_i), the n-rescaled stochastic derivative
for j ∈ 𝓑 is

    seed:      n Ĝ_ζj = 1 − (n/B) Σ_{i∈𝓑} q_ij,
    unbiased:  n Ĝ_ζj = 1 − q_jj − ((n−1)/(B−1)) Σ_{i∈𝓑∖{j}} q_ij,

followed by momentum u_j ← (1 − θ) u_j + θ n Ĝ_ζj (u_j = n Ĝ_ζj on the first step) and
ζ_j ← ζ_j − η u_j.  ξ is reset to max(ξ_0, max_j ζ_j) by :meth:`DPMLoss.update_xi`.

Both directions are used: anchors x_i against candidates y_j (ζ of the y's, ξ_y) and
anchors y_j against candidates x_i (ζ of the x's, ξ_x); the surrogates are summed.

The two ζ estimators.  Given j ∈ 𝓑, the other B − 1 members are a uniform sample of
the n − 1 other indices, while the term i = j (the positive pair, q_jj) is always in
the batch.  The seed's estimator weights every term by n/B, so in expectation it
gives the positive term n/B times its weight in G_ζ; the ``"unbiased"`` estimator
weights q_jj by 1 and the others by (n−1)/(B−1), and with exact s its average over
batches equals n G_ζ exactly.  The two agree when B = n.  The difference matters
when B ≪ n: the seed's expected step vanishes where (n/B) P_jj + (n(B−1)/(B(n−1)))
Σ_{i≠j} P_ij = 1, i.e. at column sums Σ_i P_ij ≈ 1 + (1 − n P_jj)/(B − 1), below 1
(ζ too high) as soon as the positive's share P_jj exceeds 1/n, as it does for a
trained encoder.  ``"seed"`` is the default, to reproduce the published results.

Numerics: everything is kept in log space (``log s``, log-sum-exp over the batch,
``logaddexp`` for the moving average and the offset), so no stability shift has to be
carried in the state and no rescaling factor can be got wrong; the published code
rescales s by exp(b_old − b_new) where exp((b_old − b_new)/τ) is due.  The weights are
formed as W_ij = ρ_i π_ij, π the categorical marginals (softmax over the candidates)
and ρ_i = S_i/(offset + s_i) ≤ 1/γ the anchor's mass, so no overflowing factor is ever
built; for γ = 1 (or a first visit) W_i· is exactly ``softmax_with_offset(L_i·, log offset)``.
``−inf`` scores off the diagonal mean "impossible pair" and get weight 0.

References:
    B. Wang, Y. Lei, Y. Ying, T. Yang.  On Discriminative Probabilistic Modeling for
    Self-Supervised Representation Learning.  ICLR 2025.  (NUCLR; code github.com/bokun-wang/NUCLR)
    Z. Yuan et al.  Provable Stochastic Optimization for Global Contrastive Learning:
    Small Batch Does Not Harm Performance.  ICML 2022.  (SogCLR: ζ = 0, no offset.)

Examples:
    >>> import torch, structgrad as sg
    >>> crit = sg.DPMLoss(100, tau=0.1, gamma=0.8, xi=0.0)
    >>> x = torch.nn.functional.normalize(torch.randn(8, 4, requires_grad=True), dim=-1)
    >>> y = torch.nn.functional.normalize(torch.randn(8, 4), dim=-1)
    >>> out = crit(x @ y.T, torch.arange(8))
    >>> out.surrogate.backward()    # gradient = the seed's Ĝ_w; out.objective is the loss to watch
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import nn

from . import _dpm_kernels as K
from . import checks as V
from . import logspace as ls
from ._dpm_gather import all_gather_with_grad
from ._dpm_kernels import ZETA_ESTIMATORS
from .errors import DeviceError, DomainError, DTypeError, ShapeError

__all__ = ["ZETA_ESTIMATORS", "DPMOutput", "DPMLoss", "dpm_surrogate", "all_gather_with_grad"]

_NEG_INF = K.NEG_INF


class DPMOutput(NamedTuple):
    """What :class:`DPMLoss` and :func:`dpm_surrogate` return.

    Attributes:
        surrogate: ``()`` in sim's dtype.  Call ``surrogate.backward()``: its gradient
            with respect to ``sim`` is the seed's Ĝ_w (both directions summed), i.e.
            ``sim.grad[i, j] = (W^x_ij + W^y_ij) / B`` off the diagonal and
            ``−(Σ_j W^x_ij + Σ_j W^y_ji) / B`` on it.  Its *value*
            ``Σ_ij W_ij (E_ij − E_ii) / B`` (what the published code returns as its loss)
            is not an objective: it is usually negative, as with LibAUC's GCL/SogCLR
            losses, and need not decrease.  Watch ``objective`` instead.
        objective: ``()`` detached, ``objective_x + objective_y``.
        objective_x: ``()`` detached; the batch estimate of the DPM objective
            F_x = (1/n) Σ_i τ log(exp(−ξ/τ) + Σ_{j≠i} exp(L_ij)) whose gradient is G_w,
            ``mean_i τ (log(offset + s_i) − log((B−1)/(n−1)))`` (exact when B = n and γ = 1).
            Equivalently −ξ − τ·mean_i log p_ii, the cross-entropy of the positive.  It
            depends on ζ and ξ: compare values while they are fixed (it drops by Δξ when
            :meth:`DPMLoss.update_xi` raises ξ).
        objective_y: the same for the anchors y_j.
        zeta_grad_x: ``(B,)`` detached n Ĝ_ζ for ζ of the x's in the batch (from the
            anchors y); 0 at a fixed point of ζ.  Computed whether or not ζ is stepped.
        zeta_grad_y: ``(B,)`` the same for ζ of the y's (from the anchors x).
    """

    surrogate: torch.Tensor
    objective: torch.Tensor
    objective_x: torch.Tensor
    objective_y: torch.Tensor
    zeta_grad_x: torch.Tensor
    zeta_grad_y: torch.Tensor




# ---------------------------------------------------------------------------- functional
def dpm_surrogate(
    sim: torch.Tensor,
    log_s_x: torch.Tensor,
    log_s_y: torch.Tensor,
    *,
    zeta_x: torch.Tensor,
    zeta_y: torch.Tensor,
    xi_x: float | torch.Tensor,
    xi_y: float | torch.Tensor,
    tau: float,
    num_samples: int,
    zeta_estimator: str = "seed",
) -> DPMOutput:
    """The DPM surrogate for given moving averages: the stateless core of :class:`DPMLoss`.

    Use it to supply s from elsewhere (exact sums for a small dataset, a state kept
    by your own code); :class:`DPMLoss` computes the moving averages and updates ζ.

    Args:
        sim: ``(B, B)`` scores, ``sim[i, j] = E_w(x_i, y_j)``; ``-inf`` off the
            diagonal marks an impossible pair; the diagonal must be finite.
        log_s_x: ``(B,)`` log s_i for the anchors x_i, the estimate of
            log(((B−1)/(n−1)) Σ_{j≠i} exp(L_ij)) (already updated with this batch).
        log_s_y: ``(B,)`` the same for the anchors y_j.
        zeta_x: ``(B,)`` ζ of the x's in the batch.
        zeta_y: ``(B,)`` ζ of the y's in the batch.
        xi_x: ξ used where the x's are the candidates, i.e. the offset of the
            anchors y; ``inf`` removes the offset.
        xi_y: ξ used where the y's are the candidates (the offset of the anchors x).
        tau: temperature τ > 0.
        num_samples: the dataset size n ≥ B.
        zeta_estimator: ``"seed"`` or ``"unbiased"`` (module docstring).

    Returns:
        :class:`DPMOutput`; ``surrogate`` has gradient Ĝ_w with respect to ``sim``.

    Shapes:
        sim ``(B, B)``; every vector ``(B,)``; outputs ``()`` or ``(B,)``, in sim's dtype.

    Complexity:
        O(B²) time and memory, a few passes over a (B, B) buffer per direction.

    Examples:
        >>> import torch, structgrad as sg
        >>> from structgrad.dpm import dpm_surrogate
        >>> sim = torch.randn(4, 4, requires_grad=True)
        >>> z = torch.zeros(4)
        >>> out = dpm_surrogate(sim, z, z, zeta_x=z, zeta_y=z, xi_x=0.0, xi_y=0.0, tau=0.5, num_samples=10)
        >>> out.surrogate.backward()
    """
    n = V.check_positive_int(num_samples, "num_samples", minimum=2)
    tau = K.check_real(tau, "tau", lo=0.0, lo_open=True)
    xi_x, xi_y = K.check_xi(xi_x, "xi_x"), K.check_xi(xi_y, "xi_y")
    estimator = K.check_estimator(zeta_estimator)
    B = K.check_sim_shape(sim, n)
    masked = K.sim_has_neginf(sim)
    vecs = {nm: K.check_vector(v, nm, B, sim.device) for nm, v in
            (("log_s_x", log_s_x), ("log_s_y", log_s_y), ("zeta_x", zeta_x), ("zeta_y", zeta_y))}
    for nm in ("zeta_x", "zeta_y"):
        if not bool(torch.isfinite(vecs[nm]).all()):
            bad = vecs[nm].detach()[~torch.isfinite(vecs[nm])][:3].tolist()
            raise DomainError(f"{nm}: expected finite values, got {bad}")
    for nm in ("log_s_x", "log_s_y"):
        v = vecs[nm]
        if bool((torch.isnan(v) | torch.isposinf(v)).any()):
            raise DomainError(f"{nm}: expected log s in [-inf, inf), got NaN or +inf")
    wd = K.work_dtype(sim.dtype, *(v.dtype for v in vecs.values()))
    with torch.no_grad():
        log_s = torch.stack((vecs["log_s_x"], vecs["log_s_y"])).to(wd)  # the anchors' s
        nzs = torch.stack((vecs["zeta_y"], vecs["zeta_x"])).to(wd).div_(-tau)  # the candidates' −ζ/τ
        xi = torch.tensor([xi_y, xi_x], dtype=wd, device=sim.device)
        pi_x, pi_y, lse = K.marginals(sim, nzs, tau, wd, masked)
        if bool((torch.isneginf(log_s) & torch.isfinite(lse) & (xi == math.inf).unsqueeze(1)).any()):
            raise DomainError(
                "log_s_x/log_s_y: got -inf (s = 0) for an anchor whose negatives have positive weight, "
                "with no offset (xi = inf); the weights would be infinite"
            )
    return DPMOutput(*K.finish(sim, pi_x, pi_y, lse, log_s, nzs, xi, tau, n, estimator, masked)[0])


# ---------------------------------------------------------------------------- module
class DPMLoss(nn.Module):
    """DPM contrastive objective (NUCLR) with per-sample state; see the module docstring.

    Args:
        num_samples: the dataset size n ≥ 2.  It is a constant of the formulas
            (the offset (B−1)/(n−1) exp(−ξ/τ), the n-rescaling of Ĝ_ζ), not only the
            length of the state: pass the true number of pairs.
        tau: temperature τ > 0 (published: 0.01 for CLIP on CC3M).
        gamma: moving-average rate γ ∈ (0, 1] of s (published: 0.8); γ = 1 uses the
            batch value only.
        xi: initial ξ_0 (published: 0.0); ``inf`` removes the offset (SogCLR when ζ = 0).
        zeta: initial ζ for every sample (published: −0.05).
        zeta_lr: ζ step size η ≥ 0, one number for both directions or a pair
            ``(η_x, η_y)`` for ζ of the x's and of the y's (published: η_y = 5e-6 under a
            cosine schedule, η_x = 0.1 η_y).  Settable between steps (``crit.zeta_lr = ...``)
            to schedule it; 0 freezes ζ.
        zeta_momentum: θ ∈ (0, 1], the weight of the new derivative in
            u ← (1 − θ) u + θ n Ĝ_ζ (published: 0.9); 1 means no momentum.
        zeta_start_step: ζ stays frozen during the first this-many training steps
            (published: 5 epochs' worth).
        zeta_estimator: ``"seed"`` (default, reproduces the paper) or ``"unbiased"``.
        device: of the state (default: CPU).
        dtype: of the floating state (default: the default dtype);
            ``.to()``, ``.double()`` move and cast it like any buffer (``.double()``
            widens the float32 initial ξ and ζ; pass ``dtype=torch.float64`` to start
            from the exact values).
    State (registered buffers; ``state_dict`` round-trips bit-exactly).  Row 0 holds what
    the anchors x use, row 1 what the anchors y use; the views ``log_s_x``, ``log_s_y``,
    ``zeta_x``, ``zeta_y``, ``zeta_momentum_x``, ``zeta_momentum_y``, ``xi_x``, ``xi_y``
    name them by side:
        ``log_s`` (2, n): log(s_i / (B − 1)) of the anchors x_i (row 0) and y_i (row 1), s
        per negative (−inf until visited), so that batches of any size share one
        estimate; s_i for a batch of B is (B − 1) exp(log_s), for a fixed B exactly the
        seed's s.
        ``zeta`` (2, n): ζ of the candidates, the y_i (row 0) and the x_i (row 1).
        ``zeta_momentum`` (2, n): their momentum u.  ``xi`` (2,): ξ_y (row 0), ξ_x (row 1).
        ``visited`` (n,) bool: s has been set.  ``zeta_started`` (n,) bool: u has been set.
        ``step`` () int64: training steps taken.

    Forward:
        ``forward(sim, index)`` with ``sim (B, B)``, ``sim[i, j] = E_w(x_i, y_j)`` for the
        pairs at dataset positions ``index (B,)`` (distinct, in [0, n)); any B in [2, n]
        (no fixed batch size, no drop_last).  In training mode it updates s (first visit:
        the batch value), then, from step ``zeta_start_step`` on, the ζ momentum and ζ of the
        batch **inside forward** (there is no separate step method; the derivative uses the
        ζ from before the step), and counts the step.  In eval mode nothing is written.
        Returns a :class:`DPMOutput`: backpropagate ``surrogate``, log ``objective``.

    Shapes:
        sim ``(B, B)`` float (any float dtype; computed in at least float32 and the state's
        dtype), index ``(B,)`` integer, same device as the state.

    Complexity:
        O(B²) time and memory per call (one fused softmax and a few passes over a (B, B)
        buffer per direction, no Python loop over the batch); O(n) state.  A few host
        synchronisations per call (the index checks, the step counter, and a finiteness
        check of the result, which inspects sim only when something is not finite).

    Data parallel:
        gather the features of every rank with :func:`all_gather_with_grad` (and the
        indices), compute the full (B, B) sim on every rank and call the loss there; the
        state then evolves identically on every rank, and DDP's gradient averaging gives
        the gradient of one process on the concatenated batch.  Call :meth:`update_xi`
        on every rank.

    Examples:
        >>> import torch, structgrad as sg
        >>> crit = sg.DPMLoss(1000, tau=0.1, gamma=0.8, xi=0.0, zeta_lr=1e-3)
        >>> sim = torch.randn(16, 16, requires_grad=True)
        >>> out = crit(sim, torch.randperm(1000)[:16])
        >>> out.surrogate.backward()
        >>> float(out.objective) > -1e9
        True
        >>> _ = crit.update_xi()        # once per epoch
    """

    def __init__(
        self,
        num_samples: int,
        *,
        tau: float,
        gamma: float,
        xi: float,
        zeta: float = 0.0,
        zeta_lr: float | tuple[float, float] = 1e-3,
        zeta_momentum: float = 0.9,
        zeta_start_step: int = 0,
        zeta_estimator: str = "seed",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        n = V.check_positive_int(num_samples, "num_samples", minimum=2)
        self.num_samples = n
        self.tau = K.check_real(tau, "tau", lo=0.0, lo_open=True)
        self.gamma = K.check_real(gamma, "gamma", lo=0.0, lo_open=True, hi=1.0)
        self.xi_init = K.check_xi(xi, "xi")
        zeta = K.check_real(zeta, "zeta")
        self.zeta_lr = zeta_lr
        self.zeta_momentum_rate = K.check_real(zeta_momentum, "zeta_momentum", lo=0.0, lo_open=True, hi=1.0)
        self.zeta_start_step = V.check_positive_int(zeta_start_step, "zeta_start_step", minimum=0)
        self.zeta_estimator = K.check_estimator(zeta_estimator)
        if dtype is None:
            dtype = torch.get_default_dtype()
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise DTypeError(f"dtype: expected a floating-point torch.dtype, got {dtype!r}")
        f = {"device": device, "dtype": dtype}
        self.register_buffer("step", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("visited", torch.zeros(n, dtype=torch.bool, device=device))
        self.register_buffer("zeta_started", torch.zeros(n, dtype=torch.bool, device=device))
        self.register_buffer("log_s", torch.full((2, n), _NEG_INF, **f))
        self.register_buffer("zeta", torch.full((2, n), zeta, **f))
        self.register_buffer("zeta_momentum", torch.zeros(2, n, **f))
        self.register_buffer("xi", torch.full((2,), self.xi_init, **f))
        self._zeta_init = zeta

    # -- views of the state by side (row 0: used by the anchors x, row 1: by the anchors y)
    log_s_x = property(lambda self: self.log_s[0], doc="(n,) log(s/(B−1)) of the anchors x_i (a view).")
    log_s_y = property(lambda self: self.log_s[1], doc="(n,) log(s/(B−1)) of the anchors y_i (a view).")
    zeta_x = property(lambda self: self.zeta[1], doc="(n,) ζ of the x_i, used by the anchors y (a view).")
    zeta_y = property(lambda self: self.zeta[0], doc="(n,) ζ of the y_i, used by the anchors x (a view).")
    zeta_momentum_x = property(lambda self: self.zeta_momentum[1], doc="(n,) ζ momentum of the x_i (a view).")
    zeta_momentum_y = property(lambda self: self.zeta_momentum[0], doc="(n,) ζ momentum of the y_i (a view).")
    xi_x = property(lambda self: self.xi[1], doc="() ξ of the x's, in the offset of the anchors y (a view).")
    xi_y = property(lambda self: self.xi[0], doc="() ξ of the y's, in the offset of the anchors x (a view).")

    # -- hyperparameters
    @property
    def zeta_lr(self) -> tuple[float, float]:
        """(η_x, η_y): the ζ step sizes of the x's and of the y's."""
        return self._zeta_lr

    @zeta_lr.setter
    def zeta_lr(self, value: float | tuple[float, float]) -> None:
        if isinstance(value, (tuple, list)):
            if len(value) != 2:
                raise ShapeError(f"zeta_lr: expected a number or a pair (lr_x, lr_y), got {len(value)} values")
            self._zeta_lr = (K.check_real(value[0], "zeta_lr[0]", lo=0.0), K.check_real(value[1], "zeta_lr[1]", lo=0.0))
        else:
            v = K.check_real(value, "zeta_lr", lo=0.0)
            self._zeta_lr = (v, v)

    def extra_repr(self) -> str:
        return (
            f"num_samples={self.num_samples}, tau={self.tau}, gamma={self.gamma}, xi={self.xi_init}, "
            f"zeta={self._zeta_init}, zeta_lr={self.zeta_lr}, zeta_momentum={self.zeta_momentum_rate}, "
            f"zeta_start_step={self.zeta_start_step}, zeta_estimator={self.zeta_estimator!r}"
        )

    # -- state
    @torch.no_grad()
    def update_xi(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Set ξ_x = max(ξ_0, max ζ_x) and ξ_y = max(ξ_0, max ζ_y); call once per epoch.

        Returns:
            ``(xi_x, xi_y)``, detached copies of the new values (``()`` each).
        """
        self.xi.copy_(self.zeta.amax(1).clamp_(min=self.xi_init))
        return self.xi_x.clone(), self.xi_y.clone()

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
        # A state saved for another dataset size cannot be used: say so by name (torch
        # would raise a RuntimeError listing five size mismatches).
        n = self.num_samples
        for name, shape in (("log_s", (2, n)), ("zeta", (2, n)), ("zeta_momentum", (2, n)),
                            ("visited", (n,)), ("zeta_started", (n,)), ("xi", (2,)), ("step", ())):
            t = state_dict.get(prefix + name)
            if isinstance(t, torch.Tensor) and tuple(t.shape) != shape:
                got = t.shape[-1] if t.dim() and name not in ("xi", "step") else None
                saved = f" (saved with num_samples = {got})" if got is not None else ""
                raise ShapeError(
                    f"state_dict: {prefix}{name} has shape {V.fmt_shape(t.shape)}{saved}, expected "
                    f"{V.fmt_shape(shape)} for this DPMLoss with num_samples = {n}; create the loss with "
                    f"the dataset size the state was saved for"
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    @torch.no_grad()
    def reset_state(self) -> None:
        """Forget everything learnt: s unvisited, ζ = its initial value, ξ = ξ_0, step 0."""
        self.step.zero_()
        self.visited.zero_()
        self.zeta_started.zero_()
        self.log_s.fill_(_NEG_INF)
        self.zeta.fill_(self._zeta_init)
        self.zeta_momentum.zero_()
        self.xi.fill_(self.xi_init)

    # -- forward
    def forward(self, sim: torch.Tensor, index: torch.Tensor) -> DPMOutput:
        """One step; see the class docstring.  Returns a :class:`DPMOutput`."""
        n = self.num_samples
        B = K.check_sim_shape(sim, n)
        if sim.device != self.log_s.device:
            raise DeviceError(
                f"sim is on device {sim.device} but the DPMLoss state is on {self.log_s.device}; "
                f"move the loss with .to({str(sim.device)!r})"
            )
        index = K.check_index(index, B, n, sim.device)
        wd = K.work_dtype(sim.dtype, self.log_s.dtype)
        # sim's values are checked after the fact: a NaN or ±inf anywhere in sim shows in
        # lse or in the surrogate's value, and only then is sim inspected (and, if it
        # merely holds −inf pairs, the step recomputed on the masked path).
        out, log_u, zeta_b, g_zeta, ok = self._step(sim, index, B, wd, masked=False)
        if not ok:
            if not K.sim_has_neginf(sim):  # raises on NaN, +inf or a non-finite diagonal
                raise DomainError(
                    f"sim: sim / tau overflows (tau = {self.tau}, max |sim| = {float(sim.detach().abs().max())}); "
                    f"expected |sim| / tau within the range of {wd}"
                )
            out, log_u, zeta_b, g_zeta, _ = self._step(sim, index, B, wd, masked=True)
        if self.training:
            self._write_state(index, log_u, zeta_b, g_zeta)
        return out

    def _step(self, sim, index, B, wd, masked):
        tau, g, buf = self.tau, self.gamma, self._buffers
        zeta_b = K.as_dtype(buf["zeta"].index_select(1, index), wd)
        nzs = zeta_b.div(-tau)
        pi_x, pi_y, lse = K.marginals(sim, nzs, tau, wd, masked)
        # The state holds u = s/(B − 1), the moving average of the mean over the
        # negatives, so that batches of different sizes share one estimate.
        log_b = math.log(B - 1)
        fresh = lse - log_b
        log_keep = math.log1p(-g) if g < 1.0 else _NEG_INF
        mixed = ls.logaddexp(K.as_dtype(buf["log_s"].index_select(1, index), wd).add_(log_keep), fresh + math.log(g))
        log_u = torch.where(buf["visited"].index_select(0, index), mixed, fresh)
        fields, g_zeta = K.finish(
            sim, pi_x, pi_y, lse, log_u + log_b, nzs, K.as_dtype(buf["xi"], wd), tau, self.num_samples,
            self.zeta_estimator, masked,
        )
        out = DPMOutput(*fields)
        ok = masked or math.isfinite((lse.sum() + out.surrogate.detach()).item())
        return out, log_u, zeta_b, g_zeta, ok

    def _write_state(self, index, log_u, zeta_b, g_zeta) -> None:
        """Store s, and from ``zeta_start_step`` on take the ζ momentum step."""
        buf = self._buffers
        dt = buf["log_s"].dtype
        buf["log_s"].index_copy_(1, index, K.as_dtype(log_u, dt))
        buf["visited"].index_fill_(0, index, True)
        if int(buf["step"]) >= self.zeta_start_step:
            u_old = K.as_dtype(buf["zeta_momentum"].index_select(1, index), g_zeta.dtype)
            # u ← (1 − θ) u + θ n Ĝ_ζ, and u = n Ĝ_ζ on an index's first step
            started = buf["zeta_started"].index_select(0, index)
            u = torch.where(started, torch.lerp(u_old, g_zeta, self.zeta_momentum_rate), g_zeta)
            lr_x, lr_y = self.zeta_lr
            if lr_x == lr_y:
                new = torch.sub(zeta_b, u, alpha=lr_x)
            else:  # row 0 holds ζ of the y's
                new = torch.addcmul(zeta_b, u, torch.tensor([[-lr_y], [-lr_x]], dtype=u.dtype, device=u.device))
            buf["zeta_momentum"].index_copy_(1, index, K.as_dtype(u, dt))
            buf["zeta"].index_copy_(1, index, K.as_dtype(new, dt))
            buf["zeta_started"].index_fill_(0, index, True)
        buf["step"].add_(1)
