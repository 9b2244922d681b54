"""What PEFT's adapter folders look like, shared by :mod:`slimtune.export` (writing) and :mod:`slimtune.peft_import`.

A PEFT adapter folder holds ``adapter_config.json`` (``peft_type``, the method's fields, ``task_type``,
``base_model_name_or_path``) and ``adapter_model.safetensors``, whose tensors are named
``base_model.model.<module name>.<tensor name>`` without the adapter's name (PEFT strips it, so an adapter saved
under any name has the same keys; ``save_pretrained`` writes an adapter not named ``"default"`` into a subfolder
of that name). Here: the names; the task type, base model and (for a sequence classifier) whole head that PEFT
expects; reading a folder without ever unpickling anything; and the check that a PEFT config uses no option
slimtune lacks. PEFT is not imported.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtune.adapters.base import AdaptedLayer
from slimtune.errors import AdapterFileError, ConfigError
from slimtune.file_format import FileFormat, read_json, read_tensors

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PICKLE_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
PEFT_FORMAT = FileFormat(  # for messages and errors; its version is unused (PEFT's files carry none)
    "PEFT adapter",
    1,
    AdapterFileError,
    writer="peft's save_pretrained(safe_serialization=True) or slimtune.export_peft",
)

# type(model).__name__ endings → PEFT task_type, first match wins ("GPT2LMHeadModel" before "...Model").
TASK_TYPES = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
)
# Fields of a PEFT config that say nothing about the math of the saved tensors: who wrote it, for which base,
# and how target modules were chosen (the tensors name the adapted modules).
DESCRIPTIVE_FIELDS = frozenset(
    {
        "peft_type",
        "task_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
    }
)
CLASSIFIER_NAMES = ("classifier", "score")  # PEFT's modules_to_save for SEQ_CLS
NEUTRAL_VALUES: tuple[Any, ...] = (None, False, {}, [], "none")


def task_type_of(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for ``model``: from its class name, ``"FEATURE_EXTRACTION"`` for a bare Hugging Face
    model (``*Model`` with a ``config``), else None (PEFT then uses its plain ``PeftModel``)."""
    name = type(model).__name__
    for ending, task_type in TASK_TYPES:
        if name.endswith(ending):
            return task_type
    if name.endswith("Model") and hasattr(getattr(model, "config", None), "model_type"):
        return "FEATURE_EXTRACTION"
    return None


