"""The CRF layer ``structgrad.nn.LinearChainCRF`` against pytorch-crf 0.7.2 and torch-struct 0.5.

Run:  python benchmarks/crf.py            (full: a few minutes on 2 cores)
      python benchmarks/crf.py --quick    (smoke run)
      python benchmarks/crf.py --device cuda
      python -m benchmarks --only crf     (as part of the suite)

Peers (install without dependencies so torch is not replaced):
    pip install --no-deps torch-struct==0.5 pytorch-crf==0.7.2

What is timed, per shape (B, T, C), float32, torch at 1 thread, contenders in one
process, calls interleaved round by round (order rotated), medians over rounds.
Every contender gets the same emissions, transitions, start and end scores (copied
from one to the other), and before timing each pair is checked to compute the same
losses and paths.

* ``fwd+bwd``: the loss of gold tags and its backward into the emissions and the
  layer's parameters, gold scoring included.  Ours: ``crf(emissions, tags,
  reduction="sum").backward()``; pytorch-crf: ``(-crf(emissions, tags,
  reduction="sum")).backward()``; torch-struct: potentials φ (B, T−1, C, C) built from
  the same parameters by autograd, ``-LinearChainCRF(φ).log_prob(parts).sum()``,
  backward — with the gold ``parts`` (its one-hot (B, T−1, C, C) event) built
  *outside* the timed call, which favours torch-struct; and the recipe before the
  layer existed, ``nll`` with one-hot gold arrays from ``chain_indicators`` (start/end
  folded in by hand), to show what gathering the gold score saves.
* ``fwd+bwd, lengths``: the same with random lengths in [T/2, T] (pytorch-crf: the
  equivalent byte mask).
* ``decode``: ``crf.decode(emissions)`` (a (B, T) tensor) vs pytorch-crf ``decode``
  (lists) and torch-struct ``argmax`` (one-hot parts).
* ``BIO``: with a BIO transition mask (O + 8 chunk types, C = 17): ours scores
  forbidden transitions −inf (the chain solver's float64 log-space path); pytorch-crf
  has no constraints, so its forbidden transitions get −10000 (the usual workaround).

Targets (issue 12): fwd+bwd ≥ 3× pytorch-crf, decode ≥ 3× pytorch-crf.
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

SHAPES = [(32, 128, 16), (1, 512, 32)]
BIO_SHAPE = (32, 128, 17)


def _peers():
    try:
        import torch_struct
        from torchcrf import CRF
    except ImportError as e:  # pragma: no cover - a clear message for a missing peer
        sys.exit(f"missing peer ({e}); install: pip install --no-deps torch-struct==0.5 pytorch-crf==0.7.2")
    return torch_struct, CRF


def _quiet(f, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pytorch-crf 0.7.2 uses a uint8 mask in torch.where
        return f(*a, **k)


def _pair(C: int, g: torch.Generator, CRF, constraints=None):
    """Our layer and a pytorch-crf layer with the same random parameters."""
    ours = sg.nn.LinearChainCRF(C, constraints=constraints)
    ref = CRF(C, batch_first=True)
    with torch.no_grad():
        for p, q in ((ours.transitions, ref.transitions), (ours.start, ref.start_transitions), (ours.end, ref.end_transitions)):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            q.copy_(p)
        if constraints is not None:  # pytorch-crf has no constraints: -1e4 is the usual stand-in
            ref.transitions.masked_fill_(~ours.transition_mask, -1e4)
            ref.start_transitions.masked_fill_(~ours.start_mask, -1e4)
            ref.end_transitions.masked_fill_(~ours.end_mask, -1e4)
    return ours, ref


def _ts_potentials(em, trans, start, end):
    """torch-struct's φ[b, t, j, i] (label i at t, j at t+1), full lengths, by autograd."""
    phi = trans.t().unsqueeze(0).unsqueeze(0) + em[:, 1:, :, None]  # (B, T−1, C, C)
    first = torch.zeros_like(phi)
    first[:, 0] = (em[:, 0] + start)[:, None, :]
    first[:, -1] += end[None, :, None]
    return (phi + first).contiguous()


def _onehot_recipe(ours, em, tags, lengths, chain):
    """The pre-layer recipe: start/end folded by hand, one-hot gold via chain_indicators, nll."""
    B, T, C = em.shape
    L = lengths if lengths is not None else torch.full((B,), T, dtype=torch.long, device=em.device)
    node = em.clone()
    node[:, 0] = node[:, 0] + ours.start
    node = node + torch.nn.functional.one_hot(L - 1, T).to(em.dtype)[..., None] * ours.end
    gold = sg.chain_indicators(tags, C, lengths, shared_edge=True)
    return sg.nll((node, ours.transitions), gold, chain, lengths=lengths)


