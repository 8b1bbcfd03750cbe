"""rankfed on a real local Flower deployment (flower-superlink + flower-supernode processes).

For one seed a deployment must end with the simulator's model: the same clients
sampled, the same payloads, the same aggregation order. The deployment tests
start real processes on 127.0.0.1 with bounded waits and stop them all.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Message, RecordDict  # noqa: E402

from rankfed.app.config import load_config, parse_config, to_toml, tomllib  # noqa: E402
from rankfed.app.flower import run_flower  # noqa: E402
from rankfed.flower.deploy import LocalDeployment, _descendants, _free_port, _stop, _wait_port, flower_env  # noqa: E402
from rankfed.flower.records import message_wire_bytes, payload_to_records, records_to_payload  # noqa: E402
from rankfed.flower.strategy import hosted_clients  # noqa: E402
from rankfed.app.experiment import run_experiment  # noqa: E402
from rankfed.wire import WireError, encode  # noqa: E402

TINY = """
[task]
dataset = "digits"
model = "mlp"
model_options = { hidden = [32] }
[federation]
clients = 4
participation = 0.75
rounds = 2
seed = 5
[client]
lr = 0.05
batch_size = 32
[algorithm]
name = "fedavg"
[flower]
round_timeout = 90
connect_timeout = 90
"""

# (label, --set overrides): every transport path: stateless downlinks (fedavg, fedloru-code with a
# merge every round: FedLoRU's plain options take the same path and are left out for the suite's time), a stateful broadcast (mapa), client state across rounds (greedylore error feedback),
# client-side personalised evaluation (pfedloru), clients on one SuperNode receiving different
# downlinks (tiered fedhm: node 0 hosts client 0 of tier 1 and client 2 of tier 2).
ALGORITHMS = {
    "fedavg": [],
    "mapa": ["algorithm.name=mapa", "algorithm.k=64"],
    "fedavg-greedylore": ["algorithm.compressor=greedylore", "algorithm.compress_rank=2", "algorithm.update_gap=2", "federation.participation=1.0"],
    "fedhm-tiers": ["algorithm.name=fedhm", 'algorithm.patterns=["*"]', "algorithm.tiers=[{fraction=0.5,rank=2},{fraction=0.5,rank=4}]", "federation.participation=1.0"],
    "pfedloru": ["algorithm.name=pfedloru", "algorithm.rank=4", "algorithm.tau=1", "algorithm.personal_rank=2", 'algorithm.patterns=["*"]'],
    # the FedLoRU code's settings: every round merges (momentum), evaluated before the merge on both
    # transports; with the defences: local DP's noise on the factors' updates added on the SuperNodes
    # (with its epsilon), then the server's trusted weights and the median over the noisy uploads
    "fedloru-code-defended": [
        "preset=fedloru-code", "algorithm.name=fedloru", "algorithm.rank=4", "algorithm.tau=1", 'algorithm.patterns=["*"]',
        "federation.dp=local", "federation.clip_norm=0.5", "federation.dp_noise=0.8", "federation.sample_weights=recorded", "federation.aggregator=median",
    ],
}  # fmt: skip



def _trained_lines(run):
    """metrics.jsonl after its round-0 line (the initial model, as the simulator writes it)."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["round"] == 0 and lines[0]["initial"] and lines[0]["cum_uplink_bytes"] == 0
    return lines[1:]


def _cfg(tmp_path: Path, overrides=(), name="tiny.toml"):
    """The tiny experiment with ``overrides``, written to a file (for the command line) and parsed."""
    path = tmp_path / name
    path.write_text(TINY, encoding="utf-8")
    cfg = load_config(path, list(overrides))
    path.write_text(to_toml(cfg), encoding="utf-8")
    return path, cfg


# -- payloads as records (no processes) --------------------------------------------------------------
def test_payload_records_round_trip_every_dtype_and_scalar():
    payload = {
        "@round": 3,
        "w": torch.randn(4, 5),
        "@num_samples": 17,
        "idx": torch.arange(6, dtype=torch.int64),
        "half": torch.randn(3, dtype=torch.float16),
        "bf": torch.randn(2, 3).to(torch.bfloat16),
        "mask": torch.tensor([True, False]),
        "q": torch.randint(-100, 100, (7,), dtype=torch.int8),
        "@seed": 2**62 + 1,
        "@train_loss": 0.25,
        "@note": "x",
        "@flag": True,
        "scalar_t": torch.tensor(1.5),
    }
    from flwr.app import RecordDict

    back = records_to_payload(RecordDict(payload_to_records(payload, "up.7")), "up.7")
    assert list(back) == list(payload)  # entry order kept
    for k, v in payload.items():
        if isinstance(v, torch.Tensor):
            assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k
        else:
            assert back[k] == v and type(back[k]) is type(v), k
    assert encode(back) == encode(payload)  # the payload bytes a run reports are unchanged


