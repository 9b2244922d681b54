"""Linear-attention ops: chunked and recurrent forms against the quadratic reference (outputs and gradients),
state carried across calls, GQA, bfloat16, 32k-token stability, the registry and the guarded fla path."""

from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest
import torch

from slimtune.errors import ConfigError, ShapeError
from slimtune.linear_attention import ops
from slimtune.linear_attention.ops import (
    LINEAR_ATTENTION_OPS,
    LinearAttentionState,
    get_linear_attention_op,
    linear_attention_chunked,
    linear_attention_recurrent,
    linear_attention_reference,
)

B, H, HKV, M, DV = 2, 6, 2, 5, 7


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def make_inputs(t: int, *, normalize: bool, decay: bool, init: bool, dtype=torch.float64, seed: int = 0, h_kv=HKV):
    """q [B, H, T, M], k [B, Hkv, T, M], v [B, Hkv, T, DV], log_decay [H] | None, initial state | None.

    Normalised attention gets positive features (as feature maps give), so its normaliser stays away from 0.
    """
    g = torch.Generator().manual_seed(seed)

    def feats(*shape):
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        return (0.5 * x).exp() if normalize else x

    q, k = feats(B, H, t, M), feats(B, h_kv, t, M)
    v = torch.randn(B, h_kv, t, DV, generator=g, dtype=torch.float64)
    log_decay = torch.log1p(-torch.linspace(0.25, 1 / 64, H, dtype=torch.float64)) if decay else None
    state = None
    if init:
        state = LinearAttentionState(
            S=torch.randn(B, H, M, DV, generator=g, dtype=torch.float64),
            z=feats(B, H, M) * t if normalize else None,
        )
    cast = [x.to(dtype) for x in (q, k, v)]
    return (*cast, log_decay, state)


def leaves(q, k, v, log_decay, state):
    """The inputs as fresh leaves that require grad, in a fixed order; None stays None."""
    tensors = [q, k, v, log_decay, None if state is None else state.S, None if state is None else state.z]
    out = [None if x is None else x.detach().clone().requires_grad_(True) for x in tensors]
    new_state = None if state is None else LinearAttentionState(S=out[4], z=out[5])
    return out, new_state


def run_with_grads(fn, inputs, normalize, **kw):
    """Run fn and back-propagate a fixed random projection of (o, final S, final z); return outputs and grads."""
    (q, k, v, log_decay, s0, z0), state = leaves(*inputs)
    o, final = fn(q, k, v, log_decay=log_decay, normalize=normalize, initial_state=state, output_final_state=True, **kw)
    g = torch.Generator().manual_seed(1)
    outputs = (o, final.S, final.z) if normalize else (o, final.S)
    loss = sum((x * torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype)).sum() for x in outputs)
    loss.backward()
    grads = [None if x is None else x.grad for x in (q, k, v, log_decay, s0, z0)]
    return o, final, grads


FAST_OPS = [
    pytest.param(linear_attention_chunked, {"chunk_size": 1}, id="chunked-C1"),
    pytest.param(linear_attention_chunked, {"chunk_size": 16}, id="chunked-C16"),
    pytest.param(linear_attention_chunked, {"chunk_size": 64}, id="chunked-C64"),
    pytest.param(linear_attention_recurrent, {}, id="recurrent"),
]


@pytest.mark.parametrize("fn,kw", FAST_OPS)
@pytest.mark.parametrize("t", [1, 7, 61, 130])
@pytest.mark.parametrize("decay", [False, True], ids=["nodecay", "decay"])
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "norm"])
def test_matches_reference_float64(fn, kw, t, decay, normalize):
    inputs = make_inputs(t, normalize=normalize, decay=decay, init=t > 1, seed=t)
    o_ref, f_ref, g_ref = run_with_grads(linear_attention_reference, inputs, normalize)
    o, f, grads = run_with_grads(fn, inputs, normalize, **kw)
    assert o.shape == (B, H, t, DV) and o.dtype == torch.float64
    assert rel_err(o, o_ref) < 1e-12
    assert rel_err(f.S, f_ref.S) < 1e-12
    if normalize:
        assert rel_err(f.z, f_ref.z) < 1e-12
    else:
        assert f.z is None and f_ref.z is None
    for name, g, gr in zip(("q", "k", "v", "log_decay", "S0", "z0"), grads, g_ref):
        assert (g is None) == (gr is None), name
        if gr is not None:
            torch.testing.assert_close(g, gr, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "norm"])
