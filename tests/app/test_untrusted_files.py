"""Untrusted and damaged files: adapters, training checkpoints and linearised models.

Each damaged file gives the documented error (``AdapterFileError`` for adapters and linearised models,
``ConfigError`` or a skip with a warning for checkpoints) and leaves the model as it was. Pickles are never
loaded: a pickle whose unpickling would write a marker file is put where slimtune reads, and the marker must not
appear.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import pytest
import torch

import slimtune as st
from cases import CASES, assert_unchanged, randomize_adapters, snapshot, tiny_gpt2, tiny_llama, tiny_mlp
from slimtune.linear_attention import linearize, load_linearized, save_linearized
from slimtune.training import TrainConfig, train
from slimtune.training.checkpoint import (
    STATE_FILE,
    checkpoint_problem,
    checkpoint_root,
    latest_checkpoint,
    load_checkpoint,
)
from train_script import token_blocks


class WritesAMarker:
    """Unpickling this creates ``path``: proof that a file was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def write_pickle(target: Path, marker: Path) -> None:
    target.write_bytes(pickle.dumps({"fc1.block": WritesAMarker(marker)}))


def deep_json(levels: int) -> str:
    """JSON lists nested ``levels`` deep: deeper than any slimtune file, and from about 1,000 levels deeper than
    Python's recursion limit."""
    return "[" * levels + "]" * levels


TOO_DEEP = r"nests lists or objects more than the 100 levels allowed"


@pytest.fixture
def saved_bone(tmp_path) -> Path:
    model = st.get_adapted_model(tiny_mlp(), CASES["bone"])
    randomize_adapters(model)
    return st.save_adapter(model, tmp_path / "bone")


@pytest.fixture(params=["plain", "adapted"])
def victim(request) -> torch.nn.Module:
    model = tiny_mlp()
    return model if request.param == "plain" else st.get_adapted_model(model, st.LoraConfig(r=2), "first")


def edit_metadata(folder: Path, edit) -> None:
    path = folder / "adapter_config.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


DAMAGED_CONFIGS = {
    "module without d_in": (lambda m: m["modules"]["fc1"].pop("d_in"), "is damaged"),
    "modules not a dict": (lambda m: m.update(modules=["fc1"]), "is damaged"),
    "no modules": (lambda m: m.update(modules={}), "a non-empty {module name"),
    "base_model not a dict": (lambda m: m.update(base_model="TinyMLP"), "is damaged"),
    "config without method": (lambda m: m["config"].pop("method"), "needs a 'method' field"),
    "config of an unknown method": (lambda m: m["config"].update(method="dora"), "method='dora' is not known"),
    "config with a bad value": (lambda m: m["config"].update(r=0), "r=0 is not allowed"),
    "config with an unknown key": (lambda m: m["config"].update(rank=3), r"unknown field(s) ['rank']"),
    "a newer format": (lambda m: m.update(format_version=2, slimtune_version="9.0.0"), "upgrade slimtune"),
    "a module of another shape": (lambda m: m["modules"]["fc1"].update(d_in=31), "saved for a layer 31 -> 42"),
    "a module the model lacks": (lambda m: m["modules"].update(fc3={"d_in": 3, "d_out": 4}), "module 'fc3'"),
    "not an object": (lambda m: m.clear(), "lacks the field(s)"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED_CONFIGS))
def test_damaged_adapter_configs_are_refused_and_leave_the_model_unchanged(saved_bone, victim, case):
    edit, named = DAMAGED_CONFIGS[case]
    edit_metadata(saved_bone, edit)
    before = snapshot(victim)
    with pytest.raises(st.AdapterFileError) as info:
        st.load_adapter(victim, saved_bone, "second")
    assert named in str(info.value)
    assert_unchanged(victim, before)


def test_a_newer_slimtune_version_with_the_same_format_loads(saved_bone):
    edit_metadata(saved_bone, lambda m: m.update(slimtune_version="9.0.0"))
    assert st.adapter_configs(st.load_adapter(tiny_mlp(), saved_bone))["default"] == CASES["bone"]


