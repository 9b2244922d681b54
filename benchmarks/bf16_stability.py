"""bfloat16 stability: every adapter trains SmolLM2-135M in bfloat16 for N AdamW steps and stays finite.

Each configuration starts from the same weights and sees the same BBC News blocks in the same order. After every
step the loss, the largest |gradient| entry and the finiteness of loss, gradients and trainable weights are
recorded. ``--precisions`` chooses how (each a row per method, so their step times compare in one process):

- ``bf16``: base and adapter in bfloat16, no float32 master copy (the default: the hardest case);
- ``bf16-base``: bfloat16 base, float32 adapters (slimtune's default for ``--dtype bfloat16``);
- ``autocast``: float32 weights under ``torch.autocast("cpu", torch.bfloat16)``, what ``--mixed-precision bf16``
  turns on through accelerate;
- ``float32``: everything float32, the reference for the speed ratios.

Run: ``.venv/bin/python benchmarks/bf16_stability.py`` (``--steps``, ``--seq-len``, ``--methods``,
``--precisions``). Writes ``benchmarks/results/bf16-stability-<time>.json`` and prints a table: precision, method,
first loss, last loss, max abs grad, finite steps, all finite, s/step and its ratio to float32 (when run).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import time

import torch

import slimtune as st
from common import format_table, write_record
from slimtune.app.corpus import lm_blocks
from slimtune.app.models import load_smollm2

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def configs() -> dict[str, tuple[st.AdapterConfig, float]]:
    """Method name → (config, learning rate): every method and variant, sized for SmolLM2's 576/192/1536 layers."""
    return {
        "lora": (st.LoraConfig(r=8, alpha=16, target_modules=TARGETS), 1e-3),
        "lora_sp": (st.LoraSpConfig(r=8, alpha=16, target_modules=TARGETS), 1e-3),
        "bone": (st.DishaConfig(r=64, target_modules=TARGETS), 2e-4),
        "mini": (st.DishaConfig(r=64, variant="mini", mini_r=64, target_modules=TARGETS), 2e-4),
        "bat_col": (st.DishaConfig(r=64, variant="bat_col", target_modules=TARGETS), 2e-4),
        "bat_row": (st.DishaConfig(r=64, variant="bat_row", target_modules=TARGETS), 2e-4),
        **{
            f"surm_{structure}": (st.SurmConfig(structure=structure, block_size=64, r=64, target_modules=TARGETS), 2e-4)
            for structure in ("circulant", "toeplitz", "toeplitz_symmetric", "toeplitz_product", "kronecker", "ldr")
        },
        "surm_adapter": (st.SurmAdapterConfig(structure="circulant", block_size=64), 2e-4),
    }


PRECISIONS = ("bf16", "bf16-base", "autocast", "float32")


def run(model: torch.nn.Module, blocks: torch.Tensor, lr: float, steps: int, autocast: bool = False) -> dict:
    """``steps`` AdamW steps of batch 1 over ``blocks`` [n, T] in order (the forward under bfloat16 autocast when
    ``autocast``); the per-step losses and gradient maxima."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses, grad_max, finite_steps = [], [], 0
    start = time.perf_counter()
    for step in range(steps):
        batch = blocks[step % len(blocks)].unsqueeze(0)  # [1, T]
        cast = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with cast:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        largest = max(p.grad.detach().abs().max().item() for p in params)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        weights_finite = all(bool(p.detach().isfinite().all()) for p in params)
        losses.append(loss.item())
        grad_max.append(largest)
        finite_steps += int(math.isfinite(losses[-1]) and math.isfinite(largest) and weights_finite)
    return {
        "losses": losses,
        "grad_max": grad_max,
        "finite_steps": finite_steps,
        "seconds": time.perf_counter() - start,
        "param_dtypes": sorted({str(p.dtype) for p in params}),
    }


def adapted(base: torch.nn.Module, config: st.AdapterConfig, precision: str) -> torch.nn.Module:
    """A copy of the float32 ``base`` with ``config``'s adapter, in the dtypes of ``precision``."""
    torch.manual_seed(0)
    if precision == "bf16-base":
        return st.get_adapted_model(copy.deepcopy(base).to(torch.bfloat16), config)  # float32 adapters
    model = st.get_adapted_model(copy.deepcopy(base), config)
    return model.to(torch.bfloat16) if precision == "bf16" else model  # bf16: the adapters too


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--methods", nargs="*", default=None, help="subset of the method names (default: all)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=["bf16"], help="default: bf16")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    chosen = {k: v for k, v in configs().items() if args.methods is None or k in args.methods}
    base, tokenizer = load_smollm2(dtype=torch.float32)
    blocks = lm_blocks(tokenizer, "train", seq_len=args.seq_len, max_blocks=args.steps)
    rows, results = [], {}
    for precision in args.precisions:
        for name, (config, lr) in chosen.items():
            model = adapted(base, config, precision)
            result = run(model, blocks, lr, args.steps, autocast=precision == "autocast")
            results[f"{precision} {name}"] = {"config": config.to_dict(), "lr": lr, **result}
            rows.append(
                {
                    "precision": precision,
                    "method": name,
                    "first loss": result["losses"][0],
                    "last loss": result["losses"][-1],
                    "max abs grad": max(result["grad_max"]),
                    "finite steps": f"{result['finite_steps']}/{args.steps}",
                    "all finite": "yes" if result["finite_steps"] == args.steps else "NO",
                    "s/step": result["seconds"] / args.steps,
                }
            )
            print(format_table(rows[-1:], list(rows[-1])).splitlines()[-1], flush=True)
    reference = {row["method"]: row["s/step"] for row in rows if row["precision"] == "float32"}
    for row in rows:
        row["time vs float32"] = row["s/step"] / reference[row["method"]] if row["method"] in reference else None
    settings = {"steps": args.steps, "batch": 1, "seq_len": args.seq_len, "precisions": args.precisions}
    settings["model"] = "SmolLM2-135M"
    path = write_record("bf16-stability", {"settings": settings, "results": results})
    print(format_table(rows, list(rows[0])))
    print(f"record: {path}")


if __name__ == "__main__":
    main()
