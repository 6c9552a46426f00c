"""Helpers shared by the pairwise-model solvers ``chain`` and ``tree`` (private).

Both solvers work on pairwise models: a label y_v ∈ {0..C−1} per node, node scores
``node[v, a]`` and edge scores ``edge[e, a, b]`` (label a at one end of edge e, b at the
other), and a structure z = (one-hot labels, one-hot label pairs).  What they share:

* :func:`label_indicators`, :func:`pair_indicators`: the structure z from labels
  (``-1`` = no label: a position past a chain's length, or an infeasible instance);
* :func:`select_rows`, :func:`choose`: one step of top-down decoding or sampling,
  y_child = argmax_b / draw_b (E[y_given, b] + s[b]), used by Viterbi back-tracking
  and forward-filtering backward-sampling on a chain and by top-down MAP and
  sampling on a tree;
* :func:`normalized_exp`: local marginals exp(x − logsumexp x) from unnormalised log
  beliefs, zero where every entry is ``-inf`` (how edge marginals are assembled, so
  that huge finite scores never give ``exp`` of a large difference);
* :func:`refuse_create_graph`: the clear error for a second derivative through a
  log-partition whose marginals are not differentiable.
"""

from __future__ import annotations

import torch

from structgrad.errors import CapabilityError
from structgrad.logspace import gumbel_argmax

__all__ = [
    "label_indicators",
    "pair_indicators",
    "select_rows",
    "choose",
    "normalized_exp",
    "refuse_create_graph",
]


def label_indicators(labels: torch.Tensor, C: int, dtype: torch.dtype) -> torch.Tensor:
    """One-hot labels ``(..., n) -> (..., n, C)``; rows of ``-1`` labels are all 0."""
    valid = labels >= 0
    out = torch.zeros(labels.shape + (C,), dtype=dtype, device=labels.device)
    return out.scatter_(-1, labels.clamp(min=0).unsqueeze(-1), valid.unsqueeze(-1).to(dtype))


def pair_indicators(y_u: torch.Tensor, y_v: torch.Tensor, C: int, dtype: torch.dtype, counts: bool = False) -> torch.Tensor:
    """One-hot label pairs of the edges: ``y_u, y_v (..., E) -> (..., E, C, C)`` with
    entry ``[e, y_u[e], y_v[e]] = 1`` (all 0 where either label is ``-1``); with
    ``counts``, summed over the edges: ``(..., C, C)`` (a chain's transition counts)."""
    ok = ((y_u >= 0) & (y_v >= 0)).to(dtype)
    pair = y_u.clamp(min=0) * C + y_v.clamp(min=0)  # a*C + b
    if counts:
        flat = torch.zeros(pair.shape[:-1] + (C * C,), dtype=dtype, device=pair.device)
        flat.scatter_add_(-1, pair, ok)
        return flat.reshape(pair.shape[:-1] + (C, C))
    flat = torch.zeros(pair.shape + (C * C,), dtype=dtype, device=pair.device)
    flat.scatter_(-1, pair.unsqueeze(-1), ok.unsqueeze(-1))
    return flat.reshape(pair.shape + (C, C))


def select_rows(E: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``E[..., idx, :]`` per element: ``E (..., C, C)`` (broadcastable to
    ``idx.shape + (C, C)``), ``idx (...)`` int64 in ``[0, C)`` -> ``(..., C)``.
    Nothing of size ``idx.shape + (C, C)`` is materialised (``expand`` is a view)."""
    C = E.shape[-1]
    E = E.expand(idx.shape + E.shape[-2:])
    return E.gather(-2, idx[..., None, None].expand(idx.shape + (1, C))).squeeze(-2)


def choose(
    scores: torch.Tensor,
    E: torch.Tensor,
    given: torch.Tensor,
    *,
    sample: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One top-down step: labels ``y = argmax_b (E[given, b] + scores[b])`` (ties to the
    lowest label) or, with ``sample``, drawn from ``softmax_b`` of the same logits
    (Gumbel-max, exact).

    Args:
        scores: ``(..., C)`` log-beliefs of the node(s) being labelled (broadcast to
            ``given.shape + (C,)``).
        E: ``(..., C, C)`` pair scores, rows indexed by the given neighbour's label.
        given: ``(...)`` the neighbour's labels; ``-1`` means "no neighbour" (nothing
            added: a chain's last position, a tree's root) and is kept as the only
            way to get ``-1`` besides all-``-inf`` logits.

    Returns:
        ``(...)`` int64 labels, ``-1`` where every logit is ``-inf``.
    """
    rows = select_rows(E, given.clamp(min=0))
    zero = torch.zeros((), dtype=rows.dtype, device=rows.device)
    logits = torch.where((given >= 0).unsqueeze(-1), rows, zero) + scores
    if sample:
        return gumbel_argmax(logits, 1, generator=generator)[0]
    y = logits.argmax(-1)
    return torch.where(torch.isneginf(logits.amax(-1)), torch.full_like(y, -1), y)


def normalized_exp(x: torch.Tensor, ndim: int = 1, *, inplace: bool = False) -> torch.Tensor:
    """``exp(x − logsumexp x)`` over the last ``ndim`` dims; blocks of all ``-inf`` give 0.

    Computed as ``e = exp(x − max x)``, ``e / Σ e``: the largest entry of each block
    becomes exactly ``exp(0) = 1`` (so Σ e ≥ 1 wherever an entry is finite), and no
    ``exp`` of a difference of two huge numbers appears — which is what keeps local
    marginals exact for huge finite scores (the rounding error of a sum of scores of
    1e30 is ~1e14).  ``inplace``: overwrite ``x`` (a temporary of the caller's)."""
    dims = tuple(range(-ndim, 0))
    # a block of all −inf has max −inf: floor it at the lowest finite float, so that the
    # block stays −inf (exp 0) with no −inf − (−inf)
    m = x.amax(dim=dims, keepdim=True).clamp_(min=torch.finfo(x.dtype).min)
    e = x.sub_(m).exp_() if inplace else (x - m).exp_()
    return e.div_(e.sum(dim=dims, keepdim=True).clamp_(min=1.0))


def refuse_create_graph(solver: str) -> None:
    """Raise the named error for a backward with ``create_graph=True`` (called inside
    an autograd backward, where grad mode is on exactly when a graph is being built)."""
    if torch.is_grad_enabled():
        raise CapabilityError(
            f"second derivatives of the {solver} log-partition are not available: solver {solver!r} "
            f"declares capabilities.differentiable_marginals=False (its marginals, the gradient of "
            f"log_partition, are computed by message passing and are not differentiable); a backward "
            f"with create_graph=True needs them. First derivatives (the marginals) are exact."
        )
