"""The shared matrix: every method and variant through the same checks, on a tiny MLP and a tiny Llama."""

from __future__ import annotations

import copy

import pytest
import torch

import slimtune as st
from cases import (
    CASES,
    adapted_copy,
    build,
    model_input,
    model_output,
    randomize_adapters,
    reference_merged,
    reference_output,
    relative_error,
)

MODELS = ("mlp", "llama", "gpt2")
MATRIX = [(case, kind) for case in CASES for kind in MODELS]
MERGEABLE = [case for case, config in CASES.items() if config.adapter_class.supports_merge]
MERGE_MATRIX = [(case, kind) for case, kind in MATRIX if case in MERGEABLE]


@pytest.fixture(scope="module")
def base_models():
    return {kind: build(kind) for kind in MODELS}


@pytest.mark.parametrize(("case", "kind"), MATRIX)
def test_output_at_init_is_unchanged_exactly_when_the_class_says_so(case, kind, base_models):
    base = base_models[kind]
    inputs = model_input(base)
    model = adapted_copy(base, CASES[case])
    unchanged = torch.equal(model_output(model, inputs), model_output(base, inputs))
    assert unchanged == CASES[case].adapter_class.identity_at_init


@pytest.mark.parametrize(("case", "kind"), MATRIX)
def test_every_adapter_is_of_its_configs_class(case, kind, base_models):
    """The class, and so every capability, is known from the config alone, before any model is built."""
    model = adapted_copy(base_models[kind], CASES[case])
    adapters = [layer.adapter("default") for _, layer in st.adapted_layers(model)]
    assert adapters and all(type(adapter) is CASES[case].adapter_class for adapter in adapters)
    assert all(isinstance(adapter, st.Adapter) for adapter in adapters)


@pytest.mark.parametrize(("case", "kind"), MATRIX)
def test_parameter_report_and_freezing(case, kind, base_models):
    model = adapted_copy(base_models[kind], CASES[case])
    counts = st.parameter_counts(model)
    adapter_params = [p for _, layer in st.adapted_layers(model) for p in layer.adapters.parameters()]
    assert counts.trainable == sum(p.numel() for p in adapter_params) > 0
    assert counts.total == sum(p.numel() for p in base_models[kind].parameters()) + counts.trainable
    assert all(p.requires_grad for p in adapter_params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["mlp", "gpt2"])
@pytest.mark.parametrize("case", list(CASES))
def test_fast_forward_and_gradients_equal_dense_reference(case, kind, dtype):
    """Each adapted layer's fast forward equals F.linear(x, W + ΔW_reference, b): outputs and gradients.

    The MLP has nn.Linear layers with sizes that are not powers of two; GPT-2 has transformers' Conv1D.
    """
    model = adapted_copy(build(kind), CASES[case])
    randomize_adapters(model)
    model.to(dtype)
    generator = torch.Generator().manual_seed(3)
    for _, layer in st.adapted_layers(model):
        adapter = layer.adapter("default")
        x = torch.randn(2, 7, layer.d_in, generator=generator).to(dtype).requires_grad_()
        upstream = torch.randn(2, 7, layer.d_out, generator=generator)
        y = layer(x)
        (y.float() * upstream).sum().backward()
        fast = [y.detach(), x.grad, *[p.grad for p in adapter.parameters()]]

        ref_params = [p.detach().float().requires_grad_() for p in adapter.parameters()]
        x32 = x.detach().float().requires_grad_()
        weight = layer.base_weight().detach().float()
        with _swapped(adapter, ref_params):
            y_ref = reference_output(CASES[case], adapter, x32, weight, layer.base_layer.bias.float())
        (y_ref * upstream).sum().backward()
        reference = [y_ref.detach(), x32.grad, *[p.grad for p in ref_params]]

        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        for got, expected in zip(fast, reference):
            assert got.dtype == dtype
            assert relative_error(got, expected) < tolerance


@pytest.mark.parametrize("case", list(CASES))
def test_merged_weight_equals_reference(case):
    model = adapted_copy(build("mlp"), CASES[case])
    randomize_adapters(model)
    for _, layer in st.adapted_layers(model):
        adapter = layer.adapter("default")
        weight, bias = layer.base_weight().detach(), layer.base_layer.bias.detach()
        if not adapter.supports_merge:
            with pytest.raises(st.MergeError, match="cannot be merged"):
                layer.merge()
            continue
        expected_weight, expected_bias = reference_merged(CASES[case], adapter, weight, bias)
        assert relative_error(adapter.merged_weight(weight), expected_weight) < 1e-6
        assert relative_error(adapter.merged_bias(bias), expected_bias) < 1e-6


