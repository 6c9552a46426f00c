"""Baseline estimators: straight-through, SIMPLE (exact-marginal straight-through), the score
function with a baseline, the perturbed optimizer (softmax and its Jacobian, Monte-Carlo) and
its Fenchel-Young loss; capability checks and bad input."""

from __future__ import annotations

import pytest
import torch

import structgrad as sg
from structgrad.lab import exact_gradient
from structgrad.testing import one_hot_structures

F64 = torch.float64
KS = sg.get_solver("ksubset", k=3)


def _theta(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- straight-through
def test_straight_through_identity_gradient():
    theta, g = _theta(3, 7), _theta(4, 3, 7, seed=1)
    t = theta.clone().requires_grad_(True)
    z = sg.straight_through(t, KS, samples=4, generator=_gen())
    eps = sg.GumbelNoise().sample((4, 3, 7), _gen(), dtype=F64)
    assert torch.equal(z.detach(), KS.map(theta + eps))
    z.backward(g)
    assert torch.equal(t.grad, g.mean(0))
    t2 = theta.clone().requires_grad_(True)
    sg.straight_through(t2, lambda c: KS.map(-c), samples=4, minimize=True, generator=_gen()).backward(g)
    assert torch.equal(t2.grad, -g.mean(0))
    t3 = theta.clone().requires_grad_(True)
    zm = sg.straight_through(t3, KS, samples=4, reduce="mean", generator=_gen())
    assert zm.shape == (3, 7)
    zm.backward(g[0])
    assert torch.equal(t3.grad, g[0])


def test_straight_through_chain_shared_edge():
    node, edge = _theta(2, 4, 3), _theta(3, 3, seed=1)
    a = (node.clone().requires_grad_(True), edge.clone().requires_grad_(True))
    zn, ze = sg.straight_through(a, "chain", samples=2, generator=_gen(), lengths=torch.tensor([4, 2]))
    gn, ge = _theta(2, 2, 4, 3, seed=2), _theta(2, 2, 3, 3, seed=3)
    torch.autograd.backward((zn, ze), (gn, ge))
    assert torch.equal(a[0].grad, gn.mean(0)) and torch.allclose(a[1].grad, ge.mean(0).sum(0))


# ----------------------------------------------------------------------------- SIMPLE
def test_marginal_straight_through_gradient_is_marginal_jacobian():
    theta, g = _theta(3, 8), _theta(5, 3, 8, seed=1)
    t = theta.clone().requires_grad_(True)
    z = sg.marginal_straight_through(t, KS, samples=5, generator=_gen(3))
    assert torch.equal(z.detach(), KS.sample(theta, 5, generator=_gen(3)))  # exact samples, same draws
    z.backward(g)
    th = theta.clone().requires_grad_(True)
    (want,) = torch.autograd.grad((KS.marginals(th) * g.mean(0)).sum(), th)
    assert torch.allclose(t.grad, want, atol=1e-12)
    t2 = theta.clone().requires_grad_(True)
    zm = sg.marginal_straight_through(t2, KS, samples=5, reduce="mean", generator=_gen(3))
    zm.backward(g.mean(0))
    assert torch.allclose(t2.grad, want, atol=1e-12)


def test_marginal_straight_through_needs_exact_samples_and_differentiable_marginals():
    with pytest.raises(sg.CapabilityError, match="differentiable_marginals=False"):
        sg.marginal_straight_through((_theta(2, 4, 3), _theta(3, 3)), "chain")
    with pytest.raises(sg.CapabilityError, match="'sample'"):
        sg.marginal_straight_through(_theta(2, 4), sg.get_solver("ilp", A=torch.ones(1, 4), b=torch.tensor([2])))
    with pytest.raises(sg.CapabilityError):
        sg.marginal_straight_through(_theta(2, 4), lambda t: t)


# ----------------------------------------------------------------------------- score function
def test_score_function_is_unbiased():
    theta, b = _theta(3, 4), _theta(3, 4, seed=1)
    loss = lambda z: ((z - b) ** 2).sum(-1)  # noqa: E731
    exact = exact_gradient(theta, loss, one_hot_structures(4))
    t = theta.clone().requires_grad_(True)
    f = sg.score_function(t, "categorical", loss, samples=20000, generator=_gen(1))
    assert f.shape == (20000, 3)
    f.sum().backward()
    # per-sample terms are bounded by |L − b|·|z − μ| ≤ 2·max L: std of the mean < 0.02
    assert torch.allclose(t.grad, exact, atol=0.08), (t.grad, exact)
    for baseline in (None, 0.5, torch.zeros(3, dtype=F64)):
        t = theta.clone().requires_grad_(True)
        sg.score_function(t, "categorical", loss, samples=20000, baseline=baseline, generator=_gen(2)).sum().backward()
        assert torch.allclose(t.grad, exact, atol=0.15)


def test_score_function_bad_input():
    theta = _theta(3, 4)
    loss = lambda z: z.sum(-1)  # noqa: E731
    with pytest.raises(sg.DomainError, match="samples"):
        sg.score_function(theta, "categorical", loss, samples=1)
    with pytest.raises(sg.ShapeError, match="loss"):
        sg.score_function(theta, "categorical", lambda z: z.sum(), samples=2)
    with pytest.raises(sg.CapabilityError):
        sg.score_function(theta, sg.get_solver("ilp", A=torch.ones(1, 4), b=torch.tensor([2])), loss)
    with pytest.raises(sg.DTypeError):
        sg.score_function(theta, "categorical", "mse")
    with pytest.raises(sg.DomainError, match="baseline"):
        sg.score_function(theta, "categorical", loss, baseline="mean")


# ----------------------------------------------------------------------------- perturbed optimizer
def test_perturbed_argmax_is_softmax_and_its_jacobian():
    """Gumbel-perturbed argmax over one-hot vectors: E[y] = softmax(θ/τ) exactly, Jacobian
    (1/τ)(diag p − p pᵀ).  Monte-Carlo with S = 100 000 (seeded): the mean's entries have
    standard error < 0.002, the Jacobian's < 0.007 (∇ν = 1 − e^(−ε) has variance 1, and
    |y| ≤ 1, τ = 0.5); tolerances 0.01 and 0.035, five standard errors."""
    tau = 0.5
    theta = torch.tensor([0.3, -0.5, 1.0, 0.1], dtype=F64, requires_grad=True)
    y = sg.perturbed_optimizer(theta, "categorical", samples=100_000, noise_temperature=tau, reduce="mean",
                               generator=_gen(0))
    p = torch.softmax(theta.detach() / tau, -1)
    assert torch.allclose(y.detach(), p, atol=0.01)
    J = torch.stack([torch.autograd.grad(y[i], theta, retain_graph=True)[0] for i in range(4)])
    want = (torch.diag(p) - torch.outer(p, p)) / tau
    assert torch.allclose(J, want, atol=0.035), (J - want).abs().max()


def test_perturbed_optimizer_options_and_errors():
    theta = _theta(2, 5)
    t = theta.clone().requires_grad_(True)
    y = sg.perturbed_optimizer(t, KS, samples=3, noise="normal", generator=_gen())
    assert y.shape == (3, 2, 5)
    y.sum().backward()
    assert t.grad.shape == (2, 5)
    with pytest.raises(sg.DomainError, match="needs noise"):
        sg.perturbed_optimizer(theta, KS, noise=None)
    with pytest.raises(sg.DomainError, match="grad_neg_log_density"):
        sg.perturbed_optimizer(theta, KS, noise="sum_of_gamma")
    with pytest.raises(sg.DomainError, match="noise_temperature"):
        sg.perturbed_optimizer(theta, KS, noise_temperature=0.0)


# ----------------------------------------------------------------------------- Fenchel-Young
def test_fenchel_young_value_and_gradient():
    theta, y = _theta(3, 6), KS.map(_theta(3, 6, seed=1))
    tau = 0.8
    t = theta.clone().requires_grad_(True)
    target = y.clone().requires_grad_(True)
    loss = sg.perturbed_fenchel_young_loss(t, target, KS, samples=7, noise_temperature=tau, generator=_gen(4))
    eps = sg.GumbelNoise().sample((7, 3, 6), _gen(4), dtype=F64)
    ys = KS.map(theta + tau * eps)
    want = (ys * (theta + tau * eps)).sum(-1).mean(0) - (theta * y).sum(-1)
    assert torch.allclose(loss, want, atol=1e-12)
    w = torch.tensor([1.0, 2.0, -1.0], dtype=F64)
    loss.backward(w)
    assert torch.allclose(t.grad, w[:, None] * (ys.mean(0) - y), atol=1e-12)
    assert torch.allclose(target.grad, -w[:, None] * theta, atol=1e-12)
    # the same draws as the perturbed optimizer's mean
    ybar = sg.perturbed_optimizer(theta, KS, samples=7, noise_temperature=tau, reduce="mean", generator=_gen(4))
    assert torch.equal(ybar, ys.mean(0))


def test_fenchel_young_minimize_and_chain():
    c, y = _theta(2, 6), KS.map(_theta(2, 6, seed=2))
    t = c.clone().requires_grad_(True)
    mn = lambda cost: KS.map(-cost)  # noqa: E731
    sg.perturbed_fenchel_young_loss(t, y, mn, minimize=True, samples=5, generator=_gen(1)).sum().backward()
    ys = mn(c - sg.GumbelNoise().sample((5, 2, 6), _gen(1), dtype=F64))
    assert torch.allclose(t.grad, y - ys.mean(0), atol=1e-12)
    node, edge = _theta(2, 4, 3), _theta(3, 3, seed=1)
    gold = sg.get_solver("chain").map((_theta(2, 4, 3, seed=5), edge))
    a = (node.clone().requires_grad_(True), edge.clone().requires_grad_(True))
    loss = sg.perturbed_fenchel_young_loss(a, gold, "chain", samples=3, generator=_gen(0))
    assert loss.shape == (2,)
    loss.sum().backward()
    assert a[1].grad.shape == (3, 3)
    with pytest.raises(sg.ShapeError, match="target"):
        sg.perturbed_fenchel_young_loss(a, (gold[0], gold[1][0]), "chain")
    with pytest.raises(sg.ShapeError, match="target"):
        sg.perturbed_fenchel_young_loss(c, (y,), KS)
