"""Turn the softmax attention of an HF causal LM into linear attention in place, and save / load the new parts.

Supported attention classes (transformers 5.23): ``LlamaAttention`` (Llama, SmolLM2), ``Qwen2Attention``,
``MistralAttention``, ``GPTNeoXAttention`` (Pythia; fused ``query_key_value``, partial RoPE) and
``GPT2Attention`` (fused Conv1D ``c_attn``, no RoPE; cross-attention modules are left alone). Qwen2/Mistral
sliding-window layers become global linear attention (the decay is what keeps them local).

:func:`linearize` freezes nothing; :func:`linear_attention_parameters` lists what it added, for an optimiser or
for freezing the rest. :func:`save_linearized` writes the added tensors (safetensors) and the config (JSON),
each atomically; :func:`load_linearized` converts a fresh model with that config and fills them in, checking
every name and shape first (with the shared readers and check of :mod:`slimtune.file_format`) so that a mismatch
leaves the model untouched.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from slimtune.errors import AdapterFileError, ConfigError
from slimtune.file_format import LINEARIZED_FORMAT, check_tensors_fit, read_record, read_tensors
from slimtune.fileio import atomic_write, atomic_write_json
from slimtune.linear_attention.config import LinearizeConfig
from slimtune.linear_attention.layer import AttentionSpec, LinearAttention

TENSORS_FILE = "linear_attention.safetensors"
CONFIG_FILE = "linear_attention_config.json"
CONFIG_ATTRIBUTE = "slimtune_linearize_config"


def _heads(layer: Any, tensor: torch.Tensor) -> torch.Tensor:
    """[B, T, n·d] → [B, n, T, d] with d = layer.head_dim.

    ``layer``, here and below: the :class:`LinearAttention`, which holds the replaced module's projections under
    their names (typed Any: they differ per architecture).
    """
    b, t, _ = tensor.shape
    return tensor.view(b, t, -1, layer.head_dim).transpose(1, 2)


def _project_separate(layer: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _heads(layer, layer.q_proj(x)), _heads(layer, layer.k_proj(x)), _heads(layer, layer.v_proj(x))


def _project_neox(layer: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, t, _ = x.shape
    qkv = layer.query_key_value(x).view(b, t, -1, 3 * layer.head_dim).transpose(1, 2)  # [B, H, T, 3d]
    return qkv.chunk(3, dim=-1)


def _project_gpt2(layer: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = layer.c_attn(x).split(layer.num_heads * layer.head_dim, dim=2)  # 3 × [B, T, H·d]
    return _heads(layer, q), _heads(layer, k), _heads(layer, v)


_LLAMA_LIKE = AttentionSpec(
    kept=("q_proj", "k_proj", "v_proj", "o_proj"),
    project=_project_separate,
    output_modules=("o_proj",),
    cache_kwarg="past_key_values",
    rotary=None,
)
_SPECS: dict[str, AttentionSpec] = {
    "LlamaAttention": _LLAMA_LIKE,
    "Qwen2Attention": _LLAMA_LIKE,
    "MistralAttention": _LLAMA_LIKE,
    "GPTNeoXAttention": AttentionSpec(
        kept=("query_key_value", "dense"),
        project=_project_neox,
        output_modules=("dense",),
        cache_kwarg="layer_past",
        rotary=None,
    ),
    "GPT2Attention": AttentionSpec(
        kept=("c_attn", "c_proj", "resid_dropout"),
        project=_project_gpt2,
        output_modules=("c_proj", "resid_dropout"),
        cache_kwarg="past_key_values",
        rotary=None,
    ),
}
_ROPE = ("LlamaAttention", "Qwen2Attention", "MistralAttention", "GPTNeoXAttention")
SUPPORTED_ATTENTION = tuple(sorted(_SPECS))


def linearize(model: nn.Module, config: LinearizeConfig | None = None) -> nn.Module:
    """Replace every supported softmax self-attention module of ``model`` by a :class:`LinearAttention`, in place;
    the layers listed in ``config.softmax_layers`` (by layer index) are left as they are.

    The pretrained projections are reused (shared, not copied); only the new parts of ``config`` are added.
    Nothing is frozen. Returns ``model``, which remembers ``config`` as ``model.slimtune_linearize_config``.

    Raises:
        ConfigError: ``model`` is already linearised, has no supported attention module (the message names
            the attention classes found and the supported ones), or ``config.softmax_layers`` names a layer index
            the model does not have, or every layer.
    """
    config = LinearizeConfig() if config is None else config
    _replace(model, _build(model, config), config)
    return model


def linear_attention_layers(model: nn.Module) -> Iterator[tuple[str, LinearAttention]]:
    """Every :class:`LinearAttention` of ``model`` with its module name."""
    for name, module in model.named_modules():
        if isinstance(module, LinearAttention):
            yield name, module


def linear_attention_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters :func:`linearize` added (feature maps, decays, gates, norms), in module order."""
    return [p for _, layer in linear_attention_layers(model) for p in layer.new_parameters()]


