"""Bad input through the `rankfed` command: one clear line, exit code 2, no traceback.

Every case runs ``rankfed.app.cli.main`` in-process on a small digits experiment and checks
that it returns 2, that stderr is the single line ``rankfed: error: ...`` naming the bad
key, value or file, and that nothing is written over an existing run folder.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from rankfed.app.cli import main

BASE = """\
[task]
dataset = "digits"
model = "mlp"
model_options = { hidden = [16] }
[federation]
clients = 4
rounds = 1
[client]
lr = 0.1
batch_size = 16
[algorithm]
name = "fedavg"
"""


@pytest.fixture()
def config(tmp_path: Path) -> Path:
    p = tmp_path / "exp.toml"
    p.write_text(BASE, encoding="utf-8")
    return p


def _fails_cleanly(capsys, args: list[str], *needles: str) -> str:
    """Run the command; it must exit 2 with one ``rankfed: error:`` line holding every needle."""
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, f"exit code {code}, stderr: {err}"
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rankfed: error: "), err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    return err


def _run(config: Path, out: Path, sets: list[str], extra: list[str] = ()) -> list[str]:
    args = ["-q", "run", str(config), "--out", str(out)]
    for s in sets:
        args += ["--set", s]
    return args + list(extra)


# --------------------------------------------------------------------------- 1. malformed experiment files

# (id, file text (str or bytes), needles in the message; "{path}" stands for the file's path)
MALFORMED = [
    ("invalid-toml", "[task\ndataset = 'digits'\n", ["{path}", "not valid TOML"]),
    ("unterminated-string", "[task]\ndataset = \"digits\n", ["{path}", "not valid TOML"]),
    ("wrong-type-str-for-int", BASE.replace("clients = 4", 'clients = "ten"'), ["federation.clients = 'ten'", "int"]),
    ("wrong-type-float-for-int", BASE.replace("clients = 4", "clients = 4.5"), ["federation.clients = 4.5"]),
    ("wrong-type-str-for-float", BASE.replace("lr = 0.1", 'lr = "fast"'), ["client.lr = 'fast'"]),
    ("wrong-type-bool-for-int", BASE.replace("rounds = 1", "rounds = true"), ["federation.rounds = True"]),
    ("wrong-type-list-for-str", BASE.replace('dataset = "digits"', 'dataset = ["digits"]'), ["task.dataset = ['digits']"]),
    ("unknown-section", BASE + "\n[fedration]\nclients = 3\n", ["[fedration]"]),
    ("unknown-key", BASE.replace("rounds = 1", "rounds = 1\nroundz = 2"), ["federation.roundz"]),
    ("unknown-algorithm-option", BASE + "k = 3\n", ["algorithm.k"]),
    ("task-not-a-table", "task = 3\n", ["task = 3", "table"]),
    ("federation-not-a-table", 'federation = "ten"\n', ["federation = 'ten'", "table"]),
    ("algorithm-not-a-table", "algorithm = 3\n", ["algorithm = 3", "table"]),
    ("algorithm-a-string", 'algorithm = "mapa"\n', ["algorithm = 'mapa'", "table"]),
    ("algorithms-not-a-table", "algorithms = [1, 2]\n", ["algorithms = [1, 2]"]),
    ("variant-not-a-table", "[algorithms]\nv = 3\n", ["algorithms.v = 3"]),
    ("variant-client-not-a-table", "[algorithms.v]\nname = 'fedavg'\nclient = 3\n", ["algorithms.v.client = 3"]),
    ("variant-bad-option-value", "[algorithms.v]\nname = 'mapa'\nk = 0\n", ["algorithms.v.k = 0"]),
    ("algorithm-name-not-a-string", "[algorithm]\nname = 3\n", ["algorithm.name = 3"]),
    ("non-utf8", b'[task]\ndataset = "digits\xff\xfe"\n', ["{path}", "TOML"]),
    ("utf16", "[task]\ndataset = 'digits'\n".encode("utf-16"), ["{path}"]),
    ("binary-garbage", bytes(range(256)) * 4, ["{path}"]),
]


@pytest.mark.parametrize("text, needles", [pytest.param(t, n, id=i) for i, t, n in MALFORMED])
def test_malformed_experiment_file(tmp_path, capsys, text, needles):
    path = tmp_path / "bad.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    _fails_cleanly(capsys, _run(path, tmp_path / "out", []), *(n.replace("{path}", str(path)) for n in needles))
    assert not (tmp_path / "out").exists()  # a config error stops before the run folder


def test_missing_experiment_file(tmp_path, capsys):
    path = tmp_path / "nope.toml"
    _fails_cleanly(capsys, _run(path, tmp_path / "out", []), str(path), "does not exist")


def test_experiment_file_is_a_folder(tmp_path, capsys):
    _fails_cleanly(capsys, _run(tmp_path, tmp_path / "out", []), str(tmp_path), "folder")


@pytest.mark.parametrize(
    "override, needles",
    [
        pytest.param("federationclients", ["--set 'federationclients'"], id="set-without-equals"),
        pytest.param("clients=3", ["--set 'clients=3'"], id="set-without-section"),
        pytest.param("task.dataset.x=1", ["--set 'task.dataset.x=1'", "not a table"], id="set-into-a-value"),
        pytest.param("federation.seed=-1", ["federation.seed = -1"], id="seed-negative"),
        pytest.param("federation.seed=18446744073709551616", ["federation.seed = 18446744073709551616"], id="seed-too-large"),
        pytest.param("client.lr=1" + "0" * 400, ["client.lr"], id="float-beyond-double-range"),
        pytest.param("client.lr=inf", ["client.lr = inf"], id="lr-inf"),
        pytest.param("client.grad_clip=nan", ["client.grad_clip = nan"], id="grad-clip-nan"),
        pytest.param("client.weight_decay=nan", ["client.weight_decay = nan"], id="weight-decay-nan"),
        pytest.param("client.momentum=1.0", ["client.momentum = 1.0"], id="momentum-1"),
        pytest.param("client.betas=[0.9]", ["client.betas = [0.9]"], id="betas-one"),
        pytest.param("task.alpha=inf", ["task.alpha = inf"], id="dirichlet-alpha-inf"),
        pytest.param("task.holdout=1.0", ["task.holdout = 1.0"], id="holdout-1"),
        pytest.param("task.model_options={foo=1}", ["'foo'", "mlp"], id="unknown-model-option"),
        pytest.param("task.model_options={hidden=[0]}", ["hidden", "[0]"], id="model-option-bad-value"),
        pytest.param("task.model_options={hidden=[1000000000000000000]}", ["hidden", "1000000000000000000"], id="model-too-large"),
        pytest.param("task.dataset_options={foo=1}", ["foo", "digits"], id="unknown-dataset-option"),
        pytest.param("task.init_weights='/no/such/weights.pt'", ["task.init_weights", "/no/such/weights.pt"], id="init-weights-missing"),
        pytest.param("task.partition=natural", ["natural"], id="no-natural-split"),
    ],
)
def test_bad_value_or_override(config, tmp_path, capsys, override, needles):
    _fails_cleanly(capsys, _run(config, tmp_path / "out", [override]), *needles)


@pytest.mark.parametrize(
    "sets, needles",
    [
        pytest.param(["task.dataset_options={num_devices='x'}"], ["num_devices", "'x'"], id="synthetic-num-devices-str"),
        pytest.param(["task.dataset_options={alpha=-1.0}"], ["alpha", "-1.0"], id="synthetic-alpha-negative"),
        pytest.param(["task.dataset_options={beta=nan}"], ["beta", "nan"], id="synthetic-beta-nan"),
    ],
)
def test_bad_dataset_options(config, tmp_path, capsys, sets, needles):
    sets = ["task.dataset=synthetic", "task.model=logreg", "task.model_options={}", *sets]
    _fails_cleanly(capsys, _run(config, tmp_path / "out", sets), *needles)


def test_bad_shakespeare_option_type(config, tmp_path, capsys):
    sets = ["task.dataset=shakespeare", f"task.data_dir='{tmp_path}'", "task.model=char_lstm", "task.model_options={}", "task.dataset_options={seq_len='80'}"]
    _fails_cleanly(capsys, _run(config, tmp_path / "out", sets), "seq_len", "'80'")


# --------------------------------------------------------------------------- 2. unknown names


@pytest.mark.parametrize(
    "override, needle",
    [
        pytest.param("task.dataset=imagenet", "task.dataset = 'imagenet'", id="dataset"),
        pytest.param("task.model=vgg16", "task.model = 'vgg16'", id="model"),
        pytest.param("algorithm.name=fedprox", "algorithm.name = 'fedprox'", id="algorithm"),
        pytest.param("task.partition=kmeans", "task.partition = 'kmeans'", id="partition"),
        pytest.param("client.optimizer=adam", "client.optimizer = 'adam'", id="optimizer"),
        pytest.param("algorithm.compressor=zip", "'zip'", id="compressor"),
        pytest.param("federation.device=tpu", "federation.device = 'tpu'", id="device"),
    ],
)
def test_unknown_name(config, tmp_path, capsys, override, needle):
    _fails_cleanly(capsys, _run(config, tmp_path / "out", [override]), needle)


def test_compare_unknown_algorithm(config, tmp_path, capsys):
    args = ["-q", "compare", str(config), "--algorithms", "fedavg,fedprox", "--out", str(tmp_path / "c")]
    _fails_cleanly(capsys, args, "'fedprox'")


# --------------------------------------------------------------------------- 3. impossible options

IMPOSSIBLE = [
    ("mapa-k-above-d", ["algorithm.name=mapa", "algorithm.k=100000"], ["algorithm.k = 100000", "d = "]),
    ("mapa-k-0", ["algorithm.name=mapa", "algorithm.k=0"], ["algorithm.k = 0"]),
    ("mapa-k-negative", ["algorithm.name=mapa", "algorithm.k=-5"], ["algorithm.k = -5"]),
    ("mapa-sigma-nan", ["algorithm.name=mapa", "algorithm.sigma=nan"], ["algorithm.sigma = nan"]),
    *[
        (f"{name}-rank-{r}", [f"algorithm.name={name}", f"algorithm.rank={r}", "algorithm.patterns=['*']"], [f"algorithm.rank = {r}"])
        for name in ("fedlora", "fedloru", "fa_lora", "pfedloru", "pfedlora", "mfedloru")
        for r in (0, -1)
    ],
    ("fedlora-rank-unallocatable", ["algorithm.name=fedlora", "algorithm.rank=1000000000000000000", "algorithm.patterns=['*']"], ["algorithm.rank = 1000000000000000000"]),
    ("fedlora-alpha-nan", ["algorithm.name=fedlora", "algorithm.alpha=nan", "algorithm.patterns=['*']"], ["algorithm.alpha = nan"]),
    ("pfedloru-personal-rank-0", ["algorithm.name=pfedloru", "algorithm.personal_rank=0", "algorithm.patterns=['*']"], ["algorithm.personal_rank = 0"]),
    ("pfedloru-personal-rank-unallocatable", ["algorithm.name=pfedloru", "algorithm.personal_rank=1000000000000000000", "algorithm.patterns=['*']"], ["algorithm.personal_rank = 1000000000000000000"]),
    ("fedhm-rank-negative", ["algorithm.name=fedhm", "algorithm.rank=-1", "algorithm.patterns=['*']"], ["algorithm.rank = -1"]),
    ("fedhm-rank-factor-0", ["algorithm.name=fedhm", "algorithm.rank_factor=0", "algorithm.patterns=['*']"], ["algorithm.rank_factor = 0"]),
    ("fedhm-tier-rank-0", ["algorithm.name=fedhm", "algorithm.patterns=['*']", "algorithm.tiers=[{fraction=1.0, rank=0}]"], ["algorithm.tiers[0].rank = 0"]),
    ("mfedloru-tier-rank-negative", ["algorithm.name=mfedloru", "algorithm.patterns=['*']", "algorithm.tiers=[{fraction=1.0, rank_a=-1, rank_b=0}]"], ["algorithm.tiers[0].rank_a = -1"]),
    ("mfedloru-tier-fractions", ["algorithm.name=mfedloru", "algorithm.patterns=['*']", "algorithm.tiers=[{fraction=0.5, rank_a=1, rank_b=1}]"], ["algorithm.tiers", "0.5"]),
    ("lora-patterns-match-nothing", ["algorithm.name=fedlora", "algorithm.patterns=['zzz']"], ["patterns", "zzz"]),
    ("participation-0", ["federation.participation=0"], ["federation.participation = 0.0"]),
    ("participation-negative", ["federation.participation=-0.5"], ["federation.participation = -0.5"]),
    ("participation-above-1", ["federation.participation=1.5"], ["federation.participation = 1.5"]),
    ("participation-nan", ["federation.participation=nan"], ["federation.participation = nan"]),
    ("clients-0", ["federation.clients=0"], ["federation.clients = 0"]),
    ("clients-above-samples", ["federation.clients=5000"], ["federation.clients = 5000", "more clients than training samples"]),
    ("clients-above-subsample", ["task.train_samples=3"], ["federation.clients = 4", "(3)"]),
    ("train-samples-above-split", ["task.train_samples=1000000"], ["task.train_samples = 1000000"]),
    ("lr-0", ["client.lr=0"], ["client.lr = 0.0"]),
    ("lr-negative", ["client.lr=-0.1"], ["client.lr = -0.1"]),
    ("lr-nan", ["client.lr=nan"], ["client.lr = nan"]),
    ("batch-size-0", ["client.batch_size=0"], ["client.batch_size = 0"]),
    ("local-epochs-0", ["client.epochs=0"], ["client.epochs = 0"]),
    ("topk-ratio-0", ["algorithm.compressor='topk'", "algorithm.topk_ratio=0"], ["topk_ratio = 0.0"]),
    ("topk-ratio-negative", ["algorithm.compressor='topk'", "algorithm.topk_ratio=-0.1"], ["topk_ratio = -0.1"]),
    ("topk-ratio-above-1", ["algorithm.compressor='topk'", "algorithm.topk_ratio=1.5"], ["topk_ratio = 1.5"]),
    ("topk-ratio-nan", ["algorithm.compressor='topk'", "algorithm.topk_ratio=nan"], ["topk_ratio = nan"]),
    ("qsgd-bits-3", ["algorithm.compressor='qsgd'", "algorithm.qsgd_bits=3"], ["qsgd_bits = 3"]),
    ("qsgd-bits-16", ["algorithm.compressor='qsgd'", "algorithm.qsgd_bits=16"], ["qsgd_bits = 16"]),
    ("qsgd-bits-0", ["algorithm.compressor='qsgd'", "algorithm.qsgd_bits=0"], ["qsgd_bits = 0"]),
    ("powersgd-rank-0", ["algorithm.compressor='powersgd'", "algorithm.compress_rank=0"], ["compress_rank = 0"]),
    ("eval-every-0", ["federation.eval_every=0"], ["federation.eval_every = 0"]),
    ("rounds-0", ["federation.rounds=0"], ["federation.rounds = 0"]),
    ("rounds-negative", ["federation.rounds=-3"], ["federation.rounds = -3"]),
    ("eval-batch-size-0", ["federation.eval_batch_size=0"], ["federation.eval_batch_size = 0"]),
]


@pytest.mark.parametrize("sets, needles", [pytest.param(s, n, id=i) for i, s, n in IMPOSSIBLE])
def test_impossible_option(config, tmp_path, capsys, sets, needles):
    _fails_cleanly(capsys, _run(config, tmp_path / "out", sets), *needles)


# --------------------------------------------------------------------------- 4. corrupt or truncated data files

IDX = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    magic = (0x0800 | array.ndim) if magic is None else magic
    return struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def _fmnist_folder(folder: Path, gz: bool = False, n_train: int = 8, n_test: int = 4) -> Path:
    """A Fashion-MNIST folder of the four IDX files, as tests/test_data.py writes them."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        IDX[0]: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        IDX[1]: rng.integers(0, 10, n_train, dtype=np.uint8),
        IDX[2]: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        IDX[3]: rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        raw = _idx_bytes(array)
        (folder / (name + (".gz" if gz else ""))).write_bytes(gzip.compress(raw) if gz else raw)
    return folder


