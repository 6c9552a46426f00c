"""Log-depth (parallel-prefix) kernels of the ``chain`` solver (private; pure torch).

The chain's sequential recursions take T dependent steps; on a GPU each step is
a kernel launch.  Here the per-position (C, C) matrices are combined by an
associative product in a balanced tree, so the sequential depth is O(log T)
(each level is one batched op over all pairs) at O(T·C³) work instead of O(T·C²).

Conventions as the torch backend: ``node (B, T, C)``; ``edge`` ``(B, T−1, C, C)``,
``(T−1, C, C)`` or ``(C, C)``; ``lengths (B,)`` integers in [0, T] or None.
Outputs are in θ's dtype (float16/bfloat16 computed in float32).

Matrices: M_t[i, j] = edge_t[i, j] + node_{t+1}[j] (t < T−1), so that

    A = logsumexp_{i,j} (node_0[i] + (M_0 ⊗ M_1 ⊗ … ⊗ M_{L−2})[i, j])

with ⊗ the log-semiring product (X ⊗ Y)[i, j] = logsumexp_k (X[i, k] + Y[k, j]);
MAP uses the max-plus product.  Positions t ≥ L − 1 act as the identity of the
semiring: rather than multiplying by an identity matrix (whose −inf entries would
put NaN in gradients), a segment entirely past the length is *skipped* by a select
(``where(valid_right, left ⊗ right, left)``), and its entries are a finite filler.

Numerical paths (the torch backend's rule, decided over the batch):

* ``"exp"``: every transition finite, every position has a possible label, and
  R = (edge range) + (finite node range) ≤ 32 (float32) / 300 (float64).  Then
  X ⊗ Y = log(exp(X − r) @ exp(Y − c)) + r + c with r, c the row maxima of X and
  column maxima of Y: one matmul.  Exact to working precision: every segment
  product's row i spans ≤ R (changing the segment's last label costs at most R)
  and column j ≤ R (changing its first label), so each term kept is ≥ e^(−2R)
  of the largest.
* ``"log"``: otherwise, in float64: the logsumexp over k explicitly, on
  (…, C, C, C) blocks of bounded size, with a custom backward (no (C³)-sized
  tensors are kept for autograd); −inf entries give no NaN in values or gradients.

Marginals are the gradient of A (autograd through the tree: its backward has the
same O(log T) depth).  MAP: the max-plus tree (up-sweep), prefix Viterbi scores
v_t by a down-sweep (vector-matrix products), back-pointers
bp_{t+1}[j] = argmax_i (v_t[i] + edge_t[i, j]) (lowest i on ties) in one batched op,
and the labels by a suffix scan of pointer-map compositions (gathers):
y_t = (bp_{t+1} ∘ … ∘ bp_{L−1})(y_{L−1}), y_{L−1} the lowest argmax of v_{L−1} — the
torch backend's labels, ties included.

References: G. Blelloch, "Prefix sums and their applications" (1990); S. Särkkä,
Á. García-Fernández, "Temporal parallelization of Bayesian smoothers" (IEEE TAC 2021);
A. Rush, "Torch-Struct" (ACL demo 2020) for the semiring view.

Example:
    >>> import torch
    >>> from structgrad.solvers import _chain_scan as cs
    >>> node, edge = torch.zeros(1, 3, 2), torch.zeros(2, 2)
    >>> cs.log_partition(node, edge)        # log 2^3
    tensor([2.0794])
"""

from __future__ import annotations

import torch

from structgrad.checks import finite_or_zero
from structgrad.logspace import logsumexp

__all__ = ["log_partition", "log_partition_and_marginals", "viterbi", "choose_path"]

