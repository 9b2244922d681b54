"""Causal linear attention with an optional per-head decay: a quadratic reference, a chunked and a recurrent form.

For query head h, with γ = exp(log_decay[h]) (γ = 1 when ``log_decay`` is None), key weights e^(l_s)
(``key_log_scale``, 0 when None), query weights e^(l_t) (``query_log_scale``) and initial state S₀:

    S_t = γ S_{t−1} + e^(l_s) k_t v_tᵀ                 (S_{−1} = S₀, shape [m, d_v])
    o_t = e^(l_t) S_tᵀ q_t = e^(l_t) [Σ_{s≤t} γ^(t−s) e^(l_s) (q_t·k_s) v_s + γ^(t+1) S₀ᵀ q_t]

With ``normalize=True`` a key-sum z_t = γ z_{t−1} + e^(l_s) k_t rides along (z_{−1} = z₀, shape [m]) and
o_t is divided by e^(l_t) q_t·z_t + eps. This is fla's simple-GLA recurrence with a head-wise constant gate and scale
1 (the feature map owns any scaling), plus the per-key weights.

Exact stabilisation. The key weights e^(l_s) carry what an exponential feature map's stabiliser took out of φ(k_s),
so they span many orders of magnitude. The state is therefore held as S·e^(−M_t), z·e^(−M_t) with one shift M_t per
sequence and head, the running maximum of the decayed log weights (M_t = max(log γ + M_{t−1}, l_t), as online
softmax and mLSTM's stabiliser state do), carried in the state and rescaled whenever it grows. Every exponent
evaluated is then ≤ 0, and o_t above is computed exactly, with no per-key reweighting, at any length; the
normaliser's eps stays in the kernel's units. The chunked form takes the same maximum per query inside a chunk.
The shifts are detached (constants for autograd): the gradient is that of the formula above.

Every op has the same signature, its keyword options declared once in
:class:`slimtune.linear_attention.op_args.LinearAttentionOptions`::

    fn(q, k, v, *, log_decay=None, normalize=False, initial_state=None, output_final_state=False, eps=1e-6,
       chunk_size=64, key_log_scale=None, query_log_scale=None) -> (o, final_state | None)

- q: [B, H, T, m] and k: [B, Hkv, T, m] feature-mapped queries and keys; v: [B, Hkv, T, d_v]. H % Hkv == 0
  (grouped-query attention: query head h reads key/value head h // (H / Hkv), as HF's ``repeat_kv``).
- key_log_scale: [B, Hkv, T]; query_log_scale: [B, H, T]; log_decay: [H] (finite, ≤ 0).
- initial_state / final_state: a :class:`LinearAttentionState` (S [B, H, m, d_v], z [B, H, m] iff normalize, shift
  [B, H]), held in float32 (float64 for float64 inputs) whatever the input dtype, so a sequence can be processed in
  pieces, or decoded token by token, and give the result of one call.
- o: [B, H, T, d_v] in the inputs' dtype. All arithmetic runs in float32 for half/bfloat16 inputs.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from slimtune.config import check_int
from slimtune.errors import ConfigError
from slimtune.linear_attention.op_args import (
    LinearAttentionOptions,
    LinearAttentionState,
    OpCall,
    finite_or_zero,
    ones_column,
    parse_call,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

# eps is added as eps·exp(−scale) in the shifted units; the exponent is capped so it cannot overflow float32
MAX_EPS_EXPONENT = 80.0


def linear_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options: Unpack[LinearAttentionOptions]
) -> tuple[torch.Tensor, LinearAttentionState | None]:
    """Quadratic masked form, unstabilised: builds the [T, T] decay-masked score matrix of the weighted features
    e^(l) q, e^(l) k. O(T²) memory, for tests only (use float64 where the weights are large).

    Shapes, options and state as in the module docstring; the final state is in the kernel's units (shift None).
    """
    call = parse_call(q, k, v, options)
    normalize, eps = call.options["normalize"], call.options["eps"]
    q, k, v, log_decay, s0, z0, shift0, key_log, query_log = call.accumulated()
    start = shift0.exp() * shift0.isfinite()  # [B, H], e^(shift₀); 0 for no state
    s0, z0 = s0 * start[..., None, None], z0 * start[..., None]
    q, k = q * query_log.exp()[..., None], k * key_log.exp()[..., None]
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

    Cost O(T·C·m + T·m·d_v) time; the chunk-start states [B, H, T/C, m, d_v] are kept for backward. In log space,
    with b_i = (i+1)·log γ inside a chunk and u_j = l_j − b_j, key j reaches query i with weight exp(b_i + u_j) and
    the chunk-start state (shift M₀) with exp(b_i + M₀); both are taken relative to the query's running maximum
    R_i = max(M₀, max_{j≤i} u_j), and each chunk's keys relative to their own maximum before the scan rescales them
    to the new shift M₀' = b_last + max(M₀, max_j u_j). All exponents are ≤ 0. T need not be a multiple of C: the
    tail is padded with keys of weight 0. With ``normalize`` the value gets an all-ones column, whose output is the
    normaliser and whose state column is z.
    Shapes, options and state as in the module docstring.
    """
    call = parse_call(q, k, v, options)
    check_int("chunk_size", call.options["chunk_size"])
    q, k, v, log_decay, s0, z0, shift0, key_log, query_log = call.accumulated()
    b, h, n, _ = q.shape
    if call.options["normalize"]:
        v, s0 = ones_column(v, s0, z0)  # [B, H, T, d_a], [B, H, m, d_a] with d_a = d_v + 1
    d_a = v.shape[-1]
    c = min(call.options["chunk_size"], n)
    n_chunks = -(-n // c)
    pad = n_chunks * c - n
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))  # [B, H, N·C, ·]
    q, k, v = (t.view(b, h, n_chunks, c, t.shape[-1]) for t in (q, k, v))  # [B, H, N, C, ·]
    key_log = F.pad(key_log, (0, pad), value=float("-inf")).view(b, h, n_chunks, c)  # [B, H, N, C]

    pos = torch.arange(c, device=q.device)
    cum = log_decay[:, None] * (pos + 1)  # [H, C], b_i
    u = key_log - cum[:, None, :]  # [B, H, N, C], u_j = l_j − b_j
    chunk_max = u.detach().amax(-1)  # [B, H, N]
    deltas = (k * (u - finite_or_zero(chunk_max)[..., None]).exp()[..., None]).transpose(-1, -2) @ v  # [B,H,N,m,d_a]
    length = (n - c * torch.arange(n_chunks, device=q.device)).clamp(max=c)  # [N], true chunk lengths
    chunk_end = log_decay[:, None] * length  # [H, N], b at each chunk's last key
    state, shift = s0, shift0
    starts, start_shifts = [], []
    for i in range(n_chunks):
        starts.append(state)
        start_shifts.append(shift)
        top = torch.maximum(shift.detach(), chunk_max[:, :, i])  # [B, H], −inf while no key has weight
        new = finite_or_zero(top)
        keep, add = (shift - new).exp(), (chunk_max[:, :, i] - new).exp()  # [B, H], 0 where nothing was seen
        # the shift stays a constant for autograd: the chunk's decay γ^L reaches the state as exp(b − sg(b)) = 1
        decay_grad = (chunk_end[:, i] - chunk_end[:, i].detach()).exp()[:, None, None]  # [H, 1, 1]
        state = decay_grad * (keep[..., None, None] * state + add[..., None, None] * deltas[:, :, i])
        shift = (chunk_end[:, i].detach() + new).masked_fill(~top.isfinite(), float("-inf"))
    start_shift = torch.stack(start_shifts, dim=2)  # [B, H, N]
    running = finite_or_zero(torch.maximum(start_shift.detach()[..., None], u.detach().cummax(-1).values))  # R_i
    causal = pos[:, None] >= pos[None, :]  # [C, C]
    intra = (u[..., None, :] - running[..., :, None]).masked_fill(~causal, float("-inf")).exp()  # [B, H, N, C, C]
    o = ((q @ k.transpose(-1, -2)) * intra) @ v  # [B, H, N, C, d_a]
    from_state = (start_shift[..., None] - running).exp()[..., None] * q  # [B, H, N, C, m]
    o = o + from_state @ torch.stack(starts, dim=2)  # [B, H, N, C, d_a]
    scale = (cum[:, None, :] + running).reshape(b, h, n_chunks * c)[:, :, :n] + query_log  # [B, H, T]
    return _finish(call, o.reshape(b, h, n_chunks * c, d_a)[:, :, :n], state, shift, scale)


