"""The handlers of the ``slimtune`` commands (:mod:`slimtune.app.cli` builds their parsers).

Each handler takes the parsed ``argparse.Namespace`` and returns the exit status; heavy imports (transformers,
accelerate) happen inside the handlers, so ``slimtune --help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from slimtune.app.data_options import is_chat, resolve_seq_len, training_data
from slimtune.app.launch import describe_processes
from slimtune.app.options import adapter_config, collect, parse_run
from slimtune.app.outputs import check_run_folder
from slimtune.errors import ConfigError

BENCHMARK = Path("benchmarks") / "adapters.py"  # relative to a source checkout; the wheel ships no benchmarks


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tune a model with one adapter method (base frozen, adapter trained with slimtune.training.train).

    Writes <output>/adapter (slimtune.save_adapter), <output>/metrics.jsonl (one JSON line per step; TensorBoard
    scalars in <output>/tensorboard when tensorboard is installed), <output>/loss_curves.png,
    <output>/checkpoints/step-N every --checkpoint-every steps and after the last (--resume goes on from the
    newest complete one, exactly as if never stopped; with a larger --steps it extends a finished run) and
    <output>/run.json. An --output holding an earlier run needs --resume or --overwrite. Under `accelerate launch`,
    --batch-size is per process; the first line printed says how many processes run.

    examples:
      slimtune finetune                       # Bone r=64 on SmolLM2-135M, BBC News, 20 steps
      slimtune finetune --method lora --r 16 --alpha 32 --target-modules q_proj v_proj --lr 1e-3
      slimtune finetune --method surm --structure toeplitz --block-size 64 --lr 1e-3
      slimtune finetune --method lora_sp --freeze-fraction 0.5 --granularity rank --data my_texts.jsonl
      slimtune finetune --resume --steps 40     # extend a finished 20-step run to 40 steps
      slimtune finetune --method lora --quantize nf4 --dtype bfloat16 --gradient-checkpointing   # QLoRA-style
      slimtune finetune --task classify --model minilm --method surm_adapter --k-shot 32 --steps 40 --lr 1e-2
      ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m slimtune finetune   # 2 CPU processes
      ACCELERATE_USE_CPU=1 accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2 -m slimtune finetune
    """
    from slimtune.inject import get_adapted_model, parameter_counts
    from slimtune.training.config import TrainConfig
    from slimtune.training.loop import train
    from slimtune.training.sharding import make_accelerator

    apply_mixed_precision(args)
    accelerator = make_accelerator()  # the process state train() will use (accelerate launch's, FSDP2 on CPU)
    main_process = accelerator.is_main_process
    classify = args.task == "classify"
    if not classify and (args.k_shot is not None or args.eval_examples is not None):
        raise ConfigError("--k-shot and --eval-examples are allowed with --task classify only")
    output = Path(args.output)
    config = TrainConfig(**collect(args, args.train_options), output_dir=str(output), desc=f"finetune {args.method}")
    adapter = adapter_config(args.method, collect(args, args.adapter_options, skip_none=True))
    if classify:  # the classifier completes the adapter's defaults (its head, BERT's layers) before the run is checked
        from slimtune.app.classify_commands import classification_setup

        model, data = classification_setup(args, adapter, config.seed)
    run = {"method": args.method, "adapter_config": adapter.to_dict()}
    check_run_folder(output, overwrite=args.overwrite, resume=config.resume, run=run, remove=main_process)
    accelerator.wait_for_everyone()
    launch = {
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type).removeprefix("DistributedType."),
        "mixed_precision": str(accelerator.mixed_precision),
    }
    if main_process:
        print(describe_processes(accelerator))
    if not classify:
        model, tokenizer = load_named_model(args.model, args.dtype, args.quantize)
        data = training_data(args, tokenizer)
    torch.manual_seed(config.seed)
    model = get_adapted_model(model, adapter)
    counts = parameter_counts(model)
    if main_process:
        base = f"{next(model.parameters()).dtype} weights" + (
            f", {args.quantize} linear layers" if args.quantize else ""
        )
        print(f"{args.method} on {args.model} ({base}): {counts}")
    result = train(model, data.train, config, data.held_out, loss_fn=data.loss_fn)
    if main_process:
        extra = {}
        if classify:
            from slimtune.app.classify_commands import report_classifier

            extra = report_classifier(args, model, data)
        _report_finetune(args, model, adapter, config, counts, result, {**launch, **extra})
    return 0


