"""DPMLoss (seed 000): exact full-batch gradients, unbiasedness over batches, SogCLR
reduction, ζ updates and fixed point, state round trips, numerics and argument checks."""

from __future__ import annotations

import io
import itertools
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import structgrad as sg
from structgrad.dpm import DPMLoss, DPMOutput, all_gather_with_grad, dpm_surrogate
from structgrad.errors import DeviceError, DomainError, DTypeError, ShapeError
from structgrad.logspace import softmax_with_offset

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64
INF = math.inf


# ---------------------------------------------------------------------------- oracles (written from the seed)
def anchor_logits(sim, zeta_cand, tau, side):
    """Rows = anchors: side 'x' gives L[i, j] = (E_ij - E_ii - zeta_y_j)/tau; side 'y' gives
    L[j, i] = (E_ij - E_jj - zeta_x_i)/tau (anchor y_j, candidate x_i).  Diagonal kept."""
    E = sim if side == "x" else sim.T
    return (E - E.diagonal()[:, None] - zeta_cand[None, :]) / tau


def exact_p(sim, zeta_cand, xi, tau, side):
    """p_ij of G_w (rows anchors), 0 on the diagonal, by the seed's formula."""
    n = sim.shape[0]
    L = anchor_logits(sim, zeta_cand, tau, side)
    e = torch.exp(L) * (1 - torch.eye(n, dtype=sim.dtype))
    return e / (math.exp(-xi / tau) + e.sum(1, keepdim=True))


def exact_grad_sim(sim, zx, zy, xi_x, xi_y, tau):
    """G_w with respect to sim (both directions), (1/n) sum_i sum_{j != i} p_ij (dE_ij - dE_ii)."""
    n = sim.shape[0]
    G = torch.zeros_like(sim)
    for side, z, xi in (("x", zy, xi_y), ("y", zx, xi_x)):
        p = exact_p(sim, z, xi, tau, side)
        g = p / n - torch.diag(p.sum(1)) / n
        G = G + (g if side == "x" else g.T)
    return G


def exact_objective(sim, zx, zy, xi_x, xi_y, tau):
    """F_x + F_y with F = (1/n) sum_i tau log(exp(-xi/tau) + sum_{j != i} exp(L_ij))."""
    n = sim.shape[0]
    total = 0.0
    for side, z, xi in (("x", zy, xi_y), ("y", zx, xi_x)):
        L = anchor_logits(sim, z, tau, side)
        e = torch.exp(L) * (1 - torch.eye(n, dtype=sim.dtype))
        total = total + (tau * torch.log(math.exp(-xi / tau) + e.sum(1))).mean()
    return total


def zeta_objective(sim, zeta_cand, tau, side):
    """Phi(zeta) = (1/n) sum_i tau log((1/(n-1)) sum_j' exp(L'_ij')) + (1/n) sum_j zeta_j."""
    n = sim.shape[0]
    L = anchor_logits(sim, zeta_cand, tau, side)
    return (tau * torch.log(torch.exp(L).sum(1) / (n - 1))).mean() + zeta_cand.mean()


def exact_log_s(sim, zeta_cand, tau, side, B):
    """log s_i exact: log(((B-1)/(n-1)) sum_{j != i} exp(L_ij)) over the whole dataset."""
    n = sim.shape[0]
    L = anchor_logits(sim, zeta_cand, tau, side).masked_fill(torch.eye(n, dtype=torch.bool), -INF)
    return math.log((B - 1) / (n - 1)) + torch.logsumexp(L, 1)


def rand_problem(n, seed, scale=1.0, zscale=0.3):
    g = torch.Generator().manual_seed(seed)
    sim = torch.randn(n, n, dtype=F64, generator=g) * scale
    zx = torch.randn(n, dtype=F64, generator=g) * zscale
    zy = torch.randn(n, dtype=F64, generator=g) * zscale
    return sim, zx, zy


def make_loss(n, *, tau=0.5, gamma=1.0, xi=0.0, zx=None, zy=None, **kw):
    crit = DPMLoss(n, tau=tau, gamma=gamma, xi=xi, dtype=F64, **kw)
    if zx is not None:
        crit.zeta_x.copy_(zx)
    if zy is not None:
        crit.zeta_y.copy_(zy)
    return crit


# ---------------------------------------------------------------------------- exact full-batch gradient
@pytest.mark.parametrize("tau,xi_x,xi_y", [(0.5, 0.0, 0.0), (0.1, 0.3, -0.2), (2.0, INF, INF), (0.05, -1.0, 0.7)])
def test_full_batch_gradient_is_exact_G_w(tau, xi_x, xi_y):
    n = 7
    sim0, zx, zy = rand_problem(n, 1)
    crit = make_loss(n, tau=tau, zx=zx, zy=zy, zeta_lr=0.0)
    crit.xi_x.fill_(xi_x)
    crit.xi_y.fill_(xi_y)
    sim = sim0.clone().requires_grad_()
    out = crit(sim, torch.randperm(n, generator=torch.Generator().manual_seed(0)).sort().values)
    out.surrogate.backward()
    G = exact_grad_sim(sim0, zx, zy, xi_x, xi_y, tau)
    torch.testing.assert_close(sim.grad, G, rtol=0, atol=1e-12)
    # the seed's G_w is the gradient of F, and the monitor is F itself
    s2 = sim0.clone().requires_grad_()
    F = exact_objective(s2, zx, zy, xi_x, xi_y, tau)
    F.backward()
    torch.testing.assert_close(s2.grad, G, rtol=0, atol=1e-12)
    assert abs(float(out.objective) - F.item()) < 1e-12
    assert abs(float(out.objective_x + out.objective_y) - float(out.objective)) < 1e-12


