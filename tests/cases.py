"""The method matrix and tiny models shared by the tests.

Every method and variant appears once in ``CASES``; the shared tests in ``test_adapter_matrix.py`` run each
through the same checks. Layer sizes are not powers of two, and ``bone_padded`` has r not dividing d_in.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import slimtune as st
from slimtune.adapters.disha import BatColAdapter, BatRowAdapter, BoneAdapter, MiniAdapter
from slimtune.adapters.lora import LoraAdapter
from slimtune.adapters.lora_sp import LoraSpAdapter
from slimtune.functional import disha as F_disha

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
