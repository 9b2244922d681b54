"""Causal linear attention with an optional per-head decay: a quadratic reference, a chunked and a recurrent form.

For query head h, with γ = exp(log_decay[h]) (γ = 1 when ``log_decay`` is None) and initial state S₀:

    S_t = γ S_{t−1} + k_t v_tᵀ                 (S_{−1} = S₀, shape [m, d_v])
    o_t = S_tᵀ q_t = Σ_{s≤t} γ^(t−s) (q_t·k_s) v_s + γ^(t+1) S₀ᵀ q_t

With ``normalize=True`` a key-sum z_t = γ z_{t−1} + k_t rides along (z_{−1} = z₀, shape [m]) and
o_t is divided by q_t·z_t + eps, i.e. by Σ_{s≤t} γ^(t−s) (q_t·k_s) + γ^(t+1) q_t·z₀ + eps.
This is fla's simple-GLA recurrence with a head-wise constant gate and scale 1 (the feature map owns any scaling).

Every op has the same signature::

    fn(q, k, v, *, log_decay=None, normalize=False, initial_state=None, output_final_state=False, eps=1e-6, **kw)
        -> (o, final_state | None)

- q: [B, H, T, m] and k: [B, Hkv, T, m] feature-mapped queries and keys; v: [B, Hkv, T, d_v]. H % Hkv == 0
  (grouped-query attention: query head h reads key/value head h // (H / Hkv), as HF's ``repeat_kv``).
- log_decay: None or [H], per query head, every entry finite and ≤ 0 (checked; on a GPU the check synchronises once).
- initial_state / final_state: a :class:`LinearAttentionState` (S [B, H, m, d_v], z [B, H, m] iff normalize),
  held in float32 (float64 for float64 inputs) whatever the input dtype, so a sequence can be processed in
  pieces, or decoded token by token, and give the result of one call.
- o: [B, H, T, d_v] in the inputs' dtype. All arithmetic runs in float32 for half/bfloat16 inputs.
- ``**kw``: op-specific options; only ``chunk_size`` (used by ``chunked``, accepted and ignored elsewhere, so
  the ops are interchangeable). Any other name is a ConfigError.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch

from slimtune.config import check_int
from slimtune.errors import ConfigError, ShapeError

_OPTIONS = ("chunk_size",)


@dataclass
class LinearAttentionState:
    """The fixed-size state carried between calls, per batch element and query head.

    S: [B, H, m, d_v], Σ_s γ^(T−1−s) k_s v_sᵀ (plus the decayed initial S).
    z: [B, H, m], Σ_s γ^(T−1−s) k_s, present exactly when the attention is normalised; None otherwise.
    Both are float32 (float64 for float64 inputs).
    """

    S: torch.Tensor
    z: torch.Tensor | None = None


def _check_options(kw: dict) -> None:
    unknown = sorted(set(kw) - set(_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown linear-attention option(s) {unknown}; allowed: {list(_OPTIONS)}")


def _validate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None,
    normalize: bool,
    initial_state: LinearAttentionState | None,
    eps: float,
) -> torch.dtype:
    """Check shapes and options (module docstring); return the output dtype, the promoted dtype of q, k, v."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ShapeError(f"{name} must be 4-D [B, heads, T, features], got shape {tuple(t.shape)}")
    b, h, n, m = q.shape
    _, h_kv, _, d_v = v.shape
    if k.shape != (b, h_kv, n, m):
        raise ShapeError(
            f"k has shape {tuple(k.shape)}; with q {tuple(q.shape)} and v {tuple(v.shape)} it must be {(b, h_kv, n, m)}"
        )
    if v.shape[:3] != (b, h_kv, n):
        raise ShapeError(f"v has shape {tuple(v.shape)}; its batch and length must match q {tuple(q.shape)}")
    if n < 1:
        raise ShapeError(f"sequence length T must be at least 1, got q of shape {tuple(q.shape)}")
    if h % h_kv:
        raise ShapeError(f"query heads H={h} must be a multiple of key/value heads Hkv={h_kv}")
    if eps < 0:
        raise ConfigError(f"eps must be >= 0, got {eps}")
    if log_decay is not None:
        if log_decay.shape != (h,):
            raise ShapeError(f"log_decay must have shape [H]=({h},), got {tuple(log_decay.shape)}")
        if bool(((log_decay > 0) | ~log_decay.isfinite()).any()):
            raise ConfigError(f"log_decay must be finite and <= 0 (a decay 0 < γ <= 1), got {log_decay.tolist()}")
    if initial_state is not None:
        if initial_state.S.shape != (b, h, m, d_v):
            raise ShapeError(f"initial_state.S must have shape {(b, h, m, d_v)}, got {tuple(initial_state.S.shape)}")
        if normalize != (initial_state.z is not None):
            raise ConfigError(
                f"initial_state.z is {'None' if initial_state.z is None else 'set'} but normalize={normalize}; "
                "z must be present exactly when normalize=True"
            )
        if normalize and initial_state.z.shape != (b, h, m):
            raise ShapeError(f"initial_state.z must have shape {(b, h, m)}, got {tuple(initial_state.z.shape)}")
    return torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)


