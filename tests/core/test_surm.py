"""What is special to SURM layers: parameter counts, block sizes, C3A parity, the adapter mode."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import C3AConfig, get_peft_model

import slimtune as st
from cases import OUTPUT_LAYERS, model_input, model_output, randomize_adapters, tiny_llama, tiny_mlp
from slimtune.adapters.structures import LDR_DENSE_FROM_TOKENS, STRUCTURES
from slimtune.functional import structured as S

# (config, trainable parameters of one 30 -> 42 layer, formula)
COUNTS = [
    (st.SurmConfig(structure="circulant", block_size=6), 2 * 6 * (7 * 5), "2b per block"),
    (st.SurmConfig(structure="circulant", block_size=3), 2 * 3 * (14 * 10), "2b per block"),
    (st.SurmConfig(structure="toeplitz", block_size=6), 11 * (7 * 5), "2b-1 per block"),
    (st.SurmConfig(structure="toeplitz_symmetric", block_size=6), 6 * (7 * 5), "b per block"),
    (st.SurmConfig(structure="toeplitz_product", block_size=6), 2 * 6 * (7 * 5), "2b per block"),
    (st.SurmConfig(structure="kronecker", r=6), 30 + 42, "d_in + d_out"),
    (st.SurmConfig(structure="kronecker", r=3), 30 + 42, "d_in + d_out"),
    (st.SurmConfig(structure="ldr", block_size=6, displacement_rank=3), 2 * 6 * 3 * (7 * 5), "2bK per block"),
]


@pytest.mark.parametrize(("config", "expected", "formula"), COUNTS, ids=[f"{c.structure}-{f}" for c, _, f in COUNTS])
def test_parameter_count_per_layer_matches_the_formula(config, expected, formula):
    model = st.get_adapted_model(tiny_mlp(), config)
    layer = dict(st.adapted_layers(model))["fc1"]
    assert sum(p.numel() for p in layer.adapters.parameters()) == expected


def test_default_block_size_is_each_layers_gcd():
    model = st.get_adapted_model(tiny_llama(), st.SurmConfig(structure="circulant"))
    for _, layer in st.adapted_layers(model):
        c = layer.adapter("default").operator.c_a
        assert c.shape[-1] == torch.gcd(torch.tensor(layer.d_in), torch.tensor(layer.d_out)).item()


@pytest.mark.parametrize(
    ("config", "named"),
    [
        (st.SurmConfig(structure="circulant", block_size=4), "block_size=4"),
        (st.SurmConfig(structure="kronecker", r=4), "r=4 does not divide d_in=30"),
    ],
)
def test_block_sizes_that_do_not_tile_fail_and_name_the_module(config, named):
    model = tiny_mlp()
    with pytest.raises(st.ShapeError, match=named) as info:
        st.get_adapted_model(model, config)
    assert "'fc1'" in str(info.value) and "allowed" in str(info.value)
    assert not list(st.adapted_layers(model))


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"structure": "hankel"}, "structure='hankel'"),
        ({"block_size": 0}, "block_size=0"),
        ({"displacement_rank": 0}, "displacement_rank=0"),
        ({"alpha": float("nan")}, "alpha=nan"),
    ],
)
def test_bad_surm_config_values(kwargs, named):
    with pytest.raises(st.ConfigError, match=named):
        st.SurmConfig(**kwargs)


def test_bad_adapter_mode_values():
    with pytest.raises(st.ConfigError, match="activation='tanh'"):
        st.SurmAdapterConfig(activation="tanh")
    with pytest.raises(st.ConfigError, match="target_modules='all-linear' is not allowed for surm_adapter"):
        st.SurmAdapterConfig(target_modules="all-linear")


@pytest.mark.parametrize("kind", ["mlp", "llama"])
def test_block_circulant_matches_peft_c3a(kind):
    """Same kernel values (C3A's w, scaled 1/d_in, transposed index) give the same outputs as PEFT's C3A."""
    base = tiny_mlp() if kind == "mlp" else tiny_llama()
    targets = ["fc1", "fc2"] if kind == "mlp" else ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]
    peft_model = get_peft_model(copy.deepcopy(base), C3AConfig(block_size=6, target_modules=targets))
    slim_model = st.get_adapted_model(
        copy.deepcopy(base), st.SurmConfig(structure="circulant", block_size=6, target_modules=targets)
    )
    peft_kernels = {
        name.removeprefix("base_model.model.").removesuffix(".c3a_kernel.default"): p
        for name, p in peft_model.named_parameters()
        if "c3a_kernel" in name
    }
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, layer in st.adapted_layers(slim_model):
            kernel = peft_kernels[name]
            kernel.copy_(torch.randn(kernel.shape, generator=generator))
            operator = layer.adapter("default").operator
            operator.c_a.fill_(1.0)
            operator.c_b.copy_(S.c3a_kernel_to_circulant(kernel, layer.d_in))
            peft_layer = peft_model.base_model.model.get_submodule(name)
            torch.testing.assert_close(
                layer.adapter("default").delta_weight(layer.base_weight()),
                peft_layer.get_delta_weight("default"),
                rtol=1e-5,
                atol=1e-6,
            )
    inputs = model_input(base)
    torch.testing.assert_close(model_output(slim_model, inputs), model_output(peft_model, inputs), rtol=1e-5, atol=1e-5)


def test_adapter_mode_sits_after_the_layer_output():
    """out = h + act(M h) + bias with h the base layer's output: checked against explicit algebra."""
    config = st.SurmAdapterConfig(structure="kronecker", r=6, activation="silu", target_modules=OUTPUT_LAYERS)
    model = st.get_adapted_model(tiny_mlp(), config)
    randomize_adapters(model)
    layer = dict(st.adapted_layers(model))["fc2"]
    adapter = layer.adapter("default")
    x = torch.randn(5, 42)
    h = layer.base_layer(x)
    m = torch.kron(adapter.operator.kron_b, adapter.operator.kron_a) * config.alpha / config.r
    torch.testing.assert_close(layer(x), h + torch.nn.functional.silu(h @ m.t()) + adapter.bias)


def test_the_activation_chooses_an_affine_or_a_non_linear_adapter_class():
    """Mergeability is a class attribute: the config names the class, so no model is needed to know it."""
    affine = st.SurmAdapterConfig(activation="identity").adapter_class
    assert affine.supports_merge and issubclass(affine, st.Adapter)
    for activation in ("relu", "gelu", "silu"):
        assert not st.SurmAdapterConfig(activation=activation).adapter_class.supports_merge


def test_every_structure_is_a_registered_class():
    assert tuple(STRUCTURES) == ("circulant", "toeplitz", "toeplitz_symmetric", "toeplitz_product", "kronecker", "ldr")
    with pytest.raises(st.ConfigError, match=r"structure='hankel' is not allowed: expected one of \['circulant'"):
        st.SurmConfig(structure="hankel")


def test_merging_the_identity_adapter_into_a_bias_free_layer_adds_then_removes_a_bias():
    base = tiny_llama()
    inputs = model_input(base)
    model = st.get_adapted_model(copy.deepcopy(base), st.SurmAdapterConfig(structure="circulant", block_size=6))
    randomize_adapters(model)
    expected = model_output(model, inputs).detach()
    st.merge_adapters(model)
    o_proj = model.model.layers[0].self_attn.o_proj.base_layer
    assert o_proj.bias is not None
    torch.testing.assert_close(model_output(model, inputs), expected, rtol=1e-5, atol=1e-5)
    st.unmerge_adapters(model)
    assert o_proj.bias is None
    merged = st.merge_and_unload(model)
    assert merged.model.layers[0].self_attn.o_proj.bias is not None
    torch.testing.assert_close(model_output(merged, inputs), expected, rtol=1e-5, atol=1e-5)


def test_ldr_many_token_path_equals_the_per_token_fft_path():
    """From LDR_DENSE_FROM_TOKENS tokens on the layer forms ΔW once; outputs and gradients match the FFT form."""
    model = st.get_adapted_model(tiny_mlp(), st.SurmConfig(structure="ldr", block_size=6, displacement_rank=2))
    randomize_adapters(model)
    layer = dict(st.adapted_layers(model))["fc1"]
    params = list(layer.adapters.parameters())
    x = torch.randn(LDR_DENSE_FROM_TOKENS + 3, 30)
    many = layer(x)
    grads_many = torch.autograd.grad(many.square().sum(), params)
    few = torch.cat([layer(chunk) for chunk in x.split(8)])
    grads_few = torch.autograd.grad(few.square().sum(), params)
    torch.testing.assert_close(many, few, rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads_many, grads_few):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
