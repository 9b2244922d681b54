"""A NaN loss or gradient stops the one training loop before the step touches the weights, whatever it trains.

Every case runs through both entry points that share the loop: causal-LM training of an adapter (``train_lm``)
and attention transfer of a linearised model (``attention_transfer``, on its cached and its hook-based path).
The fault is a NaN activation (so the loss is NaN; on the cached path it reaches the loss through the cached
teacher tensors) or a NaN gradient (so its global norm is NaN, with and without clipping) at a chosen step.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from torch import nn

import slimtune as st
from cases import tiny_llama
from slimtune.linear_attention import LinearizeConfig, linear_attention_parameters, linearize
from slimtune.training import METRICS_FILE, TrainResult, attention_transfer, train_lm
from slimtune.training.checkpoint import checkpoint_root, latest_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


class Entry(NamedTuple):
    model: nn.Module
    param: nn.Parameter  # one parameter the entry point trains
    train: Callable[..., TrainResult]
    forwards_per_step: int = 1  # model forwards a step of ``run`` makes (the cached transfer: one per new block)


def lm_entry() -> Entry:
    model = st.get_adapted_model(tiny_llama(), st.LoraConfig(r=4, alpha=8.0))
    return Entry(model, model.model.layers[1].self_attn.v_proj.adapters["default"].lora_B, train_lm)


def transfer_entry() -> Entry:
    model = linearize(tiny_llama(), LinearizeConfig(feature_map="hedgehog"))
    return Entry(model, linear_attention_parameters(model)[-1], attention_transfer, forwards_per_step=2)


def hook_transfer_entry() -> Entry:
    model = linearize(tiny_llama(), LinearizeConfig(feature_map="hedgehog"))
    return Entry(model, linear_attention_parameters(model)[-1], functools.partial(attention_transfer, cached=False))


ENTRIES = {"train_lm": lm_entry, "attention_transfer": transfer_entry, "attention_transfer_hooks": hook_transfer_entry}


def run(entry: Entry, **options) -> None:
    blocks = torch.randint(10, 101, (12, 16), generator=torch.Generator().manual_seed(0))  # 12 distinct blocks
    entry.train(entry.model, blocks, steps=6, batch_size=2, lr=1e-2, progress=False, **options)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def weights_before_each_forward(model: nn.Module) -> list[dict[str, torch.Tensor]]:
    """The list every forward of ``model`` appends its parameters to, as they are when the forward starts."""
    seen: list[dict[str, torch.Tensor]] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(weights(module)))
    return seen


def nan_activation_at(model: nn.Module, forward_call: int) -> None:
    """Make the first MLP's output NaN in the ``forward_call``-th forward of ``model`` (0-based): the loss is NaN."""
    calls = {"n": -1}
    model.register_forward_pre_hook(lambda module, args: calls.update(n=calls["n"] + 1))
    mlp = model.get_submodule("model.layers.0.mlp")
    mlp.register_forward_hook(lambda module, args, out: out * float("nan") if calls["n"] == forward_call else out)


def nan_gradient_at(parameter: nn.Parameter, backward_call: int) -> None:
    """Make the gradient reaching ``parameter`` NaN on its ``backward_call``-th backward (0-based)."""
    calls = {"n": -1}

    def hook(grad: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return torch.full_like(grad, float("nan")) if calls["n"] == backward_call else grad

    parameter.register_hook(hook)


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_a_nan_loss_at_the_first_step_stops_before_any_change(name):
    entry = ENTRIES[name]()
    before = weights(entry.model)
    nan_activation_at(entry.model, forward_call=0)
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 0 \(after 0 completed steps; lr=") as error:
        run(entry)
    assert "no checkpoint was written yet" in str(error.value)
    assert all(torch.equal(p, before[n]) for n, p in entry.model.named_parameters())


@pytest.mark.parametrize("fault", ["loss", "gradient", "clipped gradient"])
@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_a_nan_at_step_3_keeps_the_weights_of_step_3_and_names_its_checkpoint(tmp_path: Path, name, fault):
    entry = ENTRIES[name]()
    seen = weights_before_each_forward(entry.model)
    if fault == "loss":
        nan_activation_at(entry.model, forward_call=3 * entry.forwards_per_step)
    else:
        nan_gradient_at(entry.param, backward_call=3)
    max_grad_norm = 1.0 if fault == "clipped gradient" else None
    with pytest.raises(FloatingPointError) as error:
        run(entry, output_dir=str(tmp_path), checkpoint_every=1, max_grad_norm=max_grad_norm)
    what = "loss is nan" if fault == "loss" else "the gradient norm is nan"
    message = str(error.value)
    assert f"{what} at step 3 (after 3 completed steps; lr=" in message
    assert f"the last good checkpoint is {checkpoint_root(tmp_path) / 'step-000003'}" in message
    assert latest_checkpoint(checkpoint_root(tmp_path)).name == "step-000003"
    assert all(torch.equal(p, seen[3 * entry.forwards_per_step][n]) for n, p in entry.model.named_parameters())
    assert all(p.grad is None for p in entry.model.parameters())
    lines = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]


def test_attention_transfer_stopped_by_a_nan_restores_the_mode_and_trainable_flags():
    entry = transfer_entry()
    entry.model.model.layers[0].requires_grad_(False)
    flags = {name: p.requires_grad for name, p in entry.model.named_parameters()}
    nan_gradient_at(entry.param, backward_call=1)
    with pytest.raises(FloatingPointError, match="the gradient norm is nan at step 1"):
        run(entry)
    assert {name: p.requires_grad for name, p in entry.model.named_parameters()} == flags
    assert not entry.model.training
