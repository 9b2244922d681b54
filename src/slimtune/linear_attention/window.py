"""Sliding-window softmax attention plus linear attention on the keys that left the window (LoLCATs' hybrid), with
attention sinks (StreamingLLM's first tokens kept in the softmax).

For query i (absolute position), window w, n_s sink tokens, softmax scale s, feature-mapped fq, fk, per-head
decay γ (1 without decay) and per-head mix g > 0:

    W(i) = {j : i − w < j ≤ i} ∪ {j < n_s : j ≤ i}             keys read with softmax weights
    L(i) = {j : n_s ≤ j ≤ i − w}                               keys read with linear-attention weights
    a_ij = exp(s·q_i·k_j − c_i)   (j ∈ W(i))
    b_ij = g·γ^(i−j)·fq_i·fk_j    (j ∈ L(i))
    o_i  = (Σ_j a_ij v_j + Σ_j b_ij v_j) / (Σ_j a_ij + Σ_j b_ij + eps)

Every key is read exactly once, by one of the two forms; padding keys (``valid`` False) by neither. Two units:

- Per-token units (no log scales given): c_i = max_{j ∈ W(i)} s·q_i·k_j (detached), as LoLCATs does: the softmax part
  is stabilised by its own row maximum and the feature maps by their own per-token shifts, so the two forms have no
  common scale and the learned g absorbs it.
- Kernel units (``key_log_scale`` / ``query_log_scale``, an exact feature-map stabiliser): fq, fk are the unshifted
  features fq·e^(lq), fk·e^(lk), which estimate exp(q·k·s) itself, and c_i = 0: the two forms are one kernel sum, and
  g = 1 weighs them as softmax attention would. Both parts are computed relative to the query's window maximum and
  brought to a common maximum, so nothing overflows.

With w ≥ T this is exact causal softmax attention.

Cost: O(T·w·d) for the window (queries in blocks of w against two key blocks) plus the linear op's O(T·m·d).
The linear sum is causal linear attention over the keys shifted right by w positions:
Σ_{j ∈ L(i)} γ^(i−j) fq_i·fk_j [v_j, 1] = γ^w · Σ_{t ≤ i} γ^(i−t) fq_i·fk'_t [v'_t, 1] with fk'_t = fk_{t−w}
(zero for t − w < n_s, or padding), so any op of ``ops.py`` computes it, numerator and normaliser in one call
(an all-ones value column), with the keys' log scales shifted alike (−inf where no key enters).

The carried :class:`WindowState` (``window_args.py``) has a size independent of the context length: the linear state,
the last min(seen, w) tokens' k, v, fk, lk, and the first min(seen, n_s) tokens' k, v. A sequence processed in pieces
(or decoded token by token) gives the result of one call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from slimtune.linear_attention.op_args import LinearAttentionState, finite_or_zero
from slimtune.linear_attention.ops import MAX_EPS_EXPONENT, LinearAttentionOp, linear_attention_chunked
from slimtune.linear_attention.window_args import (
    WindowArgs,
    WindowOptions,
    WindowState,
    empty_window_state,
    parse_window_args,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

Part = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # Σ weights·v [B, H, T, d_v], Σ weights [B, H, T], log unit


def sliding_window_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    *,
    initial_state: WindowState | None = None,
    linear_op: LinearAttentionOp = linear_attention_chunked,
    chunk_size: int = 64,
    **options: Unpack[WindowOptions],
) -> tuple[torch.Tensor, WindowState]:
    """The hybrid of the module docstring, blocked: linear in T. Returns (o [B, H, T, d_v], final state).

    q, k: [B, H, T, d] (after RoPE; key/value heads already repeated to H); v: [B, H, T, d_v];
    fq, fk: [B, H, T, m]; ``options``: :class:`WindowOptions` (window, scale, mix [H], sinks, log_decay [H], valid
    [B, T], eps, key_log_scale and query_log_scale [B, H, T]). ``linear_op``: any op of ``ops.py`` (``chunk_size``
    goes to it). All arithmetic runs in float32 for half/bfloat16 inputs; o has the inputs' dtype.

    Raises:
        ShapeError: shapes that do not fit together or with ``initial_state``.
        ConfigError: window < 1 or sinks < 0.
        TypeError: a required option is missing, or an unknown one given.
    """
    x = parse_window_args((q, k, v, fq, fk), options, initial_state)
    n = x.q.shape[2]
    state = initial_state if initial_state is not None else empty_window_state(x)
    seen, buffered = state.seen, state.k.shape[2]
    ctx_k, ctx_v, ctx_fk = (
        torch.cat([s.to(x.acc), t], dim=2) for s, t in ((state.k, x.k), (state.v, x.v), (state.fk, x.fk))
    )  # [B, H, L + T, ·]
    ctx_lk = torch.cat([state.lk.to(x.acc), x.lk], dim=2)  # [B, H, L + T]
    ctx_valid = torch.cat([state.valid, x.valid], dim=1)  # [B, L + T]
    front = x.window - buffered  # ctx padded in front by this many becomes positions seen − w, seen − w + 1, ...

    if n == 1:  # a decoding step: its window is the last w tokens of ctx, no blocks needed
        last = slice(-x.window, None)
        window_part = _softmax_part(x.q, ctx_k[:, :, last], ctx_v[:, :, last], ctx_valid[:, None, None, last], x.scale)
    else:
        window_part = _blocked_window_part(x.q, ctx_k, ctx_v, ctx_valid, front, x.window, x.scale)
    sink_k, sink_v, sink_valid = _sinks(x, state)
    query_pos = seen + torch.arange(n, device=x.q.device)[:, None]  # [T, 1]
    outside = torch.arange(sink_k.shape[2], device=x.q.device)[None, :] <= query_pos - x.window  # [T, S]
    sink_part = _softmax_part(x.q, sink_k, sink_v, outside & sink_valid[:, None, None, :], x.scale)
    unit = finite_or_zero(window_part[2]) if x.kernel_units else None  # [B, H, T]: the linear part's log unit
    entering = _Entering(ctx_fk, ctx_lk, ctx_v, ctx_valid, front, seen)
    linear_part, linear_state = _linear_part(x, entering, unit, state.linear, linear_op, chunk_size)

    o = _combine(linear_part, (window_part, sink_part), x.eps)

    kept = min(x.window, buffered + n)
    k_kept, v_kept, fk_kept, lk_kept = (t[:, :, -kept:] for t in (ctx_k, ctx_v, ctx_fk, ctx_lk))
    final = WindowState(
        linear_state, k_kept, v_kept, fk_kept, lk_kept, ctx_valid[:, -kept:], sink_k, sink_v, sink_valid, seen + n
    )
    return o.to(x.out_dtype), final


def sliding_window_linear_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    **options: Unpack[WindowOptions],
) -> torch.Tensor:
    """The module docstring's formula with explicit [T, T] masks: O(T²), for tests only. Shapes as the fast form."""
    x = parse_window_args((q, k, v, fq, fk), options, None)
    q, k, v, fq, fk = x.q, x.k, x.v, x.fq, x.fk
    n = q.shape[2]
    pos = torch.arange(n, device=q.device)
    lag = pos[:, None] - pos[None, :]  # [T, T], i − j
    key_ok = x.valid[:, None, None, :]  # [B, 1, 1, T]
    softmax_keys = (lag >= 0) & ((lag < x.window) | (pos[None, :] < x.sinks)) & key_ok  # [B, 1, T, T]
    linear_keys = (lag >= x.window) & (pos[None, :] >= x.sinks) & key_ok  # [B, 1, T, T]
    scores = (q @ k.transpose(-1, -2) * x.scale).masked_fill(~softmax_keys, float("-inf"))  # [B, H, T, T]
    if x.kernel_units:  # unshifted: both forms in the kernel's units
        soft = scores.exp()
        fq, fk = fq * x.lq.exp()[..., None], fk * x.lk.exp()[..., None]
    else:
        soft = (scores - finite_or_zero(scores.amax(-1, keepdim=True)).detach()).exp()
    log_decay = q.new_zeros(q.shape[1]) if x.log_decay is None else x.log_decay
    decay = (log_decay[:, None, None] * lag.clamp(min=0)).exp()  # [H, T, T], γ^(i−j)
    lin = (fq @ fk.transpose(-1, -2)) * decay * x.mix[:, None, None] * linear_keys  # [B, H, T, T]
    weights = soft + lin
    return (weights @ v / (weights.sum(-1, keepdim=True) + x.eps)).to(x.out_dtype)


