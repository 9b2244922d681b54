"""The softmax-window hybrid on the real SmolLM2-135M and BBC News text (default suite, about 20 s on 2 cores)."""

from __future__ import annotations

import math

import pytest
import torch

from slimtune.app.corpus import lm_blocks
from slimtune.app.models import load_smollm2
from slimtune.linear_attention import LinearAttentionCache, LinearizeConfig, linearize
from slimtune.training import evaluate_lm


@pytest.mark.usefixtures("one_thread")
def test_an_untrained_hybrid_keeps_perplexity_within_one_and_a_half_times_and_decodes_like_a_full_forward():
    model, tokenizer = load_smollm2(dtype=torch.float32)
    held_out = lm_blocks(tokenizer, split="validation", seq_len=256, max_blocks=2)
    original = math.exp(evaluate_lm(model, held_out))
    linear = linearize(model, LinearizeConfig(window=64, sink_tokens=4))  # in place
    hybrid = math.exp(evaluate_lm(linear, held_out))
    assert hybrid <= 1.5 * original, (original, hybrid)

    ids = held_out[:1, :200]
    with torch.no_grad():
        full = linear(ids, use_cache=False).logits[:, 149:]  # [1, 51, V], positions 149 … 199
        cache = LinearAttentionCache()
        steps = [linear(ids[:, :150], past_key_values=cache, use_cache=True).logits[:, -1:]]
        steps += [linear(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(150, 200)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-3)
