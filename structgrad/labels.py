"""Conversions between chain label sequences and indicator structures.

A labelling y of a chain of length L ≤ T is represented, for the ``chain`` solver,
by indicators (node (*b, T, C), edge (*b, T−1, C, C)) with
node[t, c] = [y_t = c] for t < L and edge[t, c, c'] = [y_t = c, y_{t+1} = c'] for
t < L − 1; everything past the length is 0.  With a shared transition matrix the
edge part is the transition count matrix Σ_t edge[t] of shape (*b, C, C).
"""

from __future__ import annotations

import torch

from . import checks as V
from .errors import DomainError, DTypeError, ShapeError

__all__ = ["chain_indicators", "chain_labels"]


def chain_indicators(
    labels: torch.Tensor,
    num_classes: int,
    lengths: torch.Tensor | None = None,
    *,
    shared_edge: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gold indicators of label sequences, for :func:`structgrad.nll` with ``chain``.

    Args:
        labels: ``(*b, T)`` integer labels in ``[0, C)``; entries at or past an
            instance's length are ignored (any padding value is fine).
        num_classes: C.
        lengths: ``(*b,)`` integer lengths in ``[0, T]``; ``None`` means all T.
        shared_edge: return transition counts ``(*b, C, C)`` instead of per-position
            edge indicators ``(*b, T−1, C, C)`` (for a shared ``(C, C)`` edge θ).
        dtype: floating dtype of the result.

    Returns:
        ``(node (*b, T, C), edge (*b, T−1, C, C) or (*b, C, C))``, on labels' device.

    Examples:
        >>> node, edge = chain_indicators(torch.tensor([[0, 2, 1]]), 3)
        >>> edge[0, 0]   # transition 0 -> 2 at t = 0
        tensor([[0., 0., 1.],
                [0., 0., 0.],
                [0., 0., 0.]])
    """
    labels = V.check_index_tensor(labels, "labels")
    C = V.check_positive_int(num_classes, "num_classes")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise DTypeError(f"dtype: expected a floating torch.dtype such as torch.float32, got {dtype!r}")
    if labels.dim() < 1:
        raise ShapeError(f"labels: expected shape (*batch, T), got {V.fmt_shape(labels.shape)}")
    *batch, T = labels.shape
    lengths = V.check_lengths(lengths, batch, T, labels.device)
    pos = torch.arange(T, device=labels.device)
    if lengths is None:
        valid = torch.ones(labels.shape, dtype=torch.bool, device=labels.device)
    else:
        valid = pos < lengths.unsqueeze(-1)
    bad = valid & ((labels < 0) | (labels >= C))
    if bool(bad.any()):
        v = labels[bad].flatten()[:3].tolist()
        raise DomainError(f"labels: expected values in [0, {C}) within each length, got {v}")
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    node = torch.nn.functional.one_hot(safe, C).to(dtype) * valid.unsqueeze(-1).to(dtype)
    ev = valid[..., 1:]  # transition t -> t+1 exists iff t+1 < length
    edge = node[..., :-1, :, None] * node[..., 1:, None, :] * ev[..., None, None].to(dtype)
    if shared_edge:
        edge = edge.sum(dim=-3)
    return node, edge


def chain_labels(node: torch.Tensor) -> torch.Tensor:
    """Labels ``(*b, T)`` (int64) from node indicators ``(*b, T, C)``; ``-1`` where a row is all 0."""
    if not isinstance(node, torch.Tensor):
        raise DTypeError(f"node: expected a tensor of shape (*batch, T, C), got {type(node).__name__}")
    if node.dim() < 2:
        raise ShapeError(f"node: expected a tensor of shape (*batch, T, C), got {V.fmt_shape(node.shape)}")
    idx = node.argmax(dim=-1)
    return torch.where(node.amax(dim=-1) > 0, idx, torch.full_like(idx, -1))