def test_payload_records_errors_name_the_problem():
    from flwr.app import ConfigRecord, RecordDict

    with pytest.raises(WireError, match="@names"):
        payload_to_records({"@names": 1}, "x")
    with pytest.raises(WireError, match="'w'"):
        payload_to_records({"w": [1, 2]}, "x")
    with pytest.raises(WireError, match="no payload 'up.1'"):
        records_to_payload(RecordDict({"up.2.config": ConfigRecord({"@names": []})}), "up.1")


def test_message_wire_bytes_counts_the_arrays(monkeypatch):
    from flwr.app import Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):  # a message is made inside a run's task
        monkeypatch.setattr(TaskIdentity, attr, 1)

    small = Message(RecordDict(payload_to_records({"w": torch.zeros(10)}, "p")), dst_node_id=1, message_type="train")
    big = Message(RecordDict(payload_to_records({"w": torch.zeros(10010)}, "p")), dst_node_id=1, message_type="train")
    assert message_wire_bytes(big) - message_wire_bytes(small) == pytest.approx(40000, abs=64)


def test_hosted_clients_cover_every_client_once():
    for k, p in [(4, 2), (7, 3), (5, 5), (3, 1)]:
        got = sorted(c for i in range(p) for c in hosted_clients(k, i, p))
        assert got == list(range(k))
    with pytest.raises(ValueError, match="num-partitions = 5"):
        hosted_clients(4, 0, 5)
    with pytest.raises(ValueError, match="partition-id = 2"):
        hosted_clients(4, 2, 2)


def test_flower_section_is_checked():
    with pytest.raises(Exception, match="federation.min_clients = 0"):
        parse_config({"federation": {"min_clients": 0}})
    with pytest.raises(Exception, match="flower.round_timeout"):
        parse_config({"flower": {"round_timeout": -1.0}})


class _FakeGrid:
    """A grid of SuperNodes 7 and 8: 7 answers every message; 8 dies as the round starts (it
    never answers, and it leaves get_node_ids() after the first poll). Polled too often means
    the grid kept waiting for it: an error, not a hang."""

    def __init__(self):
        self.alive, self.sent, self.polls = {7, 8}, [], 0

    def push_messages(self, messages):
        for i, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"m{len(self.sent) + i}"
        self.sent += list(messages)
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, ids):
        self.polls += 1
        assert self.polls < 1000, "still waiting for a SuperNode that is gone"
        self.alive.discard(8)
        return [Message(RecordDict({}), reply_to=m) for m in self.sent if m.metadata.dst_node_id == 7 and m.metadata.message_id in ids]

    def get_node_ids(self):
        return sorted(self.alive)


def test_a_round_stops_waiting_for_a_supernode_that_is_gone(monkeypatch):
    from flwr.common.constant import ErrorCode
    from flwr.supercore.task_identity import TaskIdentity

    from rankfed.flower.strategy import QuickPollGrid

    for attr in ("_run_id", "_node_id", "_task_id"):  # a message is made inside a run's task
        monkeypatch.setattr(TaskIdentity, attr, 1)
    fake = _FakeGrid()
    grid = QuickPollGrid(fake, interval=0.0, node_check=0.0)
    replies = grid.send_and_receive([Message(RecordDict({}), dst_node_id=n, message_type="train") for n in (7, 8)], timeout=None)
    assert sorted(r.metadata.src_node_id for r in replies) == [7, 8]
    (gone,) = [r for r in replies if r.has_error()]
    assert gone.error.code == ErrorCode.NODE_UNAVAILABLE and gone.metadata.reply_to_message_id == fake.sent[1].metadata.message_id


def test_the_superlinks_error_for_an_offline_node_costs_that_nodes_clients(tmp_path, monkeypatch):
    """The SuperLink answers a message to a node whose heartbeats are overdue with an error
    from its own id (Flower's function below); the strategy charges it to the node the message
    went to, as "node unavailable", and a ClientApp's error as "error"."""
    from flwr.app import ArrayRecord, ConfigRecord, Error
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
    from flwr.supercore.task_identity import TaskIdentity

    from rankfed.app.experiment import build_experiment
    from rankfed.flower.strategy import NodeMap, RankfedStrategy

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)
    _, cfg = _cfg(tmp_path, ["federation.participation=1.0"])
    strategy = RankfedStrategy(build_experiment(cfg))
    strategy.nodes = NodeMap(2, {0: 7, 1: 8})  # clients 0, 2 on node 7; 1, 3 on node 8
    fake = _FakeGrid()
    messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), fake))
    fake.push_messages(messages)
    to = {m.metadata.dst_node_id: m for m in messages}
    replies = [Message(Error(code=0, reason="the ClientApp raised"), reply_to=to[7]), create_message_error_unavailable_res_message(to[8].metadata, "node_unavail")]
    assert replies[1].metadata.src_node_id != 8  # the SuperLink's own id
    strategy.aggregate_train(1, replies)
    assert strategy.failure_reasons == {"error": 2, "node unavailable": 2}
    assert strategy.failure_examples["node unavailable"].startswith("round 1, client 1: node unavailable: Error: Node Unavailable")


