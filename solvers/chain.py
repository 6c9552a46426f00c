"""``chain``: linear-chain CRF inference by forward-backward.

Structures are labellings y ∈ {0..C−1}^L of a chain of length L ≤ T, with score

    ⟨z, θ⟩ = Σ_{t<L} node[t, y_t] + Σ_{t<L−1} edge[t, y_t, y_{t+1}],

z = (one-hot labels (T, C), one-hot transitions (T−1, C, C)), zero past the length.

θ = ``(node, edge)``:

* ``node``: ``(*b, T, C)``;
* ``edge``: ``(*b, T−1, C, C)`` per instance and position, ``(T−1, C, C)`` shared by
  the batch, or ``(C, C)`` shared by the batch and every position (never
  materialised per position).  ``edge[t, i, j]`` scores label i at t, j at t+1.

Per-call keyword: ``lengths (*b,)``, integers in ``[0, T]`` (default: all T).
Positions at or past an instance's length contribute nothing and get zero
marginals, MAP and samples (and zero gradient).  A length of 0 is the empty
labelling: A = 0.

Outputs follow the structure of θ: node ``(*b, T, C)``; edge ``(*b, T−1, C, C)``, or
for a ``(C, C)`` edge the expected (marginals) / actual (map, sample) transition
*counts* ``(*b, C, C)`` — the sufficient statistic paired with a shared edge, so
⟨z, θ⟩ and ∇A = μ hold as stated.

Algorithms (B instances, T positions, C labels):

* forward:  ᾱ_0 = node_0 − c_0,
  ᾱ_t[j] = logsumexp_i(ᾱ_{t−1}[i] + edge_{t−1}[i, j]) + node_t[j] − c_t,
  with c_t = max_j of the un-centred message, so messages stay O(scores) (the
  re-centring is what keeps float32 accurate); A = Σ_{t<L} c_t + logsumexp ᾱ_{L−1}.
* backward: β̄_{L−1} = 0, β̄_t[i] = logsumexp_j(edge_t[i, j] + node_{t+1}[j] + β̄_{t+1}[j]) − d_t.
* node marginals μ_t = softmax_j(ᾱ_t + β̄_t); edge marginals
  μ_t[i, j] = exp(ᾱ_t[i] + edge_t[i, j] + node_{t+1}[j] + β̄_{t+1}[j] − c_{t+1} − N_{t+1}),
  N_t = logsumexp_j(ᾱ_t + β̄_t): every position is normalised locally.
* MAP: Viterbi (max-product on centred scores), ties to the lowest label.
* sample: forward filtering, backward sampling (exact), Gumbel-max at each step.

``log_partition`` is a ``torch.autograd.Function``: its forward runs the α pass
only, its backward the β pass, returning μ · grad; there is no autograd through
the recursion, so the marginals are not differentiable
(``capabilities.differentiable_marginals`` is False) and a backward with
``create_graph=True`` (a second derivative, also through :func:`structgrad.nll`)
raises :class:`~structgrad.errors.CapabilityError`.  Time O(B·T·C²); working memory O(B·T·C) beyond the outputs
(the shared-edge counts are accumulated in chunks of ⌈T/C⌉ positions).
``marginals``, ``map`` and ``sample`` return tensors detached from autograd.

``-inf`` scores forbid labels or transitions; no NaN arises in values or
gradients.  An instance where every labelling has score −inf has A = −inf and
zero marginals, MAP and samples.  NaN or +inf scores are refused
(:meth:`~structgrad.Solver.check_values`).  Huge finite scores are fine: the log path
works on scores centred per position (each ≤ 0) and normalises every position's
edge marginals by their own logsumexp, so scores of ±1e30 or ±1e300 (float64) give
finite marginals that match enumeration (for such scores, the indicator of the best
labelling).

Backends (``get_solver("chain", backend=...)``), all exact, with the same numbers
within float tolerance and the same MAP labels (ties to the lowest label):

* ``"torch"``: batched torch ops, sequential over the T positions (CPU and CUDA);
  kernels in ``_chain_torch`` (forward-backward, the autograd Function) and
  ``_chain_decode`` (Viterbi, FFBS).
* ``"numba"``: compiled CPU loops (``_numba_chain``), one fused pass per instance,
  over the batch on torch's thread count (``prange``).  CPU only.  The first call on a
  machine compiles (about 15–20 s per input dtype); the code is cached on disk.
* ``"scan"``: a log-depth parallel-prefix scan over the per-position (C, C) matrices in
  the log semiring (max-plus for Viterbi), O(log T) sequential steps (``_chain_scan``):
  for GPUs, where the sequential loop is bound by kernel launches.  Sampling uses the
  torch kernels.
* ``"auto"`` (the default): ``"numba"`` for CPU tensors (when numba is installed;
  measured faster than ``"torch"`` in every CPU case, 1.3× to 30×), ``"scan"`` for CUDA
  tensors (log Z, marginals, MAP), ``"torch"`` otherwise and for sampling on CUDA.

Helpers shared with ``tree`` live in ``_pairwise``.

References: L. Rabiner, "A tutorial on hidden Markov models" (1989); J. Lafferty,
A. McCallum, F. Pereira, "Conditional random fields" (ICML 2001); D. McAllester,
"The model marginals" (TTIC 31230, 2019).

Examples:
    >>> import torch, structgrad as sg
    >>> chain = sg.get_solver("chain")
    >>> node, edge = torch.randn(2, 5, 3), torch.randn(3, 3)
    >>> chain.log_partition((node, edge), lengths=torch.tensor([5, 2])).shape
    torch.Size([2])
"""

