"""The handlers of the ``slimtune`` commands (:mod:`slimtune.app.cli` builds their parsers).

Each handler takes the parsed ``argparse.Namespace`` and returns the exit status; heavy imports (transformers,
accelerate) happen inside the handlers, so ``slimtune --help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from slimtune.app.options import adapter_config, collect, parse_run
from slimtune.errors import ConfigError

BENCHMARK = Path("benchmarks") / "adapters.py"  # relative to a source checkout; the wheel ships no benchmarks


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tune a model with one adapter method (base frozen, adapter trained with slimtune.training.train).

    Writes <output>/adapter (slimtune.save_adapter), <output>/metrics.jsonl (one JSON line per step),
    <output>/checkpoints/step-N every --checkpoint-every steps (--resume goes on from the newest complete one,
    exactly as if never stopped) and <output>/run.json. Under `accelerate launch`, --batch-size is per process.

    examples:
      slimtune finetune                       # Bone r=64 on SmolLM2-135M, BBC News, 20 steps
      slimtune finetune --method lora --r 16 --alpha 32 --target-modules q_proj v_proj --lr 1e-3
      slimtune finetune --method surm --structure toeplitz --block-size 64 --lr 1e-3
      slimtune finetune --method lora_sp --freeze-fraction 0.5 --granularity rank --data my_texts.jsonl
      ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m slimtune finetune
    """
    from accelerate import Accelerator

    from slimtune.inject import get_adapted_model, parameter_counts
    from slimtune.training.config import TrainConfig
    from slimtune.training.loop import train

    main_process = Accelerator().is_main_process  # the process state train() will use (accelerate launch's)
    output = Path(args.output)
    config = TrainConfig(**collect(args, args.train_options), output_dir=str(output), desc=f"finetune {args.method}")
    adapter = adapter_config(args.method, collect(args, args.adapter_options, skip_none=True))
    model, tokenizer = load_named_model(args.model)
    train_blocks, eval_blocks = blocks_from_args(args, tokenizer)
    torch.manual_seed(config.seed)
    model = get_adapted_model(model, adapter)
    counts = parameter_counts(model)
    if main_process:
        print(f"{args.method} on {args.model}: {counts}")
    result = train(model, train_blocks, config, eval_blocks)
    if main_process:
        _report_finetune(args, model, adapter, config, counts, result)
    return 0


def _report_finetune(args: argparse.Namespace, model: Any, adapter: Any, config: Any, counts: Any, result: Any) -> None:
    """Save the adapter and ``run.json`` of a finished ``finetune`` run; print its losses."""
    from slimtune.fileio import atomic_write_json
    from slimtune.serialization import save_adapter

    output = Path(args.output)
    adapter_dir = save_adapter(model, output / "adapter")
    record = {
        "model": args.model,
        "data": args.data,
        "method": args.method,
        "adapter_config": adapter.to_dict(),
        "train_config": dataclasses.asdict(config),
        "trainable": counts.trainable,
        "total": counts.total,
        "start_step": result.start_step,
        "losses": result.losses,
        "seconds": result.seconds,
        "eval_losses": {str(k): v for k, v in result.eval_losses.items()},
        "adapter": str(adapter_dir),
    }
    atomic_write_json(output / "run.json", record)
    if result.losses:
        first, last = result.losses[0], result.losses[-1]
        steps = f"{result.start_step + 1}-{config.steps}"
        print(f"train loss {first:.4f} -> {last:.4f} over steps {steps} ({result.seconds:.1f} s)")
    if result.eval_losses:
        step, loss = max(result.eval_losses.items())
        print(f"held-out loss after step {step}: {loss:.4f} (perplexity {math.exp(loss):.2f})")
    print(f"adapter saved to {adapter_dir}")


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

    runs = [CompareRun(*parse_run(spec)) for spec in args.run] if args.run else DEFAULT_RUNS
    config = TrainConfig(**collect(args, args.train_options))
    model, tokenizer = load_named_model(args.model)
    train_blocks, eval_blocks = blocks_from_args(args, tokenizer)
    if eval_blocks is None:
        raise ConfigError(f"data={args.data!r} has no held-out split: pass --eval-data with a text file")
    torch.manual_seed(config.seed)
    record = compare(model, runs, train_blocks, eval_blocks, config, args.output, model_name=args.model)
    print(format_table(record))
    print(f"record: {Path(args.output) / 'compare.json'}; plot: {Path(args.output) / 'loss_curves.png'}")
    return 0


