"""Greedy choice of the layers to keep softmax (``select_softmax_layers_greedy``).

The independent check: every subset's loss is the next-token cross-entropy, written out here, of a fresh model
converted with ``softmax_layers`` = that subset (the conversion seeds its parameters per layer, so all these models
hold the same ones); the greedy path is then found by hand from that table.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from cases import tiny_llama
from slimtune.errors import ConfigError
from slimtune.linear_attention import LinearizeConfig, linear_attention_layers, linearize
from slimtune.training import (
    greedy_candidates,
    greedy_evaluations,
    lm_loss_criterion,
    rank_softmax_layers,
    rank_softmax_layers_by,
    select_softmax_layers_greedy,
    top_softmax_layers,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = LinearizeConfig(window=3, sink_tokens=1, chunk_size=4)
LAYERS = 4


def blocks() -> torch.Tensor:
    return torch.randint(0, 101, (4, 13), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def loss_with_softmax(layers: tuple[int, ...], ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy of a fresh conversion with ``layers`` kept softmax."""
    config = LinearizeConfig(**{**CONFIG.to_dict(), "softmax_layers": list(layers) or None})
    logits = linearize(tiny_llama(layers=LAYERS), config)(ids, use_cache=False).logits[:, :-1]  # [n, T-1, V]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()


def test_each_step_adds_the_layer_whose_softmax_beside_the_chosen_lowers_the_loss_most():
    ids = blocks()
    table = {
        subset: loss_with_softmax(subset, ids)
        for size in range(3)
        for subset in itertools.combinations(range(LAYERS), size)
    }
    expected, kept = [], ()
    for _ in range(2):
        options = {layer: table[tuple(sorted((*kept, layer)))] for layer in range(LAYERS) if layer not in kept}
        best = min(options, key=lambda layer: (options[layer], layer))
        expected.append((best, options[best]))
        kept = (*kept, best)

    model = linearize(tiny_llama(layers=LAYERS), CONFIG)
    before = model(ids).logits
    steps = select_softmax_layers_greedy(model, lm_loss_criterion(model, ids, batch_size=3), k=2, progress=False)

    assert [step.layer for step in steps] == [layer for layer, _ in expected]
    for step, (_, loss) in zip(steps, expected):
        assert step.loss == pytest.approx(loss, rel=1e-5)
    assert steps[0].drop == pytest.approx(table[()] - expected[0][1], abs=1e-5)
    assert steps[1].drop == pytest.approx(expected[0][1] - expected[1][1], abs=1e-5)
    assert top_softmax_layers(steps, 2) == sorted(layer for layer, _ in expected)
    assert [type(layer).__name__ for _, layer in linear_attention_layers(model)] == ["LinearAttention"] * LAYERS
    assert torch.equal(model(ids).logits, before)


def test_its_first_step_is_the_single_layer_ranking_s_best():
    ids = blocks()
    model = linearize(tiny_llama(layers=LAYERS), CONFIG)
    ranking = rank_softmax_layers(model, ids, progress=False)
    (step,) = select_softmax_layers_greedy(model, lm_loss_criterion(model, ids), k=1, progress=False)
    assert (step.layer, step.loss, step.drop) == pytest.approx((ranking[0].layer, ranking[0].loss, ranking[0].drop))


def test_candidates_limit_the_choice_and_cost_one_evaluation_each():
    model = linearize(tiny_llama(layers=LAYERS), CONFIG)
    calls = []
    criterion = lm_loss_criterion(model, blocks())

    def counted() -> float:
        calls.append(1)
        return criterion()

    steps = select_softmax_layers_greedy(model, counted, k=2, candidates=[3, 1, 2], progress=False)
    assert {step.layer for step in steps} <= {1, 2, 3}
    assert len(calls) == 1 + 3 + 2 == greedy_evaluations(3, 2)
    assert greedy_candidates(model, 2, [3, 1, 2]) == [3, 1, 2] and greedy_candidates(model, 4) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"k": 0}, r"k=0 is not allowed: expected an integer in \[1, 4\]"),
        ({"k": 3, "candidates": [0, 1]}, r"k=3 is not allowed: expected an integer in \[1, 2\]"),
        ({"k": True}, "k=True is not allowed"),
        ({"k": 1, "candidates": [0, 9]}, r"\[9\] are not"),
        ({"k": 1, "candidates": [1, 1]}, "some repeat"),
        ({"k": 1, "candidates": [1]}, r"from \[0, 2, 3\] \(\[1\] are not\)"),
    ],
)
def test_careless_settings_are_refused_with_the_field_and_what_is_allowed(settings, message):
    layers = [1] if settings.get("candidates") == [1] else None  # layer 1 kept softmax: no candidate
    model = linearize(tiny_llama(layers=LAYERS), LinearizeConfig(**{**CONFIG.to_dict(), "softmax_layers": layers}))
    with pytest.raises(ConfigError, match=message):
        select_softmax_layers_greedy(model, lm_loss_criterion(model, blocks()), progress=False, **settings)
    with pytest.raises(ConfigError, match=message):  # the same check, for callers that announce the cost first
        greedy_candidates(model, **settings)


def test_a_model_that_is_not_linearised_is_refused():
    model = tiny_llama(layers=2)
    with pytest.raises(ConfigError, match="is not linearised"):
        select_softmax_layers_greedy(model, lambda: 0.0, k=1, progress=False)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_criterion_that_is_not_finite_is_refused_naming_the_layers(value):
    model = linearize(tiny_llama(layers=LAYERS), CONFIG)
    losses = iter([1.0, 0.9, value])
    with pytest.raises(ConfigError, match=rf"returned {value} with softmax restored in layers \[1\]"):
        select_softmax_layers_greedy(model, lambda: next(losses), k=1, progress=False)
    with pytest.raises(ConfigError, match=rf"returned {value} with softmax restored in layers \[\]"):
        rank_softmax_layers_by(model, lambda: value, progress=False)
