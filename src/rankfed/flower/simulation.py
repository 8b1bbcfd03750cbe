"""Flower's simulation runtime: the same ServerApp and ClientApp on N virtual SuperNodes, run by Ray.

:func:`simulate` runs a ServerApp and a ClientApp (rankfed's app for experiment files, or
your own from :func:`~rankfed.flower.server_app` / :func:`~rankfed.flower.client_app`) on
Flower 1.41's simulation runtime: the ServerApp in a thread, N virtual SuperNodes whose
messages a pool of Ray workers runs (actors of ``client_resources`` each: ``num_cpus``,
``num_gpus``, a fraction to share a GPU; as many as the Ray cluster's CPUs and GPUs hold).
The apps see what they see on a deployment:

* virtual SuperNode i of N has node config ``partition-id = i``, ``num-partitions = N``, so it
  hosts the clients SuperNode i of a deployment hosts;
* each virtual SuperNode has one ``Context`` per run whose ``state`` persists across its
  messages (Flower keeps it beside the ServerApp and ships it with each message to whichever
  worker runs it), so client state, the cached client data and stateful replicas live there
  as on a SuperNode;
* the run config carries ``out-dir`` (the run folder the ServerApp writes, the folder
  ``rankfed run`` writes), ``command`` and your keys (``experiment``: an experiment file's
  text), as :func:`~rankfed.flower.deploy.submit` gives a deployment's.

The simulation runs in a child process (``python -m rankfed.flower._simrun``), which starts
Ray (on this machine, or connects to a running Ray cluster at ``ray_address``), runs, and stops
Ray. The child and everything it started are stopped when :func:`simulate` returns, also on
an error, a timeout or Ctrl-C, so no Ray process outlives it (on a cluster the cluster stays
up and ends the run's workers). The apps travel to the child, and from there to the Ray
workers, by ``cloudpickle``, as Ray ships them anyway: importable objects by reference (the
child and the workers get this process's ``sys.path``), a script's own functions by value.

A Ray worker that dies (killed, out of memory) costs the clients of the message it was
running that round: the SuperNode's reply is an error, counted as failed clients as on a
deployment; a new worker takes its place for the messages after it (Flower 1.41 would put
the dead one back in its pool, where every later message given to it fails). Client state
survives: it lives in the driver's ``Context``, not in the worker.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from rankfed.errors import ConfigError

from .deploy import FlowerRunError, _descendants, _stop, flower_env, forward_metrics, write_app

__all__ = ["simulate", "check_client_resources"]



def check_client_resources(num_cpus: float, num_gpus: float) -> dict[str, float]:
    """The Ray resources of one worker, checked: ``num_cpus`` > 0 CPUs and ``num_gpus`` >= 0
    GPUs (a fraction shares a GPU between workers)."""
    for name, value in (("--num-cpus", num_cpus), ("--num-gpus", num_gpus)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} = {value!r}: must be a number")
    if not num_cpus > 0:
        raise ConfigError(f"--num-cpus = {num_cpus!r}: must be > 0 (CPUs per Ray worker; fractions share a CPU)")
    if not num_gpus >= 0:
        raise ConfigError(f"--num-gpus = {num_gpus!r}: must be >= 0 (GPUs per Ray worker; 0.5 puts two workers on a GPU)")
    whole = lambda v: int(v) if float(v).is_integer() else float(v)  # noqa: E731 - 1, not 1.0, as Ray and the summary show it
    return {"num_cpus": whole(num_cpus), "num_gpus": float(num_gpus)}


def _needs_ray() -> None:
    if importlib.util.find_spec("ray") is None:
        raise ConfigError("Flower's simulation runtime needs Ray: pip install 'flwr[simulation]==1.41.0' (the rankfed[flower] extra)")


def simulate(
    server_app,
    client_app,
    *,
    supernodes: int,
    out_dir: str | os.PathLike,
    run_config: dict | None = None,
    client_resources: dict | None = None,
    ray_address: str | None = None,
    command: str | None = None,
    on_metrics: Callable[[dict], None] | None = None,
    timeout: float | None = None,
) -> dict:
    """Run ``server_app`` and ``client_app`` (Flower ServerApp / ClientApp objects) on
    ``supernodes`` virtual SuperNodes and return the run's summary (``out_dir/summary.json``).

    Args:
        out_dir: the run folder the ServerApp writes (run config ``out-dir``); the child's log
            is ``out_dir/flower-logs/simulation.log``.
        run_config: more run config keys (``{"experiment": text}`` for rankfed's app).
        client_resources: Ray resources per worker, ``{"num_cpus": 1, "num_gpus": 0.0}`` by
            default (:func:`check_client_resources`).
        ray_address: a running Ray cluster to use (``HEAD:6379``, or ``"auto"``: the one
            ``ray start`` last started on this machine); None starts a Ray of the run's own on
            this machine (even where a cluster runs or ``RAY_ADDRESS`` is set).
        command: recorded in the summary.
        on_metrics: called with each new ``metrics.jsonl`` line (a dict) as rounds finish.
        timeout: give up (and stop everything) after this many seconds.

    The summary has ``simulation``: the supernodes, the Ray workers, their resources, the
    Ray address (None: local) and the seconds Ray took to start.
    """
    _needs_ray()
    import ray.cloudpickle as cloudpickle

    if isinstance(supernodes, bool) or not isinstance(supernodes, int) or supernodes < 1:
        raise ConfigError(f"--supernodes {supernodes!r}: must be an integer >= 1")
    resources = check_client_resources(**(client_resources or {"num_cpus": 1, "num_gpus": 0.0}))
    out = Path(out_dir).resolve()
    logs = out / "flower-logs"
    logs.mkdir(parents=True, exist_ok=True)
    config = {**(run_config or {}), "out-dir": str(out), "command": command or ""}
    log = logs / "simulation.log"
    (out / "summary.json").unlink(missing_ok=True)  # an old run's: the summary returned is this run's or none
    env = flower_env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in [*sys.path, env.get("PYTHONPATH", "")] if p)  # the apps' modules, for the child and its Ray workers
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report (and no prompt) from Ray
    env.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")  # as Flower's own simulation process
    env.setdefault("RAY_DEDUP_LOGS", "0")  # every worker's log lines in the log, not "repeated 3x across cluster"
    with tempfile.TemporaryDirectory(prefix="rankfed-sim-") as tmp:
        spec = Path(tmp) / "spec.pkl"
        spec.write_bytes(cloudpickle.dumps({
            "server_app": server_app, "client_app": client_app, "supernodes": supernodes, "client_resources": resources,
            "ray_address": ray_address, "run_config": config, "out": str(out),
        }))  # fmt: skip
        with open(log, "ab") as log_f:
            proc = subprocess.Popen([sys.executable, "-m", "rankfed.flower._simrun", str(spec)], stdout=log_f, stderr=subprocess.STDOUT, env=env, cwd=tmp, start_new_session=True)
            pids: dict[int, str | None] = {}
            try:
                _follow(out, proc, on_metrics, timeout, log, pids)
            finally:
                _stop([proc], grace=10.0)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)  # anything of its session still there (it led one: start_new_session)
                _kill_seen(pids)  # and every process it started that left its group (Ray's workers)
    summary_file = out / "summary.json"
    if not summary_file.exists():
        raise FlowerRunError(f"the simulation ended without a summary in {out} (exit code {proc.returncode}): {_tail(log)}; see {log}")
    return json.loads(summary_file.read_text(encoding="utf-8"))


def _tail(log: Path, lines: int = 3) -> str:
    """The last lines of ``log`` that say something (for an error message)."""
    try:
        text = [x.strip() for x in log.read_text(encoding="utf-8", errors="replace").splitlines() if x.strip()]
    except OSError:
        return "no log"
    return " | ".join(text[-lines:]) or "the log is empty"


def _start_time(pid: int) -> str | None:
    """A process's start time (field 22 of /proc/PID/stat): with its pid, who it is (pids are reused)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _kill_seen(seen: dict[int, str | None], wait: float = 60.0) -> None:
    """SIGKILL the processes of ``seen`` (pid -> start time) still alive as themselves, and wait
    until they are gone (Ray's workers are not in the child's process group, and outlive it
    for a while once their raylet is gone, the longer the busier the machine)."""
    alive = [pid for pid, t in seen.items() if t is not None and _start_time(pid) == t]
    for pid in alive:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + wait  # a guard against a process the kernel cannot reap, not a race
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if seen[pid] == _start_time(pid) and "Z (zombie)" not in _status(pid)]
        time.sleep(0.1)


