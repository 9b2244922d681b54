"""Classification study: MiniLM on BBC News topics (5 classes) with few examples, every method at its best rate.

Design. all-MiniLM-L6-v2 as ``BertForSequenceClassification`` (:func:`slimtune.app.models.load_classifier`),
trained on k = 8, 32 and 128 articles per class (:func:`slimtune.training.classification.k_shot`), 3 seeds, and
scored on all 223 test articles (accuracy, macro-F1). Articles are truncated to ``--max-len`` 32 tokens (the
headline and the lead's first words); batch 16; 25 / 40 / 60 AdamW steps at k = 8 / 32 / 128 with a tenth of them
warm-up and a cosine decay, dropout on (:func:`slimtune.training.loop.train` with ``classification_loss``).
Rows (``classification_rows.py`` has the configs and sweeps): the head alone (linear probe), full fine-tuning,
LoRA r = 2 and 8, LoRA-SP, Bone, Bat-Row, SURM circulant / Toeplitz / Kronecker / LDR replacing LoRA, SURM
adapters (circulant, Toeplitz, LDR) and bottleneck adapters (r = 2 and 16) after each attention and FFN output.
Every adapter trains the head with it (``modules_to_save``). Each run copies the pretrained model once loaded and
draws the new head from the seed (weight normal(0, initializer_range = 0.02), bias zero, as transformers does),
so at one seed every method starts from the same head and the same k-shot sample.

Learning rates. Each row sweeps three rates at k = 32 (else the first ``--ks``), first seed, and keeps the best by
validation accuracy (ties: lower validation loss), going on past the grid's edge while the edge rate wins
(``classification_runs.py``); every (row, k, seed) then trains at that rate. The sweep's run at the chosen rate is
scored on the test split too and stands as that (row, k, seed)'s run. ``--reuse RECORD`` continues an earlier
record of the same settings: its sweep runs count as tried, only missing rates run, and a row keeps the record's
(k, seed) runs when its chosen rate does not change.

Prints a table (rows × k, test accuracy mean ± std over seeds, trainable parameters with and without the head)
and the issue's targets computed from the runs: a SURM adapter against the r = 16 bottleneck at k = 32 and 128
(parameter ratio, accuracy gap), the best parameter-efficient row against full fine-tuning at k = 128, Bone
against LoRA r = 8 per seed, and the study's time against 45 minutes on 2 cores. Writes
``benchmarks/results/classification-*.json`` (:func:`common.write_record`) and ``<out>/accuracy_vs_params.png``.
``--decoder`` runs SmolLM2-135M as a classifier instead (LoRA r=8, Bone r=16, SURM circulant, each with its head
``score``; k = 32, batch 8, 30 steps, a two-rate sweep) and writes ``benchmarks/results/classification-decoder-*.json``.

Run: ``.venv/bin/python benchmarks/classification.py`` (``--ks``, ``--seeds``, ``--rows``, ``--steps``,
``--max-len``, ``--batch``, ``--decoder``, ``--out``). ``--quick`` is a one-minute smoke: 1 seed, k = 8, 3 rows,
one rate each, 5 steps, 32 validation and test articles; its record goes to ``<out>/classification-quick.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from classification_rows import DECODER_HEAD, HEAD, QUICK_ROWS, STEPS_BY_K, Row, decoder_rows, minilm_rows
from classification_runs import Plan, make_setup, run_study, study_seconds
from common import format_table, write_record

SWEEP_K = 32
SURM_ADAPTERS = ("surm_adapter_circulant", "surm_adapter_toeplitz", "surm_adapter_ldr")
TIME_TARGET_MINUTES = 45.0


def summarise(study: dict[str, Any], ks: list[int]) -> list[dict]:
    """Per (row, k): mean ± std (sample, over seeds) of test accuracy and macro-F1 over the finished runs."""
    summary = []
    for name in study["rows"]:
        for k in ks:
            done = [r for r in study["runs"] if r["row"] == name and r["k"] == k and "accuracy" in r]
            if not done:
                continue
            entry: dict[str, Any] = {"row": name, "k": k, "n": len(done)}
            for metric in ("accuracy", "macro_f1"):
                values = [r[metric] for r in done]
                entry[f"{metric}_mean"] = statistics.fmean(values)
                entry[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            summary.append(entry)
    return summary


def table(study: dict[str, Any], summary: list[dict], ks: list[int]) -> str:
    """Rows × k: test accuracy (%) mean ± std, the chosen rate and the trainable parameters."""
    cells = {(s["row"], s["k"]): f"{100 * s['accuracy_mean']:.1f} ± {100 * s['accuracy_std']:.1f}" for s in summary}
    lines = [
        {"row": name, "lr": f"{row['chosen_lr']:g}" if row["chosen_lr"] else "diverged", **row}
        | {f"k={k}": cells.get((name, k), "") for k in ks}
        for name, row in study["rows"].items()
    ]
    return format_table(lines, ["row", "lr", "trainable", "trainable_without_head", *[f"k={k}" for k in ks]])


def surm_adapter_target(mean: dict, rows: dict, k: int) -> tuple[list[str], dict]:
    """Target 1 at one k: each SURM adapter's parameter ratio to bottleneck_r16 and accuracy gap (points)."""
    ref = "bottleneck_r16"
    found = [
        {"row": n, "ratio": rows[n]["trainable"] / rows[ref]["trainable"], "gap": 100 * (mean[n, k] - mean[ref, k])}
        for n in SURM_ADAPTERS
        if (n, k) in mean
    ]
    if (ref, k) not in mean or not found:
        return [], {}
    eligible = [f for f in found if f["ratio"] <= 1 / 8] or found
    best = max(eligible, key=lambda f: f["gap"])
    met = best["ratio"] <= 1 / 8 and best["gap"] >= -1.0
    lines = [f"(1) k={k}: SURM adapter vs {ref} (target: gap >= -1 point at ratio <= 1/8)"]
    lines += [f"    {f['row']}: ratio {f['ratio']:.3f} (1/{1 / f['ratio']:.1f}), gap {f['gap']:+.1f}" for f in found]
    lines.append(f"    best at ratio <= 1/8: {best['row']}: {'met' if met else 'missed'}")
    return lines, {"k": k, "rows": found, "best": best["row"], "met": met}


