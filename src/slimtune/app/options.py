"""Command-line options generated from config dataclasses, and parsing them back into configs.

Every field of a config class becomes one ``--flag`` (help from the class docstring); ``collect`` reads the
values back and ``adapter_config`` / ``parse_run`` build the method's config from them.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
from typing import Any

from slimtune.adapters.disha import DISHA_VARIANTS
from slimtune.config import ALL_LINEAR, AdapterConfig
from slimtune.errors import ConfigError
from slimtune.registry import METHODS, config_class

ALIASES = {variant: ("disha", {"variant": variant}) for variant in DISHA_VARIANTS}
METHOD_CHOICES = sorted(METHODS) + sorted(ALIASES)
_REGEX_CHARS = set(r".*+?[](){}|^$\\")


def add_config_options(
    group: Any,
    classes: dict[str, type],
    taken: set[str],
    prefix: str,
    defaults: dict[str, Any] | None = None,
    exclude: set[str] = frozenset(),
) -> dict[str, str]:
    """Add one ``--flag`` per dataclass field of ``classes`` (name → class) to ``group``; returns dest → field.

    With one class a flag's default is the field's (or ``defaults[field]``). With several (the adapter methods)
    it is None, meaning "the method's own default", and the help lists each method's default.
    """
    uses: dict[str, list[tuple[str, dataclasses.Field, type]]] = {}
    for label, cls in classes.items():
        for field in dataclasses.fields(cls):
            if field.name not in exclude:
                uses.setdefault(field.name, []).append((label, field, cls))
    mapping = {}
    for name, entries in uses.items():
        flag = name if name not in taken else f"{prefix}_{name}"
        kind = str(entries[0][1].type)
        by_doc: dict[str, list[str]] = {}
        for label, _, cls in entries:
            by_doc.setdefault(field_docs(cls).get(name, "").replace("``", "").rstrip("."), []).append(label)
        text = next(iter(by_doc)) if len(by_doc) == 1 else "; ".join(f"{'/'.join(v)}: {k}" for k, v in by_doc.items())
        if len(classes) > 1:
            text += " [default: " + ", ".join(f"{label} {_default(field)!r}" for label, field, _ in entries) + "]"
            default = None
        else:
            default = (defaults or {}).get(name, _default(entries[0][1]))
        option(group, taken, flag, default=default, help=text, dest=f"{prefix}__{name}", **_argument_kind(kind))
        mapping[f"{prefix}__{name}"] = name
    return mapping


def collect(args: argparse.Namespace, mapping: dict[str, str], skip_none: bool = False) -> dict[str, Any]:
    """Field → value of the options :func:`add_config_options` added (None values left out with ``skip_none``)."""
    values = {field: getattr(args, dest) for dest, field in mapping.items()}
    values = {k: _target_modules(v) if k == "target_modules" and v is not None else v for k, v in values.items()}
    return {k: v for k, v in values.items() if not (skip_none and v is None)}


def adapter_config(method: str, values: dict[str, Any]) -> AdapterConfig:
    """The config of ``method`` (a name of ``METHODS`` or a DiSHA variant) from the given field values.

    Raises:
        ConfigError: a field the method does not have (naming the method's fields), or a bad value.
    """
    name, presets = ALIASES.get(method, (method, {}))
    cls = config_class(name)
    allowed = sorted(f.name for f in dataclasses.fields(cls))
    for field, value in values.items():
        if field not in allowed:
            raise ConfigError(f"{field}={value!r} is not an option of method {method!r}; its options are {allowed}")
        if field in presets and value != presets[field]:
            raise ConfigError(
                f"{field}={value!r} is not allowed with method {method!r}, which means {field}={presets[field]!r}; "
                f"use method {name!r} with {field}={value!r}"
            )
    return cls(**{**presets, **values})


def parse_run(spec: str) -> tuple[str, AdapterConfig, float | None]:
    """``[LABEL=]METHOD[:FIELD=VALUE,...]`` → (label, config, lr); ``lr`` is a key too; lists are joined by ``+``.

    Raises:
        ConfigError: an unknown method or field, or a value that does not parse.
    """
    match = re.fullmatch(r"(?:([\w.-]+)=)?(\w+)(?::(.*))?", spec.strip())
    if not match:
        raise ConfigError(
            f"--run {spec!r} is not allowed: expected [LABEL=]METHOD[:FIELD=VALUE,...], e.g. bone:r=16,lr=2e-4"
        )
    label, method, options = match[1] or match[2], match[2], match[3]
    name = ALIASES.get(method, (method, {}))[0]
    kinds = {f.name: str(f.type) for f in dataclasses.fields(config_class(name))}
    values: dict[str, Any] = {}
    lr = None
    for item in filter(None, (options or "").split(",")):
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise ConfigError(f"--run {spec!r}: {item!r} is not FIELD=VALUE")
        if key == "lr":
            lr = _parse_value("float", text, "lr")
        elif key == "target_modules":
            values[key] = _target_modules(text.split("+"))
        elif kinds.get(key) == "list[str] | None":
            values[key] = None if text.strip().lower() == "none" else text.split("+")
        else:
            values[key] = _parse_value(kinds.get(key, "str"), text, key)
    return label, adapter_config(method, values), lr


def field_docs(cls: type) -> dict[str, str]:
    """Field → one-line description, from the ``Args:`` sections of ``cls`` and its bases (the subclass wins), else
    from bullets ``- ``name``: ...`` in its module's docstring."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        body = inspect.cleandoc(klass.__dict__.get("__doc__") or "").partition("Args:\n")[2]
        for match in re.finditer(r"^ {4}(\w+): (.*?)(?=^ {4}\w+: |^\S|\Z)", body, re.S | re.M):
            docs[match[1]] = " ".join(match[2].split())
    module_doc = sys.modules[cls.__module__].__doc__ or ""
    for match in re.finditer(r"^- ``(\w+)``: (.*?)(?=^- |^\s*$|\Z)", module_doc, re.S | re.M):
        docs.setdefault(match[1], " ".join(match[2].split()))
    return docs


def option(group: Any, taken: set[str], name: str, help: str, **kwargs: Any) -> None:
    """``--name`` (underscores as dashes) with its default appended to the help."""
    flag = name.replace("_", "-")
    taken.add(name)
    default = kwargs.get("default")
    if default is not None and kwargs.get("action") != "append":
        help = f"{help} (default: {default})"
    group.add_argument(f"--{flag}", help=help.replace("%", "%%"), **kwargs)


def _argument_kind(kind: str) -> dict[str, Any]:
    """argparse settings for a field of type ``kind`` (its annotation as a string)."""
    if kind == "bool":
        return {"action": argparse.BooleanOptionalAction}
    if kind in ("list[str] | str", "list[str] | None"):
        return {"nargs": "+", "metavar": "NAME"}
    if kind == "list[int] | None":
        return {"nargs": "+", "type": _argument_kind("int")["type"], "metavar": "INT"}
    base = kind.replace(" | None", "")

    def parse(text: str) -> Any:
        try:
            return _parse_value(kind, text, "value")
        except ConfigError:  # argparse then says "argument --r: 'abc' is not ...", naming the flag
            allowed = f"a{'n' if base == 'int' else ''} {base}" + (" or None" if kind != base else "")
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed: expected {allowed}") from None

    return {"type": parse, "metavar": base.upper()}


def _parse_value(kind: str, text: str, field: str) -> Any:
    text = text.strip()
    if kind.endswith("| None") and text.lower() == "none":
        return None
    base = kind.replace(" | None", "")
    try:
        if base == "bool":
            return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[text.lower()]
        return {"int": int, "float": float}.get(base, str)(text)
    except (KeyError, ValueError):
        raise ConfigError(f"{field}={text!r} is not allowed: expected a {base}") from None


def _target_modules(values: list[str]) -> list[str] | str:
    """One value that is ``all-linear`` or has regex characters → that string; else the list of name endings."""
    if len(values) == 1 and (values[0] == ALL_LINEAR or set(values[0]) & _REGEX_CHARS):
        return values[0]
    return list(values)


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default
