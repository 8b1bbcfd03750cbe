"""Checkpoint and resume: a run killed with SIGKILL at a random point, then resumed, ends with
exactly (bitwise, on CPU) the metrics and model of the same run left alone."""

import json
import random
import subprocess
import sys
import time

import pytest
import torch

from rankfed.app.cli import main
from rankfed.app.config import load_config, to_toml
from rankfed.app.experiment import run_experiment
from rankfed.server import RESUME_FILE

BASE = ["task.model=mlp", "task.model_options={hidden=[24]}", "federation.clients=6", "federation.participation=0.5", "federation.rounds=25", "federation.eval_every=5", "federation.seed=4", "federation.resume_every=1"]
# stateless and stateful clients, client state across rounds, merges, personal factors
CASES = {
    "fedavg-topk-ef": ["algorithm.compressor=topk", "algorithm.topk_ratio=0.1", "algorithm.error_feedback=true"],
    # client state on disk, 2 in memory, resume points 3 rounds apart: states written after one are undone
    "fedavg-topk-ef-disk": ["algorithm.compressor=topk", "algorithm.topk_ratio=0.1", "algorithm.error_feedback=true", "federation.client_state=disk", "federation.client_state_cache=2", "federation.resume_every=3"],
    "mapa": ["algorithm.name=mapa", "algorithm.k=32"],
    # clients that come and go: who last synced when, and the replicas kept for their catch-ups
    "mapa-availability": ["algorithm.name=mapa", "algorithm.k=32", "federation.availability=0.5"],
    "fedloru": ["algorithm.name=fedloru", "algorithm.rank=4", "algorithm.tau=3", 'algorithm.patterns=["*"]'],
    "pfedloru": ["algorithm.name=pfedloru", "algorithm.rank=4", "algorithm.tau=3", "algorithm.personal_rank=2", 'algorithm.patterns=["*"]'],
    # the FedLoRU code's settings: zero bases, factor dropout (torch's RNG), momentum merges evaluated before merging
    "fedloru-code": ["preset=fedloru-code", "algorithm.name=fedloru", "algorithm.rank=4", "algorithm.tau=3", 'algorithm.patterns=["*"]'],
}
TIMING = {"wall_s", "round_s", "eval_s"}


def _lines(path):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in path.read_text().splitlines()]


@pytest.mark.parametrize("case", list(CASES))
def test_killed_and_resumed_run_equals_the_uninterrupted_one(tmp_path, case):
    cfg = load_config(None, [*BASE, *CASES[case]])
    path = tmp_path / "exp.toml"
    path.write_text(to_toml(cfg))
    run_experiment(cfg, tmp_path / "whole")
    part = tmp_path / "part"
    proc = subprocess.Popen([sys.executable, "-m", "rankfed", "-q", "run", str(path), "--out", str(part)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rounds = part / "rounds.jsonl"
    deadline = time.monotonic() + 600  # a guard against a hang, not a race
    every = cfg.federation.resume_every
    after = random.randint(every + 1, 20)  # of 25 rounds; round `every`'s state is saved by the time every + 1 lines exist
    while not (rounds.exists() and len(rounds.read_text().splitlines()) >= after):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.002)
    time.sleep(random.uniform(0.0, 0.02))  # anywhere in the next round: mid-training, mid-write
    proc.kill()
    proc.wait()
    assert not (part / "summary.json").exists(), "the run finished before it was killed: make it longer"
    killed_at = len(rounds.read_text().splitlines())
    assert main(["-q", "run", "--resume", str(part)]) == 0
    summary = json.loads((part / "summary.json").read_text())
    assert summary["status"] == "completed" and 1 <= summary["resumed_from_round"] <= killed_at
    assert _lines(part / "metrics.jsonl") == _lines(tmp_path / "whole" / "metrics.jsonl")
    assert _lines(part / "rounds.jsonl") == _lines(tmp_path / "whole" / "rounds.jsonl")
    a, b = torch.load(part / "model.pt"), torch.load(tmp_path / "whole" / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (part / RESUME_FILE).exists()  # finished: nothing left to resume


def test_resume_errors_are_clear(tmp_path, capsys):
    assert main(["-q", "run", "--resume", str(tmp_path / "nothing")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    cfg = load_config(None, ["task.model_options={hidden=[16]}", "federation.rounds=2", "federation.resume_every=0"])
    run_experiment(cfg, tmp_path / "done")
    assert main(["-q", "run", "--resume", str(tmp_path / "done")]) == 2
    assert "the run is complete" in capsys.readouterr().err
    # killed before its first resume point: said so, with the command that starts it again
    (tmp_path / "done" / "summary.json").unlink()
    assert main(["-q", "run", "--resume", str(tmp_path / "done")]) == 2
    err = capsys.readouterr().err
    assert "before its first resume point" in err and "--overwrite" in err and str(tmp_path / "done" / "config.toml") in err
    assert main(["-q", "run", "--resume", str(tmp_path / "done"), "--set", "federation.rounds=3"]) == 2
    assert "give no CONFIG" in capsys.readouterr().err
    # a file that is not this run's saved state is refused, as is garbage
    torch.save(torch.load(tmp_path / "done" / "model.pt"), tmp_path / "done" / RESUME_FILE)
    assert main(["-q", "run", "--resume", str(tmp_path / "done")]) == 2
    assert "cannot resume" in capsys.readouterr().err
    (tmp_path / "done" / RESUME_FILE).write_bytes(b"\x00garbage")
    assert main(["-q", "run", "--resume", str(tmp_path / "done")]) == 2
    assert "not a readable resume state" in capsys.readouterr().err


def test_disk_client_states_of_the_last_resume_point_survive_until_the_next_is_saved(tmp_path):
    """A kill after the next resume point's commit but before its resume.pt is written resumes
    from the previous point: its files are deleted only by collect(), after the save."""
    import torch

    from rankfed.sim.clientstate import DiskClientStates

    def two_points(folder):
        states = DiskClientStates(folder, cache=1)
        for cid in range(3):
            states[cid] = {"e": torch.full((2,), float(cid))}
        first = states.commit()
        states.collect()
        for cid in range(3):
            states[cid] = {"e": torch.full((2,), 10.0 + cid)}
        return states, first, states.commit()

    _, first, _ = two_points(tmp_path / "killed")  # ... killed here, before resume.pt names the second point
    again = DiskClientStates(tmp_path / "killed", cache=1)
    again.restore(first)
    assert [float(again.get(c)["e"][0]) for c in range(3)] == [0.0, 1.0, 2.0]
    states, first, second = two_points(tmp_path / "saved")
    states.collect()  # the second point's resume.pt is saved
    assert {p.name for p in (tmp_path / "saved").iterdir()} == set(second["files"].values())
