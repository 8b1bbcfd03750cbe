"""Tests for rankfed.data: loaders (on fixtures written in the real file formats),
partitioners, holdout and federate."""

from __future__ import annotations

import gzip
import os
import pickle
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from rankfed.data import (
    DATASETS,
    PARTITIONS,
    ClientData,
    DataFormatError,
    DataNotFoundError,
    Dataset,
    federate,
    holdout_split,
    load_dataset,
    partition,
)
from rankfed.data import idx as idx_module

TINYSHAKESPEARE = Path("/work/shared/data/tinyshakespeare.txt")
FMNIST_SYSTEM = Path("/usr/share/datasets/fashion-mnist")


def standardized(raw: np.ndarray, train_raw: np.ndarray, axis: tuple[int, ...] | None = None) -> np.ndarray:
    """Reference: scale uint8 to [0, 1], standardise with the train split's statistics."""
    train = train_raw.astype(np.float64) / 255
    mean = train.mean(axis=axis, keepdims=True)
    std = train.std(axis=axis, keepdims=True)
    return (raw.astype(np.float64) / 255 - mean) / std


# --------------------------------------------------------------------------- IDX


def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> Path:
    """Write a uint8 array as an IDX file (gzipped when the name ends in .gz)."""
    magic = (0x0800 | array.ndim) if magic is None else magic
    payload = struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
    return path


def make_idx_folder(folder: Path, gz: bool, n_train: int = 7, n_test: int = 3, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        write_idx(folder / (name + (".gz" if gz else "")), array)
    return arrays


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("name", ["fmnist", "mnist", "kmnist"])
def test_idx_round_trip(tmp_path: Path, gz: bool, name: str) -> None:
    raw = make_idx_folder(tmp_path, gz)
    ds = load_dataset(name, root=tmp_path)

    assert ds.name == name and ds.num_classes == 10 and ds.input_shape == (1, 28, 28)
    assert ds.train_x.shape == (7, 1, 28, 28) and ds.test_x.shape == (3, 1, 28, 28)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert ds.groups is None
    np.testing.assert_array_equal(ds.train_y.numpy(), raw["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(ds.test_y.numpy(), raw["t10k-labels-idx1-ubyte"])
    train_raw = raw["train-images-idx3-ubyte"]
    # Scalar mean/std of the *train* pixels applied to both splits.
    np.testing.assert_allclose(ds.train_x[:, 0].numpy(), standardized(train_raw, train_raw), atol=1e-5)
    np.testing.assert_allclose(
        ds.test_x[:, 0].numpy(), standardized(raw["t10k-images-idx3-ubyte"], train_raw), atol=1e-5
    )


def test_idx_torchvision_layout(tmp_path: Path) -> None:
    raw = make_idx_folder(tmp_path / "KMNIST" / "raw", gz=False)
    ds = load_dataset("kmnist", root=tmp_path)
    np.testing.assert_array_equal(ds.train_y.numpy(), raw["train-labels-idx1-ubyte"])


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_idx_truncated_file(tmp_path: Path, gz: bool) -> None:
    make_idx_folder(tmp_path, gz)
    path = tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataFormatError) as err:
        load_dataset("mnist", root=tmp_path)
    assert str(path) in str(err.value)
    assert ("truncated" if not gz else "gzip") in str(err.value)


def test_idx_trailing_bytes_and_short_header(tmp_path: Path) -> None:
    make_idx_folder(tmp_path, gz=False)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes() + b"\x00")
    with pytest.raises(DataFormatError, match="trailing bytes") as err:
        load_dataset("mnist", root=tmp_path)
    assert str(labels) in str(err.value)
    labels.write_bytes(b"\x00\x00\x08")
    with pytest.raises(DataFormatError, match="header"):
        load_dataset("mnist", root=tmp_path)


def test_idx_wrong_magic(tmp_path: Path) -> None:
    arrays = make_idx_folder(tmp_path, gz=False)
    labels = arrays["train-labels-idx1-ubyte"]
    path = write_idx(tmp_path / "train-labels-idx1-ubyte", labels, magic=0x00000901)
    with pytest.raises(DataFormatError) as err:
        load_dataset("mnist", root=tmp_path)
    assert str(path) in str(err.value) and "0x00000901" in str(err.value)


def test_idx_count_mismatch(tmp_path: Path) -> None:
    make_idx_folder(tmp_path, gz=False)
    path = write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(5, dtype=np.uint8))
    with pytest.raises(DataFormatError, match="5 labels for 7 images") as err:
        load_dataset("mnist", root=tmp_path)
    assert str(path) in str(err.value)