def _truncate(path: Path, keep: int) -> Path:
    path.write_bytes(path.read_bytes()[:keep])
    return path


def _flip(path: Path, offset: int, mask: int = 0xFF) -> Path:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _append(path: Path, data: bytes) -> Path:
    return _write(path, path.read_bytes() + data)


def _gz_corrupt(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:10] + b"\x00" * 40 + data[50:])  # the deflate stream's start overwritten
    return path


# (id, how to spoil a fresh folder: f(folder) -> the path the message must name, gzipped?)
IDX_DAMAGE = [
    ("truncated-images", lambda f: _truncate(f / IDX[0], 1000), False),
    ("truncated-labels", lambda f: _truncate(f / IDX[3], 10), False),
    ("truncated-in-header", lambda f: _truncate(f / IDX[1], 3), False),
    ("empty-file", lambda f: _truncate(f / IDX[2], 0), False),
    ("trailing-bytes", lambda f: _append(f / IDX[1], b"\x00\x01"), False),
    ("wrong-magic-images", lambda f: _flip(f / IDX[0], 3, 0x0A), False),
    ("wrong-magic-labels", lambda f: _flip(f / IDX[3], 2, 0x01), False),
    ("images-as-labels", lambda f: _write(f / IDX[1], (f / IDX[0]).read_bytes()), False),
    ("label-count-mismatch", lambda f: _write(f / IDX[1], _idx_bytes(np.zeros(5, np.uint8))), False),
    ("label-out-of-range", lambda f: _write(f / IDX[3], _idx_bytes(np.full(4, 200, np.uint8))), False),
    ("images-not-28x28", lambda f: _write(f / IDX[2], _idx_bytes(np.zeros((4, 27, 28), np.uint8))), False),
    ("no-images", lambda f: _write(f / IDX[1], _idx_bytes(np.zeros(0, np.uint8))) and _write(f / IDX[0], _idx_bytes(np.zeros((0, 28, 28), np.uint8))), False),
    ("huge-header-count", lambda f: _write(f / IDX[0], struct.pack(">4I", 0x803, 0xFFFFFFFF, 28, 28)), False),
    ("gzip-corrupt-stream", lambda f: _gz_corrupt(f / (IDX[0] + ".gz")), True),
    ("gzip-truncated", lambda f: _truncate(f / (IDX[1] + ".gz"), 20), True),
    ("gzip-bad-crc", lambda f: _flip(f / (IDX[3] + ".gz"), -6), True),
    ("gzip-magic-only", lambda f: _write(f / (IDX[2] + ".gz"), b"\x1f\x8b"), True),
    ("gzip-of-truncated-idx", lambda f: _write(f / (IDX[0] + ".gz"), gzip.compress(_idx_bytes(np.zeros((8, 28, 28), np.uint8))[:500])), True),
]


