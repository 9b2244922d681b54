"""Fixtures the command-line tests share: a tiny Llama folder the CLI loads (and one with room for passkey prompts),
and a small text file to train on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from train_script import save_tiny_folder


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """A Hugging Face folder of ``tiny_llama()`` with a character tokenizer (``train_script.save_tiny_folder``)."""
    return save_tiny_folder(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def long_tiny(tmp_path_factory) -> Path:
    """The ``tiny`` folder with max_position_embeddings 512 (a passkey prompt needs ~250 characters)."""
    path = save_tiny_folder(tmp_path_factory.mktemp("tiny-512"))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 512}))
    return path


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """30 short documents separated by blank lines."""
    path = tmp_path_factory.mktemp("texts") / "train.txt"
    path.write_text("\n\n".join(f"the cat {i} sat on the mat {i + 1} and the dog ran" for i in range(30)))
    return path
