"""rankfed as a library: your own model, data, loss, optimiser and metrics from Python."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import rankfed as rf
from conftest import USER_CODE, blobs


def _mlp(d=6, classes=3):
    return nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, classes))


def _datasets(n_clients=4, n=40, d=6, classes=3, seed=0):
    clients, (tx, ty) = blobs(n_clients, n, shape=(d,), classes=classes, seed=seed)
    return [TensorDataset(c.x, c.y) for c in clients], TensorDataset(tx, ty)


def smooth_ce(output, target):
    return F.cross_entropy(output, target, label_smoothing=0.1)


def macro_f1(outputs, targets):
    pred = outputs.argmax(1)
    scores = []
    for c in targets.unique():
        tp = ((pred == c) & (targets == c)).sum().item()
        fp = ((pred == c) & (targets != c)).sum().item()
        fn = ((pred != c) & (targets == c)).sum().item()
        scores.append(2 * tp / max(2 * tp + fp + fn, 1))
    return sum(scores) / len(scores)


def test_own_model_datasets_loss_optimizer_and_metrics(tmp_path):
    clients, test = _datasets()
    fed = rf.Federation(
        model=_mlp, clients=clients, test=test, algorithm=rf.FedLoRU(rank=2, tau=2, patterns=["*"]),
        local=rf.LocalTraining(optimizer=torch.optim.Adam, lr=1e-2, epochs=1, batch_size=16), loss=smooth_ce, metrics={"f1": macro_f1}, seed=3,
    )  # fmt: skip
    result = fed.run(rounds=4, clients_per_round=2, out=tmp_path / "run")
    assert [h["round"] for h in result.history] == [1, 2, 3, 4]
    assert all(0 <= h["f1"] <= 1 and 0 <= h["accuracy"] <= 1 for h in result.history)
    assert isinstance(result.model, nn.Sequential)  # your own module type, the trained global model
    assert set(result.bytes) == {"uplink", "downlink"} and result.bytes["uplink"] == result.summary["total_uplink_bytes"] > 0
    assert result.path == tmp_path / "run" and result.status == "completed"
    # the run folder is the one `rankfed run` writes
    for name in ("config.toml", "metrics.jsonl", "rounds.jsonl", "summary.json", "model.pt"):
        assert (tmp_path / "run" / name).is_file(), name
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["loss"] == "test_library:smooth_ce" and s["algorithm"] == "fedloru"
    state = torch.load(tmp_path / "run" / "model.pt")
    assert all(torch.equal(state[k], v) for k, v in result.model.state_dict().items())
    # the model the user gets back evaluates as the run's last evaluation did
    x, y = test.tensors
    with torch.no_grad():
        assert (result.model(x).argmax(1) == y).float().mean().item() == pytest.approx(result.history[-1]["accuracy"])
    from rankfed.app.cli import main

    assert main(["-q", "plot", str(tmp_path / "run"), "--out", str(tmp_path / "p.png")]) == 0 and (tmp_path / "p.png").stat().st_size > 1000


def test_tensor_pairs_datasets_and_client_data_give_the_same_run():
    clients, (tx, ty) = blobs(3, 30, shape=(6,))
    pairs = [(c.x, c.y) for c in clients]
    datasets = [TensorDataset(c.x, c.y) for c in clients]
    runs = [rf.Federation(_mlp, cs, test, seed=1).run(rounds=2) for cs, test in ((pairs, (tx, ty)), (datasets, TensorDataset(tx, ty)), (clients, (tx, ty)))]
    for r in runs[1:]:
        assert r.history == [{**h, **{k: r.history[i][k] for k in ("wall_s", "round_s", "eval_s")}} for i, h in enumerate(runs[0].history)]
        assert all(torch.equal(a, b) for a, b in zip(r.model.state_dict().values(), runs[0].model.state_dict().values()))


class SlowDataset(Dataset):
    """A map-style dataset that returns dicts and numbers (collated by rankfed)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


@pytest.mark.parametrize("algorithm", [rf.FedAvg(), rf.MAPA(k=8)])
def test_streamed_datasets_train_bitwise_as_materialised_ones(algorithm):
    clients, (tx, ty) = blobs(3, 26, shape=(6,))
    data = [SlowDataset(c.x, c.y) for c in clients]
    a = rf.Federation(_mlp, data, (tx, ty), algorithm=algorithm, in_memory=True).run(rounds=2)
    b = rf.Federation(_mlp, data, (tx, ty), algorithm=algorithm, in_memory=False).run(rounds=2)
    assert [h["accuracy"] for h in a.history] == [h["accuracy"] for h in b.history]
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    fed = rf.Federation(_mlp, data, (tx, ty), in_memory=False)
    assert not fed.data()[0][0].in_memory


