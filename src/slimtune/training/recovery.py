"""Recovery training of a linearised model, in two stages (LoLCATs' recipe).

1. :func:`attention_transfer`: every :class:`LinearAttention` learns to reproduce the softmax attention it
   replaced. In one forward pass each layer computes its linear output and the original softmax output on the
   same hidden states (the kept original module, run without gradients), adds their MSE to the loss and passes
   the softmax output on, so every layer sees the hidden states of the original model. Only the parameters the
   conversion added are trained (feature maps, decays, gates); the LM head is not run.
2. :func:`finetune`: causal-LM training of the added parameters and, optionally, of a slimtune adapter
   (``slimtune.get_adapted_model``), with :func:`slimtune.training.train_lm`.

Stage 1 runs the model in eval mode (no dropout, so the softmax targets are exact) and restores the model's
mode and ``requires_grad`` flags afterwards.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from slimtune.config import AdapterConfig
from slimtune.errors import ConfigError
from slimtune.inject import get_adapted_model
from slimtune.linear_attention.convert import linear_attention_layers, linear_attention_parameters
from slimtune.training.config import TrainResult
from slimtune.training.loop import cosine_with_warmup, train_lm


def attention_transfer(
    model: nn.Module,
    blocks: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    warmup: int = 0,
    progress: bool = True,
) -> TrainResult:
    """Train the added parameters of ``model`` so each layer's linear attention output matches its softmax one.

    ``blocks`` [n, seq_len] token ids, cycled in order; the loss of a step is the sum over layers of the mean
    squared error between the two outputs [B, T, D]. AdamW, cosine schedule after ``warmup`` steps.
    ``TrainResult.losses`` holds that summed MSE per step.

    Raises:
        ConfigError: steps, batch_size or lr not positive, no linearised layer, or no added parameter to train.
        FloatingPointError: the loss became NaN or inf.
    """
    for field, value in (("steps", steps), ("batch_size", batch_size), ("lr", lr)):
        if not value > 0:
            raise ConfigError(f"{field}={value!r} is not allowed: expected a positive number")
    params = _added_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = cosine_with_warmup(optimizer, warmup, steps)
    losses, start = [], time.perf_counter()
    with _only_trainable(model, params), _teacher_forcing(model) as layer_losses:
        bar = tqdm(range(steps), desc="attention transfer", unit="step", disable=not progress)
        for step in bar:
            index = torch.arange(step * batch_size, (step + 1) * batch_size) % len(blocks)
            layer_losses.clear()
            model.base_model(input_ids=blocks[index], use_cache=False)
            loss = torch.stack(layer_losses).sum()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"attention-transfer loss is {loss.item()} at step {step} (lr={lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.set_postfix(mse=f"{losses[-1]:.4g}")
    return TrainResult(losses, time.perf_counter() - start, steps * batch_size * blocks.shape[1])


@torch.no_grad()
def attention_mse(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> list[float]:
    """Per linearised layer, the MSE between its output and the softmax output on the original hidden states.

    Averaged over ``blocks`` [n, seq_len] (each block weighs the same); one float per layer, in layer order.
    """
    if not list(linear_attention_layers(model)):
        raise ConfigError(f"{type(model).__name__} has no LinearAttention layer: call linearize(model, config) first")
    totals: list[float] = []
    with _teacher_forcing(model) as layer_losses:
        for i in range(0, len(blocks), batch_size):
            batch = blocks[i : i + batch_size]
            layer_losses.clear()
            model.base_model(input_ids=batch, use_cache=False)
            values = [loss.item() * len(batch) for loss in layer_losses]
            totals = values if not totals else [a + b for a, b in zip(totals, values)]
    return [total / len(blocks) for total in totals]


def finetune(
    model: nn.Module,
    blocks: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    adapter: AdapterConfig | None = None,
    train_linear_attention: bool = True,
    warmup: int = 0,
    weight_decay: float = 0.0,
    progress: bool = True,
) -> tuple[nn.Module, TrainResult]:
    """Stage 2: causal-LM training of the added parameters (``train_linear_attention``) and of ``adapter``.

    With ``adapter``, it is injected first (``slimtune.get_adapted_model``, which freezes the base model);
    without, every parameter but the added ones is frozen. The trainable set is left as trained. Returns the
    model (the same object) and :func:`slimtune.training.train_lm`'s result.

    Raises:
        ConfigError: nothing to train, or a setting ``train_lm`` refuses.
    """
    if adapter is not None:
        model = get_adapted_model(model, adapter)
    else:
        model.requires_grad_(False)
    if train_linear_attention:
        for param in _added_parameters(model):
            param.requires_grad_(True)
    result = train_lm(
        model, blocks, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, weight_decay=weight_decay,
        progress=progress, desc="LM fine-tuning",
    )
    return model, result


def _added_parameters(model: nn.Module) -> list[nn.Parameter]:
    params = linear_attention_parameters(model)
    if not params:
        raise ConfigError(
            f"{type(model).__name__} has no linear-attention parameter to train: linearize it first, with a "
            "feature map that has weights, decay=True or output_gate=True"
        )
    return params


@contextlib.contextmanager
def _only_trainable(model: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Only ``params`` require grad inside; every flag is restored on exit."""
    flags = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    for param in params:
        param.requires_grad_(True)
    try:
        yield
    finally:
        for param, flag in flags.items():
            param.requires_grad_(flag)


@contextlib.contextmanager
def _teacher_forcing(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Hook every LinearAttention: record MSE(linear, softmax) into the yielded list, pass the softmax output on.

    The model is in eval mode inside (its mode is restored on exit).
    """
    losses: list[torch.Tensor] = []

    def hook(layer: nn.Module, args: tuple, kwargs: dict, output: tuple) -> tuple:
        with torch.no_grad():
            target = layer.original.train(layer.training)(*args, **kwargs)[0]
        losses.append(F.mse_loss(output[0].float(), target.float()))
        return (target, *output[1:])

    was_training = model.training
    model.eval()
    handles = [layer.register_forward_hook(hook, with_kwargs=True) for _, layer in linear_attention_layers(model)]
    try:
        yield losses
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
