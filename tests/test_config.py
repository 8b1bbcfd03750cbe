"""Experiment files: defaults, overrides, and errors that name the key and the value."""

from pathlib import Path

import numpy as np
import pytest
import torch

from rankfed.app.config import ConfigError, apply_overrides, load_config, parse_config, to_toml
from rankfed.app.config import tomllib

EXAMPLE = """
[task]
dataset = "fmnist"
partition = "shards"
classes_per_client = 2
model = "cnn2"
[federation]
clients = 100
participation = 0.1
rounds = 200
seed = 0
eval_every = 5
[client]
optimizer = "sgd"
lr = 0.05
momentum = 0.9
local_epochs = 1
batch_size = 32
[algorithm]
name = "fedavg"
"""


def test_issue_example_parses(tmp_path):
    p = tmp_path / "exp.toml"
    p.write_text(EXAMPLE)
    cfg = load_config(p)
    assert cfg.task.dataset == "fmnist" and cfg.task.partition == "shards"
    assert cfg.federation.clients == 100 and cfg.federation.clients_per_round == 10
    assert cfg.client.momentum == 0.9 and cfg.algorithm.name == "fedavg"


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = parse_config(tomllib.loads(EXAMPLE))
    again = parse_config(tomllib.loads(to_toml(cfg)))
    assert again == cfg


