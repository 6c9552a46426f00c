"""Private timing script for the chain kernels of issue 11 (not part of ``python -m benchmarks``).

Run:  python benchmarks/_chain_kernels.py [--quick] [--device cuda] [--compile] [--threads]

CPU (default): torch at 1 thread, all contenders in one process, interleaved
rounds, medians (benchmarks/_common.py).  The numba kernels are called through
their torch glue (``t_*``: zero-copy NumPy views in, tensors in θ's dtype out), so
conversion costs are included.  Contenders per shape (B, T, C), float32 scores:

* ``logZ+marg``: numba fused pass, the torch backend's one-pass
  ``log_partition_and_marginals``, the log-depth scan (CPU), torch-struct
  (partition + marginals by autograd).
* ``viterbi``: numba labels + indicators (what ``map`` returns), the torch backend's
  ``map``, the scan, torch-struct ``argmax``, pytorch-crf ``decode``.
* ``nll f+b shared``: ``sg.nll(...).backward()`` through a ChainSolver whose
  ``_log_partition_and_marginals`` is the numba kernel (the wiring the lead will
  do), the torch backend's nll, and pytorch-crf's forward+backward (inputs coincide:
  emissions = node, transitions = the shared edge, start/end 0).
* ``lpm shared``: numba vs the torch backend, log Z + marginals with a (C, C) edge.

``--threads``: serial vs a 2-thread pool vs prange(2) at (32, 128, 16).
``--compile``: first-call cost in a fresh process with an empty NUMBA_CACHE_DIR.
``--device cuda``: scan vs the sequential torch backend vs torch-struct on the GPU.
Timings on a shared machine are noisy: read ratios, not absolute figures.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import structgrad as sg  # noqa: E402
from benchmarks._common import interleaved, machine, markdown, row, setup  # noqa: E402
from structgrad.solvers import _chain_scan as cs  # noqa: E402

SHAPES = [(32, 128, 16), (32, 128, 64), (1, 512, 32)]


def _quiet(f, *a):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return f(*a)


def _numba_solver():
    """A ChainSolver whose one-pass log Z + marginals is the numba kernel (flat batch only)."""
    from structgrad.solvers import _numba_chain as nc
    from structgrad.solvers.chain import ChainSolver

    class NumbaChain(ChainSolver):
        def _log_partition_and_marginals(self, theta, lengths=None):
            A, mu, emu = nc.t_log_partition_and_marginals(theta[0], theta[1], lengths)
            return A, (mu, emu)

    return NumbaChain()


def _indicators(labels, C, dtype):
    """What ``map`` returns for per-position edges: one-hot labels and transitions."""
    valid = labels >= 0
    node = torch.zeros(labels.shape + (C,), dtype=dtype)
    node.scatter_(-1, labels.clamp(min=0).unsqueeze(-1), valid.unsqueeze(-1).to(dtype))
    pair = labels[..., :-1].clamp(min=0) * C + labels[..., 1:].clamp(min=0)
    edge = torch.zeros(pair.shape + (C * C,), dtype=dtype)
    edge.scatter_(-1, pair.unsqueeze(-1), (valid[..., :-1] & valid[..., 1:]).to(dtype).unsqueeze(-1))
    return node, edge.view(labels.shape[:-1] + (labels.shape[-1] - 1, C, C))


def cpu(shapes, rounds: int) -> list[dict]:
    import torch_struct
    from torchcrf import CRF

    from benchmarks.chain import torch_struct_potentials
    from structgrad.solvers import _numba_chain as nc

    chain, nchain = sg.get_solver("chain"), _numba_solver()
    rows = []
    for B, T, C in shapes:
        g = torch.Generator().manual_seed(0)
        node = torch.randn(B, T, C, generator=g)
        edge = torch.randn(B, T - 1, C, C, generator=g)
        shared = torch.randn(C, C, generator=g)
        tags = torch.randint(C, (B, T), generator=g)
        phi = torch_struct_potentials(node, edge)
        crf = CRF(C, batch_first=True)
        with torch.no_grad():
            crf.transitions.copy_(shared)
            crf.start_transitions.zero_()
            crf.end_transitions.zero_()
        gold = sg.chain_indicators(tags, C, shared_edge=True)
        case = f"(B,T,C) = ({B}, {T}, {C})"

        # same numbers first
        A, mu, emu = nc.t_log_partition_and_marginals(node, edge)
        rA, (rmu, remu) = chain.log_partition_and_marginals((node, edge))
        assert float((A - rA).abs().max()) < 1e-3 and float((mu - rmu).abs().max()) < 1e-4
        assert torch.equal(nc.t_viterbi(node, edge), sg.chain_labels(chain.map((node, edge))[0]))
        assert torch.equal(cs.viterbi(node, edge), nc.t_viterbi(node, edge))
        assert float((sg.nll((node, shared), gold, nchain) - sg.nll((node, shared), gold, chain)).abs().max()) < 1e-3

        def ts_marg():
            p = phi.clone().requires_grad_()
            dist = torch_struct.LinearChainCRF(p)
            dist.partition
            dist.marginals

        fns = {
            "numba": lambda: nc.t_log_partition_and_marginals(node, edge),
            "torch": lambda: chain.log_partition_and_marginals((node, edge)),
            "scan": lambda: cs.log_partition_and_marginals(node, edge),
        }
        if C < 64:  # torch-struct's marginals at C = 64 take ~13 GB on the CPU: not on a shared 24 GB box
            fns["torch-struct"] = ts_marg
        t = interleaved(fns, rounds)
        for ours in ("numba", "scan"):
            for peer in [p for p in ("torch", "torch-struct") if p in t]:
                rows.append(row("chain kernels", f"log Z + marginals {case}", ours, t[ours], peer, t[peer]))

        t = interleaved(
            {
                "numba": lambda: _indicators(nc.t_viterbi(node, edge), C, node.dtype),
                "torch": lambda: chain.map((node, edge)),
                "scan": lambda: _indicators(cs.viterbi(node, edge), C, node.dtype),
                "torch-struct": lambda: torch_struct.LinearChainCRF(phi).argmax,
                "pytorch-crf": lambda: _quiet(crf.decode, node),
            },
            rounds,
        )
        for ours in ("numba", "scan"):
            for peer in ("torch", "torch-struct", "pytorch-crf"):
                rows.append(row("chain kernels", f"Viterbi {case}", ours, t[ours], peer, t[peer]))

        def nll_with(solver):
            def f():
                n, e = node.clone().requires_grad_(), shared.clone().requires_grad_()
                sg.nll((n, e), gold, solver).sum().backward()

            return f

        def crf_nll():
            crf.zero_grad()
            n = node.clone().requires_grad_()
            _quiet(lambda: (-crf(n, tags, reduction="sum")).backward())

        t = interleaved({"numba": nll_with(nchain), "torch": nll_with(chain), "pytorch-crf": crf_nll}, rounds)
        for peer in ("torch", "pytorch-crf"):
            rows.append(row("chain kernels", f"nll f+b, shared (C,C) {case}", "numba", t["numba"], peer, t[peer]))
        t = interleaved(
            {
                "numba": lambda: nc.t_log_partition_and_marginals(node, shared),
                "torch": lambda: chain.log_partition_and_marginals((node, shared)),
                "scan": lambda: cs.log_partition_and_marginals(node, shared),
            },
            rounds,
        )
        for ours in ("numba", "scan"):
            rows.append(row("chain kernels", f"log Z + marginals, shared (C,C) {case}", ours, t[ours], "torch", t["torch"]))
    return rows


def threads(rounds: int) -> list[dict]:
    from structgrad.solvers import _numba_chain as nc

    B, T, C = 32, 128, 16
    g = torch.Generator().manual_seed(0)
    node, edge = torch.randn(B, T, C, generator=g).numpy(), torch.randn(B, T - 1, C, C, generator=g).numpy()
    n0 = torch.get_num_threads()
    t = interleaved(
        {
            "serial": lambda: nc.log_partition_and_marginals(node, edge),
            "pool2": lambda: nc.log_partition_and_marginals(node, edge, threads=2),
            "prange2": lambda: nc.repin_torch_threads(nc.log_partition_and_marginals, node, edge, None, None, 2, "prange"),
        },
        rounds,
    )
    assert torch.get_num_threads() == n0
    case = f"log Z + marginals (B,T,C) = ({B}, {T}, {C}), float32"
    return [row("numba threads", case, k, t[k], "serial", t["serial"]) for k in ("pool2", "prange2")]


_COMPILE = r"""
import time, torch
t0 = time.perf_counter()
from structgrad.solvers import _numba_chain as nc
t1 = time.perf_counter(); print(f"import {t1 - t0:.2f}")
for dt in (torch.float32, torch.float64):
    n, e, s = torch.randn(2, 4, 3, dtype=dt), torch.randn(2, 3, 3, 3, dtype=dt), torch.randn(3, 3, dtype=dt)
    for name, f in [("log_partition_and_marginals", lambda: nc.t_log_partition_and_marginals(n, e)),
                    ("log_partition (same kernel)", lambda: nc.t_log_partition(n, s)),
                    ("viterbi", lambda: nc.t_viterbi(n, e)),
                    ("sample", lambda: nc.t_sample(n, e, 2, torch.Generator().manual_seed(0)))]:
        t = time.perf_counter(); f(); print(f"{dt} {name} {time.perf_counter() - t:.2f}")