def bone_target(study: dict[str, Any], ks: list[int]) -> tuple[list[str], list[dict]]:
    """Target 3: Bone minus LoRA r=8 test accuracy (points) per seed at each k, mean ± std over seeds."""
    lines, record = [], []
    for k in ks:
        accuracy = {(r["row"], r["seed"]): r["accuracy"] for r in study["runs"] if r["k"] == k and "accuracy" in r}
        seeds = sorted({s for n, s in accuracy if n == "bone"} & {s for n, s in accuracy if n == "lora_r8"})
        diffs = [100 * (accuracy["bone", s] - accuracy["lora_r8", s]) for s in seeds]
        if not diffs:
            continue
        mean, spread = statistics.fmean(diffs), statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        record.append({"k": k, "seeds": seeds, "differences": diffs, "mean": mean, "std": spread})
        per_seed = ", ".join(f"{d:+.1f}" for d in diffs)
        lines.append(f"(3) k={k}: Bone - LoRA r=8: {mean:+.1f} ± {spread:.1f} points (per seed: {per_seed})")
    return lines, record


def targets(
    study: dict[str, Any], summary: list[dict], ks: list[int], seconds: float, cpu_seconds: float
) -> tuple[list[str], dict]:
    """The issue's four targets computed from the runs: printable lines and their record."""
    mean = {(s["row"], s["k"]): s["accuracy_mean"] for s in summary}
    lines: list[str] = []
    record: dict[str, Any] = {"surm_adapter_vs_bottleneck": []}
    for k in (32, 128):
        more, entry = surm_adapter_target(mean, study["rows"], k)
        lines += more
        if entry:
            record["surm_adapter_vs_bottleneck"].append(entry)
    peft = [(n, m) for (n, k), m in mean.items() if k == 128 and n != "full"]
    if ("full", 128) in mean and peft:
        name, best = max(peft, key=lambda p: p[1])
        gap = 100 * (best - mean["full", 128])
        record["best_peft_vs_full_k128"] = {"row": name, "gap": gap, "met": gap >= -1.0}
        verdict = "met" if gap >= -1.0 else "missed"
        lines.append(f"(2) k=128: best PEFT row {name} vs full: {gap:+.1f} points (target >= -1: {verdict})")
    more, record["bone_vs_lora_r8"] = bone_target(study, ks)
    lines += more
    minutes, cpu_minutes, threads = seconds / 60, cpu_seconds / 60, torch.get_num_threads()
    met = minutes <= TIME_TARGET_MINUTES
    record["time"] = {"wall_minutes": minutes, "cpu_minutes": cpu_minutes, "threads": threads, "met": met}
    lines.append(
        f"(4) MiniLM study: {minutes:.1f} minutes, the sum of its runs' wall times (a --reuse record's included), "
        f"on {threads} threads ({cpu_minutes:.1f} process CPU-minutes) vs {TIME_TARGET_MINUTES:g} minutes on 2 cores: "
        f"{'met' if met else 'missed'}"
    )
    return lines, record


