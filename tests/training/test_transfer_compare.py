"""Attention transfer compared before the output projection (``compare="attention"``), on both paths.

The reference runs a separate copy of the original model and records, per attention module, its call arguments and
what entered its output projection; then each linearised layer is called on those arguments with a test-local
pre-hook on its own output projection. Nothing of the library's hooks or cache is shared with it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cases import perturbed_conversion, tiny_gpt2, tiny_llama
from slimtune.errors import ConfigError
from slimtune.linear_attention import LinearizeConfig, linear_attention_layers, linear_attention_parameters, linearize
from slimtune.training.recovery import attention_mse, attention_transfer
from slimtune.training.transfer import TeacherCache, cached_layer_losses, check_cache_size

pytestmark = pytest.mark.usefixtures("one_thread")

PROJECTIONS = {"llama": "o_proj", "gpt2": "c_proj"}
TINY = {"llama": tiny_llama, "gpt2": tiny_gpt2}
CASES = {
    "llama-qmc-window": ("llama", LinearizeConfig(feature_map="dijiang_qmc", window=4, sink_tokens=1, chunk_size=8)),
    "llama-hedgehog-gate": ("llama", LinearizeConfig(feature_map="hedgehog", output_gate=True)),
    "gpt2-hedgehog": ("gpt2", LinearizeConfig(feature_map="hedgehog")),
}


def token_blocks(n: int, length: int) -> torch.Tensor:
    return torch.randint(0, 101, (n, length), generator=torch.Generator().manual_seed(1))


def perturbed(case: str) -> nn.Module:
    """The case's conversion, in eval mode, its added parameters moved off their initial values."""
    arch, config = CASES[case]
    return perturbed_conversion(TINY[arch](), config)


def projection_input_of(module: nn.Module, name: str, args: tuple, kwargs: dict) -> torch.Tensor:
    """What ``module``'s child ``name`` receives while ``module(*args, **kwargs)`` runs (its one call)."""
    seen: list[torch.Tensor] = []
    handle = getattr(module, name).register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0]))
    try:
        module(*args, **kwargs)
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0]


def reference_losses(case: str, model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    arch, _ = CASES[case]
    name = PROJECTIONS[arch]
    original = TINY[arch]()
    calls: list[tuple] = []
    for module in original.modules():
        if type(module).__name__ in ("LlamaAttention", "GPT2Attention"):
            module.register_forward_hook(lambda m, args, kwargs, out: calls.append((args, kwargs)), with_kwargs=True)
            getattr(module, name).register_forward_pre_hook(lambda m, args: calls.append(args[0]))
    with torch.no_grad():
        original(ids, use_cache=False)
    targets, arguments = calls[0::2], calls[1::2]  # the projection runs inside the module's call
    layers = [layer for _, layer in linear_attention_layers(model)]
    losses = []
    for layer, (args, kwargs), target in zip(layers, arguments, targets):
        linear = projection_input_of(layer, name, args, kwargs)
        losses.append(F.mse_loss(linear.float(), target.float()))
    return losses


def grads(model: nn.Module, losses: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(torch.stack(losses).sum(), linear_attention_parameters(model)))


@pytest.mark.parametrize("case", sorted(CASES))
def test_both_paths_compare_what_enters_the_output_projection(case):
    model = perturbed(case)
    ids = token_blocks(3, 13)
    expected = reference_losses(case, model, ids)
    want = grads(model, expected)
    cached = cached_layer_losses(TeacherCache(model, compare="attention"), ids)
    assert [x.item() for x in cached] == pytest.approx([x.item() for x in expected], rel=1e-5)
    for got, ref in zip(grads(model, cached), want):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    hook = attention_mse(model, ids, batch_size=3, compare="attention")
    assert hook == pytest.approx([x.item() for x in expected], rel=1e-5)
    after = attention_mse(model, ids, batch_size=3)
    assert all(abs(a - b) > 1e-3 * b for a, b in zip(after, hook))  # the two comparisons measure different things
    arch, _ = CASES[case]
    for _, layer in linear_attention_layers(model):  # every hook is gone afterwards
        assert not layer._forward_hooks and not getattr(layer, PROJECTIONS[arch])._forward_pre_hooks


def test_training_before_the_projection_follows_the_hook_path_and_lowers_both_errors():
    ids = token_blocks(4, 17)
    runs = {}
    for cached in (True, False):
        model = perturbed("llama-hedgehog-gate")
        before = (sum(attention_mse(model, ids, compare="attention")), sum(attention_mse(model, ids)))
        result = attention_transfer(
            model, ids, steps=12, batch_size=2, lr=2e-2, cached=cached, compare="attention", progress=False
        )
        after = (sum(attention_mse(model, ids, compare="attention")), sum(attention_mse(model, ids)))
        runs[cached] = result.losses
        assert after[0] < 0.9 * before[0] and after[1] < before[1]
    assert runs[True] == pytest.approx(runs[False], rel=1e-4)


def test_an_unknown_comparison_is_refused_naming_the_field():
    model = perturbed("gpt2-hedgehog")
    ids = token_blocks(2, 5)
    for call in (
        lambda: attention_transfer(model, ids, steps=1, batch_size=1, lr=1e-3, compare="logits"),
        lambda: attention_mse(model, ids, compare="logits"),
        lambda: TeacherCache(model, compare="logits"),
    ):
        with pytest.raises(ConfigError, match="compare must be one of \\['output', 'attention'\\], got 'logits'"):
            call()


def test_the_cache_size_check_counts_the_compared_width():
    model = linearize(tiny_llama(), LinearizeConfig(feature_map="hedgehog", output_gate=True))
    ids = token_blocks(1, 1000)
    # per token and layer: q 48 + k, v 2 × 24 + gate input 48 + target (48 either way here) = 192 floats
    gib = 2 * 192 * 4 * 1000 / 2**30
    check_cache_size(model, ids, 1, 1.01 * gib, compare="attention")
    with pytest.raises(ConfigError, match="max_cache_gib"):
        check_cache_size(model, ids, 1, 0.99 * gib, compare="attention")