DAMAGED_WEIGHTS = {
    "truncated": lambda path: path.write_bytes(path.read_bytes()[:-7]),
    "header cut": lambda path: path.write_bytes(path.read_bytes()[:5]),
    "empty": lambda path: path.write_bytes(b""),
    "a tensor missing": lambda path: rewrite_tensors(path, lambda t: t.pop("fc2.block")),
    "an extra tensor": lambda path: rewrite_tensors(path, lambda t: t.update({"fc9.block": torch.zeros(2)})),
    "a tensor of another shape": lambda path: rewrite_tensors(
        path, lambda t: t.update({"fc1.block": torch.zeros(6, 41)})
    ),
}


def rewrite_tensors(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize("case", sorted(DAMAGED_WEIGHTS))
def test_damaged_adapter_weights_are_refused_and_leave_the_model_unchanged(saved_bone, victim, case):
    DAMAGED_WEIGHTS[case](saved_bone / "adapter_model.safetensors")
    before = snapshot(victim)
    with pytest.raises(st.AdapterFileError, match=r"adapter_model\.safetensors"):
        st.load_adapter(victim, saved_bone, "second")
    assert_unchanged(victim, before)


@pytest.mark.parametrize("levels", [150, 100_000])
def test_deeply_nested_adapter_config_is_refused_and_leaves_the_model_unchanged(saved_bone, victim, levels):
    (saved_bone / "adapter_config.json").write_text(f'{{"modules": {deep_json(levels)}}}')
    before = snapshot(victim)
    with pytest.raises(st.AdapterFileError, match=rf"adapter_config\.json {TOO_DEEP}"):
        st.load_adapter(victim, saved_bone, "second")
    assert_unchanged(victim, before)


def test_an_adapter_for_another_base_model_names_the_module(tmp_path):
    llama = st.get_adapted_model(tiny_llama(), st.LoraConfig(r=2, target_modules=["q_proj"]))
    st.save_adapter(llama, tmp_path)
    gpt2 = tiny_gpt2()
    before = snapshot(gpt2)
    named = r"module 'model\.layers\.0\.self_attn\.q_proj', which GPT2LMHeadModel lacks"
    with pytest.raises(st.AdapterFileError, match=named):
        st.load_adapter(gpt2, tmp_path)
    assert_unchanged(gpt2, before)


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_model.bin"])
def test_pickled_adapter_weights_are_never_unpickled(saved_bone, tmp_path, name):
    marker = tmp_path / "unpickled"
    if name.endswith(".bin"):
        (saved_bone / "adapter_model.safetensors").unlink()
    write_pickle(saved_bone / name, marker)
    with pytest.raises(st.AdapterFileError, match=r"adapter_model\.safetensors"):
        st.load_adapter(tiny_mlp(), saved_bone)
    assert not marker.exists()


def checkpointed_run(output_dir: Path) -> Path:
    """A finished tiny run with checkpoints at steps 2 and 4; returns the checkpoint root."""
    model = st.get_adapted_model(tiny_llama(), st.LoraConfig(r=4, alpha=8.0))
    train(model, token_blocks(12, seed=0), resumed_config(output_dir, resume=False))
    return checkpoint_root(output_dir)


def resumed_config(output_dir: Path, resume: bool = True) -> TrainConfig:
    return TrainConfig(
        steps=4,
        lr=1e-2,
        seed=2,
        progress=False,
        output_dir=str(output_dir),
        checkpoint_every=2,
        keep_checkpoints=2,
        resume=resume,
    )


def resume(output_dir: Path):
    return train(
        st.get_adapted_model(tiny_llama(), st.LoraConfig(r=4, alpha=8.0)),
        token_blocks(12, seed=0),
        resumed_config(output_dir),
    )


def same_size_garbage(path: Path) -> None:
    """Damage ``path`` without changing its size, so the manifest's size check passes."""
    data = bytearray(path.read_bytes())
    data[:8] = b"\xff" * 8
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["trainable.safetensors", "optimizer.safetensors", "rng-rank0.safetensors"])
def test_a_checkpoint_damaged_behind_its_manifest_is_refused_by_name(tmp_path, name):
    root = checkpointed_run(tmp_path)
    same_size_garbage(root / "step-000004" / name)
    assert checkpoint_problem(root / "step-000004") is None
    with pytest.raises(st.ConfigError, match=rf"step-000004/{name} is damaged .* resume from another checkpoint"):
        resume(tmp_path)


