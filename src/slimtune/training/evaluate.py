"""Held-out evaluation of a loss function (the causal-LM loss by default), and the check every loop makes of its
token blocks."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimtune.errors import ConfigError
from slimtune.training.losses import LossFn, causal_lm_loss


@torch.no_grad()
def evaluate_loss(model: nn.Module, blocks: torch.Tensor, loss_fn: LossFn, batch_size: int = 4) -> float:
    """Mean of ``loss_fn`` over ``blocks`` [n, seq_len] in eval mode (each block weighs the same).

    The blocks go in batches [≤ batch_size, seq_len]; the model's mode is restored afterwards.
    """
    check_blocks("blocks", blocks, model)
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(blocks), batch_size):
        batch = blocks[i : i + batch_size].to(model_device(model))
        total += loss_fn(model, batch).item() * len(batch)
    model.train(was_training)
    return total / len(blocks)


def evaluate_lm(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token cross-entropy of ``model`` over ``blocks`` [n, seq_len] (each block weighs the same)."""
    return evaluate_loss(model, blocks, causal_lm_loss, batch_size)


def check_blocks(field: str, blocks: Any, model: nn.Module) -> None:
    """Raise ConfigError unless ``blocks`` are integer token ids [n ≥ 1, seq_len ≥ 2] within the model's vocabulary."""
    expected = "expected integer token ids [n_blocks, seq_len] with n_blocks >= 1 and seq_len >= 2"
    if not isinstance(blocks, torch.Tensor):
        raise ConfigError(f"{field} is {type(blocks).__name__}: {expected}")
    if blocks.dim() != 2 or blocks.dtype.is_floating_point or blocks.is_complex():
        raise ConfigError(f"{field} is a tensor of shape {tuple(blocks.shape)} and dtype {blocks.dtype}: {expected}")
    if blocks.shape[0] == 0:
        raise ConfigError(f"{field} is empty (shape {tuple(blocks.shape)}): {expected}")
    if blocks.shape[1] < 2:
        raise ConfigError(f"{field} has seq_len={blocks.shape[1]}: {expected} (a next-token loss needs two tokens)")
    get_embeddings = getattr(model, "get_input_embeddings", None)
    vocab = getattr(get_embeddings(), "num_embeddings", None) if callable(get_embeddings) else None
    low, high = blocks.min().item(), blocks.max().item()
    if vocab is not None and (low < 0 or high >= vocab):
        raise ConfigError(
            f"{field} holds token ids {low} .. {high}: allowed are 0 .. {vocab - 1} (the model's vocabulary)"
        )


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