@pytest.mark.parametrize("damage, gz", [pytest.param(d, g, id=i) for i, d, g in IDX_DAMAGE])
def test_corrupt_fmnist_files(config, tmp_path, capsys, damage, gz):
    folder = _fmnist_folder(tmp_path / "fmnist", gz=gz)
    bad = damage(folder)
    sets = ["task.dataset=fmnist", f"task.data_dir='{folder}'", "task.model=''", "task.model_options={}", "federation.clients=2"]
    _fails_cleanly(capsys, _run(config, tmp_path / "out", sets), str(bad))


def test_fmnist_folder_is_intact(config, tmp_path, capsys):
    """The fixture itself loads: the failures above are the damage, not the folder."""
    folder = _fmnist_folder(tmp_path / "fmnist")
    sets = ["task.dataset=fmnist", f"task.data_dir='{folder}'", "task.model=''", "task.model_options={}", "federation.clients=2"]
    assert main(_run(config, tmp_path / "out", sets)) == 0


@pytest.mark.parametrize("missing", IDX)
def test_missing_fmnist_file(config, tmp_path, capsys, missing):
    folder = _fmnist_folder(tmp_path / "fmnist")
    (folder / missing).unlink()
    sets = ["task.dataset=fmnist", f"task.data_dir='{folder}'", "task.model=''", "task.model_options={}"]
    _fails_cleanly(capsys, _run(config, tmp_path / "out", sets), str(folder), missing)


