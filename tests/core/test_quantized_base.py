"""Adapters on a base quantised by bitsandbytes (QLoRA-style), loaded as users load one: ``from_pretrained`` with a
``BitsAndBytesConfig`` (NF4 with double quantisation, FP4, int8).

The reference weight of each quantised layer is read through the layer's own forward (``layer(I)ᵀ``), not through
slimtune's dequantisation, and each adapted layer is checked against the paper-formula reference of
``cases.reference_output`` on that weight: outputs and adapter gradients. NF4 / FP4 layers compute in float32 on the
dequantised weight, so the match is tight; int8 layers also quantise their input (LLM.int8), so there the bound is
a few times the base layer's own error.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import slimtune as st
from cases import CASES, randomize_adapters, reference_output, relative_error, tiny_llama
from slimtune.adapters.quantized import dense_weight, quantization_of

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

SCHEMES = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "int8": {"load_in_8bit": True},
}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def quantized_models(tiny_folder) -> dict[str, torch.nn.Module]:
    models = {}
    for scheme, options in SCHEMES.items():
        quantization = transformers.BitsAndBytesConfig(**options, bnb_4bit_compute_dtype=torch.float32)
        models[scheme] = transformers.LlamaForCausalLM.from_pretrained(
            tiny_folder, quantization_config=quantization, device_map="cpu"
        ).eval()
    return models


def probed_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The weight a linear layer applies, (d_out, d_in), read through its forward on the identity (with a gradient,
    as in training: bitsandbytes repacks 4-bit weights at a CPU inference forward)."""
    return layer(torch.eye(layer.in_features, requires_grad=True)).t().float().detach()


