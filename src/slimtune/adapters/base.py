"""The adapter contract and the one wrapper layer that hosts adapters of any kind.

An :class:`Adapter` is one method's trainable update on one base layer. An :class:`AdaptedLayer` wraps the base
layer (``nn.Linear`` or GPT-2's ``Conv1D``) and holds any number of named adapters, each keeping its own kind.

Semantics with several adapters: the layer computes ``F.linear(x, f_n(... f_1(W)), b)`` where ``W`` is the stored
base weight (merged adapters included) and ``f_k(W) = W + ΔW_k(W)`` for the active, unmerged adapters in
activation order. An :class:`AdditiveAdapter`'s ``ΔW_k`` does not depend on ``W``, so the order does not matter
and the forward is ``base(x) + Σ_k delta_k(x)``. Bat's update does depend on ``W`` (``weight_dependent = True``);
it may run its fused fast path only as the first adapter of the chain, otherwise the layer composes the dense
weight. An :class:`OutputAdapter` (SURM's adapter mode) maps the output of everything before it; one that is not
affine (``supports_merge = False``) must be the last active adapter.
"""

from __future__ import annotations

import abc
from typing import ClassVar, TypedDict, cast

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.adapters.quantized import dense_weight, keep_trainable_layout, quantization_of, quantized_features
from slimtune.config import AdapterConfig
from slimtune.errors import AdapterNameError, DeviceError, MergeError, ShapeError, TargetModulesError


def conv1d_class() -> type | None:
    """GPT-2's ``Conv1D`` (y = x @ W + b, weight (d_in, d_out)), or None if transformers lacks it."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def is_supported_base(module: nn.Module) -> bool:
    """True for the layer types slimtune can adapt: ``nn.Linear`` and GPT-2 ``Conv1D``."""
    conv1d = conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def base_features(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a supported base layer (bitsandbytes-quantised ``nn.Linear`` layers included)."""
    if not is_supported_base(module):
        raise TargetModulesError(
            f"module of type {type(module).__name__} cannot be adapted: allowed types are nn.Linear and "
            "transformers' Conv1D"
        )
    if quantization_of(module) is not None:
        return quantized_features(module)
    weight = linear_weight(module)
    if not weight.dtype.is_floating_point:
        raise TargetModulesError(
            f"module of type {type(module).__name__} has a {weight.dtype} weight of shape {tuple(weight.shape)}: "
            "allowed are floating-point weights and bitsandbytes Linear4bit / Linear8bitLt layers"
        )
    d_out, d_in = weight.shape
    return d_in, d_out


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The base weight in ``nn.Linear`` orientation, shape (d_out, d_in) (a view for ``Conv1D``)."""
    weight = cast(torch.Tensor, module.weight)
    return weight if isinstance(module, nn.Linear) else weight.t()


def layer_bias(module: nn.Module) -> torch.Tensor | None:
    """The base layer's bias (d_out,), or None when it has none."""
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


class Factory(TypedDict):
    """Keyword arguments that place a new tensor: ``torch.zeros(shape, **factory)``."""

    device: torch.device
    dtype: torch.dtype


