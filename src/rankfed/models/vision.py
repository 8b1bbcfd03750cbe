"""Small image and tabular models: logistic regression, MLP and two FedAvg-style CNNs.

Each model is an ``nn.Sequential`` with named children (``conv1``, ``fc``, ...),
so ``model.named_modules()`` yields stable names that a glob can select, e.g.
to wrap every ``conv*`` layer with a low-rank adapter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from ._common import check_image_shape

__all__ = ["CNN2", "CNN3", "MLP", "LogisticRegression"]


class LogisticRegression(nn.Sequential):
    """Multinomial logistic regression: flatten, then one linear layer ``fc``.

    Takes any input shape; ``fc`` has ``prod(input_shape)`` in-features.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.flatten = nn.Flatten()  # (B, *input_shape) -> (B, prod(input_shape))
        self.fc = nn.Linear(math.prod(input_shape), num_classes)  # -> (B, num_classes)


class MLP(nn.Sequential):
    """Fully connected ReLU network for flat or small inputs.

    Layers are ``fc1 .. fc{len(hidden)+1}``; ReLUs (``relu1``, ...) follow every
    layer but the last. The default ``hidden=(200, 200)`` on 28x28 inputs is the
    FedAvg "2NN" (199,210 parameters for 10 classes).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        hidden: Sequence[int] = (200, 200),
    ) -> None:
        if (
            isinstance(hidden, (str, bytes))
            or not isinstance(hidden, Sequence)
            or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in hidden)
        ):
            raise ValueError(
                f"model 'mlp': option hidden must be a sequence of positive ints, got {hidden!r}"
            )
        widths = [math.prod(input_shape), *hidden, num_classes]

        super().__init__()
        self.flatten = nn.Flatten()  # (B, *input_shape) -> (B, prod(input_shape))
        n_layers = len(widths) - 1
        for i in range(1, n_layers + 1):
            self.add_module(f"fc{i}", nn.Linear(widths[i - 1], widths[i]))
            if i < n_layers:
                self.add_module(f"relu{i}", nn.ReLU())


class CNN2(nn.Sequential):
    """Two-conv CNN for 28x28 grayscale digits (MNIST, FMNIST).

    conv 1->8 5x5 "same", ReLU, 2x2 avg-pool, conv 8->16 5x5 "same", ReLU,
    2x2 avg-pool, linear. On ``(1, 28, 28)`` with 10 classes it has 11,274
    parameters (208 + 3,216 + 7,850). Any ``(1, H, W)`` with ``H`` and ``W``
    multiples of 4 works, e.g. the 8x8 sklearn digits.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        _, h, w = check_image_shape("cnn2", input_shape, channels=1, multiple=4)
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, kernel_size=5, padding=2)  # (B, 1, H, W) -> (B, 8, H, W)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.AvgPool2d(2)  # -> (B, 8, H/2, W/2)
        self.conv2 = nn.Conv2d(8, 16, kernel_size=5, padding=2)  # -> (B, 16, H/2, W/2)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.AvgPool2d(2)  # -> (B, 16, H/4, W/4)
        self.flatten = nn.Flatten()  # -> (B, 16 * H/4 * W/4), 784 for 28x28
        self.fc = nn.Linear(16 * (h // 4) * (w // 4), num_classes)  # -> (B, num_classes)


class CNN3(nn.Sequential):
    """Three-conv CNN for 32x32 RGB images (CIFAR-10).

    Three blocks of 5x5 "same" conv, ReLU and 2x2 avg-pool (3->64->128->128
    channels), then ``fc1`` (-> 256), ReLU, ``fc2`` (-> classes). On
    ``(3, 32, 32)`` with 10 classes it has 1,146,634 parameters. Any
    ``(3, H, W)`` with ``H`` and ``W`` multiples of 8 works.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        _, h, w = check_image_shape("cnn3", input_shape, channels=3, multiple=8)
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=5, padding=2)  # (B, 3, H, W) -> (B, 64, H, W)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.AvgPool2d(2)  # -> (B, 64, H/2, W/2)
        self.conv2 = nn.Conv2d(64, 128, kernel_size=5, padding=2)  # -> (B, 128, H/2, W/2)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.AvgPool2d(2)  # -> (B, 128, H/4, W/4)
        self.conv3 = nn.Conv2d(128, 128, kernel_size=5, padding=2)  # -> (B, 128, H/4, W/4)
        self.relu3 = nn.ReLU()
        self.pool3 = nn.AvgPool2d(2)  # -> (B, 128, H/8, W/8)
        self.flatten = nn.Flatten()  # -> (B, 128 * H/8 * W/8), 2048 for 32x32
        self.fc1 = nn.Linear(128 * (h // 8) * (w // 8), 256)  # -> (B, 256)
        self.relu4 = nn.ReLU()
        self.fc2 = nn.Linear(256, num_classes)  # -> (B, num_classes)
