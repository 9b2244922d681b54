"""Put adapters into any ``nn.Module`` by module name, switch them, merge them, take them out.

The model is changed in place and returned; there are no per-method model classes. The model remembers its
adapters' configs in ``model.slimtune_configs`` (name → config) and the active names in ``model.slimtune_active``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from collections.abc import Callable, Iterator

from torch import nn

from slimtune.adapters.base import AdaptedLayer, Adapter, is_supported_base
from slimtune.adapters.saved_modules import SavedModule, build_copies, find_saved_modules, saved_modules
from slimtune.config import ALL_LINEAR, AdapterConfig
from slimtune.errors import AdapterNameError, ConfigError, TargetModulesError

logger = logging.getLogger("slimtune")
CONFIGS_ATTRIBUTE = "slimtune_configs"  # on the model: adapter name -> config
ACTIVE_ATTRIBUTE = "slimtune_active"  # on the model: the active adapter names, in order


@dataclasses.dataclass(frozen=True)
class ParameterCounts:
    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        share = f"{100 * self.fraction:.4f}"
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {share}"


def get_adapted_model(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> nn.Module:
    """Inject an adapter named ``adapter_name`` into every module of ``model`` matched by ``config.target_modules``.

    The base model is frozen; the new adapter becomes the active one and is the only trainable part, with the
    copies of ``config.modules_to_save`` (:mod:`slimtune.adapters.saved_modules`), which ``target_modules`` never
    reaches into. Every adapter and copy is built before any module is replaced, so a failure (a shape that does
    not fit, say) leaves the model unchanged. Returns ``model`` itself.

    Raises:
        TargetModulesError: nothing matched, a matched module is not ``nn.Linear``/``Conv1D``, or a name of
            ``modules_to_save`` matches no module.
        ShapeError: the method cannot work with a matched layer's shape (e.g. ``r`` does not divide it).
        AdapterNameError: ``adapter_name`` already exists on the model.
    """
    if not isinstance(config, AdapterConfig):
        raise ConfigError(f"config={config!r} is not allowed: expected an AdapterConfig such as LoraConfig")
    saved = find_saved_modules(model, config.modules_to_save) if config.modules_to_save else []
    targets = find_target_modules(model, config.target_modules, exclude=saved)
    return inject_adapter(model, config, adapter_name, targets, saved)


Prepare = Callable[[dict[str, Adapter], dict[str, nn.Module]], None]


def inject_adapter(
    model: nn.Module,
    config: AdapterConfig,
    adapter_name: str,
    module_names: list[str],
    saved_names: list[str] | None = None,
    prepare: Prepare | None = None,
) -> nn.Module:
    """Inject into exactly ``module_names`` (each ``nn.Linear``/``Conv1D`` or an already adapted layer), with
    trainable copies of the modules ``saved_names`` (full names) and of the modules tied to them.

    ``prepare(built, copies)`` (module name → new adapter, module name → new copy) runs after everything is built
    and before any module is replaced, so an error it raises (a saved tensor that does not fit, say) also leaves
    the model unchanged.
    """
    check_adapter_name(adapter_name)
    configs = adapter_configs(model)
    if adapter_name in configs:
        raise AdapterNameError(f"adapter_name={adapter_name!r} already exists on the model; existing: {list(configs)}")
    modules = dict(model.named_modules())
    built = {}
    for name in module_names:
        module = modules[name]
        base = module.base_layer if isinstance(module, AdaptedLayer) else module
        built[name] = config.build_adapter(base, name)
    config.check_adapters(built)
    copies = build_copies(model, saved_names) if saved_names else {}
    _check_disjoint(module_names, list(copies))
    if prepare is not None:
        prepare(built, copies)
    for name, adapter in built.items():
        layer = modules[name]
        if not isinstance(layer, AdaptedLayer):
            layer = AdaptedLayer(layer)
            replace_module(model, name, layer)
        layer.add_adapter(adapter_name, adapter)
    _attach_copies(model, adapter_name, copies)
    configs[adapter_name] = config
    setattr(model, CONFIGS_ATTRIBUTE, configs)
    for param in model.parameters():
        param.requires_grad_(False)
    set_adapter(model, adapter_name)
    logger.info("adapter %r (%s) in %d modules; %s", adapter_name, config.method, len(built), parameter_counts(model))
    return model


def _check_disjoint(module_names: list[str], copied: list[str]) -> None:
    """TargetModulesError when a module is both adapted and copied whole (or one lies inside the other)."""
    for name in module_names:
        clash = next((c for c in copied if name == c or name.startswith(f"{c}.") or c.startswith(f"{name}.")), None)
        if clash is not None:
            raise TargetModulesError(
                f"module {name!r} is adapted (target_modules) and module {clash!r} is copied whole (modules_to_save "
                "or tied to one): a module is either adapted or copied, not both; leave it out of one of them"
            )


def check_adapter_name(name: object) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise AdapterNameError(f"adapter_name={name!r} is not allowed: expected a non-empty string without '.'")


def adapter_configs(model: nn.Module) -> dict[str, AdapterConfig]:
    """The model's adapters, name → config (empty for a model without adapters)."""
    return dict(getattr(model, CONFIGS_ATTRIBUTE, {}))


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    """Every adapted layer of ``model`` with its module name."""
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            yield name, module


