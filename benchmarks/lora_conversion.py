"""How much of a full-rank adapter survives conversion to a LoRA (``slimtune.convert_to_lora``) on SmolLM2-135M.

Bat-Col r=64 and SURM circulant (block = gcd) on all seven projections of every layer, their trainable tensors
drawn at random and scaled so that ‖ΔW‖_F = ``--scale``·‖W‖_F over all layers, are converted to LoRAs of rank 8,
32 and 128. Per rank: ΔW's relative error (all layers, and the worst one), the logits' error on one sentence
relative to the adapter's own effect on the logits and to the logits, the top-1 agreement, the conversion time and
the LoRA's parameter count. Random tensors have flat singular-value spectra, which makes this a hard case.

Run: ``.venv/bin/python benchmarks/lora_conversion.py`` (``--ranks``, ``--scale``, ``--threads``); writes a JSON
record to benchmarks/results and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from typing import Any

import torch
from torch import nn

import slimtune as st
from common import format_table, write_record
from slimtune.app.models import load_smollm2

TEXT = (
    "The quick brown fox jumps over the lazy dog. Linear algebra tells us that every matrix has a singular value "
    "decomposition, and the best low-rank approximation keeps the largest singular values."
)
CONFIGS = {
    "bat_col r=64": st.DishaConfig(r=64, variant="bat_col"),
    "surm circulant": st.SurmConfig(structure="circulant"),
}


def delta_to_weight_ratio(model: nn.Module) -> float:
    """‖ΔW‖_F / ‖W‖_F over every adapted layer (float64)."""
    delta = weight = 0.0
    for _, layer in st.adapted_layers(model):
        base = layer.base_weight().double()
        delta += float(layer.adapter("default").delta_weight(base).pow(2).sum())
        weight += float(base.pow(2).sum())
    return math.sqrt(delta / weight)


def randomize(model: nn.Module, scale: float, seed: int = 0) -> None:
    """Draw every adapter's trainable tensor at random, then scale them all so ‖ΔW‖ = ``scale``·‖W‖ (ΔW is linear
    in them for both methods)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = [p for n, p in model.named_parameters() if p.requires_grad]
    with torch.no_grad():
        for tensor in tensors:
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 1e-2)
        factor = scale / delta_to_weight_ratio(model)
        for tensor in tensors:
            tensor.mul_(factor)


def measure(adapted: nn.Module, ids: torch.Tensor, base_logits: torch.Tensor, rank: int) -> dict[str, Any]:
    """Convert a copy of ``adapted`` at ``rank``; the row of the table."""
    with torch.no_grad():
        logits = adapted(input_ids=ids).logits.double()  # [1, T, V]
    converted = copy.deepcopy(adapted)
    began = time.perf_counter()
    report = st.convert_to_lora(converted, rank=rank)
    seconds = time.perf_counter() - began
    with torch.no_grad():
        served = converted(input_ids=ids).logits.double()
    error = float((served - logits).norm())
    return {
        "rank": rank,
        "dW_error": report.relative_error,
        "dW_error_max": report.max_relative_error,
        "logits_error_per_effect": error / float((logits - base_logits).norm()),
        "logits_error_per_logits": error / float(logits.norm()),
        "top1_agreement": float((served.argmax(-1) == logits.argmax(-1)).double().mean()),
        "seconds": seconds,
        "lora_params": sum(p.numel() for n, p in converted.named_parameters() if ".adapters." in n),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--scale", type=float, default=0.05, help="‖ΔW‖ / ‖W‖ of the random adapters")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (float64 SVDs run best on 1 here)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_smollm2(dtype=torch.float32)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids  # [1, T]
    with torch.no_grad():
        base_logits = model(input_ids=ids).logits.double()
    rows = []
    for label, config in CONFIGS.items():
        adapted = st.get_adapted_model(copy.deepcopy(model), config)
        randomize(adapted, args.scale)
        for rank in args.ranks:
            rows.append({"adapter": label, **measure(adapted, ids, base_logits, rank)})
            print(rows[-1], flush=True)
    columns = ["adapter", "rank", "dW_error", "dW_error_max", "logits_error_per_effect", "top1_agreement", "seconds"]
    print(format_table(rows, columns))
    print(f"record: {write_record('lora-conversion', {'args': vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()
