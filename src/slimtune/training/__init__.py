"""Training: the one loop on ``accelerate`` (causal-LM fine-tuning, chat fine-tuning with the loss on answers only,
and linear-attention recovery are loss functions run on it), its checkpoints, data order, metrics log and
evaluation, text packed into token blocks and chat / instruction examples packed without leaking across examples.

Imports the core (:mod:`slimtune`) and never the application layer (:mod:`slimtune.app`).
"""

from slimtune.training.chat_data import (
    chat_blocks,
    chat_format,
    encode_examples,
    packing_leak,
    read_chat_jsonl,
    write_chat_jsonl,
)
from slimtune.training.config import LoopOptions, TrainConfig, TrainLMOptions, TrainResult
from slimtune.training.data import Example, load_texts, pack_examples, pack_for_lm, read_text_file
from slimtune.training.evaluate import evaluate_lm, evaluate_loss
from slimtune.training.loop import cosine_with_warmup, train, train_lm
from slimtune.training.losses import LossFn, answer_token_count, causal_lm_loss, loss_weight, masked_lm_loss
from slimtune.training.metrics import METRICS_FILE
from slimtune.training.recovery import attention_mse, attention_transfer, finetune

__all__ = [
    "METRICS_FILE",
    "Example",
    "LoopOptions",
    "LossFn",
    "TrainConfig",
    "TrainLMOptions",
    "TrainResult",
    "answer_token_count",
    "attention_mse",
    "attention_transfer",
    "causal_lm_loss",
    "chat_blocks",
    "chat_format",
    "cosine_with_warmup",
    "encode_examples",
    "evaluate_lm",
    "evaluate_loss",
    "finetune",
    "load_texts",
    "loss_weight",
    "masked_lm_loss",
    "pack_examples",
    "pack_for_lm",
    "packing_leak",
    "read_chat_jsonl",
    "read_text_file",
    "train",
    "train_lm",
    "write_chat_jsonl",
]
