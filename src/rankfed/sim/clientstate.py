"""Per-client state on disk, with a bounded cache in memory (``federation.client_state = "disk"``).

Algorithms that remember something per client keep it in ``ClientContext.state``: an uplink
compressor's error-feedback residual (a dense model-sized tensor), GreedyLore's bases,
pFedLoRU's personal factors. Kept in RAM that is clients x state: 25 GB for the 2.5 MB MLP at
10,000 clients. :class:`DiskClientStates` keeps it in a folder instead (the run folder's
``client-state/``), one file per client, and holds at most ``cache`` clients' states in
memory (least recently used first out, written on the way out).

Files are written atomically (to a temporary name, then renamed) and never overwritten: each
write of a client's state is a new file ``<cid>-<n>.pt``, and the index (client -> file) is
what a resume point saves (:meth:`commit`). Files the last resume point does not name are
deleted once the next one is saved (:meth:`collect`), so a run killed between two resume points resumes from the states
of the first, exactly as ``federation.client_state = "memory"`` does. Loaded with
``torch.load(mmap=True)``: a state's tensors are read from the page cache as the client uses
them, copied on write.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import torch

__all__ = ["DiskClientStates", "CLIENT_STATE_KINDS"]

CLIENT_STATE_KINDS = ("memory", "disk")


class DiskClientStates:
    """Client id -> that client's state dict, in ``folder`` with ``cache`` of them in memory.

    The mapping operations the simulator uses: ``get(cid, default)``, ``states[cid] = state``
    (the state to keep: written when it leaves the cache), ``cid in states``, ``len(states)``.
    """

    def __init__(self, folder: str | os.PathLike, cache: int = 256):
        if cache < 1:
            raise ValueError(f"federation.client_state_cache = {cache}: must be >= 1")
        self.folder = Path(folder)  # made at the first write
        self.cache_size = cache
        self.files: dict[int, str] = {}  # client -> the file holding its latest written state
        self._cache: OrderedDict[int, dict] = OrderedDict()
        self._dirty: set[int] = set()
        self._writes = 0

    # -- the mapping -----------------------------------------------------------------------------
    def get(self, cid: int, default=None):
        if cid in self._cache:
            self._cache.move_to_end(cid)
            return self._cache[cid]
        name = self.files.get(cid)
        if name is None:
            return default
        state = torch.load(self.folder / name, map_location="cpu", mmap=True, weights_only=False)  # written by this run
        self._keep(cid, state)
        return state

    def __setitem__(self, cid: int, state: dict) -> None:
        self._keep(cid, state)
        self._dirty.add(cid)

    def __contains__(self, cid: object) -> bool:
        return cid in self._cache or cid in self.files

    def __len__(self) -> int:
        return len(self.files.keys() | self._cache.keys())

    @property
    def cached(self) -> int:
        """How many clients' states are in memory now."""
        return len(self._cache)

    # -- cache and files ---------------------------------------------------------------------------
    def _keep(self, cid: int, state: dict) -> None:
        self._cache[cid] = state
        self._cache.move_to_end(cid)
        while len(self._cache) > self.cache_size:
            old, old_state = self._cache.popitem(last=False)
            if old in self._dirty:
                self._write(old, old_state)

    def _write(self, cid: int, state: dict) -> None:
        self._writes += 1
        name = f"{cid}-{self._writes}.pt"
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{name}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.folder / name)
        self.files[cid] = name
        self._dirty.discard(cid)

    def flush(self) -> None:
        """Write every cached state not yet on disk."""
        for cid in sorted(self._dirty):
            self._write(cid, self._cache[cid])

    def commit(self) -> dict:
        """A resume point: every state on disk; the index to save (give it to :meth:`restore` to
        continue from here). Files the previous resume point names stay until :meth:`collect`,
        to be called once the new resume point is saved: a kill in between resumes from the
        previous one, whose files are all still there."""
        self.flush()
        return {"files": dict(self.files), "writes": self._writes}

    def collect(self) -> None:
        """Delete the files the last :meth:`commit` does not name (after its index is saved)."""
        self._collect()

    def restore(self, index: dict) -> None:
        """Back to the resume point ``index`` (:meth:`commit`'s): files written after it deleted,
        the cache emptied."""
        missing = [name for name in index["files"].values() if not (self.folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{self.folder}: the client states of the resume point are missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        self.files = {int(c): n for c, n in index["files"].items()}
        self._writes = int(index["writes"])
        self._cache.clear()
        self._dirty.clear()
        self._collect()

    def _collect(self) -> None:
        keep = set(self.files.values())
        for path in self.folder.iterdir() if self.folder.is_dir() else ():
            if path.name not in keep:
                path.unlink(missing_ok=True)

    def __getstate__(self):
        raise TypeError("DiskClientStates is saved through commit() (its index), not pickled")
