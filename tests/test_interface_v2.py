"""Interface v2: declared call kwargs, per-instance capabilities, the public validation
layer (structgrad.checks and the Solver hooks), one NaN/+inf policy, validate=False,
second derivatives that are right or refused, and the catalogue without an import cycle."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import structgrad as sg
from structgrad import _catalog, checks
from structgrad.testing import BruteForce, Case, check_solver, labeling_structures, one_hot_structures

F64 = torch.float64
NAN, INF = float("nan"), float("inf")


def _chain_theta(B=2, T=4, C=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, C, generator=g, dtype=F64), torch.randn(C, C, generator=g, dtype=F64)


def _builtins():
    """Every option-free-constructible built-in with a matching θ."""
    th = torch.randn(2, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    return [
        ("categorical", {}, th, {}),
        ("bernoulli", {}, th, {}),
        ("ksubset", {"k": 2}, th, {}),
        ("ilp", {"A": torch.ones(1, 4), "b": torch.tensor([2])}, th, {}),
        ("chain", {}, _chain_theta(), {"lengths": torch.tensor([4, 2])}),
    ]


# ----------------------------------------------------------------------------- declared call kwargs
def test_declarations_of_the_builtins():
    assert sg.get_solver("chain").call_kwargs == ("lengths",)
    assert sg.get_solver("chain").batched_kwargs == ("lengths",)
    for name, opts, _, _ in _builtins():
        s = sg.get_solver(name, **opts)
        assert set(s.batched_kwargs) <= set(s.call_kwargs), name
    assert sg.get_solver("categorical").call_kwargs == ()
    assert sg.get_solver(lambda t: t > 0).call_kwargs is None  # a plain callable sees every keyword


def test_unknown_call_kwarg_is_a_named_type_error():
    chain = sg.get_solver("chain")
    with pytest.raises(sg.UnknownArgumentError, match=r"solver 'chain' got unexpected keyword argument\(s\) 'length'; it accepts: lengths"):
        chain.marginals(_chain_theta(), length=torch.tensor([4, 2]))
    with pytest.raises(TypeError):
        sg.get_solver("categorical").map(torch.randn(3), k=2)
    with pytest.raises(sg.UnknownArgumentError, match="it accepts: none"):
        sg.get_solver("categorical").sample(torch.randn(3), 2, temperature=1.0)
    with pytest.raises(sg.UnknownArgumentError, match="lengths"):  # nll forwards and checks the same way
        sg.nll(_chain_theta(), sg.chain_indicators(torch.zeros(2, 4, dtype=torch.long), 3, shared_edge=True, dtype=F64), "chain", length=1)


def test_unknown_option_is_a_named_type_error():
    with pytest.raises(sg.UnknownArgumentError, match=r"solver 'chain' got unexpected option\(s\) 'foo'; it accepts: backend, validate"):
        sg.get_solver("chain", foo=1)
    with pytest.raises(TypeError, match="'kk'.*it accepts: k, backend, schedule, sampler, validate"):
        sg.get_solver("ksubset", kk=2)
    with pytest.raises(sg.UnknownArgumentError, match="'cheat'"):
        sg.get_solver(lambda t: t > 0, cheat=True)


def test_batched_kwargs_checked_in_the_base_class():
    """A third-party solver gets the leading-dims and device checks by declaring the name."""

    class Weighted(sg.Solver):
        capabilities = sg.Capabilities(marginals="exact")
        call_kwargs = ("weights", "scale")
        batched_kwargs = ("weights",)

        def _marginals(self, theta, weights=None, scale=1.0):
            return torch.softmax(theta * scale + (0 if weights is None else weights.log().to(theta.dtype)), -1)

    s = Weighted()
    th = torch.randn(3, 4)
    s.marginals(th, weights=torch.ones(3, 4), scale=2.0)
    s.marginals(th, weights=torch.ones(3, 4), scale=torch.tensor(2.0))  # scale is not batched: passed whole
    with pytest.raises(sg.ShapeError, match=r"weights: expected leading dims \(3, \.\.\.\) \(the batch shape of theta\), got \(2, 4\)"):
        s.marginals(th, weights=torch.ones(2, 4))
    with pytest.raises(sg.UnknownArgumentError, match="it accepts: weights, scale"):
        s.marginals(th, wieghts=torch.ones(3, 4))
    ran = check_solver(s, [Case(th.double(), lambda t, weights=None, scale=1.0: one_hot_structures(4),
                                kwargs={"weights": torch.ones(3, 4, dtype=F64)})], gradcheck=False)
    assert ran["unknown_kwarg_error"] == 1


def test_case_and_brute_force_read_the_declaration():
    """No guessing from shapes: chain's lengths are per instance because chain says so."""
    chain = sg.get_solver("chain")
    th = _chain_theta(B=3, T=3, C=2)
    enum = lambda t, lengths=None: labeling_structures(3, 2, [(0, 1), (1, 2)], active=int(lengths), shared_edge=True)
    lengths = torch.tensor([3, 1, 0])
    bf = BruteForce(chain, enum)
    assert bf.batched_kwargs == ("lengths",)
    torch.testing.assert_close(bf.log_partition(th, lengths=lengths), chain.log_partition(th, lengths=lengths))
    assert Case(th, enum).batched_kwargs is None  # None = the solver's declaration


