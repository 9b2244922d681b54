"""The training process that the resume and multi-process tests start: a tiny adapted Llama under slimtune.train.

Run directly (one process) or under ``accelerate launch`` (several). The model, adapter and data come from fixed
seeds, so every start builds the same run. ``--hang-after N`` writes ``<output-dir>/hung`` after step N (and its
checkpoint) and then sleeps, for a test to kill it; ``--weights`` saves the final trainable parameters
(safetensors) and ``--report`` a JSON summary, both from the main process. :func:`run_training` is the same run
in the calling process; :func:`save_tiny_folder` gives the command-line tests a model folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import safetensors.torch
import torch
from accelerate import PartialState

sys.path.insert(0, str(Path(__file__).parent))

import slimtune as st
from cases import tiny_llama
from slimtune.training import TrainConfig, TrainResult, train


def token_blocks(n: int, seed: int) -> torch.Tensor:
    """[n, 16] blocks counting through the 7 tokens 10..16 from random starts: easy to learn, so the loss falls."""
    starts = torch.randint(0, 7, (n, 1), generator=torch.Generator().manual_seed(seed))
    return (starts + torch.arange(16)) % 7 + 10


def save_tiny_folder(folder: Path) -> Path:
    """Save tiny_llama() (vocabulary 101) and a tokenizer of the 95 printable ASCII characters + unk, EOS into a
    Hugging Face folder that ``slimtune.app.models.load_model`` (and so the command line) loads."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, **{chr(code): i + 2 for i, code in enumerate(range(32, 127))}}
    characters = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    characters.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=characters, unk_token="<unk>", eos_token="</s>")
    tiny_llama().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_training(
    output_dir: str | Path,
    *,
    steps: int = 8,
    batch_size: int = 2,
    grad_accum: int = 1,
    dropout: float = 0.0,
    checkpoint_every: int | None = None,
    resume: bool = False,
    on_step: Callable[[dict], None] | None = None,
) -> tuple[torch.nn.Module, TrainResult]:
    """The run this script makes (a LoRA-adapted tiny Llama on 24 blocks [24, 16]); returns the model and result."""
    model = st.get_adapted_model(tiny_llama(), st.LoraConfig(r=4, alpha=8.0, dropout=dropout))
    config = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=1e-2,
        warmup=2,
        seed=3,
        eval_every=4,
        output_dir=str(output_dir),
        checkpoint_every=checkpoint_every,
        resume=resume,
        progress=False,
    )
    return model, train(model, token_blocks(24, seed=1), config, token_blocks(6, seed=2), on_step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--checkpoint-every", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--hang-after", type=int, default=None)
    parser.add_argument("--weights", default=None)
    parser.add_argument("--report", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)

    def on_step(record: dict) -> None:
        if record["step"] == args.hang_after:
            (Path(args.output_dir) / "hung").write_text(str(record["step"]))
            time.sleep(600)

    model, result = run_training(
        args.output_dir,
        steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        dropout=args.dropout,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        on_step=on_step,
    )
    state = PartialState()
    if not state.is_main_process:
        return
    if args.weights:
        trainable = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        safetensors.torch.save_file(trainable, args.weights)
    if args.report:
        report = {
            "num_processes": state.num_processes,
            "start_step": result.start_step,
            "losses": result.losses,
            "eval_losses": result.eval_losses,
        }
        Path(args.report).write_text(json.dumps(report))


if __name__ == "__main__":
    main()
