"""Ranking linearised layers by retrieval (``rank_softmax_layers_for_retrieval``).

The independent check: the passkey loss reported for layer i is −log p(key | prompt), gathered here from the logits
of a fresh model converted with ``softmax_layers=[i]``, averaged over the prompts the ranking's seed gives.
"""

from __future__ import annotations

import pytest
import torch

from cases import tiny_llama
from slimtune.errors import ConfigError
from slimtune.linear_attention import LinearizeConfig, linearize
from slimtune.training import rank_softmax_layers_for_retrieval
from slimtune.training.layer_ranking import RETRIEVAL_SEED
from slimtune.training.long_context import passkey_prompt
from train_script import save_tiny_folder

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = LinearizeConfig(window=4, sink_tokens=1, chunk_size=8)
LENGTH = 280


@pytest.fixture(scope="module")
def chars(tmp_path_factory):
    """The character tokenizer of the CLI tests' tiny folder: one token per printable character, no BOS."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(save_tiny_folder(tmp_path_factory.mktemp("tiny")))


def converted(softmax_layers: list[int] | None = None) -> torch.nn.Module:
    model = tiny_llama(layers=3)
    model.config.max_position_embeddings = 1024
    return linearize(model, LinearizeConfig(**{**CONFIG.to_dict(), "softmax_layers": softmax_layers}))


@torch.no_grad()
def key_nll(model: torch.nn.Module, chars, keys: list[int]) -> float:
    """Mean over the prompts (depths 0.1, 0.5, 0.9 × ``keys``) of −Σ_j log p(key_j | prompt, key_<j)."""
    total, count = 0.0, 0
    for depth in (0.1, 0.5, 0.9):
        for key in keys[:2] if depth == 0.1 else keys[2:4] if depth == 0.5 else keys[4:]:
            prompt, answer, _ = passkey_prompt(chars, LENGTH, depth, key)
            ids = torch.cat([prompt, answer])[None]
            logp = model(ids, use_cache=False).logits[0].float().log_softmax(-1)  # [T + A, V]
            positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(answer))
            total -= logp[positions, answer].sum().item()
            count += 1
    return total / count


def test_each_layer_s_passkey_loss_is_that_of_a_model_converted_with_only_it_softmax(chars):
    model = converted()
    keys = torch.randint(10000, 100000, (6,), generator=torch.Generator().manual_seed(RETRIEVAL_SEED)).tolist()
    probe = torch.randint(0, 101, (1, 9))
    before = model(probe).logits
    model.train()
    ranking = rank_softmax_layers_for_retrieval(model, chars, lengths=(LENGTH,), progress=False)
    assert model.training and torch.equal(model.eval()(probe).logits, before)
    all_linear = key_nll(converted(), chars, keys)
    for rank in ranking:
        expected = key_nll(converted([rank.layer]), chars, keys)
        assert rank.loss == pytest.approx(expected, rel=1e-5)
        assert rank.drop == pytest.approx(all_linear - expected, abs=1e-4)
    assert sorted(rank.layer for rank in ranking) == [0, 1, 2]
    assert [rank.drop for rank in ranking] == sorted((rank.drop for rank in ranking), reverse=True)
    assert len({round(rank.loss, 6) for rank in ranking}) == 3


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"lengths": ()}, "lengths=[] and depths=[0.1, 0.5, 0.9] must both be non-empty"),
        ({"keys_per_cell": 0}, "keys_per_cell=0 is not allowed"),
        ({"lengths": (2000,)}, "lengths"),
        ({"lengths": (40,)}, "total_tokens=40"),
        ({"depths": (1.5,)}, "depth"),
    ],
)
def test_careless_ranking_settings_are_refused(chars, settings, message):
    with pytest.raises(ConfigError, match=message.replace("[", "\\[").replace("]", "\\]")):
        rank_softmax_layers_for_retrieval(converted(), chars, **{"lengths": (LENGTH,), **settings}, progress=False)
    with pytest.raises(ConfigError, match="LlamaForCausalLM is not linearised: call linearize"):
        rank_softmax_layers_for_retrieval(tiny_llama(), chars, lengths=(LENGTH,), progress=False)