def test_a_supernode_that_missed_a_broadcast_refuses_to_train_on_its_stale_replica(tmp_path):
    from flwr.app import Context, RecordDict

    from rankfed.app.experiment import build_experiment
    from rankfed.app.flower import _factory
    from rankfed.flower.apps import Node, _replica

    _, cfg = _cfg(tmp_path, ALGORITHMS["mapa"])
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(), run_config={"experiment": to_toml(cfg)})
    node = Node(context, *_factory(context))
    assert node.kind == "stateful" and node.clients == [0, 2]
    exp = build_experiment(cfg)
    server = exp.algorithm.make_server(exp.model, exp.ctx)
    replica = _replica(node, context, 1, server.broadcast(1))  # round 1 from the initial replica: fine
    kept = records_to_payload(context.state, "rankfed.replica")
    assert kept.keys() == replica.keys() and all(torch.equal(kept[k], replica[k]) for k in kept)
    with pytest.raises(RuntimeError, match="replica is at round 1 but this is round 3"):
        _replica(node, context, 3, server.broadcast(3))


@pytest.mark.parametrize("label", ["mapa", "fedavg-stateful"])
def test_a_supernode_that_missed_broadcasts_is_caught_up_to_the_simulators_replica(tmp_path, label):
    """SuperNode 0 syncs round 1 only; in round 3 the strategy's catch-up (the missed broadcast
    of round 2 replayed: MAPA) and, in round 4, the replica sent whole (an unknown replica, as
    after a failed message or a resume) bring it to exactly the replica of a client that missed
    nothing."""
    from flwr.app import Context, RecordDict

    from rankfed.app.experiment import build_experiment
    from rankfed.app.flower import _factory
    from rankfed.flower.apps import Node, _replica, catch_up_of
    from rankfed.flower.strategy import catch_up_records
    from rankfed.sim import Simulator
    from rankfed.wire import decode

    extra = ALGORITHMS["mapa"] if label == "mapa" else ["federation.client_kind=stateful"]
    _, cfg = _cfg(tmp_path, [*extra, "federation.rounds=4"])
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(), run_config={"experiment": to_toml(cfg)})
    node = Node(context, *_factory(context))
    sim = Simulator(build_experiment(cfg))
    broadcast = lambda rnd: decode(dict(sim.rounds.broadcast_log)[rnd])  # noqa: E731
    sim.run_round(1)
    _replica(node, context, 1, broadcast(1))
    sim.run_round(2)  # the SuperNode misses round 2
    sim.run_round(3)
    cu = sim.rounds.catch_up(1, 3)
    assert cu.kind == ("replay" if label == "mapa" else "model")
    if cu.kind == "replay":
        replica = _replica(node, context, 3, broadcast(3), catch_up_of(RecordDict(catch_up_records(cu))))
        assert all(torch.equal(replica[k], sim.replica[k]) for k in sim.replica)
    whole = sim.rounds.catch_up(None, 4)  # before round 4's downlink: the server's replica now
    assert whole.kind == "model"
    sim.run_round(4)
    replica = _replica(node, context, 4, broadcast(4), catch_up_of(RecordDict(catch_up_records(whole))))
    assert all(torch.equal(replica[k], sim.replica[k]) for k in sim.replica)
    assert int(context.state["rankfed.replica.meta"]["round"]) == 4


# -- a real deployment -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    logs = tmp_path_factory.mktemp("flower-logs")
    with LocalDeployment(2, logs) as dep:
        yield dep
    assert all(p.poll() is not None for p in [dep.superlink, *dep.nodes])  # stopped on leaving


