"""LoRA, the baseline: ΔW = s·B·A with A (r, d_in) Kaiming-uniform, B (d_out, r) zeros, s = α/r (or α/√r)."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.adapters.base import Adapter, AdditiveAdapter, input_dropout, parameter_factory
from slimtune.config import AdapterConfig, check_bool, check_choice, check_number
from slimtune.errors import ShapeError

LORA_INITS = ("kaiming", "gaussian")


@dataclasses.dataclass
class LoraConfig(AdapterConfig):
    """LoRA (Hu et al. 2021).

    Args:
        r: rank, 1 ≤ r ≤ min(d_in, d_out) of every adapted layer.
        alpha: scale numerator; the update is scaled by alpha / r (alpha / √r with ``use_rslora``).
        dropout: dropout on the adapter's input.
        use_rslora: rank-stabilised scaling alpha / √r (Kalajdzievski 2023).
        init: ``"kaiming"`` (A Kaiming-uniform with a=√5, as PEFT) or ``"gaussian"`` (A ~ N(0, 1/r)); B is zero.
    """

    method: ClassVar[str] = "lora"

    alpha: float = 16.0
    use_rslora: bool = False
    init: str = "kaiming"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("alpha", self.alpha, above=0)
        check_bool("use_rslora", self.use_rslora)
        check_choice("init", self.init, LORA_INITS)

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    @property
    def adapter_class(self) -> type[Adapter]:
        """The class of this config's adapters (its capabilities are class attributes)."""
        return LoraAdapter


class LoraAdapter(AdditiveAdapter):
    """LoRA on one layer. Parameters: ``lora_A`` (r, d_in), ``lora_B`` (d_out, r)."""

    def __init__(self, config: LoraConfig, base_layer: nn.Module, module_name: str) -> None:
        super().__init__(config, base_layer, module_name)
        d_in, d_out = self.d_in, self.d_out
        if config.r > min(d_in, d_out):
            raise ShapeError(
                f"r={config.r} is larger than a dimension of {module_name!r} (d_in={d_in}, d_out={d_out}): "
                f"allowed 1 <= r <= {min(d_in, d_out)}"
            )
        factory = parameter_factory(base_layer)
        self.scaling = config.scaling
        self.dropout = input_dropout(config.dropout)
        self.lora_A = nn.Parameter(torch.empty(config.r, d_in, **factory))
        self.lora_B = nn.Parameter(torch.zeros(d_out, config.r, **factory))
        if config.init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A, std=1.0 / config.r)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return (self.lora_B.to(weight.dtype) @ self.lora_A.to(weight.dtype)) * self.scaling
