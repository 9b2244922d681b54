"""What is special to the bottleneck adapter (Houlsby et al. 2019): its formula against a hand-written reference,
identity at init, config errors, refused merges and exports, the file's names and the parameter count.

No peer runs here: PEFT has no bottleneck adapter, and AdapterHub's ``adapters`` package (which has one) pins
transformers 4 and is not installed beside transformers 5.
"""

from __future__ import annotations

import math

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

import slimtune as st
from cases import OUTPUT_LAYERS, assert_unchanged, randomize_adapters, relative_error, snapshot, tiny_llama, tiny_mlp
from slimtune.export import export_peft
from slimtune.serialization import WEIGHTS_NAME

D_IN, D_OUT, R = 29, 45, 7  # no power of two
ACTIVATIONS = {"relu": torch.relu, "gelu": F.gelu, "silu": lambda v: v * torch.sigmoid(v)}


class OneLayer(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.layer = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def adapted(config: st.BottleneckConfig, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return st.get_adapted_model(OneLayer(D_IN, D_OUT).to(dtype), config)


def bottleneck_by_units(config: st.BottleneckConfig, params: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """h + s·(Σ_k W_up[:, k]·act(⟨W_down[k], h⟩ + b_down[k]) + b_up), one bottleneck unit k at a time:
    h (..., d_out) → (..., d_out)."""
    update = torch.zeros_like(h)
    for k in range(config.r):
        z = (h * params["down.weight"][k]).sum(-1, keepdim=True)  # (..., 1)
        z = z + params["down.bias"][k] if config.bias else z
        update = update + ACTIVATIONS[config.activation](z) * params["up.weight"][:, k]
    update = update + params["up.bias"] if config.bias else update
    return h + config.scaling * update


# (base dtype, adapter dtype): float32; slimtune's default on a bfloat16 base (float32 adapter); all bfloat16
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)]


@pytest.mark.parametrize(("base_dtype", "adapter_dtype"), DTYPES, ids=["fp32", "bf16-base", "bf16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_output_and_gradients_equal_the_formula(activation, bias, base_dtype, adapter_dtype):
    """Outputs and the gradients of the input and of every parameter, against the unit-by-unit reference in float32
    on the layer's own output h (so a ReLU sees the same signs as the adapter)."""
    config = st.BottleneckConfig(r=R, activation=activation, bias=bias, scaling=0.7, target_modules=["layer"])
    model = adapted(config, base_dtype)
    randomize_adapters(model, scale=0.3)
    layer = model.layer
    adapter = layer.adapter("default").to(adapter_dtype)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, D_IN, generator=generator).to(base_dtype).requires_grad_()
    upstream = torch.randn(3, 5, D_OUT, generator=generator)
    y = layer(x)
    (y.float() * upstream).sum().backward()
    assert y.dtype == base_dtype and all(p.grad.dtype == adapter_dtype for p in adapter.parameters())
    fast = [y.detach(), x.grad, *(p.grad for p in adapter.parameters())]

    params = {name: p.detach().float().requires_grad_() for name, p in adapter.named_parameters()}
    x_ref = x.detach().clone().requires_grad_()
    expected = bottleneck_by_units(config, params, layer.base_layer(x_ref).float())
    (expected * upstream).sum().backward()
    reference = [expected.detach(), x_ref.grad, *(params[name].grad for name, _ in adapter.named_parameters())]

    tolerance = 1e-5 if adapter_dtype == base_dtype == torch.float32 else 2e-2
    for got, want in zip(fast, reference, strict=True):
        assert relative_error(got, want) < tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_new_adapter_is_the_identity_with_down_kaiming_and_the_rest_zero(dtype):
    torch.manual_seed(0)
    base = OneLayer(D_IN, D_OUT).to(dtype)
    model = st.get_adapted_model(OneLayer(D_IN, D_OUT).to(dtype), st.BottleneckConfig(r=R, target_modules=["layer"]))
    model.layer.base_layer.load_state_dict(base.layer.state_dict())
    x = torch.randn(4, D_IN).to(dtype)
    assert torch.equal(model(x), base(x))
    adapter = model.layer.adapter("default")
    assert {p.dtype for p in adapter.parameters()} == {torch.float32}  # float32 adapters on a bfloat16 base
    assert not adapter.up.weight.any() and not adapter.up.bias.any() and not adapter.down.bias.any()
    bound = 1 / math.sqrt(D_OUT)  # Kaiming-uniform with a = √5 on fan_in = d_out: U(-1/√d_out, 1/√d_out)
    down = adapter.down.weight
    assert down.shape == (R, D_OUT) and down.abs().max() <= bound
    assert down.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)


def test_defaults_adapt_the_attention_and_mlp_outputs_with_relu():
    config = st.BottleneckConfig()
    assert (config.r, config.activation, config.bias, config.scaling) == (8, "relu", True, 1.0)
    model = st.get_adapted_model(tiny_llama(), config)
    names = [name for name, _ in st.adapted_layers(model)]
    assert len(names) == 4 and all(name.endswith(("o_proj", "down_proj")) for name in names)
    assert all(isinstance(layer.adapter("default").activation, nn.ReLU) for _, layer in st.adapted_layers(model))


@pytest.mark.parametrize("bias", [True, False])
def test_parameter_count_per_layer_is_2_r_d_out_plus_the_biases(bias):
    """Per layer 2·r·d_out + r + d_out with biases, 2·r·d_out without (tiny Llama: 4 layers with d_out = 48)."""
    r, d_out = 5, 48
    model = st.get_adapted_model(tiny_llama(), st.BottleneckConfig(r=r, bias=bias))
    per_layer = 2 * r * d_out + (r + d_out if bias else 0)
    assert st.parameter_counts(model).trainable == 4 * per_layer
    for _, layer in st.adapted_layers(model):
        assert sum(p.numel() for p in layer.adapters.parameters()) == per_layer


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"r": 0}, ["r=0", "positive integer"]),
        ({"r": 2.5}, ["r=2.5", "positive integer"]),
        ({"activation": "tanh"}, ["activation='tanh'", "'relu', 'gelu', 'silu'"]),
        ({"activation": "identity"}, ["activation='identity'", "'relu', 'gelu', 'silu'"]),
        ({"target_modules": "all-linear"}, ["target_modules='all-linear'", "name the layers", "'o_proj'"]),
        ({"bias": 1}, ["bias=1", "True or False"]),
        ({"bias": "yes"}, ["bias='yes'", "True or False"]),
        ({"scaling": float("inf")}, ["scaling=inf", "finite number"]),
        ({"scaling": float("nan")}, ["scaling=nan", "finite number"]),
        ({"scaling": True}, ["scaling=True", "finite number"]),
        ({"dropout": 1.0}, ["dropout=1.0", "[0, 1)"]),
    ],
)
def test_bad_fields_name_the_field_the_value_and_what_is_allowed(kwargs, named):
    with pytest.raises(st.ConfigError) as info:
        st.BottleneckConfig(**kwargs)
    message = str(info.value)
    assert all(part in message for part in named), message
    assert "expected" in message or "allowed" in message


