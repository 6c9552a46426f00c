"""Build (or serve) the documentation: ``python docs/build.py [build|serve] [mkdocs options]``.

The package ``structgrad.solvers`` lives in the top-level folder ``solvers/`` (see
DESIGN.md §2), which static tools cannot map to its installed name.  This script lays
out the installed package tree under ``build/docs_src/`` (``structgrad/*`` plus
``structgrad/solvers/*`` from ``solvers/``) for mkdocstrings to read, then runs
``mkdocs`` in strict mode: a broken reference or a docstring griffe cannot parse fails
the build.  In the copies, the Sphinx roles the docstrings use for cross-references
(``:func:`~structgrad.nll```) become code spans (`` `nll` ``), which Markdown renders.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREE = ROOT / "build" / "docs_src"


_ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|exc|obj):`(~?)([^`]+)`")


def _code_span(m: re.Match) -> str:
    name = m.group(2)
    return f"`{name.rsplit('.', 1)[-1] if m.group(1) else name}`"


def _copy_tree(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.name == "__pycache__":
            continue
        if item.is_dir():
            _copy_tree(item, dst / item.name)
        elif item.suffix == ".py":
            (dst / item.name).write_text(_ROLE.sub(_code_span, item.read_text()))


def lay_out() -> Path:
    """``build/docs_src/structgrad``: the installed layout, Sphinx roles as code spans."""
    if TREE.exists():
        shutil.rmtree(TREE)
    _copy_tree(ROOT / "structgrad", TREE / "structgrad")
    _copy_tree(ROOT / "solvers", TREE / "structgrad" / "solvers")
    return TREE


def main(argv: list[str]) -> int:
    cmd = argv[:1] or ["build"]
    lay_out()
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    extra = ["--strict"] if cmd[0] == "build" else []
    return subprocess.call([sys.executable, "-m", "mkdocs", *cmd, *extra, *argv[1:]], cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
