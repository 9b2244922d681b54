"""Property tests with hypothesis: random layer shapes and configs for every adapter family.

For each drawn (d_in, d_out, config): identity at init, merge/unmerge round trip within tolerance, save/load
round trip exact. Shapes are drawn so that the config fits (r divides what the variant needs).
"""

from __future__ import annotations

import math
import tempfile

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs
from torch import nn

import slimtune as st
from cases import randomize_adapters

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@hs.composite
def layer_and_config(draw) -> tuple[int, int, st.AdapterConfig]:
    """A (d_in, d_out) layer and a config of any family that fits it."""
    family = draw(hs.sampled_from(["lora", "lora_sp", "bone", "mini", "bat_col", "bat_row", "surm", "surm_adapter"]))
    if family in ("bat_col", "bat_row"):
        r = draw(hs.integers(1, 6))
        d_in, d_out = r * draw(hs.integers(1, 6)), r * draw(hs.integers(1, 6))
        return d_in, d_out, st.DishaConfig(r=r, variant=family)
    if family in ("surm", "surm_adapter"):
        b = draw(hs.integers(1, 7))
        d_in, d_out = b * draw(hs.integers(1, 5)), b * draw(hs.integers(1, 5))
        structure = draw(hs.sampled_from(["circulant", "toeplitz", "toeplitz_symmetric", "toeplitz_product", "ldr"]))
        if family == "surm":
            return d_in, d_out, st.SurmConfig(structure=structure, block_size=b, displacement_rank=draw(hs.integers(1, 3)))
        return d_in, d_out, st.SurmAdapterConfig(structure=structure, block_size=b, target_modules=["layer"])
    d_in, d_out = draw(hs.integers(1, 40)), draw(hs.integers(1, 40))
    if family == "bone":
        return d_in, d_out, st.DishaConfig(r=draw(hs.integers(1, d_in)))
    if family == "mini":
        divisors = [k for k in range(1, d_out + 1) if d_out % k == 0]
        return d_in, d_out, st.DishaConfig(r=draw(hs.integers(1, d_in)), variant="mini", mini_r=draw(hs.sampled_from(divisors)))
    r = draw(hs.integers(1, min(d_in, d_out)))
    if family == "lora":
        return d_in, d_out, st.LoraConfig(r=r, use_rslora=draw(hs.booleans()))
    return d_in, d_out, st.LoraSpConfig(r=r, freeze_fraction=draw(hs.floats(0.0, 0.9)), granularity=draw(hs.sampled_from(["element", "rank"])))


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


@SETTINGS
@given(layer_and_config(), hs.booleans())
def test_identity_at_init(drawn, bias):
    d_in, d_out, config = drawn
    base, model = build(d_in, d_out, config, bias)
    x = torch.randn(3, d_in)
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)


@SETTINGS
@given(layer_and_config(), hs.booleans())
def test_merge_unmerge_round_trip(drawn, bias):
    d_in, d_out, config = drawn
    _, model = build(d_in, d_out, config, bias)
    randomize_adapters(model, scale=0.2)
    x = torch.randn(3, d_in)
    adapted = model(x).detach()
    weight = model.layer.base_layer.weight.detach().clone()
    st.merge_adapters(model)
    scale = adapted.abs().max().item() + 1.0
    assert (model(x) - adapted).abs().max().item() <= 1e-5 * scale * math.sqrt(d_in)
    st.unmerge_adapters(model)
    torch.testing.assert_close(model.layer.base_layer.weight, weight, rtol=1e-4, atol=1e-5)
    assert (model.layer.base_layer.bias is None) == (not bias)


@SETTINGS
@given(layer_and_config(), hs.booleans())
def test_save_load_round_trip_is_exact(drawn, bias):
    d_in, d_out, config = drawn
    base, model = build(d_in, d_out, config, bias)
    randomize_adapters(model)
    x = torch.randn(3, d_in)
    with tempfile.TemporaryDirectory() as folder:
        st.save_adapter(model, folder)
        loaded = st.load_adapter(base, folder)
    assert torch.equal(loaded(x), model(x))