def plot(study: dict[str, Any], summary: list[dict], ks: list[int], path: Path) -> None:
    """Test accuracy (mean ± std over seeds) against trainable parameters (log axis), one panel per k."""
    names = list(study["rows"])
    colours = plt.get_cmap("tab20")
    markers = "osD^v<>phX*"
    figure, axes = plt.subplots(1, len(ks), figsize=(4.5 * len(ks) + 3, 4), sharey=True, squeeze=False)
    for panel, k in zip(axes[0], ks):
        for s in (s for s in summary if s["k"] == k):
            i = names.index(s["row"])
            panel.errorbar(
                study["rows"][s["row"]]["trainable"],
                100 * s["accuracy_mean"],
                yerr=100 * s["accuracy_std"],
                fmt=markers[i % len(markers)],
                color=colours(i % 20),
                capsize=3,
                label=s["row"],
            )
        panel.set(xscale="log", title=f"k = {k} per class", xlabel="trainable parameters (head included)")
        panel.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    handles = {h.get_label(): h for panel in axes[0] for h in panel.get_legend_handles_labels()[0]}
    figure.legend(handles.values(), handles.keys(), loc="center right", fontsize=8)
    figure.tight_layout(rect=(0, 0, 1 - 2.6 / figure.get_figwidth(), 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)


def parse_args() -> argparse.Namespace:
    rows = minilm_rows()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 32, 128], help="examples per class")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--rows", nargs="+", choices=list(rows), default=list(rows), metavar="ROW", help=f"of {list(rows)}"
    )
    parser.add_argument("--steps", type=int, nargs="+", help=f"one per --ks (default {STEPS_BY_K})")
    parser.add_argument("--max-len", type=int, default=32, help="tokens kept per article (headline and lead)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--decoder", action="store_true", help="the SmolLM2-135M rows instead, in their own record")
    parser.add_argument("--quick", action="store_true", help="a one-minute smoke of the whole pipeline")
    parser.add_argument("--out", default="runs/classification")
    reuse_help = "an earlier record of the same settings: its sweeps are continued, its runs kept where the rate holds"
    parser.add_argument("--reuse", type=Path, default=None, help=reuse_help)
    args = parser.parse_args()
    if args.quick:
        args.ks, args.seeds, args.rows, args.steps = [8], [0], list(QUICK_ROWS), [5]
    if args.steps is None:
        missing = [k for k in args.ks if k not in STEPS_BY_K]
        if missing:
            parser.error(f"--ks {missing} have no default step count: give --steps, one per --ks")
        args.steps = [STEPS_BY_K[k] for k in args.ks]
    if len(args.steps) != len(args.ks):
        parser.error(f"--steps has {len(args.steps)} values for {len(args.ks)} --ks: expected one per k")
    return args


