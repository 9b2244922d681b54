"""Gradient checkpointing (HF ``activation_checkpointing_enable``, non-reentrant) with every adapter: the same
gradients as without it, Bat-Col's custom autograd function included, and training that ends with the same
weights, also with dropout (checkpointing replays the forward's RNG state)."""

from __future__ import annotations

import pytest
import torch

import slimtune as st
from cases import CASES, adapted_copy, randomize_adapters, tiny_gpt2, tiny_llama
from slimtune.training import TrainConfig, train
from slimtune.training.loop import enable_gradient_checkpointing
from train_script import token_blocks

pytestmark = pytest.mark.usefixtures("one_thread")
MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def trainable_grads(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of the trainable tensors for the causal-LM loss on ``ids``, dropout masks drawn from seed 0 (the
    tiny GPT-2 has dropout 0.1; checkpointing must replay the same masks in its recomputation)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    model(input_ids=ids, labels=ids).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("case", list(CASES))
def test_checkpointed_gradients_equal_the_plain_ones(case, kind):
    model = adapted_copy(MODELS[kind](), CASES[case])
    randomize_adapters(model)  # away from the zero init, so every adapter tensor gets a gradient
    model.train()
    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(3))
    plain = trainable_grads(model, ids)
    enable_gradient_checkpointing(model)
    assert model.is_activation_checkpointing
    checkpointed = trainable_grads(model, ids)
    assert plain.keys() == checkpointed.keys() and plain
    for name, grad in plain.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_training_with_dropout_ends_with_the_same_weights():
    blocks = token_blocks(12, seed=0)
    weights = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = st.get_adapted_model(tiny_llama(), st.LoraConfig(r=4, dropout=0.2))
        config = TrainConfig(steps=3, lr=1e-2, progress=False, gradient_checkpointing=checkpointing)
        train(model, blocks, config)
        weights.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, rtol=1e-5, atol=1e-7, msg=name)


def test_a_model_without_hf_checkpointing_is_refused():
    from cases import tiny_mlp

    with pytest.raises(st.ConfigError, match="gradient_checkpointing=True is not allowed for TinyMLP"):
        enable_gradient_checkpointing(st.get_adapted_model(tiny_mlp(), st.LoraConfig(r=4)))
