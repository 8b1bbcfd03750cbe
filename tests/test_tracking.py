"""Experiment tracking (rankfed.tracking): what the TensorBoard and MLflow loggers write, read back."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import rankfed as rf
import rankfed.tracking as tracking
from rankfed.errors import ConfigError
from rankfed.server import RoundRecord

CONFIG = """# a comment
[task]
dataset = "synthetic"
model_options = {}
long = "LONG"

[federation]
rounds = 4
clients = 4

[algorithm]
name = "fedavg"

[algorithms."fedavg+qsgd8"]
name = "fedavg"
compressor = "qsgd"
""".replace("LONG", "x" * 7000)


def _exp(config: str = CONFIG, rounds: int = 4):
    """What the loggers read of a :class:`rankfed.server.Experiment`."""
    return SimpleNamespace(config_text=config, options=SimpleNamespace(rounds=rounds), algorithm=SimpleNamespace(name="fedavg"), info={})


def _record(rnd: int, *, evaluated: bool = True, train_loss: float | None = None, scale: float = 1.0) -> RoundRecord:
    up, down = 1000 * rnd, 3000 * rnd
    rec = RoundRecord(
        round=rnd, clients=[0, 1], uplink_bytes=1000, downlink_bytes=3000, cum_uplink_bytes=up, cum_downlink_bytes=down,
        round_s=0.25 * rnd, wall_s=0.5 * rnd, train_loss=1.0 / rnd if train_loss is None else train_loss,
    )  # fmt: skip
    if evaluated:
        rec.evaluated, rec.accuracy, rec.loss, rec.metrics = True, scale * 0.1 * rnd, 2.0 / rnd, {"f1": 0.05 * rnd, "bad key!": 1.0}
    return rec


RECORDS = [_record(1), _record(2, evaluated=False), _record(3, train_loss=float("nan")), _record(4)]


# -- make_loggers and the base class (no optional package needed) ------------------------------------
def test_make_loggers_rejects_an_unknown_name():
    with pytest.raises(ConfigError) as err:
        tracking.make_loggers(["tensorboard", "wandb"])
    msg = str(err.value)
    assert msg.startswith("federation.loggers") and "'wandb'" in msg and "tensorboard" in msg and "mlflow" in msg
    assert tracking.make_loggers([]) == []


def test_the_base_callback_does_nothing():
    cb = tracking.Callback()
    cb.on_run_start(_exp(), None, 1)
    cb.on_round(RECORDS[0])
    cb.on_run_end({"status": "completed"}, None)


@pytest.mark.parametrize(("module", "cls", "name"), [("mlflow", "MLflowLogger", "mlflow"), ("torch.utils.tensorboard", "TensorBoardLogger", "tensorboard")])
def test_a_missing_package_is_a_config_error(monkeypatch, module, cls, name):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError
    with pytest.raises(ConfigError, match=rf"federation.loggers = \['{name}'\] needs .*pip install 'rankfed\[tracking\]'"):
        getattr(tracking, cls)()


def test_round_scalars_leave_out_what_a_round_lacks():
    s = tracking.round_scalars(RECORDS[1])  # not evaluated
    assert "accuracy" not in s and "loss" not in s and s["bytes/cum_total"] == 2000 + 6000
    assert "train_loss" not in tracking.round_scalars(RECORDS[2])  # nan
    s = tracking.round_scalars(RECORDS[0])
    assert s["metrics/f1"] == pytest.approx(0.05) and s["metrics/bad key_"] == 1.0 and "personal_accuracy" not in s


# -- TensorBoard -------------------------------------------------------------------------------------
def _events(log_dir: Path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _scalars(acc, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _config_texts(acc) -> list[str]:
    return [e.tensor_proto.string_val[0].decode() for e in acc.Tensors("config/text_summary")]


@pytest.fixture
def tensorboard():
    pytest.importorskip("tensorboard")


def test_tensorboard_writes_each_rounds_scalars_and_the_config(tmp_path, tensorboard):
    tb = tracking.TensorBoardLogger()
    tb.on_run_start(_exp(), tmp_path, 1)
    for rec in RECORDS:
        tb.on_round(rec)
    tb.on_run_end({"status": "completed"}, tmp_path)
    assert tb.path == tmp_path / "tensorboard" and tb.writer is None
    acc = _events(tmp_path / "tensorboard")
    evaluated = [r for r in RECORDS if r.evaluated]
    for tag, want in [
        ("accuracy", [(r.round, r.accuracy) for r in evaluated]),
        ("loss", [(r.round, r.loss) for r in evaluated]),
        ("metrics/f1", [(r.round, r.metrics["f1"]) for r in evaluated]),
        ("train_loss", [(r.round, r.train_loss) for r in RECORDS if math.isfinite(r.train_loss)]),
        ("bytes/uplink", [(r.round, r.uplink_bytes) for r in RECORDS]),
        ("bytes/downlink", [(r.round, r.downlink_bytes) for r in RECORDS]),
        ("bytes/cum_uplink", [(r.round, r.cum_uplink_bytes) for r in RECORDS]),
        ("bytes/cum_downlink", [(r.round, r.cum_downlink_bytes) for r in RECORDS]),
        ("bytes/cum_total", [(r.round, r.cum_uplink_bytes + r.cum_downlink_bytes) for r in RECORDS]),
        ("time/round_s", [(r.round, r.round_s) for r in RECORDS]),
    ]:
        got = _scalars(acc, tag)
        assert [s for s, _ in got] == [s for s, _ in want], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), tag
    assert "personal_accuracy" not in acc.Tags()["scalars"]
    (text,) = _config_texts(acc)
    assert text.startswith("```toml\n") and text.rstrip().endswith("```") and '[algorithms."fedavg+qsgd8"]' in text


def test_tensorboard_resumed_run_replaces_the_steps_after_its_resume_point(tmp_path, tensorboard):
    first = tracking.TensorBoardLogger()
    first.on_run_start(_exp(), tmp_path, 1)
    for rec in RECORDS[:3]:  # rounds 1-3 logged; the run is resumed from its state after round 2
        first.on_round(rec)
    first.on_run_end({"status": "interrupted", "error": "KeyboardInterrupt: "}, tmp_path)
    second = tracking.TensorBoardLogger()
    second.on_run_start(_exp(), tmp_path, 3)
    for rnd in (3, 4):
        second.on_round(_record(rnd, scale=2.0))
    second.on_run_end({"status": "completed"}, tmp_path)
    acc = _events(tmp_path / "tensorboard")
    for tag in ("bytes/uplink", "time/round_s"):
        assert [s for s, _ in _scalars(acc, tag)] == [1, 2, 3, 4], tag
    assert _scalars(acc, "accuracy") == [(1, pytest.approx(0.1)), (3, pytest.approx(0.6)), (4, pytest.approx(0.8))]
    assert len(_config_texts(acc)) == 1  # written by the first run only


def test_tensorboard_run_folder_started_over_drops_its_old_events(tmp_path, tensorboard):
    for scale in (1.0, 3.0):  # the same run folder, written twice (overwrite)
        tb = tracking.TensorBoardLogger()
        tb.on_run_start(_exp(), tmp_path, 1)
        tb.on_round(_record(1, scale=scale))
        tb.on_run_end({"status": "completed"}, tmp_path)
    acc = _events(tmp_path / "tensorboard")
    assert _scalars(acc, "accuracy") == [(1, pytest.approx(0.3))]


def test_tensorboard_log_dir_without_a_run_folder(tmp_path, monkeypatch, tensorboard):
    monkeypatch.chdir(tmp_path)
    tb = tracking.TensorBoardLogger()
    tb.on_run_start(_exp(), None, 1)
    tb.on_round(RECORDS[0])
    tb.on_run_end({"status": "completed"}, None)
    (made,) = (tmp_path / "runs" / "tensorboard").iterdir()
    assert made.name.startswith("fedavg-") and tb.path.resolve() == made
    assert _scalars(_events(made), "accuracy") == [(1, pytest.approx(0.1))]
    own = tracking.TensorBoardLogger(log_dir=tmp_path / "elsewhere")
    own.on_run_start(_exp(), tmp_path / "run", 1)
    own.on_run_end({"status": "completed"}, tmp_path / "run")
    assert any((tmp_path / "elsewhere").glob("events.out.tfevents.*")) and not (tmp_path / "run").exists()


# -- MLflow --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An MLflow SQLite store and an experiment whose artifacts stay in a temporary folder."""
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    pytest.importorskip("alembic")
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    client.create_experiment("tests", artifact_location=(root / "mlruns").as_uri())
    return SimpleNamespace(uri=uri, client=client, experiment="tests")


