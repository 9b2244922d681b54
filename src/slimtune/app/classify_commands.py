"""Sequence classification from the command line: ``finetune --task classify`` and ``eval --task classify``.

Data: ``--data bbc`` is BBC News topics (5 classes; held out: its validation split), or a ``.jsonl`` / ``.csv``
file with ``text`` and ``label`` (held out: ``--eval-data``, labelled alike). The model is the sequence classifier
of ``--model`` (``minilm``: BertForSequenceClassification, ``smollm2``: LlamaForSequenceClassification, or a local
folder) with a new head over the training data's classes; the adapter keeps that head whole as a trainable copy
(``modules_to_save``, default: the model's ``classifier`` / ``score``), saved with it with the class names, so
``eval``, ``merge`` and ``export`` rebuild the same classifier from the adapter folder alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtune.adapters.base import OutputAdapter
from slimtune.app.data_options import TrainingData
from slimtune.app.labelled_data import LabelledData, bbc_topic_data, read_labelled_file
from slimtune.app.options import collect
from slimtune.config import AdapterConfig, check_int
from slimtune.errors import ConfigError
from slimtune.training.classification import (
    ClassificationMetrics,
    classification_loss,
    encode_classification,
    evaluate_classifier,
    k_shot,
)

HEAD_NAMES = ("classifier", "score")  # the new head of BERT-like and decoder sequence classifiers
BERT_OUTPUT_LAYERS = r".*output\.dense"  # a BERT layer's attention output and FFN output projections
CONFUSION_FILE = "confusion.png"


def classification_setup(args: argparse.Namespace, adapter: AdapterConfig, seed: int) -> tuple[nn.Module, TrainingData]:
    """``finetune --task classify``: the classifier over the training data's classes (its head drawn from
    ``seed``, which also draws the ``--k-shot`` examples), the encoded training and held-out examples, and
    ``adapter`` completed for the model (its ``modules_to_save`` default to the head, an output adapter's layers
    to BERT's output projections).

    Raises:
        ConfigError: an option that does not go with classification (``--quantize``, chat data), ``--k-shot`` larger
            than a class, or an unknown label in ``--eval-data``.
        DataError: as :func:`slimtune.app.labelled_data.read_labelled_file`.
    """
    from slimtune.app.models import load_classifier

    if args.quantize is not None:
        raise ConfigError(f"quantize={args.quantize!r} is not allowed with --task classify: expected no --quantize")
    check_int("k_shot", args.k_shot, optional=True)
    train = labelled_data(args.data, "train")
    if args.k_shot is not None:
        chosen = k_shot(train.labels, args.k_shot, seed)
        train = LabelledData([train.texts[i] for i in chosen], [train.labels[i] for i in chosen], train.names)
    held_out = None
    if args.eval_data is not None:
        held_out = labelled_data(args.eval_data, "validation", train.names)
    elif args.data == "bbc":
        held_out = labelled_data("bbc", "validation")
    torch.manual_seed(seed)
    model, tokenizer = load_classifier(args.model, train.names, getattr(torch, args.dtype))
    max_len = args.seq_len or 128
    train_examples = encode_classification(train.texts, train.labels, tokenizer, max_len)
    eval_examples = None
    if held_out is not None:
        count = args.eval_examples
        eval_examples = encode_classification(held_out.texts[:count], held_out.labels[:count], tokenizer, max_len)
    complete_adapter(adapter, model, set(collect(args, args.adapter_options, skip_none=True)))
    return model, TrainingData(train_examples, eval_examples, classification_loss)


def labelled_data(data: str, split: str, names: list[str] | None = None) -> LabelledData:
    """``"bbc"`` → BBC News topics of ``split``; a ``.jsonl`` / ``.csv`` file → its examples (labels indexed by
    ``names`` when given)."""
    if data == "bbc":
        return bbc_topic_data(split)
    if data == "bbc-instruct":
        raise ConfigError(
            "data='bbc-instruct' is not allowed with --task classify: it holds chats; expected 'bbc' (BBC News "
            "topics) or a .jsonl / .csv file with 'text' and 'label'"
        )
    return read_labelled_file(data, names)


def complete_adapter(adapter: AdapterConfig, model: nn.Module, given: set[str]) -> None:
    """Defaults that depend on the classifier: the head in ``modules_to_save``, and BERT's output projections as
    an output adapter's layers (its Llama defaults name no BERT module), unless the fields ``given`` by flags
    set them."""
    children = dict(model.named_children())
    if adapter.modules_to_save is None:
        adapter.modules_to_save = [name for name in HEAD_NAMES if name in children]
    is_bert = any(name.endswith("attention.output.dense") for name, _ in model.named_modules())
    output_adapter = issubclass(adapter.adapter_class, OutputAdapter)
    if is_bert and output_adapter and "target_modules" not in given:
        adapter.target_modules = BERT_OUTPUT_LAYERS


def report_classifier(args: argparse.Namespace, model: nn.Module, data: TrainingData) -> dict[str, Any]:
    """After training: the held-out metrics (printed, plotted to ``<output>/confusion.png``), for ``run.json``."""
    from slimtune.app.classify_plots import plot_confusion

    if data.held_out is None:
        print("no held-out examples (pass --eval-data): accuracy not measured")
        return {}
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    metrics = evaluate_classifier(model, data.held_out, len(names))
    print(describe(metrics))
    plot = plot_confusion(metrics.confusion, names, Path(args.output) / CONFUSION_FILE, f"{args.method} on {args.data}")
    print(f"confusion matrix: {plot}")
    return {"labels": names, "held_out": dataclasses.asdict(metrics)}


def describe(metrics: ClassificationMetrics) -> str:
    return (
        f"held-out accuracy {metrics.accuracy:.4f}, macro-F1 {metrics.macro_f1:.4f}, loss {metrics.loss:.4f} "
        f"({metrics.n} examples)"
    )


def adapter_labels(adapter: str | None) -> list[str] | None:
    """The class names saved with a classifier's adapter (None: no adapter, or not a classifier's)."""
    from slimtune.serialization import read_metadata

    if adapter is None:
        return None
    labels = read_metadata(Path(adapter)).get("labels")
    return [str(name) for name in labels] if isinstance(labels, list) and labels else None


def folder_labels(model: str) -> list[str] | None:
    """The class names of a saved sequence-classifier folder (a merged classifier), None for any other model."""
    config_file = Path(model) / "config.json"
    if model in ("smollm2", "minilm") or not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError:
        return None
    architectures = config.get("architectures") or [] if isinstance(config, dict) else []
    id2label = config.get("id2label") if isinstance(config, dict) else None
    if not any(str(a).endswith("ForSequenceClassification") for a in architectures) or not isinstance(id2label, dict):
        return None
    return [str(id2label[key]) for key in sorted(id2label, key=int)]


def load_for_adapter(model: str, adapter: str | None, dtype: str = "float32", quantize: str | None = None) -> Any:
    """(model, tokenizer) that ``adapter`` fits: the classifier it was trained on when it holds class names
    (or when ``model`` is a saved classifier), else the causal LM of ``model``."""
    from slimtune.app.commands import load_named_model
    from slimtune.app.models import load_classifier

    labels = adapter_labels(adapter) or folder_labels(model)
    if labels is None:
        return load_named_model(model, dtype, quantize)
    if quantize is not None:
        raise ConfigError(f"quantize={quantize!r} is not allowed for a sequence classifier: expected no --quantize")
    return load_classifier(model, labels, getattr(torch, dtype))


def cmd_evaluate_classifier(args: argparse.Namespace) -> int:
    """``eval --task classify``: accuracy, macro-F1, loss and confusion matrix of a classifier on labelled data."""
    from slimtune.app.classify_plots import plot_confusion
    from slimtune.app.models import load_classifier
    from slimtune.serialization import load_adapter

    labels = adapter_labels(args.adapter) or folder_labels(args.model)
    data = labelled_data(args.data, args.split, labels)
    if labels is None:
        print("note: no trained head (no --adapter with one, --model is not a saved classifier): expect chance")
    torch.manual_seed(0)
    model, tokenizer = load_classifier(args.model, labels or data.names, getattr(torch, args.dtype))
    if args.adapter:
        load_adapter(model, args.adapter)
    count = args.max_examples
    examples = encode_classification(data.texts[:count], data.labels[:count], tokenizer, args.seq_len or 128)
    names = labels or data.names
    metrics = evaluate_classifier(model, examples, len(names), args.batch_size)
    report = {"task": "classify", "model": args.model, "adapter": args.adapter, "data": args.data}
    report.update(split=args.split if args.data == "bbc" else None, labels=names, **dataclasses.asdict(metrics))
    if args.confusion_plot:
        plot_confusion(metrics.confusion, names, args.confusion_plot, f"{args.adapter or args.model} on {args.data}")
    print(json.dumps(report))
    return 0