@pytest.mark.slow
@pytest.mark.parametrize("label", list(ALGORITHMS))
def test_deployment_ends_with_the_simulators_model(deployment, tmp_path, label):
    path, cfg = _cfg(tmp_path, ALGORITHMS[label])
    sim = run_experiment(cfg, tmp_path / "sim")
    if label == "fedavg":  # through the command line, submitted to the running SuperLink
        args = [sys.executable, "-m", "rankfed", "--quiet", "flower", "run", str(path), "--superlink", deployment.address, "--insecure", "--out", str(tmp_path / "fl"), "--timeout", "900"]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=deployment.env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "on Flower (2 SuperNodes)" in proc.stdout
        fl = json.loads((tmp_path / "fl" / "summary.json").read_text())
    else:
        fl = run_flower(cfg, tmp_path / "fl", superlink=deployment.address, insecure=True, timeout=900)
    assert fl["status"] == "completed", fl.get("error")
    assert fl["transport"] == "flower" and fl["supernodes"] == 2
    a = torch.load(tmp_path / "fl" / "model.pt")
    b = torch.load(tmp_path / "sim" / "model.pt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"{label}: {k}")
    # the same payload bytes, and Flower's messages measured beside them (its framing on top)
    for key in ("total_uplink_bytes", "total_downlink_bytes", "final_accuracy", "uploads"):
        assert fl[key] == sim[key], key
    assert fl["total_flower_uplink_bytes"] > fl["total_uplink_bytes"]
    assert fl["failed_client_rounds"] == 0 and fl["skipped_rounds"] == []
    if label == "pfedloru":
        assert fl["final_personal_accuracy"] == pytest.approx(sim["final_personal_accuracy"], abs=1e-9)
    lines = _trained_lines(tmp_path / "fl")
    assert [m["round"] for m in lines] == [1, 2]
    assert all(m["flower_uplink_bytes"] > 0 and m["failed_clients"] == 0 for m in lines)
    if "defences" in sim:  # the same defences did the same on both transports
        assert fl["defences"] == sim["defences"] and fl["clipped_uploads"] == sim["clipped_uploads"]
        sim_lines = _trained_lines(tmp_path / "sim")
        for key in ("aggregator", "clipped", "clip_bound", "epsilon"):
            assert [m.get(key) for m in lines] == [m.get(key) for m in sim_lines], key
        if "dp" in sim["defences"]:
            assert fl["epsilon"] == sim["epsilon"] > 0 and lines[-1]["epsilon"] > lines[0]["epsilon"]


# A killed SuperNode is noticed when its heartbeats are overdue (2 intervals after its last
# one; 10 s here instead of Flower's 30 s): the round waits for that event, not for the round
# timeout, which is generous so that a slow start of the surviving SuperNode's ClientApp
# process on a loaded machine is never taken for a failure.
@pytest.mark.slow
def test_a_flower_run_killed_mid_way_and_resumed_ends_with_the_uninterrupted_runs_model(tmp_path):
    """`rankfed flower run` SIGKILLed (with its SuperLink and SuperNodes) after round 2, then
    `rankfed flower run --resume`: the ServerApp continues from its resume.pt, the fresh
    SuperNodes' MAPA replicas are sent whole, and the run ends with the simulator's model."""
    path, cfg = _cfg(tmp_path, [*ALGORITHMS["mapa"], "federation.rounds=4", "federation.resume_every=1"])
    sim = run_experiment(cfg, tmp_path / "sim")
    out = tmp_path / "fl"
    args = [sys.executable, "-m", "rankfed", "--quiet", "flower", "run", str(path), "--supernodes", "2", "--out", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=flower_env())
    rounds_file = out / "rounds.jsonl"
    deadline = time.monotonic() + 900  # a guard against a hang, not a race: the run waits on its own events
    try:
        while not (rounds_file.exists() and len(rounds_file.read_text().splitlines()) >= 2 and (out / "resume.pt").exists()):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        for pid in [proc.pid, *_descendants(proc.pid)]:  # the run and every process it started
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "summary.json").exists(), "the run finished before it was killed"
    again = subprocess.run([sys.executable, "-m", "rankfed", "--quiet", "flower", "run", "--resume", str(out), "--supernodes", "2"], capture_output=True, text=True, timeout=900, env=flower_env())
    assert again.returncode == 0, again.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "completed" and s["resumed_from_round"] in (2, 3), s
    a, b = torch.load(out / "model.pt"), torch.load(tmp_path / "sim" / "model.pt")
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    lines = [json.loads(x) for x in rounds_file.read_text().splitlines()]
    assert [m["round"] for m in lines] == [1, 2, 3, 4]
    first = lines[s["resumed_from_round"]]  # the first resumed round: both SuperNodes' replicas sent whole
    assert first["catch_ups"] == 2 and first["catch_up_bytes"] > 0
    assert s["total_uplink_bytes"] == sim["total_uplink_bytes"]
    assert not (out / "resume.pt").exists()


@pytest.mark.slow
def test_a_supernode_killed_mid_run_does_not_stop_the_run(tmp_path):
    _, cfg = _cfg(tmp_path, ["federation.clients=2", "federation.participation=1.0", "federation.rounds=3", "flower.round_timeout=600"])
    rounds_seen = []
    with LocalDeployment(2, tmp_path / "logs", heartbeat_interval=10) as dep:

        def on_metrics(m):
            if m.get("initial"):  # the round-0 line: the initial model, before any round
                return
            rounds_seen.append(m["round"])
            if m["round"] == 1:
                dep.kill_supernode(1)

        s = run_flower(cfg, tmp_path / "fl", superlink=dep.address, insecure=True, on_metrics=on_metrics, timeout=900)
    assert s["status"] == "completed", s.get("error")
    assert rounds_seen == [1, 2, 3]
    assert s["rounds"] == 3
    # client 1 (on SuperNode 1) is lost in rounds 2 and 3; client 0 carries them
    assert s["failed_client_rounds"] == 2
    assert sum(s["failure_reasons"].values()) == 2
    assert set(s["failure_reasons"]) == {"node unavailable"}, s["failure_examples"]
    lines = _trained_lines(tmp_path / "fl")
    assert [m["failed_clients"] for m in lines] == [0, 1, 1]
    assert [m["num_clients"] for m in lines] == [2, 1, 1]
    assert s["skipped_rounds"] == []


@pytest.mark.slow
def test_too_few_replies_skip_the_round_and_keep_the_model(tmp_path):
    _, cfg = _cfg(tmp_path, ["federation.clients=2", "federation.participation=1.0", "federation.rounds=2", "flower.round_timeout=600", "federation.min_clients=2"])
    with LocalDeployment(2, tmp_path / "logs", heartbeat_interval=10) as dep:

        def on_metrics(m):
            if m["round"] == 1:
                dep.kill_supernode(0)

        s = run_flower(cfg, tmp_path / "fl", superlink=dep.address, insecure=True, on_metrics=on_metrics, timeout=900)
    assert s["status"] == "completed" and s["skipped_rounds"] == [2]
    lines = _trained_lines(tmp_path / "fl")
    assert lines[1]["accuracy"] == lines[0]["accuracy"] and lines[1]["skipped"]  # the model did not change