def _run_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "summary.json").write_text('{"status": "completed"}\n')
    (path / "metrics.jsonl").write_text('{"round": 1}\n')
    (path / "resume.pt").write_bytes(b"big")  # what a resume needs: not an artifact
    (path / "checkpoints").mkdir()
    (path / "checkpoints" / "round-0001.pt").write_bytes(b"x")
    return path


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id, path)}


def test_mlflow_logs_params_metrics_artifacts_and_status(tmp_path, store):
    folder = _run_folder(tmp_path / "my-run")
    ml = tracking.MLflowLogger(tracking_uri=store.uri, experiment=store.experiment)
    ml.on_run_start(_exp(), folder, 1)
    run_id = ml.run_id
    for rec in RECORDS:
        ml.on_round(rec)
    ml.on_run_end({"status": "completed"}, folder)
    c = store.client
    history = c.get_metric_history(run_id, "accuracy")
    assert [(m.step, m.value) for m in history] == [(r.round, pytest.approx(r.accuracy)) for r in RECORDS if r.evaluated]
    cum = c.get_metric_history(run_id, "bytes/cum_total")
    assert [(m.step, m.value) for m in cum] == [(r.round, r.cum_uplink_bytes + r.cum_downlink_bytes) for r in RECORDS]
    assert [m.step for m in c.get_metric_history(run_id, "train_loss")] == [1, 2, 4]
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "my-run"
    params = run.data.params
    assert params["federation.rounds"] == "4" and params["algorithm.name"] == "fedavg" and params["task.model_options"] == "{}"
    assert params["algorithms.fedavg_qsgd8.compressor"] == "qsgd"  # MLflow's name rules
    assert len(params["task.long"]) == 6000  # MLflow's limit on a parameter's value
    tags = run.data.tags
    assert tags["rankfed.algorithm"] == "fedavg" and tags["rankfed.run_folder"] == str(folder.resolve()) and tags["rankfed.status"] == "completed"
    assert "rankfed.resumed_from_round" not in tags
    assert _artifacts(c, run_id) == {"summary.json", "metrics.jsonl", "checkpoints"}
    assert _artifacts(c, run_id, "checkpoints") == {"checkpoints/round-0001.pt"}


