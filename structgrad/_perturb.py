"""Perturb-and-MAP plumbing shared by imle and the baseline estimators (private).

:class:`Layout` prepares θ for calls of ``solver.map`` with a leading sample
dimension L (S samples, or 2S for central differences):

* every θ leaf gets θ's batch dimensions (*unsharing*): a leaf given without
  them (a chain's ``(C, C)`` or ``(T-1, C, C)`` edge) is replaced by a broadcast
  view with per-instance layout ``(*batch, *R, *E)``, where ``E`` is the leaf's own
  shape and ``R`` are *replication* dims over which the leaf's sufficient statistic
  sums.  The solver says how, through :meth:`structgrad.Solver.unshare` (the chain
  turns a ``(C, C)`` edge into ``(*batch, T-1, C, C)``, R = (T-1,), the positions; the
  default is R = () and the leaf becomes ``(*batch, *E)``);
* noise is drawn at the unshared shape ``(L, *batch, *R, *E)``: per sample, per
  instance and per replicated position;
* ``map`` outputs for the unshared θ are *folded* back to the layout ``map(θ)``
  itself uses (sum over R: per-position transitions become transition counts
  ``(L, *batch, *E)``), and gradients in that layout are *unfolded* (broadcast over
  R), the adjoint of the fold;
* the call kwargs named in ``solver.batched_kwargs`` are expanded along L.

For a solver whose event dims are unknown (``event_ndim = None``: wrapped plain
callables) nothing is unshared, and every leaf simply gets the leading L dim.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from . import checks as V
from .errors import CapabilityError, DTypeError, ShapeError, SolverOutputError
from .noise import draw_noise
from .registry import get_solver
from .solver import Solver

__all__ = ["Layout", "prepare", "check_sign_options", "check_reduce", "sample_grads"]

REDUCE = ("none", "mean")


def check_reduce(reduce: Any) -> str:
    return V.check_choice(reduce, REDUCE, "reduce")


def sample_grads(grads: Sequence[torch.Tensor | None], z: Sequence[torch.Tensor], reduce: str) -> list[torch.Tensor]:
    """The incoming gradients per sample, each shaped like its output ``z (L, ...)``: zeros
    for an output that got none, and for ``reduce="mean"`` the mean's gradient repeated
    over the L samples (a broadcast view)."""
    g = []
    for gr, y in zip(grads, z):
        if gr is None:
            gr = torch.zeros_like(y)
        elif reduce == "mean":
            gr = gr.unsqueeze(0).expand(tuple(y.shape))
        g.append(gr)
    return g


def check_sign_options(minimize: Any) -> float:
    if not isinstance(minimize, bool):
        raise DTypeError(f"minimize: expected True or False, got {minimize!r}")
    return -1.0 if minimize else 1.0


def _normalise_theta(theta: Any) -> Any:
    if isinstance(theta, list):
        theta = tuple(theta)
    parts = V.leaves(theta)
    if len(parts) == 0:
        raise ShapeError("theta: expected a tensor or a non-empty tuple of tensors, got an empty tuple")
    for p, nm in zip(parts, V.leaf_names(theta)):
        V.check_float_tensor(p, nm)
    return theta


def prepare(theta: Any, solver: Any, op: str = "map") -> tuple[Any, Solver]:
    """θ (list → tuple; float leaves checked first) and the solver, which must support ``op``."""
    theta = _normalise_theta(theta)
    solver = get_solver(solver)
    if not solver.capabilities.supports(op):
        raise CapabilityError(
            f"solver: {solver._label()} cannot compute {op!r} (it declares: "
            f"{', '.join(solver.capabilities.operations) or 'nothing'}); this estimator needs {op!r}"
        )
    return theta, solver


class Layout:
    """θ, its batch shape and its unshared per-instance view; see the module docstring."""

    def __init__(self, solver: Solver, theta: Any, kwargs: dict[str, Any]):
        theta = solver.check_theta(theta)
        self.solver = solver
        self.is_tuple = isinstance(theta, tuple)
        parts = tuple(p.detach() for p in V.leaves(theta))
        self.theta = V.rebuild(theta, parts)
        self.parts = parts
        self.dtype = parts[0].dtype
        self.device = parts[0].device
        self.kwargs = solver.check_kwargs(self.theta, dict(kwargs))
        nd = solver.event_ndims(self.theta)
        if nd is None:
            self.batch: torch.Size | None = None
            self.shared = tuple(False for _ in parts)
            self.unshared = parts
            self.rep: tuple[tuple[int, ...], ...] = tuple(() for _ in parts)
            self.out_shapes = tuple(tuple(p.shape) for p in parts)
            return
        # the batch shape, by the rule of Solver.check_theta (which has checked that the leaves agree)
        self.shared = tuple(i > 0 and p.dim() == k for i, (p, k) in enumerate(zip(parts, nd)))
        first = next((i for i, s in enumerate(self.shared) if not s), 0)
        self.batch = parts[first].shape[: parts[first].dim() - nd[first]]
        nb = len(self.batch)
        if any(self.shared):
            unshared = tuple(t.detach() for t in V.leaves(solver.unshare(self.theta)))
        else:
            unshared = parts
        if len(unshared) != len(parts):
            raise SolverOutputError(
                f"solver {solver._label()}: unshare(theta) returned {len(unshared)} tensors for {len(parts)}"
            )
        rep = []
        for i, (p, u, s) in enumerate(zip(parts, unshared, self.shared)):
            nm = f"theta[{i}]" if self.is_tuple else "theta"
            lead = tuple(u.shape[:nb])
            if s:
                ok = lead == tuple(self.batch) and u.dim() >= nb + p.dim() and tuple(u.shape[u.dim() - p.dim():]) == tuple(p.shape)
                r = tuple(range(nb, u.dim() - p.dim()))
            else:
                ok = tuple(u.shape) == tuple(p.shape)
                r = ()
            if not ok:
                raise SolverOutputError(
                    f"solver {solver._label()}: unshare(theta) gave {nm} the shape {V.fmt_shape(u.shape)}; expected "
                    f"(*batch, *replicated, *shape of {nm}) with batch {V.fmt_shape(self.batch)} and {nm} "
                    f"{V.fmt_shape(p.shape)}"
                )
            rep.append(r)
        self.unshared = unshared
        self.rep = tuple(rep)
        self.out_shapes = tuple(
            tuple(self.batch) + tuple(p.shape) if s else tuple(p.shape) for p, s in zip(parts, self.shared)
        )

    # ------------------------------------------------------------------ noise, kwargs, calls
    def draw(self, noise: Any, L: int, generator: torch.Generator | None) -> tuple[torch.Tensor, ...] | None:
        """Noise ε of shape ``(L, *unshared leaf)`` per leaf (``None`` when ``noise`` is None)."""
        if noise is None:
            return None
        return tuple(
            draw_noise(noise, (L,) + tuple(u.shape), generator, self.dtype, self.device) for u in self.unshared
        )

    def expand_kwargs(self, L: int) -> dict[str, Any]:
        """The call kwargs with those in ``solver.batched_kwargs`` given a leading dim L."""
        names = self.solver.batched_kwargs
        if not names or not self.kwargs:
            return self.kwargs
        out = dict(self.kwargs)
        for k in names:
            v = out.get(k)
            if v is None:
                continue
            if isinstance(v, torch.Tensor):
                out[k] = v.unsqueeze(0).expand((L,) + tuple(v.shape))
            else:
                arr = np.asarray(v)
                out[k] = np.broadcast_to(arr, (L,) + arr.shape)
        return out

    def solve(self, inputs: Sequence[torch.Tensor], L: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """``solver.map`` of the unshared-layout ``inputs`` ``(L, *unshared)``: (raw, folded) outputs."""
        z = self.solver.map(V.rebuild(self.theta, inputs), **self.expand_kwargs(L))
        raw = tuple(t.detach() for t in V.leaves(z))
        return raw, self.fold(raw)

    def fold(self, raw: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Unshared-layout outputs ``(L, *batch, *R, *E)`` summed over R: ``(L, *out shape)``."""
        return tuple(z.sum(dim=tuple(d + 1 for d in r)) if r else z for z, r in zip(raw, self.rep))

    def unfold(self, g: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Output-layout tensors ``(L, *out shape)`` broadcast over R: ``(L, *unshared)`` (views)."""
        out = []
        for x, r, u in zip(g, self.rep, self.unshared):
            if r:
                for d in r:
                    x = x.unsqueeze(d + 1)
                x = x.expand((x.shape[0],) + tuple(u.shape))
            out.append(x)
        return tuple(out)

    # ------------------------------------------------------------------ reductions
    def to_theta(self, g: Sequence[torch.Tensor], mean: bool = True) -> tuple[torch.Tensor, ...]:
        """Output-layout ``(L, *out shape)`` → θ's shapes: mean (or sum) over L, then a
        shared leaf's batch dims summed (its statistic is per instance, its θ is not)."""
        out = []
        nb = 0 if self.batch is None else len(self.batch)
        for x, s in zip(g, self.shared):
            x = (x.mean(0) if mean else x.sum(0)) if x.shape[0] != 1 else x[0]
            if s and nb:
                x = x.sum(dim=tuple(range(nb)))
            out.append(x)
        return tuple(out)

    def unshared_to_theta(self, g: Sequence[torch.Tensor], mean: bool = True) -> tuple[torch.Tensor, ...]:
        """Unshared-layout ``(L, *unshared)`` → θ's shapes (fold, then :meth:`to_theta`)."""
        return self.to_theta(self.fold(g), mean=mean)

    def per_instance(self, x: Sequence[torch.Tensor]) -> torch.Tensor:
        """Σ over each leaf's event dims, all leaves added: output layout → ``(L, *batch)``
        (``(L,)`` when the batch is unknown)."""
        total = None
        nb = None if self.batch is None else len(self.batch)
        for t in x:
            keep = 1 if nb is None else 1 + nb
            s = t.sum(dim=tuple(range(keep, t.dim()))) if t.dim() > keep else t
            total = s if total is None else total + s
        return total

    def broadcast(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A ``(L, *batch)`` (or ``(L,)``) tensor viewed to broadcast against ``like``."""
        return v.reshape(tuple(v.shape) + (1,) * (like.dim() - v.dim()))
