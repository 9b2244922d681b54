"""Several named adapters on one model and one layer, each keeping its own kind (unlike PEFT's one miss_fn)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import slimtune as st
from cases import (
    CASES,
    model_input,
    model_output,
    randomize_adapters,
    reference_merged,
    reference_output,
    relative_error,
    tiny_mlp,
)

KINDS = ["lora", "bone_padded", "mini", "bat_col", "bat_row", "lora_sp", "surm_toeplitz", "surm_adapter"]
PAIRS = list(itertools.permutations(KINDS, 2))


def two_adapter_model(first: str, second: str) -> torch.nn.Module:
    model = st.get_adapted_model(tiny_mlp(), CASES[first], "first")
    st.get_adapted_model(model, CASES[second], "second")
    randomize_adapters(model)
    st.set_adapter(model, ["first", "second"])
    return model


@pytest.mark.parametrize(("first", "second"), PAIRS)
def test_two_kinds_on_one_layer_compose_as_the_dense_reference(first, second):
    """Forward = F.linear(x, f_2(f_1(W)), b) with f_k(W) = W + ΔW_k(W), each ΔW from its own slow reference."""
    model = two_adapter_model(first, second)
    generator = torch.Generator().manual_seed(4)
    for _, layer in st.adapted_layers(model):
        x = torch.randn(4, layer.d_in, generator=generator)
        weight, bias = layer.base_weight().detach(), layer.base_layer.bias.detach()
        for name, case in (("first", first), ("second", second)):
            weight, bias = reference_merged(CASES[case], layer.adapter(name), weight, bias)
        expected = F.linear(x, weight, bias)
        assert relative_error(layer(x), expected) < 1e-5


@pytest.mark.parametrize(("first", "second"), PAIRS)
def test_two_kinds_merge_and_unmerge(first, second):
    model = two_adapter_model(first, second)
    inputs = model_input(model)
    expected = model_output(model, inputs).detach()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    st.merge_adapters(model)
    assert relative_error(model_output(model, inputs), expected) < 1e-5
    st.unmerge_adapters(model)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, weights[name], rtol=1e-5, atol=1e-6)


def test_each_adapter_alone_is_unchanged_by_the_other():
    model = two_adapter_model("bone_padded", "bat_col")
    inputs = model_input(model)
    only_bone = tiny_mlp()
    st.get_adapted_model(only_bone, CASES["bone_padded"], "first")
    only_bone.load_state_dict({k: v for k, v in model.state_dict().items() if ".second." not in k}, strict=True)
    st.set_adapter(model, "first")
    torch.testing.assert_close(model_output(model, inputs), model_output(only_bone, inputs))


def test_set_adapter_switches_trainable_parameters():
    model = two_adapter_model("lora", "bone_padded")
    st.set_adapter(model, "second")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.second." in n for n in trainable)
    assert st.active_adapters(model) == ["second"]


def test_delete_adapter_removes_it_and_unwraps_empty_layers():
    model = two_adapter_model("lora", "bat_row")
    inputs = model_input(model)
    st.delete_adapter(model, "second")
    assert list(st.adapter_configs(model)) == ["first"]
    assert all(list(layer.adapters) == ["first"] for _, layer in st.adapted_layers(model))
    st.set_adapter(model, "first")
    st.delete_adapter(model, "first")
    assert not list(st.adapted_layers(model))
    torch.testing.assert_close(model_output(model, inputs), model_output(tiny_mlp(), inputs))


def test_merging_out_of_order_after_a_bat_adapter_is_refused():
    model = two_adapter_model("bat_col", "lora")
    with pytest.raises(st.MergeError, match="merge in the active order"):
        st.merge_adapters(model, ["second"])
    model = two_adapter_model("lora", "bone_padded")
    inputs = model_input(model)
    expected = model_output(model, inputs).detach()
    st.merge_adapters(model, ["second"])  # two weight-independent adapters commute
    assert relative_error(model_output(model, inputs), expected) < 1e-5


def test_a_non_affine_adapter_transforms_the_output_of_the_chain_before_it():
    model = two_adapter_model("lora", "surm_adapter_gelu")
    layer = dict(st.adapted_layers(model))["fc2"]
    x = torch.randn(4, 42)
    weight, bias = reference_merged(CASES["lora"], layer.adapter("first"), layer.base_weight(), layer.base_layer.bias)
    expected = reference_output(CASES["surm_adapter_gelu"], layer.adapter("second"), x, weight, bias)
    assert relative_error(layer(x), expected) < 1e-5
    with pytest.raises(st.MergeError, match="'second' is not affine, so it must be the last"):
        st.set_adapter(model, ["second", "first"])
