"""Compiled CPU kernels of the ``tree`` solver, ``backend="numba"`` (private; imported on first use).

The same messages as :mod:`._tree_torch` (see there for the formulas), computed node
by node in compiled loops instead of level by level in tensor operations: for small
and medium forests the torch backend's cost is the dispatch of ~10 operations per
level and pass, and these loops do the whole pass in the time of a few of them.

Per instance: node scores are read in node-id order and centred (each node's
maximum removed); edge scores are oriented to [parent label, child label] and
centred once per distinct edge row (once for a shared ``(E, C, C)`` edge); every
message is re-centred to maximum 0, so no sum of scores overflows for any finite
input; A adds back the removed constants (summed in a scaled form when the plain
sum is not finite, so A is ±inf only when it really is beyond float64, never NaN).
Positions are processed in the plan's level order (children after parents), so the
upward pass runs over the positions backwards and the downward pass forwards.

* upward: h_v = node_v + Σ_children m_w,  m_v[a] = logsumexp_b(E_v[a, b] + h_v[b]) − c_v
  (max-product: max for logsumexp);
* downward, marginals: x = h_p + d_p − m_v (−inf where m_v = −inf),
  d_v[b] = logsumexp_a(E_v[a, b] + x[a]) − max; node marginals softmax(h_v + d_v);
  edge marginals softmax_{(a, b)}(x[a] + E_v[a, b] + h_v[b]);
* MAP: top-down argmax (lowest label on ties); samples: top-down inverse-CDF draws
  from caller-given uniforms (the randomness stays with the caller's torch.Generator).

Everything is float64 and single-threaded (a loop over the batch).  Time
O(B·N·C²); memory O(B·N·C) beyond the inputs and outputs, plus the oriented edges.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from ._tree_graph import Plan

__all__ = ["Problem"]

_jit = numba.njit(cache=True, nogil=True)
_SCALE = 2.0**-64  # exact: a power of two


@_jit
def _orient(edge, edge_of, flip):
    """Oriented, centred edges Eo (Be, N−R, C, C) [parent label, child label], and per
    row the sum of the removed maxima (plain, and times 2^-64)."""
    Be, _, C, _ = edge.shape
    K = edge_of.shape[0]
    Eo = np.empty((Be, K, C, C))
    tot = np.zeros(Be)
    tot_s = np.zeros(Be)
    for r in range(Be):
        for j in range(K):
            e = edge_of[j]
            mx = -np.inf
            for a in range(C):
                for b in range(C):
                    v = edge[r, e, b, a] if flip[j] else edge[r, e, a, b]
                    Eo[r, j, a, b] = v
                    if v > mx:
                        mx = v
            if mx == -np.inf:
                mx = 0.0
            for a in range(C):
                for b in range(C):
                    Eo[r, j, a, b] -= mx
            tot[r] += mx
            tot_s[r] += mx * _SCALE
    return Eo, tot, tot_s


@_jit
def _upward(node, Eo, order, parent, R, maxprod, h, m):
    """One instance: fills h (N, C) by position and m (N−R, C); returns
    (root term, Σ constants, Σ constants · 2^-64)."""
    N, C = node.shape
    tot = 0.0
    tot_s = 0.0
    for k in range(N):
        v = order[k]
        mx = -np.inf
        for c in range(C):
            if node[v, c] > mx:
                mx = node[v, c]
        if mx == -np.inf:
            mx = 0.0
        for c in range(C):
            h[k, c] = node[v, c] - mx
        tot += mx
        tot_s += mx * _SCALE
    for k in range(N - 1, R - 1, -1):
        j = k - R
        cmax = -np.inf
        for a in range(C):
            rmx = -np.inf
            for b in range(C):
                t = Eo[j, a, b] + h[k, b]
                if t > rmx:
                    rmx = t
            if rmx == -np.inf or maxprod:
                m[j, a] = rmx
            else:
                s = 0.0
                for b in range(C):
                    s += math.exp(Eo[j, a, b] + h[k, b] - rmx)
                m[j, a] = rmx + math.log(s)
            if m[j, a] > cmax:
                cmax = m[j, a]
        if cmax == -np.inf:
            cmax = 0.0  # an impossible subtree: its parent's h becomes all -inf
        p = parent[j]
        for a in range(C):
            m[j, a] -= cmax
            h[p, a] += m[j, a]
        tot += cmax
        tot_s += cmax * _SCALE
    root = 0.0
    for r in range(R):
        rmx = -np.inf
        for c in range(C):
            if h[r, c] > rmx:
                rmx = h[r, c]
        if rmx == -np.inf or maxprod:
            root += rmx
        else:
            s = 0.0
            for c in range(C):
                s += math.exp(h[r, c] - rmx)
            root += rmx + math.log(s)
    return root, tot, tot_s


@_jit
def _log_partition(node, Eo, etot, etot_s, order, parent, R, maxprod, h, m, logz, feasible):
    """Upward pass for every instance: h (B, N, C), m (B, N−R, C), A (B,), feasible (B,)."""
    B = node.shape[0]
    shared = Eo.shape[0] == 1
    for i in range(B):
        r = 0 if shared else i
        root, tot, tot_s = _upward(node[i], Eo[r], order, parent, R, maxprod, h[i], m[i])
        feasible[i] = root > -np.inf
        total = root + tot + etot[r]
        if root == -np.inf or math.isfinite(total):
            logz[i] = total if root > -np.inf else -np.inf
        else:  # the plain sum overflowed (or met inf − inf): take it scaled
            logz[i] = (root * _SCALE + tot_s + etot_s[r]) / _SCALE


@_jit
def _marginals(Eo, order, parent, edge_of, flip, R, h, m, feasible, weight, mu, emu):
    """Downward pass and marginals for every instance: mu (B, N, C) by node id,
    emu (B, E, C, C) by graph edge (times ``weight[i]``); zero where infeasible."""
    B, N, C = h.shape
    shared = Eo.shape[0] == 1
    bel = np.empty((N, C))
    x = np.empty(C)
    d = np.empty(C)
    blk = np.empty((C, C))
    for i in range(B):
        E = Eo[0] if shared else Eo[i]
        if not feasible[i]:
            for v in range(N):
                for c in range(C):
                    mu[i, v, c] = 0.0
            for j in range(N - R):
                for a in range(C):
                    for b in range(C):
                        emu[i, edge_of[j], a, b] = 0.0
            continue
        for k in range(N):
            for c in range(C):
                bel[k, c] = h[i, k, c]
        for k in range(R, N):
            j = k - R
            p = parent[j]
            for a in range(C):
                x[a] = -np.inf if m[i, j, a] == -np.inf else bel[p, a] - m[i, j, a]
            dmx = -np.inf
            for b in range(C):
                cmx = -np.inf
                for a in range(C):
                    t = E[j, a, b] + x[a]
                    if t > cmx:
                        cmx = t
                if cmx == -np.inf:
                    d[b] = -np.inf
                else:
                    s = 0.0
                    for a in range(C):
                        s += math.exp(E[j, a, b] + x[a] - cmx)
                    d[b] = cmx + math.log(s)
                if d[b] > dmx:
                    dmx = d[b]
            if dmx == -np.inf:
                dmx = 0.0
            for b in range(C):
                bel[k, b] += d[b] - dmx
            # edge block x[a] + E[a, b] + h_v[b], normalised
            bmx = -np.inf
            for a in range(C):
                for b in range(C):
                    t = x[a] + E[j, a, b] + h[i, k, b]
                    blk[a, b] = t
                    if t > bmx:
                        bmx = t
            s = 0.0
            if bmx > -np.inf:
                for a in range(C):
                    for b in range(C):
                        blk[a, b] = math.exp(blk[a, b] - bmx)
                        s += blk[a, b]
            e = edge_of[j]
            for a in range(C):
                for b in range(C):
                    val = weight[i] * blk[a, b] / s if s > 0.0 else 0.0
                    if flip[j]:
                        emu[i, e, b, a] = val
                    else:
                        emu[i, e, a, b] = val
        for k in range(N):
            v = order[k]
            mx = -np.inf
            for c in range(C):
                if bel[k, c] > mx:
                    mx = bel[k, c]
            s = 0.0
            for c in range(C):
                mu[i, v, c] = 0.0 if mx == -np.inf else math.exp(bel[k, c] - mx)
                s += mu[i, v, c]
            for c in range(C):
                mu[i, v, c] = mu[i, v, c] / s if s > 0.0 else 0.0


@_jit
def _pick(logits, u):
    """Index drawn from softmax(logits) by the inverse CDF at u ∈ [0, 1); argmax (lowest
    on ties) when u < 0; −1 if every logit is −inf."""
    C = logits.shape[0]
    mx = -np.inf
    arg = -1
    for c in range(C):
        if logits[c] > mx:
            mx = logits[c]
            arg = c
    if arg < 0 or u < 0.0:
        return arg
    s = 0.0
    for c in range(C):
        s += math.exp(logits[c] - mx)
    t = u * s
    cum = 0.0
    last = arg
    for c in range(C):
        w = math.exp(logits[c] - mx)
        if w > 0.0:
            last = c
        cum += w
        if cum > t and w > 0.0:
            return c
    return last  # rounding: t reached the total


@_jit
def _top_down(Eo, order, parent, R, h, feasible, U, labels):
    """Labels (S, B, N) by node id: argmax (U is None-like: shape (S, B, 0)) or inverse-CDF
    draws at U (S, B, N), from the roots down; −1 for infeasible instances."""
    S, B, N = labels.shape
    C = h.shape[2]
    shared = Eo.shape[0] == 1
    y = np.empty(N, dtype=np.int64)
    logits = np.empty(C)
    draw = U.shape[2] > 0
    for s in range(S):
        for i in range(B):
            if not feasible[i]:
                for v in range(N):
                    labels[s, i, v] = -1
                continue
            E = Eo[0] if shared else Eo[i]
            for k in range(N):
                u = U[s, i, order[k]] if draw else -1.0
                if k < R:
                    for c in range(C):
                        logits[c] = h[i, k, c]
                else:
                    j = k - R
                    yp = y[parent[j]]
                    for c in range(C):
                        logits[c] = E[j, yp, c] + h[i, k, c]
                y[k] = _pick(logits, u)
                labels[s, i, order[k]] = y[k]


class Problem:
    """θ of one call for the compiled kernels (CPU, float64 NumPy arrays).

    The backend interface of :class:`._tree_torch.Problem`: ``log_partition()``,
    ``marginals(state, weight)``, ``map_labels()``, ``sample_labels(S, generator)``,
    with float64 torch tensors in and out (CPU)."""

    def __init__(self, plan: Plan, node: torch.Tensor, edge: torch.Tensor):
        self.plan = plan
        self.dtype = node.dtype
        self.batch = node.shape[:-2]
        self.N, self.C = node.shape[-2:]
        self.B = int(torch.Size(self.batch).numel())
        self.shared = edge.dim() == 3
        E, C = plan.num_edges, self.C
        self.node = node.reshape(self.B, self.N, C).to(torch.float64).contiguous().numpy()  # read only
        edge = edge.reshape(1 if self.shared else self.B, E, C, C).to(torch.float64).contiguous().numpy()
        self.Eo, self.etot, self.etot_s = _orient(edge, plan.edge_of, plan.flip)
        self.R = plan.num_roots

    def _up(self, maxprod: bool):
        B, N, C, R = self.B, self.N, self.C, self.R
        h = np.empty((B, N, C))
        m = np.empty((B, N - R, C))
        logz = np.empty(B)
        feasible = np.empty(B, dtype=np.bool_)
        p = self.plan
        _log_partition(self.node, self.Eo, self.etot, self.etot_s, p.order, p.parent, R, maxprod, h, m, logz, feasible)
        return h, m, logz, feasible

    def log_partition(self) -> tuple[torch.Tensor, tuple]:
        h, m, logz, feasible = self._up(False)
        return torch.from_numpy(logz), (h, m, feasible)

    def marginals(self, state: tuple, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Node (B, N, C) and edge (B, E, C, C) marginals; with ``weight`` (B,) the edge
        marginals are weighted per instance, and summed over the batch for a shared edge."""
        h, m, feasible = state
        p = self.plan
        w = np.ones(self.B) if weight is None else weight.detach().to(torch.float64).cpu().numpy()
        mu = np.empty((self.B, self.N, self.C))
        emu = np.empty((self.B, p.num_edges, self.C, self.C))
        _marginals(self.Eo, p.order, p.parent, p.edge_of, p.flip, self.R, h, m, feasible, w, mu, emu)
        emu_t = torch.from_numpy(emu)
        if weight is not None and self.shared:
            emu_t = emu_t.sum(0)
        return torch.from_numpy(mu), emu_t

    def map_labels(self) -> torch.Tensor:
        h, _, _, feasible = self._up(True)
        labels = np.empty((1, self.B, self.N), dtype=np.int64)
        _top_down(self.Eo, self.plan.order, self.plan.parent, self.R, h, feasible, np.empty((1, self.B, 0)), labels)
        return torch.from_numpy(labels[0])

    def sample_labels(self, S: int, generator: torch.Generator | None) -> torch.Tensor:
        h, _, _, feasible = self._up(False)
        U = torch.rand((S, self.B, self.N), generator=generator, dtype=torch.float64).numpy()
        labels = np.empty((S, self.B, self.N), dtype=np.int64)
        _top_down(self.Eo, self.plan.order, self.plan.parent, self.R, h, feasible, U, labels)
        return torch.from_numpy(labels)