def parameter_factory(base_layer: nn.Module) -> Factory:
    """Device and dtype for new adapter parameters: the base weight's device, and its dtype promoted to at least
    float32 (float32 adapters on a bfloat16 / float16 or quantised base, as PEFT's ``autocast_adapter_dtype``: the
    small adapter keeps full precision for its updates; ``model.to(dtype)`` afterwards casts it like any module)."""
    weight = linear_weight(base_layer)
    dtype = compute_dtype(weight.dtype) if weight.dtype.is_floating_point else torch.float32
    return {"device": weight.device, "dtype": dtype}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype merges and unmerges compute in: float64 stays float64, bf16/fp16/fp32 compute in float32."""
    return torch.promote_types(dtype, torch.float32)


def input_dropout(p: float) -> nn.Module:
    """Dropout on an adapter's input (an identity for p = 0)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class Adapter(nn.Module, abc.ABC):
    """One method's update on one base layer of shape (d_in → d_out).

    Every adapter class is built the same way, ``cls(config, base_layer, module_name)`` (``module_name`` names the
    layer in error messages), and gives :meth:`delta_weight` (the dense ΔW, the slow form, differentiable), the
    fast :meth:`forward` and the exact inverse :meth:`unmerged_weight`. Capabilities are class attributes, so a
    config's ``adapter_class`` tells them without building a model and shared tests need no per-method branches:

    - ``identity_at_init``: a new adapter leaves the layer's output unchanged.
    - ``supports_merge``: the adapted layer is affine in its input, so the adapter merges into W and b.
    - ``weight_dependent``: ΔW depends on the base weight W, so the adapter does not commute with others.
    - ``merge_tolerance``: bound on the relative error of W after a float32 merge and unmerge.
    """

    identity_at_init: ClassVar[bool] = True
    supports_merge: ClassVar[bool] = True
    weight_dependent: ClassVar[bool] = True
    merge_tolerance: ClassVar[float] = 1e-5

    def __init__(self, config: AdapterConfig, base_layer: nn.Module, module_name: str) -> None:
        super().__init__()
        self.d_in, self.d_out = base_features(base_layer)

    @property
    def param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def param_device(self) -> torch.device:
        return next(self.parameters()).device

    @abc.abstractmethod
    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """ΔW(W) of shape (d_out, d_in) for the base weight ``weight`` (d_out, d_in), computed in its dtype."""

    @abc.abstractmethod
    def forward(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        """The layer's output with this adapter alone on top of ``base_layer``: (..., d_in) → (..., d_out)."""

    @abc.abstractmethod
    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`merged_weight`: the base weight from a merged one, (d_out, d_in), in its dtype."""

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``W + ΔW(W)``: the weight with this adapter merged in, (d_out, d_in), in ``weight``'s dtype."""
        return weight + self.delta_weight(weight)

    def merged_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """The layer's bias (d_out,) with this adapter merged in (default: unchanged; None means no bias)."""
        return bias

    def unmerged_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """Inverse of :meth:`merged_bias`."""
        return bias

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """What :func:`slimtune.save_adapter` writes for this layer: name → tensor (default: the parameters)."""
        return {name: param.detach() for name, param in self.named_parameters()}

    @torch.no_grad()
    def load_saved_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`saved_tensors`; names and shapes are checked by the caller."""
        for name, param in self.named_parameters():
            param.copy_(tensors[name])


class AdditiveAdapter(Adapter):
    """An adapter whose ΔW does not depend on the base weight: ``y = base(x) + delta(x)``."""

    weight_dependent: ClassVar[bool] = False
    merge_tolerance: ClassVar[float] = 1e-6

    @abc.abstractmethod
    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The update's output ``x @ ΔWᵀ`` without forming ΔW: (..., d_in) → (..., d_out), adapter dtype."""

    def forward(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        y = base_layer(x)
        return y + self.delta(x.to(self.param_dtype)).to(y.dtype)

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight - self.delta_weight(weight)


class OutputAdapter(Adapter):
    """An adapter on the layer's output: ``out = transform_output(h)``, h the output of everything before it.

    When merged, its ΔW is a function of W (for an affine map out = (I + M) h + c: ΔW = M W), so it is
    weight-dependent.
    """

    @abc.abstractmethod
    def transform_output(self, h: torch.Tensor) -> torch.Tensor:
        """The adapted output from the layer's output: (..., d_out) → (..., d_out), in h's dtype."""

    def forward(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return self.transform_output(base_layer(x))


class AdaptedLayer(nn.Module):
    """A base layer plus named adapters. ``forward(x)`` maps (..., d_in) → (..., d_out).

    Attributes:
        base_layer: the wrapped ``nn.Linear`` / ``Conv1D`` (frozen by :func:`slimtune.get_adapted_model`).
        adapters: ``nn.ModuleDict`` name → :class:`Adapter`.
        active_adapters: names used in the forward, in composition order.
        merged_adapters: names merged into the base weight, in merge order (unmerged last-in first-out).
        adapters_disabled: when True the forward is the base layer alone (merged adapters must be unmerged).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.d_in, self.d_out = base_features(base_layer)
        keep_trainable_layout(base_layer)
        self.adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.adapters_disabled = False
        self.had_bias = layer_bias(base_layer) is not None

    def adapter(self, name: str) -> Adapter:
        """The adapter called ``name`` on this layer."""
        return cast(Adapter, self.adapters[name])

    def add_adapter(self, name: str, adapter: Adapter) -> None:
        if name in self.adapters:
            raise AdapterNameError(f"adapter_name={name!r} already exists on this layer")
        self.adapters[name] = adapter

    def remove_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise MergeError(f"adapter {name!r} is merged into this layer's weight: unmerge before deleting it")
        del self.adapters[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def set_active(self, names: list[str]) -> None:
        """Activate the adapters of ``names`` that this layer has, in that order."""
        self.active_adapters = self.checked_active(names)

    def checked_active(self, names: list[str]) -> list[str]:
        """The adapters of ``names`` this layer has, in order, or MergeError if that order is not allowed.

        An adapter that is not an affine map of the weight (``supports_merge`` False, e.g. a SURM adapter with a
        non-linear activation) can only come last: it transforms the output of everything before it.
        """
        active = [n for n in names if n in self.adapters]
        blocked = [n for n in active[:-1] if not self.adapter(n).supports_merge]
        if blocked:
            raise MergeError(
                f"adapter {blocked[0]!r} is not affine, so it must be the last active adapter of a layer; got the "
                f"order {active}"
            )
        return active

    def pending_adapters(self) -> list[Adapter]:
        """Active adapters not merged into the weight, in composition order."""
        return [self.adapter(n) for n in self._pending_names()]

    def base_weight(self) -> torch.Tensor:
        """The base weight in ``nn.Linear`` orientation, (d_out, d_in): the stored one, or for a quantised layer a
        dequantised copy."""
        if quantization_of(self.base_layer) is not None:
            return dense_weight(self.base_layer)
        return linear_weight(self.base_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1:] != (self.d_in,):
            raise ShapeError(
                f"input of shape {tuple(x.shape)} has last dimension {x.shape[-1] if x.dim() else None}, but this "
                f"adapted layer is {self.d_in} -> {self.d_out}: allowed are inputs (..., d_in={self.d_in})"
            )
        adapters = [] if self.adapters_disabled else self.pending_adapters()
        for adapter in adapters:
            if adapter.param_device != x.device:
                raise DeviceError(
                    f"an adapter of this layer ({self.d_in} -> {self.d_out}) is on device {adapter.param_device}, its "
                    f"input on {x.device}: allowed is one device for both; move the whole model with model.to(device)"
                )
        return self._run(x, adapters)

    def _run(self, x: torch.Tensor, adapters: list[Adapter]) -> torch.Tensor:
        """The chain ``adapters`` on top of the base layer: (..., d_in) → (..., d_out).

        An output adapter last transforms the output of the rest; otherwise the first adapter runs its own fast
        forward and additive ones after it add their ``delta``; any other adapter after the first needs the dense
        composition.
        """
        if not adapters:
            return self.base_layer(x)
        last = adapters[-1]
        if isinstance(last, OutputAdapter):
            return last.transform_output(self._run(x, adapters[:-1]))
        head, rest = adapters[0], adapters[1:]
        additive = [a for a in rest if isinstance(a, AdditiveAdapter)]
        if len(additive) < len(rest):
            return self._dense_forward(x, adapters)
        y = head(x, self.base_layer)
        for adapter in additive:
            y = y + adapter.delta(x.to(adapter.param_dtype)).to(y.dtype)
        return y

    def _dense_forward(self, x: torch.Tensor, adapters: list[Adapter]) -> torch.Tensor:
        """Reference composition of several adapters: forms the effective weight (d_out, d_in) and bias."""
        dtype = adapters[0].param_dtype
        weight = self.base_weight().to(dtype)
        bias = layer_bias(self.base_layer)
        bias = None if bias is None else bias.to(dtype)
        for adapter in adapters:
            weight, bias = adapter.merged_weight(weight), adapter.merged_bias(bias)
        return F.linear(x.to(dtype), weight, bias).to(x.dtype)

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None) -> None:
        """Merge adapters into the base weight (default: the active ones). Idempotent.

        Computed in :func:`compute_dtype` of the weight (float64 stays float64, lower precisions use float32).
        Merging an active adapter must not change the output, so an adapter that does not commute with an
        active, unmerged adapter ahead of it in the chain (a weight-dependent one, or itself weight-dependent)
        cannot be merged before that one: :class:`MergeError` says which to merge first. A quantised base weight
        is not merged into (:meth:`check_mergeable`).
        """
        names = self._pending_names() if adapter_names is None else list(adapter_names)
        if names:
            self.check_mergeable()
        for name in names:
            if name not in self.adapters:
                raise AdapterNameError(f"adapter_name={name!r} is not on this layer; it has {list(self.adapters)}")
            if name in self.merged_adapters:
                continue
            adapter = self.adapter(name)
            if not adapter.supports_merge:
                raise MergeError(f"adapter {name!r} ({type(adapter).__name__}) cannot be merged into the weight")
            pending = self._pending_names()
            if name in pending:
                ahead = [self.adapter(n) for n in pending[: pending.index(name)]]
                if ahead and (adapter.weight_dependent or any(a.weight_dependent for a in ahead)):
                    raise MergeError(
                        f"cannot merge {name!r} before {pending[0]!r}: a Bat update depends on the weight, so "
                        f"merge in the active order {pending}"
                    )
            weight, bias = self._compute_weight_and_bias()
            self._write(adapter.merged_weight(weight), adapter.merged_bias(bias))
            self.merged_adapters.append(name)

    def check_mergeable(self) -> None:
        """MergeError if the base weight is quantised: W + ΔW would be requantised, and the 4-bit / int8 step of W is
        larger than a fine-tune's ΔW, so most of the update would round away."""
        kind = quantization_of(self.base_layer)
        if kind is not None:
            raise MergeError(
                f"this layer's base weight is quantised ({kind}, bitsandbytes {type(self.base_layer).__name__}); "
                "merging would requantise W + ΔW and round most of the update away: merge into the full-precision "
                "model instead (load it without quantisation, load_adapter, then merge_and_unload)"
            )

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo every merge, last merged first (exact within float tolerance; no-op when nothing is merged)."""
        while self.merged_adapters:
            adapter = self.adapter(self.merged_adapters[-1])
            weight, bias = self._compute_weight_and_bias()
            self._write(adapter.unmerged_weight(weight), adapter.unmerged_bias(bias))
            self.merged_adapters.pop()
        if not self.had_bias and layer_bias(self.base_layer) is not None:
            self.base_layer.register_parameter("bias", None)  # a merge gave it a bias; with nothing merged, none

    def _pending_names(self) -> list[str]:
        return [n for n in self.active_adapters if n not in self.merged_adapters]

    def _compute_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The base weight (d_out, d_in) and bias (d_out,) or None, in the dtype merges compute in."""
        weight, bias = self.base_weight(), layer_bias(self.base_layer)
        dtype = compute_dtype(weight.dtype)
        return weight.to(dtype), None if bias is None else bias.to(dtype)

    def _write(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Store a (d_out, d_in) weight and a (d_out,) bias into the base layer, in its dtype."""
        target = cast(torch.Tensor, self.base_layer.weight)
        target.data.copy_(weight if isinstance(self.base_layer, nn.Linear) else weight.t())
        if bias is None:
            return
        current = layer_bias(self.base_layer)
        if current is None:
            self.base_layer.bias = nn.Parameter(bias.to(target.dtype), requires_grad=False)
        else:
            current.data.copy_(bias)

    def extra_repr(self) -> str:
        return f"active={self.active_adapters}, merged={self.merged_adapters}"
