"""``ksubset``: binary z ∈ {0, 1}^n with exactly k ones.

θ ``(*b, n)``; 𝒵 = {z ∈ {0, 1}^n : Σ_i z_i = k}; p(z; θ) ∝ exp⟨z, θ⟩.

Math:
    With x_i = exp θ_i, the partition function is the elementary symmetric
    polynomial of degree k,

        Z(θ) = Σ_{|S| = k} Π_{i∈S} x_i = e_k(x_1, ..., x_n),   A(θ) = log e_k(x).

    It is computed in log-space by the prefix recursion (a dynamic programme over
    the elements i and the subset size j)

        α[i, j] = log e_j(x_1..x_i) = logaddexp(α[i−1, j], α[i−1, j−1] + θ_i),
        α[0, 0] = 0,  α[0, j>0] = −inf,   A(θ) = α[n, k],

    and the suffix recursion β[i, j] = log e_j(x_{i+1}..x_n) alike.  The marginals
    are, with no autograd through the tables (an analytic forward-backward),

        μ_i = ∂A/∂θ_i = P(z_i = 1) = Σ_{j=0}^{k−1} exp(α[i−1, j] + θ_i + β[i, k−1−j] − A).

    (The numba backend, and the split tables below, get μ from the prefix table
    alone, by running the recursion's backward pass in probability space:
    w[i, j] = P(j of the first i chosen) with w[n, k] = 1,
    w[i−1, j] = w[i, j] p[i, j] + w[i, j+1] q[i, j+1] and μ_i = Σ_j w[i, j] q[i, j],
    p and q the shares of the two logaddexp terms, so that Σ_i μ_i = k exactly.)

    MAP = top-k (ties: lowest index first).  Sampling is exact, by either
      * conditional-Poisson rejection: independent bits z_i ~ Bernoulli(σ(θ_i + c))
        conditioned on Σ z_i = k have exactly the law p(z; θ) for any shift c; c is
        chosen so that E[Σ z_i] = k (which maximises the acceptance probability,
        about 1/sqrt(2π Σ p_i(1−p_i))), and candidates are redrawn until they have
        exactly k ones; or
      * backward sequential sampling from the prefix table: for i = n..1 with r
        ones still to place, z_i = 1 with probability σ(θ_i + α[i−1, r−1] − α[i−1, r])
        (= exp(θ_i + α[i−1, r−1] − α[i, r])).
    ``sampler="auto"`` uses rejection where it is cheap and the sequential sampler
    elsewhere; rejection gives up after a few rounds and the sequential sampler
    draws the samples still missing, so a call is exact and bounded in time.

    ``log_partition`` is differentiable with gradient ``marginals``, and
    ``marginals`` is differentiable too: its backward is the Hessian-vector
    product H v = Cov_p(z) v, computed exactly in O(nk) by the same two
    recursions carrying the running mean of ⟨z, v⟩ (an expectation semiring), so
    double backward through ``log_partition`` works (third derivatives do not).

Conventions:
    * ``-inf`` in θ marks an element that cannot be chosen.  If fewer than k
      elements can be chosen the instance is infeasible: A = −inf, and μ, the MAP
      and the samples are all zeros (as for every structgrad solver).  Its
      gradient is 0, never NaN.
    * k = 0 gives A = 0 (the empty set) and zeros; k = n gives A = Σ θ and ones.
    * θ is one tensor; NaN and +inf are refused by the shared score check
      (:meth:`Solver.check_values`, DomainError); k < 0 or k > n is a DomainError.
    * Tables are float64 whatever θ's dtype (float32 loses accuracy: A is a sum of
      up to k scores), and results are cast back to θ's dtype and device.
    * Any finite θ gives finite results and enumeration's answer (as long as A, a
      sum of k scores, is representable).  Rows with k·max|θ| > 2^20 use *split*
      tables (one host synchronisation decides): each cell holds the best subset's
      score M (a max-plus recursion, rounded like enumeration's scores) and
      L = log Σ exp(score − M), the log of how many subsets nearly tie with it, and
      every probability is formed from local differences of cells, never as
      exp(· − A).  At 1e30 in float64 the plain tables lose both: the rounding of
      the cells (~1e14) swamps log C(n, k), and exp(α + θ + β − A) came out 0 or
      inf (k = 2 marginals summing to 0 or 4).  Score differences below their own
      rounding (~k·eps·max|θ|) cannot be resolved, as in enumeration; then a tie
      may be broken, but the marginals stay in [0, 1] and sum to k.

Schedules (``schedule=``), both exact:
    ``"rows"`` loops over the n elements (n steps of ``(B, k)`` tensor ops);
    ``"columns"`` loops over the k sizes, each a ``logcumsumexp`` over the n
    elements (k steps of ``(B, n)`` scans: far fewer kernel launches, the choice
    on CUDA).  ``"auto"`` picks by a cost model of the device.

Layout: this module is the interface (options, dispatch, cost model); the
kernels are private: ``_ksubset_torch`` (plain and split tables, marginals, H v,
the sampler's steps),
``_ksubset_sampling`` (rejection and sequential samplers), ``_ksubset_autograd``
(the autograd Functions) and ``_numba_ksubset`` (the numba backend).

Complexity:
    O(n k) time per instance and O(B n k) memory (float64 tables; ``log_partition``
    keeps its prefix table for the backward pass) for ``log_partition`` and
    ``marginals``; O(n log n) for ``map``; O(n k + S n) time and O(B S n) memory for
    the sequential sampler; O(S n / acceptance) expected time for rejection (no
    table at all; acceptance ≈ 1/sqrt(2π Σ p_i(1−p_i)) >= about 1/sqrt(2π k)).

References:
    K. Ahmed, Z. Zeng, M. Niepert, G. Van den Broeck, "SIMPLE: A Gradient
    Estimator for k-Subset Sampling", ICLR 2023 (exact k-subset marginals and
    sampling through this recursion).
    S. X. Chen, A. P. Dempster, J. S. Liu, "Weighted finite population sampling to
    maximize entropy", Biometrika 81 (1994) (conditional Poisson sampling).
    M. Niepert, P. Minervini, L. Franceschi, "Implicit MLE", NeurIPS 2021 (k-subset
    MAP as a solver for perturb-and-MAP).

Examples:
    >>> import torch, structgrad as sg
    >>> s = sg.get_solver("ksubset", k=2)
    >>> theta = torch.tensor([1.0, 0.0, 2.0, -float("inf")])
    >>> s.map(theta)
    tensor([1., 0., 1., 0.])
    >>> s.marginals(theta).sum()   # exactly k in expectation
    tensor(2.)
    >>> s.log_partition(torch.zeros(5))   # log C(5, 2)
    tensor(2.3026)
"""

