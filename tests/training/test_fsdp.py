"""FSDP2 on 2 CPU processes (gloo), launched by ``accelerate launch --use_fsdp --fsdp_version 2``: every adapter
family trains as under DDP, on a bfloat16 base with float32 adapters (slimtune's default), resumes from a
checkpoint to the uninterrupted run's weights, and saves adapter files that a plain single-process model loads.

The processes are started as in ``test_multiprocess.py`` (``ACCELERATE_USE_CPU=1``); accelerate 1.15 ignores FSDP
on CPU by itself, :mod:`slimtune.training.sharding` turns it on. Each report names the distributed type, so a
silent fall-back to DDP fails. One launch trains all families one after the other, to keep the file quick.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_multiprocess import assert_same_tensors, launch_fsdp, launch_two, run_together

import slimtune as st
from cases import tiny_llama

SCRIPT = Path(__file__).parents[1] / "train_script.py"
FAMILIES = ("lora", "lora_sp", "bone", "mini", "bat_col", "bat_row", "surm_circulant", "surm_adapter", "bottleneck")
STEPS = 4


def script(folder: Path, *extra: str) -> list[str]:
    """train_script.py for every family on a bfloat16 base: batch 1 × 2 micro-batches per process, checkpoints
    every 2 steps; files named ``<folder>/{report,weights,adapter}-<family>``."""
    files = ["--report", folder / "report-", "--weights", folder / "weights-", "--adapter-dir", folder / "adapter-"]
    settings = ["--steps", str(STEPS), "--batch-size", "1", "--grad-accum", "2", "--checkpoint-every", "2"]
    names = ["--adapters", ",".join(FAMILIES), "--base-dtype", "bfloat16", "--output-dir", folder / "runs"]
    return [str(SCRIPT), *settings, *names, *files, *extra]


def report(folder: Path, family: str) -> dict:
    return json.loads((folder / f"report-{family}").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same runs under FSDP2 and under DDP, both on 2 processes."""
    folders = {name: tmp_path_factory.mktemp(name) for name in ("fsdp", "ddp")}
    run_together({"fsdp": launch_fsdp(*script(folders["fsdp"])), "ddp": launch_two(*script(folders["ddp"]))})
    return folders


@pytest.mark.parametrize("family", FAMILIES)
def test_fsdp_trains_as_ddp(runs, family):
    fsdp, ddp = report(runs["fsdp"], family), report(runs["ddp"], family)
    assert fsdp["distributed_type"] == "DistributedType.FSDP" and fsdp["num_processes"] == 2
    assert ddp["distributed_type"] == "DistributedType.MULTI_CPU"
    assert len(fsdp["losses"]) == STEPS
    assert fsdp["losses"] == pytest.approx(ddp["losses"], rel=1e-6)
    assert fsdp["eval_losses"] == pytest.approx(ddp["eval_losses"], rel=1e-6)
    weights = {name: load_file(folder / f"weights-{family}") for name, folder in runs.items()}
    assert_same_tensors(weights["ddp"], weights["fsdp"])
    assert {tensor.dtype for tensor in weights["fsdp"].values()} == {torch.float32}  # adapters on the bf16 base


@pytest.mark.parametrize("family", FAMILIES)
def test_fsdp_adapter_files_are_ddp_s_and_load_in_a_plain_model(runs, family):
    folders = {name: folder / f"adapter-{family}" for name, folder in runs.items()}
    configs = {name: json.loads((folder / "adapter_config.json").read_text()) for name, folder in folders.items()}
    assert configs["fsdp"] == configs["ddp"]
    tensors = {name: load_file(folder / "adapter_model.safetensors") for name, folder in folders.items()}
    assert_same_tensors(tensors["ddp"], tensors["fsdp"])
    assert all(tensors["fsdp"][key].dtype == tensor.dtype for key, tensor in tensors["ddp"].items())
    inputs = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(5))
    logits = [st.load_adapter(tiny_llama(), folder)(input_ids=inputs).logits for folder in folders.values()]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)


def test_fsdp_resume_reaches_the_uninterrupted_weights(runs, tmp_path):
    shutil.copytree(runs["fsdp"] / "runs", tmp_path / "runs")
    for family in FAMILIES:  # back to the checkpoint of step 2, as if the run had stopped there
        shutil.rmtree(tmp_path / "runs" / family / "checkpoints" / f"step-{STEPS:06d}")
    run_together({"resumed": launch_fsdp(*script(tmp_path, "--resume"))})
    for family in FAMILIES:
        resumed, whole = report(tmp_path, family), report(runs["fsdp"], family)
        assert resumed["distributed_type"] == "DistributedType.FSDP" and resumed["start_step"] == 2
        assert resumed["losses"] == pytest.approx(whole["losses"][2:], rel=1e-6)
        assert_same_tensors(load_file(runs["fsdp"] / f"weights-{family}"), load_file(tmp_path / f"weights-{family}"))


def test_fsdp_checkpoint_holds_full_tensors(runs):
    folder = runs["fsdp"] / "runs" / "lora" / "checkpoints" / f"step-{STEPS:06d}"
    trainable, moments = load_file(folder / "trainable.safetensors"), load_file(folder / "optimizer.safetensors")
    assert_same_tensors(load_file(runs["fsdp"] / "weights-lora"), trainable)
    assert sorted(tensor.shape for tensor in moments.values() if tensor.dim()) == sorted(
        [tensor.shape for tensor in trainable.values()] * 2  # AdamW's exp_avg and exp_avg_sq, not 1/2 shards
    )
