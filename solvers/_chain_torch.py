"""Forward-backward kernels of the ``chain`` solver, torch backend (private).

See :mod:`structgrad.solvers.chain` for the model and the algorithms.  Here:

* :class:`Problem`: a checked chain problem, batch flattened to B, in its compute
  dtype, with the path choice (probability space or log space);
* :func:`forward` / :func:`backward`: the α pass (log-normalisers c, A = Σ_{t<L} c_t)
  and the β pass with the marginals, on either path;
* :class:`ChainLogPartition`: A(θ) as an autograd Function (forward = α pass,
  backward = β pass, returning μ·grad).

Decoding and sampling (Viterbi, FFBS) are in :mod:`._chain_decode`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from structgrad import checks as V

from ._pairwise import normalized_exp, refuse_create_graph

__all__ = ["Problem", "forward", "backward", "log_z", "log_messages", "ChainLogPartition"]

# Largest score range R = (max − min of any position's edge scores) + (max − min of
# any position's finite node scores) for which the probability-space path is exact to
# working precision: with every transition finite, its messages stay within
# e^(±2R)·poly(C) of each other, so nothing underflows (float32's smallest normal is
# about e^-87, float64's e^-708).  Wider ranges, or any -inf transition, take the log path.
_EXP_RANGE = {torch.float32: 32.0, torch.float64: 300.0}


class Problem:
    """A checked chain problem, batch flattened to B, in its compute dtype.

    ``path`` is ``"exp"`` (probability space: matrix products, per-step
    normalisation) when every transition score is finite and the per-position score
    ranges are small enough for that to be exact; otherwise ``"log"`` (log-space
    logsumexp recursions, computed in float64 so float32 inputs keep ≤1e-5 marginal
    accuracy even for scores of order 1e2–1e4).

    On the log path ``node`` and ``edge`` are *centred*: each position's maximum
    (``nmax``, ``emax``) is subtracted, so every score is ≤ 0 and no sum of scores
    can overflow to +inf, whatever the magnitude of the (finite) input; ``shift``
    (B, T) = nmax_t + emax_{t−1} is added back into the log-normalisers.  The exp path
    keeps the scores as given (its kernels subtract the same maxima before ``exp``).
    """

    def __init__(self, node: torch.Tensor, edge: torch.Tensor, lengths: torch.Tensor | None):
        self.dtype = node.dtype
        self.batch = node.shape[:-2]
        self.T, self.C = node.shape[-2:]
        self.B = int(torch.Size(self.batch).numel())
        self.lengths = None if lengths is None else lengths.reshape(-1)
        node = node.reshape((self.B, self.T, self.C))
        if edge.dim() == 2:
            self.mode = "shared"  # (C, C)
        elif edge.dim() == 3:
            self.mode = "positional"  # (T-1, C, C), shared by the batch
        else:
            self.mode = "full"
            edge = edge.reshape((self.B, self.T - 1, self.C, self.C))
        # per-position maxima and ranges of the finite scores (NaN / +inf were refused by
        # the solver's check_values; -inf entries are impossible outcomes)
        nmax = node.amax(-1) if node.numel() else node.new_zeros(node.shape[:-1])
        emax = edge.amax((-2, -1)) if edge.numel() else edge.new_zeros(edge.shape[:-2])
        emin = edge.amin((-2, -1)) if edge.numel() else emax
        nmin = node.masked_fill(torch.isneginf(node), float("inf")).amin(-1) if node.numel() else nmax
        nrange = torch.where(torch.isneginf(nmax), torch.zeros_like(nmax), nmax - nmin)
        wide = torch.float64 if self.dtype == torch.float64 else torch.float32
        one = lambda x: x.max() if x.numel() else torch.zeros((), dtype=x.dtype, device=x.device)  # noqa: E731
        # emax − emin is +inf or NaN where an edge score is -inf (then the log path)
        stats = torch.stack([one(emax - emin).double(), one(nrange).double(), torch.isneginf(nmax).any().double()])
        erange, nrange_max, dead = stats.tolist()  # one host synchronisation
        exp_ok = dead == 0.0 and erange + nrange_max <= _EXP_RANGE[wide]  # False for NaN / inf
        if not math.isfinite(erange):  # some -inf edge score: the range of the finite ones
            emin_f = edge.masked_fill(torch.isneginf(edge), float("inf")).amin((-2, -1)) if edge.numel() else emax
            erange = float(one(torch.where(torch.isneginf(emax), torch.zeros_like(emax), emax - emin_f)))
        #: the score range is small enough for a max-product to re-centre only every 16 steps
        self.moderate = 64.0 * (erange + nrange_max) < torch.finfo(wide if exp_ok else torch.float64).max
        self.path = "exp" if exp_ok else "log"
        self.cdtype = wide if exp_ok else torch.float64
        self.nmax = V.finite_or_zero(nmax.to(self.cdtype))
        self.emax = V.finite_or_zero(emax.to(self.cdtype))  # finite (nothing changed) on the exp path
        self.centred = not exp_ok
        if self.centred:  # cast, then subtract in place (a mixed-dtype subtraction is much slower)
            self.node = node.to(self.cdtype, copy=True).sub_(self.nmax.unsqueeze(-1))
            self.edge = edge.to(self.cdtype, copy=True).sub_(self.emax[..., None, None])
        else:
            self.node, self.edge = node.to(self.cdtype), edge.to(self.cdtype)

    def shift(self) -> torch.Tensor:
        """(B, T): nmax_t + emax_{t−1}, the per-position constant removed by centring."""
        s = self.nmax.clone()
        if self.T > 1:
            s[:, 1:] += self.emax  # scalar, (T−1,) or (B, T−1): broadcasts
        return s

    def centred_scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(node, edge) with each position's maximum subtracted (every score ≤ 0)."""
        if self.centred:
            return self.node, self.edge
        return self.node - self.nmax.unsqueeze(-1), self.edge - self.emax[..., None, None]

    def edge_at(self, t: int) -> torch.Tensor:
        """Transition scores between positions t and t+1: (B, C, C) or (C, C)."""
        if self.mode == "shared":
            return self.edge
        if self.mode == "positional":
            return self.edge[t]
        return self.edge[:, t]

    def steps(self, E: torch.Tensor | None = None) -> list[torch.Tensor] | tuple[torch.Tensor, ...]:
        """``[E_0, ..., E_{T−2}]``: views of ``E`` (default: the edge scores; or a tensor of
        the edge's layout) per transition, made in one call rather than T − 1 indexings."""
        E = self.edge if E is None else E
        if self.mode == "shared":
            return [E] * (self.T - 1)
        return E.unbind(0) if self.mode == "positional" else E.unbind(1)

    def unflatten(self, x: torch.Tensor, event: tuple[int, ...]) -> torch.Tensor:
        return x.reshape(tuple(self.batch) + tuple(event)).to(self.dtype)

    def valid(self, offset: int = 0) -> torch.Tensor | None:
        """(B, T − offset) bool: position t + offset < length (None: all valid)."""
        if self.lengths is None:
            return None
        pos = torch.arange(self.T - offset, device=self.node.device)
        return pos.unsqueeze(0) + offset < self.lengths.unsqueeze(1)

    def edge_event(self) -> tuple[int, ...]:
        return (self.C, self.C) if self.mode == "shared" else (self.T - 1, self.C, self.C)


