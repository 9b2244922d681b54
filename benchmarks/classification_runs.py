"""The runs of ``benchmarks/classification.py``: one pretrained classifier copied per run, each row's learning-rate
sweep (extended past an edge of its grid), and its (k, seed) runs at the chosen rate, scored on the test split.

Sweep: the row's rates at the sweep's k and first seed, chosen by validation accuracy (ties: lower validation loss).
When the best rate is the lowest or highest tried, the sweep goes on past it by the grid's own ratio (at most
``MAX_EXTENSIONS`` times, while each new rate wins), so that the chosen rate lies inside the rates tried. A study can
continue an earlier record of the same settings: a row of the same config takes that record's sweep runs as tried,
runs only the rates still missing (the extensions), and keeps the record's (k, seed) runs when its chosen rate does
not change.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from typing import Any

import torch
from torch import nn

import slimtune as st
from classification_rows import Row
from slimtune.app.labelled_data import bbc_topic_data
from slimtune.app.models import load_classifier
from slimtune.training.classification import classification_loss, encode_classification, evaluate_classifier, k_shot
from slimtune.training.config import TrainConfig
from slimtune.training.loop import train

EVAL_BATCH = 32
MAX_EXTENSIONS = 2


@dataclasses.dataclass
class Setup:
    """What every run on one pretrained classifier shares; examples are [n, T, 2] (``encode_classification``)."""

    model: nn.Module
    head: str
    train: torch.Tensor
    train_labels: list[int]
    validation: torch.Tensor
    test: torch.Tensor
    num_labels: int
    batch: int


@dataclasses.dataclass
class Plan:
    """Which runs a study makes: ``steps[k]`` optimizer steps at k examples per class; the sweep at ``sweep_k``."""

    rows: list[Row]
    ks: list[int]
    seeds: list[int]
    steps: dict[int, int]
    sweep_k: int


def make_setup(name: str, head: str, max_len: int, batch: int, n_eval: int | None) -> Setup:
    """Load ``name`` as a BBC-topic classifier once and encode the splits (the first ``n_eval`` held-out articles)."""
    data = {split: bbc_topic_data(split) for split in ("train", "validation", "test")}
    names = data["train"].names
    model, tokenizer = load_classifier(name, names)

    def encode(split: str, n: int | None) -> torch.Tensor:
        return encode_classification(data[split].texts[:n], data[split].labels[:n], tokenizer, max_len)

    validation, test = encode("validation", n_eval), encode("test", n_eval)
    return Setup(model, head, encode("train", None), data["train"].labels, validation, test, len(names), batch)


def fresh_model(setup: Setup, row: Row, seed: int) -> nn.Module:
    """A copy of the pretrained model, its head redrawn from ``seed``, trainable as ``row`` says."""
    model = copy.deepcopy(setup.model)
    head = model.get_submodule(setup.head)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * model.config.initializer_range)
        if head.bias is not None:
            head.bias.zero_()
    torch.manual_seed(seed)  # adapter inits that draw from the global generator, then dropout
    if row.config is not None:
        st.get_adapted_model(model, row.config)
    else:
        model.requires_grad_(row.name == "full")
        head.requires_grad_(True)
    return model


def train_run(setup: Setup, row: Row, k: int, seed: int, lr: float, steps: int) -> tuple[nn.Module | None, dict]:
    """Train ``row`` on k examples per class; the model (None if it diverged) and the run's fields."""
    cpu, wall = time.process_time(), time.perf_counter()
    model = fresh_model(setup, row, seed)
    counts = st.parameter_counts(model)
    head = sum(p.numel() for p in model.get_submodule(setup.head).parameters() if p.requires_grad)  # or its copy
    info: dict[str, Any] = {"row": row.name, "k": k, "seed": seed, "lr": lr, "steps": steps}
    info |= {"trainable": counts.trainable, "trainable_without_head": counts.trainable - head}
    examples = setup.train[k_shot(setup.train_labels, k, seed)]  # [5k, T, 2]
    config = TrainConfig(
        steps=steps, batch_size=setup.batch, lr=lr, warmup=max(1, steps // 10), seed=seed, progress=False
    )
    try:
        result = train(model, examples, config, loss_fn=classification_loss, train_mode=True)  # dropout on
        info |= {"train_loss_last5": statistics.fmean(result.losses[-5:])}
        info |= {"step_seconds_median": statistics.median(result.step_seconds)}
    except FloatingPointError as err:
        info["diverged"] = str(err)[:300]
        model = None
    _add_time(info, cpu, wall)
    return model, info


def evaluate(setup: Setup, model: nn.Module, examples: torch.Tensor, info: dict, prefix: str = "") -> dict:
    """``info`` with the accuracy, macro-F1 and loss of ``model`` on ``examples`` (and the time they took)."""
    cpu, wall = time.process_time(), time.perf_counter()
    metrics = evaluate_classifier(model, examples, setup.num_labels, EVAL_BATCH)
    scores = {"accuracy": metrics.accuracy, "macro_f1": metrics.macro_f1, "loss": metrics.loss}
    info = info | {prefix + name: value for name, value in scores.items()}
    if not prefix:
        info["confusion"] = metrics.confusion
    _add_time(info, cpu, wall)
    return info


def _add_time(info: dict, cpu: float, wall: float) -> None:
    info["cpu_seconds"] = info.get("cpu_seconds", 0.0) + time.process_time() - cpu
    info["seconds"] = info.get("seconds", 0.0) + time.perf_counter() - wall


def sweep_row(
    setup: Setup, row: Row, plan: Plan, sweep: list[dict], done: list[dict]
) -> tuple[nn.Module | None, dict | None]:
    """Run ``row``'s rates at the sweep's k and first seed (appending to ``sweep``), past an edge of the grid while
    the edge rate wins (module docstring); the best model (None when an earlier run is best) and its run. ``done``:
    the row's sweep runs of an earlier record, taken as tried."""
    best_model, best = None, None
    tried: list[float] = []
    for info in done:
        sweep.append(info)
        tried.append(info["lr"])
        if "val_accuracy" in info and _better(info, best):
            best = info
    pending = [lr for lr in row.lrs if lr not in tried]
    ratio = row.lrs[1] / row.lrs[0] if len(row.lrs) > 1 else 1.0
    extensions = 0
    while True:
        if not pending and best is not None and ratio > 1 and extensions < MAX_EXTENSIONS:
            edge = {min(tried): min(tried) / ratio, max(tried): max(tried) * ratio}.get(best["lr"])
            if edge is not None and not any(abs(edge / lr - 1) < 1e-6 for lr in tried):
                pending.append(edge)
                extensions += 1
        if not pending:
            return best_model, best
        lr = pending.pop(0)
        tried.append(lr)
        model, info = train_run(setup, row, plan.sweep_k, plan.seeds[0], lr, plan.steps[plan.sweep_k])
        if model is not None:
            info = evaluate(setup, model, setup.validation, info, prefix="val_")
            if _better(info, best):
                best_model, best = model, info
        sweep.append(info)
        print(f"sweep {row.name} lr={lr:g}: val accuracy {info.get('val_accuracy', float('nan')):.3f}", flush=True)


def _better(info: dict, best: dict | None) -> bool:
    """Higher validation accuracy, ties broken by lower validation loss."""
    return best is None or (-info["val_accuracy"], info["val_loss"]) < (-best["val_accuracy"], best["val_loss"])


def run_study(setup: Setup, plan: Plan, earlier: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every row's sweep, then its (k, seed) runs at the chosen rate, scored on the test split. With ``earlier`` (an
    earlier study's ``{"rows", "sweep", "runs"}`` of the same settings) a row of the same config continues that
    row's sweep, and keeps its runs when the chosen rate stays the same."""
    sweep: list[dict] = []
    runs: list[dict] = []
    rows: dict[str, dict] = {}
    for row in plan.rows:
        config = row.config.to_dict() if row.config is not None else None
        same = earlier is not None and earlier["rows"].get(row.name, {}).get("config", False) == config
        done = [entry for entry in earlier["sweep"] if entry["row"] == row.name] if earlier and same else []
        best_model, best = sweep_row(setup, row, plan, sweep, done)
        tried = [entry["lr"] for entry in sweep if entry["row"] == row.name]
        rows[row.name] = {"config": config, "lrs": tried, "chosen_lr": best and best["lr"]}
        if best is None:
            continue
        rows[row.name] |= {"trainable": best["trainable"], "trainable_without_head": best["trainable_without_head"]}
        if best_model is None:  # an earlier run is still the best: its (k, seed) runs stand
            assert earlier is not None
            rows[row.name]["runs_from_earlier_record"] = True
            runs += [run for run in earlier["runs"] if run["row"] == row.name]
            print(f"{row.name}: chosen lr {best['lr']:g} as before; its runs are the earlier record's", flush=True)
            continue
        for k in plan.ks:
            for seed in plan.seeds:
                if (k, seed) == (plan.sweep_k, plan.seeds[0]):
                    model, info = best_model, {**best, "from_sweep": True}
                else:
                    model, info = train_run(setup, row, k, seed, best["lr"], plan.steps[k])
                runs.append(evaluate(setup, model, setup.test, info) if model is not None else info)
                print(f"{row.name} k={k} seed={seed}: test accuracy {runs[-1].get('accuracy', float('nan')):.3f}")
    return {"rows": rows, "sweep": sweep, "runs": runs}


def study_seconds(study: dict[str, Any]) -> tuple[float, float]:
    """(wall, process CPU) seconds of every run a study's record holds, reused rows included: the sweep runs, the
    other runs, and the test evaluation of the sweep runs that stand as a (k, seed) run (counted once)."""
    wall = sum(entry.get("seconds", 0.0) for entry in [*study["sweep"], *study["runs"]])
    cpu = sum(entry.get("cpu_seconds", 0.0) for entry in [*study["sweep"], *study["runs"]])
    for run in study["runs"]:
        if run.get("from_sweep"):
            twin = next(e for e in study["sweep"] if e["row"] == run["row"] and e["lr"] == run["lr"])
            wall -= twin.get("seconds", 0.0)
            cpu -= twin.get("cpu_seconds", 0.0)
    return wall, cpu
