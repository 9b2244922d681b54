"""Turn any adapter into a LoRA adapter, so servers that take only LoRA (vLLM, llama.cpp) can serve it.

:func:`convert_to_lora` replaces an adapter's module on each of its layers by a :class:`LoraAdapter` of one rank k
for every layer (PEFT's one ``r``; alpha = k, so the scaling is 1) and the model's config of that adapter by the
:class:`LoraConfig`; :func:`slimtune.export.export_peft` then writes it as a PEFT LoRA adapter.

Each layer's factors come from the SVD of its dense update ΔW (d_out, d_in) in float64: with
ΔW = U·diag(s)·Vᵀ, B = U_k·diag(√s_k) (d_out, k) and A = diag(√s_k)·V_kᵀ (k, d_in), the best rank-k approximation
(Eckart–Young). A layer whose ΔW has rank ≤ k converts exactly, up to rounding; this holds at k = r for
LoRA and LoRA-SP (rank ≤ r), Bone (rank ≤ r: ΔW[o, i] = M[i mod r, o] repeats r columns) and mini
(rank ≤ min(r, mini_r)). Bat and the SURM structures have ΔW of full rank in general, so a k below
min(d_in, d_out) truncates them; the report gives each layer's relative error.

Bat's ΔW depends on the base weight (ΔW_ij = W_ij·B + B): it is computed from the layer's current stored weight.
The LoRA reproduces the adapter only on that weight, so convert after any change to the base weights (for a
quantised server model, on the weights it will run with). Where the adapter is not the first active adapter of
a layer's chain, it saw the weight with the adapters before it applied, so convert it as the only active one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch
from torch import nn

from slimtune.adapters.base import AdaptedLayer, OutputAdapter
from slimtune.adapters.lora import LoraAdapter, LoraConfig
from slimtune.config import check_int
from slimtune.errors import AdapterNameError, ConfigError, MergeError
from slimtune.inject import CONFIGS_ATTRIBUTE, active_adapters, adapted_layers, adapter_configs


@dataclasses.dataclass(frozen=True)
class LayerConversion:
    """One layer's conversion: the numerical rank of its ΔW and ‖ΔW − B·A‖_F / ‖ΔW‖_F (0 for ΔW = 0)."""

    module_name: str
    delta_rank: int
    relative_error: float
    delta_norm: float


@dataclasses.dataclass(frozen=True)
class LoraConversion:
    """What :func:`convert_to_lora` did: the adapter, its former method, the LoRA rank and each layer's error."""

    adapter_name: str
    method: str
    rank: int
    layers: list[LayerConversion]

    @property
    def relative_error(self) -> float:
        """All layers together: sqrt(Σ ‖ΔW − B·A‖²) / sqrt(Σ ‖ΔW‖²) (0 if every ΔW is 0)."""
        total = math.sqrt(sum(layer.delta_norm**2 for layer in self.layers))
        error = math.sqrt(sum((layer.relative_error * layer.delta_norm) ** 2 for layer in self.layers))
        return error / total if total > 0 else 0.0

    @property
    def max_relative_error(self) -> float:
        return max((layer.relative_error for layer in self.layers), default=0.0)

    @property
    def exact(self) -> bool:
        """True when every layer's ΔW has rank ≤ the LoRA rank: the conversion loses only rounding."""
        return all(layer.delta_rank <= self.rank for layer in self.layers)

    def __str__(self) -> str:
        return (
            f"{self.adapter_name!r} ({self.method}) -> LoRA r={self.rank} on {len(self.layers)} layers: relative "
            f"error of ΔW {self.relative_error:.3g} overall, {self.max_relative_error:.3g} at most"
            + (" (exact)" if self.exact else "")
        )


def delta_weight64(layer: AdaptedLayer, adapter_name: str) -> torch.Tensor:
    """The adapter's ΔW (d_out, d_in) in float64, from the layer's stored base weight."""
    return layer.adapter(adapter_name).delta_weight(layer.base_weight().detach().to(torch.float64)).detach()


class Svd(NamedTuple):
    """ΔW = u·diag(s)·vh in float64: u (d_out, m), s (m,) descending, vh (m, d_in), m = min(d_out, d_in)."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor

    @classmethod
    def of(cls, delta: torch.Tensor) -> Svd:
        return cls(*torch.linalg.svd(delta.to(torch.float64), full_matrices=False))

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The best rank-``rank`` factors: A (rank, d_in), B (d_out, rank), float64, B·A = ΔW truncated.

        Balanced split of the singular values (B = U_k·√s_k, A = √s_k·V_kᵀ). A rank above min(d_in, d_out) gives
        zero rows of A and zero columns of B beyond it (PEFT's shapes for a capped LoRA rank).
        """
        k = min(rank, self.s.numel())
        root = self.s[:k].sqrt()
        a = self.vh.new_zeros((rank, self.vh.shape[1]))
        b = self.u.new_zeros((self.u.shape[0], rank))
        a[:k] = root.unsqueeze(1) * self.vh[:k]
        b[:, :k] = self.u[:, :k] * root
        return a, b


