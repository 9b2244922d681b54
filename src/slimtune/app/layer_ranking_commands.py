"""``slimtune linearize --rank-layers K``: rank the linearised layers by what restoring each one's softmax attention
gains on the held-out blocks (:func:`slimtune.training.rank_softmax_layers`), print the ranking, and keep the best K
as softmax attention (:func:`slimtune.linear_attention.restore_softmax`) before recovery training."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimtune.errors import ConfigError

RANK_LAYERS_HELP = (
    "rank the linearised layers by the held-out loss with each one's softmax attention restored (one evaluation per "
    "layer) and keep the best K as softmax attention before training, besides any --softmax-layers (a "
    "layer-selective hybrid; 0: only print the ranking; needs held-out data)"
)


def keep_best_softmax_layers(
    model: nn.Module, blocks: torch.Tensor | None, k: int, batch_size: int
) -> list[dict[str, Any]]:
    """Rank the linearised layers of ``model`` on ``blocks`` [n, T], print the ranking and restore the top ``k`` to
    softmax attention for good; returns the ranking as JSON records (layer, loss, drop, kept).

    Raises:
        ConfigError: no held-out ``blocks``, or ``k`` not in [0, linearised layers − 1] (one must stay linear).
    """
    from slimtune.linear_attention import linear_attention_layers, restore_softmax
    from slimtune.training import rank_softmax_layers, top_softmax_layers

    count = len(list(linear_attention_layers(model)))
    if not 0 <= k < count:
        raise ConfigError(
            f"--rank-layers {k} is not allowed: this model has {count} linearised layers and at least one must stay "
            f"linear; expected an integer in [0, {count - 1}]"
        )
    if blocks is None:
        raise ConfigError("--rank-layers needs held-out data to rank the layers on: pass --eval-data (or --data bbc)")
    print(f"ranking {count} linearised layers on {len(blocks)} held-out blocks ({count + 1} evaluations)")
    ranking = rank_softmax_layers(model, blocks, batch_size)
    kept = top_softmax_layers(ranking, k)
    print("| layer | loss with its softmax restored | drop vs all-linear | kept as softmax |")
    print("|---:|---:|---:|:---:|")
    for rank in ranking:
        print(f"| {rank.layer} | {rank.loss:.4f} | {rank.drop:+.4f} | {'yes' if rank.layer in kept else ''} |")
    restore_softmax(model, kept)
    return [{"layer": r.layer, "loss": r.loss, "drop": r.drop, "kept": r.layer in kept} for r in ranking]
