"""The sliding-window + linear hybrid (``window.py``): blocked form against the quadratic reference, pieces against
one call, limits that must reduce to softmax attention, and linearised models that keep the original's logits
when the window covers the whole sequence."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_linearize import TINY, token_blocks

from slimtune.errors import ConfigError, ShapeError
from slimtune.linear_attention import LinearizeConfig, linear_attention_recurrent, linearize
from slimtune.linear_attention.window import (
    sliding_window_linear_attention,
    sliding_window_linear_attention_reference,
)


def inputs(b=2, h=3, t=37, d=8, m=6, d_v=5, dtype=torch.float64, seed=0):
    """q, k [B, H, T, d], v [B, H, T, d_v], fq, fk [B, H, T, m] (positive), mix [H], log_decay [H]."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, h, t, d, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(b, h, t, d_v, generator=g, dtype=dtype)
    fq, fk = (torch.rand(b, h, t, m, generator=g, dtype=dtype) for _ in range(2))
    mix = torch.rand(h, generator=g, dtype=dtype) + 0.1
    log_decay = -0.1 * torch.rand(h, generator=g, dtype=dtype)
    return q, k, v, fq, fk, mix, log_decay


def padded(b: int, t: int, pads: int) -> torch.Tensor:
    """[B, T] validity: the last batch row has ``pads`` left-padding tokens."""
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[-1, :pads] = False
    return valid


@pytest.mark.parametrize(("window", "sinks"), [(1, 0), (5, 0), (5, 3), (8, 2), (7, 9), (40, 2)])
@pytest.mark.parametrize("t", [1, 6, 37])
@pytest.mark.parametrize("decay", [False, True], ids=["nodecay", "decay"])
def test_blocked_form_matches_the_reference_float64(window, sinks, t, decay):
    q, k, v, fq, fk, mix, log_decay = inputs(t=t)
    kw = {
        "window": window,
        "sinks": sinks,
        "scale": 0.3,
        "mix": mix,
        "log_decay": log_decay if decay else None,
        "valid": padded(2, t, min(4, t - 1)),
    }
    expected = sliding_window_linear_attention_reference(q, k, v, fq, fk, **kw)
    got, state = sliding_window_linear_attention(q, k, v, fq, fk, **kw, chunk_size=4)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert state.seen == t and state.k.shape[2] == min(t, window) and state.sink_k.shape[2] == min(t, sinks)


def test_gradients_match_the_reference():
    tensors = [t.requires_grad_() for t in inputs(t=23)]
    kw = {"window": 6, "sinks": 2, "scale": 0.4, "valid": padded(2, 23, 3)}
    q, k, v, fq, fk, mix, log_decay = tensors
    grads = []
    for fn in (sliding_window_linear_attention_reference, sliding_window_linear_attention):
        out = fn(q, k, v, fq, fk, mix=mix, log_decay=log_decay, **kw)
        out = out[0] if isinstance(out, tuple) else out
        grads.append(torch.autograd.grad(out.pow(2).sum(), tensors))
    for fast, slow in zip(*grads):
        torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("pieces", [(1, 8, 1, 20, 7), (37,), (3,) * 12 + (1,)])
def test_pieces_and_token_steps_equal_one_call(pieces):
    q, k, v, fq, fk, mix, log_decay = inputs(t=37)
    valid = padded(2, 37, 5)
    kw = {"window": 7, "sinks": 3, "scale": 0.3, "mix": mix, "log_decay": log_decay}
    whole, _ = sliding_window_linear_attention(q, k, v, fq, fk, valid=valid, **kw)
    outs, state, start = [], None, 0
    for size in pieces:
        part = slice(start, start + size)
        op = {"linear_op": linear_attention_recurrent} if size == 1 else {"chunk_size": 3}
        out, state = sliding_window_linear_attention(
            q[:, :, part],
            k[:, :, part],
            v[:, :, part],
            fq[:, :, part],
            fk[:, :, part],
            valid=valid[:, part],
            initial_state=state,
            **kw,
            **op,
        )
        outs.append(out)
        start += size
    torch.testing.assert_close(torch.cat(outs, dim=2), whole, rtol=1e-10, atol=1e-12)


