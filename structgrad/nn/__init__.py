"""Neural-network layers built on structgrad solvers."""

__all__: list[str] = []
