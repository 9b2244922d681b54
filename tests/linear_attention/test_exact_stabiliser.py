"""The exact stabiliser: per-key and per-query log scales in every op, the hybrid in kernel units, the maps' shifts,
and the layer computing with the unshifted kernel estimate. References are unstabilised float64 formulas."""

from __future__ import annotations

import json
import math

import pytest
import scipy.fft
import torch
from tests.cases import tiny_llama

from slimtune.linear_attention import (
    LinearAttentionCache,
    LinearizeConfig,
    linear_attention_layers,
    linearize,
    linearize_config,
    load_linearized,
    save_linearized,
)
from slimtune.linear_attention.feature_maps import (
    DiJiangFeatureMap,
    DiJiangOfficialFeatureMap,
    DiJiangQmcFeatureMap,
    HedgehogFeatureMap,
    PerformerFeatureMap,
)
from slimtune.linear_attention.op_args import LinearAttentionState
from slimtune.linear_attention.ops import (
    linear_attention_chunked,
    linear_attention_recurrent,
    linear_attention_reference,
)
from slimtune.linear_attention.window import (
    sliding_window_linear_attention,
    sliding_window_linear_attention_reference,
)

B, H, M, DV = 2, 3, 5, 4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def scaled_inputs(t: int, spread: float, *, normalize: bool, decay: bool, seed: int = 0):
    """q, k [B, H, T, M] (positive), v, log_decay [H] | None, key / query log scales [B, H, T] in ±spread, and an
    initial state whose shift is 0.7·spread (all float64)."""
    g = torch.Generator().manual_seed(seed)
    q, k = ((0.3 * torch.randn(B, H, t, M, generator=g, dtype=torch.float64)).exp() for _ in range(2))
    v = torch.randn(B, H, t, DV, generator=g, dtype=torch.float64)
    key_log, query_log = (spread * (2 * torch.rand(B, H, t, generator=g, dtype=torch.float64) - 1) for _ in range(2))
    log_decay = torch.log1p(-torch.linspace(0.2, 1 / 64, H, dtype=torch.float64)) if decay else None
    state = LinearAttentionState(
        S=torch.randn(B, H, M, DV, generator=g, dtype=torch.float64),
        z=torch.rand(B, H, M, generator=g, dtype=torch.float64) if normalize else None,
        shift=torch.full((B, H), 0.7 * spread, dtype=torch.float64),
    )
    return q, k, v, log_decay, key_log, query_log, state


def run(fn, inputs, normalize: bool, **kw):
    """o, final state and the gradients of a fixed projection of (o, unshifted final S) with respect to q, k, v,
    log_decay, both log scales and the initial S."""
    q, k, v, log_decay, key_log, query_log, state = inputs
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, key_log, query_log, state.S)]
    decay = None if log_decay is None else log_decay.detach().clone().requires_grad_(True)
    start = LinearAttentionState(S=leaves[5], z=state.z, shift=state.shift)
    o, final = fn(
        leaves[0],
        leaves[1],
        leaves[2],
        log_decay=decay,
        normalize=normalize,
        initial_state=start,
        output_final_state=True,
        key_log_scale=leaves[3],
        query_log_scale=leaves[4],
        **kw,
    )
    final_s, _ = final.unshifted()
    g = torch.Generator().manual_seed(1)
    loss = sum((x * torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype)).sum() for x in (o, final_s))
    loss.backward()
    grads = [x.grad for x in leaves] + [None if decay is None else decay.grad]
    return o, final, grads


OPS = [
    pytest.param(linear_attention_chunked, {"chunk_size": 1}, id="chunked-C1"),
    pytest.param(linear_attention_chunked, {"chunk_size": 5}, id="chunked-C5"),
    pytest.param(linear_attention_chunked, {"chunk_size": 64}, id="chunked-C64"),
    pytest.param(linear_attention_recurrent, {}, id="recurrent"),
]


