"""Causal linear attention with an optional per-head decay: a quadratic reference, a chunked and a recurrent form.

For query head h, with γ = exp(log_decay[h]) (γ = 1 when ``log_decay`` is None) and initial state S₀:

    S_t = γ S_{t−1} + k_t v_tᵀ                 (S_{−1} = S₀, shape [m, d_v])
    o_t = S_tᵀ q_t = Σ_{s≤t} γ^(t−s) (q_t·k_s) v_s + γ^(t+1) S₀ᵀ q_t

With ``normalize=True`` a key-sum z_t = γ z_{t−1} + k_t rides along (z_{−1} = z₀, shape [m]) and
o_t is divided by q_t·z_t + eps, i.e. by Σ_{s≤t} γ^(t−s) (q_t·k_s) + γ^(t+1) q_t·z₀ + eps.
This is fla's simple-GLA recurrence with a head-wise constant gate and scale 1 (the feature map owns any scaling).

Every op has the same signature, its keyword options declared once in :class:`LinearAttentionOptions`::

    fn(q, k, v, *, log_decay=None, normalize=False, initial_state=None, output_final_state=False, eps=1e-6,
       chunk_size=64) -> (o, final_state | None)

- q: [B, H, T, m] and k: [B, Hkv, T, m] feature-mapped queries and keys; v: [B, Hkv, T, d_v]. H % Hkv == 0
  (grouped-query attention: query head h reads key/value head h // (H / Hkv), as HF's ``repeat_kv``).
- log_decay: None or [H], per query head, every entry finite and ≤ 0 (checked; on a GPU the check synchronises once).
- initial_state / final_state: a :class:`LinearAttentionState` (S [B, H, m, d_v], z [B, H, m] iff normalize),
  held in float32 (float64 for float64 inputs) whatever the input dtype, so a sequence can be processed in
  pieces, or decoded token by token, and give the result of one call.
- o: [B, H, T, d_v] in the inputs' dtype. All arithmetic runs in float32 for half/bfloat16 inputs.
- chunk_size: used by ``chunked``, accepted and ignored elsewhere, so the ops are interchangeable. Any other
  option name is a ConfigError.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict

import torch

from slimtune.config import check_int
from slimtune.errors import ConfigError, ShapeError

if TYPE_CHECKING:
    from typing_extensions import Unpack


@dataclass
class LinearAttentionState:
    """The fixed-size state carried between calls, per batch element and query head.

    S: [B, H, m, d_v], Σ_s γ^(T−1−s) k_s v_sᵀ (plus the decayed initial S).
    z: [B, H, m], Σ_s γ^(T−1−s) k_s, present exactly when the attention is normalised; None otherwise.
    Both are float32 (float64 for float64 inputs).
    """

    S: torch.Tensor
    z: torch.Tensor | None = None


class LinearAttentionOptions(TypedDict, total=False):
    """The keyword options of every op (module docstring); one left out takes its value in ``_DEFAULTS``."""

    log_decay: torch.Tensor | None
    normalize: bool
    initial_state: LinearAttentionState | None
    output_final_state: bool
    eps: float
    chunk_size: int


_DEFAULTS: LinearAttentionOptions = {
    "log_decay": None,
    "normalize": False,
    "initial_state": None,
    "output_final_state": False,
    "eps": 1e-6,
    "chunk_size": 64,
}


@dataclass
class _Call:
    """One op call's checked arguments: q [B, H, T, m]; k [B, H, T, m] and v [B, H, T, d_v] with the key/value
    heads repeated for GQA (dtypes as given); every option set; ``out_dtype``, the promoted dtype of q, k, v."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    options: LinearAttentionOptions
    out_dtype: torch.dtype

    @property
    def acc(self) -> torch.dtype:
        """The accumulation dtype: float32 at least."""
        return torch.promote_types(self.out_dtype, torch.float32)

    def initial(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """S₀ [B, H, m, d_v] and z₀ [B, H, m] in ``dtype``: the initial state's, zeros where it has none."""
        b, h, _, m = self.q.shape
        state = self.options["initial_state"]
        s0 = self.q.new_zeros(b, h, m, self.v.shape[-1], dtype=dtype) if state is None else state.S.to(dtype)
        z0 = self.q.new_zeros(b, h, m, dtype=dtype) if state is None or state.z is None else state.z.to(dtype)
        return s0, z0

    def accumulated(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v, log_decay [H] (zeros when None), S₀ and z₀, all in the accumulation dtype."""
        log_decay = self.options["log_decay"]
        acc = self.acc
        log_decay = self.q.new_zeros(self.q.shape[1], dtype=acc) if log_decay is None else log_decay.to(acc)
        return (self.q.to(acc), self.k.to(acc), self.v.to(acc), log_decay, *self.initial(acc))


def _call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, given: LinearAttentionOptions) -> _Call:
    """Check the options and shapes (module docstring), fill in the defaults and repeat key/value heads for GQA."""
    unknown = sorted(set(given) - set(_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown linear-attention option(s) {unknown}; allowed: {sorted(_DEFAULTS)}")
    options = _DEFAULTS.copy()
    options.update(given)
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
    if options["eps"] < 0:
        raise ConfigError(f"eps must be >= 0, got {options['eps']}")
    _check_decay(options["log_decay"], h)
    _check_state(options["initial_state"], options["normalize"], (b, h, m, d_v))
    rep = h // h_kv
    k, v = (t if rep == 1 else t.repeat_interleave(rep, dim=1) for t in (k, v))  # [B, H, T, ·], as repeat_kv
    return _Call(q, k, v, options, torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype))


def _check_decay(log_decay: torch.Tensor | None, h: int) -> None:
    if log_decay is None:
        return
    if log_decay.shape != (h,):
        raise ShapeError(f"log_decay must have shape [H]=({h},), got {tuple(log_decay.shape)}")
    if bool(((log_decay > 0) | ~log_decay.isfinite()).any()):
        raise ConfigError(f"log_decay must be finite and <= 0 (a decay 0 < γ <= 1), got {log_decay.tolist()}")


def _check_state(state: LinearAttentionState | None, normalize: bool, shape: tuple[int, int, int, int]) -> None:
    """``state`` fits S [B, H, m, d_v] = ``shape`` and has z [B, H, m] exactly when ``normalize``."""
    if state is None:
        return
    if state.S.shape != shape:
        raise ShapeError(f"initial_state.S must have shape {shape}, got {tuple(state.S.shape)}")
    if normalize != (state.z is not None):
        raise ConfigError(
            f"initial_state.z is {'None' if state.z is None else 'set'} but normalize={normalize}; "
            "z must be present exactly when normalize=True"
        )
    if state.z is not None and state.z.shape != shape[:3]:
        raise ShapeError(f"initial_state.z must have shape {shape[:3]}, got {tuple(state.z.shape)}")


def _ones_column(v: torch.Tensor, s0: torch.Tensor, z0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The normaliser as one more value column: v [B, H, T, d_v + 1] (ones last), S₀ [B, H, m, d_v + 1] (z₀ last)."""
    ones = v.new_ones(*v.shape[:-1], 1)
    return torch.cat([v, ones], dim=-1), torch.cat([s0, z0[..., None]], dim=-1)


def linear_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options: Unpack[LinearAttentionOptions]
) -> tuple[torch.Tensor, LinearAttentionState | None]:
    """Quadratic masked form: builds the [T, T] decay-masked score matrix. O(T²) memory, for tests only.

    Shapes, options and state as in the module docstring.
    """
    call = _call(q, k, v, options)
    normalize, eps = call.options["normalize"], call.options["eps"]
    q, k, v, log_decay, s0, z0 = call.accumulated()
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
    if call.options["output_final_state"]:
        key_w = (log_decay[:, None] * (n - 1 - pos)).exp()[:, :, None]  # [H, T, 1], γ^(T−1−s)
        s_end = (log_decay * n).exp()[:, None, None]  # [H, 1, 1], γ^T
        final = LinearAttentionState(
            S=s_end * s0 + (k * key_w).transpose(-1, -2) @ v,
            z=s_end[..., 0] * z0 + (k * key_w).sum(2) if normalize else None,
        )
    return o.to(call.out_dtype), final


def linear_attention_chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options: Unpack[LinearAttentionOptions]
) -> tuple[torch.Tensor, LinearAttentionState | None]:
    """Parallel chunk form: quadratic inside chunks of C = chunk_size tokens, a state scan across chunks.

    Cost O(T·C·m + T·m·d_v) time; the chunk-start states [B, H, T/C, m, d_v] are kept for backward.
    Decay is handled in log space: inside a chunk the cumulative log-decay b_i = (i+1)·log γ gives the
    factors exp(b_i − b_j) (j ≤ i), exp(b_i) (state → query) and exp(b_last − b_j) (key → chunk end),
    all exponents ≤ 0, so nothing overflows at any length. T need not be a multiple of C: the tail is
    zero-padded and the last chunk's decay uses its true length. With ``normalize`` the value gets an
    all-ones column, whose output is the normaliser and whose state column is z.
    Shapes, options and state as in the module docstring.
    """
    call = _call(q, k, v, options)
    check_int("chunk_size", call.options["chunk_size"])
    q, k, v, log_decay, s0, z0 = call.accumulated()
    b, h, n, m = q.shape
    d_v = v.shape[-1]
    if call.options["normalize"]:
        v, s0 = _ones_column(v, s0, z0)  # [B, H, T, d_a], [B, H, m, d_a] with d_a = d_v + 1
    d_a = v.shape[-1]
    c = min(call.options["chunk_size"], n)
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
    return _finish(call, o, state, d_v)