# ----------------------------------------------------------------------------- capabilities
def test_capabilities_describe_the_instance():
    numba_ks = sg.get_solver("ksubset", k=2, backend="numba")
    assert numba_ks.capabilities.devices == ("cpu",)
    assert sg.list_solvers()["ksubset"].devices == ("cpu", "cuda")  # the class default
    limited = sg.get_solver("ilp", A=torch.ones(1, 3), b=torch.tensor([1]), time_limit=1.0)
    assert limited.capabilities.map == "approximate"
    assert sg.get_solver("ilp", A=torch.ones(1, 3), b=torch.tensor([1])).capabilities.map == "exact"
    listed = sg.list_solvers()
    for name in ("categorical", "bernoulli"):  # option-free: the listing is never wrong
        assert listed[name] == sg.get_solver(name).capabilities
    assert listed["categorical"].differentiable_marginals and listed["ksubset"].differentiable_marginals
    assert listed["bernoulli"].differentiable_marginals and not listed["chain"].differentiable_marginals
    assert "differentiable marginals" in str(listed["categorical"])
    caps = sg.Capabilities(map="exact")
    assert caps.replace(devices=("cpu",)).devices == ("cpu",) and caps.devices == ("cpu", "cuda")


def test_catalogue_matches_the_classes():
    for name, path in _catalog.BUILTIN_SOLVERS.items():
        module, _, attr = path.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        assert cls.capabilities.operations == _catalog.BUILTIN_OPERATIONS[name], name
    assert set(_catalog.BUILTIN_SOLVERS) == set(_catalog.BUILTIN_OPERATIONS)


