"""Layer-selective hybrids: ``LinearizeConfig.softmax_layers`` leaves some layers softmax, the rest are linearised.

On a 3-layer tiny Llama, for pure linear and window + sinks layers, with the softmax layer first, in the middle
(the first layer, whose cache slot transformers asks first for mask sizes, is then linear) or at both ends: cached
decoding in pieces equals a full forward, in a ``LinearAttentionCache`` and in the ``DynamicCache`` that
``generate`` makes (also with a kept sliding-window layer of the tiny Mistral); left-padded batches decode as each
row alone; cache bytes; save/load; restoring softmax layers; bad indices.
"""

from __future__ import annotations

import re

import pytest
import torch
from test_linear_generation import randomize_new_parameters
from test_linearize import TINY, token_blocks
from torch import nn
from transformers import DynamicCache
from transformers.masking_utils import find_first_full_attention_index

from cases import greedy_by_full_forwards, tiny_llama
from slimtune.errors import ConfigError
from slimtune.linear_attention import (
    LinearAttention,
    LinearAttentionCache,
    LinearizeConfig,
    cache_nbytes,
    linear_attention_layers,
    linearize,
    linearize_config,
    load_linearized,
    restore_softmax,
    save_linearized,
    softmax_restored,
)

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = {"first": [0], "middle": [1], "ends": [0, 2]}
KINDS = {"linear": {}, "window": {"window": 4, "sink_tokens": 1, "chunk_size": 3}}


def tiny_llama3() -> nn.Module:
    """The tiny Llama of ``cases`` with 3 layers: hidden 48, GQA 4/2 heads, head_dim 12, vocab 101."""
    return tiny_llama(layers=3)


def hybrid(layers: str, kind: str) -> nn.Module:
    return randomize_new_parameters(
        linearize(tiny_llama3(), LinearizeConfig(softmax_layers=LAYERS[layers], **KINDS[kind]))
    )


def attention_classes(model: nn.Module) -> list[str]:
    return [type(block.self_attn).__name__ for block in model.model.layers]


def piecewise_logits(model: nn.Module, ids: torch.Tensor, cache: object, sizes: list[int]) -> torch.Tensor:
    """Logits [B, T, V] of ``ids`` fed in pieces of ``sizes`` tokens (they add up to T) through one cache."""
    pieces, start = [], 0
    for size in sizes:
        pieces.append(model(ids[:, start : start + size], past_key_values=cache, use_cache=True).logits)
        start += size
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("layers", sorted(LAYERS))
def test_listed_layers_keep_their_original_module_and_the_others_are_converted(layers):
    model = linearize(tiny_llama3(), LinearizeConfig(softmax_layers=LAYERS[layers]))
    expected = ["LlamaAttention" if i in LAYERS[layers] else "LinearAttention" for i in range(3)]
    assert attention_classes(model) == expected
    assert sorted(layer.layer_idx for _, layer in linear_attention_layers(model)) == [
        i for i in range(3) if i not in LAYERS[layers]
    ]


@pytest.mark.parametrize("cache_kind", ["linear_attention_cache", "dynamic_cache"])
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("layers", sorted(LAYERS))
def test_cached_decoding_in_pieces_equals_a_full_forward(layers, kind, cache_kind):
    model = hybrid(layers, kind)
    ids = token_blocks(2, 15)
    cache = LinearAttentionCache() if cache_kind == "linear_attention_cache" else DynamicCache(config=model.config)
    stepwise = piecewise_logits(model, ids, cache, [4, 1, 3, 1, 1, 5])
    torch.testing.assert_close(stepwise, model(ids, use_cache=False).logits, rtol=0, atol=1e-4)
    assert cache.get_seq_length() == 15


@pytest.mark.parametrize("cache_kind", ["linear_attention_cache", "dynamic_cache"])
def test_a_kept_sliding_window_layer_decodes_exactly(cache_kind):
    """Mistral sizes its sliding-window mask by the first sliding cache layer; a LinearAttentionCache has none."""
    model = randomize_new_parameters(linearize(TINY["mistral"](), LinearizeConfig(softmax_layers=[1])))
    ids = token_blocks(2, 15)  # longer than the window of 8
    cache = LinearAttentionCache() if cache_kind == "linear_attention_cache" else DynamicCache(config=model.config)
    stepwise = piecewise_logits(model, ids, cache, [4, 1, 3, 1, 1, 5])
    torch.testing.assert_close(stepwise, model(ids, use_cache=False).logits, rtol=0, atol=1e-4)


