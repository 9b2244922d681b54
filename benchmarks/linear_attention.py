"""SmolLM2-135M with DiJiang linear attention vs the original (SDPA softmax attention), in the same process.

Speed (default): for each context length T,
- prefill: seconds for one forward over T tokens (batch 1, no cache, logits of the last token only);
- decode: milliseconds per token for ``--decode-steps`` one-token steps after a context of T tokens, and the
  bytes the cache holds there. The SDPA model decodes on an HF ``DynamicCache`` and the linear one on a
  ``LinearAttentionCache``. Both caches are filled synthetically (random keys/values of length T, random
  states that have "seen" T tokens) instead of by a T-token prefill: a decode step's cost depends on the
  cache's size, not its values, and this keeps 16k contexts affordable on 2 cores.

Quality (``--quality``): held-out BBC News perplexity of the original model, the untrained conversion, after
stage 1 (attention transfer) and after stage 2 (LM fine-tuning of the new parameters + LoRA), with the tokens
each stage used and its wall time. With ``--window`` the untrained hybrid is also evaluated with its linear part
off (softmax window and sinks only), and ``--window-only`` keeps it off for the whole run (no attention transfer, the
same LM fine-tuning of the adapter alone); ``--reference-finetune`` also fine-tunes the original model with the same
LoRA, steps and data, since LM fine-tuning on BBC News lowers the original's perplexity too.

Run: ``.venv/bin/python benchmarks/linear_attention.py --lengths 512 2048 8192 16384`` (add ``--max-prefill N``
to skip prefill above N tokens, whose SDPA forward alone takes minutes on 2 cores; ``--threads 1`` on a machine
shared with other jobs, where two OpenMP threads on one free core make every small op stall) or
``.venv/bin/python benchmarks/linear_attention.py --quality``. Writes ``benchmarks/results/linear-attention-*``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import math
import time
from collections.abc import Callable, Iterator

import torch
from transformers import DynamicCache

import slimtune as st
from common import format_table, time_call, write_record
from slimtune.app.models import load_smollm2
from slimtune.linear_attention import (
    LinearAttentionCache,
    LinearAttentionCacheLayer,
    LinearAttentionState,
    LinearizeConfig,
    cache_nbytes,
    linear_attention_layers,
    linear_attention_parameters,
    linearize,
)
from slimtune.linear_attention.window import WindowState
from slimtune.training import TrainResult, evaluate_lm, train_lm
from slimtune.training.recovery import attention_mse, attention_transfer, finetune

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def filled_kv_cache(model: torch.nn.Module, length: int) -> DynamicCache:
    """A DynamicCache holding ``length`` random keys/values [1, Hkv, T, d] in every layer."""
    cfg = model.config
    cache = DynamicCache(config=cfg)
    shape = (1, cfg.num_key_value_heads, length, cfg.hidden_size // cfg.num_attention_heads)
    for i in range(cfg.num_hidden_layers):
        cache.update(torch.randn(shape), torch.randn(shape), i)
    return cache


def filled_state_cache(model: torch.nn.Module, length: int) -> LinearAttentionCache:
    """A LinearAttentionCache whose every layer holds a random state that has seen ``length`` tokens.

    With a softmax window the state is a ``WindowState`` holding min(length, w) window and n_s sink tokens.
    """
    cache = LinearAttentionCache()
    for _, layer in linear_attention_layers(model):
        h, d, m = layer.num_heads, layer.head_dim, layer.feature_map.m
        c = layer.config
        if c.window:
            kept, sinks = min(length, c.window), min(length, c.sink_tokens)
            state = WindowState(
                linear=LinearAttentionState(S=torch.randn(1, h, m, d + 1)),
                k=torch.randn(1, h, kept, d),
                v=torch.randn(1, h, kept, d),
                fk=torch.rand(1, h, kept, m),
                lk=torch.zeros(1, h, kept),  # the window keys' log scales (exact stabiliser): none
                valid=torch.ones(1, kept, dtype=torch.bool),
                sink_k=torch.randn(1, h, sinks, d),
                sink_v=torch.randn(1, h, sinks, d),
                sink_valid=torch.ones(1, sinks, dtype=torch.bool),
                seen=length,
            )
        else:
            z = torch.rand(1, h, m) if c.normalize else None
            state = LinearAttentionState(S=torch.randn(1, h, m, d), z=z)
        cache.layers.append(LinearAttentionCacheLayer())
        cache.layers[-1].advance(state, length)
    return cache


@torch.no_grad()
def decode_ms(model: torch.nn.Module, cache: object, steps: int) -> float:
    """Milliseconds per one-token step on ``cache`` (one warm-up step first)."""
    token = torch.tensor([[42]])

    def step() -> None:
        model(token, past_key_values=cache, use_cache=True, logits_to_keep=1)

    step()
    seconds = time_call(lambda: [step() for _ in range(steps)])
    return 1000 * seconds / steps


@torch.no_grad()
def prefill_s(model: torch.nn.Module, length: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    return time_call(lambda: model(ids, use_cache=False, logits_to_keep=1))


def speed(args: argparse.Namespace, config: LinearizeConfig) -> dict:
    base, _ = load_smollm2(dtype=torch.float32)
    linear = linearize(copy.deepcopy(base), config)
    prefill_s(base, 64), prefill_s(linear, 64)
    rows = []
    for length in args.lengths:
        row: dict = {"T": length}
        if length <= args.max_prefill:
            row["sdpa_prefill_s"] = prefill_s(base, length)
            row["linear_prefill_s"] = prefill_s(linear, length)
            row["prefill_ratio"] = row["sdpa_prefill_s"] / row["linear_prefill_s"]
        kv, state = filled_kv_cache(base, length), filled_state_cache(linear, length)
        row["sdpa_decode_ms"] = decode_ms(base, kv, args.decode_steps)
        row["linear_decode_ms"] = decode_ms(linear, state, args.decode_steps)
        row["decode_ratio"] = row["sdpa_decode_ms"] / row["linear_decode_ms"]
        row["kv_cache_mib"] = cache_nbytes(kv) / 2**20
        row["state_mib"] = cache_nbytes(state) / 2**20
        row["memory_ratio"] = row["kv_cache_mib"] / row["state_mib"]
        rows.append(row)
        print(row, flush=True)
    columns = [
        "T",
        "sdpa_prefill_s",
        "linear_prefill_s",
        "prefill_ratio",
        "sdpa_decode_ms",
        "linear_decode_ms",
        "decode_ratio",
        "kv_cache_mib",
        "state_mib",
        "memory_ratio",
    ]
    threads = torch.get_num_threads()
    print(f"\n## SmolLM2-135M, fp32, batch 1, {threads} thread(s): SDPA / linear (ratio > 1: linear wins)\n")
    print(format_table(rows, columns))
    return {"rows": rows, "added_parameters": sum(p.numel() for p in linear_attention_parameters(linear))}


def quality(args: argparse.Namespace, config: LinearizeConfig) -> dict:
    from slimtune.app.corpus import lm_blocks

    base, tokenizer = load_smollm2(dtype=torch.float32)
    n_train = max(args.transfer_steps, args.finetune_steps) * args.batch
    train = lm_blocks(tokenizer, split="train", seq_len=args.seq_len, max_blocks=n_train)
    held_out = lm_blocks(tokenizer, split="validation", seq_len=args.seq_len, max_blocks=args.eval_blocks)
    row = functools.partial(stage_row, held_out)
    rows = [row("original (softmax)", base, 0, 0.0)]
    adapter = st.LoraConfig(r=args.lora_r, alpha=2 * args.lora_r, target_modules=LORA_TARGETS)
    if args.reference_finetune:
        rows.append(reference_finetune_row(args, base, adapter, train, row))
    start = time.perf_counter()
    model = linearize(base, config)
    seconds = time.perf_counter() - start
    mse = sum(attention_mse(model, held_out[:4]))
    rows.append(row("converted, untrained", model, 0, seconds, attention_mse=mse))
    if config.window:
        with linear_part_off(model):
            mse = sum(attention_mse(model, held_out[:4]))
            label = f"ablation: softmax window {config.window} + {config.sink_tokens} sinks only"
            rows.append(row(label, model, 0, 0.0, attention_mse=mse))
    transfer_losses, finetune_losses = recover(args, model, adapter, train, held_out, row, rows)
    columns = ["stage", "held_out_ppl", "attention_mse", "train_tokens", "seconds", "trainable"]
    held = f"held-out {len(held_out)} x {args.seq_len} tokens"
    hybrid = f", softmax window {config.window} + {config.sink_tokens} sinks" if config.window else ""
    print(f"\n## SmolLM2-135M on BBC News, {config.feature_map} feature map{hybrid}, {held}\n")
    print(format_table(rows, columns))
    return {"rows": rows, "transfer_losses": transfer_losses, "finetune_losses": finetune_losses}


def stage_row(
    held_out: torch.Tensor, stage: str, model: torch.nn.Module, tokens: int, seconds: float, **extra: object
) -> dict:
    """One row of the quality table: the model's held-out perplexity after a stage, printed as it comes."""
    loss = evaluate_lm(model, held_out)
    result = {"stage": stage, "held_out_ppl": math.exp(loss), "held_out_loss": loss, "train_tokens": tokens}
    result.update(seconds=seconds, **extra)
    print(result, flush=True)
    return result