def test_merges_are_refused_and_leave_the_model_unchanged():
    model = adapted(st.BottleneckConfig(r=R, target_modules=["layer"]))
    randomize_adapters(model)
    before = snapshot(model)
    with pytest.raises(st.MergeError, match="cannot be merged"):
        st.merge_adapters(model)
    with pytest.raises(st.MergeError, match="cannot be merged"):
        st.merge_and_unload(model)
    assert_unchanged(model, before)
    adapter = model.layer.adapter("default")
    assert not type(adapter).supports_merge
    with pytest.raises(st.MergeError, match="non-linear function of the layer's output"):
        adapter.delta_weight(model.layer.base_weight())


def test_it_transforms_the_output_of_the_adapters_before_it_and_must_come_last():
    model = st.get_adapted_model(tiny_mlp(), st.LoraConfig(r=4, target_modules=["fc2"]), "lora")
    config = st.BottleneckConfig(r=R, activation="gelu", target_modules=["fc2"])
    st.get_adapted_model(model, config, "bottleneck")
    randomize_adapters(model)
    st.set_adapter(model, ["lora", "bottleneck"])
    layer = model.fc2
    x = torch.randn(4, 42)
    lora = layer.adapter("lora")
    h = F.linear(x, layer.base_weight() + lora.scaling * lora.lora_B @ lora.lora_A, layer.base_layer.bias)
    params = dict(layer.adapter("bottleneck").named_parameters())
    assert relative_error(layer(x), bottleneck_by_units(config, params, h)) < 1e-5
    with pytest.raises(st.MergeError, match="'bottleneck' is not affine, so it must be the last"):
        st.set_adapter(model, ["bottleneck", "lora"])


def test_dropout_acts_on_the_adapters_input_only():
    config = st.BottleneckConfig(r=R, dropout=0.5, target_modules=["layer"])
    model = adapted(config).train()
    randomize_adapters(model)
    x = torch.randn(6, D_IN)
    h = model.layer.base_layer(x)
    params = dict(model.layer.adapter("default").named_parameters())
    torch.manual_seed(11)
    got = model(x)
    torch.manual_seed(11)
    dropped = F.dropout(h, 0.5, training=True)
    expected = h + (bottleneck_by_units(config, params, dropped) - dropped)  # the residual keeps the undropped h
    assert relative_error(got, expected) < 1e-6
    model.eval()
    assert relative_error(model(x), bottleneck_by_units(config, params, h)) < 1e-6


def test_save_load_round_trip_names_the_tensors_down_and_up(tmp_path):
    config = st.BottleneckConfig(r=R, activation="silu", scaling=0.5, target_modules=OUTPUT_LAYERS)
    model = st.get_adapted_model(tiny_mlp(), config)
    randomize_adapters(model)
    st.save_adapter(model, tmp_path)
    names = set(safetensors.torch.load_file(tmp_path / WEIGHTS_NAME))
    assert names == {f"{layer}.{p}.{t}" for layer in ("fc1", "fc2") for p in ("down", "up") for t in ("weight", "bias")}
    loaded = st.load_adapter(tiny_mlp(), tmp_path)
    assert st.adapter_configs(loaded)["default"] == config
    x = torch.randn(3, 30)
    assert torch.equal(loaded(x), model(x))


def test_peft_export_and_lora_conversion_are_refused(tmp_path):
    model = st.get_adapted_model(tiny_mlp(), st.BottleneckConfig(r=R, target_modules=OUTPUT_LAYERS))
    randomize_adapters(model)
    before = snapshot(model)
    with pytest.raises(st.ConfigError, match=r"method='bottleneck' has no PEFT equivalent.*allowed for export"):
        export_peft(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(st.ConfigError, match=r"method='bottleneck'.*cannot be converted to LoRA.*non-linear"):
        st.convert_to_lora(model)
    assert_unchanged(model, before)
