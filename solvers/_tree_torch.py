"""Belief-propagation kernels of the ``tree`` solver, torch backend (private).

See :mod:`structgrad.solvers.tree` for the model.  Every pass runs level by level over
the :class:`~._tree_graph.Plan` layout (a level is a contiguous slice of positions), so
its cost in Python is O(height), not O(N), and each step is a few batched tensor ops
(on the CPU or the GPU, wherever θ is).  Computation is in float64, in log space.

Notation, for a non-root node v with parent p and the oriented edge scores
E_v[a, b] (label a at p, b at v; the graph's edge transposed where it is listed as
(v, p)); node and edge scores are centred (each node's and edge's maximum removed,
so every score is ≤ 0 and no sum of them overflows; the constants go into A):

* upward:   h_v = node_v + Σ_{children w} m_w,   m_v[a] = logsumexp_b(E_v[a, b] + h_v[b]) (− c_v),
  A = Σ_roots logsumexp h_r + the centring constants (+ Σ c);
* downward: d_root = 0,  d_v[b] = logsumexp_a(E_v[a, b] + h_p[a] + d_p[a] − m_v[a]) (− its max);
  the re-centring in brackets (c_v = max_a of the message) only for scores so wide that
  N·(range) could approach the float64 limit (:attr:`Problem.normalise`);
  where m_v[a] = −inf the term is −inf (no −inf − (−inf)): then E_v[a, b] + h_v[b] = −inf
  for every b, so the term cannot reach a marginal;
* marginals: μ_v = softmax(h_v + d_v),
  μ_{pv}[a, b] = softmax_{(a, b)}(h_p[a] + d_p[a] − m_v[a] + E_v[a, b] + h_v[b]),
  each block normalised by its own logsumexp (:func:`._pairwise.normalized_exp`);
* MAP: the same upward pass with max for logsumexp, then top-down
  y_root = argmax h_root, y_v = argmax_b(E_v[y_p, b] + h_v[b]) (ties to the lowest label);
* sample: upward sum-product, then top-down y_root ~ softmax(h_root),
  y_v ~ softmax_b(E_v[y_p, b] + h_v[b]) (exact; Gumbel-max).

An instance is infeasible when some component has no labelling of finite score:
then A = −inf, and its marginals, MAP and samples are all zero.
"""

from __future__ import annotations

import numpy as np
import torch

from structgrad import checks as V

from ._pairwise import choose, normalized_exp, refuse_create_graph
from ._tree_graph import Plan

__all__ = ["DevicePlan", "Problem", "upward", "downward_marginals", "map_labels", "sample_labels", "TreeLogPartition"]

_CDTYPE = torch.float64