@pytest.mark.parametrize(("case", "kind"), MERGE_MATRIX)
def test_merge_unmerge_and_merge_and_unload(case, kind, base_models):
    base = base_models[kind]
    inputs = model_input(base)
    model = adapted_copy(base, CASES[case])
    randomize_adapters(model)
    weights_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapted = model_output(model, inputs).detach()

    st.merge_adapters(model)
    st.merge_adapters(model)  # idempotent
    assert all(layer.merged_adapters == ["default"] for _, layer in st.adapted_layers(model))
    assert relative_error(model_output(model, inputs), adapted) < 1e-5

    st.unmerge_adapters(model)
    st.unmerge_adapters(model)  # idempotent
    tolerance = CASES[case].adapter_class.merge_tolerance
    for name, param in model.named_parameters():
        assert relative_error(param, weights_before[name]) < tolerance, name
    assert relative_error(model_output(model, inputs), adapted) < 1e-5

    plain = st.merge_and_unload(model)
    assert not list(st.adapted_layers(plain))
    assert not any("adapters" in name for name, _ in plain.named_parameters())
    assert relative_error(model_output(plain, inputs), adapted) < 1e-5


@pytest.mark.parametrize(("case", "kind"), MERGE_MATRIX)
def test_unload_restores_base(case, kind, base_models):
    base = base_models[kind]
    inputs = model_input(base)
    model = adapted_copy(base, CASES[case])
    randomize_adapters(model)
    st.merge_adapters(model)
    restored = st.unload(model)
    assert not list(st.adapted_layers(restored))
    torch.testing.assert_close(model_output(restored, inputs), model_output(base, inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("case", "kind"), MATRIX)
def test_only_adapter_parameters_change_after_a_step(case, kind, base_models):
    base = base_models[kind]
    inputs = model_input(base)
    model = adapted_copy(base, CASES[case])
    randomize_adapters(model)  # a zero B (LoRA) or zero block gives some parameters no gradient at the start
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model_output(model, inputs).pow(2).mean().backward()
    optimizer.step()
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == (".adapters." in name), name


@pytest.mark.parametrize(("case", "kind"), MATRIX)
def test_save_load_round_trip(case, kind, base_models, tmp_path):
    base = base_models[kind]
    inputs = model_input(base)
    model = adapted_copy(base, CASES[case])
    randomize_adapters(model)
    st.save_adapter(model, tmp_path / "adapter")
    loaded = st.load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    assert st.adapter_configs(loaded)["default"] == CASES[case]
    assert torch.equal(model_output(loaded, inputs), model_output(model, inputs))


@pytest.mark.parametrize("case", MERGEABLE)
def test_disable_adapters_gives_base_output_and_restores_merges(case):
    base = build("mlp")
    inputs = model_input(base)
    model = adapted_copy(base, CASES[case])
    randomize_adapters(model)
    adapted = model_output(model, inputs).detach()
    st.merge_adapters(model)
    with st.disable_adapters(model):
        torch.testing.assert_close(model_output(model, inputs), model_output(base, inputs), rtol=1e-5, atol=1e-5)
    assert relative_error(model_output(model, inputs), adapted) < 1e-5


class _swapped:
    """Temporarily replace an adapter's parameters with other tensors (for the float32 reference pass)."""

    def __init__(self, adapter: st.Adapter, tensors: list[torch.Tensor]) -> None:
        self.adapter = adapter
        self.names = [name for name, _ in adapter.named_parameters()]
        self.tensors = tensors

    def _owner(self, name: str) -> tuple[torch.nn.Module, str]:
        module_path, _, attr = name.rpartition(".")
        return (self.adapter.get_submodule(module_path) if module_path else self.adapter), attr

    def __enter__(self) -> None:
        self.saved = {}
        for name, tensor in zip(self.names, self.tensors):
            owner, attr = self._owner(name)
            self.saved[name] = getattr(owner, attr)
            delattr(owner, attr)
            setattr(owner, attr, tensor)

    def __exit__(self, *exc: object) -> None:
        for name in self.names:
            owner, attr = self._owner(name)
            delattr(owner, attr)
            setattr(owner, attr, self.saved[name])
