"""The ``--output`` folder of a command: never a file, never silently written over.

A run folder (``finetune``, ``compare``, ``linearize``) that already holds a run's results is refused unless the
command resumes that run or ``--overwrite`` asks for a fresh one (which deletes the earlier run's checkpoints,
metrics and record first, and nothing else). ``merge`` and ``export`` write a model or adapter folder; an existing
folder that is not empty is refused unless ``--overwrite``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from slimtune.errors import ConfigError

RUN_ENTRIES = (
    "run.json",
    "compare.json",
    "metrics.jsonl",
    "checkpoints",
    "adapter",
    "linear_attention",
    "tensorboard",
    "loss_curves.png",
)


def check_run_folder(
    output: Path,
    *,
    overwrite: bool,
    resume: bool = False,
    run: dict[str, Any] | None = None,
    remove: bool = True,
) -> None:
    """Make ``output`` safe for a run: refuse a file, or an earlier run's results without ``resume``/``overwrite``.

    ``run`` (``{"method": ..., "adapter_config": ...}``) is compared with the earlier ``run.json`` on resume, so that
    ``--resume`` never continues a run of another method. With ``overwrite`` the earlier run's entries are deleted
    when ``remove`` (pass False on all processes but the main one, which waits for the others afterwards).

    Raises:
        ConfigError: ``output`` is a file; it holds an earlier run and neither flag is given; or ``resume`` meets a
            run of another method or adapter configuration.
    """
    _refuse_file(output)
    found = [name for name in RUN_ENTRIES if (output / name).exists()]
    if not found:
        return
    if overwrite:
        for name in found if remove else ():
            path = output / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        return
    if not resume:
        raise ConfigError(
            f"output={str(output)!r} already holds a run ({', '.join(found)}): pass --resume to go on from its "
            "last checkpoint, --overwrite to replace it, or another --output"
        )
    if run is not None:
        _check_same_run(output / "run.json", run)


def check_new_folder(output: Path, *, overwrite: bool) -> None:
    """Refuse ``output`` when it is a file, or a folder that is not empty and ``overwrite`` is off.

    Raises:
        ConfigError: as above; the message names the folder and what is in it.
    """
    _refuse_file(output)
    if output.is_dir() and not overwrite:
        entries = sorted(path.name for path in output.iterdir())
        if entries:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise ConfigError(
                f"output={str(output)!r} is a folder that is not empty ({shown}): pass --overwrite to write into "
                "it anyway, or name a new folder"
            )


def _refuse_file(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise ConfigError(f"output={str(output)!r} is a file: expected a folder (it is created when missing)")


def _check_same_run(record_path: Path, run: dict[str, Any]) -> None:
    """ConfigError when the run recorded in ``record_path`` used another method or adapter configuration."""
    try:
        earlier = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # no finished record (a run killed before its end): the checkpoint's own checks decide
    if not isinstance(earlier, dict):
        return
    for key in ("method", "adapter_config"):
        if key in earlier and earlier[key] != run.get(key):
            raise ConfigError(
                f"cannot resume in {record_path.parent}: its run has {key}={earlier[key]!r}, this one "
                f"{run.get(key)!r}; resume with the same method and options, --overwrite, or another --output"
            )
