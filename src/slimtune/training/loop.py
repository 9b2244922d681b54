"""The one training loop on ``accelerate``, with checkpoints that resume exactly.

:func:`train` runs AdamW on the trainable parameters over packed token blocks [n, seq_len], minimising a loss
function (:mod:`slimtune.training.losses`; the causal-LM loss by default, the attention-transfer loss for
linear-attention recovery): gradient accumulation, a cosine schedule with linear warm-up, optional clipping,
periodic held-out evaluation, a progress bar on the main process, one JSON line of metrics per step in
``<output_dir>/metrics.jsonl`` (and TensorBoard scalars when ``tensorboard`` is installed), and checkpoints every N
steps (:mod:`slimtune.training.checkpoint`). DDP, FSDP or DeepSpeed come from ``accelerate launch`` and its
config; the loop itself has no distributed code beyond asking accelerate to reduce the loss for logging. DDP and
FSDP2 on CPU (gloo) are tested; FSDP goes through :mod:`slimtune.training.sharding`, which also turns it on for
CPU processes, where accelerate 1.15 ignores it.

Data order. Optimizer step s takes the global samples ``s·G … (s+1)·G − 1``, G = batch_size × grad_accum ×
num_processes; micro-step m of process r takes the ``batch_size`` samples starting at ``s·G + (m·P + r)·batch_size``.
Global sample p is block ``perm_e[p mod n]`` of epoch e = p // n, with ``perm_e`` a permutation drawn from
(seed, e) (or the identity without shuffling). So the data order depends only on the step, a resumed run sees
the same data, and 2 processes × batch b give the same steps as 1 process × batch 2b: each micro-batch's loss is
weighted by the items it averages over (:func:`slimtune.training.losses.loss_weight`: blocks, or answer tokens of
packed chat data) against the whole step's, so the step's gradient is that of the mean over all its items.

Resume (``resume=True``) restores the newest complete checkpoint: trainable parameters, optimizer and
scheduler state, every process's Python/NumPy/torch RNG and the step (hence the data position), so the final
weights equal an uninterrupted run's. A NaN or inf loss, or a NaN or inf gradient (its global norm is taken
before every optimizer step), stops training before it touches the weights, with a FloatingPointError naming the
step, the learning rate and the last good checkpoint.

:func:`train` reads top to bottom as :func:`_set_up`, :func:`_resume`, then per step :func:`_step` (forward and
backward over the micro-batches, the checks, the optimizer step) and :func:`_after_step` (evaluation, log,
checkpoint, progress bar). :func:`train_lm` is the short form without shuffling, evaluation or (by default) files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from torch import nn
from tqdm import tqdm

from slimtune.errors import ConfigError
from slimtune.training.checkpoint import checkpoint_root, latest_checkpoint, load_checkpoint, save_checkpoint
from slimtune.training.config import TrainConfig, TrainLMOptions, TrainResult
from slimtune.training.evaluate import check_blocks, evaluate_loss
from slimtune.training.losses import LossFn, causal_lm_loss, loss_weight
from slimtune.training.metrics import MetricsLog
from slimtune.training.order import BlockOrder
from slimtune.training.sharding import gather_weights, is_sharded, make_accelerator

if TYPE_CHECKING:
    from typing_extensions import Unpack

RUN_SETTINGS = ("global_batch", "n_blocks", "seq_len", "seed", "shuffle", "num_processes")


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LR factor rising linearly over ``warmup`` steps, then falling to 0 along a cosine until ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclasses.dataclass
class _Run:
    """What every step of one :func:`train` call uses. ``model`` is as accelerate prepared it (wrapped for DDP),
    ``unwrapped`` the caller's module; ``root`` is the checkpoint folder (None without ``output_dir``)."""

    config: TrainConfig
    loss_fn: LossFn
    accelerator: Accelerator
    model: nn.Module
    unwrapped: nn.Module
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    order: BlockOrder
    settings: dict[str, Any]
    root: Path | None