@pytest.mark.parametrize(("status", "mlflow_status"), [("diverged", "FINISHED"), ("failed", "FAILED"), ("interrupted", "KILLED")])
def test_mlflow_run_status(store, status, mlflow_status):
    ml = tracking.MLflowLogger(tracking_uri=store.uri, experiment=store.experiment, run_name=f"ended-{status}")
    ml.on_run_start(_exp(), None, 1)
    run_id = ml.run_id
    ml.on_round(RECORDS[0])
    summary = {"status": status} if status == "diverged" else {"status": status, "error": "RuntimeError: boom"}
    ml.on_run_end(summary, None)
    run = store.client.get_run(run_id)
    assert run.info.status == mlflow_status and run.info.run_name == f"ended-{status}" and run.data.tags["rankfed.status"] == status
    assert run.data.tags.get("rankfed.error") == summary.get("error")
    assert ml.run_id is None


def test_mlflow_resumed_run_is_a_new_run(tmp_path, store):
    ml = tracking.MLflowLogger(tracking_uri=store.uri, experiment=store.experiment)
    ml.on_run_start(_exp(), tmp_path, 3)
    run_id = ml.run_id
    ml.on_round(RECORDS[2])
    ml.on_run_end({"status": "completed"}, tmp_path)
    run = store.client.get_run(run_id)
    assert run.data.tags["rankfed.resumed_from_round"] == "2"
    assert [m.step for m in store.client.get_metric_history(run_id, "accuracy")] == [3]


