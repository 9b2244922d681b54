"""Text for causal-LM training: the user's own files and data sets, packed into token blocks.

:func:`read_text_file` reads ``.txt`` / ``.jsonl`` / ``.csv`` documents, :func:`load_texts` also takes a
``datasets.Dataset`` with a ``text`` column, and :func:`pack_for_lm` turns texts into [n_blocks, seq_len] token
blocks. :func:`pack_examples` packs whole labelled examples (chat / instruction data, read by
:mod:`slimtune.training.chat_data`) into blocks [n_blocks, seq_len, 3] that never mix examples' attention. The
bundled BBC News corpus is read by :mod:`slimtune.app.corpus`.
"""

from __future__ import annotations

import bisect
import csv
import dataclasses
import io
import json
import logging
import math
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from slimtune.config import check_int
from slimtune.errors import ConfigError, DataError

TEXT_SUFFIXES = (".txt", ".jsonl", ".csv")
IGNORE_INDEX = -100
TOO_LONG = ("error", "drop", "truncate")
_ENCODE_BATCH = 64

logger = logging.getLogger("slimtune")


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


@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenised example: ``input_ids`` [L] and ``labels`` [L], the token where it is in the loss, else -100.

    Labels sit at their token's position, as Hugging Face models take them (the loss shifts them); ``where``
    names the example's source (file and line) for error messages.
    """

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    where: str = "an example"

    def __post_init__(self) -> None:
        if not self.input_ids or len(self.labels) != len(self.input_ids):
            raise DataError(
                f"{self.where}: {len(self.input_ids)} input ids and {len(self.labels)} labels; expected as many "
                "labels as input ids, at least one"
            )

    def __len__(self) -> int:
        return len(self.input_ids)


def pack_examples(
    examples: Sequence[Example],
    seq_len: int,
    pad_id: int,
    too_long: str = "error",
    max_blocks: int | None = None,
) -> torch.Tensor:
    """Whole examples packed into blocks [n_blocks, seq_len, 3] (int64) of (input_ids, labels, position_ids).

    Each example goes, in order, into the block with the least room that holds all of it (best fit; a new block
    when none does), blocks numbered as they open; the rest of a block is padding (``pad_id``, label -100).
    Position ids restart at 0 with every example and with the padding, so a Hugging Face model called with them,
    ``attention_mask=None`` and ``use_cache=False`` attends only within each example
    (:func:`slimtune.training.losses.masked_lm_loss` does so). The first label of every example is
    -100: nothing of its own example comes before it. The trailing dimension holds the fields so that dims 0
    and 1 mean what they mean in plain blocks [n_blocks, seq_len] (the loop indexes and counts along them).

    ``too_long`` says what happens to examples longer than ``seq_len`` tokens: ``"error"`` (the default: no
    example is lost or cut silently) raises, ``"drop"`` leaves them out, ``"truncate"`` keeps their first
    ``seq_len`` tokens (and drops those left without an answer token); both log a warning with the counts.
    With ``max_blocks``, only the first ``max_blocks`` blocks are returned.

    Raises:
        ConfigError: ``seq_len`` < 2, ``max_blocks`` not positive, ``pad_id`` negative or ``too_long`` unknown.
        DataError: no examples, examples too long under ``too_long="error"`` (how many, and the longest), or
            none left after dropping.
    """
    check_int("seq_len", seq_len, 2)
    check_int("pad_id", pad_id, 0)
    check_int("max_blocks", max_blocks, optional=True)
    if too_long not in TOO_LONG:
        raise ConfigError(f"too_long={too_long!r} is not allowed: expected one of {list(TOO_LONG)}")
    if not examples:
        raise DataError("pack_examples got no examples: expected at least one")
    bins: list[list[Example]] = []
    by_room: list[tuple[int, int]] = []  # (free tokens, block index) of the open blocks, sorted
    for example in _fit_length(examples, seq_len, too_long):
        place = bisect.bisect_left(by_room, (len(example), -1))
        if place < len(by_room):
            free, target = by_room.pop(place)
        else:
            free, target = seq_len, len(bins)
            bins.append([])
        bins[target].append(example)
        if free > len(example):
            bisect.insort(by_room, (free - len(example), target))
    rows = [_block(members, seq_len, pad_id) for members in bins[:max_blocks]]
    return torch.tensor(rows, dtype=torch.long).transpose(1, 2).contiguous()  # [n, 3, T] -> [n, T, 3]


def _block(members: list[Example], seq_len: int, pad_id: int) -> list[list[int]]:
    """Rows (input_ids, labels, position_ids), each [seq_len], of one block holding ``members`` and padding."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for example in members:
        ids += example.input_ids
        labels += [IGNORE_INDEX, *example.labels[1:]]
        positions += range(len(example))
    pad = seq_len - len(ids)
    return [ids + [pad_id] * pad, labels + [IGNORE_INDEX] * pad, positions + list(range(pad))]


