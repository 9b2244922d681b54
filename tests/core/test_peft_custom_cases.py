"""PEFT's own custom-model cases, ported: equal weights give PEFT's outputs, gradients and merged outputs.

Source: ``tests/test_custom_models.py`` of huggingface/peft (commit 5d602fd, version 0.20.1.dev0; the installed
peft 0.21.2 ships no tests). Its lists hold 70 LoRA / MiSS / C3A cases: 60 in ``TEST_CASES``, 9 in
``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES`` and 1 in ``MIXED_ADAPTER_TEST_CASES``. The 21 on ``nn.Linear`` and
transformers ``Conv1D`` layers that slimtune can express are ported below, on models written here to the same
shapes as PEFT's (``MLP``: 10 → 20 → 2; ``EmbConv1D``: embedding 100 × 5, Conv1D 5 → 1, linear 10 → 2) and PEFT's
input ``arange(90).view(9, 10)``. PEFT's defaults are spelled out (LoRA r = 8, alpha = 8; so ``lin1`` and ``conv1d``
get r above their smaller dimension, as in PEFT). MiSS maps to DiSHA (default init: Bone; ``"bat"``: Bat-Col;
``init_weights=False``: Bone with random values), C3A to SURM ``circulant`` with c_a = 1 and c_b from C3A's
kernel. "MLP 2 using nn.Parameter LoRA" targets ``lin1.weight`` of an ``nn.Linear``, which is LoRA on ``lin1``.
PEFT names two pairs of cases alike ("Vanilla MLP 1 MiSS", "Vanilla MLP 2 MiSS"); their Bat ones end in " bat" here.

Not ported, as slimtune cannot express them (49):

- ``modules_to_save`` (full trainable copies of a module): MLP 5 LoRA, MiSS MLP 5 (Bone and Bat), C3A MLP 5, 6, 7
  (7 also needs a per-module ``block_size_pattern``).
- DoRA (``use_dora``): MLP 7, 8, 9, EmbConv1D 1-3 DoRA, Conv1d / Conv2d / Conv2d Groups / Conv3d with DoRA.
- layers other than ``nn.Linear`` / ``Conv1D``: embeddings (EmbConv1D 2 and 3 LoRA), ``nn.Conv1d``, ``nn.Conv2d``
  (incl. groups), ``nn.Conv3d``, ``nn.MultiheadAttention`` (MHA 1 and 2), a custom layer's raw parameter
  (MLP 1 using nn.Parameter), trainable tokens (EmbConv1D trainable_tokens, the two multi-adapter
  "LoRA + trainable tokens" cases).
- LoRA variants with other math or training: lora_bias (MLP, Conv2d, Conv3d), KaSA, MiCA initialisation, VeLoRA
  (random, batch_average, batch_average_once), MonteCLoRA, BD-LoRA (A only, B only, both).
- several adapters on ``target_parameters`` (the two multi-adapter "LoRA targeting nn.Parameter" cases; PEFT skips
  them itself) and mixed adapter batches (``adapter_names`` per sample: "LoRA mixed adapter").
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
from peft import C3AConfig, MissConfig, get_peft_model
from peft import LoraConfig as PeftLoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

import slimtune as st
from slimtune.adapters.disha import BatAdapter, BoneAdapter
from slimtune.adapters.lora import LoraAdapter
from slimtune.adapters.surm import SurmAdapter


class MLP(nn.Module):
    """PEFT's ``MLP``: lin0 10 → 20, ReLU, Dropout(0.5), lin1 20 → 2, LogSoftmax."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: torch.Tensor) -> torch.Tensor:  # PEFT's input name
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(X.float())))))


class EmbConv1D(nn.Module):
    """PEFT's ``ModelEmbConv1D``: emb 100 × 5, GPT-2 Conv1D 5 → 1, ReLU, flatten (10), lin0 10 → 2, LogSoftmax."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 5)
        self.conv1d = Conv1D(1, 5)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.sm(self.lin0(self.flat(self.relu(self.conv1d(self.emb(X))))))


MODELS: dict[str, Callable[[], nn.Module]] = {"MLP": MLP, "EmbConv1D": EmbConv1D}


def lora(**kwargs: Any) -> tuple[type, dict[str, Any], st.AdapterConfig]:
    """A PEFT LoRA case and its slimtune config, with PEFT's defaults r = 8, alpha = 8 written out."""
    peft = {"r": 8, "lora_alpha": 8, **kwargs}
    slim = st.LoraConfig(
        r=peft["r"],
        alpha=peft["lora_alpha"],
        dropout=peft.get("lora_dropout", 0.0),
        target_modules=peft["target_modules"],
    )
    return PeftLoraConfig, kwargs, slim


