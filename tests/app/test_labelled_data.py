"""Labelled texts for classification: the BBC News topics, the user's .jsonl / .csv files and their errors, and the
confusion-matrix picture."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from slimtune.app.classify_plots import plot_confusion
from slimtune.app.corpus import bbc_news_articles
from slimtune.app.labelled_data import LabelledData, bbc_topic_data, read_labelled_file
from slimtune.errors import ConfigError, DataError

TOPICS = ["business", "entertainment", "politics", "sports", "tech"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def test_bbc_topics_have_five_classes_and_stable_labels():
    data = bbc_topic_data("train")
    assert data.names == TOPICS
    # 80% of each topic (business 510, entertainment 386, politics 417, sports 511, tech 401), rounded
    assert Counter(data.labels) == {0: 408, 1: 309, 2: 334, 3: 409, 4: 321}
    topic_of = {article.text: article.topic for article in bbc_news_articles()}
    assert all(TOPICS[label] == topic_of[text] for text, label in zip(data.texts, data.labels))
    assert data == bbc_topic_data("train", seed=0)
    assert len(bbc_topic_data("test").texts) == 2225 - 1781 - len(bbc_topic_data("validation").texts)
    with pytest.raises(ConfigError, match="split='dev' is not allowed"):
        bbc_topic_data("dev")


def test_jsonl_and_csv_files_read_alike(tmp_path):
    rows = [("good film", "pos"), ("bad, sad film", "neg"), ('"great" film', "pos"), ("dull", "neg")]
    jsonl = write_jsonl(
        tmp_path / "a.jsonl", [{"text": t, "label": label, "id": i} for i, (t, label) in enumerate(rows)]
    )
    csv_lines = ["id,label,text"] + [
        f'{i},{label},"{t.replace(chr(34), 2 * chr(34))}"' for i, (t, label) in enumerate(rows)
    ]
    csv = tmp_path / "a.csv"
    csv.write_text("\n".join(csv_lines) + "\n", encoding="utf-8")
    expected = LabelledData([t for t, _ in rows], [1, 0, 1, 0], ["neg", "pos"])
    assert read_labelled_file(jsonl) == expected
    assert read_labelled_file(csv) == expected
    assert read_labelled_file(csv, label_names=["pos", "neg"]).labels == [0, 1, 0, 1]


def test_integer_labels_sort_as_numbers(tmp_path):
    path = write_jsonl(
        tmp_path / "n.jsonl", [{"text": f"t{i}", "label": label} for i, label in enumerate([10, 2, "2", 0])]
    )
    data = read_labelled_file(path)
    assert data.names == ["0", "2", "10"] and data.labels == [2, 1, 1, 0]


def lines(*records: object) -> str:
    return "".join(json.dumps(record) + "\n" for record in records)


A, B = {"text": "a", "label": "x"}, {"text": "b", "label": "y"}
NAMES = "label_names"
# (case, file name, its content (None: no file), keywords of read_labelled_file, error type, parts of the message)
BAD_FILES = [
    ("missing file", "nope.jsonl", None, {}, FileNotFoundError, ["nope.jsonl does not exist"]),
    ("unknown extension", "a.txt", "a", {}, ConfigError, ["a.txt", "['.jsonl', '.csv']"]),
    ("empty jsonl", "e.jsonl", "\n\n", {}, DataError, ["e.jsonl: no example in the file"]),
    ("empty csv", "e.csv", "", {}, DataError, ["e.csv: no example in the file"]),
    ("header only", "h.csv", "text,label\n", {}, DataError, ["h.csv: no example in the file"]),
    ("invalid JSON", "j.jsonl", lines(A) + '\n{"text": \n', {}, DataError, ["j.jsonl, line 3: invalid JSON"]),
    ("not an object", "l.jsonl", '["a", 1]\n', {}, DataError, ["line 1", "got a JSON list"]),
    (
        "no label",
        "f.jsonl",
        lines(A, {"text": "b", "id": 1}),
        {},
        DataError,
        ["line 2", "no 'label' field, found ['id'"],
    ),
    ("no text column", "c.csv", "body,label\nx,1\n", {}, DataError, ["line 1", "no 'text' column, found ['body', "]),
    ("empty text", "t.jsonl", lines(A, {"text": " ", "label": "y"}), {}, DataError, ["t.jsonl, line 2: empty text"]),
    ("empty csv text", "t.csv", "text,label\na,x\n,y\n", {}, DataError, ["t.csv, line 3: empty text"]),
    ("float label", "g.jsonl", lines(A, {"text": "b", "label": 1.5}), {}, DataError, ["line 2: label 1.5 is not"]),
    ("short row", "s.csv", "text,label\na,x\nb\n", {}, DataError, ["line 3: fewer fields than the 2 of the header"]),
    ("one class", "o.jsonl", lines(A, A), {}, DataError, ["every example has label 'x'", "at least 2 classes"]),
    (
        "unknown label",
        "u.jsonl",
        lines(A, B),
        {NAMES: ["x", "z"]},
        ConfigError,
        ["u.jsonl, line 2: label 'y'", "['x', 'z']"],
    ),
    ("empty class", "c.jsonl", lines(A, B), {NAMES: ["x", "y", "z"]}, DataError, ["class 'z' (an empty class)"]),
    ("one name", "n.jsonl", lines(A, B), {NAMES: ["x"]}, ConfigError, ["label_names=['x']", "at least 2 distinct"]),
]


@pytest.mark.parametrize(
    ("name", "content", "options", "error", "parts"), [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES]
)
def test_bad_files_fail_with_one_line_naming_the_problem(tmp_path, name, content, options, error, parts):
    if content is not None:
        (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(error) as info:
        read_labelled_file(tmp_path / name, **options)
    message = str(info.value)
    assert "\n" not in message and all(part in message for part in parts), message


def test_plot_confusion_writes_a_png(tmp_path):
    import matplotlib.image

    path = plot_confusion([[5, 1, 0], [2, 7, 1], [0, 0, 9]], ["a", "b", "c"], tmp_path / "plots" / "c.png", "test")
    assert path == tmp_path / "plots" / "c.png"
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    height, width, channels = matplotlib.image.imread(path).shape
    assert height > 100 and width > 100 and channels in (3, 4)
    assert sorted(p.name for p in path.parent.iterdir()) == ["c.png"]  # no temporary file left
    with pytest.raises(ConfigError, match=r"rows of lengths \[2, 2\] and 3 names"):
        plot_confusion([[1, 0], [0, 1]], ["a", "b", "c"], tmp_path / "bad.png", "bad")
    assert not (tmp_path / "bad.png").exists()
