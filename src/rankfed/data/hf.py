"""Text for Hugging Face language models, read and tokenised on this machine (nothing downloads).

* :func:`read_texts` / :func:`read_instructions`: Hugging Face ``datasets`` from local files
  (plain text, one sample per line; JSON lines), the instruction format of Alpaca
  (``instruction``, ``input``, ``output``) checked record by record.
* :func:`train_tokenizer`: a tokenizer trained on the training text with the ``tokenizers``
  library (byte-level BPE, or one token per character), wrapped as a ``transformers``
  ``PreTrainedTokenizerFast`` with ``<pad>`` and ``<eos>`` tokens, so it is used as any Hugging
  Face tokenizer is (``save_pretrained``, ``__call__``, ``decode``).
* :func:`shakespeare_roles`: the natural partition of a play-format file by speaking role (one
  client per role, as LEAF's Shakespeare), through :func:`rankfed.data.shakespeare.parse_play`.
* :func:`lm_blocks` / :func:`instruction_samples`: client data for a causal LM as an ``(x, y)``
  pair that :class:`rankfed.Federation` takes: ``x = {"input_ids", "attention_mask"}`` and
  ``y`` the labels, -100 on padding (and on the prompt of an instruction, unless it is trained
  on), so padding counts in no loss and no token accuracy.

A user with a hub model and internet uses ``AutoTokenizer.from_pretrained`` instead of
:func:`train_tokenizer`; every function here takes any Hugging Face tokenizer.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from rankfed.data.base import DataFormatError, DataNotFoundError
from rankfed.data.shakespeare import parse_play

__all__ = [
    "ALPACA_TEMPLATE",
    "format_instruction",
    "instruction_samples",
    "lm_blocks",
    "read_instructions",
    "read_texts",
    "shakespeare_roles",
    "train_tokenizer",
    "write_jsonl",
]

PAD, EOS = "<pad>", "<eos>"

# The Alpaca prompt (Taori et al. 2023), with and without an input.
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def _existing(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataNotFoundError(f"{p}: no such file")
    return p


def _load(path: Path, builder: str):
    from datasets import load_dataset

    # A local file through the library's packaged builders ("text", "json"): nothing is fetched;
    # datasets keeps its Arrow cache under HF_DATASETS_CACHE.
    return load_dataset(builder, data_files=str(path), split="train")


def read_texts(path: str | os.PathLike, *, field: str = "text") -> list[str]:
    """The samples of a local text file (one per non-empty line) or JSON-lines file (the string
    ``field`` of each record), read with Hugging Face ``datasets``."""
    p = _existing(path)
    if p.suffix in (".jsonl", ".json"):
        ds = _load(p, "json")
        if field not in ds.column_names:
            raise DataFormatError(f"{p}: the records have no {field!r} field (they have {', '.join(ds.column_names)})")
        out = ds[field]
        bad = next((i for i, t in enumerate(out) if not isinstance(t, str)), None)
        if bad is not None:
            raise DataFormatError(f"{p}: record {bad + 1}: {field!r} is {type(out[bad]).__name__}, not a string")
        return list(out)
    return [t for t in _load(p, "text")["text"] if t.strip()]


def read_instructions(path: str | os.PathLike) -> list[dict[str, str]]:
    """Instruction records (``instruction``, optional ``input``, ``output``: the Alpaca format)
    from a local JSON-lines or JSON file, read with Hugging Face ``datasets``; a record without
    an instruction or an output is an error naming the file and the record."""
    p = _existing(path)
    try:
        ds = _load(p, "json")
    except Exception as e:  # noqa: BLE001 - datasets raises its own types for malformed JSON
        raise DataFormatError(f"{p}: not JSON lines ({type(e).__name__}: {e})") from None
    records = []
    for i, rec in enumerate(ds):
        for key in ("instruction", "output"):
            if not isinstance(rec.get(key), str) or not rec[key].strip():
                raise DataFormatError(f"{p}: record {i + 1} has no {key!r} string (Alpaca records have instruction, input, output)")
        records.append({"instruction": rec["instruction"], "input": rec.get("input") or "", "output": rec["output"]})
    if not records:
        raise DataFormatError(f"{p}: no records")
    return records


def format_instruction(record: Mapping[str, str]) -> tuple[str, str]:
    """(prompt, response) of an instruction record in the Alpaca template."""
    template = ALPACA_TEMPLATE if record.get("input") else ALPACA_TEMPLATE_NO_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input", "")), record["output"]


def train_tokenizer(texts: Iterable[str], kind: str = "bpe", vocab_size: int = 2000):
    """A tokenizer trained on ``texts`` with the ``tokenizers`` library, as a ``transformers``
    ``PreTrainedTokenizerFast`` with ``<pad>`` (id 0) and ``<eos>`` (id 1).

    Args:
        kind: ``"bpe"`` (byte-level BPE, as GPT-2's) or ``"char"`` (one token per character seen).
        vocab_size: the BPE vocabulary's size (``"char"``: ignored).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    if not texts:
        raise ValueError("train_tokenizer: no text to train on")
    if kind == "bpe":
        if vocab_size < 258:
            raise ValueError(f"vocab_size = {vocab_size}: a byte-level BPE needs at least 258 (256 bytes and 2 special tokens)")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer)
    elif kind == "char":
        chars = sorted(set("".join(texts)))
        vocab = {PAD: 0, EOS: 1} | {c: i + 2 for i, c in enumerate(chars)}
        tok = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
    else:
        raise ValueError(f"kind = {kind!r}: must be 'bpe' or 'char'")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS)


