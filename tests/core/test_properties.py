"""Property tests with hypothesis: random layer shapes and configs for every adapter family.

For each method and variant (``FAMILIES``) and each drawn (d_in, d_out, config): identity at init, merge/unmerge
round trip within tolerance (for a non-affine adapter, ``supports_merge`` False: the merge is refused), save/load
round trip exact. Shapes are drawn so that the config fits (r divides what the variant needs). 12 examples per
family and property: 14 families × 3 properties × 12 = 504 examples.
"""

from __future__ import annotations

import math
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs
from torch import nn

import slimtune as st
from cases import randomize_adapters
from slimtune.adapters.disha import DISHA_VARIANTS
from slimtune.adapters.structures import STRUCTURES as SURM_STRUCTURES

SETTINGS = settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
STRUCTURES = ["circulant", "toeplitz", "toeplitz_symmetric", "toeplitz_product", "kronecker", "ldr"]
# every method and variant registered: LoRA (+ rsLoRA), LoRA-SP, DiSHA's four variants, each SURM structure, the
# SURM adapter (its structures and activations drawn), the bottleneck adapter
FAMILIES = [
    "lora",
    "lora_sp",
    "bone",
    "mini",
    "bat_col",
    "bat_row",
    *(f"surm_{s}" for s in STRUCTURES),
    "surm_adapter",
    "bottleneck",
]


@hs.composite
def layer_and_config(draw, family: str, mergeable: bool = False) -> tuple[int, int, st.AdapterConfig]:
    """A (d_in, d_out) layer and a config of ``family`` that fits it (``mergeable``: SURM adapters linear only)."""
    if family in ("bat_col", "bat_row"):
        r = draw(hs.integers(1, 6))
        d_in, d_out = r * draw(hs.integers(1, 6)), r * draw(hs.integers(1, 6))
        return d_in, d_out, st.DishaConfig(r=r, variant=family)
    if family.startswith("surm"):
        b = draw(hs.integers(1, 7))
        d_in, d_out = b * draw(hs.integers(1, 5)), b * draw(hs.integers(1, 5))
        if family != "surm_adapter":
            structure = family.removeprefix("surm_")
            rank = draw(hs.integers(1, 3))
            return d_in, d_out, st.SurmConfig(structure=structure, block_size=b, r=b, displacement_rank=rank)
        structure = draw(hs.sampled_from(STRUCTURES))
        activation = "identity" if mergeable else draw(hs.sampled_from(["identity", "gelu", "relu", "silu"]))
        return (
            d_in,
            d_out,
            st.SurmAdapterConfig(
                structure=structure,
                block_size=b,
                r=b,
                activation=activation,
                bias=draw(hs.booleans()),
                target_modules=["layer"],
            ),
        )
    d_in, d_out = draw(hs.integers(1, 40)), draw(hs.integers(1, 40))
    if family == "bottleneck":
        activation, bias = draw(hs.sampled_from(["relu", "gelu", "silu"])), draw(hs.booleans())
        scaling = draw(hs.floats(-2.0, 2.0))
        r = draw(hs.integers(1, 12))
        return (
            d_in,
            d_out,
            st.BottleneckConfig(r=r, activation=activation, bias=bias, scaling=scaling, target_modules=["layer"]),
        )
    if family == "bone":
        return d_in, d_out, st.DishaConfig(r=draw(hs.integers(1, d_in)))
    if family == "mini":
        divisors = [k for k in range(1, d_out + 1) if d_out % k == 0]
        mini_r = draw(hs.sampled_from(divisors))
        return d_in, d_out, st.DishaConfig(r=draw(hs.integers(1, d_in)), variant="mini", mini_r=mini_r)
    r = draw(hs.integers(1, min(d_in, d_out)))
    if family == "lora":
        return d_in, d_out, st.LoraConfig(r=r, use_rslora=draw(hs.booleans()))
    fraction, granularity = draw(hs.floats(0.0, 0.9)), draw(hs.sampled_from(["element", "rank"]))
    return d_in, d_out, st.LoraSpConfig(r=r, freeze_fraction=fraction, granularity=granularity)


def test_every_registered_method_variant_and_structure_is_drawn():
    """A method, DiSHA variant or SURM structure added to slimtune fails here until FAMILIES draws it."""
    assert set(st.METHODS) == {"lora", "lora_sp", "disha", "surm", "surm_adapter", "bottleneck"}
    assert set(DISHA_VARIANTS) <= set(FAMILIES) and tuple(STRUCTURES) == tuple(SURM_STRUCTURES)


class OneLayer(nn.Module):
    def __init__(self, d_in: int, d_out: int, bias: bool) -> None:
        super().__init__()
        self.layer = nn.Linear(d_in, d_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def build(d_in: int, d_out: int, config: st.AdapterConfig, bias: bool) -> tuple[OneLayer, OneLayer]:
    torch.manual_seed(d_in * 100 + d_out)
    base = OneLayer(d_in, d_out, bias)
    adapted = OneLayer(d_in, d_out, bias)
    adapted.load_state_dict(base.state_dict())
    return base, st.get_adapted_model(adapted, config)


@pytest.mark.parametrize("family", FAMILIES)
@SETTINGS
@given(data=hs.data(), bias=hs.booleans())
def test_identity_at_init(family, data, bias):
    d_in, d_out, config = data.draw(layer_and_config(family))
    base, model = build(d_in, d_out, config, bias)
    x = torch.randn(3, d_in)
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
@SETTINGS
@given(data=hs.data(), bias=hs.booleans())
def test_merge_unmerge_round_trip(family, data, bias):
    d_in, d_out, config = data.draw(layer_and_config(family, mergeable=True))
    _, model = build(d_in, d_out, config, bias)
    randomize_adapters(model, scale=0.2)
    if not config.adapter_class.supports_merge:  # a family with no affine form (the bottleneck adapter)
        with pytest.raises(st.MergeError, match="cannot be merged"):
            st.merge_adapters(model)
        return
    x = torch.randn(3, d_in)
    adapted = model(x).detach()
    weight = model.layer.base_layer.weight.detach().clone()
    st.merge_adapters(model)
    scale = adapted.abs().max().item() + 1.0
    assert (model(x) - adapted).abs().max().item() <= 1e-5 * scale * math.sqrt(d_in)
    st.unmerge_adapters(model)
    torch.testing.assert_close(model.layer.base_layer.weight, weight, rtol=1e-4, atol=1e-5)
    assert (model.layer.base_layer.bias is None) == (not bias)


@pytest.mark.parametrize("family", FAMILIES)
@SETTINGS
@given(data=hs.data(), bias=hs.booleans())
def test_save_load_round_trip_is_exact(family, data, bias):
    d_in, d_out, config = data.draw(layer_and_config(family))
    base, model = build(d_in, d_out, config, bias)
    randomize_adapters(model)
    x = torch.randn(3, d_in)
    with tempfile.TemporaryDirectory() as folder:
        st.save_adapter(model, folder)
        loaded = st.load_adapter(base, folder)
    assert torch.equal(loaded(x), model(x))
