"""Resume: a run killed with SIGKILL after a checkpoint, resumed, ends with the weights of an uninterrupted run.

The killed run trains with dropout (so the RNG state matters) and shuffled data (so the data position matters).
Damaged or half-written checkpoints are skipped; a resume that does not fit the checkpoint is refused.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import slimtune as st
from cases import tiny_llama
from slimtune.training import METRICS_FILE, TrainConfig, train
from slimtune.training.checkpoint import checkpoint_problem, checkpoint_root, latest_checkpoint
from train_script import token_blocks

SCRIPT = Path(__file__).parents[1] / "train_script.py"


pytestmark = pytest.mark.usefixtures("one_thread")


def start(output_dir: Path, *extra: str) -> subprocess.Popen:
    settings = ["--steps", "8", "--checkpoint-every", "3", "--dropout", "0.1"]
    command = [sys.executable, str(SCRIPT), "--output-dir", str(output_dir), *settings, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output


def test_killed_and_resumed_run_ends_with_the_uninterrupted_weights(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    uninterrupted = start(whole, "--weights", str(tmp_path / "whole.safetensors"))
    victim = start(killed, "--hang-after", "4")
    deadline = time.monotonic() + 240
    while not (killed / "hung").exists():
        assert victim.poll() is None and time.monotonic() < deadline, victim.stdout.read() if victim.stdout else ""
        time.sleep(0.2)
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    assert latest_checkpoint(checkpoint_root(killed)).name == "step-000003"

    resume = ["--resume", "--weights", str(tmp_path / "resumed.safetensors"), "--report", str(tmp_path / "r.json")]
    finish(start(killed, *resume))
    finish(uninterrupted)
    assert json.loads((tmp_path / "r.json").read_text())["start_step"] == 3
    expected, resumed = load_file(tmp_path / "whole.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(resumed[name], tensor) for name, tensor in expected.items())
    whole_log = [json.loads(line) for line in (whole / METRICS_FILE).read_text().splitlines()]
    killed_log = [json.loads(line) for line in (killed / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in killed_log] == list(range(1, 9))
    assert [r["loss"] for r in killed_log] == [r["loss"] for r in whole_log]


def adapted() -> torch.nn.Module:
    return st.get_adapted_model(tiny_llama(), st.LoraConfig(r=4, alpha=8.0))


def config(output_dir: Path, **settings) -> TrainConfig:
    defaults = {"steps": 6, "lr": 1e-2, "seed": 2, "progress": False, "checkpoint_every": 2, "keep_checkpoints": 3}
    return TrainConfig(**{**defaults, "output_dir": str(output_dir), **settings})


def test_half_written_checkpoints_are_skipped(tmp_path, caplog):
    model = adapted()
    train(model, token_blocks(12, seed=0), config(tmp_path))
    expected = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    root = checkpoint_root(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000004", "step-000006"]
    weights = root / "step-000006" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a copy cut short
    (root / "step-000004" / "state.json").unlink()  # a save that never finished
    (root / ".step-000008.tmp").mkdir()  # a temporary folder of a killed save
    assert "bytes, the manifest says" in checkpoint_problem(root / "step-000006")

    resumed = adapted()
    with caplog.at_level(logging.WARNING, logger="slimtune"):
        result = train(resumed, token_blocks(12, seed=0), config(tmp_path, resume=True))
    assert result.start_step == 2 and len(result.losses) == 4
    assert "skipping checkpoint" in caplog.text and "step-000006" in caplog.text and "step-000004" in caplog.text
    assert all(torch.equal(p, expected[n]) for n, p in resumed.named_parameters() if p.requires_grad)
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000004", "step-000006"]
    assert all(checkpoint_problem(folder) is None for folder in root.iterdir())


def test_resume_with_other_settings_is_refused(tmp_path):
    train(adapted(), token_blocks(12, seed=0), config(tmp_path, steps=2))
    with pytest.raises(st.ConfigError, match=r"global_batch=4 in this run but 2 when it was saved"):
        train(adapted(), token_blocks(12, seed=0), config(tmp_path, steps=4, batch_size=4, resume=True))
    with pytest.raises(st.ConfigError, match="does not fit the model's trainable parameters"):
        model = st.get_adapted_model(tiny_llama(), st.DishaConfig(r=6))
        train(model, token_blocks(12, seed=0), config(tmp_path, steps=4, resume=True))


def test_resume_without_a_checkpoint_starts_afresh_and_a_fresh_start_keeps_old_checkpoints(tmp_path):
    result = train(adapted(), token_blocks(12, seed=0), config(tmp_path, steps=2, resume=True))
    assert result.start_step == 0 and len(result.losses) == 2
    with pytest.raises(st.ConfigError, match="holds checkpoints of an earlier run: set resume=True"):
        train(adapted(), token_blocks(12, seed=0), config(tmp_path, steps=2))
    assert latest_checkpoint(checkpoint_root(tmp_path)).name == "step-000002"


def learning_rates(output_dir: Path) -> list[float]:
    return [json.loads(line)["lr"] for line in (output_dir / METRICS_FILE).read_text().splitlines()]


def test_extending_a_finished_run_follows_the_new_schedule(tmp_path):
    """A run of 4 steps extended to 8 with resume trains steps 5-8 at the rates of an 8-step run (it used to train
    step 5 at the finished 4-step cosine's 0)."""
    blocks = token_blocks(12, seed=0)
    train(adapted(), blocks, config(tmp_path / "whole", steps=8, warmup=1))
    train(adapted(), blocks, config(tmp_path / "extended", steps=4, warmup=1))
    result = train(adapted(), blocks, config(tmp_path / "extended", steps=8, warmup=1, resume=True))
    assert result.start_step == 4 and len(result.losses) == 4
    expected = learning_rates(tmp_path / "whole")[4:]
    assert learning_rates(tmp_path / "extended")[4:] == pytest.approx(expected, rel=1e-12)
    progress = (4 - 1) / (8 - 1)  # step 5 of 8 after 1 warm-up step: mid-cosine, not 0
    assert expected[0] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * progress)))


def test_a_run_shorter_than_checkpoint_every_can_be_extended(tmp_path):
    blocks = token_blocks(12, seed=0)
    train(adapted(), blocks, config(tmp_path, steps=3, checkpoint_every=10))
    assert [p.name for p in checkpoint_root(tmp_path).iterdir()] == ["step-000003"]
    result = train(adapted(), blocks, config(tmp_path, steps=5, checkpoint_every=10, resume=True))
    assert result.start_step == 3 and len(result.losses) == 2
