"""``slimtune eval --task passkey`` and ``--task position-loss``: long-context evaluation of the loaded model (the
original, or after ``--linear-attention`` / ``--adapter``) with :mod:`slimtune.training.long_context`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from slimtune.app.data_options import data_blocks, is_chat
from slimtune.config import check_int
from slimtune.errors import ConfigError
from slimtune.training.long_context import BUCKETS, check_context, passkey_accuracy, position_losses

LONGEST_BUCKET = max(hi for _, hi in BUCKETS)


def cmd_long_context(args: argparse.Namespace, model: Any, tokenizer: Any, report: dict[str, Any]) -> int:
    """Run ``args.task`` ("passkey" or "position-loss") on ``model``; print ``report`` with its results as one JSON
    line."""
    if args.task == "passkey":
        check_int("keys", args.keys)  # the flag's name; the library calls it keys_per_cell
        window = args.window if args.window is not None else _linear_window(model)
        result = passkey_accuracy(model, tokenizer, args.lengths, args.depths, args.keys, window=window)
        report.update(result.to_dict(), lengths=args.lengths, depths=args.depths, keys=args.keys, seed=0)
    else:
        if is_chat(args.data):
            raise ConfigError(
                f"data={args.data!r} holds chat examples: --task position-loss reads long documents, expected 'bbc' "
                "or a plain-text file"
            )
        if args.seq_len is None:
            args.seq_len = LONGEST_BUCKET
        check_context(model, "--seq-len", args.seq_len)
        blocks = data_blocks(args, tokenizer, args.data, args.split, args.max_blocks)
        losses = position_losses(model, blocks)
        report.update(losses=losses, blocks=len(blocks), seq_len=args.seq_len, data=args.data, split=args.split)
    print(json.dumps(report))
    return 0


def _linear_window(model: Any) -> int | None:
    """The softmax window of a linearised hybrid model; None for any other model."""
    from slimtune.linear_attention import linear_attention_layers, linearize_config

    if next(linear_attention_layers(model), None) is None:
        return None
    return linearize_config(model).window or None
