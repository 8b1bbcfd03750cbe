"""What is learned: the loss, the metrics, and how a model is called on a batch.

A :class:`Task` is a parameter of every training loop, evaluation and analysis in rankfed;
nothing else computes a loss. Its parts:

* ``loss(output, target) -> scalar``: the user's, or (None) :func:`cross_entropy`;
* ``metrics``: ``{name: fn(outputs, targets) -> float}``, evaluated on the test data with
  the loss (and accuracy, where it means something);
* how the model is called: a batch's input is a tensor (``model(x)``) or a dict of tensors
  (``model(**x)``, as Hugging Face models take ``input_ids`` and ``attention_mask``).

A Hugging Face ``transformers`` model (bare, under PEFT adapters, or reparametrised by MAPA)
with no user loss computes its own: the batch's target goes in as ``labels=`` and the loss is
``output.loss`` (a causal LM shifts the labels itself; positions labelled -100, the padding,
count nowhere). Evaluation then counts what the model's loss counts (a causal LM: the targets
``labels[:, 1:]`` of the logits ``[:, :-1]``), reports token accuracy on those positions and,
for a causal LM, the perplexity ``exp(loss)``.

Outputs may be a tensor of class logits ``(B, C)``, token-level logits ``(B, T, C)`` or
``(B, C, T)``, an object with ``.logits`` (a Hugging Face ``ModelOutput``), or anything the
user's loss takes. Accuracy is reported only where it means something: class logits and
integer targets, counted per token for token-level outputs and leaving out targets < 0
(the ignore index of ``F.cross_entropy``, used for padding).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rankfed.checks import bad, describe_object

__all__ = ["Task", "cross_entropy", "accuracy_counts", "logits_of", "class_dim", "call_model", "hf_loss_mode", "Batch"]

Batch = torch.Tensor | Mapping[str, torch.Tensor]  # one minibatch's input
LossFn = Callable[[Any, torch.Tensor], torch.Tensor]
MetricFn = Callable[[torch.Tensor, torch.Tensor], float]


def call_model(call: Callable[..., Any], x: Batch) -> Any:
    """``call(x)`` for a tensor input, ``call(**x)`` for a dict of tensors."""
    return call(**x) if isinstance(x, Mapping) else call(x)


_HF_MODES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _is_pretrained(module: nn.Module) -> bool:
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.") for c in type(module).__mro__)


def hf_loss_mode(model: Any) -> str | None:
    """How a Hugging Face model in ``model`` computes its own loss: ``"causal"`` (a causal LM,
    which shifts its labels), ``"labels"`` (any other model taking ``labels=``), or None (no
    ``transformers`` model inside: rankfed computes the loss). The outermost
    ``PreTrainedModel`` among ``model.modules()`` decides (PEFT and MAPA wrap one)."""
    if not isinstance(model, nn.Module):
        return None
    try:
        return _HF_MODES[model]
    except KeyError:
        pass
    mode = None
    inner = next((m for m in model.modules() if _is_pretrained(m)), None)
    if inner is not None:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        causal = type(inner).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
        mode = "causal" if causal else "labels"
    _HF_MODES[model] = mode
    return mode


def logits_of(output: Any) -> torch.Tensor | None:
    """The logits tensor of a model output: the tensor itself, ``output.logits`` (a Hugging
    Face ModelOutput), or the first element of a tuple; None if there is none."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def class_dim(logits: torch.Tensor, target: torch.Tensor) -> int | None:
    """Which dimension of ``logits`` holds the classes for integer ``target``, or None.

    Classes last when ``logits.shape[:-1] == target.shape`` (``(B, C)`` for ``(B,)``, ``(B, T, C)``
    for ``(B, T)``); else classes second, ``F.cross_entropy``'s layout (``(B, C, T)`` for ``(B, T)``).
    """
    if target.is_floating_point() or target.is_complex() or logits.dim() != target.dim() + 1:
        return None
    if logits.shape[:-1] == target.shape:
        return logits.dim() - 1
    if logits.shape[:1] + logits.shape[2:] == target.shape:
        return 1
    return None


def _required_logits(output: Any) -> torch.Tensor:
    """The logits of ``output`` for cross-entropy (an error naming the output's type if none)."""
    logits = logits_of(output)
    if logits is None:
        raise ValueError(f"the model's output ({type(output).__name__}) holds no logits tensor; pass loss= that takes it")
    return logits


def _class_dim_or_raise(logits: torch.Tensor, target: torch.Tensor) -> int:
    dim = class_dim(logits, target)
    if dim is None:
        raise ValueError(
            f"cross-entropy needs class logits shaped (B, C), (B, T, C) or (B, C, T) and integer targets shaped (B,) or (B, T); "
            f"got output {tuple(logits.shape)} and target {tuple(target.shape)} {target.dtype} (pass loss= for another task)"
        )
    return dim