def _repeat_kv(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Repeat key/value heads for GQA: [B, Hkv, T, ·] → [B, H, T, ·], head h reading head h // (H / Hkv)."""
    rep = q.shape[1] // t.shape[1]
    return t if rep == 1 else t.repeat_interleave(rep, dim=1)


def _initial(
    q: torch.Tensor, d_v: int, normalize: bool, initial_state: LinearAttentionState | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """S₀ [B, H, m, d_v] and z₀ [B, H, m] (None unless normalize) in ``dtype``; zeros without an initial state."""
    b, h, _, m = q.shape
    if initial_state is None:
        return q.new_zeros(b, h, m, d_v, dtype=dtype), q.new_zeros(b, h, m, dtype=dtype) if normalize else None
    return initial_state.S.to(dtype), initial_state.z.to(dtype) if normalize else None


def _prepare(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None,
    normalize: bool,
    initial_state: LinearAttentionState | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.dtype]:
    """Validate, repeat key/value heads for GQA and cast to the accumulation dtype (float32 at least).

    Returns q [B, H, T, m], k [B, H, T, m], v [B, H, T, d_v], log_decay [H] (zeros when None),
    S₀ [B, H, m, d_v], z₀ [B, H, m] or None, and the output dtype.
    """
    out_dtype = _validate(q, k, v, log_decay, normalize, initial_state, eps)
    acc = torch.promote_types(out_dtype, torch.float32)
    log_decay = q.new_zeros(q.shape[1], dtype=acc) if log_decay is None else log_decay.to(acc)
    s0, z0 = _initial(q, v.shape[-1], normalize, initial_state, acc)
    k, v = _repeat_kv(q, k), _repeat_kv(q, v)
    return q.to(acc), k.to(acc), v.to(acc), log_decay, s0, z0, out_dtype


def _finish(
    o: torch.Tensor, state: torch.Tensor | None, d_v: int, normalize: bool, output_final_state: bool, eps: float
) -> tuple[torch.Tensor, LinearAttentionState | None]:
    """Split the ones-column trick: o [B, H, T, d_a], state [B, H, m, d_a] with d_a = d_v + normalize.

    Returns o [B, H, T, d_v] (divided by its last column + eps when normalize) and the final state or None.
    """
    final = None
    if normalize:
        o = o[..., :d_v] / (o[..., d_v:] + eps)
        if output_final_state:
            final = LinearAttentionState(S=state[..., :d_v], z=state[..., d_v])
    elif output_final_state:
        final = LinearAttentionState(S=state)
    return o, final


def linear_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    log_decay: torch.Tensor | None = None,
    normalize: bool = False,
    initial_state: LinearAttentionState | None = None,
    output_final_state: bool = False,
    eps: float = 1e-6,
    **kw,
) -> tuple[torch.Tensor, LinearAttentionState | None]:
    """Quadratic masked form: builds the [T, T] decay-masked score matrix. O(T²) memory, for tests only.

    Shapes and state as in the module docstring.
    """
    _check_options(kw)
    q, k, v, log_decay, s0, z0, out_dtype = _prepare(q, k, v, log_decay, normalize, initial_state, eps)
    n = q.shape[2]
    pos = torch.arange(n, device=q.device)
    lag = pos[:, None] - pos[None, :]  # [T, T], t − s
    log_w = log_decay[:, None, None] * lag  # [H, T, T], (t − s)·log γ
    decay = log_w.masked_fill(lag < 0, float("-inf")).exp()  # γ^(t−s) for s ≤ t, else 0
    scores = (q @ k.transpose(-1, -2)) * decay  # [B, H, T, T]
    q_init = q * (log_decay[:, None] * (pos + 1)).exp()[:, :, None]  # [B, H, T, m], γ^(t+1) q_t
    o = scores @ v + q_init @ s0  # [B, H, T, d_v]
    if normalize:
        den = scores.sum(-1) + (q_init * z0[:, :, None]).sum(-1)  # [B, H, T]
        o = o / (den + eps)[..., None]
    final = None
    if output_final_state:
        key_w = (log_decay[:, None] * (n - 1 - pos)).exp()[:, :, None]  # [H, T, 1], γ^(T−1−s)
        s_end = (log_decay * n).exp()[:, None, None]  # [H, 1, 1], γ^T
        final = LinearAttentionState(
            S=s_end * s0 + (k * key_w).transpose(-1, -2) @ v,
            z=s_end[..., 0] * z0 + (k * key_w).sum(2) if normalize else None,
        )
    return o.to(out_dtype), final


def linear_attention_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    log_decay: torch.Tensor | None = None,
    normalize: bool = False,
    initial_state: LinearAttentionState | None = None,
    output_final_state: bool = False,
    eps: float = 1e-6,
    chunk_size: int = 64,
    **kw,
) -> tuple[torch.Tensor, LinearAttentionState | None]:
    """Parallel chunk form: quadratic inside chunks of C = chunk_size tokens, a state scan across chunks.

    Cost O(T·C·m + T·m·d_v) time; the chunk-start states [B, H, T/C, m, d_v] are kept for backward.
    Decay is handled in log space: inside a chunk the cumulative log-decay b_i = (i+1)·log γ gives the
    factors exp(b_i − b_j) (j ≤ i), exp(b_i) (state → query) and exp(b_last − b_j) (key → chunk end),
    all exponents ≤ 0, so nothing overflows at any length. T need not be a multiple of C: the tail is
    zero-padded and the last chunk's decay uses its true length. With ``normalize`` the value gets an
    all-ones column, whose output is the normaliser and whose state column is z.
    Shapes and state as in the module docstring.
    """
    _check_options(kw)
    check_int("chunk_size", chunk_size)
    q, k, v, log_decay, s0, z0, out_dtype = _prepare(q, k, v, log_decay, normalize, initial_state, eps)
    b, h, n, m = q.shape
    d_v = v.shape[-1]
    if normalize:
        v = torch.cat([v, v.new_ones(b, h, n, 1)], dim=-1)  # [B, H, T, d_v + 1]
        s0 = torch.cat([s0, z0[..., None]], dim=-1)  # [B, H, m, d_v + 1]
    d_a = v.shape[-1]
    c = min(chunk_size, n)
    n_chunks = -(-n // c)
    pad = n_chunks * c - n
    q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))  # [B, H, N·C, ·]
    q = q.view(b, h, n_chunks, c, m)  # [B, H, N, C, m]
    k = k.view(b, h, n_chunks, c, m)  # [B, H, N, C, m]
    v = v.view(b, h, n_chunks, c, d_a)  # [B, H, N, C, d_a]

    pos = torch.arange(c, device=q.device)
    cum = log_decay[:, None] * (pos + 1)  # [H, C], b_i = (i+1)·log γ
    causal = pos[:, None] >= pos[None, :]
    intra = (cum[:, :, None] - cum[:, None, :]).masked_fill(~causal, float("-inf")).exp()  # [H, C, C]
    scores = (q @ k.transpose(-1, -2)) * intra[:, None]  # [B, H, N, C, C]
    o = scores @ v  # [B, H, N, C, d_a]

    length = (n - c * torch.arange(n_chunks, device=q.device)).clamp(max=c)  # [N], true chunk lengths
    to_end = (length[:, None] - 1 - pos[None, :]).clamp(min=0)  # [N, C], 0 on padding (its k is 0)
    key_w = (log_decay[:, None, None] * to_end).exp()  # [H, N, C], γ^(L_n − 1 − j)
    deltas = (k * key_w[None, ..., None]).transpose(-1, -2) @ v  # [B, H, N, m, d_a]
    chunk_w = (log_decay[:, None] * length).exp()[..., None, None]  # [H, N, 1, 1], γ^(L_n)
    state = s0
    starts = []
    for i in range(n_chunks):
        starts.append(state)
        state = chunk_w[:, i] * state + deltas[:, :, i]
    o = o + (q * cum.exp()[:, None, :, None]) @ torch.stack(starts, dim=2)  # [B, H, N, C, d_a]
    o = o.reshape(b, h, n_chunks * c, d_a)[:, :, :n]  # [B, H, T, d_a]

    o, final = _finish(o, state, d_v, normalize, output_final_state, eps)
    return o.to(out_dtype), final


