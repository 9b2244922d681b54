"""Gradient checkpointing on SmolLM2-135M: the memory of the tensors one training step creates, and the step time.

LoRA r=8 on all seven projections, batch 2 × 128 BBC News tokens, AdamW. For each setting (checkpointing off,
on) the peak of the tensors created by one forward + backward (activations and temporaries, exactly, by
``TensorMemoryPeak``; weights and optimizer state excluded) and the median step time; then, on their own, the
output head and loss (the 49,152-way logits, forward and backward from detached final hidden states), which
checkpointing does not touch.

Run: ``.venv/bin/python benchmarks/checkpointing.py`` (``--rounds``); writes a JSON record to
``benchmarks/results/`` and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

import slimtune as st
from common import format_table, time_call, write_record
from slimtune.app.corpus import lm_blocks
from slimtune.app.models import load_smollm2
from slimtune.memory import TensorMemoryPeak
from slimtune.training.loop import enable_gradient_checkpointing


def measure(base: torch.nn.Module, batch: torch.Tensor, checkpointing: bool, rounds: int) -> dict[str, object]:
    """Step-created memory peak (MB) and median step time (s) of LoRA r=8 on a copy of ``base``."""
    model = st.get_adapted_model(copy.deepcopy(base), st.LoraConfig(r=8, alpha=16.0)).train()
    if checkpointing:
        enable_gradient_checkpointing(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()

    step()
    with TensorMemoryPeak() as tracker:
        model(input_ids=batch, labels=batch).loss.backward()
    times = [time_call(step) for _ in range(rounds)]
    return {"checkpointing": checkpointing, "step_peak_mb": tracker.peak / 2**20, "step_s": statistics.median(times)}


def head_and_loss_peak(base: torch.nn.Module, batch: torch.Tensor) -> float:
    """MB created by the output head and the loss alone, forward and backward, from the final hidden states."""
    model = st.get_adapted_model(copy.deepcopy(base), st.LoraConfig(r=8, alpha=16.0)).train()
    hidden = model.model(input_ids=batch).last_hidden_state.detach().requires_grad_()
    with TensorMemoryPeak() as tracker:
        logits = model.lm_head(hidden)
        model.loss_function(logits=logits, labels=batch, vocab_size=model.config.vocab_size).backward()
    return tracker.peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per setting (median reported)")
    args = parser.parse_args()
    base, tokenizer = load_smollm2(torch.float32)
    batch = lm_blocks(tokenizer, split="train", seq_len=128, max_blocks=2)
    rows = [measure(base, batch, checkpointing, args.rounds) for checkpointing in (False, True)]
    for row in rows:
        row["peak_vs_off"] = row["step_peak_mb"] / rows[0]["step_peak_mb"]
        row["time_vs_off"] = row["step_s"] / rows[0]["step_s"]
    head = head_and_loss_peak(base, batch)
    print(format_table(rows, ["checkpointing", "step_peak_mb", "peak_vs_off", "step_s", "time_vs_off"]))
    print(f"\noutput head + loss alone: {head:.0f} MB")
    print(f"record: {write_record('checkpointing', {'rows': rows, 'head_and_loss_mb': head})}")


if __name__ == "__main__":
    main()
