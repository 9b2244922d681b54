"""A transformers ``Cache`` holding one fixed-size :class:`LinearAttentionState` per linearised layer.

The state is S [B, H, m, d_v] (and z [B, H, m] when normalised) whatever the context length, where a KV cache grows by
2·Hkv·d values per token; with a softmax window (``window.py``) it is a ``WindowState``, which adds the last w and the
first n_s tokens' keys and values: larger, but still independent of the context length. Each layer also counts the
tokens it has seen, which is what transformers 5.x reads, through ``get_seq_length``, for the position ids of the next
tokens, and through ``get_mask_sizes`` for the attention mask. The mask asked for covers only the new tokens (kv_length
= query length, kv_offset = tokens seen): a linearised layer reads nothing from it but which new tokens are padding.

Mixed caches (``LinearizeConfig.softmax_layers``): a softmax layer the conversion kept stores keys and values in an
ordinary ``DynamicLayer`` of the same cache. transformers builds one causal mask per forward, sized by one cache
layer: the first that ``Cache.is_linear`` does not mark (Llama, GPT-2, ...), or the first sliding one (Mistral,
Qwen2 with a window). :class:`LinearAttentionCacheLayer` is registered as a transformers linear-attention layer, so
in a ``DynamicCache`` that layer is a softmax one whenever there is one, and :class:`LinearAttentionCache` sizes every
mask by its first key/value layer. The mask then covers every token seen, as the softmax layers need (a linearised
layer reads its last T columns just as well); with no softmax layer it stays over the new tokens only.

Two ways in:

- ``LinearAttentionCache()``: pass it as ``past_key_values`` to ``model(...)`` or ``model.generate(...)``.
- Nothing: when a model's forward or ``generate`` creates its default ``DynamicCache``, each linearised layer
  swaps its own still-empty slot for a :class:`LinearAttentionCacheLayer` on first use (:func:`state_layer`),
  so ``model.generate(ids, max_new_tokens=...)`` works unchanged; kept softmax layers use its key/value layers.

A recurrent state cannot be rolled back: ``crop`` (assisted decoding) raises. Beam search (``reorder_cache``) and
batch expansion/selection work on the batch dimension of the state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, LinearAttentionCacheLayerMixin

from slimtune.errors import ConfigError
from slimtune.linear_attention.op_args import LinearAttentionState
from slimtune.linear_attention.window import WindowState

StateT = TypeVar("StateT")


class LinearAttentionCacheLayer(CacheLayerMixin):
    """One layer's state (None before the first token) and the number of tokens it has absorbed."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self) -> None:
        super().__init__()
        self.state: LinearAttentionState | WindowState | None = None
        self.seen_tokens = 0

    def advance(self, state: LinearAttentionState | WindowState | None, tokens: int) -> None:
        """Store the state after ``tokens`` more tokens."""
        if state is None:
            raise ValueError("a linear-attention op returned no final state; it was called without output_final_state")
        self.state = state
        self.seen_tokens += tokens

    def linear_state(self) -> LinearAttentionState | None:
        """The state of a pure linear-attention layer (None before the first token)."""
        return self._state_of(LinearAttentionState)

    def window_state(self) -> WindowState | None:
        """The state of a sliding-window hybrid layer (None before the first token)."""
        return self._state_of(WindowState)

    def _state_of(self, kind: type[StateT]) -> StateT | None:
        if self.state is not None and not isinstance(self.state, kind):
            raise ConfigError(
                f"this cache layer holds a {type(self.state).__name__}, not a {kind.__name__}: the cache was filled by "
                "a model linearised with other settings; start generation with a fresh cache"
            )
        return self.state

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("a LinearAttentionCacheLayer is filled by its LinearAttention layer, not with keys/values")

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError(
            "a LinearAttentionCacheLayer holds a linear-attention state, not keys and values: a softmax attention "
            "layer cannot use it (the cache was filled by a model with other layers linearised; use a fresh cache)"
        )

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset): a mask over the new tokens only, placed after the tokens seen."""
        return query_length, self.seen_tokens

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        """Bytes of the state tensors (0 before the first token)."""
        return sum(t.numel() * t.element_size() for t in _tensors(self.state))

    def reset(self) -> None:
        self.state = None
        self.seen_tokens = 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise RuntimeError(
                f"cannot crop {tokens_to_remove} tokens: a linear-attention state cannot be rolled back "
                "(assisted / speculative decoding is not supported)"
            )

    def offload(self) -> None:
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.state = _map_tensors(self.state, fn)


# Cache.is_linear now marks it: transformers sizes the causal mask by a softmax layer's slot when there is one
LinearAttentionCacheLayerMixin.register(LinearAttentionCacheLayer)


class LinearAttentionCache(Cache):
    """One slot per layer, created as the layers first use it: a :class:`LinearAttentionCacheLayer` for a linearised
    layer (:func:`state_layer`), a ``DynamicLayer`` of keys and values for a softmax layer the conversion kept."""

    def __init__(self) -> None:
        super().__init__(layer_class_to_replicate=DynamicLayer)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of the first key/value layer when there is one (the softmax layers need a mask
        over every token seen), else of ``layer_idx``: a mask over the new tokens only."""
        key_value = [i for i, layer in enumerate(self.layers) if not isinstance(layer, LinearAttentionCacheLayer)]
        return super().get_mask_sizes(query_length, key_value[0] if key_value else layer_idx)

    def nbytes(self) -> int:
        """Bytes held by every layer's state: constant once every layer has seen a token."""
        return cache_nbytes(self)


