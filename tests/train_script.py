"""The training process that the resume and multi-process tests start: a tiny adapted Llama under slimtune.train.

Run directly (one process) or under ``accelerate launch`` (several). The model, adapter and data come from fixed
seeds, so every start builds the same run. ``--hang-after N`` writes ``<output-dir>/hung`` after step N (and its
checkpoint) and then sleeps, for a test to kill it; ``--weights`` saves the final trainable parameters
(safetensors), ``--adapter-dir`` the adapter (``save_adapter``) and ``--report`` a JSON summary, all from the main
process. ``--adapters lora,bone,...`` (names of ``cases.CASES``) trains one run per adapter, one after the other,
each in ``<output-dir>/<name>`` and with ``<name>`` appended to the file names; ``--base-dtype bfloat16`` casts
the base model (the adapters stay float32). :func:`run_training` is the same run
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
from accelerate.state import AcceleratorState

sys.path.insert(0, str(Path(__file__).parent))

import slimtune as st
from cases import CASES, tiny_llama
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
    adapter: str | None = None,
    base_dtype: torch.dtype = torch.float32,
) -> tuple[torch.nn.Module, TrainResult]:
    """The run this script makes (a tiny Llama with LoRA, or the ``adapter`` of CASES, on 24 blocks [24, 16]);
    returns the model and result."""
    config = st.LoraConfig(r=4, alpha=8.0, dropout=dropout) if adapter is None else CASES[adapter]
    model = st.get_adapted_model(tiny_llama().to(base_dtype), config)
    train_config = TrainConfig(
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
    return model, train(model, token_blocks(24, seed=1), train_config, token_blocks(6, seed=2), on_step)


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
    parser.add_argument("--adapter-dir", default=None)
    parser.add_argument("--report", default=None)
    parser.add_argument("--adapters", default=None)
    parser.add_argument("--base-dtype", default="float32")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for adapter in args.adapters.split(",") if args.adapters else [None]:
        run_one(args, adapter)


def run_one(args: argparse.Namespace, adapter: str | None) -> None:
    """One run of ``main``: the LoRA run (``adapter`` None), or that of ``adapter`` with its own folder and files."""

    def named(path: str | None) -> str | None:
        return path if path is None or adapter is None else f"{path}{adapter}"

    output_dir = args.output_dir if adapter is None else str(Path(args.output_dir) / adapter)

    def on_step(record: dict) -> None:
        if record["step"] == args.hang_after:
            (Path(output_dir) / "hung").write_text(str(record["step"]))
            time.sleep(600)

    model, result = run_training(
        output_dir,
        steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        dropout=args.dropout,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        on_step=on_step,
        adapter=adapter,
        base_dtype=getattr(torch, args.base_dtype),
    )
    state = PartialState()
    if not state.is_main_process:
        return
    if weights := named(args.weights):
        trainable = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        safetensors.torch.save_file(trainable, weights)
    if adapter_dir := named(args.adapter_dir):
        st.save_adapter(model, adapter_dir)
    if report_path := named(args.report):
        report = {
            "num_processes": state.num_processes,
            "distributed_type": str(AcceleratorState().distributed_type),  # FSDP, MULTI_CPU (DDP) or NO
            "start_step": result.start_step,
            "losses": result.losses,
            "eval_losses": result.eval_losses,
        }
        Path(report_path).write_text(json.dumps(report))


if __name__ == "__main__":
    main()
