"""``slimtune linearize``: convert a model's softmax attention to linear attention and recover it (attention transfer,
then LM fine-tuning), with an optional layer ranking for a layer-selective hybrid."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch

from slimtune.app.commands import apply_mixed_precision, load_named_model, refuse_chat_data
from slimtune.app.data_options import training_data
from slimtune.app.options import adapter_config, collect
from slimtune.app.outputs import check_run_folder
from slimtune.config import check_int, check_number
from slimtune.errors import ConfigError


def cmd_linearize(args: argparse.Namespace) -> int:
    """Replace softmax attention by linear attention (DiJiang's frequency-domain kernel by default) and recover.

    Stages, each followed by the held-out loss: the original model; slimtune.linear_attention.linearize (every
    attention layer but --softmax-layers; with --rank-layers K, then the K layers whose restored softmax attention
    lowers the held-out loss most are kept softmax too); attention transfer (every layer learns to reproduce its
    softmax output); fine-tuning of the added parameters, and of an adapter with --method, on the causal-LM loss or,
    with --finetune-loss distill, on the KL to the original model's next-token distributions. Writes
    <output>/linear_attention (save_linearized; load it with load_linearized or `slimtune eval --linear-attention`),
    <output>/adapter with --method, and <output>/run.json (with the layer ranking).

    example (a hybrid keeping the 4 layers that most deserve softmax attention):
      slimtune linearize --rank-layers 4 --window 64 --sink-tokens 4
    """
    from slimtune.app.layer_ranking_commands import keep_best_softmax_layers
    from slimtune.fileio import atomic_write_json
    from slimtune.linear_attention import LinearizeConfig, linearize, linearize_config, save_linearized
    from slimtune.serialization import save_adapter
    from slimtune.training.distillation import distillation_loss
    from slimtune.training.evaluate import evaluate_lm
    from slimtune.training.losses import causal_lm_loss
    from slimtune.training.recovery import attention_transfer, finetune

    apply_mixed_precision(args)
    la_config = LinearizeConfig(**collect(args, args.linear_options))
    adapter_values = collect(args, args.adapter_options, skip_none=True)
    if adapter_values and args.method is None:
        raise ConfigError(f"adapter options {sorted(adapter_values)} need --method")
    adapter = adapter_config(args.method, adapter_values) if args.method else None
    check_int("transfer_blocks", args.transfer_blocks)
    check_int("rank_passkey_length", args.rank_passkey_length)
    check_int("rank_passkey_keys", args.rank_passkey_keys)
    if args.rank_search == "greedy" and args.rank_layers is None:
        raise ConfigError("--rank-search greedy needs --rank-layers K (K >= 1): the layers it chooses")
    if args.rank_candidates is not None and (args.rank_layers is None or args.rank_search != "greedy"):
        raise ConfigError(
            "--rank-candidates needs --rank-layers K and --rank-search greedy: the layers it chooses from"
        )
    if args.rank_layers is not None and args.rank_layers < 0:  # the upper bound needs the model (its layer count)
        raise ConfigError(f"--rank-layers {args.rank_layers} is not allowed: expected an integer >= 0")
    check_number("window_dropout", args.window_dropout, at_least=0, below=1)
    if args.window_dropout and not la_config.window:
        raise ConfigError(f"--window-dropout {args.window_dropout} needs a softmax window: add --window W (W > 0)")
    check_run_folder(Path(args.output), overwrite=args.overwrite)
    refuse_chat_data(args.data, "linearize")
    model, tokenizer = load_named_model(args.model, args.dtype)
    train_blocks, eval_blocks, _ = training_data(args, tokenizer)
    losses: dict[str, float] = {}

    def measure(stage: str) -> None:
        if eval_blocks is not None:
            losses[stage] = evaluate_lm(model, eval_blocks)
            print(f"{stage}: held-out loss {losses[stage]:.4f} (perplexity {math.exp(losses[stage]):.2f})")

    measure("original")
    torch.manual_seed(args.seed)
    linearize(model, la_config)
    ranking = None
    if args.rank_layers is not None:
        ranking = keep_best_softmax_layers(
            model,
            eval_blocks,
            args.rank_layers,
            args.batch_size,
            rank_by=args.rank_by,
            tokenizer=tokenizer,
            passkey_length=args.rank_passkey_length,
            passkey_depths=args.rank_passkey_depths,
            passkey_keys=args.rank_passkey_keys,
            candidates=args.rank_candidates,
            search=args.rank_search,
        )
    measure("linearized")
    stage = {"batch_size": args.batch_size, "warmup": args.warmup}
    if args.transfer_steps:
        transfer_blocks = train_blocks[: args.transfer_blocks]
        attention_transfer(
            model,
            transfer_blocks,
            steps=args.transfer_steps,
            lr=args.transfer_lr,
            compare=args.transfer_compare,
            **stage,
        )
        measure("attention transfer")
    if args.finetune_steps:
        # distill: the teacher is the original, computed from the converted model's own weights
        loss_fn = distillation_loss(None) if args.finetune_loss == "distill" else causal_lm_loss
        model, _ = finetune(
            model,
            train_blocks,
            steps=args.finetune_steps,
            lr=args.finetune_lr,
            adapter=adapter,
            window_dropout=args.window_dropout,
            seed=args.seed,
            loss_fn=loss_fn,
            **stage,
        )
        measure("fine-tuned")
    output = Path(args.output)
    save_linearized(model, output / "linear_attention")
    if adapter is not None and args.finetune_steps:
        save_adapter(model, output / "adapter")
    record = {
        "model": args.model,
        "data": args.data,
        "linearize_config": linearize_config(model).to_dict(),
        "layer_ranking": ranking,
        "rank_by": args.rank_by if ranking is not None else None,
        "rank_search": args.rank_search if ranking is not None else None,
        "rank_candidates": args.rank_candidates if ranking is not None else None,
        "rank_passkey": passkey_prompts(args) if ranking is not None and args.rank_by == "passkey" else None,
        "adapter_config": adapter.to_dict() if adapter else None,
        "held_out_loss": [{"stage": stage, "loss": loss} for stage, loss in losses.items()],
        "transfer_steps": args.transfer_steps,
        "transfer_blocks": args.transfer_blocks,
        "transfer_compare": args.transfer_compare,
        "finetune_steps": args.finetune_steps,
        "window_dropout": args.window_dropout,
        "finetune_loss": args.finetune_loss if args.finetune_steps else None,  # None: nothing was fine-tuned
    }
    atomic_write_json(output / "run.json", record)
    print(f"saved to {output}")
    return 0


def passkey_prompts(args: argparse.Namespace) -> dict[str, Any]:
    """The passkey prompts a ``--rank-by passkey`` ranking scored, for run.json."""
    return {"length": args.rank_passkey_length, "depths": args.rank_passkey_depths, "keys": args.rank_passkey_keys}