def shakespeare_roles(path: str | os.PathLike, min_chars: int = 1) -> dict[str, str]:
    """``{role: text}`` of a play-format file (``NAME:`` then the lines, blocks separated by a
    blank line), roles with at least ``min_chars`` characters, largest first."""
    p = _existing(path)
    roles = parse_play(p.read_text(encoding="utf-8"), str(p))
    kept = {r: t for r, t in roles.items() if len(t) >= min_chars}
    return dict(sorted(kept.items(), key=lambda item: -len(item[1])))


def _pack(rows: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    n = len(rows)
    ids = torch.full((n, length), pad_id, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    y = torch.full((n, length), -100, dtype=torch.long)
    for i, (row, lab) in enumerate(zip(rows, labels)):
        row, lab = list(row)[:length], list(lab)[:length]
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
        y[i, : len(lab)] = torch.tensor(lab, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask}, y


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token (set tokenizer.pad_token)")
    return int(pad)


def lm_blocks(text: str | Sequence[str], tokenizer: Any, block: int = 64, *, max_blocks: int | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A causal LM's samples from ``text``: its tokens cut into consecutive blocks of ``block``
    (the last one right-padded), labels = the input ids (the model shifts them), -100 on padding."""
    if block < 2:
        raise ValueError(f"block = {block}: a causal LM sample needs at least 2 tokens")
    texts = [text] if isinstance(text, str) else list(text)
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t)["input_ids"])
    if not ids:
        raise ValueError("lm_blocks: the text has no tokens")
    rows = [ids[s : s + block] for s in range(0, len(ids), block)]
    rows = [r for r in rows if len(r) >= 2]  # a 1-token tail predicts nothing
    if max_blocks is not None:
        rows = rows[:max_blocks]
    return _pack(rows, rows, block, _pad_id(tokenizer))


def instruction_samples(records: Sequence[Mapping[str, str]], tokenizer: Any, max_length: int = 256, *, train_on_prompt: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A causal LM's samples from instruction records: prompt (Alpaca template) + response +
    eos, truncated to ``max_length`` and right-padded; labels -100 on padding and, unless
    ``train_on_prompt``, on the prompt (the loss is the response's)."""
    eos = tokenizer.eos_token_id
    rows, labels = [], []
    for rec in records:
        prompt, response = format_instruction(rec)
        p = tokenizer(prompt)["input_ids"]
        r = tokenizer(response)["input_ids"] + ([eos] if eos is not None else [])
        rows.append(p + r)
        labels.append((p if train_on_prompt else [-100] * len(p)) + r)
    lost = [i for i, lab in enumerate(labels) if all(t == -100 for t in lab[:max_length])]
    if lost:
        warnings.warn(f"instruction_samples: max_length = {max_length} cuts off the whole response of {len(lost)} of {len(records)} records (first: record {lost[0] + 1}); they add nothing to the loss", stacklevel=2)
    return _pack(rows, labels, max_length, _pad_id(tokenizer))


def write_jsonl(records: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Records as JSON lines (fixtures, the examples' own splits)."""
    p = Path(path)
    p.write_text("".join(json.dumps(dict(r)) + "\n" for r in records), encoding="utf-8")
    return p
