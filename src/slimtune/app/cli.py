"""The ``slimtune`` command line (also ``python -m slimtune``).

Commands: ``finetune``, ``compare``, ``linearize``, ``eval``, ``merge``, ``export``, ``import``, ``models`` and
``bench``; ``slimtune <command> --help`` lists every option with its default. Defaults work offline on the bundled
SmolLM2-135M and BBC News (``slimtune finetune`` alone trains a short Bone run); ``--model`` also takes a local
Hugging Face folder, and ``--data`` a ``.txt`` / ``.jsonl`` / ``.csv`` file of documents or a ``.jsonl`` file of
chats (``messages``, or ``prompt`` + ``completion``: the loss is on the answers only).

Adapter, training and linear-attention options are generated from the fields of the config dataclasses
(``--r``, ``--variant``, ``--structure``, ``--block-size``, ``--freeze-fraction``, ...), with help taken from their
docstrings, so every method of ``slimtune.METHODS`` is reachable with all its options. A field whose plain flag
is already taken gets a prefix: LoRA-SP's ``seed`` is ``--adapter-seed``, ``LinearizeConfig.seed`` is
``--linear-seed``.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from typing import Any

from slimtune.adapters.disha import DISHA_VARIANTS
from slimtune.app.commands import (
    BENCHMARK,
    cmd_bench,
    cmd_compare,
    cmd_evaluate,
    cmd_finetune,
)
from slimtune.app.data_options import DATA_HELP, TOO_LONG_HELP
from slimtune.app.file_commands import cmd_export, cmd_import, cmd_merge, cmd_models
from slimtune.app.layer_ranking_commands import (
    RANK_BY,
    RANK_BY_HELP,
    RANK_CANDIDATES_HELP,
    RANK_LAYERS_HELP,
    RANK_SEARCH,
    RANK_SEARCH_HELP,
)
from slimtune.app.linearize_commands import cmd_linearize
from slimtune.app.options import METHOD_CHOICES, add_config_options, option
from slimtune.app.quantized_base import QUANTIZE_CHOICES, QUANTIZE_HELP, quiet_bitsandbytes_notice
from slimtune.errors import SlimtuneError
from slimtune.registry import METHODS
from slimtune.training.data import TOO_LONG

_MODEL_HELP = (
    "'smollm2' (the bundled SmolLM2-135M-Instruct), 'minilm' (all-MiniLM-L6-v2, for --task classify) or a local "
    "Hugging Face folder"
)
_TASK_HELP = (
    "lm: causal-LM fine-tuning on text or chats; classify: sequence classification (a new head, kept whole with "
    "the adapter) on --data bbc (BBC News topics) or a .jsonl / .csv file with 'text' and 'label'"
)
_METHOD_HELP = (
    f"adapter method: one of {sorted(METHODS)}, or a DiSHA variant {list(DISHA_VARIANTS)} as a shortcut for "
    "'disha --variant ...'"
)
TRAIN_SKIP = {"output_dir", "desc"}  # set by the command itself, not by flags
_RUN_HELP = (
    "one method to compare, as [LABEL=]METHOD[:FIELD=VALUE,...] (repeat the option; 'lr' sets the run's learning "
    "rate; lists are joined by '+'), e.g. --run lora:r=8,lr=1e-3 --run bone:r=16 "
    "--run circ=surm:structure=circulant,block_size=96,lr=1e-2 (default: LoRA, Bone, Bat-Row, SURM circulant and "
    "LoRA-SP at 2.2M-2.5M parameters on SmolLM2, as the demo)"
)


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    quiet_bitsandbytes_notice()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = extra[1:] if extra[:1] == ["--"] else extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.handler(args) or 0
    except SlimtuneError as err:
        print(f"slimtune {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (FloatingPointError, ModuleNotFoundError, FileNotFoundError) as err:
        print(f"slimtune {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nslimtune {args.command}: interrupted. {interrupted_hint(args)}", file=sys.stderr)
        return 130


def interrupted_hint(args: argparse.Namespace) -> str:
    """What an interrupted command left: for ``finetune``, the newest checkpoint and how to go on from it."""
    if args.command != "finetune":
        return "Nothing was saved; run the command again."
    from slimtune.training.checkpoint import checkpoint_root, latest_checkpoint

    root = checkpoint_root(args.output)
    last = latest_checkpoint(root) if root.is_dir() else None
    if last is None:
        return f"No checkpoint was written yet in {args.output}: rerun the same command with --resume to start over."
    step = int(last.name.removeprefix("step-"))
    return f"The newest checkpoint is step {step} ({last}): rerun the same command with --resume to go on from it."


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command."""
    parser = argparse.ArgumentParser(
        prog="slimtune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _add_finetune,
        _add_compare,
        _add_linearize,
        _add_eval,
        _add_merge_and_export,
        _add_import,
        _add_models,
        _add_bench,
    ):
        add(sub)
    return parser


