"""The three ways to plug in a custom MAP solver.

1. a plain batched callable θ -> z (wrapped by MapSolver wherever a solver is expected);
2. a per-instance NumPy function adapted by ``structgrad.per_instance_solver``;
3. a Solver subclass, registered with ``register_solver`` or advertised through the
   ``structgrad.solvers`` entry-point group.
"""

from __future__ import annotations

import sys
import textwrap
import threading
import time
import uuid

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import structgrad as sg
from structgrad.errors import (
    CapabilityError,
    DomainError,
    DTypeError,
    ShapeError,
    SolverOutputError,
    UnknownSolverError,
)
from structgrad.registry import solvers_supporting
from structgrad.solver import Capabilities, MapSolver, Solver
from structgrad.testing import BruteForce, Case, check_solver, one_hot_structures, subset_structures

ND = 1 + torch.cuda.is_available()  # check_solver runs every check on each available device


def _theta(shape, seed, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def topk_batched(theta: torch.Tensor, k: int = 2) -> torch.Tensor:
    """A batched custom MAP solver: the k largest scores of each row."""
    idx = theta.topk(k, dim=-1).indices
    return torch.zeros_like(theta).scatter(-1, idx, 1.0)


def topk_one(theta_i: np.ndarray, k: int = 2) -> np.ndarray:
    """A per-instance NumPy MAP solver: the k largest scores."""
    z = np.zeros(theta_i.shape, dtype=np.float64)
    z[np.argsort(-theta_i, kind="stable")[: int(k)]] = 1.0
    return z


# ============================================================================ 1. plain callables
def test_plain_callable_is_a_map_solver_and_passes_check_solver():
    solver = sg.get_solver(topk_batched)
    assert isinstance(solver, MapSolver) and solver.name == "topk_batched"
    assert solver.capabilities.operations == ("map",)
    ran = check_solver(topk_batched, [Case(_theta((2, 3, 6), 0), enumerate=lambda th: subset_structures(6, 2))])
    assert ran["map_feasible_optimal"] == ND and ran["capability_error"] == 3


def test_plain_callable_gets_keyword_arguments_and_works_with_brute_force():
    solver = sg.get_solver(topk_batched)
    theta = _theta((4, 5), 1)
    z = solver.map(theta, k=3)
    assert torch.equal(z.sum(-1), torch.full((4,), 3.0, dtype=torch.float64))
    oracle = BruteForce(topk_batched, lambda th, k: subset_structures(5, k))
    assert torch.allclose((z * theta).sum(-1), oracle.map_value(theta, k=3))


def test_plain_callable_as_solver_argument_of_nll_needs_log_partition():
    theta = _theta((2, 4), 2)
    gold = torch.eye(4, dtype=torch.float64)[:2]
    with pytest.raises(CapabilityError, match=r"cannot compute 'log_partition'.*solvers that can: .*categorical"):
        sg.nll(theta, gold, lambda th: torch.nn.functional.one_hot(th.argmax(-1), 4).to(th.dtype))


@pytest.mark.parametrize(
    "bad,pattern",
    [
        (lambda th: th[..., :-1].clone().zero_(), r"returned z of shape \(3, 4\); expected the shape of theta, \(3, 5\)"),
        (lambda th: torch.full_like(th, 0.5), r"non-binary values in z \(e\.g\. \[0\.5"),
        (lambda th: torch.full_like(th, 2.0), r"non-binary values in z \(e\.g\. \[2\.0"),
        (lambda th: torch.full_like(th, float("nan")), r"non-binary values"),
        (lambda th: (torch.zeros_like(th), torch.zeros_like(th)), r"returned a tuple for theta given as a tensor"),
        (lambda th: {"z": th}, r"returned dict as z; expected a tensor or array of shape \(3, 5\)"),
    ],
    ids=["shape", "half", "two", "nan", "tuple", "dict"],
)
def test_plain_callable_bad_outputs_raise(bad, pattern):
    with pytest.raises(SolverOutputError, match=pattern):
        sg.get_solver(bad).map(_theta((3, 5), 3))


@pytest.mark.parametrize(
    "convert",
    [
        lambda z: z.float(),
        lambda z: z.bool(),
        lambda z: z.long(),
        lambda z: z.numpy(),
        lambda z: z.numpy().astype(np.int8),
        lambda z: z.clone().requires_grad_(True),
    ],
    ids=["float32", "bool", "int64", "numpy", "numpy-int8", "requires-grad"],
)
def test_plain_callable_other_dtypes_are_converted(convert):
    theta = _theta((3, 5), 4)
    z = sg.get_solver(lambda th: convert(topk_batched(th))).map(theta)
    assert isinstance(z, torch.Tensor) and z.dtype == torch.float64 and not z.requires_grad
    assert torch.equal(z, topk_batched(theta))


def test_plain_callable_with_tuple_theta():
    def per_leaf_argmax(theta):
        return tuple(torch.nn.functional.one_hot(t.argmax(-1), t.shape[-1]).to(t.dtype) for t in theta)

    theta = (_theta((2, 3), 5), _theta((2, 4), 6))
    z = sg.get_solver(per_leaf_argmax).map(theta)
    assert isinstance(z, tuple) and z[0].shape == (2, 3) and z[1].shape == (2, 4)
    with pytest.raises(SolverOutputError, match=r"returned 1 parts, expected 2"):
        sg.get_solver(lambda th: (th[0],)).map(theta)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_plain_callable_output_on_another_device_is_moved_back():
    theta = _theta((3, 5), 7)
    z = sg.get_solver(lambda th: topk_batched(th).cuda()).map(theta)
    assert z.device.type == "cpu"
    z = sg.get_solver(lambda th: topk_batched(th).cpu().float()).map(theta.cuda())
    assert z.device.type == "cuda" and z.dtype == torch.float64


# ============================================================================ 2. per-instance adapter
def test_per_instance_solver_passes_check_solver():
    solver = sg.per_instance_solver(topk_one)
    assert isinstance(solver, sg.PerInstanceSolver) and solver.name == "topk_one"
    theta = _theta((2, 3, 6), 8)
    ran = check_solver(solver, [Case(theta, enumerate=lambda th: subset_structures(6, 2))])
    assert ran["map_feasible_optimal"] == ND
    assert torch.equal(solver.map(theta), topk_batched(theta))


def test_per_instance_batched_kwargs_are_indexed_per_instance():
    solver = sg.per_instance_solver(topk_one, batched_kwargs=("k",))
    assert solver.batched_kwargs == ("k",)
    theta = _theta((3, 5), 9)
    k = torch.tensor([1, 2, 4])
    z = solver.map(theta, k=k)
    assert torch.equal(z.sum(-1), k.to(theta.dtype))
    for per_instance in (k.numpy(), [1, 2, 4]):  # arrays and nested lists work too
        assert torch.equal(solver.map(theta, k=per_instance), z)
    assert torch.equal(sg.per_instance_solver(topk_one, batched_kwargs=("k",), threads=2).map(theta, k=k), z)
    assert torch.equal(solver.map(theta).sum(-1), torch.full((3,), 2.0, dtype=torch.float64))  # omitted: fn's default
    case = Case(theta, enumerate=lambda th, k: subset_structures(5, int(k)), kwargs={"k": k})
    assert check_solver(solver, [case])["map_feasible_optimal"] == ND
    # two batch dims: the leading two dims of k are the batch, the rest goes to fn
    got = []

    def spy(th, w):
        got.append(w.shape)
        return np.zeros_like(th)

    sg.per_instance_solver(spy, batched_kwargs="w").map(_theta((2, 3, 4), 9), w=torch.zeros(2, 3, 7))
    assert got == [(7,)] * 6


def test_per_instance_kwargs_not_named_are_shared_whole():
    """A shared matrix A (m, n) with batch shape (m,) reaches fn whole, never one row per instance."""
    seen = []

    def masked_argmax(th, A, k=1):
        seen.append((A.shape, A.flags.writeable, type(k)))
        allowed = A.sum(0) > 0  # columns that some row of A allows
        z = np.zeros_like(th)
        z[np.argmax(np.where(allowed, th, -np.inf))] = 1
        return z

    m, n = 3, 3
    A = torch.tensor([[0, 1, 0], [0, 0, 0], [0, 0, 1]])  # (m, n) == theta's batch + event shape
    theta = torch.tensor([[5.0, 1.0, 2.0], [0.0, 3.0, 1.0], [9.0, -1.0, -2.0]])
    solver = sg.per_instance_solver(masked_argmax)
    z = solver.map(theta, A=A, k=torch.tensor(2))
    assert seen == [((m, n), False, np.ndarray)] * m  # before: one row (n,) of A per instance
    assert torch.equal(z, torch.tensor([[0.0, 0, 1], [0, 1, 0], [0, 1, 0]]))
    seen.clear()
    solver.map(theta, A=A.numpy())
    assert seen == [((m, n), False, int)] * m
    # naming A as per instance would need leading dims (3,), which it has: then rows are sliced
    seen.clear()
    sg.per_instance_solver(masked_argmax, batched_kwargs=("A",)).map(theta, A=A)
    assert seen == [((n,), False, int)] * m


def test_per_instance_kwargs_cannot_be_modified_by_fn():
    shared_np = np.arange(4.0)
    shared_t = torch.arange(4.0)
    per_np = np.zeros((2, 4))
    per_t = torch.zeros(2, 4)
    before = [shared_np.copy(), shared_t.clone(), per_np.copy(), per_t.clone()]
    targets = {"shared_np": shared_np, "shared_t": shared_t, "per_np": per_np, "per_t": per_t}
    for name in targets:

        def vandal(th, name=name, **kw):
            kw[name][..., 0] = 99.0
            return np.zeros_like(th)

        solver = sg.per_instance_solver(vandal, batched_kwargs=("per_np", "per_t"))
        with pytest.raises(ValueError, match="read-only"):
            solver.map(_theta((2, 4), 9), **targets)
    for a, b in zip(targets.values(), before):
        assert (a == b).all()
    assert shared_np.flags.writeable and per_np.flags.writeable  # the caller's own arrays keep their flags


@pytest.mark.parametrize(
    "theta_shape,value,pattern",
    [
        ((3, 5), torch.tensor([1, 2]), r"k: expected leading dims \(3, \.\.\.\) \(the batch shape of theta.*got \(2,\)"),
        ((2, 3, 5), torch.tensor([1, 2, 3]), r"k: expected leading dims \(2, 3 \.\.\.\) .* got \(3,\)"),
        ((3, 5), 2, r"k: expected leading dims \(3, \.\.\.\) .*got \(\)"),
        ((3, 5), [[1], [2, 3], []], r"k: expected an array with leading dims \(3,\) .*got list"),
    ],
    ids=["short", "two-batch-dims", "scalar", "ragged"],
)
def test_per_instance_batched_kwarg_with_wrong_shape_raises(theta_shape, value, pattern):
    solver = sg.per_instance_solver(topk_one, batched_kwargs=("k",))
    with pytest.raises(ShapeError, match=pattern):
        solver.map(_theta(theta_shape, 9), k=value)


def test_per_instance_threads_run_concurrently_and_agree():
    seen = set()
    lock = threading.Lock()

    def slow_sign(th):
        with lock:
            seen.add(threading.get_ident())
        time.sleep(0.01)  # releases the GIL, like OR-Tools or SciPy would
        return (th > 0).astype(np.float32)

    theta = _theta((8, 4), 10)
    serial = sg.per_instance_solver(slow_sign).map(theta)
    assert seen == {threading.get_ident()}
    seen.clear()
    par = sg.per_instance_solver(slow_sign, threads=4).map(theta)
    assert len(seen) >= 2 and threading.get_ident() not in seen
    assert torch.equal(serial, par) and torch.equal(par, (theta > 0).double())


def test_per_instance_receives_read_only_numpy_in_its_dtype():
    got = []

    def spy(th):
        got.append((type(th), th.dtype, th.shape, th.flags.writeable))
        return np.zeros_like(th)

    for dtype, np_dtype in [(torch.float64, np.float64), (torch.float32, np.float32), (torch.bfloat16, np.float32)]:
        got.clear()
        z = sg.per_instance_solver(spy).map(_theta((2, 3), 11).to(dtype))
        assert z.dtype == dtype and z.shape == (2, 3)
        assert got == [(np.ndarray, np.dtype(np_dtype), (3,), False)] * 2

    def vandal(th):
        th[0] = 1.0
        return th

    theta = _theta(3, 12)
    before = theta.clone()
    with pytest.raises(ValueError, match="read-only"):
        sg.per_instance_solver(vandal).map(theta)
    assert torch.equal(theta, before)
    ident = sg.per_instance_solver(lambda th: th).map(torch.tensor([[1.0, 0.0]]))  # returning the input is fine
    assert torch.equal(ident, torch.tensor([[1.0, 0.0]]))


def test_per_instance_tuple_theta_with_a_shared_leaf():
    def best_pair(theta):
        node, edge = theta  # node (n,), edge (n, n) shared by the batch
        score = node[:, None] + node[None, :] + edge
        np.fill_diagonal(score, -np.inf)
        i, j = np.unravel_index(np.argmax(score), score.shape)
        zn = np.zeros_like(node)
        zn[[i, j]] = 1
        ze = np.zeros_like(edge)
        ze[i, j] = 1
        return zn, ze

    solver = sg.per_instance_solver(best_pair, event_ndim=(1, 2))
    node, edge = _theta((3, 4), 13), _theta((4, 4), 14)
    zn, ze = solver.map((node, edge))
    assert zn.shape == (3, 4) and ze.shape == (3, 4, 4)
    assert torch.equal(zn.sum(-1), torch.full((3,), 2.0, dtype=torch.float64))
    assert torch.equal(ze.sum((-1, -2)), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ShapeError, match="batch shape"):
        solver.map((node, _theta((2, 4, 4), 15)))


def _second_call_too_long():
    calls = []

    def fn(th):
        calls.append(1)
        return np.zeros(th.shape[0] + (len(calls) == 2))

    return fn


@pytest.mark.parametrize(
    "make,pattern",
    [
        (_second_call_too_long, r"returned z of shape \(5,\); expected the shape of theta, \(4,\) \(instance \(1,\) of batch shape \(2,\)\)"),
        (lambda: lambda th: np.full(th.shape, 0.25), r"non-binary values in z .*\(instance \(0,\) of batch shape \(2,\)\)"),
        (lambda: lambda th: [0.0] * th.shape[0], r"returned a list for theta given as a tensor"),
    ],
    ids=["shape", "non-binary", "list"],
)
def test_per_instance_bad_outputs_name_the_instance(make, pattern):
    with pytest.raises(SolverOutputError, match=pattern):
        sg.per_instance_solver(make()).map(_theta((2, 4), 16))


def test_per_instance_options():
    assert sg.per_instance_solver(topk_one, exact=False).capabilities.map == "approximate"
    counts = sg.per_instance_solver(lambda th: np.full(th.shape, 3.0), binary=False).map(torch.zeros(2, 3))
    assert torch.equal(counts, torch.full((2, 3), 3.0))
    assert sg.per_instance_solver(topk_one).map(torch.zeros(0, 5)).shape == (0, 5)
    assert sg.per_instance_solver(topk_one, name="mine").name == "mine"
    assert "PerInstanceSolver(fn='topk_one'" in repr(sg.per_instance_solver(topk_one))
    with pytest.raises(CapabilityError, match="solvers that can"):
        sg.per_instance_solver(topk_one).marginals(torch.zeros(3))


@pytest.mark.parametrize(
    "kwargs,exc,pattern",
    [
        (dict(fn=3), DTypeError, r"fn: expected a callable theta_i -> z_i .*got int"),
        (dict(fn=topk_one, threads=0), DomainError, r"threads: expected an integer >= 1, got 0"),
        (dict(fn=topk_one, threads="4"), DTypeError, r"threads: expected an integer, got str"),
        (dict(fn=topk_one, threads=True), DTypeError, r"threads: expected an integer, got bool"),
        (dict(fn=topk_one, event_ndim=-1), DomainError, r"event_ndim: expected an integer >= 0, got -1"),
        (dict(fn=topk_one, event_ndim="x"), DTypeError, r"event_ndim: expected an integer, got str"),
        (dict(fn=topk_one, event_ndim=(1, -2)), DomainError, r"event_ndim\[1\]: expected an integer >= 0, got -2"),
        (dict(fn=topk_one, event_ndim=()), DomainError, r"event_ndim: expected an integer >= 0 or a non-empty tuple"),
        (dict(fn=topk_one, batched_kwargs=3), DTypeError, r"batched_kwargs: expected a tuple of keyword-argument names, got int"),
        (dict(fn=topk_one, batched_kwargs=("k", 1)), DTypeError, r"batched_kwargs: expected keyword-argument names \(identifiers\), got 1"),
        (dict(fn=topk_one, batched_kwargs=("not a name",)), DTypeError, r"batched_kwargs: expected keyword-argument names .*'not a name'"),
        (dict(fn=topk_one, batched_kwargs=("k", "k")), DomainError, r"batched_kwargs: expected distinct names, got \('k', 'k'\)"),
    ],
)
def test_per_instance_bad_options(kwargs, exc, pattern):
    fn = kwargs.pop("fn")
    with pytest.raises(exc, match=pattern):
        sg.per_instance_solver(fn, **kwargs)


def test_per_instance_bad_theta():
    solver = sg.per_instance_solver(topk_one, event_ndim=2)
    with pytest.raises(ShapeError, match=r"theta: expected at least 2 dimensions"):
        solver.map(torch.zeros(3))
    with pytest.raises(DTypeError, match="floating-point"):
        solver.map(torch.zeros(2, 3, dtype=torch.long))


@settings(max_examples=20, deadline=None)
@given(batch=st.lists(st.integers(0, 3), min_size=0, max_size=2), n=st.integers(1, 6), seed=st.integers(0, 1000), threads=st.sampled_from([None, 2]))
def test_per_instance_matches_batched_reference(batch, n, seed, threads):
    theta = _theta(tuple(batch) + (n,), seed)
    solver = sg.per_instance_solver(lambda th: np.eye(n)[np.argmax(th)], threads=threads)
    z = solver.map(theta)
    ref = torch.nn.functional.one_hot(theta.argmax(-1), n).to(theta.dtype) if theta.numel() else torch.zeros_like(theta)
    assert z.shape == theta.shape and torch.equal(z, ref)


def test_per_instance_ilp_over_threads():
    """A per-instance function calling OR-Tools (which releases the GIL) over two threads."""
    from ortools.sat.python import cp_model

    def pick_two(th):
        m = cp_model.CpModel()
        x = [m.new_bool_var("") for _ in range(len(th))]
        m.add(sum(x) == 2)
        m.maximize(sum(int(round(1000 * t)) * v for t, v in zip(th, x)))
        s = cp_model.CpSolver()
        s.parameters.num_workers = 1
        s.solve(m)
        return np.array([s.value(v) for v in x])

    theta = _theta((6, 5), 17)
    z = sg.per_instance_solver(pick_two, threads=2).map(theta)
    assert torch.equal(z, topk_batched(theta))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_per_instance_cuda_theta():
    theta = _theta((3, 5), 18).cuda()
    z = sg.per_instance_solver(topk_one).map(theta)
    assert z.device.type == "cuda" and torch.equal(z.cpu(), topk_batched(theta.cpu()))


# ============================================================================ 3. Solver subclasses
class TopK(Solver):
    """A MAP-only Solver subclass: the k largest scores of each row."""

    capabilities = Capabilities(map="exact")
    event_ndim = 1

    def __init__(self, k: int = 2):
        self.k = k

    def _map(self, theta):
        return topk_batched(theta.detach(), self.k)


def test_register_solver_subclass():
    name = f"test_topk_{uuid.uuid4().hex[:8]}"
    try:
        assert sg.register_solver(name)(TopK) is TopK
        solver = sg.get_solver(name, k=3)
        assert isinstance(solver, TopK) and solver.name == name and solver.k == 3
        assert sg.list_solvers()[name] == TopK.capabilities
        assert name in solvers_supporting("map") and name not in solvers_supporting("marginals")
        theta = _theta((2, 6), 19)
        check_solver(solver, [Case(theta, enumerate=lambda th: subset_structures(6, 3))])
        with pytest.raises(DomainError, match=f"solver '{name}' is already registered"):
            sg.register_solver(name, TopK)
        sg.register_solver(name, lambda **kw: TopK(k=1), overwrite=True)
        assert torch.equal(sg.get_solver(name).map(theta).sum(-1), torch.ones(2, dtype=torch.float64))
    finally:
        sg.unregister_solver(name)
    with pytest.raises(UnknownSolverError, match=f"unknown solver '{name}'"):
        sg.get_solver(name)
    with pytest.raises(DomainError, match="already registered"):
        sg.register_solver("ilp", TopK)


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A real entry-point plugin: a module file plus a *.dist-info with entry_points.txt on sys.path."""
    uid = uuid.uuid4().hex[:8]
    mod, name = f"sg_plugin_{uid}", f"plugin_argmax_{uid}"
    (tmp_path / f"{mod}.py").write_text(
        textwrap.dedent(
            """
            import torch
            from structgrad.solver import Capabilities, Solver

            class PluginArgmax(Solver):
                '''One-hot argmax, MAP only, shipped by a third-party package.'''
                capabilities = Capabilities(map="exact")
                event_ndim = 1

                def _map(self, theta):
                    idx = theta.detach().argmax(-1)
                    return torch.nn.functional.one_hot(idx, theta.shape[-1]).to(theta.dtype)
            """
        )
    )
    dist = tmp_path / f"sg_plugin_{uid}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: sg-plugin-{uid}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        f"[structgrad.solvers]\n{name} = {mod}:PluginArgmax\nbroken_{uid} = {mod}_missing:Nothing\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, uid
    sys.modules.pop(mod, None)


def test_entry_point_plugin_is_found(plugin):
    name, uid = plugin
    solver = sg.get_solver(name)
    assert type(solver).__name__ == "PluginArgmax" and solver.name == name
    theta = _theta((3, 4), 20)
    check_solver(solver, [Case(theta, enumerate=lambda th: one_hot_structures(4))])
    listed = sg.list_solvers()
    assert listed[name] == Capabilities(map="exact")
    assert listed[f"broken_{uid}"] is None  # a broken plugin does not break the listing
    assert name in solvers_supporting("map")
    with pytest.raises(UnknownSolverError, match=f"known solvers: .*{name}"):
        sg.get_solver("no_such_solver_anywhere")
    with pytest.raises(ModuleNotFoundError):
        sg.get_solver(f"broken_{uid}")
    with pytest.raises(CapabilityError, match=r"cannot compute 'marginals'.*solvers that can: .*categorical"):
        solver.marginals(theta)
