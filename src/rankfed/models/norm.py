"""BatchNorm without running statistics: batch statistics in training and at evaluation.

:func:`batch_stats_only` turns every BatchNorm layer of a model into one that keeps no
running statistics (``track_running_stats = False``, its ``running_mean`` /
``running_var`` / ``num_batches_tracked`` buffers removed). Such a layer normalises every
batch with that batch's own mean and variance, in ``train()`` and in ``eval()`` alike, so:

* the model's state is its parameters only: no BatchNorm buffer is averaged, sent or saved,
  and a federation averages only the affine ``weight`` / ``bias`` of its norms;
* an evaluation's result depends on how the test data is batched
  (``federation.eval_batch_size``): each batch is normalised by itself.

This is the FedLoRU and FedHM authors' models (``freeze_bn = True`` there, i.e.
``nn.BatchNorm2d(..., track_running_stats=False)``); in an experiment file it is
``task.batchnorm = "batch"``, which every algorithm then gets (FedAvg's model included, so
the baselines of a comparison train the same network).
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["batch_stats_only", "BATCHNORMS"]

BATCHNORMS = ("running", "batch")  # task.batchnorm: running statistics (torch's default), or batch statistics only


def batch_stats_only(model: nn.Module) -> list[str]:
    """Make every BatchNorm layer of ``model`` (in place) use batch statistics only, in training
    and at evaluation: ``track_running_stats = False`` and its running buffers removed. The
    affine parameters are kept as they are. Returns the names of the layers changed (empty for
    a model without BatchNorm, which is left as it was)."""
    changed = []
    for name, m in model.named_modules():
        if not isinstance(m, _BatchNorm):
            continue
        m.track_running_stats = False
        # None buffers: BatchNorm's forward then normalises with the batch's statistics even in
        # eval(), and state_dict() holds no entry for them
        m.register_buffer("running_mean", None)
        m.register_buffer("running_var", None)
        m.register_buffer("num_batches_tracked", None)
        changed.append(name)
    return changed