def test_full_batch_gradient_through_encoders():
    """∇_w of the surrogate = G_w = (1/n) Σ p_ij (∇E_ij − ∇E_ii) for E = <f(x), g(y)>."""
    n, d = 6, 3
    g = torch.Generator().manual_seed(3)
    X, Y = torch.randn(n, d, dtype=F64, generator=g), torch.randn(n, d, dtype=F64, generator=g)
    W1 = torch.randn(d, d, dtype=F64, generator=g, requires_grad=True)
    W2 = torch.randn(d, d, dtype=F64, generator=g, requires_grad=True)
    _, zx, zy = rand_problem(n, 4)
    tau, xi = 0.7, 0.1
    crit = make_loss(n, tau=tau, xi=xi, zx=zx, zy=zy, zeta_lr=0.0)
    crit(torch.tanh(X @ W1) @ torch.tanh(Y @ W2).T, torch.arange(n)).surrogate.backward()
    got = (W1.grad.clone(), W2.grad.clone())
    W1.grad = W2.grad = None
    exact_objective(torch.tanh(X @ W1) @ torch.tanh(Y @ W2).T, zx, zy, xi, xi, tau).backward()
    for a, b in zip(got, (W1.grad, W2.grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("estimator", ["seed", "unbiased"])
def test_full_batch_zeta_derivative_is_exact(estimator):
    n, tau = 6, 0.4
    sim, zx, zy = rand_problem(n, 5)
    crit = make_loss(n, tau=tau, zx=zx, zy=zy, zeta_lr=0.0, zeta_estimator=estimator)
    out = crit(sim.clone().requires_grad_(), torch.arange(n))
    for side, z, got in (("x", zy, out.zeta_grad_y), ("y", zx, out.zeta_grad_x)):
        zz = z.clone().requires_grad_()
        (gz,) = torch.autograd.grad(zeta_objective(sim, zz, tau, side), zz)
        torch.testing.assert_close(got, n * gz, rtol=0, atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 6), seed=st.integers(0, 10_000), log_tau=st.floats(-2.0, 1.0), xi=st.floats(-1.0, 1.0))
def test_full_batch_exact_property(n, seed, log_tau, xi):
    tau = 10.0**log_tau
    sim0, zx, zy = rand_problem(n, seed)
    crit = make_loss(n, tau=tau, xi=xi, zx=zx, zy=zy, zeta_lr=0.0)
    sim = sim0.clone().requires_grad_()
    out = crit(sim, torch.arange(n))
    out.surrogate.backward()
    G = exact_grad_sim(sim0, zx, zy, xi, xi, tau)
    torch.testing.assert_close(sim.grad, G, rtol=1e-10, atol=1e-12)


def test_weights_are_softmax_with_offset_marginals():
    """γ = 1: each anchor's weights are the categorical marginals with the offset (logspace)."""
    n, B, tau, xi = 9, 5, 0.3, 0.25
    sim0, zx, zy = rand_problem(B, 8)
    crit = make_loss(n, tau=tau, xi=xi, zeta_lr=0.0)
    crit.zeta_x[:B] = zx
    crit.zeta_y[:B] = zy
    sim = sim0.clone().requires_grad_()
    crit(sim, torch.arange(B)).surrogate.backward()
    log_off = torch.tensor(math.log((B - 1) / (n - 1)) - xi / tau, dtype=F64)
    eye = torch.eye(B, dtype=torch.bool)
    C = torch.zeros(B, B, dtype=F64)
    for side, z in (("x", zy), ("y", zx)):
        L = anchor_logits(sim0, z, tau, side).masked_fill(eye, -INF)
        W = softmax_with_offset(L, log_off, dim=-1)
        c = (W - torch.diag(W.sum(1))) / B
        C = C + (c if side == "x" else c.T)
    torch.testing.assert_close(sim.grad, C, rtol=0, atol=1e-13)


# ---------------------------------------------------------------------------- minibatches with exact s
@pytest.mark.parametrize("n,B", [(5, 3), (5, 2), (6, 4)])
def test_average_over_all_batches_with_exact_s_is_G_w(n, B):
    tau, xi_x, xi_y = 0.6, 0.2, -0.1
    sim, zx, zy = rand_problem(n, 11)
    log_sx = exact_log_s(sim, zy, tau, "x", B)
    log_sy = exact_log_s(sim, zx, tau, "y", B)
    total = torch.zeros(n, n, dtype=F64)
    zeta_sum = {est: (torch.zeros(n, dtype=F64), torch.zeros(n, dtype=F64)) for est in ("seed", "unbiased")}
    batches = list(itertools.combinations(range(n), B))
    for b in batches:
        idx = torch.tensor(b)
        s = sim[idx][:, idx].clone().requires_grad_()
        for est in ("seed", "unbiased"):
            out = dpm_surrogate(
                s, log_sx[idx], log_sy[idx], zeta_x=zx[idx], zeta_y=zy[idx], xi_x=xi_x, xi_y=xi_y,
                tau=tau, num_samples=n, zeta_estimator=est,
            )
            zeta_sum[est][0][idx] += out.zeta_grad_x
            zeta_sum[est][1][idx] += out.zeta_grad_y
            if est == "seed":
                out.surrogate.backward()
                total[idx[:, None], idx[None, :]] += s.grad
    G = exact_grad_sim(sim, zx, zy, xi_x, xi_y, tau)
    torch.testing.assert_close(total / len(batches), G, rtol=0, atol=1e-12)
    # ζ: averaged over the batches that contain j, the unbiased estimator is n G_ζ exactly
    per_j = math.comb(n - 1, B - 1)
    exact = []
    for side, z in (("y", zx), ("x", zy)):
        zz = z.clone().requires_grad_()
        exact.append(n * torch.autograd.grad(zeta_objective(sim, zz, tau, side), zz)[0])
    for got, want in zip(zeta_sum["unbiased"], exact):
        torch.testing.assert_close(got / per_j, want, rtol=0, atol=1e-12)
    # the seed's estimator over-weights the positive term by n/B
    assert max(float((got / per_j - want).abs().max()) for got, want in zip(zeta_sum["seed"], exact)) > 1e-3


# ---------------------------------------------------------------------------- SogCLR reduction
def sogclr_reference_grads(batches, n, tau, gamma):
    """SogCLR (Yuan et al. 2022), written plainly: u_i is the moving average of the mean
    (1/(B-1)) Σ_{j≠i} exp((E_ij − E_ii)/τ); weights exp(.)/((B-1) u_i); both directions."""
    ux, uy = torch.zeros(n, dtype=F64), torch.zeros(n, dtype=F64)
    seen = torch.zeros(n, dtype=torch.bool)
    grads = []
    for sim0, idx in batches:
        B = sim0.shape[0]
        sim = sim0.clone().requires_grad_()
        mask = 1 - torch.eye(B, dtype=F64)
        dx = sim - sim.diagonal()[:, None]
        dy = sim - sim.diagonal()[None, :]
        ex = torch.exp(dx.detach() / tau) * mask
        ey = torch.exp(dy.detach() / tau) * mask
        gx, gy = ex.sum(1) / (B - 1), ey.sum(0) / (B - 1)
        new_x = torch.where(seen[idx], (1 - gamma) * ux[idx] + gamma * gx, gx)
        new_y = torch.where(seen[idx], (1 - gamma) * uy[idx] + gamma * gy, gy)
        ux[idx], uy[idx], seen[idx] = new_x, new_y, True
        wx = ex / ((B - 1) * new_x[:, None])
        wy = ey / ((B - 1) * new_y[None, :])
        ((wx * dx).sum(1).mean() + (wy * dy).sum(0).mean()).backward()
        grads.append(sim.grad)
    return grads


def test_zeta_zero_and_no_offset_is_sogclr():
    n, tau, gamma = 10, 0.3, 0.7
    g = torch.Generator().manual_seed(2)
    batches = []
    for B in (4, 6, 3, 5, 4):
        idx = torch.randperm(n, generator=g)[:B]
        batches.append((torch.randn(B, B, dtype=F64, generator=g), idx))
    want = sogclr_reference_grads(batches, n, tau, gamma)
    crit = DPMLoss(n, tau=tau, gamma=gamma, xi=INF, zeta=0.0, zeta_lr=0.0, dtype=F64)
    for (sim0, idx), w in zip(batches, want):
        sim = sim0.clone().requires_grad_()
        crit(sim, idx).surrogate.backward()
        torch.testing.assert_close(sim.grad, w, rtol=1e-12, atol=1e-13)


# ---------------------------------------------------------------------------- state
def test_moving_average_and_first_visit():
    n, tau, gamma = 8, 0.5, 0.3
    crit = DPMLoss(n, tau=tau, gamma=gamma, xi=0.0, zeta_lr=0.0, dtype=F64)
    g = torch.Generator().manual_seed(0)
    idx1, idx2 = torch.tensor([0, 3, 5]), torch.tensor([5, 1, 0, 7])
    s1, s2 = torch.randn(3, 3, dtype=F64, generator=g), torch.randn(4, 4, dtype=F64, generator=g)
    zero = torch.zeros(8, dtype=F64)

    def batch_sum(sim, side):
        B = sim.shape[0]
        L = anchor_logits(sim, zero[:B], tau, side)
        return (torch.exp(L) * (1 - torch.eye(B, dtype=F64))).sum(1)

    # the state is s / (B − 1): the moving average of the mean over the negatives
    crit(s1, idx1)
    assert crit.visited.tolist() == [True, False, False, True, False, True, False, False]
    torch.testing.assert_close(crit.log_s_x[idx1], (batch_sum(s1, "x") / 2).log(), rtol=1e-14, atol=0)
    torch.testing.assert_close(crit.log_s_y[idx1], (batch_sum(s1, "y") / 2).log(), rtol=1e-14, atol=0)
    assert torch.isneginf(crit.log_s_x[~crit.visited]).all()
    before = crit.log_s_x.clone()
    crit(s2, idx2)
    S2 = batch_sum(s2, "x") / 3
    want = torch.where(
        torch.tensor([True, False, True, False]),
        (1 - gamma) * before[idx2].exp() + gamma * S2,
        S2,
    )
    torch.testing.assert_close(crit.log_s_x[idx2], want.log(), rtol=1e-14, atol=1e-15)
    assert int(crit.step) == 2


def test_zeta_step_momentum_and_start():
    n, lr, th = 9, (0.05, 0.2), 0.6
    crit = DPMLoss(n, tau=0.5, gamma=0.5, xi=0.0, zeta=-0.05, zeta_lr=lr, zeta_momentum=th,
                   zeta_start_step=1, dtype=F64)
    g = torch.Generator().manual_seed(1)
    idx_a, idx_b = torch.tensor([2, 4, 6, 8]), torch.tensor([4, 0, 2])
    crit(torch.randn(4, 4, dtype=F64, generator=g), idx_a)  # step 0 < start: frozen
    assert (crit.zeta_x == -0.05).all() and (crit.zeta_y == -0.05).all() and not crit.zeta_started.any()
    out = crit(torch.randn(4, 4, dtype=F64, generator=g), idx_a)  # first update: u = g
    torch.testing.assert_close(crit.zeta_momentum_x[idx_a], out.zeta_grad_x, rtol=0, atol=0)
    torch.testing.assert_close(crit.zeta_x[idx_a], -0.05 - lr[0] * out.zeta_grad_x, rtol=0, atol=1e-15)
    torch.testing.assert_close(crit.zeta_y[idx_a], -0.05 - lr[1] * out.zeta_grad_y, rtol=0, atol=1e-15)
    u_prev, z_prev = crit.zeta_momentum_y.clone(), crit.zeta_y.clone()
    out = crit(torch.randn(3, 3, dtype=F64, generator=g), idx_b)
    started = torch.tensor([True, False, True])
    u = torch.where(started, (1 - th) * u_prev[idx_b] + th * out.zeta_grad_y, out.zeta_grad_y)
    torch.testing.assert_close(crit.zeta_momentum_y[idx_b], u, rtol=0, atol=1e-15)
    torch.testing.assert_close(crit.zeta_y[idx_b], z_prev[idx_b] - lr[1] * u, rtol=0, atol=1e-15)
    untouched = torch.tensor([1, 3, 5, 7])
    assert (crit.zeta_y[untouched] == -0.05).all()


def test_update_xi_and_its_use():
    n, tau = 5, 0.5
    sim, zx, zy = rand_problem(n, 21, zscale=0.5)
    crit = make_loss(n, tau=tau, xi=0.1, zx=zx, zy=zy, zeta_lr=0.0)
    xi_x, xi_y = crit.update_xi()
    assert float(xi_x) == max(0.1, float(zx.max())) and float(xi_y) == max(0.1, float(zy.max()))
    crit.zeta_x.fill_(-3.0)
    assert float(crit.update_xi()[0]) == 0.1  # never below ξ_0
    crit.zeta_x.copy_(zx)
    crit.xi_x.fill_(float(xi_x))
    out = crit(sim, torch.arange(n))
    want = exact_objective(sim, zx, zy, float(xi_x), float(xi_y), tau)
    assert abs(float(out.objective) - float(want)) < 1e-12


def run_steps(crit, steps, seed):
    g = torch.Generator().manual_seed(seed)
    outs = []
    for k in range(steps):
        B = 3 + k % 3
        idx = torch.randperm(crit.num_samples, generator=g)[:B]
        sim = torch.randn(B, B, generator=g).requires_grad_()
        out = crit(sim, idx)
        out.surrogate.backward()
        outs.append((out, sim.grad))
        if k % 4 == 3:
            crit.update_xi()
    return outs


def test_state_dict_round_trip_is_bit_exact():
    kw = dict(tau=0.2, gamma=0.8, xi=0.0, zeta=-0.05, zeta_lr=(0.01, 0.1), zeta_momentum=0.9, zeta_start_step=2)
    a = DPMLoss(12, **kw)
    run_steps(a, 5, seed=0)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = DPMLoss(12, **kw)
    b.load_state_dict(torch.load(buf))
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert x.dtype == y.dtype and torch.equal(x, y), name
    ra, rb = run_steps(a, 6, seed=1), run_steps(b, 6, seed=1)
    for (oa, ga), (ob, gb) in zip(ra, rb):
        assert torch.equal(ga, gb)
        for x, y in zip(oa, ob):
            assert torch.equal(x.detach(), y.detach())
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert set(a.state_dict()) == {"step", "visited", "zeta_started", "log_s", "zeta", "zeta_momentum", "xi"}
    b.reset_state()
    fresh = DPMLoss(12, **kw)
    for (name, x), (_, y) in zip(b.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(x, y), name


def test_eval_mode_changes_nothing():
    crit = DPMLoss(10, tau=0.3, gamma=0.5, xi=0.0, zeta_lr=0.1)
    run_steps(crit, 3, seed=0)
    before = {k: v.clone() for k, v in crit.state_dict().items()}
    crit.eval()
    out = crit(torch.randn(4, 4, requires_grad=True), torch.tensor([0, 9, 3, 4]))
    out.surrogate.backward()
    for k, v in crit.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("estimator", ["seed", "unbiased"])
def test_fixed_point_of_zeta_columns_sum_to_one(estimator):
    n, tau = 6, 0.5
    sim, _, _ = rand_problem(n, 31, scale=1.5)
    crit = DPMLoss(n, tau=tau, gamma=1.0, xi=0.0, zeta=0.0, zeta_lr=0.2, zeta_momentum=1.0,
                   zeta_estimator=estimator, dtype=F64)
    idx = torch.arange(n)
    for _ in range(3000):
        out = crit(sim, idx)
        if float(torch.cat((out.zeta_grad_x, out.zeta_grad_y)).abs().max()) < 1e-12:
            break
    for side, z in (("x", crit.zeta_y), ("y", crit.zeta_x)):
        P = torch.softmax(anchor_logits(sim, z, tau, side), dim=1)  # rows: anchors, sum to 1
        torch.testing.assert_close(P.sum(0), torch.ones(n, dtype=F64), rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------- batches, numerics, dtypes
def test_any_batch_size_and_b_equals_two():
    crit = DPMLoss(7, tau=0.2, gamma=0.9, xi=0.0, zeta_lr=0.01)
    for idx in ([0, 1], [2, 3, 4, 5, 6], [6, 0, 3], list(range(7))):
        sim = torch.randn(len(idx), len(idx), requires_grad=True)
        out = crit(sim, torch.tensor(idx))
        out.surrogate.backward()
        assert torch.isfinite(sim.grad).all() and out.zeta_grad_x.shape == (len(idx),)
    assert int(crit.step) == 4


def test_neg_inf_pairs_get_zero_weight():
    n, tau, xi = 5, 0.4, 0.0
    sim0, zx, zy = rand_problem(n, 41)
    sim0[0, 2] = sim0[3, 1] = sim0[4, 0] = -INF
    crit = make_loss(n, tau=tau, zx=zx, zy=zy, zeta_lr=0.0)
    sim = sim0.clone().requires_grad_()
    out = crit(sim, torch.arange(n))
    out.surrogate.backward()
    assert torch.isfinite(out.surrogate) and torch.isfinite(sim.grad).all()
    assert sim.grad[0, 2] == 0 and sim.grad[3, 1] == 0 and sim.grad[4, 0] == 0
    torch.testing.assert_close(sim.grad, exact_grad_sim(sim0, zx, zy, xi, xi, tau), rtol=0, atol=1e-12)
    # a whole row impossible, and no offset: zero weight, still no NaN
    sim1 = torch.randn(3, 3, dtype=F64)
    sim1[0, 1:] = -INF
    sim1 = sim1.requires_grad_()
    out = DPMLoss(4, tau=0.5, gamma=1.0, xi=INF, dtype=F64)(sim1, torch.tensor([0, 1, 2]))
    out.surrogate.backward()
    assert torch.isfinite(sim1.grad).all() and sim1.grad[0, 1:].eq(0).all()
    assert torch.isfinite(out.surrogate) and torch.isfinite(torch.cat((out.zeta_grad_x, out.zeta_grad_y))).all()
    assert float(out.objective_x) == -INF  # τ log 0: anchor x_0 has no possible candidate and no offset


@settings(max_examples=12, deadline=None)
@given(B=st.integers(2, 9), extra=st.integers(0, 20), seed=st.integers(0, 10_000),
       scale=st.sampled_from([1.0, 1e2, 1e4]), tau=st.sampled_from([0.01, 0.1, 1.0]),
       estimator=st.sampled_from(["seed", "unbiased"]))
def test_no_nan_for_extreme_float32_scores(B, extra, seed, scale, tau, estimator):
    n = B + extra
    g = torch.Generator().manual_seed(seed)
    crit = DPMLoss(n, tau=tau, gamma=0.5, xi=0.0, zeta_lr=0.1, zeta_estimator=estimator)
    for _ in range(3):
        sim = ((torch.rand(B, B, generator=g) * 2 - 1) * scale).requires_grad_()
        out = crit(sim, torch.randperm(n, generator=g)[:B])
        out.surrogate.backward()
        for t in (*out, sim.grad):
            assert torch.isfinite(t).all()
        assert out.surrogate.dtype == torch.float32 and sim.grad.dtype == torch.float32
    for name, buf in crit.state_dict().items():
        if name == "log_s":  # -inf marks the unvisited
            buf = buf[:, crit.visited]
        if buf.dtype.is_floating_point:
            assert torch.isfinite(buf).all(), name


@settings(max_examples=10, deadline=None)
@given(B=st.integers(2, 7), extra=st.integers(0, 5), seed=st.integers(0, 10_000))
def test_permuting_the_batch_permutes_everything(B, extra, seed):
    n = B + extra
    g = torch.Generator().manual_seed(seed)
    sim0 = torch.randn(B, B, dtype=F64, generator=g)
    idx = torch.randperm(n, generator=g)[:B]
    perm = torch.randperm(B, generator=g)
    warm = [(torch.randn(B, B, dtype=F64, generator=g), torch.randperm(n, generator=g)[:B]) for _ in range(2)]
    res = []
    for p in (torch.arange(B), perm):
        crit = DPMLoss(n, tau=0.3, gamma=0.6, xi=0.0, zeta_lr=0.1, dtype=F64)
        for s, i in warm:
            crit(s, i)
        sim = sim0[p][:, p].clone().requires_grad_()
        out = crit(sim, idx[p])
        out.surrogate.backward()
        res.append((crit, out, sim.grad, p))
    (c0, o0, g0, _), (c1, o1, g1, p) = res
    torch.testing.assert_close(g1, g0[p][:, p], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(o1.zeta_grad_x, o0.zeta_grad_x[p], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(o1.objective, o0.objective, rtol=1e-12, atol=1e-14)
    for (k, a), (_, b) in zip(c0.state_dict().items(), c1.state_dict().items()):
        if a.dtype.is_floating_point:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        else:
            assert torch.equal(a, b), k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_output_dtypes_follow_sim(dtype):
    crit = DPMLoss(6, tau=0.1, gamma=0.8, xi=0.0)
    sim = torch.randn(4, 4).to(dtype).requires_grad_()
    sim_before = sim.detach().clone()
    out = crit(sim, torch.tensor([1, 2, 3, 5]))
    out.surrogate.backward()
    assert all(t.dtype == dtype for t in out) and sim.grad.dtype == dtype
    assert torch.isfinite(sim.grad.float()).all()
    assert torch.equal(sim.detach(), sim_before)  # never mutates its input
    assert crit.log_s_x.dtype == torch.get_default_dtype()


def test_functional_matches_module():
    n, B, tau, gamma = 10, 4, 0.3, 1.0
    sim0 = torch.randn(B, B, dtype=F64, generator=torch.Generator().manual_seed(5))
    idx = torch.tensor([3, 1, 8, 0])
    crit = DPMLoss(n, tau=tau, gamma=gamma, xi=0.1, zeta=0.2, zeta_lr=0.0, dtype=F64)
    sim = sim0.clone().requires_grad_()
    out = crit(sim, idx)
    out.surrogate.backward()
    sim2 = sim0.clone().requires_grad_()
    log_b = math.log(B - 1)  # the state holds s / (B − 1)
    ref = dpm_surrogate(sim2, crit.log_s_x[idx] + log_b, crit.log_s_y[idx] + log_b, zeta_x=crit.zeta_x[idx],
                        zeta_y=crit.zeta_y[idx], xi_x=0.1, xi_y=torch.tensor(0.1, dtype=F64),
                        tau=tau, num_samples=n)
    ref.surrogate.backward()
    assert isinstance(ref, DPMOutput)
    torch.testing.assert_close(sim.grad, sim2.grad, rtol=1e-14, atol=1e-16)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-14, atol=1e-15)


def test_all_gather_without_process_group_is_identity():
    x = torch.randn(3, 2)
    assert all_gather_with_grad(x) is x


def test_exported_names():
    assert sg.DPMLoss is DPMLoss and sg.DPMOutput is DPMOutput
    assert sg.dpm_surrogate is dpm_surrogate and sg.all_gather_with_grad is all_gather_with_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    kw = dict(tau=0.2, gamma=0.8, xi=0.0, zeta_lr=0.05, dtype=F64)
    cpu, gpu = DPMLoss(20, **kw), DPMLoss(20, **kw).cuda()
    g = torch.Generator().manual_seed(0)
    for B in (5, 8, 3):
        idx = torch.randperm(20, generator=g)[:B]
        s0 = torch.randn(B, B, dtype=F64, generator=g)
        a, b = s0.clone().requires_grad_(), s0.cuda().requires_grad_()
        oa, ob = cpu(a, idx), gpu(b, idx.cuda())
        oa.surrogate.backward()
        ob.surrogate.backward()
        assert ob.surrogate.device.type == "cuda" and b.grad.device.type == "cuda"
        torch.testing.assert_close(b.grad.cpu(), a.grad, rtol=1e-12, atol=1e-14)
    for (k, x), (_, y) in zip(cpu.state_dict().items(), gpu.state_dict().items()):
        torch.testing.assert_close(y.cpu(), x, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------- argument checks
def loss6(**kw):
    base = dict(tau=0.1, gamma=0.8, xi=0.0)
    base.update(kw)
    return DPMLoss(6, **base)


@pytest.mark.parametrize(
    "sim,index,err,match",
    [
        (torch.randn(3, 4), torch.arange(3), ShapeError, r"sim: expected a square \(B, B\)"),
        (torch.randn(3), torch.arange(3), ShapeError, r"sim: expected a square"),
        (torch.randn(1, 1), torch.arange(1), ShapeError, r"sim: expected B >= 2"),
        (torch.randn(7, 7), torch.arange(7), ShapeError, r"larger than the dataset \(num_samples = 6\)"),
        (torch.ones(3, 3, dtype=torch.long), torch.arange(3), DTypeError, r"sim: expected a floating-point"),
        ([[0.0, 1.0], [1.0, 0.0]], torch.arange(2), DTypeError, r"sim: expected a floating-point torch.Tensor"),
        (torch.tensor([[0.0, math.nan], [0.0, 0.0]]), torch.arange(2), DomainError, r"sim: .*got NaN or \+inf"),
        (torch.tensor([[0.0, INF], [0.0, 0.0]]), torch.arange(2), DomainError, r"sim: .*got NaN or \+inf"),
        (torch.tensor([[-INF, 0.0], [0.0, 0.0]]), torch.arange(2), DomainError, r"finite diagonal"),
        (torch.randn(3, 3), torch.tensor([0.0, 1.0, 2.0]), DTypeError, r"index: expected an integer tensor"),
        (torch.randn(3, 3), torch.tensor([True, False, True]), DTypeError, r"index: expected an integer tensor"),
        (torch.randn(3, 3), torch.arange(4), ShapeError, r"index: expected shape \(3,\)"),
        (torch.randn(3, 3), torch.arange(3)[None], ShapeError, r"index: expected shape \(3,\)"),
        (torch.randn(3, 3), torch.tensor([0, 1, 6]), DomainError, r"index: expected dataset positions in \[0, 5\]"),
        (torch.randn(3, 3), torch.tensor([-1, 1, 2]), DomainError, r"got min -1"),
        (torch.randn(4, 4), torch.tensor([2, 1, 2, 1]), DomainError,
         r"index: expected distinct .* duplicates \[1, 2\]"),
        (torch.randn(3, 3), torch.arange(3, device="meta"), DeviceError, r"index is on device meta but sim is on cpu"),
    ],
)
def test_forward_argument_errors(sim, index, err, match):
    with pytest.raises(err, match=match):
        loss6()(sim, index)


def test_overflowing_scores_are_a_named_error_and_leave_the_state_alone():
    crit = DPMLoss(6, tau=1e-38, gamma=0.8, xi=0.0)
    before = {k: v.clone() for k, v in crit.state_dict().items()}
    with pytest.raises(DomainError, match=r"sim: sim / tau overflows \(tau = 1e-38"):
        crit(torch.tensor([[1.0, -1.0], [0.5, 2.0]]), torch.tensor([0, 1]))
    for k, v in crit.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_state_on_another_device_is_an_error():
    crit = DPMLoss(6, tau=0.1, gamma=0.8, xi=0.0, device="meta")
    with pytest.raises(DeviceError, match=r"DPMLoss state is on meta; move the loss"):
        crit(torch.randn(3, 3), torch.arange(3))


@pytest.mark.parametrize(
    "kw,err,match",
    [
        (dict(num_samples=1), DomainError, r"num_samples: expected an integer >= 2"),
        (dict(num_samples=5.0), DTypeError, r"num_samples: expected an integer"),
        (dict(tau=0.0), DomainError, r"tau: expected a value > 0"),
        (dict(tau=INF), DomainError, r"tau: expected a finite number"),
        (dict(tau="1"), DTypeError, r"tau: expected a real number"),
        (dict(gamma=0.0), DomainError, r"gamma: expected a value > 0"),
        (dict(gamma=1.5), DomainError, r"gamma: expected a value <= 1"),
        (dict(xi=-INF), DomainError, r"xi: expected a finite value or \+inf"),
        (dict(xi=math.nan), DomainError, r"xi: expected a finite number, got nan"),
        (dict(zeta=INF), DomainError, r"zeta: expected a finite number"),
        (dict(zeta_lr=-1.0), DomainError, r"zeta_lr: expected a value >= 0"),
        (dict(zeta_lr=(0.1, 0.2, 0.3)), ShapeError, r"zeta_lr: expected a number or a pair"),
        (dict(zeta_lr=(0.1, -0.2)), DomainError, r"zeta_lr\[1\]: expected a value >= 0"),
        (dict(zeta_momentum=0.0), DomainError, r"zeta_momentum: expected a value > 0"),
        (dict(zeta_start_step=-1), DomainError, r"zeta_start_step: expected an integer >= 0"),
        (dict(zeta_estimator="exact"), DomainError, r"zeta_estimator: expected one of \('seed', 'unbiased'\)"),
        (dict(dtype=torch.int64), DTypeError, r"dtype: expected a floating-point torch.dtype"),
    ],
)
def test_constructor_errors(kw, err, match):
    args = dict(num_samples=6, tau=0.1, gamma=0.8, xi=0.0)
    args.update(kw)
    n = args.pop("num_samples")
    with pytest.raises(err, match=match):
        DPMLoss(n, **args)


def test_zeta_lr_setter_validates():
    crit = loss6()
    crit.zeta_lr = (0.5, 0.25)
    assert crit.zeta_lr == (0.5, 0.25)
    with pytest.raises(DomainError, match=r"zeta_lr: expected a finite number"):
        crit.zeta_lr = math.nan


def test_functional_argument_errors():
    sim, z = torch.randn(3, 3), torch.zeros(3)
    kw = dict(zeta_x=z, zeta_y=z, xi_x=0.0, xi_y=0.0, tau=0.5, num_samples=5)
    with pytest.raises(ShapeError, match=r"log_s_x: expected shape \(3,\)"):
        dpm_surrogate(sim, torch.zeros(4), z, **kw)
    with pytest.raises(DomainError, match=r"log_s_y: expected log s in \[-inf, inf\), got NaN"):
        dpm_surrogate(sim, z, torch.full((3,), math.nan), **kw)
    with pytest.raises(DomainError, match=r"zeta_y: expected finite values"):
        dpm_surrogate(sim, z, z, **{**kw, "zeta_y": torch.tensor([0.0, INF, 0.0])})
    with pytest.raises(DomainError, match=r"log_s_x/log_s_y: got -inf .* no offset"):
        dpm_surrogate(sim, torch.full((3,), -INF), z, **{**kw, "xi_y": INF})
    with pytest.raises(DTypeError, match=r"zeta_x: expected a floating-point"):
        dpm_surrogate(sim, z, z, **{**kw, "zeta_x": torch.zeros(3, dtype=torch.long)})


def test_all_gather_argument_errors():
    with pytest.raises(DTypeError, match=r"x: expected a torch.Tensor"):
        all_gather_with_grad([1, 2])
    with pytest.raises(ShapeError, match=r"x: expected at least one dimension"):
        all_gather_with_grad(torch.tensor(1.0))


# ---------------------------------------------------------------------------- example and benchmark
def test_example_runs_quick(tmp_path):
    r = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "dpm_digits.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "R@1" in r.stdout and "DPM" in r.stdout and "InfoNCE" in r.stdout
    assert (tmp_path / "dpm_digits.png").exists()


def test_benchmark_runs_quick():
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "dpm.py"), "--quick"], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ratio" in r.stdout


def test_docstring_examples_run():
    import doctest

    import importlib

    attempted = 0
    for name in ("dpm", "_dpm_kernels", "_dpm_gather"):
        result = doctest.testmod(importlib.import_module(f"structgrad.{name}"))
        assert result.failed == 0, name
        attempted += result.attempted
    assert attempted >= 3


def test_dpm_module_layout():
    """dpm.py is split (checks and kernels, distributed gather); public names unchanged."""
    import pathlib

    import structgrad.dpm as dpm

    assert set(dpm.__all__) == {"ZETA_ESTIMATORS", "DPMOutput", "DPMLoss", "dpm_surrogate", "all_gather_with_grad"}
    assert sg.all_gather_with_grad is dpm.all_gather_with_grad and dpm.ZETA_ESTIMATORS == ("seed", "unbiased")
    root = pathlib.Path(dpm.__file__).parent
    for f in ["dpm.py", "_dpm_kernels.py", "_dpm_gather.py"]:
        assert len((root / f).read_text().splitlines()) <= 600, f


def test_load_state_dict_of_another_dataset_size_is_a_shape_error():
    a = DPMLoss(12, tau=0.2, gamma=0.8, xi=0.0)
    run_steps(a, 2, seed=0)
    b = DPMLoss(10, tau=0.2, gamma=0.8, xi=0.0)
    before = {k: v.clone() for k, v in b.state_dict().items()}
    with pytest.raises(
        ShapeError,
        match=r"state_dict: log_s has shape \(2, 12\) \(saved with num_samples = 12\), expected \(2, 10\) "
        r"for this DPMLoss with num_samples = 10",
    ):
        b.load_state_dict(a.state_dict())
    with pytest.raises(ShapeError, match=r"state_dict: log_s has shape"):
        b.load_state_dict(a.state_dict(), strict=False)
    for k, v in b.state_dict().items():  # nothing was half-loaded
        assert torch.equal(v, before[k]), k
    # inside a container the message carries the prefix
    outer = torch.nn.ModuleDict({"crit": DPMLoss(10, tau=0.2, gamma=0.8, xi=0.0)})
    with pytest.raises(ShapeError, match=r"state_dict: crit\.log_s has shape"):
        outer.load_state_dict(torch.nn.ModuleDict({"crit": a}).state_dict())


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8, torch.int64])
def test_any_integer_index_dtype_trains_like_int64(dtype):
    g = torch.Generator().manual_seed(4)
    sims = [torch.randn(4, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    idxs = [torch.tensor([0, 3, 5, 1]), torch.tensor([2, 3, 4, 0]), torch.tensor([5, 1, 2, 4])]
    a, b = DPMLoss(6, tau=0.2, gamma=0.7, xi=0.0, zeta_start_step=0, dtype=torch.float64), DPMLoss(
        6, tau=0.2, gamma=0.7, xi=0.0, zeta_start_step=0, dtype=torch.float64
    )
    for sim, idx in zip(sims, idxs):
        s1, s2 = sim.clone().requires_grad_(), sim.clone().requires_grad_()
        a(s1, idx.to(dtype)).surrogate.backward()
        b(s2, idx).surrogate.backward()
        assert torch.equal(s1.grad, s2.grad)
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(v, w), k