def tolerance(scheme: str, base: torch.nn.Module, x: torch.Tensor) -> float:
    """Allowed absolute error of an adapted layer: float32 rounding, or for int8 4× the base layer's own error."""
    if scheme != "int8":
        return 2e-5
    return 4 * float((base(x.requires_grad_()) - x @ probed_weight(base).t()).detach().abs().max()) + 1e-5


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_the_loaded_layers_are_quantised_and_dequantise_to_what_they_apply(quantized_models, scheme):
    layers = [m for m in quantized_models[scheme].modules() if quantization_of(m) is not None]
    assert len(layers) == 14 and all(quantization_of(m) == scheme for m in layers)  # 7 projections × 2 layers
    for layer in layers:
        expected = probed_weight(layer)
        assert dense_weight(layer).shape == (layer.out_features, layer.in_features)
        if scheme != "int8":  # int8 also rounds the input, so its forward is not exactly x @ dequant(W)ᵀ
            torch.testing.assert_close(dense_weight(layer).float(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("case", list(CASES))
def test_every_method_on_a_quantised_base_matches_the_formula_on_its_weight(quantized_models, scheme, case):
    config = CASES[case]
    model = st.get_adapted_model(copy.deepcopy(quantized_models[scheme]), config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    randomize_adapters(model)
    generator = torch.Generator().manual_seed(3)
    for name, layer in st.adapted_layers(model):
        adapter = layer.adapter("default")
        x = torch.randn(5, layer.d_in, generator=generator)
        weight, bias = probed_weight(layer.base_layer), None
        got = layer(x)  # eval mode, no input gradient: where bitsandbytes would repack a 4-bit weight
        expected = reference_output(config, adapter, x, weight, bias)
        allowed = tolerance(scheme, layer.base_layer, x)
        assert float((got - expected).detach().abs().max()) <= allowed, name
        params = list(adapter.parameters())
        got_grads = torch.autograd.grad(got.square().sum(), params)
        expected_grads = torch.autograd.grad(expected.square().sum(), params)
        for got_grad, expected_grad in zip(got_grads, expected_grads):
            assert got_grad.isfinite().all()
            assert relative_error(got_grad, expected_grad) < (1e-4 if scheme != "int8" else 0.05), name


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_a_new_adapter_leaves_the_quantised_model_unchanged_and_training_moves_it(quantized_models, scheme):
    base = quantized_models[scheme]
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(5))
    before = base(input_ids=ids).logits.detach()  # with gradients: bitsandbytes' CPU repacking fails on tiny layers
    model = st.get_adapted_model(copy.deepcopy(base), st.LoraConfig(r=4, alpha=8.0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert all(quantization_of(m) == scheme for _, m in model.named_modules() if type(m).__name__ == "Linear4bit")


def test_bat_col_keeps_no_dense_weight_for_backward(quantized_models):
    model = st.get_adapted_model(copy.deepcopy(quantized_models["nf4"]), CASES["bat_col"])
    _, layer = next(iter(st.adapted_layers(model)))
    randomize_adapters(model)
    saved: list[torch.Tensor] = []
    x = torch.randn(3, layer.d_in, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    weight_size = layer.d_in * layer.d_out
    assert saved and all(not (t.is_floating_point() and t.numel() >= weight_size) for t in saved)
    y.sum().backward()
    assert x.grad is not None and layer.adapter("default").block.grad.abs().sum() > 0


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_merging_into_a_quantised_base_is_refused_and_leaves_the_model_as_it_was(quantized_models, scheme):
    model = st.get_adapted_model(copy.deepcopy(quantized_models[scheme]), st.LoraConfig(r=4, alpha=8.0))
    randomize_adapters(model)
    ids = torch.randint(0, 101, (1, 7), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    for merge in (st.merge_adapters, st.merge_and_unload):
        with pytest.raises(st.MergeError, match=f"quantised \\({scheme}.*full-precision model"):
            merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)
    unloaded = st.unload(model)
    assert sum(quantization_of(m) is not None for m in unloaded.modules()) == 14


def test_an_adapter_trained_on_the_full_precision_base_loads_onto_the_quantised_one(
    quantized_models, tiny_folder, tmp_path
):
    full = st.get_adapted_model(transformers.LlamaForCausalLM.from_pretrained(tiny_folder), CASES["bone"])
    randomize_adapters(full)
    st.save_adapter(full, tmp_path / "adapter")
    quantized = st.load_adapter(copy.deepcopy(quantized_models["nf4"]), tmp_path / "adapter")
    full_state = {n: p for n, p in full.named_parameters() if p.requires_grad}
    loaded = {n: p for n, p in quantized.named_parameters() if p.requires_grad}
    assert loaded.keys() == full_state.keys()
    assert all(torch.equal(loaded[n], p) for n, p in full_state.items())
    st.save_adapter(quantized, tmp_path / "again")  # and back: saved from the quantised model, loads on the full one
    back = st.load_adapter(transformers.LlamaForCausalLM.from_pretrained(tiny_folder), tmp_path / "again")
    assert all(torch.equal(p, full_state[n]) for n, p in back.named_parameters() if p.requires_grad)


def test_a_packed_weight_that_is_not_bitsandbytes_is_refused_by_name():
    layer = torch.nn.Linear(8, 4)
    layer.weight = torch.nn.Parameter(torch.zeros(16, 1, dtype=torch.uint8), requires_grad=False)
    model = torch.nn.Sequential(layer)
    with pytest.raises(st.TargetModulesError, match=r"torch.uint8 weight of shape \(16, 1\).*bitsandbytes"):
        st.get_adapted_model(model, st.LoraConfig(r=2, target_modules=["0"]))


def test_an_adapted_4bit_layer_trains_after_inference_forwards_even_if_repacked_before(quantized_models):
    """bitsandbytes repacks a 4-bit weight for CPU inference (AVX512-BF16) into a layout with no backward; an
    adapted layer is kept in (or brought back to) the trainable layout, on any CPU."""
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 96, bias=False, quant_type="nf4", compute_dtype=torch.float32)
    layer.weight = bnb.nn.Params4bit(torch.randn(96, 64), requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu").eval()
    expected = dense_weight(layer).clone()
    x = torch.randn(4, 64)
    with torch.no_grad():
        inferred = layer(x)  # repacks where the CPU has AVX512-BF16
    model = st.get_adapted_model(torch.nn.Sequential(layer).eval(), st.DishaConfig(r=8, variant="bat_col"))
    # Undoing a repacking re-rounds the double-quantised block scales (bitsandbytes' own inverse): W moves by
    # about 0.1% of its size, the 4-bit codes not at all.
    weight = dense_weight(layer)
    assert relative_error(weight, expected) < 5e-3
    with torch.no_grad():
        assert relative_error(model(x), inferred) < 5e-3  # B = 0: the base layer's output
    randomize_adapters(model)
    y = model(x.requires_grad_())
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    torch.testing.assert_close(y, reference_output(CASES["bat_col"], model[0].adapter("default"), x, weight, None))
