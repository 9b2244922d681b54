"""Conversion of any adapter to LoRA: exact where ΔW has rank ≤ r, the Eckart–Young error otherwise, PEFT loads it."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from peft import MissConfig, PeftModel, get_peft_model
from peft import convert_to_lora as peft_convert_to_lora

import slimtune as st
from cases import (
    CASES,
    OUTPUT_LAYERS,
    adapted_copy,
    assert_unchanged,
    build,
    model_input,
    model_output,
    randomize_adapters,
    reference_delta,
    snapshot,
    tiny_mlp,
)
from slimtune.lora_conversion import convert_to_lora

# case -> the rank of its ΔW on the tiny MLP (30 -> 42 -> 18), from the method's definition
EXACT_RANKS = {
    "lora": 4,  # r
    "lora_rslora": 4,
    "bone": 6,  # r distinct columns
    "bone_padded": 4,
    "mini": 3,  # min(r, mini_r) = min(6, 3)
    "lora_sp": 4,
    "lora_sp_rank": 3,  # round((1 - 0.25) * 4) trainable B columns; frozen ones stay zero
}
TRUNCATED = ["bat_col", "bat_row", "surm_circulant", "surm_toeplitz", "surm_kronecker", "surm_ldr"]


def randomized(kind: str, case: str, dtype: torch.dtype = torch.float32, name: str = "default") -> torch.nn.Module:
    model = adapted_copy(build(kind).to(dtype), CASES[case], name)
    randomize_adapters(model, scale=0.2)
    return model


@pytest.mark.parametrize("case", list(EXACT_RANKS))
def test_low_rank_methods_convert_exactly_at_their_rank(case):
    model = randomized("mlp", case)
    inputs = model_input(model)
    expected = model_output(model, inputs).detach()
    report = convert_to_lora(model)
    assert report.rank == EXACT_RANKS[case] and report.exact and report.method == CASES[case].method
    assert report.max_relative_error < 1e-6
    config = st.adapter_configs(model)["default"]
    assert type(config) is st.LoraConfig and config.r == config.alpha == EXACT_RANKS[case]
    assert all(type(layer.adapter("default")).__name__ == "LoraAdapter" for _, layer in st.adapted_layers(model))
    torch.testing.assert_close(model_output(model, inputs), expected, rtol=1e-5, atol=1e-5)


def eckart_young_errors(model: torch.nn.Module, case: str, ranks: list[int]) -> dict[str, list[float]]:
    """Per layer: sqrt(Σ_{i>k} s_i²) / sqrt(Σ s_i²) of the reference ΔW's singular values (numpy), for each k."""
    errors = {}
    for name, layer in st.adapted_layers(model):
        weight = layer.base_weight().detach().double()
        delta = reference_delta(CASES[case], layer.adapter("default"), weight).detach().numpy()
        s = np.linalg.svd(delta, compute_uv=False)
        errors[name] = [float(np.sqrt(np.sum(s[k:] ** 2) / np.sum(s**2))) for k in ranks]
    return errors


@pytest.mark.parametrize("case", TRUNCATED)
def test_truncation_error_is_the_eckart_young_tail_and_falls_with_rank(case):
    ranks = [1, 3, 6, 12, 18]
    model = randomized("mlp", case, torch.float64)
    expected = eckart_young_errors(model, case, ranks)
    overall = []
    for k, rank in enumerate(ranks):
        report = convert_to_lora(copy.deepcopy(model), rank=rank)
        for layer in report.layers:
            assert layer.relative_error == pytest.approx(expected[layer.module_name][k], rel=1e-6, abs=1e-9)
        overall.append(report.relative_error)
    assert all(a > b for a, b in itertools.pairwise(overall)), overall
    assert overall[0] > 0.05, "the methods' updates must have full rank for this test to say anything"


@pytest.mark.parametrize(("kind", "case", "rank"), [("llama", "bone", None), ("gpt2", "bat_col", 8)])
def test_an_exported_conversion_loads_in_peft_with_equal_logits(kind, case, rank, tmp_path):
    base = build(kind)
    model = adapted_copy(base, CASES[case])
    randomize_adapters(model, scale=0.05)
    inputs = model_input(base)
    before = model_output(model, inputs).detach()
    report = convert_to_lora(model, rank=rank)
    converted = model_output(model, inputs).detach()
    st.export_peft(model, tmp_path)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(model_output(peft_model, inputs), converted, rtol=1e-5, atol=1e-5)
    if report.exact:
        torch.testing.assert_close(converted, before, rtol=1e-5, atol=1e-5)
    else:
        assert not torch.allclose(converted, before, atol=1e-4)