@pytest.mark.parametrize("damage", ["truncated optimizer", "newer format", "manifest missing", "state unreadable"])
def test_damaged_checkpoints_are_skipped_for_the_previous_one(tmp_path, caplog, damage):
    root = checkpointed_run(tmp_path)
    folder = root / "step-000004"
    state = json.loads((folder / STATE_FILE).read_text())
    if damage == "truncated optimizer":
        (folder / "optimizer.safetensors").write_bytes((folder / "optimizer.safetensors").read_bytes()[:50])
    elif damage == "newer format":
        (folder / STATE_FILE).write_text(json.dumps({**state, "format_version": 2}))
    elif damage == "manifest missing":
        (folder / STATE_FILE).write_text(json.dumps({k: v for k, v in state.items() if k != "files"}))
    else:
        (folder / STATE_FILE).write_text('{"step": 4, "fil')
    with caplog.at_level(logging.WARNING, logger="slimtune"):
        assert latest_checkpoint(root) == root / "step-000002"
        assert resume(tmp_path).start_step == 2
    assert "skipping checkpoint" in caplog.text and "step-000004" in caplog.text


def test_a_pickle_in_a_checkpoint_is_never_unpickled(tmp_path):
    root = checkpointed_run(tmp_path)
    folder, marker = root / "step-000004", tmp_path / "unpickled"
    write_pickle(folder / "trainable.safetensors", marker)
    state = json.loads((folder / STATE_FILE).read_text())
    state["files"]["trainable.safetensors"] = (folder / "trainable.safetensors").stat().st_size
    (folder / STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(st.ConfigError, match=r"trainable\.safetensors is damaged or not a safetensors file"):
        resume(tmp_path)
    assert not marker.exists()


def test_deeply_nested_checkpoint_json_is_skipped_or_refused_by_name(tmp_path):
    root = checkpointed_run(tmp_path)
    (root / "step-000004" / STATE_FILE).write_text(deep_json(100_000))
    assert TOO_DEEP in checkpoint_problem(root / "step-000004")
    assert latest_checkpoint(root) == root / "step-000002"
    optimizer = root / "step-000002" / "optimizer.json"
    size = optimizer.stat().st_size
    optimizer.write_text(deep_json(size // 2).ljust(size))  # the same size: the manifest cannot tell
    with pytest.raises(
        st.ConfigError, match=rf"step-000002/optimizer\.json {TOO_DEEP}; resume from another checkpoint"
    ):
        resume(tmp_path)


def test_a_checkpoint_that_does_not_fit_changes_nothing_and_names_both_shapes(tmp_path):
    folder = checkpointed_run(tmp_path) / "step-000004"
    name = "model.layers.0.self_attn.q_proj.adapters.default.lora_A"
    rewrite_tensors(folder / "trainable.safetensors", lambda t: t.update({name: torch.zeros(3, 5)}))
    model = st.get_adapted_model(tiny_llama(), st.LoraConfig(r=4, alpha=8.0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    before, rng = snapshot(model), torch.get_rng_state()
    mismatch = rf"does not fit the model's trainable parameters; shape mismatches: \['{name} saved \(3, 5\) vs model"
    with pytest.raises(st.ConfigError, match=mismatch):
        load_checkpoint(folder, model, optimizer, scheduler, process_index=0)
    assert_unchanged(model, before)
    assert not optimizer.state and torch.equal(torch.get_rng_state(), rng)


@pytest.fixture
def saved_linearized(tmp_path) -> Path:
    return save_linearized(linearize(tiny_llama()), tmp_path / "linear")


@pytest.mark.parametrize(
    "damage", ["truncated", "pickle", "config missing", "newer format", "config unknown key", "deeply nested config"]
)
def test_damaged_linearized_files_are_refused_and_leave_the_model_unchanged(saved_linearized, tmp_path, damage):
    tensors = saved_linearized / "linear_attention.safetensors"
    config = saved_linearized / "linear_attention_config.json"
    record = json.loads(config.read_text())
    marker = tmp_path / "unpickled"
    if damage == "truncated":
        tensors.write_bytes(tensors.read_bytes()[:-9])
    elif damage == "pickle":
        write_pickle(tensors, marker)
    elif damage == "config unknown key":
        record["config"]["feature_size"] = 8
    elif damage == "config missing":
        del record["config"]
    elif damage == "deeply nested config":
        config.write_text(deep_json(100_000))
    else:
        record["format_version"] += 1
    if damage.startswith("config") or damage == "newer format":
        config.write_text(json.dumps(record))
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(st.AdapterFileError):
        load_linearized(model, saved_linearized)
    assert_unchanged(model, before)
    assert not marker.exists()
