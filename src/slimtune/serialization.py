"""Save and load one adapter: ``adapter_model.safetensors`` + ``adapter_config.json`` in a folder.

Tensors are stored under ``<module name>.<parameter name>`` (e.g. ``model.layers.0.self_attn.q_proj.lora_A``),
independent of the adapter's name, so an adapter can be loaded under any name. The JSON records the slimtune
version, the config, the base model's class and every adapted module's (d_in, d_out), so that loading into
another model fails with a message naming the module and both shapes. Only safetensors is read: no pickle.
The version, the JSON and safetensors readers and the check of tensor names and shapes are the shared ones of
:mod:`slimtune.file_format`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, cast

import safetensors.torch
import torch
from torch import nn

from slimtune import __version__
from slimtune.adapters.base import AdaptedLayer, Adapter, base_features, is_supported_base
from slimtune.errors import AdapterFileError, AdapterNameError, SlimtuneError
from slimtune.file_format import ADAPTER_FORMAT, check_tensors_fit, read_json, read_record, read_tensors
from slimtune.fileio import atomic_write, atomic_write_json
from slimtune.inject import adapted_layers, adapter_configs, inject_adapter
from slimtune.registry import config_from_dict

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
MERGED_ATTRIBUTE = "slimtune_merged_adapters"  # in a merged model's config: [{"sha256", "method", "adapter"}]


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Write the adapter ``adapter_name`` of ``model`` into ``directory`` (created if needed); returns the folder."""
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise AdapterNameError(f"adapter_name={adapter_name!r} is not on the model; it has {list(configs)}")
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict[str, int]] = {}
    for name, layer in adapted_layers(model):
        if adapter_name not in layer.adapters:
            continue
        modules[name] = {"d_in": layer.d_in, "d_out": layer.d_out}
        adapter = cast(Adapter, layer.adapters[adapter_name])
        for tensor_name, tensor in adapter.saved_tensors().items():
            tensors[f"{name}.{tensor_name}"] = tensor.cpu().contiguous()
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
    metadata = {
        "slimtune_version": __version__,
        "format_version": ADAPTER_FORMAT.version,
        "config": configs[adapter_name].to_dict(),
        "base_model": {"class": type(model).__name__, "name_or_path": name_or_path or None},
        "modules": modules,
    }
    directory = Path(directory)
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: safetensors.torch.save_file(tensors, tmp))
    atomic_write_json(directory / CONFIG_NAME, metadata)
    return directory


def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default") -> nn.Module:
    """Inject the adapter saved in ``directory`` into ``model`` as ``adapter_name`` (active and trainable).

    Every check runs before the model is touched: on any error the model is left as it was.

    Raises:
        AdapterFileError: missing or damaged files, a newer format, an adapter for modules this model lacks or
            whose shapes differ (the message names the module and both shapes).
            Also an adapter that is already merged into ``model`` (its weights' SHA-256 is listed in the model
            config's ``slimtune_merged_adapters``, which ``slimtune merge`` writes): applying it again would add
            its update twice.
        AdapterNameError: ``adapter_name`` already exists on the model.
    """
    directory = Path(directory)
    metadata = read_metadata(directory)
    check_not_merged(model, directory)
    modules: dict[str, dict[str, int]] = metadata["modules"]
    check_modules_fit(model, modules, metadata["base_model"].get("class"), directory)
    tensors = read_tensors(directory / WEIGHTS_NAME, ADAPTER_FORMAT)
    try:
        config = config_from_dict(metadata["config"])
    except SlimtuneError as err:
        raise AdapterFileError(f"{directory / CONFIG_NAME}: {err}") from None
    return inject_adapter(
        model, config, adapter_name, list(modules), prepare=lambda built: fill_parameters(built, tensors, directory)
    )


