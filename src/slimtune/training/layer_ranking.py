"""Which linearised layers most deserve their softmax attention back: a loss of the model with each one restored in
turn (:func:`slimtune.linear_attention.softmax_restored`), against the all-linear loss. Two criteria:

- :func:`rank_softmax_layers`: the held-out LM loss (:func:`evaluate_lm`), for perplexity;
- :func:`rank_softmax_layers_for_retrieval`: the passkey loss, the mean negative log-likelihood of the key over
  passkey prompts whose needle lies beyond the softmax window (:func:`slimtune.training.long_context.score_answer`),
  for retrieval: the LM loss of ordinary text hardly depends on tokens a window does not see, so it does not find
  the layers that fetch them.

A layer-selective hybrid keeps the top k as softmax (``LinearizeConfig.softmax_layers``, or
:func:`slimtune.linear_attention.restore_softmax` on the ranked model). Ranking costs one evaluation per linearised
layer, plus one.

The top k of single-layer gains ignores how layers work together (a retrieval circuit spans several layers):
:func:`select_softmax_layers_greedy` adds one layer at a time, the one whose softmax restored beside those chosen
lowers the loss most, at about k evaluations per layer. Its loss is either criterion: :func:`lm_loss_criterion` or
:func:`passkey_loss_criterion`. All of this lives in training, not in the core, because it evaluates losses.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from slimtune.config import check_int
from slimtune.errors import ConfigError
from slimtune.linear_attention import linear_attention_layers, linearize_config, softmax_restored
from slimtune.training.evaluate import evaluate_lm
from slimtune.training.long_context import check_context, passkey_prompt, score_answer

RETRIEVAL_SEED = 1_000_003  # the ranking's keys; evaluations draw theirs from small seeds (passkey_accuracy: 0)


@dataclasses.dataclass(frozen=True)
class LayerRank:
    """One linearised layer: its index, the loss (held-out LM loss, or passkey loss) with only it restored to
    softmax attention, and the drop from the all-linear loss (positive: restoring it helps)."""

    layer: int
    loss: float
    drop: float


def lm_loss_criterion(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> Callable[[], float]:
    """A criterion for the ranking functions: the held-out LM loss of ``model`` on ``blocks`` [n, T] token ids,
    evaluated in batches of ``batch_size`` (:func:`evaluate_lm`)."""
    return lambda: evaluate_lm(model, blocks, batch_size)


def passkey_loss_criterion(
    model: nn.Module,
    tokenizer: Any,
    lengths: Sequence[int] = (1024,),
    depths: Sequence[float] = (0.1, 0.5, 0.9),
    keys_per_cell: int = 2,
    seed: int = RETRIEVAL_SEED,
) -> Callable[[], float]:
    """A criterion for the ranking functions: the passkey loss of ``model``, the mean over prompts of
    −log p(key | prompt), in eval mode (the model's mode is restored afterwards).

    ``keys_per_cell`` prompts per (length, depth) (:func:`passkey_prompt`), keys drawn from 10000 .. 99999 by a
    generator seeded with ``seed`` (by default one no evaluation uses, so a ranking does not see the test's keys).
    Every call scores the same prompts. Every needle should lie beyond the softmax window (lengths well above it),
    or the window alone retrieves it.

    Raises:
        ConfigError: ``model`` is not linearised; empty or invalid ``lengths`` / ``depths``; a length above the
            model's context or too short for the prompt; ``keys_per_cell`` < 1.
    """
    linearize_config(model)
    if not lengths or not depths:
        raise ConfigError(f"lengths={list(lengths)} and depths={list(depths)} must both be non-empty")
    check_int("keys_per_cell", keys_per_cell)
    check_int("seed", seed, minimum=0)
    check_context(model, "lengths", max(lengths))
    generator = torch.Generator().manual_seed(seed)
    prompts = [
        passkey_prompt(tokenizer, length, depth, key)
        for length in lengths
        for depth in depths
        for key in torch.randint(10000, 100000, (keys_per_cell,), generator=generator).tolist()
    ]

    def passkey_loss() -> float:
        was_training = model.training
        model.eval()
        try:
            return -sum(score_answer(model, p.input_ids, p.answer_ids)[1] for p in prompts) / len(prompts)
        finally:
            model.train(was_training)

    return passkey_loss


def rank_softmax_layers(
    model: nn.Module, blocks: torch.Tensor, batch_size: int = 4, progress: bool = True
) -> list[LayerRank]:
    """One :class:`LayerRank` per linearised layer of ``model``, largest drop first (ties: lower index first), by
    the held-out LM loss on ``blocks`` [n, T] (:func:`lm_loss_criterion`).

    The model is left as it was, also on an error. ``progress``: a tqdm bar over the evaluations (on stderr).

    Raises:
        ConfigError: ``model`` is not linearised, or bad ``blocks``.
    """
    return rank_softmax_layers_by(model, lm_loss_criterion(model, blocks, batch_size), progress)


def rank_softmax_layers_for_retrieval(
    model: nn.Module,
    tokenizer: Any,
    lengths: Sequence[int] = (1024,),
    depths: Sequence[float] = (0.1, 0.5, 0.9),
    keys_per_cell: int = 2,
    seed: int = RETRIEVAL_SEED,
    progress: bool = True,
) -> list[LayerRank]:
    """As :func:`rank_softmax_layers`, by the passkey loss (:func:`passkey_loss_criterion`, whose arguments these
    are, and whose errors it raises).
    """
    criterion = passkey_loss_criterion(model, tokenizer, lengths, depths, keys_per_cell, seed)
    return rank_softmax_layers_by(model, criterion, progress)


def select_softmax_layers_greedy(
    model: nn.Module,
    criterion: Callable[[], float],
    k: int,
    candidates: Sequence[int] | None = None,
    progress: bool = True,
) -> list[LayerRank]:
    """Choose ``k`` linearised layers of ``model`` to keep softmax, one at a time: each step restores, beside those
    already chosen, the candidate that gives the lowest ``criterion()`` (ties: lower index first).

    Returns one :class:`LayerRank` per step, in the order chosen: ``loss`` is the criterion with the layers chosen
    so far restored, ``drop`` what that step gained over the step before (the first: over the all-linear model), so
    :func:`top_softmax_layers` on it gives the first k chosen. ``candidates``: the layer indices to choose from
    (default: every linearised layer), e.g. the best of a single-layer ranking, to save evaluations: it costs
    :func:`greedy_evaluations` of them. The model is left as it was, also on an error.

    Raises:
        ConfigError: ``model`` is not linearised; a candidate that is not one of its linearised layers, or a
            repeated one; ``k`` not in [1, number of candidates]; ``criterion()`` returns NaN or ±inf.
    """
    pool = greedy_candidates(model, k, candidates)
    evaluations = greedy_evaluations(len(pool), k)
    chosen: list[LayerRank] = []
    with tqdm(total=evaluations, desc="choosing layers", unit="eval", disable=not progress) as bar:
        previous = _finite(criterion(), [])
        bar.update()
        for _ in range(k):
            kept = [rank.layer for rank in chosen]
            trials = []
            for index in sorted(set(pool) - set(kept)):
                with softmax_restored(model, [*kept, index]):
                    trials.append((_finite(criterion(), [*kept, index]), index))
                bar.update()
            loss, index = min(trials)
            chosen.append(LayerRank(layer=index, loss=loss, drop=previous - loss))
            previous = loss
    return chosen


def greedy_candidates(model: nn.Module, k: int, candidates: Sequence[int] | None = None) -> list[int]:
    """The layers :func:`select_softmax_layers_greedy` would choose ``k`` from, checked as it checks them:
    ``candidates`` as a list, or every linearised layer of ``model`` (None). For callers that report the cost
    (:func:`greedy_evaluations`) before the search starts.

    Raises:
        ConfigError: ``model`` is not linearised; a candidate that is not one of its linearised layers, or a
            repeated one; ``k`` not in [1, number of candidates].
    """
    linearize_config(model)
    linearised = [layer.layer_idx for _, layer in linear_attention_layers(model)]
    pool = list(linearised if candidates is None else candidates)
    unknown = sorted(set(pool) - set(linearised))
    if unknown or len(set(pool)) != len(pool):
        raise ConfigError(
            f"candidates={list(pool)} is not allowed: expected distinct indices of linearised layers, from "
            f"{linearised}" + (f" ({unknown} are not)" if unknown else " (some repeat)")
        )
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(pool):
        raise ConfigError(f"k={k!r} is not allowed: expected an integer in [1, {len(pool)}] (the candidates)")
    return pool


def greedy_evaluations(candidates: int, k: int) -> int:
    """Criterion evaluations of a greedy choice of ``k`` from ``candidates`` layers: the all-linear model, then at
    step i each candidate not yet chosen, 1 + Σ_{i<k} (candidates − i)."""
    return 1 + sum(candidates - i for i in range(k))


def rank_softmax_layers_by(model: nn.Module, criterion: Callable[[], float], progress: bool = True) -> list[LayerRank]:
    """As :func:`rank_softmax_layers`, by any ``criterion()`` (lower is better): evaluated for the all-linear model,
    then with each linearised layer's softmax restored alone.

    Raises:
        ConfigError: ``model`` is not linearised, or ``criterion()`` returns NaN or ±inf.
    """
    linearize_config(model)
    indices = [layer.layer_idx for _, layer in linear_attention_layers(model)]
    with tqdm(total=len(indices) + 1, desc="ranking layers", unit="eval", disable=not progress) as bar:
        base = _finite(criterion(), [])
        bar.update()
        ranking = []
        for index in indices:
            with softmax_restored(model, [index]):
                value = _finite(criterion(), [index])
            ranking.append(LayerRank(layer=index, loss=value, drop=base - value))
            bar.update()
    return sorted(ranking, key=lambda rank: (-rank.drop, rank.layer))


def _finite(value: float, restored: list[int]) -> float:
    """``value`` if it is a finite number, else a :class:`ConfigError` naming the layers that were softmax."""
    if not math.isfinite(value):
        raise ConfigError(
            f"the criterion returned {value} with softmax restored in layers {sorted(restored)}: expected a finite "
            "loss (a NaN or infinite loss: check the model's weights and the data)"
        )
    return value


def top_softmax_layers(ranking: list[LayerRank], k: int) -> list[int]:
    """The layer indices of the first ``k`` records of ``ranking``, in ascending order (a ``softmax_layers`` value).

    Raises:
        ConfigError: ``k`` is not an int in [0, len(ranking)].
    """
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= len(ranking):
        raise ConfigError(f"k={k!r} is not allowed: expected an integer in [0, {len(ranking)}] (the ranked layers)")
    return sorted(rank.layer for rank in ranking[:k])
