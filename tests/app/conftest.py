"""Fixtures the command-line tests share: a tiny Llama folder the CLI loads, and a small text file to train on."""

from __future__ import annotations

from pathlib import Path

import pytest

from train_script import save_tiny_folder


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """A Hugging Face folder of ``tiny_llama()`` with a character tokenizer (``train_script.save_tiny_folder``)."""
    return save_tiny_folder(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """30 short documents separated by blank lines."""
    path = tmp_path_factory.mktemp("texts") / "train.txt"
    path.write_text("\n\n".join(f"the cat {i} sat on the mat {i + 1} and the dog ran" for i in range(30)))
    return path
