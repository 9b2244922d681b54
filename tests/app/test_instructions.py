"""The BBC News instruction set: answers read from the corpus, deterministic splits, the .jsonl users see."""

from __future__ import annotations

import json

import pytest

from slimtune.app.corpus import bbc_news_articles, split_articles
from slimtune.app.instructions import HEADLINE_REQUEST, article_excerpt, bbc_instructions
from slimtune.errors import ConfigError
from slimtune.training.chat_data import chat_blocks, read_chat_jsonl, write_chat_jsonl

TOPICS = ["business", "entertainment", "politics", "sports", "tech"]


@pytest.fixture(scope="module")
def articles():
    return bbc_news_articles()


@pytest.fixture(autouse=True)
def read_once(articles, monkeypatch):
    """The corpus read once for the module (2,225 files) instead of once per call."""
    monkeypatch.setattr("slimtune.app.instructions.bbc_news_articles", lambda: articles)


@pytest.fixture(scope="module")
def splits(articles):
    return split_articles(articles)


def test_topic_examples_ask_the_topic_and_answer_it(splits):
    examples = bbc_instructions("validation", "topic")
    articles = splits["validation"]
    assert len(examples) == len(articles) == 221
    question = "Which topic is this article about? Answer with one word: " + ", ".join(TOPICS[:-1]) + " or tech."
    for example, article in zip(examples, articles):
        user, assistant = example["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert assistant["content"] == article.topic in TOPICS
        body = article.text.split("\n", 1)[1].split()
        assert user["content"] == f"{question}\n\n" + " ".join(body[:50]) + (" ..." if len(body) > 50 else "")
    assert {e["messages"][1]["content"] for e in examples} == set(TOPICS)


def test_headline_examples_hide_the_headline_and_answer_with_it(splits):
    examples = bbc_instructions("test", "headline", max_words=30)
    for example, article in zip(examples, splits["test"]):
        user, assistant = example["messages"]
        assert assistant["content"] == article.text.split("\n", 1)[0].strip() == article.headline
        assert user["content"].startswith(HEADLINE_REQUEST + "\n\n")
        assert article.headline not in user["content"]
        assert len(user["content"].split()) == len(HEADLINE_REQUEST.split()) + 30 + 1  # 30 words and "..."


def test_both_interleaves_and_max_examples_keeps_the_first(splits):
    both = bbc_instructions("train", "both", max_examples=7)
    topics, headlines = bbc_instructions("train", "topic", 4), bbc_instructions("train", "headline", 4)
    assert both == [x for pair in zip(topics, headlines) for x in pair][:7]
    assert [e["messages"][0]["content"].split("\n\n")[1] for e in topics] == [
        article_excerpt(a, 50) for a in splits["train"][:4]
    ]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"split": "dev"}, "split="),
        ({"kind": "summary"}, "kind="),
        ({"max_examples": 0}, "max_examples="),
        ({"max_words": -1}, "max_words="),
    ],
)
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        bbc_instructions(**kwargs)


def test_written_jsonl_reads_back_and_packs(tmp_path):
    from slimtune.app.models import load_smollm2_tokenizer

    examples = bbc_instructions("validation", "both", max_examples=40)
    path = write_chat_jsonl(examples, tmp_path / "bbc.jsonl")
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert set(first) == {"messages"} and read_chat_jsonl(path) == examples
    tokenizer = load_smollm2_tokenizer()
    blocks = chat_blocks(path, tokenizer, 192)
    answers = tokenizer.decode(blocks[..., 0][blocks[..., 1] != -100].tolist())
    assert answers.count("<|im_end|>") == 40 and answers.startswith(examples[0]["messages"][1]["content"])
    assert (blocks[:, :, 2] == 0).sum() >= 40 + 1  # every example starts a position run, then the padding
