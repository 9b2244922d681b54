"""What the training loop minimises: a loss function ``loss_fn(model, batch) -> scalar tensor``.

``batch`` is [B, T] token ids on the model's device; ``model`` is the model as the loop runs it (wrapped by
``accelerate`` for DDP, so a loss function calls ``model(...)`` rather than a submodule of it). The loop
trains on causal-LM language modelling by default; :mod:`slimtune.training.recovery` passes the attention
transfer loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

LossFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def causal_lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy [] of an HF causal LM over ``batch`` [B, T] token ids."""
    return model(input_ids=batch, labels=batch).loss