from __future__ import annotations

import importlib
import importlib.util
import math

import torch

from structgrad import checks as V
from structgrad.errors import DomainError, DTypeError
from structgrad.solver import Capabilities, Solver

from . import _ksubset_sampling as _smp
from ._ksubset_autograd import LogPartition, Marginals
from ._ksubset_torch import (
    Table,
    alpha_columns,
    alpha_rows,
    beta_columns,
    beta_rows,
    marginals_from_prefix,
    marginals_from_tables,
    split_alpha,
    split_beta,
)

__all__ = ["KSubsetSolver"]

_BACKENDS = ("torch", "numba")
_SCHEDULES = ("auto", "rows", "columns")
_SAMPLERS = ("auto", "rejection", "sequential")

# Cost model of the CPU (seconds; measured on a 2-core AMD EPYC, torch 2.13, 1 thread):
# one kernel launch, one logaddexp cell of a (B, k) row step, one element of a
# logcumsumexp scan, one candidate element of the rejection sampler, one
# (sample, element) step of the sequential sampler.  Only the choice of schedule
# and sampler depends on them, never a result.
_CPU_LAUNCH = 4e-6
_CPU_ROW_CELL = 7e-9
_CPU_SCAN_CELL = 3e-8
_CPU_REJECT_CELL = 8e-9
_CPU_SEQ_CELL = 8e-9
_NUMBA_CELL = 9e-9  # one cell of the numba prefix table
_NUMBA_SEQ_CELL = 3e-9  # one (sample, element) step of the numba sequential sampler
_PLAN_LAUNCHES = 150  # the Newton solve for the shift c and the bookkeeping of rejection
# CUDA: launches dominate; a cell costs next to nothing.
_CUDA_LAUNCH = 1e-5
_CUDA_CELL = 1e-11
# Rows with k·max|θ| above this use the split tables (M, L) (see _ksubset_torch): there
# the rounding of plain log-values (~1e-16 of them) starts to blur how many subsets tie.
_SPLIT_ABOVE = 2.0**20


