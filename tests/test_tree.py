"""The ``tree`` solver: conformance against enumeration on small forests, agreement
with ``chain`` on a path, numerics, and the graph and input errors."""

from __future__ import annotations

import random

import networkx as nx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import structgrad as sg
from structgrad.logspace import safe_dot
from structgrad.testing import BruteForce, Case, check_solver, labeling_structures

F64 = torch.float64
BACKENDS = ["torch", "numba"]
ND = 1 + torch.cuda.is_available()  # check_solver runs every check on each available device


def tree_enum(G):
    edges, N = list(G.edges()), G.number_of_nodes()
    return lambda theta: labeling_structures(N, theta[0].shape[-1], edges)


def make(G, B=(2,), C=3, shared=False, scale=1.0, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    N, E = G.number_of_nodes(), G.number_of_edges()
    node = torch.randn(*B, N, C, generator=g, dtype=dtype) * scale
    edge = torch.randn(*(() if shared else B), E, C, C, generator=g, dtype=dtype) * scale
    return node, edge


def shuffled(G, seed):
    """The same forest with nodes inserted in a random order and each edge listed in a
    random orientation (so edges come as (parent, child) and as (child, parent))."""
    rng = random.Random(seed)
    nodes = list(G.nodes())
    rng.shuffle(nodes)
    edges = [(u, v) if rng.random() < 0.5 else (v, u) for u, v in G.edges()]
    rng.shuffle(edges)
    H = nx.Graph()
    H.add_nodes_from(nodes)
    H.add_edges_from(edges)
    return H


def random_forest(N, components, seed):
    """A random forest on 0..N−1 with the given number of components."""
    T = nx.random_labeled_tree(N, seed=seed) if N > 1 else nx.empty_graph(1)
    edges = list(T.edges())
    random.Random(seed).shuffle(edges)
    F = nx.Graph()
    F.add_nodes_from(range(N))
    F.add_edges_from(edges[: N - components])
    return shuffled(F, seed + 1)


def score(z, theta):
    """⟨z, θ⟩ per instance (0·(−inf) = 0; a shared edge broadcast)."""
    (zn, ze), (n, e) = z, theta
    return safe_dot(zn, n.expand_as(zn), 2) + safe_dot(ze, e.expand_as(ze), 3)


# ----------------------------------------------------------------------------- conformance
GRAPHS = {
    "single-node": nx.empty_graph(1),
    "path": shuffled(nx.path_graph(5), 1),
    "star": shuffled(nx.star_graph(4), 2),
    "components": random_forest(6, 3, 3),
    "isolated": nx.empty_graph(3),
    "deep": shuffled(nx.balanced_tree(2, 2), 4),
}
CASES = [
    ("single-node", dict(C=4)),
    ("path", dict()),
    ("path", dict(shared=True, B=(3,))),
    ("star", dict(scale=30.0)),
    ("components", dict(C=2, B=(2, 2))),
    ("components", dict(C=2, shared=True)),
    ("isolated", dict(B=())),
    ("deep", dict(C=2)),
]


def test_cases_cover_both_edge_orientations():
    flips = [sg.get_solver("tree", graph=GRAPHS[n]).plan.flip.tolist() for n, _ in CASES]
    assert any(True in f for f in flips) and any(False in f for f in flips)


@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{'-'.join(f'{k}{v}' for k, v in kw.items())}" for n, kw in CASES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_check_solver(name, kw, backend):
    G = GRAPHS[name]
    tree = sg.get_solver("tree", graph=G, backend=backend)
    theta = make(G, **kw)
    ran = check_solver(tree, [Case(theta, tree_enum(G), name=name)], num_samples=2000)
    assert ran["log_partition_oracle"] == ran["marginals_oracle"] == ran["map_feasible_optimal"] == ND
    assert ran["sample_frequencies"] == ND and ran["nll_gradcheck"] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_solver_neg_inf_and_infeasible(backend):
    G = GRAPHS["components"]
    tree = sg.get_solver("tree", graph=G, backend=backend)
    node, edge = make(G, B=(3,), C=3, seed=5)
    node[0, 2, 1] = float("-inf")  # a forbidden label
    edge[0, 1, :, 2] = float("-inf")  # a forbidden pair
    edge[1, 0] = float("-inf")  # instance 1: one edge with no allowed pair: infeasible
    edge[2, 2, 0, :] = float("-inf")
    check_solver(tree, [Case((node, edge), tree_enum(G), name="neginf")], num_samples=2000)
    lz, (mn, me) = tree.log_partition_and_marginals((node, edge))
    assert torch.isneginf(lz[1]) and torch.isfinite(lz[[0, 2]]).all()
    assert (mn[1] == 0).all() and (me[1] == 0).all()  # the whole instance, every component
    zn, ze = tree.map((node, edge))
    assert (zn[1] == 0).all() and (ze[1] == 0).all() and (zn[0].sum(-1) == 1).all()
    sn, se = tree.sample((node, edge), 20, generator=torch.Generator().manual_seed(0))
    assert (sn[:, 1] == 0).all() and (se[:, 1] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=20, deadline=None)
@given(
    N=st.integers(1, 6),
    data=st.data(),
    C=st.integers(1, 3),
    shared=st.booleans(),
    scale=st.sampled_from([0.5, 4.0, 80.0]),
    seed=st.integers(0, 2**16),
)
def test_property_against_enumeration(N, data, C, shared, scale, seed, backend):
    G = random_forest(N, data.draw(st.integers(1, N)), seed)
    tree = sg.get_solver("tree", graph=G, backend=backend)
    theta = make(G, B=(2,), C=C, shared=shared, scale=scale, seed=seed)
    oracle = BruteForce(tree, tree_enum(G))
    lz, (mn, me) = tree.log_partition_and_marginals(theta)
    torch.testing.assert_close(lz, oracle.log_partition(theta), atol=1e-9, rtol=1e-9)
    rn, re = oracle.marginals(theta)
    torch.testing.assert_close(mn, rn, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(me, re, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(score(tree.map(theta), theta), oracle.map_value(theta), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_scores_count_labellings(backend):
    G = random_forest(9, 2, 7)
    tree = sg.get_solver("tree", graph=G, backend=backend)
    theta = (torch.zeros(2, 9, 4, dtype=F64), torch.zeros(7, 4, 4, dtype=F64))
    torch.testing.assert_close(tree.log_partition(theta), torch.full((2,), 9 * torch.log(torch.tensor(4.0, dtype=F64)).item(), dtype=F64))
    mn, me = tree.marginals(theta)
    torch.testing.assert_close(mn, torch.full_like(mn, 0.25))
    torch.testing.assert_close(me, torch.full_like(me, 1 / 16))


# ----------------------------------------------------------------------------- path = chain
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_path_graph_gives_chain_results(shared, backend):
    T, C = 9, 4
    G = nx.path_graph(T)  # edges (t, t+1) in order: the chain's positions
    tree, chain = sg.get_solver("tree", graph=G, backend=backend), sg.get_solver("chain")
    g = torch.Generator().manual_seed(8)
    node = torch.randn(3, T, C, generator=g, dtype=F64) * 3
    edge = torch.randn(*(() if shared else (3,)), T - 1, C, C, generator=g, dtype=F64) * 3
    node[1, 4, 2] = float("-inf")
    a = tree.log_partition_and_marginals((node, edge))
    b = chain.log_partition_and_marginals((node, edge))
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1][0], b[1][0])
    torch.testing.assert_close(a[1][1], b[1][1])
    for x, y in zip(tree.map((node, edge)), chain.map((node, edge))):
        assert torch.equal(x, y)
    n1, e1 = node.clone().requires_grad_(), edge.clone().requires_grad_()
    n2, e2 = node.clone().requires_grad_(), edge.clone().requires_grad_()
    tree.log_partition((n1, e1)).sum().backward()
    chain.log_partition((n2, e2)).sum().backward()
    torch.testing.assert_close(n1.grad, n2.grad)
    torch.testing.assert_close(e1.grad, e2.grad)
    # samples: same distribution (label frequencies at each node within sampling error)
    s1 = tree.sample((node, edge), 2000, generator=torch.Generator().manual_seed(1))[0].mean(0)
    s2 = chain.sample((node, edge), 2000, generator=torch.Generator().manual_seed(2))[0].mean(0)
    assert (s1 - b[1][0]).abs().max() < 0.05 and (s2 - b[1][0]).abs().max() < 0.05


def test_path_rooted_at_its_centre():
    tree = sg.get_solver("tree", graph=nx.path_graph(101))
    assert tree.plan.height == 50 and tree.plan.num_roots == 1
    assert sg.get_solver("tree", graph=nx.star_graph(30)).plan.height == 1
    forest = nx.disjoint_union(nx.path_graph(7), nx.path_graph(3))
    plan = sg.get_solver("tree", graph=forest).plan
    assert plan.num_roots == 2 and plan.height == 3 and sorted(plan.order[:2].tolist()) == [3, 8]


# ----------------------------------------------------------------------------- nll, gradients
@pytest.mark.parametrize("backend", BACKENDS)
def test_nll_gradcheck_and_model_marginals(backend):
    G = random_forest(6, 2, 11)
    tree = sg.get_solver("tree", graph=G, backend=backend)
    node, edge = make(G, B=(3,), C=3, shared=True, seed=12)
    labels = torch.randint(3, (3, 6), generator=torch.Generator().manual_seed(0))
    u, v = torch.tensor(list(G.edges())).T
    gold = (torch.nn.functional.one_hot(labels, 3).to(F64), (torch.nn.functional.one_hot(labels[:, u], 3)[..., :, None] * torch.nn.functional.one_hot(labels[:, v], 3)[..., None, :]).to(F64))
    n, e = node.clone().requires_grad_(), edge.clone().requires_grad_()
    loss = sg.nll((n, e), gold, tree)
    torch.testing.assert_close(loss, tree.log_partition((node, edge)) - score(gold, (node, edge)))
    loss.sum().backward()
    mu = tree.marginals((node, edge))
    torch.testing.assert_close(n.grad, mu[0] - gold[0])
    torch.testing.assert_close(e.grad, (mu[1] - gold[1]).sum(0))
    assert torch.autograd.gradcheck(lambda a, b: sg.nll((a, b), gold, tree), (n.detach().requires_grad_(), e.detach().requires_grad_()))
    assert torch.autograd.gradcheck(lambda a, b: tree.log_partition((a, b)), (n.detach().requires_grad_(), e.detach().requires_grad_()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_derivatives_refused(backend):
    G = nx.star_graph(3)
    tree = sg.get_solver("tree", graph=G, backend=backend)
    assert not tree.capabilities.differentiable_marginals
    node, edge = make(G, seed=13)
    n = node.clone().requires_grad_()
    with pytest.raises(sg.CapabilityError, match=r"second derivatives of the tree log-partition are not available.*not differentiable"):
        torch.autograd.grad(tree.log_partition((n, edge)).sum(), n, create_graph=True)
    gold = tree.map((node, edge))  # a feasible structure per instance
    with pytest.raises(sg.CapabilityError, match="second derivatives of nll"):
        torch.autograd.grad(sg.nll((n, edge), gold, tree).sum(), n, create_graph=True)
    lz = tree.log_partition((n, edge))  # the backward can run twice (retain_graph)
    lz.sum().backward(retain_graph=True)
    g1 = n.grad.clone()
    lz.sum().backward()
    torch.testing.assert_close(n.grad, 2 * g1)


# ----------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("backend", BACKENDS)
def test_map_ties_lowest_label_and_outputs_detached(backend):
    G = random_forest(7, 2, 14)
    tree = sg.get_solver("tree", graph=G, backend=backend)
    theta = (torch.zeros(2, 7, 3, requires_grad=True), torch.zeros(5, 3, 3))
    zn, ze = tree.map(theta)
    assert (zn[..., 0] == 1).all() and (ze[..., 0, 0] == 1).all()
    assert not zn.requires_grad and not tree.marginals(theta)[0].requires_grad


@pytest.mark.parametrize("dtype,scale", [(F64, 1e30), (F64, 1e300), (torch.float32, 1e4), (torch.float32, 1e30)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_scores_match_enumeration(dtype, scale, backend):
    G = random_forest(6, 2, 15)
    tree = sg.get_solver("tree", graph=G, backend=backend)
    node, edge = make(G, B=(2,), C=3, scale=scale, seed=16, dtype=dtype)
    node[0, 1, 0] = float("-inf")
    oracle = BruteForce(tree, tree_enum(G))
    th64 = (node.double(), edge.double())
    lz, (mn, me) = tree.log_partition_and_marginals((node, edge))
    for x in (lz, mn, me):
        assert x.dtype == dtype and torch.isfinite(x).all()
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    rn, re = oracle.marginals(th64)
    torch.testing.assert_close(mn.double(), rn, atol=tol, rtol=0)
    torch.testing.assert_close(me.double(), re, atol=tol, rtol=0)
    torch.testing.assert_close(lz.double(), oracle.log_partition(th64), rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)
    z = tree.map((node, edge))
    torch.testing.assert_close(score(tuple(x.double() for x in z), th64), oracle.map_value(th64), rtol=1e-12, atol=0)
    if scale >= 1e30:  # determined: the best labelling, and every sample is it
        assert torch.equal(mn.double(), rn) and torch.equal(z[0], mn)
        s = tree.sample((node, edge), 5, generator=torch.Generator().manual_seed(0))
        assert torch.equal(s[0], mn.expand_as(s[0]))
    n = node.clone().requires_grad_()
    tree.log_partition((n, edge)).sum().backward()
    assert torch.isfinite(n.grad).all()


@pytest.mark.parametrize("scale", [1e3, 1e307])
def test_wide_scores_on_a_larger_tree_no_nan(scale):
    """Scores up to near the float64 limit on 60 nodes: the passes re-centre every
    message (``normalise``) and stay finite; at 1e3 they need not and do not."""
    G = random_forest(60, 2, 25)
    tree = sg.get_solver("tree", graph=G, backend="torch")  # inspects the torch kernels' choice
    node, edge = make(G, B=(2,), C=3, scale=scale, seed=26)
    assert tree._problem((node, edge)).normalise == (scale > 1e3)
    lz, (mn, me) = tree.log_partition_and_marginals((node, edge))
    assert torch.isfinite(mn).all() and torch.isfinite(me).all() and not torch.isnan(lz).any()
    torch.testing.assert_close(mn.sum(-1), torch.ones(2, 60, dtype=F64))
    torch.testing.assert_close(me.sum((-2, -1)), torch.ones(2, 58, dtype=F64))
    z = tree.map((node, edge))
    assert torch.equal(z[0].sum(-1), torch.ones(2, 60, dtype=F64))
    if scale > 1e3:  # a point mass: the marginals are the MAP
        assert torch.equal(z[0], mn) and torch.equal(z[1], me)


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_partition_beyond_float64_keeps_exact_marginals(backend):
    """Equal scores of 1e307 on 200 nodes: A ≈ 4e309 is +inf in float64 (correctly), and
    the marginals are still the uniform ones; one forbidden label per node changes them."""
    tree = sg.get_solver("tree", graph=nx.path_graph(200), backend=backend)
    node, edge = torch.full((1, 200, 4), 1e307, dtype=F64), torch.full((199, 4, 4), 1e307, dtype=F64)
    lz, (mn, me) = tree.log_partition_and_marginals((node, edge))
    assert torch.isposinf(lz).all()
    torch.testing.assert_close(mn, torch.full_like(mn, 0.25))
    torch.testing.assert_close(me, torch.full_like(me, 1 / 16))
    node[..., 0] = float("-inf")
    _, (mn, _) = tree.log_partition_and_marginals((node, edge))
    torch.testing.assert_close(mn[..., 1:], torch.full_like(mn[..., 1:], 1 / 3))
    assert torch.equal(tree.map((node, edge))[0][0, :, 1], torch.ones(200, dtype=F64))  # ties: lowest allowed label


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_agrees_with_float64_on_a_larger_tree(backend):
    G = nx.random_labeled_tree(300, seed=17)
    tree = sg.get_solver("tree", graph=G, backend=backend)
    node, edge = make(G, B=(2,), C=6, scale=20.0, seed=18)
    node[:, ::7, 0] = float("-inf")
    _, (m64, e64) = tree.log_partition_and_marginals((node, edge))
    _, (m32, e32) = tree.log_partition_and_marginals((node.float(), edge.float()))
    assert (m32.double() - m64).abs().max() < 1e-5 and (e32.double() - e64).abs().max() < 1e-5
    torch.testing.assert_close(m64.sum(-1), torch.ones(2, 300, dtype=F64))
    torch.testing.assert_close(e64.sum((-2, -1)), torch.ones(2, 299, dtype=F64))
    torch.testing.assert_close(e64.sum(-1), m64[:, [u for u, _ in G.edges()]])  # edge marginals agree with node marginals


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_reproducible_and_generator_checked(backend):
    G = nx.star_graph(3)
    tree = sg.get_solver("tree", graph=G, backend=backend)
    theta = make(G, seed=19)
    a = tree.sample(theta, 5, generator=torch.Generator().manual_seed(3))
    b = tree.sample(theta, 5, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert a[0].shape == (5, 2, 4, 3) and a[1].shape == (5, 2, 3, 3, 3)
    with pytest.raises(sg.DTypeError, match="generator"):
        tree.sample(theta, 2, generator=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_theta_not_mutated_and_shared_edge_output_has_batch_dims(backend):
    G = random_forest(5, 1, 20)
    tree = sg.get_solver("tree", graph=G, backend=backend)
    node, edge = make(G, B=(2, 3), shared=True, seed=21)
    before = (node.clone(), edge.clone())
    mn, me = tree.marginals((node, edge))
    zn, ze = tree.map((node, edge))
    assert me.shape == ze.shape == (2, 3, 4, 3, 3) and mn.shape == (2, 3, 5, 3)
    assert torch.equal(node, before[0]) and torch.equal(edge, before[1])


# ----------------------------------------------------------------------------- errors
def test_graph_errors():
    with pytest.raises(sg.GraphError, match=r"cycle through nodes \[.*\]"):
        sg.get_solver("tree", graph=nx.cycle_graph(4))
    tri = nx.Graph([(0, 1), (1, 2), (2, 0), (2, 3)])
    with pytest.raises(sg.GraphError, match=r"cycle through nodes \[(?=.*0)(?=.*1)(?=.*2)[0-2, ]+\]"):
        sg.get_solver("tree", graph=tri)
    with pytest.raises(sg.GraphError, match=r"self-loop\(s\) at node\(s\) \[1\]"):
        sg.get_solver("tree", graph=nx.Graph([(0, 1), (1, 1)]))
    with pytest.raises(sg.GraphError, match="directed DiGraph"):
        sg.get_solver("tree", graph=nx.DiGraph([(0, 1)]))
    with pytest.raises(sg.GraphError, match="simple networkx.Graph, got a MultiGraph"):
        sg.get_solver("tree", graph=nx.MultiGraph([(0, 1)]))
    with pytest.raises(sg.GraphError, match=r"nodes labelled exactly 0..2.*\[3\].*without \[0\]"):
        sg.get_solver("tree", graph=nx.Graph([(1, 2), (2, 3)]))
    with pytest.raises(sg.GraphError, match=r"nodes labelled exactly 0..1.*'a'"):
        sg.get_solver("tree", graph=nx.Graph([(0, "a")]))
    with pytest.raises(sg.GraphError, match="at least one node"):
        sg.get_solver("tree", graph=nx.Graph())
    with pytest.raises(sg.DTypeError, match="expected an undirected networkx.Graph.*got list"):
        sg.get_solver("tree", graph=[(0, 1)])
    with pytest.raises(sg.DTypeError, match="got NoneType"):
        sg.get_solver("tree")
    with pytest.raises(sg.UnknownArgumentError, match=r"'tree'.*'graf'.*accepts: graph, backend"):
        sg.get_solver("tree", graf=nx.path_graph(2))
    with pytest.raises(sg.DomainError, match="backend: expected one of 'auto', 'torch', 'numba', got 'numpy'"):
        sg.get_solver("tree", graph=nx.path_graph(2), backend="numpy")


def test_solver_keeps_its_own_structure():
    G = nx.path_graph(3)
    tree = sg.get_solver("tree", graph=G)
    G.add_edge(0, 2)  # the caller's graph changes (now a cycle); the solver does not
    theta = make(nx.path_graph(3), seed=22)
    assert tree.log_partition(theta).shape == (2,)


def test_theta_errors():
    G = nx.star_graph(3)
    tree = sg.get_solver("tree", graph=G)
    with pytest.raises(sg.ShapeError, match=r"node: expected shape \(\*batch, N, C\) with N = 4.*got \(2, 5, 3\)"):
        tree.marginals((torch.randn(2, 5, 3), torch.randn(3, 3, 3)))
    with pytest.raises(sg.ShapeError, match=r"edge has shape \(2, 4, 3, 3\).*expected edge of shape \(2, 3, 3, 3\).*E = 3.*\(3, 3, 3\)"):
        tree.marginals((torch.randn(2, 4, 3), torch.randn(2, 4, 3, 3)))
    with pytest.raises(sg.ShapeError, match=r"edge has shape \(3, 3, 3, 3\)"):
        tree.map((torch.randn(2, 4, 3), torch.randn(3, 3, 3, 3)))  # batch mismatch: nothing is broadcast
    with pytest.raises(sg.ShapeError, match="expected a tuple"):
        tree.log_partition(torch.randn(4, 3))
    with pytest.raises(sg.DTypeError, match="node: expected a floating-point tensor"):
        tree.log_partition((torch.zeros(4, 3, dtype=torch.long), torch.zeros(3, 3, 3)))
    node = torch.randn(2, 4, 3)
    node[1, 2, 0] = float("nan")
    with pytest.raises(sg.DomainError, match=r"theta\[0\]: expected scores that are finite or -inf.*1 NaN"):
        tree.log_partition((node, torch.randn(3, 3, 3)))
    with pytest.raises(sg.DomainError, match=r"theta\[1\].*\+inf"):
        tree.log_partition((torch.randn(4, 3), torch.full((3, 3, 3), float("inf"))))
    with pytest.raises(sg.UnknownArgumentError, match=r"'lengths'.*accepts: none"):
        tree.marginals((torch.randn(4, 3), torch.randn(3, 3, 3)), lengths=torch.tensor(4))
    assert tree.call_kwargs == () and "height=1" in repr(tree)


def test_backends_agree_on_a_larger_forest():
    G = random_forest(300, 4, 27)
    torch_tree, numba_tree = (sg.get_solver("tree", graph=G, backend=b) for b in BACKENDS)
    assert numba_tree.capabilities.devices == ("cpu",) and "cuda" in torch_tree.capabilities.devices
    assert "backend='numba'" in repr(numba_tree)
    node, edge = make(G, B=(3,), C=5, scale=4.0, seed=28)
    node[0, ::9, 1] = float("-inf")
    edge[1, ::5, 0, :] = float("-inf")
    a = torch_tree.log_partition_and_marginals((node, edge))
    b = numba_tree.log_partition_and_marginals((node, edge))
    torch.testing.assert_close(a[0], b[0], atol=1e-9, rtol=1e-12)
    torch.testing.assert_close(a[1][0], b[1][0], atol=1e-12, rtol=0)
    torch.testing.assert_close(a[1][1], b[1][1], atol=1e-12, rtol=0)
    za, zb = torch_tree.map((node, edge)), numba_tree.map((node, edge))
    torch.testing.assert_close(score(za, (node, edge)), score(zb, (node, edge)), atol=1e-9, rtol=0)
    s = numba_tree.sample((node, edge), 3000, generator=torch.Generator().manual_seed(4))[0].mean(0)
    assert (s - a[1][0]).abs().max() < 0.05  # frequencies match the marginals


def test_listed_as_builtin():
    caps = sg.list_solvers()["tree"]
    assert caps.is_exact("marginals") and caps.is_exact("sample") and not caps.differentiable_marginals
    with pytest.raises(sg.CapabilityError, match=r"solvers that can: .*tree"):
        sg.get_solver(lambda t: (t > 0).to(t.dtype), name="sign").marginals(torch.randn(3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    G = random_forest(40, 3, 23)
    tree = sg.get_solver("tree", graph=G)
    for shared in (False, True):
        node, edge = make(G, B=(3,), C=4, shared=shared, scale=5.0, seed=24)
        node[0, 3, :2] = float("-inf")
        cpu = tree.log_partition_and_marginals((node, edge))
        gpu = tree.log_partition_and_marginals((node.cuda(), edge.cuda()))
        torch.testing.assert_close(gpu[0].cpu(), cpu[0])
        for a, b in zip(gpu[1], cpu[1]):
            assert a.device.type == "cuda"
            torch.testing.assert_close(a.cpu(), b)
        for a, b in zip(tree.map((node.cuda(), edge.cuda())), tree.map((node, edge))):
            assert torch.equal(a.cpu(), b)
        n = node.cuda().requires_grad_()
        tree.log_partition((n, edge.cuda())).sum().backward()
        torch.testing.assert_close(n.grad.cpu(), cpu[1][0])
        s = tree.sample((node.cuda(), edge.cuda()), 3000, generator=torch.Generator(device="cuda").manual_seed(0))
        assert (s[0].float().mean(0).cpu().double() - cpu[1][0]).abs().max() < 0.05
    small = GRAPHS["components"]
    check_solver(sg.get_solver("tree", graph=small), [Case(make(small, C=2), tree_enum(small))], devices=["cuda"], num_samples=500)