class DevicePlan:
    """A :class:`Plan`'s index arrays as tensors on one device (built once per device)."""

    def __init__(self, plan: Plan, device: torch.device):
        t = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
        self.plan = plan
        self.device = device
        self.N, self.E, self.R = plan.num_nodes, plan.num_edges, plan.num_roots
        self.offsets = plan.offsets
        self.order, self.position = t(plan.order), t(plan.position)
        self.parent, self.flip = t(plan.parent), t(plan.flip)
        uv = np.asarray(plan.edges, dtype=np.int64).reshape(-1, 2)
        self.edges_u, self.edges_v = t(uv[:, 0]), t(uv[:, 1])
        # per level ℓ ≥ 1: (start, end) positions and local parent indices into level ℓ−1
        self.levels = [
            (plan.offsets[l], plan.offsets[l + 1], t(plan.local_parent[plan.offsets[l] - self.R : plan.offsets[l + 1] - self.R]))
            for l in range(1, len(plan.offsets) - 1)
        ]
        self._flat: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def flat_index(self, C: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat gathers between the graph's edge layout (E, C, C) and the oriented
        per-child layout (E, C, C) [parent label, child label]: ``(to_oriented, to_graph)``."""
        if C not in self._flat:
            p = self.plan
            ab = torch.arange(C * C, device=self.device).view(C, C)  # a*C + b
            ba = ab.t().reshape(-1)
            ab = ab.reshape(-1)
            edge_of, slot = torch.as_tensor(p.edge_of, device=self.device), torch.as_tensor(p.slot, device=self.device)
            to_or = edge_of[:, None] * C * C + torch.where(self.flip[:, None], ba, ab)  # (E, C*C)
            flip_e = self.flip[slot] if self.E else self.flip
            to_graph = slot[:, None] * C * C + torch.where(flip_e[:, None], ba, ab)
            self._flat[C] = (to_or.reshape(-1), to_graph.reshape(-1))
        return self._flat[C]


class Problem:
    """θ of one call in the plan's layout: batch flattened to B, float64, centred.

    ``node`` (B, N, C) by position; ``edge`` (B or absent, E, C, C) oriented per
    non-root position ([parent label, child label]); ``const`` (B,) the centring
    constants (Σ of the removed maxima).

    ``normalise``: whether the passes re-centre every message.  After centring, every
    score lies in [−r, 0] (r: the widest range of finite scores of a node or an edge),
    so un-normalised log-messages and beliefs stay within about N·(r + log C) of 0;
    while that is far below the float64 limit (the test: N·r < 1e290) the passes skip
    the re-centring (3 ops per level and pass), and otherwise (scores beyond ~1e287)
    re-centre every message so that nothing overflows.

    ``scale``: A is a sum of N-odd terms (the removed maxima, the message normalisers,
    the roots' log-sums); when these are so large that a partial sum could overflow,
    the sum is taken over the terms times ``scale`` = 2^−64 (exact: a power of two) and
    divided by it at the end, so that A is ±inf only if it really is beyond the
    float64 range, and never NaN.  ``const`` (B,) is Σ (removed maxima) · ``scale``."""

    def __init__(self, dp: DevicePlan, node: torch.Tensor, edge: torch.Tensor):
        self.dp = dp
        self.dtype = node.dtype
        self.batch = node.shape[:-2]
        self.N, self.C = node.shape[-2:]
        self.B = int(torch.Size(self.batch).numel())
        self.shared = edge.dim() == 3
        C, E = self.C, dp.E
        # index_select copies, so the in-place centring below never touches the caller's θ
        node = node.reshape(self.B, self.N, C).index_select(1, dp.order).to(_CDTYPE)
        nmax = V.finite_or_zero(node.amax(-1, keepdim=True))  # a row of −inf: shift 0
        self.node = node.sub_(nmax)
        to_or, _ = dp.flat_index(C)
        flat = edge.reshape(1 if self.shared else self.B, E * C * C)
        eor = flat.index_select(1, to_or).to(_CDTYPE).view(flat.shape[0], E, C, C)
        emax = V.finite_or_zero(eor.amax((-2, -1), keepdim=True)) if E else eor.new_zeros(eor.shape[0], 0, 1, 1)
        self.edge = eor.sub_(emax) if not self.shared else eor.sub_(emax)[0]
        tops = [x.abs().amax() if x.numel() else x.new_zeros(()) for x in (nmax, emax)]
        stats = torch.stack([-_finite_min(self.node), -_finite_min(self.edge), *tops]).tolist()  # one host sync
        r, top = max(stats[:2]), max(stats[2:])
        self.normalise = not r * (self.N + 1) < 1e290
        self.scale = 1.0 if (r + top) * (self.N + 1) < 1e290 else 2.0**-64
        self.const = (nmax * self.scale).sum((1, 2)) + (emax * self.scale).sum((1, 2, 3))  # (B,) or (1,)

    def edge_level(self, s: int, e: int) -> torch.Tensor:
        """Oriented edge scores of positions s..e−1 (non-root): (B, n, C, C) or (n, C, C)."""
        R = self.dp.R
        return self.edge[s - R : e - R] if self.shared else self.edge[:, s - R : e - R]

    def unflatten(self, x: torch.Tensor, event: tuple[int, ...]) -> torch.Tensor:
        return x.reshape(tuple(self.batch) + tuple(event)).to(self.dtype)

    # the backend interface (shared with ``_tree_numba.Problem``), float64 results
    def log_partition(self) -> tuple[torch.Tensor, tuple]:
        """A (B,) and the state the marginals need."""
        h, m, logz, feasible = upward(self)
        return logz, (h, m, feasible)

    def marginals(self, state: tuple, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Node (B, N, C) and edge (B, E, C, C) marginals (see :func:`downward_marginals`)."""
        return downward_marginals(self, *state, weight=weight)

    def map_labels(self) -> torch.Tensor:
        return map_labels(self)

    def sample_labels(self, S: int, generator: torch.Generator | None) -> torch.Tensor:
        return sample_labels(self, S, generator)


def _finite_min(x: torch.Tensor) -> torch.Tensor:
    """The smallest finite entry of ``x`` (0 if none); one pass unless ``x`` has −inf."""
    if x.numel() == 0:
        return x.new_zeros(())
    lo = x.amin()
    return torch.where(torch.isneginf(lo), torch.where(torch.isneginf(x), 0.0, x).amin(), lo)


# ----------------------------------------------------------------------------- passes
_FMIN = torch.finfo(_CDTYPE).min


def _floor_(x: torch.Tensor) -> torch.Tensor:
    """In place: −inf (the maximum of an all-impossible row) becomes the lowest finite
    float, so that subtracting it leaves −inf entries −inf and never makes NaN (one op,
    cheaper than a finite-or-zero mask on these small per-level tensors)."""
    return x.clamp_(min=_FMIN)


def upward(p: Problem, max_product: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leaves-to-roots pass: ``h`` (B, N, C) (node scores plus the children's messages,
    by position), messages ``m`` (B, N−R, C) (max 0 with ``p.normalise``), ``A`` (B,)
    (sum-product) or the best score (max-product), and ``feasible`` (B,) bool.

    A message whose every entry is −inf makes its parent's ``h`` all −inf, and so on up
    to the root: the instance is infeasible and A = −inf (the finite floor that
    :func:`_floor_` puts in its normaliser only adds a finite amount to −inf).
    Messages are re-centred (max 0) only when ``p.normalise``."""
    dp = p.dp
    R = dp.R
    h = p.node.clone()
    m = h.new_zeros(p.B, p.N - R, p.C)
    cst = h.new_zeros(p.B, p.N - R) if p.normalise else None
    offs = dp.offsets
    for lvl in range(len(dp.levels) - 1, -1, -1):
        s, e, lpar = dp.levels[lvl]
        x = p.edge_level(s, e) + h[:, s:e].unsqueeze(-2)  # (B, n, C_parent, C_child)
        mv = x.amax(-1) if max_product else torch.logsumexp(x, dim=-1)
        if cst is not None:
            c = _floor_(mv.amax(-1, keepdim=True))
            mv.sub_(c)
            cst[:, s - R : e - R] = c.squeeze(-1)
        m[:, s - R : e - R] = mv
        h[:, offs[lvl] : offs[lvl + 1]].index_add_(1, lpar, mv)
    top = h[:, :R]
    root = (top.amax(-1) if max_product else torch.logsumexp(top, dim=-1)).sum(-1)
    feasible = torch.isfinite(root)  # from the passes, whatever the size of A
    if p.scale == 1.0:
        logz = root + p.const if cst is None else root + p.const + cst.sum(-1)
    else:
        logz = root * p.scale + p.const
        if cst is not None:
            logz = logz + (cst * p.scale).sum(-1)
        logz = logz / p.scale
    return h, m, logz, feasible


def downward_marginals(
    p: Problem, h: torch.Tensor, m: torch.Tensor, feasible: torch.Tensor, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Roots-to-leaves pass and the marginals: node (B, N, C) and edge (B, E, C, C) in
    node-id and graph-edge order (float64).  Infeasible instances (``feasible`` False) get 0.
    With ``weight`` (B,) and a shared edge, the edge marginals come back summed over the
    batch with those weights, (E, C, C) (the backward of a shared edge).  Reads ``h`` and
    ``m`` without changing them.

    ``belief`` = h + d is built in place level by level; "h_p + d_p − m_v" is computed
    as belief_p + (−m_v) with −m_v set to −inf where m_v = −inf, so the term is −inf
    there and no −inf − (−inf) ever appears (belief is never +inf)."""
    dp = p.dp
    R, C = dp.R, p.C
    neg_m = torch.where(torch.isneginf(m), m, -m)
    belief = h.clone()
    offs = dp.offsets
    for lvl, (s, e, lpar) in enumerate(dp.levels):
        x = belief[:, offs[lvl] : offs[lvl + 1]].index_select(1, lpar).add_(neg_m[:, s - R : e - R])  # (B, n, C_parent)
        dv = torch.logsumexp(p.edge_level(s, e) + x.unsqueeze(-1), dim=-2)  # (B, n, C_child)
        if p.normalise:
            dv.sub_(_floor_(dv.amax(-1, keepdim=True)))
        belief[:, s:e] += dv
    feasible = feasible.to(_CDTYPE)
    # edge blocks: (h_p + d_p − m_v)[a] + E_v[a, b] + h_v[b]
    x = belief.index_select(1, dp.parent).add_(neg_m)
    blk = normalized_exp((x.unsqueeze(-1) + p.edge).add_(h[:, R:].unsqueeze(-2)), 2, inplace=True)
    mu = normalized_exp(belief, 1, inplace=True).mul_(feasible[:, None, None]).index_select(1, dp.position)
    w = feasible if weight is None else feasible * weight
    blk.mul_(w[:, None, None, None])
    _, to_graph = dp.flat_index(C)
    E = dp.E
    if weight is not None and p.shared:
        return mu, blk.sum(0).reshape(E * C * C)[to_graph].view(E, C, C)
    return mu, blk.reshape(p.B, E * C * C).index_select(1, to_graph).view(p.B, E, C, C)


# ----------------------------------------------------------------------------- decoding
def _top_down(p: Problem, h: torch.Tensor, lead: tuple[int, ...], *, sample: bool, generator=None) -> torch.Tensor:
    """Labels (*lead, B, N) by node id, chosen root first (argmax, or a draw with ``sample``)."""
    dp = p.dp
    R = dp.R
    y = torch.full(lead + (p.B, p.N), -1, dtype=torch.long, device=h.device)
    none = torch.full(lead + (p.B, R), -1, dtype=torch.long, device=h.device)
    empty = h.new_zeros(p.C, p.C)
    y[..., :R] = choose(h[:, :R], empty, none, sample=sample, generator=generator)
    offs = dp.offsets
    for lvl, (s, e, lpar) in enumerate(dp.levels):
        yp = y[..., offs[lvl] : offs[lvl + 1]].index_select(-1, lpar)
        y[..., s:e] = choose(h[:, s:e], p.edge_level(s, e), yp, sample=sample, generator=generator)
    return y.index_select(-1, dp.position)


def map_labels(p: Problem) -> torch.Tensor:
    """MAP labels (B, N) by node id (ties to the lowest label); −1 for infeasible instances."""
    h, _, _, feasible = upward(p, max_product=True)
    y = _top_down(p, h, (), sample=False)
    return torch.where(feasible.unsqueeze(-1), y, torch.full_like(y, -1))


def sample_labels(p: Problem, S: int, generator: torch.Generator | None) -> torch.Tensor:
    """S exact samples (S, B, N) by node id; −1 for infeasible instances."""
    h, _, _, feasible = upward(p)
    y = _top_down(p, h, (S,), sample=True, generator=generator)
    return torch.where(feasible[None, :, None], y, torch.full_like(y, -1))


# ----------------------------------------------------------------------------- autograd
class TreeLogPartition(torch.autograd.Function):
    """A(θ) with backward μ(θ)·grad: forward = upward pass, backward = downward pass.

    ``p`` is either backend's problem (this module's :class:`Problem`, or
    ``_tree_numba.Problem``): ``p.log_partition()`` and ``p.marginals(state, weight)``.
    Not differentiable twice (the marginals come from message passing): a backward
    with ``create_graph=True`` raises :class:`~structgrad.errors.CapabilityError`."""

    @staticmethod
    def forward(ctx, node: torch.Tensor, edge: torch.Tensor, p) -> torch.Tensor:
        logz, state = p.log_partition()
        if any(ctx.needs_input_grad[:2]):
            ctx.problem, ctx.state = p, state
        ctx.shapes = (node.shape, edge.shape, node.dtype, edge.dtype, node.device)
        return logz.reshape(p.batch).to(device=node.device, dtype=p.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        refuse_create_graph("tree")
        p = ctx.problem
        node_shape, edge_shape, node_dtype, edge_dtype, device = ctx.shapes
        g = grad.reshape(-1).to(_CDTYPE)
        mu, emu = p.marginals(ctx.state, weight=g)  # reads the state only: the backward may run twice
        mu, emu = mu.to(g.device), emu.to(g.device)
        g_node = mu.mul_(g[:, None, None]).reshape(node_shape).to(node_dtype)
        g_edge = emu.reshape(edge_shape).to(edge_dtype)
        return g_node, g_edge, None