def test_float32_matches_float64_reference(normalize):
    inputs64 = make_inputs(130, normalize=normalize, decay=True, init=True, seed=3)
    o_ref, f_ref, g_ref = run_with_grads(linear_attention_reference, inputs64, normalize)
    q, k, v, log_decay, state = inputs64
    state32 = LinearAttentionState(S=state.S.float(), z=None if state.z is None else state.z.float())
    inputs32 = (q.float(), k.float(), v.float(), log_decay.float(), state32)
    for fn, kw in ((linear_attention_chunked, {"chunk_size": 16}), (linear_attention_recurrent, {})):
        o, f, grads = run_with_grads(fn, inputs32, normalize, **kw)
        assert o.dtype == torch.float32 and f.S.dtype == torch.float32
        assert rel_err(o, o_ref) < 1e-5
        assert rel_err(f.S, f_ref.S) < 1e-5
        for g, gr in zip(grads, g_ref):
            if gr is not None:
                assert rel_err(g, gr) < 1e-5


def test_gqa_reads_kv_head_h_div_group():
    q, k, v, log_decay, _ = make_inputs(23, normalize=True, decay=True, init=False)
    group = torch.arange(H) // (H // HKV)  # query head h reads key/value head h // 3
    o, _ = linear_attention_reference(q, k, v, log_decay=log_decay, normalize=True)
    o_rep, _ = linear_attention_reference(q, k[:, group], v[:, group], log_decay=log_decay, normalize=True)
    assert torch.equal(o, o_rep)
    o_chunk, _ = linear_attention_chunked(q, k[:, group], v[:, group], log_decay=log_decay, normalize=True)
    assert rel_err(o_chunk, o) < 1e-12


def test_reference_matches_explicit_sum():
    """The reference against its definition, by loops:
    o_t = Σ_{s≤t} γ^(t−s) (q_t·k_s) v_s / (Σ_{s≤t} γ^(t−s) q_t·k_s + eps)."""
    q, k, v, log_decay, _ = make_inputs(9, normalize=True, decay=True, init=False, h_kv=H)
    gamma = log_decay.exp()
    o, _ = linear_attention_reference(q, k, v, log_decay=log_decay, normalize=True, eps=1e-3)
    expected = torch.zeros_like(o)
    for h in range(H):
        for t in range(9):
            w = torch.stack([gamma[h] ** (t - s) * (q[:, h, t] * k[:, h, s]).sum(-1) for s in range(t + 1)], -1)
            expected[:, h, t] = (w[..., None] * v[:, h, : t + 1]).sum(1) / (w.sum(-1, keepdim=True) + 1e-3)
    assert rel_err(o, expected) < 1e-13


@pytest.mark.parametrize("name", ["reference", "chunked", "recurrent"])
@pytest.mark.parametrize("decay", [False, True], ids=["nodecay", "decay"])
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "norm"])
def test_state_carried_across_calls_equals_one_call(name, decay, normalize):
    fn = LINEAR_ATTENTION_OPS[name]
    q, k, v, log_decay, state = make_inputs(61, normalize=normalize, decay=decay, init=True, seed=5)
    kw = {"log_decay": log_decay, "normalize": normalize, "output_final_state": True}
    o_full, f_full = fn(q, k, v, initial_state=state, **kw)
    o1, f1 = fn(q[:, :, :25], k[:, :, :25], v[:, :, :25], initial_state=state, **kw)
    o2, f2 = fn(q[:, :, 25:], k[:, :, 25:], v[:, :, 25:], initial_state=f1, **kw)
    assert rel_err(torch.cat([o1, o2], dim=2), o_full) < 1e-12
    assert rel_err(f2.S, f_full.S) < 1e-12
    if normalize:
        assert rel_err(f2.z, f_full.z) < 1e-12


