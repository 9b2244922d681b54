"""Which linearised layers most deserve their softmax attention back: the held-out LM loss of the model with each
one restored in turn (:func:`slimtune.linear_attention.softmax_restored`), against the all-linear loss.

A layer-selective hybrid keeps the top k as softmax (``LinearizeConfig.softmax_layers``, or
:func:`slimtune.linear_attention.restore_softmax` on the ranked model). Ranking costs one evaluation per linearised
layer, plus one. It lives in training, not in the core, because it evaluates a loss (:func:`evaluate_lm`).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from tqdm import tqdm

from slimtune.errors import ConfigError
from slimtune.linear_attention import linear_attention_layers, linearize_config, softmax_restored
from slimtune.training.evaluate import evaluate_lm


@dataclasses.dataclass(frozen=True)
class LayerRank:
    """One linearised layer: its index, the held-out loss with only it restored to softmax attention, and the
    drop from the all-linear loss (positive: restoring it helps)."""

    layer: int
    loss: float
    drop: float


def rank_softmax_layers(
    model: nn.Module, blocks: torch.Tensor, batch_size: int = 4, progress: bool = True
) -> list[LayerRank]:
    """One :class:`LayerRank` per linearised layer of ``model``, largest drop first (ties: lower index first).

    ``blocks`` [n, T] token ids, evaluated in batches of ``batch_size`` (:func:`evaluate_lm`); the model is left
    as it was, also on an error. ``progress``: a tqdm bar over the evaluations (on stderr).

    Raises:
        ConfigError: ``model`` is not linearised, or bad ``blocks``.
    """
    linearize_config(model)
    indices = [layer.layer_idx for _, layer in linear_attention_layers(model)]
    with tqdm(total=len(indices) + 1, desc="ranking layers", unit="eval", disable=not progress) as bar:
        base = evaluate_lm(model, blocks, batch_size)
        bar.update()
        ranking = []
        for index in indices:
            with softmax_restored(model, [index]):
                loss = evaluate_lm(model, blocks, batch_size)
            ranking.append(LayerRank(layer=index, loss=loss, drop=base - loss))
            bar.update()
    return sorted(ranking, key=lambda rank: (-rank.drop, rank.layer))


def top_softmax_layers(ranking: list[LayerRank], k: int) -> list[int]:
    """The layer indices of the first ``k`` records of ``ranking``, in ascending order (a ``softmax_layers`` value).

    Raises:
        ConfigError: ``k`` is not an int in [0, len(ranking)].
    """
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= len(ranking):
        raise ConfigError(f"k={k!r} is not allowed: expected an integer in [0, {len(ranking)}] (the ranked layers)")
    return sorted(rank.layer for rank in ranking[:k])