def test_a_mean_over_samples_loss_trains_as_a_vectorised_cohort():
    clients, test = blobs(4, 21, shape=(6,))  # 21 samples, batch 8: padded last batches
    local = rf.LocalTraining(lr=0.1, momentum=0.9, batch_size=8)
    runs = {m: rf.Federation(_mlp, clients, test, loss=smooth_ce, local=local).run(rounds=2, execution=m) for m in ("sequential", "vectorized")}
    assert runs["vectorized"].summary["cohort_rounds"] == 2
    for a, b in zip(runs["sequential"].model.state_dict().values(), runs["vectorized"].model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_a_loss_that_is_not_a_mean_over_samples_falls_back_with_one_warning():
    def summed(output, target):  # a sum, not a mean: a padded cohort could not reproduce it
        return F.cross_entropy(output, target, reduction="sum")

    clients, test = blobs(3, 20, shape=(6,))
    with pytest.warns(UserWarning, match=r"clients train one by one \(the loss .*summed> is not a mean over samples") as caught:
        result = rf.Federation(_mlp, clients, test, loss=summed).run(rounds=2, execution="vectorized")
    assert result.summary["cohort_rounds"] == 0
    assert sum("one by one" in str(w.message) for w in caught) == 1


def test_an_optimizer_class_gets_its_keywords_and_a_bad_one_is_named():
    opt = rf.LocalTraining(optimizer=torch.optim.Adam, lr=1e-3, betas=[0.8, 0.9], optimizer_options={"amsgrad": True}).make_optimizer([nn.Parameter(torch.zeros(2))])
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["betas"] == (0.8, 0.9) and opt.defaults["amsgrad"] is True
    with pytest.raises(rf.ConfigError, match=r"client.momentum = 0.9: torch.optim.adam:Adam takes no keyword 'momentum'"):
        rf.LocalTraining(optimizer=torch.optim.Adam, momentum=0.9)
    with pytest.raises(rf.ConfigError, match=r"client.optimizer_options = "):
        rf.LocalTraining(optimizer=torch.optim.SGD, optimizer_options={"betas": (0.9, 0.99)})
    assert rf.LocalTraining(optimizer="torch.optim:RMSprop").make_optimizer([nn.Parameter(torch.zeros(2))]).__class__ is torch.optim.RMSprop
    with pytest.raises(rf.ConfigError, match="client.optimizer = 'adam'"):
        rf.LocalTraining(optimizer="adam")


@pytest.mark.parametrize("algorithm", [rf.FedAvg(), rf.MAPA(k=3)])
def test_regression_with_mse_reports_loss_and_metrics_not_accuracy(algorithm, tmp_path):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 1, generator=g)
    clients = []
    for _ in range(4):
        x = torch.randn(40, 5, generator=g)
        clients.append((x, x @ w + 0.01 * torch.randn(40, 1, generator=g)))
    tx = torch.randn(50, 5, generator=g)
    mae = lambda out, tgt: (out - tgt).abs().mean().item()  # noqa: E731
    fed = rf.Federation(lambda: nn.Linear(5, 1), clients, (tx, tx @ w), algorithm=algorithm, loss=F.mse_loss, metrics={"mae": mae}, local=rf.LocalTraining(lr=0.05))
    result = fed.run(rounds=6, out=tmp_path / "run")
    assert all(h["accuracy"] is None for h in result.history)
    assert result.history[-1]["loss"] < 0.5 * result.history[0]["loss"]
    assert result.history[-1]["mae"] > 0 and result.summary["best_accuracy"] is None and result.summary["best_loss"] == min(h["loss"] for h in result.history)


