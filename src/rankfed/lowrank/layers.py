"""Low-rank update wrappers for ``nn.Linear`` and ``nn.Conv2d`` (FedLoRU, FedLoRA, FA-LoRA).

A wrapper holds the original layer as ``base_layer`` (frozen) and a trainable
factor pair ``down`` / ``up``; it computes

    y = base_layer(x) + scaling * up(dropout(down(x))),        scaling = alpha / rank,

which is eq. (10) of the FedLoRU paper, ``W + alpha * A B`` with ``A`` = ``up``
(out x r) and ``B`` = ``down`` (r x in); the paper's ``alpha`` is this module's
``scaling = alpha / rank``, as in LoRA and the FedLoRU code. ``scale="alpha/sqrt(r)"``
makes it ``alpha / sqrt(rank)`` instead (rsLoRA, Kalajdzievski 2023: the update's size
then does not shrink as the rank grows, so one learning rate serves every rank).
``dropout`` (default 0: none) is an ``nn.Dropout`` between ``down`` and ``up``, active in
train mode only, as the FedLoRU code's ``LoWRank2DConv`` has it (PEFT's ``lora_dropout``
drops the input of ``lora_A`` instead).

Initialisation follows the FedLoRU code and LoRA (``down`` random, ``up``
zero). The paper's text words it the other way round ("A Gaussian, B zero");
either way the fresh update is zero. :meth:`LoRALayer.zero_base` is the FedLoRU code's
other start (``keep_original_weights=False``): the base weight zero and ``up`` drawn
Kaiming-uniform too, so the layer starts as the rank-r map ``scaling * up @ down``.

Shapes (``r`` = rank)::

    Linear(in, out):        down  Linear(in, r)              weight (r, in)
                            up    Linear(r, out)             weight (out, r)
                            delta = scaling * up.weight @ down.weight         (out, in)
    Conv2d(in, out, k x k): down  Conv2d(in, r, k x k, the base's stride,
                                    padding, dilation, padding_mode)
                                                             weight (r, in, kh, kw)
                            up    Conv2d(r, out, 1 x 1)      weight (out, r, 1, 1)
                            delta = scaling * sum_r up[o, r] down[r, i, :, :] (out, in, kh, kw)

    Conv2d, split (:class:`LoRAConv2dSplit`, the FedHM code's factorisation):
                            down  Conv2d(in, r, 1 x kw, stride (1, sw), padding (0, pw))
                                                             weight (r, in, 1, kw)
                            up    Conv2d(r, out, kh x 1, stride (sh, 1), padding (ph, 0))
                                                             weight (out, r, kh, 1)
                            delta = scaling * sum_r up[o, r, h, 0] down[r, i, 0, w] (out, in, kh, kw)

The conv pair is what the FedLoRU authors' code uses: a 1x1 conv after a conv
with the original geometry is the same linear map as one conv whose kernel is
``delta``, because the padding, stride and dilation act on ``x`` before any
channel mixing. :meth:`LoRALayer.delta_weight` is that single dense kernel; the
forward uses the cheaper factored path, and the tests check the two agree. The split
pair is the same kind of identity one axis at a time: the 1 x kw conv mixes input channels
and columns (the horizontal stride and padding), the kh x 1 conv mixes rank channels and
rows (the vertical ones), so the two compose to one conv whose kernel, flattened to the
matrix ``(out * kh, in * kw)`` (``kernel.permute(0, 2, 1, 3)``), is ``up @ down`` of rank r.

Merging (accumulation, eq. (11)) follows PEFT's LoRA layers: it is one method,
reversible, and recorded.

* :meth:`LoRALayer.merge` adds ``delta_weight()`` into ``base_layer.weight`` in
  place, keeps the exact tensor it added, sets ``merged`` and increments
  ``accumulated``. While ``merged`` is set, the forward skips the factor path
  (its contribution already lives in the base weight), so merging never
  changes what the layer computes.
* :meth:`LoRALayer.unmerge` subtracts that kept tensor again. Float addition is
  not exactly invertible: each restored entry is within
  ``eps * (|w + d| + |w|)`` of the original ``w`` (``eps`` = ``finfo.eps``, one
  rounding in the add and one in the subtract; about 1e-7 relative in float32).
* :meth:`LoRALayer.reset_factors` ends the low-rank phase: the merged delta
  becomes a permanent part of the base weight (it can no longer be unmerged),
  ``merged`` is cleared so the factor path is live again, and the factors are
  re-initialised:

  - ``"random"``: ``down`` Kaiming-uniform (``a = sqrt(5)``, the nn.Linear /
    nn.Conv2d default, bound ``1 / sqrt(fan_in)``), ``up`` zero. The new pair
    adds nothing, so merge + random reset leaves the function unchanged.
  - ``"momentum"``: the factors keep their values (FedLoRU's "momentum
    initialisation": the next phase starts from the previous A, B). The base weight
    already absorbed ``delta``, and the live factor path adds the same ``delta``
    again, so right after ``merge_and_reinit("momentum")`` the layer computes with
    ``W + 2 * delta``. That is what the FedLoRU authors' code does (its
    ``LoWRank2DConv.merge()`` adds ``delta`` into the weight and leaves the factor
    path on), and no momentum merge can do otherwise: with the factors kept, a merge
    that kept the function would have to leave the base unchanged, i.e. not merge.
    ReLoRA, which the paper cites for it, keeps no factors: it merges and re-draws
    them (as ``"random"`` here) and keeps part of the optimiser state instead.
    Use :meth:`merge` alone (without a reset) for a merge that keeps the function.

Which parameters train: the base weight never does; the base bias does unless
``train_bias=False``; ``down`` is frozen at its random draw with
``freeze_down=True`` (FA-LoRA: only ``up`` trains and travels). Layers that
are not wrapped are left exactly as they were.

Model-level helpers: :func:`apply_lora` (wrap by fnmatch pattern on qualified
module names), :func:`lora_layers`, :func:`merge_all`, :func:`lora_state` /
:func:`load_lora_state` (the factors only, under the model's own state-dict
keys) and :func:`dense_state_dict` (the state dict of the equivalent plain
model).
"""

