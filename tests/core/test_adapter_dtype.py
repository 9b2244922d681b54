"""Adapters on a bfloat16 / float16 base are float32 (as PEFT's ``autocast_adapter_dtype``) for every method: the
layer's output keeps the base's dtype, the adapter's gradients are float32, and they match the gradients of the
same adapter on a float32 copy of the base to half precision (the activations are rounded through the whole
model, so the gradients agree in direction, cosine > 0.95, and to about 10-20% in size)."""

from __future__ import annotations

import pytest
import torch

from cases import CASES, adapted_copy, randomize_adapters, relative_error, tiny_llama


def adapter_grads(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_adapters_on_a_half_precision_base_are_float32(case, dtype):
    full = adapted_copy(tiny_llama(), CASES[case])
    randomize_adapters(full)
    half = adapted_copy(tiny_llama().to(dtype), CASES[case])
    half.load_state_dict(full.state_dict())  # the same adapter values, the base rounded to `dtype`
    trainable = [(n, p) for n, p in half.named_parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for _, p in trainable)
    assert all(p.dtype == dtype for n, p in half.named_parameters() if ".adapters." not in n)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(4))
    assert half(input_ids=ids).logits.dtype == dtype
    expected, got = adapter_grads(full, ids), adapter_grads(half, ids)
    for name, grad in expected.items():
        assert got[name].dtype == torch.float32 and got[name].isfinite().all(), name
        if grad.abs().max() > 0:  # bfloat16 activations through the whole model: same direction, ~10% apart
            cosine = torch.nn.functional.cosine_similarity(got[name].flatten(), grad.flatten(), dim=0)
            assert cosine > 0.95 and relative_error(got[name], grad) < 0.3, (name, float(cosine))


@pytest.mark.parametrize("case", list(CASES))
def test_every_method_trains_under_bfloat16_autocast(case):
    """``--mixed-precision bf16``: float32 weights, the forward under autocast; the adapter's gradients are float32,
    finite and close in direction to the float32 run's (custom autograd functions see bfloat16 output gradients)."""
    model = adapted_copy(tiny_llama(), CASES[case])
    randomize_adapters(model)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(4))
    expected = adapter_grads(model, ids)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the forward only, as accelerate's autocast
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for name, grad in expected.items():
        assert got[name].dtype == torch.float32 and got[name].isfinite().all(), name
        if grad.abs().max() > 0:
            cosine = torch.nn.functional.cosine_similarity(got[name].flatten(), grad.flatten(), dim=0)
            assert cosine > 0.95, (name, float(cosine))
