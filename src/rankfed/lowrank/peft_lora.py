"""PEFT's LoRA layers as the factorised layers of the LoRA family.

A model under PEFT adapters (``peft.get_peft_model(model, LoraConfig(...))``) already holds
what FedLoRA, FedLoRU, FA-LoRA and pFedLoRU need: every adapted layer is a
``peft.tuners.lora.LoraLayer`` with a frozen ``base_layer`` and, per named adapter, a factor
pair ``lora_A[name]`` (down, r x in) and ``lora_B[name]`` (up, out x r) scaled by
``scaling[name]`` (``lora_alpha / r``). That is the maths of :mod:`rankfed.lowrank.layers`
(PEFT's Conv2d LoRA is a k x k conv to r channels and a 1x1 conv up, as FedLoRU's code has;
``tests/test_peft.py`` proves the two equal), so for such a model rankfed uses PEFT's layers
and only adds what PEFT has not:

* :func:`merge_adapter` is FedLoRU's accumulation: PEFT's own ``merge`` adds
  ``get_delta_weight`` into the base weight, the merge is then made permanent (dropped from
  ``merged_adapters``, so the adapter path is live again) and the pair re-initialised
  (``"random"``: drawn from a seeded generator, down Kaiming-uniform and up zero, the same
  draws as rankfed's own layers, so every party holds the same factors without sending them)
  or kept (``"momentum"``);
* :func:`add_personal_adapter` is pFedLoRU's personal pair, a second named adapter.

``peft`` is imported only where a PEFT model is handled (the extra ``rankfed[hf]``).
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch
from torch import nn

from rankfed.lowrank.layers import kaiming_down_zero_up

__all__ = ["PERSONAL_ADAPTER", "add_personal_adapter", "is_peft_model", "peft_lora_layers", "active_adapter", "merge_adapter", "adapter_params", "peft_config_of", "save_peft"]


def _lora_layer_type():
    if "peft" not in sys.modules:  # a model built with PEFT has imported it: nothing to find otherwise
        return None
    from peft.tuners.lora import LoraLayer

    return LoraLayer


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` holds PEFT LoRA layers."""
    cls = _lora_layer_type()
    return cls is not None and any(isinstance(m, cls) for m in model.modules())


def peft_lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """PEFT's LoRA layers of ``model`` by qualified name, in module order."""
    cls = _lora_layer_type()
    if cls is None:
        return {}
    return {name: m for name, m in model.named_modules() if isinstance(m, cls)}


def peft_config_of(model: nn.Module, adapter: str = "default"):
    """The ``LoraConfig`` of ``adapter`` (a PeftModel's ``peft_config``), or None."""
    configs = getattr(model, "peft_config", None)
    return configs.get(adapter) if isinstance(configs, dict) else None


PERSONAL_ADAPTER = "rankfed_personal"  # pFedLoRU's per-client adapter: trained, never sent


def active_adapter(model: nn.Module) -> str:
    """The one active shared adapter of ``model``'s LoRA layers (the one rankfed trains and
    sends; pFedLoRU's personal adapter is active beside it and never counted here)."""
    names = {a for layer in peft_lora_layers(model).values() for a in layer.active_adapters} - {PERSONAL_ADAPTER}
    if len(names) != 1:
        raise ValueError(f"the PEFT model has active adapters {sorted(names)}; rankfed trains exactly one (set_adapter it)")
    return names.pop()


def adapter_params(model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """The factor weights of ``adapter`` by state-dict name, (down, up) per layer in module order."""
    out = {}
    for name, layer in peft_lora_layers(model).items():
        if adapter in layer.lora_A:
            out[f"{name}.lora_A.{adapter}.weight"] = layer.lora_A[adapter].weight
            out[f"{name}.lora_B.{adapter}.weight"] = layer.lora_B[adapter].weight
    return out


@torch.no_grad()
def merge_adapter(model: nn.Module, adapter: str, reinit: str, generator: torch.Generator | None) -> None:
    """FedLoRU's accumulation on PEFT layers: PEFT's ``merge`` of ``adapter`` into every base
    weight, made permanent, then the pair re-initialised (``"random"``) or kept (``"momentum"``)."""
    if reinit not in ("random", "momentum"):
        raise ValueError(f"reinit must be 'random' or 'momentum', got {reinit!r}")
    for layer in peft_lora_layers(model).values():
        if adapter not in layer.lora_A:
            continue
        if adapter in layer.merged_adapters:
            raise RuntimeError(f"adapter {adapter!r} is already merged (unmerge it first)")
        layer.merge(adapter_names=[adapter])
        layer.merged_adapters.remove(adapter)  # the delta now belongs to the base: the adapter path is live again
        if reinit == "random":
            kaiming_down_zero_up(layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, generator)


def add_personal_adapter(model: nn.Module, rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """pFedLoRU's personal pair as a second PEFT adapter (:data:`PERSONAL_ADAPTER`) on the layers
    of the shared one, active beside it (the forward adds both deltas); returns its factor
    weights by state-dict name, (down, up) per layer."""
    shared = active_adapter(model)
    config = peft_config_of(model, shared)
    if config is None or not hasattr(model, "add_adapter"):
        raise ValueError("a personal PEFT adapter needs a PeftModel (peft.get_peft_model) with a LoraConfig")
    personal = copy.deepcopy(config)
    personal.r, personal.lora_alpha = int(rank), float(alpha)
    personal.rank_pattern, personal.alpha_pattern = {}, {}
    model.add_adapter(PERSONAL_ADAPTER, personal)
    model.base_model.set_adapter([shared, PERSONAL_ADAPTER])  # both active; set_adapter marks both trainable
    return adapter_params(model, PERSONAL_ADAPTER)


def save_peft(model: nn.Module, folder: str | os.PathLike) -> dict[str, Path]:
    """A trained PEFT model as PEFT output: ``folder/adapter`` (``save_pretrained``: the adapter
    folder ``PeftModel.from_pretrained`` reads) and ``folder/base`` (the base model with the base
    weights as they are now: FedLoRU's merges moved them away from the pretrained ones, so the
    adapter alone no longer reproduces the model). Load back with
    ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder/"base"), folder/"adapter")``."""
    folder = Path(folder)
    model.save_pretrained(folder / "adapter")
    base = copy.deepcopy(model).unload()  # the adapters removed, not merged: the base weights alone
    base.save_pretrained(folder / "base")
    return {"adapter": folder / "adapter", "base": folder / "base"}