from __future__ import annotations

from typing import Any

import torch

from structgrad import checks as V
from structgrad.errors import DomainError, ShapeError
from structgrad.solver import Capabilities, Solver

from ._chain_backends import HAVE_NUMBA, LogPartition, backend
from ._chain_decode import ffbs, viterbi
from ._chain_torch import ChainLogPartition, Problem, backward, forward, log_messages, log_z
from ._pairwise import label_indicators, pair_indicators

__all__ = ["ChainSolver"]

#: largest finite |score| of the backends' ``needs_moderate`` operations (beyond: the torch kernels).
_MODERATE = 1e15


def _moderate(node: torch.Tensor, edge: torch.Tensor) -> bool:
    """Every finite score of θ is below ``_MODERATE`` in magnitude.

    One pass (``aminmax``) and one host sync per tensor in the common case; a tensor
    with ``-inf`` entries (its minimum) needs a second, masked pass."""
    for x in (node.detach(), edge.detach()):
        if x.numel() == 0:
            continue
        lo, hi = (float(v) for v in torch.aminmax(x))
        if lo == float("-inf"):
            finite = x[torch.isfinite(x)]
            lo = float(finite.min()) if finite.numel() else 0.0
        if max(-lo, hi) >= _MODERATE:  # NaN/+inf compare False here; check_values refuses them
            return False
    return True

_BACKENDS = ("auto", "torch", "numba", "scan")


