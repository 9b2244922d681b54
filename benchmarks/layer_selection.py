"""Which layers of a converted SmolLM2-135M to keep softmax for retrieval: greedy selection by the passkey loss
(:func:`slimtune.training.select_softmax_layers_greedy` with :func:`slimtune.training.passkey_loss_criterion`), beside
the top k of the single-layer ranking it is meant to beat.

The conversion is untrained: ``LinearizeConfig(feature_map=--feature-map, window=--window, sink_tokens=--sinks)``.
The criterion is −log p(key | prompt) over ``--keys`` prompts per (length, depth), at ``--lengths`` and the needle
depths ``--depths`` (10/50/90 % by default; a depth given twice gets twice the prompts), from the ranking seed (no
evaluation uses it). ``--candidates``: the layers to choose from (default every layer; fewer saves evaluations,
counted by ``slimtune.training.greedy_evaluations``). After choosing, each set (greedy, and the top k of
``--single`` if given) is scored on the evaluation's own prompts (``passkey_accuracy``, seed 0, ``--eval-keys`` per
cell at ``--lengths``), so the choice is not scored on the keys it was made with. ``--keep``: layers restored to
softmax before choosing, so the greedy steps continue from them (the greedy set scored is ``--keep`` plus the
chosen).

Run: ``.venv/bin/python benchmarks/layer_selection.py --k 7 --candidates 18 3 20 ... --single 3 6 14 18 20 21 23``.
Writes ``benchmarks/results/layer-selection-*.json`` and prints the steps and the scores.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import format_table, write_record
from slimtune.app.models import load_smollm2
from slimtune.linear_attention import LinearizeConfig, linearize, softmax_restored
from slimtune.training import passkey_accuracy, passkey_loss_criterion, select_softmax_layers_greedy


def score(model: torch.nn.Module, tokenizer, layers: list[int], args: argparse.Namespace) -> dict:
    """Passkey accuracy (seed 0) per length and the mean key log-likelihood with ``layers`` softmax."""
    with softmax_restored(model, layers):
        result = passkey_accuracy(model, tokenizer, args.lengths, keys_per_cell=args.eval_keys, window=args.window)
    row: dict = {"layers": sorted(layers)}
    for length in args.lengths:
        cells = [c for c in result.cells if c.length == length]
        row[f"passkey {length}"] = sum(c.retrieved for c in cells) / sum(c.keys for c in cells)
    row["key log-likelihood"] = sum(c.log_likelihood * c.keys for c in result.cells) / sum(c.keys for c in result.cells)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--feature-map", default="dijiang_qmc")
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--k", type=int, default=7, help="layers to keep softmax")
    parser.add_argument("--candidates", type=int, nargs="+", default=None, help="layers to choose from")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9], help="criterion needle depths")
    parser.add_argument("--keys", type=int, default=1, help="criterion prompts per (length, depth)")
    parser.add_argument("--eval-keys", type=int, default=5, help="evaluation prompts per (length, depth)")
    parser.add_argument("--single", type=int, nargs="+", default=None, help="a single-ranking set to score beside")
    parser.add_argument("--keep", type=int, nargs="+", default=[], help="layers kept softmax before choosing")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2(dtype=torch.float32)
    torch.manual_seed(0)
    linearize(model, LinearizeConfig(feature_map=args.feature_map, window=args.window, sink_tokens=args.sinks))
    start = time.perf_counter()
    criterion = passkey_loss_criterion(
        model, tokenizer, lengths=args.lengths, depths=args.depths, keys_per_cell=args.keys
    )
    with softmax_restored(model, args.keep):
        steps = select_softmax_layers_greedy(model, criterion, args.k, candidates=args.candidates)
    seconds = time.perf_counter() - start
    print(format_table([vars(s) for s in steps], ["layer", "loss", "drop"]))
    sets = {"greedy": [*args.keep, *(s.layer for s in steps)]} | (
        {"single ranking": args.single} if args.single else {}
    )
    scores = [{"set": name} | score(model, tokenizer, layers, args) for name, layers in sets.items()]
    print(format_table(scores, list(scores[0])))
    record = {"args": vars(args), "steps": [vars(s) for s in steps], "selection_s": seconds, "scores": scores}
    print(f"wrote {write_record('layer-selection', record)}")


if __name__ == "__main__":
    main()
