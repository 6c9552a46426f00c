"""``chain``: linear-chain CRF inference by forward-backward (torch backend).

Structures are labellings y ∈ {0..C−1}^L of a chain of length L ≤ T, with score

    ⟨z, θ⟩ = Σ_{t<L} node[t, y_t] + Σ_{t<L−1} edge[t, y_t, y_{t+1}],

z = (one-hot labels (T, C), one-hot transitions (T−1, C, C)), zero past the length.

θ = ``(node, edge)``:

* ``node``: ``(*b, T, C)``;
* ``edge``: ``(*b, T−1, C, C)`` per instance and position, ``(T−1, C, C)`` shared by
  the batch, or ``(C, C)`` shared by the batch and every position (never
  materialised per position).  ``edge[t, i, j]`` scores label i at t, j at t+1.

Per-call keyword: ``lengths (*b,)``, integers in ``[0, T]`` (default: all T).
Positions at or past an instance's length contribute nothing and get zero
marginals, MAP and samples (and zero gradient).  A length of 0 is the empty
labelling: A = 0.

Outputs follow the structure of θ: node ``(*b, T, C)``; edge ``(*b, T−1, C, C)``, or
for a ``(C, C)`` edge the expected (marginals) / actual (map, sample) transition
*counts* ``(*b, C, C)`` — the sufficient statistic paired with a shared edge, so
⟨z, θ⟩ and ∇A = μ hold as stated.

Algorithms (B instances, T positions, C labels):

* forward:  ᾱ_0 = node_0 − c_0,
  ᾱ_t[j] = logsumexp_i(ᾱ_{t−1}[i] + edge_{t−1}[i, j]) + node_t[j] − c_t,
  with c_t = max_j of the un-centred message, so messages stay O(scores) (the
  re-centring is what keeps float32 accurate); A = Σ_{t<L} c_t + logsumexp ᾱ_{L−1}.
* backward: β̄_{L−1} = 0, β̄_t[i] = logsumexp_j(edge_t[i, j] + node_{t+1}[j] + β̄_{t+1}[j]) − d_t.
* node marginals μ_t = softmax_j(ᾱ_t + β̄_t); edge marginals
  μ_t[i, j] = exp(ᾱ_t[i] + edge_t[i, j] + node_{t+1}[j] + β̄_{t+1}[j] − c_{t+1} − N_{t+1}),
  N_t = logsumexp_j(ᾱ_t + β̄_t): every position is normalised locally.
* MAP: Viterbi (max-product, re-centred), ties to the lowest label.
* sample: forward filtering, backward sampling (exact), Gumbel-max at each step.

``log_partition`` is a ``torch.autograd.Function``: its forward runs the α pass
only, its backward the β pass, returning μ · grad; there is no autograd through
the recursion.  Time O(B·T·C²); working memory O(B·T·C) beyond the outputs
(the shared-edge counts are accumulated in chunks of ⌈T/C⌉ positions).
``marginals``, ``map`` and ``sample`` return tensors detached from autograd.

``-inf`` scores forbid labels or transitions; no NaN arises in values or
gradients.  An instance where every labelling has score −inf has A = −inf and
zero marginals, MAP and samples.  NaN or +inf scores are refused.

References: L. Rabiner, "A tutorial on hidden Markov models" (1989); J. Lafferty,
A. McCallum, F. Pereira, "Conditional random fields" (ICML 2001); D. McAllester,
"The model marginals" (TTIC 31230, 2019).

Example:
    >>> import torch, structgrad as sg
    >>> chain = sg.get_solver("chain")
    >>> node, edge = torch.randn(2, 5, 3), torch.randn(3, 3)
    >>> chain.log_partition((node, edge), lengths=torch.tensor([5, 2])).shape
    torch.Size([2])
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from structgrad import checks as V
from structgrad.errors import DomainError, ShapeError
from structgrad.logspace import gumbel_argmax
from structgrad.solver import Capabilities, Solver

__all__ = ["ChainSolver"]

_BACKENDS = ("torch",)


# ----------------------------------------------------------------------------- problem
# Largest score range R = (max − min of any position's edge scores) + (max − min of
# any position's finite node scores) for which the probability-space path is exact to
# working precision: with every transition finite, its messages stay within
# e^(±2R)·poly(C) of each other, so nothing underflows (float32's smallest normal is
# about e^-87, float64's e^-708).  Wider ranges, or any -inf transition, take the log path.
_EXP_RANGE = {torch.float32: 32.0, torch.float64: 300.0}


def _finite_or_zero_(m: torch.Tensor) -> torch.Tensor:
    """In place: replace ±inf (a max over impossible entries) by 0."""
    return m.masked_fill_(~torch.isfinite(m), 0.0)


class _Problem:
    """A validated chain problem, batch flattened to B, in its compute dtype.

    ``path`` is ``"exp"`` (probability space: matrix products, per-step
    normalisation) when every transition score is finite and the per-position score
    ranges are small enough for that to be exact; otherwise ``"log"`` (log-space
    logsumexp recursions, computed in float64 so float32 inputs keep ≤1e-5 marginal
    accuracy even for scores of order 1e2–1e4).
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
        # per-position maxima: validation (NaN / +inf propagate through amax) and shifts
        nmax = node.amax(-1) if node.numel() else node.new_zeros(node.shape[:-1])
        emax = edge.amax((-2, -1)) if edge.numel() else edge.new_zeros(edge.shape[:-2])
        for nm, m in (("node", nmax), ("edge", emax)):
            if bool(torch.isnan(m).any()) or bool(torch.isposinf(m).any()):
                raise DomainError(f"{nm}: expected scores in [-inf, +inf) without NaN, got NaN or +inf entries")
        exp_ok = False
        wide = torch.float64 if self.dtype == torch.float64 else torch.float32
        emin = edge.amin((-2, -1)) if edge.numel() else emax
        if bool(torch.isfinite(emin).all()):
            erange = (emax - emin).max() if emin.numel() else torch.zeros(())
            finite_min = node.masked_fill(torch.isneginf(node), float("inf")).amin(-1)
            nrange = torch.where(torch.isneginf(nmax), torch.zeros_like(nmax), nmax - finite_min)
            nrange = nrange.max() if nrange.numel() else torch.zeros(())
            no_dead = not bool(torch.isneginf(nmax).any())  # every position has a possible label
            exp_ok = no_dead and float(erange) + float(nrange) <= _EXP_RANGE[wide]
        self.path = "exp" if exp_ok else "log"
        self.cdtype = wide if exp_ok else torch.float64
        self.node = node.to(self.cdtype)
        self.edge = edge.to(self.cdtype)
        self.nmax = _finite_or_zero_(nmax.to(self.cdtype))
        self.emax = emax.to(self.cdtype)  # finite on the exp path

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