@pytest.mark.parametrize("where", ["missing", "a-file"])
def test_fmnist_data_dir_not_a_folder(config, tmp_path, capsys, where):
    target = tmp_path / "fmnist"
    if where == "a-file":
        target.write_bytes(b"not a folder")
    sets = ["task.dataset=fmnist", f"task.data_dir='{target}'", "task.model=''", "task.model_options={}"]
    _fails_cleanly(capsys, _run(config, tmp_path / "out", sets), str(target))


CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _cifar_folder(folder: Path) -> Path:
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    for name in CIFAR_FILES:
        batch = {b"labels": rng.integers(0, 10, 2).tolist(), b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8)}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return folder


def _pickled(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)


CIFAR_DAMAGE = [
    ("truncated-pickle", lambda f: _truncate(f / "data_batch_2", 500)),
    ("garbage-bytes", lambda f: _write(f / "data_batch_4", np.random.default_rng(0).bytes(4000))),
    ("empty-file", lambda f: _truncate(f / "test_batch", 0)),
    ("not-a-dict", lambda f: _write(f / "test_batch", _pickled([1, 2, 3]))),
    ("ragged-data", lambda f: _write(f / "test_batch", _pickled({b"data": [[1, 2], [3]], b"labels": [1, 2]}))),
    ("ragged-labels", lambda f: _write(f / "test_batch", _pickled({b"data": np.zeros((2, 3072), np.uint8), b"labels": [[1], [2, 3]]}))),
    ("wrong-width", lambda f: _write(f / "data_batch_1", _pickled({b"data": np.zeros((2, 100), np.uint8), b"labels": [1, 2]}))),
    ("no-rows", lambda f: _write(f / "data_batch_1", _pickled({b"data": np.zeros((0, 3072), np.uint8), b"labels": []}))),
]


