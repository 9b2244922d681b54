"""Base layers quantised by bitsandbytes (QLoRA-style training): recognising them and reading their weight densely.

A model loaded with ``transformers.BitsAndBytesConfig`` holds ``bitsandbytes.nn.Linear4bit`` (NF4 / FP4) or
``Linear8bitLt`` (int8) layers, subclasses of ``nn.Linear`` whose ``weight`` is packed (``Linear4bit``: uint8 of
shape (d_out·d_in/2, 1)). slimtune adapts them like any ``nn.Linear``: the adapter's parameters are float32 and
its forward adds to the quantised layer's output. A method that needs W itself (Bat-Col, the dense composition of
several adapters, the LoRA conversion) reads :func:`dense_weight` when it runs and keeps no dense copy.

The core does not import bitsandbytes: a model that holds its layers has imported it already.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn


def _bitsandbytes() -> Any | None:
    """The bitsandbytes module if something has imported it, else None."""
    return sys.modules.get("bitsandbytes")


def quantization_of(module: nn.Module) -> str | None:
    """``"nf4"``, ``"fp4"`` or ``"int8"`` for a bitsandbytes-quantised linear layer, None for any other module."""
    bnb = _bitsandbytes()
    if bnb is None:
        return None
    if isinstance(module, bnb.nn.Linear4bit):
        return str(module.weight.quant_type)
    if isinstance(module, bnb.nn.Linear8bitLt) and module.weight.dtype == torch.int8:
        return "int8"
    return None


def quantized_features(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a quantised linear layer, whose packed weight has another shape."""
    return int(module.in_features), int(module.out_features)  # type: ignore[arg-type]


def dense_weight(module: nn.Module) -> torch.Tensor:
    """A quantised layer's weight dequantised, (d_out, d_in) in its original floating dtype, a new tensor.

    Raises:
        TypeError: ``module`` is not a quantised layer (:func:`quantization_of` is None).
    """
    kind = quantization_of(module)
    if kind is None:
        raise TypeError(f"{type(module).__name__} is not a bitsandbytes-quantised linear layer")
    functional = _bitsandbytes().functional  # type: ignore[union-attr]
    layer: Any = module  # bitsandbytes' classes are untyped
    weight = layer.weight
    if kind == "int8":  # the row scales live on the weight until the first forward moves them to the layer's state
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
        return functional.int8_vectorwise_dequant(weight.data, scales)
    return functional.dequantize_4bit(weight.data, weight.quant_state)


def dequantizer(module: nn.Module, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """For a quantised layer, a function of its stored weight that returns W (d_out, d_in) dequantised to ``dtype``
    (for autograd functions that form W only while they run); None for any other layer."""
    if quantization_of(module) is None:
        return None

    def densify(stored: torch.Tensor) -> torch.Tensor:
        return dense_weight(module).to(dtype)

    return densify


def keep_trainable_layout(module: nn.Module) -> None:
    """Keep a 4-bit layer's weight in the layout that bitsandbytes trains through and dequantises.

    bitsandbytes (0.48 and later) repacks a ``Linear4bit`` weight, in place, at its first eval-mode forward without
    gradients on a CPU with AVX512-BF16, into a layout whose matmul has no backward and that ``dequantize_4bit``
    does not read. For a layer slimtune adapts (trained, and evaluated between steps) that repacking is turned off,
    and one that already happened is undone. No-op for other layers.
    """
    if quantization_of(module) not in ("nf4", "fp4"):
        return
    layer: Any = module  # bitsandbytes' classes are untyped
    layer.support_avx512bf16_for_cpu = False
    weight = layer.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        functional = _bitsandbytes().functional  # type: ignore[union-attr]
        weight.data, weight.quant_state = functional._convert_weight_packed_for_cpu_inverse(
            weight.data, weight.quant_state
        )


def stored_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers, with bitsandbytes' quantisation state (block scales, nested
    scales, codebooks) that lives beside packed weights."""
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    for module in model.modules():
        kind, layer = quantization_of(module), cast(Any, module)  # bitsandbytes' classes are untyped
        if kind in ("nf4", "fp4"):
            state = layer.weight.quant_state
            tensors = [state.absmax, state.code, *([state.state2.absmax, state.state2.code] if state.nested else [])]
            total += sum(t.numel() * t.element_size() for t in tensors)
        elif kind == "int8":
            scales = layer.weight.SCB if getattr(layer.weight, "SCB", None) is not None else layer.state.SCB
            total += scales.numel() * scales.element_size()
    return total
