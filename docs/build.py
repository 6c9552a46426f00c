"""Build (or serve) the documentation: ``python docs/build.py [build|serve] [mkdocs options]``.

The package ``structgrad.solvers`` lives in the top-level folder ``solvers/`` (see
DESIGN.md §2), which static tools cannot map to its installed name.  This script lays
out the installed package tree under ``build/docs_src/`` (links, no copies:
``structgrad/*`` plus ``structgrad/solvers -> solvers``) for mkdocstrings to read, then
runs ``mkdocs`` in strict mode: a broken reference or a docstring griffe cannot parse
fails the build.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREE = ROOT / "build" / "docs_src"


def lay_out() -> Path:
    """``build/docs_src/structgrad`` as the installed layout, made of symbolic links."""
    pkg = TREE / "structgrad"
    if TREE.exists():
        shutil.rmtree(TREE)
    pkg.mkdir(parents=True)
    for item in (ROOT / "structgrad").iterdir():
        if item.name != "__pycache__":
            (pkg / item.name).symlink_to(item)
    (pkg / "solvers").symlink_to(ROOT / "solvers")
    return TREE


def main(argv: list[str]) -> int:
    cmd = argv[:1] or ["build"]
    lay_out()
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    extra = ["--strict"] if cmd[0] == "build" else []
    return subprocess.call([sys.executable, "-m", "mkdocs", *cmd, *extra, *argv[1:]], cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
