"""Configuration: the base of every adapter config, the JSON round trip, and the one set of field validators.

Each method subclasses :class:`AdapterConfig` with its own fields and a ``method`` name. Field names are the
same across methods (``r``, ``alpha``, ``dropout``, ``target_modules``). Invalid values fail in
``__post_init__`` with a :class:`~slimtune.errors.ConfigError` naming the field, the value and what is allowed.
Every config of slimtune (adapters, training, linear attention) validates its fields with the ``check_*``
helpers below, so ``True`` is never taken for ``1`` and the messages read alike.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from slimtune.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from slimtune.adapters.base import Adapter

ALL_LINEAR = "all-linear"

T = TypeVar("T", bound="DictConfig")


def check_int(field: str, value: Any, minimum: int = 1, *, optional: bool = False) -> None:
    """Raise ConfigError unless ``value`` is an int >= ``minimum`` (bools are refused; None too unless ``optional``)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = "a positive integer (>= 1)" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{field}={value!r} is not allowed: expected {allowed}" + (" or None" if optional else ""))


def check_number(
    field: str,
    value: Any,
    *,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
    optional: bool = False,
) -> None:
    """Raise ConfigError unless ``value`` is a finite real number (not a bool) within the given bounds.

    ``above`` / ``at_least``: exclusive / inclusive lower bound; ``below``: exclusive upper bound.
    """
    if optional and value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (above is None or value > above) and (at_least is None or value >= at_least)
    ok = ok and (below is None or value < below)
    if not ok:
        raise ConfigError(
            f"{field}={value!r} is not allowed: expected {_range_words(above, at_least, below)}"
            + (" or None" if optional else "")
        )


def _range_words(above: float | None, at_least: float | None, below: float | None) -> str:
    """'a positive number', 'a number in [0, 1)', 'a number >= 0', ... for :func:`check_number`'s bounds."""
    if above == 0 and below is None:
        return "a positive number"
    if at_least is not None and below is not None:
        return f"a number in [{at_least:g}, {below:g})"
    if above is not None and below is not None:
        return f"a number in ({above:g}, {below:g})"
    bound = f" > {above:g}" if above is not None else f" >= {at_least:g}" if at_least is not None else ""
    bound = bound or (f" < {below:g}" if below is not None else "")
    return f"a finite number{bound}"


def check_int_list(field: str, value: Any, minimum: int = 0, *, optional: bool = False) -> None:
    """Raise ConfigError unless ``value`` is a list of distinct ints >= ``minimum`` (bools refused; None too unless
    ``optional``)."""
    if optional and value is None:
        return
    ints = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if not ints or any(v < minimum for v in value) or len(set(value)) != len(value):
        allowed = f"a list of distinct integers >= {minimum}" + (" or None" if optional else "")
        raise ConfigError(f"{field}={value!r} is not allowed: expected {allowed}")


def check_bool(field: str, value: Any) -> None:
    """Raise ConfigError unless ``value`` is True or False."""
    if not isinstance(value, bool):
        raise ConfigError(f"{field}={value!r} is not allowed: expected True or False")


def check_choice(field: str, value: Any, allowed: tuple[str, ...]) -> None:
    """Raise ConfigError unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ConfigError(f"{field}={value!r} is not allowed: expected one of {list(allowed)}")


@dataclasses.dataclass
class DictConfig:
    """A dataclass config with a JSON round trip: :meth:`to_dict` and :meth:`from_dict`."""

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON-able data."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        """Rebuild a config from :meth:`to_dict` output; unknown keys are a ConfigError naming them."""
        if not isinstance(data, dict):
            raise ConfigError(f"a {cls.__name__} needs a dict of fields, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{cls.__name__} got unknown field(s) {unknown}; allowed fields: {sorted(known)}")
        return cls(**data)


@dataclasses.dataclass
class AdapterConfig(DictConfig, abc.ABC):
    """Fields every method has.

    Args:
        r: the size of the method's update (LoRA: rank; DiSHA: shard size; SURM: the Kronecker factor size).
        dropout: dropout probability on the adapter's input, in [0, 1).
        target_modules: which modules to adapt. ``"all-linear"`` (default) adapts every ``nn.Linear`` and
            GPT-2 ``Conv1D`` except the model's output head. A list of names matches a module whose full name
            equals an entry or ends with ``"." + entry`` (e.g. ``["q_proj", "v_proj"]``). Any other string is a
            regular expression that must match the whole module name.
        modules_to_save: modules trained whole, as copies beside the adapter, and saved with it (PEFT's
            ``modules_to_save``): names matched as a list of ``target_modules`` is, e.g. ``["classifier"]`` (BERT) or
            ``["score"]`` (Llama) for a sequence classifier's new head. None (default): no module.
    """

    method: ClassVar[str] = ""

    r: int = 8
    dropout: float = 0.0
    target_modules: list[str] | str = ALL_LINEAR
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        check_int("r", self.r)
        check_number("dropout", self.dropout, at_least=0.0, below=1.0)
        self._check_target_modules()
        self._check_modules_to_save()

    @property
    @abc.abstractmethod
    def adapter_class(self) -> type[Adapter]:
        """The class of this config's adapters (its capabilities are class attributes)."""

    def build_adapter(self, base_layer: nn.Module, module_name: str) -> Adapter:
        """This method's adapter on ``base_layer`` (``module_name`` names it in errors)."""
        return self.adapter_class(self, base_layer, module_name)

    def check_adapters(self, adapters: Mapping[str, Adapter]) -> None:
        """Called once per injection with every adapter built (module name → adapter), before any module is
        replaced: a method warns or refuses here about the layers together (default: nothing)."""

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

    def _check_modules_to_save(self) -> None:
        names = self.modules_to_save
        if isinstance(names, tuple):
            self.modules_to_save = names = list(names)
        if names is not None and (
            not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names)
        ):
            raise ConfigError(
                f"modules_to_save={names!r} is not allowed: expected None or a non-empty list of module names "
                "(or name endings), e.g. ['classifier']"
            )

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON-able data, with its ``method`` name."""
        return {"method": self.method, **super().to_dict()}

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        """Rebuild a config from :meth:`to_dict` output (the ``method`` key is dropped); unknown keys are an error."""
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k != "method"}
        return super().from_dict(data)
