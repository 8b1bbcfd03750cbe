"""Low-rank parametrisations of model layers.

:mod:`rankfed.lowrank.layers` holds the LoRA-style wrappers for ``nn.Linear``
and ``nn.Conv2d`` used by FedLoRU, FedLoRA and FA-LoRA: a frozen
``base_layer`` plus a trainable ``down`` / ``up`` pair, with reversible,
recorded merges (accumulation) and re-initialisation.
"""

from .layers import (
    SCALES,
    kaiming_down_zero_up,
    kaiming_uniform,
    InitMode,
    LoRAConv2d,
    LoRAConv2dSplit,
    LoRALayer,
    LoRALinear,
    apply_lora,
    dense_state_dict,
    load_lora_state,
    lora_layers,
    lora_state,
    max_rank,
    merge_all,
    split_max_rank,
)

__all__ = [
    "SCALES",
    "kaiming_down_zero_up",
    "kaiming_uniform",
    "InitMode",
    "LoRAConv2d",
    "LoRAConv2dSplit",
    "LoRALayer",
    "LoRALinear",
    "apply_lora",
    "dense_state_dict",
    "load_lora_state",
    "lora_layers",
    "lora_state",
    "max_rank",
    "merge_all",
    "split_max_rank",
]
