"""Import a PEFT adapter folder (LoRA, MiSS, C3A) into a model as a slimtune adapter with the same outputs.

The folder's ``peft_type`` picks the mapping (:mod:`slimtune.peft_methods`); its tensor names say which modules
are adapted (so ``target_modules``, ``layers_to_transform`` and the like need no interpreting). Only safetensors
is read, never a pickle. Every check runs before the model is touched, so on any error the model is as it was:
the file's options (:func:`slimtune.peft_format.check_options`), its modules against the model's, then every
tensor's name and shape against the adapters built for it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from slimtune.adapters.base import Adapter, base_features, is_supported_base
from slimtune.adapters.saved_modules import copy_tensors, find_saved_modules
from slimtune.errors import AdapterFileError, ConfigError, ShapeError, SlimtuneError, TargetModulesError
from slimtune.file_format import check_tensors_fit
from slimtune.inject import inject_adapter
from slimtune.peft_format import (
    KEY_PREFIX,
    PEFT_CONFIG_NAME,
    PEFT_FORMAT,
    PEFT_WEIGHTS_NAME,
    check_options,
    read_peft_folder,
    split_keys,
)
from slimtune.peft_methods import PEFT_METHODS, PeftMethod, Shapes


def import_peft(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default") -> nn.Module:
    """Inject the PEFT adapter saved in ``directory`` into ``model`` as ``adapter_name`` (active, trainable).

    ``peft_type`` LORA becomes a :class:`~slimtune.LoraConfig`, MISS a :class:`~slimtune.DishaConfig` (Bone,
    Bat-Col or mini), C3A a circulant :class:`~slimtune.SurmConfig`; the model then computes what
    ``peft.PeftModel.from_pretrained(model, directory)`` computes. Returns ``model``.

    Raises:
        AdapterFileError: a missing or damaged folder, weights only as ``adapter_model.bin``, tensors for modules
            this model lacks or cannot adapt, a missing, unexpected or mis-shaped tensor (each named).
        ConfigError: a ``peft_type`` other than LORA, MISS and C3A, or an option slimtune cannot express (DoRA,
            ``lora_bias``, ``bias`` other than "none", per-module ranks, ...). ``modules_to_save`` become the
            adapter's copies of those modules, with the file's tensors.
        AdapterNameError: ``adapter_name`` already exists on the model.
    """
    directory = Path(directory)
    record, tensors = read_peft_folder(directory)
    config_path, weights_path = directory / PEFT_CONFIG_NAME, directory / PEFT_WEIGHTS_NAME
    method = PEFT_METHODS.get(record["peft_type"])
    if method is None:
        raise ConfigError(
            f"{config_path}: peft_type={record['peft_type']!r} is not allowed: slimtune imports {list(PEFT_METHODS)}"
        )
    check_options(record, method.used_fields | {"modules_to_save"}, config_path)
    entries, saved_names = peft_saved_modules(model, record, tensors, config_path)
    whole_keys = {key for name in saved_names for key in whole_module_keys(model, name)}
    whole = {key: t for key, t in tensors.items() if key in whole_keys}
    adapter_tensors = {key: t for key, t in tensors.items() if key not in whole}
    grouped = split_keys(adapter_tensors, method.suffixes, weights_path, method.peft_type)
    shapes = module_shapes(model, list(grouped), weights_path)
    try:
        config = method.import_config(record, grouped, shapes, config_path)
        config.modules_to_save = entries or None
    except ConfigError as err:
        message = str(err)
        raise ConfigError(message if str(config_path) in message else f"{config_path}: {message}") from None

    def fill(built: dict[str, Adapter], copies: dict[str, nn.Module]) -> None:
        fill_adapters(method, built, grouped, weights_path)
        fill_copies(copies, saved_names, whole, weights_path)

    try:
        return inject_adapter(model, config, adapter_name, list(grouped), saved_names, prepare=fill)
    except ShapeError as err:
        raise AdapterFileError(f"{directory} does not fit this {type(model).__name__}: {err}") from None


def peft_saved_modules(
    model: nn.Module, record: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path
) -> tuple[list[str], list[str]]:
    """(the entries of the PEFT config's ``modules_to_save`` that match a module of ``model`` and have tensors in the
    file, the full names of those modules). Entries matching nothing are left out, as PEFT leaves them (a
    ``SEQ_CLS`` config names both ``classifier`` and ``score``)."""
    listed = record.get("modules_to_save") or []
    if not isinstance(listed, list) or not all(isinstance(entry, str) and entry for entry in listed):
        raise ConfigError(
            f"{path}: modules_to_save={str(listed)[:80]!r} is not allowed: expected a list of module names"
        )
    entries, names = [], []
    for entry in listed:
        try:
            found = find_saved_modules(model, [entry])
        except TargetModulesError:
            continue
        found = [n for n in found if any(key in tensors for key in whole_module_keys(model, n))]
        if found:
            entries.append(entry)
            names += [n for n in found if n not in names]
    return entries, names


def whole_module_keys(model: nn.Module, name: str) -> list[str]:
    """The names a PEFT file gives the tensors of module ``name`` kept whole: ``base_model.model.<name>.<key>``."""
    module = model.get_submodule(name)
    module = getattr(module, "original_module", module)
    return [f"{KEY_PREFIX}{name}.{key}" for key in module.state_dict()]


def fill_copies(
    copies: dict[str, nn.Module], saved_names: list[str], whole: dict[str, torch.Tensor], path: Path
) -> None:
    """Check the whole modules' tensors of a PEFT file against the copies built for them, then load them."""
    expected = {f"{KEY_PREFIX}{key}": t for key, t in copy_tensors({n: copies[n] for n in saved_names}).items()}
    check_tensors_fit(whole, expected, PEFT_FORMAT, f"{path} does not fit the modules_to_save of this model")
    with torch.no_grad():
        for key, tensor in expected.items():
            tensor.copy_(whole[key])


