"""Core: log-space primitives, categorical and bernoulli solvers, capabilities, registry,
nll, chain label helpers, and that the conformance suite itself catches wrong solvers."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import structgrad as sg
from structgrad import logspace as ls
from structgrad.testing import BruteForce, Case, binary_structures, check_solver, chi_square_threshold, one_hot_structures

F64 = torch.float64
NEG = float("-inf")
ROOT = Path(__file__).resolve().parents[1]
ND = 1 + torch.cuda.is_available()  # check_solver runs every check on each available device


# ----------------------------------------------------------------------------- log-space primitives
def test_logsumexp_all_neg_inf_is_nan_free():
    x = torch.full((2, 3), NEG, dtype=F64, requires_grad=True)
    y = ls.logsumexp(x, -1)
    assert torch.isneginf(y).all()
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert torch.equal(ls.softmax(x.detach(), -1), torch.zeros(2, 3, dtype=F64))
    assert torch.isneginf(ls.log_softmax(x.detach(), -1)).all()
    a = torch.tensor(NEG, requires_grad=True)
    ls.logaddexp(a, torch.tensor(NEG)).backward()
    assert a.grad == 0


@settings(max_examples=30, deadline=None)
@given(st.lists(st.one_of(st.floats(-1e4, 1e4), st.just(NEG)), min_size=1, max_size=6))
def test_logsumexp_matches_torch_and_gradient_is_softmax(vals):
    x = torch.tensor(vals, dtype=F64, requires_grad=True)
    y = ls.logsumexp(x, 0)
    if not math.isinf(float(torch.logsumexp(x.detach(), 0))):
        torch.testing.assert_close(y, torch.logsumexp(x.detach(), 0))
    y.backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad, ls.softmax(x.detach(), 0))


def test_logspace_gradcheck_and_offset_softmax():
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    o = torch.randn(3, 1, dtype=F64, requires_grad=True)
    torch.autograd.gradcheck(lambda a: ls.logsumexp(a, 1), (x,))
    torch.autograd.gradcheck(lambda a, b: ls.softmax_with_offset(a, b, -1), (x, o))
    w = ls.softmax_with_offset(x, o, -1)
    ref = torch.softmax(torch.cat([x, o], -1), -1)[:, :4]
    torch.testing.assert_close(w, ref)
    torch.testing.assert_close(ls.softmax_with_offset(x, NEG, -1), torch.softmax(x, -1))


def test_gumbel_argmax_is_softmax_in_distribution():
    logits = torch.tensor([0.0, 1.0, -1.0, NEG, 2.0], dtype=F64)
    n = 20000
    idx = ls.gumbel_argmax(logits, n, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(idx, minlength=5).double()
    assert counts[3] == 0
    p = torch.softmax(logits, 0)
    keep = p > 0
    chi2 = float((((counts - n * p) ** 2)[keep] / (n * p[keep])).sum())
    assert chi2 < chi_square_threshold(3, 1e-6)
    dead = ls.gumbel_argmax(torch.full((2, 3), NEG), 4)
    assert (dead == -1).all()


def test_multinomial_counts_per_row_totals():
    logits = torch.log(torch.tensor([[0.2, 0.3, 0.5], [0.5, 0.5, 0.0], [1.0, 1.0, 1.0]], dtype=F64))
    totals = torch.tensor([40000, 7, 0])
    c = ls.multinomial_counts(logits, totals, generator=torch.Generator().manual_seed(1))
    assert torch.equal(c.sum(-1), totals.double())
    assert c[1, 2] == 0 and (c[2] == 0).all()
    p = torch.tensor([0.2, 0.3, 0.5], dtype=F64)
    chi2 = float(((c[0] - 40000 * p) ** 2 / (40000 * p)).sum())
    assert chi2 < chi_square_threshold(2, 1e-6)


def test_safe_dot_zero_times_neg_inf():
    z = torch.tensor([1.0, 0.0, 1.0], requires_grad=True)
    th = torch.tensor([2.0, NEG, 3.0], requires_grad=True)
    out = ls.safe_dot(z, th, 1)
    assert out == 5.0
    out.backward()
    assert torch.isfinite(z.grad[[0, 2]]).all() and z.grad[1] == 0 and th.grad[1] == 0
    assert torch.isneginf(ls.safe_dot(torch.tensor([0.0, 1.0, 0.0]), th.detach(), 1))


# ----------------------------------------------------------------------------- categorical, bernoulli
def _cases(enum):
    th = torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    th[0, 1] = NEG
    th[2] = NEG  # no feasible outcome (categorical); all bits forced to 0 (bernoulli)
    return [
        Case(th, lambda t: enum(t.shape[-1]), name="neginf"),
        Case(torch.randn(2, 3, 5, dtype=F64), lambda t: enum(t.shape[-1]), name="batch2d"),
        Case(torch.randn(4, dtype=F64), lambda t: enum(t.shape[-1]), name="unbatched"),
    ]


def test_categorical_conformance():
    ran = check_solver("categorical", _cases(one_hot_structures))
    assert ran["sample_frequencies"] == 3 * ND and ran["nll_gradcheck"] == 2


def test_bernoulli_conformance():
    ran = check_solver("bernoulli", _cases(binary_structures))
    assert ran["map_feasible_optimal"] == 3 * ND


def test_categorical_extreme_float32():
    th = torch.tensor([[1e4, -1e4, 0.0], [NEG, 1e4, 1e4]], requires_grad=True)
    s = sg.get_solver("categorical")
    s.log_partition(th).sum().backward()
    assert torch.isfinite(th.grad).all()
    assert torch.equal(s.map(th.detach()), torch.tensor([[1.0, 0, 0], [0, 1, 0]]))  # ties: lowest index


# ----------------------------------------------------------------------------- interface, registry
def test_list_solvers_and_capabilities():
    sol = sg.list_solvers()
    for name in ("bernoulli", "categorical", "chain", "ksubset", "ilp"):
        assert isinstance(sol[name], sg.Capabilities)
    assert sol["chain"].is_exact("sample") and not sol["ilp"].supports("marginals")
    with pytest.raises(sg.DomainError, match="Capabilities.map: expected one of"):
        sg.Capabilities(map="sometimes")
    with pytest.raises(sg.DomainError, match="op: expected one of"):
        sol["chain"].supports("integrate")


def test_capability_error_names_the_solvers_that_can():
    mapper = sg.get_solver(lambda t: (t > 0).to(t.dtype), name="sign")
    with pytest.raises(sg.CapabilityError, match=r"solver 'sign' cannot compute 'marginals'.*solvers that can: .*categorical.*chain"):
        mapper.marginals(torch.randn(3))
    with pytest.raises(NotImplementedError):
        sg.get_solver("ilp", A=torch.ones(1, 3), b=torch.tensor([1])).log_partition(torch.randn(3))


def test_unknown_solver_lists_known_names():
    with pytest.raises(sg.UnknownSolverError, match=r"unknown solver 'chian'; known solvers: .*bernoulli, categorical, chain"):
        sg.get_solver("chian")
    with pytest.raises(ValueError):
        sg.get_solver("chian")
    with pytest.raises(sg.DomainError, match="takes no options"):
        sg.get_solver(sg.get_solver("chain"), backend="torch")
    with pytest.raises(sg.DTypeError, match="expected a solver name"):
        sg.get_solver(3)


def test_theta_dtype_device_checks():
    cat = sg.get_solver("categorical")
    with pytest.raises(sg.DTypeError, match="theta: expected a floating-point tensor.*int64"):
        cat.marginals(torch.arange(3))
    with pytest.raises(sg.DTypeError, match=r"theta\[0\]: expected a floating-point torch.Tensor, got float"):
        cat.marginals([1.0, 2.0])
    with pytest.raises(sg.ShapeError, match=r"theta: expected at least 1 dimensions"):
        cat.marginals(torch.tensor(1.0))


# ----------------------------------------------------------------------------- nll
def test_nll_categorical_value_gradient_gradcheck():
    th = torch.randn(4, 5, dtype=F64, requires_grad=True)
    gold = torch.nn.functional.one_hot(torch.tensor([0, 3, 1, 4]), 5)  # integer gold is cast
    loss = sg.nll(th, gold, "categorical")
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(th, torch.tensor([0, 3, 1, 4]), reduction="none"))
    loss.sum().backward()
    torch.testing.assert_close(th.grad, torch.softmax(th, -1) - gold.double())
    torch.autograd.gradcheck(lambda t: sg.nll(t, gold, "categorical"), (th.detach().requires_grad_(),))


def test_nll_gold_gradient_and_errors():
    th = torch.randn(2, 3, dtype=F64)
    gold = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=F64, requires_grad=True)
    sg.nll(th, gold, "categorical").sum().backward()
    torch.testing.assert_close(gold.grad, -th)
    with pytest.raises(sg.ShapeError, match=r"gold: expected shape \(2, 3\)"):
        sg.nll(th, torch.zeros(3, 3), "categorical")
    with pytest.raises(sg.ShapeError, match="gold: expected the structure of theta"):
        sg.nll(th, (torch.zeros(2, 3), torch.zeros(2, 3)), "categorical")
    with pytest.raises(sg.DeviceError, match="gold is on device meta but theta is on cpu"):
        sg.nll(th, torch.zeros(2, 3, device="meta"), "categorical")
    with pytest.raises(sg.CapabilityError, match="cannot compute 'log_partition'"):
        sg.nll(th, torch.zeros(2, 3), lambda t: t)


# ----------------------------------------------------------------------------- labels
def test_chain_indicators_and_labels_roundtrip():
    labels = torch.tensor([[0, 2, 1, -100], [1, 1, -100, -100]])
    lengths = torch.tensor([3, 2])
    node, edge = sg.chain_indicators(labels, 3, lengths)
    assert node.shape == (2, 4, 3) and edge.shape == (2, 3, 3, 3)
    assert torch.equal(sg.chain_labels(node), torch.tensor([[0, 2, 1, -1], [1, 1, -1, -1]]))
    assert edge[0, 0, 0, 2] == 1 and edge[0, 1, 2, 1] == 1 and edge[0, 2].sum() == 0 and edge[1].sum() == 1
    _, counts = sg.chain_indicators(labels, 3, lengths, shared_edge=True)
    torch.testing.assert_close(counts, edge.sum(1))
    with pytest.raises(sg.DomainError, match=r"labels: expected values in \[0, 3\).*\[5\]"):
        sg.chain_indicators(torch.tensor([[0, 5]]), 3)
    with pytest.raises(sg.DTypeError, match="labels: expected an integer tensor"):
        sg.chain_indicators(torch.tensor([[0.0, 1.0]]), 3)
    with pytest.raises(sg.DomainError, match=r"lengths: expected values in \[0, 2\]"):
        sg.chain_indicators(torch.tensor([[0, 1]]), 3, torch.tensor([3]))


# ----------------------------------------------------------------------------- the conformance suite catches bugs
class _Base(sg.Solver):
    capabilities = sg.Capabilities(map="exact", marginals="exact", log_partition="exact", sample="exact")
    event_ndim = 1

    def _map(self, theta):
        return sg.get_solver("categorical").map(theta)

    def _marginals(self, theta):
        return torch.softmax(theta, -1)

    def _log_partition(self, theta):
        return torch.logsumexp(theta, -1)

    def _sample(self, theta, n, generator):
        return sg.get_solver("categorical").sample(theta, n, generator)


class _WrongMarginals(_Base):
    def _marginals(self, theta):
        return torch.softmax(theta * 1.001, -1)


class _WrongMap(_Base):
    def _map(self, theta):
        return torch.nn.functional.one_hot(theta.argmin(-1), theta.shape[-1]).to(theta.dtype)


class _BiasedSampler(_Base):
    def _sample(self, theta, n, generator):
        return sg.get_solver("categorical").sample(theta * 1.2, n, generator)


class _MutatesTheta(_Base):
    def _log_partition(self, theta):
        out = torch.logsumexp(theta, -1)
        theta.data.mul_(1.0)
        theta.data[..., 0] += 0.0 if theta.requires_grad else 1.0
        return out


class _DropsDtype(_Base):
    def _marginals(self, theta):
        return torch.softmax(theta, -1).float()


class _Undeclared(_Base):
    capabilities = sg.Capabilities(map="exact", marginals="exact", log_partition="exact")

    def _sample(self, theta, n, generator):  # not declared, so the public method must refuse
        return super()._sample(theta, n, generator)


@pytest.mark.parametrize(
    "solver, pattern",
    [
        (_WrongMarginals(), "marginals\\[0\\] vs oracle"),
        (_WrongMap(), "map instance .* score"),
        (_BiasedSampler(), "chi2"),
        (_MutatesTheta(), "mutated|log_partition vs oracle"),
        (_DropsDtype(), "dtype torch.float32, expected theta's torch.float64"),
    ],
)
def test_check_solver_catches(solver, pattern):
    case = Case(torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(5)), lambda t: one_hot_structures(4))
    assert check_solver(_Base(), [case])  # the correct one passes
    with pytest.raises(AssertionError, match=pattern):
        check_solver(solver, [case])


def test_undeclared_operation_raises_capability_error():
    case = Case(torch.randn(2, 3, dtype=F64), lambda t: one_hot_structures(3))
    ran = check_solver(_Undeclared(), [case])
    assert ran["capability_error"] == 1
    with pytest.raises(sg.CapabilityError):
        _Undeclared().sample(torch.randn(3), 2)


def test_brute_force_oracle_closed_forms():
    th = torch.randn(2, 4, dtype=F64)
    bf = BruteForce("bernoulli", lambda t: binary_structures(4))
    torch.testing.assert_close(bf.log_partition(th), torch.nn.functional.softplus(th).sum(-1))
    torch.testing.assert_close(bf.marginals(th), torch.sigmoid(th))


# ----------------------------------------------------------------------------- packaging
def test_solvers_folder_refuses_a_top_level_import():
    r = subprocess.run(
        [sys.executable, "-c", "import solvers"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode != 0 and "must be imported as 'structgrad.solvers'" in r.stderr


def test_import_is_light():
    code = "import sys, structgrad; print(sorted(m for m in ('numba', 'ortools', 'networkx', 'structgrad.solvers.chain') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_brute_force_batched_kwargs_are_explicit():
    """A shared keyword argument whose leading dim happens to equal the batch size is
    passed whole once it is not named in batched_kwargs."""
    seen = []

    def enum(theta_i, weights=None):
        seen.append(tuple(weights.shape))
        return one_hot_structures(theta_i.shape[-1])

    th = torch.randn(3, 3, dtype=F64)
    w = torch.ones(3, 3)
    BruteForce("categorical", enum, batched_kwargs=()).log_partition(th, weights=w)
    assert seen == [(3, 3)] * 3
    seen.clear()
    BruteForce("categorical", enum, batched_kwargs=("weights",)).log_partition(th, weights=w)
    assert seen == [(3,)] * 3
    with pytest.raises(sg.ShapeError, match=r"weights: expected leading dims \(3,\)"):
        BruteForce("categorical", enum, batched_kwargs=("weights",)).log_partition(th, weights=torch.ones(2))


def test_check_real_shared_by_the_objectives_and_solvers():
    import numpy as np

    from structgrad import checks as V

    assert V.check_real(np.float32(0.5), "tau", lo=0.0, lo_open=True) == 0.5
    assert V.check_real(torch.tensor(2.0), "xi", tensors=True) == 2.0
    with pytest.raises(sg.DTypeError, match="tau: expected a real number, got Tensor"):
        V.check_real(torch.tensor(2.0), "tau")
    with pytest.raises(sg.DTypeError, match="flag: expected a real number, got bool"):
        V.check_real(True, "flag")
    with pytest.raises(sg.DomainError, match=r"tau: expected a value > 0.0, got 0.0"):
        V.check_real(0, "tau", lo=0.0, lo_open=True)
    with pytest.raises(sg.DomainError, match="tau: expected a finite number, got inf"):
        V.check_real(float("inf"), "tau")
    assert sg.DPMLoss(10, tau=np.float32(0.25), gamma=0.9, xi=0.0).tau == 0.25
