"""End to end through the `rankfed` command on scikit-learn's digits (no download)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rankfed.app.cli import main

CONFIG = """
[task]
dataset = "digits"
partition = "dirichlet"
alpha = 1.0
model = "mlp"
model_options = { hidden = [32] }
[federation]
clients = 8
participation = 0.5
rounds = 6
seed = 3
eval_every = 2
[client]
lr = 0.1
momentum = 0.9
batch_size = 16
[algorithm]
name = "fedavg"
"""

METRIC_KEYS = {"round", "accuracy", "loss", "uplink_bytes", "downlink_bytes", "cum_uplink_bytes", "cum_downlink_bytes", "wall_s"}


@pytest.fixture()
def config(tmp_path):
    p = tmp_path / "exp.toml"
    p.write_text(CONFIG)
    return p


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_writes_a_complete_run_folder(config, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--quiet", "run", str(config), "--out", str(out), "--set", "federation.rounds=7"]) == 0
    assert "best accuracy" in capsys.readouterr().out
    initial, *metrics = _lines(out / "metrics.jsonl")
    # round 0: the initial model, before anything was sent (the curves' first point)
    assert initial["round"] == 0 and initial["initial"] and initial["cum_uplink_bytes"] == initial["cum_downlink_bytes"] == 0
    assert 0 <= initial["accuracy"] < 0.5 and initial["loss"] > 0
    assert [m["round"] for m in metrics] == [2, 4, 6, 7]  # every 2nd round and the last
    for m in metrics:
        assert METRIC_KEYS <= set(m)
    # cumulative bytes add up the per-round bytes of every round, evaluated or not
    rounds = _lines(out / "rounds.jsonl")
    assert len(rounds) == 7
    assert metrics[-1]["cum_uplink_bytes"] == sum(sum(r["uplink_bytes_per_client"]) for r in rounds)
    assert all(len(r["clients"]) == 4 for r in rounds)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 7 and summary["clients_per_round"] == 4
    assert summary["best_accuracy"] == max(m["accuracy"] for m in metrics)
    assert summary["final_accuracy"] == metrics[-1]["accuracy"]
    assert summary["total_uplink_bytes"] == metrics[-1]["cum_uplink_bytes"]
    assert summary["num_parameters"] == 64 * 32 + 32 + 32 * 10 + 10
    assert summary["uplink_vs_fedavg"] == pytest.approx(1.0)
    assert summary["best_accuracy"] > 0.5  # digits with an MLP learns within 7 rounds
    resolved = (out / "config.toml").read_text()
    assert "rounds = 7" in resolved and "eval_batch_size" in resolved  # overrides applied, defaults filled in


def test_run_refuses_to_overwrite_unless_asked(config, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["-q", "run", str(config), "--out", str(out), "--set", "federation.rounds=1"]) == 0
    assert main(["-q", "run", str(config), "--out", str(out), "--set", "federation.rounds=1"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["-q", "run", str(config), "--out", str(out), "--set", "federation.rounds=2", "--overwrite"]) == 0
    assert len(_lines(out / "rounds.jsonl")) == 2


@pytest.mark.parametrize(
    "override, message",
    [
        ("federation.participation=2", "federation.participation = 2.0: must be in (0, 1]"),
        ("task.datset=digits", "unknown key task.datset"),
        ("federation.clients=5000", "federation.clients = 5000: more clients than training samples"),
    ],
)
def test_bad_input_exits_2_with_one_line(config, tmp_path, capsys, override, message):
    code = main(["-q", "run", str(config), "--out", str(tmp_path / "r"), "--set", override])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err


def test_missing_dataset_folder_names_it(config, tmp_path, capsys):
    code = main(["-q", "run", str(config), "--out", str(tmp_path / "r"), "--set", "task.dataset=fmnist", "--set", f"task.data_dir={tmp_path}/nofmnist"])
    err = capsys.readouterr().err
    assert code == 2 and f"{tmp_path}/nofmnist" in err


def test_compare_tabulates_and_plot_draws(config, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["-q", "compare", str(config), "--algorithms", "fedavg", "--out", str(out), "--set", "federation.rounds=2"]) == 0
    printed = capsys.readouterr().out
    assert "fedavg" in printed and "100.00%" in printed  # FedAvg relative to itself
    rows = json.loads((out / "comparison.json").read_text())
    assert rows[0]["algorithm"] == "fedavg" and rows[0]["uplink_vs_fedavg"] == 1.0
    assert (out / "comparison.png").stat().st_size > 10_000
    png = tmp_path / "p.png"
    assert main(["plot", str(out / "fedavg"), "--out", str(png), "--bytes", "uplink"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(tmp_path / "nothing")]) == 2


def test_compare_rejects_unknown_algorithm(config, tmp_path, capsys):
    assert main(["-q", "compare", str(config), "--algorithms", "fedavg,nope", "--out", str(tmp_path / "c")]) == 2
    assert "unknown algorithm or variant 'nope'" in capsys.readouterr().err


def test_console_script_runs_demo_config_subset(tmp_path):
    """The installed `rankfed` entry point works as a process (help and a tiny run)."""
    exe = Path(sys.executable).parent / "rankfed"
    assert exe.exists(), "the package's console script is installed beside the interpreter"
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "compare" in r.stdout and "demo" in r.stdout
    cfg = tmp_path / "exp.toml"
    cfg.write_text(CONFIG)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([str(exe), "run", str(cfg), "--out", str(tmp_path / "o"), "--set", "federation.rounds=2"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert "round 2/2" in r.stderr  # progress lines when stderr is not a terminal


def test_same_config_same_seed_gives_identical_metrics(config, tmp_path):
    from rankfed.app.config import load_config
    from rankfed.app.experiment import run_experiment

    def metrics(out, seed):
        cfg = load_config(config, [f"federation.seed={seed}", "federation.rounds=4"])
        run_experiment(cfg, out)
        drop = {"wall_s", "round_s", "eval_s"}
        return [{k: v for k, v in m.items() if k not in drop} for m in _lines(out / "metrics.jsonl")]

    a, b, c = metrics(tmp_path / "a", 5), metrics(tmp_path / "b", 5), metrics(tmp_path / "c", 6)
    assert a == b
    assert [m["accuracy"] for m in a] != [m["accuracy"] for m in c]


def test_demo_prints_a_comparison_table(tmp_path, capsys):
    assert main(["-q", "demo", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "best acc" in out and "fedavg" in out and "uplink vs FedAvg" in out
    rows = json.loads((tmp_path / "demo" / "comparison.json").read_text())
    assert rows and all(r["best_accuracy"] > 0.8 for r in rows)  # digits is easy: every algorithm learns it


@pytest.mark.parametrize(
    "sets",
    [
        ["algorithm.name=mapa", "algorithm.k=64"],
        ["algorithm.name=mapa", "algorithm.k=64", "algorithm.fresh_a=false", "federation.client_kind=stateless"],
        ["algorithm.name=mapa", "algorithm.k=64", "algorithm.compressor=qsgd", "algorithm.qsgd_bits=4"],
        ["algorithm.name=fa_lora", "algorithm.rank=4"],
        ["algorithm.name=fedlora", "algorithm.rank=4", 'algorithm.patterns=["*"]'],
        ["algorithm.name=fedloru", "algorithm.rank=4", "algorithm.tau=1", 'algorithm.patterns=["*"]'],
        ["algorithm.name=fedhm", "algorithm.rank_factor=4", 'algorithm.patterns=["*"]'],
        ["algorithm.name=pfedloru", "algorithm.rank=4", "algorithm.tau=1", "algorithm.personal_rank=2", 'algorithm.patterns=["*"]'],
        ["algorithm.name=fedhm", 'algorithm.patterns=["*"]', "algorithm.tiers=[{fraction=0.5,rank=1},{fraction=0.5,rank=2}]"],
        ["algorithm.name=mfedloru", "algorithm.rank=4", "algorithm.tau=1", 'algorithm.patterns=["*"]', "algorithm.tiers=[{fraction=1.0,rank_a=2,rank_b=2}]"],
        ["algorithm.compressor=topk", "algorithm.topk_ratio=0.05", "algorithm.error_feedback=true"],
        ["algorithm.compressor=qsgd"],
        ["algorithm.compressor=powersgd", "algorithm.compress_rank=2"],
        ["algorithm.compressor=greedylore", "algorithm.compress_rank=2", "algorithm.update_gap=3"],
        ["algorithm.compressor=topk+qsgd", "federation.client_kind=stateful"],
    ],
)
def test_run_accepts_every_algorithm_and_compressor(config, tmp_path, sets):
    out = tmp_path / "r"
    args = ["-q", "run", str(config), "--out", str(out), "--set", "federation.rounds=2"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    resolved = (out / "config.toml").read_text()
    for s in sets:
        key, value = s.split("=", 1)
        if key.startswith("algorithm.") and not value.startswith("["):
            assert str(summary["algorithm_options"][key.split(".")[1]]).lower() == value.lower()
    assert "client_kind" in summary and summary["total_uplink_bytes"] > 0
    # each of these sends under half of FedAvg's uplink (greedylore: a client's first upload is dense)
    assert summary["uplink_vs_fedavg"] < (1.0 if "algorithm.compressor=greedylore" in sets else 0.5)
    assert "[algorithm]" in resolved


@pytest.mark.parametrize("variant", [1, 2])
def test_run_accepts_pfedlora_and_reports_personal_accuracy(config, tmp_path, variant):
    out = tmp_path / "r"
    sets = ["federation.rounds=2", "algorithm.name=pfedlora", f"algorithm.variant={variant}", "algorithm.rank=2", 'algorithm.patterns=["*"]']
    assert main(["-q", "run", str(config), "--out", str(out), *[a for s in sets for a in ("--set", s)]]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algorithm_options"]["variant"] == variant
    assert 0 <= summary["final_personal_accuracy"] <= 1
    assert summary["uplink_vs_fedavg"] > 0.9  # pFedLoRA shares the full model
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()][1:]  # after round 0's line
    assert lines and all(l["personal_accuracy"] is not None for l in lines)


def test_a_diverging_run_stops_with_a_clear_status(config, tmp_path, capsys):
    out = tmp_path / "r"
    # lr 1e30 overflows the weights to inf within a round or two
    assert main(["-q", "run", str(config), "--out", str(out), "--set", "client.lr=1e30", "--set", "federation.rounds=6"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and 1 <= summary["diverged_at_round"] <= 6
    assert summary["rounds"] == summary["diverged_at_round"] - 1
    assert "diverged in round" in capsys.readouterr().err
    ok = tmp_path / "ok"
    assert main(["-q", "run", str(config), "--out", str(ok), "--set", "federation.rounds=1"]) == 0
    assert json.loads((ok / "summary.json").read_text())["status"] == "completed"


def test_a_fallback_warning_is_one_rankfed_line(config, tmp_path):
    """A library warning reaches the user as one line, like an error, not as a Python trace line."""
    import subprocess
    import sys

    args = ["run", str(config), "--out", str(tmp_path / "r"), "--set", "federation.rounds=1", "--set", "client.optimizer='adamw'", "--set", "client.lr=0.001", "--set", "federation.execution='vectorized'"]
    proc = subprocess.run([sys.executable, "-m", "rankfed", "-q", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "rankfed: warning: federation.execution = 'vectorized': clients train one by one (client.optimizer = 'adamw'" in proc.stderr
    assert "UserWarning" not in proc.stderr and "run_round" not in proc.stderr