def test_the_client_half_around_your_own_loop_equals_fit():
    clients, test = blobs(2, 24, shape=(6,))
    torch.manual_seed(0)
    model = _mlp()
    local = rf.LocalTraining(lr=0.1, batch_size=8)
    for algo, tol in ((rf.FedAvg(), 0.0), (rf.MAPA(k=12), 1e-6), (rf.FedLoRA(rank=2, patterns=["*"]), 0.0)):
        server = algo.server(model, num_clients=2, local=local)
        client = algo.client(model, num_clients=2, local=local)
        down = server.configure(1, [0])[0]
        trainer = rf.Federation(model, clients, test, local=local).experiment(1).ctx.trainer()
        ctx = rf.ClientContext(0, 1, model=__import__("copy").deepcopy(model), data=clients[0], trainer=trainer)
        expected = client.fit(down, ctx)
        # your own loop: a hand-written SGD over the module begin() returns
        ctx2 = rf.ClientContext(0, 1, model=__import__("copy").deepcopy(model), num_samples=clients[0].num_samples)
        module = client.begin(down, ctx2)
        opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1)
        gen = torch.Generator().manual_seed(ctx.seed)
        torch.manual_seed(ctx.seed)
        losses = []
        for idx in trainer.batches(clients[0].num_samples, gen, torch.device("cpu")):
            loss = F.cross_entropy(module(clients[0].x[idx]), clients[0].y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        got = client.end(module, ctx2, rf.TrainStats(len(losses), clients[0].num_samples, expected["@train_loss"]))
        assert got.keys() == expected.keys(), algo.name
        for k, v in expected.items():
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(got[k], v, rtol=0, atol=tol, msg=f"{algo.name}: {k}")


def test_compressor_objects_equal_the_experiment_file_spelling():
    c = rf.compress
    a = rf.FedAvg(compressor=c.chain(c.topk(0.05), c.qsgd(4)))
    b = rf.FedAvg(compressor="topk+qsgd", topk_ratio=0.05, qsgd_bits=4)
    assert a == b and a.to_options() == b.to_options()
    assert rf.FedAvg(compressor=c.error_feedback(c.topk(0.1))).to_options()["error_feedback"] is True
    with pytest.raises(rf.ConfigError, match="algorithm.topk_ratio = 0.2: the compressor"):
        rf.FedAvg(compressor=c.topk(0.05), topk_ratio=0.2)
    clients, test = blobs(3, 20, shape=(6,))
    ra = rf.Federation(_mlp, clients, test, algorithm=a).run(rounds=2)
    rb = rf.Federation(_mlp, clients, test, algorithm=b).run(rounds=2)
    assert ra.bytes == rb.bytes and all(torch.equal(x, y) for x, y in zip(ra.model.state_dict().values(), rb.model.state_dict().values()))
    custom = rf.FedAvg(compressor=c.topk(k=3))  # no experiment-file spelling: used as it is, described
    assert custom.to_options()["compressor"] == "<python: topk(k=3)>"
    assert rf.Federation(_mlp, clients, test, algorithm=custom).run(rounds=1).bytes["uplink"] < ra.bytes["uplink"] / 2


def test_every_experiment_file_option_is_a_keyword_checked_the_same_way():
    from rankfed.algorithms import ALGORITHMS
    from rankfed.app.config import parse_config

    for name, cls in ALGORITHMS.items():
        table = parse_config({"algorithm": {"name": name}}).algorithm.options
        assert set(table) == {f.name for f in dataclasses.fields(cls)}, name
    for cls, key, value in ((rf.MAPA, "k", 0), (rf.FedLoRU, "tau", 0), (rf.FedHM, "rank_factor", 0), (rf.PFedLoRU, "personal_rank", 0)):
        with pytest.raises(rf.ConfigError) as from_python:
            cls(**{key: value})
        with pytest.raises(rf.ConfigError) as from_toml:
            parse_config({"algorithm": {"name": cls.name, key: value}})
        assert str(from_python.value) == str(from_toml.value) and f"algorithm.{key} = {value}" in str(from_python.value)
    with pytest.raises(rf.ConfigError, match="algorithm.rank = '8': must be of type int"):
        rf.FedLoRU(rank="8")
    with pytest.raises(rf.ConfigError, match="client.epochs = 0"):
        rf.LocalTraining(epochs=0)
    assert parse_config({"client": {"local_epochs": 3}}).client.epochs == 3  # the older spelling still reads


def test_bad_federation_arguments_are_named():
    clients, test = blobs(2, 10, shape=(6,))
    with pytest.raises(rf.ConfigError, match="clients: the list is empty"):
        rf.Federation(_mlp, [], test)
    with pytest.raises(rf.ConfigError, match="model = 3"):
        rf.Federation(3, clients, test)
    with pytest.raises(rf.ConfigError, match="the factory returned a int"):
        rf.Federation(lambda: 3, clients, test).run(rounds=1)
    with pytest.raises(rf.ConfigError, match=r"clients_per_round = 5: must be an int in \[1, 2\]"):
        rf.Federation(_mlp, clients, test).run(rounds=1, clients_per_round=5)
    with pytest.raises(rf.ConfigError, match=r"clients\[1\]: dataset items must be \(input, target\) pairs"):
        rf.Federation(_mlp, [clients[0], [torch.zeros(3)] * 3], test).run(rounds=1)
    with pytest.raises(rf.ConfigError, match="federation.eval_every = 0"):
        rf.Federation(_mlp, clients, test).run(rounds=1, eval_every=0)


def test_python_runs_resume_and_the_command_line_says_how(tmp_path, capsys):
    clients, test = blobs(3, 20, shape=(6,))
    fed = rf.Federation(_mlp, clients, test, algorithm=rf.MAPA(k=8))
    whole = fed.run(rounds=6, out=tmp_path / "whole")
    # a run stopped after round 4 (its resume point), then resumed from Python
    part = rf.Federation(_mlp, clients, test, algorithm=rf.MAPA(k=8))

    def stop(rec):
        if rec.round == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        part.run(rounds=6, out=tmp_path / "part", resume_every=2, on_round=stop)
    done = part.run(rounds=6, out=tmp_path / "part", resume=True, resume_every=2)
    assert done.summary["resumed_from_round"] == 4
    assert [h["accuracy"] for h in done.history] == [h["accuracy"] for h in whole.history]
    assert all(torch.equal(a, b) for a, b in zip(done.model.state_dict().values(), whole.model.state_dict().values()))
    from rankfed.app.cli import main

    assert main(["-q", "run", "--resume", str(tmp_path / "whole")]) == 2
    assert "started from Python" in capsys.readouterr().err




def test_an_experiment_file_names_user_code_by_import_path(tmp_path):
    (tmp_path / "libusercode.py").write_text(USER_CODE, encoding="utf-8")
    exp = tmp_path / "exp.toml"
    exp.write_text(
        '[task]\nmodel = "libusercode:Net"\nmodel_options = { hidden = 12 }\ndataset = "libusercode:load_clients"\nloss = "libusercode:smooth"\nholdout = 0.0\n'
        "[federation]\nclients = 3\nrounds = 4\nresume_every = 1\n[client]\noptimizer = \"torch.optim:Adam\"\nlr = 0.01\n",
        encoding="utf-8",
    )
    whole = tmp_path / "whole"
    proc = subprocess.run([sys.executable, "-m", "rankfed", "-q", "run", str(exp), "--out", str(whole)], capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr
    s = json.loads((whole / "summary.json").read_text())
    assert s["model"] == "libusercode:Net" and s["dataset"] == "libusercode:load_clients" and s["loss"] == "libusercode:smooth"
    assert str(tmp_path) in (whole / "config.toml").read_text()  # python_path recorded: a resume finds the code again
    # interrupted after round 3, then resumed by the command line from another folder
    from rankfed.app.config import load_config
    from rankfed.app.experiment import run_config

    def stop(rec):
        if rec.round == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_config(load_config(exp), tmp_path / "part", on_round=stop)
    proc = subprocess.run([sys.executable, "-m", "rankfed", "-q", "run", "--resume", str(tmp_path / "part")], capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr
    a, b = torch.load(tmp_path / "part" / "model.pt"), torch.load(whole / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "part" / "summary.json").read_text())["resumed_from_round"] == 3  # its state after round 3 was saved before it stopped


def test_outputs_with_logits_attributes_train_and_report_accuracy():
    @dataclasses.dataclass
    class Output:  # what a Hugging Face ModelOutput offers: .logits
        logits: torch.Tensor

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _mlp()

        def forward(self, x):
            return Output(self.net(x))

    clients, test = blobs(3, 30, shape=(6,))
    result = rf.Federation(Wrapped, clients, test).run(rounds=2)
    assert all(0 <= h["accuracy"] <= 1 for h in result.history)


def test_every_public_name_is_documented():
    import inspect

    for name in rf.__all__:
        obj = getattr(rf, name)
        if name.startswith("__") or name in ("compress",):
            continue
        assert (obj.__doc__ or "").strip(), name
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if not attr.startswith("_") and callable(member):
                    assert (inspect.getdoc(getattr(obj, attr)) or "").strip(), f"{name}.{attr}"
    text = subprocess.run([sys.executable, "-c", "import rankfed; help(rankfed.Federation)"], capture_output=True, text=True, timeout=120, env={**__import__("os").environ, "PAGER": "cat"}).stdout
    for word in ("clients_per_round", "loss", "metrics", "in_memory", "resume"):
        assert word in text, word