@dataclass
class _Entering:
    """The keys that may enter the linear sum: the carried last tokens then this call's, fk [B, H, L + T, m], lk
    [B, H, L + T], v [B, H, L + T, d_v], valid [B, L + T]; ``front``: how far to pad them so that query t meets the
    key w positions before it; ``seen``: tokens before this call."""

    fk: torch.Tensor
    lk: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor
    front: int
    seen: int


def _linear_part(
    x: WindowArgs,
    ctx: _Entering,
    unit: torch.Tensor | None,
    state: LinearAttentionState,
    linear_op: LinearAttentionOp,
    chunk_size: int,
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None], LinearAttentionState]:
    """g·Σ_{j ∈ L(i)} γ^(i−j) fq_i·fk_j v_j [B, H, T, d_v], its normaliser [B, H, T] and ``unit`` (None in per-token
    units; else [B, H, T], both sums being divided by e^unit), then the op's final state.

    The key entering the linear sum at query t is ctx[t] once ctx is front-padded by ``front`` (its absolute
    position is seen − w + t); sinks, padding and not-yet-existing positions enter as zero (log scale −inf).
    """
    b, h, n, _ = x.fq.shape
    entering_fk = F.pad(ctx.fk, (0, 0, ctx.front, 0))[:, :, :n]  # [B, H, T, m]
    entering_lk = F.pad(ctx.lk, (ctx.front, 0), value=float("-inf"))[:, :, :n]  # [B, H, T]
    entering_v = F.pad(ctx.v, (0, 0, ctx.front, 0))[:, :, :n]  # [B, H, T, d_v]
    entering_valid = F.pad(ctx.valid, (ctx.front, 0), value=False)[:, :n]  # [B, T]
    position = ctx.seen - x.window + torch.arange(n, device=x.fq.device)  # [T]
    enters = entering_valid & (position >= x.sinks)[None, :]  # [B, T]
    entering_fk = entering_fk * enters[:, None, :, None].to(entering_fk.dtype)
    entering_lk = entering_lk.masked_fill(~enters[:, None, :], float("-inf"))
    values = torch.cat([entering_v, entering_v.new_ones(b, h, n, 1)], dim=-1)  # [B, H, T, d_v + 1]
    out, final = linear_op(
        x.fq,
        entering_fk,
        values,
        log_decay=x.log_decay,
        normalize=False,
        initial_state=state,
        output_final_state=True,
        chunk_size=chunk_size,
        key_log_scale=entering_lk,
        query_log_scale=x.lq if unit is None else x.lq - unit,
    )
    gain = x.mix
    if x.log_decay is not None:
        gain = gain * (x.window * x.log_decay).exp()  # γ^w: the shift's decay
    out = out * gain[:, None, None]
    assert final is not None  # output_final_state=True
    return (out[..., :-1], out[..., -1], unit), final


