"""The examples run (on small data) and write runs that `rankfed plot` draws."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=900, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_own_model_example_compares_three_algorithms_and_plots(tmp_path):
    out = tmp_path / "own"
    _run(str(EXAMPLES / "own_model.py"), "--clients", "4", "--per-round", "2", "--rounds", "2", "--samples", "400", "--out", str(out))
    rows = {r["algorithm"]: r for r in json.loads((out / "comparison.json").read_text())}
    assert set(rows) == {"fedavg", "fedloru", "mapa"}
    assert rows["mapa"]["uplink_vs_fedavg"] < rows["fedloru"]["uplink_vs_fedavg"] < 1.0
    summary = json.loads((out / "fedloru" / "summary.json").read_text())
    assert summary["loss"] == "__main__:smooth_ce" or summary["loss"].endswith("smooth_ce>")
    _run("-m", "rankfed", "-q", "plot", str(out), "--out", str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").stat().st_size > 10_000


def test_regression_example_reports_loss_and_metrics(tmp_path):
    out = tmp_path / "reg"
    proc = _run(str(EXAMPLES / "regression.py"), "--clients", "4", "--rounds", "3", "--out", str(out))
    assert "fedavg: test MSE" in proc.stdout and "mapa: test MSE" in proc.stdout
    lines = [json.loads(x) for x in (out / "mapa" / "metrics.jsonl").read_text().splitlines()]
    assert all(x["accuracy"] is None and x["loss"] > 0 and "r2" in x for x in lines)
    _run("-m", "rankfed", "-q", "plot", str(out), "--out", str(tmp_path / "plot.png"))


def test_own_model_experiment_file_runs_from_anywhere(tmp_path):
    cfg = EXAMPLES / "own_model.toml"
    out = tmp_path / "run"
    _run("-m", "rankfed", "-q", "run", str(cfg), "--out", str(out), "--set", "federation.rounds=1", "--set", "federation.clients=3",
         "--set", "task.dataset_options={data='digits',samples=300}", cwd=tmp_path)  # fmt: skip
    s = json.loads((out / "summary.json").read_text())
    assert s["model"] == "own_model:TinyResNet" and s["loss"] == "own_model:smooth_ce" and s["status"] == "completed"