def test_a_window_covering_the_sequence_is_causal_softmax_attention():
    q, k, v, fq, fk, mix, _ = inputs(t=19, d_v=8)
    out, _ = sliding_window_linear_attention(q, k, v, fq, fk, window=19, scale=0.35, mix=mix, eps=0.0)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.35)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_without_the_linear_part_it_is_softmax_over_the_window_and_the_sinks():
    q, k, v, fq, fk, _, log_decay = inputs(t=30, d_v=8)
    out, _ = sliding_window_linear_attention(
        q,
        k,
        v,
        fq,
        fk,
        window=6,
        sinks=2,
        scale=0.35,
        mix=torch.zeros(3, dtype=torch.float64),
        log_decay=log_decay,
        eps=0.0,
    )
    i, j = torch.arange(30)[:, None], torch.arange(30)[None, :]
    visible = (j <= i) & ((i - j < 6) | (j < 2))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=0.35)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_low_precision_inputs_against_the_float64_reference(dtype):
    q, k, v, fq, fk, mix, log_decay = inputs(t=45)
    kw = {"window": 8, "sinks": 2, "scale": 0.3, "mix": mix, "log_decay": log_decay}
    expected = sliding_window_linear_attention_reference(q, k, v, fq, fk, **kw)
    low = [t.to(dtype) for t in (q, k, v, fq, fk)]
    got, _ = sliding_window_linear_attention(*low, **{**kw, "mix": mix.float(), "log_decay": log_decay.float()})
    assert got.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.double(), expected, rtol=tolerance, atol=tolerance)


def test_32k_tokens_stay_finite_in_bfloat16():
    q, k, v, fq, fk, mix, _ = inputs(b=1, h=2, t=32768, d=8, m=4, d_v=4, dtype=torch.bfloat16)
    out, state = sliding_window_linear_attention(
        q * 4,
        k * 4,
        v,
        fq * 30,
        fk * 30,
        window=64,
        sinks=4,
        scale=1.0,
        mix=mix.float(),
        log_decay=None,
        chunk_size=256,
    )
    assert out.isfinite().all() and state.linear.S.isfinite().all() and state.seen == 32768


def test_bad_arguments_name_what_is_wrong():
    q, k, v, fq, fk, mix, _ = inputs(t=5)
    with pytest.raises(ConfigError, match="window=0 is not allowed"):
        sliding_window_linear_attention(q, k, v, fq, fk, window=0, scale=1.0, mix=mix)
    with pytest.raises(ConfigError, match="sinks=-1 is not allowed"):
        sliding_window_linear_attention(q, k, v, fq, fk, window=2, sinks=-1, scale=1.0, mix=mix)
    with pytest.raises(ShapeError, match="mix must have shape"):
        sliding_window_linear_attention(q, k, v, fq, fk, window=2, scale=1.0, mix=mix[:2])
    with pytest.raises(ShapeError, match="k has shape"):
        sliding_window_linear_attention(q, k[:, :1], v, fq, fk, window=2, scale=1.0, mix=mix)
    with pytest.raises(ShapeError, match="valid must be a bool tensor"):
        sliding_window_linear_attention(q, k, v, fq, fk, window=2, scale=1.0, mix=mix, valid=torch.ones(2, 5))


@pytest.mark.parametrize("arch", sorted(TINY))
def test_a_linearised_model_with_a_window_over_the_whole_sequence_keeps_the_original_logits(arch):
    """The tiny Mistral has its own sliding window of 8: window=8 with the linear part off reproduces it."""
    original = TINY[arch]()
    ids = token_blocks(2, 19)
    expected = original(ids, use_cache=False).logits
    window = getattr(original.config, "sliding_window", None) or 19
    model = linearize(original, LinearizeConfig(window=window, window_mix=1.0))
    if window < 19:
        for layer in model.model.layers:
            layer.self_attn.window_mix_log.data.fill_(float("-inf"))
    torch.testing.assert_close(model(ids, use_cache=False).logits, expected, rtol=1e-5, atol=1e-5)


def test_window_mix_sets_the_initial_linear_weight_and_is_trainable():
    model = linearize(TINY["llama"](), LinearizeConfig(window=4, window_mix=0.25))
    layer = model.model.layers[0].self_attn
    assert layer.window_mix_log.requires_grad
    torch.testing.assert_close(layer.window_mix_log.exp(), torch.full((4,), 0.25))
    assert "window_mix_log" in layer.new_state_dict() and math.isclose(layer.softmax_scale, 12**-0.5)
