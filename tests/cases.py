"""The method matrix and tiny models shared by the tests.

Every method and variant appears once in ``CASES``; the shared tests in ``test_adapter_matrix.py`` run each
through the same checks. Layer sizes are not powers of two, and ``bone_padded`` has r not dividing d_in.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

import slimtune as st
from slimtune.adapters.disha import BatColAdapter, BatRowAdapter, BoneAdapter, MiniAdapter
from slimtune.adapters.lora import LoraAdapter
from slimtune.adapters.lora_sp import LoraSpAdapter
from slimtune.adapters.surm import SurmAdapter, SurmOutputAdapter
from slimtune.functional import disha as F_disha

OUTPUT_LAYERS = r".*(fc\d|o_proj|down_proj|c_proj)"  # MLP, Llama and GPT-2 layers whose output is adapted

CASES: dict[str, st.AdapterConfig] = {
    "lora": st.LoraConfig(r=4, alpha=8.0),
    "lora_rslora": st.LoraConfig(r=4, alpha=8.0, use_rslora=True),
    "bone": st.DishaConfig(r=6),
    "bone_padded": st.DishaConfig(r=4),
    "mini": st.DishaConfig(r=6, variant="mini", mini_r=3),
    "bat_col": st.DishaConfig(r=6, variant="bat_col"),
    "bat_row": st.DishaConfig(r=6, variant="bat_row"),
    "lora_sp": st.LoraSpConfig(r=4, alpha=8.0),
    "lora_sp_rank": st.LoraSpConfig(r=4, alpha=8.0, granularity="rank", freeze_fraction=0.25),
    "surm_circulant": st.SurmConfig(structure="circulant", block_size=6),
    "surm_circulant_gcd": st.SurmConfig(structure="circulant"),
    "surm_toeplitz": st.SurmConfig(structure="toeplitz", block_size=6),
    "surm_toeplitz_symmetric": st.SurmConfig(structure="toeplitz_symmetric", block_size=3),
    "surm_toeplitz_product": st.SurmConfig(structure="toeplitz_product", block_size=6),
    "surm_kronecker": st.SurmConfig(structure="kronecker", r=6),
    "surm_ldr": st.SurmConfig(structure="ldr", block_size=6, displacement_rank=2),
    "surm_adapter": st.SurmAdapterConfig(structure="circulant", block_size=6, target_modules=OUTPUT_LAYERS),
    "surm_adapter_gelu": st.SurmAdapterConfig(
        structure="ldr", block_size=3, activation="gelu", target_modules=OUTPUT_LAYERS
    ),
}


class TinyMLP(nn.Module):
    """30 → 42 → 18 with biases: no dimension is a power of two; 4 divides none of 30, 42."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(30, 42)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(42, 18)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def tiny_mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyMLP:
    torch.manual_seed(seed)
    return TinyMLP().to(dtype)


def tiny_llama(seed: int = 0) -> nn.Module:
    """A 2-layer LlamaForCausalLM from a config: hidden 48, GQA 4/2 heads (k/v 48 → 24), MLP 72, vocab 101."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=101, hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    """A 2-layer GPT2LMHeadModel (Conv1D layers): n_embd 36, 3 heads, c_attn 36 → 108, MLP 36 → 144, vocab 101."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=101, n_positions=64, n_embd=36, n_layer=2, n_head=3)
    return GPT2LMHeadModel(config).eval()


