"""Recovery-trained rows of the long-context table: each row converts SmolLM2-135M, trains it with one recipe on the
same BBC News blocks, and is measured as ``benchmarks/long_context.py`` measures (passkey inside / outside the
window, loss by position bucket, cache bytes and prefill seconds at ``--prefill-length``), all in one process.

Rows (``--rows``):

- original: softmax attention, untrained (the ceiling);
- original, fine-tuned: softmax attention with the LM fine-tuning of the other rows (LoRA alone): what the recipe
  itself does to perplexity and retrieval;
- window + sinks only: the hybrid (``--window``, ``--sinks``) with its linear branch off (g = 0) in training and
  evaluation; LM fine-tuning trains the LoRA adapter alone (the linear parameters are unused);
- hybrid: attention transfer (``--transfer-steps`` over the first ``--transfer-blocks`` training blocks, with cached
  teacher tensors, compared after or before the output projection, ``--transfer-compare``), then LM fine-tuning of
  LoRA and the linear-attention parameters with scheduled window dropout ``--window-dropout``;
- hybrid, no window dropout: the same, p0 = 0 (the ablation of the dropout);
- pure linear: no window; attention transfer, then LM fine-tuning of LoRA and the linear parameters;
- layer-selective: the hybrid with the layers of ``--softmax-layers`` kept softmax (``slimtune linearize
  --rank-layers K`` ranks them), trained as the hybrid;
- layer-selective, linear branch off: the same layers softmax, the others window + sinks only (g = 0), trained as
  the window-only row (the ablation of the linear branch in a layer-selective model).

Every trained row gets the same steps, batch, learning rates, LoRA (r = ``--lora-r`` on every projection, seed 0;
``--lora-r 0``: no LoRA, the linear parameters alone) and blocks of ``--seq-len`` tokens; ``--finetune-steps 0`` stops
after the attention transfer; ``--distill`` fine-tunes on the KL to the original model's next-token distributions
(``slimtune.training.distillation_loss``) instead of the LM loss. The feature map is ``LinearizeConfig``'s default
unless ``--feature-map``.

Run: ``.venv/bin/python benchmarks/long_context_recovery.py --softmax-layers 3 7 ...`` (see ``--help``). Writes
``benchmarks/results/long-context-recovery-*.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from collections.abc import Iterator

import torch

import slimtune as st
from common import format_table, write_record
from linear_attention import LORA_TARGETS, linear_part_off
from long_context import measure_model
from slimtune.app.corpus import lm_blocks
from slimtune.app.models import load_smollm2, load_smollm2_tokenizer
from slimtune.linear_attention import LinearizeConfig, linearize
from slimtune.training import causal_lm_loss, distillation_loss, evaluate_lm
from slimtune.training.recovery import attention_transfer, finetune

ROWS = (
    "original",
    "original, fine-tuned",
    "window + sinks only",
    "hybrid",
    "hybrid, no window dropout",
    "pure linear",
    "layer-selective",
    "layer-selective, linear branch off",
)
WINDOW_ONLY = ("window + sinks only", "layer-selective, linear branch off")  # rows with the linear branch off


def conversion(row: str, args: argparse.Namespace) -> LinearizeConfig | None:
    """The LinearizeConfig of ``row`` (None for the original)."""
    common = {"feature_map": args.feature_map, "m": args.m}
    if row.startswith("original"):
        return None
    if row == "pure linear":
        return LinearizeConfig(**common)
    selective = args.softmax_layers if row.startswith("layer-selective") else None
    return LinearizeConfig(window=args.window, sink_tokens=args.sinks, softmax_layers=selective, **common)


@contextlib.contextmanager
def branch(row: str, model: torch.nn.Module) -> Iterator[None]:
    """The linear branch off for the window-only rows, as it is for the others."""
    if row in WINDOW_ONLY:
        with linear_part_off(model):
            yield
    else:
        yield


def train(row: str, model: torch.nn.Module, blocks: torch.Tensor, args: argparse.Namespace) -> dict:
    """Recover ``model`` as ``row`` prescribes; returns the stages' seconds and tokens."""
    start = time.perf_counter()
    record: dict = {}
    linearised = not row.startswith("original")
    if linearised and row not in WINDOW_ONLY and args.transfer_steps:
        transfer_blocks = blocks[: args.transfer_blocks]  # cached teacher tensors: 180 KiB a token
        transfer = attention_transfer(
            model,
            transfer_blocks,
            steps=args.transfer_steps,
            batch_size=args.batch,
            lr=args.transfer_lr,
            warmup=2,
            compare=args.transfer_compare,
        )
        record |= {"transfer_s": transfer.seconds, "transfer_tokens": transfer.tokens, "transfer_mse": transfer.losses}
    adapter = st.LoraConfig(r=args.lora_r, alpha=2 * args.lora_r, target_modules=LORA_TARGETS) if args.lora_r else None
    train_linear = linearised and row not in WINDOW_ONLY
    if not args.finetune_steps or (adapter is None and not train_linear):  # nothing (more) to train
        return record | {"seconds": time.perf_counter() - start}
    dropout = args.window_dropout if row in ("hybrid", "layer-selective") else 0.0
    loss_fn = distillation_loss(None) if args.distill else causal_lm_loss  # the original, from the model's weights
    torch.manual_seed(0)
    with branch(row, model):
        _, tuned = finetune(
            model,
            blocks,
            steps=args.finetune_steps,
            batch_size=args.batch,
            lr=args.finetune_lr,
            adapter=adapter,
            train_linear_attention=train_linear,
            warmup=max(1, args.finetune_steps // 10),
            window_dropout=dropout,
            loss_fn=loss_fn,
        )
    return record | {
        "finetune_s": tuned.seconds,
        "finetune_tokens": tuned.tokens,
        "seconds": time.perf_counter() - start,
    }


def run_row(row: str, args: argparse.Namespace, data: dict[str, torch.Tensor]) -> tuple[dict, list[dict]]:
    model, tokenizer = load_smollm2(dtype=torch.float32)
    config = conversion(row, args)
    training: dict = {}
    if config is not None:
        torch.manual_seed(0)
        linearize(model, config)
    if row != "original":
        training = train(row, model, data["train"], args)
    model.eval()
    with branch(row, model):
        held_out = evaluate_lm(model, data["held_out"])
        summary, cells = measure_model(row, model, tokenizer, args, data["position"])
    print(f"{row}: held-out perplexity {math.exp(held_out):.2f}, training {training}", flush=True)
    return {**summary, "held-out ppl": math.exp(held_out), "training": training}, cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--feature-map", default="dijiang")
    parser.add_argument("--m", type=int, default=None)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--softmax-layers", type=int, nargs="+", default=None, help="for the layer-selective row")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per training block")
    parser.add_argument("--held-out-len", type=int, default=None, help="tokens per held-out block (--seq-len)")
    parser.add_argument("--train-blocks", type=int, default=64)
    parser.add_argument("--held-out-blocks", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--transfer-steps", type=int, default=30)
    parser.add_argument("--transfer-blocks", type=int, default=8, help="the first training blocks, cycled")
    parser.add_argument("--transfer-lr", type=float, default=2e-2)
    parser.add_argument("--transfer-compare", default="output", choices=["output", "attention"])
    parser.add_argument("--finetune-steps", type=int, default=30)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument(
        "--distill", action="store_true", help="fine-tune on the KL to the original's logits, not the LM loss"
    )
    parser.add_argument("--window-dropout", type=float, default=0.5, help="p0 of the hybrid rows")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    parser.add_argument("--keys", type=int, default=5)
    parser.add_argument("--position-length", type=int, default=2048)
    parser.add_argument("--position-blocks", type=int, default=1)
    parser.add_argument("--prefill-length", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if any(row.startswith("layer-selective") for row in args.rows) and not args.softmax_layers:
        parser.error("the layer-selective row needs --softmax-layers (rank them with slimtune linearize --rank-layers)")
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_smollm2_tokenizer()
    data = {
        "train": lm_blocks(tokenizer, "train", args.seq_len, args.train_blocks),
        "held_out": lm_blocks(tokenizer, "validation", args.held_out_len or args.seq_len, args.held_out_blocks),
        "position": lm_blocks(tokenizer, "test", args.position_length, args.position_blocks),
    }
    summaries: list[dict] = []
    cells: list[dict] = []
    path = None
    for row in args.rows:
        summary, row_cells = run_row(row, args, data)
        summaries.append(summary)
        cells += row_cells
        # rewritten after every row: a run stopped part-way keeps the rows it finished
        path = write_record("long-context-recovery", {"args": vars(args), "rows": summaries, "cells": cells}, path)
    columns = [key for key in summaries[0] if key not in ("linearize_config", "training")]
    print(f"\n## SmolLM2-135M, fp32, {torch.get_num_threads()} thread(s), recovery on {args.seq_len}-token blocks\n")
    print(format_table(summaries, columns))
    print(f"\nrecord: {path}")


if __name__ == "__main__":
    main()
