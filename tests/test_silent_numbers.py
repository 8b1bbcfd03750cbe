"""Numbers that were once wrong without a warning, each pinned by a test.

* MAPA trained and projected frozen parameters (d counted every parameter);
* FedAvg uploaded frozen parameters as zero deltas (every "vs FedAvg" saving overstated);
* token-level outputs reported accuracy above 1 and a loss L times too large;
* a learning rate of 1e6 ended "completed" with a NaN test loss written into metrics.jsonl;
* FedLoRU factors bigger than the layer, and a compress_rank that sends everything dense,
  cost more than FedAvg in silence.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rankfed as rf
from conftest import blobs
from rankfed.wire import encoded_size


class FrozenEmbeddingNet(nn.Module):
    """Token ids -> a frozen embedding -> a trainable classifier (5 tensors frozen in all)."""

    def __init__(self, vocab: int = 20, dim: int = 8, classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        for module in (self.embed, self.proj, self.norm):
            module.requires_grad_(False)

    def forward(self, x):
        return self.head(self.norm(self.proj(self.embed(x))).mean(1))


def _token_clients(n_clients=3, n=24, length=6, vocab=20, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    clients = [(torch.randint(0, vocab, (n, length), generator=g), torch.randint(0, classes, (n,), generator=g)) for _ in range(n_clients)]
    test = (torch.randint(0, vocab, (30, length), generator=g), torch.randint(0, classes, (30,), generator=g))
    return clients, test


def _frozen(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize("kind", ["stateful", "stateless"])
def test_mapa_trains_and_projects_only_trainable_parameters(kind):
    torch.manual_seed(0)
    model = FrozenEmbeddingNet()
    frozen = _frozen(model)
    assert len(frozen) == 5
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # the head: 27
    clients, test = _token_clients()
    fed = rf.Federation(model, clients, test, algorithm=rf.MAPA(k=9), local=rf.LocalTraining(lr=0.5, batch_size=8))
    result = fed.run(rounds=3, client_kind=kind)
    after = dict(result.model.named_parameters())
    for name, before in frozen.items():
        assert torch.equal(after[name], before), f"frozen {name} changed"
    assert not torch.equal(after["head.weight"], model.head.weight)  # the trainable part did train
    sim = fed.simulator(rounds=1, client_kind=kind)
    assert sim.server.geo.d == trainable
    with pytest.raises(rf.ConfigError, match=f"d = {trainable}"):
        rf.Federation(model, clients, test, algorithm=rf.MAPA(k=trainable + 1)).simulator(rounds=1)


def test_fedavg_sends_only_trainable_tensors_and_states_its_baseline(tmp_path):
    torch.manual_seed(0)
    model = FrozenEmbeddingNet()
    frozen = _frozen(model)
    clients, test = _token_clients()
    result = rf.Federation(model, clients, test, local=rf.LocalTraining(lr=0.5, batch_size=8)).run(rounds=2, out=tmp_path / "run")
    after = dict(result.model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())
    head = {n: p for n, p in model.named_parameters() if p.requires_grad}
    upload = encoded_size({"@num_samples": 0, "@train_loss": 0.0, **head})
    rec = result.records[0]
    assert rec.uplink_bytes_per_client == [upload] * 3  # the head's two tensors and the metadata, nothing frozen
    assert rec.downlink_bytes_per_client == [encoded_size({"@round": 1, **head})] * 3
    s = result.summary
    assert s["fedavg_uplink_bytes_per_upload"] == upload and s["uplink_vs_fedavg"] == 1.0
    assert s["trainable_parameters"] == 27 and "trainable parameters" in s["fedavg_reference"]


class TokenNet(nn.Module):
    """Per-token logits, classes second (B, C, T) or last (B, T, C)."""

    def __init__(self, layout: str, vocab: int = 7):
        super().__init__()
        self.embed = nn.Embedding(vocab, 16)
        self.out = nn.Linear(16, vocab)
        self.layout = layout

    def forward(self, x):
        logits = self.out(self.embed(x))  # (B, T, C)
        return logits if self.layout == "last" else logits.transpose(1, 2)


@pytest.mark.parametrize("layout", ["last", "second"])
def test_token_level_accuracy_and_loss_are_per_token(layout):
    torch.manual_seed(0)
    model = TokenNet(layout)
    x = torch.randint(0, 7, (40, 12))
    y = torch.roll(x, -1, dims=1)
    y[:5, -3:] = -100  # padding: left out of loss and accuracy
    task = rf.Task()
    got = task.evaluate(model, rf.ClientData(x, y).batches(16))
    with torch.no_grad():
        logits = model(x) if layout == "last" else model(x).transpose(1, 2)  # (B, T, C)
    valid = y != -100
    expect_acc = ((logits.argmax(-1) == y) & valid).sum().item() / valid.sum().item()
    expect_loss = F.cross_entropy(logits.reshape(-1, 7), y.reshape(-1)).item()  # mean over counted tokens
    assert 0 <= got["accuracy"] <= 1
    assert got["accuracy"] == pytest.approx(expect_acc, abs=1e-12)
    assert got["loss"] == pytest.approx(expect_loss, rel=1e-6)


def test_token_level_training_through_a_federation():
    clients = []
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randint(0, 7, (30, 10), generator=g)
        clients.append((x, (x + 1) % 7))  # each token's label: the next token id
    x = torch.randint(0, 7, (20, 10), generator=g)
    result = rf.Federation(lambda: TokenNet("second"), clients, (x, (x + 1) % 7), local=rf.LocalTraining(lr=0.5)).run(rounds=3)
    assert all(0 <= h["accuracy"] <= 1 for h in result.history)
    assert result.history[-1]["loss"] < math.log(7)  # below chance: it learns the map


def test_a_huge_learning_rate_ends_as_diverged_with_strict_json_metrics(tmp_path, strict_json):
    clients, test = blobs(4, 30, shape=(8,), classes=3)
    fed = rf.Federation(lambda: nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3)), clients, test, local=rf.LocalTraining(lr=1e6, momentum=0.9))
    with pytest.warns(UserWarning, match="training diverged in round"):
        result = fed.run(rounds=6, out=tmp_path / "run")
    assert result.status == "diverged" and 1 <= result.summary["diverged_at_round"] <= 6
    for name in ("metrics.jsonl", "rounds.jsonl"):
        for line in (tmp_path / "run" / name).read_text().splitlines():
            strict_json(line)  # NaN or Infinity would raise
    strict_json((tmp_path / "run" / "summary.json").read_text())
    assert all(h["loss"] is None or math.isfinite(h["loss"]) for h in result.history)


def test_a_non_finite_test_loss_is_a_divergence_even_with_finite_weights():
    class Overflow(nn.Module):  # trains normally; in eval mode its finite weights give logits of +-inf
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x) * (1.0 if self.training else 1e39)

    clients, test = blobs(2, 20, shape=(4,), classes=2)
    with pytest.warns(UserWarning, match="the test loss"):
        result = rf.Federation(Overflow, clients, test, local=rf.LocalTraining(lr=1e-3)).run(rounds=2)
    assert result.status == "diverged"


def test_factors_bigger_than_their_layer_are_named_in_a_warning():
    clients, test = blobs(2, 20, shape=(16,), classes=4)
    mlp = lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))  # noqa: E731
    with pytest.warns(UserWarning, match=r"algorithm.rank = 1000: the factors of 2 layer\(s\) are bigger .*0: factors .* vs dense"):
        rf.Federation(mlp, clients, test, algorithm=rf.FedLoRU(rank=1000, patterns=["*"])).simulator(rounds=1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a rank that saves bytes says nothing
        rf.Federation(mlp, clients, test, algorithm=rf.FedLoRU(rank=2, patterns=["*"])).simulator(rounds=1)


def test_a_compress_rank_that_sends_dense_is_named_in_a_warning():
    clients, test = blobs(2, 20, shape=(16,), classes=4)
    mlp = lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))  # noqa: E731
    with pytest.warns(UserWarning, match=r"algorithm.compress_rank = 16: powersgd sends 2 of 2 matrices dense .*0.weight \(32, 16\)"):
        rf.Federation(mlp, clients, test, algorithm=rf.FedAvg(compressor="powersgd", compress_rank=16)).simulator(rounds=1)


def test_the_shipped_fmnist_file_gives_the_lora_family_a_working_learning_rate():
    from rankfed.app.config import load_config

    cfg = load_config("configs/fmnist_fedavg.toml")
    assert cfg.variant_client("fedavg").lr == 0.05
    for label in ("fedlora", "fedloru"):
        assert label in cfg.algorithms and cfg.variant_client(label).lr == 0.01
        assert cfg.with_algorithm(label).algorithm.name == label


def test_a_comparison_shows_client_kinds_and_the_broadcast_share(tmp_path):
    clients, test = blobs(4, 24, shape=(6,))
    fed = rf.Federation(lambda: nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)), clients, test)
    cmp = rf.compare(fed, {"fedavg": rf.FedAvg(), "mapa": rf.MAPA(k=16)}, rounds=2, clients_per_round=2, out=tmp_path / "cmp")
    rows = {r["algorithm"]: r for r in cmp.rows}
    assert rows["fedavg"]["client_kind"] == "stateless" and rows["fedavg"]["broadcast_share"] == 0
    assert rows["mapa"]["client_kind"] == "stateful" and rows["mapa"]["broadcast_share"] == 1.0
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "client kind" in md and "broadcast share" in md and "vs FedAvg: each run's bytes over those of the run 'fedavg'" in md
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())[1]["baseline"] == "fedavg"


def test_a_skipped_rounds_nan_training_loss_is_written_as_null(tmp_path, strict_json):
    from rankfed.server import RoundRecord, RunFolder

    folder = RunFolder(tmp_path / "run")
    rec = RoundRecord(round=1, clients=[0], uplink_bytes=0, downlink_bytes=0, cum_uplink_bytes=0, cum_downlink_bytes=0, round_s=0.1, wall_s=0.1, train_loss=float("nan"), evaluated=True, loss=float("inf"), skipped=True)
    folder.on_round(rec)
    line = strict_json((tmp_path / "run" / "metrics.jsonl").read_text())
    assert line["train_loss"] is None and line["loss"] is None and line["skipped"] is True
    assert strict_json((tmp_path / "run" / "rounds.jsonl").read_text())["train_loss"] is None
