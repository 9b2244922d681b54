"""Text for causal-LM training: the user's own files and data sets, packed into token blocks.

:func:`read_text_file` reads ``.txt`` / ``.jsonl`` / ``.csv`` documents, :func:`load_texts` also takes a
``datasets.Dataset`` with a ``text`` column, and :func:`pack_for_lm` turns texts into [n_blocks, seq_len] token
blocks. The bundled BBC News corpus is read by :mod:`slimtune.app.corpus`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from slimtune.config import check_int
from slimtune.errors import ConfigError, DataError

TEXT_SUFFIXES = (".txt", ".jsonl", ".csv")
_ENCODE_BATCH = 64


def pack_for_lm(texts: Iterable[str], tokenizer: Any, seq_len: int, max_blocks: int | None = None) -> torch.Tensor:
    """Token blocks [n_blocks, seq_len] (int64) of ``texts`` joined by the EOS token, cut contiguously.

    Each text is tokenised without special tokens; the stream is ``doc_0 EOS doc_1 EOS ... doc_last`` and its
    tail shorter than ``seq_len`` is dropped. With ``max_blocks``, only the first ``max_blocks`` blocks are
    made (tokenising stops once there are enough), exactly the first rows of the unlimited result.

    Raises:
        ConfigError: ``seq_len`` or ``max_blocks`` not a positive integer, or a tokenizer without an EOS token.
        DataError: no texts, or fewer tokens than ``seq_len``.
    """
    check_int("seq_len", seq_len)
    if max_blocks is not None:
        check_int("max_blocks", max_blocks)
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
        raise DataError(f"{len(texts)} texts give {len(ids)} tokens, fewer than seq_len={seq_len}: not one full block")
    if max_blocks is not None:
        n_blocks = min(n_blocks, max_blocks)
    return torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


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
    documents = [doc for doc in readers[suffix](decode_text(path.read_bytes()), path) if doc.strip()]
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


def decode_text(data: bytes) -> str:
    """Text of a file: UTF-8 (BOM skipped), else Windows-1252; newlines normalised to ``\\n``."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("cp1252", errors="replace")
    return text.replace("\r\n", "\n").replace("\r", "\n")