def linear_attention_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    log_decay: torch.Tensor | None = None,
    normalize: bool = False,
    initial_state: LinearAttentionState | None = None,
    output_final_state: bool = False,
    eps: float = 1e-6,
    **kw,
) -> tuple[torch.Tensor, LinearAttentionState | None]:
    """Token-by-token recurrence on the fixed-size state; with T = 1 it is one decoding step.

    O(T·m·d_v) time, a Python loop over T: for decoding and tests, not for training.
    Shapes and state as in the module docstring.
    """
    _check_options(kw)
    q, k, v, log_decay, state, z, out_dtype = _prepare(q, k, v, log_decay, normalize, initial_state, eps)
    gamma = log_decay.exp()  # [H]
    outs = []
    for t in range(q.shape[2]):
        state = gamma[:, None, None] * state + k[:, :, t, :, None] * v[:, :, t, None, :]  # [B, H, m, d_v]
        o_t = (q[:, :, t, :, None] * state).sum(2)  # [B, H, d_v]
        if normalize:
            z = gamma[:, None] * z + k[:, :, t]  # [B, H, m]
            o_t = o_t / ((q[:, :, t] * z).sum(-1, keepdim=True) + eps)
        outs.append(o_t)
    o = torch.stack(outs, dim=2)  # [B, H, T, d_v]
    final = LinearAttentionState(S=state, z=z) if output_final_state else None
    return o.to(out_dtype), final


