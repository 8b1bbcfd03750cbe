"""Shared by the benchmark scripts: machine description and writing results.

Each script writes its own ``benchmarks/results/<name>.md`` (the command, the
machine, the date and the table) and refreshes its section of
``benchmarks/RESULTS.md`` between ``<!-- <name>:start -->`` and
``<!-- <name>:end -->`` markers, so RESULTS.md always shows the latest run.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu}){gpu}, Python {platform.python_version()}, torch {torch.__version__}"


def command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])


def write_result(name: str, title: str, body: str) -> Path:
    """Write results/<name>.md and replace the <name> section of RESULTS.md."""
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    section = f"## {title}\n\nCommand: `{command()}`  \nMachine: {machine()}  \nDate: {stamp}\n\n{body.strip()}\n"
    out = HERE / "results" / f"{name}.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(section, encoding="utf-8")
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmark results\n"
    block = f"{start}\n{section}{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text, encoding="utf-8")
    return out


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (VmHWM), in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise KeyError("VmHWM")


def run_child(script: str, spec: dict, env: dict | None = None, timeout: float = 7200) -> dict:
    """Run ``script --child JSON(spec)`` in a fresh process (one torch thread) and return the
    JSON object its last stdout line holds: a measurement whose peak memory is its own."""
    import json
    import subprocess

    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run([sys.executable, str(Path(script).resolve()), "--child", json.dumps(spec)], capture_output=True, text=True, env=full_env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"child {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def publish(name: str, title: str, body: str, out: str | None = None) -> None:
    """Print ``body`` and write it: to ``out`` only if given, else as :func:`write_result`."""
    if out:
        Path(out).write_text(body, encoding="utf-8")
    else:
        write_result(name, title, body)
    print(body)
