"""Untrained pure linear attention on SmolLM2-135M: held-out perplexity against the feature size m, per feature map and
stabiliser, with the prefill cost, all in one process beside the softmax original.

Rows: the original (SDPA), then for each ``--maps`` × ``--stabilizers`` × ``--m``, ``linearize(model,
LinearizeConfig(feature_map=..., stabilizer=..., m=..., decay=...))`` with no training at all. Perplexity is
exp(mean next-token loss) over ``--blocks`` BBC News validation blocks of ``--seq-len`` tokens; ``ratio`` is it over
the original's. ``prefill_s`` is the median of ``--repeats`` forwards of one ``--prefill-length`` block (batch 1,
after a warm-up). ``--decay both`` also runs every row without the learned decay (γ = 1): the decay is initialised to
forget within 32-512 tokens, which an untrained conversion has not learned to use.

Run: ``.venv/bin/python benchmarks/kernel_curve.py`` (defaults: maps dijiang and dijiang_qmc, stabilisers exact and
per_token, m = 64 128 256, 8 blocks of 512, decay both). Writes ``benchmarks/results/kernel-curve-*.json`` and prints
the table.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from common import format_table, write_record
from slimtune.app.corpus import lm_blocks
from slimtune.app.models import load_smollm2, load_smollm2_tokenizer
from slimtune.linear_attention import LinearizeConfig, linearize
from slimtune.training import evaluate_lm


def prefill_seconds(model: torch.nn.Module, length: int, repeats: int) -> float:
    """Median seconds of one forward over ``length`` random tokens (batch 1, no cache, last logits only)."""
    ids = torch.randint(0, 1000, (1, length), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        model(ids[:, :64], use_cache=False, logits_to_keep=1)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model(ids, use_cache=False, logits_to_keep=1)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def row(label: str, config: LinearizeConfig | None, blocks: torch.Tensor, args: argparse.Namespace) -> dict:
    model, _ = load_smollm2(dtype=torch.float32)
    if config is not None:
        torch.manual_seed(0)
        linearize(model, config)
    model.eval()
    loss = evaluate_lm(model, blocks, batch_size=args.batch_size)
    result = {
        "row": label,
        "feature_map": None if config is None else config.feature_map,
        "stabilizer": None if config is None else config.stabilizer,
        "m": None if config is None else config.m,
        "decay": None if config is None else config.decay,
        "loss": loss,
        "perplexity": math.exp(loss),
        "prefill_s": prefill_seconds(model, args.prefill_length, args.repeats),
    }
    print(f"{label}: perplexity {result['perplexity']:.2f}, prefill {result['prefill_s']:.2f} s", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--maps", nargs="+", default=["dijiang", "dijiang_qmc"])
    parser.add_argument("--stabilizers", nargs="+", default=["exact", "per_token"])
    parser.add_argument("--m", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--decay", choices=["on", "off", "both"], default="both")
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--prefill-length", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    blocks = lm_blocks(load_smollm2_tokenizer(), "validation", args.seq_len, args.blocks)
    decays = {"on": [True], "off": [False], "both": [True, False]}[args.decay]
    rows = [row("original", None, blocks, args)]
    for feature_map in args.maps:
        for stabilizer in args.stabilizers:
            for decay in decays:
                for m in args.m:
                    config = LinearizeConfig(feature_map=feature_map, stabilizer=stabilizer, m=m, decay=decay)
                    label = f"{feature_map} {stabilizer} m={m}" + ("" if decay else " no decay")
                    rows.append(row(label, config, blocks, args))
    base = rows[0]
    for r in rows:
        r["ratio"] = r["perplexity"] / base["perplexity"]
        r["prefill_ratio"] = r["prefill_s"] / base["prefill_s"]
    settings = {key: getattr(args, key) for key in vars(args)} | {"threads_used": torch.get_num_threads()}
    path = write_record("kernel-curve", {"settings": settings, "rows": rows})
    print(format_table(rows, ["row", "perplexity", "ratio", "prefill_s", "prefill_ratio"]))
    print(f"record: {path}")


if __name__ == "__main__":
    main()
