"""Built-in solver backends, installed as ``structgrad.solvers``.

This folder sits at the top of the repository but is packaged as
``structgrad.solvers`` (see pyproject.toml); it must never be importable as a
top-level ``solvers`` module (a different package of that name is on PyPI).
The core finds these modules lazily through ``structgrad.registry.BUILTIN_SOLVERS``.
"""

if __name__ != "structgrad.solvers":
    raise ImportError(
        f"the structgrad built-in solvers must be imported as 'structgrad.solvers', not {__name__!r}; "
        "install the project (pip install -e .) and use `import structgrad.solvers`"
    )
