"""Equal weights give equal outputs in slimtune and PEFT 0.21.2 (MiSS for Bone/Bat-Col/mini, LoRA)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import MissConfig, get_peft_model

import slimtune as st
from cases import TinyMLP, model_input, model_output, tiny_llama, tiny_mlp

TARGETS = ["fc1", "fc2"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

MISS_CASES = {
    # name: (PEFT MissConfig kwargs, slimtune DishaConfig kwargs)
    "bone": ({"r": 6, "init_weights": True}, {"r": 6, "variant": "bone"}),
    "bone_padded": ({"r": 4, "init_weights": True}, {"r": 4, "variant": "bone"}),
    "bat_col": ({"r": 6, "init_weights": "bat"}, {"r": 6, "variant": "bat_col"}),
    "mini": ({"r": 6, "init_weights": "mini", "mini_r": 3}, {"r": 6, "variant": "mini", "mini_r": 3}),
}


def copy_random_values(pairs: list[tuple[torch.Tensor, torch.Tensor]], seed: int = 5) -> None:
    """Fill each (peft_param, slimtune_param) pair with the same random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for peft_param, slim_param in pairs:
            assert peft_param.shape == slim_param.shape
            values = torch.randn(peft_param.shape, generator=generator) * 0.1
            peft_param.copy_(values)
            slim_param.copy_(values)


def module_pairs(peft_model, slim_model, peft_attr: str, slim_attr: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    peft_params = {
        name.removeprefix("base_model.model.").removesuffix(".weight").replace(f".{peft_attr}.default", ""): param
        for name, param in peft_model.named_parameters()
        if f".{peft_attr}.default" in name
    }
    slim_params = {
        name.replace(f".adapters.default.{slim_attr}", ""): param
        for name, param in slim_model.named_parameters()
        if name.endswith(f".adapters.default.{slim_attr}")
    }
    assert peft_params.keys() == slim_params.keys() and peft_params
    return [(peft_params[k], slim_params[k]) for k in sorted(peft_params)]


@pytest.mark.parametrize("kind", ["mlp", "llama"])
@pytest.mark.parametrize("case", list(MISS_CASES))
def test_disha_matches_peft_miss(case, kind):
    peft_kwargs, slim_kwargs = MISS_CASES[case]
    base = tiny_mlp() if kind == "mlp" else tiny_llama()
    targets = TARGETS if kind == "mlp" else LLAMA_TARGETS
    if kind == "llama" and case == "bone_padded":
        slim_kwargs, peft_kwargs = {**slim_kwargs, "r": 5}, {**peft_kwargs, "r": 5}
    peft_model = get_peft_model(copy.deepcopy(base), MissConfig(target_modules=targets, **peft_kwargs))
    slim_model = st.get_adapted_model(copy.deepcopy(base), st.DishaConfig(target_modules=targets, **slim_kwargs))
    copy_random_values(module_pairs(peft_model, slim_model, "miss_block", "block"))
    inputs = model_input(base)
    torch.testing.assert_close(model_output(slim_model, inputs), model_output(peft_model, inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("kind", ["mlp", "llama"])
def test_lora_matches_peft_lora(kind, use_rslora):
    base = tiny_mlp() if kind == "mlp" else tiny_llama()
    targets = TARGETS if kind == "mlp" else LLAMA_TARGETS
    peft_config = PeftLoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=use_rslora)
    peft_model = get_peft_model(copy.deepcopy(base), peft_config)
    slim_config = st.LoraConfig(r=4, alpha=8, target_modules=targets, use_rslora=use_rslora)
    slim_model = st.get_adapted_model(copy.deepcopy(base), slim_config)
    pairs = module_pairs(peft_model, slim_model, "lora_A", "lora_A")
    pairs += module_pairs(peft_model, slim_model, "lora_B", "lora_B")
    copy_random_values(pairs)
    inputs = model_input(base)
    torch.testing.assert_close(model_output(slim_model, inputs), model_output(peft_model, inputs), rtol=1e-5, atol=1e-5)


def test_lora_trainable_count_equals_peft():
    base = TinyMLP()
    peft_model = get_peft_model(copy.deepcopy(base), PeftLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    slim_model = st.get_adapted_model(copy.deepcopy(base), st.LoraConfig(r=4, target_modules=TARGETS))
    peft_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert st.parameter_counts(slim_model).trainable == peft_trainable
