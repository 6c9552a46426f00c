"""Second derivatives (issue 8, item 4): double backward through logsumexp, the
categorical, bernoulli and ksubset solvers (log_partition, marginals), nll over
them, and the RBMs' log-partition and free energy, against
torch.autograd.gradgradcheck in float64 and against plain torch.

The Hessian of A is Cov_p(z) = diag(μ) − μμᵀ for the categorical family; before
commit 503cdb7 the keepdim=False logsumexp dropped the −μμᵀ term.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import structgrad as sg
from structgrad import logspace as ls
from structgrad.testing import binary_structures, one_hot_structures, subset_structures

f64 = torch.float64
NEG_INF = float("-inf")


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=f64)


def _with_neginf(x: torch.Tensor) -> torch.Tensor:
    """Some -inf entries (never a whole row): the second derivative must stay NaN-free."""
    x = x.clone()
    x[..., 1] = NEG_INF
    x.reshape(-1, x.shape[-1])[0, -1] = NEG_INF
    return x


def _hvp(f, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(x), x, create_graph=True)
    (h,) = torch.autograd.grad(g, x, v)
    return h


# ---------------------------------------------------------------------------- logsumexp
@pytest.mark.parametrize("keepdim", [False, True])
@pytest.mark.parametrize("dim", [-1, 0])
def test_logsumexp_gradgradcheck(keepdim, dim):
    x = _randn(3, 4).requires_grad_(True)
    assert gradgradcheck(lambda t: ls.logsumexp(t, dim, keepdim), (x,))


@pytest.mark.parametrize("keepdim", [False, True])
def test_logsumexp_gradgradcheck_with_neginf_entries(keepdim):
    x = _with_neginf(_randn(3, 5, seed=1))
    fin = torch.isfinite(x)

    def f(t):  # only the finite entries vary (a finite difference at -inf is meaningless)
        return ls.logsumexp(torch.where(fin, t, x), -1, keepdim)

    t = torch.where(fin, x, torch.zeros_like(x)).requires_grad_(True)
    assert gradgradcheck(f, (t,))
    # and the second derivative at the -inf entries themselves is 0, not NaN
    x = x.requires_grad_(True)
    (g,) = torch.autograd.grad(ls.logsumexp(x, -1, keepdim).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad((g * _randn(3, 5, seed=2)).sum(), x)
    assert torch.isfinite(h).all() and (h[~fin] == 0).all()


@pytest.mark.parametrize("keepdim", [False, True])
def test_logsumexp_hessian_is_the_covariance(keepdim):
    x = _randn(5, seed=3)
    H = torch.autograd.functional.hessian(lambda t: ls.logsumexp(t, -1, keepdim).sum(), x)
    mu = torch.softmax(x, -1)
    torch.testing.assert_close(H, torch.diag(mu) - torch.outer(mu, mu))


def test_logsumexp_all_neginf_row_second_derivative_is_zero():
    x = torch.full((2, 3), NEG_INF, dtype=f64)
    x[0] = _randn(3, seed=4)
    x.requires_grad_(True)
    (g,) = torch.autograd.grad(ls.logsumexp(x, -1).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.pow(2).sum(), x)
    assert torch.isfinite(h).all() and (h[1] == 0).all()


# ---------------------------------------------------------------------------- solvers
def _structures(name: str, n: int) -> torch.Tensor:
    """``(|Z|, n)`` every structure of the family, for enumeration oracles."""
    make = {"categorical": one_hot_structures, "bernoulli": binary_structures}.get(name)
    return torch.stack(make(n) if make else subset_structures(n, 2))


SOLVERS = [("categorical", {}), ("bernoulli", {}), ("ksubset", {"k": 2}), ("ksubset", {"k": 2, "backend": "numba"})]
IDS = ["categorical", "bernoulli", "ksubset", "ksubset-numba"]


def _solver(name, opts):
    if opts.get("backend") == "numba":
        pytest.importorskip("numba")
    return sg.get_solver(name, **opts)


@pytest.mark.parametrize("name,opts", SOLVERS, ids=IDS)
@pytest.mark.parametrize("neginf", [False, True], ids=["finite", "neginf"])
def test_log_partition_gradgradcheck(name, opts, neginf):
    s = _solver(name, opts)
    x = _randn(2, 5, seed=5)
    if neginf:
        x = _with_neginf(x)
    fin = torch.isfinite(x)
    t = torch.where(fin, x, torch.zeros_like(x)).requires_grad_(True)

    def f(t):
        return s.log_partition(torch.where(fin, t, x))

    assert gradcheck(f, (t,))
    assert gradgradcheck(f, (t,))


@pytest.mark.parametrize("name,opts", SOLVERS, ids=IDS)
def test_marginals_jacobian_is_the_covariance(name, opts):
    """The derivative of μ is Cov_p(z) (checked by gradcheck and against enumeration)."""
    s = _solver(name, opts)
    x = _randn(5, seed=6)
    assert gradcheck(lambda t: s.marginals(t), (x.clone().requires_grad_(True),))
    J = torch.autograd.functional.jacobian(lambda t: s.marginals(t), x)
    structs = _structures(name, 5)
    p = torch.softmax(structs @ x, 0)
    mu = p @ structs
    cov = (structs * p.unsqueeze(-1)).T @ structs - torch.outer(mu, mu)
    torch.testing.assert_close(J, cov)


@pytest.mark.parametrize("name", ["categorical", "bernoulli"])
def test_marginals_gradgradcheck(name):
    """Third derivatives of A: fine where marginals are plain torch code."""
    s = sg.get_solver(name)
    x = _randn(2, 4, seed=7).requires_grad_(True)
    assert gradgradcheck(lambda t: s.marginals(t), (x,))


def test_ksubset_third_derivative_is_refused_not_wrong():
    """ksubset's marginals have an exact analytic backward (H v) that is itself not
    differentiable: a third derivative raises instead of being silently wrong."""
    s = sg.get_solver("ksubset", k=2)
    x = _randn(5, seed=8).requires_grad_(True)
    (g,) = torch.autograd.grad((s.marginals(x) * _randn(5, seed=9)).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        torch.autograd.grad(g.sum(), x)


# ---------------------------------------------------------------------------- nll
@pytest.mark.parametrize("name,opts", SOLVERS, ids=IDS)
def test_nll_gradgradcheck(name, opts):
    s = _solver(name, opts)
    x = _randn(2, 5, seed=10).requires_grad_(True)
    gold = s.map(_randn(2, 5, seed=11))
    assert gradgradcheck(lambda t: sg.nll(t, gold, s), (x,))
    assert gradgradcheck(lambda t: sg.nll(t, gold, s).pow(2).sum(), (x,))


def test_nll_squared_hessian_vector_product_matches_plain_torch():
    """The issue's example, reproducibly: (nll(θ, gold, "categorical")**2).sum().

    Plain torch computes it as (logsumexp θ − θ_gold)²; before the fix the covariance
    term was dropped and the two disagreed."""
    th = torch.tensor([0.3, -1.2, 0.8], dtype=f64)
    gold = torch.tensor([0.0, 1.0, 0.0], dtype=f64)
    v = torch.tensor([1.0, -0.5, 2.0], dtype=f64)
    ours = _hvp(lambda t: (sg.nll(t, gold, "categorical") ** 2).sum(), th, v)
    plain = _hvp(lambda t: ((torch.logsumexp(t, -1) - (gold * t).sum(-1)) ** 2).sum(), th, v)
    torch.testing.assert_close(ours, plain)
    # H v = 2 (μ − y)((μ − y)·v) + 2 nll (diag(μ) − μμᵀ) v; with diag(μ) alone (the old
    # defect) it would be [3.1426, -3.8094, 8.1148]
    torch.testing.assert_close(ours, torch.tensor([0.5491, -4.3881, 3.8390], dtype=f64), atol=1e-4, rtol=0)
    # float32, batched, as in the report
    th32 = _randn(4, 3, seed=12).float()
    gold32 = torch.nn.functional.one_hot(torch.tensor([1, 0, 2, 1]), 3).float()
    v32 = _randn(4, 3, seed=13).float()
    ours = _hvp(lambda t: (sg.nll(t, gold32, "categorical") ** 2).sum(), th32, v32)
    plain = _hvp(lambda t: ((torch.logsumexp(t, -1) - (gold32 * t).sum(-1)) ** 2).sum(), th32, v32)
    torch.testing.assert_close(ours, plain)


@pytest.mark.parametrize("name,opts", SOLVERS[1:], ids=IDS[1:])
def test_nll_squared_hvp_matches_enumeration(name, opts):
    """(nll²) Hessian-vector products of bernoulli and ksubset against plain torch
    autograd through a brute-force log-partition."""
    s = _solver(name, opts)
    Z = _structures(name, 5)
    th, v = _randn(2, 5, seed=14), _randn(2, 5, seed=15)
    gold = s.map(_randn(2, 5, seed=16))
    ours = _hvp(lambda t: (sg.nll(t, gold, s) ** 2).sum(), th, v)
    ref = _hvp(lambda t: ((torch.logsumexp(t @ Z.T, -1) - (gold * t).sum(-1)) ** 2).sum(), th, v)
    torch.testing.assert_close(ours, ref)


# ---------------------------------------------------------------------------- RBMs
class _RBMLogZ(sg.BernoulliRBM):
    def forward(self, v):
        return self.log_partition(), self.free_energy(v)


class _RSMLogZ(sg.ReplicatedSoftmax):
    def forward(self, v):
        return self.log_partition(torch.tensor([2, 3])), self.free_energy(v)


@pytest.mark.parametrize("cls,K,F_", [(_RBMLogZ, 4, 3), (_RBMLogZ, 2, 3), (_RSMLogZ, 4, 3)])
def test_rbm_log_partition_and_free_energy_gradgradcheck(cls, K, F_):
    g = torch.Generator().manual_seed(17)
    m = cls(K, F_, init_std=0.7, generator=g, dtype=f64)
    with torch.no_grad():
        m.visible_bias.normal_(generator=g)
        m.hidden_bias.normal_(generator=g)
    v = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 0]], dtype=f64)[:, :K]
    names = ("weight", "visible_bias", "hidden_bias")
    params = tuple(getattr(m, n).detach().clone().requires_grad_(True) for n in names)

    def f(*ps):
        log_z, fe = torch.func.functional_call(m, dict(zip(names, ps)), (v,))
        return log_z, fe

    assert gradgradcheck(f, params)
