"""Several adapter methods on the same model, data and steps: one table, one loss-curve plot, one JSON record.

Each run adapts its own copy of the base model, trains it with :func:`slimtune.training.train` (same blocks in the
same order, same schedule; only the method, and optionally the learning rate, differ), evaluates on the same
held-out blocks and saves its adapter under ``<output_dir>/<label>/adapter``. Reported per run:

- trainable parameters (and their share of the model);
- step time: the median of the optimizer steps' wall times;
- peak memory: on CUDA the allocator's peak during training; on CPU, which has no such counter, the bytes of
  the parameters, buffers and AdamW state (two tensors per trainable parameter) plus the peak of the tensors
  allocated during one extra forward and backward pass, tracked per tensor storage (exact and repeatable,
  independent of the allocator and of other processes);
- final training loss (mean of the last 5 steps, the per-step loss being noisy) and held-out loss.

It runs in one process (the runs share nothing to parallelise; under ``accelerate launch`` every process would
write the same files).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import platform
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtune import __version__
from slimtune.adapters.disha import DishaConfig
from slimtune.adapters.lora import LoraConfig
from slimtune.adapters.lora_sp import LoraSpConfig
from slimtune.adapters.quantized import stored_bytes
from slimtune.adapters.surm import SurmConfig
from slimtune.config import AdapterConfig
from slimtune.errors import ConfigError
from slimtune.fileio import atomic_write_json
from slimtune.inject import get_adapted_model, parameter_counts
from slimtune.memory import TensorMemoryPeak
from slimtune.serialization import save_adapter
from slimtune.training.config import TrainConfig
from slimtune.training.evaluate import evaluate_lm
from slimtune.training.loop import enable_gradient_checkpointing, train

RECORD_FILE = "compare.json"
PLOT_FILE = "loss_curves.png"
FINAL_LOSS_STEPS = 5
SMOOTHING_WINDOW = 5  # steps averaged in the training-loss curves of the plot


@dataclasses.dataclass
class CompareRun:
    """One method in a comparison: a ``label`` (a folder name), its adapter ``config`` and an optional ``lr``."""

    label: str
    config: AdapterConfig
    lr: float | None = None


# SmolLM2-135M, all seven projections: every run trains 2.2M–2.5M parameters (1.6–1.8% of the model). Learning
# rates from a short probe on BBC News (8 steps of 2 x 128 tokens): SURM circulant diverges at 1e-2, all five
# lower the held-out loss at these.
# The demo's five methods at 2.2M-2.5M trainable parameters on SmolLM2-135M, each at the best learning rate of its
# sweep in benchmarks/convergence.py at the demo's 20 steps (runs/convergence20; README "Convergence").
DEFAULT_RUNS = [
    CompareRun("lora", LoraConfig(r=8, alpha=16.0), lr=1e-3),
    CompareRun("bone", DishaConfig(r=16, variant="bone"), lr=3e-4),
    CompareRun("bat_row", DishaConfig(r=16, variant="bat_row"), lr=3e-4),
    CompareRun("surm_circulant", SurmConfig(structure="circulant", block_size=96), lr=3e-4),
    CompareRun("lora_sp", LoraSpConfig(r=16, alpha=32.0, freeze_fraction=0.5), lr=1e-3),
]


def study_config(steps: int, batch_size: int, evaluations: int, progress: bool = True) -> TrainConfig:
    """The training settings the demo and ``benchmarks/convergence.py`` share, so that the demo's runs are the
    study's: seed 0, warm-up over a tenth of the steps (at least 1), ``evaluations`` held-out evaluations."""
    return TrainConfig(
        steps=steps,
        batch_size=batch_size,
        warmup=max(1, steps // 10),
        seed=0,
        eval_every=max(1, steps // evaluations),
        progress=progress,
    )


def compare(
    base_model: nn.Module,
    runs: list[CompareRun],
    train_blocks: torch.Tensor,
    eval_blocks: torch.Tensor,
    config: TrainConfig,
    output_dir: str | Path,
    model_name: str | None = None,
) -> dict[str, Any]:
    """Train every run on its own copy of ``base_model``; write the record and the plot into ``output_dir``.

    ``config`` is shared by all runs (its ``lr`` where a run has none; its ``output_dir`` is replaced by
    ``<output_dir>/<label>``). ``base_model`` is left unchanged. Returns the record (also in ``compare.json``):
    ``{"rows": [...], "base_eval_loss", "train_config", ...}``, one row per run in order.

    Raises:
        ConfigError: no runs, or two runs with the same label.
    """
    labels = [run.label for run in runs]
    if not runs or len(set(labels)) != len(labels):
        raise ConfigError(f"runs={labels!r} is not allowed: expected at least one run, each with its own label")
    output_dir = Path(output_dir)
    base_eval = evaluate_lm(base_model, eval_blocks, config.eval_batch_size)
    rows = [_run_one(base_model, run, train_blocks, eval_blocks, config, output_dir) for run in runs]
    record = {
        "model": model_name,
        "base_eval_loss": base_eval,
        "train_config": dataclasses.asdict(config),
        "train_blocks": list(train_blocks.shape),
        "eval_blocks": list(eval_blocks.shape),
        "rows": rows,
        "time_utc": datetime.now(timezone.utc).isoformat(),
        "versions": _versions(),
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
    }
    atomic_write_json(output_dir / RECORD_FILE, record)
    plot_losses(rows, output_dir / PLOT_FILE, base_eval)
    return record


def format_table(record: dict[str, Any]) -> str:
    """A Markdown table of a :func:`compare` record's rows."""
    header = ["method", "lr", "trainable params", "% of model", "step s (median)", "peak MB", "train loss", "val loss"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in record["rows"]:
        cells = [
            row["label"],
            f"{row['lr']:g}",
            f"{row['trainable']:,}",
            f"{100 * row['trainable'] / row['total']:.2f}",
            f"{row['step_seconds_median']:.2f}",
            f"{row['peak_bytes'] / 2**20:.0f}",
            f"{row['train_loss']:.4f}",
            f"{row['eval_loss']:.4f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(
        f"\nheld-out loss before fine-tuning: {record['base_eval_loss']:.4f}; train loss: mean of the last "
        f"{FINAL_LOSS_STEPS} steps"
    )
    return "\n".join(lines)


def best_run(record: dict[str, Any]) -> dict[str, Any]:
    """The row with the lowest held-out loss."""
    return min(record["rows"], key=lambda row: row["eval_loss"])


def plot_losses(rows: list[dict[str, Any]], path: Path, base_eval: float | None = None) -> Path:
    """Training loss per step (left) and held-out loss (right, from ``base_eval`` at step 0) of every run, as a PNG
    (Agg backend, no display)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.5), dpi=110)
    train_axes, eval_axes = figure.subplots(1, 2)
    for row in rows:
        steps = range(1, len(row["losses"]) + 1)
        (line,) = train_axes.plot(steps, row["losses"], linewidth=0.6, alpha=0.3)
        train_axes.plot(steps, smoothed(row["losses"]), linewidth=1.6, color=line.get_color(), label=row["label"])
        evals = sorted((int(step), loss) for step, loss in row["eval_losses"].items())
        evals = ([(0, base_eval)] if base_eval is not None else []) + evals
        eval_axes.plot(*zip(*evals), "o-", color=line.get_color(), label=row["label"])
    for axes, title in (
        (train_axes, f"training loss (per batch, faint; {SMOOTHING_WINDOW}-step mean)"),
        (eval_axes, "held-out loss"),
    ):
        axes.set_title(title)
        axes.set_xlabel("optimizer step")
        axes.grid(alpha=0.3)
    train_axes.set_ylabel("cross-entropy")
    eval_axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def smoothed(values: list[float], window: int = SMOOTHING_WINDOW) -> list[float]:
    """The trailing mean of ``values`` over up to ``window`` entries (shorter at the start), one per entry."""
    sums = [0.0, *itertools.accumulate(values)]
    return [(sums[i + 1] - sums[max(0, i + 1 - window)]) / min(i + 1, window) for i in range(len(values))]


def step_peak_bytes(model: nn.Module, batch: torch.Tensor) -> int:
    """Peak memory of one AdamW training step of ``model`` on ``batch`` [b, seq_len], in bytes (module docstring).

    Runs one forward and backward pass (no optimizer step), then clears the gradients; the RNG is left as it was.
    """
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    resident = stored_bytes(model) + 2 * trainable
    was_training = model.training
    model.train()
    with torch.random.fork_rng(devices=[]), TensorMemoryPeak() as tracker:
        model(input_ids=batch, labels=batch).loss.backward()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return resident + tracker.peak


def _run_one(
    base_model: nn.Module,
    run: CompareRun,
    train_blocks: torch.Tensor,
    eval_blocks: torch.Tensor,
    config: TrainConfig,
    output_dir: Path,
) -> dict[str, Any]:
    torch.manual_seed(config.seed)  # each run's initialisation depends on the seed only, not on the runs before it
    model = get_adapted_model(copy.deepcopy(base_model), run.config)
    if config.gradient_checkpointing:  # before the peak-memory step, so that it measures the checkpointed step
        enable_gradient_checkpointing(model)
    counts = parameter_counts(model)
    run_config = dataclasses.replace(
        config,
        lr=run.lr or config.lr,
        output_dir=str(output_dir / run.label),
        desc=run.label,
        checkpoint_every=None,
        resume=False,
    )
    if torch.cuda.is_available():  # accelerate trains on the GPU
        torch.cuda.reset_peak_memory_stats()
        result = train(model, train_blocks, run_config, eval_blocks)
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = step_peak_bytes(model, train_blocks[: config.batch_size])
        result = train(model, train_blocks, run_config, eval_blocks)
    adapter_dir = save_adapter(model, output_dir / run.label / "adapter")
    return {
        "label": run.label,
        "config": run.config.to_dict(),
        "lr": run_config.lr,
        "trainable": counts.trainable,
        "total": counts.total,
        "step_seconds_median": statistics.median(result.step_seconds),
        "peak_bytes": peak,
        "train_loss": statistics.fmean(result.losses[-FINAL_LOSS_STEPS:]),
        "eval_loss": result.eval_losses[config.steps],
        "losses": result.losses,
        "eval_losses": {str(step): loss for step, loss in result.eval_losses.items()},
        "seconds": result.seconds,
        "adapter": str(adapter_dir),
    }


def _versions() -> dict[str, str]:
    import accelerate
    import transformers

    return {
        "slimtune": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
    }
