"""Held-out evaluation of a loss function (the causal-LM loss by default), and the check every loop makes of its
token blocks, packed examples or classification examples."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimtune.errors import ConfigError
from slimtune.training.data import IGNORE_INDEX
from slimtune.training.losses import LossFn, causal_lm_loss, loss_weight


@torch.no_grad()
def evaluate_loss(model: nn.Module, blocks: torch.Tensor, loss_fn: LossFn, batch_size: int = 4) -> float:
    """Mean of ``loss_fn`` over the items of ``blocks`` [n, seq_len] (or packed examples [n, seq_len, 3], or
    classification examples [n, seq_len, 2]) in eval mode.

    The blocks go in batches [≤ batch_size, ...], each weighted by its items (:func:`loss_weight`: blocks, the
    answer tokens of packed examples, or classification examples), so the result does not depend on
    ``batch_size``; the model's mode is restored afterwards.
    """
    check_blocks("blocks", blocks, model)
    was_training = model.training
    model.eval()
    total, items = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        batch = blocks[i : i + batch_size].to(model_device(model))
        weight = loss_weight(loss_fn, batch)
        total += loss_fn(model, batch).item() * weight
        items += weight
    model.train(was_training)
    return total / max(1, items)


def evaluate_lm(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token cross-entropy of ``model`` over ``blocks`` [n, seq_len] (each block weighs the same)."""
    return evaluate_loss(model, blocks, causal_lm_loss, batch_size)


def check_blocks(field: str, blocks: Any, model: nn.Module) -> None:
    """Raise ConfigError unless ``blocks`` are token blocks the loop and its loss functions can use.

    One of three formats, told apart by the trailing dimension:

    - integer token ids [n ≥ 1, seq_len ≥ 2] within the model's vocabulary;
    - packed examples [n ≥ 1, seq_len ≥ 2, 3] of (input_ids, labels, position_ids) as
      :func:`slimtune.training.data.pack_examples` makes them: input ids within the vocabulary; each label -100
      or its own position's input id (not shifted), -100 where a sequence starts, and at least one answer label
      per block; position ids starting at 0 in every block and either going up by one or restarting at 0;
    - classification examples [n ≥ 1, seq_len ≥ 1, 2] of (input_ids, label + 1 or 0) as
      :func:`slimtune.training.classification.encode_classification` makes them: input ids within the
      vocabulary; channel 1 ≥ 0, the same value ≥ 1 on every attended token of an example (the first token
      included) and 0 on the padding, which comes only after the last attended token (right padding).
    """
    expected = (
        "expected integer token ids [n_blocks, seq_len] or packed examples [n_blocks, seq_len, 3], "
        "with n_blocks >= 1 and seq_len >= 2, or classification examples [n_examples, seq_len, 2] with seq_len >= 1"
    )
    if not isinstance(blocks, torch.Tensor):
        raise ConfigError(f"{field} is {type(blocks).__name__}: {expected}")
    packed = blocks.dim() == 3 and blocks.shape[-1] == 3
    classes = blocks.dim() == 3 and blocks.shape[-1] == 2
    if (blocks.dim() != 2 and not packed and not classes) or blocks.dtype.is_floating_point or blocks.is_complex():
        raise ConfigError(f"{field} is a tensor of shape {tuple(blocks.shape)} and dtype {blocks.dtype}: {expected}")
    if blocks.shape[0] == 0:
        raise ConfigError(f"{field} is empty (shape {tuple(blocks.shape)}): {expected}")
    if blocks.shape[1] < (1 if classes else 2):
        why = "a classification example needs a token" if classes else "a next-token loss needs two tokens"
        raise ConfigError(f"{field} has seq_len={blocks.shape[1]}: {expected} ({why})")
    ids = blocks[..., 0] if packed or classes else blocks
    get_embeddings = getattr(model, "get_input_embeddings", None)
    vocab = getattr(get_embeddings(), "num_embeddings", None) if callable(get_embeddings) else None
    low, high = ids.min().item(), ids.max().item()
    if vocab is not None and (low < 0 or high >= vocab):
        what = "input ids" if packed or classes else "token ids"
        raise ConfigError(
            f"{field} holds {what} {low} .. {high}: allowed are 0 .. {vocab - 1} (the model's vocabulary)"
        )
    if packed:
        _check_packed(field, blocks)
    if classes:
        _check_classification(field, blocks)


