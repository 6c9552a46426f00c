"""Documentation that runs.

* every ```python block of README.md and docs/**/*.md is executed, in order, one
  namespace per file (a block preceded by ``<!-- not-run: reason -->`` is skipped,
  and must say why: e.g. it needs a GPU);
* every module's doctests run (structgrad, structgrad.nn, structgrad.solvers);
* every public name has a docstring (the API reference is generated from them).
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import os
import pkgutil
import re
from pathlib import Path

import pytest
import torch

import structgrad

ROOT = Path(__file__).resolve().parents[1]
_BLOCK = re.compile(r"(?P<skip><!--\s*not-run:(?P<why>[^>]*)-->\s*\n)?```python\n(?P<code>.*?)\n```", re.S)


def _doc_files() -> list[Path]:
    files = [ROOT / "README.md"]
    docs = ROOT / "docs"
    if docs.is_dir():
        files += sorted(docs.rglob("*.md"))
    return files


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """``[(line number, code, skip reason or None)]`` of the ```python blocks of a Markdown text."""
    out = []
    for m in _BLOCK.finditer(text):
        line = text.count("\n", 0, m.start("code")) + 1
        why = m.group("why").strip() if m.group("skip") else None
        out.append((line, m.group("code"), why))
    return out


def test_block_collector():
    text = "a\n```python\nx = 1\n```\n<!-- not-run: needs a GPU -->\n```python\ny = 2\n```\n```bash\nls\n```\n"
    assert python_blocks(text) == [(3, "x = 1", None), (7, "y = 2", "needs a GPU")]


@pytest.mark.parametrize("path", _doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_markdown_snippets_run_in_order(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # snippets that write files write them here
    torch.manual_seed(0)
    blocks = python_blocks(path.read_text())
    ns: dict = {"__name__": "__snippet__"}
    ran = 0
    for line, code, why in blocks:
        if why is not None:
            assert why, f"{path.name}:{line}: a not-run block must say why"
            continue
        try:
            exec(compile(code, f"{path.name}:{line}", "exec"), ns)
        except Exception as e:  # noqa: BLE001 - report which block failed
            raise AssertionError(f"{path.relative_to(ROOT)}, the python block at line {line} failed: {type(e).__name__}: {e}") from e
        ran += 1
    assert ran or not blocks


def _modules() -> list[str]:
    names = []
    for pkg in ("structgrad", "structgrad.solvers"):
        mod = importlib.import_module(pkg)
        names.append(pkg)
        for info in pkgutil.walk_packages(mod.__path__, prefix=pkg + "."):
            if info.name.startswith("structgrad.solvers.") and pkg == "structgrad":
                continue  # walked from structgrad.solvers itself
            names.append(info.name)
    return sorted(set(names))


@pytest.mark.parametrize("name", _modules())
def test_module_doctests(name, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    mod = importlib.import_module(name)
    torch.manual_seed(0)
    res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert res.failed == 0, f"{name}: {res.failed} of {res.attempted} doctest examples failed (run python -m doctest -v)"


def _public_objects():
    seen = []
    mods = [structgrad] + [importlib.import_module(m) for m in ("structgrad.checks", "structgrad.testing", "structgrad.logspace")]
    if importlib.util.find_spec("structgrad.nn"):
        mods.append(importlib.import_module("structgrad.nn"))
    for mod in mods:
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name)
            if inspect.ismodule(obj):
                continue
            seen.append((f"{mod.__name__}.{name}", obj))
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    if attr.startswith("_") or not (inspect.isfunction(member) or isinstance(member, (property, staticmethod, classmethod))):
                        continue
                    seen.append((f"{mod.__name__}.{name}.{attr}", member))
    return seen


def test_every_public_name_has_a_docstring():
    missing = [qual for qual, obj in _public_objects() if not (inspect.getdoc(obj) or "").strip()]
    assert not missing, f"public names without a docstring: {missing}"
