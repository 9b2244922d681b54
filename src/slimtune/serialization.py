"""Save and load one adapter: ``adapter_model.safetensors`` + ``adapter_config.json`` in a folder.

Tensors are stored under ``<module name>.<parameter name>`` (e.g. ``model.layers.0.self_attn.q_proj.lora_A``),
independent of the adapter's name, so an adapter can be loaded under any name. The JSON records the slimtune
version, the config, the base model's class and every adapted module's (d_in, d_out), so that loading into
another model fails with a message naming the module and both shapes. Modules kept whole (``modules_to_save``:
a classifier's head, say) are stored as ``<module name>.<tensor name>`` too, each shared (tied) tensor once, and
listed under ``modules_to_save``; a sequence classifier's class names are recorded under ``labels``, so a tool
can rebuild the model with its head before loading. Only safetensors is read: no pickle.
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
from slimtune.adapters.saved_modules import copy_tensors, find_saved_modules, saved_modules
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
    named, copies = adapter_copies(model, adapter_name)
    tensors.update({key: tensor.cpu().contiguous() for key, tensor in copy_tensors(copies).items()})
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
    metadata = {
        "slimtune_version": __version__,
        "format_version": ADAPTER_FORMAT.version,
        "config": configs[adapter_name].to_dict(),
        "base_model": {"class": type(model).__name__, "name_or_path": name_or_path or None},
        "modules": modules,
        "modules_to_save": named,
        "labels": class_names(model),
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
    saved_names = saved_module_names(model, metadata, directory)
    tensors = read_tensors(directory / WEIGHTS_NAME, ADAPTER_FORMAT)
    try:
        config = config_from_dict(metadata["config"])
    except SlimtuneError as err:
        raise AdapterFileError(f"{directory / CONFIG_NAME}: {err}") from None
    return inject_adapter(
        model,
        config,
        adapter_name,
        list(modules),
        saved_names,
        prepare=lambda built, copies: fill_parameters(model, built, copies, tensors, directory),
    )


def adapter_copies(model: nn.Module, adapter_name: str) -> tuple[list[str], dict[str, nn.Module]]:
    """(the full names of the modules ``adapter_name``'s config names in ``modules_to_save``, module name → that
    adapter's copy of them and of the modules tied to them, the named ones first)."""
    config = adapter_configs(model)[adapter_name]
    named = find_saved_modules(model, config.modules_to_save) if config.modules_to_save else []
    copies = {
        name: saved.modules_to_save[adapter_name]
        for name, saved in saved_modules(model)
        if adapter_name in saved.modules_to_save
    }
    ordered = {name: copies[name] for name in named if name in copies}
    ordered.update({name: module for name, module in copies.items() if name not in ordered})
    return named, ordered


def class_names(model: nn.Module) -> list[str] | None:
    """A sequence classifier's class names in label order (``config.id2label``), None for other models."""
    config = getattr(model, "config", None)
    id2label = getattr(config, "id2label", None)
    if not type(model).__name__.endswith("ForSequenceClassification") or not isinstance(id2label, dict):
        return None
    return [str(id2label[i]) for i in sorted(id2label)]


def saved_module_names(model: nn.Module, metadata: dict[str, Any], directory: Path) -> list[str]:
    """The ``modules_to_save`` of a saved adapter (full module names; none in files written before them), each
    checked to exist in ``model``."""
    names = metadata.get("modules_to_save") or []
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise AdapterFileError(
            f"{directory / CONFIG_NAME} is damaged: expected 'modules_to_save' as a list of module names, got "
            f"{str(names)[:80]}"
        )
    present = dict(model.named_modules())
    lacking = [n for n in names if n not in present]
    if lacking:
        raise AdapterFileError(
            f"{directory} holds whole modules {lacking} (modules_to_save) that this {type(model).__name__} lacks: "
            f"the adapter was saved from a {metadata['base_model'].get('class')}"
        )
    return names


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


def fill_parameters(
    model: nn.Module,
    built: dict[str, Adapter],
    copies: dict[str, nn.Module],
    tensors: dict[str, torch.Tensor],
    directory: Path,
) -> None:
    """Copy saved tensors into freshly built adapters and module copies (module name → adapter / copy), once every
    name and shape fits."""
    path = directory / WEIGHTS_NAME
    expected = {f"{name}.{key}": t for name, adapter in built.items() for key, t in adapter.saved_tensors().items()}
    copied = copy_tensors(copies)
    check_heads_fit(model, copied, tensors, directory)
    check_tensors_fit(
        tensors, {**expected, **copied}, ADAPTER_FORMAT, f"{path} does not fit the adapters of this model"
    )
    for name, adapter in built.items():
        try:
            adapter.load_saved_tensors({key: tensors[f"{name}.{key}"] for key in adapter.saved_tensors()})
        except SlimtuneError as err:
            raise AdapterFileError(f"{path}, module {name!r}: {err}") from None
    with torch.no_grad():
        for key, tensor in copied.items():
            tensor.copy_(tensors[key])


def check_heads_fit(
    model: nn.Module, copied: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], directory: Path
) -> None:
    """AdapterFileError naming the module, both shapes and (for a classifier's head) both label counts, when a
    saved whole module's tensor has another shape than the model's."""
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    for key, tensor in copied.items():
        saved = tensors.get(key)
        if saved is None or saved.shape == tensor.shape:
            continue
        module, _, name = key.rpartition(".")
        labels = ""
        if tensor.dim() >= 1 and tensor.shape[0] == num_labels and saved.dim() == tensor.dim():
            labels = (
                f": the classification head was saved for {saved.shape[0]} labels and this model has {num_labels}; "
                f"load the model with num_labels={saved.shape[0]}"
            )
        raise AdapterFileError(
            f"module {module!r} (modules_to_save): the adapter in {directory} saved its {name} with shape "
            f"{tuple(saved.shape)}, this model's is {tuple(tensor.shape)}{labels}"
        )