def linear_attention_fla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    log_decay: torch.Tensor | None = None,
    normalize: bool = False,
    initial_state: LinearAttentionState | None = None,
    output_final_state: bool = False,
    eps: float = 1e-6,
    **kw,
) -> tuple[torch.Tensor, LinearAttentionState | None]:
    """The same op on flash-linear-attention's Triton kernel ``fla.ops.simple_gla.chunk_simple_gla`` (CUDA only).

    fla wants [B, T, H, ·]; inputs are transposed in and out. The decay goes in as the per-token gate
    g [B, T, H] (fla returns no gradient for its ``g_gamma``), scale is 1, GQA heads are repeated first.
    fla's own ``normalize`` ignores the decay and the initial state, so the normaliser is computed the
    way ``chunked`` does it: an all-ones value column. fla is imported here, never at module import.
    Shapes and state as in the module docstring.
    """
    _check_options(kw)
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError as err:
        raise ConfigError(f"linear-attention op 'fla' needs the package flash-linear-attention (fla): {err}") from err
    out_dtype = _validate(q, k, v, log_decay, normalize, initial_state, eps)
    b, h, n, _ = q.shape
    d_v = v.shape[-1]
    k, v = _repeat_kv(q, k).to(out_dtype), _repeat_kv(q, v).to(out_dtype)  # [B, H, T, ·]
    s0, z0 = _initial(q, d_v, normalize, initial_state, torch.float32)
    if normalize:
        v = torch.cat([v, v.new_ones(b, h, n, 1)], dim=-1)  # [B, H, T, d_v + 1]
        s0 = torch.cat([s0, z0[..., None]], dim=-1)  # [B, H, m, d_v + 1]
    gate = None if log_decay is None else log_decay.float().expand(b, n, h).contiguous()  # [B, T, H]
    o, state = chunk_simple_gla(
        q.to(out_dtype).transpose(1, 2),  # [B, T, H, m]
        k.transpose(1, 2),  # [B, T, H, m]
        v.transpose(1, 2),  # [B, T, H, d_a]
        g=gate,
        scale=1.0,
        initial_state=s0,
        output_final_state=output_final_state,
    )
    o = o.transpose(1, 2).float()  # [B, H, T, d_a]
    o, final = _finish(o, state, d_v, normalize, output_final_state, eps)
    return o.to(out_dtype), final


LinearAttentionOp = Callable[..., tuple[torch.Tensor, LinearAttentionState | None]]

LINEAR_ATTENTION_OPS: dict[str, LinearAttentionOp] = {
    "reference": linear_attention_reference,
    "chunked": linear_attention_chunked,
    "recurrent": linear_attention_recurrent,
    "fla": linear_attention_fla,
}


def fla_available() -> bool:
    """True when CUDA is available and the ``fla`` package can be found (it is not imported)."""
    return torch.cuda.is_available() and importlib.util.find_spec("fla") is not None


def get_linear_attention_op(name: str) -> LinearAttentionOp:
    """The op registered under ``name``; ``"fla"`` only where :func:`fla_available` holds."""
    if name not in LINEAR_ATTENTION_OPS:
        raise ConfigError(f"unknown linear-attention op {name!r}; allowed: {sorted(LINEAR_ATTENTION_OPS)}")
    if name == "fla" and not fla_available():
        raise ConfigError(
            "linear-attention op 'fla' needs CUDA and the flash-linear-attention package (fla); "
            f"use one of {sorted(set(LINEAR_ATTENTION_OPS) - {'fla'})} here"
        )
    return LINEAR_ATTENTION_OPS[name]
