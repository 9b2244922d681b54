"""Attention transfer on SmolLM2-135M: the cached path against the hook-based one, in the same process.

Speed: tokens per CPU-second (process time, all threads) of ``attention_transfer``, each path measured as the
difference between two runs of different length from the same conversion, so that the set-up, and on the cached
path the filling of the cache, cancel out: hook-based runs of ``--steps`` and 3 × ``--steps`` steps on fresh
blocks; cached runs over ``--cache-blocks`` blocks of n/batch steps (every block cached once) and of that plus
``--warm-epochs`` epochs. The cached path is also timed whole (fill included) over its longer run. Medians of
``--repeats`` repeats.

Quality at equal cost: from the same untrained conversion, each path trains for ``--budget`` CPU-seconds worth of
steps (the step counts come from the speed measurement; the cached run pays its cache fill out of the budget),
then the held-out attention MSE (summed over layers, ``attention_mse`` on BBC News validation blocks) is compared.

Run: ``.venv/bin/python benchmarks/transfer_speed.py`` (2 threads by default; a few minutes on 2 cores). Writes
``benchmarks/results/transfer-speed-*.json``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch

from common import format_table, write_record
from slimtune.app.corpus import lm_blocks
from slimtune.app.models import load_smollm2
from slimtune.linear_attention import LinearizeConfig, linearize
from slimtune.training import TrainResult
from slimtune.training.recovery import attention_mse, attention_transfer


def cpu_run(train: Callable[[], TrainResult]) -> tuple[float, TrainResult]:
    """(process CPU seconds, result) of one training call."""
    start = time.process_time()
    result = train()
    return time.process_time() - start, result


def transfer(model: torch.nn.Module, blocks: torch.Tensor, steps: int, args: argparse.Namespace, cached: bool):
    """A function running ``steps`` transfer steps on a copy of ``model`` (the copy is made outside the timing)."""
    trained = copy.deepcopy(model)

    def train() -> TrainResult:
        return attention_transfer(
            trained, blocks, steps=steps, batch_size=args.batch, lr=args.lr, cached=cached, progress=False
        )

    return trained, train


def speed(model: torch.nn.Module, fresh: torch.Tensor, cache_blocks: torch.Tensor, args: argparse.Namespace) -> dict:
    """Tokens per CPU-second of both paths, and the CPU seconds of a step and of the cache fill (medians)."""
    tokens = args.batch * fresh.shape[1]
    fill_steps = len(cache_blocks) // args.batch
    warm_steps = args.warm_epochs * fill_steps
    hook, cached, cached_whole, fill = [], [], [], []
    for _ in range(args.repeats):
        short = cpu_run(transfer(model, fresh, args.steps, args, cached=False)[1])[0]
        long = cpu_run(transfer(model, fresh, 3 * args.steps, args, cached=False)[1])[0]
        hook.append((long - short) / (2 * args.steps))
        first = cpu_run(transfer(model, cache_blocks, fill_steps, args, cached=True)[1])[0]
        whole = cpu_run(transfer(model, cache_blocks, fill_steps + warm_steps, args, cached=True)[1])[0]
        cached.append((whole - first) / warm_steps)
        cached_whole.append(whole / (fill_steps + warm_steps))
        fill.append(first - fill_steps * cached[-1])
        print({"hook_step_cpu_s": hook[-1], "cached_step_cpu_s": cached[-1], "fill_cpu_s": fill[-1]}, flush=True)
    hook_s, cached_s = statistics.median(hook), statistics.median(cached)
    whole_s = statistics.median(cached_whole)
    return {
        "hook_step_cpu_s": hook_s,
        "cached_step_cpu_s": cached_s,
        "cached_with_fill_step_cpu_s": whole_s,
        "fill_cpu_s": statistics.median(fill),
        "hook_tokens_per_cpu_s": tokens / hook_s,
        "cached_tokens_per_cpu_s": tokens / cached_s,
        "cached_with_fill_tokens_per_cpu_s": tokens / whole_s,
        "samples": {"hook": hook, "cached": cached, "cached_with_fill": cached_whole, "fill": fill},
    }


def equal_budget(
    model: torch.nn.Module, train: torch.Tensor, held_out: torch.Tensor, rates: dict, args: argparse.Namespace
) -> list[dict]:
    """Held-out attention MSE after ``args.budget`` CPU-seconds of each path, from the same conversion."""
    untrained = sum(attention_mse(model, held_out))
    rows = [{"path": "untrained", "steps": 0, "cpu_s": 0.0, "held_out_mse": untrained, "train_loss": None}]
    hook_steps = max(1, round(args.budget / rates["hook_step_cpu_s"]))
    cached_steps = max(1, round((args.budget - rates["fill_cpu_s"]) / rates["cached_step_cpu_s"]))
    plans = [
        ("hook-based", train[: hook_steps * args.batch], hook_steps, False),
        (f"cached, {args.cache_blocks} blocks", train[: args.cache_blocks], cached_steps, True),
    ]
    for label, blocks, steps, cached in plans:
        trained, run = transfer(model, blocks, steps, args, cached=cached)
        seconds, result = cpu_run(run)
        mse = sum(attention_mse(trained, held_out))
        row = {"path": label, "steps": steps, "cpu_s": seconds, "held_out_mse": mse, "train_loss": result.losses[-1]}
        row["mse_vs_untrained"] = mse / untrained
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--feature-map", default="dijiang_qmc", choices=["dijiang", "dijiang_qmc"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2, help="hook-based timing: runs of N and 3N steps")
    parser.add_argument("--cache-blocks", type=int, default=16, help="distinct blocks the cached path cycles over")
    parser.add_argument("--warm-epochs", type=int, default=2, help="cached timing: epochs after the filling one")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lr", type=float, default=5e-2)
    parser.add_argument("--budget", type=float, default=120.0, help="CPU-seconds per path for the MSE comparison")
    parser.add_argument("--eval-blocks", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, tokenizer = load_smollm2(dtype=torch.float32)
    config = LinearizeConfig(feature_map=args.feature_map)
    model = linearize(base, config)
    train = lm_blocks(tokenizer, split="train", seq_len=args.seq_len, max_blocks=2000)
    held_out = lm_blocks(tokenizer, split="validation", seq_len=args.seq_len, max_blocks=args.eval_blocks)
    rates = speed(model, train[args.cache_blocks :], train[: args.cache_blocks], args)
    rows = equal_budget(model, train, held_out, rates, args)
    hook = rates["hook_tokens_per_cpu_s"]
    speed_rows = [
        {"path": "hook-based", "tokens_per_cpu_s": hook, "ratio": 1.0},
        {"path": "cached (warm)", "tokens_per_cpu_s": rates["cached_tokens_per_cpu_s"]},
        {"path": "cached (fill included)", "tokens_per_cpu_s": rates["cached_with_fill_tokens_per_cpu_s"]},
    ]
    for row in speed_rows[1:]:
        row["ratio"] = row["tokens_per_cpu_s"] / hook
    title = f"SmolLM2-135M, {args.feature_map}, batch {args.batch} x {args.seq_len}, {args.threads} threads"
    print(f"\n## Attention transfer speed, {title} (ratio > 1: faster than hook-based)\n")
    print(format_table(speed_rows, ["path", "tokens_per_cpu_s", "ratio"]))
    print(f"\n## Held-out attention MSE after {args.budget:g} CPU-seconds\n")
    print(format_table(rows, ["path", "steps", "cpu_s", "held_out_mse", "mse_vs_untrained", "train_loss"]))
    record = {"args": vars(args), "config": config.to_dict(), "speed": speed_rows, "rates": rates, "budget": rows}
    print(f"\nrecord: {write_record('transfer-speed', record)}")


if __name__ == "__main__":
    main()