@pytest.mark.parametrize(("init_weights", "variant", "rank"), [(True, "bone", 6), ("bat", "bat_col", 4)])
def test_factors_equal_peft_convert_to_lora_on_equal_miss_weights(init_weights, variant, rank):
    """PEFT's own conversion (float32 SVD, or Bone's block form) gives the same B·A per layer."""
    base = tiny_mlp()
    peft_model = get_peft_model(copy.deepcopy(base), MissConfig(r=6, init_weights=init_weights, target_modules=["fc1"]))
    model = st.get_adapted_model(copy.deepcopy(base), st.DishaConfig(r=6, variant=variant, target_modules=["fc1"]))
    block = torch.randn(peft_model.base_model.model.fc1.miss_block["default"].shape) * 0.2
    with torch.no_grad():
        peft_model.base_model.model.fc1.miss_block["default"].copy_(block)
        dict(st.adapted_layers(model))["fc1"].adapter("default").block.copy_(block)
    _, state = peft_convert_to_lora(peft_model, rank=rank)
    convert_to_lora(model, rank=rank)
    adapter = dict(st.adapted_layers(model))["fc1"].adapter("default")
    peft_product = state["base_model.model.fc1.lora_B.weight"] @ state["base_model.model.fc1.lora_A.weight"]
    torch.testing.assert_close(adapter.lora_B @ adapter.lora_A, peft_product, rtol=1e-4, atol=1e-5)


def test_another_adapter_and_the_activity_are_kept():
    model = st.get_adapted_model(tiny_mlp(), st.LoraConfig(r=2, target_modules=["fc1"]), "first")
    st.get_adapted_model(model, st.DishaConfig(r=6, variant="bat_col"), "second")
    st.set_adapter(model, ["second", "first"])
    randomize_adapters(model, scale=0.2)
    inputs = model_input(model)
    expected = model_output(model, inputs).detach()
    first = {n: p.clone() for n, p in model.named_parameters() if ".first." in n}
    with pytest.warns(UserWarning, match="r=30 is larger"):  # rank None: Bat's ΔW on fc1 (30 -> 42) has rank 30
        report = convert_to_lora(model, "second")
    assert (
        report.rank == 30
        and report.method == "disha"
        and [layer.module_name for layer in report.layers] == ["fc1", "fc2"]
    )
    assert st.active_adapters(model) == ["second", "first"]
    assert all(torch.equal(p, first[n]) for n, p in model.named_parameters() if ".first." in n)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".second." in n)
    torch.testing.assert_close(model_output(model, inputs), expected, rtol=1e-5, atol=1e-5)


def test_a_rank_above_a_layer_dimension_warns_once_and_stays_exact():
    model = randomized("mlp", "bat_col")
    with pytest.warns(UserWarning, match=r"r=20 is larger than min\(d_in, d_out\) of 1 layer\(s\): 'fc2'"):
        report = convert_to_lora(model, rank=20)
    fc2 = dict(st.adapted_layers(model))["fc2"].adapter("default")
    assert fc2.lora_A.shape == (20, 42) and fc2.lora_B.shape == (18, 20)
    assert next(layer for layer in report.layers if layer.module_name == "fc2").relative_error < 1e-6


@pytest.mark.parametrize(
    ("prepare", "rank", "error", "named"),
    [
        (lambda m: m, 0, st.ConfigError, "rank=0"),
        (lambda m: m, 2.5, st.ConfigError, "rank=2.5"),
        (st.merge_adapters, None, st.MergeError, "unmerge it"),
    ],
)
def test_bad_conversions_fail_and_leave_the_model_unchanged(prepare, rank, error, named):
    model = randomized("mlp", "bone")
    prepare(model)
    before = snapshot(model)
    with pytest.raises(error, match=named):
        convert_to_lora(model, rank=rank)
    assert_unchanged(model, before)


def test_output_adapters_and_unknown_names_are_refused():
    config = st.SurmAdapterConfig(structure="circulant", block_size=6, target_modules=OUTPUT_LAYERS)
    model = st.get_adapted_model(tiny_mlp(), config)
    before = snapshot(model)
    with pytest.raises(st.ConfigError, match=r"method='surm_adapter'.*allowed are lora, lora_sp, disha and surm"):
        convert_to_lora(model)
    with pytest.raises(st.AdapterNameError, match="adapter_name='other'"):
        convert_to_lora(model, "other")
    assert_unchanged(model, before)