def convert_to_lora(model: nn.Module, adapter_name: str = "default", rank: int | None = None) -> LoraConversion:
    """Replace adapter ``adapter_name`` of ``model`` by a LoRA adapter of rank ``rank`` on the same layers.

    ``rank`` None takes the largest numerical rank of the layers' ΔW (at least 1), so the conversion is exact;
    for Bat and the SURM structures that is usually min(d_in, d_out): pass a smaller rank to truncate. The new
    adapter keeps the name, activity and trainability of the old one, its dtype and device, its input dropout and
    its ``modules_to_save`` copies.
    Every layer is factored before any is replaced, so an error leaves the model unchanged. The SVDs run in
    float64 on the weights' device, one layer at a time.

    Raises:
        AdapterNameError: the model has no adapter ``adapter_name``.
        ConfigError: ``rank`` is not a positive integer, or the adapter is an output adapter: SURM's (its merge
            changes the bias, which a LoRA cannot) or the bottleneck adapter (non-linear, no weight update at all).
        MergeError: the adapter is merged into the base weight on some layer (unmerge first).
    """
    check_int("rank", rank, optional=True)
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise AdapterNameError(f"adapter_name={adapter_name!r} is not on the model; it has {list(configs)}")
    method = configs[adapter_name].method
    layers = {name: layer for name, layer in adapted_layers(model) if adapter_name in layer.adapters}
    _check_convertible(layers, adapter_name, method)
    if rank is None:
        rank = max([1, *(exact_rank(layer, adapter_name) for layer in layers.values())])
    old = configs[adapter_name]
    config = LoraConfig(
        r=rank,
        alpha=float(rank),
        dropout=old.dropout,
        target_modules=list(layers),
        modules_to_save=old.modules_to_save,
    )
    built, report = {}, []
    for name, layer in layers.items():  # one layer's float64 ΔW and SVD in memory at a time
        built[name], conversion = _convert_layer(config, name, layer, adapter_name)
        report.append(conversion)
    config.check_adapters(built)
    trainable = adapter_name in active_adapters(model)
    for name, layer in layers.items():
        layer.adapters[adapter_name] = built[name].requires_grad_(trainable)
    configs[adapter_name] = config
    setattr(model, CONFIGS_ATTRIBUTE, configs)
    return LoraConversion(adapter_name, method, rank, report)


def exact_rank(layer: AdaptedLayer, adapter_name: str) -> int:
    """The numerical rank of the adapter's ΔW on ``layer`` (the smallest LoRA rank that converts it exactly)."""
    return numerical_rank(torch.linalg.svdvals(delta_weight64(layer, adapter_name)), layer.d_in, layer.d_out)


def numerical_rank(s: torch.Tensor, d_in: int, d_out: int) -> int:
    """How many singular values ``s`` (descending) exceed s_max · max(d_in, d_out) · eps(float64), as numpy's."""
    if not s.numel():
        return 0
    return int((s > s[0] * max(d_in, d_out) * torch.finfo(torch.float64).eps).sum())


def _check_convertible(layers: dict[str, AdaptedLayer], adapter_name: str, method: str) -> None:
    for name, layer in layers.items():
        if adapter_name in layer.merged_adapters:
            raise MergeError(
                f"adapter {adapter_name!r} is merged into the weight of {name!r}: unmerge it "
                "(slimtune.unmerge_adapters) before converting it to LoRA"
            )
        adapter = layer.adapter(adapter_name)
        if isinstance(adapter, OutputAdapter):
            why, instead = (
                ("a SURM output adapter changes the layer's bias too", "merge it instead")
                if adapter.supports_merge
                else ("its output is a non-linear function of the layer's output, no weight update", "keep it as is")
            )
            raise ConfigError(
                f"method={method!r} of adapter {adapter_name!r} cannot be converted to LoRA: {why}; allowed are "
                f"lora, lora_sp, disha and surm ({instead})"
            )


def _convert_layer(
    config: LoraConfig, name: str, layer: AdaptedLayer, adapter_name: str
) -> tuple[LoraAdapter, LayerConversion]:
    """A LoRA adapter for ``layer`` with the rank-``config.r`` factors of the old adapter's ΔW, and its record."""
    old = layer.adapter(adapter_name)
    delta = delta_weight64(layer, adapter_name)
    svd = Svd.of(delta)
    adapter = LoraAdapter(config, layer.base_layer, name).to(device=old.param_device, dtype=old.param_dtype)
    adapter.train(old.training)
    a, b = svd.factors(config.r)
    with torch.no_grad():
        adapter.lora_A.copy_(a)
        adapter.lora_B.copy_(b)
    error, norm = _factor_error(adapter, delta)
    return adapter, LayerConversion(name, numerical_rank(svd.s, layer.d_in, layer.d_out), error, norm)


def _factor_error(adapter: LoraAdapter, delta: torch.Tensor) -> tuple[float, float]:
    """(‖ΔW − B·A‖_F / ‖ΔW‖_F, ‖ΔW‖_F) with B, A as stored (in the adapter's dtype), computed in float64."""
    product = adapter.lora_B.detach().to(torch.float64) @ adapter.lora_A.detach().to(torch.float64)
    norm = float(torch.linalg.matrix_norm(delta))
    error = float(torch.linalg.matrix_norm(delta - product * adapter.scaling))
    return (error / norm if norm > 0 else error), norm
