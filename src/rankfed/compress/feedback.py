"""Error feedback: remember what a compressor dropped and send it later.

With residual e (zeros at first), each call sends C(u + e) and keeps

    e' = (u + e) - D(C(u + e))

so nothing is lost, only delayed: after T calls, the sum of everything
decompressed plus the final residual equals the sum of the inputs. This is
what makes biased compressors such as top-k converge (Seide et al. 2014;
Karimireddy et al. 2019) and what GreedyLore and PowerSGD keep per worker.
The residual is float32 (or the input's dtype if wider) on the tensor's
device; it is the only thing this wrapper adds to the wrapped state.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from rankfed.compress.base import LOW_RANK, Compressor, Entries, check_tensors

__all__ = ["error_feedback", "ErrorFeedbackState"]


@dataclass(frozen=True)
class ErrorFeedbackState:
    """``residual``: name -> tensor shaped like that update tensor (what has not been sent yet),
    float32 (float64 for a float64 update, so the residual never loses precision the update had).
    ``inner``: the wrapped compressor's state."""

    residual: dict[str, torch.Tensor]
    inner: Any


def _ef_init(inner: Compressor, template: dict[str, torch.Tensor]) -> ErrorFeedbackState:
    residual = {
        name: torch.zeros(t.shape, dtype=torch.promote_types(t.dtype, torch.float32), device=t.device)
        for name, t in template.items()
        if isinstance(t, torch.Tensor) and t.is_floating_point()
    }
    return ErrorFeedbackState(residual, inner.init(template))


def _ef_compress(
    inner: Compressor, tensors: dict[str, torch.Tensor], state: ErrorFeedbackState, seed: int
) -> tuple[Entries, ErrorFeedbackState]:
    who = f"ef({inner.name})"
    check_tensors(tensors, who)
    if not isinstance(state, ErrorFeedbackState):
        raise TypeError(f"{who}: expected an ErrorFeedbackState from init, got {type(state).__name__}")
    target: dict[str, torch.Tensor] = {}  # u + e at accumulation precision
    send: dict[str, torch.Tensor] = {}  # what the wrapped compressor sees, in u's dtype
    for name, u in tensors.items():
        if not u.is_floating_point():
            send[name] = u
            continue
        e = state.residual.get(name)
        if e is None:
            raise ValueError(f"{who}: no residual for {name!r}; init the state from a template with the same names")
        if e.shape != u.shape:
            raise ValueError(f"{who}: {name!r} has shape {tuple(u.shape)}, its residual {tuple(e.shape)}")
        acc = torch.promote_types(u.dtype, torch.float32)
        x = u.detach().to(acc) + e.to(device=u.device, dtype=acc)
        target[name] = x
        # Cast back so the wrapped compressor (and the receiver) sees u's
        # dtype; the rounding of that cast lands in the residual too.
        send[name] = x.to(u.dtype)
    entries, inner_state = inner.compress(send, state.inner, seed)
    sent = inner.decompress(entries)  # exactly what the receiver will reconstruct
    residual = dict(state.residual)  # tensors absent from this call keep their residual
    for name, x in target.items():
        residual[name] = x - sent[name].to(x.dtype)  # a fresh tensor at x's precision
    return entries, ErrorFeedbackState(residual, inner_state)


def error_feedback(compressor: Compressor) -> Compressor:
    """Wrap ``compressor`` with a residual; the entries (and so decompress) are the wrapped one's."""
    if not isinstance(compressor, Compressor):
        raise TypeError(f"error_feedback wraps a Compressor, got {type(compressor).__name__}")
    cfg = compressor.config
    ok = cfg is not None and cfg.get("compressor") not in ("", *LOW_RANK) and not cfg.get("error_feedback")
    return Compressor(
        f"ef({compressor.name})",
        partial(_ef_init, compressor),
        partial(_ef_compress, compressor),
        compressor.decompress,
        {**cfg, "error_feedback": True} if ok else None,
    )
