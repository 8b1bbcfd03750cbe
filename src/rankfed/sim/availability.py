"""Which clients are reachable in a round: devices that drop out and come back.

``federation.availability = p`` puts each client online with probability p in each round,
drawn from the run's seed and the round only (so a resumed run and every transport see the
same); ``federation.availability_trace = "file"`` reads who is online from a file instead, one
line per round (line r: round r's online client ids, separated by spaces or commas; an empty
line: nobody; ``#`` starts a comment). A round samples its clients among those online, and a
stateful client that was offline misses that round's broadcast: when it is next online the
server brings it up to date first (:meth:`rankfed.server.Rounds.catch_up`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from rankfed.errors import ConfigError

__all__ = ["Availability", "read_trace"]


def read_trace(path: str | os.PathLike, num_clients: int, rounds: int) -> list[list[int]]:
    """The online clients of each round from a trace file (see the module); clear errors naming
    the line for an id that is not a client and for a file with fewer lines than rounds."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"federation.availability_trace = {str(path)!r}: no such file")
    out: list[list[int]] = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text and line.lstrip().startswith("#"):
            continue  # a comment line is not a round
        ids = []
        for tok in filter(None, re.split(r"[,\s]+", text)):
            try:
                cid = int(tok)
            except ValueError:
                raise ConfigError(f"{path}, line {lineno}: {tok!r} is not a client id") from None
            if not 0 <= cid < num_clients:
                raise ConfigError(f"{path}, line {lineno}: client {cid} is not in [0, federation.clients = {num_clients})")
            ids.append(cid)
        out.append(sorted(set(ids)))
    if len(out) < rounds:
        raise ConfigError(f"federation.availability_trace = {str(path)!r}: {len(out)} round(s) of availability for a run of {rounds} rounds")
    return out


class Availability:
    """Round -> the sorted ids of the clients online in it (None: everyone, always)."""

    def __init__(self, num_clients: int, seed: int, p: float = 1.0, trace: list[list[int]] | None = None):
        if not 0.0 < p <= 1.0:
            raise ConfigError(f"federation.availability = {p!r}: must be in (0, 1] (the probability a client is online in a round)")
        self.num_clients, self.seed, self.p, self.trace = num_clients, seed, p, trace

    @property
    def always(self) -> bool:
        return self.trace is None and self.p == 1.0

    def online(self, rnd: int) -> list[int] | None:
        if self.trace is not None:
            return list(self.trace[rnd - 1])
        if self.p == 1.0:
            return None
        rng = np.random.default_rng([self.seed, rnd, 0xA7A1])
        return [int(c) for c in np.flatnonzero(rng.random(self.num_clients) < self.p)]