def cmd_linearize(args: argparse.Namespace) -> int:
    """Replace softmax attention by linear attention (DiJiang's frequency-domain kernel by default) and recover.

    Stages, each followed by the held-out loss: the original model; slimtune.linear_attention.linearize;
    attention transfer (every layer learns to reproduce its softmax output); causal-LM fine-tuning of the added
    parameters, and of an adapter with --method. Writes <output>/linear_attention (save_linearized; load it with
    load_linearized or `slimtune eval --linear-attention`), <output>/adapter with --method, and <output>/run.json.
    """
    from slimtune.fileio import atomic_write_json
    from slimtune.linear_attention import LinearizeConfig, linearize, save_linearized
    from slimtune.serialization import save_adapter
    from slimtune.training.evaluate import evaluate_lm
    from slimtune.training.recovery import attention_transfer, finetune

    la_config = LinearizeConfig(**collect(args, args.linear_options))
    adapter_values = collect(args, args.adapter_options, skip_none=True)
    if adapter_values and args.method is None:
        raise ConfigError(f"adapter options {sorted(adapter_values)} need --method")
    adapter = adapter_config(args.method, adapter_values) if args.method else None
    model, tokenizer = load_named_model(args.model)
    train_blocks, eval_blocks = blocks_from_args(args, tokenizer)
    losses: dict[str, float] = {}

    def measure(stage: str) -> None:
        if eval_blocks is not None:
            losses[stage] = evaluate_lm(model, eval_blocks)
            print(f"{stage}: held-out loss {losses[stage]:.4f} (perplexity {math.exp(losses[stage]):.2f})")

    measure("original")
    torch.manual_seed(args.seed)
    linearize(model, la_config)
    measure("linearized")
    stage = {"batch_size": args.batch_size, "warmup": args.warmup}
    if args.transfer_steps:
        attention_transfer(model, train_blocks, steps=args.transfer_steps, lr=args.transfer_lr, **stage)
        measure("attention transfer")
    if args.finetune_steps:
        model, _ = finetune(
            model, train_blocks, steps=args.finetune_steps, lr=args.finetune_lr, adapter=adapter, **stage
        )
        measure("fine-tuned")
    output = Path(args.output)
    save_linearized(model, output / "linear_attention")
    if adapter is not None and args.finetune_steps:
        save_adapter(model, output / "adapter")
    record = {
        "model": args.model,
        "data": args.data,
        "linearize_config": la_config.to_dict(),
        "adapter_config": adapter.to_dict() if adapter else None,
        "held_out_loss": [{"stage": stage, "loss": loss} for stage, loss in losses.items()],
        "transfer_steps": args.transfer_steps,
        "finetune_steps": args.finetune_steps,
    }
    atomic_write_json(output / "run.json", record)
    print(f"saved to {output}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a model, after loading an adapter and/or linear attention: held-out perplexity on text blocks,
    or zero-shot BBC News topic accuracy (the topic whose name is likeliest after the article's beginning and
    "Topic:"). Prints one JSON line."""
    from slimtune.app.corpus import bbc_news_articles, lm_blocks, split_articles
    from slimtune.app.tasks import topic_accuracy
    from slimtune.serialization import load_adapter
    from slimtune.training.data import load_texts, pack_for_lm
    from slimtune.training.evaluate import evaluate_lm

    model, tokenizer = load_named_model(args.model)
    if args.linear_attention:
        from slimtune.linear_attention import load_linearized

        load_linearized(model, args.linear_attention)
    if args.adapter:
        load_adapter(model, args.adapter)
    report: dict[str, Any] = {"task": args.task, "model": args.model, "adapter": args.adapter}
    if args.task == "perplexity":
        if args.data == "bbc":
            blocks = lm_blocks(tokenizer, args.split, args.seq_len, args.max_blocks)
        else:
            blocks = pack_for_lm(load_texts(args.data), tokenizer, args.seq_len, args.max_blocks)
        loss = evaluate_lm(model, blocks, args.batch_size)
        report.update(loss=loss, perplexity=math.exp(loss), blocks=len(blocks), seq_len=args.seq_len)
    else:
        if args.data != "bbc":
            raise ConfigError(
                f"data={args.data!r} is not allowed with task='topic': topic accuracy is on BBC News ('bbc')"
            )
        articles = bbc_news_articles()
        names = [topic for _, topic in sorted({(a.label, a.topic) for a in articles})]
        chosen = split_articles(articles)[args.split][: args.max_examples]
        accuracy = topic_accuracy(model, tokenizer, [(a.text, a.label) for a in chosen], names)
        report.update(accuracy=accuracy, examples=len(chosen), split=args.split, chance=1 / len(names))
    print(json.dumps(report))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Load an adapter, merge it into the base weights and save a plain Hugging Face model folder (model and
    tokenizer; load it with AutoModelForCausalLM.from_pretrained or `slimtune eval --model <folder>`)."""
    from slimtune.inject import merge_and_unload
    from slimtune.serialization import load_adapter

    model, tokenizer = load_named_model(args.model)
    merged = merge_and_unload(load_adapter(model, args.adapter)).to(getattr(torch, args.dtype))
    merged.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    print(f"merged model saved to {args.output}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a slimtune adapter in PEFT's LoRA format (methods lora and lora_sp; the others have no PEFT LoRA
    equivalent and are refused). peft.PeftModel.from_pretrained(base_model, <output>) loads it."""
    from slimtune.export import export_peft
    from slimtune.serialization import load_adapter

    model, _ = load_named_model(args.model)
    print(f"PEFT adapter written to {export_peft(load_adapter(model, args.adapter), args.output)}")
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


def load_named_model(name: str) -> tuple[Any, Any]:
    from slimtune.app.models import load_model

    return load_model(name)


def blocks_from_args(args: argparse.Namespace, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(training blocks, held-out blocks or None) from --data, --eval-data, --seq-len, --train-blocks, --eval-blocks."""
    from slimtune.app.corpus import lm_blocks
    from slimtune.training.data import load_texts, pack_for_lm

    if args.data == "bbc":
        train_blocks = lm_blocks(tokenizer, "train", args.seq_len, args.train_blocks)
    else:
        train_blocks = pack_for_lm(load_texts(args.data), tokenizer, args.seq_len, args.train_blocks)
    if args.eval_data:
        return train_blocks, pack_for_lm(load_texts(args.eval_data), tokenizer, args.seq_len, args.eval_blocks)
    if args.data == "bbc":
        return train_blocks, lm_blocks(tokenizer, "validation", args.seq_len, args.eval_blocks)
    return train_blocks, None
