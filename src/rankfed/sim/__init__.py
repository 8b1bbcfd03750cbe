"""The in-process simulator: the default transport (one machine, every client in one process)."""

from rankfed.sim.simulator import Simulator

__all__ = ["Simulator"]
