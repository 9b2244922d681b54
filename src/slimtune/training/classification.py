"""Sequence classification on the one training loop: the example format, the loss, predictions and metrics.

Example format: an int64 tensor [n, T, 2]. Channel 0 holds the input ids, padded on the right; channel 1 holds
label + 1 on every attended (real) token of the example and 0 on its padding. So the attention mask is
``examples[..., 1] > 0`` and the labels are ``examples[:, 0, 1] - 1`` (the first token is always attended).
One self-contained tensor, whose dims 0 and 1 mean what they mean in token blocks [n, T] (examples, tokens),
is what the loop can slice into batches, shard over processes and find again on resume, as it does token
blocks; :func:`slimtune.training.evaluate.check_blocks` checks it. Training is the one loop with this loss::

    train(model, encode_classification(texts, labels, tokenizer), config, eval_examples, loss_fn=classification_loss)

``model`` is a Hugging Face ``*ForSequenceClassification`` model (logits [B, num_labels]); every example weighs
the same (the loss is the mean over examples, :func:`slimtune.training.losses.loss_weight`'s default).
:func:`evaluate_classifier` gives accuracy, macro-F1, the mean loss and the confusion matrix; :func:`k_shot`
draws a few examples per class for few-shot training.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.config import check_int
from slimtune.errors import ConfigError
from slimtune.training.evaluate import check_blocks, model_device


def encode_classification(
    texts: Sequence[str], labels: Sequence[int], tokenizer: Any, max_len: int = 128
) -> torch.Tensor:
    """Classification examples [n, T, 2] (int64) of ``texts`` and their ``labels`` (see the module docstring).

    Each text is tokenised with the tokenizer's special tokens and truncated to ``max_len`` tokens; T is the
    longest encoding. Padding uses the tokenizer's pad token, else its EOS token, else id 0.

    Raises:
        ConfigError: ``max_len`` < 1; no texts; not as many labels as texts; a label not an integer >= 0;
            an empty text, or one that gives no token (the message names its index).
    """
    check_int("max_len", max_len)
    texts, labels = list(texts), list(labels)
    if len(texts) != len(labels):
        raise ConfigError(f"got {len(texts)} texts and {len(labels)} labels: expected one label per text")
    if not texts:
        raise ConfigError("encode_classification got no texts: expected at least one (text, label) pair")
    for index, label in enumerate(labels):
        if isinstance(label, bool) or not isinstance(label, numbers.Integral) or label < 0:
            raise ConfigError(f"labels[{index}]={label!r} is not allowed: expected an integer >= 0 (a class index)")
    for index, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"texts[{index}]={text!r} is not allowed: expected a non-empty string")
    encoded = [ids[:max_len] for ids in tokenizer(texts, truncation=True, max_length=max_len)["input_ids"]]
    for index, ids in enumerate(encoded):
        if not ids:
            raise ConfigError(f"texts[{index}]={texts[index]!r} gives no token: expected a text with at least one")
    pad = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    examples = torch.zeros(len(texts), max(len(ids) for ids in encoded), 2, dtype=torch.long)
    examples[..., 0] = pad
    for row, (ids, label) in enumerate(zip(encoded, labels)):
        examples[row, : len(ids), 0] = torch.tensor(ids, dtype=torch.long)
        examples[row, : len(ids), 1] = int(label) + 1
    return examples


def classification_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy [] of ``model``'s logits [B, C] (in float32) against the labels of ``batch`` [B, T, 2].

    Raises:
        ConfigError: ``batch`` is not [B, T, 2]; the model's logits are not [B, C] (not a
            ``*ForSequenceClassification`` model); a label >= C.
    """
    logits = _logits(model, batch)  # [B, C]
    labels = batch[:, 0, 1] - 1  # [B]
    high = int(labels.max())
    if high >= logits.shape[1]:
        raise ConfigError(
            f"classification_loss got label {high} but {type(model).__name__} has C={logits.shape[1]} classes: "
            f"allowed labels are 0 .. {logits.shape[1] - 1} (load the model with num_labels set to the classes)"
        )
    return F.cross_entropy(logits, labels)