def find_target_modules(model: nn.Module, targets: list[str] | str, exclude: list[str] | None = None) -> list[str]:
    """Names of the modules that ``targets`` selects (see :class:`~slimtune.config.AdapterConfig`), never inside
    a module of ``exclude`` (full names: the modules to save whole) or a :class:`SavedModule`."""
    output_embeddings = getattr(model, "get_output_embeddings", None)
    head = output_embeddings() if callable(output_embeddings) else None
    excluded = [*(exclude or []), *(name for name, _ in saved_modules(model))]
    adapted_prefixes = tuple(f"{name}." for name, _ in adapted_layers(model)) + tuple(f"{n}." for n in excluded)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if name and name not in excluded and not (adapted_prefixes and name.startswith(adapted_prefixes))
    ]
    _refuse_copied_targets(targets, exclude or [])
    matched = []
    for name, module in candidates:
        adaptable = isinstance(module, AdaptedLayer) or is_supported_base(module)
        if targets == ALL_LINEAR:
            is_head = head is not None and head in (module, getattr(module, "base_layer", None))
            if adaptable and not is_head:
                matched.append(name)
            continue
        if isinstance(targets, str):
            hit = re.fullmatch(targets, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in targets)
        if hit and not adaptable:
            raise TargetModulesError(
                f"target_modules={targets!r} matched {name!r} of type {type(module).__name__}, which cannot be "
                "adapted: allowed types are nn.Linear and transformers' Conv1D"
            )
        if hit:
            matched.append(name)
    if not matched:
        linear_names = [
            name for name, module in candidates if is_supported_base(module) or isinstance(module, AdaptedLayer)
        ]
        suffixes = sorted({name.rsplit(".", 1)[-1] for name in linear_names})
        raise TargetModulesError(
            f"target_modules={targets!r} matched no adaptable module of {type(model).__name__}: allowed are names "
            f"or patterns of its linear modules, which include {linear_names[:5]} (name endings: {suffixes[:12]})"
        )
    return matched


def _refuse_copied_targets(targets: list[str] | str, copied: list[str]) -> None:
    """TargetModulesError when ``targets`` names a module of ``copied`` (modules_to_save) itself."""
    if targets == ALL_LINEAR:
        return
    for name in copied:
        hit = (
            re.fullmatch(targets, name)
            if isinstance(targets, str)
            else any(name == t or name.endswith("." + t) for t in targets)
        )
        if hit:
            raise TargetModulesError(
                f"target_modules={targets!r} names module {name!r}, which modules_to_save copies whole: a module is "
                "either adapted or copied whole, not both; leave it out of one of them"
            )


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _attach_copies(model: nn.Module, adapter_name: str, copies: dict[str, nn.Module]) -> None:
    """Put each copy into its module's :class:`SavedModule` (wrapping the module first if needed) as
    ``adapter_name``'s copy."""
    for name, module_copy in copies.items():
        module = model.get_submodule(name)
        if not isinstance(module, SavedModule):
            module.requires_grad_(False)
            module = SavedModule(module)
            replace_module(model, name, module)
        module.modules_to_save[adapter_name] = module_copy


def _remove_copies(model: nn.Module, adapter_name: str) -> None:
    """Drop ``adapter_name``'s copies; a :class:`SavedModule` left with none goes back to its original."""
    for name, module in list(saved_modules(model)):
        if adapter_name in module.modules_to_save:
            del module.modules_to_save[adapter_name]
            if module.active_copy == adapter_name:
                module.active_copy = None
        if not module.modules_to_save:
            replace_module(model, name, module.original_module)


