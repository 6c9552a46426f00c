"""Linear-chain CRF: structgrad's ``chain`` solver against torch-struct 0.5 and pytorch-crf 0.7.2.

Run:  python benchmarks/chain.py            (full)
      python benchmarks/chain.py --quick    (smoke run)

Peers (install without dependencies so torch is not replaced):
    pip install --no-deps torch-struct==0.5 pytorch-crf==0.7.2

What is timed, per shape (B, T, C), torch at 1 thread, all contenders in one
process, interleaved (one call of each per round, order rotated), medians over
rounds:

* ``logZ+marg``: log Z and all marginals with per-position edge scores
  (B, T−1, C, C). structgrad: ``log_partition(θ).sum().backward()`` (the gradient
  *is* the marginals) and the one-pass ``log_partition_and_marginals``;
  torch-struct: ``LinearChainCRF(φ).partition`` + ``.marginals`` (its marginals
  are autograd of the partition) on the equivalent potentials
  φ[t, j, i] = edge[t, i, j] + node[t+1, j] (+ node[0, i] at t = 0).
* ``viterbi``: structgrad ``map`` vs torch-struct ``.argmax`` on the per-position
  potentials above, and structgrad ``map((node, shared))`` vs pytorch-crf ``decode`` with
  one shared (C, C) transition matrix (pytorch-crf's only layout; the inputs coincide,
  as for the nll below).
* ``nll f+b (shared)``: the negative log-likelihood of gold tags and its backward
  with one shared (C, C) transition matrix, where the inputs coincide with
  pytorch-crf's (emissions = node, transitions = edge, start/end transitions 0):
  structgrad ``nll(θ, gold, "chain").sum().backward()`` vs
  ``(-crf(emissions, tags, reduction="sum")).backward()``.

Before timing, each pair of contenders is checked to compute the same numbers.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import structgrad as sg  # noqa: E402
from benchmarks._common import cli, interleaved, row  # noqa: E402


def _peers():
    try:
        import torch_struct
        from torchcrf import CRF
    except ImportError as e:  # pragma: no cover - a clear message for a missing peer
        sys.exit(f"missing peer ({e}); install: pip install --no-deps torch-struct==0.5 pytorch-crf==0.7.2")
    return torch_struct, CRF


def torch_struct_potentials(node: torch.Tensor, edge: torch.Tensor) -> torch.Tensor:
    """φ (B, T−1, C, C) with φ[t, j, i] scoring label i at t and j at t+1 (torch-struct's order)."""
    phi = edge + node[:, 1:, None, :]
    phi[:, 0] += node[:, 0, :, None]
    return phi.transpose(-1, -2).contiguous()


def measure(shapes, rounds: int, device: str = "cpu") -> list[dict]:
    torch_struct, CRF = _peers()
    chain = sg.get_solver("chain")
    rows = []
    for B, T, C in shapes:
        g = torch.Generator().manual_seed(0)
        node = torch.randn(B, T, C, generator=g).to(device)
        edge = torch.randn(B, T - 1, C, C, generator=g).to(device)
        shared = torch.randn(C, C, generator=g).to(device)
        tags = torch.randint(C, (B, T), generator=g).to(device)
        phi = torch_struct_potentials(node, edge)

        # --- same numbers first
        lz = chain.log_partition((node, edge))
        lz_ts = torch_struct.LinearChainCRF(phi).partition
        crf = CRF(C, batch_first=True).to(device)
        with torch.no_grad():
            crf.transitions.copy_(shared)
            crf.start_transitions.zero_()
            crf.end_transitions.zero_()
        gold = sg.chain_indicators(tags, C, shared_edge=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pytorch-crf 0.7.2 uses a uint8 mask in torch.where
            nll_crf = -crf(node, tags, reduction="none")
            path_crf = crf.decode(node)
        nll_sg = sg.nll((node, shared), gold, chain)
        map_sg = sg.chain_labels(chain.map((node, shared))[0])
        ok = {
            "logZ vs torch-struct": float((lz - lz_ts).detach().abs().max()),
            "nll vs pytorch-crf": float((nll_sg - nll_crf).detach().abs().max()),
            "viterbi vs pytorch-crf (label mismatches)": float((map_sg.cpu() != torch.tensor(path_crf)).sum()),
        }

        # --- timings
        def sg_autograd():
            n, e = node.clone().requires_grad_(), edge.clone().requires_grad_()
            chain.log_partition((n, e)).sum().backward()

        def sg_onepass():
            chain.log_partition_and_marginals((node, edge))

        def ts_marg():
            p = phi.clone().requires_grad_()
            dist = torch_struct.LinearChainCRF(p)
            dist.partition
            dist.marginals

        t_marg = interleaved({"structgrad": sg_autograd, "structgrad 1-pass": sg_onepass, "torch-struct": ts_marg}, rounds)

        t_vit = interleaved(
            {
                "structgrad": lambda: chain.map((node, edge)),
                "structgrad shared": lambda: chain.map((node, shared)),
                "torch-struct": lambda: torch_struct.LinearChainCRF(phi).argmax,
                "pytorch-crf": lambda: _quiet(crf.decode, node),
            },
            rounds,
        )

        def sg_nll():
            n, e = node.clone().requires_grad_(), shared.clone().requires_grad_()
            sg.nll((n, e), gold, chain).sum().backward()

        def crf_nll():
            crf.zero_grad()
            n = node.clone().requires_grad_()
            _quiet(lambda: (-crf(n, tags, reduction="sum")).backward())

        t_nll = interleaved({"structgrad": sg_nll, "pytorch-crf": crf_nll}, rounds)
        used = chain._impl((node, edge), "marginals")
        rows.append({"shape": (B, T, C), "check": ok, "marg": t_marg, "vit": t_vit, "nll": t_nll, "backend": f"auto: {used}"})
    return rows


def _quiet(f, *a):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return f(*a)


def to_rows(measured: list[dict]) -> list[dict]:
    """The measurements as rows of the suite's convention (ratio = peer / structgrad)."""
    rows = []
    for r in measured:
        case = "(B,T,C) = ({}, {}, {})".format(*r["shape"])
        m, v, n = r["marg"], r["vit"], r["nll"]
        b = r["backend"]
        rows.append(row("chain", f"log Z + marginals {case}", f"log_partition+backward [{b}]", m["structgrad"], "torch-struct", m["torch-struct"]))
        rows.append(row("chain", f"log Z + marginals {case}", f"log_partition_and_marginals [{b}]", m["structgrad 1-pass"], "torch-struct", m["torch-struct"]))
        rows.append(row("chain", f"Viterbi {case}", f"map [{b}]", v["structgrad"], "torch-struct", v["torch-struct"]))
        rows.append(row("chain", f"Viterbi, shared (C,C) {case}", f"map [{b}]", v["structgrad shared"], "pytorch-crf decode", v["pytorch-crf"]))
        rows.append(row("chain", f"nll fwd+bwd, shared (C,C) {case}", f"nll [{b}]", n["structgrad"], "pytorch-crf", n["pytorch-crf"]))
    return rows


SHAPES = [(32, 128, 16), (32, 128, 64), (1, 512, 32)]


def run(quick: bool = False, device: str = "cpu", rounds: int = 15) -> list[dict]:
    """The suite's entry point: checks agreement, times, returns rows."""
    warnings.filterwarnings("ignore", module="torch_struct")  # its distributions lack arg_constraints
    shapes, rounds = ([(4, 16, 5)], 2) if quick else (SHAPES, rounds)
    measured = measure(shapes, rounds, device)
    for r in measured:
        bad = {k: v for k, v in r["check"].items() if v > 1e-3}
        if bad:
            raise RuntimeError(f"chain benchmark {r['shape']}: contenders disagree: {bad}")
    return to_rows(measured)


def main(argv=None) -> None:
    cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
