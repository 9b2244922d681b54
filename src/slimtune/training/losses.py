"""What the training loop minimises: a loss function ``loss_fn(model, batch) -> scalar tensor``.

``batch`` is [B, T] token ids on the model's device, or [B, T, 3] packed examples (input_ids, labels,
position_ids) for :func:`masked_lm_loss`; ``model`` is the model as the loop runs it (wrapped by ``accelerate``
for DDP, so a loss function calls ``model(...)`` rather than a submodule of it). The loop trains on causal-LM
language modelling by default; :mod:`slimtune.training.recovery` passes the attention transfer loss.

A loss is a mean over items: blocks for :func:`causal_lm_loss` (every block has T tokens, so that is also the
token mean), answer tokens for :func:`masked_lm_loss`. :func:`loss_weight` says how many items a batch holds,
so that a mean over several batches (gradient accumulation, DDP processes, evaluation in batches) can weigh
each batch by it and be the mean over all their items.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.errors import ConfigError
from slimtune.training.data import IGNORE_INDEX

LossFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def causal_lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy [] of an HF causal LM over ``batch`` [B, T] token ids.

    ``use_cache=False``: a training forward needs no cache (HF would build and fill one), and a linearised layer
    drops its softmax window (``drop_window``, window dropout) only when it gets none.
    """
    if batch.dim() != 2:
        raise ConfigError(
            f"causal_lm_loss got a batch of shape {tuple(batch.shape)}: expected token ids [B, T]; packed "
            "examples [B, T, 3] (chat / instruction data) are trained with loss_fn=masked_lm_loss"
        )
    return model(input_ids=batch, labels=batch, use_cache=False).loss


def masked_lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy [] of an HF causal LM over the answer tokens of packed examples.

    ``batch`` [B, T, 3] holds (input_ids, labels, position_ids) as
    :func:`slimtune.training.data.pack_examples` makes them: label -100 marks a token outside the loss, and
    the labels sit at their token's position (position t's logits are scored against label t + 1). The model
    gets the position ids, no attention mask and ``use_cache=False``: transformers then reads a restart of the
    position ids as the start of a new sequence and masks attention to earlier examples of the block (with a
    cache, as ``use_cache=True`` makes, it would not, and examples would see each other). The result is the
    sum of the answer tokens' cross-entropies (logits in float32) over their number, 0 when there is none.

    Raises:
        ConfigError: ``batch`` is not [B, T, 3].
    """
    if batch.dim() != 3 or batch.shape[-1] != 3:
        raise ConfigError(
            f"masked_lm_loss got a batch of shape {tuple(batch.shape)}: expected packed examples [B, T, 3] of "
            "(input_ids, labels, position_ids), e.g. from slimtune.training.chat_data.chat_blocks"
        )
    input_ids, labels, position_ids = batch.unbind(-1)  # each [B, T]
    logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits  # [B, T, V]
    targets = labels[:, 1:]
    total = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


def answer_token_count(batch: torch.Tensor) -> int:
    """The number of answer tokens :func:`masked_lm_loss` averages over in ``batch`` [B, T, 3]."""
    return int((batch[:, 1:, 1] != IGNORE_INDEX).sum())


def loss_weight(loss_fn: LossFn, batch: torch.Tensor) -> int:
    """How many items ``loss_fn(model, batch)`` is the mean of: answer tokens for :func:`masked_lm_loss`, else
    the blocks of ``batch`` (the causal-LM and attention-transfer losses weigh every block the same).

    A mean over batches weighted by this is the mean over all their items: with per-batch losses L_b and weights
    w_b, sum(L_b * w_b) / sum(w_b).
    """
    return answer_token_count(batch) if loss_fn is masked_lm_loss else len(batch)