def train(
    model: nn.Module,
    blocks: torch.Tensor,
    config: TrainConfig,
    eval_blocks: torch.Tensor | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    *,
    loss_fn: LossFn = causal_lm_loss,
    train_mode: bool = True,
    before_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train ``model`` on ``blocks`` [n, seq_len] token ids, minimising ``loss_fn(model, batch [B, seq_len])``.

    ``loss_fn`` defaults to the causal-LM loss of an HF model (``model(input_ids=, labels=).loss``). ``blocks``
    may also be packed examples [n, seq_len, 3] or classification examples [n, seq_len, 2]
    (:func:`slimtune.training.evaluate.check_blocks`), trained with their own loss function.
    ``eval_blocks`` [m, seq_len]: held-out blocks, the mean ``loss_fn`` over them is evaluated every
    ``config.eval_every`` steps and after the last. ``on_step(record)`` is called on every process after each step
    with the step's metrics (the line written to ``metrics.jsonl``), after that step's evaluation and checkpoint.
    ``before_step(step)`` is called before each step (0-based; a resumed run starts at the restored step): a
    schedule that changes the model per step draws from (seed, step) there, so a resumed run repeats it.
    ``train_mode=False`` trains the model in eval mode (no dropout). The model is left in the mode it trained in.

    Raises:
        ConfigError: no trainable parameter; ``blocks`` (or ``eval_blocks``) empty, in none of the formats
            :func:`check_blocks` accepts, too short or holding ids outside the vocabulary; or a checkpoint that
            does not fit this run (the message names the setting that changed).
        FloatingPointError: the loss or a gradient became NaN or inf (the message names the step, the learning
            rate and the last good checkpoint; the weights are left as they were before that step).
        OSError: a checkpoint could not be written (the message names it and the newest complete one, which is
            left intact).
    """
    run = _set_up(model, blocks, eval_blocks, config, loss_fn)
    result = _resume(run)
    start = time.perf_counter()
    run.model.train(train_mode)
    with _outputs(run, result.start_step) as (log, bar):
        for step in range(result.start_step, config.steps):
            if before_step is not None:
                before_step(step)
            record = _step(run, blocks, step, result.checkpoint)
            _after_step(run, record, result, eval_blocks, log, bar)
            if on_step is not None:
                on_step(record)
    if is_sharded(run.accelerator):
        gather_weights(run.unwrapped)  # the caller's model holds full weights again, as without FSDP
    result.seconds = time.perf_counter() - start
    result.tokens = len(result.losses) * run.settings["global_batch"] * blocks.shape[1]
    return result


def train_lm(
    model: nn.Module,
    blocks: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    loss_fn: LossFn = causal_lm_loss,
    train_mode: bool = True,
    before_step: Callable[[int], None] | None = None,
    **options: Unpack[TrainLMOptions],
) -> TrainResult:
    """Train ``model`` (an HF causal LM) on ``blocks`` [n, seq_len] for ``steps`` AdamW steps, cycling the blocks.

    :func:`train` without shuffling or evaluation, minimising ``loss_fn`` (the causal-LM loss by default) in train
    mode unless ``train_mode=False``, calling ``before_step(step)`` before each step (see :func:`train`).
    ``options`` (:class:`TrainLMOptions`) set the other :class:`TrainConfig` fields: ``warmup`` (0),
    ``weight_decay`` (0.0), ``progress`` (True), ``desc`` ("training"), accumulation, clipping, checkpoints and
    resume (by default none, and no file is written).

    Raises:
        ConfigError: steps, batch_size or lr not positive, no trainable parameter, or bad ``blocks``.
        FloatingPointError: the loss or a gradient became NaN or inf (the message names the step and the
            learning rate).
    """
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, shuffle=False, **options)
    return train(model, blocks, config, loss_fn=loss_fn, train_mode=train_mode, before_step=before_step)


def _set_up(
    model: nn.Module, blocks: torch.Tensor, eval_blocks: torch.Tensor | None, config: TrainConfig, loss_fn: LossFn
) -> _Run:
    """Check the inputs; make the accelerator, AdamW on the trainable parameters and its schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameter: inject an adapter first")
    check_blocks("blocks", blocks, model)
    if eval_blocks is not None:
        check_blocks("eval_blocks", eval_blocks, model)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    accelerator = make_accelerator()
    settings = {
        "global_batch": config.batch_size * config.grad_accum * accelerator.num_processes,
        "n_blocks": len(blocks),
        "seq_len": blocks.shape[1],
        "seed": config.seed,
        "shuffle": config.shuffle,
        "num_processes": accelerator.num_processes,
    }
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    optimizer.zero_grad(set_to_none=True)  # a gradient left by an earlier backward would join the first step
    scheduler = cosine_with_warmup(optimizer, config.warmup, config.steps)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    return _Run(
        config=config,
        loss_fn=loss_fn,
        accelerator=accelerator,
        model=prepared,
        unwrapped=accelerator.unwrap_model(prepared),
        params=[p for p in prepared.parameters() if p.requires_grad],  # FSDP replaces them with sharded ones
        optimizer=optimizer,
        scheduler=scheduler,
        order=BlockOrder(len(blocks), config.seed, config.shuffle),
        settings=settings,
        root=checkpoint_root(config.output_dir) if config.output_dir is not None else None,
    )


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on HF activation (gradient) checkpointing, non-reentrant: each block is recomputed in backward with the
    RNG state of its forward, and no input needs to require grad (the base is frozen, only adapters train).

    Raises:
        ConfigError: the model is not a Hugging Face model that supports it (no ``supports_gradient_checkpointing``).
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"gradient_checkpointing=True is not allowed for {type(model).__name__}: expected a Hugging Face model "
            "that supports activation checkpointing"
        )
    options = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)  # the transformers 5 name
    if enable is not None:
        enable(activation_checkpointing_kwargs=options)
    else:
        getattr(model, "gradient_checkpointing_enable")(gradient_checkpointing_kwargs=options)  # noqa: B009


