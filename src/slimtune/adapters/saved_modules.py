"""Whole modules trained as copies beside an adapter: ``modules_to_save`` (a classifier head, say).

A module named in a config's ``modules_to_save`` is wrapped in a :class:`SavedModule`, which keeps the frozen
original and one trainable copy per adapter (``modules_to_save[adapter name]``, the layout PEFT uses), and runs
the copy of the adapter in use: the first active adapter that has one, else the original (also while adapters
are disabled). Attributes other than its own are read from the module it runs, so ``model.score.weight`` or
``get_input_embeddings().num_embeddings`` keep working.

Tied weights: a copy keeps the ties of its original. When a parameter of a saved module is shared with a module
that is not named (a language-model head tied to the input embeddings, say), that module gets a copy too, made in
the same ``copy.deepcopy`` pass, so both copies share one trainable parameter, as the originals share theirs. A
shared tensor is saved once, under the first module named (:func:`copy_tensors`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from slimtune.adapters.base import AdaptedLayer
from slimtune.errors import TargetModulesError


class SavedModule(nn.Module):
    """A module kept whole: the frozen ``original_module`` and a trainable copy per adapter.

    Attributes:
        original_module: the module as the base model had it (frozen).
        modules_to_save: ``nn.ModuleDict`` adapter name → that adapter's copy.
        active_copy: the adapter whose copy runs (None: the original runs).
        disabled: when True the original runs whatever ``active_copy`` says.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active_copy: str | None = None
        self.disabled = False

    def in_use(self) -> nn.Module:
        """The module the forward runs: the active adapter's copy, or the original."""
        if self.active_copy is None or self.disabled or self.active_copy not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_copy]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.in_use()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "original_module" not in self.__dict__.get("_modules", {}):
                raise
        return getattr(self.in_use(), name)

    def set_active(self, adapter_names: list[str]) -> None:
        """Run the copy of the first of ``adapter_names`` that has one (the original if none); only it trains."""
        self.active_copy = next((name for name in adapter_names if name in self.modules_to_save), None)
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name == self.active_copy)


def saved_modules(model: nn.Module) -> Iterator[tuple[str, SavedModule]]:
    """Every :class:`SavedModule` of ``model`` with its module name."""
    for name, module in model.named_modules():
        if isinstance(module, SavedModule):
            yield name, module


def find_saved_modules(model: nn.Module, names: list[str]) -> list[str]:
    """The full names of the modules ``names`` selects: a module whose name equals an entry or ends with
    ``"." + entry`` (outermost matches only; a module already wrapped counts as the wrapper's name).

    Raises:
        TargetModulesError: an entry matches no module (the message lists the model's module names that could be
            meant), or matches a module that holds adapted layers (it cannot be both adapted and copied whole).
    """
    wrapped = tuple(f"{name}." for name, _ in saved_modules(model))
    candidates = [(n, m) for n, m in model.named_modules() if n and not (wrapped and n.startswith(wrapped))]
    matched: list[str] = []
    for entry in names:
        hits = [n for n, _ in candidates if n == entry or n.endswith("." + entry)]
        if not hits:
            children = [n for n, _ in model.named_children()]
            raise TargetModulesError(
                f"modules_to_save={names!r}: {entry!r} matches no module of {type(model).__name__}; allowed are "
                f"module names or their endings, e.g. its top-level modules {children[:8]}"
            )
        matched += [n for n in hits if n not in matched]
    outermost = [n for n in matched if not any(n.startswith(f"{other}.") for other in matched)]
    modules = dict(candidates)
    for name in outermost:
        if any(isinstance(inner, AdaptedLayer) for inner in modules[name].modules()):
            raise TargetModulesError(
                f"modules_to_save={names!r}: module {name!r} holds adapted layers; a module is either adapted "
                "(target_modules) or copied whole (modules_to_save), not both"
            )
    return outermost


def build_copies(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """Trainable copies of the modules ``names`` (full names) and of every module tied to them.

    Returns module name → copy: the named modules first, in order, then each module outside them that shares a
    parameter with one (its copy shares the copied parameter). Nothing in ``model`` changes.

    Raises:
        TargetModulesError: a module tied to a named one holds parameters of its own besides the shared ones (name
            it in ``modules_to_save`` too), or holds adapted layers.
    """
    modules = dict(model.named_modules())
    originals = {name: _original(modules[name]) for name in names}
    shared = {id(p) for module in originals.values() for p in module.parameters()}
    partners = {}
    for name, module in _plain_modules(model, names):
        holder = module.base_layer if isinstance(module, AdaptedLayer) else module
        own = list(holder.parameters(recurse=False))
        if own and any(id(p) in shared for p in own):
            if isinstance(module, AdaptedLayer) or not all(id(p) in shared for p in module.parameters()):
                raise TargetModulesError(
                    f"module {name!r} shares a parameter with a module of modules_to_save={names!r} and has parameters "
                    "of its own or holds an adapter: name it in modules_to_save too (and leave it out of "
                    "target_modules), so that the tie is kept"
                )
            partners[name] = module
    memo: dict[int, Any] = {}
    copies = {name: copy.deepcopy(module, memo) for name, module in {**originals, **partners}.items()}
    for module in copies.values():
        module.requires_grad_(True)
    return copies


def copy_tensors(copies: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """``<module name>.<tensor name>`` → tensor of every copy's state, each shared tensor once (first module wins)."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, module in copies.items():
        for key, tensor in module.state_dict(keep_vars=True).items():
            if id(tensor) not in seen:
                seen.add(id(tensor))
                tensors[f"{name}.{key}"] = tensor.detach()
    return tensors


def _original(module: nn.Module) -> nn.Module:
    return module.original_module if isinstance(module, SavedModule) else module


def _plain_modules(model: nn.Module, names: list[str]) -> Iterator[tuple[str, nn.Module]]:
    """The modules of ``model`` outside the named ones, outside any :class:`SavedModule` and inside no adapted layer
    (an adapted layer itself is yielded)."""
    skip = tuple(f"{n}." for n in names) + tuple(f"{n}." for n, _ in saved_modules(model))
    adapted = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, AdaptedLayer))
    for name, module in model.named_modules():
        if adapted and name.startswith(adapted):
            continue
        if name and name not in names and not name.startswith(skip) and not isinstance(module, SavedModule):
            yield name, module
