"""structgrad.imle: the formula (with and without noise), blackbox equivalence, signs,
minimize, dtype/device, reproducibility, the chain's shared edge with lengths and S > 1,
plain callables, the decorator, and bad input."""

from __future__ import annotations

import pytest
import torch

import structgrad as sg

F64 = torch.float64
KS = sg.get_solver("ksubset", k=3)


def _theta(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _grad(theta, upstream, **kw):
    t = theta.clone().requires_grad_(True)
    z = sg.imle(t, KS if "solver" not in kw else kw.pop("solver"), **kw)
    z.backward(upstream)
    return z.detach(), t.grad


# ----------------------------------------------------------------------------- the formula
@pytest.mark.parametrize("lam", [0.5, 3.0])
@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("S", [1, 3])
def test_zero_noise_equals_formula_exactly(lam, alpha, S):
    theta = _theta(4, 8)
    g = _theta(S, 4, 8, seed=1)
    z, grad = _grad(theta, g, lam=lam, alpha=alpha, samples=S, noise=None)
    z0 = KS.map(theta)
    assert torch.equal(z, z0.expand(S, 4, 8))
    target = KS.map(alpha * theta.unsqueeze(0) - lam * g)
    expected = ((z0.unsqueeze(0) - target) / lam).mean(0)
    assert torch.equal(grad, expected)


def test_zero_noise_variants_exactly():
    theta, g = _theta(4, 8), _theta(2, 4, 8, seed=1)
    z0 = KS.map(theta)
    # two-sided: [MAP(θ + λg) − MAP(θ − λg)] / (2λ)
    _, grad = _grad(theta, g, lam=2.0, samples=2, noise=None, two_sided=True)
    expected = ((KS.map(theta + 2.0 * g) - KS.map(theta - 2.0 * g)) * 0.5 / 2.0).mean(0)
    assert torch.equal(grad, expected)
    # not divided by λ
    _, grad = _grad(theta, g, lam=2.0, samples=2, noise=None, divide_by_lam=False)
    assert torch.equal(grad, (z0 - KS.map(theta - 2.0 * g)).mean(0))
    # reduce="mean": g_s = the gradient of the mean, for every s (not divided by S)
    gm = g[0]
    t = theta.clone().requires_grad_(True)
    zm = sg.imle(t, KS, lam=2.0, samples=5, noise=None, reduce="mean")
    assert zm.shape == (4, 8)
    zm.backward(gm)
    assert torch.equal(t.grad, (z0 - KS.map(theta - 2.0 * gm)) / 2.0)


@pytest.mark.parametrize("two_sided", [False, True])
def test_with_noise_equals_formula_exactly(two_sided):
    theta, g = _theta(4, 8), _theta(3, 4, 8, seed=1)
    tau, tau_t, lam, alpha = 0.7, 1.3, 1.5, 0.8
    z, grad = _grad(
        theta, g, lam=lam, samples=3, noise="gumbel", noise_temperature=tau, target_noise_temperature=tau_t,
        alpha=alpha, two_sided=two_sided, generator=torch.Generator().manual_seed(7),
    )
    eps = sg.GumbelNoise().sample((3, 4, 8), torch.Generator().manual_seed(7), dtype=F64)  # drawn once, reused
    zf = KS.map(theta + tau * eps)
    assert torch.equal(z, zf)
    base = alpha * theta
    if two_sided:
        d = (KS.map(base + (tau_t * eps + lam * g)) - KS.map(base + (tau_t * eps - lam * g))) * 0.5
    else:
        d = zf - KS.map(base + (tau_t * eps - lam * g))
    assert torch.equal(grad, (d / lam).mean(0))


def test_sum_of_gamma_noise_uses_solver_k():
    theta = _theta(2, 6)
    z = sg.imle(theta, KS, noise="sum_of_gamma", samples=2, generator=torch.Generator().manual_seed(0))
    eps = sg.SumOfGammaNoise(3).sample((2, 2, 6), torch.Generator().manual_seed(0), dtype=F64)
    assert torch.equal(z, KS.map(theta + eps))


# ----------------------------------------------------------------------------- blackbox
@pytest.mark.parametrize("minimize", [False, True])
def test_blackbox_equals_imle_without_noise(minimize):
    theta, g = _theta(5, 7), _theta(5, 7, seed=3)
    mn = lambda c: KS.map(-c)  # noqa: E731  (a solver that minimises)
    solver = mn if minimize else KS
    t1, t2 = theta.clone().requires_grad_(True), theta.clone().requires_grad_(True)
    zb = sg.blackbox(t1, solver, lam=1.7, minimize=minimize)
    zi = sg.imle(t2, solver, lam=1.7, noise=None, minimize=minimize)
    assert torch.equal(zb, zi[0])
    zb.backward(g)
    zi.backward(g.unsqueeze(0))
    assert torch.equal(t1.grad, t2.grad)
    # the paper's minimisation form: ∇_c = −[MIN(c) − MIN(c + λ g)] / λ
    if minimize:
        assert torch.equal(t1.grad, -(mn(theta) - mn(theta + 1.7 * g)) / 1.7)


def test_blackbox_equals_imle_on_chain_with_shared_edge():
    node, edge = _theta(2, 5, 3), _theta(3, 3, seed=1)
    lengths = torch.tensor([5, 3])
    gn, ge = _theta(2, 5, 3, seed=2), _theta(2, 3, 3, seed=3)
    a = [node.clone().requires_grad_(True), edge.clone().requires_grad_(True)]
    b = [node.clone().requires_grad_(True), edge.clone().requires_grad_(True)]
    zb = sg.blackbox(tuple(a), "chain", lam=2.0, lengths=lengths)
    zi = sg.imle(tuple(b), "chain", lam=2.0, noise=None, lengths=lengths)
    assert all(torch.equal(x, y[0]) for x, y in zip(zb, zi))
    torch.autograd.backward(zb, (gn, ge))
    torch.autograd.backward(zi, (gn.unsqueeze(0), ge.unsqueeze(0)))
    assert torch.equal(a[0].grad, b[0].grad) and torch.equal(a[1].grad, b[1].grad)


# ----------------------------------------------------------------------------- signs
def _expected_loss(theta, w):
    return (KS.marginals(theta) * w).sum()


def test_sign_linear_loss_moves_theta_the_right_way():
    theta, w = _theta(6, 10, seed=4), _theta(10, seed=5)
    t = theta.clone().requires_grad_(True)
    (sg.imle(t, KS, lam=1.0, samples=20, generator=torch.Generator().manual_seed(0)) * w).sum().backward()
    th = theta.clone().requires_grad_(True)
    (true,) = torch.autograd.grad(_expected_loss(th, w), th)
    assert float((t.grad * true).sum()) > 0
    assert _expected_loss(theta - 0.2 * t.grad, w) < _expected_loss(theta, w)


def test_sign_with_minimize():
    """A solver that minimises ⟨z, c⟩: p(z) ∝ exp(−⟨z, c⟩); the gradient is the costs'."""
    c, w = _theta(6, 10, seed=6), _theta(10, seed=7)
    mn = lambda cost: KS.map(-cost)  # noqa: E731
    t = c.clone().requires_grad_(True)
    z = sg.imle(t, mn, lam=1.0, samples=20, minimize=True, generator=torch.Generator().manual_seed(0))
    (z * w).sum().backward()
    cc = c.clone().requires_grad_(True)
    (true,) = torch.autograd.grad(_expected_loss(-cc, w), cc)
    assert float((t.grad * true).sum()) > 0
    assert _expected_loss(-(c - 0.2 * t.grad), w) < _expected_loss(-c, w)
    # forward: the minimiser receives c − τε
    eps = sg.GumbelNoise().sample((20, 6, 10), torch.Generator().manual_seed(0), dtype=F64)
    assert torch.equal(z.detach(), mn(c - eps))


# ----------------------------------------------------------------------------- dtype, device, seeds
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_dtype_round_trip(dtype):
    theta = _theta(3, 6, dtype=dtype).requires_grad_(True)
    z = sg.imle(theta, KS, samples=2, generator=torch.Generator().manual_seed(0))
    assert z.dtype == dtype and z.device == theta.device
    z.sum().backward()
    assert theta.grad.dtype == dtype


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_round_trip():
    theta = _theta(3, 6).cuda().requires_grad_(True)
    g = torch.Generator(device="cuda").manual_seed(0)
    z = sg.imle(theta, KS, samples=2, noise="sum_of_gamma", generator=g)
    assert z.device == theta.device
    z.sum().backward()
    assert theta.grad.device == theta.device


def test_same_seed_same_gradient():
    theta, g = _theta(4, 8), _theta(5, 4, 8, seed=1)
    runs = [_grad(theta, g, samples=5, generator=torch.Generator().manual_seed(s)) for s in (11, 11, 12)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[2][0])


def test_theta_not_mutated_and_neg_inf_safe():
    theta = _theta(2, 6)
    theta[0, 1] = float("-inf")
    before = theta.clone()
    t = theta.clone().requires_grad_(True)
    z = sg.imle(t, KS, alpha=0.0, samples=3, generator=torch.Generator().manual_seed(0))
    assert bool((z[:, 0, 1] == 0).all())
    z.sum().backward()
    assert torch.equal(theta, before) and bool(torch.isfinite(t.grad).all())


# ----------------------------------------------------------------------------- chain
def test_chain_shared_edge_lengths_and_samples():
    node, edge = _theta(2, 5, 3), _theta(3, 3, seed=1)
    lengths = torch.tensor([5, 2])
    chain = sg.get_solver("chain")
    seen = []
    orig = chain.map

    def spy(theta, **kw):
        seen.append((tuple(theta[0].shape), tuple(theta[1].shape), tuple(kw["lengths"].shape)))
        return orig(theta, **kw)

    chain.map = spy
    a = (node.clone().requires_grad_(True), edge.clone().requires_grad_(True))
    zn, ze = sg.imle(a, chain, samples=3, lam=1.0, generator=torch.Generator().manual_seed(0), lengths=lengths)
    # the solver sees per-instance, per-position edges; lengths expanded along the samples
    assert seen == [((3, 2, 5, 3), (3, 2, 4, 3, 3), (3, 2))]
    assert zn.shape == (3, 2, 5, 3) and ze.shape == (3, 2, 3, 3)
    assert bool((zn[:, 1, 2:] == 0).all()) and torch.equal(zn.sum((-1, -2)), lengths.to(F64).expand(3, 2))
    assert torch.equal(ze.sum((-1, -2)), (lengths - 1).to(F64).expand(3, 2))  # transition counts
    (zn.sum() + (ze * _theta(3, 3, seed=9)).sum()).backward()
    assert a[0].grad.shape == (2, 5, 3) and a[1].grad.shape == (3, 3)
    assert len(seen) == 2 and seen[1] == seen[0]


def test_chain_shared_edge_zero_noise_formula():
    """The per-instance target of a shared (C, C) edge: edge − λ g broadcast over positions,
    the MAP's transitions summed back into counts, the edge gradient summed over the batch."""
    chain = sg.get_solver("chain")
    node, edge = _theta(2, 4, 3), _theta(3, 3, seed=1)
    lengths = torch.tensor([4, 3])
    gn, ge = _theta(2, 2, 4, 3, seed=2), _theta(2, 2, 3, 3, seed=3)
    a = (node.clone().requires_grad_(True), edge.clone().requires_grad_(True))
    z = sg.imle(a, chain, samples=2, lam=0.8, noise=None, lengths=lengths)
    torch.autograd.backward(z, (gn, ge))
    z0n, z0e = chain.map((node, edge), lengths=lengths)
    Ls = lengths.expand(2, 2)
    tn = node - 0.8 * gn
    te = edge.expand(2, 2, 3, 3, 3) - 0.8 * ge.unsqueeze(-3)
    ztn, zte = chain.map((tn, te), lengths=Ls)
    dn = ((z0n - ztn) / 0.8).mean(0)
    de = ((z0e - zte.sum(-3)) / 0.8).mean(0).sum(0)
    assert torch.allclose(a[0].grad, dn, atol=1e-12) and torch.allclose(a[1].grad, de, atol=1e-12)


@pytest.mark.parametrize("edge_shape", [(4, 3, 3), (2, 4, 3, 3)])
def test_chain_position_and_instance_edges(edge_shape):
    node, edge = _theta(2, 5, 3), _theta(*edge_shape, seed=1)
    a = (node.clone().requires_grad_(True), edge.clone().requires_grad_(True))
    zn, ze = sg.imle(a, "chain", samples=2, generator=torch.Generator().manual_seed(0), lengths=torch.tensor([5, 1]))
    assert ze.shape == (2, 2, 4, 3, 3) and bool((ze[:, 1] == 0).all())
    (zn.sum() + ze.sum()).backward()
    assert a[1].grad.shape == edge_shape


# ----------------------------------------------------------------------------- callables, decorator
def test_plain_callable_and_per_instance_solver():
    def top2(th):
        return torch.zeros_like(th).scatter(-1, th.topk(2, dim=-1).indices, 1.0)

    theta = _theta(3, 6).requires_grad_(True)
    z = sg.imle(theta, top2, samples=4, generator=torch.Generator().manual_seed(0))
    assert z.shape == (4, 3, 6) and torch.equal(z.sum(-1), torch.full((4, 3), 2.0, dtype=F64))
    z.sum().backward()

    import numpy as np

    def topk(th, k):
        out = np.zeros_like(th)
        out[np.argsort(-th, kind="stable")[: int(k)]] = 1.0
        return out

    solver = sg.per_instance_solver(topk, batched_kwargs=("k",))
    z = sg.imle(_theta(3, 6), solver, samples=2, generator=torch.Generator().manual_seed(0), k=torch.tensor([1, 2, 3]))
    assert torch.equal(z.sum(-1), torch.tensor([[1.0, 2.0, 3.0]] * 2, dtype=F64))


def test_decorator_form():
    @sg.with_imle(lam=2.0, samples=3, noise=None)
    def top2(th):
        return torch.zeros_like(th).scatter(-1, th.topk(2, dim=-1).indices, 1.0)

    assert top2.__name__ == "top2"
    theta, g = _theta(2, 5).requires_grad_(True), _theta(3, 2, 5, seed=1)
    top2(theta).backward(g)
    t2 = theta.detach().clone().requires_grad_(True)
    sg.imle(t2, top2.__wrapped__, lam=2.0, samples=3, noise=None).backward(g)
    assert torch.equal(theta.grad, t2.grad)


# ----------------------------------------------------------------------------- bad input
class _MarginalsOnly(sg.Solver):
    capabilities = sg.Capabilities(marginals="exact")

    def _marginals(self, theta):
        return torch.softmax(theta, -1)


class _WrongShape:
    def sample(self, shape, generator):
        return torch.zeros(tuple(shape)[1:])


def test_bad_input():
    th = _theta(2, 5)
    with pytest.raises(sg.DTypeError, match="floating-point"):
        sg.imle(torch.ones(2, 5, dtype=torch.long), KS)
    with pytest.raises(sg.DTypeError):
        sg.imle((th, torch.ones(5, dtype=torch.long)), KS)
    with pytest.raises(sg.DomainError, match="samples"):
        sg.imle(th, KS, samples=0)
    with pytest.raises(sg.DTypeError, match="samples"):
        sg.imle(th, KS, samples=1.5)
    for lam in (0.0, -1.0):
        with pytest.raises(sg.DomainError, match="lam"):
            sg.imle(th, KS, lam=lam)
    with pytest.raises(sg.DTypeError, match="lam"):
        sg.imle(th, KS, lam="big")
    with pytest.raises(sg.ShapeError, match="requested shape"):
        sg.imle(th, KS, noise=_WrongShape())
    with pytest.raises(sg.CapabilityError, match="'map'"):
        sg.imle(th, _MarginalsOnly())
    with pytest.raises(sg.DomainError, match="reduce"):
        sg.imle(th, KS, reduce="sum")
    with pytest.raises(sg.DTypeError, match="minimize"):
        sg.imle(th, KS, minimize="yes")
    with pytest.raises(sg.DomainError, match="noise_temperature"):
        sg.imle(th, KS, noise_temperature=-1.0)
    with pytest.raises(sg.DomainError, match="alpha"):
        sg.imle(th, KS, alpha=-0.5)
    with pytest.raises(sg.DomainError, match="noise"):
        sg.imle(th, KS, noise="uniform")
    with pytest.raises(sg.DomainError, match="k attribute"):
        sg.imle(th, "categorical", noise="sum_of_gamma")
    with pytest.raises(sg.DTypeError, match="generator"):
        sg.imle(th, KS, generator=0)
    with pytest.raises(sg.UnknownArgumentError, match="lengths"):
        sg.imle(th, KS, lengths=torch.tensor([5, 5]))
    with pytest.raises(sg.ShapeError, match="lengths"):
        sg.imle((_theta(2, 5, 3), _theta(3, 3)), "chain", lengths=torch.tensor([5, 5, 5]))


def test_tree_shared_edge_zero_noise_formula():
    """tree: a shared (E, C, C) edge becomes the per-instance (S, *b, E, C, C) edge (no hook needed)."""
    import networkx as nx

    tree = sg.get_solver("tree", graph=nx.Graph([(0, 1), (1, 2), (1, 3)]))
    node, edge = _theta(2, 4, 3), _theta(3, 3, 3, seed=1)
    gn, ge = _theta(2, 2, 4, 3, seed=2), _theta(2, 2, 3, 3, 3, seed=3)
    a = (node.clone().requires_grad_(True), edge.clone().requires_grad_(True))
    zn, ze = sg.imle(a, tree, samples=2, lam=0.9, noise=None)
    assert zn.shape == (2, 2, 4, 3) and ze.shape == (2, 2, 3, 3, 3)
    torch.autograd.backward((zn, ze), (gn, ge))
    z0n, z0e = tree.map((node, edge))
    ztn, zte = tree.map((node - 0.9 * gn, edge - 0.9 * ge))
    assert torch.allclose(a[0].grad, ((z0n - ztn) / 0.9).mean(0), atol=1e-12)
    assert torch.allclose(a[1].grad, ((z0e - zte) / 0.9).mean(0).sum(0), atol=1e-12)


def _builtin_cases():
    import networkx as nx

    th = _theta(2, 5)
    return [
        ("categorical", {}, th, {}),
        ("bernoulli", {}, th, {}),
        ("ksubset", {"k": 2}, th, {}),
        ("ilp", {"A": [[1.5, 2.0, 0.5, 1.0, 2.5]], "b": [3.0]}, th, {}),
        ("chain", {}, (_theta(2, 5, 3), _theta(3, 3, seed=1)), {"lengths": torch.tensor([5, 2])}),
        ("tree", {"graph": nx.path_graph(4)}, (_theta(2, 4, 3), _theta(2, 3, 3, 3, seed=1)), {}),
    ]


@pytest.mark.parametrize("case", _builtin_cases(), ids=lambda c: c[0])
def test_every_builtin_solver(case):
    name, options, theta, kwargs = case
    solver = sg.get_solver(name, **options)
    parts = [t.clone().requires_grad_(True) for t in sg.checks.leaves(theta)]
    th = tuple(parts) if isinstance(theta, tuple) else parts[0]
    z = sg.imle(th, solver, samples=2, generator=torch.Generator().manual_seed(0), **kwargs)
    z0 = solver.map(theta, **kwargs)
    for zi, z0i in zip(sg.checks.leaves(z), sg.checks.leaves(z0)):
        assert zi.shape == (2,) + tuple(z0i.shape) and zi.dtype == F64
    torch.autograd.backward(sg.checks.leaves(z), [torch.ones_like(t) for t in sg.checks.leaves(z)])
    assert all(p.grad is not None and p.grad.shape == p.shape for p in parts)
