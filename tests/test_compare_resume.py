"""Comparisons that survive (resume, --from), plots a reader trusts, the summary's commands,
thread control and the CLI's edges (issue 20)."""

import json
import os

import pytest
import torch
from torch import nn

import rankfed as rf
from rankfed.app.cli import main
from rankfed.app.config import load_config
from rankfed.errors import ConfigError
from rankfed.federation import compare_runs, run_state
from rankfed.plot import algorithm_color, plot_runs, read_metrics, run_labels

CONFIG = """
[task]
dataset = "digits"
model = "mlp"
model_options = { hidden = [16] }
[federation]
clients = 4
rounds = 4
seed = 1
resume_every = 2
[client]
lr = 0.1
batch_size = 32
"""


def _data():
    g = torch.Generator().manual_seed(0)
    clients = [(torch.randn(24, 6, generator=g) + i, torch.randint(0, 3, (24,), generator=g)) for i in range(3)]
    return clients, (torch.randn(30, 6, generator=g), torch.randint(0, 3, (30,), generator=g))


def _fed():
    clients, test = _data()

    def model():
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))

    return rf.Federation(model, clients, test, local=rf.LocalTraining(lr=0.1, batch_size=8))


ALGOS = {"fedavg": "fedavg", "mapa": rf.MAPA(k=8)}


class _Stop(Exception):
    pass


def _strip(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "wall_s"}


def _stop_at(label, rnd):
    def on_round(lab, rec):
        if lab == label and rec.round == rnd:
            raise KeyboardInterrupt

    return on_round


def test_an_interrupted_compare_resumes_to_the_uninterrupted_result(tmp_path):
    whole = rf.compare(_fed(), ALGOS, rounds=4, out=tmp_path / "whole", resume_every=2)
    with pytest.raises(KeyboardInterrupt):  # killed in mapa's round 3: fedavg done, mapa saved at round 2
        rf.compare(_fed(), ALGOS, rounds=4, out=tmp_path / "part", resume_every=2, on_round=_stop_at("mapa", 3))
    assert run_state(tmp_path / "part" / "fedavg") == "done" and run_state(tmp_path / "part" / "mapa") == "resumable"
    fedavg_summary = (tmp_path / "part" / "fedavg" / "summary.json").read_text()
    kept = []
    part = rf.compare(_fed(), ALGOS, rounds=4, out=tmp_path / "part", resume=True, resume_every=2, on_kept=lambda label, path: kept.append(label))
    assert kept == ["fedavg"]
    assert (tmp_path / "part" / "fedavg" / "summary.json").read_text() == fedavg_summary  # not run again
    assert part.results["mapa"].summary["resumed_from_round"] == 2
    assert [_strip(r) for r in part.rows] == [_strip(r) for r in whole.rows]
    untimed = lambda rows: [{k: v for k, v in r.items() if k not in ("wall_s", "round_s", "eval_s")} for r in rows]  # noqa: E731
    for label in ALGOS:
        assert untimed(read_metrics(tmp_path / "part" / label)) == untimed(read_metrics(tmp_path / "whole" / label))
        a, b = torch.load(tmp_path / "part" / label / "model.pt"), torch.load(tmp_path / "whole" / label / "model.pt")
        assert all(torch.equal(a[k], b[k]) for k in a)
    for name in ("comparison.md", "comparison.json", "comparison.png", "compare.json"):
        assert (tmp_path / "part" / name).is_file()


def test_compare_resume_refuses_other_algorithms_and_a_missing_folder(tmp_path):
    rf.compare(_fed(), {"fedavg": "fedavg"}, rounds=2, out=tmp_path / "c")
    with pytest.raises(ConfigError, match=r"compared \['fedavg'\]"):
        rf.compare(_fed(), ALGOS, rounds=2, out=tmp_path / "c", resume=True)
    with pytest.raises(FileNotFoundError, match="no compare.json"):
        rf.compare(_fed(), ALGOS, rounds=2, out=tmp_path / "nothing", resume=True)
    with pytest.raises(ConfigError, match="another configuration"):  # a finished run of other rounds is not kept silently
        rf.compare(_fed(), {"fedavg": "fedavg"}, rounds=3, out=tmp_path / "c", resume=True)


