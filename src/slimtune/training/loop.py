"""One plain causal-LM training loop on ``accelerate``, with checkpoints that resume exactly.

:func:`train` runs AdamW on the trainable parameters over packed token blocks [n, seq_len]: gradient
accumulation, a cosine schedule with linear warm-up, periodic held-out evaluation, a progress bar on the main
process, one JSON line of metrics per step in ``<output_dir>/metrics.jsonl`` (and TensorBoard scalars when
``tensorboard`` is installed), and checkpoints every N steps (:mod:`slimtune.training.checkpoint`). DDP, FSDP or DeepSpeed
come from ``accelerate launch`` and its config; the loop itself has no distributed code beyond asking accelerate
to reduce the loss for logging. Only DDP on CPU (gloo) is tested.

Data order. Optimizer step s takes the global samples ``s·G … (s+1)·G − 1``, G = batch_size × grad_accum ×
num_processes; micro-step m of process r takes the ``batch_size`` samples starting at ``s·G + (m·P + r)·batch_size``.
Global sample p is block ``perm_e[p mod n]`` of epoch e = p // n, with ``perm_e`` a permutation drawn from
(seed, e) (or the identity without shuffling). So the data order depends only on the step, a resumed run sees
the same data, and 2 processes × batch b give the same steps as 1 process × batch 2b (each block has the same
number of tokens, so the mean of the processes' mean losses is the global mean).

Resume (``resume=True``) restores the newest complete checkpoint: trainable parameters, optimizer and
scheduler state, every process's Python/NumPy/torch RNG and the step (hence the data position), so the final
weights equal an uninterrupted run's. A NaN or inf loss, or a NaN or inf gradient (its global norm is taken
before every optimizer step), stops training before it touches the weights, with a FloatingPointError naming the
step, the learning rate and the last good checkpoint.

:func:`train_lm` is the short form the benchmarks and the linear-attention recovery use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from tqdm import tqdm

from slimtune.errors import ConfigError
from slimtune.training.checkpoint import checkpoint_root, latest_checkpoint, load_checkpoint, save_checkpoint
from slimtune.training.config import TrainConfig, TrainResult
from slimtune.training.evaluate import check_blocks, evaluate_lm
from slimtune.training.metrics import MetricsLog
from slimtune.training.order import BlockOrder

RUN_SETTINGS = ("global_batch", "n_blocks", "seq_len", "seed", "shuffle", "num_processes")


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LR factor rising linearly over ``warmup`` steps, then falling to 0 along a cosine until ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train(
    model: nn.Module,
    blocks: torch.Tensor,
    config: TrainConfig,
    eval_blocks: torch.Tensor | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train ``model`` (an HF causal LM; ``model(input_ids=, labels=)`` returns ``.loss``) on ``blocks`` [n, seq_len].

    ``eval_blocks`` [m, seq_len]: held-out blocks, evaluated every ``config.eval_every`` steps and after the last.
    ``on_step(record)`` is called on every process after each step with the step's metrics (the line written to
    ``metrics.jsonl``), after that step's evaluation and checkpoint.

    Raises:
        ConfigError: no trainable parameter; ``blocks`` (or ``eval_blocks``) empty, not integer token ids
            [n, seq_len], shorter than 2 tokens or holding ids outside the vocabulary; or a checkpoint that does
            not fit this run (the message names the setting that changed).
        FloatingPointError: the loss or a gradient became NaN or inf (the message names the step, the learning
            rate and the last good checkpoint; the weights are left as they were before that step).
        OSError: a checkpoint could not be written (the message names it and the newest complete one, which is
            left intact).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameter: inject an adapter first")
    check_blocks("blocks", blocks, model)
    if eval_blocks is not None:
        check_blocks("eval_blocks", eval_blocks, model)
    accelerator = Accelerator()
    settings = {
        "global_batch": config.batch_size * config.grad_accum * accelerator.num_processes,
        "n_blocks": len(blocks),
        "seq_len": blocks.shape[1],
        "seed": config.seed,
        "shuffle": config.shuffle,
        "num_processes": accelerator.num_processes,
    }
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = cosine_with_warmup(optimizer, config.warmup, config.steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    root = checkpoint_root(config.output_dir) if config.output_dir is not None else None
    start_step, last_checkpoint = 0, None
    if config.resume:
        last_checkpoint = latest_checkpoint(root)
        if last_checkpoint is not None:
            state = load_checkpoint(last_checkpoint, unwrapped, optimizer, scheduler, accelerator.process_index)
            _check_same_run(state["run"], settings, last_checkpoint)
            start_step = state["step"]
    elif root is not None and any(root.glob("step-*")):
        raise ConfigError(
            f"{root} holds checkpoints of an earlier run: set resume=True (--resume) to go on from them, or use "
            "another output_dir"
        )
    log = MetricsLog(Path(config.output_dir), start_step) if config.output_dir and accelerator.is_main_process else None
    order = BlockOrder(len(blocks), config.seed, config.shuffle)
    result = TrainResult([], 0.0, 0, start_step=start_step, checkpoint=last_checkpoint)
    bar = tqdm(
        total=config.steps, initial=start_step, desc=config.desc, unit="step",
        disable=not (config.progress and accelerator.is_main_process),
    )
    start = time.perf_counter()
    model.train()
    try:
        for step in range(start_step, config.steps):
            began = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            loss = _step(accelerator, model, params, optimizer, blocks, order, config, step, result.checkpoint)
            scheduler.step()
            done = step + 1
            record = {"step": done, "loss": loss, "lr": lr, "epoch": done * settings["global_batch"] / len(blocks)}
            record["step_seconds"] = time.perf_counter() - began
            result.losses.append(loss)
            result.step_seconds.append(record["step_seconds"])
            if eval_blocks is not None and (done == config.steps or (config.eval_every and done % config.eval_every == 0)):
                record["eval_loss"] = result.eval_losses[done] = _evaluate(accelerator, unwrapped, eval_blocks, config)
            if log is not None:  # before the checkpoint: a kill between the two leaves a line the resume drops
                log.write(record)
            if config.checkpoint_every and done % config.checkpoint_every == 0:
                position = {"samples": done * settings["global_batch"], "run": settings, "config": dataclasses.asdict(config)}
                result.checkpoint = save_checkpoint(
                    root, done, unwrapped, optimizer, scheduler, position, config.keep_checkpoints, accelerator
                )
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", **({"eval": f"{record['eval_loss']:.3f}"} if "eval_loss" in record else {}))
            if on_step is not None:
                on_step(record)
    finally:
        bar.close()
        if log is not None:
            log.close()
    result.seconds = time.perf_counter() - start
    result.tokens = len(result.losses) * settings["global_batch"] * blocks.shape[1]
    return result


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
    """Train ``model`` (an HF causal LM) on ``blocks`` [n, seq_len] for ``steps`` AdamW steps, cycling the blocks in order.

    :func:`train` without shuffling, evaluation or files.

    Raises:
        ConfigError: steps, batch_size or lr not positive, no trainable parameter, or bad ``blocks``.
        FloatingPointError: the loss or a gradient became NaN or inf (the message names the step and the
            learning rate).
    """
    config = TrainConfig(
        steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, weight_decay=weight_decay, shuffle=False,
        progress=progress, desc=desc,
    )
    return train(model, blocks, config)


def _step(
    accelerator: Accelerator,
    model: nn.Module,
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    blocks: torch.Tensor,
    order: BlockOrder,
    config: TrainConfig,
    step: int,
    last_checkpoint: Path | None,
) -> float:
    """One optimizer step over ``grad_accum`` micro-batches; returns the mean loss over processes and micro-batches."""
    world, rank, size = accelerator.num_processes, accelerator.process_index, config.batch_size
    first = step * size * config.grad_accum * world
    total = 0.0
    for micro in range(config.grad_accum):
        batch = blocks[order.indices(first + (micro * world + rank) * size, size)].to(accelerator.device)
        last = micro == config.grad_accum - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            loss = model(input_ids=batch, labels=batch).loss
            mean = accelerator.reduce(loss.detach(), "mean").item()
            if not math.isfinite(mean):
                lr = optimizer.param_groups[0]["lr"]
                raise FloatingPointError(_diverged_message(f"loss is {mean}", step, lr, last_checkpoint))
            accelerator.backward(loss / config.grad_accum)
        total += mean
    # the global gradient norm (clipping to inf multiplies by 1.0, which changes no value); None under DeepSpeed
    norm = accelerator.clip_grad_norm_(params, config.max_grad_norm or math.inf)
    if norm is not None and not math.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        what = f"the gradient norm is {float(norm)}"
        raise FloatingPointError(_diverged_message(what, step, optimizer.param_groups[0]["lr"], last_checkpoint))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / config.grad_accum


def _diverged_message(what: str, step: int, lr: float, last_checkpoint: Path | None) -> str:
    kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
    return (
        f"{what} at step {step} (after {step} completed steps; lr={lr:.4g}): training stopped before this "
        f"step changed the weights; {kept}. Lower the learning rate (or check the data) and resume."
    )


def _evaluate(accelerator: Accelerator, model: nn.Module, blocks: torch.Tensor, config: TrainConfig) -> float:
    """Held-out loss over ``blocks``, each process evaluating every P-th block; the result is the same on all."""
    shard = blocks[accelerator.process_index :: accelerator.num_processes]
    local = evaluate_lm(model, shard, config.eval_batch_size) * len(shard) if len(shard) else 0.0
    totals = accelerator.reduce(torch.tensor([local, float(len(shard))], dtype=torch.float64, device=accelerator.device), "sum")
    return (totals[0] / totals[1]).item()


def _check_same_run(saved: dict[str, Any], current: dict[str, Any], folder: Path) -> None:
    for key in RUN_SETTINGS:
        if saved.get(key) != current[key]:
            raise ConfigError(
                f"cannot resume from {folder}: {key}={current[key]!r} in this run but {saved.get(key)!r} when it was "
                "saved; resume with the same data, batch size, gradient accumulation, seed and number of processes, "
                "or start in a new output_dir"
            )