def test_mlflow_default_store_is_sqlite_in_the_working_directory(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    default = tracking.MLflowLogger() if _has("sqlalchemy") and _has("alembic") else None
    if default is not None:
        assert default.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://localhost:5000")
    assert tracking.MLflowLogger().tracking_uri == "http://localhost:5000"
    assert tracking.MLflowLogger(tracking_uri="http://other:80").tracking_uri == "http://other:80"


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# -- end to end, through rf.Federation.run ---------------------------------------------------------
def _federation(seed: int = 0) -> rf.Federation:
    g = torch.Generator().manual_seed(seed)
    clients = [(torch.randn(32, 8, generator=g) + 0.5 * i, torch.randint(0, 3, (32,), generator=g)) for i in range(4)]
    test = (torch.randn(48, 8, generator=g), torch.randint(0, 3, (48,), generator=g))
    return rf.Federation(lambda: nn.Linear(8, 3), clients, test, algorithm="fedavg", local=rf.LocalTraining(lr=0.1, epochs=1, batch_size=16))


def _metrics(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if m["round"] > 0]


def test_a_run_logs_to_tensorboard_and_mlflow(tmp_path, tensorboard, store):
    tb, ml = rf.tracking.TensorBoardLogger(), rf.tracking.MLflowLogger(tracking_uri=store.uri, experiment=store.experiment)
    result = _federation().run(3, out=tmp_path / "run", callbacks=[tb, ml], threads=1)
    run_id = store.client.search_runs([store.client.get_experiment_by_name(store.experiment).experiment_id], filter_string="tags.`rankfed.run_folder` = '" + str((tmp_path / "run").resolve()) + "'")[0].info.run_id
    metrics = _metrics(tmp_path / "run")
    assert [m["round"] for m in metrics] == [1, 2, 3]
    acc = _events(tmp_path / "run" / "tensorboard")
    assert _scalars(acc, "accuracy") == [(m["round"], pytest.approx(m["accuracy"])) for m in metrics]
    assert _scalars(acc, "bytes/cum_uplink") == [(r.round, r.cum_uplink_bytes) for r in result.records]
    assert "[federation]" in _config_texts(acc)[0]
    run = store.client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["federation.rounds"] == "3" and run.data.tags["rankfed.algorithm"] == "fedavg"
    history = store.client.get_metric_history(run_id, "accuracy")
    assert [(m.step, m.value) for m in history] == [(m["round"], pytest.approx(m["accuracy"])) for m in metrics]
    assert {"summary.json", "metrics.jsonl", "config.toml", "model.pt", "tensorboard"} <= _artifacts(store.client, run_id)


def test_an_interrupted_run_resumed_logs_each_round_once(tmp_path, tensorboard, store):
    def stop(rec):
        if rec.round == 3:
            raise KeyboardInterrupt

    ml = rf.tracking.MLflowLogger(tracking_uri=store.uri, experiment=store.experiment, run_name="resumed")
    fed = _federation(1)
    with pytest.raises(KeyboardInterrupt):  # rounds 1-3 logged; the last resume point is after round 2
        fed.run(4, out=tmp_path / "run", callbacks=[rf.tracking.TensorBoardLogger(), ml], on_round=stop, resume_every=2, threads=1)
    first = store.client.search_runs([store.client.get_experiment_by_name(store.experiment).experiment_id], filter_string="attributes.run_name = 'resumed'")[0].info.run_id
    assert store.client.get_run(first).info.status == "KILLED"
    fed.run(4, out=tmp_path / "run", resume=True, callbacks=[rf.tracking.TensorBoardLogger(), ml], resume_every=2, threads=1)
    metrics = _metrics(tmp_path / "run")
    acc = _events(tmp_path / "run" / "tensorboard")
    assert _scalars(acc, "accuracy") == [(m["round"], pytest.approx(m["accuracy"])) for m in metrics]
    assert [s for s, _ in _scalars(acc, "bytes/cum_total")] == [1, 2, 3, 4]
    runs = store.client.search_runs([store.client.get_experiment_by_name(store.experiment).experiment_id], filter_string="attributes.run_name = 'resumed'")
    done = [r for r in runs if r.info.status == "FINISHED"]
    assert len(runs) == 2 and len(done) == 1 and done[0].data.tags["rankfed.resumed_from_round"] == "2"
    assert [m.step for m in store.client.get_metric_history(done[0].info.run_id, "accuracy")] == [3, 4]
