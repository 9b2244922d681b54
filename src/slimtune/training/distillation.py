"""Logit distillation: a loss that trains a model to reproduce another model's next-token distributions.

:func:`distillation_loss` (teacher) is a :data:`slimtune.training.losses.LossFn` for the one training loop: the mean
over the tokens of ``batch`` of KL(p_teacher ‖ p_student), both distributions softened by ``temperature`` and the
loss scaled by temperature² (Hinton et al., 2015, so that gradients keep their size as the temperature changes).

Recovery of a linearised model (:func:`slimtune.training.recovery.finetune`) uses it with the original model as the
teacher: where the causal-LM loss rewards the student for whatever lowers its loss on the corpus (leaning on local
context), the KL asks it to match the original's distribution everywhere, including where the original read the
answer from far back. The original need not be a second copy: ``teacher=None`` computes it from the student's own
weights (:func:`base_model_logits`), since linearisation and adapters leave the pretrained weights as they were.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from slimtune.config import check_number
from slimtune.errors import ConfigError
from slimtune.inject import disable_adapters
from slimtune.linear_attention import linear_attention_layers, softmax_restored
from slimtune.training.losses import LossFn


def distillation_loss(teacher: nn.Module | None = None, temperature: float = 1.0) -> LossFn:
    """A loss ``loss_fn(model, batch)`` [] = mean over the B·T tokens of ``batch`` [B, T] of
    temperature² · KL(softmax(teacher logits / temperature) ‖ softmax(model logits / temperature)).

    ``teacher``: an HF causal LM with the student's vocabulary; it runs without gradients, in eval mode (set here, and
    left so), on the batch's device (moved there on the first batch that is elsewhere). None: the student's own
    original, from its own weights (:func:`base_model_logits`), with no second copy of the model in memory. The
    logits are compared in float32.

    Raises:
        ConfigError: ``temperature`` not a positive number, or ``teacher`` neither None nor an nn.Module; when the
            loss is called, a batch that is not token ids [B, T], teacher logits of another shape than the model's
            (another vocabulary), or with ``teacher=None`` under several processes a model not wrapped in DDP.
    """
    check_number("temperature", temperature, above=0)
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise ConfigError(f"teacher must be a torch nn.Module (an HF causal LM) or None, got {type(teacher).__name__}")
    if teacher is not None:
        teacher.eval()

    def teacher_logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        if teacher is None:
            return base_model_logits(model, batch)
        if next(teacher.parameters()).device != batch.device:  # e.g. one teacher per process, moved once
            teacher.to(batch.device)
        with torch.no_grad():
            return teacher(input_ids=batch, use_cache=False).logits

    def loss_fn(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        if batch.dim() != 2:
            raise ConfigError(f"distillation_loss got a batch of shape {tuple(batch.shape)}: expected token ids [B, T]")
        target = teacher_logits(model, batch)  # [B, T, V]
        logits = model(input_ids=batch, use_cache=False).logits  # [B, T, V]
        if logits.shape != target.shape:
            raise ConfigError(
                f"the teacher's logits have shape {tuple(target.shape)} and the model's {tuple(logits.shape)}: "
                "a teacher must share the student's vocabulary"
            )
        student = F.log_softmax(logits.float().flatten(0, 1) / temperature, dim=-1)  # [B·T, V]
        reference = F.log_softmax(target.float().flatten(0, 1) / temperature, dim=-1)  # [B·T, V]
        kl = F.kl_div(student, reference, log_target=True, reduction="sum") / student.shape[0]
        return kl * temperature**2

    return loss_fn


@torch.no_grad()
def base_model_logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The logits [B, T, V] of ``model``'s original on ``batch`` [B, T], from ``model``'s own weights: every adapter
    disabled (:func:`slimtune.disable_adapters`) and every linearised layer running its original softmax attention
    (:func:`slimtune.linear_attention.softmax_restored`), in eval mode, without gradients. Afterwards, also on an
    error, the model is as it was (adapters, layers and each module's train/eval mode). A DDP-wrapped model is
    unwrapped (its forward here needs no gradient synchronisation).

    Raises:
        ConfigError: under several processes, a model that is not DDP-wrapped (FSDP, e.g., shards it: this process
            may not hold its weights whole).
    """
    if isinstance(model, DistributedDataParallel):
        model = model.module
    elif dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ConfigError(
            f"distillation_loss(teacher=None) needs the whole model on each process; this {type(model).__name__} is "
            f"spread over {dist.get_world_size()} processes: pass the original model as the teacher"
        )
    linearised = [layer for _, layer in linear_attention_layers(model)]
    modules = [*model.modules(), *(layer.original for layer in linearised)]
    modes = [module.training for module in modules]
    try:
        for module in modules:
            module.eval()
        with disable_adapters(model), softmax_restored(model, [layer.layer_idx for layer in linearised]):
            return model(input_ids=batch, use_cache=False).logits
    finally:
        for module, mode in zip(modules, modes):
            module.train(mode)
