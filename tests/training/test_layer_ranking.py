"""Ranking linearised layers for a layer-selective hybrid (``slimtune.training.layer_ranking``).

The independent check: the loss reported for layer i is the next-token cross-entropy, written out here, of a fresh
model converted with ``softmax_layers=[i]`` (the conversion's new parameters are seeded per layer, so both models
hold the same ones).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cases import tiny_llama
from slimtune.errors import ConfigError
from slimtune.linear_attention import LinearizeConfig, linear_attention_layers, linearize
from slimtune.training import LayerRank, rank_softmax_layers, top_softmax_layers

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = LinearizeConfig(window=3, sink_tokens=1, chunk_size=4)


def blocks(n: int = 5, length: int = 11) -> torch.Tensor:
    return torch.randint(0, 101, (n, length), generator=torch.Generator().manual_seed(5))


@torch.no_grad()
def next_token_loss(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """Mean cross-entropy of token t+1 given tokens ≤ t, over every position of every block."""
    logits = model(ids, use_cache=False).logits[:, :-1]  # [n, T-1, V]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()


def test_each_layer_s_loss_is_that_of_a_model_converted_with_only_it_softmax():
    model = linearize(tiny_llama(layers=3), CONFIG)
    ids = blocks()
    before = model(ids).logits
    ranking = rank_softmax_layers(model, ids, batch_size=2)
    all_linear = next_token_loss(linearize(tiny_llama(layers=3), CONFIG), ids)
    for rank in ranking:
        alone = LinearizeConfig(**{**CONFIG.to_dict(), "softmax_layers": [rank.layer]})
        expected = next_token_loss(linearize(tiny_llama(layers=3), alone), ids)
        assert rank.loss == pytest.approx(expected, rel=1e-5)
        assert rank.drop == pytest.approx(all_linear - expected, abs=1e-5)
    assert sorted(rank.layer for rank in ranking) == [0, 1, 2]
    assert [rank.drop for rank in ranking] == sorted((rank.drop for rank in ranking), reverse=True)
    assert len({rank.loss for rank in ranking}) == 3
    assert [type(layer).__name__ for _, layer in linear_attention_layers(model)] == ["LinearAttention"] * 3
    assert torch.equal(model(ids).logits, before)


def test_only_linearised_layers_are_ranked():
    model = linearize(tiny_llama(layers=3), LinearizeConfig(softmax_layers=[1]))
    assert sorted(rank.layer for rank in rank_softmax_layers(model, blocks())) == [0, 2]
    with pytest.raises(ConfigError, match="is not linearised"):
        rank_softmax_layers(tiny_llama(), blocks())


def test_top_softmax_layers_takes_the_first_k_in_ascending_order():
    ranking = [LayerRank(4, 2.0, 0.5), LayerRank(1, 2.1, 0.4), LayerRank(3, 2.4, 0.1)]
    assert top_softmax_layers(ranking, 2) == [1, 4]
    assert top_softmax_layers(ranking, 0) == []
    for k in (4, -1, True, 1.0):
        with pytest.raises(ConfigError, match=rf"k={k!r} is not allowed: expected an integer in \[0, 3\]"):
            top_softmax_layers(ranking, k)