def miss(target_modules: str | list[str], init_weights: bool | str = True) -> tuple[type, dict[str, Any], Any]:
    kwargs = {"target_modules": target_modules, "r": 2, "init_weights": init_weights}
    variant = "bat_col" if init_weights == "bat" else "bone"
    return MissConfig, kwargs, st.DishaConfig(r=2, variant=variant, target_modules=target_modules)


def c3a(target_modules: str | list[str], init_weights: bool = True) -> tuple[type, dict[str, Any], Any]:
    kwargs = {"block_size": 2, "target_modules": target_modules, "init_weights": init_weights}
    return C3AConfig, kwargs, st.SurmConfig(structure="circulant", block_size=2, target_modules=target_modules)


# PEFT test name -> (model, (PEFT config class, its kwargs, slimtune config))
SINGLE_CASES = {
    "Vanilla MLP 1 LoRA": ("MLP", lora(target_modules="lin0")),
    "Vanilla MLP 2 LoRA": ("MLP", lora(target_modules=["lin0"])),
    "Vanilla MLP 3 LoRA": ("MLP", lora(target_modules=["lin1"])),
    "Vanilla MLP 4 LoRA": ("MLP", lora(target_modules=["lin0", "lin1"])),
    "Vanilla MLP 6 LoRA": ("MLP", lora(target_modules=["lin0"], lora_alpha=4, lora_dropout=0.1)),
    "Embedding + transformers Conv1D 1 LoRA": ("EmbConv1D", lora(target_modules=["conv1d"])),
    "Vanilla MLP 1 MiSS": ("MLP", miss("lin0")),
    "Vanilla MLP 2 MiSS": ("MLP", miss(["lin0"])),
    "Vanilla MLP 3 MiSS": ("MLP", miss(["lin0", "lin1"])),
    "Vanilla MLP 1 MiSS bat": ("MLP", miss("lin0", "bat")),
    "Vanilla MLP 2 MiSS bat": ("MLP", miss(["lin0"], "bat")),
    "Vanilla MLP 3 MiSS with bat": ("MLP", miss(["lin0", "lin1"], "bat")),
    "Vanilla MLP 1 C3A": ("MLP", c3a("lin0")),
    "Vanilla MLP 2 C3A": ("MLP", c3a(["lin0"])),
    "Vanilla MLP 3 C3A": ("MLP", c3a(["lin1"])),
}
PARAMETER_CASE = "MLP 2 using nn.Parameter LoRA"  # PEFT: target_modules lin0, target_parameters lin1.weight
SINGLE_CASES[PARAMETER_CASE] = (
    "MLP",
    (
        PeftLoraConfig,
        {"target_modules": ["lin0"], "target_parameters": ["lin1.weight"]},
        lora(target_modules=["lin0", "lin1"])[2],
    ),
)

# PEFT test name -> (the two adapters' (PEFT class, kwargs, slimtune config)), both active on PEFT's MLP
MULTI_CASES = {
    "LoRA Same": (lora(target_modules=["lin0"], init_lora_weights=False),) * 2,
    "LoRA Different": (
        lora(target_modules=["lin0"], init_lora_weights=False),
        lora(target_modules=["lin1"], init_lora_weights=False),
    ),
    "MiSS Same": (miss(["lin0"], False),) * 2,
    "MiSS Different": (miss(["lin0"], False), miss(["lin1"], False)),
    "C3A Different": (c3a(["lin0"], False), c3a(["lin1"], False)),
}


@dataclasses.dataclass
class Link:
    """One slimtune tensor as a function of one PEFT tensor: ``slim = to_slim(peft)``."""

    peft: torch.Tensor
    slim: torch.Tensor
    to_slim: Callable[[torch.Tensor], torch.Tensor]


def same(value: torch.Tensor) -> torch.Tensor:
    return value


