"""Residual networks for 32x32 images: CIFAR ResNet-18 and WideResNet-16-4.

Both take an option ``norm``: ``"batch"`` (BatchNorm, the papers' choice) or
``"group"`` (GroupNorm with 2 groups, common in federated learning because it
keeps no running statistics that drift apart across non-IID clients). Both
norms have the same affine parameters, so parameter counts do not change.

Convolutions are plain ``nn.Conv2d`` without bias (a norm follows or precedes
each one) and the classifier is a plain ``nn.Linear`` named ``fc``; blocks are
named ``layer{g}.{i}`` so e.g. ``"layer1.0.conv1"`` selects one convolution.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ._common import check_dropout, check_image_shape

__all__ = ["BasicBlock", "ResNet18", "WideBasicBlock", "WideResNet16_4"]

Norm = Literal["batch", "group"]
NORMS: tuple[str, ...] = ("batch", "group")
GROUPNORM_GROUPS = 2


def _check_norm(model: str, norm: object) -> None:
    if norm not in NORMS:
        raise ValueError(f"model {model!r}: option norm must be one of {NORMS}, got {norm!r}")


def make_norm(norm: Norm, channels: int) -> nn.Module:
    """A 2-D normalisation layer over ``channels`` feature maps."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(GROUPNORM_GROUPS, channels)


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_channels: int, out_channels: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Post-activation ResNet block: conv-norm-ReLU, conv-norm, add shortcut, ReLU.

    The shortcut is the identity, or a strided 1x1 conv + norm (``shortcut.conv``,
    ``shortcut.norm``) when the block changes resolution or width.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: Norm) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.norm1 = make_norm(norm, out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.norm2 = make_norm(norm, out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential()
            self.shortcut.add_module("conv", _conv1x1(in_channels, out_channels, stride))
            self.shortcut.add_module("norm", make_norm(norm, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C_in, H, W) -> (B, C_out, H/stride, W/stride)
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 adapted to 32x32 inputs (He et al. 2016, CIFAR variant).

    The ImageNet 7x7 stride-2 stem and max-pool are replaced by one 3x3 stride-1
    conv, so a 32x32 image reaches the last stage at 4x4. Stages of 2 basic
    blocks with widths 64/128/256/512, global average pool, linear ``fc``:
    11,173,962 parameters for 10 classes. Takes any ``(C, H, W)``.
    """

    def __init__(
        self, input_shape: tuple[int, ...], num_classes: int, *, norm: Norm = "batch"
    ) -> None:
        in_channels, _, _ = check_image_shape("resnet18", input_shape)
        _check_norm("resnet18", norm)
        super().__init__()
        self.conv1 = _conv3x3(in_channels, 64)  # (B, C, H, W) -> (B, 64, H, W)
        self.norm1 = make_norm(norm, 64)
        self.layer1 = self._stage(64, 64, stride=1, norm=norm)  # -> (B, 64, H, W)
        self.layer2 = self._stage(64, 128, stride=2, norm=norm)  # -> (B, 128, H/2, W/2)
        self.layer3 = self._stage(128, 256, stride=2, norm=norm)  # -> (B, 256, H/4, W/4)
        self.layer4 = self._stage(256, 512, stride=2, norm=norm)  # -> (B, 512, H/8, W/8)
        self.pool = nn.AdaptiveAvgPool2d(1)  # -> (B, 512, 1, 1)
        self.fc = nn.Linear(512, num_classes)

    @staticmethod
    def _stage(in_channels: int, out_channels: int, stride: int, norm: Norm) -> nn.Sequential:
        # Only the first block of a stage changes resolution and width.
        return nn.Sequential(
            BasicBlock(in_channels, out_channels, stride, norm),
            BasicBlock(out_channels, out_channels, 1, norm),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))  # (B, 512) -> (B, num_classes)


class WideBasicBlock(nn.Module):
    """Pre-activation wide block: norm-ReLU-conv3x3, norm-ReLU-dropout-conv3x3, add shortcut.

    The shortcut is the identity, or a strided 1x1 conv (``shortcut``) applied
    to the *pre-activated* input when resolution or width change, as in the
    reference implementation of Zagoruyko & Komodakis.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, dropout: float, norm: Norm
    ) -> None:
        super().__init__()
        self.norm1 = make_norm(norm, in_channels)
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.norm2 = make_norm(norm, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.shortcut: nn.Conv2d | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = _conv1x1(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C_in, H, W) -> (B, C_out, H/stride, W/stride)
        pre = F.relu(self.norm1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(F.relu(self.norm2(out))))
        skip = x if self.shortcut is None else self.shortcut(pre)
        return out + skip


class WideResNet16_4(nn.Module):
    """WideResNet-16-4 (Zagoruyko & Komodakis 2016).

    Depth 16 gives (16 - 4) / 6 = 2 blocks per group; widen factor 4 gives
    group widths 64/128/256 after a 16-channel stem. A final norm-ReLU, global
    average pool and linear ``fc`` follow. 2,748,890 parameters for 10 classes,
    2,772,020 for 100. ``dropout`` (default 0) is applied inside every block.
    Takes any ``(C, H, W)``.
    """

    DEPTH = 16
    WIDEN = 4

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        dropout: float = 0.0,
        norm: Norm = "batch",
    ) -> None:
        in_channels, _, _ = check_image_shape("wrn16_4", input_shape)
        dropout = check_dropout("wrn16_4", dropout)
        _check_norm("wrn16_4", norm)
        super().__init__()
        blocks = (self.DEPTH - 4) // 6  # = 2 blocks per group
        w1, w2, w3 = 16 * self.WIDEN, 32 * self.WIDEN, 64 * self.WIDEN  # 64, 128, 256
        self.conv1 = _conv3x3(in_channels, 16)  # (B, C, H, W) -> (B, 16, H, W)
        self.layer1 = self._group(16, w1, 1, blocks, dropout, norm)  # -> (B, 64, H, W)
        self.layer2 = self._group(w1, w2, 2, blocks, dropout, norm)  # -> (B, 128, H/2, W/2)
        self.layer3 = self._group(w2, w3, 2, blocks, dropout, norm)  # -> (B, 256, H/4, W/4)
        # The blocks are pre-activation, so the last block's output is still unnormalised.
        self.norm = make_norm(norm, w3)
        self.pool = nn.AdaptiveAvgPool2d(1)  # -> (B, 256, 1, 1)
        self.fc = nn.Linear(w3, num_classes)

    @staticmethod
    def _group(
        in_channels: int, out_channels: int, stride: int, blocks: int, dropout: float, norm: Norm
    ) -> nn.Sequential:
        # Only the first block of a group changes resolution and width.
        first = WideBasicBlock(in_channels, out_channels, stride, dropout, norm)
        rest = (
            WideBasicBlock(out_channels, out_channels, 1, dropout, norm) for _ in range(blocks - 1)
        )
        return nn.Sequential(first, *rest)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = F.relu(self.norm(x))
        return self.fc(torch.flatten(self.pool(x), 1))  # (B, 256) -> (B, num_classes)
