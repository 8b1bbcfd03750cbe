"""Start a local Flower deployment, run an experiment through it, stop it.

:class:`LocalDeployment` starts one ``flower-superlink`` and N
``flower-supernode`` processes on 127.0.0.1 (free ports, telemetry and update
checks off, no runtime dependency installation) and stops every process it
started, children included, when it leaves its ``with`` block: normally, on an
error, or on Ctrl-C. :func:`write_app` writes a Flower App folder (its
``pyproject.toml`` naming the ServerApp and ClientApp); :func:`submit` hands an app
and its run config to a SuperLink (the local one, or a remote federation's) with
``flwr run`` and follows it until the run folder's summary appears.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import tomli_w

__all__ = ["LocalDeployment", "submit", "write_app", "FlowerRunError", "flower_env", "complete_lines", "forward_metrics"]

# the Flower App of experiment files (rankfed.app.flower)
TOML_APP = ("rankfed.app.flower:server_app", "rankfed.app.flower:client_app")


class FlowerRunError(RuntimeError):
    """The Flower run failed or could not be started; the message says where its logs are."""


def write_app(path: str | os.PathLike, serverapp: str = TOML_APP[0], clientapp: str = TOML_APP[1], *, name: str = "rankfed-flower", config: dict | None = None) -> Path:
    """Write a Flower App's ``pyproject.toml`` to folder ``path`` (``flwr run PATH`` submits the
    folder, with any Python files in it): ``serverapp`` / ``clientapp`` are the components'
    import paths (default: rankfed's app for experiment files), ``config`` the run config keys
    and their defaults (``out-dir`` and ``command`` are always there)."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    run_config = {"out-dir": "", "command": "", "resume": "", **({"experiment": ""} if (serverapp, clientapp) == TOML_APP else {}), **(config or {})}
    doc = {
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": {"name": name, "version": "0.1.0", "description": "A rankfed federation on Flower", "license": "Apache-2.0", "dependencies": ["rankfed"]},
        "tool": {"flwr": {"app": {"publisher": "rankfed", "components": {"serverapp": serverapp, "clientapp": clientapp}, "config": run_config}}},
    }
    (p / "pyproject.toml").write_text(tomli_w.dumps(doc), encoding="utf-8")
    return p


def flower_env(flwr_home: str | os.PathLike | None = None) -> dict[str, str]:
    """The environment for Flower's processes: this interpreter's scripts first on PATH (the
    SuperLink and SuperNodes start ``flower-superexec`` and the apps by name), no telemetry,
    no update checks."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FlowerRunError(f"flower-superlink exited with code {proc.returncode} at start-up; see {log}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.2)
    raise FlowerRunError(f"flower-superlink did not listen on 127.0.0.1:{port} within {timeout:.0f} s; see {log}")


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _stop(procs: list[subprocess.Popen], grace: float = 5.0) -> None:
    """SIGTERM each process and all its descendants, then SIGKILL what is left after ``grace``."""
    pids: list[int] = []
    for p in procs:
        if p.poll() is None:
            pids += [p.pid, *_descendants(p.pid)]
        else:
            pids += _descendants(p.pid)  # orphans still alive are re-parented; best effort
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
    time.sleep(0.2)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=2)


class LocalDeployment:
    """One SuperLink and ``supernodes`` SuperNodes on 127.0.0.1, as a context manager.

    SuperNode i has node config ``partition-id=i num-partitions=supernodes``. Logs go to
    ``log_dir`` (superlink.log, supernode-<i>.log). ``address`` is the SuperLink's.
    ``heartbeat_interval`` (seconds, 10 to 1800; None: Flower's 30 s) is the SuperNodes'
    heartbeat interval: a SuperNode that dies is noticed, and a round stops waiting for it,
    2 intervals after its last heartbeat (:mod:`rankfed.flower._supernode`).
    """

    def __init__(
        self, supernodes: int, log_dir: str | os.PathLike, *, data_dir: str | None = None, startup_timeout: float = 60.0,
        node_config: dict[int, str] | None = None, heartbeat_interval: float | None = None,
    ):  # fmt: skip
        if supernodes < 1:
            raise ValueError(f"--supernodes {supernodes}: must be >= 1")
        if heartbeat_interval is not None and not 10 <= heartbeat_interval <= 1800:
            raise ValueError(f"heartbeat_interval = {heartbeat_interval!r}: must be in [10, 1800] seconds (what Flower's SuperLink accepts)")
        self.heartbeat_interval = heartbeat_interval
        self.supernodes = supernodes
        self.log_dir = Path(log_dir)
        self.data_dir = data_dir
        self.extra_node_config = node_config or {}  # SuperNode i -> more "key=value" pairs
        self.startup_timeout = startup_timeout
        self._home = tempfile.TemporaryDirectory(prefix="rankfed-flwr-")
        self.home = Path(self._home.name)
        self.env = flower_env(self.home)
        self.superlink: subprocess.Popen | None = None
        self.nodes: list[subprocess.Popen] = []
        self.port = 0
        self._logs: list = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen:
        log = open(self.log_dir / log_name, "ab")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.home, start_new_session=True)

    def start(self) -> LocalDeployment:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        bindir = Path(sys.executable).parent
        self.superlink = self._spawn(
            [str(bindir / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(self.port)],
            "superlink.log",
        )
        _wait_port(self.port, self.startup_timeout, self.superlink, self.log_dir / "superlink.log")
        for i in range(self.supernodes):
            node_config = f"partition-id={i} num-partitions={self.supernodes}"
            if self.data_dir:
                node_config += f' data-dir="{self.data_dir}"'
            if i in self.extra_node_config:
                node_config += " " + self.extra_node_config[i]
            supernode = [str(bindir / "flower-supernode")] if self.heartbeat_interval is None else [sys.executable, "-m", "rankfed.flower._supernode", str(self.heartbeat_interval)]
            self.nodes.append(
                self._spawn([*supernode, "--insecure", "--superlink", self.address, "--node-config", node_config, "--port", str(_free_port())], f"supernode-{i}.log")
            )
        return self

    def kill_supernode(self, i: int) -> None:
        """Kill SuperNode ``i`` and its children with SIGKILL (a crash, for fault tests)."""
        p = self.nodes[i]
        for pid in [p.pid, *_descendants(p.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        p.wait(timeout=10)

    def stop(self) -> None:
        _stop([*self.nodes, *([self.superlink] if self.superlink else [])])
        for log in self._logs:
            log.close()
        self._logs.clear()
        self._home.cleanup()

    def __enter__(self) -> LocalDeployment:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def complete_lines(path: Path) -> list[str]:
    """The lines of ``path`` written to the end (a line still being appended is left for the
    next look); none if there is no such file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return text.split("\n")[:-1]


def forward_metrics(metrics_file: Path, seen: int, on_metrics: Callable[[dict], None] | None) -> int:
    """Pass the complete lines of ``metrics_file`` after the first ``seen`` to ``on_metrics``;
    how many lines have been passed on now."""
    if on_metrics is None:
        return seen
    lines = complete_lines(metrics_file)
    for line in lines[seen:]:
        with contextlib.suppress(json.JSONDecodeError):
            on_metrics(json.loads(line))
    return len(lines)


def _follow(out: Path, stream: subprocess.Popen, on_metrics: Callable[[dict], None] | None, timeout: float | None, log: Path) -> dict:
    """Wait for ``out/summary.json``, passing each new metrics.jsonl line to ``on_metrics``."""
    seen = 0
    deadline = None if timeout is None else time.monotonic() + timeout
    summary_file, metrics_file = out / "summary.json", out / "metrics.jsonl"
    while True:
        finished = summary_file.exists()  # looked at first: the ServerApp writes the summary after the last metrics line
        seen = forward_metrics(metrics_file, seen, on_metrics)
        if finished:
            with contextlib.suppress(json.JSONDecodeError):
                return json.loads(summary_file.read_text(encoding="utf-8"))
        if stream.poll() is not None and not summary_file.exists():
            time.sleep(1.0)  # the summary may land just after the log stream closes
            if not summary_file.exists():
                raise FlowerRunError(
                    f"the Flower run ended without a summary in {out} (flwr run exited with code {stream.returncode}); see {log}. "
                    "The ServerApp writes the run folder on the SuperLink's machine: submitted from another machine, look there"
                )
        if deadline is not None and time.monotonic() > deadline:
            raise FlowerRunError(f"the Flower run did not finish within {timeout:.0f} s; see {log}")
        time.sleep(0.5)


def submit(
    app: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    superlink: str,
    *,
    run_config: dict | None = None,
    env: dict[str, str] | None = None,
    insecure: bool = False,
    root_certificates: str | None = None,
    command: str | None = None,
    on_metrics: Callable[[dict], None] | None = None,
    timeout: float | None = None,
) -> dict:
    """Run the Flower App folder ``app`` (None: rankfed's app for experiment files, given
    ``run_config = {"experiment": text}``) on the federation behind ``superlink`` (host:port)
    and return the run's summary.

    The ServerApp writes the run folder ``out_dir`` (a path on the SuperLink's machine; here,
    for a local deployment). ``flwr run``'s log stream goes to ``out_dir/flower-logs/flwr-run.log``.
    TLS unless ``insecure``: verified with ``root_certificates`` (a CA file) or the system's CAs.
    """
    out = Path(out_dir).resolve()
    logs = out / "flower-logs"
    logs.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)  # an old run's would end the wait at once: the run is done when its own appears
    with tempfile.TemporaryDirectory(prefix="rankfed-submit-") as tmp:
        tmp_p = Path(tmp)
        home = tmp_p / "home"
        home.mkdir()
        conn = {"address": superlink, "insecure": insecure}
        if root_certificates:
            conn["root-certificates"] = str(Path(root_certificates).resolve())
        (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": "rankfed", "rankfed": conn}}), encoding="utf-8")
        app = write_app(tmp_p / "app") if app is None else Path(app).resolve()
        overrides = tmp_p / "run-config.toml"
        overrides.write_text(tomli_w.dumps({**(run_config or {}), "out-dir": str(out), "command": command or ""}), encoding="utf-8")
        run_env = dict(env or flower_env())
        run_env["FLWR_HOME"] = str(home)
        log = logs / "flwr-run.log"
        flwr = Path(sys.executable).parent / "flwr"
        with open(log, "ab") as log_f:
            stream = subprocess.Popen(
                [str(flwr), "run", str(app), "rankfed", "--run-config", str(overrides), "--stream"],
                stdout=log_f,
                stderr=subprocess.STDOUT,
                env=run_env,
                cwd=tmp,
                start_new_session=True,
            )
            try:
                return _follow(out, stream, on_metrics, timeout, log)
            finally:
                _stop([stream], grace=2.0)
