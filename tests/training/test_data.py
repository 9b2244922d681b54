"""Text for training: LM packing and the local text-file and data-set readers."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from slimtune.errors import ConfigError, DataError, SlimtuneError
from slimtune.training.data import load_texts, pack_for_lm, read_text_file


@pytest.fixture(scope="module")
def word_tokenizer():
    """A real HF fast tokenizer over single letters and digits, split on whitespace; EOS is ``<eos>``."""
    vocab = {"<eos>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate("abcdefghijklmnopqrstuvwxyz0123456789")}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")


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


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (bytes(range(256)) * 4, "NUL bytes"),  # a binary file (it used to train as replacement characters)
        ("one document\n".encode("utf-16"), "UTF-16"),
        (b"\x01\x02\x03\x04\x05\x06\x07\x08 mostly control bytes \x0e\x0f\x10\x11\x12", "control characters"),
    ],
)
def test_bytes_that_are_not_text_are_refused(tmp_path, content, message):
    path = tmp_path / "model.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as info:
        read_text_file(path)
    assert str(path) in str(info.value)


def test_windows_1252_text_with_a_few_odd_bytes_is_read(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("café crème\n\nnaïve text ".encode("cp1252") * 20 + b"\x81")  # 0x81 is undefined in cp1252
    assert read_text_file(path)[0].startswith("café crème")
