"""Convergence study: the demo's five methods at equal trainable parameters, best of a learning-rate sweep each.

SmolLM2-135M, all seven projections of every layer, BBC News text: LoRA r=8 (2.44M trainable), Bone r=16
(2.49M), Bat-Row r=16 (2.40M), SURM circulant b=96 (2.21M), LoRA-SP r=16 with half of A and B frozen (2.44M).
Every method runs at each learning rate of its sweep on the same blocks in the
same order (``slimtune.app.compare``); the best learning rate per method is the one with the lowest final held-out
loss. Prints the best runs' training and held-out losses over steps, writes the curves of the best runs to
``<out>/best_curves.png`` and a JSON record. The DiSHA paper claims Bone's loss falls faster than LoRA's: the
table says whether it does here.

Run: ``.venv/bin/python benchmarks/convergence.py`` (``--steps``, ``--batch``, ``--methods``, ``--out``). The
demo's learning rates (``slimtune.app.compare.DEFAULT_RUNS``) are this study's best at the demo's 20 steps.
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import slimtune as st
from common import format_table, write_record
from slimtune.app.compare import SMOOTHING_WINDOW, CompareRun, compare, smoothed, study_config
from slimtune.app.corpus import lm_blocks
from slimtune.app.models import load_smollm2

METHODS = {
    "lora": (st.LoraConfig(r=8, alpha=16.0), (1e-3, 3e-3, 1e-2)),
    "bone": (st.DishaConfig(r=16, variant="bone"), (3e-4, 1e-3, 3e-3)),
    "bat_row": (st.DishaConfig(r=16, variant="bat_row"), (3e-4, 1e-3, 3e-3)),
    "surm_circulant": (st.SurmConfig(structure="circulant", block_size=96), (3e-4, 1e-3, 3e-3)),
    "lora_sp": (st.LoraSpConfig(r=16, alpha=32.0, freeze_fraction=0.5), (1e-3, 3e-3, 1e-2)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-blocks", type=int, default=16)
    parser.add_argument("--out", default="runs/convergence")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="default: all")
    args = parser.parse_args()

    model, tokenizer = load_smollm2(dtype=torch.float32)
    train_blocks = lm_blocks(tokenizer, split="train", seq_len=args.seq_len, max_blocks=args.steps * args.batch)
    held_out = lm_blocks(tokenizer, split="validation", seq_len=args.seq_len, max_blocks=args.eval_blocks)
    runs = [
        CompareRun(f"{name}_lr{lr:g}", config, lr=lr)
        for name in args.methods
        for config, lrs in [METHODS[name]]
        for lr in lrs
    ]
    config = study_config(args.steps, args.batch, evaluations=5, progress=False)
    record = compare(model, runs, train_blocks, held_out, config, args.out, model_name="SmolLM2-135M-Instruct")

    best = {}
    for row in record["rows"]:
        method = row["label"].split("_lr")[0]
        if method not in best or row["eval_loss"] < best[method]["eval_loss"]:
            best[method] = row
    checkpoints = sorted({int(s) for row in best.values() for s in row["eval_losses"]})
    table = [
        {
            "method": method,
            "lr": row["label"].split("_lr")[1],
            "trainable": row["trainable"],
            **{f"val@{s}": row["eval_losses"][str(s)] for s in checkpoints},
            "train_last5": row["train_loss"],
        }
        for method, row in best.items()
    ]
    sweep = [
        {"run": row["label"], "val_loss": row["eval_loss"], "train_last5": row["train_loss"]} for row in record["rows"]
    ]
    print(f"\n## base held-out loss {record['base_eval_loss']:.4f}; all runs\n")
    print(format_table(sweep, ["run", "val_loss", "train_last5"]))
    print("\n## best learning rate per method: held-out loss over steps\n")
    print(format_table(table, ["method", "lr", "trainable", *[f"val@{s}" for s in checkpoints], "train_last5"]))

    figure, (train_axes, eval_axes) = plt.subplots(1, 2, figsize=(11, 4))
    for row in best.values():
        steps = range(1, len(row["losses"]) + 1)
        (line,) = train_axes.plot(steps, row["losses"], linewidth=0.6, alpha=0.3)
        train_axes.plot(steps, smoothed(row["losses"]), color=line.get_color(), label=row["label"])
        evals = sorted((int(s), v) for s, v in row["eval_losses"].items())
        eval_axes.plot(*zip(*evals), "o-", color=line.get_color(), label=row["label"])
    train_axes.set(title=f"training loss (per batch, faint; {SMOOTHING_WINDOW}-step mean)", xlabel="step")
    eval_axes.set(title="held-out BBC News loss", xlabel="step")
    train_axes.legend()
    figure.tight_layout()
    figure.savefig(f"{args.out}/best_curves.png", dpi=120)
    record = write_record("convergence", {"args": vars(args), "best": table, "sweep": sweep})
    print(f"\ncurves: {args.out}/best_curves.png; record: {record}")


if __name__ == "__main__":
    main()