def _token_logits(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) logits and (N,) targets of every position, whatever the layout."""
    dim = _class_dim_or_raise(logits, target)
    return logits.movedim(dim, -1).reshape(-1, logits.shape[dim]), target.reshape(-1)


def cross_entropy(output: Any, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The default loss: mean cross-entropy over every position with a target >= 0 (token-level
    outputs: over tokens), classes located by :func:`class_dim`."""
    flat, tgt = _token_logits(_required_logits(output), target)
    return F.cross_entropy(flat, tgt, reduction=reduction)


def accuracy_counts(logits: torch.Tensor | None, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(correct, counted) predictions of class ``logits`` for integer ``target`` (per position for
    token-level outputs; targets < 0 not counted), or None where accuracy means nothing."""
    if logits is None or class_dim(logits, target) is None:
        return None
    flat, tgt = _token_logits(logits, target)
    valid = tgt >= 0
    return ((flat.argmax(-1) == tgt) & valid).sum(), valid.sum()


@dataclass
class Task:
    """The loss and metrics of a federation (see the module docstring).

    Args:
        loss: ``(output, target) -> scalar tensor``; None is :func:`cross_entropy`.
        metrics: ``{name: fn(outputs, targets) -> float}`` over the whole evaluation set (the
            logits of every batch concatenated, on the CPU).
    """

    loss: LossFn | None = None
    metrics: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.loss is not None and not callable(self.loss):
            raise bad("loss", self.loss, "must be a callable (output, target) -> scalar tensor")
        if not isinstance(self.metrics, Mapping):
            raise bad("metrics", self.metrics, "must be a dict {name: fn(outputs, targets) -> float}")
        for name, fn in self.metrics.items():
            if not isinstance(name, str) or not name or name in _RESERVED:
                raise bad("metrics", name, f"metric names must be non-empty strings other than {', '.join(sorted(_RESERVED))}")
            if not callable(fn):
                raise bad(f"metrics[{name!r}]", fn, "must be a callable (outputs, targets) -> float")
        self.metrics = dict(self.metrics)

    @property
    def default_loss(self) -> bool:
        return self.loss is None

    def compute_loss(self, output: Any, target: torch.Tensor) -> torch.Tensor:
        """The loss of a model ``output`` for ``target`` (the user's, or cross-entropy)."""
        return cross_entropy(output, target) if self.loss is None else self.loss(output, target)

    def model_loss(self, model: Any) -> str | None:
        """The Hugging Face loss mode of ``model`` (see :func:`hf_loss_mode`) when there is no
        user loss, else None: the model's own loss is used, with the targets as ``labels``."""
        return hf_loss_mode(model) if self.loss is None else None

    def batch_loss(self, model: Callable[..., Any], x: Batch, y: torch.Tensor) -> torch.Tensor:
        """The loss of ``model`` (a module or any callable) on one minibatch."""
        if self.model_loss(model):
            return _own_loss(_call_with_labels(model, x, y))
        return self.compute_loss(call_model(model, x), y)

    def correct_counts(self, model: Callable[..., Any], x: Batch, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(correct, counted) predictions of ``model`` on one batch, as :meth:`evaluate` counts
        them (a causal LM: its shifted targets), or None where accuracy means nothing."""
        mode = self.model_loss(model)
        if mode:
            logits, y = _hf_targets(logits_of(_call_with_labels(model, x, y)), y, mode)
        else:
            logits = logits_of(call_model(model, x))
        return accuracy_counts(logits, y)

    def loss_sum(self, output: Any, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum, count) whose ratio over any split of a dataset is its mean loss: for
        cross-entropy the summed per-token loss and the number of counted tokens; for a user
        loss ``loss * B`` and ``B`` (exact for losses that are means over samples)."""
        if self.loss is None:
            flat, tgt = _token_logits(_required_logits(output), target)
            return F.cross_entropy(flat, tgt, reduction="sum"), (tgt != -100).sum()
        b = len(target)
        return self.loss(output, target) * b, torch.tensor(b, device=target.device)

    def count(self, target: torch.Tensor) -> int:
        """The denominator of a dataset's mean loss for these targets (what :meth:`loss_sum` counts)."""
        if self.loss is None and not target.is_floating_point():
            return int((target != -100).sum())
        return len(target)

    def sample_terms(self, output: Any, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample (loss sum, count), each (B,): a padded, weighted batch's loss is
        ``(w * sums).sum() / (w * counts).sum()`` (the vectorised cohort's masked loss). For a
        user loss, the loss of each sample alone (exact when the loss is a mean over samples,
        which :meth:`decomposable` checks)."""
        if self.loss is None:
            logits = _required_logits(output)
            dim = _class_dim_or_raise(logits, target)
            ce = F.cross_entropy(logits.movedim(dim, 1), target, reduction="none")  # (B, *T): 0 where ignored
            valid = (target != -100).to(ce.dtype)
            return ce.reshape(len(target), -1).sum(1), valid.reshape(len(target), -1).sum(1)
        from torch.func import vmap

        per = vmap(lambda o, t: self.loss(o.unsqueeze(0), t.unsqueeze(0)))(output, target)
        return per, torch.ones_like(per)

    def decomposable(self, output: Any, target: torch.Tensor) -> str | None:
        """Why this task's loss cannot be formed sample by sample under ``torch.func.vmap`` on
        ``(output, target)`` (None if it can: cross-entropy always can)."""
        if self.loss is None:
            return None
        if not isinstance(output, torch.Tensor):
            return f"the model's output is a {type(output).__name__}, not a tensor, and the loss is {describe_object(self.loss)}"
        try:
            with torch.no_grad():
                whole = float(self.loss(output, target))
                sums, counts = self.sample_terms(output, target)
                parts = float(sums.sum() / counts.sum())
        except Exception as e:  # noqa: BLE001 - any failure means: train one by one
            return f"the loss {describe_object(self.loss)} cannot run sample by sample under torch.func.vmap ({type(e).__name__}: {e})"
        if not math.isclose(whole, parts, rel_tol=1e-4, abs_tol=1e-6):
            return f"the loss {describe_object(self.loss)} is not a mean over samples (a batch's loss {whole:.6g}, the mean of its samples' {parts:.6g})"
        return None

    def describe(self, model: Any = None) -> dict[str, Any]:
        """The loss and metrics by import path (``<python: ...>`` for code that has none); with
        ``model``, a Hugging Face model's own loss is described as ``"model (labels=)"``."""
        loss = "cross_entropy" if self.loss is None else describe_object(self.loss)
        if self.model_loss(model):
            loss = "model (labels=)"
        return {"loss": loss, "metrics": {k: describe_object(v) for k, v in self.metrics.items()}}

    # -- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches) -> dict[str, float | None]:
        """Loss, accuracy (None where it means nothing) and the metrics of ``model`` in eval mode
        over ``batches`` (an iterable of (x, y) minibatches); ``perplexity`` for a causal LM."""
        was_training = model.training
        model.eval()
        mode = self.model_loss(model)
        loss_sum = count = None
        correct = total = None
        outs, tgts = [], []
        try:
            for x, y in batches:
                if mode:
                    out = _call_with_labels(model, x, y)
                    logits, y = _hf_targets(logits_of(out), y, mode)
                    c = _hf_count(y)
                    s = _own_loss(out).double() * c
                else:
                    out = call_model(model, x)
                    s, c = self.loss_sum(out, y)
                    logits = logits_of(out)
                loss_sum = s.double() if loss_sum is None else loss_sum + s.double()
                count = c if count is None else count + c
                acc = accuracy_counts(logits, y)
                if acc is not None:
                    correct = acc[0] if correct is None else correct + acc[0]
                    total = acc[1] if total is None else total + acc[1]
                if self.metrics:
                    kept = logits if logits is not None else out
                    outs.append(kept.detach().cpu() if isinstance(kept, torch.Tensor) else kept)
                    tgts.append(y.detach().cpu())
        finally:
            model.train(was_training)
        if loss_sum is None:
            return {"loss": None, "accuracy": None}
        n = max(int(count), 1)
        result: dict[str, float | None] = {"loss": float(loss_sum) / n, "accuracy": None if total is None or int(total) == 0 else int(correct) / int(total)}
        if mode == "causal":
            result["perplexity"] = math.exp(min(result["loss"], 700.0))
        if self.metrics:
            outputs = torch.cat(outs) if all(isinstance(o, torch.Tensor) for o in outs) else outs
            targets = torch.cat(tgts)
            for name, fn in self.metrics.items():
                result[name] = float(fn(outputs, targets))
        return result


_RESERVED = frozenset({"loss", "accuracy", "round", "personal_accuracy", "perplexity"})


def _call_with_labels(model: Callable[..., Any], x: Batch, y: torch.Tensor) -> Any:
    if not isinstance(x, Mapping):
        raise ValueError(f"a Hugging Face model takes a dict batch (input_ids, attention_mask, ...), got a {type(x).__name__}; give the clients' inputs as dicts")
    return model(**x, labels=y)


def _own_loss(output: Any) -> torch.Tensor:
    loss = getattr(output, "loss", None)
    if not isinstance(loss, torch.Tensor):
        raise ValueError(f"the model's output ({type(output).__name__}) has no loss although labels were passed; pass loss= to compute one")
    return loss


def _hf_targets(logits: torch.Tensor | None, y: torch.Tensor, mode: str) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The logits and targets a Hugging Face model's loss compares: a causal LM's position t
    predicts label t + 1."""
    if mode == "causal" and logits is not None and y.dim() >= 2:
        return logits[:, :-1], y[:, 1:]
    return logits, y


def _hf_count(y: torch.Tensor) -> torch.Tensor:
    """What the model's mean loss divides by: counted tokens (-100 left out), or samples."""
    if y.is_floating_point():
        return torch.tensor(len(y), device=y.device)
    return (y != -100).sum()
