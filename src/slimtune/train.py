"""A plain causal-LM training loop over packed token blocks, and held-out evaluation.

Small on purpose: AdamW on the trainable parameters, cosine schedule with linear warm-up, a progress bar, a
clear stop on a non-finite loss. Used by the demo and the quality benchmarks.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
from torch import nn
from tqdm import tqdm

from slimtune.errors import ConfigError


@dataclasses.dataclass
class TrainResult:
    losses: list[float]
    seconds: float
    tokens: int


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LR factor rising linearly over ``warmup`` steps, then falling to 0 along a cosine until ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_lm(
    model: nn.Module,
    blocks: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    warmup: int = 0,
    weight_decay: float = 0.0,
    progress: bool = True,
    desc: str = "training",
) -> TrainResult:
    """Train ``model`` (an HF causal LM) on ``blocks`` [n, seq_len] for ``steps`` AdamW steps, cycling the blocks.

    Raises:
        ConfigError: steps, batch_size or lr not positive, or no trainable parameter.
        FloatingPointError: the loss became NaN or inf (the message names the step and the learning rate).
    """
    for field, value in (("steps", steps), ("batch_size", batch_size), ("lr", lr)):
        if not value > 0:
            raise ConfigError(f"{field}={value!r} is not allowed: expected a positive number")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameter: inject an adapter first")
    if len(blocks) == 0:
        raise ConfigError("blocks is empty: expected at least one token block to train on")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = cosine_with_warmup(optimizer, warmup, steps)
    model.train()
    losses, start = [], time.perf_counter()
    bar = tqdm(range(steps), desc=desc, unit="step", disable=not progress)
    for step in bar:
        index = torch.arange(step * batch_size, (step + 1) * batch_size) % len(blocks)
        batch = blocks[index]
        loss = model(input_ids=batch, labels=batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step} (lr={lr}): lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return TrainResult(losses, time.perf_counter() - start, steps * batch_size * blocks.shape[1])


@torch.no_grad()
def evaluate_lm(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token cross-entropy of ``model`` over ``blocks`` [n, seq_len] (each block weighs the same)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(blocks), batch_size):
        batch = blocks[i : i + batch_size]
        total += model(input_ids=batch, labels=batch).loss.item() * len(batch)
    model.train(was_training)
    return total / len(blocks)
