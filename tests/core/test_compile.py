"""``torch.compile`` of adapted models, every method of the matrix.

- Each adapted layer (``AdaptedLayer`` with its adapter, the tiny MLP's odd shapes 30 → 42 → 18, Bone's padded
  tail included) traces into one graph: ``torch._dynamo.explain`` reports no graph break, with static shapes and
  with dynamic batch and sequence dims. A layer is checked rather than the HF model, whose own code is not ours.
- The compiled one-block tiny Llama (AOTAutograd, ``aot_eager``: dynamo's graphs and the traced backward, run by eager
  kernels; a few seconds per case) gives the eager logits and gradients, and a second step after an update of the
  adapters runs without recompiling. One case also runs through inductor, the default backend, whose first
  compilation on a fresh machine takes about 20 s on one thread (later runs hit its on-disk cache, 2 s).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

import slimtune as st
from cases import CASES, TINY_DECODER, adapted_copy, randomize_adapters, tiny_mlp
from slimtune.adapters.lora import LoraAdapter

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from scratch and leaves no compiled code behind."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def graph_breaks(layer: torch.nn.Module, dynamic: bool) -> tuple[int, list[str]]:
    """Graph breaks of ``layer`` on an input (3, 5, d_in), with the two leading dims dynamic or static."""
    x = torch.randn(3, 5, layer.d_in, requires_grad=True, generator=torch.Generator().manual_seed(0))
    if dynamic:
        torch._dynamo.mark_dynamic(x, 0)
        torch._dynamo.mark_dynamic(x, 1)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(layer)(x)
    return explained.graph_break_count, [str(b.reason) for b in explained.break_reasons]


@pytest.mark.parametrize("case", list(CASES))
def test_every_adapted_layer_traces_without_graph_breaks(case):
    model = adapted_copy(tiny_mlp(), CASES[case])
    randomize_adapters(model)
    model.train()
    layers = st.adapted_layers(model)
    assert layers
    for name, layer in layers:
        for dynamic in (False, True):
            count, reasons = graph_breaks(layer, dynamic)
            assert count == 0, f"{name} (dynamic={dynamic}): {reasons}"


def test_a_graph_break_is_reported(monkeypatch):
    """The check above can fail: a ``.tolist()`` in an adapter's forward is one break."""
    delta = LoraAdapter.delta
    monkeypatch.setattr(LoraAdapter, "delta", lambda self, x: delta(self, x) * (1 + 0 * x.sum().tolist()))
    model = adapted_copy(tiny_mlp(), CASES["lora"])
    count, _ = graph_breaks(dict(st.adapted_layers(model))["fc1"], dynamic=False)
    assert count >= 1


def one_block_llama() -> torch.nn.Module:
    """The tests' tiny Llama (hidden 48, GQA 4/2 heads, MLP 72, vocabulary 101) with one decoder block: compile
    time grows with the traced blocks, and a second block runs the same code."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY_DECODER, "num_hidden_layers": 1}, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def logits_and_grads(
    model: torch.nn.Module, forward: torch.nn.Module, ids: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits (batch, seq, vocab) of ``forward`` (``model`` or its compiled form) and the gradients of ``model``'s
    trainable tensors for the causal-LM loss on ``ids`` (batch, seq)."""
    model.zero_grad(set_to_none=True)
    out = forward(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


def assert_compiled_matches_eager(case: str, backend: str) -> None:
    """Two steps of the compiled tiny Llama against eager, the adapters moved in place between them (as an
    optimizer does); the second step must not recompile."""
    model = adapted_copy(one_block_llama(), CASES[case])
    randomize_adapters(model)
    model.train()
    compiled = torch.compile(model, backend=backend)
    ids = torch.randint(0, 101, (2, 11), generator=torch.Generator().manual_seed(3))
    for step in range(2):
        eager_logits, eager_grads = logits_and_grads(model, model, ids)
        with torch.compiler.set_stance("fail_on_recompile" if step else "default"):
            logits, grads = logits_and_grads(model, compiled, ids)
        torch.testing.assert_close(logits, eager_logits, rtol=1e-5, atol=1e-5)
        assert grads.keys() == eager_grads.keys() and grads
        for name, grad in eager_grads.items():
            assert grad.abs().max() > 0, name
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.requires_grad:
                    param.sub_(0.1 * eager_grads[name])


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_model_gives_the_eager_outputs_and_gradients(case):
    assert_compiled_matches_eager(case, "aot_eager")


def test_inductor_gives_the_eager_outputs_and_gradients():
    assert_compiled_matches_eager("lora", "inductor")
