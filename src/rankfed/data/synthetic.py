"""The Synthetic(alpha, beta) benchmark of FedProx (Li et al., MLSys 2020).

Each device ``k`` has its own softmax-regression model and its own input distribution:

    u_k ~ N(0, alpha),  W_k in R^{10x60} ~ N(u_k, 1),  b_k in R^10 ~ N(u_k, 1)
    B_k ~ N(0, beta),   v_k in R^60 ~ N(B_k, 1)
    x ~ N(v_k, Sigma),  Sigma = diag(j^-1.2), j = 1..60
    y = argmax softmax(W_k x + b_k)

``alpha`` controls how much the local models differ, ``beta`` how much the local
inputs differ. As in the reference implementation (``generate_niid.py``), the second
argument of ``N(., .)`` is used as a standard deviation, and device sizes follow a
power law: ``int(lognormal(4, 2)) + 50`` samples.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import Dataset, check_int_option, check_number_option

__all__ = ["load_synthetic"]

DIMENSION = 60
NUM_CLASSES = 10
TRAIN_FRACTION = 0.8
# lognormal(4, 2) has a heavy tail (a few devices would get 10^5+ samples); cap it so
# one device cannot dominate memory or the federation.
MAX_SAMPLES_PER_DEVICE = 5000


def load_synthetic(
    *, seed: int = 0, alpha: float = 1.0, beta: float = 1.0, num_devices: int = 30
) -> Dataset:
    """Generate Synthetic(alpha, beta) with ``num_devices`` devices (non-iid variant).

    Each device's samples are split 80/20 into train/test; ``groups`` holds the device
    id of every train sample, so the ``natural`` partition gives one client per device.
    All draws come from ``np.random.default_rng(seed)``.
    """
    alpha = check_number_option("synthetic", "alpha", alpha, 0)
    beta = check_number_option("synthetic", "beta", beta, 0)
    check_int_option("synthetic", "num_devices", num_devices, 1)

    rng = np.random.default_rng(seed)
    sizes = np.minimum(rng.lognormal(4.0, 2.0, size=num_devices), MAX_SAMPLES_PER_DEVICE - 50)
    sizes = sizes.astype(np.int64) + 50  # (K,), each in [50, MAX_SAMPLES_PER_DEVICE]
    u = rng.normal(0.0, alpha, size=num_devices)  # (K,) mean of each device's W_k and b_k
    b_mean = rng.normal(0.0, beta, size=num_devices)  # (K,) B_k
    v = rng.normal(b_mean[:, None], 1.0, size=(num_devices, DIMENSION))  # (K, 60) input means
    sigma_sqrt = np.arange(1, DIMENSION + 1, dtype=np.float64) ** -0.6  # sqrt(j^-1.2)

    train_x, train_y, test_x, test_y, groups = [], [], [], [], []
    for k in range(num_devices):
        w = rng.normal(u[k], 1.0, size=(NUM_CLASSES, DIMENSION))
        b = rng.normal(u[k], 1.0, size=NUM_CLASSES)
        x = v[k] + rng.standard_normal((sizes[k], DIMENSION)) * sigma_sqrt  # (n_k, 60)
        y = np.argmax(x @ w.T + b, axis=1)  # softmax is monotone: argmax of the logits
        n_train = int(TRAIN_FRACTION * sizes[k])  # samples are iid within a device
        train_x.append(x[:n_train])
        train_y.append(y[:n_train])
        test_x.append(x[n_train:])
        test_y.append(y[n_train:])
        groups.append(np.full(n_train, k, dtype=np.int64))

    def stack(parts: list[np.ndarray], dtype: type) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(parts).astype(dtype))

    return Dataset(
        name="synthetic",
        train_x=stack(train_x, np.float32),
        train_y=stack(train_y, np.int64),
        test_x=stack(test_x, np.float32),
        test_y=stack(test_y, np.int64),
        num_classes=NUM_CLASSES,
        input_shape=(DIMENSION,),
        groups=np.concatenate(groups),
        group_names=[f"device{k}" for k in range(num_devices)],
    )