from __future__ import annotations

import fnmatch
import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Literal

import torch
from torch import nn

__all__ = [
    "kaiming_down_zero_up",
    "kaiming_uniform",
    "InitMode",
    "SCALES",
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

InitMode = Literal["random", "momentum"]
_INIT_MODES: tuple[str, ...] = ("random", "momentum")
SCALES: tuple[str, ...] = ("alpha/r", "alpha/sqrt(r)")  # the update scale: LoRA's, or rsLoRA's


def _scaling(alpha: float, rank: int, scale: str) -> float:
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    return alpha / rank if scale == "alpha/r" else alpha / math.sqrt(rank)


def max_rank(layer: nn.Linear | nn.Conv2d) -> int:
    """Largest rank a factor pair for ``layer`` may have: the rank of its weight.

    ``min(in, out)`` for a Linear; ``min(in * kh * kw, out)`` for a Conv2d,
    whose kernel is the matrix ``(out, in * kh * kw)`` (``groups`` = 1).
    """
    if isinstance(layer, nn.Conv2d):
        kh, kw = layer.kernel_size
        return min(layer.in_channels * kh * kw, layer.out_channels)
    if isinstance(layer, nn.Linear):
        return min(layer.in_features, layer.out_features)
    raise TypeError(f"expected nn.Linear or nn.Conv2d, got {type(layer).__name__}")


def split_max_rank(layer: nn.Conv2d) -> int:
    """Largest rank of :class:`LoRAConv2dSplit`'s pair for ``layer``: the rank of its kernel
    flattened as the FedHM code does, ``(out * kh, in * kw)``."""
    kh, kw = layer.kernel_size
    return min(layer.out_channels * kh, layer.in_channels * kw)


def _describe(layer: nn.Module) -> str:
    if isinstance(layer, nn.Conv2d):
        kh, kw = layer.kernel_size
        return f"Conv2d {layer.in_channels}->{layer.out_channels} {kh}x{kw}"
    if isinstance(layer, nn.Linear):
        return f"Linear {layer.in_features}->{layer.out_features}"
    return type(layer).__name__


def _check_wrappable(layer: nn.Module, rank: object, name: str) -> None:
    """Raise ValueError/TypeError naming ``name`` if ``layer`` cannot take ``rank``."""
    if not isinstance(layer, (nn.Linear, nn.Conv2d)):
        raise TypeError(
            f"layer {name!r}: expected nn.Linear or nn.Conv2d, got {type(layer).__name__}"
        )
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        raise ValueError(
            f"layer {name!r} ({_describe(layer)}) is a grouped convolution "
            f"(groups={layer.groups}); low-rank wrappers need groups=1"
        )
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise ValueError(f"rank must be an int, got {rank!r} for layer {name!r}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1 for layer {name!r} ({_describe(layer)}), got {rank}")
    # A rank above max_rank(layer) is allowed, as in PEFT and the FedLoRU code: the pair then
    # spans at most max_rank(layer) and has more entries than the weight (the paper's ResNet-18
    # at rank 128 has 64-channel layers).


def _check_alpha(alpha: object) -> float:
    is_number = isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
    if not is_number or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite positive number, got {alpha!r}")
    return float(alpha)


@torch.no_grad()
def kaiming_uniform(weight: torch.Tensor, generator: torch.Generator | None) -> None:
    """``weight`` Kaiming-uniform in place (``a = sqrt(5)``, the nn.Linear / nn.Conv2d default):
    the same draws as ``nn.init.kaiming_uniform_`` from the same RNG, made on the generator's
    device and copied (a CPU generator gives the same values for a CUDA weight)."""
    # kaiming_uniform_(a=sqrt(5)): gain sqrt(2 / (1 + 5)), bound gain * sqrt(3 / fan_in)
    # = 1 / sqrt(fan_in).
    fan_in = weight[0].numel()
    bound = 1.0 / math.sqrt(fan_in)
    if generator is not None and generator.device != weight.device:
        draw = torch.empty(weight.shape, dtype=weight.dtype, device=generator.device)
        weight.copy_(draw.uniform_(-bound, bound, generator=generator))
    else:
        weight.uniform_(-bound, bound, generator=generator)


@torch.no_grad()
def kaiming_down_zero_up(down: torch.Tensor, up: torch.Tensor, generator: torch.Generator | None) -> None:
    """``down`` Kaiming-uniform (``a = sqrt(5)``), ``up`` zero: the pair adds nothing."""
    kaiming_uniform(down, generator)
    up.zero_()


class LoRALayer(nn.Module):
    """Base of the wrappers: ``base_layer(x) + scaling * up(down(x))``.

    Subclasses build ``down`` / ``up`` and define :meth:`delta_weight`; merge,
    unmerge, re-initialisation and the parameter freezing live here.

    Attributes:
        base_layer: the wrapped layer; its weight is frozen.
        down, up: the factor pair (``B`` and ``A`` of the paper).
        rank, alpha, scale, scaling: ``scaling = alpha / rank`` (``scale = "alpha/r"``) or
            ``alpha / sqrt(rank)`` (``"alpha/sqrt(r)"``).
        factor_dropout: the ``nn.Dropout`` between ``down`` and ``up`` (None without).
        merged: the current factors' delta is inside ``base_layer.weight``
            (the forward then skips the factor path).
        accumulated: how many deltas have been added into ``base_layer.weight``
            (merges minus unmerges): the number of terms of eq. (11).
    """

    base_layer: nn.Linear | nn.Conv2d
    down: nn.Linear | nn.Conv2d
    up: nn.Linear | nn.Conv2d
    _merged_delta: torch.Tensor | None

    wraps: type[nn.Module]  # the layer type a subclass wraps

    def __init__(
        self,
        base_layer: nn.Linear | nn.Conv2d,
        rank: int,
        alpha: float,
        *,
        freeze_down: bool = False,
        train_bias: bool = True,
        generator: torch.Generator | None = None,
        scale: str = "alpha/r",
        dropout: float = 0.0,
    ) -> None:
        if not isinstance(base_layer, self.wraps):
            raise TypeError(f"{type(self).__name__} wraps nn.{self.wraps.__name__}, got {type(base_layer).__name__}")
        _check_wrappable(base_layer, rank, "(unnamed)")
        super().__init__()
        self.base_layer = base_layer
        self.rank = int(rank)
        self.alpha = _check_alpha(alpha)
        self.scale = scale
        self.scaling = _scaling(self.alpha, self.rank, scale)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.factor_dropout = nn.Dropout(float(dropout)) if dropout > 0 else None
        self.freeze_down = freeze_down
        self.train_bias = train_bias
        self.merged = False
        self.base_free = False  # see make_base_free
        self.accumulated = 0
        self.p_down: nn.Module | None = None  # the personal pair, see add_personal
        self.p_up: nn.Module | None = None
        self.p_rank, self.p_alpha, self.p_scaling = 0, 0.0, 0.0
        # The exact tensor the last merge added, kept only while `merged` so that
        # unmerge subtracts precisely it. Non-persistent: moves with .to(), not saved.
        self.register_buffer("_merged_delta", None, persistent=False)
        self.down, self.up = self._new_pair(self.rank)
        # Freeze what must not train and draw the initial factors.
        self.base_layer.weight.requires_grad_(False)
        if self.base_layer.bias is not None:  # a bias the user froze stays frozen
            self.base_layer.bias.requires_grad_(self.train_bias and self.base_layer.bias.requires_grad)
        self.down.weight.requires_grad_(not self.freeze_down)
        self.reset_factors("random", generator=generator)

    # -- the function ------------------------------------------------------

    def delta_weight(self) -> torch.Tensor:
        """The dense weight the factor pair adds, shaped like ``base_layer.weight``."""
        raise NotImplementedError

    def _bias_shape(self, bias: torch.Tensor) -> torch.Tensor:
        """The base bias shaped to broadcast over this layer's output."""
        return bias

    def make_base_free(self) -> None:
        """FedHM's factorised layer: the base weight is zero and never computed with; the layer
        is ``scaling * up(down(x)) + bias`` (the dense convolution with zeros is skipped)."""
        if self.merged or self.p_up is not None:
            raise RuntimeError("a base-free layer has no merged delta and no personal pair")
        with torch.no_grad():
            self.base_layer.weight.zero_()
        self.base_free = True

    @torch.no_grad()
    def zero_base(self, generator: torch.Generator | None = None) -> None:
        """The FedLoRU code's start without the original weights (``base_init = "zero"``):
        ``base_layer.weight`` zero and ``up`` drawn Kaiming-uniform (``a = sqrt(5)``) from
        ``generator`` (``down`` already is, from construction), so the layer starts as the
        rank-r map ``scaling * up @ down`` (plus the base bias, which is kept: the FedLoRU
        code zeroes a bias too, but its convolutions have none) and every later weight is
        the sum of the merged low-rank updates and the live pair.

        Raises:
            RuntimeError: the layer has merged a delta, is base-free or has a personal pair.
        """
        if self.merged or self.accumulated or self.base_free or self.p_up is not None:
            raise RuntimeError("zero_base: only a fresh wrapper (no merges, not base-free, no personal pair)")
        self.base_layer.weight.zero_()
        kaiming_uniform(self.up.weight, generator)

    def _factor_path(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(x)
        if self.factor_dropout is not None:
            h = self.factor_dropout(h)
        return self.scaling * self.up(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.base_free:  # FedHM: the layer is its factors (and bias); no dense product with a zero weight
            out = self._factor_path(x)
            bias = self.base_layer.bias
            return out if bias is None else out + self._bias_shape(bias)
        out = self.base_layer(x)
        if not self.merged:  # (merged: the delta is already inside base_layer.weight)
            out = out + self._factor_path(x)
        if self.p_up is not None:
            out = out + self.p_scaling * self.p_up(self.p_down(x))
        return out

    # -- a second, personal pair (pFedLoRU) ---------------------------------

    def _new_pair(self, rank: int) -> tuple[nn.Module, nn.Module]:
        """A fresh (down, up) pair of ``rank`` shaped like this wrapper's own."""
        raise NotImplementedError

    @torch.no_grad()
    def add_personal(self, rank: int, alpha: float, *, generator: torch.Generator | None = None) -> None:
        """Add a second factor pair ``p_down`` / ``p_up`` (pFedLoRU's personal L, U):
        forward adds ``(alpha / rank) * p_up(p_down(x))`` (``alpha / sqrt(rank)`` under this
        layer's ``scale = "alpha/sqrt(r)"``; no dropout). It starts at zero (``p_down``
        Kaiming-uniform, ``p_up`` zero), trains, and never takes part in merges or in
        :func:`dense_state_dict` (which gives the shared model only).

        Raises:
            RuntimeError: the layer already has a personal pair.
            ValueError: a bad rank or alpha.
        """
        if self.p_up is not None:
            raise RuntimeError("add_personal: the layer already has a personal pair")
        _check_wrappable(self.base_layer, rank, "(personal)")
        self.p_alpha = _check_alpha(alpha)
        self.p_rank = int(rank)
        self.p_scaling = _scaling(self.p_alpha, self.p_rank, self.scale)
        self.p_down, self.p_up = self._new_pair(self.p_rank)
        kaiming_down_zero_up(self.p_down.weight, self.p_up.weight, generator)

    # -- merge / unmerge / re-initialise -----------------------------------

    @torch.no_grad()
    def merge(self) -> None:
        """Add ``delta_weight()`` into ``base_layer.weight`` in place; the function is unchanged.

        Raises:
            RuntimeError: the layer is already merged.
        """
        if self.merged:
            raise RuntimeError("merge: layer is already merged; unmerge() or reset_factors() first")
        delta = self.delta_weight().to(self.base_layer.weight.dtype)
        self.base_layer.weight.add_(delta)
        self._merged_delta = delta
        self.merged = True
        self.accumulated += 1

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the delta the last :meth:`merge` added; the factor path is live again.

        Only possible while ``merged`` (before :meth:`reset_factors` made the merge
        permanent). Restores the base weight to within ``eps * (|w + d| + |w|)``.

        Raises:
            RuntimeError: the layer is not merged.
        """
        if not self.merged or self._merged_delta is None:
            raise RuntimeError(
                "unmerge: layer is not merged (or reset_factors made its merge permanent)"
            )
        self.base_layer.weight.sub_(self._merged_delta)
        self._merged_delta = None
        self.merged = False
        self.accumulated -= 1

    @torch.no_grad()
    def reset_factors(
        self, mode: InitMode = "random", *, generator: torch.Generator | None = None
    ) -> None:
        """Start a new low-rank phase: make a pending merge permanent and re-initialise.

        Args:
            mode: ``"random"``: ``down`` Kaiming-uniform (``a = sqrt(5)``),
                ``up`` zero, so the pair adds nothing. ``"momentum"``: keep both
                factors (after a merge the layer then computes with
                ``W + 2 * delta``; see the module docstring).
            generator: source of the random draw (``"random"`` only); the
                global RNG if None. It may live on another device than the
                weights (a CPU generator for a CUDA model): the draw is made
                on the generator's device and copied, so the same seed gives
                the same factors everywhere.
        """
        if mode not in _INIT_MODES:
            raise ValueError(f"mode must be one of {_INIT_MODES}, got {mode!r}")
        # Whatever was merged stays in the base weight for good.
        self._merged_delta = None
        self.merged = False
        if mode == "random":
            kaiming_down_zero_up(self.down.weight, self.up.weight, generator)

    def merge_and_reinit(self, mode: InitMode, *, generator: torch.Generator | None = None) -> None:
        """One FedLoRU accumulation: :meth:`merge`, then :meth:`reset_factors` (``mode``)."""
        if mode not in _INIT_MODES:
            raise ValueError(f"mode must be one of {_INIT_MODES}, got {mode!r}")
        self.merge()
        self.reset_factors(mode, generator=generator)

    def extra_repr(self) -> str:
        return (
            f"rank={self.rank}, alpha={self.alpha}, scale={self.scale}, scaling={self.scaling:g}, "
            f"freeze_down={self.freeze_down}, merged={self.merged}, accumulated={self.accumulated}"
        )


class LoRALinear(LoRALayer):
    """``nn.Linear`` plus a rank-``r`` update: ``base(x) + (alpha / r) * up(down(x))``.

    ``down``: Linear(in, r), weight (r, in); ``up``: Linear(r, out), weight (out, r);
    both without bias. Fresh, ``up`` is zero, so the wrapper computes ``base_layer``.
    """

    wraps = nn.Linear

    def _new_pair(self, rank: int) -> tuple[nn.Linear, nn.Linear]:
        base = self.base_layer
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        # (B, *, in) -> (B, *, r) -> (B, *, out)
        return nn.Linear(base.in_features, rank, bias=False, **factory), nn.Linear(rank, base.out_features, bias=False, **factory)

    def delta_weight(self) -> torch.Tensor:
        # (out, r) @ (r, in) -> (out, in)
        return self.scaling * (self.up.weight @ self.down.weight)


class LoRAConv2d(LoRALayer):
    """``nn.Conv2d`` plus a rank-``r`` update, the FedLoRU authors' conv factorisation.

    ``down``: Conv2d(in, r) with the base's kernel size, stride, padding,
    dilation and padding mode, weight (r, in, kh, kw); ``up``: 1x1 Conv2d(r, out),
    weight (out, r, 1, 1); both without bias. Grouped convolutions are refused.
    """

    wraps = nn.Conv2d

    def _bias_shape(self, bias: torch.Tensor) -> torch.Tensor:
        return bias.view(-1, 1, 1)  # (out,) over (B, out, H, W)

    def _new_pair(self, rank: int) -> tuple[nn.Conv2d, nn.Conv2d]:
        base = self.base_layer
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        # (B, in, H, W) -> (B, r, H', W'): same geometry as the base, so the output grid matches.
        down = nn.Conv2d(
            base.in_channels,
            rank,
            kernel_size=base.kernel_size,
            stride=base.stride,
            padding=base.padding,
            dilation=base.dilation,
            groups=1,
            bias=False,
            padding_mode=base.padding_mode,
            **factory,
        )
        # (B, r, H', W') -> (B, out, H', W'): pure channel mixing.
        return down, nn.Conv2d(rank, base.out_channels, kernel_size=1, bias=False, **factory)

    def delta_weight(self) -> torch.Tensor:
        # up (out, r, 1, 1), down (r, in, kh, kw) -> (out, in, kh, kw)
        up = self.up.weight[:, :, 0, 0]  # (out, r)
        return self.scaling * torch.einsum("or,rikl->oikl", up, self.down.weight)


class LoRAConv2dSplit(LoRAConv2d):
    """``nn.Conv2d`` plus a rank-``r`` update factorised as the FedHM code factorises a kernel.

    The kernel ``(out, in, kh, kw)`` is the matrix ``(out * kh, in * kw)``
    (``kernel.permute(0, 2, 1, 3).reshape(out * kh, in * kw)``, the FedHM code's non-square
    layout), and the pair is that matrix's factors run as two convolutions:

    * ``down``: Conv2d(in, r, (1, kw)), stride ``(1, sw)``, padding ``(0, pw)``, dilation
      ``(1, dw)``; weight ``(r, in, 1, kw)`` = the ``(r, in * kw)`` factor;
    * ``up``: Conv2d(r, out, (kh, 1)), stride ``(sh, 1)``, padding ``(ph, 0)``, dilation
      ``(dh, 1)``; weight ``(out, r, kh, 1)`` = the ``(out * kh, r)`` factor.

    The first mixes input channels along each row, the second rank channels down each
    column; padding a row-wise map's rows is padding its input's rows, so the composition is
    exactly the conv with kernel ``delta_weight()`` (a ``padding`` string, "same" or "valid",
    is given to both). Both without bias; grouped convolutions are refused. Its rank may go up
    to :func:`split_max_rank`, ``min(out * kh, in * kw)``.
    """

    def _new_pair(self, rank: int) -> tuple[nn.Conv2d, nn.Conv2d]:
        base = self.base_layer
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        (kh, kw), (sh, sw), (dh, dw) = base.kernel_size, base.stride, base.dilation
        if isinstance(base.padding, str):
            pad_down = pad_up = base.padding
        else:
            ph, pw = base.padding
            pad_down, pad_up = (0, pw), (ph, 0)
        common = {"groups": 1, "bias": False, "padding_mode": base.padding_mode, **factory}
        # (B, in, H, W) -> (B, r, H, W'): each row mixed across channels and kw columns
        down = nn.Conv2d(base.in_channels, rank, (1, kw), stride=(1, sw), padding=pad_down, dilation=(1, dw), **common)
        # (B, r, H, W') -> (B, out, H', W'): each column mixed across rank channels and kh rows
        up = nn.Conv2d(rank, base.out_channels, (kh, 1), stride=(sh, 1), padding=pad_up, dilation=(dh, 1), **common)
        return down, up

    def delta_weight(self) -> torch.Tensor:
        # up (out, r, kh, 1), down (r, in, 1, kw) -> (out, in, kh, kw)
        return self.scaling * torch.einsum("orh,riw->oihw", self.up.weight[..., 0], self.down.weight[:, :, 0, :])


_WRAPPERS: dict[type[nn.Module], type[LoRALayer]] = {nn.Linear: LoRALinear, nn.Conv2d: LoRAConv2d}


def _wrapper_for(module: nn.Module) -> type[LoRALayer] | None:
    for base_cls, wrapper_cls in _WRAPPERS.items():
        if isinstance(module, base_cls):
            return wrapper_cls
    return None


def _as_patterns(patterns: str | Iterable[str], what: str) -> tuple[str, ...]:
    out = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    if not all(isinstance(p, str) for p in out):
        raise ValueError(f"{what} must be strings, got {out!r}")
    return out


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    patterns: str | Iterable[str] = ("*conv*",),
    exclude: str | Iterable[str] = (),
    *,
    freeze_down: bool = False,
    train_bias: bool = True,
    generator: torch.Generator | None = None,
    scale: str = "alpha/r",
    dropout: float = 0.0,
) -> list[str]:
    """Wrap, in place, every ``nn.Linear`` / ``nn.Conv2d`` whose name matches.

    A layer is wrapped when its qualified module name (``"conv1"``,
    ``"layer1.0.conv1"``, ``"blocks.0.attn.q_proj"``) matches at least one of
    ``patterns`` and none of ``exclude`` (``fnmatch.fnmatchcase``). Layers
    already inside a wrapper are never wrapped again; the root module itself is
    not a candidate. All matches are checked before any is replaced, so an error
    leaves the model untouched. Modules that are not wrapped keep their
    ``requires_grad`` as they were. A wrapped layer's state-dict keys become
    ``name.base_layer.weight`` / ``.bias``, ``name.down.weight``,
    ``name.up.weight`` (:func:`dense_state_dict` gives the plain keys back).

    Args:
        model: the model to modify.
        rank: rank of every factor pair, ``>= 1``. A rank above a layer's
            :func:`max_rank` (``min(in, out)`` for Linear, ``min(in * kh * kw,
            out)`` for Conv2d) is allowed: the pair then spans at most the
            full rank.
        alpha: scale; the update is multiplied by ``alpha / rank`` (``alpha / sqrt(rank)``
            with ``scale = "alpha/sqrt(r)"``).
        patterns, exclude: fnmatch patterns (a single string is one pattern).
        freeze_down: freeze ``down`` at its random init (FA-LoRA).
        train_bias: whether the wrapped layers' biases train.
        generator: RNG for the ``down`` draws, taken in module order (any
            device; see :meth:`LoRALayer.reset_factors`).
        scale: ``"alpha/r"`` (LoRA's) or ``"alpha/sqrt(r)"`` (rsLoRA's).
        dropout: dropout probability between ``down`` and ``up`` (train mode only).

    Returns:
        The wrapped names, in module order.

    Raises:
        ValueError: nothing matched (the message names the patterns and the
            candidates), a bad rank or a grouped conv (the message names the
            layer and the value), or a bad alpha.
    """
    patterns = _as_patterns(patterns, "patterns")
    exclude = _as_patterns(exclude, "exclude")
    _check_alpha(alpha)
    _scaling(1.0, 1, scale)  # a bad scale fails before anything is wrapped

    wrapped_prefixes = [name + "." for name, m in model.named_modules() if isinstance(m, LoRALayer)]
    candidates: list[str] = []
    targets: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not name or _wrapper_for(module) is None:
            continue
        if any(name.startswith(prefix) for prefix in wrapped_prefixes):
            continue  # a wrapper's own base_layer / down / up
        candidates.append(name)
        if any(fnmatch.fnmatchcase(name, p) for p in patterns) and not any(
            fnmatch.fnmatchcase(name, p) for p in exclude
        ):
            targets.append((name, module))
    if not targets:
        shown = ", ".join(candidates[:12]) + (", ..." if len(candidates) > 12 else "")
        raise ValueError(
            f"apply_lora: no nn.Linear/nn.Conv2d matches patterns {list(patterns)} "
            f"(exclude {list(exclude)}); unwrapped candidates: [{shown}]"
        )
    for name, module in targets:  # check all before changing anything
        _check_wrappable(module, rank, name)

    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        wrapper_cls = _wrapper_for(module)
        assert wrapper_cls is not None
        wrapper = wrapper_cls(
            module, rank, alpha, freeze_down=freeze_down, train_bias=train_bias, generator=generator, scale=scale, dropout=dropout
        )
        setattr(parent, child, wrapper)
    return [name for name, _ in targets]


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """The wrappers of ``model`` by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


def merge_all(
    model: nn.Module, reinit: InitMode | None, *, generator: torch.Generator | None = None
) -> list[str]:
    """Merge every wrapper of ``model``; then re-initialise with ``reinit`` unless None.

    ``reinit=None`` is a reversible merge (``unmerge`` undoes it, function
    unchanged); ``"random"`` / ``"momentum"`` is a FedLoRU accumulation (see
    :meth:`LoRALayer.reset_factors`). Returns the merged layers' names.
    """
    if reinit is not None and reinit not in _INIT_MODES:
        raise ValueError(f"reinit must be one of {_INIT_MODES} or None, got {reinit!r}")
    layers = lora_layers(model)
    for layer in layers.values():
        if reinit is None:
            layer.merge()
        else:
            layer.merge_and_reinit(reinit, generator=generator)
    return list(layers)


def _factor_keys(model: nn.Module) -> dict[str, tuple[LoRALayer, str]]:
    """``"<layer>.down.weight"`` / ``"<layer>.up.weight"`` -> (wrapper, attribute)."""
    keys: dict[str, tuple[LoRALayer, str]] = {}
    for name, layer in lora_layers(model).items():
        prefix = f"{name}." if name else ""
        keys[f"{prefix}down.weight"] = (layer, "down")
        keys[f"{prefix}up.weight"] = (layer, "up")
    return keys


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The factors of every wrapper, under the model's own state-dict keys.

    Keys ``"layer1.0.conv1.down.weight"``, ``"layer1.0.conv1.up.weight"``, ...;
    values are detached copies (safe to put in a payload and mutate).
    """
    return {
        key: getattr(layer, attr).weight.detach().clone()
        for key, (layer, attr) in _factor_keys(model).items()
    }


@torch.no_grad()
def load_lora_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy factors from ``state`` (as :func:`lora_state` writes it) into the wrappers.

    The key set must match exactly and shapes must agree.

    Raises:
        KeyError: missing or unexpected keys (listed).
        ValueError: a shape mismatch (key and shapes named).
        RuntimeError: a wrapper is merged (its factors are not in use; unmerge
            or reset first).
    """
    keys = _factor_keys(model)
    missing = sorted(set(keys) - set(state))
    unexpected = sorted(set(state) - set(keys))
    if missing or unexpected:
        raise KeyError(f"load_lora_state: missing keys {missing}, unexpected keys {unexpected}")
    for key, (layer, attr) in keys.items():
        if layer.merged:
            layer_name = key.rsplit(".", 2)[0]
            raise RuntimeError(
                f"load_lora_state: {layer_name!r} is merged; unmerge or reset it first"
            )
        target = getattr(layer, attr).weight
        value = state[key]
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"load_lora_state: {key!r} has shape {tuple(value.shape)}, "
                f"expected {tuple(target.shape)}"
            )
        target.copy_(value)


@torch.no_grad()
def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of the equivalent plain model (every wrapper folded back into one layer).

    For a wrapper at ``name``: ``name.weight`` = base weight + ``delta_weight()``
    (the base weight alone while merged, since it already holds the delta),
    ``name.bias`` = base bias; its factors are dropped. Every other entry
    (other layers, norm buffers) is copied as is. A model built like ``model``
    without wrappers loads it with ``strict=True`` and computes the same function.
    """
    # Longest prefix first, so "a.b." wins over "a." should names ever nest.
    owners = sorted(
        ((f"{name}." if name else "", layer) for name, layer in lora_layers(model).items()),
        key=lambda item: len(item[0]),
        reverse=True,
    )
    dense: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        value = value.detach().clone()
        owner = next(((p, layer) for p, layer in owners if key.startswith(p)), None)
        if owner is None:
            dense[key] = value  # not part of a wrapper: unchanged
            continue
        prefix, layer = owner
        rest = key[len(prefix):]
        if not rest.startswith("base_layer."):
            continue  # down.weight / up.weight: already folded into "weight"
        rest = rest[len("base_layer."):]
        if rest == "weight" and not layer.merged:
            value += layer.delta_weight().to(value.dtype)
        dense[prefix + rest] = value
    return dense
