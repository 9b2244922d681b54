"""Training: the one loop on ``accelerate`` (causal-LM fine-tuning, chat fine-tuning with the loss on answers only,
sequence classification and linear-attention recovery are loss functions run on it), its checkpoints, data order,
metrics log and evaluation (with the ranking of linearised layers for a layer-selective hybrid), text packed into
token blocks, chat / instruction examples packed without leaking across examples, and labelled texts encoded as
classification examples.

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
from slimtune.training.classification import (
    ClassificationMetrics,
    classification_loss,
    encode_classification,
    evaluate_classifier,
    k_shot,
    macro_f1,
    predict,
)
from slimtune.training.config import LoopOptions, TrainConfig, TrainLMOptions, TrainResult
from slimtune.training.data import Example, load_texts, pack_examples, pack_for_lm, read_text_file
from slimtune.training.distillation import distillation_loss
from slimtune.training.evaluate import evaluate_lm, evaluate_loss
from slimtune.training.layer_ranking import (
    LayerRank,
    greedy_candidates,
    greedy_evaluations,
    lm_loss_criterion,
    passkey_loss_criterion,
    rank_softmax_layers,
    rank_softmax_layers_by,
    rank_softmax_layers_for_retrieval,
    select_softmax_layers_greedy,
    top_softmax_layers,
)
from slimtune.training.long_context import (
    PasskeyCell,
    PasskeyPrompt,
    PasskeyResult,
    passkey_accuracy,
    passkey_prompt,
    position_losses,
    prefill_cost,
)
from slimtune.training.loop import cosine_with_warmup, train, train_lm
from slimtune.training.losses import LossFn, answer_token_count, causal_lm_loss, loss_weight, masked_lm_loss
from slimtune.training.metrics import METRICS_FILE
from slimtune.training.recovery import attention_mse, attention_transfer, finetune

__all__ = [
    "METRICS_FILE",
    "ClassificationMetrics",
    "Example",
    "LayerRank",
    "LoopOptions",
    "LossFn",
    "PasskeyCell",
    "PasskeyPrompt",
    "PasskeyResult",
    "TrainConfig",
    "TrainLMOptions",
    "TrainResult",
    "answer_token_count",
    "attention_mse",
    "attention_transfer",
    "causal_lm_loss",
    "chat_blocks",
    "chat_format",
    "classification_loss",
    "cosine_with_warmup",
    "distillation_loss",
    "encode_classification",
    "encode_examples",
    "evaluate_classifier",
    "evaluate_lm",
    "evaluate_loss",
    "finetune",
    "greedy_candidates",
    "greedy_evaluations",
    "k_shot",
    "lm_loss_criterion",
    "load_texts",
    "loss_weight",
    "macro_f1",
    "masked_lm_loss",
    "pack_examples",
    "pack_for_lm",
    "packing_leak",
    "passkey_accuracy",
    "passkey_loss_criterion",
    "passkey_prompt",
    "position_losses",
    "predict",
    "prefill_cost",
    "rank_softmax_layers",
    "rank_softmax_layers_by",
    "rank_softmax_layers_for_retrieval",
    "read_chat_jsonl",
    "read_text_file",
    "select_softmax_layers_greedy",
    "top_softmax_layers",
    "train",
    "train_lm",
    "write_chat_jsonl",
]