def base_model_of(model: nn.Module) -> str | None:
    """``model.config._name_or_path``: a folder that exists made absolute (so the adapter loads from anywhere),
    a hub name as it is, None when there is none."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not isinstance(name, str) or not name:
        return None
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def model_fields(model: nn.Module) -> dict[str, Any]:
    """The fields every exported ``adapter_config.json`` starts with: task type, base model, ``auto_mapping``
    without a task type (the model's class and module, as PEFT writes it for ``AutoPeftModel``) and
    ``modules_to_save`` (for ``SEQ_CLS`` PEFT's classifier names, whose modules :func:`head_tensors` saves)."""
    task_type = task_type_of(model)
    auto_mapping = None
    if task_type is None:
        auto_mapping = {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}
    return {
        "task_type": task_type,
        "auto_mapping": auto_mapping,
        "base_model_name_or_path": base_model_of(model),
        "revision": None,
        "inference_mode": True,
        "modules_to_save": list(CLASSIFIER_NAMES) if task_type == "SEQ_CLS" else None,
    }


def head_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors PEFT needs besides the adapter's: for a ``SEQ_CLS`` model every tensor of its classification
    head (a module named as in :data:`CLASSIFIER_NAMES`), which PEFT keeps whole (``modules_to_save``) and refuses
    to load without; none for other models.

    Raises:
        ConfigError: the head holds a slimtune adapter (PEFT would replace the head whole): leave it out of
            ``target_modules``.
    """
    if task_type_of(model) != "SEQ_CLS":
        return {}
    tensors: dict[str, torch.Tensor] = {}
    heads: list[str] = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in CLASSIFIER_NAMES or any(name.startswith(f"{h}.") for h in heads):
            continue
        if any(isinstance(inner, AdaptedLayer) for inner in module.modules()):
            raise ConfigError(
                f"module {name!r} is the classification head, which PEFT saves whole for task_type='SEQ_CLS', and it "
                "holds an adapter: export an adapter whose target_modules leave the head out"
            )
        heads.append(name)
        for key, tensor in module.state_dict().items():
            tensors[f"{KEY_PREFIX}{name}.{key}"] = tensor.detach().cpu().contiguous()
    return tensors


def read_peft_folder(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config (a JSON object with ``peft_type``) and the tensors of the PEFT adapter folder ``directory``.

    Raises:
        AdapterFileError: no ``adapter_config.json`` (naming subfolders that have one: PEFT saves an adapter not
            named "default" into one), a damaged file, a config without ``peft_type``, or weights only as
            ``adapter_model.bin`` (a pickle, never read: re-save with ``safe_serialization=True``).
    """
    config_path = directory / PEFT_CONFIG_NAME
    if not config_path.is_file():
        inner = sorted(p.parent.name for p in directory.glob(f"*/{PEFT_CONFIG_NAME}")) if directory.is_dir() else []
        hint = f"; its subfolders {inner} hold PEFT adapters (one per adapter name): pass one of them" if inner else ""
        raise AdapterFileError(f"{config_path} does not exist: expected a PEFT adapter folder{hint}")
    record = read_json(config_path, PEFT_FORMAT)
    if isinstance(record, dict) and "slimtune_version" in record and "peft_type" not in record:
        raise AdapterFileError(
            f"{config_path} is a slimtune adapter, not a PEFT one: load it with slimtune.load_adapter"
        )
    if not isinstance(record, dict) or not isinstance(record.get("peft_type"), str):
        shown = str(record)[:80]
        raise AdapterFileError(
            f"{config_path} is not a PEFT adapter config: expected an object with 'peft_type'; got {shown}"
        )
    weights = directory / PEFT_WEIGHTS_NAME
    if not weights.exists() and (directory / PEFT_PICKLE_NAME).exists():
        raise AdapterFileError(
            f"{directory} holds {PEFT_PICKLE_NAME} (a pickle, which slimtune never loads) and no {PEFT_WEIGHTS_NAME}: "
            "re-save the adapter with PEFT's save_pretrained(..., safe_serialization=True), its default"
        )
    return record, read_tensors(weights, PEFT_FORMAT)


def check_options(record: dict[str, Any], used: frozenset[str], path: Path) -> None:
    """ConfigError for a field of the PEFT config ``record`` that slimtune cannot express.

    ``used`` are the fields the method's mapping reads; :data:`DESCRIPTIVE_FIELDS` are ignored; every other field
    (DoRA, biases, modules_to_save, patterns, options of newer PEFT versions, ...) must hold a neutral value
    (None, False, empty, or "none").
    """
    for field, value in record.items():
        if field in used or field in DESCRIPTIVE_FIELDS or any(_same(value, n) for n in NEUTRAL_VALUES):
            continue
        raise ConfigError(
            f"{path}: {field}={str(value)[:80]!r} is not allowed: slimtune's import of peft_type="
            f"{record['peft_type']!r} has no equivalent; allowed for {field}: one of {list(NEUTRAL_VALUES)}"
        )


def check_pattern(record: dict[str, Any], field: str, default: Any, path: Path) -> None:
    """ConfigError unless every value of the per-module pattern ``record[field]`` equals ``default`` (slimtune
    has one value per adapter)."""
    pattern = record.get(field) or {}
    if not isinstance(pattern, dict):
        raise ConfigError(f"{path}: {field}={str(pattern)[:80]!r} is not allowed: expected an object")
    differing = {key: value for key, value in pattern.items() if not _same(value, default)}
    if differing:
        raise ConfigError(
            f"{path}: {field}={str(differing)[:120]} is not allowed: slimtune gives every module of an adapter the "
            f"same value; allowed: an empty {field} or one whose values all equal {default!r}"
        )


def _same(value: Any, neutral: Any) -> bool:
    """value == neutral, with True never equal to 1 nor 0 to False (JSON keeps them apart, so does this)."""
    if isinstance(value, bool) or isinstance(neutral, bool):
        return isinstance(value, bool) and isinstance(neutral, bool) and value == neutral
    if isinstance(value, float) and isinstance(neutral, (int, float)):
        return math.isclose(value, neutral)
    return type(value) is type(neutral) and value == neutral


def split_keys(
    tensors: dict[str, torch.Tensor], suffixes: tuple[str, ...], path: Path, peft_type: str
) -> dict[str, dict[str, torch.Tensor]]:
    """PEFT's tensors grouped by module: module name → {suffix: tensor}, in file order.

    Raises AdapterFileError naming keys that lack ``base_model.model.`` or end in none of ``suffixes`` (a tensor
    of an option slimtune lacks, such as a DoRA magnitude or an embedding adapter).
    """
    modules: dict[str, dict[str, torch.Tensor]] = {}
    foreign = []
    for key, value in tensors.items():
        suffix = next((s for s in suffixes if key.endswith(f".{s}")), None)
        if not key.startswith(KEY_PREFIX) or suffix is None:
            foreign.append(key)
            continue
        modules.setdefault(key[len(KEY_PREFIX) : -len(suffix) - 1], {})[suffix] = value
    if foreign:
        raise AdapterFileError(
            f"{path} has tensor(s) {sorted(foreign)[:5]} ({len(foreign)} in all) that slimtune cannot read: a "
            f"peft_type={peft_type!r} adapter has only '{KEY_PREFIX}<module>.<name>' for names {list(suffixes)}"
        )
    if not modules:
        raise AdapterFileError(f"{path} holds no tensor: expected '{KEY_PREFIX}<module>.<name>' for {list(suffixes)}")
    return modules
