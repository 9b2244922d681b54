"""Slow study on the real model (``make test-slow``): LoRA, Bone and Bat-Row all learn BBC News text.

The full study with its learning-rate sweep is ``benchmarks/convergence.py``; this is its smallest form, run as a
test so that a regression that stops any of the three from learning on the real model is caught.
"""

from __future__ import annotations

import pytest
import torch

import slimtune as st
from slimtune.app.compare import CompareRun, compare
from slimtune.app.corpus import lm_blocks
from slimtune.app.models import load_smollm2
from slimtune.training import TrainConfig


@pytest.mark.slow
def test_lora_bone_and_bat_row_lower_the_held_out_loss_of_smollm2(tmp_path):
    model, tokenizer = load_smollm2(dtype=torch.float32)
    train_blocks = lm_blocks(tokenizer, split="train", seq_len=64, max_blocks=16)
    held_out = lm_blocks(tokenizer, split="validation", seq_len=64, max_blocks=8)
    runs = [
        CompareRun("lora", st.LoraConfig(r=8, alpha=16.0), lr=3e-3),
        CompareRun("bone", st.DishaConfig(r=16, variant="bone"), lr=1e-3),
        CompareRun("bat_row", st.DishaConfig(r=16, variant="bat_row"), lr=1e-3),
    ]
    config = TrainConfig(steps=8, batch_size=2, warmup=1, seed=0, eval_every=8, progress=False)
    record = compare(model, runs, train_blocks, held_out, config, tmp_path)
    for row in record["rows"]:
        assert row["eval_loss"] < record["base_eval_loss"] - 0.05, row["label"]
    assert (tmp_path / "loss_curves.png").is_file()