def module_shapes(model: nn.Module, names: list[str], path: Path) -> Shapes:
    """(d_in, d_out) of each module of ``names`` in ``model``; AdapterFileError naming the modules the model lacks
    or cannot adapt (the file was saved for another model)."""
    present = dict(model.named_modules())
    bases = {name: getattr(present.get(name), "base_layer", present.get(name)) for name in names}
    lacking = sorted(name for name, base in bases.items() if base is None)
    unfit = sorted(
        f"{name} ({type(base).__name__})"
        for name, base in bases.items()
        if base is not None and not is_supported_base(base)
    )
    if lacking or unfit:
        found = [f"{label} {_first(items)}" for label, items in (("lacks", lacking), ("cannot adapt", unfit)) if items]
        raise AdapterFileError(
            f"{path} adapts modules this {type(model).__name__} {' and '.join(found)}: the file was saved for another "
            "model (allowed: modules that are nn.Linear or Conv1D in this model)"
        )
    return {name: base_features(cast(nn.Module, base)) for name, base in bases.items()}


def _first(items: list[str], shown: int = 5) -> str:
    return str(items[:shown]) + (f" and {len(items) - shown} more" if len(items) > shown else "")


def fill_adapters(
    method: PeftMethod, built: dict[str, Adapter], grouped: dict[str, dict[str, torch.Tensor]], path: Path
) -> None:
    """Check every PEFT tensor against the freshly built adapters (module → adapter), then load them."""
    saved = {f"{KEY_PREFIX}{name}.{suffix}": t for name, tensors in grouped.items() for suffix, t in tensors.items()}
    expected = {
        f"{KEY_PREFIX}{name}.{suffix}": t
        for name, adapter in built.items()
        for suffix, t in method.export_tensors(adapter).items()
    }
    check_tensors_fit(
        saved, expected, PEFT_FORMAT, f"{path} does not fit the {method.peft_type} adapters of this model"
    )
    for name, adapter in built.items():
        try:
            adapter.load_saved_tensors(method.import_tensors(grouped[name], adapter))
        except SlimtuneError as err:
            raise AdapterFileError(f"{path}, module {name!r}: {err}") from None
