"""Two processes (DDP over gloo on CPU, launched by ``accelerate launch``) train as one process with the same global
batch.

accelerate 1.15 starts a single process for ``accelerate launch --cpu --num_processes 2`` unless ``mpirun`` is
used (its simple launcher runs the script once), so the tests launch through torchrun with ``--multi_gpu`` and
``ACCELERATE_USE_CPU=1``, which accelerate turns into ``MULTI_CPU`` with the gloo backend. The launched runs
report their process count (or write one RNG file per process), so a silent fall-back to one process fails.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train_script import save_tiny_folder

SCRIPT = Path(__file__).parents[1] / "train_script.py"


def launch_two(*command: str) -> list[str]:
    """``accelerate launch`` of ``command`` (a script and its arguments, or ``-m module ...``) on 2 CPU processes."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launch = ["launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    cli = [sys.executable, "-m", "accelerate.commands.accelerate_cli", *launch, "--dynamo_backend", "no"]
    return [*cli, "--main_process_port", str(port), *command]


def launch_fsdp(*command: str) -> list[str]:
    """``accelerate launch`` of ``command`` on 2 CPU processes with FSDP2 (``--use_fsdp`` replaces ``--multi_gpu``)."""
    ddp = launch_two(*command)
    at = ddp.index("--multi_gpu")
    return [*ddp[:at], "--use_fsdp", "--fsdp_version", "2", *ddp[at + 1 :]]


def run_together(commands: dict[str, list[str]]) -> None:
    """Run the commands at the same time (one thread each; gloo on CPU for the launched ones); all must succeed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    processes = {
        name: subprocess.Popen(
            [str(arg) for arg in command], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for name, command in commands.items()
    }
    for process in processes.values():
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output[-4000:]


def assert_same_tensors(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        torch.testing.assert_close(second[name], tensor, rtol=1e-4, atol=1e-6)


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    def options(name: str) -> list[str]:
        files = ["--output-dir", tmp_path / name, "--weights", tmp_path / f"{name}.safetensors"]
        return ["--steps", "6", "--checkpoint-every", "3", *files, "--report", tmp_path / f"{name}.json"]

    run_together(
        {
            "two": launch_two(str(SCRIPT), "--batch-size", "1", "--grad-accum", "2", *options("two")),
            "one": [sys.executable, SCRIPT, "--batch-size", "4", *options("one")],
        }
    )
    reports = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in ("two", "one")}
    assert reports["two"]["num_processes"] == 2 and reports["one"]["num_processes"] == 1
    assert reports["two"]["losses"] == pytest.approx(reports["one"]["losses"], rel=1e-5)
    assert reports["two"]["eval_losses"] == pytest.approx(reports["one"]["eval_losses"], rel=1e-5)
    assert_same_tensors(load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors"))
    checkpoint = tmp_path / "two" / "checkpoints" / "step-000006"
    assert (checkpoint / "rng-rank0.json").is_file() and (checkpoint / "rng-rank1.json").is_file()


def test_finetune_command_under_accelerate_launch(tmp_path):
    folder = save_tiny_folder(tmp_path / "tiny")
    text = tmp_path / "train.txt"
    text.write_text("\n\n".join(f"the cat {i} sat on the mat {i + 1} and the dog ran" for i in range(30)))
    settings = ["--seq-len", "32", "--steps", "4", "--method", "lora", "--r", "4", "--lr", "1e-2", "--no-progress"]
    common = ["finetune", "--model", folder, "--data", text, *settings, "--checkpoint-every", "2"]
    per_process = ["--batch-size", "1", "--grad-accum", "2"]
    run_together(
        {
            "two": launch_two("-m", "slimtune", *common, *per_process, "--output", tmp_path / "two"),
            "fsdp": launch_fsdp("-m", "slimtune", *common, *per_process, "--output", tmp_path / "fsdp"),
            "one": [sys.executable, "-m", "slimtune", *common, "--batch-size", "4", "--output", tmp_path / "one"],
        }
    )
    names = ("one", "two", "fsdp")
    adapters = [load_file(tmp_path / name / "adapter" / "adapter_model.safetensors") for name in names]
    assert_same_tensors(adapters[0], adapters[1])
    assert_same_tensors(adapters[0], adapters[2])
    records = {name: json.loads((tmp_path / name / "run.json").read_text()) for name in names}
    assert [records[name]["distributed_type"] for name in names] == ["NO", "MULTI_CPU", "FSDP"]
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints" / "step-000004").glob("rng-rank*.json")) == [
        "rng-rank0.json",
        "rng-rank1.json",
    ]
