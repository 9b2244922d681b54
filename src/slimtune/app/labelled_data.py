"""Labelled texts for sequence classification: the bundled BBC News topics, or the user's ``.jsonl`` / ``.csv`` file.

A file holds one example per line (``.jsonl``: a JSON object; ``.csv``: a row under a header) with a ``text`` and a
``label`` (a string or an integer; other fields are ignored). Label names are the distinct labels as strings,
sorted as numbers when every one is an integer (``"2"`` before ``"10"``), else as strings; a label's index is
its name's place. A held-out or test file is read with the training set's ``label_names`` (or a saved
adapter's), so every label keeps its index. :func:`slimtune.training.classification.encode_classification`
turns the texts and labels into classification examples.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from slimtune.errors import ConfigError, DataError
from slimtune.training.data import decode_text

LABELLED_SUFFIXES = (".jsonl", ".csv")
_EXPECTED = "expected a 'text' (a non-empty string) and a 'label' (a string or an integer) per example"


@dataclasses.dataclass(frozen=True)
class LabelledData:
    """``texts`` and their ``labels`` (indices into ``names``, the class names)."""

    texts: list[str]
    labels: list[int]
    names: list[str]


def bbc_topic_data(split: str, seed: int = 0) -> LabelledData:
    """BBC News ``split`` ("train", "validation" or "test" of :func:`slimtune.app.corpus.split_articles` with
    ``seed``): each article's text (headline on the first line) and its topic, labels 0..4 the topics in sorted
    order (business, entertainment, politics, sports, tech).

    Raises:
        ConfigError: unknown ``split``.
        ModuleNotFoundError: the corpus package is not installed (the message has the pip command).
    """
    from slimtune.app.corpus import bbc_news_articles, classification_examples

    pairs = classification_examples(split, seed)
    names = sorted({article.topic for article in bbc_news_articles()})
    return LabelledData([text for text, _ in pairs], [label for _, label in pairs], names)


def read_labelled_file(path: str | os.PathLike, label_names: list[str] | None = None) -> LabelledData:
    """The labelled examples of a ``.jsonl`` or ``.csv`` file (see the module docstring).

    ``label_names``: the class names to index the labels by (a training set's or a saved adapter's); by default
    the file's own distinct labels, sorted.

    Raises:
        ConfigError: another suffix; ``label_names`` with fewer than 2 names or a name twice; a label not in
            ``label_names`` (the message names the file, line, label and the allowed names).
        DataError: an empty file; invalid JSON, an example without ``text`` or ``label`` (the message names the
            fields found), an empty text or label (the message names the file and line); fewer than 2 classes,
            or a class of ``label_names`` without any example.
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in LABELLED_SUFFIXES:
        raise ConfigError(f"path={str(path)!r} is not allowed: expected a file ending in {list(LABELLED_SUFFIXES)}")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: expected a {'/'.join(LABELLED_SUFFIXES)} file of examples")
    text = decode_text(path.read_bytes(), str(path))
    rows = list(_jsonl_rows(text, path) if suffix == ".jsonl" else _csv_rows(text, path))
    if not rows:
        raise DataError(f"{path}: no example in the file; {_EXPECTED}")
    if label_names is not None and (len(label_names) < 2 or len(set(label_names)) != len(label_names)):
        raise ConfigError(f"label_names={label_names!r} is not allowed: expected at least 2 distinct names")
    names = label_names if label_names is not None else _sorted_names({label for _, _, label in rows})
    if len(names) < 2:
        raise DataError(f"{path}: every example has label {names[0]!r}: expected at least 2 classes to tell apart")
    index = {name: i for i, name in enumerate(names)}
    labels = []
    for line, _, label in rows:
        if label not in index:
            raise ConfigError(f"{path}, line {line}: label {label!r} is not allowed: expected one of {names}")
        labels.append(index[label])
    seen = set(labels)
    empty = [name for name, i in index.items() if i not in seen]
    if empty:
        raise DataError(f"{path}: no example of class {empty[0]!r} (an empty class): expected each of {names}")
    return LabelledData([text for _, text, _ in rows], labels, list(names))


def _sorted_names(labels: set[str]) -> list[str]:
    """The label names, as numbers when each is an integer literal, else as strings."""
    if all(re.fullmatch(r"-?\d+", label) for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def _example(record: dict[str, Any], path: Path, line: int) -> tuple[int, str, str]:
    """``(line, text, label as a string)`` of one record, checked."""
    missing = [field for field in ("text", "label") if field not in record]
    if missing:
        raise DataError(f"{path}, line {line}: no {missing[0]!r} field, found {sorted(record)}; {_EXPECTED}")
    text, label = record["text"], record["label"]
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{path}, line {line}: empty text ({text!r}); {_EXPECTED}")
    if isinstance(label, bool) or not isinstance(label, (str, int)) or not str(label).strip():
        raise DataError(f"{path}, line {line}: label {label!r} is not allowed; {_EXPECTED}")
    return line, text, str(label).strip()


def _jsonl_rows(text: str, path: Path) -> Iterator[tuple[int, str, str]]:
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {number}: invalid JSON ({err.msg}, column {err.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}, line {number}: got a JSON {type(record).__name__}; {_EXPECTED}")
        yield _example(record, path, number)


def _csv_rows(text: str, path: Path) -> Iterator[tuple[int, str, str]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    try:
        header = reader.fieldnames or []
        missing = [field for field in ("text", "label") if field not in header]
        if header and missing:
            raise DataError(f"{path}, line 1: the header has no {missing[0]!r} column, found {header}; {_EXPECTED}")
        for row in reader:
            if None in row or None in row.values():
                more = "more" if None in row else "fewer"
                raise DataError(f"{path}, line {reader.line_num}: {more} fields than the {len(header)} of the header")
            yield _example(row, path, reader.line_num)
    except csv.Error as err:
        raise DataError(f"{path}, line {reader.line_num}: malformed CSV ({err})") from None