@pytest.mark.parametrize("damage", [pytest.param(d, id=i) for i, d in CIFAR_DAMAGE])
def test_corrupt_cifar10_batch(config, tmp_path, capsys, damage):
    folder = _cifar_folder(tmp_path / "cifar-10-batches-py")
    bad = damage(folder)
    sets = ["task.dataset=cifar10", f"task.data_dir='{folder}'", "task.model=logreg", "task.model_options={}", "federation.clients=2"]
    _fails_cleanly(capsys, _run(config, tmp_path / "out", sets), str(bad))


def test_missing_cifar10_batch(config, tmp_path, capsys):
    folder = _cifar_folder(tmp_path / "cifar-10-batches-py")
    (folder / "data_batch_5").unlink()
    sets = ["task.dataset=cifar10", f"task.data_dir='{folder}'", "task.model=logreg", "task.model_options={}"]
    _fails_cleanly(capsys, _run(config, tmp_path / "out", sets), str(folder), "data_batch_5")


@pytest.mark.parametrize(
    "content, needle",
    [
        pytest.param(b"", "no 'NAME:' speaker blocks", id="empty"),
        pytest.param(b"\n\n   \n", "no 'NAME:' speaker blocks", id="blank-lines"),
        pytest.param(bytes(np.random.default_rng(0).bytes(5000)), "", id="binary-garbage"),
        pytest.param(b"\x00" * 1000, "", id="nul-bytes"),
        pytest.param(b"no speaker line here\nat all\n", ":1:", id="no-speaker-line"),
        pytest.param(b"A:\nhi\n", "min_samples", id="too-short"),
    ],
)
def test_bad_shakespeare_text(config, tmp_path, capsys, content, needle):
    path = tmp_path / "input.txt"
    path.write_bytes(content)
    sets = ["task.dataset=shakespeare", f"task.data_dir='{path}'", "task.model=char_lstm", "task.model_options={}"]
    _fails_cleanly(capsys, _run(config, tmp_path / "out", sets), str(path), needle)