def log_z(p: Problem, c: torch.Tensor) -> torch.Tensor:
    """A (B,) = Σ_{t<L} c_t: both paths normalise the last message to total mass 1."""
    if p.lengths is None:
        return c.sum(-1)
    last = (p.lengths - 1).clamp(min=0)
    out = torch.cumsum(c, dim=-1).gather(1, last.unsqueeze(1)).squeeze(1)
    return torch.where(p.lengths > 0, out, torch.zeros_like(out))




# ----------------------------------------------------------------------------- log path
def _log_alpha(p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward messages ᾱ (B, T, C), log-normalised (logsumexp_j ᾱ_t = 0 or −inf), and
    their log-normalisers c (B, T) (the centring shift added back):
    ᾱ_t[j] = logsumexp_i(ᾱ_{t−1}[i] + edge_{t−1}[i, j]) + node_t[j] − c_t."""
    node = p.node
    alpha = torch.empty_like(node)
    c = torch.empty(node.shape[:-1], dtype=node.dtype, device=node.device)
    a = node[:, 0]
    es = p.steps()
    for t in range(p.T):
        if t > 0:
            a = torch.logsumexp(a.unsqueeze(2) + es[t - 1], dim=1).add_(node[:, t])
        ct = torch.logsumexp(a, dim=-1, keepdim=True)
        a = a - V.finite_or_zero(ct)
        alpha[:, t] = a
        c[:, t] = ct.squeeze(-1)
    return alpha, c.add_(p.shift())


def _log_beta(p: Problem) -> torch.Tensor:
    """Backward messages β̄ (B, T, C), max-normalised, 0 at and past each length − 1:
    β̄_t[i] = logsumexp_j(edge_t[i, j] + node_{t+1}[j] + β̄_{t+1}[j]) − d_t."""
    node = p.node
    beta = torch.zeros_like(node)
    b = torch.zeros_like(node[:, 0])
    es = p.steps()
    zero = torch.zeros((), dtype=node.dtype, device=node.device)
    for t in range(p.T - 2, -1, -1):
        nb = torch.logsumexp(es[t] + (node[:, t + 1] + b).unsqueeze(1), dim=2)
        nb.sub_(V.finite_or_zero(nb.amax(-1, keepdim=True)))
        if p.lengths is not None:
            nb = torch.where((p.lengths > t + 1).unsqueeze(-1), nb, zero)
        b = nb
        beta[:, t] = b
    return beta


def _log_marginals(p: Problem, alpha: torch.Tensor, beta: torch.Tensor, weight: torch.Tensor | None):
    """Log path: node marginals softmax_j(ᾱ_t + β̄_t) and edge marginals
    μ_t[i, j] = softmax_{(i, j)}(ᾱ_t[i] + edge_t[i, j] + node_{t+1}[j] + β̄_{t+1}[j]).

    Each position's block is normalised by its own logsumexp (not by the forward
    normalisers), so the largest entry is exp(0): with scores of 1e30 the rounding
    error of a sum (~1e14) never reaches an ``exp``."""
    s = alpha + beta
    dead = torch.isneginf(s.amax(-1, keepdim=True))
    mu = normalized_exp(s, 1, inplace=True)
    _mask_nodes(p, mu, dead)
    if p.T == 1:
        return mu, _empty_edge(p, weight)
    w = p.node[:, 1:] + beta[:, 1:]
    ev = _edge_valid(p, dead)
    a = alpha[:, :-1]

    def block(t0: int, t1: int) -> torch.Tensor:
        E = p.edge[:, t0:t1] if p.mode == "full" else (p.edge if p.mode == "shared" else p.edge[t0:t1])
        em = a[:, t0:t1].unsqueeze(-1) + E
        return normalized_exp(em.add_(w[:, t0:t1].unsqueeze(-2)), 2, inplace=True).mul_(ev[:, t0:t1, None, None])

    return mu, _assemble_edges(p, block, weight)


# ----------------------------------------------------------------------------- exp path
# Probability space, time-major buffers (T, B, C) so every step reads and writes
# contiguous slices, and the scaled backward recursion of Rabiner (1989): β̂ uses
# the forward pass's per-step masses, so α̂_t ⊙ β̂_t already sums to 1.
def _exp_kernel(p: Problem) -> torch.Tensor:
    """exp(edge − max): (C, C) shared, (T−1, C, C) positional or (B, T−1, C, C) full; entries in (0, 1]."""
    if p.mode == "shared":
        return torch.sub(p.edge, p.emax).exp_()
    if p.mode == "positional":
        return torch.sub(p.edge, p.emax[:, None, None]).exp_()
    return torch.sub(p.edge, p.emax[:, :, None, None]).exp_()  # one edge-sized buffer


def _exp_forward(p: Problem):
    """Forward filter α̂ (T, B, C), rows summing to 1, and per-step masses s (T, B, 1):
    α̃_t = (α̂_{t−1} K_{t−1}) ⊙ P_t,  P_t = exp(node_t − max node_t),  s_t = Σ_j α̃_t,  α̂_t = α̃_t / s_t.
    Log-normalisers c_t = log s_t + max node_t + max edge_{t−1} (B, T); A = Σ_{t<L} c_t."""
    P = (p.node - p.nmax.unsqueeze(-1)).exp_().transpose(0, 1).contiguous()  # (T, B, C)
    K = _exp_kernel(p)
    alpha = torch.empty_like(P)
    s = torch.empty(P.shape[:-1] + (1,), dtype=P.dtype, device=P.device)
    tmp = torch.empty_like(P[0])
    al, ss, Ps = alpha.unbind(0), s.unbind(0), P.unbind(0)
    Ks = p.steps(K)
    tmp1 = tmp.unsqueeze(1)
    al[0].copy_(Ps[0])
    torch.sum(al[0], -1, keepdim=True, out=ss[0])
    al[0].div_(ss[0])
    for t in range(1, p.T):
        Kt = Ks[t - 1]
        if Kt.dim() == 2:
            torch.mm(al[t - 1], Kt, out=tmp)
        else:
            torch.bmm(al[t - 1].unsqueeze(1), Kt, out=tmp1)
        torch.mul(tmp, Ps[t], out=al[t])
        torch.sum(al[t], -1, keepdim=True, out=ss[t])
        al[t].div_(ss[t])
    c = s.squeeze(-1).t().log() + p.shift()
    return (alpha, s, P, K), c


def _exp_backward(p: Problem, state, weight, consume: bool):
    """β̂_t = K_t (W_{t+1} ⊙ β̂_{t+1}), W_t = P_t / s_t, β̂ = 1 at and past length − 1;
    μ_t = α̂_t ⊙ β̂_t;  μ_t[i, j] = α̂_t[i] K_t[i, j] W_{t+1}[j] β̂_{t+1}[j].
    With ``consume`` the forward's buffers are reused in place (one-pass calls);
    otherwise they are left intact (an autograd backward may run more than once)."""
    alpha, s, P, K = state
    if consume:
        W = P.div_(s)
    else:
        W = P / s
        if p.mode == "full":  # the edge-sized kernel is not kept from the forward
            K = _exp_kernel(p)
    beta = torch.ones_like(alpha)
    u = torch.empty_like(alpha[0])
    keep = None
    if p.lengths is not None and bool((p.lengths < p.T).any()):
        keep = (torch.arange(p.T, device=alpha.device).unsqueeze(1) + 1 < p.lengths.unsqueeze(0)).unsqueeze(-1)
    bs, Ws = beta.unbind(0), W.unbind(0)
    u1 = u.unsqueeze(-1)
    Ks = p.steps(K)
    for t in range(p.T - 2, -1, -1):
        torch.mul(Ws[t + 1], bs[t + 1], out=u)
        Kt = Ks[t]
        if Kt.dim() == 2:
            torch.mm(u, Kt.t(), out=bs[t])
        else:
            torch.bmm(Kt, u1, out=bs[t].unsqueeze(-1))
        if keep is not None:
            bs[t].masked_fill_(~keep[t], 1.0)
    mu = (alpha * beta).transpose(0, 1)  # (B, T, C) view
    valid = p.valid()
    if valid is not None:
        mu = mu * valid.unsqueeze(-1).to(mu.dtype)
    mu = mu.contiguous()
    if p.T == 1:
        return mu, _empty_edge(p, weight)
    v = W[1:].mul_(beta[1:])  # (T−1, B, C)
    a = alpha[:-1]
    ev = p.valid(1)
    if ev is not None:
        a = a * ev.t().unsqueeze(-1).to(a.dtype)
    if p.mode == "full":
        out = K  # (B, T−1, C, C): becomes the marginals in place
        out.mul_(a.transpose(0, 1).unsqueeze(-1)).mul_(v.transpose(0, 1).unsqueeze(-2))
        if weight is not None:
            out.mul_(weight.view(-1, 1, 1, 1))
        return mu, out
    if weight is not None:
        a = a * weight.view(1, -1, 1)
    if p.mode == "shared":
        if weight is not None:  # Σ_b g_b Σ_t α̂ ⊗ v: one matrix product
            return mu, (a.reshape(-1, p.C).t() @ v.reshape(-1, p.C)).mul_(K)
        return mu, torch.bmm(a.permute(1, 2, 0), v.transpose(0, 1)).mul_(K)
    if weight is not None:
        return mu, torch.einsum("tbc,tbd->tcd", a, v).mul_(K)
    return mu, (a.transpose(0, 1).unsqueeze(-1) * v.transpose(0, 1).unsqueeze(-2)).mul_(K)


# ----------------------------------------------------------------------------- shared pieces
def _mask_nodes(p: Problem, mu: torch.Tensor, dead: torch.Tensor) -> None:
    valid = p.valid()
    if valid is not None:
        mu.mul_(valid.unsqueeze(-1).to(mu.dtype))
    mu.masked_fill_(dead, 0.0)


def _edge_valid(p: Problem, dead: torch.Tensor) -> torch.Tensor:
    """(B, T−1) weights: 1 where transition t -> t+1 lies inside the chain and the
    instance is feasible there."""
    ev = (~dead[:, 1:, 0]).to(p.cdtype)
    valid = p.valid(1)
    return ev if valid is None else ev * valid.to(p.cdtype)


def _empty_edge(p: Problem, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is not None and p.mode != "full":
        return torch.zeros(p.edge.shape, dtype=p.cdtype, device=p.node.device)
    return torch.zeros((p.B,) + p.edge_event(), dtype=p.cdtype, device=p.node.device)


def _assemble_edges(p: Problem, block: Callable[[int, int], torch.Tensor], weight: torch.Tensor | None) -> torch.Tensor:
    """Edge marginals from ``block(t0, t1)`` -> (B, t1 − t0, C, C), in chunks of ⌈T/C⌉
    positions for shared edges (working memory O(B·T·C)); summed over positions for
    a (C, C) edge and, given ``weight`` (B,), over the batch for batch-less edges."""
    if p.mode == "full":
        out = block(0, p.T - 1)
        return out if weight is None else out.mul_(weight.view(-1, 1, 1, 1))
    chunk = max(1, -(-p.T // p.C))
    out = _empty_edge(p, weight)
    for t0 in range(0, p.T - 1, chunk):
        t1 = min(p.T - 1, t0 + chunk)
        em = block(t0, t1)
        if weight is not None:
            em.mul_(weight.view(-1, 1, 1, 1))
            if p.mode == "shared":
                out += em.sum(dim=(0, 1))
            else:
                out[t0:t1] += em.sum(dim=0)
        elif p.mode == "shared":
            out += em.sum(dim=1)
        else:
            out[:, t0:t1] = em
    return out


# ----------------------------------------------------------------------------- drivers
def forward(p: Problem):
    """Forward pass of the problem's path: (state for _backward, c (B, T))."""
    if p.path == "exp":
        return _exp_forward(p)
    alpha, c = _log_alpha(p)
    return (alpha, c), c