_EXP_RANGE = {torch.float32: 32.0, torch.float64: 300.0}
_BLOCK = {"cpu": 1 << 22, "cuda": 1 << 27}  # elements of one (n, C, C, C) temporary (log / max-plus products)
_NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- path rule
def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _choose(node: torch.Tensor, edge: torch.Tensor) -> tuple[str, torch.dtype, bool]:
    """(path, compute dtype, every node score finite) by the torch backend's rule; one host sync."""
    wide = _wide(node.dtype)
    if node.numel() == 0:
        return "exp", wide, True
    nmax = node.amax(-1)
    if edge.numel():
        emax, emin = edge.amax((-2, -1)), edge.amin((-2, -1))
        erange = (emax - emin).max().to(torch.float64)
        efin = torch.isfinite(emin).all()
    else:
        erange, efin = torch.zeros((), dtype=torch.float64, device=node.device), torch.ones((), dtype=torch.bool, device=node.device)
    nmin = node.masked_fill(torch.isneginf(node), float("inf")).amin(-1)
    nrange = torch.where(torch.isneginf(nmax), torch.zeros_like(nmax), nmax - nmin).max().to(torch.float64)
    alive = ~torch.isneginf(nmax).any()
    ok = efin & alive & (erange + nrange <= _EXP_RANGE[wide])
    ok, nfin = torch.stack([ok, torch.isfinite(node.amin())]).tolist()
    return ("exp", wide, bool(nfin)) if ok else ("log", torch.float64, False)


def choose_path(node: torch.Tensor, edge: torch.Tensor) -> tuple[str, torch.dtype]:
    """``("exp", wide dtype)`` or ``("log", float64)`` by the torch backend's rule (one host sync)."""
    return _choose(node, edge)[:2]