# --------------------------------------------------------------------------- 5. an existing run folder


def _existing_run(folder: Path) -> dict[str, bytes]:
    """A non-empty run folder; returns every file's bytes."""
    (folder / "checkpoints").mkdir(parents=True)
    files = {
        "config.toml": b'[task]\ndataset = "digits"\n',
        "metrics.jsonl": b'{"round": 1, "accuracy": 0.5}\n',
        "rounds.jsonl": b'{"round": 1}\n',
        "summary.json": b'{"best_accuracy": 0.5}\n',
        "model.pt": bytes(range(256)),
        "checkpoints/round-0001.pt": b"\x00\x01checkpoint",
        "notes.txt": "mine, not rankfed's\n".encode(),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "command, sets",
    [
        pytest.param("run", [], id="run-valid-config"),
        pytest.param("run", ["algorithm.name=mapa", "algorithm.k=100000"], id="run-impossible-option"),
        pytest.param("run", ["federation.clients=5000"], id="run-too-many-clients"),
        pytest.param("run", ["task.dataset=fmnist", "task.data_dir='/no/such/folder'"], id="run-missing-data"),
        pytest.param("compare", [], id="compare-valid-config"),
    ],
)
def test_existing_run_folder_is_left_alone(config, tmp_path, capsys, command, sets):
    out = tmp_path / "run"
    files = _existing_run(out)
    assert _snapshot(out) == files
    args = ["-q", command, str(config), "--out", str(out)]
    if command == "compare":
        args += ["--algorithms", "fedavg"]
    for s in sets:
        args += ["--set", s]
    _fails_cleanly(capsys, args, str(out))
    assert _snapshot(out) == files  # every file byte for byte, and no new ones


def test_existing_run_folder_with_bad_data_is_left_alone(config, tmp_path, capsys):
    folder = _fmnist_folder(tmp_path / "fmnist")
    _truncate(folder / IDX[0], 100)
    out = tmp_path / "run"
    files = _existing_run(out)
    sets = ["task.dataset=fmnist", f"task.data_dir='{folder}'", "task.model=''", "task.model_options={}"]
    _fails_cleanly(capsys, _run(config, out, sets), str(out))  # the folder is refused before the data is read
    assert _snapshot(out) == files


def test_out_is_an_existing_file(config, tmp_path, capsys):
    out = tmp_path / "run"
    out.write_bytes(b"keep me")
    _fails_cleanly(capsys, _run(config, out, []), str(out))
    assert out.read_bytes() == b"keep me"


@pytest.mark.parametrize("sets", [["algorithm.name=mapa", "algorithm.k=100000000"], ["federation.clients=5000"], ["task.dataset=fmnist", "task.data_dir='/no/such'"]])
def test_a_failed_start_leaves_no_run_folder_behind(config, tmp_path, capsys, sets):
    out = tmp_path / "new-run"
    _fails_cleanly(capsys, _run(config, out, sets))
    assert not out.exists()  # so the corrected command can use the same --out