@pytest.mark.slow
def test_bad_uploads_from_a_supernode_are_dropped_and_counted(tmp_path):
    _, cfg = _cfg(tmp_path, ["federation.clients=2", "federation.participation=1.0", "federation.rounds=2"])
    with LocalDeployment(2, tmp_path / "logs", node_config={1: 'rankfed-fault="nan"'}) as dep:
        s = run_flower(cfg, tmp_path / "fl", superlink=dep.address, insecure=True, timeout=300)
    assert s["status"] == "completed", s.get("error")
    assert s["failed_client_rounds"] == 2 and s["failure_reasons"] == {"bad upload": 2}
    assert "non-finite" in s["failure_examples"]["bad upload"]
    lines = _trained_lines(tmp_path / "fl")
    assert [m["rejected_uploads"] for m in lines] == [1, 1] and all(m["accuracy"] > 0.2 for m in lines)


@pytest.mark.slow
def test_ctrl_c_stops_every_process_it_started(tmp_path):
    path, _ = _cfg(tmp_path, ["federation.rounds=50"])
    args = [sys.executable, "-m", "rankfed", "--quiet", "flower", "run", str(path), "--supernodes", "2", "--out", str(tmp_path / "fl")]
    # SIGINT as a terminal's Ctrl-C delivers it, whoever started the suite: a background job of a
    # non-interactive shell inherits SIGINT ignored, and Python then never raises KeyboardInterrupt
    restore = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=restore)
    try:
        deadline = time.monotonic() + 900  # a guard against a hang, not a race: a loaded 2-core machine takes minutes to round 1
        while not (tmp_path / "fl" / "rounds.jsonl").exists():  # wait until it is training
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no round finished within 900 s"
            time.sleep(0.5)
        started = _descendants(proc.pid)
        assert len(started) >= 3  # SuperLink, 2 SuperNodes (and their helpers)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=600)  # a hang guard: stopping a SuperLink and 2 SuperNodes under load takes a while
    finally:
        if proc.poll() is None:  # the test failed: leave no SuperLink behind for the next ones
            for pid in _descendants(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    deadline = time.monotonic() + 60  # SIGKILLed processes the kernel has yet to reap: wait for them, not a fixed time
    while _alive(started) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = _alive(started)
    assert alive == [], [Path(f"/proc/{p}/cmdline").read_text() for p in alive if Path(f"/proc/{p}").exists()]


# -- Flower's simulation runtime (virtual SuperNodes run by Ray workers) ----------------------------
def _alive(pids) -> list[int]:
    def alive(p):
        try:
            return "Z (zombie)" not in Path(f"/proc/{p}/status").read_text()
        except OSError:  # gone
            return False

    return [p for p in pids if alive(p)]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """One Ray head for the simulation tests, started as a cluster's head machine starts it
    (`ray start --head`; --block keeps it in the foreground so that it is stopped by its
    process id), at the address `flower simulate --ray-address` takes."""
    pytest.importorskip("ray")
    port = _free_port()
    log = tmp_path_factory.mktemp("ray") / "ray-head.log"
    env = flower_env() | {"RAY_USAGE_STATS_ENABLED": "0"}
    args = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
            "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats"]  # fmt: skip
    with open(log, "wb") as f:
        head = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_port(port, 120, head, log)
        yield f"127.0.0.1:{port}"
    finally:
        started = [head.pid, *_descendants(head.pid)]
        _stop([head])
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"  # what `ray stop` would remove: ray.init() tries to join the cluster it names
        if current.exists() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()
        assert _alive(started) == [], log.read_text()[-2000:]


SIMULATED = {"fedavg": ["federation.execution=vectorized"], "mapa": [*ALGORITHMS["mapa"], "federation.execution=vectorized"], "fedavg-greedylore": ALGORITHMS["fedavg-greedylore"]}