def adapter_fingerprint(directory: str | os.PathLike) -> str:
    """The SHA-256 (hex) of the adapter weights file in ``directory``: what identifies an adapter once merged."""
    digest = hashlib.sha256()
    with open(Path(directory) / WEIGHTS_NAME, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_not_merged(model: nn.Module, directory: Path) -> None:
    """AdapterFileError when the adapter in ``directory`` is listed as merged in ``model.config``."""
    merged = getattr(getattr(model, "config", None), MERGED_ATTRIBUTE, None)
    if not merged or not (directory / WEIGHTS_NAME).is_file():
        return
    fingerprint = adapter_fingerprint(directory)
    for record in merged if isinstance(merged, list) else []:
        if isinstance(record, dict) and record.get("sha256") == fingerprint:
            raise AdapterFileError(
                f"the adapter in {directory} is already merged into this model (merged from "
                f"{record.get('adapter')!r}, method {record.get('method')!r}): applying it again would add its "
                "update twice; load it onto the original base model instead"
            )


def read_metadata(directory: Path) -> dict[str, Any]:
    """The checked ``adapter_config.json`` of ``directory``: its fields, format_version, and the types of
    ``modules`` ({module name: {"d_in": int, "d_out": int}}, not empty), ``config`` and ``base_model`` (objects)."""
    path = directory / CONFIG_NAME
    record = read_json(path, ADAPTER_FORMAT)
    if isinstance(record, dict) and "peft_type" in record and "slimtune_version" not in record:
        raise AdapterFileError(
            f"{directory} holds a PEFT adapter (peft_type={record['peft_type']!r}), not a slimtune one: load it with "
            "slimtune.import_peft(model, directory) or `slimtune import --adapter DIR --output NEW_DIR`"
        )
    metadata = read_record(path, ADAPTER_FORMAT, ("slimtune_version", "config", "base_model", "modules"))
    modules, base_model = metadata["modules"], metadata["base_model"]
    shapes_ok = (
        isinstance(modules, dict)
        and bool(modules)
        and all(
            isinstance(shape, dict) and all(isinstance(shape.get(key), int) for key in ("d_in", "d_out"))
            for shape in modules.values()
        )
    )
    if not shapes_ok or not isinstance(base_model, dict) or not isinstance(metadata["config"], dict):
        raise AdapterFileError(
            f"{path} is damaged: expected 'modules' as a non-empty {{module name: {{'d_in': int, 'd_out': int}}}} and "
            f"'config', 'base_model' as objects; got modules={str(modules)[:80]}, base_model={str(base_model)[:80]}"
        )
    return metadata


def check_modules_fit(
    model: nn.Module, modules: dict[str, dict[str, int]], saved_class: str | None, directory: Path
) -> None:
    """Every saved module exists in ``model`` as an adaptable layer with the saved (d_in, d_out)."""
    present = dict(model.named_modules())
    for name, shape in modules.items():
        module = present.get(name)
        base = module.base_layer if isinstance(module, AdaptedLayer) else module
        if base is None or not is_supported_base(base):
            raise AdapterFileError(
                f"{directory} holds an adapter for module {name!r}, which {type(model).__name__} lacks or cannot "
                f"adapt (the adapter was saved from a {saved_class})"
            )
        d_in, d_out = base_features(base)
        if (d_in, d_out) != (shape["d_in"], shape["d_out"]):
            raise AdapterFileError(
                f"module {name!r}: the adapter in {directory} was saved for a layer {shape['d_in']} -> "
                f"{shape['d_out']} (d_in -> d_out), this model's layer is {d_in} -> {d_out}"
            )


def fill_parameters(built: dict[str, Adapter], tensors: dict[str, torch.Tensor], directory: Path) -> None:
    """Copy saved tensors into freshly built adapters (module name → adapter), once every name and shape fits."""
    path = directory / WEIGHTS_NAME
    expected = {f"{name}.{key}": t for name, adapter in built.items() for key, t in adapter.saved_tensors().items()}
    check_tensors_fit(tensors, expected, ADAPTER_FORMAT, f"{path} does not fit the adapters of this model")
    for name, adapter in built.items():
        try:
            adapter.load_saved_tensors({key: tensors[f"{name}.{key}"] for key in adapter.saved_tensors()})
        except SlimtuneError as err:
            raise AdapterFileError(f"{path}, module {name!r}: {err}") from None