class KSubsetSolver(Solver):
    """Exact solver for the k-subset family; see the module docstring for the math.

    Args:
        k: the subset size, an integer >= 0 (checked against n = ``theta.shape[-1]``
            at each call: k > n is a DomainError).
        backend: ``"torch"`` (CPU and CUDA) or ``"numba"`` (CPU only; compiled
            loops for the prefix table, the marginals and the sequential sampler;
            the rejection sampler and double backward use torch code; needs the
            ``numba`` package, imported on first use).
        schedule: ``"auto"``, ``"rows"`` or ``"columns"``: how the torch backend
            runs the table recursions (see the module docstring).
        sampler: ``"auto"``, ``"rejection"`` or ``"sequential"`` (all exact).

    Shapes:
        theta ``(*b, n)``; map/marginals ``(*b, n)``; log_partition ``(*b,)``;
        sample ``(S, *b, n)``.

    Examples:
        >>> import torch, structgrad as sg
        >>> s = sg.get_solver("ksubset", k=3)
        >>> theta = torch.randn(4, 10, requires_grad=True)
        >>> s.log_partition(theta).sum().backward()   # theta.grad == s.marginals(theta)
        >>> s.sample(theta, 5, generator=torch.Generator().manual_seed(0)).sum(-1)
        tensor([[3., 3., 3., 3.],
                [3., 3., 3., 3.],
                [3., 3., 3., 3.],
                [3., 3., 3., 3.],
                [3., 3., 3., 3.]])
    """

    capabilities = Capabilities(
        map="exact", marginals="exact", log_partition="exact", sample="exact", differentiable_marginals=True
    )
    event_ndim = 1
    num_leaves = 1

    def __init__(self, k: int | None = None, *, backend: str = "torch", schedule: str = "auto", sampler: str = "auto"):
        if k is None:
            raise DTypeError("k: expected the subset size, an integer >= 0 (get_solver('ksubset', k=3)), got None")
        if isinstance(k, bool) or not hasattr(k, "__index__"):
            raise DTypeError(f"k: expected an integer subset size >= 0, got {type(k).__name__} {k!r}")
        k = int(k)
        if k < 0:
            raise DomainError(f"k: expected an integer subset size >= 0, got k = {k}")
        V.check_choice(backend, _BACKENDS, "backend")
        V.check_choice(schedule, _SCHEDULES, "schedule")
        V.check_choice(sampler, _SAMPLERS, "sampler")
        if backend == "numba":
            if importlib.util.find_spec("numba") is None:
                raise DomainError("backend: 'numba' needs the numba package, which is not installed; use backend='torch'")
            self.capabilities = type(self).capabilities.replace(devices=("cpu",))
        self.k = k
        self.backend = backend
        self.schedule = schedule
        self.sampler = sampler

    def __repr__(self) -> str:
        return (
            f"KSubsetSolver(k={self.k}, backend={self.backend!r}, schedule={self.schedule!r}, "
            f"sampler={self.sampler!r})"
        )

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _numba():
        """The numba kernels (imported on first use; numba is never imported by ``import structgrad``)."""
        return importlib.import_module(f"{__package__}._numba_ksubset")

    def check_theta(self, theta):
        """One floating tensor ``(*b, n)`` with n >= k; see :meth:`Solver.check_theta`."""
        theta = super().check_theta(theta)
        n = theta.shape[-1]
        if self.k > n:
            raise DomainError(
                f"k: expected 0 <= k <= n, where n = {n} is the last dimension of theta "
                f"{tuple(theta.shape)}; got k = {self.k}"
            )
        return theta

    @staticmethod
    def _flat(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
        """θ (checked) as float64 ``(B, n)`` (never mutated) and its batch shape."""
        batch = theta.shape[:-1]
        return theta.detach().to(torch.float64).reshape(math.prod(batch), theta.shape[-1]), batch

    def _use_columns(self, t: torch.Tensor) -> bool:
        if self.schedule != "auto":
            return self.schedule == "columns"
        B, n = t.shape
        k = self.k
        if t.device.type == "cuda":
            return True
        rows = n * (2 * _CPU_LAUNCH + B * k * _CPU_ROW_CELL)
        cols = k * (3 * _CPU_LAUNCH + B * n * _CPU_SCAN_CELL)
        return cols < rows

    def _kind(self, t: torch.Tensor) -> str:
        """Which tables serve ``t``: ``"split"`` when its scores are so large that plain
        log-values lose ties (k·max|θ| > ``_SPLIT_ABOVE``; one host synchronisation),
        else ``"numba"``, ``"columns"`` or ``"rows"`` by backend and schedule."""
        if t.numel():
            big = torch.where(torch.isfinite(t), t.abs(), torch.zeros((), dtype=t.dtype, device=t.device)).amax()
            if bool(big * max(self.k, 1) > _SPLIT_ABOVE):
                return "split"
        if self.backend == "numba" and self.k > 0:
            return "numba"
        return "columns" if self._use_columns(t) else "rows"

    def _alpha(self, t: torch.Tensor, kind: str | None = None) -> tuple[Table, torch.Tensor, str]:
        """``(prefix table, A (B,), kind)`` (k >= 1).  The table is a :data:`Table` pair:
        ``(α (n+1, B, k+1), None)`` from the torch kernels, ``(M, L)`` when split, or
        ``(α (B, n+1, k+1), None)`` from the numba kernel."""
        k = self.k
        kind = self._kind(t) if kind is None else kind
        if kind == "numba":
            a = self._numba_alpha(t)
            return (a, None), a[:, -1, k], kind
        if kind == "split":
            M, L = split_alpha(t, k)
            return (M, L), M[-1, :, k] + L[-1, :, k], kind
        a = alpha_columns(t, k) if kind == "columns" else alpha_rows(t, k)
        return (a, None), a[-1, :, k], kind

    def _beta(self, t: torch.Tensor, kind: str) -> Table:
        """The size-reversed suffix table of the torch kind ``kind``, as a pair."""
        if kind == "split":
            return split_beta(t, self.k)
        return (beta_columns(t, self.k) if kind == "columns" else beta_rows(t, self.k)), None

    def _tables(self, t: torch.Tensor) -> tuple[Table, Table]:
        """Torch prefix and suffix tables (for H v; the numba backend uses the torch rows)."""
        kind = self._kind(t)
        kind = "rows" if kind == "numba" else kind
        if kind == "split":
            return split_alpha(t, self.k), split_beta(t, self.k)
        a = alpha_columns(t, self.k) if kind == "columns" else alpha_rows(t, self.k)
        return (a, None), self._beta(t, kind)

    def _numba_alpha(self, t: torch.Tensor) -> torch.Tensor:
        """``(B, n+1, k+1)`` float64 prefix table by the numba kernel."""
        B, n = t.shape
        a = torch.empty((B, n + 1, self.k + 1), dtype=torch.float64)
        self._numba().forward(t.contiguous().numpy(), self.k, a.numpy())
        return a

    def _mu_from_alpha(self, t: torch.Tensor, alpha: Table, kind: str) -> torch.Tensor:
        k = self.k
        if k == 0:
            return torch.zeros_like(t)
        if kind == "numba":
            mu = torch.empty_like(t)
            self._numba().marginals(t.contiguous().numpy(), k, alpha[0].numpy(), mu.numpy())
            return mu
        if kind == "split":
            return marginals_from_prefix(t, k, alpha)
        return marginals_from_tables(t, k, alpha[0], self._beta(t, kind)[0])

    def _logz_and_mu(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A (B,), μ (B, n))`` in float64, one forward-backward pass."""
        k = self.k
        if k == 0:
            return torch.zeros(t.shape[0], dtype=t.dtype, device=t.device), torch.zeros_like(t)
        alpha, logz, kind = self._alpha(t)
        return logz, self._mu_from_alpha(t, alpha, kind)

    # ------------------------------------------------------------------ hooks
    def _log_partition(self, theta: torch.Tensor) -> torch.Tensor:
        return LogPartition.apply(theta, self)

    def _marginals(self, theta: torch.Tensor) -> torch.Tensor:
        return Marginals.apply(theta, self)

    def _log_partition_and_marginals(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t, batch = self._flat(theta)
        logz, mu = self._logz_and_mu(t)
        # logz is a view of the table: copy it so the table is freed
        return logz.reshape(batch).to(theta.dtype, copy=True), mu.to(theta.dtype).reshape(theta.shape)

    def _map(self, theta: torch.Tensor) -> torch.Tensor:
        th = theta.detach()
        out = torch.zeros_like(th)
        if self.k == 0:
            return out
        top = torch.sort(th, dim=-1, descending=True, stable=True).indices[..., : self.k]
        out.scatter_(-1, top, 1.0)
        feasible = (torch.isfinite(th).sum(-1) >= self.k).unsqueeze(-1)
        return out * feasible.to(th.dtype)

    def _sample(self, theta: torch.Tensor, num_samples: int, generator: torch.Generator | None) -> torch.Tensor:
        t, batch = self._flat(theta)
        B, n = t.shape
        S, k = num_samples, self.k
        shape = (S,) + tuple(theta.shape)
        if k == 0 or B == 0:
            return torch.zeros(shape, dtype=theta.dtype, device=theta.device)
        num_possible = torch.isfinite(t).sum(-1)
        feasible = num_possible >= k
        out = torch.zeros((B, S, n), dtype=torch.bool, device=t.device)
        filled = torch.zeros(B, dtype=torch.long, device=t.device)
        if self.sampler != "sequential":
            p, acc = _smp.rejection_plan(t, k, num_possible, feasible)
            if self.sampler == "rejection":
                use = feasible
            else:
                use = feasible & (acc >= _smp.MIN_ACCEPTANCE)
                use = use & self._rejection_is_cheaper(t, acc, use, S)
            if bool(use.any()):
                out, filled = _smp.sample_rejection(t, k, p, acc, use, S, generator)
        missing = feasible & (filled < S)
        if bool(missing.any()):
            rows = missing.nonzero().flatten()
            seq = self._sample_sequential(t[rows], S, generator)  # (R, S, n) bool
            slots = torch.arange(S, device=t.device).unsqueeze(0) >= filled[rows].unsqueeze(1)  # (R, S)
            out[rows] = torch.where(slots.unsqueeze(-1), seq, out[rows])
        return out.to(theta.dtype).permute(1, 0, 2).reshape(shape)

    def _rejection_is_cheaper(self, t: torch.Tensor, acc: torch.Tensor, use: torch.Tensor, S: int) -> torch.Tensor:
        """Per call (a bool tensor, the same for every row): expected rejection cost of the
        rows in ``use`` against the sequential sampler's cost for the whole batch."""
        B, n = t.shape
        k = self.k
        expected = float(torch.where(use, S * n / acc.clamp(min=_smp.MIN_ACCEPTANCE), torch.zeros_like(acc)).sum())
        if t.device.type == "cuda":
            rej = _PLAN_LAUNCHES * _CUDA_LAUNCH + expected * _CUDA_CELL
            seq = (2 * k + 4 * n) * _CUDA_LAUNCH + B * S * n * _CUDA_CELL
        else:
            rej = _PLAN_LAUNCHES * _CPU_LAUNCH + expected * _CPU_REJECT_CELL
            if self.backend == "numba":
                seq = B * n * k * _NUMBA_CELL + B * S * n * _NUMBA_SEQ_CELL
            else:
                table = min(n * (2 * _CPU_LAUNCH + B * k * _CPU_ROW_CELL), k * (3 * _CPU_LAUNCH + B * n * _CPU_SCAN_CELL))
                seq = table + n * 4 * _CPU_LAUNCH + B * S * n * _CPU_SEQ_CELL
        return torch.as_tensor(bool(rej <= seq), device=t.device)

    def _sample_sequential(self, t: torch.Tensor, S: int, generator: torch.Generator | None) -> torch.Tensor:
        """``(R, S, n)`` bool exact samples of the (feasible) rows of ``t`` by the backward sampler."""
        R, n = t.shape
        k = self.k
        kind = self._kind(t)
        if kind == "numba":
            u = torch.rand((R, S, n), dtype=torch.float64, generator=generator)
            alpha = self._numba_alpha(t)
            z = torch.empty((R, S, n), dtype=torch.uint8)
            self._numba().sample_sequential(t.contiguous().numpy(), k, alpha.numpy(), torch.log(u).numpy(), z.numpy())
            return z.to(torch.bool)
        u = torch.rand((n, R, S), dtype=torch.float64, device=t.device, generator=generator)
        alpha = self._alpha(t, kind)[0]
        z = _smp.sample_sequential(t, k, alpha, torch.log(u))  # (n, R, S)
        return z.permute(1, 2, 0)
