"""Decoding and sampling kernels of the ``chain`` solver, torch backend (private).

* :func:`viterbi`: MAP labels by max-product with back-tracking (ties to the lowest
  label), in NumPy on the CPU, by back-pointers on a GPU;
* :func:`ffbs`: exact samples by forward filtering, backward sampling.

Labels are ``(…, B, T)`` int64 with ``-1`` past each length and for infeasible
instances; :func:`._pairwise.label_indicators` / :func:`._pairwise.pair_indicators`
turn them into structures.
"""

from __future__ import annotations

import numpy as np
import torch

from structgrad import checks as V

from ._chain_torch import Problem
from ._pairwise import choose

__all__ = ["viterbi", "ffbs"]


def viterbi(p: Problem, pointers: bool | None = None) -> torch.Tensor:
    """Best labels (B, T) by max-product, −1 past the length and for infeasible instances.

    Forward: v_t[j] = max_i (v_{t−1}[i] + edge_{t−1}[i, j]) + node_t[j] (time-major,
    on centred scores (every score ≤ 0), re-centred every 16 steps, or every step when the
    score ranges are so wide (~1e306) that 16 steps of sums could overflow).  On the CPU there is no back-pointer table:
    back-tracking recomputes y_t = argmax_i (v_t[i] + edge_t[i, y_{t+1}]) for the chosen
    y_{t+1} only (lowest i on ties), in NumPy.  On a GPU the forward keeps back-pointers
    (T, B, C), which are copied to the host once and followed there.  ``pointers``
    forces one way or the other (``None``: by device; the tests run the GPU way on the CPU)."""
    B, T, C = p.B, p.T, p.C
    dev = p.node.device
    # centred scores (no-ops on the log path, where the problem holds them already): the
    # per-position shifts are the same for every labelling, so the argmax is unchanged
    node_c = p.node if p.centred else p.node - p.nmax.unsqueeze(-1)
    node = node_c.transpose(0, 1).contiguous()  # (T, B, C)
    v = torch.empty_like(node)
    x = torch.empty((B, C, C), dtype=node.dtype, device=dev)
    best = torch.empty((B, C), dtype=node.dtype, device=dev)
    vs, ns, vcols = v.unbind(0), node.unbind(0), v.unsqueeze(-1).unbind(0)
    # per-instance edges already have the input's size: fold node_{t+1} into them in
    # one vectorised add, leaving two small ops per step (shared edges are never
    # materialised per position, so they keep three)
    folded = p.mode == "full"
    if folded:
        n_next = node_c[:, 1:] if p.centred else node_c[:, 1:] - p.emax.unsqueeze(-1)
        E_scan = p.edge + n_next.unsqueeze(-2)
    else:
        E_scan = p.edge if p.centred else p.edge - p.emax[..., None, None]
    every = 16 if p.moderate else 1
    es = p.steps(E_scan)
    on_cpu = dev.type == "cpu" if pointers is None else not pointers
    bp = None if on_cpu else torch.zeros((T, B, C), dtype=torch.long, device=dev)
    vs[0].copy_(ns[0])
    for t in range(1, T):
        torch.add(vcols[t - 1], es[t - 1], out=x)
        out = vs[t] if folded else best
        if on_cpu:  # amax is much cheaper than max-with-indices here; argmax is redone on back-tracking
            torch.amax(x, dim=1, out=out)
        else:  # on a GPU the indices come free, and one transfer beats a kernel per back step
            m, idx = torch.max(x, dim=1)  # not out=(out, bp[t]): CUDA refuses out= views of other strides (B = 1)
            out.copy_(m)
            bp[t].copy_(idx)
        if not folded:
            torch.add(best, ns[t], out=vs[t])
        if t % every == 0:
            vs[t].sub_(V.finite_or_zero(vs[t].amax(-1, keepdim=True)))
    L = p.lengths if p.lengths is not None else torch.full((B,), T, dtype=torch.long, device=dev)
    last = (L - 1).clamp(min=0)
    v_end = v.gather(0, last.view(1, B, 1).expand(1, B, C)).squeeze(0)
    feasible = torch.isfinite(v_end.amax(-1)) & (L > 0)
    y_end = v_end.argmax(-1)
    if on_cpu:
        # back-track through the very scores the forward maximised (exact same argmaxes)
        labels = torch.from_numpy(backtrack_numpy(p, v.numpy(), y_end.numpy(), L.numpy(), E_scan.numpy()))
    else:
        labels = torch.from_numpy(follow_pointers(bp.cpu().numpy(), y_end.cpu().numpy(), L.cpu().numpy())).to(dev)
    return torch.where(feasible.unsqueeze(1), labels, torch.full_like(labels, -1))


