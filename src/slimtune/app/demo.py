"""`make demo`: five adapter methods on the real SmolLM2-135M with BBC News text, then the best one merged.

1. Load SmolLM2-135M-Instruct (converted once from the bundled GGUF file, then cached) and pack BBC News
   training and validation articles into 128-token blocks.
2. :func:`slimtune.app.compare.compare` LoRA, Bone, Bat-Row, SURM circulant and LoRA-SP, each with 2.2M–2.5M
   trainable parameters on all seven projections of every layer, for the same ``--steps`` AdamW steps on the
   same blocks in the same order, each at the best learning rate of its sweep in ``benchmarks/convergence.py`` at
   these 20 steps (so the table reproduces that study's best runs); print the table; write
   ``<out>/loss_curves.png`` (per-batch and smoothed training loss, held-out loss) and ``<out>/compare.json``.
3. Load the adapter with the lowest validation loss into a fresh copy of the model, merge it into the weights
   and generate greedily, beside the base model's generation of the same prompt.

Run ``python -m slimtune.app.demo --help`` for the options.
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch
from accelerate import Accelerator

from slimtune.app.compare import DEFAULT_RUNS, best_run, compare, format_table, study_config
from slimtune.app.corpus import lm_blocks
from slimtune.app.launch import describe_processes
from slimtune.app.models import load_smollm2, smollm2_cache_folder
from slimtune.inject import merge_and_unload
from slimtune.serialization import load_adapter

PROMPT = "The government said"
DEMO_STEPS = 20  # the learning rates of DEFAULT_RUNS are the convergence study's best at this many steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=DEMO_STEPS, help=f"AdamW steps per method (default: {DEMO_STEPS})")
    parser.add_argument("--batch-size", type=int, default=2, help="blocks per step (default: 2)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per block (default: 128)")
    parser.add_argument("--eval-blocks", type=int, default=16, help="validation blocks (default: 16)")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=[run.label for run in DEFAULT_RUNS],
        default=[run.label for run in DEFAULT_RUNS],
        help="which of the five to run (default: all)",
    )
    parser.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    print(f"slimtune demo: {describe_processes(Accelerator())}, {torch.get_num_threads()} threads")
    model, tokenizer = load_smollm2(dtype=torch.float32)
    train_blocks = lm_blocks(tokenizer, split="train", seq_len=args.seq_len, max_blocks=args.steps * args.batch_size)
    held_out = lm_blocks(tokenizer, split="validation", seq_len=args.seq_len, max_blocks=args.eval_blocks)
    print(
        f"SmolLM2-135M-Instruct ({next(model.parameters()).dtype} weights, from {smollm2_cache_folder()}) and BBC "
        f"News ready in {time.perf_counter() - start:.1f} s: {len(train_blocks)} training and {len(held_out)} "
        f"validation blocks of {args.seq_len} tokens"
    )
    if args.steps == DEMO_STEPS:
        print(f"learning rates: the best of each method's sweep in benchmarks/convergence.py at {DEMO_STEPS} steps")

    config = study_config(args.steps, args.batch_size, evaluations=2)
    runs = [run for run in DEFAULT_RUNS if run.label in args.methods]
    record = compare(model, runs, train_blocks, held_out, config, args.out, model_name="SmolLM2-135M-Instruct")
    print(f"\n## {args.steps} steps of {args.batch_size} x {args.seq_len} tokens per method\n")
    print(format_table(record))
    print(f"\nloss curves: {args.out}/loss_curves.png; record: {args.out}/compare.json")

    best = best_run(record)
    merged = merge_and_unload(load_adapter(copy.deepcopy(model), best["adapter"]))
    print(
        f"\nbest validation loss: {best['label']} ({best['eval_loss']:.4f}, "
        f"perplexity {math.exp(best['eval_loss']):.2f} vs {math.exp(record['base_eval_loss']):.2f} before); "
        "merged into the weights"
    )
    for name, generator in (("base model", model), (f"merged {best['label']}", merged)):
        print(f"{name:>20}: {generate(generator, tokenizer, PROMPT)!r}")
    print(f"\ndemo finished in {time.perf_counter() - start:.1f} s")


def generate(model: torch.nn.Module, tokenizer: object, prompt: str, new_tokens: int = 24) -> str:
    """Greedy continuation of ``prompt``."""
    inputs = tokenizer(prompt, return_tensors="pt")
    model.eval()
    output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(output[0], skip_special_tokens=True)


if __name__ == "__main__":
    main()
