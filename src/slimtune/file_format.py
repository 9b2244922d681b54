"""What slimtune's three save formats share: their versions, declared here, and the reading and checking of files.

The formats: an adapter folder (:mod:`slimtune.serialization`), a training checkpoint
(:mod:`slimtune.training.checkpoint`) and a linearised model (:mod:`slimtune.linear_attention.convert`). Each
is a JSON record (with a ``format_version``) beside safetensors files, and each loads in two stages: read and
check everything, then fill the model, so that a bad file leaves the model as it was. Here are the pieces of the
first stage, each raising its format's error class with the path, the field at fault and what is allowed:

- :func:`read_json` / :func:`read_record`: a JSON file, or a JSON object with required fields and a
  ``format_version`` this slimtune reads;
- :func:`read_tensors`: a safetensors file, read without ever unpickling anything;
- :func:`check_tensors_fit`: saved tensors against the expected ones, every missing, unexpected and mis-shaped
  name found before anything is changed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError

from slimtune import __version__
from slimtune.errors import AdapterFileError, ConfigError, SlimtuneError

MAX_JSON_DEPTH = 100
"""Lists and objects nested deeper than this are refused: slimtune's own files nest a few levels."""
SHOWN_NAMES = 5


@dataclass(frozen=True)
class FileFormat:
    """One save format: ``name`` and ``writer`` (the function that writes it) for messages, ``version`` (the
    format_version this slimtune writes, and the newest it reads), ``error`` (the class every problem with its
    files raises) and ``advice`` (appended to those messages)."""

    name: str
    version: int
    error: type[SlimtuneError]
    writer: str
    advice: str = ""

    def fail(self, message: str) -> SlimtuneError:
        """The error to raise for ``message``, advice appended."""
        return self.error(f"{message}; {self.advice}" if self.advice else message)

    def missing(self, path: Path) -> SlimtuneError:
        """The error to raise when ``path`` does not exist."""
        return self.fail(f"{path} does not exist: expected a {self.name} file, as {self.writer} writes it")


ADAPTER_FORMAT = FileFormat("slimtune adapter", 1, AdapterFileError, writer="slimtune.save_adapter")
CHECKPOINT_FORMAT = FileFormat(
    "training checkpoint", 1, ConfigError, writer="slimtune.training.train", advice="resume from another checkpoint"
)
LINEARIZED_FORMAT = FileFormat(
    "linearised model", 1, AdapterFileError, writer="slimtune.linear_attention.save_linearized"
)


def read_json(path: Path, fmt: FileFormat) -> Any:
    """The JSON value in ``path``; ``fmt.error`` if it is missing, unreadable, not JSON or nested too deeply."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise fmt.missing(path) from None
    except UnicodeDecodeError as err:
        raise fmt.fail(f"{path} is not valid JSON ({err})") from None
    except OSError as err:
        raise fmt.fail(f"{path} cannot be read ({err})") from None
    too_deep = fmt.fail(f"{path} nests lists or objects more than the {MAX_JSON_DEPTH} levels allowed")
    try:
        value = json.loads(text)
    except RecursionError:
        raise too_deep from None
    except ValueError as err:
        raise fmt.fail(f"{path} is not valid JSON ({err})") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise too_deep
    return value


def read_record(path: Path, fmt: FileFormat, fields: tuple[str, ...]) -> dict[str, Any]:
    """The JSON object in ``path``, with ``format_version`` and every one of ``fields``.

    Raises ``fmt.error`` for what :func:`read_json` refuses, a value that is not an object, a missing field, and a
    format_version that is not a whole number from 1 to ``fmt.version`` (a newer one: "upgrade slimtune").
    """
    record = read_json(path, fmt)
    required = ("format_version", *fields)
    if not isinstance(record, dict):
        kind = type(record).__name__
        raise fmt.fail(f"{path} holds a JSON {kind}; a {fmt.name} file holds an object with {list(required)}")
    missing = [field for field in required if field not in record]
    if missing:
        raise fmt.fail(f"{path} lacks the field(s) {missing}; a {fmt.name} file has {list(required)}")
    version = record["format_version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise fmt.fail(f"{path} has format_version={version!r}; allowed: a whole number from 1 to {fmt.version}")
    if version > fmt.version:
        writer = record.get("slimtune_version")
        written = "" if writer is None else f" (written by slimtune {str(writer)[:40]})"
        raise fmt.fail(
            f"{path} has format_version={version}{written}; this slimtune {__version__} reads {fmt.name} files of "
            f"format_version <= {fmt.version}: upgrade slimtune"
        )
    return record


def read_tensors(path: Path, fmt: FileFormat) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file ``path``, by name, on the CPU.

    Only safetensors is parsed, never a pickle: anything else (a pickle included) is ``fmt.error``, as is a
    missing, truncated or damaged file.
    """
    if not path.exists():
        raise fmt.missing(path)
    try:
        return safetensors.torch.load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise fmt.fail(f"cannot read the saved tensors: {path} is damaged or not a safetensors file ({err})") from None


def check_tensors_fit(
    saved: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    fmt: FileFormat,
    problem: str,
    advice: str = "",
) -> None:
    """``fmt.error`` unless ``saved`` holds exactly the names of ``expected``, each with the same shape.

    The message is ``problem``, then the missing, unexpected and mis-shaped names (the first few of each and how
    many there are; both shapes for the last), then ``advice`` (``fmt.advice`` is for damaged files, not this).
    Nothing is changed: call it before filling anything in.
    """
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    misshaped = sorted(
        f"{name} saved {tuple(saved[name].shape)} vs model {tuple(tensor.shape)}"
        for name, tensor in expected.items()
        if name in saved and saved[name].shape != tensor.shape
    )
    found = (("missing", missing), ("unexpected", unexpected), ("shape mismatches", misshaped))
    listed = [f"{label}: {_first(names)}" for label, names in found if names]
    if listed:
        raise fmt.error("; ".join([problem, ", ".join(listed), *([advice] if advice else [])]))


def _first(names: list[str]) -> str:
    more = len(names) - SHOWN_NAMES
    return f"{names[:SHOWN_NAMES]}" + (f" and {more} more" if more > 0 else "")


def _depth(value: Any) -> int:
    """How deeply ``value`` nests lists and dicts (0 for a scalar; it stops counting past MAX_JSON_DEPTH), level by
    level, without recursion."""
    depth = 0
    level = [value] if isinstance(value, (list, dict)) else []
    while level and depth <= MAX_JSON_DEPTH:
        depth += 1
        children = (child for item in level for child in (item.values() if isinstance(item, dict) else item))
        level = [child for child in children if isinstance(child, (list, dict))]
    return depth