def test_missing_operation_imports_nothing():
    """No import cycle and no eager loading: asking for a missing operation reads the catalogue."""
    with open(sg.solver.__file__) as f:
        src = f.read()
    assert not re.search(r"^\s*(from \.registry|from \. import registry|import structgrad\.registry|from structgrad\.registry)", src, re.M)
    code = (
        "import sys, torch, structgrad as sg\n"
        "s = sg.MapSolver(lambda t: (t > 0).to(t.dtype), name='sign')\n"
        "try:\n    s.marginals(torch.randn(3))\nexcept sg.CapabilityError as e:\n    print(e)\n"
        "print(sorted(m for m in sys.modules if m.startswith('structgrad.solvers.') or m in ('numba', 'ortools')))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert r.returncode == 0, r.stderr
    msg, mods = r.stdout.strip().splitlines()
    assert "solvers that can: bernoulli, categorical, chain, ksubset" in msg
    assert mods == "[]"


# ----------------------------------------------------------------------------- validation layer
@pytest.mark.parametrize("name,opts,theta,kw", _builtins(), ids=[b[0] for b in _builtins()])
@pytest.mark.parametrize("bad", [NAN, INF], ids=["nan", "posinf"])
def test_one_score_policy_for_every_builtin(name, opts, theta, kw, bad):
    s = sg.get_solver(name, **opts)
    parts = [p.clone() for p in checks.leaves(theta)]
    parts[0].view(-1)[1] = bad
    poisoned = tuple(parts) if isinstance(theta, tuple) else parts[0]
    for op in s.capabilities.operations:
        call = (lambda t: s.sample(t, 2, **kw)) if op == "sample" else (lambda t: getattr(s, op)(t, **kw))
        label = "NaN" if bad != bad else r"\+inf"
        with pytest.raises(sg.DomainError, match=rf"theta(\[0\])?: expected scores that are finite or -inf \(impossible\), got 1 {label}"):
            call(poisoned)
    # -inf is "impossible", never an error
    ok = [p.clone() for p in checks.leaves(theta)]
    ok[0].view(-1)[1] = -INF
    s.map(tuple(ok) if isinstance(theta, tuple) else ok[0], **kw)


def test_validate_false_skips_the_synchronising_checks():
    fast = sg.get_solver("categorical", validate=False)
    assert fast.validate is False and sg.get_solver("categorical").validate is True
    out = fast.log_partition(torch.tensor([0.0, NAN]))  # not checked: the caller promised clean input
    assert torch.isnan(out)
    with pytest.raises(sg.DTypeError):  # structural checks still run
        fast.marginals(torch.arange(3))
    with pytest.raises(sg.DTypeError, match="validate: expected True or False"):
        sg.get_solver("categorical", validate="no")
    chain = sg.get_solver("chain", validate=False)
    th = _chain_theta()
    torch.testing.assert_close(chain.log_partition(th, lengths=torch.tensor([4, 2])),
                               sg.get_solver("chain").log_partition(th, lengths=torch.tensor([4, 2])))


def test_checks_module_is_public_and_reusable():
    assert checks.check_choice("rows", ("rows", "columns"), "schedule") == "rows"
    with pytest.raises(sg.DomainError, match=r"schedule: expected one of 'rows', 'columns', got 'diagonal'"):
        checks.check_choice("diagonal", ("rows", "columns"), "schedule")
    flat, batch = checks.flatten_batch(torch.zeros(2, 3, 4, 5), 2)
    assert flat.shape == (6, 4, 5) and batch == (2, 3)
    assert torch.equal(checks.finite_or_zero(torch.tensor([1.0, -INF, INF])), torch.tensor([1.0, 0.0, 0.0]))
    assert checks.NEG_INF == -INF
    with pytest.raises(sg.UnknownArgumentError, match="solver 'mine' got unexpected keyword argument\\(s\\) 'b'; it accepts: a"):
        checks.check_call_kwargs({"b": 1}, ("a",), "'mine'")
    checks.check_scores((torch.zeros(2), torch.full((2,), -INF)), ["x", "y"])
    with pytest.raises(sg.DomainError, match=r"y: expected scores .* got 2 NaN \(first at index \(0,\)\)"):
        checks.check_scores((torch.zeros(2), torch.full((2,), NAN)), ["x", "y"])


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_chain_lengths_of_any_integer_dtype(dtype):
    chain = sg.get_solver("chain")
    th = _chain_theta()
    ref = chain.marginals(th, lengths=torch.tensor([4, 2]))
    out = chain.marginals(th, lengths=torch.tensor([4, 2], dtype=dtype))
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)
    z = chain.map(th, lengths=torch.tensor([3, 0], dtype=dtype))
    assert z[0][1].sum() == 0