def _log_z(p: _Problem, c: torch.Tensor) -> torch.Tensor:
    """A (B,) = Σ_{t<L} c_t: both paths normalise the last message to total mass 1."""
    if p.lengths is None:
        return c.sum(-1)
    last = (p.lengths - 1).clamp(min=0)
    out = torch.cumsum(c, dim=-1).gather(1, last.unsqueeze(1)).squeeze(1)
    return torch.where(p.lengths > 0, out, torch.zeros_like(out))


# ----------------------------------------------------------------------------- log path
def _log_alpha(p: _Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward messages ᾱ (B, T, C), log-normalised (logsumexp_j ᾱ_t = 0 or −inf), and
    their log-normalisers c (B, T):
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
        a = a - _finite_or_zero_(ct.clone())
        alpha[:, t] = a
        c[:, t] = ct.squeeze(-1)
    return alpha, c


def _log_beta(p: _Problem) -> torch.Tensor:
    """Backward messages β̄ (B, T, C), max-normalised, 0 at and past each length − 1:
    β̄_t[i] = logsumexp_j(edge_t[i, j] + node_{t+1}[j] + β̄_{t+1}[j]) − d_t."""
    node = p.node
    beta = torch.zeros_like(node)
    b = torch.zeros_like(node[:, 0])
    es = p.steps()
    for t in range(p.T - 2, -1, -1):
        nb = torch.logsumexp(es[t] + (node[:, t + 1] + b).unsqueeze(1), dim=2)
        nb.sub_(_finite_or_zero_(nb.amax(-1, keepdim=True)))
        if p.lengths is not None:
            nb = torch.where((p.lengths > t + 1).unsqueeze(-1), nb, torch.zeros((), dtype=nb.dtype, device=nb.device))
        b = nb
        beta[:, t] = b
    return beta


def _log_marginals(p, alpha, c, beta, weight):
    """Log path: node marginals softmax_j(ᾱ_t + β̄_t) and edge marginals
    exp(ᾱ_t[i] + edge_t[i,j] + node_{t+1}[j] + β̄_{t+1}[j] − c_{t+1} − N_{t+1})."""
    s = alpha + beta
    N = torch.logsumexp(s, dim=-1, keepdim=True)
    dead = torch.isneginf(N)
    N = _finite_or_zero_(N)
    mu = s.sub_(N).exp_()
    _mask_nodes(p, mu, dead)
    if p.T == 1:
        return mu, _empty_edge(p, weight)
    w = p.node[:, 1:] + beta[:, 1:] - _finite_or_zero_(c[:, 1:].clone()).unsqueeze(-1) - N[:, 1:]
    ev = _edge_valid(p, dead)
    a = alpha[:, :-1]

    def block(t0: int, t1: int) -> torch.Tensor:
        E = p.edge[:, t0:t1] if p.mode == "full" else (p.edge if p.mode == "shared" else p.edge[t0:t1])
        em = a[:, t0:t1].unsqueeze(-1) + E
        return em.add_(w[:, t0:t1].unsqueeze(-2)).exp_().mul_(ev[:, t0:t1, None, None])

    return mu, _assemble_edges(p, block, weight)


# ----------------------------------------------------------------------------- exp path
# Probability space, time-major buffers (T, B, C) so every step reads and writes
# contiguous slices, and the scaled backward recursion of Rabiner (1989): β̂ uses
# the forward pass's per-step masses, so α̂_t ⊙ β̂_t already sums to 1.
def _exp_kernel(p: _Problem) -> torch.Tensor:
    """exp(edge − max): (C, C) shared, (T−1, C, C) positional or (B, T−1, C, C) full; entries in (0, 1]."""
    if p.mode == "shared":
        return torch.sub(p.edge, p.emax).exp_()
    if p.mode == "positional":
        return torch.sub(p.edge, p.emax[:, None, None]).exp_()
    return torch.sub(p.edge, p.emax[:, :, None, None]).exp_()  # one edge-sized buffer


def _exp_forward(p: _Problem):
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
    c = s.squeeze(-1).t().log() + p.nmax
    if p.T > 1:
        c[:, 1:] += p.emax  # scalar, (T−1,) or (B, T−1): broadcasts
    return (alpha, s, P, K), c


def _exp_backward(p: _Problem, state, weight, consume: bool):
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
def _mask_nodes(p: _Problem, mu: torch.Tensor, dead: torch.Tensor) -> None:
    valid = p.valid()
    if valid is not None:
        mu.mul_(valid.unsqueeze(-1).to(mu.dtype))
    mu.masked_fill_(dead, 0.0)


def _edge_valid(p: _Problem, dead: torch.Tensor) -> torch.Tensor:
    """(B, T−1) weights: 1 where transition t -> t+1 lies inside the chain and the
    instance is feasible there."""
    ev = (~dead[:, 1:, 0]).to(p.cdtype)
    valid = p.valid(1)
    return ev if valid is None else ev * valid.to(p.cdtype)


def _empty_edge(p: _Problem, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is not None and p.mode != "full":
        return torch.zeros(p.edge.shape, dtype=p.cdtype, device=p.node.device)
    return torch.zeros((p.B,) + p.edge_event(), dtype=p.cdtype, device=p.node.device)


def _assemble_edges(p: _Problem, block: Callable[[int, int], torch.Tensor], weight: torch.Tensor | None) -> torch.Tensor:
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
def _forward(p: _Problem):
    """Forward pass of the problem's path: (state for _backward, c (B, T))."""
    if p.path == "exp":
        return _exp_forward(p)
    alpha, c = _log_alpha(p)
    return (alpha, c), c


def _backward(p: _Problem, state, weight=None, consume: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """β pass and marginals (node (B, T, C), edge) in the compute dtype.
    With ``weight`` (B,), batch-less edge marginals come summed over the batch with
    those weights (the backward of a shared edge).  ``consume``: ``state`` may be
    overwritten (it is not used again)."""
    if p.path == "exp":
        return _exp_backward(p, state, weight, consume)
    alpha, c = state
    return _log_marginals(p, alpha, c, _log_beta(p), weight)


def _log_messages(p: _Problem, state) -> torch.Tensor:
    """Forward messages in log form, (B, T, C), whichever path made them (for sampling)."""
    if p.path == "exp":
        return state[0].transpose(0, 1).log()
    return state[0]


class _ChainLogPartition(torch.autograd.Function):
    """A(θ) with backward μ(θ)·grad; forward = α pass only, backward = β pass."""

    @staticmethod
    def forward(ctx, node: torch.Tensor, edge: torch.Tensor, p: _Problem) -> torch.Tensor:
        state, c = _forward(p)
        if any(ctx.needs_input_grad[:2]):
            if p.path == "exp" and p.mode == "full":
                state = state[:3] + (None,)  # the backward rebuilds the edge-sized kernel
            ctx.problem, ctx.state = p, state  # detached, compute-dtype buffers for the β pass
        ctx.shapes = (node.shape, edge.shape, node.dtype, edge.dtype)
        return _log_z(p, c).reshape(p.batch).to(p.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        p, state = ctx.problem, ctx.state
        node_shape, edge_shape, node_dtype, edge_dtype = ctx.shapes
        g = grad.reshape(-1).to(p.cdtype)
        shared = p.mode != "full"
        mu, emu = _backward(p, state, weight=g if shared else None, consume=False)
        g_node = (mu * g.view(-1, 1, 1)).reshape(node_shape).to(node_dtype)
        if shared:
            g_edge = emu.to(edge_dtype)
        else:
            g_edge = emu.mul_(g.view(-1, 1, 1, 1)).reshape(edge_shape).to(edge_dtype)
        return g_node, g_edge, None


# ----------------------------------------------------------------------------- solver
class ChainSolver(Solver):
    """Exact linear-chain solver (forward-backward, Viterbi, FFBS); see the module docstring.

    Args:
        backend: ``"torch"`` (batched torch ops; CPU and CUDA).
    """

    capabilities = Capabilities(map="exact", marginals="exact", log_partition="exact", sample="exact")
    call_kwargs = ("lengths",)
    batched_kwargs = ("lengths",)

    def __init__(self, backend: str = "torch"):
        if backend not in _BACKENDS:
            raise DomainError(f"backend: expected one of {', '.join(map(repr, _BACKENDS))}, got {backend!r}")
        self.backend = backend

    # -- shapes
    def event_ndims(self, theta: Any) -> tuple[int, ...]:
        node, edge = self._split(theta)
        return (2, 2 if edge.dim() == 2 else 3)

    @staticmethod
    def _split(theta: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(theta, (tuple, list)) or len(theta) != 2:
            what = f"a tuple of {len(theta)}" if isinstance(theta, (tuple, list)) else type(theta).__name__
            raise ShapeError(
                f"theta: expected a tuple (node (*batch, T, C), edge (*batch, T-1, C, C) or (C, C)), got {what}"
            )
        return theta[0], theta[1]

    def check_theta(self, theta: Any) -> Any:
        node, edge = self._split(theta)
        V.check_float_tensor(node, "node")
        V.check_float_tensor(edge, "edge")
        if node.dim() < 2 or node.shape[-2] < 1 or node.shape[-1] < 1:
            raise ShapeError(f"node: expected shape (*batch, T, C) with T, C >= 1, got {V.fmt_shape(node.shape)}")
        T, C = node.shape[-2:]
        batch = tuple(node.shape[:-2])
        ok = (
            (edge.dim() == 2 and tuple(edge.shape) == (C, C))
            or (edge.dim() == 3 and tuple(edge.shape) == (T - 1, C, C))
            or (edge.dim() >= 3 and tuple(edge.shape) == batch + (T - 1, C, C))
        )
        if not ok:
            raise ShapeError(
                f"edge has shape {V.fmt_shape(edge.shape)} but node has shape {V.fmt_shape(node.shape)}; "
                f"expected edge of shape {V.fmt_shape(batch + (T - 1, C, C))} (*batch, T-1, C, C), "
                f"{V.fmt_shape((T - 1, C, C))} (shared by the batch) or {V.fmt_shape((C, C))} (shared by every position)"
            )
        return super().check_theta((node, edge))

    def check_kwargs(self, theta: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``lengths``: integers of shape ``(*batch,)`` in ``[0, T]`` (values checked when ``validate``)."""
        node = theta[0]
        if kwargs.get("lengths") is not None:
            lengths = V.check_lengths(
                kwargs["lengths"], node.shape[:-2], node.shape[-2], node.device, check_values=self.validate
            )
            kwargs = {**kwargs, "lengths": lengths}
        return super().check_kwargs(theta, kwargs)

    def _problem(self, theta: Any, lengths: Any) -> _Problem:
        node, edge = theta
        return _Problem(node.detach(), edge.detach(), lengths)

    # -- hooks
    def _log_partition(self, theta: Any, lengths: torch.Tensor | None = None) -> torch.Tensor:
        p = self._problem(theta, lengths)
        return _ChainLogPartition.apply(theta[0], theta[1], p)

    def _log_partition_and_marginals(self, theta: Any, lengths: torch.Tensor | None = None):
        p = self._problem(theta, lengths)
        state, c = _forward(p)
        logz = _log_z(p, c).reshape(p.batch).to(p.dtype)
        mu, emu = _backward(p, state, consume=True)
        return logz, (p.unflatten(mu, (p.T, p.C)), p.unflatten(emu, p.edge_event()))

    def _marginals(self, theta: Any, lengths: torch.Tensor | None = None):
        with torch.no_grad():
            return self._log_partition_and_marginals(theta, lengths)[1]

    def _map(self, theta: Any, lengths: torch.Tensor | None = None):
        with torch.no_grad():
            p = self._problem(theta, lengths)
            labels = _viterbi(p)
            return self._indicators(p, labels.unsqueeze(0), lead=())

    def _sample(self, theta: Any, num_samples: int, generator: torch.Generator | None, lengths: torch.Tensor | None = None):
        with torch.no_grad():
            p = self._problem(theta, lengths)
            state, _ = _forward(p)
            labels = _ffbs(p, _log_messages(p, state), num_samples, generator)
            return self._indicators(p, labels, lead=(num_samples,))

    # -- structures from labels
    @staticmethod
    def _indicators(p: _Problem, labels: torch.Tensor, lead: tuple[int, ...]):
        """labels (S, B, T) with −1 for 'no label' -> (node, edge) indicators with leading ``lead``."""
        dt = p.dtype
        valid = labels >= 0
        node = torch.zeros(labels.shape + (p.C,), dtype=dt, device=labels.device)
        node.scatter_(-1, labels.clamp(min=0).unsqueeze(-1), valid.unsqueeze(-1).to(dt))
        pair = labels[..., :-1].clamp(min=0) * p.C + labels[..., 1:].clamp(min=0)  # i*C + j
        ok = (valid[..., :-1] & valid[..., 1:]).to(dt)
        if p.mode == "shared":  # transition counts
            flat = torch.zeros(labels.shape[:-1] + (p.C * p.C,), dtype=dt, device=labels.device)
            flat.scatter_add_(-1, pair, ok)
        else:
            flat = torch.zeros(pair.shape + (p.C * p.C,), dtype=dt, device=labels.device)
            flat.scatter_(-1, pair.unsqueeze(-1), ok.unsqueeze(-1))
        shape_b = lead + tuple(p.batch)
        return node.reshape(shape_b + (p.T, p.C)), flat.reshape(shape_b + p.edge_event())


def _viterbi(p: _Problem) -> torch.Tensor:
    """Best labels (B, T) by max-product, −1 past the length and for infeasible instances.

    Forward: v_t[j] = max_i (v_{t−1}[i] + edge_{t−1}[i, j]) + node_t[j] (time-major,
    re-centred every 16 steps).  On the CPU there is no back-pointer table:
    back-tracking recomputes y_t = argmax_i (v_t[i] + edge_t[i, y_{t+1}]) for the chosen
    y_{t+1} only (lowest i on ties), in NumPy.  On a GPU the forward keeps back-pointers
    (T, B, C), which are copied to the host once and followed there."""
    B, T, C = p.B, p.T, p.C
    dev = p.node.device
    node = p.node.transpose(0, 1).contiguous()  # (T, B, C)
    v = torch.empty_like(node)
    x = torch.empty((B, C, C), dtype=node.dtype, device=dev)
    best = torch.empty((B, C), dtype=node.dtype, device=dev)
    vs, ns, vcols = v.unbind(0), node.unbind(0), v.unsqueeze(-1).unbind(0)
    # per-instance edges already have the input's size: fold node_{t+1} into them in
    # one vectorised add, leaving two small ops per step (shared edges are never
    # materialised per position, so they keep three)
    folded = p.mode == "full"
    E_scan = p.edge + p.node[:, 1:].unsqueeze(-2) if folded else p.edge
    es = p.steps(E_scan)
    on_cpu = dev.type == "cpu"
    bp = None if on_cpu else torch.zeros((T, B, C), dtype=torch.long, device=dev)
    vs[0].copy_(ns[0])
    for t in range(1, T):
        torch.add(vcols[t - 1], es[t - 1], out=x)
        out = vs[t] if folded else best
        if on_cpu:  # amax is much cheaper than max-with-indices here; argmax is redone on back-tracking
            torch.amax(x, dim=1, out=out)
        else:  # on a GPU the indices come free, and one transfer beats a kernel per back step
            torch.max(x, dim=1, out=(out, bp[t]))
        if not folded:
            torch.add(best, ns[t], out=vs[t])
        if t % 16 == 0:
            vs[t].sub_(_finite_or_zero_(vs[t].amax(-1, keepdim=True)))
    L = p.lengths if p.lengths is not None else torch.full((B,), T, dtype=torch.long, device=dev)
    last = (L - 1).clamp(min=0)
    v_end = v.gather(0, last.view(1, B, 1).expand(1, B, C)).squeeze(0)
    feasible = torch.isfinite(v_end.amax(-1)) & (L > 0)
    y_end = v_end.argmax(-1)
    if on_cpu:
        # back-track through the very scores the forward maximised (exact same argmaxes)
        labels = torch.from_numpy(_backtrack_numpy(p, v.numpy(), y_end.numpy(), L.numpy(), E_scan.numpy()))
    else:
        labels = torch.from_numpy(_follow_pointers(bp.cpu().numpy(), y_end.cpu().numpy(), L.cpu().numpy())).to(dev)
    return torch.where(feasible.unsqueeze(1), labels, torch.full_like(labels, -1))


def _follow_pointers(bp, y_end, L):
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


def _edge_column(p: _Problem, E, t: int, y, rows):
    """edge_t[b, :, y_b] for every instance b: (B, C) (works for torch tensors and NumPy arrays)."""
    if p.mode == "shared":
        return E[:, y].T
    if p.mode == "positional":
        return E[t][:, y].T
    return E[rows, t, :, y]


def _backtrack_numpy(p: _Problem, v, y_end, L, E):
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


def _ffbs(p: _Problem, alpha: torch.Tensor, S: int, generator: torch.Generator | None) -> torch.Tensor:
    """Exact samples (S, B, T) by forward filtering, backward sampling; −1 past the length."""
    B, T, C = p.B, p.T, p.C
    L = p.lengths if p.lengths is not None else torch.full((B,), T, dtype=torch.long, device=alpha.device)
    labels = torch.full((S, B, T), -1, dtype=torch.long, device=alpha.device)
    y = torch.full((S, B), -1, dtype=torch.long, device=alpha.device)
    for t in range(T - 1, -1, -1):
        logits = alpha[:, t].unsqueeze(0).expand(S, B, C)
        inside = (t < L - 1).unsqueeze(0)  # (1, B): y_{t+1} exists
        if t < T - 1 and bool(inside.any()):
            E = p.edge_at(t)  # (B, C, C) or (C, C): column y_{t+1}
            yc = y.clamp(min=0)
            if E.dim() == 2:
                col = E.t()[yc]  # (S, B, C)
            else:
                col = E.transpose(1, 2)[torch.arange(B, device=E.device).unsqueeze(0), yc]
            logits = logits + torch.where(inside.unsqueeze(-1), col, torch.zeros((), dtype=col.dtype, device=col.device))
        draw = gumbel_argmax(logits, 1, generator=generator)[0]  # (S, B)
        y = torch.where((t < L).unsqueeze(0), draw, torch.full_like(draw, -1))
        # an instance whose remaining prefix is impossible yields −1 everywhere
        labels[:, :, t] = y
    dead = (labels[:, :, :].eq(-1) & (torch.arange(T, device=alpha.device) < L.unsqueeze(1)).unsqueeze(0)).any(-1)
    return torch.where(dead.unsqueeze(-1), torch.full_like(labels, -1), labels)