class ChainSolver(Solver):
    """Exact linear-chain solver (forward-backward, Viterbi, FFBS); see the module docstring.

    Args:
        backend: ``"auto"`` (default: numba on CPU, the log-depth scan on CUDA),
            ``"torch"`` (sequential batched torch ops; CPU and CUDA), ``"numba"``
            (compiled CPU loops; CPU only) or ``"scan"`` (log-depth scan; any device).
            See the module docstring.

    Call kwargs:
        lengths: ``(*batch,)`` integers in ``[0, T]`` (default: all T), batched.

    Shapes:
        θ = ``(node (*b, T, C), edge (*b, T-1, C, C) | (T-1, C, C) | (C, C))``; ``map``,
        ``marginals``: the same (counts ``(*b, C, C)`` for a ``(C, C)`` edge);
        ``log_partition``: ``(*b,)``; ``sample``: ``(S, ...)``.

    Complexity: O(B·T·C²) time; the scan O(B·T·C³) work in O(log T) steps.
    """

    capabilities = Capabilities(map="exact", marginals="exact", log_partition="exact", sample="exact")
    call_kwargs = ("lengths",)
    batched_kwargs = ("lengths",)
    num_leaves = 2

    def __init__(self, backend: str = "auto"):
        self.backend = V.check_choice(backend, _BACKENDS, "backend")
        if backend == "numba":
            if not HAVE_NUMBA:
                raise DomainError("backend: 'numba' needs the numba package, which is not installed; use backend='torch'")
            self.capabilities = type(self).capabilities.replace(devices=("cpu",))

    def __repr__(self) -> str:
        return f"ChainSolver(backend={self.backend!r})"

    def _impl(self, theta: Any, op: str) -> str:
        """The backend that runs ``op`` for θ.

        The operations a backend lists in ``needs_moderate`` are exact for scores up to
        ~1e15 in magnitude; beyond that (where float64 can no longer hold their O(1)
        differences next to the huge parts) the torch kernels, which centre every
        position exactly, take over (one pass over θ decides)."""
        node, edge = theta
        name = self.backend
        if name == "auto":
            name = "scan" if node.device.type == "cuda" else ("numba" if HAVE_NUMBA and node.device.type == "cpu" else "torch")
        if name == "scan" and op == "sample":
            return "torch"
        if name != "torch" and op in backend(name).needs_moderate and not _moderate(node, edge):
            return "torch"
        return name

    @staticmethod
    def _flat(theta: Any, lengths: torch.Tensor | None):
        """node ``(B, T, C)``, the edge (a per-instance edge flattened to ``(B, T−1, C, C)``,
        a shared one as it is) and lengths ``(B,)``."""
        node, edge = theta
        T, C = node.shape[-2:]
        B = node.shape[:-2].numel()
        per_instance = edge.dim() == node.dim() + 1
        return (
            node.reshape(B, T, C),
            edge.reshape(B, T - 1, C, C) if per_instance else edge,
            None if lengths is None else lengths.reshape(-1),
        )

    # -- shapes
    def event_ndims(self, theta: Any) -> tuple[int, ...]:
        node, edge = self._split(theta)
        return (2, 2 if edge.dim() == 2 else 3)

    @staticmethod
    def _split(theta: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(theta, (tuple, list)) or len(theta) != 2:
            what = f"a tuple of {len(theta)}" if isinstance(theta, (tuple, list)) else type(theta).__name__
            raise ShapeError(
                f"theta: expected a tuple (node (*batch, T, C), edge (*batch, T-1, C, C) or (C, C)), got {what}"
            )
        return theta[0], theta[1]

    def unshare(self, theta: Any) -> Any:
        """θ with the edge in per-instance, per-position layout ``(*b, T-1, C, C)`` (a view).

        A ``(C, C)`` edge is replicated over the T−1 positions (its transition counts are
        the sum of the per-position indicators over them); a ``(T-1, C, C)`` edge over the
        batch.  See :meth:`structgrad.Solver.unshare`."""
        node, edge = self.check_theta(theta)
        T, C = node.shape[-2:]
        return node, edge.expand(tuple(node.shape[:-2]) + (T - 1, C, C))

    # -- validation hooks
    def check_theta(self, theta: Any) -> Any:
        node, edge = self._split(theta)
        V.check_float_tensor(node, "node")
        V.check_float_tensor(edge, "edge")
        if node.dim() < 2 or node.shape[-2] < 1 or node.shape[-1] < 1:
            raise ShapeError(f"node: expected shape (*batch, T, C) with T, C >= 1, got {V.fmt_shape(node.shape)}")
        T, C = node.shape[-2:]
        batch = tuple(node.shape[:-2])
        ok = (
            (edge.dim() == 2 and tuple(edge.shape) == (C, C))
            or (edge.dim() == 3 and tuple(edge.shape) == (T - 1, C, C))
            or (edge.dim() >= 3 and tuple(edge.shape) == batch + (T - 1, C, C))
        )
        if not ok:
            raise ShapeError(
                f"edge has shape {V.fmt_shape(edge.shape)} but node has shape {V.fmt_shape(node.shape)}; "
                f"expected edge of shape {V.fmt_shape(batch + (T - 1, C, C))} (*batch, T-1, C, C), "
                f"{V.fmt_shape((T - 1, C, C))} (shared by the batch) or {V.fmt_shape((C, C))} (shared by every position)"
            )
        return super().check_theta((node, edge))

    def check_kwargs(self, theta: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``lengths``: integers (any integer dtype) of shape ``(*batch,)`` in ``[0, T]``
        (values checked when ``validate``); normalised to int64."""
        node = theta[0]
        if kwargs.get("lengths") is not None:
            lengths = V.check_lengths(
                kwargs["lengths"], node.shape[:-2], node.shape[-2], node.device, check_values=self.validate
            )
            kwargs = {**kwargs, "lengths": lengths}
        return super().check_kwargs(theta, kwargs)

    # -- hooks
    def _problem(self, theta: Any, lengths: torch.Tensor | None) -> Problem:
        node, edge = theta
        return Problem(node.detach(), edge.detach(), lengths)

    def _log_partition(self, theta: Any, lengths: torch.Tensor | None = None) -> torch.Tensor:
        node, edge = theta
        impl = self._impl(theta, "log_partition")
        if impl == "torch":
            return ChainLogPartition.apply(node, edge, self._problem(theta, lengths))
        nf, ef, lf = self._flat(theta, lengths)
        return LogPartition.apply_(nf, ef, lf, backend(impl)).reshape(node.shape[:-2])

    def _log_partition_and_marginals(self, theta: Any, lengths: torch.Tensor | None = None):
        node, edge = theta
        impl = self._impl(theta, "marginals")
        if impl == "torch":
            p = self._problem(theta, lengths)
            state, c = forward(p)
            logz = log_z(p, c).reshape(p.batch).to(p.dtype)
            mu, emu = backward(p, state, consume=True)
            return logz, (p.unflatten(mu, (p.T, p.C)), p.unflatten(emu, p.edge_event()))
        nf, ef, lf = self._flat(theta, lengths)
        logz, mu, emu = backend(impl).log_partition_and_marginals(nf, ef, lf)
        batch = tuple(node.shape[:-2])
        T, C = node.shape[-2:]
        edge_event = (C, C) if edge.dim() == 2 else (T - 1, C, C)
        return (
            logz.reshape(batch).to(node.dtype),
            (mu.reshape(batch + (T, C)).to(node.dtype), emu.reshape(batch + edge_event).to(node.dtype)),
        )

    def _marginals(self, theta: Any, lengths: torch.Tensor | None = None):
        with torch.no_grad():
            return self._log_partition_and_marginals(theta, lengths)[1]

    def _map(self, theta: Any, lengths: torch.Tensor | None = None):
        with torch.no_grad():
            impl = self._impl(theta, "map")
            if impl == "torch":
                labels = viterbi(self._problem(theta, lengths))
            else:
                labels = backend(impl).viterbi(*self._flat(theta, lengths)).to(theta[0].device)
            return self._indicators(theta, labels.unsqueeze(0), lead=())

    def _sample(self, theta: Any, num_samples: int, generator: torch.Generator | None, lengths: torch.Tensor | None = None):
        with torch.no_grad():
            if self._impl(theta, "sample") == "numba":
                nf, ef, lf = self._flat(theta, lengths)
                labels = backend("numba").sample(nf, ef, lf, num_samples, generator)
            else:
                p = self._problem(theta, lengths)
                state, _ = forward(p)
                labels = ffbs(p, log_messages(p, state), num_samples, generator)
            return self._indicators(theta, labels, lead=(num_samples,))

    @staticmethod
    def _indicators(theta: Any, labels: torch.Tensor, lead: tuple[int, ...]):
        """labels ``(S, B, T)`` with −1 for 'no label' -> (node, edge) indicators with leading ``lead``."""
        node, edge = theta
        T, C = node.shape[-2:]
        node_ind = label_indicators(labels, C, node.dtype)
        edge_ind = pair_indicators(labels[..., :-1], labels[..., 1:], C, node.dtype, counts=edge.dim() == 2)
        shape_b = lead + tuple(node.shape[:-2])
        edge_event = (C, C) if edge.dim() == 2 else (T - 1, C, C)
        return node_ind.reshape(shape_b + (T, C)), edge_ind.reshape(shape_b + edge_event)
