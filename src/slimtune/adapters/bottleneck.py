"""Bottleneck adapter (Houlsby et al. 2019, arXiv 1902.00751): a small residual MLP on a layer's output.

The baseline that SURM's adapter mode (:class:`~slimtune.SurmAdapterConfig`) is compared with. On a layer with
output h = base(x) of shape (..., d_out) and bottleneck size r:

    out = h + s·(W_up·act(W_down·dropout(h) + b_down) + b_up)

with W_down (r, d_out) Kaiming-uniform (a = √5, as ``nn.Linear`` and LoRA's A), b_down, W_up (d_out, r) and b_up
zeros, so a new adapter leaves the model unchanged; s is ``scaling``. Trainable per layer: 2·r·d_out + r + d_out
(2·r·d_out without biases). The activation makes it non-affine, so it never merges into the layer's weight and must
be the last active adapter of a layer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import nn

from slimtune.adapters.base import Adapter, OutputAdapter, input_dropout, parameter_factory
from slimtune.adapters.surm import ACTIVATIONS
from slimtune.config import ALL_LINEAR, AdapterConfig, check_bool, check_choice, check_number
from slimtune.errors import ConfigError, MergeError

BOTTLENECK_ACTIVATIONS = tuple(name for name in ACTIVATIONS if name != "identity")


@dataclasses.dataclass
class BottleneckConfig(AdapterConfig):
    """Bottleneck adapter after a layer: ``out = h + s·(W_up·act(W_down·dropout(h) + b_down) + b_up)``.

    Args:
        r: the bottleneck size (W_down is (r, d_out), W_up (d_out, r)).
        activation: ``relu`` (default, as AdapterHub's one-adapter ``SeqBnConfig``), ``gelu`` (Houlsby et al.'s
            code) or ``silu`` (AdapterHub's ``DoubleSeqBnConfig``, "swish"); not ``identity``, which would make
            the adapter a low-rank affine map.
        bias: learn b_down (r,) and b_up (d_out,) (both start at zero).
        scaling: s, the factor on the up-projection's output (AdapterHub's ``scaling``).
        target_modules: the layers whose output is adapted (default: attention and MLP outputs of Llama-style
            models, ``o_proj`` and ``down_proj``).
    """

    method: ClassVar[str] = "bottleneck"

    target_modules: list[str] | str = dataclasses.field(default_factory=lambda: ["o_proj", "down_proj"])
    activation: str = "relu"
    bias: bool = True
    scaling: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("activation", self.activation, BOTTLENECK_ACTIVATIONS)
        check_bool("bias", self.bias)
        check_number("scaling", self.scaling)
        if self.target_modules == ALL_LINEAR:
            raise ConfigError(
                f"target_modules={ALL_LINEAR!r} is not allowed for bottleneck: name the layers whose output is "
                "adapted, e.g. ['o_proj', 'down_proj']"
            )

    @property
    def adapter_class(self) -> type[Adapter]:
        """The class of this config's adapters (its capabilities are class attributes)."""
        return BottleneckAdapter


class BottleneckAdapter(OutputAdapter):
    """Bottleneck adapter on a layer's output h = base(x): (..., d_out) → (..., d_out).

    Parameters (the names of saved files): ``down.weight`` (r, d_out), ``down.bias`` (r,), ``up.weight`` (d_out, r),
    ``up.bias`` (d_out,); no biases with ``bias=False``. They take the dtype of :func:`parameter_factory` (at least
    float32); the adapter computes in that dtype and returns h's.
    """

    supports_merge: ClassVar[bool] = False

    def __init__(self, config: BottleneckConfig, base_layer: nn.Module, module_name: str) -> None:
        super().__init__(config, base_layer, module_name)
        factory = parameter_factory(base_layer)
        self.scaling = config.scaling
        self.dropout = input_dropout(config.dropout)
        self.down = nn.Linear(self.d_out, config.r, bias=config.bias, **factory)
        self.activation = ACTIVATIONS[config.activation]()
        self.up = nn.Linear(config.r, self.d_out, bias=config.bias, **factory)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up.weight)
            for bias in (self.down.bias, self.up.bias):
                if bias is not None:
                    nn.init.zeros_(bias)

    def transform_output(self, h: torch.Tensor) -> torch.Tensor:
        """h + s·up(act(down(dropout(h)))): (..., d_out) → (..., d_out), in h's dtype."""
        hidden = self.activation(self.down(self.dropout(h.to(self.param_dtype))))  # (..., r)
        return h + (self.up(hidden) * self.scaling).to(h.dtype)

    def _refuse_merge(self) -> MergeError:
        return MergeError(
            f"a bottleneck adapter (activation={type(self.activation).__name__}) cannot be merged into the layer: "
            "its output is a non-linear function of the layer's output, not a weight update; keep it as an adapter"
        )

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        raise self._refuse_merge()

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        raise self._refuse_merge()