def save_linearized(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the added tensors to ``directory/linear_attention.safetensors`` and the config to
    ``directory/linear_attention_config.json`` (each atomically, the JSON last). Returns ``directory``.

    Raises:
        ConfigError: ``model`` is not linearised.
    """
    config = linearize_config(model)
    directory = Path(directory)
    new = _new_tensors(linear_attention_layers(model))
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in new.items()}
    atomic_write(directory / TENSORS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    record = {
        "format_version": LINEARIZED_FORMAT.version,
        "config": config.to_dict(),
        "tensors": {name: list(t.shape) for name, t in tensors.items()},
    }
    atomic_write_json(directory / CONFIG_FILE, record)
    return directory


def load_linearized(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Linearise ``model`` (in place) with the saved config and fill in the saved tensors; returns the model.

    Every saved tensor must match one the conversion adds, by name and shape, and none may be missing;
    otherwise nothing is changed.

    Raises:
        AdapterFileError: a file is missing or damaged, or the tensors do not fit this model (the message lists
            the missing, unexpected and mis-shaped names).
        ConfigError: the model is already linearised or has no supported attention.
    """
    directory = Path(directory)
    record = read_record(directory / CONFIG_FILE, LINEARIZED_FORMAT, ("config",))
    try:
        raw = record["config"]
        if isinstance(raw, dict):
            raw = {"stabilizer": "per_token", **raw}  # folders saved before the field existed
        config = LinearizeConfig.from_dict(raw)
    except ConfigError as err:
        raise AdapterFileError(f"{directory / CONFIG_FILE}: {err}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model of type {type(model).__name__} is not allowed: expected an nn.Module")
    saved = read_tensors(directory / TENSORS_FILE, LINEARIZED_FORMAT)
    built = _build(model, config)
    expected = _new_tensors(built)
    problem = f"{directory}: the saved linear-attention tensors do not fit this model"
    check_tensors_fit(saved, expected, LINEARIZED_FORMAT, problem)
    with torch.no_grad():
        for name, tensor in expected.items():
            tensor.copy_(saved[name])
    _replace(model, built, config)
    return model


def linearize_config(model: nn.Module) -> LinearizeConfig:
    """The config ``model`` was linearised with; ConfigError if it was not."""
    config = getattr(model, CONFIG_ATTRIBUTE, None)
    if config is None:
        raise ConfigError(f"{type(model).__name__} is not linearised: call linearize(model, config) first")
    return config


def _build(model: nn.Module, config: LinearizeConfig) -> list[tuple[str, LinearAttention]]:
    """One new layer per supported attention module, built without touching ``model``."""
    if not isinstance(config, LinearizeConfig):
        raise ConfigError(f"config={config!r} is not allowed: expected a LinearizeConfig")
    if getattr(model, CONFIG_ATTRIBUTE, None) is not None:
        raise ConfigError(f"{type(model).__name__} is already linearised; convert a fresh model instead")
    found: list[tuple[str, nn.Module, str]] = []
    seen: set[str] = set()
    for name, module in model.named_modules():
        kind = type(module).__name__
        if "Attention" in kind:
            seen.add(kind)
        if kind in _SPECS and not getattr(module, "is_cross_attention", False):
            found.append((name, module, kind))
    if not found:
        classes = sorted(seen) or "none"
        raise ConfigError(
            f"{type(model).__name__} has no supported softmax attention module (attention classes found: {classes}); "
            f"supported: {list(SUPPORTED_ATTENTION)}"
        )
    kept = _softmax_layers(model, config, len(found))
    indexed = [(name, module, kind, _layer_index(module, i)) for i, (name, module, kind) in enumerate(found)]
    return [(name, _new_layer(module, kind, config, i)) for name, module, kind, i in indexed if i not in kept]


def _layer_index(module: Any, position: int) -> int:
    """The attention module's own ``layer_idx``, else its ``position`` among the model's attention modules."""
    return module.layer_idx if isinstance(module.layer_idx, int) else position


def _softmax_layers(model: nn.Module, config: LinearizeConfig, count: int) -> set[int]:
    """``config.softmax_layers`` as a set, checked against the ``count`` attention layers of ``model``."""
    kept = set(config.softmax_layers or ())
    too_large = sorted(i for i in kept if i >= count)
    name = type(model).__name__
    if too_large:
        raise ConfigError(
            f"softmax_layers={config.softmax_layers} is not allowed for this {name}: it has {count} attention "
            f"layers, so an index must be in [0, {count - 1}] (got {too_large})"
        )
    if len(kept) == count:
        raise ConfigError(
            f"softmax_layers={config.softmax_layers} is not allowed for this {name}: it keeps all {count} attention "
            "layers as softmax, leaving none to linearise"
        )
    return kept


def _new_layer(module: Any, kind: str, config: LinearizeConfig, layer_idx: int) -> LinearAttention:
    spec = _SPECS[kind]
    if kind in _ROPE:
        spec = dataclasses.replace(spec, rotary=sys.modules[type(module).__module__].apply_rotary_pos_emb)
    cfg = module.config
    if kind == "GPT2Attention":
        heads = kv_heads = module.num_heads
        head_dim = module.head_dim
    elif kind == "GPTNeoXAttention":
        heads = kv_heads = cfg.num_attention_heads
        head_dim = module.head_size
    else:
        heads, kv_heads, head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, module.head_dim
    return LinearAttention(
        module,
        spec,
        config,
        layer_idx=layer_idx,
        hidden_size=cfg.hidden_size,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
    )


def _replace(model: nn.Module, built: list[tuple[str, LinearAttention]], config: LinearizeConfig) -> None:
    for name, layer in built:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
    setattr(model, CONFIG_ATTRIBUTE, config)


def _new_tensors(layers: Iterable[tuple[str, LinearAttention]]) -> dict[str, torch.Tensor]:
    """The tensors the conversion added, by their name in the model (``<module name>.<key>``)."""
    return {f"{name}.{key}": t for name, layer in layers for key, t in layer.new_state_dict().items()}
