"""Training-step time of adapted SmolLM2-135M, eager against ``torch.compile``, in one process.

For each method two copies of the same adapted model are built (same base, same adapter values): one runs eagerly,
the other through ``torch.compile(model)`` (default backend inductor). A step is forward + causal-LM loss +
backward + AdamW step; the optimizer step runs eagerly in both, only the model is compiled. The compiled copy's
first step is timed on its own (``first_step_s``: tracing and code generation plus one step; ``compile_s`` is that
minus the median step; inductor's on-disk caches start empty, so it is a first compilation's). After warm-up,
eager and compiled take one step each in turn for ``--rounds`` rounds, so that machine drift hits both alike;
medians are reported and ``speedup`` = eager / compiled.

To see where the time goes, three more steps of each are profiled (torch.profiler, CPU time per step):
``mm_share`` is the share of matrix products (mm, addmm, bmm, baddbmm and their extern calls from inductor) in the
step's self time, and ``<mode>_forward_s`` / ``_backward_s`` / ``_optimizer_s`` the time of each phase.
The record also holds the graphs dynamo made of the whole model, its graph breaks and recompilations, and the
largest relative difference of the first step's loss.

Run: ``.venv/bin/python benchmarks/compile.py`` (options: ``--methods``, ``--rounds``, ``--warmup``, ``--batch``,
``--seq-len``, ``--backend``; ``--quick``: a random 2-block Llama at SmolLM2's widths and 32 tokens, 2 rounds, to
check the script in a minute). Writes ``benchmarks/results/compile-<time>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters
from torch.profiler import record_function

import slimtune as st
from adapters import give_adapters_values
from common import format_table, time_call, write_record

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS: dict[str, st.AdapterConfig] = {  # sized as in benchmarks/adapters.py: near-equal trainable budgets
    "lora": st.LoraConfig(r=32, alpha=32, target_modules=TARGETS),
    "bone": st.DishaConfig(r=64, target_modules=TARGETS),
    "bat_col": st.DishaConfig(r=64, variant="bat_col", target_modules=TARGETS),
    "lora_sp": st.LoraSpConfig(r=32, alpha=32, target_modules=TARGETS),
    "circulant": st.SurmConfig(structure="circulant", block_size=64, target_modules=TARGETS),
}
PHASES = ("forward", "backward", "optimizer")
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "extern_kernels.mm", "extern_kernels.addmm")

Step = Callable[[], torch.Tensor]


def load_base(quick: bool, batch: int, seq_len: int) -> tuple[nn.Module, torch.Tensor]:
    """The base model (eval mode, float32) and ``batch`` blocks of ids (batch, seq_len): SmolLM2-135M on BBC News,
    or with ``quick`` a random 2-block Llama at SmolLM2's widths (576, 192 for k/v, MLP 1536) on random ids."""
    if not quick:
        from slimtune.app.corpus import lm_blocks
        from slimtune.app.models import load_smollm2

        model, tokenizer = load_smollm2(dtype=torch.float32)
        return model, lm_blocks(tokenizer, split="train", seq_len=seq_len, max_blocks=batch)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=2,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=seq_len,
    )
    ids = torch.randint(0, 4096, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    return LlamaForCausalLM(config).eval(), ids


def adapted(base: nn.Module, config: st.AdapterConfig) -> nn.Module:
    """A train-mode copy of ``base`` with ``config``'s adapters at small seeded values (``give_adapters_values``)."""
    model = st.get_adapted_model(copy.deepcopy(base), config).train()
    give_adapters_values(model)
    return model


def training_step(model: nn.Module, forward: nn.Module, ids: torch.Tensor) -> Step:
    """One step of ``forward`` (``model`` or its compiled form): loss, backward, AdamW on ``model``'s adapters."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with record_function("forward"):
            loss = forward(input_ids=ids, labels=ids).loss
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            optimizer.step()
        return loss.detach()

    return step


def profile_step(step: Step, steps: int = 3) -> dict[str, object]:
    """Self CPU time per step over ``steps`` calls of ``step``: total, the matrix products' share, the wall time of
    the forward, backward and optimizer phases, and the five largest ops."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMULS)
    phases = {e.key: e.cpu_time_total / steps / 1e6 for e in prof.key_averages() if e.key in PHASES}
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:5]
    return {
        "profiled_s": total / steps / 1e6,
        "mm_share": matmul / total,
        "phases_s": phases,
        "top_ops": [{"op": e.key, "self_s": e.self_cpu_time_total / steps / 1e6, "calls": e.count} for e in top],
    }