# ----------------------------------------------------------------------------- semiring products
def _mm_exp(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Log-semiring product by one matmul, re-centred by X's row and Y's column maxima.
    Entries that are structurally −inf (a label with node score −inf) come out −inf,
    with zero (not NaN) gradient."""
    r = finite_or_zero(X.detach().amax(-1, keepdim=True))
    c = finite_or_zero(Y.detach().amax(-2, keepdim=True))
    S = torch.matmul((X - r).exp(), (Y - c).exp())
    pos = S > 0
    out = torch.log(torch.where(pos, S, torch.ones_like(S))) + r + c
    return torch.where(pos, out, torch.full_like(out, _NEG_INF))


def _mm_exp_finite(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """:func:`_mm_exp` when every entry is finite (no structural zeros): fewer ops."""
    r = X.detach().amax(-1, keepdim=True)
    c = Y.detach().amax(-2, keepdim=True)
    return torch.matmul((X - r).exp(), (Y - c).exp()).log() + (r + c)


def _blocks(n: int, C: int, device: torch.device):
    step = max(1, _BLOCK.get(device.type, _BLOCK["cpu"]) // max(C * C * C, 1))
    return [(i, min(n, i + step)) for i in range(0, n, step)]


class _LogMM(torch.autograd.Function):
    """Exact log-semiring product over the last two dims (leading dims flattened),
    in blocks; backward recomputes the weights exp(X[i,k] + Y[k,j] − out[i,j])."""

    @staticmethod
    def forward(ctx, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        shape = X.shape
        C = shape[-1]
        Xf, Yf = X.reshape(-1, C, C), Y.reshape(-1, C, C)
        out = torch.empty_like(Xf)
        for a, b in _blocks(Xf.shape[0], C, Xf.device):
            out[a:b] = torch.logsumexp(Xf[a:b, :, :, None] + Yf[a:b, None, :, :], dim=-2)
        ctx.save_for_backward(Xf, Yf, out)
        return out.reshape(shape)

    @staticmethod
    def backward(ctx, G: torch.Tensor):
        Xf, Yf, out = ctx.saved_tensors
        C = Xf.shape[-1]
        Gf = G.reshape(-1, C, C)
        gX, gY = torch.empty_like(Xf), torch.empty_like(Yf)
        for a, b in _blocks(Xf.shape[0], C, Xf.device):
            o = out[a:b, :, None, :]
            W = torch.exp(Xf[a:b, :, :, None] + Yf[a:b, None, :, :] - finite_or_zero(o))  # [i, k, j]
            W = torch.where(torch.isneginf(o), torch.zeros_like(W), W) * Gf[a:b, :, None, :]
            gX[a:b] = W.sum(-1)
            gY[a:b] = W.sum(-3)
        return gX.reshape(G.shape), gY.reshape(G.shape)


def _mm_log(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    return _LogMM.apply(X, Y)


def _mm_max(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Max-plus product (no autograd needed), in blocks."""
    C = X.shape[-1]
    Xf, Yf = X.reshape(-1, C, C), Y.reshape(-1, C, C)
    out = torch.empty_like(Xf)
    for a, b in _blocks(Xf.shape[0], C, Xf.device):
        out[a:b] = (Xf[a:b, :, :, None] + Yf[a:b, None, :, :]).amax(-2)
    return out.reshape(X.shape)


# ----------------------------------------------------------------------------- the tree
def _matrices(node: torch.Tensor, edge: torch.Tensor, lengths: torch.Tensor | None):
    """M (B, T−1, C, C) = edge_t + node_{t+1}[None, :], a finite filler (0) at t ≥ L − 1,
    and valid (B, T−1) = t < L − 1."""
    B, T, C = node.shape
    E = edge if edge.dim() == 4 else (edge.unsqueeze(0) if edge.dim() == 3 else edge.view(1, 1, C, C))
    M = E + node[:, 1:, None, :]
    if lengths is None:
        return M, None
    valid = torch.arange(T - 1, device=node.device).unsqueeze(0) < (lengths.view(B, 1) - 1)
    return torch.where(valid[:, :, None, None], M, torch.zeros((), dtype=M.dtype, device=M.device)), valid


def _pad_even(X: torch.Tensor, V: torch.Tensor):
    if X.shape[1] % 2 == 0:
        return X, V
    return torch.cat([X, torch.zeros_like(X[:, :1])], 1), torch.cat([V, torch.zeros_like(V[:, :1])], 1)


def _up_sweep(X: torch.Tensor, V: torch.Tensor, mm, keep: bool = False):
    """Balanced-tree product of X (B, N, C, C) along dim 1, skipping invalid segments.
    Returns the total product (B, C, C) (and, with ``keep``, every level's (X, V))."""
    levels = []
    while V is None and X.shape[1] > 1:  # every position valid: no selects
        n = X.shape[1]
        prod = mm(X[:, 0 : n - 1 : 2], X[:, 1::2])
        X = torch.cat([prod, X[:, n - 1 :]], 1) if n % 2 else prod
    while X.shape[1] > 1:
        X, V = _pad_even(X, V)
        if keep:
            levels.append((X, V))
        left, right = X[:, 0::2], X[:, 1::2]
        prod = mm(left, right)
        X = torch.where(V[:, 1::2, None, None], prod, left)
        V = V[:, 0::2]
        # (a segment whose left half is past the length is past it entirely: V = left's)
    return X[:, 0], levels


def _sum_product(node, edge, lengths, mm):
    """A (B,) in node's dtype by the tree (differentiable when the inputs require grad)."""
    B, T, C = node.shape
    if T == 1:
        A1 = logsumexp(node[:, 0], -1)
    else:
        M, valid = _matrices(node, edge, lengths)
        P, _ = _up_sweep(M, valid, mm)
        A1 = logsumexp(logsumexp(node[:, 0, :, None] + P, -1), -1)  # L >= 2 (P unused otherwise)
        A_one = logsumexp(node[:, 0], -1)
        if lengths is not None:
            A1 = torch.where(lengths >= 2, A1, A_one)
    if lengths is None:
        return A1
    return torch.where(lengths > 0, A1, torch.zeros_like(A1))


def _product(path: str, finite: bool):
    if path == "log":
        return _mm_log
    return _mm_exp_finite if finite else _mm_exp


def _cast_in(node, edge, cdtype):
    return node.to(cdtype), edge.to(cdtype)


def log_partition(node: torch.Tensor, edge: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """A = log Z (B,) by the log-depth tree, differentiable (its backward is the marginals,
    with the same depth); batch-less edges get the batch-summed gradient, as usual."""
    path, cdtype, finite = _choose(node.detach(), edge.detach())
    n, e = _cast_in(node, edge, cdtype)
    A = _sum_product(n, e, lengths, _product(path, finite))
    return A.to(node.dtype)


def log_partition_and_marginals(node: torch.Tensor, edge: torch.Tensor, lengths: torch.Tensor | None = None):
    """``(A (B,), mu (B, T, C), emu)`` detached, in θ's dtype: emu ``(B, T−1, C, C)`` for
    per-position edges (both layouts) or expected transition counts ``(B, C, C)`` for a
    ``(C, C)`` edge.  Marginals by autograd through the tree (depth O(log T))."""
    B, T, C = node.shape
    path, cdtype, finite = _choose(node.detach(), edge.detach())
    mm = _product(path, finite)
    with torch.enable_grad():
        n = node.detach().to(cdtype).requires_grad_()
        e = edge.detach().to(cdtype)
        if edge.dim() == 3:
            e = e.unsqueeze(0).expand(B, T - 1, C, C)
        elif edge.dim() == 2:
            e = e.unsqueeze(0).expand(B, C, C)
        e = (e.clone() if edge.dim() < 4 else e).requires_grad_()  # a leaf per instance: per-instance marginals
        e_in = e if edge.dim() != 2 else e.unsqueeze(1)  # (B, 1, C, C): shared by positions
        A = _sum_product(n, e_in, lengths, mm)
        if T == 1:
            gn = torch.autograd.grad(A.sum(), [n])[0]
            ge = torch.zeros_like(e)
        else:
            gn, ge = torch.autograd.grad(A.sum(), [n, e])
    dt = node.dtype
    return A.detach().to(dt), gn.to(dt), ge.to(dt)


# ----------------------------------------------------------------------------- MAP
def _vecmax(v: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """Max-plus vector-matrix product: (v ⊗ X)[j] = max_i (v[i] + X[i, j])."""
    return (v.unsqueeze(-1) + X).amax(-2)


def viterbi(node: torch.Tensor, edge: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Best labels (B, T) int64 by the max-plus tree; −1 past the length and for infeasible
    instances; ties to the lowest label (the torch backend's labels)."""
    B, T, C = node.shape
    dev = node.device
    cd = _wide(node.dtype)
    node, edge = node.detach().to(cd), edge.detach().to(cd)
    L = lengths.to(dev).long() if lengths is not None else torch.full((B,), T, dtype=torch.long, device=dev)
    if T == 1:
        v = node
    else:
        M, valid = _matrices(node, edge, lengths)
        if valid is None:
            valid = torch.ones(M.shape[:2], dtype=torch.bool, device=dev)
        # one trailing skipped slot, so the down-sweep yields v_0 .. v_{T−1}
        M = torch.cat([M, torch.zeros_like(M[:, :1])], 1)
        valid = torch.cat([valid, torch.zeros_like(valid[:, :1])], 1)
        _, levels = _up_sweep(M, valid, _mm_max, keep=True)
        inc = node[:, 0].unsqueeze(1)  # (B, 1, C): prefix vector entering each top segment
        for X, V in reversed(levels):
            inc = inc[:, : X.shape[1] // 2]  # parents of this level (drop the padding slot)
            left = X[:, 0::2]
            step = torch.where(V[:, 0::2, None], _vecmax(inc, left), inc)
            inc = torch.stack([inc, step], 2).reshape(B, -1, C)  # children 2k, 2k+1
        v = inc[:, :T]  # v_t = v_0 ⊗ M_0 ⊗ … ⊗ M_{t−1}
    last = (L - 1).clamp(min=0)
    v_end = v.gather(1, last.view(B, 1, 1).expand(B, 1, C)).squeeze(1)
    y_end = v_end.argmax(-1)  # lowest label on ties
    feasible = (L > 0) & torch.isfinite(v_end.amax(-1))
    labels = y_end.unsqueeze(1).expand(B, T).clone()
    if T > 1:
        E = edge if edge.dim() == 4 else (edge.unsqueeze(0) if edge.dim() == 3 else edge.view(1, 1, C, C))
        bp = (v[:, :-1, :, None] + E).argmax(-2)  # (B, T−1, C): label at t given label j at t+1
        ident = torch.arange(C, device=dev).view(1, 1, C).expand(B, T - 1, C)
        inside = torch.arange(T - 1, device=dev).view(1, T - 1) < (L.view(B, 1) - 1)
        F = torch.where(inside.unsqueeze(-1), bp, ident)  # f_t, identity at t ≥ L − 1
        d = 1
        while d < T - 1:  # F_t <- F_t ∘ F_{t+d}: suffix compositions in log2(T) gathers
            F = torch.cat([torch.gather(F[:, :-d], 2, F[:, d:]), F[:, -d:]], 1)
            d *= 2
        labels[:, :-1] = torch.gather(F, 2, y_end.view(B, 1, 1).expand(B, T - 1, 1)).squeeze(-1)
    keep = (torch.arange(T, device=dev).view(1, T) < L.view(B, 1)) & feasible.view(B, 1)
    return torch.where(keep, labels, torch.full_like(labels, -1))
