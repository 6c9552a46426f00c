"""Run every benchmark of the project side by side with its peers.

    python -m benchmarks                 # all of them (tens of minutes on 2 cores)
    python -m benchmarks --quick         # smoke run: tiny sizes, seconds each
    python -m benchmarks --only chain ilp
    python -m benchmarks --device cuda   # the benchmarks that have a CUDA variant
    python -m benchmarks --splice README.md docs/benchmarks.md   # and put the table there

Writes ``benchmarks/out/results.md`` (the Markdown table README.md shows, with
the date and machine), ``results.json`` and ``ratios.png`` (one bar per row, log
scale, 1× marked).  Every ratio is peer time ÷ structgrad's time: "× faster",
higher is better.  ``--splice FILE ...`` replaces the text between the lines
``<!-- benchmarks:begin -->`` and ``<!-- benchmarks:end -->`` of each file with the
table (with its date and machine), so the figures a reader sees are the script's.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine, markdown, setup  # noqa: E402

#: the benchmark modules, in report order (a module not present yet is skipped).
MODULES = ("chain", "crf", "tree", "ksubset", "imle", "ilp", "dpm")


def _figure(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['benchmark']}: {r['case']} ({r['ours']} vs {r['peer']})" for r in rows]
    ratios = [max(r["ratio"], 1e-3) for r in rows]
    benches = list(dict.fromkeys(r["benchmark"] for r in rows))
    colours = {b: plt.cm.tab10(i % 10) for i, b in enumerate(benches)}
    fig, ax = plt.subplots(figsize=(16, 0.3 * len(rows) + 1.6))
    y = range(len(rows))[::-1]
    ax.barh(list(y), ratios, color=[colours[r["benchmark"]] for r in rows])
    ax.axvline(1.0, color="k", lw=1, ls="--", label="1× (as fast as the peer)")
    ax.set_xscale("log")
    ax.set_yticks(list(y), labels, fontsize=7)
    ax.set_xlabel("peer time ÷ structgrad time (× faster, log scale)")
    ax.set_title(title, fontsize=9, loc="left")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[b]) for b in benches]
    ax.legend(handles + [ax.lines[0]], benches + ["1×"], loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def splice(path: Path, text: str, name: str = "benchmarks") -> None:
    """Replace what stands between the lines ``<!-- {name}:begin -->`` and
    ``<!-- {name}:end -->`` of ``path`` with ``text`` (generated figures in documents)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    doc = path.read_text()
    if begin not in doc or end not in doc:
        raise SystemExit(f"{path}: no {begin} ... {end} block to replace")
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{text}\n{end}{tail}")


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, few rounds")
    ap.add_argument("--only", nargs="+", choices=MODULES, help="run only these benchmarks")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"), help="folder for the results")
    ap.add_argument("--splice", nargs="+", default=[], metavar="FILE", help="put the table between the benchmark markers of FILE")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", module="torch_struct")
    setup(args.device)
    rows: list[dict] = []
    skipped: list[str] = []
    for name in args.only or MODULES:
        if importlib.util.find_spec(f"benchmarks.{name}") is None:
            print(f"[{name}] not present, skipped")
            continue
        mod = importlib.import_module(f"benchmarks.{name}")
        if not callable(getattr(mod, "run", None)):
            raise SystemExit(f"benchmarks/{name}.py has no run(quick=False) -> rows; every benchmark module needs one")
        kwargs = {"quick": args.quick}
        if "device" in inspect.signature(mod.run).parameters:
            kwargs["device"] = args.device
        elif args.device != "cpu":
            print(f"[{name}] has no {args.device} variant, skipped")
            continue
        print(f"[{name}] running{' (quick)' if args.quick else ''} ...", flush=True)
        setup(args.device)  # a module may have changed the thread count (numba)
        try:
            got = mod.run(**kwargs)
        except SystemExit as e:  # a benchmark exits with "missing peer (...)" when its peer is not installed
            if "missing peer" not in str(e):
                raise
            print(f"[{name}] skipped: {e}")
            skipped.append(name)
            continue
        for r in got:
            print(f"  {r['case']}: {r['ours']} {r['ours_ms']:.3f} ms, {r['peer']} {r['peer_ms']:.3f} ms, {r['ratio']:.2f}x")
        rows += got
    header = f"Measured {machine(args.device)}{' (quick smoke run: not figures to quote)' if args.quick else ''}."
    if skipped:
        header += f" Not run (peer not installed): {', '.join(skipped)}."
    table = markdown(rows)
    print("\n" + header + "\n\n" + table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(header + "\n\n" + table + "\n")
    (out / "results.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    if rows:
        _figure(rows, out / "ratios.png", header)
    print(f"\nwrote {out / 'results.md'}, results.json, ratios.png")
    for f in args.splice:
        splice(Path(f), header + "\n\n" + table)
        print(f"spliced the table into {f}")
    return rows


if __name__ == "__main__":
    main()