def measure(shape, rounds: int, *, lengths: bool = False, bio: bool = False, device: str = "cpu") -> dict:
    torch_struct, CRF = _peers()
    B, T, C = shape
    g = torch.Generator().manual_seed(0)
    cons = None
    if bio:
        names = ["O"] + [f"{p}-T{k}" for k in range((C - 1) // 2) for p in "BI"]
        cons = sg.nn.allowed_transitions(names, "BIO")
    ours, ref = _pair(C, g, CRF, cons)
    em = torch.randn(B, T, C, generator=g) * 2
    L = torch.randint(T // 2, T + 1, (B,), generator=g) if lengths else None
    mask = None if L is None else torch.arange(T) < L[:, None]
    if bio:  # gold sequences the constraints allow: sample them from the constrained layer
        tags = ours.sample(em, 1, L, generator=g)[0].clamp(min=0)
    else:
        tags = torch.randint(C, (B, T), generator=g)
    ours, ref, em, tags = ours.to(device), ref.to(device), em.to(device), tags.to(device)
    L = None if L is None else L.to(device)
    mask = None if mask is None else mask.to(device)

    # --- the same numbers first
    nll_ours = ours(em, tags, L, reduction="none").detach()
    nll_ref = -_quiet(ref, em, tags, mask, reduction="none").detach()
    paths_ours = ours.decode(em, L)
    paths_ref = _quiet(ref.decode, em, mask)
    n = [T] * B if L is None else L.tolist()
    check = {
        "nll vs pytorch-crf (max rel. diff)": float(((nll_ours - nll_ref).abs() / nll_ref.abs().clamp(min=1)).max()),
        "decode vs pytorch-crf (label mismatches)": float(
            sum(r[:k].tolist() != p for r, k, p in zip(paths_ours, n, paths_ref))
        ),
    }
    chain = sg.get_solver("chain")
    use_ts = not lengths and not bio
    if use_ts:
        parts = torch_struct.LinearChainCRF.struct.to_parts(tags.cpu(), C).to(device, em.dtype)  # outside the timed call
        ts_nll = -torch_struct.LinearChainCRF(_ts_potentials(em, ours.transitions, ours.start, ours.end)).log_prob(parts).detach()
        check["nll vs torch-struct (max rel. diff)"] = float(((nll_ours - ts_nll).abs() / ts_nll.abs().clamp(min=1)).max())
        check["nll vs one-hot recipe"] = float((_onehot_recipe(ours, em, tags, L, chain).detach() - nll_ours).abs().max())

    # --- timings
    def f_ours():
        x = em.clone().requires_grad_()
        ours(x, tags, L, reduction="sum").backward()

    def f_ref():
        x = em.clone().requires_grad_()
        _quiet(lambda: (-ref(x, tags, mask, reduction="sum")).backward())

    fns = {"ours": f_ours, "pytorch-crf": f_ref}
    if use_ts:

        def f_ts():
            x = em.clone().requires_grad_()
            phi = _ts_potentials(x, ours.transitions, ours.start, ours.end)
            (-torch_struct.LinearChainCRF(phi).log_prob(parts).sum()).backward()

        def f_onehot():
            x = em.clone().requires_grad_()
            _onehot_recipe(ours, x, tags, L, chain).sum().backward()

        fns |= {"torch-struct": f_ts, "one-hot recipe": f_onehot}
    t_fb = interleaved(fns, rounds)
    dec = {"ours": lambda: ours.decode(em, L), "pytorch-crf": lambda: _quiet(ref.decode, em, mask)}
    if use_ts:
        phi_d = _ts_potentials(em, ours.transitions.detach(), ours.start.detach(), ours.end.detach())
        dec["torch-struct"] = lambda: torch_struct.LinearChainCRF(phi_d).argmax
    t_dec = interleaved(dec, rounds)
    return {"shape": shape, "lengths": lengths, "bio": bio, "check": check, "fb": t_fb, "dec": t_dec}


def to_rows(m: dict) -> list[dict]:
    B, T, C = m["shape"]
    tag = "BIO, " if m["bio"] else ""
    case = f"({tag}B,T,C) = ({B}, {T}, {C}){', lengths' if m['lengths'] else ''}"
    fb, dec = m["fb"], m["dec"]
    peer_fb = "pytorch-crf (-1e4 forbidden)" if m["bio"] else "pytorch-crf"
    rows = [row("crf", f"fwd+bwd {case}", "LinearChainCRF", fb["ours"], peer_fb, fb["pytorch-crf"])]
    if "torch-struct" in fb:
        rows.append(row("crf", f"fwd+bwd {case}", "LinearChainCRF", fb["ours"], "torch-struct (gold parts prebuilt)", fb["torch-struct"]))
        rows.append(row("crf", f"fwd+bwd {case}", "LinearChainCRF", fb["ours"], "nll + one-hot gold (pre-layer recipe)", fb["one-hot recipe"]))
    rows.append(row("crf", f"decode {case}", "decode", dec["ours"], peer_fb + " decode", dec["pytorch-crf"]))
    if "torch-struct" in dec:
        rows.append(row("crf", f"decode {case}", "decode", dec["ours"], "torch-struct argmax", dec["torch-struct"]))
    return rows


def run(quick: bool = False, device: str = "cpu", rounds: int = 15) -> list[dict]:
    """The suite's entry point: checks agreement, times, returns rows (ratio = peer / ours)."""
    warnings.filterwarnings("ignore", module="torch_struct")  # its distributions lack arg_constraints
    if quick:
        plan, rounds = [((4, 16, 5), False, False), ((4, 16, 5), True, False), ((4, 16, 5), False, True)], 2
    else:
        plan = [(s, False, False) for s in SHAPES] + [(SHAPES[0], True, False), (BIO_SHAPE, False, True)]
    rows = []
    for shape, lengths, bio in plan:
        m = measure(shape, rounds, lengths=lengths, bio=bio, device=device)
        bad = {k: v for k, v in m["check"].items() if v > (0 if "mismatches" in k else 1e-4)}
        if bad:
            raise RuntimeError(f"crf benchmark {shape}: contenders disagree: {bad}")
        rows += to_rows(m)
    return rows


def main(argv=None) -> None:
    cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