def test_chunked_prompt_then_recurrent_decoding_steps():
    q, k, v, log_decay, _ = make_inputs(40, normalize=True, decay=True, init=False, seed=6)
    kw = {"log_decay": log_decay, "normalize": True, "output_final_state": True}
    o_ref, _ = linear_attention_reference(q, k, v, **kw)
    o, state = linear_attention_chunked(q[:, :, :37], k[:, :, :37], v[:, :, :37], chunk_size=16, **kw)
    steps = [o]
    for t in range(37, 40):
        o_t, state = linear_attention_recurrent(
            q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], initial_state=state, **kw
        )
        steps.append(o_t)
    assert rel_err(torch.cat(steps, dim=2), o_ref) < 1e-12


@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "norm"])
def test_bfloat16_inputs_against_float32_reference(normalize):
    q, k, v, log_decay, state = make_inputs(130, normalize=normalize, decay=True, init=True, dtype=torch.bfloat16)
    state = LinearAttentionState(S=state.S.float(), z=None if state.z is None else state.z.float())
    kw = {"log_decay": log_decay.float(), "normalize": normalize, "initial_state": state, "output_final_state": True}
    o_ref, f_ref = linear_attention_reference(q.float(), k.float(), v.float(), **kw)
    for fn in (linear_attention_chunked, linear_attention_recurrent):
        o, f = fn(q, k, v, **kw)
        assert o.dtype == torch.bfloat16 and f.S.dtype == torch.float32
        assert rel_err(o, o_ref) < 1e-2
        assert rel_err(f.S, f_ref.S) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "norm"])
def test_32k_tokens_finite_and_right(dtype, normalize):
    """32,768 tokens with DiJiang's decay range γ ∈ [1 − 1/32, 1 − 1/512]: finite, and the last 256 outputs equal
    the reference run on that window from the state an independent recurrent pass carried to it."""
    t, window = 32768, 256
    g = torch.Generator().manual_seed(7)
    q, k = (torch.rand(1, 2, t, 16, generator=g) for _ in range(2))
    v = torch.randn(1, 2, t, 16, generator=g)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    log_decay = torch.log1p(-torch.tensor([1 / 32, 1 / 512]))
    o, final = linear_attention_chunked(q, k, v, log_decay=log_decay, normalize=normalize, output_final_state=True)
    assert o.dtype == dtype and torch.isfinite(o).all() and torch.isfinite(final.S).all()
    cut = t - window
    _, carried = linear_attention_recurrent(
        q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], log_decay=log_decay, normalize=normalize, output_final_state=True
    )
    o_win, f_win = linear_attention_reference(
        q[:, :, cut:].float(),
        k[:, :, cut:].float(),
        v[:, :, cut:].float(),
        log_decay=log_decay,
        normalize=normalize,
        initial_state=carried,
        output_final_state=True,
    )
    assert rel_err(o[:, :, cut:], o_win) < (1e-2 if dtype == torch.bfloat16 else 1e-5)
    assert rel_err(final.S, f_win.S) < 1e-5


def test_registry_and_unknown_names():
    assert set(LINEAR_ATTENTION_OPS) == {"reference", "chunked", "recurrent", "fla"}
    for name in ("reference", "chunked", "recurrent"):
        assert get_linear_attention_op(name) is LINEAR_ATTENTION_OPS[name]
    with pytest.raises(ConfigError, match=r"'flash'.*allowed: \['chunked', 'fla', 'recurrent', 'reference'\]"):
        get_linear_attention_op("flash")


