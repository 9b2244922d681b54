"""The training and held-out data that ``--data`` / ``--eval-data`` name, with the loss that fits them.

- ``bbc``: the bundled BBC News articles packed into plain token blocks [n, seq_len] (causal-LM loss);
- ``bbc-instruct``: the bundled instruction set made from BBC News (:func:`slimtune.app.instructions.bbc_instructions`:
  "which topic?" and "write a headline" chats), packed examples [n, seq_len, 3] with the loss on answers only;
- a ``.jsonl`` file whose lines hold ``messages`` or ``prompt``/``completion``: chat / instruction examples, as
  ``bbc-instruct``;
- any other ``.txt`` / ``.jsonl`` (``text`` field) / ``.csv`` (``text`` column) file: plain text, as ``bbc``.
"""

from __future__ import annotations

import argparse
from typing import Any, NamedTuple

import torch

from slimtune.errors import ConfigError
from slimtune.training.losses import LossFn, causal_lm_loss, masked_lm_loss

BBC_INSTRUCT = "bbc-instruct"
TEXT_SEQ_LEN, CHAT_SEQ_LEN = 128, 256  # the default --seq-len of each kind of data
TOO_LONG_HELP = "a chat example longer than --seq-len: 'error' (default), 'drop' it, or 'truncate' it (both warn)"
DATA_HELP = (
    "'bbc' (bundled BBC News text, train split), 'bbc-instruct' (chats made from it: topic and headline questions, "
    "loss on answers only), or a file: .txt / .csv / .jsonl of documents ('text'), or .jsonl chats ('messages', or "
    "'prompt' + 'completion'; loss on answers only)"
)


class TrainingData(NamedTuple):
    """Training blocks, held-out blocks (or None) and the loss function that fits them."""

    train: torch.Tensor
    held_out: torch.Tensor | None
    loss_fn: LossFn


def is_chat(data: str) -> bool:
    """Whether ``--data`` names chat / instruction examples (trained with the loss on answers only)."""
    from slimtune.training.chat_data import chat_format

    return data == BBC_INSTRUCT or chat_format(data) is not None


def training_data(args: argparse.Namespace, tokenizer: Any) -> TrainingData:
    """The data of ``--data``, ``--eval-data``, ``--seq-len``, ``--train-blocks``, ``--eval-blocks`` and
    ``--too-long``. Held-out data is ``--eval-data`` when given, else the validation split of ``bbc`` /
    ``bbc-instruct``, else None.

    Raises:
        ConfigError: ``--eval-data`` of the other kind than ``--data`` (chats against plain text).
        DataError: as the readers (:mod:`slimtune.training.data`, :mod:`slimtune.training.chat_data`).
    """
    chat = is_chat(args.data)
    resolve_seq_len(args, chat)
    if args.eval_data and is_chat(args.eval_data) != chat:
        kinds = {True: "chat examples", False: "plain text"}
        raise ConfigError(
            f"eval_data={args.eval_data!r} holds {kinds[not chat]} but data={args.data!r} holds {kinds[chat]}: "
            "held-out data must be of the same kind as the training data"
        )
    train = data_blocks(args, tokenizer, args.data, "train", args.train_blocks)
    if args.eval_data:
        held_out = data_blocks(args, tokenizer, args.eval_data, "validation", args.eval_blocks)
    elif args.data in ("bbc", BBC_INSTRUCT):
        held_out = data_blocks(args, tokenizer, args.data, "validation", args.eval_blocks)
    else:
        held_out = None
    return TrainingData(train, held_out, masked_lm_loss if chat else causal_lm_loss)


def resolve_seq_len(args: argparse.Namespace, chat: bool) -> None:
    """Set ``args.seq_len`` when the user gave none: 128 tokens for text, 256 for chats (every ``bbc-instruct``
    example fits in 192)."""
    if args.seq_len is None:
        args.seq_len = CHAT_SEQ_LEN if chat else TEXT_SEQ_LEN


def data_blocks(args: argparse.Namespace, tokenizer: Any, data: str, split: str, max_blocks: int) -> torch.Tensor:
    """The blocks of ``data`` (see the module docstring; ``split`` picks the bundled sets' split), at most
    ``max_blocks``: [n, seq_len] token ids for text, [n, seq_len, 3] packed examples for chats."""
    from slimtune.app.corpus import lm_blocks
    from slimtune.training.chat_data import chat_blocks
    from slimtune.training.data import load_texts, pack_for_lm

    too_long = getattr(args, "too_long", "error")
    if data == "bbc":
        return lm_blocks(tokenizer, split, args.seq_len, max_blocks)
    if data == BBC_INSTRUCT:
        from slimtune.app.instructions import bbc_instructions

        records = bbc_instructions(split, kind="both")
        return chat_blocks(records, tokenizer, args.seq_len, too_long=too_long, max_blocks=max_blocks)
    if is_chat(data):
        return chat_blocks(data, tokenizer, args.seq_len, too_long=too_long, max_blocks=max_blocks)
    return pack_for_lm(load_texts(data), tokenizer, args.seq_len, max_blocks)
