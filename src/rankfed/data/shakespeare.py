"""Next-character prediction on Shakespeare, one group per speaking role (LEAF).

The input is plain text in play format (e.g. tinyshakespeare): blocks separated by
blank lines, each opened by a speaker line ``NAME:`` and followed by that speaker's
lines::

    First Citizen:
    Before we proceed any further, hear me speak.

    All:
    Speak, speak.

As in LEAF (Caldas et al. 2018), a role's lines are stripped and joined with single
spaces, every window of ``seq_len`` characters predicts the character that follows
it, and each role's windows are split in text order: the first 80% train, the rest
test, less the test windows that overlap the last train window's text (LEAF leaves
the same gap, so no test character is seen in training).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from .base import DataFormatError, DataNotFoundError, Dataset

__all__ = ["VOCAB", "load_shakespeare", "parse_play"]

# LEAF's 80-character vocabulary; the class id of a character is its index here.
VOCAB = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
TRAIN_FRACTION = 0.8
_FILE_NAMES = ("input.txt", "tinyshakespeare.txt")  # looked up when root is a folder

# Code point -> class id for ASCII; any other character maps to the space's id.
_SPACE_ID = VOCAB.index(" ")
_ASCII_TO_ID = np.full(128, _SPACE_ID, dtype=np.uint8)
_ASCII_TO_ID[[ord(c) for c in VOCAB]] = np.arange(len(VOCAB), dtype=np.uint8)


def _text_file(root: str | os.PathLike | None) -> Path:
    hint = "set task.data_dir to a play-format text file such as tinyshakespeare's input.txt"
    if root is None:
        raise DataNotFoundError(f"shakespeare has no default data file: {hint}")
    path = Path(root).expanduser()
    if path.is_dir():
        for name in _FILE_NAMES:
            if (path / name).is_file():
                return path / name
        raise DataNotFoundError(
            f"shakespeare not found: the folder {path} has no {' or '.join(_FILE_NAMES)}; {hint}"
        )
    if not path.is_file():
        raise DataNotFoundError(f"shakespeare not found: {path} does not exist; {hint}")
    return path


def parse_play(text: str, source: str = "<text>") -> dict[str, str]:
    """Split play-format text into ``{role: text}``, roles in order of first appearance.

    A role's lines are stripped and joined with single spaces (runs of spaces collapse
    to one, as in LEAF). Raises :class:`DataFormatError` naming ``source`` and the
    line when a block does not open with a ``NAME:`` speaker line.
    """
    lines_by_role: dict[str, list[str]] = {}
    current: list[str] | None = None  # lines of the block being read; None between blocks
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            current = None
        elif current is None:  # first line of a block: the speaker
            role = line[:-1].strip()
            if not line.endswith(":") or not role:
                raise DataFormatError(
                    f"{source}:{lineno}: expected a speaker line 'NAME:' to open the block, got {line[:60]!r}"
                )
            current = lines_by_role.setdefault(role, [])
        else:
            current.append(line)
    return {role: re.sub(" {2,}", " ", " ".join(lines)) for role, lines in lines_by_role.items()}


def _encode(text: str) -> np.ndarray:
    """Text -> uint8 (len(text),) class ids, vectorised over the characters."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return np.where(codes < 128, _ASCII_TO_ID[np.minimum(codes, 127)], _SPACE_ID).astype(np.uint8)


def load_shakespeare(
    root: str | os.PathLike | None = None,
    *,
    seq_len: int = 80,
    stride: int = 1,
    min_samples: int = 64,
    max_samples_per_role: int | None = None,
) -> Dataset:
    """Load a play-format text as a federated next-character dataset.

    Args:
        root: The text file, or a folder holding ``input.txt`` or ``tinyshakespeare.txt``.
        seq_len: Window length; sample ``i`` is ``ids[i : i + seq_len]`` -> ``ids[i + seq_len]``.
        stride: Distance between window starts (1: every window, as LEAF).
        min_samples: Roles with fewer windows are dropped.
        max_samples_per_role: Keep at most this many windows per role, evenly spaced
            over its text (``None``: all).

    Returns ``uint8 (N, seq_len)`` character ids (models call ``.long()``), ``int64``
    next-character targets, and ``groups`` = role id of each train sample; train
    samples are ordered by role, then by position in the text.
    """
    for option, value in (("seq_len", seq_len), ("stride", stride), ("min_samples", min_samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"shakespeare {option} must be >= 1, got {value!r}")
    if max_samples_per_role is not None and (
        isinstance(max_samples_per_role, bool) or not isinstance(max_samples_per_role, int) or max_samples_per_role < 1
    ):
        raise ValueError(f"shakespeare max_samples_per_role must be >= 1 or None, got {max_samples_per_role!r}")

    path = _text_file(root)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataFormatError(f"{path}: cannot be read ({err.strerror or err})") from None
    if b"\x00" in raw:  # a text file has no NUL bytes: a binary file or another encoding
        raise DataFormatError(f"{path}: not a text file (it holds NUL bytes); expected play-format UTF-8 text")
    roles = parse_play(raw.decode("utf-8", errors="replace"), source=str(path))
    if not roles:
        raise DataFormatError(f"{path}: no 'NAME:' speaker blocks found")

    train_x, train_y, test_x, test_y, groups, names = [], [], [], [], [], []
    for role, text in roles.items():
        ids = _encode(text)  # (L,) uint8
        if len(ids) <= seq_len:  # too short for a single window and its next character
            continue
        # (W, seq_len + 1) view, no copy: each row is a window plus its next character.
        windows = np.lib.stride_tricks.sliding_window_view(ids, seq_len + 1)[::stride]
        starts = np.arange(len(windows)) * stride  # text position where each window starts
        if len(windows) < min_samples:
            continue
        if max_samples_per_role is not None and len(windows) > max_samples_per_role:
            # Spacing >= 1, so flooring gives distinct, increasing indices.
            keep = np.linspace(0, len(windows) - 1, max_samples_per_role).astype(np.int64)
            windows, starts = windows[keep], starts[keep]
        n_train = max(1, int(TRAIN_FRACTION * len(windows)))
        # As LEAF does, test windows begin after the last train window's text ends
        # (its target included), so no test character was seen in training.
        test_from = n_train + int(np.searchsorted(starts[n_train:], starts[n_train - 1] + seq_len + 1))
        train_x.append(windows[:n_train, :seq_len])
        train_y.append(windows[:n_train, seq_len])
        test_x.append(windows[test_from:, :seq_len])
        test_y.append(windows[test_from:, seq_len])
        groups.append(np.full(n_train, len(names), dtype=np.int64))
        names.append(role)
    if not names:
        raise ValueError(
            f"{path}: no role has min_samples={min_samples} windows of {seq_len + 1} characters"
        )

    # One concatenation per split copies the strided views into contiguous memory.
    return Dataset(
        name="shakespeare",
        train_x=torch.from_numpy(np.concatenate(train_x)),
        train_y=torch.from_numpy(np.concatenate(train_y).astype(np.int64)),
        test_x=torch.from_numpy(np.concatenate(test_x)),
        test_y=torch.from_numpy(np.concatenate(test_y).astype(np.int64)),
        num_classes=len(VOCAB),
        input_shape=(seq_len,),
        groups=np.concatenate(groups),
        group_names=names,
        vocab=VOCAB,
    )
