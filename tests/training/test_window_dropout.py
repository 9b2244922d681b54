"""Scheduled sliding-window dropout (``slimtune.training.window_dropout``) and ``finetune(window_dropout=...)``."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from cases import tiny_llama
from slimtune.errors import ConfigError
from slimtune.linear_attention import LinearizeConfig, linear_attention_layers, linear_attention_parameters, linearize
from slimtune.training.checkpoint import checkpoint_root
from slimtune.training.recovery import finetune
from slimtune.training.window_dropout import dropout_probability, dropped_windows

pytestmark = pytest.mark.usefixtures("one_thread")

HYBRID = LinearizeConfig(feature_map="hedgehog", window=4, sink_tokens=1, chunk_size=8)


def token_blocks(n: int = 6, length: int = 13) -> torch.Tensor:
    return torch.randint(0, 101, (n, length), generator=torch.Generator().manual_seed(0))


def flags(model: nn.Module) -> list[bool]:
    return [layer.drop_window for _, layer in linear_attention_layers(model)]


def test_the_probability_decays_linearly_to_zero_and_the_draws_follow_it():
    assert [dropout_probability(0.5, s, 10) for s in (0, 5, 9)] == pytest.approx([0.5, 0.25, 0.05])
    assert dropped_windows(0.3, 7, 100, 4, seed=3) == dropped_windows(0.3, 7, 100, 4, seed=3)
    draws = [drop for step in range(500) for drop in dropped_windows(0.6, 0, 1000, 4, seed=1 + step)]
    assert sum(draws) / len(draws) == pytest.approx(0.6, abs=0.05)
    late = [drop for step in range(900, 1000) for drop in dropped_windows(0.6, step, 1000, 4, seed=0)]
    assert sum(late) / len(late) < 0.1
    assert not any(dropped_windows(0.0, 0, 10, 50, seed=0))


def test_a_dropped_window_in_training_mode_is_the_pure_linear_conversion_of_the_same_weights():
    hybrid = linearize(tiny_llama(), HYBRID)
    pure = linearize(tiny_llama(), LinearizeConfig(feature_map="hedgehog", chunk_size=8))
    with torch.no_grad():
        for p in linear_attention_parameters(hybrid):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    missing, unexpected = pure.load_state_dict(hybrid.state_dict(), strict=False)
    assert not missing and all("window_mix_log" in name for name in unexpected)
    ids = token_blocks(2, 19)
    hybrid.train(), pure.train()
    for _, layer in linear_attention_layers(hybrid):
        layer.drop_window = True
    logits = pure(ids, use_cache=False).logits
    torch.testing.assert_close(hybrid(ids, use_cache=False).logits, logits, rtol=0, atol=0)
    assert not torch.allclose(hybrid(ids).logits, logits)  # with a cache (HF's default), the window stays
    hybrid.eval()
    assert not torch.allclose(hybrid(ids, use_cache=False).logits, logits)  # and in eval mode


def test_finetune_drops_the_drawn_windows_each_step_and_leaves_every_flag_false():
    model = linearize(tiny_llama(), HYBRID)
    seen: list[list[bool]] = []
    caches: list[object] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(flags(module)))
    for _, layer in linear_attention_layers(model):  # a layer drops its window only without a cache
        layer.register_forward_pre_hook(lambda m, a, kwargs: caches.append(kwargs["past_key_values"]), with_kwargs=True)
    model, result = finetune(model, token_blocks(), steps=8, batch_size=2, lr=1e-3, window_dropout=0.7, seed=5)
    assert seen == [dropped_windows(0.7, step, 8, 2, seed=5) for step in range(8)]
    assert len(caches) == 16 and all(cache is None for cache in caches)
    assert any(any(step) for step in seen) and not all(all(step) for step in seen)
    assert flags(model) == [False, False] and len(result.losses) == 8


def test_finetune_with_window_dropout_resumes_exactly(tmp_path):
    def tune(output_dir, **options):
        model = linearize(tiny_llama(), HYBRID)
        finetune(
            model, token_blocks(), steps=6, batch_size=2, lr=1e-2, window_dropout=0.5, seed=1, progress=False,
            output_dir=str(output_dir), checkpoint_every=2, **options,
        )  # fmt: skip
        return linear_attention_parameters(model)

    whole = tune(tmp_path / "whole")
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    shutil.rmtree(checkpoint_root(tmp_path / "cut") / "step-000006")
    resumed = tune(tmp_path / "cut", resume=True)
    assert all(torch.equal(a, b) for a, b in zip(resumed, whole))


@pytest.mark.parametrize("value", [1.0, -0.1, float("nan"), True])
def test_window_dropout_outside_0_1_is_refused_naming_the_field(value):
    with pytest.raises(ConfigError, match=r"window_dropout=.* is not allowed: expected a number in \[0, 1\)"):
        finetune(linearize(tiny_llama(), HYBRID), token_blocks(), steps=1, batch_size=1, lr=1e-3, window_dropout=value)


def test_window_dropout_without_a_windowed_layer_is_refused_before_any_change():
    model = linearize(tiny_llama(), LinearizeConfig(feature_map="hedgehog"))
    with pytest.raises(ConfigError, match=r"window_dropout=0\.2 is not allowed .* no LinearAttention layer with a"):
        finetune(model, token_blocks(), steps=1, batch_size=1, lr=1e-3, window_dropout=0.2)
    assert all(p.requires_grad for p in model.parameters())