def _command(sub: Any, name: str, handler: Any, summary: str) -> tuple[argparse.ArgumentParser, set[str]]:
    """A sub-command whose description is its handler's docstring; returns it and its set of taken flags."""
    doc = inspect.getdoc(handler) or summary
    p = sub.add_parser(name, help=summary, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(handler=handler)
    return p, {"help"}


def _add_finetune(sub: Any) -> None:
    from slimtune.training.config import TrainConfig

    p, taken = _command(sub, "finetune", cmd_finetune, "fine-tune a model with one adapter method")
    _model_data_options(p, taken, output="runs/finetune")
    option(p, taken, "method", default="bone", choices=METHOD_CHOICES, help=_METHOD_HELP)
    option(p, taken, "quantize", default=None, choices=list(QUANTIZE_CHOICES), help=QUANTIZE_HELP)
    option(p, taken, "task", default="lm", choices=["lm", "classify"], help=_TASK_HELP)
    option(
        p, taken, "k_shot", type=int, default=None, help="--task classify: train on K examples per class (by --seed)"
    )
    option(p, taken, "eval_examples", type=int, default=None, help="--task classify: held-out examples (default: all)")
    group = p.add_argument_group("training")
    defaults = {"steps": 20, "lr": 1e-4, "warmup": 2, "eval_every": 10, "checkpoint_every": 10}
    train = add_config_options(group, {"train": TrainConfig}, taken, "train", exclude=TRAIN_SKIP, defaults=defaults)
    adapter = add_config_options(p.add_argument_group("adapter method"), METHODS, taken, "adapter")
    p.set_defaults(train_options=train, adapter_options=adapter)


def _add_compare(sub: Any) -> None:
    from slimtune.training.config import TrainConfig

    p, taken = _command(sub, "compare", cmd_compare, "train several methods alike: table, loss plot, JSON record")
    _model_data_options(p, taken, output="runs/compare")
    option(p, taken, "run", action="append", metavar="SPEC", help=_RUN_HELP)
    option(p, taken, "quantize", default=None, choices=list(QUANTIZE_CHOICES), help=QUANTIZE_HELP)
    group = p.add_argument_group("training (shared by every run)")
    skip = TRAIN_SKIP | {"checkpoint_every", "keep_checkpoints", "resume"}
    defaults = {"steps": 20, "lr": 1e-3, "warmup": 2, "eval_every": 10}
    p.set_defaults(
        train_options=add_config_options(group, {"train": TrainConfig}, taken, "train", exclude=skip, defaults=defaults)
    )


_TRANSFER_BLOCKS_HELP = (
    "attention transfer cycles over the first N training blocks: each goes through the original model once and its "
    "teacher tensors are kept (about 22 MiB a 128-token block for SmolLM2), so later steps run only the new parts"
)
_COMPARE_HELP = (
    "what attention transfer matches: each layer's output after its output projection, or what enters that "
    "projection (attention: LoLCATs' loss, the projection leaves the step)"
)
_WINDOW_DROPOUT_HELP = (
    "scheduled sliding-window dropout (arXiv 2510.05901) in fine-tuning, needs --window: each step, each windowed "
    "layer runs as pure linear attention with probability P, decaying linearly to 0 over the run (0: off)"
)

_FINETUNE_LOSS_HELP = (
    "what fine-tuning minimises: lm, the next-token cross-entropy on the data; distill, the KL to the original "
    "model's next-token distributions (computed from the converted model's own weights, softmax attention restored and "
    "adapters off: no second copy in memory)"
)


def _add_linearize(sub: Any) -> None:
    from slimtune.linear_attention import LinearizeConfig

    p, taken = _command(sub, "linearize", cmd_linearize, "DiJiang: linear attention, attention transfer, fine-tuning")
    _model_data_options(p, taken, output="runs/linearize")
    for name, default, text in (
        ("transfer_steps", 20, "attention-transfer steps"),
        ("transfer_lr", 1e-2, "attention-transfer learning rate"),
        ("transfer_blocks", 16, _TRANSFER_BLOCKS_HELP),
        ("finetune_steps", 10, "fine-tuning steps after the transfer (0: none; the loss: --finetune-loss)"),
        ("window_dropout", 0.0, _WINDOW_DROPOUT_HELP),
        ("finetune_lr", 1e-3, "fine-tuning learning rate"),
        ("batch_size", 2, "blocks per step"),
        ("warmup", 2, "warm-up steps of each stage"),
        ("seed", 0, "torch seed before converting"),
    ):
        option(p, taken, name, type=type(default), default=default, help=text)
    adapter_help = "also train this adapter during fine-tuning (default: only the added linear-attention parameters)"
    option(p, taken, "method", default=None, choices=METHOD_CHOICES, help=adapter_help)
    option(p, taken, "rank_layers", type=int, default=None, metavar="K", help=RANK_LAYERS_HELP)
    option(p, taken, "rank_by", default="loss", choices=list(RANK_BY), help=RANK_BY_HELP)
    option(p, taken, "rank_search", default="single", choices=list(RANK_SEARCH), help=RANK_SEARCH_HELP)
    option(p, taken, "rank_candidates", type=int, nargs="+", default=None, metavar="LAYER", help=RANK_CANDIDATES_HELP)
    passkey_help = "length in tokens of the passkey prompts --rank-by passkey ranks on"
    option(p, taken, "rank_passkey_length", type=int, default=1024, metavar="N", help=passkey_help)
    depths_help = "needle depths in [0, 1] of those prompts (a depth given twice gets twice the prompts)"
    option(
        p, taken, "rank_passkey_depths", type=float, nargs="+", default=[0.1, 0.5, 0.9], metavar="D", help=depths_help
    )
    option(p, taken, "rank_passkey_keys", type=int, default=2, metavar="N", help="those prompts per depth")
    option(p, taken, "transfer_compare", default="output", choices=["output", "attention"], help=_COMPARE_HELP)
    option(p, taken, "finetune_loss", default="lm", choices=["lm", "distill"], help=_FINETUNE_LOSS_HELP)
    group = p.add_argument_group("linear attention (LinearizeConfig)")
    linear = add_config_options(group, {"linearize": LinearizeConfig}, taken, "linear")
    adapter = add_config_options(p.add_argument_group("adapter method"), METHODS, taken, "adapter")
    p.set_defaults(linear_options=linear, adapter_options=adapter)


def _add_eval(sub: Any) -> None:
    p, taken = _command(sub, "eval", cmd_evaluate, "perplexity, zero-shot topic accuracy, or lm-eval tasks")
    option(p, taken, "model", default="smollm2", help=_MODEL_HELP)
    option(p, taken, "adapter", default=None, help="a folder written by slimtune.save_adapter to load first")
    option(p, taken, "linear_attention", default=None, help="a folder written by save_linearized to load first")
    dtype_help = "dtype of the model's weights (adapters stay float32 on a bfloat16 / float16 base)"
    option(p, taken, "dtype", default="float32", choices=["float32", "bfloat16", "float16"], help=dtype_help)
    option(p, taken, "quantize", default=None, choices=list(QUANTIZE_CHOICES), help=QUANTIZE_HELP)
    task_help = (
        "perplexity; topic (zero-shot BBC topic choice by a causal LM); classify (a sequence classifier's accuracy, "
        "macro-F1 and confusion matrix: the adapter's classifier, or a merged classifier folder as --model); passkey "
        "(retrieval of a 5-digit key hidden in filler, scored by log-likelihood); position-loss (next-token loss by "
        "position bucket 0-64 ... 2048-4096 of --data packed into --seq-len blocks)"
    )
    tasks = ["perplexity", "topic", "classify", "passkey", "position-loss"]
    option(p, taken, "task", default="perplexity", choices=tasks, help=task_help)
    data_help = DATA_HELP + " (topic: BBC News only; classify: 'bbc' topics or a .jsonl / .csv with 'text', 'label')"
    option(p, taken, "data", default="bbc", help=data_help)
    option(
        p,
        taken,
        "split",
        default="validation",
        choices=["train", "validation", "test"],
        help="bbc / bbc-instruct split",
    )
    seq_len_help = "tokens per block (default: 128; 256 for chat data; 4096 for position-loss)"
    option(p, taken, "seq_len", type=int, default=None, help=seq_len_help)
    option(p, taken, "too_long", default="error", choices=list(TOO_LONG), help=TOO_LONG_HELP)
    option(p, taken, "max_blocks", type=int, default=32, help="blocks to evaluate (perplexity, position-loss)")
    option(p, taken, "max_examples", type=int, default=None, help="examples to classify (topic: 100; classify: all)")
    option(p, taken, "confusion_plot", default=None, help="classify: also write the confusion matrix to this PNG")
    option(p, taken, "batch_size", type=int, default=4, help="blocks per forward pass (perplexity, harness)")
    option(
        p,
        taken,
        "lengths",
        type=int,
        nargs="+",
        default=[256, 512, 1024, 2048, 4096],
        help="passkey: tokens per prompt, answer included",
    )
    option(p, taken, "depths", type=float, nargs="+", default=[0.1, 0.5, 0.9], help="passkey: needle depths in [0, 1]")
    option(p, taken, "keys", type=int, default=20, help="passkey: keys per (length, depth)")
    window_help = (
        "passkey: report needles within the last WINDOW prompt tokens apart (default: the softmax window of a "
        "--linear-attention hybrid, else none)"
    )
    option(p, taken, "window", type=int, default=None, help=window_help)
    harness = (
        "run EleutherAI's lm-evaluation-harness offline on these comma-separated tasks instead of --task: "
        "bbc_topic (zero-shot topic choice), bbc_perplexity (whole BBC News test articles), or tasks of --include-path"
    )
    option(p, taken, "harness", default=None, metavar="TASKS", help=harness)
    option(p, taken, "limit", type=int, default=None, help="--harness: at most this many examples per task")
    option(p, taken, "include_path", default=None, help="--harness: a folder of your own lm-eval YAML tasks")


def _add_merge_and_export(sub: Any) -> None:
    p, taken = _command(sub, "merge", cmd_merge, "merge an adapter into the weights; save a plain HF model folder")
    _file_options(
        p, taken, "a folder written by slimtune.save_adapter", "the folder to write (save_pretrained + tokenizer)"
    )
    option(p, taken, "dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="saved dtype")

    p, taken = _command(
        sub, "export", cmd_export, "write an adapter or a merged model for PEFT, LoRA servers, llama.cpp"
    )
    formats = (
        "peft: a PEFT adapter folder (LoRA for lora/lora_sp, MiSS for bone/bat_col/mini, C3A for SURM circulant); "
        "lora: any method converted to a PEFT LoRA for servers (vLLM, llama.cpp): exact for rank-r updates (LoRA, "
        "LoRA-SP, Bone, mini), a truncated SVD at --rank for the others (the error is printed); gguf: a GGUF file "
        "of the merged model (llama.cpp's converter)"
    )
    option(p, taken, "format", default="peft", choices=["peft", "lora", "gguf"], help=formats)
    _file_options(
        p,
        taken,
        "a folder written by slimtune.save_adapter (gguf: merged first; without it --model is the merged folder)",
        "the folder to write (gguf: the .gguf file)",
        adapter_required=False,
    )
    rank_help = "--format lora: the LoRA rank of every layer (default: exact, the largest rank of any layer's update)"
    option(p, taken, "rank", type=int, default=None, help=rank_help)
    outtypes = "--format gguf: the type of the weight matrices (q8_0: 8-bit blocks of 32)"
    option(p, taken, "outtype", default="f16", choices=["f16", "bf16", "f32", "q8_0"], help=outtypes)
    fetch = "--format gguf: first fetch llama.cpp's converter from the llama-cpp-python 0.3.36 source (~20 s, once)"
    option(p, taken, "fetch_converter", action="store_true", help=fetch)


def _add_import(sub: Any) -> None:
    p, taken = _command(sub, "import", cmd_import, "read a PEFT adapter (LoRA, MiSS, C3A) as a slimtune adapter")
    _file_options(
        p, taken, "a PEFT adapter folder (adapter_config.json + .safetensors)", "the slimtune adapter folder to write"
    )


def _file_options(
    p: argparse.ArgumentParser, taken: set[str], adapter_help: str, output_help: str, adapter_required: bool = True
) -> None:
    """--model, --adapter, --output and --overwrite of the commands that write a model or adapter folder."""
    option(p, taken, "model", default="smollm2", help=_MODEL_HELP)
    option(p, taken, "adapter", required=adapter_required, default=None, help=adapter_help)
    option(p, taken, "output", required=True, help=output_help)
    option(p, taken, "overwrite", action="store_true", help="write into --output even if it is not empty")


def _add_models(sub: Any) -> None:
    from slimtune.app.models import MODEL_NAMES

    p, taken = _command(sub, "models", cmd_models, "the bundled models and their local folders")
    option(p, taken, "path", default=None, choices=list(MODEL_NAMES), help="print only this model's folder")


def _add_bench(sub: Any) -> None:
    summary = f"run {BENCHMARK.parent.name}/{BENCHMARK.name} (speed and memory vs PEFT)"
    p, _ = _command(sub, "bench", cmd_bench, summary)
    p.usage = "slimtune bench [-h] [ARGS ...]"


def _model_data_options(p: argparse.ArgumentParser, taken: set[str], output: str) -> None:
    option(p, taken, "model", default="smollm2", help=_MODEL_HELP)
    option(p, taken, "data", default="bbc", help=DATA_HELP)
    option(
        p,
        taken,
        "eval_data",
        default=None,
        help="held-out file of the kind of --data (default: the validation split of bbc / bbc-instruct, else none)",
    )
    option(p, taken, "seq_len", type=int, default=None, help="tokens per block (default: 128; 256 for chat data)")
    option(p, taken, "too_long", default="error", choices=list(TOO_LONG), help=TOO_LONG_HELP)
    option(p, taken, "train_blocks", type=int, default=1024, help="at most this many training blocks are made")
    option(p, taken, "eval_blocks", type=int, default=16, help="held-out blocks")
    option(p, taken, "output", default=output, help="output folder")
    option(p, taken, "overwrite", action="store_true", help="replace an earlier run in --output (deletes its results)")
    _precision_options(p, taken)


def _precision_options(p: argparse.ArgumentParser, taken: set[str]) -> None:
    dtype_help = "dtype of the base model's weights (adapters stay float32 on a bfloat16 / float16 base)"
    option(p, taken, "dtype", default="float32", choices=["float32", "bfloat16", "float16"], help=dtype_help)
    precision_help = "autocast through accelerate (default: the launcher's ACCELERATE_MIXED_PRECISION, else no)"
    option(p, taken, "mixed_precision", default=None, choices=["no", "bf16", "fp16"], help=precision_help)
