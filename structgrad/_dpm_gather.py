"""All-gather with a gradient, for data-parallel contrastive losses (private).

:func:`all_gather_with_grad` is public as :func:`structgrad.all_gather_with_grad` and
``structgrad.dpm.all_gather_with_grad``; ``torch.distributed`` is imported only when
it is called.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from . import checks as V
from .errors import DTypeError, ShapeError

__all__ = ["all_gather_with_grad"]


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        import torch.distributed as dist

        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        shape = torch.tensor(list(x.shape), dtype=torch.long, device=x.device)
        shapes = [torch.empty_like(shape) for _ in range(world)]
        dist.all_gather(shapes, shape, group=group)
        shapes = [tuple(s.tolist()) for s in shapes]
        for r, s in enumerate(shapes):
            if s[1:] != tuple(x.shape[1:]):
                raise ShapeError(
                    f"x: expected every rank to share the trailing shape {V.fmt_shape(x.shape[1:])}, "
                    f"rank {r} has {V.fmt_shape(s)}"
                )
        sizes = [s[0] for s in shapes]
        m = max(sizes)
        padded = x.new_zeros((m,) + tuple(x.shape[1:]))
        padded[: x.shape[0]] = x
        bufs = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(bufs, padded, group=group)
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return torch.cat([b[:s] for b, s in zip(bufs, sizes)])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        import torch.distributed as dist

        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return total[start : start + ctx.sizes[ctx.rank]], None


def all_gather_with_grad(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, with a gradient.

    The forward is an all-gather (ranks may hold different numbers of rows: no
    drop_last needed).  The backward sums the incoming gradients over the ranks and
    returns each rank its own rows, so with every rank computing the same loss on
    the gathered batch and DDP averaging the parameter gradients, the result equals
    the gradient of one process on the concatenated batch.  Integer tensors (the
    dataset indices) pass through without a gradient.  Without an initialised
    process group (one process) ``x`` is returned unchanged.

    Args:
        x: ``(b_r, *rest)`` on this rank; ``rest`` equal on every rank.
        group: a process group (default: the world).

    Returns:
        ``(Σ_r b_r, *rest)``, the ranks' rows in rank order.

    Complexity:
        two all-gathers forward (shapes, then data padded to the largest b_r) and one
        all-reduce backward.

    Examples:
        >>> import torch
        >>> from structgrad.dpm import all_gather_with_grad
        >>> all_gather_with_grad(torch.ones(2, 3)).shape   # no process group: unchanged
        torch.Size([2, 3])
    """
    if not isinstance(x, torch.Tensor):
        raise DTypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ShapeError(f"x: expected at least one dimension (rows to gather), got shape {V.fmt_shape(x.shape)}")
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return x
    return _AllGather.apply(x, group)
