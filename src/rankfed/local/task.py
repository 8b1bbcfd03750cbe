"""What is learned: the loss, the metrics, and how a model is called on a batch.

A :class:`Task` is a parameter of every training loop, evaluation and analysis in rankfed;
nothing else computes a loss. Its parts:

* ``loss(output, target) -> scalar``: the user's, or (None) :func:`cross_entropy`;
* ``metrics``: ``{name: fn(outputs, targets) -> float}``, evaluated on the test data with
  the loss (and accuracy, where it means something);
* how the model is called: a batch's input is a tensor (``model(x)``) or a dict of tensors
  (``model(**x)``, as Hugging Face models take ``input_ids`` and ``attention_mask``).

Outputs may be a tensor of class logits ``(B, C)``, token-level logits ``(B, T, C)`` or
``(B, C, T)``, an object with ``.logits`` (a Hugging Face ``ModelOutput``), or anything the
user's loss takes. Accuracy is reported only where it means something: class logits and
integer targets, counted per token for token-level outputs and leaving out targets < 0
(the ignore index of ``F.cross_entropy``, used for padding).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rankfed.checks import bad, describe_object

__all__ = ["Task", "cross_entropy", "accuracy_counts", "logits_of", "class_dim", "call_model", "Batch"]

Batch = torch.Tensor | Mapping[str, torch.Tensor]  # one minibatch's input
LossFn = Callable[[Any, torch.Tensor], torch.Tensor]
MetricFn = Callable[[torch.Tensor, torch.Tensor], float]


def call_model(call: Callable[..., Any], x: Batch) -> Any:
    """``call(x)`` for a tensor input, ``call(**x)`` for a dict of tensors."""
    return call(**x) if isinstance(x, Mapping) else call(x)


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


def _token_logits(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) logits and (N,) targets of every position, whatever the layout."""
    dim = class_dim(logits, target)
    if dim is None:
        raise ValueError(
            f"cross-entropy needs class logits shaped (B, C), (B, T, C) or (B, C, T) and integer targets shaped (B,) or (B, T); "
            f"got output {tuple(logits.shape)} and target {tuple(target.shape)} {target.dtype} (pass loss= for another task)"
        )
    return logits.movedim(dim, -1).reshape(-1, logits.shape[dim]), target.reshape(-1)


def cross_entropy(output: Any, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The default loss: mean cross-entropy over every position with a target >= 0 (token-level
    outputs: over tokens), classes located by :func:`class_dim`."""
    logits = logits_of(output)
    if logits is None:
        raise ValueError(f"the model's output ({type(output).__name__}) holds no logits tensor; pass loss= that takes it")
    flat, tgt = _token_logits(logits, target)
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

    def batch_loss(self, model: Callable[..., Any], x: Batch, y: torch.Tensor) -> torch.Tensor:
        """The loss of ``model`` (a module or any callable) on one minibatch."""
        return self.compute_loss(call_model(model, x), y)

    def loss_sum(self, output: Any, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum, count) whose ratio over any split of a dataset is its mean loss: for
        cross-entropy the summed per-token loss and the number of counted tokens; for a user
        loss ``loss * B`` and ``B`` (exact for losses that are means over samples)."""
        if self.loss is None:
            logits = logits_of(output)
            if logits is None:
                raise ValueError(f"the model's output ({type(output).__name__}) holds no logits tensor; pass loss= that takes it")
            flat, tgt = _token_logits(logits, target)
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
            logits = logits_of(output)
            dim = class_dim(logits, target) if logits is not None else None
            if dim is None:
                _token_logits(logits if logits is not None else torch.empty(0), target)  # raises the clear error
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

    def describe(self) -> dict[str, Any]:
        """The loss and metrics by import path (``<python: ...>`` for code that has none)."""
        return {"loss": "cross_entropy" if self.loss is None else describe_object(self.loss), "metrics": {k: describe_object(v) for k, v in self.metrics.items()}}

    # -- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches) -> dict[str, float | None]:
        """Loss, accuracy (None where it means nothing) and the metrics of ``model`` in eval mode
        over ``batches`` (an iterable of (x, y) minibatches)."""
        was_training = model.training
        model.eval()
        loss_sum = count = None
        correct = total = None
        outs, tgts = [], []
        try:
            for x, y in batches:
                out = call_model(model, x)
                s, c = self.loss_sum(out, y)
                loss_sum = s.double() if loss_sum is None else loss_sum + s.double()
                count = c if count is None else count + c
                logits = logits_of(out)
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
        if self.metrics:
            outputs = torch.cat(outs) if all(isinstance(o, torch.Tensor) for o in outs) else outs
            targets = torch.cat(tgts)
            for name, fn in self.metrics.items():
                result[name] = float(fn(outputs, targets))
        return result


_RESERVED = frozenset({"loss", "accuracy", "round", "personal_accuracy"})
