"""What is special to LoRA-SP: the frozen subsets, the real parameter savings, the PEFT export."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

import slimtune as st
from cases import model_input, model_output, randomize_adapters, tiny_gpt2, tiny_llama, tiny_mlp


def lora_sp_layers(model):
    return [(name, layer.adapters["default"]) for name, layer in st.adapted_layers(model)]


@pytest.mark.parametrize("granularity", ["element", "rank"])
@pytest.mark.parametrize("fraction", [0.5, 0.25, 0.7])
def test_trainable_count_is_the_kept_fraction_of_lora(granularity, fraction):
    lora = st.get_adapted_model(tiny_llama(), st.LoraConfig(r=4))
    sp = st.get_adapted_model(tiny_llama(), st.LoraSpConfig(r=4, freeze_fraction=fraction, granularity=granularity))
    for (_, layer_lora), (_, layer_sp) in zip(st.adapted_layers(lora), st.adapted_layers(sp)):
        for full, kept in (
            (layer_lora.adapters["default"].lora_A, layer_sp.adapters["default"].lora_A_values),
            (layer_lora.adapters["default"].lora_B, layer_sp.adapters["default"].lora_B_values),
        ):
            if granularity == "element":
                assert abs(kept.numel() - (1 - fraction) * full.numel()) <= 1
            else:
                assert kept.numel() == round((1 - fraction) * 4) * full.numel() // 4


def test_rank_granularity_freezes_whole_rows_of_a_and_columns_of_b():
    model = st.get_adapted_model(tiny_mlp(), st.LoraSpConfig(r=4, granularity="rank"))
    for _, adapter in lora_sp_layers(model):
        rows = adapter.lora_A_mask.all(dim=1) | (~adapter.lora_A_mask).all(dim=1)
        cols = adapter.lora_B_mask.all(dim=0) | (~adapter.lora_B_mask).all(dim=0)
        assert rows.all() and cols.all()
        assert adapter.lora_A_mask.any(dim=1).sum() == 2 and adapter.lora_B_mask.any(dim=0).sum() == 2


def test_masks_depend_on_seed_and_module_only():
    first = lora_sp_layers(st.get_adapted_model(tiny_mlp(0), st.LoraSpConfig(r=4, seed=3)))
    again = lora_sp_layers(st.get_adapted_model(tiny_mlp(1), st.LoraSpConfig(r=4, seed=3)))
    other = lora_sp_layers(st.get_adapted_model(tiny_mlp(0), st.LoraSpConfig(r=4, seed=4)))
    for (_, a), (_, b), (_, c) in zip(first, again, other):
        assert torch.equal(a.lora_A_mask, b.lora_A_mask) and torch.equal(a.lora_B_mask, b.lora_B_mask)
        assert not torch.equal(a.lora_A_mask, c.lora_A_mask)
    assert not torch.equal(first[0][1].lora_A_mask[:, :18], first[1][1].lora_A_mask[:, :18])


def test_frozen_entries_stay_bit_identical_after_training():
    model = st.get_adapted_model(tiny_llama(), st.LoraSpConfig(r=4))
    inputs = model_input(model)
    initial = {name: (a.dense_a().detach().clone(), a.dense_b().detach().clone()) for name, a in lora_sp_layers(model)}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        optimizer.zero_grad()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
    for name, adapter in lora_sp_layers(model):
        a0, b0 = initial[name]
        a, b = adapter.dense_a(), adapter.dense_b()
        assert torch.equal(a[~adapter.lora_A_mask], a0[~adapter.lora_A_mask])
        assert torch.equal(b[~adapter.lora_B_mask], torch.zeros_like(b[~adapter.lora_B_mask]))
        assert not torch.equal(a[adapter.lora_A_mask], a0[adapter.lora_A_mask])
        assert not torch.equal(b[adapter.lora_B_mask], b0[adapter.lora_B_mask])


def test_optimizer_state_covers_only_trainable_entries():
    lora = st.get_adapted_model(tiny_llama(), st.LoraConfig(r=4))
    sp = st.get_adapted_model(tiny_llama(), st.LoraSpConfig(r=4))
    sizes = []
    for model in (lora, sp):
        inputs = model_input(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
        grads = sum(p.grad.numel() for p in model.parameters() if p.grad is not None)
        moments = sum(v.numel() for s in optimizer.state.values() for v in s.values() if v.dim() > 0)
        sizes.append(grads + moments)
    assert sizes[1] / sizes[0] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("granularity", ["element", "rank"])
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_export_to_peft_gives_identical_outputs(make, granularity, tmp_path):
    base = make()
    model = st.get_adapted_model(copy.deepcopy(base), st.LoraSpConfig(r=4, alpha=8, granularity=granularity))
    randomize_adapters(model)
    inputs = model_input(model)
    expected = model_output(model, inputs)
    st.export_peft(model, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(model_output(peft_model, inputs), expected, rtol=1e-5, atol=1e-5)


def test_export_refuses_methods_without_a_peft_equivalent(tmp_path):
    model = st.get_adapted_model(tiny_mlp(), st.DishaConfig(r=6, variant="bat_row"))
    with pytest.raises(st.ConfigError, match="variant='bat_row' has no PEFT equivalent"):
        st.export_peft(model, tmp_path)


def test_loading_a_b_that_is_not_zero_where_frozen_is_refused(tmp_path):
    plain = st.get_adapted_model(tiny_mlp(), st.LoraConfig(r=4))
    randomize_adapters(plain)
    st.save_adapter(plain, tmp_path / "a")
    config_path = tmp_path / "a" / "adapter_config.json"
    config_path.write_text(config_path.read_text().replace('"method": "lora"', '"method": "lora_sp"'))
    with pytest.raises(st.AdapterFileError, match="non-zero entries where seed=0 freezes B"):
        st.load_adapter(tiny_mlp(), tmp_path / "a")