def linear_attention_recurrent(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options: Unpack[LinearAttentionOptions]
) -> tuple[torch.Tensor, LinearAttentionState | None]:
    """Token-by-token recurrence on the fixed-size state; with T = 1 it is one decoding step.

    The shift follows M_t = max(log γ + M_{t−1}, l_t) (module docstring). O(T·m·d_v) time, a Python loop over T: for
    decoding and tests, not for training. Shapes, options and state as in the module docstring.
    """
    call = parse_call(q, k, v, options)
    q, k, v, log_decay, state, z, shift, key_log, query_log = call.accumulated()
    if call.options["normalize"]:
        v, state = ones_column(v, state, z)  # [B, H, T, d_a], [B, H, m, d_a]
    outs, scales = [], []
    for t in range(q.shape[2]):
        decayed = log_decay + shift  # [B, H]
        shift = torch.maximum(decayed, key_log[:, :, t]).detach()  # [B, H], −inf until a key is seen
        ref = finite_or_zero(shift)
        keep, add = (decayed - ref).exp(), (key_log[:, :, t] - ref).exp()  # [B, H]
        state = keep[..., None, None] * state + add[..., None, None] * k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append((q[:, :, t, :, None] * state).sum(2))  # [B, H, d_a]
        scales.append(ref + query_log[:, :, t])
    return _finish(call, torch.stack(outs, dim=2), state, shift, torch.stack(scales, dim=2))