def _status(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "status").read_text()
    except OSError:
        return "Z (zombie)"  # gone


def _follow(out: Path, proc: subprocess.Popen, on_metrics: Callable[[dict], None] | None, timeout: float | None, log: Path, pids: dict[int, str | None] | None = None) -> None:
    """Pass each new ``metrics.jsonl`` line to ``on_metrics`` until the child exits; ``pids``
    collects the child's descendants seen meanwhile (pid -> start time)."""
    seen = 0
    deadline = None if timeout is None else time.monotonic() + timeout
    metrics_file = out / "metrics.jsonl"
    while True:
        if pids is not None:
            for pid in _descendants(proc.pid):
                pids.setdefault(pid, _start_time(pid))
        done = proc.poll() is not None
        seen = forward_metrics(metrics_file, seen, on_metrics)
        if done:
            return
        if deadline is not None and time.monotonic() > deadline:
            raise FlowerRunError(f"the simulation did not finish within {timeout:.0f} s; see {log}")
        time.sleep(0.5)


# -- the child process ------------------------------------------------------------------------------
def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _respawning_backend():
    """Flower 1.41's RayBackend with one change: a worker (actor) that died while running a
    message is replaced by a new one, which queues the messages given to it until it has
    started. The message it was running fails (an error reply: its clients fail that round)
    and is not retried. Flower's own puts the dead actor back in its pool, so that every
    later message it is given fails, and Ray's actor restarts (``max_restarts``) fail the
    messages given to an actor while it restarts unless they also retry the one it died in."""
    import ray
    from flwr.common.constant import PARTITION_ID_KEY
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
    from ray.exceptions import RayActorError

    class RespawningRayBackend(RayBackend):
        def process_message(self, message, context):
            if self.pool is None or self.app_fn is None:
                return super().process_message(message, context)  # Flower's own errors
            pool = self.pool
            future = pool.submit(lambda a, a_fn, mssg, cid, state: a.run.remote(a_fn, mssg, cid, state), (self.app_fn, message, str(context.node_config[PARTITION_ID_KEY]), context))
            try:
                return pool.fetch_result_and_return_actor_to_pool(future)
            except RayActorError:
                dead = pool._future_to_actor.pop(future)
                ray.kill(dead, no_restart=True)
                pool.pool.append(pool.create_actor_fn())
                raise
            except Exception:
                pool.add_actor_back_to_pool(future)
                raise

    return RespawningRayBackend