def _resume(run: _Run) -> TrainResult:
    """The empty result of this call, starting at step 0 or, with ``resume``, at the restored newest checkpoint.

    Raises:
        ConfigError: ``output_dir`` holds checkpoints but ``resume`` is off, or the checkpoint is of another run.
    """
    if run.root is not None and not run.config.resume and any(run.root.glob("step-*")):
        raise ConfigError(
            f"{run.root} holds checkpoints of an earlier run: set resume=True (--resume) to go on from them, or use "
            "another output_dir"
        )
    last = latest_checkpoint(run.root) if run.root is not None and run.config.resume else None
    if last is None:
        return TrainResult([], 0.0, 0)
    state = load_checkpoint(last, run.unwrapped, run.optimizer, run.scheduler, run.accelerator.process_index)
    for key in RUN_SETTINGS:
        if state["run"].get(key) != run.settings[key]:
            raise ConfigError(
                f"cannot resume from {last}: {key}={run.settings[key]!r} in this run but {state['run'].get(key)!r} "
                "when it was saved; resume with the same data, batch size, gradient accumulation, seed and number "
                "of processes, or start in a new output_dir"
            )
    _follow_new_schedule(run)
    return TrainResult([], 0.0, 0, start_step=state["step"], checkpoint=last)


def _follow_new_schedule(run: _Run) -> None:
    """Set the learning rate restored from a checkpoint to this run's schedule at the restored step.

    The optimizer's saved rate belongs to the old schedule: after a finished run of N steps it is the cosine's 0,
    so a run extended with a larger ``steps`` (or another ``lr`` or ``warmup``) would train its first new step at
    the old rate. With the same settings the rate is the one saved, so the resumed run equals an uninterrupted one.
    """
    run.scheduler.base_lrs = [run.config.lr for _ in run.optimizer.param_groups]
    for group, factor in zip(run.optimizer.param_groups, run.scheduler.lr_lambdas):
        group["initial_lr"] = run.config.lr
        group["lr"] = run.config.lr * factor(run.scheduler.last_epoch)
    run.scheduler._last_lr = [group["lr"] for group in run.optimizer.param_groups]  # what get_last_lr() reports


@contextlib.contextmanager
def _outputs(run: _Run, start_step: int) -> Iterator[tuple[MetricsLog | None, tqdm]]:
    """The metrics log (main process with ``output_dir`` only) and the progress bar, both closed on exit."""
    main, config = run.accelerator.is_main_process, run.config
    log = MetricsLog(Path(config.output_dir), start_step) if config.output_dir and main else None
    bar = tqdm(
        total=config.steps, initial=start_step, desc=config.desc, unit="step", disable=not (config.progress and main)
    )
    try:
        yield log, bar
    finally:
        bar.close()
        if log is not None:
            log.close()


def _step(run: _Run, blocks: torch.Tensor, step: int, last_checkpoint: Path | None) -> dict[str, Any]:
    """Optimizer step ``step`` (0-based) and the schedule's; returns the step's metrics record."""
    began = time.perf_counter()
    lr = run.optimizer.param_groups[0]["lr"]
    loss = _forward_backward(run, blocks, step, last_checkpoint)
    # the global gradient norm (clipping to inf multiplies by 1.0, which changes no value); None under DeepSpeed
    norm = run.accelerator.clip_grad_norm_(run.params, run.config.max_grad_norm or math.inf)
    if norm is not None and not math.isfinite(norm):
        run.optimizer.zero_grad(set_to_none=True)
        raise _diverged(f"the gradient norm is {float(norm)}", run, step, last_checkpoint)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    done = step + 1
    epoch = done * run.settings["global_batch"] / len(blocks)
    return {"step": done, "loss": loss, "lr": lr, "epoch": epoch, "step_seconds": time.perf_counter() - began}