def reference_finetune_row(
    args: argparse.Namespace, base: torch.nn.Module, adapter: st.LoraConfig, train: torch.Tensor, row: Callable
) -> dict:
    """The original softmax model fine-tuned the same way (LoRA on a copy), for comparison."""
    torch.manual_seed(0)
    reference = st.get_adapted_model(copy.deepcopy(base), adapter)
    warmup = max(1, args.finetune_steps // 10)
    tuned = train_lm(
        reference,
        train,
        steps=args.finetune_steps,
        batch_size=args.batch,
        lr=args.finetune_lr,
        warmup=warmup,
        desc="reference LM fine-tuning",
    )
    label = f"reference: original + the same LM fine-tuning (LoRA r={args.lora_r})"
    return row(label, reference, tuned.tokens, tuned.seconds, lr=args.finetune_lr)


def recover(
    args: argparse.Namespace,
    model: torch.nn.Module,
    adapter: st.LoraConfig,
    train: torch.Tensor,
    held_out: torch.Tensor,
    row: Callable,
    rows: list[dict],
) -> tuple[list[float], list[float]]:
    """Attention transfer then LM fine-tuning (or, with ``--window-only``, fine-tuning without the linear part);
    appends their rows; returns (transfer losses, fine-tuning losses)."""
    options = {"steps": args.finetune_steps, "batch_size": args.batch, "lr": args.finetune_lr}
    options["warmup"] = max(1, args.finetune_steps // 10)

    def finetune_stage(label: str, train_linear_attention: bool) -> TrainResult:
        tuned_model, tuned = finetune(
            model, train, adapter=adapter, train_linear_attention=train_linear_attention, **options
        )
        trainable = st.parameter_counts(tuned_model).trainable
        rows.append(row(label, tuned_model, tuned.tokens, tuned.seconds, trainable=trainable, lr=args.finetune_lr))
        return tuned

    torch.manual_seed(0)  # the same adapter initialisation on both paths, run after run
    if args.window_only:  # ablation: no linear part at all, only the adapter learns
        with linear_part_off(model):
            tuned = finetune_stage(f"window + sinks only, + LM fine-tuning (LoRA r={args.lora_r})", False)
        return [], tuned.losses
    warmup = max(1, args.transfer_steps // 10)
    transfer = attention_transfer(  # hook path, fresh blocks every step: as the README's recorded runs
        model, train, steps=args.transfer_steps, batch_size=args.batch, lr=args.transfer_lr, warmup=warmup, cached=False
    )
    mse = sum(attention_mse(model, held_out[:4]))
    rows.append(
        row("+ attention transfer", model, transfer.tokens, transfer.seconds, attention_mse=mse, lr=args.transfer_lr)
    )
    tuned = finetune_stage(f"+ LM fine-tuning (LoRA r={args.lora_r} + linear attention)", True)
    return transfer.losses, tuned.losses


@contextlib.contextmanager
def linear_part_off(model: torch.nn.Module) -> Iterator[None]:
    """Inside, every hybrid layer's linear weight g is 0: only the softmax window and sinks are read."""
    layers = [layer for _, layer in linear_attention_layers(model)]
    saved = [layer.window_mix_log.detach().clone() for layer in layers]
    for layer in layers:
        layer.window_mix_log.data.fill_(float("-inf"))
    try:
        yield
    finally:
        for layer, value in zip(layers, saved):
            layer.window_mix_log.data.copy_(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quality", action="store_true", help="perplexity study instead of the speed study")
    parser.add_argument("--feature-map", default="dijiang")
    parser.add_argument("--no-decay", action="store_true")
    parser.add_argument("--window", type=int, default=0, help="softmax window w (0: pure linear attention)")
    parser.add_argument("--sinks", type=int, default=0, help="sink tokens read with softmax (needs --window)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192, 16384])
    parser.add_argument("--max-prefill", type=int, default=16384, help="skip prefill timing above this length")
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--transfer-steps", type=int, default=40)
    parser.add_argument("--finetune-steps", type=int, default=40)
    parser.add_argument("--transfer-lr", type=float, default=5e-2)
    parser.add_argument("--finetune-lr", type=float, default=2e-3)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument(
        "--window-only",
        action="store_true",
        help="ablation: the linear part off for the whole run (needs --window); no attention transfer",
    )
    parser.add_argument(
        "--reference-finetune",
        action="store_true",
        help="also LM-fine-tune the original softmax model the same way, for reference",
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-blocks", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.window_only and not args.window:
        parser.error("--window-only needs --window")
    config = LinearizeConfig(
        feature_map=args.feature_map, decay=not args.no_decay, window=args.window, sink_tokens=args.sinks
    )
    record = quality(args, config) if args.quality else speed(args, config)
    name = "linear-attention-quality" if args.quality else "linear-attention-speed"
    print(f"\nrecord: {write_record(name, {'args': vars(args), 'config': config.to_dict(), **record})}")


if __name__ == "__main__":
    main()