def _unwrap_saved(model: nn.Module, keep_copies: bool) -> None:
    """Replace every :class:`SavedModule` by the module it runs (``keep_copies``) or by its original."""
    for name, module in list(saved_modules(model)):
        replace_module(model, name, module.in_use() if keep_copies else module.original_module)


def set_adapter(model: nn.Module, adapter_names: str | list[str]) -> None:
    """Make ``adapter_names`` the active adapters (in that order) and the only trainable parameters."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    configs = adapter_configs(model)
    unknown = [n for n in names if n not in configs]
    if unknown or not names:
        raise AdapterNameError(f"adapter_names={adapter_names!r}: unknown {unknown}; the model has {list(configs)}")
    layers = [layer for _, layer in adapted_layers(model)]
    for layer in layers:
        layer.checked_active(names)  # every layer accepts the order before any changes
    setattr(model, ACTIVE_ATTRIBUTE, names)
    for layer in layers:
        layer.set_active(names)
        for name, adapter in layer.adapters.items():
            adapter.requires_grad_(name in names)
    for _, saved in saved_modules(model):
        saved.set_active(names)


def active_adapters(model: nn.Module) -> list[str]:
    return list(getattr(model, ACTIVE_ATTRIBUTE, []))


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes as its base model (modules to save run their originals); merged adapters
    are unmerged and merged back."""
    layers = [layer for _, layer in adapted_layers(model)]
    wrappers = [saved for _, saved in saved_modules(model)]
    merged = [list(layer.merged_adapters) for layer in layers]
    for layer in layers:
        layer.unmerge()
        layer.adapters_disabled = True
    for saved in wrappers:
        saved.disabled = True
    try:
        yield model
    finally:
        for saved in wrappers:
            saved.disabled = False
        for layer, names in zip(layers, merged):
            layer.adapters_disabled = False
            layer.merge(names)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove an adapter everywhere; a layer left with no adapter goes back to its base layer."""
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise AdapterNameError(f"adapter_name={adapter_name!r} is not on the model; it has {list(configs)}")
    for name, layer in list(adapted_layers(model)):
        if adapter_name in layer.adapters:
            layer.remove_adapter(adapter_name)
        if not layer.adapters:
            replace_module(model, name, layer.base_layer)
    _remove_copies(model, adapter_name)
    del configs[adapter_name]
    setattr(model, CONFIGS_ATTRIBUTE, configs)
    setattr(model, ACTIVE_ATTRIBUTE, [n for n in active_adapters(model) if n != adapter_name])


def merge_adapters(model: nn.Module, adapter_names: list[str] | None = None) -> None:
    """Merge adapters (default: the active ones) into every layer's base weight."""
    if adapter_names is not None:
        configs = adapter_configs(model)
        unknown = [n for n in adapter_names if n not in configs]
        if unknown:
            raise AdapterNameError(f"adapter_names={adapter_names!r}: unknown {unknown}; the model has {list(configs)}")
    for _, layer in adapted_layers(model):
        layer.merge(None if adapter_names is None else [n for n in adapter_names if n in layer.adapters])


def unmerge_adapters(model: nn.Module) -> None:
    """Undo every merge in every layer."""
    for _, layer in adapted_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters and put plain base layers back: a model without slimtune inside. A module to save
    becomes the active adapter's trained copy (ties kept)."""
    merge_adapters(model)
    return _unwrap(model, keep_copies=True)


def unload(model: nn.Module) -> nn.Module:
    """Unmerge everything and put the original base layers (and modules to save) back, dropping every adapter."""
    unmerge_adapters(model)
    return _unwrap(model, keep_copies=False)


def _unwrap(model: nn.Module, keep_copies: bool) -> nn.Module:
    _unwrap_saved(model, keep_copies)
    for name, layer in list(adapted_layers(model)):
        replace_module(model, name, layer.base_layer)
    for attr in (CONFIGS_ATTRIBUTE, ACTIVE_ATTRIBUTE):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def parameter_counts(model: nn.Module) -> ParameterCounts:
    """Trainable and total parameter counts (each shared tensor counted once)."""
    params = list(model.parameters())  # shared tensors appear once
    return ParameterCounts(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