def _forward_backward(run: _Run, blocks: torch.Tensor, step: int, last_checkpoint: Path | None) -> float:
    """Gradients of ``step``'s ``grad_accum`` micro-batches [batch_size, seq_len] on this process; returns the mean
    loss over processes and micro-batches."""
    accelerator, config = run.accelerator, run.config
    world, rank, size = accelerator.num_processes, accelerator.process_index, config.batch_size
    first = step * size * config.grad_accum * world
    # what the step's loss is a mean over, on every process alike (the data order depends only on the step)
    step_items = loss_weight(run.loss_fn, blocks[run.order.indices(first, size * config.grad_accum * world)])
    total = 0.0
    for micro in range(config.grad_accum):
        batch = blocks[run.order.indices(first + (micro * world + rank) * size, size)].to(accelerator.device)
        last = micro == config.grad_accum - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(run.model):
            share = loss_weight(run.loss_fn, batch) * world * config.grad_accum / max(1, step_items)
            loss = run.loss_fn(run.model, batch) * share  # 1.0 for losses that weigh every block the same
            mean = accelerator.reduce(loss.detach(), "mean").item()
            if not math.isfinite(mean):
                raise _diverged(f"loss is {mean}", run, step, last_checkpoint)
            accelerator.backward(loss / config.grad_accum)
        total += mean
    return total / config.grad_accum


def _diverged(what: str, run: _Run, step: int, last_checkpoint: Path | None) -> FloatingPointError:
    """The error that stops a run before ``step`` changes the weights: what diverged, where, and how to go on."""
    lr = run.optimizer.param_groups[0]["lr"]
    kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
    return FloatingPointError(
        f"{what} at step {step} (after {step} completed steps; lr={lr:.4g}): training stopped before this "
        f"step changed the weights; {kept}. Lower the learning rate (or check the data) and resume."
    )


def _after_step(
    run: _Run,
    record: dict[str, Any],
    result: TrainResult,
    eval_blocks: torch.Tensor | None,
    log: MetricsLog | None,
    bar: tqdm,
) -> None:
    """Record the step in ``result``; evaluate, log and checkpoint when due; move the progress bar."""
    config, done = run.config, record["step"]
    result.losses.append(record["loss"])
    result.step_seconds.append(record["step_seconds"])
    if eval_blocks is not None and (done == config.steps or (config.eval_every and done % config.eval_every == 0)):
        record["eval_loss"] = result.eval_losses[done] = _evaluate(run, eval_blocks)
    if log is not None:  # before the checkpoint: a kill between the two leaves a line the resume drops
        log.write(record)
    if (
        run.root is not None
        and config.checkpoint_every
        and (done % config.checkpoint_every == 0 or done == config.steps)
    ):
        samples = done * run.settings["global_batch"]
        state = {"samples": samples, "run": run.settings, "config": dataclasses.asdict(config)}
        result.checkpoint = save_checkpoint(
            run.root, done, run.unwrapped, run.optimizer, run.scheduler, state, config.keep_checkpoints, run.accelerator
        )
    bar.update(1)
    shown = {"loss": f"{record['loss']:.3f}"}
    if "eval_loss" in record:
        shown["eval"] = f"{record['eval_loss']:.3f}"
    bar.set_postfix(shown)


def _evaluate(run: _Run, blocks: torch.Tensor) -> float:
    """Mean held-out loss over ``blocks`` [m, seq_len], each process evaluating every P-th block (all of them under
    FSDP); the same on all."""
    accelerator = run.accelerator
    # under FSDP every process takes part in every forward, so each evaluates all blocks (the mean is the same)
    shard = blocks if is_sharded(accelerator) else blocks[accelerator.process_index :: accelerator.num_processes]
    mean = evaluate_loss(run.unwrapped, shard, run.loss_fn, run.config.eval_batch_size) if len(shard) else 0.0
    weight = float(loss_weight(run.loss_fn, shard)) if len(shard) else 0.0
    counts = torch.tensor([mean * weight, weight], dtype=torch.float64, device=accelerator.device)
    totals = accelerator.reduce(counts, "sum")
    return (totals[0] / totals[1]).item()
