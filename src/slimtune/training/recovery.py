"""Recovery training of a linearised model, in two stages (LoLCATs' recipe), both on the one training loop.

1. :func:`attention_transfer`: every :class:`LinearAttention` learns to reproduce the softmax attention it
   replaced, on the hidden states of the original model. The loss of a batch is the sum over layers of the MSE
   between the layer's output and the original module's output [B, T, D]; the loop
   (:func:`slimtune.training.train_lm`) minimises it over the parameters the conversion added (feature maps,
   decays, gates), in eval mode (no dropout: exact targets); ``compare="attention"`` compares what enters the
   output projection instead (LoLCATs' loss). Two paths compute it:
   - cached (default, :mod:`slimtune.training.transfer`): each block's teacher tensors (q, k, v after RoPE and the
     softmax output of every layer) are computed once, without gradients; a step runs only the added parts on them.
   - hook-based (``cached=False``, :func:`_teacher_forcing`): in one forward pass of the whole model each layer
     computes its linear output and the original softmax output on the same hidden states (the kept original
     module, run without gradients), records their MSE and passes the softmax output on. It is also what
     :func:`attention_mse` evaluates with, and what runs under DDP / FSDP.
2. :func:`finetune`: causal-LM training (or logit distillation from the original) of the added parameters and,
   optionally, of a slimtune adapter (``slimtune.get_adapted_model``), with :func:`slimtune.training.train_lm`;
   ``window_dropout`` turns on scheduled sliding-window dropout (:mod:`slimtune.training.window_dropout`) for hybrid
   layers.

Both take the loop's options as keywords (:class:`slimtune.training.config.LoopOptions`: gradient accumulation,
clipping, checkpoints, resume), so they stop on a NaN loss or gradient, and with ``output_dir`` write
``metrics.jsonl`` and checkpoints, as fine-tuning does. Stage 1 restores the model's mode and ``requires_grad``
flags afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.config import AdapterConfig
from slimtune.errors import ConfigError
from slimtune.inject import get_adapted_model
from slimtune.linear_attention.convert import linear_attention_layers, linear_attention_parameters
from slimtune.linear_attention.layer import LinearAttention
from slimtune.training.config import LoopOptions, TrainLMOptions, TrainResult
from slimtune.training.evaluate import model_device
from slimtune.training.loop import train_lm
from slimtune.training.losses import LossFn, causal_lm_loss
from slimtune.training.transfer import (
    TeacherCache,
    cached_transfer_loss,
    check_cache_size,
    check_compare,
    projection_inputs,
)
from slimtune.training.window_dropout import window_dropout as window_dropout_schedule

if TYPE_CHECKING:
    from typing_extensions import Unpack

LayerLosses = Callable[[nn.Module, torch.Tensor], list[torch.Tensor]]


def attention_transfer(
    model: nn.Module,
    blocks: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    warmup: int = 0,
    cached: bool = True,
    compare: str = "output",
    max_cache_gib: float = 8.0,
    progress: bool = True,
    **loop: Unpack[LoopOptions],
) -> TrainResult:
    """Train the added parameters of ``model`` so each layer's linear attention output matches its softmax one.

    ``blocks`` [n, seq_len] token ids, cycled in order; the loss of a step is the sum over layers of the mean
    squared error between the layer's output and the original attention's output [B, T, D] (both after the
    output projection, ``compare="output"``), on the original model's hidden states; ``compare="attention"``
    compares what enters the output projection instead [B, T, H·d] (LoLCATs' attention outputs: the output
    projection then leaves the cached step). AdamW, cosine schedule after ``warmup`` steps;
    ``loop``: the loop's options (:class:`LoopOptions`). ``TrainResult.losses`` holds that summed MSE per step.

    ``cached`` (default): the teacher tensors of each block are computed the first time a step uses it and kept
    (:mod:`slimtune.training.transfer`), so every later step on it runs only the added parts: pass a few blocks and
    many steps (the steps cycle over them). It holds L × (H·d + 2·Hkv·d + D) numbers per token of every block used
    (180 KiB a token for SmolLM2-135M in float32): refused above ``max_cache_gib``, and on more than one process.
    ``cached=False``: the hook-based path, a whole-model forward per step, no memory kept.

    Raises:
        ConfigError: steps, batch_size or lr not positive, ``compare`` not "output" or "attention", no linearised
            layer, no added parameter to train, a checkpoint that does not fit, or (cached) a cache over
            ``max_cache_gib`` or more than one process.
        FloatingPointError: the loss or a gradient became NaN or inf (naming the step, the learning rate and the
            last good checkpoint).
    """
    options: TrainLMOptions = {**loop, "warmup": warmup, "progress": progress, "desc": "attention transfer"}
    check_compare(compare)
    params = _added_parameters(model)
    if cached:
        check_cache_size(model, blocks, steps * batch_size * loop.get("grad_accum", 1), max_cache_gib, compare)
    with _only_trainable(model, params), _transfer_loss(model, cached, compare) as loss_fn:
        return train_lm(
            model, blocks, steps=steps, batch_size=batch_size, lr=lr, loss_fn=loss_fn, train_mode=False, **options
        )


@torch.no_grad()
def attention_mse(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4, compare: str = "output") -> list[float]:
    """Per linearised layer, the MSE between its output and the softmax output on the original hidden states
    (after the output projection, or before it with ``compare="attention"``).

    Averaged over ``blocks`` [n, seq_len] (each block weighs the same); one float per layer, in layer order.
    """
    check_compare(compare)
    _check_linearised(model)
    totals: list[float] = []
    with _teacher_forcing(model, compare) as layer_losses:
        for i in range(0, len(blocks), batch_size):
            batch = blocks[i : i + batch_size].to(model_device(model))
            values = [loss.item() * len(batch) for loss in layer_losses(model, batch)]
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
    window_dropout: float = 0.0,
    seed: int = 0,
    progress: bool = True,
    loss_fn: LossFn = causal_lm_loss,
    **loop: Unpack[LoopOptions],
) -> tuple[nn.Module, TrainResult]:
    """Stage 2: training of the added parameters (``train_linear_attention``) and of ``adapter`` on ``loss_fn``.

    ``loss_fn``: the causal-LM loss by default; ``slimtune.training.distillation_loss()`` trains the model to
    reproduce the original model's next-token distributions instead (KL; ``benchmarks/long_context_recovery.py
    --distill`` measures what each does to perplexity and retrieval).

    With ``adapter``, it is injected first (``slimtune.get_adapted_model``, which freezes the base model);
    without, every parameter but the added ones is frozen. The trainable set is left as trained. ``loop``: the
    loop's options (:class:`LoopOptions`). Returns the model (the same object) and
    :func:`slimtune.training.train_lm`'s result.

    ``window_dropout`` = p0 > 0: scheduled sliding-window dropout (:mod:`slimtune.training.window_dropout`): at step
    s of ``steps`` each windowed layer runs as pure linear attention with probability p0·(1 − s/steps), drawn from
    (``seed``, s), so a resumed run drops the same windows; every ``drop_window`` is False again afterwards.

    Raises:
        ConfigError: nothing to train, a setting ``train_lm`` refuses, ``window_dropout`` outside [0, 1), or
            ``window_dropout`` > 0 on a model without a windowed layer.
    """
    options: TrainLMOptions = {
        **loop,
        "warmup": warmup,
        "weight_decay": weight_decay,
        "progress": progress,
        "desc": "LM fine-tuning" if loss_fn is causal_lm_loss else "fine-tuning",
    }
    with window_dropout_schedule(model, window_dropout, steps, seed) as before_step:  # checked before any change
        if adapter is not None:
            model = get_adapted_model(model, adapter)
        else:
            model.requires_grad_(False)
        if train_linear_attention:
            for param in _added_parameters(model):
                param.requires_grad_(True)
        result = train_lm(
            model,
            blocks,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            loss_fn=loss_fn,
            before_step=before_step,
            **options,
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


def _check_linearised(model: nn.Module) -> None:
    if not list(linear_attention_layers(model)):
        raise ConfigError(f"{type(model).__name__} has no LinearAttention layer: call linearize(model, config) first")


@contextlib.contextmanager
def _transfer_loss(model: nn.Module, cached: bool, compare: str) -> Iterator[LossFn]:
    """The attention-transfer loss of ``model`` on the cached or the hook-based path, compared where ``compare``
    says; the model is in eval mode inside (its mode is restored on exit)."""
    if cached:
        with _eval_mode(model):
            yield cached_transfer_loss(TeacherCache(model, compare))
    else:
        with _teacher_forcing(model, compare) as layer_losses:
            yield lambda forward_model, batch: torch.stack(layer_losses(forward_model, batch)).sum()


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _teacher_forcing(model: nn.Module, compare: str = "output") -> Iterator[LayerLosses]:
    """Hook every LinearAttention of ``model`` to pass the softmax output [B, T, D] on; yields ``layer_losses``.

    ``layer_losses(forward_model, batch)`` runs ``forward_model`` (``model``, or the wrapper accelerate made of it)
    on ``batch`` [B, T] token ids and returns the MSE(linear output, softmax output) [] of every layer, in layer
    order: after the output projection, or (``compare="attention"``) of what enters it, recorded by a pre-hook on
    the projection the two share. The LM head runs on the last position only. The model is in eval mode inside
    (its mode is restored on exit).
    """
    recorded: list[torch.Tensor] = []

    def hook(layer: LinearAttention, args: tuple[Any, ...], kwargs: dict[str, Any], output: tuple[Any, ...]) -> tuple:
        with torch.no_grad(), projection_inputs(layer) as attention:
            target = layer.original.train(layer.training)(*args, **kwargs)[0]  # [B, T, D]
        if compare == "output":
            recorded.append(F.mse_loss(output[0].float(), target.float()))
        else:  # predicted[layer]: the linear layer's projection input [B, T, H·d], then the original's
            recorded.append(F.mse_loss(predicted[layer][0].float(), attention[0].float()))
            predicted[layer].clear()
        return (target, *output[1:])

    def layer_losses(forward_model: nn.Module, batch: torch.Tensor) -> list[torch.Tensor]:
        recorded.clear()
        forward_model(input_ids=batch, use_cache=False, logits_to_keep=1)
        return list(recorded)

    layers = [layer for _, layer in linear_attention_layers(model)]
    with contextlib.ExitStack() as stack:
        for layer in layers:
            stack.callback(layer.register_forward_hook(hook, with_kwargs=True).remove)
        watched = layers if compare == "attention" else []
        predicted = {layer: stack.enter_context(projection_inputs(layer)) for layer in watched}
        with _eval_mode(model):
            yield layer_losses