@pytest.mark.parametrize("fn,kw", OPS)
@pytest.mark.parametrize("t", [1, 13, 70])
@pytest.mark.parametrize("decay", [False, True], ids=["nodecay", "decay"])
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "norm"])
def test_log_scales_match_the_unstabilised_reference_in_float64(fn, kw, t, decay, normalize):
    inputs = scaled_inputs(t, 20.0, normalize=normalize, decay=decay, seed=t)
    o_ref, f_ref, g_ref = run(linear_attention_reference, inputs, normalize)
    o, final, grads = run(fn, inputs, normalize, **kw)
    assert rel_err(o, o_ref) < 1e-10
    s, z = final.unshifted()
    assert rel_err(s, f_ref.S) < 1e-10 and (z is None) == (not normalize)
    if normalize:
        assert rel_err(z, f_ref.z) < 1e-10
    for name, grad, grad_ref in zip(("q", "k", "v", "key_log", "query_log", "S0", "log_decay"), grads, g_ref):
        assert (grad is None) == (grad_ref is None), name
        if grad_ref is not None:
            assert rel_err(grad, grad_ref) < 1e-9, name


@pytest.mark.parametrize("fn,kw", [OPS[1], OPS[3]])
def test_float32_is_exact_where_the_weights_exceed_the_float32_range(fn, kw):
    """Key weights e^(±300) overflow float32 many times over; normalised outputs still equal the float64 reference."""
    q, k, v, log_decay, key_log, query_log, _ = scaled_inputs(40, 300.0, normalize=True, decay=True, seed=5)
    options = {"log_decay": log_decay, "normalize": True, "key_log_scale": key_log, "query_log_scale": query_log}
    o_ref, _ = linear_attention_reference(q, k, v, **options)
    cast = {name: value.float() for name, value in options.items() if isinstance(value, torch.Tensor)}
    o, final = fn(q.float(), k.float(), v.float(), normalize=True, output_final_state=True, **cast, **kw)
    assert o.dtype == torch.float32 and torch.isfinite(o).all() and torch.isfinite(final.S).all()
    assert final.S.abs().max() < 1e3  # the state is held relative to its shift
    assert rel_err(o, o_ref) < 1e-5


def test_without_log_scales_the_key_weights_are_lost():
    """The per-token path (no log scales) gives a different answer from the kernel: the test above can fail."""
    q, k, v, _, key_log, _, _ = scaled_inputs(30, 5.0, normalize=True, decay=False, seed=2)
    exact, _ = linear_attention_reference(q, k, v, normalize=True, key_log_scale=key_log)
    dropped, _ = linear_attention_chunked(q, k, v, normalize=True)
    assert rel_err(dropped, exact) > 0.1


@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "norm"])
def test_prefill_then_decoding_steps_equal_one_call(normalize):
    q, k, v, log_decay, key_log, query_log, _ = scaled_inputs(23, 30.0, normalize=normalize, decay=True, seed=9)
    options = {"log_decay": log_decay, "normalize": normalize}
    whole, _ = linear_attention_chunked(q, k, v, key_log_scale=key_log, query_log_scale=query_log, **options)
    outs, state = [], None
    for piece in (slice(0, 10), *(slice(i, i + 1) for i in range(10, 23))):
        fn = linear_attention_chunked if piece.stop - piece.start > 1 else linear_attention_recurrent
        o, state = fn(
            q[:, :, piece],
            k[:, :, piece],
            v[:, :, piece],
            initial_state=state,
            output_final_state=True,
            key_log_scale=key_log[:, :, piece],
            query_log_scale=query_log[:, :, piece],
            chunk_size=4,
            **options,
        )
        outs.append(o)
    assert rel_err(torch.cat(outs, dim=2), whole) < 1e-12


def test_32k_tokens_with_spread_log_scales_stay_finite_and_right():
    t, window = 32768, 128
    g = torch.Generator().manual_seed(3)
    q, k = (torch.rand(1, 2, t, 8, generator=g) for _ in range(2))
    v = torch.randn(1, 2, t, 8, generator=g)
    key_log = 60 * torch.rand(1, 2, t, generator=g) - 30
    log_decay = torch.log1p(-torch.tensor([1 / 32, 1 / 512]))
    options = {"log_decay": log_decay, "normalize": True}
    o, final = linear_attention_chunked(q, k, v, key_log_scale=key_log, output_final_state=True, **options)
    assert torch.isfinite(o).all() and torch.isfinite(final.S).all() and torch.isfinite(final.shift).all()
    cut = t - window
    _, carried = linear_attention_chunked(
        q[:, :, :cut],
        k[:, :, :cut],
        v[:, :, :cut],
        key_log_scale=key_log[:, :, :cut],
        output_final_state=True,
        **options,
    )
    s, z = carried.unshifted()
    start = LinearAttentionState(S=s.double(), z=z.double())
    tail = (t.double()[:, :, cut:] for t in (q, k, v))
    o_ref, _ = linear_attention_reference(
        *tail, key_log_scale=key_log[:, :, cut:].double(), initial_state=start, **options
    )
    assert rel_err(o[:, :, cut:], o_ref) < 1e-5