def follow_pointers(bp, y_end, L):
    """labels (B, T) from back-pointers bp (T, B, C): y_t = bp[t+1, y_{t+1}] for t < L − 1."""
    T, B, _ = bp.shape
    labels = np.full((B, T), -1, dtype=np.int64)
    rows = np.arange(B)
    inside = np.arange(T)[:, None] < (L - 1)[None, :]
    valid = np.arange(T)[:, None] < L[None, :]
    y = y_end
    for t in range(T - 1, -1, -1):
        if t + 1 < T:
            y = np.where(inside[t], bp[t + 1][rows, y], y_end)
        labels[:, t] = np.where(valid[t], y, -1)
    return labels


def _edge_column(p: Problem, E, t: int, y, rows):
    """edge_t[b, :, y_b] for every instance b: (B, C) (works for torch tensors and NumPy arrays)."""
    if p.mode == "shared":
        return E[:, y].T
    if p.mode == "positional":
        return E[t][:, y].T
    return E[rows, t, :, y]


def backtrack_numpy(p: Problem, v, y_end, L, E):
    """Back-tracking on the CPU: y_t = argmax_i (v_t[i] + E_t[i, y_{t+1}]) for t < L − 1,
    E the transition scores the forward pass maximised over (edge layout)."""
    B, T = p.B, p.T
    labels = np.full((B, T), -1, dtype=np.int64)
    if B <= 4:  # a scalar loop per instance beats vector ops on tiny batches
        for b in range(B):
            Lb = int(L[b])
            if Lb == 0:
                continue
            y = int(y_end[b])
            labels[b, Lb - 1] = y
            vb = v[:, b]
            for t in range(Lb - 2, -1, -1):
                col = E[:, y] if p.mode == "shared" else (E[t][:, y] if p.mode == "positional" else E[b, t, :, y])
                y = int((vb[t] + col).argmax())
                labels[b, t] = y
        return labels
    rows = np.arange(B)
    inside = np.arange(T)[:, None] < (L - 1)[None, :]  # (T, B)
    valid = np.arange(T)[:, None] < L[None, :]
    y = y_end
    for t in range(T - 1, -1, -1):
        if t + 1 < T:
            y = np.where(inside[t], (v[t] + _edge_column(p, E, t, y, rows)).argmax(1), y_end)
        labels[:, t] = np.where(valid[t], y, -1)
    return labels


def ffbs(p: Problem, alpha: torch.Tensor, S: int, generator: torch.Generator | None) -> torch.Tensor:
    """Exact samples (S, B, T) by forward filtering, backward sampling; −1 past the length.

    y_{L−1} ~ softmax(ᾱ_{L−1}), then y_t ~ softmax_i(ᾱ_t[i] + edge_t[i, y_{t+1}]) (one
    :func:`._pairwise.choose` step per position, Gumbel-max)."""
    B, T = p.B, p.T
    dev = alpha.device
    L = p.lengths if p.lengths is not None else torch.full((B,), T, dtype=torch.long, device=dev)
    labels = torch.full((S, B, T), -1, dtype=torch.long, device=dev)
    y = torch.full((S, B), -1, dtype=torch.long, device=dev)
    for t in range(T - 1, -1, -1):
        inside = (t < L - 1).unsqueeze(0)  # (1, B): y_{t+1} exists
        given = torch.where(inside, y, torch.full_like(y, -1))
        # rows of edge_tᵀ indexed by y_{t+1}: the column edge_t[:, y_{t+1}]
        E = p.edge_at(t).transpose(-1, -2) if t < T - 1 else alpha.new_zeros((p.C, p.C))
        draw = choose(alpha[:, t], E, given, sample=True, generator=generator)  # (S, B)
        y = torch.where((t < L).unsqueeze(0), draw, torch.full_like(draw, -1))
        labels[:, :, t] = y
    # an instance whose remaining prefix is impossible yields −1 everywhere
    dead = (labels.eq(-1) & (torch.arange(T, device=dev) < L.unsqueeze(1)).unsqueeze(0)).any(-1)
    return torch.where(dead.unsqueeze(-1), torch.full_like(labels, -1), labels)
