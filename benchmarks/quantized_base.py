"""QLoRA-style training on SmolLM2-135M: the same fine-tune on a float32 base and on 4-bit / int8 bases.

Every row trains LoRA r=8 on all seven projections (lr 1e-3, the demo's) on the same BBC News blocks in the same
order (``slimtune.app.compare``, seed 0; 40 steps of batch 2 × 128 by default), then reports:

- ``memory_mb``: total training memory, the stored weights (parameters, buffers and bitsandbytes' block scales)
  + the adapter's gradients and AdamW state + the peak of the tensors one training step creates (activations,
  temporaries and the dequantised weights of 4-bit layers), measured exactly by ``TensorMemoryPeak``;
- ``val_loss``: held-out loss (16 BBC News validation blocks) after training, on the base it trained on;
- ``val_on_float32``: the same adapter loaded onto the float32 base (where it would be merged);
- the median step time.

Rows: ``float32``; ``bf16 + ckpt`` (bfloat16 base and gradient checkpointing, no quantisation: what those two
give alone); ``nf4`` and ``int8`` (linear layers quantised, the rest float32); ``nf4 + bf16 + ckpt`` (QLoRA's
recipe: NF4 layers computing in bfloat16, bfloat16 embeddings and norms, gradient checkpointing).

Run: ``.venv/bin/python benchmarks/quantized_base.py`` (``--steps``, ``--rows``, ``--out``); writes a JSON record
to ``benchmarks/results/`` and prints a table with each row's ratios to the float32 row. ``--merge-check
<out>/nf4/lora/adapter`` measures instead what merging that trained adapter into an NF4 base would keep of its
update (why slimtune refuses the merge).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
from pathlib import Path

import torch

import slimtune as st
from common import format_table, write_record
from slimtune.app.compare import CompareRun, compare, study_config
from slimtune.app.corpus import lm_blocks
from slimtune.app.models import load_smollm2
from slimtune.training.evaluate import evaluate_lm

ROWS = {  # name -> (dtype of the non-quantised weights, quantisation, gradient checkpointing)
    "float32": (torch.float32, None, False),
    "bf16 + ckpt": (torch.bfloat16, None, True),
    "nf4": (torch.float32, "nf4", False),
    "int8": (torch.float32, "int8", False),
    "nf4 + bf16 + ckpt": (torch.bfloat16, "nf4", True),
}


def run_row(name: str, args: argparse.Namespace, float_base: torch.nn.Module) -> dict[str, object]:
    """Train the row's LoRA with ``compare`` and measure it; ``float_base`` is the float32 model."""
    dtype, quantize, checkpointing = ROWS[name]
    model, tokenizer = load_smollm2(dtype, quantize=quantize)
    train_blocks = lm_blocks(tokenizer, split="train", seq_len=args.seq_len, max_blocks=args.steps * args.batch)
    held_out = lm_blocks(tokenizer, split="validation", seq_len=args.seq_len, max_blocks=args.eval_blocks)
    config = dataclasses.replace(
        study_config(args.steps, args.batch, evaluations=2, progress=False), gradient_checkpointing=checkpointing
    )
    run = CompareRun("lora", st.LoraConfig(r=8, alpha=16.0), lr=1e-3)
    record = compare(model, [run], train_blocks, held_out, config, Path(args.out) / name.replace(" ", ""))
    row = record["rows"][0]
    on_float = st.load_adapter(copy.deepcopy(float_base), row["adapter"])
    return {
        "row": name,
        "memory_mb": row["peak_bytes"] / 2**20,
        "val_loss": row["eval_loss"],
        "val_on_float32": evaluate_lm(on_float, held_out),
        "base_val_loss": record["base_eval_loss"],
        "step_s": row["step_seconds_median"],
        "trainable": row["trainable"],
    }


def requantised_merge(float_base: torch.nn.Module, adapter: str) -> dict[str, object]:
    """What merging into an NF4 base would keep of a trained update: for every 10th adapted layer, the update that
    survives requantisation, Q(W + ΔW) − Q(W), against ΔW (cosine, and error relative to |ΔW|)."""
    import bitsandbytes.functional as bnb_functional

    def nf4(weight: torch.Tensor) -> torch.Tensor:
        packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
        return bnb_functional.dequantize_4bit(packed, state)

    model = st.load_adapter(copy.deepcopy(float_base), adapter)
    cosines, errors = [], []
    for _, layer in list(st.adapted_layers(model))[::10]:
        weight = layer.base_weight().detach()
        delta = layer.adapter("default").delta_weight(weight).detach()
        kept = nf4(weight + delta) - nf4(weight)
        cosines.append(float(torch.nn.functional.cosine_similarity(kept.flatten(), delta.flatten(), dim=0)))
        errors.append(float((kept - delta).norm() / delta.norm()))
    return {
        "layers": len(cosines),
        "median_cosine": statistics.median(cosines),
        "median_error": statistics.median(errors),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-blocks", type=int, default=16)
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="default: all")
    parser.add_argument("--out", default="runs/quantized_base")
    merge_help = "only measure what a merge into an NF4 base keeps of this trained adapter's update"
    parser.add_argument("--merge-check", metavar="ADAPTER", default=None, help=merge_help)
    args = parser.parse_args()

    float_base, _ = load_smollm2(torch.float32)
    if args.merge_check:
        result = requantised_merge(float_base, args.merge_check)
        print(result, f"\nrecord: {write_record('quantized-merge', {'adapter': args.merge_check, **result})}")
        return
    rows = [run_row(name, args, float_base) for name in args.rows]
    reference = next((row for row in rows if row["row"] == "float32"), None)
    for row in rows:
        if reference is not None:
            row["memory_vs_float32"] = row["memory_mb"] / reference["memory_mb"]
            row["time_vs_float32"] = row["step_s"] / reference["step_s"]
            row["val_loss_minus_float32"] = row["val_loss"] - reference["val_loss"]
    columns = ["row", "memory_mb", "memory_vs_float32", "step_s", "time_vs_float32", "val_loss"]
    print(f"\n## LoRA r=8 on SmolLM2-135M, {args.steps} steps of {args.batch} x {args.seq_len}\n")
    print(format_table(rows, [*columns, "val_loss_minus_float32", "val_on_float32", "base_val_loss"]))
    print(f"\nrecord: {write_record('quantized-base', {'args': vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()
