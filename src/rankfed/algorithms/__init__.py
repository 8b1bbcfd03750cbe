"""Federated algorithms, each a server half and a client half (see :mod:`.base`)."""

from rankfed.algorithms.base import (
    ALGORITHMS,
    Algorithm,
    ClientContext,
    ClientHalf,
    RunContext,
    ServerHalf,
    register,
)
from rankfed.algorithms import fedavg, fedhm, hetero, lora, mapa, personal  # noqa: F401  (registers)

__all__ = ["ALGORITHMS", "Algorithm", "ClientContext", "ClientHalf", "RunContext", "ServerHalf", "register", "get_algorithm"]


def get_algorithm(name: str, options: dict | None = None, section: str = "algorithm") -> Algorithm:
    """Instantiate a registered algorithm from its name and (checked) options."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; choose from {', '.join(sorted(ALGORITHMS))}")
    return ALGORITHMS[name].from_options(options or {}, section)
