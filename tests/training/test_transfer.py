"""The cached attention transfer (``slimtune.training.transfer``) against a written-out reference and the hook path.

The reference runs the original model with hooks on its softmax attention modules, then calls each linearised
layer on the exact arguments its softmax module got there: nothing of the cached path (teacher pass, cached q/k/v,
the layer's tail re-done from ``attend``) is shared with it. Losses and gradients must agree to 1e-5.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cases import perturbed_conversion, tiny_gpt2, tiny_llama
from slimtune.errors import ConfigError
from slimtune.linear_attention import LinearizeConfig, linear_attention_layers, linear_attention_parameters, linearize
from slimtune.training import METRICS_FILE, TrainResult
from slimtune.training.checkpoint import checkpoint_root
from slimtune.training.recovery import attention_mse, attention_transfer
from slimtune.training.transfer import TeacherCache, cached_layer_losses

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"llama": tiny_llama, "gpt2": tiny_gpt2}
CASES = {
    "llama-hedgehog": ("llama", LinearizeConfig(feature_map="hedgehog")),
    "gpt2-hedgehog": ("gpt2", LinearizeConfig(feature_map="hedgehog")),
    "llama-qmc-gate-window": (
        "llama",
        LinearizeConfig(feature_map="dijiang_qmc", output_gate=True, window=4, sink_tokens=1, chunk_size=8),
    ),
}


def token_blocks(n: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 101, (n, length), generator=torch.Generator().manual_seed(seed))


def perturbed(case: str) -> nn.Module:
    """The case's conversion, in eval mode, its added parameters moved off their initial values."""
    arch, config = CASES[case]
    return perturbed_conversion(TINY[arch](), config)


def reference_losses(case: str, model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, MSE(linearised layer on the softmax module's arguments, softmax output), with gradients."""
    arch, _ = CASES[case]
    original = TINY[arch]()
    seen: list[tuple] = []
    for module in original.modules():
        if type(module).__name__ in ("LlamaAttention", "GPT2Attention"):
            module.register_forward_hook(
                lambda m, args, kwargs, out: seen.append((args, kwargs, out[0])), with_kwargs=True
            )
    with torch.no_grad():
        original(ids, use_cache=False)
    layers = [layer for _, layer in linear_attention_layers(model)]
    return [F.mse_loss(layer(*a, **kw)[0].float(), target.float()) for layer, (a, kw, target) in zip(layers, seen)]


def losses_and_grads(model: nn.Module, losses: list[torch.Tensor]) -> tuple[list[float], list[torch.Tensor]]:
    params = linear_attention_parameters(model)
    grads = torch.autograd.grad(torch.stack(losses).sum(), params)
    return [loss.item() for loss in losses], list(grads)


@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_losses_and_gradients_equal_the_reference(case):
    model = perturbed(case)
    ids = token_blocks(3, 13)
    expected, expected_grads = losses_and_grads(model, reference_losses(case, model, ids))
    assert len(expected) == 2 and min(expected) > 0
    got, grads = losses_and_grads(model, cached_layer_losses(TeacherCache(model), ids))
    assert got == pytest.approx(expected, rel=1e-5)
    for grad, want in zip(grads, expected_grads):
        torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-7)


def test_the_cache_runs_each_block_once_alone_and_leaves_the_layers_as_they_were():
    model = perturbed("llama-hedgehog")
    ids = token_blocks(3, 13)
    logits = model(ids, use_cache=False).logits
    forwards: list[int] = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: forwards.append(len(kwargs["input_ids"])), with_kwargs=True
    )
    cache = TeacherCache(model)
    first = cache.layer_tensors(ids[[0, 1, 0]])
    assert forwards == [1, 1] and len(cache) == 2
    again = cache.layer_tensors(ids[[1, 0]])
    assert forwards == [1, 1] and torch.equal(again[0].q, first[0].q[[1, 0]])
    layer = first[0]
    assert layer.q.shape == (3, 4, 13, 12) and layer.k.shape == (3, 2, 13, 12) and layer.target.shape == (3, 13, 48)
    assert layer.x is None and cache.nbytes() == 2 * 2 * (13 * (48 + 2 * 24 + 48)) * 4
    assert all("forward" not in vars(layer) for _, layer in linear_attention_layers(model))
    handle.remove()
    assert torch.equal(model(ids, use_cache=False).logits, logits)


def test_cached_transfer_follows_the_hook_path_step_by_step():
    ids = token_blocks(4, 17)
    runs = {}
    for cached in (True, False):
        model = perturbed("llama-hedgehog")
        result = attention_transfer(model, ids, steps=6, batch_size=2, lr=2e-2, cached=cached, progress=False)
        runs[cached] = (result.losses, linear_attention_parameters(model))
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-4)
    for got, want in zip(runs[True][1], runs[False][1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_cached_transfer_reduces_the_mse_and_restores_the_model():
    model = linearize(tiny_llama(), LinearizeConfig(feature_map="hedgehog"))
    model.train()
    data = token_blocks(4, 19)
    before = attention_mse(model, data)
    result = attention_transfer(model, data, steps=30, batch_size=2, lr=2e-2, progress=False)
    assert sum(attention_mse(model, data)) < 0.8 * sum(before)
    assert len(result.losses) == 30 and result.tokens == 30 * 2 * 19
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_cached_transfer_resumes_exactly(tmp_path):
    def transfer(model: nn.Module, output_dir: Path, **options) -> TrainResult:
        return attention_transfer(
            model, token_blocks(5, 16), steps=6, batch_size=2, lr=2e-2, progress=False,
            output_dir=str(output_dir), checkpoint_every=2, **options,
        )  # fmt: skip

    whole = perturbed("llama-hedgehog")
    result = transfer(whole, tmp_path / "whole")
    lines = [json.loads(line) for line in (tmp_path / "whole" / METRICS_FILE).read_text().splitlines()]
    assert [line["loss"] for line in lines] == result.losses
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    shutil.rmtree(checkpoint_root(tmp_path / "cut") / "step-000006")  # as if killed before step 6's checkpoint
    resumed = perturbed("llama-hedgehog")
    again = transfer(resumed, tmp_path / "cut", resume=True)  # its cache starts empty: blocks 3, 4, 0, 1 anew
    assert again.start_step == 4 and again.losses == result.losses[4:]
    expected = linear_attention_parameters(whole)
    assert all(torch.equal(p, expected[i]) for i, p in enumerate(linear_attention_parameters(resumed)))


def test_a_cache_over_the_limit_is_refused_before_training():
    model = linearize(tiny_llama(), LinearizeConfig(feature_map="hedgehog"))
    before = [p.detach().clone() for p in linear_attention_parameters(model)]
    with pytest.raises(ConfigError, match=r"max_cache_gib=1e-06 is too small .* 4 blocks × 0\.1 MiB"):
        attention_transfer(model, token_blocks(8, 128), steps=2, batch_size=2, lr=1e-2, max_cache_gib=1e-6)
    with pytest.raises(ConfigError, match="max_cache_gib=0 is not allowed: expected a positive number"):
        attention_transfer(model, token_blocks(8, 128), steps=2, batch_size=2, lr=1e-2, max_cache_gib=0)
    assert all(torch.equal(p, b) for p, b in zip(linear_attention_parameters(model), before))
