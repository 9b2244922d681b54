"""Give linearised layers their softmax attention back: for a while (:func:`softmax_restored`, to measure what one
layer's linearisation costs) or for good (:func:`restore_softmax`, a layer-selective hybrid).

A :class:`LinearAttention` keeps the module it replaced as ``layer.original``, whose projections are the kept ones
(the same tensors), so restoring is putting ``original`` back in the parent, in place of the linear layer. An adapter
injected into the linear layer's projections afterwards is not seen by ``original``: restore before adapting.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator

from torch import nn

from slimtune.errors import ConfigError
from slimtune.linear_attention.convert import CONFIG_ATTRIBUTE, linear_attention_layers, linearize_config
from slimtune.linear_attention.layer import LinearAttention


@contextlib.contextmanager
def softmax_restored(model: nn.Module, layers: Iterable[int]) -> Iterator[None]:
    """Within the block, the linearised layers with these indices run their original softmax attention; afterwards,
    also on an error, their :class:`LinearAttention` again. The model's config is not changed.

    Raises:
        ConfigError: an index that is not a linearised layer of ``model`` (the message lists those there are).
    """
    chosen = _linearised(model, layers)
    for name, layer in chosen:
        model.set_submodule(name, layer.original)
    try:
        yield
    finally:
        for name, layer in chosen:
            model.set_submodule(name, layer)


def restore_softmax(model: nn.Module, layers: Iterable[int]) -> nn.Module:
    """Put the original softmax attention back in the linearised layers with these indices, for good; returns
    ``model``, whose config's ``softmax_layers`` now lists them too, so :func:`save_linearized` and
    :func:`load_linearized` keep them softmax.

    Raises:
        ConfigError: ``model`` is not linearised, an index is not one of its linearised layers, or no linearised
            layer would be left.
    """
    config = linearize_config(model)
    chosen = _linearised(model, layers)
    if not chosen:
        return model
    remaining = len(list(linear_attention_layers(model))) - len(chosen)
    indices = sorted(layer.layer_idx for _, layer in chosen)
    if not remaining:
        raise ConfigError(
            f"layers={indices} is not allowed: they are all the linearised layers of this {type(model).__name__}, "
            "leaving none linear; restore fewer, or use the original model"
        )
    for name, layer in chosen:
        model.set_submodule(name, layer.original)
    kept = sorted([*(config.softmax_layers or []), *indices])
    setattr(model, CONFIG_ATTRIBUTE, dataclasses.replace(config, softmax_layers=kept))
    return model


def _linearised(model: nn.Module, layers: Iterable[int]) -> list[tuple[str, LinearAttention]]:
    """(module name, layer) of the linearised layers with the given indices, each once, in model order."""
    found = {layer.layer_idx: (name, layer) for name, layer in linear_attention_layers(model)}
    wanted = list(layers)
    unknown = [i for i in wanted if isinstance(i, bool) or not isinstance(i, int) or i not in found]
    if unknown:
        raise ConfigError(
            f"layers={wanted!r} is not allowed: {unknown} are not linearised layers of this {type(model).__name__}; "
            f"its linearised layers are {sorted(found)}"
        )
    return [found[i] for i in sorted(set(wanted))]
