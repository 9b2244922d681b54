"""Attention transfer on SmolLM2-135M: the cached path against the hook-based one, in the same process.

Paths: hook-based (``cached=False``, the whole model per step), cached comparing after the output projection
(``compare="output"``, the hook path's loss) and cached comparing before it (``compare="attention"``).

Speed: tokens per CPU-second (process time, all threads) of ``attention_transfer``, each path measured as the
difference between two runs of different length from the same conversion, so that the set-up, and on the cached
paths the filling of the cache, cancel out: hook-based runs of ``--steps`` and 3 × ``--steps`` steps on fresh
blocks; cached runs over ``--cache-blocks`` blocks of n/batch steps (every block cached once) and of that plus
``--warm-epochs`` epochs. The cached paths are also timed whole (fill included) over their longer run. Medians of
``--repeats`` repeats.

Quality at equal cost: from the same untrained conversion, each path trains for ``--budget`` CPU-seconds worth of
steps (the step counts come from the speed measurement; a cached run pays its cache fill out of the budget), then
the held-out attention MSE after the output projection (summed over layers, ``attention_mse`` on BBC News
validation blocks) is compared, whatever the path trained on.

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
from slimtune.linear_attention.feature_maps import FEATURE_MAPS
from slimtune.training import TrainResult
from slimtune.training.recovery import attention_mse, attention_transfer


def cpu_run(train: Callable[[], TrainResult]) -> tuple[float, TrainResult]:
    """(process CPU seconds, result) of one training call."""
    start = time.process_time()
    result = train()
    return time.process_time() - start, result


CACHED = {"cached, after o_proj": "output", "cached, before o_proj": "attention"}


def transfer(model: torch.nn.Module, blocks: torch.Tensor, steps: int, args: argparse.Namespace, path: str):
    """A function running ``steps`` transfer steps of ``path`` (hook-based or a key of CACHED) on a copy of
    ``model`` (the copy is made outside the timing)."""
    trained = copy.deepcopy(model)
    cached = path in CACHED
    compare = CACHED.get(path, "output")

    def train() -> TrainResult:
        return attention_transfer(
            trained,
            blocks,
            steps=steps,
            batch_size=args.batch,
            lr=args.lr,
            cached=cached,
            compare=compare,
            progress=False,
        )

    return trained, train


def speed(model: torch.nn.Module, fresh: torch.Tensor, cache_blocks: torch.Tensor, args: argparse.Namespace) -> dict:
    """Per path: CPU seconds of a step (and for cached paths of a step with the fill spread, and of the fill),
    medians over the repeats, with the samples."""
    fill_steps = len(cache_blocks) // args.batch
    warm_steps = args.warm_epochs * fill_steps
    samples: dict[str, dict[str, list[float]]] = {"hook-based": {"step": []}}
    samples |= {path: {"step": [], "with_fill": [], "fill": []} for path in CACHED}
    for _ in range(args.repeats):
        short = cpu_run(transfer(model, fresh, args.steps, args, "hook-based")[1])[0]
        long = cpu_run(transfer(model, fresh, 3 * args.steps, args, "hook-based")[1])[0]
        samples["hook-based"]["step"].append((long - short) / (2 * args.steps))
        for path in CACHED:
            first = cpu_run(transfer(model, cache_blocks, fill_steps, args, path)[1])[0]
            whole = cpu_run(transfer(model, cache_blocks, fill_steps + warm_steps, args, path)[1])[0]
            step = (whole - first) / warm_steps
            samples[path]["step"].append(step)
            samples[path]["with_fill"].append(whole / (fill_steps + warm_steps))
            samples[path]["fill"].append(first - fill_steps * step)
        print({path: {key: values[-1] for key, values in s.items()} for path, s in samples.items()}, flush=True)
    medians = {path: {key: statistics.median(values) for key, values in s.items()} for path, s in samples.items()}
    return {"cpu_s": medians, "samples": samples}


def equal_budget(
    model: torch.nn.Module, train: torch.Tensor, held_out: torch.Tensor, rates: dict, args: argparse.Namespace
) -> list[dict]:
    """Held-out attention MSE after ``args.budget`` CPU-seconds of each path, from the same conversion."""
    untrained = sum(attention_mse(model, held_out))
    rows = [{"path": "untrained", "steps": 0, "cpu_s": 0.0, "held_out_mse": untrained, "train_loss": None}]
    cpu = rates["cpu_s"]
    hook_steps = max(1, round(args.budget / cpu["hook-based"]["step"]))
    plans = [("hook-based", train[: hook_steps * args.batch], hook_steps)]
    for path in CACHED:
        steps = max(1, round((args.budget - cpu[path]["fill"]) / cpu[path]["step"]))
        plans.append((path, train[: args.cache_blocks], steps))
    for path, blocks, steps in plans:
        trained, run = transfer(model, blocks, steps, args, path)
        seconds, result = cpu_run(run)
        mse = sum(attention_mse(trained, held_out))
        row = {"path": path, "steps": steps, "cpu_s": seconds, "held_out_mse": mse, "train_loss": result.losses[-1]}
        row["mse_vs_untrained"] = mse / untrained
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--feature-map", default="dijiang_qmc", choices=sorted(FEATURE_MAPS))
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
    tokens = args.batch * args.seq_len
    cpu = rates["cpu_s"]
    hook = tokens / cpu["hook-based"]["step"]
    speed_rows = [{"path": "hook-based", "tokens_per_cpu_s": hook}]
    for path in CACHED:
        speed_rows.append({"path": f"{path} (warm)", "tokens_per_cpu_s": tokens / cpu[path]["step"]})
        speed_rows.append({"path": f"{path} (fill included)", "tokens_per_cpu_s": tokens / cpu[path]["with_fill"]})
    for row in speed_rows:
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
