"""Export an adapter in PEFT's format where PEFT has the same math (LoRA, and LoRA-SP as a plain LoRA).

The folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` as ``peft.PeftModel.from_pretrained``
reads them, so an adapter trained with slimtune serves wherever PEFT LoRA adapters serve. PEFT itself is not
needed to export.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import cast

import safetensors.torch
import torch
from torch import nn

from slimtune.adapters.base import Adapter, conv1d_class
from slimtune.adapters.lora import LoraConfig
from slimtune.errors import AdapterNameError, ConfigError
from slimtune.fileio import atomic_write, atomic_write_json
from slimtune.inject import adapted_layers, adapter_configs

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"


def export_peft(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Write adapter ``adapter_name`` of ``model`` as a PEFT LoRA adapter into ``directory``; returns the folder.

    Raises:
        ConfigError: the adapter's method has no PEFT LoRA equivalent (e.g. Bone: use PEFT MiSS instead).
    """
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise AdapterNameError(f"adapter_name={adapter_name!r} is not on the model; it has {list(configs)}")
    config = configs[adapter_name]
    if not isinstance(config, LoraConfig):
        raise ConfigError(
            f"method={config.method!r} has no PEFT LoRA equivalent: export --format peft is allowed for "
            "'lora' and 'lora_sp'"
        )
    tensors: dict[str, torch.Tensor] = {}
    modules: list[str] = []
    fan_in_fan_out = False
    conv1d = conv1d_class()
    for name, layer in adapted_layers(model):
        if adapter_name not in layer.adapters:
            continue
        saved = cast(Adapter, layer.adapters[adapter_name]).saved_tensors()
        tensors[f"base_model.model.{name}.lora_A.weight"] = saved["lora_A"].cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = saved["lora_B"].cpu().contiguous()
        modules.append(name)
        fan_in_fan_out = fan_in_fan_out or (conv1d is not None and isinstance(layer.base_layer, conv1d))
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": name_or_path or None,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "target_modules": modules,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "inference_mode": True,
    }
    directory = Path(directory)
    atomic_write(directory / PEFT_WEIGHTS_NAME, lambda tmp: safetensors.torch.save_file(tensors, tmp))
    atomic_write_json(directory / PEFT_CONFIG_NAME, peft_config)
    return directory
