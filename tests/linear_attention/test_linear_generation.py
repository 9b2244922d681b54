"""Constant-memory decoding of linearised models: cached steps equal a full forward, ``generate`` works.

Every check runs on the tiny Llama (GQA), Qwen2, Mistral (sliding window 8, which the linear layers do not
use), GPT-NeoX and GPT-2 of ``test_linearize``.
"""

from __future__ import annotations

import pytest
import torch
from test_linearize import TINY, token_blocks
from transformers import DynamicCache

from cases import greedy_by_full_forwards
from slimtune.errors import ConfigError
from slimtune.linear_attention import (
    LinearAttentionCache,
    LinearizeConfig,
    cache_nbytes,
    linear_attention_parameters,
    linearize,
)

CONFIGS = {
    "default": LinearizeConfig(),
    "hedgehog_unshared_gate": LinearizeConfig(feature_map="hedgehog", share_feature_map=False, output_gate=True),
    "official_unnormalised": LinearizeConfig(feature_map="dijiang_official", normalize=False, m=10),
    "performer_no_decay": LinearizeConfig(feature_map="performer", decay=False, m=20, chunk_size=4),
    "dijiang_qmc_window": LinearizeConfig(feature_map="dijiang_qmc", m=24, window=4, sink_tokens=1, chunk_size=5),
    "window_sinks": LinearizeConfig(window=4, sink_tokens=2, window_mix=0.7, chunk_size=3),
    "window_hedgehog_no_decay": LinearizeConfig(feature_map="hedgehog", window=5, decay=False),
}


def randomize_new_parameters(model: torch.nn.Module) -> torch.nn.Module:
    """Move the added parameters off their initial values, so a test also covers trained layers."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in linear_attention_parameters(model):
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return model


def stepwise_logits(model: torch.nn.Module, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits [B, T, V]: ``prefill`` tokens in one call, then one token per call, on one LinearAttentionCache."""
    cache = LinearAttentionCache()
    pieces = [model(ids[:, :prefill], past_key_values=cache, use_cache=True).logits] if prefill else []
    for t in range(prefill, ids.shape[1]):
        pieces.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    assert cache.get_seq_length() == ids.shape[1]
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("arch", sorted(TINY))
def test_cached_decoding_equals_a_full_forward_at_every_position(arch):
    model = randomize_new_parameters(linearize(TINY[arch]()))
    ids = token_blocks(2, 17)
    full = model(ids, use_cache=False).logits
    for prefill in (0, 1, 9):
        torch.testing.assert_close(stepwise_logits(model, ids, prefill), full, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cached_decoding_matches_for_every_layer_variant(name):
    model = randomize_new_parameters(linearize(TINY["llama"](), CONFIGS[name]))
    ids = token_blocks(2, 13)
    torch.testing.assert_close(stepwise_logits(model, ids, 4), model(ids, use_cache=False).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("arch", sorted(TINY))
def test_generate_equals_greedy_decoding_by_full_forwards(arch):
    model = randomize_new_parameters(linearize(TINY[arch]()))
    prompt = token_blocks(2, 6)
    ids = greedy_by_full_forwards(model, prompt, 7)
    settings = {"max_new_tokens": 7, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(model.generate(prompt, **settings), ids)
    assert torch.equal(model.generate(prompt, past_key_values=LinearAttentionCache(), **settings), ids)


def test_the_state_size_does_not_grow_with_the_context():
    model = linearize(TINY["llama"]())
    sizes = {}
    for length in (3, 40):
        cache = LinearAttentionCache()
        model(token_blocks(2, length), past_key_values=cache, use_cache=True)
        sizes[length] = cache.nbytes()
        model(token_blocks(2, 1), past_key_values=cache, use_cache=True)
        assert cache.nbytes() == sizes[length] and cache.get_seq_length() == length + 1
    # 2 layers × batch 2 × 4 heads × (m 12 × (d 12 + 1 for the normaliser) + 1 shift) × 4 bytes
    assert sizes[3] == sizes[40] == 2 * 2 * 4 * (12 * 13 + 1) * 4
    dynamic = DynamicCache(config=model.config)
    model(token_blocks(2, 40), past_key_values=dynamic, use_cache=True)
    assert cache_nbytes(dynamic) == sizes[40] and dynamic.get_seq_length() == 40


def test_the_window_state_stops_growing_at_the_window():
    model = linearize(TINY["llama"](), LinearizeConfig(window=6, sink_tokens=2))
    sizes = []
    for length in (10, 11, 40):
        cache = LinearAttentionCache()
        model(token_blocks(2, length), past_key_values=cache, use_cache=True)
        sizes.append(cache.nbytes())
    # 2 layers × batch 2 × 4 heads × (S: m 12 × (d 12 + 1) + 1 shift, window 6 × (k 12 + v 12 + φk 12 + 1 log
    # scale), sinks 2 × 24) × 4 bytes, plus the validity flags: 2 layers × batch 2 × (6 + 2) bytes
    assert sizes == [2 * 2 * 4 * (12 * 13 + 1 + 6 * 37 + 2 * 24) * 4 + 2 * 2 * 8] * 3


@pytest.mark.parametrize("config", [LinearizeConfig(), LinearizeConfig(window=4)], ids=["linear", "window"])
def test_left_padding_gives_the_unpadded_result(config):
    model = randomize_new_parameters(linearize(TINY["llama"](), config))
    short, long = token_blocks(1, 5, seed=3), token_blocks(1, 8, seed=4)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1), long])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    settings = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    together = model.generate(batch, attention_mask=mask, **settings)
    assert torch.equal(together[0, 3:], model.generate(short, **settings)[0])
    assert torch.equal(together[1], model.generate(long, **settings)[0])


def test_beam_search_runs_and_a_used_kv_cache_or_a_rollback_is_refused():
    model = linearize(TINY["gpt2"]())
    out = model.generate(token_blocks(2, 5), max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 9)
    cache = LinearAttentionCache()
    model(token_blocks(1, 4), past_key_values=cache, use_cache=True)
    with pytest.raises(RuntimeError, match="cannot be rolled back"):
        cache.crop(-1)
    softmax_model = TINY["gpt2"]()
    filled = DynamicCache(config=softmax_model.config)
    softmax_model(token_blocks(1, 4), past_key_values=filled, use_cache=True)
    with pytest.raises(ConfigError, match="already holding 4 tokens of keys/values"):
        model(token_blocks(1, 1), past_key_values=filled, use_cache=True)
