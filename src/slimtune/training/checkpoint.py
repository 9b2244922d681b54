"""Training checkpoints that a killed process cannot leave half-visible, and that load without unpickling.

A checkpoint is a folder ``<output_dir>/checkpoints/step-<NNNNNN>`` holding

- ``trainable.safetensors``: the trainable parameters by name (the adapter, and whatever else trains);
- ``optimizer.safetensors`` + ``optimizer.json``, ``scheduler.json``: their ``state_dict()``, tensors apart;
- ``rng-rank<R>.json`` (+ ``.safetensors``): the Python, NumPy and torch RNG states of process R;
- ``state.json``, written last: step, data position, run settings and a manifest of every file's size.

Everything is written into a hidden temporary folder first (``.step-<NNNNNN>.tmp``), which is renamed to its
final name once complete, so a process killed while saving leaves at most a temporary folder, never a
``step-*`` one that looks done. :func:`latest_checkpoint` still checks the manifest and skips (with a warning) a
``step-*`` folder whose files are missing or of the wrong size, say one copied half-way.

Tensors are read with safetensors and the rest with ``json``, through :mod:`slimtune.file_format` (which also holds
this format's version): nothing is ever unpickled, and a damaged file is a ConfigError naming it. The JSON side
keeps what plain JSON would lose: tuples, dictionaries with integer keys, and NumPy arrays (the NumPy RNG state).
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn

from slimtune.errors import ConfigError
from slimtune.file_format import CHECKPOINT_FORMAT, check_tensors_fit, read_json, read_record, read_tensors
from slimtune.fileio import atomic_write, atomic_write_json
from slimtune.training.sharding import copy_full, gather, shard_optimizer_state

logger = logging.getLogger("slimtune")

CHECKPOINTS_FOLDER = "checkpoints"
STATE_FILE = "state.json"
TRAINABLE_FILE = "trainable.safetensors"
_STEP_FOLDER = re.compile(r"step-(\d+)")


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    """The folder holding a run's checkpoints: ``<output_dir>/checkpoints``."""
    return Path(output_dir) / CHECKPOINTS_FOLDER


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict[str, Any],
    keep: int,
    accelerator: Any,
) -> Path:
    """Write the checkpoint of ``step`` under ``root`` and keep only the newest ``keep`` complete ones.

    Every process must call it (each saves its own RNG state, and under FSDP gathers its shards of the trainable
    parameters and optimizer state); the main process writes the rest, full tensors as without FSDP. ``model`` is
    the unwrapped model, ``state`` extra JSON data (data position, run settings). Returns the final folder.

    Raises:
        OSError: a file could not be written (disk full, say): the message names the step and the newest complete
            checkpoint, which is left as it was; the half-written temporary folder is removed.
    """
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp"
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        _write_encoded(tmp, f"rng-rank{accelerator.process_index}", rng_state())
        trainable = gather(dict(_trainable(model)))  # on every process: FSDP's shards are gathered collectively
        optimizer_state = gather(optimizer.state_dict())
        if accelerator.is_main_process:
            trainable = {name: tensor.contiguous() for name, tensor in trainable.items()}
            atomic_write(tmp / TRAINABLE_FILE, lambda path: safetensors.torch.save_file(trainable, path))
            _write_encoded(tmp, "optimizer", optimizer_state)
            _write_encoded(tmp, "scheduler", scheduler.state_dict())
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            files = {path.name: path.stat().st_size for path in sorted(tmp.iterdir())}
            record = {**state, "format_version": CHECKPOINT_FORMAT.version, "step": step, "files": files}
            atomic_write_json(tmp / STATE_FILE, record)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(
            err.errno,
            f"cannot write the checkpoint of step {step} into {tmp} ({err.strerror or err}); nothing was replaced: "
            f"the newest complete checkpoint is {latest_checkpoint(root)}. Free space and resume from it",
        ) from err
    if accelerator.is_main_process:
        if final.exists():
            _remove(final)
        os.replace(tmp, final)
        _prune(root, keep)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(root: Path) -> Path | None:
    """The complete checkpoint of the highest step under ``root``, or None; incomplete ones are skipped with a
    warning."""
    for _, folder in sorted(_step_folders(root), reverse=True):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        logger.warning("skipping checkpoint %s: %s", folder, problem)
    return None


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete checkpoint (a sentence), or None when it is."""
    try:
        record = read_state(folder)
    except ConfigError as err:
        return str(err)
    if not isinstance(record["files"], dict):
        return f"{STATE_FILE} has no file manifest: 'files' is {str(record['files'])[:80]}, not {{file name: size}}"
    for name, size in record["files"].items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
    return None


def read_state(folder: Path) -> dict[str, Any]:
    """The ``state.json`` record of a checkpoint (format_version checked, ``step`` and ``files`` present).

    Raises:
        ConfigError: the file is missing, damaged, or of a newer format.
    """
    return read_record(folder / STATE_FILE, CHECKPOINT_FORMAT, ("step", "files"))


def load_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    process_index: int,
) -> dict[str, Any]:
    """Restore trainable parameters, optimizer, scheduler and this process's RNG from ``folder``; returns its state.

    Under FSDP each process keeps its shard of the saved full tensors. Every file is read and checked before
    anything is restored.

    Raises:
        ConfigError: a file is missing or damaged, the checkpoint's trainable parameters differ from the model's
            (names or shapes), or it holds no RNG state for ``process_index`` (the number of processes changed).
    """
    state = read_state(folder)
    rng_name = f"rng-rank{process_index}"
    if not (folder / f"{rng_name}.json").is_file():
        raise ConfigError(
            f"checkpoint {folder} has no RNG state for process {process_index}: it was written by "
            f"num_processes={state.get('num_processes')}; resume with that many processes"
        )
    trainable = _trainable(model)
    saved = read_tensors(folder / TRAINABLE_FILE, CHECKPOINT_FORMAT)
    problem = f"checkpoint {folder} does not fit the model's trainable parameters"
    advice = "resume with the same model and adapter settings, or a new output_dir"
    check_tensors_fit(saved, trainable, CHECKPOINT_FORMAT, problem, advice)
    optimizer_state, scheduler_state = _read_encoded(folder, "optimizer"), _read_encoded(folder, "scheduler")
    rng = _read_encoded(folder, rng_name)
    optimizer.load_state_dict(optimizer_state)  # first: it checks the state against the parameter groups
    shard_optimizer_state(optimizer)
    scheduler.load_state_dict(scheduler_state)
    with torch.no_grad():
        for name, param in trainable.items():
            copy_full(param, saved[name])
    set_rng_state(rng)
    return state


def rng_state() -> dict[str, Any]:
    """The Python, NumPy and torch (CPU, and CUDA when present) RNG states of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(legacy=False), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def encode(obj: Any, tensors: dict[str, torch.Tensor], path: str = "t") -> Any:
    """JSON-able form of ``obj``; its tensors go into ``tensors`` under keys named by their place in ``obj``."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, (list, tuple)):
        items = [encode(item, tensors, f"{path}.{i}") for i, item in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, dict):
        if all(isinstance(key, str) and not key.startswith("__") for key in obj):
            return {key: encode(value, tensors, f"{path}.{key}") for key, value in obj.items()}
        return {"__items__": [[key, encode(value, tensors, f"{path}.{key}")] for key, value in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint (at {path})")


def decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`encode`."""
    if isinstance(obj, list):
        return [decode(item, tensors) for item in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return np.array(obj["__ndarray__"], dtype=obj["dtype"])
    if "__tuple__" in obj:
        return tuple(decode(item, tensors) for item in obj["__tuple__"])
    if "__items__" in obj:
        return {key: decode(value, tensors) for key, value in obj["__items__"]}
    return {key: decode(value, tensors) for key, value in obj.items()}


def _write_encoded(folder: Path, name: str, obj: Any) -> None:
    tensors: dict[str, torch.Tensor] = {}
    data = encode(obj, tensors)
    if tensors:
        atomic_write(folder / f"{name}.safetensors", lambda path: safetensors.torch.save_file(tensors, path))
    atomic_write_json(folder / f"{name}.json", data)


def _read_encoded(folder: Path, name: str) -> Any:
    data = read_json(folder / f"{name}.json", CHECKPOINT_FORMAT)
    weights = folder / f"{name}.safetensors"
    return decode(data, read_tensors(weights, CHECKPOINT_FORMAT) if weights.is_file() else {})


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters that train, by name: what a checkpoint saves of the model."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _step_folders(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    matches = ((_STEP_FOLDER.fullmatch(path.name), path) for path in root.iterdir() if path.is_dir())
    return [(int(match.group(1)), path) for match, path in matches if match]


def _prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, every incomplete one, and stale temporaries."""
    for stale in (*root.glob(".step-*.tmp"), *root.glob(".step-*.deleted")):
        shutil.rmtree(stale, ignore_errors=True)
    kept = 0
    for _, folder in sorted(_step_folders(root), reverse=True):
        if kept < keep and checkpoint_problem(folder) is None:
            kept += 1
            continue
        _remove(folder)


def _remove(folder: Path) -> None:
    """Delete a step folder without ever leaving half of it under its name (a kill during ``rmtree`` would):
    rename it to the hidden ``.step-N.deleted`` first, which the next prune clears if this one is interrupted."""
    trash = folder.with_name(f".{folder.name}.deleted")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)