def run_method(name: str, config: st.AdapterConfig, base: nn.Module, ids: torch.Tensor, args) -> dict[str, object]:
    """Eager and compiled steps of one method: first compiled step, interleaved medians, profiles, dynamo stats."""
    eager_model, compiled_model = adapted(base, config), adapted(base, config)
    eager = training_step(eager_model, eager_model, ids)
    torch._dynamo.reset()
    counters.clear()
    compiled = training_step(compiled_model, torch.compile(compiled_model, backend=args.backend), ids)
    eager_loss = eager()
    start = time.perf_counter()
    compiled_loss = compiled()
    first_step_s = time.perf_counter() - start
    for _ in range(args.warmup):
        eager(), compiled()
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(args.rounds):
        times["eager"].append(time_call(eager))
        times["compiled"].append(time_call(compiled))
    eager_s, compiled_s = statistics.median(times["eager"]), statistics.median(times["compiled"])
    profiles = {"eager": profile_step(eager), "compiled": profile_step(compiled)}
    return {
        "method": name,
        "trainable": sum(p.numel() for p in eager_model.parameters() if p.requires_grad),
        "eager_s": eager_s,
        "compiled_s": compiled_s,
        "speedup": eager_s / compiled_s,
        "first_step_s": first_step_s,
        "compile_s": first_step_s - compiled_s,
        "eager_mm_share": profiles["eager"]["mm_share"],
        "compiled_mm_share": profiles["compiled"]["mm_share"],
        **{f"{mode}_{phase}_s": profiles[mode]["phases_s"].get(phase) for mode in profiles for phase in PHASES},
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
        "break_reasons": dict(counters["graph_break"]),
        "recompiles": counters["recompiles"].total(),
        "loss_rel_diff": abs(compiled_loss.item() / eager_loss.item() - 1),
        "times": times,
        "profiles": profiles,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=["lora", "bone"])
    parser.add_argument("--rounds", type=int, default=7, help="timed steps of each, interleaved (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (inductor, aot_eager, ...)")
    parser.add_argument("--quick", action="store_true", help="a random 2-block model, 32 tokens, 2 rounds")
    args = parser.parse_args()
    if args.quick:
        args.seq_len, args.rounds, args.warmup = 32, 2, 1

    base, ids = load_base(args.quick, args.batch, args.seq_len)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # an empty cache: compile_s is a first compilation's
        rows = [run_method(name, METHODS[name], base, ids, args) for name in args.methods]
    model = "random 2-block Llama" if args.quick else "smollm2-135m"
    print(f"\n## {model}, {args.backend} (batch {args.batch} x {args.seq_len}, median of {args.rounds} steps)\n")
    columns = ["method", "trainable", "eager_s", "compiled_s", "speedup", "first_step_s", "compile_s"]
    print(format_table(rows, [*columns, "eager_mm_share", "compiled_mm_share", "graphs", "graph_breaks"]))
    print()
    print(format_table(rows, ["method"] + [f"{mode}_{phase}_s" for mode in ("eager", "compiled") for phase in PHASES]))
    record = {"args": vars(args), "model": model, "rows": rows}
    print(f"\nrecord: {write_record('compile', record)}")


if __name__ == "__main__":
    main()
