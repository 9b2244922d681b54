"""Training-step time and peak memory of slimtune's adapters against PEFT's, and linear-attention prefill against
SDPA, on SmolLM2-135M with bfloat16 base weights, on a GPU, in one process.

Adapters: LoRA, MiSS (slimtune's Bone), MiSS-bat (slimtune's Bat-Col) and C3A (slimtune's SURM circulant), built
by ``adapters.configurations`` (all seven projections of every layer, near-equal budgets; the adapters are float32
on the bfloat16 base in both libraries, as PEFT's ``autocast_adapter_dtype``), each with ``torch.compile`` off and
on. On, every decoder layer is compiled on its own (regional compilation: the 30 identical layers share one
compiled graph, or two, since the first layer's input needs no gradient); the first step, which compiles, is
reported as ``first_step_s``, and dynamo's counts as ``compiled_graphs`` and ``graph_breaks``. Each case gets a
fresh copy of the base model: ``--warmup`` steps, then ``--steps`` timed steps (forward + backward + AdamW,
synchronised), the median reported; peak memory is ``torch.cuda.max_memory_allocated`` over the timed steps, reset
per case, so it holds the model, optimizer state and the step's activations.

Linear attention: one prefill forward (batch 1, no cache, last logits only) of the original model (SDPA softmax
attention) and of its DiJiang conversion with slimtune's ``chunked`` op and, where flash-linear-attention (fla)
imports and CUDA is there, slimtune's ``fla`` op (``linear_attention_fla``, fla's ``chunk_simple_gla`` kernel),
the median of ``--prefill-repeats`` runs per length.

Run: ``bash benchmarks/gpu.sh`` (installs what is missing, then runs this with its arguments). Smoke run on a
CPU: ``.venv/bin/python benchmarks/gpu_step.py --device cpu --quick`` (LoRA only, two steps, short lengths, no
peak memory; its record goes to a temporary folder, not ``benchmarks/results``). Writes
``benchmarks/results/gpu-<time>.json`` and prints the ratios slimtune / PEFT and SDPA / linear.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import importlib.metadata
import importlib.util
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch._dynamo.utils import counters

from adapters import SMOLLM2_TARGETS, configurations, give_adapters_values
from common import format_table, write_record

# method: (PEFT configuration, slimtune configuration), names in adapters.configurations
PAIRS = {
    "lora": ("peft lora", "slimtune lora"),
    "miss": ("peft miss", "slimtune bone"),
    "miss-bat": ("peft miss-bat", "slimtune bat_col"),
    "c3a": ("peft c3a", "slimtune circulant"),
}
QUICK = {"batch": 1, "seq_len": 32, "warmup": 1, "steps": 2, "lengths": [64, 128], "prefill_repeats": 1}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of ``fn``, with the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def reset_peak(device: torch.device) -> None:
    """Free what earlier cases left and restart the peak counter (CUDA only)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float | None:
    """``torch.cuda.max_memory_allocated`` since the last reset, in MiB; None off CUDA (no allocator counter)."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def compile_decoder_layers(model: nn.Module) -> int:
    """Compile every ``*DecoderLayer`` of ``model`` in place (regional compilation); returns how many."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    for layer in layers:
        layer.compile()
    return len(layers)


def step_case(
    base: nn.Module, config: str, ids: torch.Tensor, compiled: bool, args: argparse.Namespace
) -> dict[str, object]:
    """One training configuration on a fresh copy of ``base`` (on the CPU): ids [B, T] on the device."""
    device = ids.device
    model = configurations(SMOLLM2_TARGETS)[config](copy.deepcopy(base)).train()
    give_adapters_values(model)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    if compiled:
        torch._dynamo.reset()  # else every case adds entries to the shared layer code and, past 8, runs uncompiled
        compile_decoder_layers(model)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        optimizer.step()

    counters.clear()
    first = timed(step, device)
    for _ in range(args.warmup - 1):
        step()
    reset_peak(device)
    times = [timed(step, device) for _ in range(args.steps)]
    return {
        "trainable": sum(p.numel() for p in params),
        "adapter_dtype": str(params[0].dtype).removeprefix("torch."),
        "step_ms": 1000 * statistics.median(times),
        "step_ms_all": [1000 * t for t in times],
        "first_step_s": first,
        "peak_mib": peak_mib(device),
        "compiled_graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
    }


