"""Long-context evaluation of SmolLM2-135M in four rows, in the same process:

- original: softmax attention (the ceiling);
- window + sinks only: the hybrid with its linear branch off, so each query reads only its last ``--window`` keys
  and the first ``--sinks`` keys with softmax weights;
- hybrid: the same softmax window and sinks, plus older keys through the DiJiang feature map;
- pure linear: DiJiang linear attention, no window.

Each row gets passkey retrieval (``slimtune.training.long_context.passkey_accuracy``: ``--lengths`` × ``--depths`` ×
``--keys`` prompts, accuracy over needles inside and outside the last ``--window`` prompt tokens, and "key": the key's
digits with the answer's leading space given), the next-token loss by position bucket (0-64, 64-256, 256-1k, 1k-2k,
2k-4k) over ``--position-blocks`` blocks of BBC News test articles (joined by EOS) of the longest bucket's length, and
the cache bytes and seconds of one prefill of ``--prefill-length`` tokens (8k; after a 64-token warm-up prefill).

The linear rows are untrained conversions by default (``LinearizeConfig(window=64, sink_tokens=4)`` and
``LinearizeConfig()``): recovery training is out of scope here, so the pure row is near chance. ``--hybrid DIR`` and
``--pure DIR`` load trained ones (folders of ``save_linearized``, e.g. ``slimtune linearize``'s
``<output>/linear_attention``); the window-only row uses the hybrid's folder. The library has no switch for the
linear branch (``LinearizeConfig.window_mix`` must be > 0): the window-only row sets every layer's learned log g to
−inf (g = 0) with ``linear_part_off`` of ``benchmarks/linear_attention.py``, as that benchmark's ablation does.

Run: ``.venv/bin/python benchmarks/long_context.py --threads 1`` (the full grid, 300 prompts per row up to 4k
tokens: hours on 2 CPU cores) or ``--quick`` (it replaces the grid by lengths 256 and 512, depths 0.5 and 0.9, 2 keys,
one 256-token block and a prefill of 1024 tokens: a few minutes). Writes ``benchmarks/results/long-context-*.json``.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from common import format_table, write_record
from linear_attention import linear_part_off
from slimtune.app.corpus import lm_blocks
from slimtune.app.models import load_smollm2, load_smollm2_tokenizer
from slimtune.linear_attention import (
    LinearizeConfig,
    linear_attention_layers,
    linearize,
    linearize_config,
    load_linearized,
)
from slimtune.training.long_context import BUCKETS, passkey_accuracy, position_losses, prefill_cost

ROWS = ("original", "window + sinks only", "hybrid", "pure linear")


@contextlib.contextmanager
def row_model(row: str, args: argparse.Namespace) -> Iterator[tuple[Any, Any]]:
    """SmolLM2 (float32) as ``row`` asks: original, converted (or loaded from --hybrid / --pure), linear part off."""
    model, tokenizer = load_smollm2(dtype=torch.float32)
    pure = row == "pure linear"
    folder = args.pure if pure else args.hybrid
    if row == "original":
        yield model, tokenizer
        return
    if folder:
        load_linearized(model, folder)
    else:
        linearize(model, LinearizeConfig() if pure else LinearizeConfig(window=args.window, sink_tokens=args.sinks))
    config = linearize_config(model)
    if not pure and not config.window:
        raise SystemExit(f"--hybrid {folder} holds a conversion without a softmax window (window=0): not a hybrid")
    if row == "window + sinks only":
        with linear_part_off(model):
            yield model, tokenizer
    else:
        yield model, tokenizer


def measure(row: str, args: argparse.Namespace, blocks: torch.Tensor) -> tuple[dict, list[dict]]:
    """(summary row, passkey cells) of one row."""
    with row_model(row, args) as (model, tokenizer):
        return measure_model(row, model, tokenizer, args, blocks)


def measure_model(
    row: str, model: Any, tokenizer: Any, args: argparse.Namespace, blocks: torch.Tensor
) -> tuple[dict, list[dict]]:
    """(summary row, passkey cells) of ``model``: passkey over args.lengths × depths × keys (split at args.window),
    the loss by position bucket over ``blocks``, the cache bytes and seconds of an args.prefill_length prefill."""
    passkey = passkey_accuracy(model, tokenizer, args.lengths, args.depths, args.keys, window=args.window)
    losses = position_losses(model, blocks)
    prefill_cost(model, 64)  # warm-up
    seconds, cache = prefill_cost(model, args.prefill_length)
    linearised = next(linear_attention_layers(model), None) is not None
    config = linearize_config(model).to_dict() if linearised else None
    summary = {
        "row": row,
        "passkey": passkey.accuracy,
        "inside": passkey.accuracy_inside,
        "outside": passkey.accuracy_outside,
        "key": passkey.key_accuracy,
        **{f"loss {label}": loss for label, loss in losses.items()},
        f"cache MiB @{args.prefill_length}": cache / 2**20,
        f"prefill s @{args.prefill_length}": seconds,
    }
    print(summary, flush=True)
    cells = [{"row": row, **cell} for cell in passkey.to_dict()["cells"]]
    return {**summary, "linearize_config": config}, cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    parser.add_argument("--keys", type=int, default=20, help="passkey prompts per (length, depth)")
    parser.add_argument("--window", type=int, default=64, help="softmax window of the hybrid rows and of the split")
    parser.add_argument("--sinks", type=int, default=4, help="sink tokens of the hybrid rows")
    parser.add_argument("--hybrid", default=None, help="load the hybrid from this save_linearized folder")
    parser.add_argument("--pure", default=None, help="load the pure linear model from this save_linearized folder")
    parser.add_argument("--position-length", type=int, default=max(hi for _, hi in BUCKETS))
    parser.add_argument("--position-blocks", type=int, default=4, help="BBC News test blocks for the position loss")
    parser.add_argument("--prefill-length", type=int, default=8192)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS, help="rows to run")
    parser.add_argument("--quick", action="store_true", help="a few minutes: tiny grid (see the description)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.depths, args.keys = [256, 512], [0.5, 0.9], 2
        args.position_length, args.position_blocks, args.prefill_length = 256, 1, 1024
    if args.threads:
        torch.set_num_threads(args.threads)
    blocks = lm_blocks(load_smollm2_tokenizer(), "test", seq_len=args.position_length, max_blocks=args.position_blocks)
    summaries, cells = [], []
    for row in args.rows:
        summary, row_cells = measure(row, args, blocks)
        summaries.append(summary)
        cells += row_cells
    threads = torch.get_num_threads()
    print(f"\n## SmolLM2-135M, fp32, {threads} thread(s); passkey inside / outside the last {args.window} tokens\n")
    print(format_table(summaries, [key for key in summaries[0] if key != "linearize_config"]))
    print("\n## passkey accuracy by cell\n")
    print(format_table(cells, ["row", "length", "depth", "keys", "accuracy", "log_likelihood", "inside"]))
    record = {"args": vars(args), "rows": summaries, "cells": cells, "blocks": list(blocks.shape)}
    print(f"\nrecord: {write_record('long-context', record)}")


if __name__ == "__main__":
    main()
