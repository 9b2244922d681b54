"""``slimtune linearize --rank-layers K``: rank the linearised layers by what restoring each one's softmax attention
gains, on the held-out blocks (``--rank-by loss``, :func:`slimtune.training.lm_loss_criterion`) or on passkey
prompts (``--rank-by passkey``, :func:`slimtune.training.passkey_loss_criterion`), print the ranking, and keep the
best K as softmax attention (:func:`slimtune.linear_attention.restore_softmax`) before recovery training. The K are
the top K of single-layer gains (``--rank-search single``, :func:`slimtune.training.rank_softmax_layers`), or chosen
one at a time beside those already kept (``--rank-search greedy``,
:func:`slimtune.training.select_softmax_layers_greedy`)."""

from __future__ import annotations

from collections.abc import Sequence
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
    "passkey prompts of --rank-passkey-length tokens, --rank-passkey-keys per depth of --rank-passkey-depths (for "
    "retrieval)"
)
RANK_BY = ("loss", "passkey")
RANK_SEARCH_HELP = (
    "how --rank-layers picks its K: single = the K best single-layer gains (one evaluation per layer); greedy = one "
    "layer at a time, the one that helps most beside those already picked (about K evaluations per layer; finds "
    "layers that work together, e.g. a retrieval circuit)"
)
RANK_SEARCH = ("single", "greedy")
RANK_CANDIDATES_HELP = (
    "with --rank-search greedy: the layer indices to choose from (default: every linearised layer); fewer saves "
    "evaluations"
)


def keep_best_softmax_layers(
    model: nn.Module,
    blocks: torch.Tensor | None,
    k: int,
    batch_size: int,
    rank_by: str = "loss",
    tokenizer: Any = None,
    passkey_length: int = 1024,
    search: str = "single",
    passkey_depths: Sequence[float] = (0.1, 0.5, 0.9),
    passkey_keys: int = 2,
    candidates: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Rank the linearised layers of ``model`` by ``rank_by`` ("loss": on ``blocks`` [n, T]; "passkey": on
    ``passkey_keys`` passkey prompts of ``passkey_length`` tokens from ``tokenizer`` per needle depth of
    ``passkey_depths``), print the ranking and restore ``k`` to softmax attention for good: the top ``k``
    (``search`` "single"), or ``k`` chosen greedily ("greedy"); returns the ranking (single: every layer; greedy:
    the steps, in order) as JSON records (layer, loss, drop, kept). ``candidates``: the layers greedy chooses from
    (None: every linearised layer; the single ranking evaluates every layer, so the caller passes None there).

    Raises:
        ConfigError: ``rank_by`` or ``search`` unknown, no held-out ``blocks`` for "loss", a ``passkey_length``
            the prompt or the model does not fit, a depth outside [0, 1], ``passkey_keys`` < 1, ``k`` not in
            [0, linearised layers − 1] (one must stay linear), ``k`` = 0 with greedy, or (from
            :func:`slimtune.training.greedy_candidates`, before anything is printed or evaluated) candidates that
            are not distinct linearised layers, or fewer than ``k``.
    """
    from slimtune.linear_attention import linear_attention_layers, restore_softmax
    from slimtune.training import (
        greedy_candidates,
        greedy_evaluations,
        lm_loss_criterion,
        passkey_loss_criterion,
        rank_softmax_layers_by,
        select_softmax_layers_greedy,
        top_softmax_layers,
    )
    from slimtune.training.long_context import check_context

    count = len(list(linear_attention_layers(model)))
    if not 0 <= k < count:
        raise ConfigError(
            f"--rank-layers {k} is not allowed: this model has {count} linearised layers and at least one must stay "
            f"linear; expected an integer in [0, {count - 1}]"
        )
    if rank_by not in RANK_BY:
        raise ConfigError(f"--rank-by {rank_by!r} is not allowed: expected one of {list(RANK_BY)}")
    if search not in RANK_SEARCH:
        raise ConfigError(f"--rank-search {search!r} is not allowed: expected one of {list(RANK_SEARCH)}")
    if search == "greedy" and k == 0:
        raise ConfigError("--rank-layers 0 with --rank-search greedy chooses nothing: expected K >= 1")
    if rank_by == "passkey":
        check_context(model, "--rank-passkey-length", passkey_length)
        try:
            criterion = passkey_loss_criterion(
                model, tokenizer, lengths=(passkey_length,), depths=passkey_depths, keys_per_cell=passkey_keys
            )
        except ConfigError as err:  # a length the prompt does not fit, or a depth outside [0, 1]: name the options
            given = " ".join(f"{d:g}" for d in passkey_depths)
            raise ConfigError(f"--rank-passkey-length {passkey_length} --rank-passkey-depths {given}: {err}") from err
        prompts = len(passkey_depths) * passkey_keys
        on = f"the passkey loss on {prompts} prompts of {passkey_length} tokens"
    else:
        if blocks is None:
            raise ConfigError(
                "--rank-layers needs held-out data to rank the layers on: pass --eval-data (or --data bbc), "
                "or rank by --rank-by passkey"
            )
        criterion = lm_loss_criterion(model, blocks, batch_size)
        on = f"the loss on {len(blocks)} held-out block{'' if len(blocks) == 1 else 's'}"
    what = "passkey loss" if rank_by == "passkey" else "loss"
    if search == "greedy":
        pool = greedy_candidates(model, k, candidates)
        evaluations = greedy_evaluations(len(pool), k)
        print(f"choosing {k} of {len(pool)} linearised layers one at a time by {on} ({evaluations} evaluations)")
        ranking = select_softmax_layers_greedy(model, criterion, k, candidates=pool)
        header = f"| step | layer | {what} with the layers so far restored | drop vs the step before |"
        rows = [f"| {i} | {r.layer} | {r.loss:.4f} | {r.drop:+.4f} |" for i, r in enumerate(ranking, 1)]
    else:
        print(f"ranking {count} linearised layers by {on} ({count + 1} evaluations)")
        ranking = rank_softmax_layers_by(model, criterion)
        header = f"| layer | {what} with its softmax restored | drop vs all-linear | kept as softmax |"
        rows = [
            f"| {r.layer} | {r.loss:.4f} | {r.drop:+.4f} | {'yes' if i < k else ''} |" for i, r in enumerate(ranking)
        ]
    kept = top_softmax_layers(ranking, k)
    print(header)
    print("|---:|---:|---:|---:|" if search == "greedy" else "|---:|---:|---:|:---:|")
    print("\n".join(rows))
    restore_softmax(model, kept)
    return [{"layer": r.layer, "loss": r.loss, "drop": r.drop, "kept": r.layer in kept} for r in ranking]