def test_the_mask_covers_every_token_seen_only_when_a_softmax_layer_needs_it():
    ids = token_blocks(2, 6)
    for layers, expected in ((None, (3, 6)), ([1], (9, 0))):
        model = linearize(tiny_llama3(), LinearizeConfig(softmax_layers=layers))
        for cache in (LinearAttentionCache(), DynamicCache(config=model.config)):
            model(ids, past_key_values=cache, use_cache=True)
            # (kv_length, kv_offset) of the next 3 tokens, from the cache layer transformers' mask creation asks
            assert cache.get_mask_sizes(3, find_first_full_attention_index(cache)) == expected


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("layers", ["middle", "ends"])
def test_generate_equals_greedy_decoding_by_full_forwards(layers, kind):
    model = hybrid(layers, kind)
    prompt = token_blocks(2, 6)
    ids = greedy_by_full_forwards(model, prompt, 6)
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(model.generate(prompt, **settings), ids)
    assert torch.equal(model.generate(prompt, past_key_values=LinearAttentionCache(), **settings), ids)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_left_padded_batch_decodes_as_each_row_alone(kind):
    model = hybrid("middle", kind)
    short, long = token_blocks(1, 5, seed=3), token_blocks(1, 8, seed=4)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1), long])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    settings = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    for cache in (None, LinearAttentionCache()):
        together = model.generate(batch, attention_mask=mask, past_key_values=cache, **settings)
        assert torch.equal(together[0, 3:], model.generate(short, **settings)[0])
        assert torch.equal(together[1], model.generate(long, **settings)[0])


def test_cache_bytes_count_the_states_and_the_keys_and_values():
    model = linearize(tiny_llama3(), LinearizeConfig(softmax_layers=[1]))
    all_linear = LinearAttentionCache()
    linearize(tiny_llama3())(token_blocks(2, 3), past_key_values=all_linear, use_cache=True)
    state = cache_nbytes(all_linear) // 3  # one layer's state, whatever the context length
    for length in (5, 20):
        for cache in (LinearAttentionCache(), DynamicCache(config=model.config)):
            model(token_blocks(2, length), past_key_values=cache, use_cache=True)
            # 2 linear layers' states, plus the softmax layer's keys and values: 2 × batch 2 × 2 key/value heads × T
            # × d 12 × 4 bytes
            assert cache_nbytes(cache) == 2 * state + 2 * 2 * 2 * length * 12 * 4


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_save_load_round_trip_keeps_the_softmax_layers(kind, tmp_path):
    model = hybrid("middle", kind)
    save_linearized(model, tmp_path)
    loaded = load_linearized(tiny_llama3(), tmp_path)
    assert linearize_config(loaded) == linearize_config(model)
    assert linearize_config(loaded).softmax_layers == [1]
    assert attention_classes(loaded) == ["LinearAttention", "LlamaAttention", "LinearAttention"]
    ids = token_blocks(2, 9)
    assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize(
    "value", [[-1], [1, 1], [True], [0.0], "1", 2], ids=["negative", "duplicate", "bool", "float", "str", "int"]
)
def test_bad_indices_are_refused_naming_the_field(value):
    message = re.escape(f"softmax_layers={value!r} is not allowed: expected a list of distinct integers >= 0 or None")
    with pytest.raises(ConfigError, match=message):
        LinearizeConfig(softmax_layers=value)


def test_indices_the_model_lacks_or_all_layers_are_refused_at_conversion():
    with pytest.raises(ConfigError, match=r"softmax_layers=\[1, 3\] is not allowed .* it has 3 attention layers"):
        linearize(tiny_llama3(), LinearizeConfig(softmax_layers=[1, 3]))
    model = tiny_llama3()
    with pytest.raises(ConfigError, match="keeps all 3 attention layers as softmax, leaving none to linearise"):
        linearize(model, LinearizeConfig(softmax_layers=(2, 0, 1)))
    assert attention_classes(model) == ["LlamaAttention"] * 3
    assert LinearizeConfig(softmax_layers=(2, 0)).softmax_layers == [2, 0]


def test_softmax_restored_puts_the_linear_layers_back_even_on_an_error():
    model = linearize(tiny_llama3())
    ids = token_blocks(2, 7)
    all_linear = model(ids).logits
    with pytest.raises(RuntimeError, match="inside"), softmax_restored(model, [0, 2]):
        assert attention_classes(model) == ["LlamaAttention", "LinearAttention", "LlamaAttention"]
        raise RuntimeError("inside")
    assert attention_classes(model) == ["LinearAttention"] * 3
    assert torch.equal(model(ids).logits, all_linear)
    unknown = r"\[3\] are not linearised layers .* its linearised layers are \[0, 1, 2\]"
    with pytest.raises(ConfigError, match=unknown), softmax_restored(model, [1, 3]):
        pass
    assert attention_classes(model) == ["LinearAttention"] * 3


def test_restore_softmax_equals_converting_with_the_layers_listed(tmp_path):
    restored = restore_softmax(linearize(tiny_llama3(), LinearizeConfig(softmax_layers=[0])), [])
    assert linearize_config(restored).softmax_layers == [0]
    restore_softmax(restored, [2])
    converted = linearize(tiny_llama3(), LinearizeConfig(softmax_layers=[0, 2]))
    assert linearize_config(restored) == linearize_config(converted)
    ids = token_blocks(2, 9)
    assert torch.equal(restored(ids).logits, converted(ids).logits)
    save_linearized(restored, tmp_path)
    assert torch.equal(load_linearized(tiny_llama3(), tmp_path)(ids).logits, converted(ids).logits)
    with pytest.raises(ConfigError, match="leaving none linear"):
        restore_softmax(restored, [1])
    assert isinstance(restored.model.layers[1].self_attn, LinearAttention)