@pytest.mark.slow
@pytest.mark.parametrize("label", list(SIMULATED))
def test_flower_simulation_ends_with_the_simulators_model(ray_cluster, tmp_path, label):
    """2 virtual SuperNodes, 2 Ray workers (the head's 2 CPUs, 1 each): a stateless downlink
    with the clients of a SuperNode trained as one vectorised cohort, a stateful broadcast
    (MAPA's replicas in each virtual SuperNode's Context.state, a cohort too) and client state
    across rounds (GreedyLore's error feedback, in Context.state)."""
    from rankfed.app.flower import simulate_flower

    path, cfg = _cfg(tmp_path, SIMULATED[label])
    sim = run_experiment(cfg, tmp_path / "sim")
    if label == "fedavg":  # through the command line
        args = [sys.executable, "-m", "rankfed", "--quiet", "flower", "simulate", str(path), "--supernodes", "2", "--num-cpus", "1",
                "--ray-address", ray_cluster, "--out", str(tmp_path / "fl"), "--timeout", "300"]  # fmt: skip
        proc = subprocess.run(args, capture_output=True, text=True, timeout=360, env=flower_env())
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "on Flower simulation (2 virtual SuperNodes, 2 Ray workers)" in proc.stdout
        fl = json.loads((tmp_path / "fl" / "summary.json").read_text())
    else:
        fl = simulate_flower(cfg, tmp_path / "fl", supernodes=2, num_cpus=1, ray_address=ray_cluster, timeout=300)
    assert fl["status"] == "completed", fl.get("error")
    assert fl["transport"] == "flower" and fl["supernodes"] == 2
    assert fl["simulation"]["ray_workers"] == 2 and fl["simulation"]["ray_address"] == ray_cluster
    a, b = torch.load(tmp_path / "fl" / "model.pt"), torch.load(tmp_path / "sim" / "model.pt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"{label}: {k}")
    for key in ("total_uplink_bytes", "total_downlink_bytes", "uploads"):
        assert fl[key] == sim[key], key
    assert fl["failed_client_rounds"] == 0 and fl["skipped_rounds"] == []
    assert fl["execution"] == sim["execution"]
    if sim["execution"] == "vectorized":  # every train message with clients trained them as one cohort, as the simulator trained its rounds
        assert sim["cohort_rounds"] == 2
        assert fl["cohort_messages"] == sum(len({c % 2 for c in r["clients"]}) for r in map(json.loads, (tmp_path / "fl" / "rounds.jsonl").read_text().splitlines()))
    assert [m["round"] for m in _trained_lines(tmp_path / "fl")] == [1, 2]


# A ClientApp around rankfed's that, on virtual SuperNode 1's train message of round 2, says
# which process (Ray worker) runs it and waits there until the test has killed that process.
KILLED_WORKER_APP = """
import os
import time
from pathlib import Path

from flwr.clientapp import ClientApp

from rankfed.app.flower import client_app as rankfed_client

FLAGS = Path({flags!r})
client = ClientApp()


def _run(msg, context):
    if msg.metadata.message_type == "train" and int(msg.content["rankfed"]["round"]) == 2 and int(context.node_config["partition-id"]) == 1 and not (FLAGS / "killed").exists():
        (FLAGS / "pid.tmp").write_text(str(os.getpid()))
        os.replace(FLAGS / "pid.tmp", FLAGS / "pid")
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            time.sleep(0.1)
    return rankfed_client(msg, context)


client.query()(_run)
client.train()(_run)
client.evaluate()(_run)
"""


@pytest.mark.slow
def test_a_ray_worker_killed_mid_run_costs_its_clients_that_round(tmp_path):
    """Local Ray (started for the run, stopped after it): the worker running SuperNode 1's
    round-2 message is killed; its clients fail that round, Ray starts a worker again and the
    next round has every client; no Ray process is left when simulate returns."""
    pytest.importorskip("ray")
    from rankfed.app.flower import server_app
    from rankfed.flower import simulate

    flags = tmp_path / "flags"
    flags.mkdir()
    (tmp_path / "killedapp.py").write_text(KILLED_WORKER_APP.format(flags=str(flags)), encoding="utf-8")
    _, cfg = _cfg(tmp_path, ["federation.clients=2", "federation.participation=1.0", "federation.rounds=3", "flower.round_timeout=600"])
    before = set(_descendants(os.getpid()))
    started: set[int] = set()

    def on_metrics(m):
        started.update(set(_descendants(os.getpid())) - before)  # the simulation's child and Ray's processes
        if m["round"] == 1:
            deadline = time.monotonic() + 300
            while not (flags / "pid").exists():  # SuperNode 1's round-2 message is being run
                assert time.monotonic() < deadline, "no worker started SuperNode 1's round-2 message within 300 s"
                time.sleep(0.1)
            (flags / "killed").touch()
            os.kill(int((flags / "pid").read_text()), signal.SIGKILL)

    sys.path.insert(0, str(tmp_path))  # the child and the Ray workers import the app from this process's path
    try:
        import killedapp

        s = simulate(server_app, killedapp.client, supernodes=2, out_dir=tmp_path / "fl", run_config={"experiment": to_toml(cfg)}, on_metrics=on_metrics, timeout=600)
    finally:
        sys.path.remove(str(tmp_path))
    assert s["status"] == "completed", s.get("error")
    assert s["rounds"] == 3 and s["simulation"]["ray_address"] is None
    assert s["failed_client_rounds"] == 1 and s["failure_reasons"] == {"error": 1}, s["failure_examples"]
    assert "round 2, client 1" in s["failure_examples"]["error"]
    lines = _trained_lines(tmp_path / "fl")
    assert [m["failed_clients"] for m in lines] == [0, 1, 0]
    assert [m["num_clients"] for m in lines] == [2, 1, 2]
    assert len(started) >= 3  # the child, Ray's own processes, its workers
    assert _alive(started) == [], [Path(f"/proc/{p}/cmdline").read_text() for p in _alive(started)]


def test_local_run_checks_the_experiment_before_starting_anything(tmp_path):
    path, cfg = _cfg(tmp_path, ["task.dataset=fmnist", "task.data_dir=/no/such/folder"])
    proc = subprocess.run([sys.executable, "-m", "rankfed", "flower", "run", str(path), "--out", str(tmp_path / "fl")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "/no/such/folder" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "fl").exists()
    proc = subprocess.run([sys.executable, "-m", "rankfed", "flower", "run", str(path), "--supernodes", "9"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--supernodes 9" in proc.stderr


def test_a_simulation_checks_its_options_before_starting_anything(tmp_path):
    from rankfed.app.flower import simulate_flower
    from rankfed.errors import ConfigError

    _, cfg = _cfg(tmp_path)
    bad = [({"num_cpus": 0}, r"--num-cpus = 0: must be > 0"), ({"num_gpus": -0.5}, r"--num-gpus = -0.5"), ({"supernodes": 9}, r"--supernodes 9: must be in \[1, federation.clients = 4\]")]
    for kwargs, match in bad:
        with pytest.raises((ConfigError, ValueError), match=match):
            simulate_flower(cfg, tmp_path / "fl", **kwargs)
    with pytest.raises(ConfigError, match="--num-gpus = 0"):
        simulate_flower(parse_config({"federation": {"device": "cuda"}}), tmp_path / "fl")
    assert not (tmp_path / "fl").exists()


def test_flower_app_is_a_valid_flower_app(tmp_path):
    from flwr.cli.config_utils import load_and_validate

    proc = subprocess.run([sys.executable, "-m", "rankfed", "flower", "app", str(tmp_path / "app")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    config, warnings = load_and_validate(tmp_path / "app" / "pyproject.toml")
    assert config is not None and config["tool"]["flwr"]["app"]["components"]["serverapp"] == "rankfed.app.flower:server_app"
    # the experiment travels as the run config's text and reads back equal
    cfg = load_config(None, ["algorithm.name=mapa"])
    assert parse_config(tomllib.loads(to_toml(cfg))) == cfg


MAKE_CERTS = Path(__file__).resolve().parents[1] / "examples" / "flower-tls" / "make_certs.sh"


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("openssl") and shutil.which("ssh-keygen")), reason="needs openssl and ssh-keygen")
def test_tls_federation_with_supernode_authentication(tmp_path):
    """The README's multi-machine commands, on one machine: a TLS SuperLink that admits only
    registered SuperNode keys, two authenticated SuperNodes, a run submitted over TLS."""
    bindir = Path(sys.executable).parent
    home = tmp_path / "home"
    home.mkdir()
    env = flower_env(home)
    certs, keys, logs = tmp_path / "certs", tmp_path / "keys", tmp_path / "logs"
    keys.mkdir()
    logs.mkdir()
    subprocess.run(["bash", str(MAKE_CERTS), str(certs)], check=True, capture_output=True, timeout=120)
    for i in (1, 2):
        subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(keys / f"supernode_{i}"), "-C", ""], check=True, timeout=60)
    port = _free_port()
    procs = []

    def spawn(args, name):
        log = open(logs / name, "wb")  # noqa: SIM115 - closed with the test's tmp_path
        procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True))
        return procs[-1]

    try:
        link = spawn(
            [str(bindir / "flower-superlink"), "--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.pem"),
             "--ssl-keyfile", str(certs / "server.key"), "--enable-supernode-auth", "--disable-runtime-dependency-installation",
             "--host", "127.0.0.1", "--port", str(port)],
            "superlink.log",
        )  # fmt: skip
        _wait_port(port, 60, link, logs / "superlink.log")
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "tls"\n\n[superlink.tls]\naddress = "127.0.0.1:{port}"\nroot-certificates = "{certs / "ca.crt"}"\ninsecure = false\n'
        )
        for i in (1, 2):
            reg = subprocess.run([str(bindir / "flwr"), "supernode", "register", str(keys / f"supernode_{i}.pub"), "tls"], env=env, capture_output=True, text=True, timeout=120)
            assert reg.returncode == 0, reg.stdout + reg.stderr
        for i in (1, 2):
            spawn(
                [str(bindir / "flower-supernode"), "--superlink", f"127.0.0.1:{port}", "--root-certificates", str(certs / "ca.crt"),
                 "--auth-supernode-private-key", str(keys / f"supernode_{i}"), "--node-config", f"partition-id={i - 1} num-partitions=2",
                 "--port", str(_free_port())],
                f"supernode-{i}.log",
            )  # fmt: skip
        path, _ = _cfg(tmp_path, ["federation.clients=2", "federation.participation=1.0"])
        args = [sys.executable, "-m", "rankfed", "--quiet", "flower", "run", str(path), "--superlink", f"127.0.0.1:{port}",
                "--root-certificates", str(certs / "ca.crt"), "--out", str(tmp_path / "fl"), "--timeout", "900"]  # fmt: skip
        proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        s = json.loads((tmp_path / "fl" / "summary.json").read_text())
        assert s["status"] == "completed" and s["supernodes"] == 2 and s["failed_client_rounds"] == 0
    finally:
        _stop(procs)