def _report_finetune(
    args: argparse.Namespace, model: Any, adapter: Any, config: Any, counts: Any, result: Any, launch: dict[str, Any]
) -> None:
    """Save the adapter and ``run.json`` of a finished ``finetune`` run; print its losses."""
    from slimtune.fileio import atomic_write_json
    from slimtune.serialization import save_adapter

    output = Path(args.output)
    adapter_dir = save_adapter(model, output / "adapter")
    record = {
        "model": args.model,
        "data": args.data,
        "task": args.task,
        "k_shot": args.k_shot,
        "method": args.method,
        "adapter_config": adapter.to_dict(),
        "train_config": dataclasses.asdict(config),
        **launch,
        "weights_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "base_quantization": args.quantize,
        "trainable": counts.trainable,
        "total": counts.total,
        "start_step": result.start_step,
        "losses": result.losses,
        "seconds": result.seconds,
        "eval_losses": {str(k): v for k, v in result.eval_losses.items()},
        "adapter": str(adapter_dir),
    }
    atomic_write_json(output / "run.json", record)
    plot = plot_run(output, args.method)
    if result.losses:
        first, last = result.losses[0], result.losses[-1]
        steps = f"{result.start_step + 1}-{config.steps}"
        print(f"train loss {first:.4f} -> {last:.4f} over steps {steps} ({result.seconds:.1f} s)")
    if result.eval_losses:
        step, loss = max(result.eval_losses.items())
        perplexity = "" if args.task == "classify" else f" (perplexity {math.exp(loss):.2f})"
        print(f"held-out loss after step {step}: {loss:.4f}{perplexity}")
    print(f"adapter saved to {adapter_dir}; loss curves: {plot}")


def plot_run(output: Path, label: str) -> Path:
    """Plot the training and held-out losses of every step in ``<output>/metrics.jsonl`` (earlier, resumed parts of
    the run included) into ``<output>/loss_curves.png``."""
    from slimtune.app.compare import PLOT_FILE, plot_losses
    from slimtune.training.metrics import METRICS_FILE

    records = [json.loads(line) for line in (output / METRICS_FILE).read_text(encoding="utf-8").splitlines()]
    row = {
        "label": label,
        "losses": [r["loss"] for r in records],
        "eval_losses": {str(r["step"]): r["eval_loss"] for r in records if "eval_loss" in r},
    }
    return plot_losses([row], output / PLOT_FILE)


