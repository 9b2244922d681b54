"""Export an adapter as a PEFT adapter folder, for every method PEFT shares the math of.

LoRA and LoRA-SP become PEFT LoRA, DiSHA Bone / Bat-Col / mini become PEFT MiSS, SURM's block-circulant update
becomes PEFT C3A (mappings in :mod:`slimtune.peft_methods`). The folder holds ``adapter_config.json`` and
``adapter_model.safetensors`` as ``peft.PeftModel.from_pretrained`` reads them, with the ``task_type`` and the
``base_model_name_or_path`` of the model (:mod:`slimtune.peft_format`), so that
``peft.AutoPeftModelForCausalLM.from_pretrained(folder)`` loads a causal LM's adapter with its base model.
PEFT itself is not needed to export. :func:`slimtune.peft_import.import_peft` reads such folders back.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import safetensors.torch
from torch import nn

from slimtune.adapters.saved_modules import copy_tensors
from slimtune.errors import AdapterNameError
from slimtune.fileio import atomic_write, atomic_write_json
from slimtune.inject import adapted_layers, adapter_configs
from slimtune.peft_format import KEY_PREFIX, PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, head_tensors, model_fields
from slimtune.peft_methods import peft_method_of
from slimtune.serialization import adapter_copies

logger = logging.getLogger("slimtune")


def export_peft(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Write adapter ``adapter_name`` of ``model`` as a PEFT adapter into ``directory``; returns the folder.

    Tensors are named ``base_model.model.<module name>.<PEFT name>``; ``target_modules`` lists the adapted
    modules by full name. The adapter's ``modules_to_save`` copies are saved whole as
    ``base_model.model.<module name>.<tensor name>``, as PEFT saves its own, and listed in ``modules_to_save``;
    without them a ``*ForSequenceClassification`` model's head is saved whole from the model, as PEFT requires
    for its ``SEQ_CLS`` task type. Nothing is written when the adapter cannot be exported.

    Raises:
        AdapterNameError: ``adapter_name`` is not on the model.
        ConfigError: the method has no PEFT equivalent (DiSHA Bat-Row, SURM structures other than circulant, the
            SURM adapter mode, the bottleneck adapter), a layer PEFT's method cannot adapt (MiSS and C3A take only
            ``nn.Linear``), or an adapter inside a sequence classifier's head.
    """
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise AdapterNameError(f"adapter_name={adapter_name!r} is not on the model; it has {list(configs)}")
    config = configs[adapter_name]
    method = peft_method_of(config)
    layers = [(name, layer) for name, layer in adapted_layers(model) if adapter_name in layer.adapters]
    method.check_layers(layers)
    if method.peft_type == "C3A" and config.dropout > 0:
        logger.warning(
            "PEFT C3A has no dropout: dropout=%s of adapter %r is not exported", config.dropout, adapter_name
        )
    named, copies = adapter_copies(model, adapter_name)
    if len(copies) > len(named):
        logger.warning(
            "modules %s are tied to modules_to_save %s: PEFT gets the named modules only and keeps them tied "
            "only with ensure_weight_tying=True",
            sorted(set(copies) - set(named)),
            named,
        )
    kept_whole = copy_tensors({name: copies[name] for name in named})
    tensors = {f"{KEY_PREFIX}{key}": t.cpu().contiguous() for key, t in kept_whole.items()} or head_tensors(model)
    for name, layer in layers:
        for suffix, tensor in method.export_tensors(layer.adapter(adapter_name)).items():
            tensors[f"{KEY_PREFIX}{name}.{suffix}"] = tensor.detach().cpu().contiguous()
    peft_config = {
        "peft_type": method.peft_type,
        **model_fields(model),
        "target_modules": [name for name, _ in layers],
        "bias": "none",
        **method.export_fields(config, layers),
    }
    if named:
        peft_config["modules_to_save"] = named
    directory = Path(directory)
    atomic_write(
        directory / PEFT_WEIGHTS_NAME,
        lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata={"format": "pt"}),
    )
    atomic_write_json(directory / PEFT_CONFIG_NAME, peft_config)
    return directory