@pytest.mark.parametrize("sinks", [0, 2])
def test_hybrid_in_kernel_units_matches_its_reference_and_decodes_in_steps(sinks):
    g = torch.Generator().manual_seed(4)
    t, d = 29, 6
    q, k = (0.5 * torch.randn(B, H, t, d, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, H, t, DV, generator=g, dtype=torch.float64)
    fq, fk = ((0.3 * torch.randn(B, H, t, M, generator=g, dtype=torch.float64)).exp() for _ in range(2))
    key_log, query_log = (10 * torch.rand(B, H, t, generator=g, dtype=torch.float64) - 5 for _ in range(2))
    valid = torch.ones(B, t, dtype=torch.bool)
    valid[0, :3] = False  # left padding
    options = {
        "window": 5,
        "sinks": sinks,
        "scale": 0.4,
        "mix": torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64),
        "log_decay": torch.log1p(-torch.tensor([0.1, 0.01, 0.001], dtype=torch.float64)),
        "valid": valid,
    }
    # the definition by hand: softmax weights exp(s·q·k), linear weights g·γ^(i−j)·(e^lq fq)·(e^lk fk), one sum
    pos = torch.arange(t)
    lag = pos[:, None] - pos[None, :]
    ok = valid[:, None, None, :]
    soft_keys = (lag >= 0) & ((lag < 5) | (pos[None, :] < sinks)) & ok
    lin_keys = (lag >= 5) & (pos[None, :] >= sinks) & ok
    gamma = options["log_decay"].exp()
    lin = (fq * query_log.exp()[..., None]) @ (fk * key_log.exp()[..., None]).transpose(-1, -2)
    lin = lin * gamma[:, None, None] ** lag.clamp(min=0) * options["mix"][:, None, None] * lin_keys
    weights = (q @ k.transpose(-1, -2) * 0.4).exp() * soft_keys + lin
    by_hand = weights @ v / (weights.sum(-1, keepdim=True) + 1e-6)
    scales = {"key_log_scale": key_log, "query_log_scale": query_log}
    reference = sliding_window_linear_attention_reference(q, k, v, fq, fk, **options, **scales)
    whole, _ = sliding_window_linear_attention(q, k, v, fq, fk, chunk_size=4, **options, **scales)
    assert rel_err(reference, by_hand) < 1e-12 and rel_err(whole, by_hand) < 1e-10
    outs, state = [], None
    for piece in (slice(0, 12), *(slice(i, i + 1) for i in range(12, t))):
        piece_options = {**options, "valid": valid[:, piece]}
        piece_scales = {name: value[:, :, piece] for name, value in scales.items()}
        o, state = sliding_window_linear_attention(
            *(x[:, :, piece] for x in (q, k, v, fq, fk)),
            initial_state=state,
            linear_op=linear_attention_chunked if piece.stop - piece.start > 1 else linear_attention_recurrent,
            **piece_options,
            **piece_scales,
        )
        outs.append(o)
    assert rel_err(torch.cat(outs, dim=2), by_hand) < 1e-10