def linear_attention_fla(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options: Unpack[LinearAttentionOptions]
) -> tuple[torch.Tensor, LinearAttentionState | None]:
    """The same op on flash-linear-attention's Triton kernel ``fla.ops.simple_gla.chunk_simple_gla`` (CUDA only).

    fla wants [B, T, H, ·]; inputs are transposed in and out. The decay goes in as the per-token gate
    g [B, T, H] (fla returns no gradient for its ``g_gamma``), scale is 1, GQA heads are repeated first.
    fla's own ``normalize`` ignores the decay and the initial state, so the normaliser is computed the
    way ``chunked`` does it: an all-ones value column. The key weights are folded into k relative to one shift per
    call, the largest key log weight of the call and the initial shift: exact, except that a key weighted below
    e^(−87) of that maximum underflows in float32 (the chunked op has no such limit).
    fla is imported here, never at module import. Shapes, options and state as in the module docstring.
    """
    call = parse_call(q, k, v, options)
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError as err:
        raise ConfigError(f"linear-attention op 'fla' needs the package flash-linear-attention (fla): {err}") from err
    b, h, n, _ = call.q.shape
    s0, z0, shift0 = call.initial(torch.float32)
    key_log, query_log = call.log_scales(torch.float32)
    shift = finite_or_zero(torch.maximum(key_log.detach().amax(-1), shift0))  # [B, H]
    q, v = call.q.to(call.out_dtype), call.v.to(call.out_dtype)  # [B, H, T, ·]
    k = (call.k.float() * (key_log - shift[..., None]).exp()[..., None]).to(call.out_dtype)  # [B, H, T, m]
    if call.options["normalize"]:
        v, s0 = ones_column(v, s0, z0)  # [B, H, T, d_a], [B, H, m, d_a] with d_a = d_v + 1
    s0 = s0 * (shift0 - shift).exp()[..., None, None]  # to the call's shift; 0 for no state
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
    o = o.transpose(1, 2).float()  # [B, H, T, d_a]
    return _finish(call, o, state, shift, shift[..., None] + query_log)


def _finish(
    call: OpCall, o: torch.Tensor, state: torch.Tensor | None, shift: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, LinearAttentionState | None]:
    """From the shifted output to the op's: o [B, H, T, d_a] is o_t·e^(−scale_t) (scale [B, H, T]); state [B, H, m,
    d_a] is S·e^(−shift) (shift [B, H]); d_a = d_v + 1 when normalised (the ones-column trick), else d_v.

    Returns o [B, H, T, d_v] in the output dtype (divided by its last column + eps·e^(−scale) when normalised,
    multiplied by e^(scale) otherwise) and the final state (None unless output_final_state).
    """
    normalize, eps = call.options["normalize"], call.options["eps"]
    d_v = o.shape[-1] - 1 if normalize else o.shape[-1]
    if normalize:
        den = o[..., d_v]  # [B, H, T]
        if eps:
            den = den + eps * (-scale).clamp(max=MAX_EPS_EXPONENT).exp()
        o = o[..., :d_v] / den[..., None]
    else:
        o = o * scale.exp()[..., None]
    final = None
    if call.options["output_final_state"] and state is not None:
        final = LinearAttentionState(S=state[..., :d_v], z=state[..., d_v] if normalize else None, shift=shift)
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
