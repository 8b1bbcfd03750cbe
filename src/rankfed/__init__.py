"""rankfed: communication-efficient federated and data-parallel training by low-rank updates."""

__version__ = "0.1.0"
