"""The FedLoRU authors' code as options: zero bases, batch-statistics BatchNorm, factor dropout,
explicit merge rounds and evaluation before a merge, the rsLoRA scale, and the preset."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rankfed as rf
from rankfed.algorithms import get_algorithm
from rankfed.algorithms.lora import build_lora_model, global_state
from rankfed.app.config import PRESETS, apply_overrides, apply_preset, parse_config, tomllib, to_toml
from rankfed.data import ClientData
from rankfed.local import LocalTraining
from rankfed.lowrank import LoRAConv2d, LoRALinear, lora_layers
from rankfed.models import batch_stats_only
from conftest import make_sim


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    clients = []
    for i, n in enumerate([12, 20, 28]):
        x = torch.randn(n, 2, 8, 8, generator=g) + 0.2 * i
        y = torch.randint(0, 3, (n,), generator=g)
        clients.append(ClientData(x=x, y=y, val_x=x[:0], val_y=y[:0]))
    return clients, (torch.randn(40, 2, 8, 8, generator=g), torch.randint(0, 3, (40,), generator=g))


def _model(seed=0, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6) if bn else nn.Identity(), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 64, 3)]
    return nn.Sequential(*layers)


def _sim(opts, kind="stateless", rounds=4, per_round=2, algo="fedloru", model=None):
    clients, test = _data()
    local = LocalTraining(lr=0.1, momentum=0.5, batch_size=8)
    return make_sim(get_algorithm(algo, opts), model if model is not None else _model(), clients, test, local, rounds=rounds, per_round=per_round, kind=kind)


FACTORS = {"rank": 2, "patterns": ["0", "3"]}  # the two convolutions


# -- base_init = "zero" --------------------------------------------------------------------------


def test_zero_base_starts_as_the_pure_low_rank_network():
    model = _model()
    plain = copy.deepcopy(model)
    algo = rf.FedLoRU(**FACTORS, base_init="zero")
    wrapped = build_lora_model(model, algo, run_seed=3, freeze_down=False)
    dense = global_state(wrapped)
    for name, layer in lora_layers(wrapped).items():
        assert torch.count_nonzero(layer.base_layer.weight) == 0
        assert torch.count_nonzero(layer.up.weight) > 0  # both factors drawn: the product is not zero
        bound = 1 / math.sqrt(layer.up.weight[0].numel())  # Kaiming-uniform, a = sqrt(5)
        assert layer.up.weight.abs().max() <= bound
        # round 0's dense weight is exactly scale * up @ down (0 + delta, no other term)
        up, down = layer.up.weight[:, :, 0, 0], layer.down.weight
        assert torch.equal(dense[f"{name}.weight"], layer.scaling * torch.einsum("or,rikl->oikl", up, down))
        assert torch.equal(dense[f"{name}.bias"], plain.get_submodule(name).bias)  # the bias stays the model's
    # every party rebuilds the same zero base and factors from the run's seed
    again = build_lora_model(_model(), algo, run_seed=3, freeze_down=False)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in wrapped.state_dict().items())
    other = build_lora_model(_model(), algo, run_seed=4, freeze_down=False)
    assert not torch.equal(lora_layers(other)["0"].up.weight, lora_layers(wrapped)["0"].up.weight)
    # the unfactorised classifier is the model's, and "model" (the default) keeps every base
    assert torch.equal(dense["6.weight"], plain[6].weight)
    kept = build_lora_model(_model(), rf.FedLoRU(**FACTORS), run_seed=3, freeze_down=False)
    assert torch.equal(lora_layers(kept)["0"].base_layer.weight, plain[0].weight) and torch.count_nonzero(lora_layers(kept)["0"].up.weight) == 0


@pytest.mark.parametrize("reinit", ["random", "momentum"])
def test_zero_base_stateless_and_stateful_clients_agree_across_merges(reinit):
    opts = {**FACTORS, "tau": 2, "base_init": "zero", "reinit": reinit}
    runs = {kind: _sim(opts, kind, rounds=5) for kind in ("stateful", "stateless")}
    for sim in runs.values():
        sim.run()
    a, b = (runs[k].server.global_model_state() for k in ("stateful", "stateless"))
    assert a.keys() == b.keys() and runs["stateful"].server.merges == 2
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    # after the merges the base is the sum of the merged updates: no longer zero, and sent to stateless clients
    base = runs["stateless"].server.base["0.base_layer.weight"]
    assert torch.count_nonzero(base) > 0
    assert "0.base_layer.weight" in runs["stateless"].server.configure(6, [0])[0]


def test_zero_base_is_refused_for_peft_models():
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), LoraConfig(r=2, lora_alpha=4, target_modules=["0"]))
    for opts, message in (
        ({"base_init": "zero"}, "algorithm.base_init = 'zero': the model is under PEFT adapters"),
        ({"scale": "alpha/sqrt(r)", "alpha": 4.0}, "use_rslora = true"),
        ({"factor_dropout": 0.1}, "lora_dropout"),
    ):
        with pytest.raises(rf.ConfigError, match=message):
            rf.FedLoRU(**opts).server(peft_model)
    # use_rslora = true in the LoraConfig is what alpha/sqrt(r) asks for: accepted
    rs = get_peft_model(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), LoraConfig(r=4, lora_alpha=4, target_modules=["0"], use_rslora=True))
    rf.FedLoRU(scale="alpha/sqrt(r)", alpha=4.0, rank=4).server(rs)


def test_bad_base_init_and_no_base_init_for_pfedlora():
    with pytest.raises(rf.ConfigError, match="algorithm.base_init = 'random': must be one of model, zero"):
        rf.FedLoRA(base_init="random")
    with pytest.raises(TypeError):  # pFedLoRA trains and shares W itself: it has no frozen base to zero
        rf.PFedLoRA(base_init="zero")


# -- BatchNorm with batch statistics only --------------------------------------------------------


def test_batch_stats_only_drops_the_running_buffers_and_normalises_every_batch_by_itself():
    model = _model(bn=True)
    assert batch_stats_only(model) == ["1"]
    assert not [k for k in model.state_dict() if "running" in k or "num_batches" in k]
    assert list(model.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias", "6.weight", "6.bias"]
    model.eval()
    x = torch.randn(5, 2, 8, 8)
    with torch.no_grad():
        h = model[0](x)
        mean, var = h.mean((0, 2, 3), keepdim=True), h.var((0, 2, 3), unbiased=False, keepdim=True)
        expect = (h - mean) / torch.sqrt(var + model[1].eps) * model[1].weight.view(1, -1, 1, 1) + model[1].bias.view(1, -1, 1, 1)
        torch.testing.assert_close(model[1](h), expect)  # eval() uses the batch's statistics
        assert not torch.allclose(model(x)[:2], model(x[:2]))  # so a sample's output depends on its batch
    assert batch_stats_only(nn.Linear(3, 2)) == []  # nothing to change


@pytest.mark.parametrize("algorithm", ["fedavg", "fedloru"])
def test_task_batchnorm_batch_applies_to_every_algorithm(tmp_path, algorithm):
    from conftest import USER_CODE

    from rankfed.app.experiment import federation_from_config

    (tmp_path / "usercode.py").write_text(USER_CODE)
    doc = {
        "task": {"dataset": "usercode:load_clients", "model": "usercode:Net", "python_path": [str(tmp_path)], "holdout": 0.0, "batchnorm": "batch"},
        "federation": {"clients": 4, "rounds": 2, "participation": 0.5},
        "client": {"batch_size": 8},
        "algorithm": {"name": algorithm, **({"rank": 2, "tau": 1, "patterns": ["*"]} if algorithm == "fedloru" else {})},
    }
    fed = federation_from_config(parse_config(doc))
    sim = fed.simulator(2, 2)
    history = sim.run()
    state = sim.server.global_model_state()
    assert not [k for k in state if "running" in k or "num_batches" in k]  # only the affine parameters of the norm
    assert "body.1.weight" in state and "body.1.bias" in state
    assert history[-1].loss is not None and math.isfinite(history[-1].loss)
    # the evaluation model normalises with each test batch's statistics
    bn = sim.eval_model.body[1]
    assert not bn.track_running_stats and bn.running_mean is None
    with pytest.raises(rf.ConfigError, match="task.batchnorm = 'frozen'"):
        parse_config({"task": {"batchnorm": "frozen"}})


# -- factor_dropout ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_factor_dropout_acts_in_training_only(kind):
    torch.manual_seed(0)
    base = nn.Linear(7, 5) if kind == "linear" else nn.Conv2d(3, 6, 3, padding=1)
    x = torch.randn(4, 7) if kind == "linear" else torch.randn(2, 3, 6, 6)
    cls = LoRALinear if kind == "linear" else LoRAConv2d
    with_drop = cls(copy.deepcopy(base), 3, 6.0, dropout=0.5, generator=torch.Generator().manual_seed(1))
    without = cls(copy.deepcopy(base), 3, 6.0, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with_drop.up.weight.normal_(generator=torch.Generator().manual_seed(2))
        without.up.weight.copy_(with_drop.up.weight)
    with_drop.eval()
    without.eval()
    with torch.no_grad():
        out = with_drop(x)
        assert torch.equal(out, with_drop(x)) and torch.equal(out, without(x))  # eval: deterministic, no dropout
        with_drop.train()
        torch.manual_seed(7)
        trained = with_drop(x)
        torch.manual_seed(7)  # the same mask, by hand: dropout between down and up
        expect = base(x) + with_drop.scaling * with_drop.up(F.dropout(with_drop.down(x), 0.5, training=True))
        torch.testing.assert_close(trained, expect)
        assert not torch.allclose(trained, out)
    with pytest.raises(rf.ConfigError, match="algorithm.factor_dropout = 1.0"):
        rf.FedLoRU(factor_dropout=1.0)


def test_factor_dropout_trains_one_client_at_a_time_not_as_a_cohort():
    sim = _sim({**FACTORS, "factor_dropout": 0.2}, rounds=1)
    assert isinstance(lora_layers(sim.client.model)["0"].factor_dropout, nn.Dropout)
    ctxs = [sim._context(cid, 1) for cid in (0, 1)]
    payload = sim.server.configure(1, [0, 1])[0]
    assert sim.client.fit_cohort([payload, payload], ctxs) is None  # its masks would differ under vmap
    sim.run()


# -- the merge schedule and eval_before_merge --------------------------------------------------------


def test_merge_rounds_merge_after_exactly_those_rounds():
    sim = _sim({**FACTORS, "merge_rounds": [3, 1]}, rounds=4)
    assert sim.algorithm.merge_rounds == [1, 3] and sim.algorithm.tau == 0
    merges = []
    for rnd in range(1, 5):
        sim.run_round(rnd)
        merges.append(sim.server.merges)
    assert merges == [1, 1, 2, 2]
    assert all(layer.accumulated == 2 for layer in lora_layers(sim.server.model).values())
    with pytest.raises(rf.ConfigError, match=r"algorithm.tau = 5 and algorithm.merge_rounds = \[3\]: give one merge schedule"):
        rf.FedLoRU(tau=5, merge_rounds=[3])
    for bad in ([0], [2, 2], [1.5]):
        with pytest.raises(rf.ConfigError, match="algorithm.merge_rounds"):
            rf.FedLoRU(merge_rounds=bad)
    with pytest.raises(rf.ConfigError, match="algorithm.tau = 0: must be >= 1"):
        rf.FedLoRU(tau=0)
    # the resolved options (tau = 0 with the list) read back as the same algorithm
    cfg = parse_config({"algorithm": {"name": "fedloru", "merge_rounds": [5, 2]}})
    assert parse_config(tomllib.loads(to_toml(cfg))) == cfg and cfg.algorithm.options["tau"] == 0


def test_eval_before_merge_reports_the_premerge_model_and_momentum_counts_the_update_twice():
    opts = {**FACTORS, "reinit": "momentum"}
    before = _sim({**opts, "merge_rounds": [2], "eval_before_merge": True}, rounds=3)
    after = _sim({**opts, "merge_rounds": [2]}, rounds=3)
    unmerged = _sim({**opts, "merge_rounds": [9]}, rounds=3)
    recs = {name: [sim.run_round(r) for r in (1, 2)] for name, sim in (("before", before), ("after", after), ("unmerged", unmerged))}
    # round 2 merges: evaluated before the merge, it is the model that did not merge
    assert recs["before"][1].loss == recs["unmerged"][1].loss and recs["before"][1].accuracy == recs["unmerged"][1].accuracy
    assert recs["after"][1].loss != recs["unmerged"][1].loss
    assert recs["before"][0].loss == recs["after"][0].loss == recs["unmerged"][0].loss  # no merge in round 1
    # the model kept is the merged one; with momentum it computes with W + 2 d (d in the base and in the live pair)
    merged, plain = before.server.global_model_state(), unmerged.server.global_model_state()
    for name, layer in lora_layers(unmerged.server.model).items():
        torch.testing.assert_close(merged[f"{name}.weight"], plain[f"{name}.weight"] + layer.delta_weight(), rtol=1e-5, atol=1e-6)
    assert before.server.merges == 1 and before.server.evaluation_state() is not None
    before.run_round(3)  # the next round's downlink ends it: round 3 (no merge) evaluates the global model
    assert before.server.evaluation_state() is None
    assert before.history[-1].loss == after.run_round(3).loss


# -- the update scale -----------------------------------------------------------------------------


def test_rslora_scale_is_alpha_over_sqrt_rank():
    for rank in (4, 16, 64):
        layer = LoRALinear(nn.Linear(64, 64), rank, 16.0, scale="alpha/sqrt(r)")
        assert layer.scaling == 16.0 / math.sqrt(rank)
        plain = LoRALinear(nn.Linear(64, 64), rank, 16.0)
        assert plain.scaling == 16.0 / rank
        with torch.no_grad():
            layer.up.weight.normal_(generator=torch.Generator().manual_seed(rank))
        torch.testing.assert_close(layer.delta_weight(), layer.scaling * layer.up.weight @ layer.down.weight)
    # at r = alpha LoRA's scale is 1 and rsLoRA's sqrt(r)
    assert LoRALinear(nn.Linear(8, 8), 16, 16.0).scaling == 1.0
    assert LoRALinear(nn.Linear(8, 8), 16, 16.0, scale="alpha/sqrt(r)").scaling == 4.0
    # the rule applies to the algorithm's layers and to pFedLoRU's personal pair
    for rank in (2, 8):
        wrapped = build_lora_model(_model(), rf.FedLoRU(rank=rank, alpha=4.0, scale="alpha/sqrt(r)", patterns=["0", "3"]), 0, False)
        assert {layer.scaling for layer in lora_layers(wrapped).values()} == {4.0 / math.sqrt(rank)}
    pclient = rf.PFedLoRU(rank=2, alpha=4.0, scale="alpha/sqrt(r)", personal_rank=4, personal_alpha=6.0, patterns=["0"]).client(_model())
    assert lora_layers(pclient.model)["0"].p_scaling == 6.0 / 2.0
    with pytest.raises(rf.ConfigError, match="give algorithm.alpha > 0"):
        rf.FedLoRU(scale="alpha/sqrt(r)")
    with pytest.raises(rf.ConfigError, match="algorithm.scale = 'alpha/r2'"):
        rf.FedLoRA(scale="alpha/r2")


# -- the preset -------------------------------------------------------------------------------------


def test_the_fedloru_code_preset_expands_to_exactly_its_settings():
    doc = {"preset": "fedloru-code", "algorithm": {"name": "fedloru", "rank": 4}}
    assert apply_preset(doc) == {
        "preset": "fedloru-code",
        "task": {"batchnorm": "batch"},
        "client": {"weight_decay": 1e-4, "grad_clip": 0.1},
        "algorithm": {"name": "fedloru", "rank": 4, "base_init": "zero", "factor_dropout": 0.1, "reinit": "momentum", "tau": 50, "eval_before_merge": True},
    }
    assert doc == {"preset": "fedloru-code", "algorithm": {"name": "fedloru", "rank": 4}}  # not changed in place
    explicit = parse_config({"task": {"batchnorm": "batch"}, "client": {"weight_decay": 1e-4, "grad_clip": 0.1}, "algorithm": apply_preset(doc)["algorithm"]})
    cfg = parse_config(doc)
    assert cfg.preset == "fedloru-code" and (cfg.task, cfg.client, cfg.algorithm) == (explicit.task, explicit.client, explicit.algorithm)
    assert parse_config(tomllib.loads(to_toml(cfg))) == cfg  # the resolved file reads back the same
    # each algorithm gets the keys it has: FedHM its code's factorisation, FedAvg only [task] and [client]
    assert apply_preset({"preset": "fedloru-code", "algorithm": {"name": "fedhm"}})["algorithm"] == {"name": "fedhm", "factorization": "code"}
    assert apply_preset({"preset": "fedloru-code"})["algorithm"] == {}
    assert apply_preset({"preset": "fedloru-code", "algorithm": {"name": "fedlora"}})["algorithm"] == {"name": "fedlora", "base_init": "zero", "factor_dropout": 0.1}
    assert apply_preset({"preset": "fedloru-code", "algorithm": {"name": "pfedlora"}})["algorithm"] == {"name": "pfedlora", "factor_dropout": 0.1}
    assert set(PRESETS) == {"fedloru-code"}


def test_explicit_keys_win_over_the_preset():
    cfg = parse_config({
        "preset": "fedloru-code",
        "task": {"batchnorm": "running"},
        "client": {"grad_clip": 1.0},
        "algorithm": {"name": "fedloru", "reinit": "random", "factor_dropout": 0.0},
        "algorithms": {"lu": {"name": "fedloru", "merge_rounds": [3, 9]}, "hm": {"name": "fedhm", "exclude": ["conv1", "*shortcut*"]}},
    })  # fmt: skip
    assert cfg.task.batchnorm == "running" and cfg.client.grad_clip == 1.0 and cfg.client.weight_decay == 1e-4
    o = cfg.algorithm.options
    assert (o["reinit"], o["factor_dropout"], o["base_init"], o["tau"], o["eval_before_merge"]) == ("random", 0.0, "zero", 50, True)
    lu = cfg.variant("lu").options  # an explicit schedule: the preset's tau stays out
    assert (lu["merge_rounds"], lu["tau"], lu["reinit"], lu["base_init"]) == ([3, 9], 0, "momentum", "zero")
    hm = cfg.variant("hm").options
    assert (hm["factorization"], hm["exclude"]) == ("code", ["conv1", "*shortcut*"])
    assert cfg.variant("fedhm").options["exclude"] == ["conv1", "layer1.0.*", "*shortcut*"]  # a bare name gets the preset too
    # on the command line: --set preset=fedloru-code
    assert apply_overrides({}, ["preset=fedloru-code"]) == {"preset": "fedloru-code"}
    with pytest.raises(rf.ConfigError, match="preset = 'fedloru'"):
        parse_config({"preset": "fedloru"})
