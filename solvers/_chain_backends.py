"""Chain backends beyond the sequential torch kernels (private): numba and the log-depth scan.

Both compute, on a flattened batch (node ``(B, T, C)``, edge ``(B, T−1, C, C)`` |
``(T−1, C, C)`` | ``(C, C)``, lengths ``(B,)`` or ``None``), the functions

* ``log_partition(node, edge, lengths) -> A (B,)``,
* ``log_partition_and_marginals(node, edge, lengths) -> (A, mu (B,T,C), emu)`` with emu
  ``(B, T−1, C, C)`` for per-position edges and transition counts ``(B, C, C)`` for a
  ``(C, C)`` edge,
* ``viterbi(node, edge, lengths) -> labels (B, T)`` (−1 past a length or when infeasible),

and :class:`LogPartition` turns the first two into an autograd Function whose backward
is the marginals (computed with A in the forward when a gradient is wanted: one fused
pass instead of a forward pass plus a fused pass in the backward).  numba is imported on
first use only.

Examples:
    >>> import torch, structgrad as sg
    >>> from structgrad.solvers import _chain_backends as cb
    >>> node, edge = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    >>> ref = sg.get_solver("chain", backend="torch").log_partition((node, edge))
    >>> torch.allclose(cb.backend("scan").log_partition(node, edge, None), ref)
    True
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import torch

from ._pairwise import refuse_create_graph

__all__ = ["HAVE_NUMBA", "backend", "LogPartition"]

HAVE_NUMBA = importlib.util.find_spec("numba") is not None


class _Numba:
    """The compiled CPU kernels of ``_numba_chain`` (imported on first use)."""

    name = "numba"
    #: operations exact only for finite |score| below ~1e15 (the solver routes larger
    #: inputs to the torch kernels): float64 sums (Viterbi) and the log path's exponents
    #: (its backward cancels terms as large as the scores) lose the O(1) parts beyond.
    needs_moderate = frozenset({"log_partition", "marginals", "map", "sample"})

    def __init__(self) -> None:
        self._mod = None

    @property
    def mod(self) -> Any:
        if self._mod is None:
            self._mod = importlib.import_module(f"{__package__}._numba_chain")
        return self._mod

    @staticmethod
    def _threads() -> tuple[int, str]:
        n = torch.get_num_threads()
        return (n, "prange") if n > 1 else (1, "threads")

    def log_partition(self, node, edge, lengths):
        threads, _ = self._threads()
        return self.mod.t_log_partition(node, edge, lengths, threads=threads)

    def log_partition_and_marginals(self, node, edge, lengths):
        threads, parallel = self._threads()
        return self.mod.t_log_partition_and_marginals(node, edge, lengths, threads=threads, parallel=parallel)

    def viterbi(self, node, edge, lengths):
        return self.mod.t_viterbi(node, edge, lengths, threads=self._threads()[0])

    def sample(self, node, edge, lengths, num_samples, generator):
        return self.mod.t_sample(node, edge, num_samples, generator=generator, lengths=lengths, threads=self._threads()[0])


class _Scan:
    """The log-depth parallel-prefix scan of ``_chain_scan`` (pure torch; any device)."""

    name = "scan"
    #: operations exact only for finite |score| below ~1e15 (see :class:`_Numba`).
    needs_moderate = frozenset({"log_partition", "marginals", "map", "sample"})

    def __init__(self) -> None:
        from . import _chain_scan

        self.mod = _chain_scan

    def log_partition(self, node, edge, lengths):
        with torch.no_grad():
            return self.mod.log_partition(node, edge, lengths)

    def log_partition_and_marginals(self, node, edge, lengths):
        return self.mod.log_partition_and_marginals(node, edge, lengths)

    def viterbi(self, node, edge, lengths):
        with torch.no_grad():
            return self.mod.viterbi(node, edge, lengths)


_CACHE: dict[str, Any] = {}


def backend(name: str) -> Any:
    """The backend object ``"numba"`` or ``"scan"`` (created once)."""
    if name not in _CACHE:
        _CACHE[name] = {"numba": _Numba, "scan": _Scan}[name]()
    return _CACHE[name]


class LogPartition(torch.autograd.Function):
    """A(θ) by a backend; backward = μ·grad from the backend's marginals.

    ``forward(ctx, node (B,T,C), edge, lengths, impl)``.  When a gradient is wanted (grad
    mode on and an input that requires grad: :meth:`apply_` decides, since grad mode is off
    inside ``forward``) the forward runs the backend's fused ``log_partition_and_marginals``
    and keeps μ for the backward (memory: one node-sized and one edge-output-sized tensor — the transition
    counts ``(B, C, C)`` for a ``(C, C)`` edge — between the passes); otherwise the
    forward pass alone.  The gradient of a shared edge (``(C, C)`` or ``(T−1, C, C)``)
    is the batch sum of its per-instance marginals.  Second derivatives are refused
    (:func:`refuse_create_graph`), as for the torch kernels.
    """

    @classmethod
    def apply_(cls, node: torch.Tensor, edge: torch.Tensor, lengths: torch.Tensor | None, impl: Any) -> torch.Tensor:
        """A(θ) (B,): the forward pass alone unless a gradient will be taken."""
        fused = torch.is_grad_enabled() and (node.requires_grad or edge.requires_grad)
        return cls.apply(node, edge, lengths, impl, fused)

    @staticmethod
    def forward(ctx, node: torch.Tensor, edge: torch.Tensor, lengths: torch.Tensor | None, impl: Any, fused: bool) -> torch.Tensor:
        if not fused:
            return impl.log_partition(node.detach(), edge.detach(), lengths).to(node.dtype)
        logz, mu, emu = impl.log_partition_and_marginals(node.detach(), edge.detach(), lengths)
        ctx.save_for_backward(mu, emu)
        ctx.dtypes, ctx.edge_dim = (node.dtype, edge.dtype), edge.dim()
        return logz.to(node.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        refuse_create_graph("chain")
        mu, emu = ctx.saved_tensors
        node_dtype, edge_dtype = ctx.dtypes
        g = grad.to(mu.dtype)
        g_node = (mu * g.view(-1, 1, 1)).to(node_dtype) if ctx.needs_input_grad[0] else None
        g_edge = None
        if ctx.needs_input_grad[1]:
            if ctx.edge_dim == 4:  # per instance and position
                g_edge = emu * g.view(-1, 1, 1, 1)
            else:  # shared: sum over the batch (emu is (B, C, C) counts or (B, T-1, C, C))
                g_edge = torch.tensordot(g, emu, dims=1)
            g_edge = g_edge.to(edge_dtype)
        return g_node, g_edge, None, None, None