def backward(p: Problem, state, weight=None, consume: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """β pass and marginals (node (B, T, C), edge) in the compute dtype.
    With ``weight`` (B,), batch-less edge marginals come summed over the batch with
    those weights (the backward of a shared edge).  ``consume``: ``state`` may be
    overwritten (it is not used again)."""
    if p.path == "exp":
        return _exp_backward(p, state, weight, consume)
    return _log_marginals(p, state[0], _log_beta(p), weight)


def log_messages(p: Problem, state) -> torch.Tensor:
    """Forward messages in log form, (B, T, C), whichever path made them (for sampling)."""
    if p.path == "exp":
        return state[0].transpose(0, 1).log()
    return state[0]


class ChainLogPartition(torch.autograd.Function):
    """A(θ) with backward μ(θ)·grad; forward = α pass only, backward = β pass.

    The backward is not itself differentiable (the marginals come from the β pass,
    not from autograd): a backward with ``create_graph=True`` raises
    :class:`~structgrad.errors.CapabilityError` rather than return a wrong (zero)
    second derivative."""

    @staticmethod
    def forward(ctx, node: torch.Tensor, edge: torch.Tensor, p: Problem) -> torch.Tensor:
        state, c = forward(p)
        if any(ctx.needs_input_grad[:2]):
            if p.path == "exp" and p.mode == "full":
                state = state[:3] + (None,)  # the backward rebuilds the edge-sized kernel
            ctx.problem, ctx.state = p, state  # detached, compute-dtype buffers for the β pass
        ctx.shapes = (node.shape, edge.shape, node.dtype, edge.dtype)
        return log_z(p, c).reshape(p.batch).to(p.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        refuse_create_graph("chain")
        p, state = ctx.problem, ctx.state
        node_shape, edge_shape, node_dtype, edge_dtype = ctx.shapes
        g = grad.reshape(-1).to(p.cdtype)
        shared = p.mode != "full"
        mu, emu = backward(p, state, weight=g if shared else None, consume=False)
        g_node = (mu * g.view(-1, 1, 1)).reshape(node_shape).to(node_dtype)
        if shared:
            g_edge = emu.to(edge_dtype)
        else:
            g_edge = emu.mul_(g.view(-1, 1, 1, 1)).reshape(edge_shape).to(edge_dtype)
        return g_node, g_edge, None
