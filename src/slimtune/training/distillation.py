"""Logit distillation: a loss that trains a model to reproduce another model's next-token distributions.

:func:`distillation_loss` (teacher) is a :data:`slimtune.training.losses.LossFn` for the one training loop: the mean
over the tokens of ``batch`` of KL(p_teacher ‖ p_student), both distributions softened by ``temperature`` and the
loss scaled by temperature² (Hinton et al., 2015, so that gradients keep their size as the temperature changes).

Recovery of a linearised model (:func:`slimtune.training.recovery.finetune`) uses it with the original model as the
teacher: where the causal-LM loss rewards the student for whatever lowers its loss on the corpus (leaning on local
context), the KL asks it to match the original's distribution everywhere, including where the original read the
answer from far back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.config import check_number
from slimtune.errors import ConfigError
from slimtune.training.losses import LossFn


def distillation_loss(teacher: nn.Module, temperature: float = 1.0) -> LossFn:
    """A loss ``loss_fn(model, batch)`` [] = mean over the B·T tokens of ``batch`` [B, T] of
    temperature² · KL(softmax(teacher logits / temperature) ‖ softmax(model logits / temperature)).

    ``teacher`` is an HF causal LM with the student's vocabulary; it runs without gradients, in eval mode (set here, and
    left so), on the batch's device (moved there on the first batch that is elsewhere). The logits are compared in
    float32.

    Raises:
        ConfigError: ``temperature`` not a positive number, or ``teacher`` is not an nn.Module; when the loss is
            called, a batch that is not token ids [B, T], or teacher logits of another shape than the model's (another
            vocabulary).
    """
    check_number("temperature", temperature, above=0)
    if not isinstance(teacher, nn.Module):
        raise ConfigError(f"teacher must be a torch nn.Module (an HF causal LM), got {type(teacher).__name__}")
    teacher.eval()

    def loss_fn(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        if batch.dim() != 2:
            raise ConfigError(f"distillation_loss got a batch of shape {tuple(batch.shape)}: expected token ids [B, T]")
        if next(teacher.parameters()).device != batch.device:  # e.g. one teacher per process, moved once
            teacher.to(batch.device)
        with torch.no_grad():
            target = teacher(input_ids=batch, use_cache=False).logits  # [B, T, V]
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
