"""The base configuration shared by every adapter method: validation, JSON round trip.

Each method subclasses :class:`AdapterConfig` with its own fields and a ``method`` name. Field names are the
same across methods (``r``, ``alpha``, ``dropout``, ``target_modules``). Invalid values fail in
``__post_init__`` with a :class:`~slimtune.errors.ConfigError` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar

from slimtune.errors import ConfigError

ALL_LINEAR = "all-linear"


@dataclasses.dataclass
class AdapterConfig:
    """Fields every method has.

    Args:
        r: rank (LoRA) or shard size (DiSHA) or block size (structured methods); a positive integer.
        dropout: dropout probability on the adapter's input, in [0, 1).
        target_modules: which modules to adapt. ``"all-linear"`` (default) adapts every ``nn.Linear`` and
            GPT-2 ``Conv1D`` except the model's output head. A list of names matches a module whose full name
            equals an entry or ends with ``"." + entry`` (e.g. ``["q_proj", "v_proj"]``). Any other string is a
            regular expression that must match the whole module name.
    """

    method: ClassVar[str] = ""

    r: int = 8
    dropout: float = 0.0
    target_modules: list[str] | str = ALL_LINEAR

    def __post_init__(self) -> None:
        check_positive_int("r", self.r)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise ConfigError(f"dropout={self.dropout!r} is not allowed: expected a float in [0, 1)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout!r} is not allowed: expected a float in [0, 1)")
        self._check_target_modules()

    def _check_target_modules(self) -> None:
        targets = self.target_modules
        if isinstance(targets, str):
            if targets != ALL_LINEAR:
                try:
                    re.compile(targets)
                except re.error as err:
                    raise ConfigError(
                        f"target_modules={targets!r} is not a valid regular expression ({err}); allowed: "
                        f"'{ALL_LINEAR}', a list of module-name suffixes, or a regular expression"
                    ) from None
            return
        if isinstance(targets, tuple):
            self.target_modules = targets = list(targets)
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
            raise ConfigError(
                f"target_modules={targets!r} is not allowed: expected '{ALL_LINEAR}', a non-empty list of "
                "module-name suffixes, or a regular expression string"
            )

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON-able data, with its ``method`` name."""
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        """Rebuild a config from :meth:`to_dict` output; unknown keys are an error (naming them)."""
        data = {k: v for k, v in data.items() if k != "method"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"{cls.__name__} got unknown field(s) {unknown}; allowed fields: {sorted(known)}"
            )
        return cls(**data)


def check_positive_int(field: str, value: Any) -> None:
    """Raise ConfigError unless ``value`` is an int ≥ 1 (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{field}={value!r} is not allowed: expected a positive integer (>= 1)")


def check_choice(field: str, value: Any, allowed: tuple[str, ...]) -> None:
    """Raise ConfigError unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ConfigError(f"{field}={value!r} is not allowed: expected one of {list(allowed)}")