t = time.perf_counter(); nc.repin_torch_threads(nc.log_partition_and_marginals, n.numpy(), e.numpy(), None, None, 2, "prange")
print(f"prange float64 {time.perf_counter() - t:.2f}")
"""


def compile_cost() -> str:
    """First-call costs (s) in a fresh process, cold cache; then the same with the cache warm."""
    out = []
    with tempfile.TemporaryDirectory() as d:
        env = {**os.environ, "NUMBA_CACHE_DIR": d}
        root = str(Path(__file__).resolve().parents[1])
        for label in ("cold cache", "warm cache"):
            t = time.perf_counter()
            res = subprocess.run([sys.executable, "-c", _COMPILE], env=env, cwd=root, capture_output=True, text=True, check=True)
            out.append(f"## {label} (process total {time.perf_counter() - t:.1f} s)\n{res.stdout}")
    return "\n".join(out)


def gpu(shapes, rounds: int) -> list[dict]:
    """Scan vs the sequential torch backend vs torch-struct, on CUDA."""
    chain = sg.get_solver("chain")
    try:
        import torch_struct
    except ImportError:
        torch_struct = None
    from benchmarks.chain import torch_struct_potentials

    rows = []
    for B, T, C in shapes:
        g = torch.Generator().manual_seed(0)
        node = torch.randn(B, T, C, generator=g).cuda()
        edge = torch.randn(B, T - 1, C, C, generator=g).cuda()
        case = f"(B,T,C) = ({B}, {T}, {C}) cuda"
        A, mu, emu = cs.log_partition_and_marginals(node, edge)
        rA, (rmu, remu) = chain.log_partition_and_marginals((node, edge))
        lab = cs.viterbi(node, edge)
        try:
            rlab = sg.chain_labels(chain.map((node, edge))[0])
        except RuntimeError as err:  # report a failing sequential backend, time the rest
            print(f"{case}: the torch backend's map failed: {err}", flush=True)
            rlab = lab
        print(
            f"{case}: |A - A_seq| {float((A - rA).abs().max()):.2e} (|A| ~ {float(rA.abs().max()):.0f}), "
            f"|mu - mu_seq| {float((mu - rmu).abs().max()):.2e}, |emu - emu_seq| {float((emu - remu).abs().max()):.2e}, "
            f"Viterbi label mismatches {int((lab != rlab).sum())} / {lab.numel()}",
            flush=True,
        )
        fns = {
            "scan": lambda: cs.log_partition_and_marginals(node, edge),
            "torch": lambda: chain.log_partition_and_marginals((node, edge)),
            "scan autograd": lambda: _grad(lambda n, e: cs.log_partition(n, e), node, edge),
            "torch autograd": lambda: _grad(lambda n, e: chain.log_partition((n, e)), node, edge),
        }
        vit = {"scan": lambda: cs.viterbi(node, edge)}
        if rlab is not lab:
            vit["torch"] = lambda: chain.map((node, edge))
        if torch_struct is not None:
            phi = torch_struct_potentials(node, edge)

            def ts_marg():
                p = phi.clone().requires_grad_()
                dist = torch_struct.LinearChainCRF(p)
                dist.partition
                dist.marginals

            fns["torch-struct"] = ts_marg
            vit["torch-struct"] = lambda: torch_struct.LinearChainCRF(phi).argmax
        t = interleaved(fns, rounds, budget=8)
        for peer in [k for k in t if k != "scan"]:
            rows.append(row("chain scan", f"log Z + marginals {case}", "scan", t["scan"], peer, t[peer]))
        t = interleaved(vit, rounds, budget=8)
        for peer in [k for k in t if k != "scan"]:
            rows.append(row("chain scan", f"Viterbi {case}", "scan", t["scan"], peer, t[peer]))
    return rows


def _grad(f, node, edge):
    n, e = node.clone().requires_grad_(), edge.clone().requires_grad_()
    f(n, e).sum().backward()


def run(quick: bool = False) -> list[dict]:
    warnings.filterwarnings("ignore", module="torch_struct")
    return cpu([(4, 16, 5)] if quick else SHAPES, 2 if quick else 15)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--compile", action="store_true", help="first-call compile cost only")
    ap.add_argument("--threads", action="store_true", help="thread pool vs prange only")
    args = ap.parse_args(argv)
    setup(args.device)
    warnings.filterwarnings("ignore", module="torch_struct")
    if args.compile:
        print(compile_cost())
        return
    shapes = [(4, 16, 5)] if args.quick else SHAPES
    rounds = 2 if args.quick else args.rounds
    if args.threads:
        rows = threads(rounds)
    elif args.device == "cuda":
        extra = [] if args.quick or os.environ.get("CHAIN_GPU_NO_EXTRA") else [(32, 512, 32), (256, 128, 16)]
        rows = gpu(shapes + extra, rounds)
    else:
        rows = cpu(shapes, rounds)
    print(f"Measured {machine(args.device)}; load {os.getloadavg()[0]:.1f}; medians of interleaved rounds; ratio = peer / ours\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