def guarded(label: str, fn: Callable[[], dict[str, object]]) -> dict[str, object]:
    """``fn()``, or {"error": ...} when it raises: one failing case must not lose a whole GPU run."""
    try:
        return fn()
    except Exception as err:  # recorded and reported in the table; the traceback goes to stderr
        traceback.print_exc()
        print(f"{label}: FAILED ({type(err).__name__})", file=sys.stderr, flush=True)
        return {"error": f"{type(err).__name__}: {err}"}


def adapter_steps(base: nn.Module, ids: torch.Tensor, args: argparse.Namespace) -> list[dict[str, object]]:
    """Every (method, compile, library) case in turn, one row each, printed as it comes."""
    rows = []
    for method in args.methods:
        for compiled in args.compile_modes:
            for library, config in zip(("peft", "slimtune"), PAIRS[method]):
                row = {"method": method, "compile": compiled, "library": library, "config": config}
                case = functools.partial(step_case, base, config, ids, compiled, args)
                row.update(guarded(f"{config} compile={compiled}", case))
                rows.append(row)
                print(row, flush=True)
                reset_peak(ids.device)
    return rows


def ratio(a: object, b: object) -> float | None:
    """a / b, or None when either is missing (a failed case, no peak memory off CUDA)."""
    return a / b if isinstance(a, float) and isinstance(b, float) and b else None


def step_ratios(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """slimtune / PEFT per (method, compile): time and peak memory (< 1: slimtune is faster / smaller)."""
    table = []
    for peft, slim in zip(rows[::2], rows[1::2]):
        table.append(
            {
                "method": f"{peft['config']} vs {slim['config']}",
                "compile": "on" if peft["compile"] else "off",
                "peft_ms": peft.get("step_ms"),
                "slimtune_ms": slim.get("step_ms"),
                "time_ratio": ratio(slim.get("step_ms"), peft.get("step_ms")),
                "peft_peak_mib": peft.get("peak_mib"),
                "slimtune_peak_mib": slim.get("peak_mib"),
                "peak_ratio": ratio(slim.get("peak_mib"), peft.get("peak_mib")),
                "error": peft.get("error") or slim.get("error") or "",
            }
        )
    return table


def fla_status() -> tuple[bool, str]:
    """(whether slimtune's "fla" op can run here, a note saying which fla or why not)."""
    from slimtune.linear_attention import fla_available

    if importlib.util.find_spec("fla") is None:
        return False, "flash-linear-attention (fla) is not installed: no fla column"
    try:
        import fla
    except Exception as err:
        return False, f"fla does not import ({type(err).__name__}: {err}): no fla column"
    version = getattr(fla, "__version__", "?")
    if not fla_available():
        return False, f"fla {version} imports, but its Triton kernels need CUDA: no fla column"
    return True, f"fla {version} through slimtune's op='fla' (fla's chunk_simple_gla kernel)"


def prefill_case(model: nn.Module, length: int, repeats: int, device: torch.device) -> dict[str, object]:
    """Median milliseconds of one prefill over ``length`` tokens, and the peak memory of those runs."""
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)

    @torch.no_grad()
    def forward() -> None:
        model(ids, use_cache=False, logits_to_keep=1)

    forward()
    reset_peak(device)
    times = [timed(forward, device) for _ in range(repeats)]
    return {"ms": 1000 * statistics.median(times), "peak_mib": peak_mib(device)}