def test_idx_missing_folder_and_files(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("kmnist", root=missing)
    assert isinstance(err.value, FileNotFoundError)
    assert str(missing) in str(err.value)

    make_idx_folder(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataNotFoundError, match="t10k-labels-idx1-ubyte") as err:
        load_dataset("kmnist", root=tmp_path)
    assert str(tmp_path) in str(err.value)

    with pytest.raises(DataNotFoundError, match="task.data_dir"):
        load_dataset("mnist")  # no default folder


def test_fmnist_default_folder_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(idx_module, "FMNIST_DEFAULT_ROOT", tmp_path / "fashion-mnist")
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("fmnist")
    message = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "task.data_dir" in message and str(tmp_path / "fashion-mnist") in message


@pytest.mark.skipif(not FMNIST_SYSTEM.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_fmnist_system_install() -> None:
    ds = load_dataset("fmnist")
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert torch.equal(torch.bincount(ds.train_y), torch.full((10,), 6000))
    assert abs(ds.train_x.mean().item()) < 1e-4 and abs(ds.train_x.std().item() - 1) < 1e-3


# --------------------------------------------------------------------------- CIFAR


def write_pickle(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)  # the archives are protocol-2 pickles


def make_cifar10(folder: Path, per_batch: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (6 * per_batch, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, 6 * per_batch)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        rows = slice(b * per_batch, (b + 1) * per_batch)
        write_pickle(
            folder / name,
            {b"batch_label": name.encode(), b"labels": labels[rows].tolist(), b"data": data[rows]},
        )
    n_train = 5 * per_batch
    return data[:n_train], labels[:n_train], data[n_train:], labels[n_train:]


@pytest.mark.parametrize("via_parent", [False, True], ids=["batch-folder", "parent-folder"])
def test_cifar10(tmp_path: Path, via_parent: bool) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    train_raw, train_labels, test_raw, test_labels = make_cifar10(folder)
    ds = load_dataset("cifar10", root=tmp_path if via_parent else folder)

    assert ds.train_x.shape == (15, 3, 32, 32) and ds.test_x.shape == (3, 3, 32, 32)
    assert ds.num_classes == 10 and ds.input_shape == (3, 32, 32)
    np.testing.assert_array_equal(ds.train_y.numpy(), train_labels)  # batches 1..5 in order
    np.testing.assert_array_equal(ds.test_y.numpy(), test_labels)

    # Row layout: 1024 red, 1024 green, 1024 blue values, each plane row-major.
    planes = train_raw.reshape(15, 3, 32, 32)
    expected = standardized(planes, planes, axis=(0, 2, 3))  # per-channel statistics
    n, c, row, col = 4, 2, 5, 7
    pixel = train_raw[n, c * 1024 + row * 32 + col]
    channel = train_raw[:, c * 1024 : (c + 1) * 1024] / 255
    expected_pixel = (pixel / 255 - channel.mean()) / channel.std()
    assert ds.train_x[n, c, row, col].item() == pytest.approx(expected_pixel, abs=1e-5)
    np.testing.assert_allclose(ds.train_x.numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(
        ds.test_x.numpy(), standardized(test_raw.reshape(3, 3, 32, 32), planes, axis=(0, 2, 3)), atol=1e-5
    )


def test_cifar100(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    folder = tmp_path / "cifar-100-python"
    splits = {}
    for name, n in (("train", 8), ("test", 4)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, n)
        fine[0] = 99
        write_pickle(
            folder / name,
            {b"data": data, b"fine_labels": fine.tolist(), b"coarse_labels": (fine // 5).tolist()},
        )
        splits[name] = (data, fine)
    ds = load_dataset("cifar100", root=tmp_path)

    assert ds.num_classes == 100
    assert ds.train_x.shape == (8, 3, 32, 32) and ds.test_x.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(ds.train_y.numpy(), splits["train"][1])  # fine, not coarse labels
    np.testing.assert_array_equal(ds.test_y.numpy(), splits["test"][1])
    planes = splits["train"][0].reshape(8, 3, 32, 32)
    np.testing.assert_allclose(ds.train_x.numpy(), standardized(planes, planes, axis=(0, 2, 3)), atol=1e-5)


class _Exploit:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.makedirs, (str(self.target),))


def test_cifar_rejects_bad_files(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar10(folder)
    batch = folder / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:500])  # truncated download
    with pytest.raises(DataFormatError) as err:
        load_dataset("cifar10", root=folder)
    assert str(batch) in str(err.value)

    pwned = tmp_path / "pwned"
    write_pickle(batch, {b"data": _Exploit(pwned), b"labels": [0]})
    with pytest.raises(DataFormatError, match="refusing"):
        load_dataset("cifar10", root=folder)
    assert not pwned.exists()  # the payload never ran

    write_pickle(batch, {b"data": np.zeros((3, 3072), dtype=np.uint8), b"labels": [0, 1, 10]})
    with pytest.raises(DataFormatError, match="labels outside"):
        load_dataset("cifar10", root=folder)

    (folder / "test_batch").unlink()
    with pytest.raises(DataNotFoundError, match="test_batch"):
        load_dataset("cifar10", root=folder)
    with pytest.raises(DataNotFoundError, match="task.data_dir"):
        load_dataset("cifar100")


# --------------------------------------------------------------------------- Shakespeare

PLAY = """\
First Citizen:
Before we proceed any further,
hear me speak.

All:
Speak, speak.

First Citizen:
You are all resolved rather to die than to famish?

All:
Resolved.   resolved. Caf\u00e9 $5!

MENENIUS:
Why, masters, my good friends.

"""
# Each role's lines, stripped and joined with single spaces (runs of spaces collapse);
# then 'é' and '$', outside the vocabulary, become spaces.
ROLE_TEXT = {
    "First Citizen": "Before we proceed any further, hear me speak. "
    "You are all resolved rather to die than to famish?",
    "All": "Speak, speak. Resolved. resolved. Caf   5!",
    "MENENIUS": "Why, masters, my good friends.",
}


def decode(ds: Dataset, ids: torch.Tensor) -> str:
    return "".join(ds.vocab[i] for i in ids.tolist())


def test_shakespeare_windows_and_split(tmp_path: Path) -> None:
    path = tmp_path / "play.txt"
    path.write_text(PLAY, encoding="utf-8")
    seq_len = 10
    ds = load_dataset("shakespeare", root=path, seq_len=seq_len, min_samples=1)

    assert ds.group_names == list(ROLE_TEXT)  # one group per role, in order of appearance
    assert ds.num_classes == 80 and len(ds.vocab) == 80 and ds.input_shape == (seq_len,)
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    test_start = 0
    for g, (role, text) in enumerate(ROLE_TEXT.items()):
        rows = np.flatnonzero(ds.groups == g)
        n_windows = len(text) - seq_len  # every window that has a next character
        n_train = int(0.8 * n_windows)
        assert len(rows) == n_train
        # Train: the first 80% of the role's windows in text order; test: the rest.
        for k, row in enumerate(rows):
            assert decode(ds, ds.train_x[row]) == text[k : k + seq_len]
            assert ds.vocab[ds.train_y[row]] == text[k + seq_len]
        # Test: the windows that start after the last train window (and its target) end.
        first_test = n_train + seq_len
        for k in range(first_test, n_windows):
            i = test_start + k - first_test
            assert decode(ds, ds.test_x[i]) + ds.vocab[ds.test_y[i]] == text[k : k + seq_len + 1]
        test_start += max(0, n_windows - first_test)
    assert len(ds.test_y) == test_start


def test_shakespeare_options(tmp_path: Path) -> None:
    (tmp_path / "input.txt").write_text(PLAY, encoding="utf-8")
    citizen = ROLE_TEXT["First Citizen"]
    # MENENIUS has 30 - 10 = 20 windows, All 42 - 10 = 32, First Citizen 96 - 10 = 86.
    ds = load_dataset("shakespeare", root=tmp_path, seq_len=10, min_samples=21)
    assert ds.group_names == ["First Citizen", "All"]

    ds = load_dataset("shakespeare", root=tmp_path, seq_len=10, stride=3, min_samples=1)
    n_windows = -(-(len(citizen) - 10) // 3)  # ceil
    assert np.sum(ds.groups == 0) == int(0.8 * n_windows)
    assert decode(ds, ds.train_x[1]) == citizen[3:13]

    ds = load_dataset("shakespeare", root=tmp_path, seq_len=10, max_samples_per_role=5, min_samples=1)
    # Kept windows start at linspace(0, W-1, 5); the 5th is test only if it starts after the
    # 4th (train) window's text ends: true for First Citizen (85 > 63 + 10), not for All
    # (31 <= 23 + 10) nor MENENIUS (19 <= 14 + 10).
    assert np.bincount(ds.groups).tolist() == [4, 4, 4] and len(ds.test_y) == 1
    # Kept windows are spread over the whole role: first train and last test window.
    assert decode(ds, ds.train_x[0]) == citizen[:10]
    assert decode(ds, ds.test_x[0]) + ds.vocab[ds.test_y[0]] == citizen[-11:]


def test_shakespeare_errors(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="task.data_dir"):
        load_dataset("shakespeare")
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("shakespeare", root=tmp_path)  # folder without input.txt
    assert str(tmp_path) in str(err.value)
    bad = tmp_path / "bad.txt"
    bad.write_text("ALICE:\nhello there\n\njust some prose without a speaker\n")
    with pytest.raises(DataFormatError, match=f"{bad}:4"):
        load_dataset("shakespeare", root=bad)
    good = tmp_path / "good.txt"
    good.write_text(PLAY)
    with pytest.raises(ValueError, match="min_samples"):
        load_dataset("shakespeare", root=good, min_samples=10_000)


@pytest.mark.skipif(not TINYSHAKESPEARE.is_file(), reason="tinyshakespeare not available")
def test_tinyshakespeare() -> None:
    ds = load_dataset("shakespeare", root=TINYSHAKESPEARE)
    assert ds.train_x.shape[1:] == (80,) and ds.train_x.dtype == torch.uint8
    assert len(ds.train_y) > 700_000 and len(ds.group_names) > 100
    assert ds.group_names[0] == "First Citizen" and "All" in ds.group_names
    start = decode(ds, ds.train_x[0]) + ds.vocab[ds.train_y[0]]
    assert start.startswith("Before we proceed any further, hear me speak. You are all resolved")
    assert np.all(np.diff(ds.groups) >= 0)  # train samples ordered by role
    assert np.bincount(ds.groups).min() >= int(0.8 * 64)


# --------------------------------------------------------------------------- generated datasets


def test_synthetic() -> None:
    ds = load_dataset("synthetic", seed=3, num_devices=12, alpha=0.5, beta=0.5)
    again = load_dataset("synthetic", seed=3, num_devices=12, alpha=0.5, beta=0.5)
    other = load_dataset("synthetic", seed=4, num_devices=12, alpha=0.5, beta=0.5)

    assert ds.train_x.dtype == torch.float32 and ds.train_x.shape[1:] == (60,) and ds.input_shape == (60,)
    assert ds.num_classes == 10 and int(ds.train_y.max()) < 10
    assert np.array_equal(np.unique(ds.groups), np.arange(12)) and len(ds.group_names) == 12
    sizes = np.bincount(ds.groups)
    assert sizes.min() >= int(0.8 * 50) and sizes.max() <= int(0.8 * 5000)
    # 80/20 per device: the test split is about a quarter of the train split.
    assert len(ds.test_y) == pytest.approx(len(ds.train_y) / 4, rel=0.05)
    assert torch.equal(ds.train_x, again.train_x) and torch.equal(ds.test_y, again.test_y)
    assert np.array_equal(ds.groups, again.groups)
    assert ds.train_x.shape != other.train_x.shape or not torch.equal(ds.train_x, other.train_x)
    # Device inputs differ (v_k ~ N(B_k, 1)), so the per-device means are spread out.
    means = np.stack([ds.train_x.numpy()[ds.groups == k].mean(0) for k in range(12)])
    assert means.std(axis=0).mean() > 0.5


def test_digits() -> None:
    ds = load_dataset("digits", seed=0)
    assert ds.train_x.shape == (1437, 1, 8, 8) and ds.test_x.shape == (360, 1, 8, 8)
    assert ds.num_classes == 10 and ds.input_shape == (1, 8, 8) and ds.train_x.dtype == torch.float32
    assert abs(ds.train_x.mean().item()) < 1e-5 and ds.train_x.std().item() == pytest.approx(1, abs=1e-3)
    # Stratified: every class is ~20% test.
    frac = torch.bincount(ds.test_y, minlength=10) / (
        torch.bincount(ds.test_y, minlength=10) + torch.bincount(ds.train_y, minlength=10)
    )
    assert torch.all((frac - 0.2).abs() < 0.02)
    again, other = load_dataset("digits", seed=0), load_dataset("digits", seed=1)
    assert torch.equal(ds.train_x, again.train_x) and torch.equal(ds.train_y, again.train_y)
    assert not torch.equal(ds.train_y, other.train_y)


def test_mnist1d() -> None:
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.random(), random.random()
    np.random.seed(123)
    random.seed(123)
    ds = load_dataset("mnist1d", seed=5, num_samples=1000)
    # Generation must not disturb the caller's global random streams.
    assert (np.random.random(), random.random()) == (expected_np, expected_py)

    assert ds.train_x.shape == (800, 40) and ds.test_x.shape == (200, 40) and ds.input_shape == (40,)
    assert ds.num_classes == 10 and set(ds.train_y.tolist()) == set(range(10))
    assert abs(ds.train_x.mean().item()) < 1e-5 and ds.train_x.std().item() == pytest.approx(1, abs=1e-3)
    again = load_dataset("mnist1d", seed=5, num_samples=1000)
    other = load_dataset("mnist1d", seed=6, num_samples=1000)
    assert torch.equal(ds.train_x, again.train_x) and torch.equal(ds.test_y, again.test_y)
    assert not torch.equal(ds.train_x, other.train_x)


def test_mnist1d_default_size() -> None:
    ds = load_dataset("mnist1d")
    assert len(ds.train_y) == 4000 and len(ds.test_y) == 1000


def test_load_dataset_rejects_unknown_names_and_options() -> None:
    assert DATASETS == (
        "digits", "mnist1d", "synthetic", "fmnist", "mnist", "kmnist", "cifar10", "cifar100", "shakespeare"
    )
    with pytest.raises(ValueError, match="'imagenet'.*cifar10"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="sigma.*alpha, beta, num_devices"):
        load_dataset("synthetic", sigma=1.0)


def test_dataset_checks_consistency() -> None:
    with pytest.raises(ValueError, match="input_shape"):
        Dataset("x", torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64), torch.zeros(2, 3),
                torch.zeros(2, dtype=torch.int64), num_classes=2, input_shape=(4,))
    with pytest.raises(ValueError, match="groups"):
        Dataset("x", torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64), torch.zeros(2, 3),
                torch.zeros(2, dtype=torch.int64), num_classes=2, input_shape=(3,), groups=np.zeros(3))


# --------------------------------------------------------------------------- partitioners


@pytest.fixture(scope="module")
def balanced_labels() -> np.ndarray:
    """60,000 labels, 6,000 per class, shuffled (the FMNIST train label distribution)."""
    return np.random.default_rng(0).permutation(np.repeat(np.arange(10), 6000))


@pytest.mark.parametrize("method", ["iid", "dirichlet", "shards"])
def test_partition_covers_disjointly(balanced_labels: np.ndarray, method: str) -> None:
    parts = partition(balanced_labels, 20, method, seed=0)
    assert len(parts) == 20 and all(p.dtype == np.int64 for p in parts)
    everything = np.concatenate(parts)
    assert len(everything) == len(balanced_labels)  # sizes sum to N
    assert np.array_equal(np.sort(everything), np.arange(len(balanced_labels)))  # disjoint cover


@pytest.mark.parametrize("method", ["iid", "dirichlet", "shards"])
def test_partition_is_deterministic_per_seed(balanced_labels: np.ndarray, method: str) -> None:
    a = partition(balanced_labels, 10, method, seed=7)
    b = partition(balanced_labels, 10, method, seed=7)
    c = partition(balanced_labels, 10, method, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_iid_sizes() -> None:
    labels = np.zeros(1003, dtype=np.int64)
    sizes = [len(p) for p in partition(labels, 10, "iid", seed=0)]
    assert sum(sizes) == 1003 and max(sizes) - min(sizes) <= 1


def test_shards_mcmahan(balanced_labels: np.ndarray) -> None:
    parts = partition(balanced_labels, 100, "shards", seed=0, classes_per_client=2)
    assert [len(p) for p in parts] == [600] * 100
    assert max(len(np.unique(balanced_labels[p])) for p in parts) <= 2
    # Shards are dealt at random: most clients get two different classes.
    assert sum(len(np.unique(balanced_labels[p])) == 2 for p in parts) > 80

    parts = partition(balanced_labels, 10, "shards", seed=0, classes_per_client=3)
    assert [len(p) for p in parts] == [6000] * 10  # 3 shards of 2000
    assert max(len(np.unique(balanced_labels[p])) for p in parts) <= 3


def test_shards_remainder_and_errors() -> None:
    labels = np.arange(1005) % 10
    parts = partition(labels, 10, "shards", seed=0)  # 20 shards of 50, 5 samples left out
    assert [len(p) for p in parts] == [100] * 10
    assert len(np.unique(np.concatenate(parts))) == 1000
    with pytest.raises(ValueError, match="30 samples cannot fill 10 clients x 4"):
        partition(np.zeros(30, dtype=np.int64), 10, "shards", seed=0, classes_per_client=4)


def mean_max_class_fraction(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    return float(np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]))


def test_dirichlet_skew(balanced_labels: np.ndarray) -> None:
    skewed = partition(balanced_labels, 20, "dirichlet", seed=0, alpha=0.1)
    uniform = partition(balanced_labels, 20, "dirichlet", seed=0, alpha=100.0)
    assert mean_max_class_fraction(balanced_labels, skewed) > 0.5
    assert mean_max_class_fraction(balanced_labels, uniform) < 0.15
    assert min(len(p) for p in skewed) >= 1


def test_dirichlet_errors() -> None:
    with pytest.raises(ValueError, match="alpha=0.001"):
        partition(np.arange(20) % 2, 20, "dirichlet", seed=0, alpha=0.001)
    with pytest.raises(ValueError, match="alpha must be > 0, got -1"):
        partition(np.arange(20) % 2, 2, "dirichlet", seed=0, alpha=-1)


def test_natural_partition() -> None:
    # Group sizes: 10 -> 5, 11 -> 3, 12 -> 3, 13 -> 8, 14 -> 1 (ids need not be 0..G-1).
    groups = np.random.default_rng(0).permutation(np.repeat([10, 11, 12, 13, 14], [5, 3, 3, 8, 1]))
    labels = np.zeros(len(groups), dtype=np.int64)

    parts = partition(labels, 5, "natural", seed=0, groups=groups)
    assert [np.unique(groups[p]).tolist() for p in parts] == [[10], [11], [12], [13], [14]]
    assert all(np.array_equal(p, np.flatnonzero(groups == g)) for p, g in zip(parts, [10, 11, 12, 13, 14]))

    # Three largest: 13 (8), 10 (5), then the tie 11/12 (3 each) goes to the smaller id.
    parts = partition(labels, 3, "natural", seed=0, groups=groups)
    assert [int(groups[p[0]]) for p in parts] == [10, 11, 13]
    assert [len(p) for p in parts] == [5, 3, 8]

    with pytest.raises(ValueError, match="num_clients=6 exceeds the 5 groups"):
        partition(labels, 6, "natural", seed=0, groups=groups)
    with pytest.raises(ValueError, match="no natural split"):
        partition(labels, 2, "natural", seed=0)


def test_partition_rejects_bad_values() -> None:
    labels = np.zeros(10, dtype=np.int64)
    with pytest.raises(ValueError, match="got 0"):
        partition(labels, 0, "iid", seed=0)
    with pytest.raises(ValueError, match=r"\(10\), got 11"):
        partition(labels, 11, "iid", seed=0)
    with pytest.raises(ValueError, match="'kmeans'.*iid, dirichlet, shards, natural"):
        partition(labels, 2, "kmeans", seed=0)
    assert PARTITIONS == ("iid", "dirichlet", "shards", "natural")


# --------------------------------------------------------------------------- holdout and federate


def test_holdout_split() -> None:
    indices = np.arange(100, 140)
    train, held = holdout_split(indices, 0.3, np.random.default_rng(0))
    assert len(held) == 12 and len(train) == 28
    assert np.array_equal(np.sort(np.concatenate([train, held])), indices)
    again = holdout_split(indices, 0.3, np.random.default_rng(0))
    assert np.array_equal(train, again[0]) and np.array_equal(held, again[1])

    assert [len(a) for a in holdout_split(indices, 0.0, np.random.default_rng(0))] == [40, 0]
    assert [len(a) for a in holdout_split(np.arange(2), 0.9, np.random.default_rng(0))] == [1, 1]
    assert [len(a) for a in holdout_split(np.arange(1), 0.9, np.random.default_rng(0))] == [1, 0]
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=str(bad)):
            holdout_split(indices, bad, np.random.default_rng(0))


def test_federate() -> None:
    ds = load_dataset("digits", seed=0)
    clients = federate(ds, 7, "dirichlet", seed=3, holdout=0.2, alpha=1.0)
    parts = partition(ds.train_y.numpy(), 7, "dirichlet", seed=3, alpha=1.0)

    assert len(clients) == 7 and all(isinstance(c, ClientData) for c in clients)
    for client_id, (client, indices) in enumerate(zip(clients, parts)):
        train, held = holdout_split(indices, 0.2, np.random.default_rng([3, 1, client_id]))
        assert client.num_samples == len(client.y) == len(train)
        assert len(client.val_y) == round(0.2 * len(indices))
        assert torch.equal(client.x, ds.train_x[train]) and torch.equal(client.y, ds.train_y[train])
        assert torch.equal(client.val_x, ds.train_x[held]) and torch.equal(client.val_y, ds.train_y[held])
        assert client.x.is_contiguous() and client.x.data_ptr() != ds.train_x.data_ptr()
    assert sum(c.num_samples + len(c.val_y) for c in clients) == len(ds.train_y)

    again = federate(ds, 7, "dirichlet", seed=3, holdout=0.2, alpha=1.0)
    assert all(torch.equal(a.x, b.x) and torch.equal(a.val_y, b.val_y) for a, b in zip(clients, again))

    no_val = federate(ds, 4, "iid", seed=0, holdout=0.0)
    assert no_val[0].val_x.shape == (0, 1, 8, 8) and no_val[0].val_y.shape == (0,)
    with pytest.raises(ValueError, match="'digits' has no natural split"):
        federate(ds, 4, "natural", seed=0)


def test_federate_natural() -> None:
    ds = load_dataset("synthetic", seed=0, num_devices=8)
    clients = federate(ds, 8, "natural", seed=0, holdout=0.1)
    device_sizes = np.bincount(ds.groups)
    assert [c.num_samples + len(c.val_y) for c in clients] == device_sizes.tolist()
    train_rows = {tuple(row) for row in ds.train_x[ds.groups == 2].tolist()}
    assert all(tuple(row) in train_rows for row in clients[2].x.tolist())