def _softmax_part(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unnormalised softmax attention of q [B, H, T, d] over keys [B, H, K, d], values [B, H, K, d_v].

    ``visible`` (bool, broadcast to [B, H, T, K]) selects the keys each query reads. Returns
    Σ exp(s − M) v [B, H, T, d_v], Σ exp(s − M) [B, H, T] and the row maximum M [B, H, T] (detached; −inf
    where a query sees no key, whose sums are then 0).
    """
    if keys.shape[-2] == 0:
        rows = q.shape[:-1]
        return q.new_zeros(*rows, values.shape[-1]), q.new_zeros(rows), q.new_full(rows, float("-inf"))
    scores = (q @ keys.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))  # [B, H, T, K]
    row_max = scores.amax(-1).detach()
    weights = (scores - finite_or_zero(row_max)[..., None]).exp()
    return weights @ values, weights.sum(-1), row_max


def _blocked_window_part(
    q: torch.Tensor,
    ctx_k: torch.Tensor,
    ctx_v: torch.Tensor,
    ctx_valid: torch.Tensor,
    front: int,
    window: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_softmax_part` over each query's window, O(T·w·d): queries in blocks of w (N = ⌈T/w⌉, the tail
    zero-padded), block c reading key blocks c and c+1 of the front-padded ctx, which hold its window: query a of
    the block sees key b iff a < b ≤ a + w.
    """
    b, h, n, d = q.shape
    blocks = -(-n // window)
    tail = blocks * window - n
    q = F.pad(q, (0, 0, 0, tail)).view(b, h, blocks, window, d)  # [B, H, N, w, d]
    keys, values = (F.pad(t, (0, 0, front, tail)) for t in (ctx_k, ctx_v))  # [B, H, (N+1)·w, ·]
    keys, values = (t.view(b, h, blocks + 1, window, t.shape[-1]) for t in (keys, values))
    keys, values = (torch.cat([t[:, :, :-1], t[:, :, 1:]], dim=3) for t in (keys, values))  # [B, H, N, 2w, ·]
    key_valid = F.pad(ctx_valid, (front, tail), value=False).view(b, blocks + 1, window)
    key_valid = torch.cat([key_valid[:, :-1], key_valid[:, 1:]], dim=2)  # [B, N, 2w]
    a = torch.arange(window, device=q.device)[:, None]
    col = torch.arange(2 * window, device=q.device)[None, :]
    band = (col > a) & (col <= a + window)  # [w, 2w]
    visible = band & key_valid[:, None, :, None, :]  # [B, 1, N, w, 2w]
    num, den, row_max = _softmax_part(q, keys, values, visible, scale)  # blocked: [B, H, N, w, ·]
    return _unblock(num, n), _unblock(den, n), _unblock(row_max, n)


def _combine(
    linear: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None], parts: tuple[Part, ...], eps: float
) -> torch.Tensor:
    """o [B, H, T, d_v] from the linear part (numerator [B, H, T, d_v], normaliser [B, H, T], log unit [B, H, T] or
    None for per-token units, left as it is) and the softmax parts (:func:`_softmax_part`'s three results each),
    everything brought to the softmax parts' common row maximum first (and, in kernel units, eps with them)."""
    row_max = finite_or_zero(torch.stack([part[2] for part in parts]).amax(0))  # [B, H, T]
    num, den, unit = linear
    floor: float | torch.Tensor = eps
    if unit is not None:  # kernel units: eps too is in the kernel's units
        rescale = (unit - row_max).exp()  # [B, H, T], ≤ 1
        num, den = num * rescale[..., None], den * rescale
        floor = eps * (-row_max).clamp(max=MAX_EPS_EXPONENT).exp()  # [B, H, T]
    for part_num, part_den, part_max in parts:
        rescale = (part_max - row_max).exp()  # [B, H, T], 0 for a part with nothing visible
        num = num + part_num * rescale[..., None]
        den = den + part_den * rescale
    return num / (den + floor)[..., None]


def _unblock(t: torch.Tensor, n: int) -> torch.Tensor:
    """[B, H, N, w, ...] → [B, H, T, ...]: blocks back to a sequence, the padded tail dropped."""
    return t.flatten(2, 3)[:, :, :n]


def _sinks(x: WindowArgs, state: WindowState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sinks' k [B, H, S, d], v [B, H, S, d_v] and valid [B, S]: those carried, then the first tokens of this
    call while fewer than n_s tokens have been seen."""
    new = max(0, x.sinks - state.seen)
    return (
        torch.cat([state.sink_k.to(x.acc), x.k[:, :, :new]], dim=2),
        torch.cat([state.sink_v.to(x.acc), x.v[:, :, :new]], dim=2),
        torch.cat([state.sink_valid, x.valid[:, :new]], dim=1),
    )