def cmd_compare(args: argparse.Namespace) -> int:
    """Train several adapter methods on the same model, data and steps, and compare them.

    Prints a table (trainable parameters, median step time, peak memory, final training and held-out loss) and
    writes <output>/compare.json, <output>/loss_curves.png, and each run's adapter and metrics.jsonl under
    <output>/<label>/. Peak memory on CPU is the parameters + AdamW state + the peak of the tensors allocated
    in one training step (see slimtune.app.compare).

    example:
      slimtune compare --steps 30 --run lora:r=8,lr=1e-3 --run bone:r=16,lr=2e-4 --run bat_row:r=16,lr=2e-4
    """
    from slimtune.app.compare import DEFAULT_RUNS, CompareRun, compare, format_table
    from slimtune.training.config import TrainConfig

    apply_mixed_precision(args)
    runs = [CompareRun(*parse_run(spec)) for spec in args.run] if args.run else DEFAULT_RUNS
    config = TrainConfig(**collect(args, args.train_options))
    check_run_folder(Path(args.output), overwrite=args.overwrite)
    refuse_chat_data(args.data, "compare")
    model, tokenizer = load_named_model(args.model, args.dtype, args.quantize)
    train_blocks, eval_blocks, _ = training_data(args, tokenizer)
    if eval_blocks is None:
        raise ConfigError(f"data={args.data!r} has no held-out split: pass --eval-data with a text file")
    record = compare(model, runs, train_blocks, eval_blocks, config, args.output, model_name=args.model)
    print(format_table(record))
    print(f"record: {Path(args.output) / 'compare.json'}; plot: {Path(args.output) / 'loss_curves.png'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a model, after loading an adapter and/or linear attention: held-out perplexity on text blocks
    (on the answer tokens for chat data: --data bbc-instruct or a chat .jsonl), or zero-shot BBC News topic
    accuracy (the topic whose name is likeliest after the article's beginning and "Topic:"), long-context passkey
    retrieval or loss by position (slimtune.training.long_context), or with --harness
    lm-evaluation-harness tasks run offline (slimtune.app.harness; pip install lm-eval). Prints one JSON line.

    examples:
      slimtune eval --adapter runs/finetune/adapter                       # held-out BBC News perplexity
      slimtune eval --harness bbc_topic,bbc_perplexity --limit 100        # lm-eval, base SmolLM2
      slimtune eval --model merged/ --harness bbc_topic                   # a merged fine-tune
      slimtune eval --task passkey --linear-attention runs/linearize/linear_attention --lengths 256 512 --keys 20
      slimtune eval --task position-loss --split test --max-blocks 8      # loss by position, 4096-token blocks
    """
    from slimtune.app.corpus import bbc_news_articles, split_articles
    from slimtune.app.data_options import data_blocks
    from slimtune.app.tasks import topic_accuracy
    from slimtune.serialization import load_adapter
    from slimtune.training.evaluate import evaluate_loss
    from slimtune.training.losses import causal_lm_loss, masked_lm_loss

    if args.task == "classify":
        from slimtune.app.classify_commands import cmd_evaluate_classifier

        if args.harness or args.linear_attention or args.quantize:
            raise ConfigError("--task classify is not allowed with --harness, --linear-attention or --quantize")
        return cmd_evaluate_classifier(args)
    chat = args.task == "perplexity" and is_chat(args.data)
    if chat and args.linear_attention:
        raise ConfigError(
            "--linear-attention with chat data is not allowed: linear attention carries its state across the "
            "examples packed in a block (no per-example reset); evaluate it on plain text"
        )
    refuse_classifier_adapter(args.adapter, args.task)
    model, tokenizer = load_named_model(args.model, args.dtype, args.quantize)
    if args.linear_attention:
        from slimtune.linear_attention import load_linearized

        load_linearized(model, args.linear_attention)
    if args.adapter:
        load_adapter(model, args.adapter)
    if args.harness:
        return _run_harness(args, model, tokenizer)
    report: dict[str, Any] = {
        "task": args.task,
        "model": args.model,
        "adapter": args.adapter,
        "quantize": args.quantize,
    }
    if args.task in ("passkey", "position-loss"):
        from slimtune.app.long_context_commands import cmd_long_context

        return cmd_long_context(args, model, tokenizer, {**report, "linear_attention": args.linear_attention})
    if args.task == "perplexity":
        resolve_seq_len(args, chat)
        blocks = data_blocks(args, tokenizer, args.data, args.split, args.max_blocks)
        loss = evaluate_loss(model, blocks, masked_lm_loss if chat else causal_lm_loss, args.batch_size)
        report.update(loss=loss, perplexity=math.exp(loss), blocks=len(blocks), seq_len=args.seq_len)
        report["loss_on"] = "answer tokens" if chat else "every token"
    else:
        if args.data != "bbc":
            raise ConfigError(
                f"data={args.data!r} is not allowed with task='topic': topic accuracy is on BBC News ('bbc')"
            )
        articles = bbc_news_articles()
        names = [topic for _, topic in sorted({(a.label, a.topic) for a in articles})]
        chosen = split_articles(articles)[args.split][: args.max_examples or 100]
        accuracy = topic_accuracy(model, tokenizer, [(a.text, a.label) for a in chosen], names)
        report.update(accuracy=accuracy, examples=len(chosen), split=args.split, chance=1 / len(names))
    print(json.dumps(report))
    return 0


def _run_harness(args: argparse.Namespace, model: Any, tokenizer: Any) -> int:
    """``eval --harness``: lm-eval on the loaded (adapted, linearised) model; prints one JSON line of metrics."""
    from slimtune.app.harness import run_harness, summarize

    tasks = [task.strip() for task in args.harness.split(",") if task.strip()]
    if not tasks:
        raise ConfigError(f"harness={args.harness!r} names no task: expected e.g. bbc_topic,bbc_perplexity")
    results = run_harness(
        model, tasks, tokenizer, limit=args.limit, batch_size=args.batch_size, include_path=args.include_path
    )
    print(json.dumps({"harness": summarize(results), "model": args.model, "adapter": args.adapter}))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the adapter benchmark (benchmarks/adapters.py of the source checkout in the current folder: step time
    and peak memory of slimtune's adapters against PEFT's). ARGS go to the script:
    `slimtune bench --workload synthetic --rounds 3`; `slimtune bench -- --help` lists them."""
    script = Path.cwd() / BENCHMARK
    if not script.is_file():
        raise FileNotFoundError(
            f"{script} does not exist: run `slimtune bench` from the root of a source checkout of slimtune (the "
            "benchmarks are not part of the installed package)"
        )
    return subprocess.run([sys.executable, str(script), *args.bench_args], check=False).returncode


def load_named_model(name: str, dtype: str = "float32", quantize: str | None = None) -> tuple[Any, Any]:
    """The causal LM and tokenizer that ``--model`` names (the bundled SmolLM2 or a local folder), its weights in
    ``dtype`` ("float32", "bfloat16" or "float16"), its linear layers quantised with ``quantize`` ("nf4", "fp4",
    "int8") when given."""
    from slimtune.app.models import load_causal_lm

    return load_causal_lm(name, getattr(torch, dtype), quantize)


def refuse_classifier_adapter(adapter: str | None, task: str) -> None:
    """ConfigError when ``adapter`` belongs to a sequence classifier (it holds class names) but ``task`` is not
    ``classify``."""
    from slimtune.app.classify_commands import adapter_labels

    labels = adapter_labels(adapter)
    if labels is not None:
        raise ConfigError(
            f"adapter={adapter!r} is a sequence classifier's (labels {labels}), not a causal LM's: evaluate it with "
            f"--task classify (not --task {task})"
        )


def apply_mixed_precision(args: argparse.Namespace) -> None:
    """``--mixed-precision`` as accelerate reads it (ACCELERATE_MIXED_PRECISION), before any Accelerator exists;
    without the flag the launcher's setting (or "no") stays."""
    if getattr(args, "mixed_precision", None) is not None:
        os.environ["ACCELERATE_MIXED_PRECISION"] = args.mixed_precision


def refuse_chat_data(data: str, command: str) -> None:
    """ConfigError when ``--data`` holds chat examples, which ``command`` does not train on."""
    if is_chat(data):
        raise ConfigError(
            f"data={data!r} holds chat / instruction examples, which `slimtune {command}` does not train on: "
            "expected 'bbc' or a plain-text file (chats train with `slimtune finetune`)"
        )
