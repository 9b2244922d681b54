"""Training: the one loop on ``accelerate`` (causal-LM fine-tuning and linear-attention recovery are loss functions
run on it), its checkpoints, data order, metrics log and evaluation, and text data packed into token blocks.

Imports the core (:mod:`slimtune`) and never the application layer (:mod:`slimtune.app`).
"""

from slimtune.training.config import LoopOptions, TrainConfig, TrainLMOptions, TrainResult
from slimtune.training.data import load_texts, pack_for_lm, read_text_file
from slimtune.training.evaluate import evaluate_lm, evaluate_loss
from slimtune.training.loop import cosine_with_warmup, train, train_lm
from slimtune.training.losses import LossFn, causal_lm_loss
from slimtune.training.metrics import METRICS_FILE
from slimtune.training.recovery import attention_mse, attention_transfer, finetune

__all__ = [
    "METRICS_FILE",
    "LoopOptions",
    "LossFn",
    "TrainConfig",
    "TrainLMOptions",
    "TrainResult",
    "attention_mse",
    "attention_transfer",
    "causal_lm_loss",
    "cosine_with_warmup",
    "evaluate_lm",
    "evaluate_loss",
    "finetune",
    "load_texts",
    "pack_for_lm",
    "read_text_file",
    "train",
    "train_lm",
]
