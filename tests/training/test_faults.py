"""Faults during training: SIGKILL at random moments, a full disk while checkpointing, a death while pruning.

Kills: the run of ``train_script.py`` (a tiny Llama with dropout and shuffled data, a checkpoint after every step)
is killed with SIGKILL at a moment drawn from a seeded RNG (a step, then 0-40 ms): during a step, an evaluation or
a checkpoint save. Every ``step-*`` folder left must be complete, and the resumed run must end with exactly the
weights and losses of an uninterrupted run. The default suite kills at 3 seeds; ``-m slow`` at 12 more.
(A NaN loss or gradient: test_nan_stop.py.)
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import slimtune.training.checkpoint
import slimtune.training.loop
from slimtune.training import METRICS_FILE
from slimtune.training.checkpoint import checkpoint_problem, checkpoint_root, latest_checkpoint
from train_script import run_training

SCRIPT = Path(__file__).parents[1] / "train_script.py"
STEPS = 24

pytestmark = pytest.mark.usefixtures("one_thread")


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def logged_steps(output_dir: Path) -> list[dict]:
    path = output_dir / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Final weights and per-step losses of the run nobody kills."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, result = run_training(tmp_path_factory.mktemp("whole"), steps=STEPS, dropout=0.1, checkpoint_every=1)
    torch.set_num_threads(threads)
    return trainable(model), result.losses


def kill_at_random(output_dir: Path, seed: int) -> int:
    """Start the run; SIGKILL it at a seeded-random moment: 0-40 ms after a seeded-random step was logged.

    Returns the number of steps logged before the kill.
    """
    rng = random.Random(seed)
    after_step, delay = rng.randint(1, STEPS - 4), rng.uniform(0.0, 0.04)
    settings = ["--steps", str(STEPS), "--checkpoint-every", "1", "--dropout", "0.1"]
    command = [sys.executable, str(SCRIPT), "--output-dir", str(output_dir), *settings]
    victim = subprocess.Popen(
        command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 240
    while len(logged_steps(output_dir)) < after_step:
        assert victim.poll() is None and time.monotonic() < deadline, "the run ended before the kill"
        time.sleep(0.002)
    time.sleep(delay)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL, "the run finished before the kill"
    return len(logged_steps(output_dir))


def check_kill_and_resume(tmp_path: Path, seed: int, uninterrupted) -> None:
    expected_weights, expected_losses = uninterrupted
    kill_at_random(tmp_path, seed)
    root = checkpoint_root(tmp_path)
    folders = sorted(root.glob("step-*")) if root.is_dir() else []
    assert all(checkpoint_problem(folder) is None for folder in folders), [checkpoint_problem(f) for f in folders]
    last = latest_checkpoint(root)
    model, result = run_training(tmp_path, steps=STEPS, dropout=0.1, checkpoint_every=1, resume=True)
    assert result.start_step == (0 if last is None else int(last.name.split("-")[1]))
    weights = trainable(model)
    assert weights.keys() == expected_weights.keys()
    assert all(torch.equal(weights[name], tensor) for name, tensor in expected_weights.items())
    log = logged_steps(tmp_path)
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in log] == expected_losses


@pytest.mark.parametrize("seed", range(3))
def test_a_run_killed_at_a_random_moment_resumes_to_the_uninterrupted_weights(tmp_path, seed, uninterrupted):
    check_kill_and_resume(tmp_path, seed, uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3, 15))
def test_more_random_kill_moments(tmp_path, seed, uninterrupted):
    check_kill_and_resume(tmp_path, seed, uninterrupted)


def fail_when_writing(monkeypatch, module_attribute: str, step_folder: str) -> None:
    """Make ``slimtune.training.checkpoint.<module_attribute>`` raise ENOSPC for files inside ``step_folder``'s
    temporary folder."""
    owner, _, name = module_attribute.rpartition(".")
    target = slimtune.training.checkpoint
    for part in filter(None, owner.split(".")):
        target = getattr(target, part)
    original = getattr(target, name)

    def full_disk(*args, **kwargs):
        if any(f".{step_folder}.tmp" in str(arg) for arg in args):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, full_disk)


@pytest.mark.parametrize("failing_write", ["safetensors.torch.save_file", "atomic_write_json"])
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_resumable(tmp_path, monkeypatch, failing_write):
    expected, _ = run_training(tmp_path / "whole", steps=6, checkpoint_every=2)
    with monkeypatch.context() as patch:
        fail_when_writing(patch, failing_write, "step-000004")
        with pytest.raises(OSError) as info:
            run_training(tmp_path / "full", steps=6, checkpoint_every=2)
    assert info.value.errno == errno.ENOSPC
    root = checkpoint_root(tmp_path / "full")
    message = str(info.value)
    assert "checkpoint of step 4" in message and "No space left on device" in message
    assert f"the newest complete checkpoint is {root / 'step-000002'}" in message and "resume" in message
    assert sorted(p.name for p in root.iterdir()) == ["step-000002"]
    assert checkpoint_problem(root / "step-000002") is None

    model, result = run_training(tmp_path / "full", steps=6, checkpoint_every=2, resume=True)
    assert result.start_step == 2
    assert all(torch.equal(p, trainable(expected)[n]) for n, p in trainable(model).items())


class Killed(BaseException):
    """Stands for the process dying at this point (not an Exception: nothing may catch it)."""


def test_a_death_while_pruning_an_old_checkpoint_leaves_no_half_step_folder(tmp_path, monkeypatch):
    """Pruning renames a folder away before deleting it, so dying inside the delete leaves only a hidden folder."""
    real_rmtree = slimtune.training.checkpoint.shutil.rmtree

    def dying_rmtree(path, ignore_errors=False):
        files = sorted(Path(path).glob("*")) if Path(path).is_dir() else []
        if files:
            files[0].unlink()
            raise Killed
        real_rmtree(path, ignore_errors=ignore_errors)

    with monkeypatch.context() as patch:
        patch.setattr(slimtune.training.checkpoint.shutil, "rmtree", dying_rmtree)
        with pytest.raises(Killed):
            run_training(tmp_path, steps=6, checkpoint_every=1)  # keeps 2: step 3 prunes step 1
    root = checkpoint_root(tmp_path)
    folders = sorted(root.glob("step-*"))
    assert [f.name for f in folders] == ["step-000002", "step-000003"]
    assert all(checkpoint_problem(folder) is None for folder in folders)
    expected, _ = run_training(tmp_path / "whole", steps=6)
    model, result = run_training(tmp_path, steps=6, checkpoint_every=1, resume=True)
    assert result.start_step == 3 and not list(root.glob(".step-*"))
    assert all(torch.equal(p, trainable(expected)[n]) for n, p in trainable(model).items())


def test_a_death_between_a_step_and_its_checkpoint_leaves_a_gapless_metrics_log(tmp_path, monkeypatch):
    """The step's metrics line is written before its checkpoint; resuming from the previous one drops and redoes it."""
    real_save = slimtune.training.loop.save_checkpoint

    def dying_save(root, step, *args):
        if step == 4:
            raise Killed
        return real_save(root, step, *args)

    with monkeypatch.context() as patch:
        patch.setattr(slimtune.training.loop, "save_checkpoint", dying_save)
        with pytest.raises(Killed):
            run_training(tmp_path, steps=6, checkpoint_every=2)
    assert [record["step"] for record in logged_steps(tmp_path)] == [1, 2, 3, 4]
    _, result = run_training(tmp_path, steps=6, checkpoint_every=2, resume=True)
    assert result.start_step == 2
    assert [record["step"] for record in logged_steps(tmp_path)] == [1, 2, 3, 4, 5, 6]
