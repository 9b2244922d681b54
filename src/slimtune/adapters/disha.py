"""DiSHA (dimension-sharding adaptation, arXiv 2409.15371): Bone, mini, Bat-Col and Bat-Row in one family.

All trainable blocks start at zero, so the adapted model equals the base at init. Formulas and shapes are in
:mod:`slimtune.functional.disha`.

- ``bone``: M (r, d_out), ΔW[o, i] = M[i mod r, o]; forward sums the r-wide shards of x (the last one
  zero-padded when r does not divide d_in), then multiplies by M. Needs r ≤ d_in.
- ``mini``: m (r, mini_r), ΔW[o, i] = m[i mod r, o mod mini_r]; r·mini_r parameters. Needs d_out % mini_r == 0.
- ``bat_col`` (PEFT MiSS "bat"): B (d_out/r, r, r), ΔW_ij = W_ij·B_i + B_i. The forward forms W + ΔW inside a
  custom autograd function that keeps only x, B and the stored weight for backward, so peak memory stays near
  Bone's; on a quantised base it dequantises W there, in the forward and again in the backward.
- ``bat_row`` (the author's RWKV layout): B (d_in/r, r, r), ΔW_ij = W_ij·B_j + B_j, computed without ΔW as
  y = W(x + z) + b + tile(Σ_j z_j), z = blockdiag(B)·x.
Both Bat variants are one class, :class:`BatAdapter`, with the axis of W whose blocks own a B (0: Col, 1: Row);
they need r to divide d_in and d_out, and take no dropout (the update multiplies the base weight).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from slimtune.adapters.base import (
    Adapter,
    AdditiveAdapter,
    input_dropout,
    layer_bias,
    linear_weight,
    parameter_factory,
)
from slimtune.adapters.quantized import dequantizer
from slimtune.config import AdapterConfig, check_choice, check_int
from slimtune.errors import ConfigError, ShapeError
from slimtune.functional import disha as F_disha
from slimtune.functional.structured import common_divisors

DISHA_VARIANTS = ("bone", "mini", "bat_col", "bat_row")
BAT_AXES = {"bat_col": 0, "bat_row": 1}  # the dim of W (d_out, d_in) along whose r-blocks each B_k is shared


@dataclasses.dataclass
class DishaConfig(AdapterConfig):
    """DiSHA: Bone, mini and Bat.

    Args:
        r: shard size (default 64, the author's setting).
        variant: one of ``"bone"``, ``"mini"``, ``"bat_col"``, ``"bat_row"``.
        mini_r: the output period of ``mini`` (its block is r × mini_r); ignored by the other variants.
        dropout: dropout on the adapter's input (Bone and mini only).
    """

    method: ClassVar[str] = "disha"

    r: int = 64
    variant: str = "bone"
    mini_r: int = 1  # must divide d_out of every adapted layer (mini)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("variant", self.variant, DISHA_VARIANTS)
        check_int("mini_r", self.mini_r)
        if self.variant in BAT_AXES and self.dropout > 0:
            raise ConfigError(
                f"dropout={self.dropout!r} is not allowed with variant={self.variant!r}: Bat's update multiplies "
                "the base weight, so it has no input to drop; use dropout=0.0"
            )

    @property
    def adapter_class(self) -> type[Adapter]:
        """The class of this config's adapters (its capabilities are class attributes)."""
        return DISHA_ADAPTERS[self.variant]


def check_r_fits(config: DishaConfig, d_in: int, module_name: str) -> None:
    """ShapeError unless 1 ≤ r ≤ d_in (Bone and mini shard the input into r-wide pieces)."""
    if config.r > d_in:
        raise ShapeError(
            f"r={config.r} is larger than d_in={d_in} of {module_name!r}: allowed for {config.variant}: "
            f"1 <= r <= {d_in}"
        )


def check_r_divides(config: DishaConfig, d_in: int, d_out: int, module_name: str) -> None:
    """ShapeError unless r divides d_in and d_out (Bat cuts W into r×r blocks)."""
    for field, dim in (("d_in", d_in), ("d_out", d_out)):
        if dim % config.r:
            raise ShapeError(
                f"r={config.r} does not divide {field}={dim} of {module_name!r} ({d_in} -> {d_out}): "
                f"{config.variant} needs r dividing both; allowed r here: {common_divisors(d_in, d_out)[-8:]}"
            )


class BoneAdapter(AdditiveAdapter):
    """Bone on one layer. Parameter ``block`` (r, d_out), zeros."""

    def __init__(self, config: DishaConfig, base_layer: nn.Module, module_name: str) -> None:
        super().__init__(config, base_layer, module_name)
        check_r_fits(config, self.d_in, module_name)
        self.dropout = input_dropout(config.dropout)
        self.block = nn.Parameter(torch.zeros(config.r, self.d_out, **parameter_factory(base_layer)))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return F_disha.bone_delta(self.dropout(x), self.block)

    def forward(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        """The fused :func:`~slimtune.functional.disha.bone_linear` on a plain ``nn.Linear`` (no hooks) of the
        adapter's dtype, without dropout or autocast; else base(x) + delta(x), the reference it is tested against."""
        if self._fusable(x, base_layer):
            return F_disha.bone_linear(x, linear_weight(base_layer), layer_bias(base_layer), self.block)
        return super().forward(x, base_layer)

    def _fusable(self, x: torch.Tensor, base_layer: nn.Module) -> bool:
        plain = type(base_layer) is nn.Linear and not (base_layer._forward_hooks or base_layer._forward_pre_hooks)
        if not plain or not isinstance(self.dropout, nn.Identity) or torch.is_autocast_enabled(x.device.type):
            return False
        return base_layer.weight.dtype == x.dtype == self.block.dtype

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return F_disha.bone_delta_weight(self.block.to(weight.dtype), self.d_in)


class MiniAdapter(AdditiveAdapter):
    """mini on one layer. Parameter ``block`` (r, mini_r), zeros."""

    def __init__(self, config: DishaConfig, base_layer: nn.Module, module_name: str) -> None:
        super().__init__(config, base_layer, module_name)
        check_r_fits(config, self.d_in, module_name)
        d_out = self.d_out
        if d_out % config.mini_r:
            raise ShapeError(
                f"mini_r={config.mini_r} does not divide d_out={d_out} of {module_name!r}: mini needs "
                f"d_out % mini_r == 0; allowed mini_r here: {[k for k in range(1, d_out + 1) if d_out % k == 0][:12]}"
            )
        self.dropout = input_dropout(config.dropout)
        self.block = nn.Parameter(torch.zeros(config.r, config.mini_r, **parameter_factory(base_layer)))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return F_disha.mini_delta(self.dropout(x), self.block, self.d_out)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        full = F_disha.mini_full_block(self.block.to(weight.dtype), self.d_out)
        return F_disha.bone_delta_weight(full, self.d_in)


class BatAdapter(Adapter):
    """Bat on one layer: ΔW_ij = W_ij·B_k + B_k with k the r-block index along ``axis`` of W.

    ``axis`` 0 (``bat_col``): k = i, the output block; ``axis`` 1 (``bat_row``): k = j, the input block.
    Parameter ``block`` (W.shape[axis]/r, r, r), zeros. The forward never keeps a merged weight: Bat-Col forms it
    inside :class:`~slimtune.functional.disha.BatColLinear`, Bat-Row needs none (y = W(x + z) + b + tile(Σ_j z_j)).
    """

    merge_tolerance: ClassVar[float] = 1e-5

    def __init__(self, config: DishaConfig, base_layer: nn.Module, module_name: str) -> None:
        super().__init__(config, base_layer, module_name)
        check_r_divides(config, self.d_in, self.d_out, module_name)
        self.axis = BAT_AXES[config.variant]
        n_blocks = (self.d_out, self.d_in)[self.axis] // config.r
        self.block = nn.Parameter(torch.zeros(n_blocks, config.r, config.r, **parameter_factory(base_layer)))

    def forward(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        if self.axis == 1:
            z = F_disha.bat_row_shift(x.to(self.block.dtype), self.block).to(x.dtype)  # (..., J, r)
            y = base_layer(x + z.flatten(-2))
            return F_disha.bat_row_output(y, z.to(y.dtype))
        dtype = self.block.dtype
        bias = layer_bias(base_layer)
        bias = None if bias is None else bias.to(dtype)
        densify = dequantizer(base_layer, dtype)
        y = F_disha.bat_col_linear(x.to(dtype), linear_weight(base_layer), bias, self.block, densify)
        return y.to(x.dtype)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return F_disha.bat_delta_weight(weight, self.block.to(weight.dtype), self.axis)

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return F_disha.bat_unmerged_weight(weight, self.block, self.axis)


DISHA_ADAPTERS: dict[str, type[Adapter]] = {
    "bone": BoneAdapter,
    "mini": MiniAdapter,
    "bat_col": BatAdapter,
    "bat_row": BatAdapter,
}