def quick_rows(rows: list[Row], quick: bool) -> list[Row]:
    """The rows, each with only its middle rate under ``--quick``."""
    return [dataclasses.replace(row, lrs=row.lrs[len(row.lrs) // 2 :][:1]) if quick else row for row in rows]


def decoder_study(args: argparse.Namespace, n_eval: int | None) -> dict[str, Any]:
    """The SmolLM2-135M rows at k = 32 (k = 8 and 5 steps under ``--quick``), batch 8, 30 steps."""
    k, steps = (8, 5) if args.quick else (32, 30)
    setup = make_setup("smollm2", DECODER_HEAD, args.max_len, 8, n_eval)
    plan = Plan(quick_rows(list(decoder_rows().values()), args.quick), [k], args.seeds, {k: steps}, k)
    study = run_study(setup, plan)
    settings = {"k": k, "steps": steps, "batch": 8, "max_len": args.max_len}
    return {"settings": settings, **study, "summary": summarise(study, [k])}


def main() -> None:
    args = parse_args()
    start_cpu, start = time.process_time(), time.perf_counter()
    n_eval = 32 if args.quick else None
    if args.decoder:
        decoder_alone(args, n_eval)
        return
    setup = make_setup("minilm", HEAD, args.max_len, args.batch, n_eval)
    rows = quick_rows([minilm_rows()[name] for name in args.rows], args.quick)
    sweep_k = SWEEP_K if SWEEP_K in args.ks else args.ks[0]
    plan = Plan(rows, args.ks, args.seeds, dict(zip(args.ks, args.steps)), sweep_k)
    study = run_study(setup, plan, earlier_study(args) if args.reuse else None)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    summary = summarise(study, args.ks)
    lines, goals = targets(study, summary, args.ks, *study_seconds(study))
    print(f"\n## MiniLM, BBC topics: test accuracy (%) over {len(args.seeds)} seed(s), {len(setup.test)} articles\n")
    print(table(study, summary, args.ks))
    print("\n## targets\n\n" + "\n".join(lines))
    record: dict[str, Any] = {
        "args": {**vars(args), "reuse": args.reuse and str(args.reuse)},
        "sweep_k": sweep_k,
        "n_test": len(setup.test),
    }
    record |= {"n_validation": len(setup.validation), "minilm": {**study, "summary": summary}, "targets": goals}
    record |= {"process_seconds": seconds, "process_cpu_seconds": cpu_seconds}
    path = write_record("classification", record, Path(args.out) / "classification-quick.json" if args.quick else None)
    print(f"\nrecord: {path}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    plot(study, summary, args.ks, Path(args.out) / "accuracy_vs_params.png")
    print(f"plot: {Path(args.out) / 'accuracy_vs_params.png'}")


def earlier_study(args: argparse.Namespace) -> dict[str, Any]:
    """The MiniLM study of the ``--reuse`` record; SystemExit when its settings differ from this run's."""
    record = json.loads(args.reuse.read_text(encoding="utf-8"))
    settings = ("ks", "seeds", "steps", "max_len", "batch")
    differing = [key for key in settings if record["args"].get(key) != getattr(args, key)]
    if differing:
        raise SystemExit(f"--reuse {args.reuse}: its {differing} differ from this run's; expected the same settings")
    return record["minilm"]


def decoder_alone(args: argparse.Namespace, n_eval: int | None) -> None:
    """``--decoder``: the SmolLM2-135M rows, printed and written as ``classification-decoder-*.json``."""
    start_cpu, start = time.process_time(), time.perf_counter()
    record: dict[str, Any] = {
        "args": {**vars(args), "reuse": args.reuse and str(args.reuse)},
        "decoder": decoder_study(args, n_eval),
    }
    record |= {"total_seconds": time.perf_counter() - start, "total_cpu_seconds": time.process_time() - start_cpu}
    print("\n## SmolLM2-135M as classifier: test accuracy (%)\n")
    print(table(record["decoder"], record["decoder"]["summary"], [record["decoder"]["settings"]["k"]]))
    out = Path(args.out) / "classification-decoder-quick.json" if args.quick else None
    print(f"\nrecord: {write_record('classification-decoder', record, out)}")


if __name__ == "__main__":
    main()