# -- your own model and data: an experiment file naming user code, and a Python factory ------------

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# examples/own_model.py's model, data and loss as a Flower App of your own: a factory, no experiment file
FACTORY_APP = '''
import torch

import rankfed as rf
from rankfed.flower import client_app, server_app
from own_model import TinyResNet, load_clients, smooth_ce


def make(context=None):
    clients, test = load_clients("digits", num_clients=3, samples=300)
    return rf.Federation(TinyResNet, clients, test, algorithm=rf.FedLoRU(rank=4, tau=1, patterns=["layer*conv*"]), loss=smooth_ce,
                         local=rf.LocalTraining(optimizer=torch.optim.Adam, lr=3e-3, batch_size=32), seed=5)


server = server_app(make, rounds=2, clients_per_round=2)
client = client_app(make, rounds=2, clients_per_round=2)
'''


def _factory_app_on_flower_and_in_the_simulator(deployment, tmp_path, name: str, code: str, extra: tuple = ()):
    """Submit the factory App ``name`` (its module source ``code``, plus ``extra`` files) to the
    deployment, run its ``make()`` in the simulator, and return (Flower's summary, the
    simulator's Result, Flower's model state, the simulator's)."""
    from rankfed.flower import submit, write_app

    app = tmp_path / "app"
    app.mkdir()
    for path in extra:
        shutil.copy(path, app / Path(path).name)
    (app / f"{name}.py").write_text(code, encoding="utf-8")
    write_app(app, f"{name}:server", f"{name}:client", name=name)
    fl = submit(app, tmp_path / "fl", deployment.address, insecure=True, timeout=900)
    assert fl["status"] == "completed", fl.get("error")
    sys.path.insert(0, str(app))
    try:
        module = __import__(name)
        sim = module.make().run(rounds=2, clients_per_round=2, out=tmp_path / "sim")
    finally:
        sys.path.remove(str(app))
    a, b = torch.load(tmp_path / "fl" / "model.pt"), torch.load(tmp_path / "sim" / "model.pt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    return fl, sim, a, b


@pytest.mark.slow
def test_a_python_factory_runs_your_model_on_flower_as_the_simulator_does(deployment, tmp_path):
    fl, sim, _, _ = _factory_app_on_flower_and_in_the_simulator(deployment, tmp_path, "userapp", FACTORY_APP, (EXAMPLES / "own_model.py",))
    for key in ("total_uplink_bytes", "total_downlink_bytes", "final_accuracy", "uploads", "loss"):
        assert fl[key] == sim.summary[key], key


@pytest.mark.slow
def test_the_examples_experiment_file_naming_user_code_runs_on_flower(deployment, tmp_path):
    """examples/own_model.toml names the example's model, data and loss by import path."""
    sets = ["federation.rounds=2", "federation.clients=3", "task.dataset_options={data='digits',samples=300}", "algorithm.name=mapa", "algorithm.k=256"]
    cfg = load_config(EXAMPLES / "own_model.toml", sets)
    sim = run_experiment(cfg, tmp_path / "sim")
    fl = run_flower(cfg, tmp_path / "fl", superlink=deployment.address, insecure=True, timeout=900)
    assert fl["status"] == "completed", fl.get("error")
    assert fl["model"] == "own_model:TinyResNet" and fl["dataset"] == "own_model:load_clients" and fl["loss"] == "own_model:smooth_ce"
    a, b = torch.load(tmp_path / "fl" / "model.pt"), torch.load(tmp_path / "sim" / "model.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert fl["total_uplink_bytes"] == sim["total_uplink_bytes"] and fl["final_accuracy"] == sim["final_accuracy"]


# A Hugging Face GPT-2 under PEFT adapters as a Flower App from a factory (issue 17)
HF_APP = '''
import torch

import rankfed as rf
from rankfed.flower import client_app, server_app
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel


def model():
    cfg = GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], lora_dropout=0.0, fan_in_fan_out=True)
    return get_peft_model(GPT2LMHeadModel(cfg), lora)


def data(n, seed):
    ids = torch.randint(2, 40, (n, 12), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[:, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask}, ids.masked_fill(mask == 0, -100)


def make(context=None):
    return rf.Federation(model, [data(12, i) for i in range(3)], test=data(8, 9), algorithm=rf.FedLoRU(tau=1),
                         local=rf.LocalTraining(optimizer="adamw", lr=1e-2, batch_size=4), seed=3)


server = server_app(make, rounds=2, clients_per_round=2)
client = client_app(make, rounds=2, clients_per_round=2)
'''


@pytest.mark.slow
def test_peft_fine_tuning_of_a_gpt2_on_flower_ends_with_the_simulators_adapters(deployment, tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    fl, sim, a, _ = _factory_app_on_flower_and_in_the_simulator(deployment, tmp_path, "hfapp", HF_APP)
    assert any("lora_A" in k for k in a) and any("base_layer" in k for k in a)  # the adapters and the base they were merged into (tau = 1)
    for key in ("total_uplink_bytes", "total_downlink_bytes", "loss", "uploads"):
        assert fl[key] == sim.summary[key], key
