"""Held-out loss after the same short fine-tuning of SmolLM2-135M on BBC News text, one row per adapter config.

Every configuration starts from the same pretrained weights, sees the same training blocks in the same order
for the same number of steps (AdamW, cosine schedule with warm-up), and is scored on the same held-out
validation blocks. Presets:

- ``lora-sp``: LoRA vs LoRA-SP at equal rank (r=8) and at an equal trainable count (LoRA-SP r=16 ≈ LoRA r=8).
- ``budget``: accuracy per parameter: LoRA r=8, Bone r=16 and SURM circulant b=96 (about 2.2-2.5M trainable each).

Run: ``.venv/bin/python benchmarks/quality.py --preset lora-sp`` (``--steps``, ``--batch``, ``--seq-len``).
Writes ``benchmarks/results/quality-<preset>-<time>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import math

import torch

import slimtune as st
from common import format_table, write_record
from slimtune.app.corpus import lm_blocks
from slimtune.app.models import load_smollm2
from slimtune.training import evaluate_lm, train_lm

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def presets() -> dict[str, dict[str, tuple[st.AdapterConfig, float]]]:
    """Preset name → {row name: (config, learning rate)}."""
    return {
        "lora-sp": {
            "lora r=8": (st.LoraConfig(r=8, alpha=16, target_modules=TARGETS), 5e-4),
            "lora_sp r=8 (equal rank)": (st.LoraSpConfig(r=8, alpha=16, target_modules=TARGETS), 5e-4),
            "lora_sp r=16 (equal trainable)": (st.LoraSpConfig(r=16, alpha=32, target_modules=TARGETS), 5e-4),
        },
        "budget": {
            "lora r=8": (st.LoraConfig(r=8, alpha=16, target_modules=TARGETS), 5e-4),
            "bone r=16": (st.DishaConfig(r=16, target_modules=TARGETS), 1e-4),
            "surm circulant b=96": (st.SurmConfig(structure="circulant", block_size=96, target_modules=TARGETS), 2e-4),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(presets()), default="lora-sp")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-blocks", type=int, default=32)
    args = parser.parse_args()

    base, tokenizer = load_smollm2(dtype=torch.float32)
    train = lm_blocks(tokenizer, split="train", seq_len=args.seq_len, max_blocks=args.steps * args.batch)
    held_out = lm_blocks(tokenizer, split="validation", seq_len=args.seq_len, max_blocks=args.eval_blocks)
    start_loss = evaluate_lm(base, held_out)
    rows = [
        {
            "config": "pretrained (no training)",
            "trainable": 0,
            "held_out_loss": start_loss,
            "held_out_ppl": math.exp(start_loss),
        }
    ]
    for name, (config, lr) in presets()[args.preset].items():
        torch.manual_seed(0)
        model = st.get_adapted_model(copy.deepcopy(base), config)
        result = train_lm(
            model, train, steps=args.steps, batch_size=args.batch, lr=lr, warmup=max(1, args.steps // 10), desc=name
        )
        loss = evaluate_lm(model, held_out)
        rows.append(
            {
                "config": name,
                "lr": f"{lr:g}",
                "trainable": st.parameter_counts(model).trainable,
                "final_train_loss": sum(result.losses[-5:]) / len(result.losses[-5:]),
                "held_out_loss": loss,
                "held_out_ppl": math.exp(loss),
                "seconds": result.seconds,
                "train_losses": result.losses,
            }
        )
    columns = ["config", "lr", "trainable", "final_train_loss", "held_out_loss", "held_out_ppl", "seconds"]
    print(f"\n## {args.preset}: SmolLM2-135M, BBC News, {args.steps} steps x {args.batch} x {args.seq_len} tokens\n")
    print(format_table(rows, columns))
    print(f"\nrecord: {write_record(f'quality-{args.preset}', {'args': vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()