def test_compare_runs_rebuilds_the_table_with_unique_labels(tmp_path):
    a = _fed().run(2, out=tmp_path / "a" / "run")
    b = _fed().with_algorithm(rf.MAPA(k=8)).run(2, out=tmp_path / "b" / "run")
    rows = compare_runs([tmp_path / "a" / "run", tmp_path / "b" / "run"], tmp_path / "cmp", title="two runs")
    assert [r["algorithm"] for r in rows] == ["a/run", "b/run"]
    assert rows[0]["best_accuracy"] == a.summary["best_accuracy"] and rows[1]["uplink_MB"] == b.summary["total_uplink_bytes"] / 1e6
    assert rows[1]["uplink_vs_fedavg"] == pytest.approx(b.summary["total_uplink_bytes"] / a.summary["total_uplink_bytes"])
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 10_000
    with pytest.raises(FileNotFoundError, match="summary.json"):
        (tmp_path / "a" / "run" / "summary.json").unlink()
        compare_runs([tmp_path / "a" / "run"])


def test_rankfed_compare_resume_and_from(tmp_path, capsys):
    cfg = tmp_path / "exp.toml"
    cfg.write_text(CONFIG)
    out = tmp_path / "cmp"
    assert main(["-q", "compare", str(cfg), "--algorithms", "fedavg,mapa", "--out", str(out)]) == 0
    table = (out / "comparison.md").read_text()
    saved = json.loads((out / "compare.json").read_text())
    assert saved["labels"] == ["fedavg", "mapa"] and "[federation]" in saved["config"] and saved["command"].startswith("rankfed ")
    # as if killed during mapa before its first resume point: fedavg is kept, mapa runs again
    for f in (out / "mapa").iterdir():
        if f.name != "config.toml":
            f.unlink() if f.is_file() else None
    capsys.readouterr()
    assert main(["compare", "--resume", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "fedavg: finished before, kept" not in printed  # -q after the subcommand: quiet
    assert run_state(out / "mapa") == "done"
    assert [r.split("|")[1:6] for r in (out / "comparison.md").read_text().splitlines()[2:4]] == [r.split("|")[1:6] for r in table.splitlines()[2:4]]
    assert main(["compare", "--resume", str(out)]) == 0
    assert "fedavg: finished before, kept" in capsys.readouterr().out
    # --from: the table and plot again from the finished runs
    assert main(["-q", "compare", "--from", str(out / "fedavg"), str(out / "mapa"), "--out", str(tmp_path / "again")]) == 0
    rows = json.loads((tmp_path / "again" / "comparison.json").read_text())
    assert [r["algorithm"] for r in rows] == ["fedavg", "mapa"]
    assert rows == json.loads((out / "comparison.json").read_text())
    assert main(["-q", "compare", "--from", str(out), "--algorithms", "fedavg"]) == 2
    assert "give no CONFIG" in capsys.readouterr().err


def test_ctrl_c_prints_the_command_that_continues(tmp_path, capsys, monkeypatch):
    import rankfed.app.cli as cli

    cfg = tmp_path / "exp.toml"
    cfg.write_text(CONFIG)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run_one", interrupted)
    assert main(["-q", "run", str(cfg), "--out", str(tmp_path / "r")]) == 130
    assert f"rankfed run --resume {tmp_path / 'r'}" in capsys.readouterr().err
    assert main(["-q", "compare", str(cfg), "--algorithms", "fedavg", "--out", str(tmp_path / "c")]) == 130
    assert f"rankfed compare --resume {tmp_path / 'c'}" in capsys.readouterr().err


def test_summary_keeps_the_original_command_and_adds_the_resume_commands(tmp_path):
    fed = _fed()

    def stop(rec):
        if rec.round == 3:
            raise _Stop

    with pytest.raises(_Stop):
        fed.run(4, out=tmp_path / "r", resume_every=2, on_round=stop, command="rankfed run exp.toml --set client.lr=0.1")
    s = fed.run(4, out=tmp_path / "r", resume=True, resume_every=2, command="rankfed run --resume r").summary
    assert s["command"] == "rankfed run exp.toml --set client.lr=0.1"
    assert s["resume_commands"] == ["rankfed run --resume r"]
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["resume_commands"] == ["rankfed run --resume r"]


def test_threads_are_set_for_the_run_recorded_and_restored():
    before = torch.get_num_threads()
    seen = []
    res = _fed().run(1, threads=1, on_round=lambda rec: seen.append(torch.get_num_threads()))
    assert seen == [1] and res.summary["threads"] == 1 and torch.get_num_threads() == before
    assert _fed().run(1).summary["threads"] == len(os.sched_getaffinity(0))  # the default: the cores available
    with pytest.raises(ConfigError, match="threads"):
        _fed().run(1, threads=-2)
    with pytest.raises(ConfigError, match="federation.threads"):
        load_config(None, ["federation.threads=-1"])


def test_cli_threads_flag_and_toml_reach_the_summary(tmp_path):
    cfg = tmp_path / "exp.toml"
    cfg.write_text(CONFIG.replace("resume_every = 2", "resume_every = 2\nthreads = 1"))
    assert main(["-q", "run", str(cfg), "--out", str(tmp_path / "a"), "--set", "federation.rounds=1"]) == 0
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["threads"] == 1
    assert main(["run", str(cfg), "-q", "--threads", "2", "--out", str(tmp_path / "b"), "--set", "federation.rounds=1"]) == 0
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["threads"] == 2


def test_a_relative_data_dir_is_relative_to_the_experiment_file(tmp_path, monkeypatch):
    (tmp_path / "exps").mkdir()
    f = tmp_path / "exps" / "exp.toml"
    f.write_text('[task]\ndataset = "fmnist"\ndata_dir = "../data/fmnist"\n')
    monkeypatch.chdir(tmp_path / "exps" / "..")
    assert load_config(f).task.data_dir == str((tmp_path / "data" / "fmnist").resolve())
    # a --set one is the caller's: relative to the working directory, as given
    assert load_config(f, ["task.data_dir=mine"]).task.data_dir == "mine"
    f.write_text('[task]\ndataset = "fmnist"\ndata_dir = "/abs/fmnist"\n')
    assert load_config(f).task.data_dir == "/abs/fmnist"


def test_model_options_errors_name_the_key():
    from rankfed.app.experiment import build_experiment

    for override, key in (("task.model_options.hiden=[3]", "task.model_options.hiden"), ('task.model_options.hidden="x"', "task.model_options.hidden")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            build_experiment(load_config(None, [override]))


def test_top_level_help_has_no_rest_markup(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text and ":func:" not in text and "rankfed" in text


# -- plots ---------------------------------------------------------------------------------------
def test_each_algorithm_has_one_colour_everywhere():
    from rankfed.algorithms import ALGORITHMS

    colours = [algorithm_color(name) for name in sorted(ALGORITHMS)]
    assert len(set(colours)) == len(colours)  # one per built-in algorithm
    assert algorithm_color("mapa") == algorithm_color("mapa") and algorithm_color("my-own") == algorithm_color("my-own")


def test_run_labels_are_unique(tmp_path):
    runs = [tmp_path / "x" / "fedavg", tmp_path / "y" / "fedavg", tmp_path / "y" / "mapa"]
    assert run_labels(runs) == ["x/fedavg", "y/fedavg", "mapa"]
    assert run_labels([tmp_path / "a" / "s" / "r", tmp_path / "b" / "s" / "r"]) == ["a/s/r", "b/s/r"]


def test_plot_draws_one_colour_per_algorithm_markers_and_round_zero(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fed = _fed()
    runs = [fed.run(3, out=tmp_path / "a" / "fedavg").path, fed.with_algorithm(rf.MAPA(k=8)).run(3, out=tmp_path / "mapa").path, fed.run(3, out=tmp_path / "b" / "fedavg").path]
    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    plot_runs(runs, tmp_path / "p.png")
    ax_r, ax_b = figures[0].axes
    lines = ax_r.get_lines()
    assert [line.get_label() for line in lines] == ["a/fedavg", "mapa (k=8)", "b/fedavg"]  # non-default options shown
    assert lines[0].get_color() == lines[2].get_color() == algorithm_color("fedavg") != lines[1].get_color()
    assert lines[0].get_linestyle() != lines[2].get_linestyle()  # the second fedavg run: another style
    assert all(line.get_marker() == "o" for line in lines)
    assert list(lines[0].get_xdata()) == [0, 1, 2, 3]  # the round-0 point, then every evaluated round
    assert len(ax_b.get_lines()[0].get_xdata()) == 3  # round 0 sent nothing: not on the log axis
    assert ax_r.get_legend() is None and figures[0].legends  # the legend is the figure's, below the panels


def test_plot_refuses_empty_or_missing_metrics_naming_the_file(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="metrics.jsonl' is empty"):
        plot_runs([tmp_path / "empty"], tmp_path / "p.png")
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_runs([tmp_path / "none"], tmp_path / "p.png")
    assert main(["-q", "plot", str(tmp_path / "empty")]) == 2
    assert not (tmp_path / "p.png").exists()
