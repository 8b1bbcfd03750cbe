"""Shared by the study scripts: run many `rankfed run` jobs on a pool of worker processes.

A job is a run folder plus `--set` overrides of one experiment file. A folder
whose summary.json exists is not run again (an interrupted study picks up where
it stopped); a failed job is reported and the others go on; after the deadline
no new job starts.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def toml_value(v) -> str:
    """A Python value as the TOML text `--set` takes."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    return repr(v)


class Jobs:
    """`rankfed run CONFIG --set ...` jobs, ``workers`` at a time, each on one CPU thread."""

    def __init__(self, config: Path, base_sets: dict, workers: int, deadline_s: float = 0):
        self.config, self.base_sets = config, base_sets
        self.pool = ThreadPoolExecutor(workers)
        self.stop_at = time.monotonic() + deadline_s if deadline_s else None

    def submit(self, out: Path, sets: dict) -> Future:
        return self.pool.submit(self._run, out, sets)

    def _run(self, out: Path, sets: dict) -> dict | None:
        summary = out / "summary.json"
        if summary.is_file():
            return json.loads(summary.read_text())
        if self.stop_at is not None and time.monotonic() > self.stop_at:
            return None
        args = [sys.executable, "-m", "rankfed", "-q", "run", os.path.relpath(self.config, ROOT), "--out", os.path.relpath(out, ROOT), "--overwrite"]
        for k, v in {**self.base_sets, **sets}.items():
            args += ["--set", f"{k}={toml_value(v)}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        print("$", " ".join(shlex.quote(a) for a in ["rankfed", *args[3:]]), flush=True)
        if subprocess.run(args, cwd=ROOT, env=env).returncode != 0:
            print(f"FAILED: {out} (see its output above); the other runs go on", flush=True)
            return None
        return json.loads(summary.read_text())


FALLBACK = 3  # a run that diverges at its lr is run again at lr / FALLBACK (the tables mark it)


def diverged(folder: Path) -> bool:
    """The run in ``folder`` finished and stopped as diverged."""
    summary = folder / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("status") == "diverged"


def fallback(folder: Path, sets: dict) -> tuple[Path, dict]:
    """The rerun of a diverged job: lr / FALLBACK, in a folder named with that lr."""
    lr = sets["client.lr"] / FALLBACK
    return folder.with_name(f"{folder.name}-lr{lr:g}"), {**sets, "client.lr": lr}


def standing(folder: Path, sets: dict) -> tuple[Path, dict, bool]:
    """The run that stands for a job: its own, or its fallback if it diverged (and whether)."""
    if diverged(folder):
        return (*fallback(folder, sets), True)
    return folder, sets, False