def prefill(base: nn.Module, device: torch.device, args: argparse.Namespace) -> tuple[list[dict[str, object]], str]:
    """Rows T → SDPA / chunked / fla prefill milliseconds and peaks, with SDPA / linear ratios; and the fla note."""
    from slimtune.linear_attention import LinearizeConfig, linearize

    use_fla, note = fla_status()
    models = {"sdpa": copy.deepcopy(base).to(device)}
    models["chunked"] = linearize(copy.deepcopy(base), LinearizeConfig(op="chunked")).to(device)
    if use_fla:
        models["fla"] = linearize(copy.deepcopy(base), LinearizeConfig(op="fla")).to(device)
    rows = []
    for length in args.lengths:
        row: dict[str, object] = {"T": length}
        for name, model in models.items():
            case = functools.partial(prefill_case, model, length, args.prefill_repeats, device)
            result = guarded(f"prefill {name} T={length}", case)
            row.update({f"{name}_{key}": value for key, value in result.items()})
        for name in ("chunked", "fla"):
            row[f"sdpa_over_{name}"] = ratio(row.get("sdpa_ms"), row.get(f"{name}_ms"))
        rows.append(row)
        print(row, flush=True)
    return rows, note


def device_info(device: torch.device) -> dict[str, object]:
    """The device's name (GPU model or CPU), memory and compute capability, and torch's CUDA version."""
    info: dict[str, object] = {"type": device.type, "torch_cuda": torch.version.cuda}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gib=props.total_memory / 2**30, capability=f"{props.major}.{props.minor}")
    else:
        info.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


def package_versions() -> dict[str, str | None]:
    """Versions of the packages the record's base fields leave out (None: not installed)."""
    versions: dict[str, str | None] = {}
    for package in ("peft", "flash-linear-attention", "triton", "accelerate"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def parse_args() -> argparse.Namespace:
    """The options; ``--quick`` overrides the sizes with ``QUICK`` and the methods with LoRA alone."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke runs only)")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}")
    parser.add_argument("--methods", nargs="+", choices=list(PAIRS), help="default: all (--quick: lora)")
    parser.add_argument("--compile", choices=["off", "on", "both"], default="both")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per case, the first one compiles")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case (median reported)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384], help="prefill lengths")
    parser.add_argument("--prefill-repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.quick:
        vars(args).update(QUICK)
    args.methods = args.methods or (["lora"] if args.quick else list(PAIRS))
    args.compile_modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    return args


def main() -> None:
    """Load the model once, run the step cases and the prefill, print the tables and write the record."""
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(
            f"no CUDA GPU visible to torch {torch.__version__} (CUDA build: {torch.version.cuda}); "
            "this benchmark is for a GPU, use --device cpu --quick for a smoke run"
        )
    from slimtune.app.corpus import lm_blocks
    from slimtune.app.models import load_smollm2

    base, tokenizer = load_smollm2(dtype=torch.bfloat16)
    ids = lm_blocks(tokenizer, split="train", seq_len=args.seq_len, max_blocks=args.batch).to(device)
    info = device_info(device)
    print(f"device: {info}", flush=True)
    steps = adapter_steps(base, ids, args)
    ratios = step_ratios(steps)
    prefill_rows, fla_note = prefill(base, device, args)

    what = f"{info['name']}, bf16 base, batch {args.batch} x {args.seq_len}, median of {args.steps} steps"
    print(f"\n## Training step, slimtune / PEFT ({what}; ratio < 1: slimtune wins)\n")
    print(format_table(ratios, list(ratios[0])))
    print(f"\n## Prefill, batch 1, SDPA / linear (ratio > 1: linear wins; {fla_note})\n")
    columns = ["T", "sdpa_ms", "chunked_ms", "fla_ms", "sdpa_over_chunked", "sdpa_over_fla", "sdpa_peak_mib"]
    print(format_table(prefill_rows, [*columns, "chunked_peak_mib", "fla_peak_mib"]))
    record = {
        "args": {k: v for k, v in vars(args).items() if k != "compile_modes"},
        "device": info,
        "packages": package_versions(),
        "steps": steps,
        "ratios": ratios,
        "prefill": prefill_rows,
        "fla": fla_note,
    }
    out = Path(tempfile.mkdtemp(prefix="slimtune-gpu-quick-")) / "gpu-quick.json" if args.quick else None
    print(f"\nrecord: {write_record('gpu', record, out)}")


if __name__ == "__main__":
    main()