# ----------------------------------------------------------------------------- defects found by probing
def test_custom_solver_outputs_of_the_wrong_kind_are_named():
    th = torch.randn(2, 3)
    for ret, what in [
        (lambda t: "zeros", "returned str as z"),
        (lambda t: torch.zeros(2, 3, device="meta"), "meta tensor"),
        (lambda t: np.array([["a", "b", "c"]] * 2), "dtype <U1"),
        (lambda t: torch.zeros(2, 3, dtype=torch.complex64), "complex64"),
        (lambda t: object(), "returned object"),
    ]:
        with pytest.raises(sg.SolverOutputError, match=what):
            sg.get_solver(ret, name="bad").map(th)


def test_chain_indicators_dtype_must_be_a_float_dtype():
    with pytest.raises(sg.DTypeError, match="dtype: expected a floating torch.dtype.*'float'"):
        sg.chain_indicators(torch.zeros(1, 3, dtype=torch.long), 2, dtype="float")
    with pytest.raises(sg.DTypeError, match="int64"):
        sg.chain_indicators(torch.zeros(1, 3, dtype=torch.long), 2, dtype=torch.int64)
    with pytest.raises(sg.DTypeError, match="node: expected a tensor"):
        sg.chain_labels([[1, 0]])


# ----------------------------------------------------------------------------- second derivatives
def test_nll_hessian_vector_product_matches_plain_torch():
    th = torch.tensor([[0.3, -1.2, 2.0]], dtype=F64, requires_grad=True)
    gold = torch.tensor([[0.0, 1.0, 0.0]], dtype=F64)
    v = torch.tensor([[1.0, -2.0, 0.5]], dtype=F64)

    def hvp(f):
        (g,) = torch.autograd.grad(f(th).sum(), th, create_graph=True)
        (h,) = torch.autograd.grad((g * v).sum(), th)
        return h

    ours = hvp(lambda t: sg.nll(t, gold, "categorical") ** 2)
    plain = hvp(lambda t: (torch.logsumexp(t, -1) - (gold * t).sum(-1)) ** 2)
    torch.testing.assert_close(ours, plain)


def test_second_derivatives_refused_where_marginals_are_not_differentiable():
    node, edge = _chain_theta()
    node.requires_grad_(True)
    gold = sg.chain_indicators(torch.zeros(2, 4, dtype=torch.long), 3, shared_edge=True, dtype=F64)
    loss = sg.nll((node, edge), gold, "chain").sum()
    with pytest.raises(sg.CapabilityError, match=r"second derivatives of nll .* solver 'chain' declares capabilities.differentiable_marginals=False"):
        torch.autograd.grad(loss, node, create_graph=True)
    (g,) = torch.autograd.grad(sg.nll((node, edge), gold, "chain").sum(), node)  # first derivatives are fine
    assert torch.isfinite(g).all()


def test_unshare_gives_shared_leaves_a_per_instance_layout():
    node, edge = _chain_theta(B=3, T=5, C=2)
    chain = sg.get_solver("chain")
    u_node, u_edge = chain.unshare((node, edge))       # (C, C) -> (*b, T-1, C, C): replicated over positions
    assert u_node is node and u_edge.shape == (3, 4, 2, 2) and u_edge.data_ptr() == edge.data_ptr()
    z = chain.map((node, u_edge.contiguous()))
    counts = chain.map((node, edge))[1]
    torch.testing.assert_close(z[1].sum(-3), counts)    # the fold: per-position indicators sum to the counts
    shared = torch.randn(4, 2, 2, dtype=F64)              # (T-1, C, C) -> (*b, T-1, C, C), no replication dims
    assert chain.unshare((node, shared))[1].shape == (3, 4, 2, 2)
    th = torch.randn(3, 4)                                # nothing shared: unchanged
    assert sg.get_solver("categorical").unshare(th) is th


def test_help_of_get_solver_lists_every_builtin():
    doc = sg.get_solver.__doc__
    for name in _catalog.BUILTIN_SOLVERS:
        assert f"``{name}``" in doc, name
