"""The short form train_lm: the loss falls, bad settings are refused with a clear error; the schedule."""

from __future__ import annotations

import pytest
import torch

import slimtune as st
from cases import tiny_llama
from slimtune.training import cosine_with_warmup, evaluate_lm, train_lm


def blocks() -> torch.Tensor:
    return torch.randint(0, 101, (4, 16), generator=torch.Generator().manual_seed(0))


def test_adapted_tiny_llama_learns():
    model = st.get_adapted_model(tiny_llama(), st.DishaConfig(r=6))
    data = blocks()
    before = evaluate_lm(model, data)
    result = train_lm(model, data, steps=40, batch_size=2, lr=1e-2, progress=False)
    assert len(result.losses) == 40 and result.tokens == 40 * 2 * 16
    assert evaluate_lm(model, data) < before - 0.4


@pytest.mark.parametrize(
    ("field", "kwargs"), [("steps", {"steps": 0}), ("batch_size", {"batch_size": -1}), ("lr", {"lr": 0.0})]
)
def test_bad_settings(field, kwargs):
    model = st.get_adapted_model(tiny_llama(), st.LoraConfig(r=4))
    settings = {"steps": 2, "batch_size": 2, "lr": 1e-3, **kwargs}
    with pytest.raises(st.ConfigError, match=f"{field}="):
        train_lm(model, blocks(), progress=False, **settings)


def test_untrainable_model_and_empty_data_are_refused():
    with pytest.raises(st.ConfigError, match="no trainable parameter"):
        train_lm(tiny_llama().requires_grad_(False), blocks(), steps=1, batch_size=1, lr=1e-3, progress=False)
    model = st.get_adapted_model(tiny_llama(), st.LoraConfig(r=4))
    with pytest.raises(st.ConfigError, match="blocks is empty"):
        train_lm(model, blocks()[:0], steps=1, batch_size=1, lr=1e-3, progress=False)


def test_cosine_schedule_warms_up_then_decays_to_zero():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = cosine_with_warmup(optimizer, warmup=4, total=12)
    factors = []
    for _ in range(12):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert (
        factors[4] == 1.0
        and factors[-1] < 0.05
        and factors == sorted(factors[:5]) + sorted(factors[4:], reverse=True)[1:]
    )