def _check_packed(field: str, blocks: torch.Tensor) -> None:
    """The labels and position ids of packed examples [n, seq_len, 3] (see :func:`check_blocks`)."""
    ids, labels, positions = blocks.unbind(-1)  # each [n, T]
    answer = labels != IGNORE_INDEX
    bad = answer & (labels != ids)
    if bad.any():
        block, position = (int(i) for i in bad.nonzero()[0])
        raise ConfigError(
            f"{field}[{block}, {position}] has label {int(labels[block, position])} and input id "
            f"{int(ids[block, position])}: a label is -100 or the token at its own position (labels are not "
            "shifted; the loss shifts them)"
        )
    follows = positions[:, 1:] == positions[:, :-1] + 1
    if (positions[:, 0] != 0).any() or not (follows | (positions[:, 1:] == 0)).all():
        block = int(((positions[:, 0] != 0) | ~(follows | (positions[:, 1:] == 0)).all(1)).nonzero()[0])
        raise ConfigError(
            f"{field}[{block}] has position ids {positions[block].tolist()[:12]}...: expected 0 at the start of every "
            "block and of every example, else the previous position + 1"
        )
    starts = answer & (positions == 0)
    if starts.any():
        block, position = (int(i) for i in starts.nonzero()[0])
        raise ConfigError(
            f"{field}[{block}, {position}] starts a sequence (position id 0) but has label "
            f"{int(labels[block, position])}: expected -100 there, nothing of its own sequence comes before it"
        )
    empty = ~answer.any(1)
    if empty.any():
        raise ConfigError(
            f"{field}[{int(empty.nonzero()[0])}] has no label other than -100: expected at least one answer token "
            "per block (a mean over no tokens is undefined)"
        )


def _check_classification(field: str, examples: torch.Tensor) -> None:
    """Channel 1 of classification examples [n, seq_len, 2]: label + 1, then 0 (see :func:`check_blocks`)."""
    marks = examples[..., 1]  # [n, T]: label + 1 where attended, 0 on padding
    if (marks < 0).any():
        example, position = (int(i) for i in (marks < 0).nonzero()[0])
        raise ConfigError(
            f"{field}[{example}, {position}] holds {int(marks[example, position])} in channel 1 of classification "
            f"examples of shape {tuple(examples.shape)}: expected label + 1 (>= 1) on attended tokens and 0 on padding"
        )
    unattended = marks[:, 0] == 0
    if unattended.any():
        raise ConfigError(
            f"{field}[{int(unattended.nonzero()[0])}] starts with padding (channel 1 is 0 at token 0): expected the "
            "first token attended, an example holds at least one token and is padded on the right only"
        )
    other = (marks > 0) & (marks != marks[:, :1])
    if other.any():
        example, position = (int(i) for i in other.nonzero()[0])
        raise ConfigError(
            f"{field}[{example}, {position}] has label + 1 = {int(marks[example, position])} in channel 1 but token "
            f"0 of the example has {int(marks[example, 0])}: expected one label per example, the same on every "
            "attended token"
        )
    resumed = (marks[:, 1:] > 0) & (marks[:, :-1] == 0)
    if resumed.any():
        example, position = (int(i) for i in resumed.nonzero()[0])
        raise ConfigError(
            f"{field}[{example}, {position + 1}] is attended (channel 1 is {int(marks[example, position + 1])}) "
            f"after padding at token {position}: expected right padding, every padding token after the last "
            "attended one"
        )


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