def _fit_length(examples: Sequence[Example], seq_len: int, too_long: str) -> list[Example]:
    """``examples`` no longer than ``seq_len`` tokens, the longer ones handled as ``too_long`` says."""
    longer = [example for example in examples if len(example) > seq_len]
    if not longer:
        return list(examples)
    longest = max(longer, key=len)
    summary = (
        f"{len(longer)} of {len(examples)} examples are longer than seq_len={seq_len} tokens "
        f"(the longest, {longest.where}, has {len(longest)})"
    )
    if too_long == "error":
        raise DataError(
            f"{summary}: raise seq_len, or pass too_long='drop' to leave them out or 'truncate' to keep their "
            "first seq_len tokens"
        )
    kept = []
    for example in examples:
        if len(example) > seq_len:
            if too_long == "drop":
                continue
            example = Example(example.input_ids[:seq_len], example.labels[:seq_len], example.where)
            if all(label == IGNORE_INDEX for label in example.labels[1:]):
                continue
        kept.append(example)
    dropped = len(examples) - len(kept)
    logger.warning("%s; %s, %d dropped", summary, "truncated them" if too_long == "truncate" else "dropped", dropped)
    if not kept:
        raise DataError(f"{summary}, and no example is left with too_long={too_long!r}")
    return kept


def read_text_file(path: str | os.PathLike) -> list[str]:
    """The documents in a local text file, by suffix; empty documents are dropped.

    - ``.txt``: documents separated by blank lines, each stripped;
    - ``.jsonl``: one JSON object per non-blank line with a string ``text`` field;
    - ``.csv``: a header row with a ``text`` column, every row as many fields as the header.

    Files are read as UTF-8 (a BOM is skipped), falling back to Windows-1252.

    Raises:
        ConfigError: another suffix.
        DataError: a malformed line or row (the message names the path and line number), bytes that are not text
            (binary data, UTF-16), or no text at all.
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    readers = {".txt": _read_txt, ".jsonl": _read_jsonl, ".csv": _read_csv}
    suffix = path.suffix.lower()
    if suffix not in readers:
        raise ConfigError(f"path={str(path)!r} is not allowed: expected a file ending in {list(TEXT_SUFFIXES)}")
    documents = [doc for doc in readers[suffix](decode_text(path.read_bytes(), str(path)), path) if doc.strip()]
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


def decode_text(data: bytes, source: str = "the data") -> str:
    """Text of a file: UTF-8 (BOM skipped), else Windows-1252; newlines normalised to ``\\n``.

    Raises:
        DataError: the bytes are not text: a NUL byte (binary data, or UTF-16/32 text), or more than 1% control
            characters other than tab, newline, carriage return and form feed.
    """
    if b"\x00" in data:
        raise DataError(
            f"{source} is not text: it holds NUL bytes (a binary file, or text in UTF-16/UTF-32); expected UTF-8 "
            "or Windows-1252 text"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("cp1252", errors="replace")
    controls = sum(1 for char in text if (ord(char) < 32 and char not in "\t\n\r\f") or char == "\ufffd")
    if controls > 0.01 * max(1, len(text)):
        raise DataError(
            f"{source} is not text: {controls} of its {len(text)} characters are control characters or bytes "
            "that decode to nothing; expected UTF-8 or Windows-1252 text"
        )
    return text.replace("\r\n", "\n").replace("\r", "\n")