def state_layer(cache: Cache, layer_idx: int) -> LinearAttentionCacheLayer:
    """The :class:`LinearAttentionCacheLayer` of ``layer_idx`` in ``cache``, made on first use.

    A missing slot, or a still-empty key/value layer (what ``DynamicCache(config=...)`` pre-builds: a
    ``DynamicLayer``, or a ``DynamicSlidingWindowLayer`` for sliding-window configs), is replaced by a new state
    layer; a slot already holding keys and values is a ConfigError.
    """
    while len(cache.layers) <= layer_idx:
        cache.layers.append(LinearAttentionCacheLayer())
    layer = cache.layers[layer_idx]
    if isinstance(layer, LinearAttentionCacheLayer):
        return layer
    if isinstance(layer, CacheLayerMixin) and not layer.is_initialized:
        fresh = LinearAttentionCacheLayer()
        cache.layers[layer_idx] = fresh
        return fresh
    held = layer.get_seq_length() if isinstance(layer, CacheLayerMixin) else "some"
    raise ConfigError(
        f"cache layer {layer_idx} is a {type(layer).__name__} already holding {held} tokens of keys/values; a "
        "linearised layer needs a LinearAttentionCache, or a fresh DynamicCache, as past_key_values"
    )


def cache_nbytes(cache: Cache) -> int:
    """Bytes of the linear-attention states in ``cache`` (other layer kinds count their keys and values)."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, LinearAttentionCacheLayer):
            total += layer.nbytes()
        else:
            kv = [getattr(layer, name, None) for name in ("keys", "values")]
            total += sum(t.numel() * t.element_size() for t in kv if isinstance(t, torch.Tensor))
    return total


def _tensors(state: object) -> list[torch.Tensor]:
    """Every tensor in a (possibly nested) state dataclass; [] for None."""
    if isinstance(state, torch.Tensor):
        return [state]
    if dataclasses.is_dataclass(state):
        return [t for field in dataclasses.fields(state) for t in _tensors(getattr(state, field.name))]
    return []


def _map_tensors(state: StateT, fn: Callable[[torch.Tensor], torch.Tensor]) -> StateT:
    """``state`` with ``fn`` applied to every tensor in it (nested dataclasses too); other values unchanged."""
    if isinstance(state, torch.Tensor):
        return cast(StateT, fn(state))
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        changes = {field.name: _map_tensors(getattr(state, field.name), fn) for field in dataclasses.fields(state)}
        return cast(StateT, dataclasses.replace(cast(Any, state), **changes))
    return state