def unshifted_by_hand(fmap: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The maps' definitions without any shift, written from their buffers and scipy's DCT (x [B, H, T, d])."""
    d = x.shape[-1]
    if isinstance(fmap, DiJiangFeatureMap):
        dct = torch.from_numpy(scipy.fft.dct(x.numpy(), norm="ortho", axis=-1))  # [B, H, T, d]
        rows = dct[..., torch.arange(fmap.m) % d]  # [B, H, T, m], (C x)_(i mod d)
        return fmap.weight.detach()[:, None, :] * torch.exp(fmap.freqs[:, None, :] * rows)
    half_norm = 0.5 * x.square().sum(-1, keepdim=True)
    y = torch.einsum("bhtd,hmd->bhtm", x, fmap.proj) - half_norm
    if isinstance(fmap, DiJiangQmcFeatureMap):
        return fmap.weight.detach()[:, None, :] * y.exp()
    return y.exp() / math.sqrt(fmap.m)


@pytest.mark.parametrize("cls", [DiJiangFeatureMap, DiJiangQmcFeatureMap, PerformerFeatureMap])
def test_features_times_exp_shift_is_the_unshifted_map(cls):
    fmap = cls(6, 2, 9, seed=1).double()
    x = 2.0 * torch.randn(3, 2, 7, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    phi, shift = fmap.features(x)
    assert shift.shape == (3, 2, 7) and not shift.requires_grad
    # rtol 1e-5: the paper map's DCT rows are a float32 buffer, scipy's DCT is exact
    torch.testing.assert_close(phi * shift.exp()[..., None], unshifted_by_hand(fmap, x), rtol=1e-5, atol=0)
    assert phi.amax(-1).le(fmap.weight.detach().abs().max() + 1e-12 if hasattr(fmap, "weight") else 1).all()
    torch.testing.assert_close(fmap(x), phi, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [DiJiangOfficialFeatureMap, HedgehogFeatureMap])
def test_bounded_maps_have_no_shift(cls):
    fmap = cls(6, 2, 8)
    x = torch.randn(1, 2, 4, 6)
    phi, shift = fmap.features(x)
    assert shift is None and torch.equal(phi, fmap(x))


def test_the_layer_computes_with_the_unshifted_kernel_estimate():
    """A converted layer's attention output equals normalised kernel attention with the unshifted qmc features,
    written here from the map's buffers (no decay, so Σ_s φ(q_t)·φ(k_s) v_s / Σ_s φ(q_t)·φ(k_s))."""
    model = linearize(tiny_llama().double(), LinearizeConfig(feature_map="dijiang_qmc", m=16, decay=False))
    layer = next(layer for _, layer in linear_attention_layers(model))
    g = torch.Generator().manual_seed(0)
    q = 3 * torch.randn(1, layer.num_heads, 11, layer.head_dim, generator=g, dtype=torch.float64)
    k, v = (3 * torch.randn(1, layer.num_kv_heads, 11, layer.head_dim, generator=g, dtype=torch.float64) for _ in "kv")
    rep = layer.num_heads // layer.num_kv_heads
    fq, fk = (unshifted_by_hand(layer.feature_map, x * layer.head_dim**-0.25) for x in (q, k.repeat_interleave(rep, 1)))
    scores = (fq @ fk.transpose(-1, -2)).tril()
    expected = scores @ v.repeat_interleave(rep, 1) / (scores.sum(-1, keepdim=True) + 1e-6)
    with torch.no_grad():
        assert rel_err(layer.attend(q, k, v), expected) < 1e-10
        layer.config = LinearizeConfig(feature_map="dijiang_qmc", m=16, decay=False, stabilizer="per_token")
        assert rel_err(layer.attend(q, k, v), expected) > 1e-3  # the per-token path reweights the keys


@pytest.mark.parametrize("window", [0, 3])
def test_cached_decoding_equals_a_full_forward_with_the_exact_stabiliser(window):
    config = LinearizeConfig(feature_map="dijiang_qmc", m=16, window=window, sink_tokens=1 if window else 0)
    model = linearize(tiny_llama(), config).eval()
    ids = torch.randint(0, 50, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        cache = LinearAttentionCache()
        steps = [model(ids[:, :9], past_key_values=cache, use_cache=True).logits]
        steps += [model(ids[:, i : i + 1], past_key_values=cache, use_cache=True).logits for i in range(9, 17)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)


def test_folders_saved_before_the_field_load_as_per_token(tmp_path):
    model = linearize(tiny_llama(), LinearizeConfig(stabilizer="per_token"))
    save_linearized(model, tmp_path)
    record_path = next(p for p in tmp_path.iterdir() if p.suffix == ".json")
    record = json.loads(record_path.read_text())
    del record["config"]["stabilizer"]
    record_path.write_text(json.dumps(record))
    assert linearize_config(load_linearized(tiny_llama(), tmp_path)).stabilizer == "per_token"
    assert LinearizeConfig().stabilizer == "exact"
