"""``--quantize``: a base model quantised by bitsandbytes as it loads (QLoRA-style training on a 4-bit / int8 base).

The model loads through transformers' ``BitsAndBytesConfig``, as PEFT users load one: NF4 or FP4 with double
quantisation of the block scales, or LLM.int8. The embeddings, norms and the (tied) output head stay in
``--dtype``; the adapters on top stay float32 (slimtune.adapters.quantized).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch

from slimtune.adapters.quantized import keep_trainable_layout
from slimtune.config import check_choice
from slimtune.errors import ConfigError

QUANTIZE_CHOICES = ("nf4", "fp4", "int8")
QUANTIZE_HELP = (
    "quantise the base model's linear layers as it loads (bitsandbytes: nf4 / fp4 4-bit, or int8); adapters stay "
    "float32 and merge only into the full-precision model"
)


def quantized_loading(quantize: str | None, dtype: torch.dtype) -> dict[str, Any]:
    """Extra ``from_pretrained`` keyword arguments that quantise the base with ``quantize`` (none for None).

    4-bit layers compute in ``dtype``. The model is placed on this process's device (accelerate's), where it
    trains.

    Raises:
        ConfigError: ``quantize`` is not one of :data:`QUANTIZE_CHOICES`, or bitsandbytes is not installed.
    """
    if quantize is None:
        return {}
    check_choice("quantize", quantize, QUANTIZE_CHOICES)
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"quantize={quantize!r} needs bitsandbytes, which is not installed: pip install 'slimtune[quant]'"
        )
    from accelerate import PartialState
    from transformers import BitsAndBytesConfig

    quiet_bitsandbytes_notice()
    if quantize == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantize,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    return {"quantization_config": config, "device_map": {"": PartialState().device}}


def quiet_bitsandbytes_notice() -> None:
    """Silence bitsandbytes' import-time notice that its CPU-inference kernel could not be fetched from the hub
    (offline it never can, and adapted layers keep the trainable layout that does not use it). PEFT imports
    bitsandbytes whenever it is installed, so the command line calls this first."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def keep_trainable_layouts(model: torch.nn.Module) -> None:
    """Keep every 4-bit layer of a just-loaded model in bitsandbytes' trainable layout, so that evaluating the base
    before adapting it (as ``compare`` does) does not repack its weights for CPU inference."""
    for module in model.modules():
        keep_trainable_layout(module)
