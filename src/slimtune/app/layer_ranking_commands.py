"""``slimtune linearize --rank-layers K``: rank the linearised layers by what restoring each one's softmax attention
gains, on the held-out blocks (``--rank-by loss``, :func:`slimtune.training.rank_softmax_layers`) or on passkey
prompts (``--rank-by passkey``, :func:`slimtune.training.rank_softmax_layers_for_retrieval`), print the ranking, and
keep the best K as softmax attention (:func:`slimtune.linear_attention.restore_softmax`) before recovery training."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimtune.errors import ConfigError

RANK_LAYERS_HELP = (
    "rank the linearised layers by the loss with each one's softmax attention restored (one evaluation per layer; "
    "--rank-by) and keep the best K as softmax attention before training, besides any --softmax-layers (a "
    "layer-selective hybrid; 0: only print the ranking)"
)
RANK_BY_HELP = (
    "the ranking's loss: loss = held-out LM loss (needs held-out data; for perplexity), passkey = -log p(key) over "
    "6 passkey prompts of --rank-passkey-length tokens, needles at depths 10/50/90 %% (for retrieval)"
)
RANK_BY = ("loss", "passkey")


def keep_best_softmax_layers(
    model: nn.Module,
    blocks: torch.Tensor | None,
    k: int,
    batch_size: int,
    rank_by: str = "loss",
    tokenizer: Any = None,
    passkey_length: int = 1024,
) -> list[dict[str, Any]]:
    """Rank the linearised layers of ``model`` by ``rank_by`` ("loss": on ``blocks`` [n, T]; "passkey": on passkey
    prompts of ``passkey_length`` tokens from ``tokenizer``), print the ranking and restore the top ``k`` to
    softmax attention for good; returns the ranking as JSON records (layer, loss, drop, kept).

    Raises:
        ConfigError: ``rank_by`` unknown, no held-out ``blocks`` for "loss", a ``passkey_length`` the prompt or
            the model does not fit, or ``k`` not in [0, linearised layers − 1] (one must stay linear).
    """
    from slimtune.linear_attention import linear_attention_layers, restore_softmax
    from slimtune.training import rank_softmax_layers, rank_softmax_layers_for_retrieval, top_softmax_layers
    from slimtune.training.long_context import check_context

    count = len(list(linear_attention_layers(model)))
    if not 0 <= k < count:
        raise ConfigError(
            f"--rank-layers {k} is not allowed: this model has {count} linearised layers and at least one must stay "
            f"linear; expected an integer in [0, {count - 1}]"
        )
    if rank_by not in RANK_BY:
        raise ConfigError(f"--rank-by {rank_by!r} is not allowed: expected one of {list(RANK_BY)}")
    if rank_by == "passkey":
        check_context(model, "--rank-passkey-length", passkey_length)
        print(f"ranking {count} linearised layers by the passkey loss on 6 prompts of {passkey_length} tokens")
        try:
            ranking = rank_softmax_layers_for_retrieval(model, tokenizer, lengths=(passkey_length,))
        except ConfigError as err:  # a length the prompt does not fit: name the option
            raise ConfigError(f"--rank-passkey-length {passkey_length}: {err}") from err
    else:
        if blocks is None:
            raise ConfigError(
                "--rank-layers needs held-out data to rank the layers on: pass --eval-data (or --data bbc), "
                "or rank by --rank-by passkey"
            )
        print(f"ranking {count} linearised layers on {len(blocks)} held-out blocks ({count + 1} evaluations)")
        ranking = rank_softmax_layers(model, blocks, batch_size)
    kept = top_softmax_layers(ranking, k)
    what = "passkey loss" if rank_by == "passkey" else "loss"
    print(f"| layer | {what} with its softmax restored | drop vs all-linear | kept as softmax |")
    print("|---:|---:|---:|:---:|")
    for rank in ranking:
        print(f"| {rank.layer} | {rank.loss:.4f} | {rank.drop:+.4f} | {'yes' if rank.layer in kept else ''} |")
    restore_softmax(model, kept)
    return [{"layer": r.layer, "loss": r.loss, "drop": r.drop, "kept": r.layer in kept} for r in ranking]