def _amend_summary(out: Path, simulation: dict) -> None:
    """Add ``simulation`` to the summary the ServerApp wrote (atomically, as it wrote it)."""
    file = out / "summary.json"
    if not file.exists():
        return
    from rankfed.server.runfolder import dumps

    summary = json.loads(file.read_text(encoding="utf-8"))
    tmp = out / ".summary.json.tmp"
    tmp.write_text(dumps(summary | {"simulation": simulation}, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, file)


def _child(spec_path: str) -> int:
    """Start Ray, run the simulation the spec describes, stop Ray (the child's work)."""
    signal.signal(signal.SIGTERM, _interrupt)
    import ray
    import ray.cloudpickle as cloudpickle
    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.server.superlink.fleet.vce.backend import raybackend
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.simulation.ray_transport.ray_actor import pool_size_from_resources
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    spec = cloudpickle.loads(Path(spec_path).read_bytes())
    out, resources, run_config = Path(spec["out"]), spec["client_resources"], spec["run_config"]
    t0 = time.perf_counter()
    # Ray's workers import the apps' modules from the driver's path (as Flower's RayBackend arranges
    # when it starts Ray itself; started here, so that its start-up time and pool size are known).
    # No address: a Ray of its own ("local"), never one ray.init() would find by itself (the
    # cluster last started on this machine, recorded in /tmp/ray, which may be long gone).
    pythonpath = os.environ.get("PYTHONPATH", "")
    ray.init(address=spec["ray_address"] or "local", include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    ray_start_s = time.perf_counter() - t0
    try:
        workers = pool_size_from_resources(resources)
        print(f"rankfed: Ray started in {ray_start_s:.1f} s; {workers} workers of {resources}; {spec['supernodes']} virtual SuperNodes", flush=True)
        # The run config reaches the ServerApp and every virtual SuperNode as Flower's own
        # simulation process gives it: an app folder's defaults fused with the run's overrides.
        # (The folder's component names are never loaded: the objects of the spec run.)
        app = write_app(Path(spec_path).parent / "app", "given:server_app", "given:client_app", config=run_config)
        run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
        run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
        run.federation_id = NOOP_FEDERATION_ID
        run.override_config = dict(run_config)
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = run.primary_task_id, run.run_id, SUPERLINK_NODE_ID
        context = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=get_fused_config_from_dir(app, run.override_config))
        raybackend.RayBackend = _respawning_backend()  # the simulation runtime makes its backend from this name when it starts
        t1 = time.perf_counter()
        try:
            _run_simulation(
                num_supernodes=spec["supernodes"], exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE, client_app=spec["client_app"], server_app=spec["server_app"],
                backend_name="ray", backend_config={"client_resources": resources, "init_args": {}},
                server_app_context=context, app_dir=str(app), run=run, is_app=True,
            )  # fmt: skip
        finally:
            _amend_summary(out, {
                "supernodes": spec["supernodes"], "ray_workers": workers, "client_resources": resources, "ray_address": spec["ray_address"],
                "ray_start_s": round(ray_start_s, 3), "simulation_s": round(time.perf_counter() - t1, 3),
            })  # fmt: skip
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        ray.shutdown()
    return 0
