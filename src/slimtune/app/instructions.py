"""A small instruction set from the bundled BBC News corpus, as chat examples for the demo and the tests.

Each article gives a user turn (a request and the article's first words, without its headline) and an assistant
answer: ``"topic"`` asks which topic the article is about (answer: business, entertainment, politics, sports or
tech), ``"headline"`` asks for a headline (answer: the article's own). The examples are ``{"messages": [...]}``
records, deterministic per split (:func:`slimtune.app.corpus.split_articles` with ``seed``), ready for
:func:`slimtune.training.chat_data.chat_blocks`; :func:`slimtune.training.chat_data.write_chat_jsonl` writes
them as a ``.jsonl`` file in the format users give their own data.
"""

from __future__ import annotations

from typing import Any

from slimtune.app.corpus import SPLITS, Article, bbc_news_articles, split_articles
from slimtune.config import check_int
from slimtune.errors import ConfigError

KINDS = ("topic", "headline", "both")
HEADLINE_REQUEST = "Write a headline for this article."


def bbc_instructions(
    split: str = "train",
    kind: str = "topic",
    max_examples: int | None = None,
    *,
    max_words: int = 50,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Chat examples ``{"messages": [user, assistant]}`` from the BBC News articles of ``split``, in split order.

    ``kind``: ``"topic"``, ``"headline"``, or ``"both"`` (per article its topic example, then its headline one).
    The user turn quotes the first ``max_words`` words of the article's body ("..." marks a cut); with the
    default 50 and the SmolLM2 chat template, examples are 99 to 163 tokens (seq_len 192 holds every one).
    ``max_examples`` keeps the first ones (all by default).

    Raises:
        ConfigError: unknown ``split`` or ``kind``; ``max_examples`` or ``max_words`` not a positive integer.
    """
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is not allowed: expected one of {list(SPLITS)}")
    if kind not in KINDS:
        raise ConfigError(f"kind={kind!r} is not allowed: expected one of {list(KINDS)}")
    check_int("max_examples", max_examples, optional=True)
    check_int("max_words", max_words)
    articles = bbc_news_articles()
    question = topic_question(sorted({article.topic for article in articles}))
    examples = []
    for article in split_articles(articles, seed=seed)[split]:
        excerpt = article_excerpt(article, max_words)
        if kind in ("topic", "both"):
            examples.append(_chat(f"{question}\n\n{excerpt}", article.topic))
        if kind in ("headline", "both"):
            examples.append(_chat(f"{HEADLINE_REQUEST}\n\n{excerpt}", article.headline))
        if max_examples is not None and len(examples) >= max_examples:
            break
    return examples[:max_examples]


def topic_question(topics: list[str]) -> str:
    """The topic request naming the allowed answers: ``"... Answer with one word: a, b or c."``"""
    return f"Which topic is this article about? Answer with one word: {', '.join(topics[:-1])} or {topics[-1]}."


def article_excerpt(article: Article, max_words: int) -> str:
    """The first ``max_words`` words of the article after its headline, single-spaced, "..." where cut."""
    words = article.text.split("\n", 1)[-1].split()
    return " ".join(words[:max_words]) + (" ..." if len(words) > max_words else "")


def _chat(request: str, answer: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": request}, {"role": "assistant", "content": answer}]}
