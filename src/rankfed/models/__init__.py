"""Reference models for the rankfed experiments.

==============  ====================  ===========================================
name            input_shape           layers a glob can select
==============  ====================  ===========================================
``logreg``      any                   ``fc``
``mlp``         any                   ``fc1`` .. ``fc{k+1}``
``cnn2``        ``(1, H, W)``, H,W%4  ``conv1``, ``conv2``, ``fc``
``cnn3``        ``(3, H, W)``, H,W%8  ``conv1`` .. ``conv3``, ``fc1``, ``fc2``
``resnet18``    ``(C, H, W)``         ``conv1``, ``layer{1-4}.{0,1}.conv{1,2}``,
                                      ``layer{2-4}.0.shortcut.conv``, ``fc``
``wrn16_4``     ``(C, H, W)``         ``conv1``, ``layer{1-3}.{0,1}.conv{1,2}``,
                                      ``layer{1-3}.0.shortcut``, ``fc``
``char_lstm``   ``(L,)`` ids          ``embed``, ``lstm``, ``fc``
``transformer`` ``(L,)`` ids          ``blocks.{i}.attn.{q,k,v,out}_proj``,
                                      ``blocks.{i}.ff{1,2}``, ``fc``
==============  ====================  ===========================================

Every convolution is a plain ``nn.Conv2d`` and every linear layer a plain
``nn.Linear``. All models return logits of shape ``(B, num_classes)``.

:func:`batch_stats_only` makes a model's BatchNorm layers keep no running statistics (batch
statistics in training and at evaluation; the experiment file's ``task.batchnorm = "batch"``).
"""

from .factory import MODELS, ModelOptionError, build_model, count_parameters
from .norm import BATCHNORMS, batch_stats_only

__all__ = ["MODELS", "ModelOptionError", "build_model", "count_parameters", "batch_stats_only", "BATCHNORMS"]
