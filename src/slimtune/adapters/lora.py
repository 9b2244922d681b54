"""LoRA, the baseline: ΔW = s·B·A with A (r, d_in) Kaiming-uniform, B (d_out, r) zeros, s = α/r (or α/√r)."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.adapters.base import Adapter, AdditiveAdapter, input_dropout, parameter_factory
from slimtune.config import AdapterConfig, check_bool, check_choice, check_number

LORA_INITS = ("kaiming", "gaussian")


@dataclasses.dataclass
class LoraConfig(AdapterConfig):
    """LoRA (Hu et al. 2021).

    Args:
        r: rank, r ≥ 1. As in PEFT, a layer with min(d_in, d_out) < r still gets A (r, d_in) and B (d_out, r), so
            weights and files stay interchangeable with PEFT; its update's rank is capped at min(d_in, d_out),
            and the injection warns once, naming those layers.
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

    def check_adapters(self, adapters: Mapping[str, Adapter]) -> None:
        """One UserWarning for the injection of ``adapters`` (module name → adapter) if r exceeds some layer's dims."""
        warn_capped_rank(self.r, {name: (a.d_in, a.d_out) for name, a in adapters.items()})


def warn_capped_rank(r: int, shapes: Mapping[str, tuple[int, int]]) -> None:
    """One UserWarning naming every layer (name → (d_in, d_out)) with min(d_in, d_out) < r; none if there is none."""
    capped = {name: min(dims) for name, dims in shapes.items() if min(dims) < r}
    if not capped:
        return
    listed = ", ".join(f"{name!r} (min(d_in, d_out)={cap})" for name, cap in list(capped.items())[:8])
    more = f" and {len(capped) - 8} more" if len(capped) > 8 else ""
    warnings.warn(
        f"r={r} is larger than min(d_in, d_out) of {len(capped)} layer(s): {listed}{more}. As in PEFT their "
        "A (r, d_in) and B (d_out, r) keep the full r, but the update's rank is capped at min(d_in, d_out); a "
        "smaller r gives the same updates with fewer parameters",
        UserWarning,
        stacklevel=2,
    )


class LoraAdapter(AdditiveAdapter):
    """LoRA on one layer. Parameters: ``lora_A`` (r, d_in), ``lora_B`` (d_out, r), also when r > min(d_in, d_out)."""

    def __init__(self, config: LoraConfig, base_layer: nn.Module, module_name: str) -> None:
        super().__init__(config, base_layer, module_name)
        d_in, d_out = self.d_in, self.d_out
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