@pytest.mark.parametrize(
    "doc, pattern",
    [
        ({"federation": {"clinets": 5}}, r"unknown key federation\.clinets \(did you mean federation\.clients\?\)"),
        ({"feder": {}}, r"unknown section \[feder\]"),
        ({"federation": {"participation": 1.5}}, r"federation\.participation = 1\.5: must be in \(0, 1\]"),
        ({"federation": {"participation": 0}}, r"federation\.participation = 0\.0"),
        ({"federation": {"clients": "ten"}}, r"federation\.clients = 'ten': must be of type int"),
        ({"federation": {"rounds": 0}}, r"federation\.rounds = 0"),
        ({"client": {"lr": -1}}, r"client\.lr = -1\.0: must be > 0"),
        ({"client": {"optimizer": "adam"}}, r"client\.optimizer = 'adam': must be one of sgd, adamw"),
        ({"client": {"nesterov": True}}, r"client\.nesterov = True: needs client\.momentum > 0"),
        ({"task": {"dataset": "imagenet"}}, r"task\.dataset = 'imagenet': must be one of"),
        ({"task": {"partition": "random"}}, r"task\.partition = 'random'"),
        ({"task": {"model": "vgg"}}, r"task\.model = 'vgg'"),
        ({"task": {"holdout": 1.0}}, r"task\.holdout = 1\.0"),
        ({"algorithm": {"name": "fedprox"}}, r"algorithm\.name = 'fedprox': must be one of"),
        ({"algorithm": {"name": "fedavg", "rank": 4}}, r"unknown key algorithm\.rank"),
        ({"algorithms": {"nope": {}}}, r"algorithms = 'nope'"),
        ({"algorithms": {"v": {"name": "nope"}}}, r"algorithms\.v\.name = 'nope'"),
        ({"algorithms": {"v": {"name": "fedavg", "k": 3}}}, r"unknown key algorithms\.v\.k"),
    ],
)
def test_bad_configs_name_key_and_value(doc, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_config(doc)


def test_overrides_parse_toml_literals_and_bare_strings():
    doc = apply_overrides({}, ["federation.rounds=3", "client.lr=0.5", "task.dataset=mnist1d", "client.betas=[0.8, 0.9]", "client.nesterov=true"])
    assert doc == {
        "federation": {"rounds": 3},
        "client": {"lr": 0.5, "betas": [0.8, 0.9], "nesterov": True},
        "task": {"dataset": "mnist1d"},
    }


@pytest.mark.parametrize("bad", ["rounds=3", "federation.=3", "federation.rounds"])
def test_malformed_overrides(bad):
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, [bad])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[task\ndataset = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_ints_are_accepted_for_floats_but_bools_are_not():
    assert parse_config({"client": {"lr": 1}}).client.lr == 1.0
    with pytest.raises(ConfigError, match="must be of type float"):
        parse_config({"client": {"lr": True}})


def test_variants_name_their_algorithm_and_options():
    cfg = parse_config({"algorithm": {"name": "mapa", "k": 8}, "algorithms": {"fedavg+q": {"name": "fedavg", "compressor": "qsgd"}, "mapa": {"k": 32}}})
    v = cfg.with_algorithm("fedavg+q").algorithm
    assert v.name == "fedavg" and v.options["compressor"] == "qsgd"
    assert cfg.with_algorithm("mapa").algorithm.options["k"] == 32  # the table wins over [algorithm]
    assert parse_config({"algorithm": {"name": "mapa", "k": 8}}).with_algorithm("mapa").algorithm.options["k"] == 8
    assert cfg.with_algorithm("fedavg").algorithm.options["compressor"] == ""  # plain defaults


def test_variant_client_overrides_apply_to_that_variant_only():
    cfg = parse_config({"client": {"lr": 0.05, "momentum": 0.9}, "algorithms": {"mapa": {"k": 8, "client": {"lr": 0.5}}, "fedavg": {}}})
    assert cfg.with_algorithm("mapa").client.lr == 0.5 and cfg.with_algorithm("mapa").client.momentum == 0.9
    assert cfg.with_algorithm("fedavg").client.lr == 0.05
    with pytest.raises(ConfigError, match=r"algorithms\.mapa\.client\.lr = -1\.0"):
        parse_config({"algorithms": {"mapa": {"client": {"lr": -1}}}})
    with pytest.raises(ConfigError, match=r"unknown key algorithms\.mapa\.client\.rate"):
        parse_config({"algorithms": {"mapa": {"client": {"rate": 1}}}})


def test_the_readme_experiment_file_is_valid():
    """The documented experiment file parses, so the docs cannot drift from the code."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("### The experiment file", 1)[1].split("```toml", 1)[1].split("```", 1)[0]
    cfg = parse_config(tomllib.loads(block))
    assert cfg.task.dataset == "fmnist" and cfg.federation.client_kind == "auto"
    assert cfg.with_algorithm("fedavg+qsgd8").algorithm.options["compressor"] == "qsgd"


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_experiment_files_build_every_variant(path):
    # Every experiment file under configs/ parses, and its algorithm and each [algorithms.*]
    # variant builds on the file's model (on stand-in data of the dataset's shape: no files read).
    import torch

    from rankfed.app.experiment import build_experiment
    from rankfed.data import Dataset
    from rankfed.sim import Simulator

    cfg = load_config(path, ["federation.clients=4", 'task.init_weights=""'])
    shapes = {"fmnist": ((1, 28, 28), 10), "cifar10": ((3, 32, 32), 10), "digits": ((1, 8, 8), 10), "shakespeare": ((80,), 80)}
    shape, classes = shapes[cfg.task.dataset]
    g = torch.Generator().manual_seed(0)

    def inputs(n):
        if cfg.task.dataset == "shakespeare":  # character ids
            return torch.randint(0, classes, (n, *shape), generator=g).to(torch.uint8)
        return torch.randn(n, *shape, generator=g)

    ds = Dataset(
        name=cfg.task.dataset,
        train_x=inputs(40),
        train_y=torch.arange(40) % classes,
        test_x=inputs(8),
        test_y=torch.arange(8) % classes,
        num_classes=classes,
        input_shape=shape,
        groups=np.arange(40) % 4,  # for the natural partition
        group_names=["a", "b", "c", "d"],
    )
    for label in [None, *cfg.algorithms]:
        variant = cfg if label is None else cfg.with_algorithm(label)
        exp = build_experiment(variant, dataset=ds)
        Simulator(exp)  # builds the server half and the client half on the model


def test_train_samples_takes_a_seeded_subset_of_the_training_split():
    from rankfed.app.experiment import build_experiment, load_task_data

    base = {"task": {"dataset": "digits", "holdout": 0.0}, "federation": {"clients": 5}}
    full = load_task_data(parse_config(base))
    cfg = parse_config({**base, "task": {**base["task"], "train_samples": 300}})
    exp = build_experiment(cfg)
    assert sum(len(c.y) for c in exp.clients) == 300
    assert torch.equal(exp.test.y, full.test_y)  # the test split is untouched
    # every kept sample is a training sample, and the same seed keeps the same ones
    rows = {tuple(x.flatten().tolist()) for x in full.train_x}
    kept = torch.cat([c.x for c in exp.clients])
    assert all(tuple(x.flatten().tolist()) in rows for x in kept)
    again = torch.cat([c.x for c in build_experiment(cfg).clients])
    assert torch.equal(kept, again)
    other = parse_config({"task": {**base["task"], "train_samples": 300}, "federation": {"clients": 5, "seed": 1}})
    assert not torch.equal(torch.cat([c.x for c in build_experiment(other).clients]).sort(0).values, kept.sort(0).values)
    with pytest.raises(ConfigError, match=r"task.train_samples = 99999: .*only 1"):
        build_experiment(parse_config({**base, "task": {**base["task"], "train_samples": 99999}}))
    with pytest.raises(ConfigError, match=r"task.train_samples = -1"):
        parse_config({"task": {"train_samples": -1}})


def test_init_weights_starts_from_a_saved_state_dict(tmp_path):
    from rankfed.models import build_model
    from rankfed.app.experiment import build_experiment

    torch.manual_seed(7)
    saved = build_model("mlp", (1, 8, 8), 10)
    torch.save(saved.state_dict(), tmp_path / "w.pt")
    base = {"dataset": "digits", "model": "mlp"}
    exp = build_experiment(parse_config({"task": {**base, "init_weights": str(tmp_path / "w.pt")}, "federation": {"clients": 2}}))
    for k, v in saved.state_dict().items():
        assert torch.equal(exp.model.state_dict()[k], v)
    with pytest.raises(ConfigError, match="no such file"):
        build_experiment(parse_config({"task": {**base, "init_weights": str(tmp_path / "none.pt")}, "federation": {"clients": 2}}))
    torch.save(build_model("mlp", (1, 8, 8), 10, hidden=[7]).state_dict(), tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="does not fit the model"):
        build_experiment(parse_config({"task": {**base, "init_weights": str(tmp_path / "other.pt")}, "federation": {"clients": 2}}))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a readable state-dict file"):
        build_experiment(parse_config({"task": {**base, "init_weights": str(tmp_path / "junk.pt")}, "federation": {"clients": 2}}))