def test_invalid_arguments_name_the_field():
    q, k, v, log_decay, state = make_inputs(8, normalize=True, decay=True, init=True)
    with pytest.raises(ConfigError, match=r"unknown linear-attention option\(s\) \['chunk'\]"):
        linear_attention_recurrent(q, k, v, chunk=4)
    allowed = (
        "'chunk_size', 'eps', 'initial_state', 'key_log_scale', 'log_decay', 'normalize', 'output_final_state', "
        "'query_log_scale'"
    )
    with pytest.raises(ConfigError, match=rf"option\(s\) \['chunks'\]; allowed: \[{allowed}\]"):
        linear_attention_chunked(q, k, v, chunks=4)
    with pytest.raises(ConfigError, match="chunk_size=0 is not allowed: expected a positive integer"):
        linear_attention_chunked(q, k, v, chunk_size=0)
    with pytest.raises(ShapeError, match=r"query heads H=6 must be a multiple of key/value heads Hkv=4"):
        linear_attention_chunked(q, k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1))
    with pytest.raises(ShapeError, match=r"k has shape"):
        linear_attention_chunked(q, k[..., :3], v)
    with pytest.raises(ShapeError, match=r"log_decay must have shape \[H\]=\(6,\), got \(2,\)"):
        linear_attention_chunked(q, k, v, log_decay=log_decay[:2])
    with pytest.raises(ConfigError, match=r"log_decay must be finite and <= 0"):
        linear_attention_chunked(q, k, v, log_decay=-log_decay)
    with pytest.raises(ConfigError, match=r"log_decay must be finite and <= 0.*-inf"):
        linear_attention_chunked(q, k, v, log_decay=torch.full((H,), float("-inf"), dtype=torch.float64))
    with pytest.raises(ConfigError, match=r"initial_state.z is set but normalize=False"):
        linear_attention_chunked(q, k, v, initial_state=state)
    with pytest.raises(ShapeError, match=r"initial_state.S must have shape \(2, 6, 5, 7\)"):
        linear_attention_reference(q, k, v, normalize=True, initial_state=LinearAttentionState(state.S[:1], state.z))
    with pytest.raises(ShapeError, match="sequence length T must be at least 1"):
        linear_attention_chunked(q[:, :, :0], k[:, :, :0], v[:, :, :0])
    with pytest.raises(ConfigError, match="eps must be >= 0, got -1"):
        linear_attention_chunked(q, k, v, eps=-1)


def _fake_chunk_simple_gla(q, k, v, g=None, scale=None, initial_state=None, output_final_state=False):
    """Stand-in for fla's kernel, in fla's [B, T, H, ·] layout.

    h_t = exp(g_t) h_{t−1} + k_t v_tᵀ, o_t = scale·h_tᵀ q_t."""
    b, t, h, m = q.shape
    assert k.shape == (b, t, h, m) and v.shape[:3] == (b, t, h)
    assert g is None or g.shape == (b, t, h)
    state = initial_state.clone()
    assert state.shape == (b, h, m, v.shape[-1]) and state.dtype == torch.float32
    outs = []
    for i in range(t):
        if g is not None:
            state = g[:, i, :, None, None].exp() * state
        state = state + k[:, i, :, :, None].float() * v[:, i, :, None, :].float()
        outs.append(scale * torch.einsum("bhm,bhmd->bhd", q[:, i].float(), state))
    return torch.stack(outs, dim=1).to(v.dtype), state if output_final_state else None


def test_fla_path_wiring_with_stand_in_kernel(monkeypatch):
    """Without a GPU, the fla entry is checked with a stand-in kernel: layout transposes, gate, scale, GQA,
    initial state and the ones-column normaliser must reproduce the reference."""
    spec = importlib.machinery.ModuleSpec("fla", None)
    fla, fla_ops, simple_gla = (types.ModuleType(n) for n in ("fla", "fla.ops", "fla.ops.simple_gla"))
    fla.__spec__ = spec
    simple_gla.chunk_simple_gla = _fake_chunk_simple_gla
    monkeypatch.setitem(sys.modules, "fla", fla)
    monkeypatch.setitem(sys.modules, "fla.ops", fla_ops)
    monkeypatch.setitem(sys.modules, "fla.ops.simple_gla", simple_gla)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="'fla' needs CUDA"):
        get_linear_attention_op("fla")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fla_op = get_linear_attention_op("fla")
    for normalize in (False, True):
        for decay in (False, True):
            q, k, v, log_decay, state = make_inputs(19, normalize=normalize, decay=decay, init=True, seed=8)
            kw = {"log_decay": log_decay, "normalize": normalize, "initial_state": state, "output_final_state": True}
            o, f = fla_op(q, k, v, **kw)
            o_ref, f_ref = linear_attention_reference(q, k, v, **kw)
            assert rel_err(o, o_ref) < 1e-6 and rel_err(f.S, f_ref.S) < 1e-6
            if normalize:
                assert rel_err(f.z, f_ref.z) < 1e-6


def test_fla_missing_package_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "fla", None)
    q, k, v, _, _ = make_inputs(4, normalize=False, decay=False, init=False)
    with pytest.raises(ConfigError, match=r"'fla' needs the package flash-linear-attention"):
        ops.linear_attention_fla(q, k, v)
