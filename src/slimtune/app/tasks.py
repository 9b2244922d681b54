"""Evaluation tasks on the bundled BBC News corpus: zero-shot topic classification by a causal LM."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimtune.errors import ConfigError
from slimtune.training.evaluate import model_device


@torch.no_grad()
def topic_accuracy(
    model: nn.Module, tokenizer: Any, examples: list[tuple[str, int]], names: list[str], prompt_tokens: int = 96
) -> float:
    """Zero-shot accuracy of a causal LM on ``examples`` (text, label index into ``names``).

    The prompt is the text's first ``prompt_tokens`` tokens and ``"\\nTopic:"``; the prediction is the name whose
    continuation ``" " + name`` has the highest summed log-probability (all names scored in one batch).
    """
    if not examples:
        raise ConfigError("examples is empty: expected at least one (text, label) pair")
    was_training = model.training
    model.eval()
    candidates = [tokenizer(" " + name, add_special_tokens=False)["input_ids"] for name in names]
    width = max(map(len, candidates))
    correct = 0
    for text, label in examples:
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"][:prompt_tokens]
        prompt += tokenizer("\nTopic:", add_special_tokens=False)["input_ids"]
        rows = [prompt + ids + [tokenizer.eos_token_id] * (width - len(ids)) for ids in candidates]
        logprobs = model(input_ids=torch.tensor(rows, device=model_device(model))).logits.log_softmax(
            -1
        )  # [names, T, vocab]
        scores = [
            sum(logprobs[i, len(prompt) + j - 1, token].item() for j, token in enumerate(ids))
            for i, ids in enumerate(candidates)
        ]
        correct += int(max(range(len(names)), key=scores.__getitem__) == label)
    model.train(was_training)
    return correct / len(examples)
