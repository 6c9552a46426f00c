"""The ``chain`` solver: conformance against enumeration, numerics, lengths, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import structgrad as sg
from structgrad.solvers import _chain_torch
from structgrad.testing import BruteForce, Case, check_solver

from _chain_cases import chain_enum

CHAIN = sg.get_solver("chain")
F64 = torch.float64
ND = 1 + torch.cuda.is_available()  # check_solver runs every check on each available device


def make(B=(3,), T=4, C=3, mode="full", scale=1.0, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    node = torch.randn(*B, T, C, generator=g, dtype=dtype) * scale
    if mode == "full":
        edge = torch.randn(*B, T - 1, C, C, generator=g, dtype=dtype) * scale
    elif mode == "positional":
        edge = torch.randn(T - 1, C, C, generator=g, dtype=dtype) * scale
    else:
        edge = torch.randn(C, C, generator=g, dtype=dtype) * scale
    return node, edge


def path_of(theta, lengths=None):
    node, edge = theta
    return _chain_torch.Problem(node, edge, lengths).path


# ----------------------------------------------------------------------------- conformance
CASES = []
for mode in ("full", "positional", "shared"):
    CASES.append(Case(make(mode=mode), chain_enum(mode == "shared"), name=f"{mode}-exp"))
    CASES.append(
        Case(make(mode=mode, scale=40.0, seed=1), chain_enum(mode == "shared"), kwargs={"lengths": torch.tensor([4, 2, 0])}, name=f"{mode}-log-lengths")
    )
CASES.append(Case(make(B=(), mode="full"), chain_enum(False), name="unbatched"))
CASES.append(Case(make(B=(2, 2), T=3, mode="shared"), chain_enum(True), kwargs={"lengths": torch.tensor([[3, 1], [2, 0]])}, name="batch2d"))
CASES.append(Case(make(B=(2,), T=1, C=4, mode="full"), chain_enum(False), name="T=1"))
CASES.append(Case(make(B=(2,), T=1, C=3, mode="shared"), chain_enum(True), name="T=1-shared"))


def _neginf_case():
    node, edge = make(mode="full", seed=3)
    node[0, 1, 0] = float("-inf")  # a forbidden label
    edge[1, 0, :, 1] = float("-inf")  # a forbidden transition
    node[2] = float("-inf")  # an infeasible instance
    return Case((node, edge), chain_enum(False), kwargs={"lengths": torch.tensor([4, 3, 2])}, name="neginf")


CASES.append(_neginf_case())


def test_cases_cover_both_paths():
    paths = {path_of(c.theta, c.kwargs.get("lengths")) for c in CASES}
    assert paths == {"exp", "log"}


@pytest.mark.parametrize("backend", ["torch", "numba", "scan"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_check_solver(case, backend):
    ran = check_solver(sg.get_solver("chain", backend=backend), [case], num_samples=2000)
    assert ran["log_partition_oracle"] == ran["marginals_oracle"] == ran["map_feasible_optimal"] == ND
    assert ran["sample_frequencies"] == ND


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 4),
    C=st.integers(1, 3),
    mode=st.sampled_from(["full", "positional", "shared"]),
    scale=st.sampled_from([0.5, 3.0, 60.0]),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_property_against_enumeration(B, T, C, mode, scale, seed, data):
    CHAIN = sg.get_solver("chain", backend=data.draw(st.sampled_from(["torch", "numba", "scan"])))
    theta = make(B=(B,), T=T, C=C, mode=mode, scale=scale, seed=seed)
    lengths = torch.tensor(data.draw(st.lists(st.integers(0, T), min_size=B, max_size=B)))
    oracle = BruteForce(CHAIN, chain_enum(mode == "shared"))
    lz, (mu_n, mu_e) = CHAIN.log_partition_and_marginals(theta, lengths=lengths)
    torch.testing.assert_close(lz, oracle.log_partition(theta, lengths=lengths), atol=1e-9, rtol=1e-9)
    ref_n, ref_e = oracle.marginals(theta, lengths=lengths)
    torch.testing.assert_close(mu_n, ref_n, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(mu_e, ref_e, atol=1e-9, rtol=1e-9)
    z = CHAIN.map(theta, lengths=lengths)
    score = sum((zz * tt).sum(tuple(range(-tt.dim(), 0))) if tt.dim() < zz.dim() else (zz * tt).flatten(1).sum(1) for zz, tt in zip(z, theta))
    torch.testing.assert_close(score, oracle.map_value(theta, lengths=lengths), atol=1e-9, rtol=1e-9)


def test_zero_scores_count_labellings():
    """A(0) = log |𝒵| = L log C per instance."""
    node, edge = torch.zeros(3, 6, 4, dtype=F64), torch.zeros(4, 4, dtype=F64)
    lengths = torch.tensor([6, 3, 0])
    lz = CHAIN.log_partition((node, edge), lengths=lengths)
    torch.testing.assert_close(lz, lengths.double() * torch.log(torch.tensor(4.0, dtype=F64)))


# ----------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("mode", ["full", "shared"])
def test_float32_accuracy_T512_scale100(mode):
    node, edge = make(B=(4,), T=512, C=16, mode=mode, scale=100.0, seed=7, dtype=torch.float32)
    _, (m32, _) = CHAIN.log_partition_and_marginals((node, edge))
    _, (m64, _) = CHAIN.log_partition_and_marginals((node.double(), edge.double()))
    assert m32.dtype == torch.float32
    assert (m32.double() - m64).abs().max() <= 1e-5


@pytest.mark.parametrize("scale", [1.0, 1.8])
@pytest.mark.parametrize("mode", ["full", "positional", "shared"])
def test_float32_accuracy_probability_path(mode, scale):
    node, edge = make(B=(4,), T=512, C=16, mode=mode, scale=scale, seed=8, dtype=torch.float32)
    assert path_of((node, edge)) == "exp"
    lz32, (m32, e32) = CHAIN.log_partition_and_marginals((node, edge))
    lz64, (m64, e64) = CHAIN.log_partition_and_marginals((node.double(), edge.double()))
    assert (m32.double() - m64).abs().max() <= 1e-5
    assert (e32.double() - e64).abs().max() <= 1e-5 * (512 if mode == "shared" else 1)
    assert ((lz32.double() - lz64).abs() / lz64.abs()).max() <= 1e-6


@pytest.mark.parametrize("mode", ["full", "shared"])
def test_float32_probability_path_at_its_range_limit(mode):
    """Scores spread over the whole range the probability path accepts (R just under 32)."""
    g = torch.Generator().manual_seed(21)
    T, C = 256, 12
    node = torch.rand(3, T, C, generator=g) * 14.0
    edge = torch.rand(*((3, T - 1) if mode == "full" else ()), C, C, generator=g) * 17.0
    node[:, :, 0], edge[..., 0, 0], edge[..., 1, 1] = 0.0, 0.0, 17.0
    node[:, :, 1] = 14.0
    assert path_of((node, edge)) == "exp"
    _, (m32, _) = CHAIN.log_partition_and_marginals((node, edge))
    _, (m64, _) = CHAIN.log_partition_and_marginals((node.double(), edge.double()))
    assert (m32.double() - m64).abs().max() <= 1e-5


def test_paths_agree_in_float64():
    theta = make(B=(2,), T=30, C=5, mode="full", scale=2.0, seed=9)
    assert path_of(theta) == "exp"
    node, edge = theta
    forced = (node, edge.clone())
    forced[1][0, 0, 0, 0] = float("-inf")  # any -inf transition sends it down the log path
    # compare on the instance that did not change
    assert path_of(forced) == "log"
    a = CHAIN.log_partition_and_marginals(theta)
    b = CHAIN.log_partition_and_marginals(forced)
    torch.testing.assert_close(a[0][1], b[0][1], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(a[1][0][1], b[1][0][1], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(a[1][1][1], b[1][1][1], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("mode", ["full", "positional", "shared"])
def test_extreme_scores_float32_no_nan(mode):
    node, edge = make(B=(2,), T=64, C=8, mode=mode, scale=1e4, seed=11, dtype=torch.float32)
    node[0, 3, :4] = float("-inf")
    if mode == "full":
        edge[1, 5, :, 2] = float("-inf")
    n, e = node.clone().requires_grad_(), edge.clone().requires_grad_()
    lz = CHAIN.log_partition((n, e))
    lz.sum().backward()
    assert torch.isfinite(lz).all()
    assert torch.isfinite(n.grad).all() and torch.isfinite(e.grad).all()
    mu = CHAIN.marginals((node, edge))
    assert all(torch.isfinite(m).all() for m in mu)
    torch.testing.assert_close(mu[0].sum(-1), torch.ones(2, 64))
    z = CHAIN.map((node, edge))
    assert torch.equal(z[0].sum(-1), torch.ones(2, 64))


def test_neg_inf_gives_exact_zeros_and_no_nan_gradients():
    node, edge = make(B=(2,), T=5, C=3, mode="shared", seed=12)
    edge = edge.clone()
    edge[0, 1] = float("-inf")  # 0 -> 1 forbidden
    node = node.clone()
    node[1, 2, :] = float("-inf")  # instance 1 infeasible
    n, e = node.clone().requires_grad_(), edge.clone().requires_grad_()
    lz = CHAIN.log_partition((n, e))
    assert torch.isneginf(lz[1]) and torch.isfinite(lz[0])
    lz[0].backward()
    assert torch.isfinite(n.grad).all() and torch.isfinite(e.grad).all()
    assert e.grad[0, 1] == 0
    mu_n, mu_e = CHAIN.marginals((node, edge))
    assert (mu_e[:, 0, 1] == 0).all()
    assert (mu_n[1] == 0).all() and (mu_e[1] == 0).all()
    z_n, z_e = CHAIN.map((node, edge))
    assert (z_n[1] == 0).all() and z_e[0, 0, 1] == 0
    s_n, _ = CHAIN.sample((node, edge), 50, generator=torch.Generator().manual_seed(0))
    assert (s_n[:, 1] == 0).all() and torch.equal(s_n[:, 0].sum(-1), torch.ones(50, 5, dtype=F64))


# ----------------------------------------------------------------------------- lengths and sharing
@pytest.mark.parametrize("mode", ["full", "positional", "shared"])
def test_positions_past_length_do_not_matter(mode):
    node, edge = make(B=(3,), T=6, C=4, mode=mode, seed=13)
    lengths = torch.tensor([6, 3, 1])
    node2 = node.clone()
    node2[1, 3:] = torch.randn(3, 4, dtype=F64) * 50
    node2[2, 1:] = float("-inf")
    edge2 = edge.clone()
    if mode == "full":
        edge2[1, 2:] = 1e3
    a = CHAIN.log_partition_and_marginals((node, edge), lengths=lengths)
    b = CHAIN.log_partition_and_marginals((node2, edge2), lengths=lengths)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1][0], b[1][0])
    torch.testing.assert_close(a[1][1], b[1][1])
    assert (a[1][0][1, 3:] == 0).all() and (a[1][0][2, 1:] == 0).all()
    n = node2.clone().requires_grad_()
    CHAIN.log_partition((n, edge2), lengths=lengths).sum().backward()
    assert (n.grad[1, 3:] == 0).all() and (n.grad[2, 1:] == 0).all()
    z = CHAIN.map((node2, edge2), lengths=lengths)
    torch.testing.assert_close(z[0], CHAIN.map((node, edge), lengths=lengths)[0])


def test_shared_edge_equals_expanded_edge():
    node, shared = make(B=(3,), T=7, C=4, mode="shared", seed=14)
    full = shared.expand(3, 6, 4, 4).clone()
    lengths = torch.tensor([7, 4, 2])
    lz_s, (mn_s, me_s) = CHAIN.log_partition_and_marginals((node, shared), lengths=lengths)
    lz_f, (mn_f, me_f) = CHAIN.log_partition_and_marginals((node, full), lengths=lengths)
    torch.testing.assert_close(lz_s, lz_f)
    torch.testing.assert_close(mn_s, mn_f)
    torch.testing.assert_close(me_s, me_f.sum(1))  # counts = Σ_t edge marginals
    e = shared.clone().requires_grad_()
    CHAIN.log_partition((node, e), lengths=lengths).sum().backward()
    torch.testing.assert_close(e.grad, me_f.sum((0, 1)))


def test_nll_with_chain_labels():
    node, edge = make(B=(4,), T=6, C=3, mode="shared", seed=15)
    labels = torch.randint(3, (4, 6), generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([6, 5, 2, 0])
    gold = sg.chain_indicators(labels, 3, lengths, shared_edge=True, dtype=F64)
    n, e = node.clone().requires_grad_(), edge.clone().requires_grad_()
    loss = sg.nll((n, e), gold, CHAIN, lengths=lengths)
    oracle = BruteForce(CHAIN, chain_enum(True))
    score = (gold[0] * node).sum((1, 2)) + (gold[1] * edge).sum((1, 2))
    torch.testing.assert_close(loss, oracle.log_partition((node, edge), lengths=lengths) - score)
    loss.sum().backward()
    mu = CHAIN.marginals((node, edge), lengths=lengths)
    torch.testing.assert_close(n.grad, mu[0] - gold[0])
    torch.testing.assert_close(e.grad, (mu[1] - gold[1]).sum(0))
    torch.autograd.gradcheck(lambda a, b: sg.nll((a, b), gold, CHAIN, lengths=lengths), (n.detach().requires_grad_(), e.detach().requires_grad_()))


def test_nll_of_impossible_gold_is_inf():
    node, edge = make(B=(1,), T=3, C=2, mode="full", seed=16)
    edge = edge.clone()
    edge[0, 0, :, 1] = float("-inf")
    gold = sg.chain_indicators(torch.tensor([[0, 1, 0]]), 2, dtype=F64)
    assert torch.isposinf(sg.nll((node, edge), gold, "chain")).all()


def test_map_ties_are_deterministic_lowest_label():
    node, edge = torch.zeros(2, 5, 3, dtype=F64), torch.zeros(3, 3, dtype=F64)
    z, _ = CHAIN.map((node, edge))
    assert (sg.chain_labels(z) == 0).all()


def test_sample_reproducible_and_generator_checked():
    theta = make(B=(2,), T=5, C=3, mode="full", seed=17)
    a = CHAIN.sample(theta, 7, generator=torch.Generator().manual_seed(3))
    b = CHAIN.sample(theta, 7, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(sg.DTypeError, match="generator"):
        CHAIN.sample(theta, 2, generator=3)
    with pytest.raises(sg.DomainError, match="num_samples"):
        CHAIN.sample(theta, 0)


def test_outputs_detached_and_second_derivatives_refused():
    node, edge = make(B=(2,), T=4, C=3, mode="full", seed=18)
    n = node.clone().requires_grad_()
    mu = CHAIN.marginals((n, edge))
    assert not mu[0].requires_grad
    assert not CHAIN.capabilities.differentiable_marginals
    # no silent (wrong) second-order graph: a create_graph backward is refused by name
    with pytest.raises(sg.CapabilityError, match=r"second derivatives .*chain.*not available.*marginals.*not differentiable"):
        torch.autograd.grad(CHAIN.log_partition((n, edge)).sum(), n, create_graph=True)
    with pytest.raises(NotImplementedError, match="create_graph"):
        CHAIN.log_partition((n, edge)).sum().backward(create_graph=True)
    # first derivatives still work after the refusal, and without create_graph
    (g,) = torch.autograd.grad(CHAIN.log_partition((n, edge)).sum(), n)
    torch.testing.assert_close(g, mu[0])


# ----------------------------------------------------------------------------- errors
def test_error_node_edge_shapes_disagree():
    with pytest.raises(sg.ShapeError, match=r"edge has shape \(2, 4, 3, 3\) but node has shape \(2, 6, 3\)"):
        CHAIN.log_partition((torch.randn(2, 6, 3), torch.randn(2, 4, 3, 3)))
    with pytest.raises(sg.ShapeError, match=r"edge has shape \(4, 4\) but node has shape"):
        CHAIN.marginals((torch.randn(2, 6, 3), torch.randn(4, 4)))
    with pytest.raises(sg.ShapeError, match=r"edge has shape \(3, 5, 3, 3\)"):
        CHAIN.map((torch.randn(2, 6, 3), torch.randn(3, 5, 3, 3)))  # batch mismatch: nothing is broadcast


def test_error_theta_structure_and_dtype():
    with pytest.raises(sg.ShapeError, match="expected a tuple"):
        CHAIN.log_partition(torch.randn(2, 3, 3))
    with pytest.raises(sg.DTypeError, match="node: expected a floating-point tensor.*int64"):
        CHAIN.log_partition((torch.zeros(2, 3, 3, dtype=torch.long), torch.zeros(3, 3)))
    with pytest.raises(sg.DTypeError, match="share one dtype"):
        CHAIN.log_partition((torch.zeros(2, 3, 3), torch.zeros(3, 3, dtype=F64)))
    with pytest.raises(TypeError):
        CHAIN.log_partition((torch.zeros(2, 3, 3), torch.zeros(3, 3, dtype=torch.int32)))


def test_error_lengths():
    theta = make(B=(2,), T=4, C=3)
    with pytest.raises(sg.DomainError, match=r"lengths: expected values in \[0, 4\].*max 5"):
        CHAIN.log_partition(theta, lengths=torch.tensor([5, 1]))
    with pytest.raises(sg.DomainError, match="min -1"):
        CHAIN.marginals(theta, lengths=torch.tensor([-1, 1]))
    with pytest.raises(sg.ShapeError, match=r"lengths: expected shape \(2,\)"):
        CHAIN.map(theta, lengths=torch.tensor([4]))
    with pytest.raises(sg.DTypeError, match="lengths: expected an integer tensor"):
        CHAIN.map(theta, lengths=torch.tensor([4.0, 1.0]))


def test_error_nan_scores_and_backend():
    node, edge = make(B=(1,), T=3, C=2)
    node = node.clone()
    node[0, 1, 0] = float("nan")
    with pytest.raises(sg.DomainError, match=r"theta\[0\]: expected scores that are finite or -inf \(impossible\), got 1 NaN"):
        CHAIN.log_partition((node, edge))
    with pytest.raises(sg.DomainError, match="backend: expected one of 'auto', 'torch', 'numba', 'scan', got 'cuda-magic'"):
        sg.get_solver("chain", backend="cuda-magic")


def test_error_gold_device_and_shape():
    theta = make(B=(2,), T=3, C=2, mode="shared")
    labels = torch.zeros(2, 3, dtype=torch.long)
    gold = sg.chain_indicators(labels, 2, shared_edge=True, dtype=F64)
    with pytest.raises(sg.DeviceError, match="gold\\[0\\] is on device meta but theta\\[0\\] is on cpu"):
        sg.nll(theta, (gold[0].to("meta"), gold[1]), CHAIN)
    bad = sg.chain_indicators(labels, 2, dtype=F64)  # per-position edges for a shared edge
    with pytest.raises(sg.ShapeError, match=r"gold\[1\]: expected shape \(2, 2, 2\)"):
        sg.nll(theta, bad, CHAIN)


@pytest.mark.parametrize("mode", ["full", "positional", "shared"])
@pytest.mark.parametrize("B", [1, 3, 6])
def test_viterbi_back_pointers_equal_back_tracking(mode, B):
    """The GPU way of the torch Viterbi (back-pointers kept by the forward, followed on the
    host), run on the CPU: the same labels as the CPU way (back-tracking by recomputed
    argmaxes), with lengths, -inf, an infeasible instance, ties and B = 1."""
    from structgrad.solvers._chain_decode import viterbi
    from structgrad.solvers._chain_torch import Problem

    for scale, seed in ((1.0, 30), (40.0, 31)):
        node, edge = make(B=(B,), T=9, C=4, mode=mode, scale=scale, seed=seed)
        node[0, 2, 1] = -float("inf")
        if B > 1:
            node[1, 3] = -float("inf")  # infeasible (within its length)
        lengths = torch.tensor([9, 5, 0, 1, 9, 4][:B])
        for th in ((node, edge), (node.round().clamp(-1, 1), edge.round().clamp(-1, 1))):  # and ties
            got = viterbi(Problem(th[0], th[1], lengths), pointers=True)
            want = viterbi(Problem(th[0], th[1], lengths), pointers=False)
            assert torch.equal(got, want)
            assert torch.equal(want, sg.chain_labels(CHAIN.map(th, lengths=lengths)[0]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["full", "positional", "shared"])
def test_cuda_matches_cpu(mode):
    node, edge = make(B=(3,), T=20, C=5, mode=mode, seed=19)
    lengths = torch.tensor([20, 7, 1])
    for scale in (1.0, 50.0):
        th = (node * scale, edge * scale)
        cpu = CHAIN.log_partition_and_marginals(th, lengths=lengths)
        gpu = CHAIN.log_partition_and_marginals(tuple(x.cuda() for x in th), lengths=lengths.cuda())
        torch.testing.assert_close(gpu[0].cpu(), cpu[0])
        for a, b in zip(gpu[1], cpu[1]):
            assert a.device.type == "cuda"
            torch.testing.assert_close(a.cpu(), b)
        zc = CHAIN.map(th, lengths=lengths)
        zg = CHAIN.map(tuple(x.cuda() for x in th), lengths=lengths.cuda())
        torch.testing.assert_close(zg[0].cpu(), zc[0])
    ties = CHAIN.map((torch.zeros(2, 40, 5, device="cuda"), torch.zeros(5, 5, device="cuda")))
    assert (sg.chain_labels(ties[0]) == 0).all()  # ties to the lowest label on the GPU too
    small = make(B=(2,), T=4, C=3, mode=mode, seed=20)
    check_solver(CHAIN, [Case(small, chain_enum(mode == "shared"), kwargs={"lengths": torch.tensor([4, 2])}, name=mode)], devices=["cuda"], num_samples=500)


@pytest.mark.parametrize("backend", ["numba", "scan"])
def test_log_partition_fuses_the_marginals_only_when_a_gradient_is_wanted(backend, monkeypatch):
    """The forward runs the fused log Z + marginals pass when grad mode is on and an input
    requires grad (the backward then reuses μ), and the forward pass alone otherwise
    (inputs that require grad under torch.no_grad included)."""
    from structgrad.solvers import _chain_backends as cb

    s, impl = sg.get_solver("chain", backend=backend), cb.backend(backend)
    calls = []
    for op in ("log_partition", "log_partition_and_marginals"):
        orig = getattr(impl, op)
        monkeypatch.setattr(impl, op, lambda *a, _o=orig, _n=op: calls.append(_n) or _o(*a))
    node, edge = make(B=(2,), T=5, C=3, mode="shared", seed=3)
    n, e = node.clone().requires_grad_(), edge.clone().requires_grad_()
    with torch.no_grad():
        s.log_partition((n, e))
    s.log_partition((node, edge))
    assert calls == ["log_partition", "log_partition"]
    calls.clear()
    s.log_partition((n, e)).sum().backward()
    assert calls == ["log_partition_and_marginals"]
    mu_n, mu_e = s.marginals((node, edge))
    torch.testing.assert_close(n.grad, mu_n)
    torch.testing.assert_close(e.grad, mu_e.sum(0))


@pytest.mark.parametrize("mode", ["full", "positional", "shared"])
@pytest.mark.parametrize("scale", [1.0, 40.0])
def test_backward_twice_with_retain_graph(mode, scale):
    node, edge = make(B=(2,), T=5, C=3, mode=mode, scale=scale, seed=22)
    n, e = node.clone().requires_grad_(), edge.clone().requires_grad_()
    lz = CHAIN.log_partition((n, e), lengths=torch.tensor([5, 3]))
    lz.sum().backward(retain_graph=True)
    g1 = (n.grad.clone(), e.grad.clone())
    lz.sum().backward()
    torch.testing.assert_close(n.grad, 2 * g1[0])
    torch.testing.assert_close(e.grad, 2 * g1[1])


@pytest.mark.parametrize("backend", ["numba", "scan", "auto"])
def test_extreme_scores_keep_their_differences(backend, monkeypatch):
    """Huge finite scores next to O(1) ones: numba and the scan are exact for |score| <
    1e15 and hand larger ones to the torch kernels (which centre every position exactly)."""
    from structgrad.solvers import _chain_backends as cb

    s = sg.get_solver("chain", backend=backend)
    impl = cb.backend("numba" if backend == "auto" else backend)
    calls = []
    for op in ("log_partition_and_marginals", "log_partition", "viterbi"):
        orig = getattr(impl, op)
        monkeypatch.setattr(impl, op, lambda *a, _o=orig: calls.append(1) or _o(*a))
    C, T, B = 3, 4, 2
    node = torch.randn(B, T, C, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    p = torch.softmax(node.sum(1), -1)  # only constant labellings survive the edges below
    shared = torch.full((C, C), -1e300, dtype=torch.float64)
    shared.fill_diagonal_(1e300)
    offsets = 1e20 * torch.arange(1, T, dtype=torch.float64)  # a different huge offset per position
    per_pos = (torch.eye(C, dtype=torch.float64) * 2 - 1) * 1e22 + offsets.view(T - 1, 1, 1)
    per_pos = per_pos.expand(B, T - 1, C, C).contiguous()
    for edge, counts in ((shared, True), (per_pos, False)):
        mu_n, mu_e = s.marginals((node, edge))
        torch.testing.assert_close(mu_n, p.unsqueeze(1).expand(B, T, C), atol=1e-12, rtol=0)
        want_e = torch.diag_embed(p) * (T - 1) if counts else torch.diag_embed(p).unsqueeze(1).expand(B, T - 1, C, C)
        torch.testing.assert_close(mu_e, want_e, atol=1e-12, rtol=0)
        labels = sg.chain_labels(s.map((node, edge))[0])
        assert torch.equal(labels, node.sum(1).argmax(-1, keepdim=True).expand(B, T))
        lz = s.log_partition((node, edge))
        extra = (T - 1) * 1e300 if counts else float((offsets + 1e22).sum())
        torch.testing.assert_close(lz, torch.logsumexp(node.sum(1), -1) + extra, rtol=1e-15, atol=0)
        lab = sg.chain_labels(s.sample((node, edge), 2000, generator=torch.Generator().manual_seed(1))[0])
        assert bool((lab == lab[..., :1]).all())  # constant labellings only
        freq = torch.nn.functional.one_hot(lab[..., 0], C).double().mean(0)
        assert float((freq - p).abs().max()) < 0.05, (freq, p)
    assert calls == []
    # moderate scores run on the requested kernels
    calls.clear()
    s.marginals((node, torch.randn(C, C, dtype=torch.float64)))
    assert calls == [1]


def test_backend_numba_is_cpu_only_and_named_in_repr():
    s = sg.get_solver("chain", backend="numba")
    assert s.capabilities.devices == ("cpu",) and "numba" in repr(s)
    assert sg.get_solver("chain").backend == "auto"
