"""Merging computes in the weight's precision or better: float64 models merge and unmerge without float32 rounding.

Every case of the matrix that supports merge, on float64 copies of the tiny models: merged output equals the
unmerged output, merge + unmerge returns every weight and bias to 1e-12 (max abs error), and a still-zero adapter
changes nothing.
"""

from __future__ import annotations

import copy

import pytest
import torch

import slimtune as st
from cases import CASES, build, model_input, model_output, randomize_adapters

MODELS = ("mlp", "llama", "gpt2")
MERGEABLE = [case for case, config in CASES.items() if config.adapter_class.supports_merge]


def float64_model(kind: str) -> torch.nn.Module:
    """A tiny model in float64 whose weights are not float32 numbers, so any float32 rounding shows."""
    model = build(kind).double()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator, dtype=torch.float64) * 1e-3)
    assert any(not torch.equal(p, p.float().double()) for p in model.parameters())
    return model


@pytest.fixture(scope="module")
def float64_models():
    return {kind: float64_model(kind) for kind in MODELS}


def base_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    """Every adapted layer's base weight and bias (None for a layer without one), copied."""
    tensors: dict[str, torch.Tensor | None] = {}
    for name, layer in st.adapted_layers(model):
        bias = layer.base_layer.bias
        tensors[f"{name}.weight"] = layer.base_weight().detach().clone()
        tensors[f"{name}.bias"] = None if bias is None else bias.detach().clone()
    return tensors


def max_abs_error(got: dict[str, torch.Tensor | None], expected: dict[str, torch.Tensor | None]) -> float:
    assert got.keys() == expected.keys()
    assert all((got[k] is None) == (expected[k] is None) for k in got)
    return max((got[k] - expected[k]).abs().max().item() for k in got if got[k] is not None)


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("case", MERGEABLE)
def test_float64_merge_and_unmerge_are_exact(case, kind, float64_models):
    model = st.get_adapted_model(copy.deepcopy(float64_models[kind]), CASES[case])
    randomize_adapters(model, scale=0.2)
    inputs = model_input(model)
    before = base_tensors(model)
    unmerged = model_output(model, inputs).detach()
    assert unmerged.dtype == torch.float64

    st.merge_adapters(model)
    assert (model_output(model, inputs) - unmerged).abs().max().item() < 1e-12
    st.unmerge_adapters(model)
    assert max_abs_error(base_tensors(model), before) < 1e-12


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("case", MERGEABLE)
def test_merging_a_still_zero_adapter_into_float64_changes_nothing(case, kind, float64_models):
    model = st.get_adapted_model(copy.deepcopy(float64_models[kind]), CASES[case])
    inputs = model_input(model)
    before = base_tensors(model)
    expected = model_output(float64_models[kind], inputs)

    st.merge_adapters(model)
    merged = base_tensors(model)
    weights = {k: v for k, v in merged.items() if k.endswith(".weight")}
    assert max_abs_error(weights, {k: before[k] for k in weights}) <= 1e-15
    added_biases = [v for k, v in merged.items() if k.endswith(".bias") and before[k] is None and v is not None]
    assert all(torch.equal(bias, torch.zeros_like(bias)) for bias in added_biases)  # the SURM adapter's zero bias
    assert (model_output(model, inputs) - expected).abs().max().item() <= 1e-15
    st.unmerge_adapters(model)
    assert max_abs_error(base_tensors(model), before) <= 1e-15
