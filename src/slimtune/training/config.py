"""Settings and results of the training loop: :class:`TrainConfig` (and the keyword forms of some of its fields,
:class:`LoopOptions` and :class:`TrainLMOptions`), :class:`TrainResult`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TypedDict

from slimtune.config import DictConfig, check_bool, check_int, check_number
from slimtune.errors import ConfigError


@dataclasses.dataclass
class TrainConfig(DictConfig):
    """Settings of :func:`train`.

    Args:
        steps: optimizer steps in all (a resumed run goes on up to this many).
        batch_size: blocks per micro-batch on each process.
        grad_accum: micro-batches per optimizer step (their gradients are summed, the loss divided).
        lr: peak learning rate of AdamW.
        warmup: steps of linear warm-up before the cosine decay to 0 at ``steps``.
        weight_decay: AdamW's decoupled weight decay.
        max_grad_norm: clip the global gradient norm to this (None: no clipping).
        seed: draws the order of the blocks, one permutation per epoch.
        shuffle: False takes the blocks in order, cycling.
        eval_every: evaluate on the held-out blocks every this many steps (and always after the last one).
        eval_batch_size: blocks per evaluation batch.
        output_dir: where ``metrics.jsonl`` and ``checkpoints/`` go (None: neither is written).
        checkpoint_every: save a checkpoint every this many steps and after the last one (needs ``output_dir``),
            so a finished run can always be extended with ``resume`` and a larger ``steps``.
        keep_checkpoints: how many of the newest checkpoints to keep.
        resume: go on from the newest complete checkpoint in ``output_dir`` (start afresh when there is none);
            ``lr``, ``warmup`` and ``steps`` may change, the schedule is then this run's at the restored step.
        gradient_checkpointing: recompute each transformer block's activations in backward instead of keeping
            them (HF activation checkpointing, non-reentrant): less memory, about one more forward per
            step, the same gradients. Needs a Hugging Face model that supports it; left enabled after.
        progress: show a progress bar (main process only).
        desc: the progress bar's label.
    """

    steps: int = 100
    batch_size: int = 2
    grad_accum: int = 1
    lr: float = 1e-4
    warmup: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    seed: int = 0
    shuffle: bool = True
    eval_every: int | None = None
    eval_batch_size: int = 4
    output_dir: str | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    resume: bool = False
    gradient_checkpointing: bool = False
    progress: bool = True
    desc: str = "training"

    def __post_init__(self) -> None:
        for field in ("steps", "batch_size", "grad_accum", "eval_batch_size", "keep_checkpoints"):
            check_int(field, getattr(self, field))
        for field in ("eval_every", "checkpoint_every"):
            check_int(field, getattr(self, field), optional=True)
        check_int("warmup", self.warmup, minimum=0)
        check_int("seed", self.seed, minimum=0)
        check_number("lr", self.lr, above=0)
        check_number("weight_decay", self.weight_decay, at_least=0)
        check_number("max_grad_norm", self.max_grad_norm, above=0, optional=True)
        check_bool("shuffle", self.shuffle)
        check_bool("resume", self.resume)
        check_bool("gradient_checkpointing", self.gradient_checkpointing)
        if self.output_dir is None:
            for field in ("checkpoint_every", "resume"):
                if getattr(self, field):
                    raise ConfigError(f"{field}={getattr(self, field)!r} needs output_dir: set output_dir to a folder")


class LoopOptions(TypedDict, total=False):
    """:class:`TrainConfig` fields that ``attention_transfer`` and ``finetune`` take as keyword arguments:
    accumulation, clipping, checkpoints, resume and gradient checkpointing. Left out, each keeps its default."""

    grad_accum: int
    max_grad_norm: float | None
    output_dir: str | None
    checkpoint_every: int | None
    keep_checkpoints: int
    resume: bool
    gradient_checkpointing: bool


class TrainLMOptions(LoopOptions, total=False):
    """The keyword arguments of ``train_lm``: :class:`LoopOptions` and the schedule, weight decay and progress bar."""

    warmup: int
    weight_decay: float
    progress: bool
    desc: str


@dataclasses.dataclass
class TrainResult:
    """What a :func:`train` call did. ``losses`` and ``step_seconds`` cover the steps run by this call only.

    ``losses[i]`` is the mean training loss of step ``start_step + i + 1`` over all processes and micro-batches;
    ``eval_losses`` maps a step (1-based count of steps done) to the held-out loss after it; ``tokens`` counts
    the tokens trained on in this call, over all processes; ``checkpoint`` is the last one saved (or None).
    """

    losses: list[float]
    seconds: float
    tokens: int
    step_seconds: list[float] = dataclasses.field(default_factory=list)
    eval_losses: dict[int, float] = dataclasses.field(default_factory=dict)
    start_step: int = 0
    checkpoint: Path | None = None