def linear_attention_recurrent(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options: Unpack[LinearAttentionOptions]
) -> tuple[torch.Tensor, LinearAttentionState | None]:
    """Token-by-token recurrence on the fixed-size state; with T = 1 it is one decoding step.

    O(T·m·d_v) time, a Python loop over T: for decoding and tests, not for training.
    Shapes, options and state as in the module docstring.
    """
    call = _call(q, k, v, options)
    normalize, eps = call.options["normalize"], call.options["eps"]
    q, k, v, log_decay, state, z = call.accumulated()
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
    final = LinearAttentionState(S=state, z=z if normalize else None) if call.options["output_final_state"] else None
    return o.to(call.out_dtype), final


def linear_attention_fla(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options: Unpack[LinearAttentionOptions]
) -> tuple[torch.Tensor, LinearAttentionState | None]:
    """The same op on flash-linear-attention's Triton kernel ``fla.ops.simple_gla.chunk_simple_gla`` (CUDA only).

    fla wants [B, T, H, ·]; inputs are transposed in and out. The decay goes in as the per-token gate
    g [B, T, H] (fla returns no gradient for its ``g_gamma``), scale is 1, GQA heads are repeated first.
    fla's own ``normalize`` ignores the decay and the initial state, so the normaliser is computed the
    way ``chunked`` does it: an all-ones value column. fla is imported here, never at module import.
    Shapes, options and state as in the module docstring.
    """
    call = _call(q, k, v, options)
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError as err:
        raise ConfigError(f"linear-attention op 'fla' needs the package flash-linear-attention (fla): {err}") from err
    b, h, n, _ = call.q.shape
    d_v = call.v.shape[-1]
    q, k, v = (t.to(call.out_dtype) for t in (call.q, call.k, call.v))  # [B, H, T, ·]
    s0, z0 = call.initial(torch.float32)
    if call.options["normalize"]:
        v, s0 = _ones_column(v, s0, z0)  # [B, H, T, d_a], [B, H, m, d_a] with d_a = d_v + 1
    log_decay = call.options["log_decay"]
    gate = None if log_decay is None else log_decay.float().expand(b, n, h).contiguous()  # [B, T, H]
    o, state = chunk_simple_gla(
        q.transpose(1, 2),  # [B, T, H, m]
        k.transpose(1, 2),  # [B, T, H, m]
        v.transpose(1, 2),  # [B, T, H, d_a]
        g=gate,
        scale=1.0,
        initial_state=s0,
        output_final_state=call.options["output_final_state"],
    )
    return _finish(call, o.transpose(1, 2).float(), state, d_v)  # o: [B, H, T, d_a]


def _finish(
    call: _Call, o: torch.Tensor, state: torch.Tensor, d_v: int
) -> tuple[torch.Tensor, LinearAttentionState | None]:
    """Undo the ones-column trick: o [B, H, T, d_a], state [B, H, m, d_a] (d_a = d_v + 1 when normalised, else d_v).

    Returns o [B, H, T, d_v] in the output dtype (divided by its last column + eps when normalised) and the final
    state (None unless output_final_state).
    """
    normalize = call.options["normalize"]
    if normalize:
        o = o[..., :d_v] / (o[..., d_v:] + call.options["eps"])
    final = None
    if call.options["output_final_state"]:
        final = LinearAttentionState(S=state[..., :d_v], z=state[..., d_v] if normalize else None)
    return o.to(call.out_dtype), final


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