def model_input(model: nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    if isinstance(model, TinyMLP):
        return {"x": torch.randn(3, 5, 30, generator=generator, dtype=next(model.parameters()).dtype)}
    return {"input_ids": torch.randint(0, 101, (2, 11), generator=generator)}


def model_output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def build(kind: str, seed: int = 0) -> nn.Module:
    return {"mlp": tiny_mlp, "llama": tiny_llama, "gpt2": tiny_gpt2}[kind](seed)


def adapted_copy(model: nn.Module, config: st.AdapterConfig, name: str = "default") -> nn.Module:
    return st.get_adapted_model(copy.deepcopy(model), config, name)


def snapshot(model: nn.Module) -> dict[str, Any]:
    """What a failed injection or load must not change: weights, module types, requires_grad, adapters."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "types": {name: type(module) for name, module in model.named_modules()},
        "grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "configs": st.adapter_configs(model),
        "active": st.active_adapters(model),
    }


def assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    """``model`` is as :func:`snapshot` saw it."""
    after = snapshot(model)
    assert after["types"] == before["types"] and after["grad"] == before["grad"]
    assert after["configs"] == before["configs"] and after["active"] == before["active"]
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())


def randomize_adapters(model: nn.Module, seed: int = 2, scale: float = 0.1) -> None:
    """Give every adapter parameter random values (adapters start at an identity; this makes them do something)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in st.adapted_layers(model):
            for param in layer.adapters.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def reference_delta(adapter: st.Adapter, weight: torch.Tensor) -> torch.Tensor:
    """ΔW by each method's slow, index-by-index definition (independent of the code under test's fast forms)."""
    if isinstance(adapter, LoraSpAdapter):
        a = scatter_reference(adapter.lora_A_frozen, adapter.lora_A_mask, adapter.lora_A_values)
        b = scatter_reference(torch.zeros_like(adapter.lora_B_mask, dtype=a.dtype), adapter.lora_B_mask, adapter.lora_B_values)
        return adapter.scaling * b.to(weight.dtype) @ a.to(weight.dtype)
    if isinstance(adapter, LoraAdapter):
        return adapter.scaling * adapter.lora_B.to(weight.dtype) @ adapter.lora_A.to(weight.dtype)
    if isinstance(adapter, SurmAdapter):
        return adapter.operator.dense(weight.dtype)
    block = adapter.block.to(weight.dtype)
    if isinstance(adapter, BoneAdapter):
        return F_disha.bone_delta_reference(block, adapter.d_in)
    if isinstance(adapter, MiniAdapter):
        return F_disha.mini_delta_reference(block, adapter.d_in, adapter.d_out)
    if isinstance(adapter, BatColAdapter):
        return F_disha.bat_col_delta_reference(weight, block)
    if isinstance(adapter, BatRowAdapter):
        return F_disha.bat_row_delta_reference(weight, block)
    raise AssertionError(f"no reference for {type(adapter).__name__}")


def reference_merged(
    adapter: st.Adapter, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W', b') of the layer with ``adapter`` merged, from the slow references (affine adapters only)."""
    if isinstance(adapter, SurmOutputAdapter):
        m = adapter.operator.dense(weight.dtype)
        base_bias = torch.zeros(weight.shape[0], dtype=weight.dtype) if bias is None else bias
        extra = 0 if adapter.bias is None else adapter.bias.to(weight.dtype)
        return weight + m @ weight, base_bias + m @ base_bias + extra
    return weight + reference_delta(adapter, weight), bias


def reference_output(adapter: st.Adapter, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The adapted layer's output from the slow references: (..., d_in) → (..., d_out)."""
    if isinstance(adapter, SurmOutputAdapter):
        h = torch.nn.functional.linear(x, weight, bias)
        out = h + adapter.activation(h @ adapter.operator.dense(x.dtype).t())
        return out if adapter.bias is None else out + adapter.bias.to(x.dtype)
    return torch.nn.functional.linear(x, *reference_merged(adapter, weight, bias))


def scatter_reference(frozen: torch.Tensor, mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The dense factor entry by entry: trainable values in row-major order of the mask, frozen values elsewhere."""
    entries, k = [], 0
    for position in range(mask.numel()):
        if mask.flatten()[position]:
            entries.append(values[k])
            k += 1
        else:
            entries.append(frozen.flatten()[position].to(values.dtype))
    return torch.stack(entries).view(mask.shape)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()