def predict(model: nn.Module, examples: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Predicted labels [n] (int64, on the CPU) of ``examples`` [n, T, 2]: the argmax of the logits, in eval mode
    (the model's mode is restored afterwards).

    Raises:
        ConfigError: ``examples`` are not classification examples (as :func:`check_blocks` says), ``batch_size``
            not positive, or the model is not a sequence classifier.
    """
    return _all_logits(model, examples, batch_size).argmax(-1)


@dataclasses.dataclass(frozen=True)
class ClassificationMetrics:
    """Metrics of a classifier over ``n`` examples: ``accuracy`` and ``macro_f1`` in [0, 1], ``loss`` the mean
    cross-entropy, ``confusion[true][predicted]`` the count of examples of class ``true`` predicted ``predicted``."""

    accuracy: float
    macro_f1: float
    loss: float
    confusion: list[list[int]]
    n: int


def evaluate_classifier(
    model: nn.Module, examples: torch.Tensor, num_labels: int, batch_size: int = 16
) -> ClassificationMetrics:
    """Accuracy, macro-F1 (:func:`macro_f1`), mean cross-entropy and the confusion matrix [num_labels, num_labels]
    of ``model`` over ``examples`` [n, T, 2], in eval mode (the model's mode is restored afterwards).

    Raises:
        ConfigError: as :func:`predict`; ``num_labels`` < 2, other than the model's number of classes, or not
            above every label of ``examples``.
    """
    check_int("num_labels", num_labels, 2)
    logits = _all_logits(model, examples, batch_size)  # [n, C]
    if logits.shape[1] != num_labels:
        raise ConfigError(
            f"num_labels={num_labels} but {type(model).__name__} has {logits.shape[1]} classes: expected the same"
        )
    labels = examples[:, 0, 1] - 1  # [n]
    if int(labels.max()) >= num_labels:
        raise ConfigError(
            f"examples hold label {int(labels.max())} but num_labels={num_labels}: allowed labels are "
            f"0 .. {num_labels - 1}"
        )
    predicted = logits.argmax(-1)  # [n]
    confusion = torch.bincount(labels * num_labels + predicted, minlength=num_labels * num_labels)
    table = confusion.view(num_labels, num_labels).tolist()  # [true, predicted]
    return ClassificationMetrics(
        accuracy=(predicted == labels).double().mean().item(),
        macro_f1=macro_f1(table),
        loss=F.cross_entropy(logits, labels).item(),
        confusion=table,
        n=len(labels),
    )


def macro_f1(confusion: Sequence[Sequence[int]]) -> float:
    """The mean over classes of F1 = 2·TP / (2·TP + FP + FN), from ``confusion[true][predicted]`` counts.

    A class with no true and no predicted example is left out of the mean (its F1 is 0 / 0), as scikit-learn's
    ``f1_score(average="macro")`` leaves out labels absent from both; a class with true examples but no
    prediction has F1 0. 0.0 when every class is absent.
    """
    scores = []
    for c, row in enumerate(confusion):
        tp = row[c]
        fn = sum(row) - tp
        fp = sum(other[c] for other in confusion) - tp
        if tp + fn + fp:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


def k_shot(labels: Sequence[int], k: int, seed: int) -> list[int]:
    """Indices of ``k`` examples of every class 0 .. max(labels), sorted ascending (the data's order).

    Each class's k are drawn without replacement by ``torch.randperm`` from one ``torch.Generator`` seeded by
    ``seed``, classes in order, so the draw is the same on every run and machine.

    Raises:
        ConfigError: ``k`` < 1; no labels or a label that is not an integer >= 0; a class with fewer than ``k``
            examples, or none (the message names the class and its count).
    """
    check_int("k", k)
    labels = list(labels)
    if not labels:
        raise ConfigError("k_shot got no labels: expected at least one")
    for index, label in enumerate(labels):
        if isinstance(label, bool) or not isinstance(label, numbers.Integral) or label < 0:
            raise ConfigError(f"labels[{index}]={label!r} is not allowed: expected an integer >= 0 (a class index)")
    top = int(max(labels))
    generator = torch.Generator().manual_seed(seed)
    chosen: list[int] = []
    for c in range(top + 1):
        members = [index for index, label in enumerate(labels) if label == c]
        if not members:
            raise ConfigError(
                f"class {c} has 0 examples (an empty class): expected k={k} examples of every class 0 .. {top}"
            )
        if len(members) < k:
            raise ConfigError(f"class {c} has {len(members)} examples, fewer than k={k}: expected k or more per class")
        chosen += [members[i] for i in torch.randperm(len(members), generator=generator)[:k].tolist()]
    return sorted(chosen)


def _logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """``model``'s float32 logits [B, C] for ``batch`` [B, T, 2] of classification examples."""
    if batch.dim() != 3 or batch.shape[-1] != 2:
        raise ConfigError(
            f"classification_loss got a batch of shape {tuple(batch.shape)}: expected classification examples "
            "[B, T, 2] of (input_ids, label + 1 or 0), e.g. from encode_classification"
        )
    input_ids, marks = batch.unbind(-1)  # each [B, T]
    logits = model(input_ids=input_ids, attention_mask=(marks > 0).long()).logits
    if logits.dim() != 2 or logits.shape[0] != len(batch):
        raise ConfigError(
            f"{type(model).__name__} gave logits of shape {tuple(logits.shape)} for {len(batch)} examples: expected "
            "[B, num_labels] from a *ForSequenceClassification model (a causal LM gives [B, T, vocab])"
        )
    return logits.float()


def _all_logits(model: nn.Module, examples: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Logits [n, C] (float32, CPU) of ``examples`` [n, T, 2] in batches, in eval mode, without gradients."""
    check_int("batch_size", batch_size)
    if not isinstance(examples, torch.Tensor) or examples.dim() != 3 or examples.shape[-1] != 2:
        shape = tuple(examples.shape) if isinstance(examples, torch.Tensor) else type(examples).__name__
        raise ConfigError(f"examples are {shape}: expected classification examples [n, T, 2]")
    check_blocks("examples", examples, model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            batches = [
                _logits(model, examples[i : i + batch_size].to(model_device(model))).cpu()
                for i in range(0, len(examples), batch_size)
            ]
    finally:
        model.train(was_training)
    return torch.cat(batches)