def c3a_to_circulant(d_in: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """C3A's block [r, s] is w[(s − r) mod b] / d_in; slimtune's Circ(c)[r, s] = c[(r − s) mod b], so
    c[k] = w[(−k) mod b] / d_in: reverse the last axis, then rotate it by one."""
    return lambda w: torch.roll(torch.flip(w, dims=[-1]), 1, dims=-1) / d_in


def links(peft_model: nn.Module, slim_model: nn.Module, adapter_name: str) -> list[Link]:
    """Every slimtune parameter of adapter ``adapter_name`` tied to the PEFT parameter it is computed from."""
    result = []
    for name, layer in st.adapted_layers(slim_model):
        if adapter_name not in layer.adapters:
            continue
        adapter = layer.adapter(adapter_name)
        peer = peft_model.base_model.model.get_submodule(name)
        if isinstance(adapter, LoraAdapter):
            result += [
                Link(peer.lora_A[adapter_name].weight, adapter.lora_A, same),
                Link(peer.lora_B[adapter_name].weight, adapter.lora_B, same),
            ]
        elif isinstance(adapter, (BoneAdapter, BatAdapter)):
            result.append(Link(peer.miss_block[adapter_name], adapter.block, same))
        elif isinstance(adapter, SurmAdapter):
            kernel = peer.c3a_kernel[adapter_name]
            result += [
                Link(kernel, adapter.operator.c_b, c3a_to_circulant(layer.d_in)),
                Link(kernel, adapter.operator.c_a, torch.ones_like),
            ]
        else:
            raise AssertionError(f"no PEFT peer for {type(adapter).__name__}")
    return result


@torch.no_grad()
def randomize(tied: list[Link], seed: int) -> None:
    """Random values in each PEFT tensor, and the values computed from them in the slimtune tensors."""
    generator = torch.Generator().manual_seed(seed)
    drawn: dict[int, torch.Tensor] = {}
    for link in tied:
        if id(link.peft) not in drawn:
            drawn[id(link.peft)] = torch.randn(link.peft.shape, generator=generator) * 0.2
            link.peft.copy_(drawn[id(link.peft)])
        value = link.to_slim(drawn[id(link.peft)])
        assert value.shape == link.slim.shape, (value.shape, link.slim.shape)
        link.slim.copy_(value)


def build_pair(
    model_kind: str, cases: tuple[tuple[type, dict[str, Any], Any], ...]
) -> tuple[nn.Module, nn.Module, nn.Module, list[Link]]:
    """(base, PEFT model, slimtune model, links) with adapters ``adapter_1``, ``adapter_2``, ... all active."""
    torch.manual_seed(0)
    base = MODELS[model_kind]().eval()
    peft_model = slim_model = None
    names = [f"adapter_{k + 1}" for k in range(len(cases))]
    for name, (peft_class, kwargs, slim_config) in zip(names, cases):
        if peft_model is None:
            peft_model = get_peft_model(copy.deepcopy(base), peft_class(**kwargs), adapter_name=name)
            slim_model = st.get_adapted_model(copy.deepcopy(base), slim_config, name)
        else:
            peft_model.add_adapter(name, peft_class(**kwargs))
            st.get_adapted_model(slim_model, slim_config, name)
    tied = [link for name in names for link in links(peft_model, slim_model, name)]
    randomize(tied, seed=7)
    for module in peft_model.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter(names)  # as PEFT's test_multiple_active_adapters_forward
    st.set_adapter(slim_model, names)
    return base, peft_model.eval(), slim_model.eval(), tied


INPUT = {"X": torch.arange(90).view(9, 10)}  # PEFT's prepare_inputs_for_testing


def assert_same_outputs(peft_model: nn.Module, slim_model: nn.Module, base: nn.Module) -> None:
    expected = peft_model(**INPUT)
    torch.testing.assert_close(slim_model(**INPUT), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(base(**INPUT), expected, atol=1e-3), "the adapters must change the output"


def assert_same_gradients(peft_model: nn.Module, slim_model: nn.Module, tied: list[Link]) -> None:
    """d loss / d PEFT tensor, from PEFT's backward and through the links from slimtune's."""
    weights = torch.randn(9, 2, generator=torch.Generator().manual_seed(3))
    (peft_model(**INPUT) * weights).sum().backward()
    (slim_model(**INPUT) * weights).sum().backward()
    through_links: dict[int, torch.Tensor] = {}
    for link in tied:
        grad = link.slim.grad if link.slim.grad is not None else torch.zeros_like(link.slim)
        _, back = torch.autograd.functional.vjp(link.to_slim, link.peft.detach(), grad)
        through_links[id(link.peft)] = through_links.get(id(link.peft), 0) + back
    for link in tied:
        torch.testing.assert_close(through_links[id(link.peft)], link.peft.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", list(SINGLE_CASES))
def test_single_adapter_cases_match_peft(case):
    model_kind, spec = SINGLE_CASES[case]
    base, peft_model, slim_model, tied = build_pair(model_kind, (spec,))
    assert_same_outputs(peft_model, slim_model, base)
    assert_same_gradients(peft_model, slim_model, tied)
    merged_peft, merged_slim = peft_model.merge_and_unload(), st.merge_and_unload(slim_model)
    torch.testing.assert_close(merged_slim(**INPUT), merged_peft(**INPUT), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(MULTI_CASES))
def test_multiple_active_adapter_cases_match_peft(case):
    base, peft_model, slim_model, tied = build_pair("MLP", MULTI_CASES[case])
    assert_same_outputs(peft_model, slim_model, base)
    assert_same_gradients(peft_model, slim_model, tied)
    for name in ("adapter_1", "adapter_2"):
        peft_model.set_adapter(name)
        st.set_adapter(slim_model, name)
        assert_same_outputs(peft_model, slim_model, base)
