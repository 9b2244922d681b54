"""Sliding-window softmax attention plus linear attention on the keys that left the window (LoLCATs' hybrid), with
attention sinks (StreamingLLM's first tokens kept in the softmax).

For query i (absolute position), window w, n_s sink tokens, softmax scale s, feature-mapped fq, fk, per-head
decay γ (1 without decay) and per-head mix g > 0:

    W(i) = {j : i − w < j ≤ i} ∪ {j < n_s : j ≤ i}             keys read with softmax weights
    L(i) = {j : n_s ≤ j ≤ i − w}                               keys read with linear-attention weights
    a_ij = exp(s·q_i·k_j − m_i)   (j ∈ W(i)),   m_i = max_{j ∈ W(i)} s·q_i·k_j   (detached)
    b_ij = g·γ^(i−j)·fq_i·fk_j    (j ∈ L(i))
    o_i  = (Σ_j a_ij v_j + Σ_j b_ij v_j) / (Σ_j a_ij + Σ_j b_ij + eps)

Every key is read exactly once, by one of the two forms; padding keys (``valid`` False) by neither. As LoLCATs
does, the softmax part is stabilised by its own row maximum and g is learned, so g absorbs the scale between
the two forms. With w ≥ T this is exact causal softmax attention.

Cost: O(T·w·d) for the window (queries in blocks of w against two key blocks) plus the linear op's O(T·m·d).
The linear sum is causal linear attention over the keys shifted right by w positions:
Σ_{j ∈ L(i)} γ^(i−j) fq_i·fk_j [v_j, 1] = γ^w · Σ_{t ≤ i} γ^(i−t) fq_i·fk'_t [v'_t, 1] with fk'_t = fk_{t−w}
(zero for t − w < n_s, or padding), so any op of ``ops.py`` computes it, numerator and normaliser in one call
(an all-ones value column).

The carried :class:`WindowState` has a size independent of the context length: the linear state, the last
min(seen, w) tokens' k, v, fk, and the first min(seen, n_s) tokens' k, v. A sequence processed in pieces (or
decoded token by token) gives the result of one call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict

import torch
import torch.nn.functional as F

from slimtune.config import check_int
from slimtune.errors import ShapeError
from slimtune.linear_attention.ops import LinearAttentionOp, LinearAttentionState, linear_attention_chunked

if TYPE_CHECKING:
    from typing_extensions import Unpack


@dataclass
class WindowState:
    """What :func:`sliding_window_linear_attention` carries between calls (all float32, float64 for float64).

    linear: the linear op's state, S [B, H, m, d_v + 1] (last column: the normaliser's key sum).
    k [B, H, L, d], v [B, H, L, d_v], fk [B, H, L, m], valid [B, L]: the last L = min(seen, w) tokens.
    sink_k [B, H, S, d], sink_v [B, H, S, d_v], sink_valid [B, S]: the first S = min(seen, n_s) tokens.
    seen: the number of tokens processed so far.
    """

    linear: LinearAttentionState
    k: torch.Tensor
    v: torch.Tensor
    fk: torch.Tensor
    valid: torch.Tensor
    sink_k: torch.Tensor
    sink_v: torch.Tensor
    sink_valid: torch.Tensor
    seen: int


class _RequiredWindowOptions(TypedDict):
    window: int
    scale: float
    mix: torch.Tensor


class WindowOptions(_RequiredWindowOptions, total=False):
    """The keyword arguments of the hybrid, the same for the blocked form and its reference (module docstring).

    Required: window (w ≥ 1), scale (the softmax scale s), mix ([H], g > 0). Optional: sinks (n_s ≥ 0, default
    0), log_decay (None or [H], ≤ 0; default None: no decay), valid (None or [B, T] bool, False for a padding key;
    default None: all valid) and eps (default 1e-6).
    """

    sinks: int
    log_decay: torch.Tensor | None
    valid: torch.Tensor | None
    eps: float


@dataclass
class _Args:
    """The hybrid's checked arguments, every option set. q, k [B, H, T, d], v [B, H, T, d_v], fq, fk [B, H, T, m],
    mix [H] and log_decay [H] (or None) in ``acc`` (float32 at least); valid [B, T] bool."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    fq: torch.Tensor
    fk: torch.Tensor
    window: int
    sinks: int
    scale: float
    mix: torch.Tensor
    log_decay: torch.Tensor | None
    valid: torch.Tensor
    eps: float
    acc: torch.dtype
    out_dtype: torch.dtype


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
    [B, T], eps). ``linear_op``: any op of ``ops.py`` (``chunk_size`` goes to it). All arithmetic runs in float32
    for half/bfloat16 inputs; o has the inputs' dtype.

    Raises:
        ShapeError: shapes that do not fit together or with ``initial_state``.
        ConfigError: window < 1 or sinks < 0.
        TypeError: a required option is missing, or an unknown one given.
    """
    x = _args((q, k, v, fq, fk), options, initial_state)
    n = x.q.shape[2]
    state = initial_state if initial_state is not None else _empty_state(x)
    seen, buffered = state.seen, state.k.shape[2]
    ctx_k, ctx_v, ctx_fk = (
        torch.cat([s.to(x.acc), t], dim=2) for s, t in ((state.k, x.k), (state.v, x.v), (state.fk, x.fk))
    )  # [B, H, L + T, ·]
    ctx_valid = torch.cat([state.valid, x.valid], dim=1)  # [B, L + T]
    front = x.window - buffered  # ctx padded in front by this many becomes positions seen − w, seen − w + 1, ...

    num, den, linear_state = _linear_part(x, ctx_fk, ctx_v, ctx_valid, front, seen, state.linear, linear_op, chunk_size)
    if n == 1:  # a decoding step: its window is the last w tokens of ctx, no blocks needed
        last = slice(-x.window, None)
        window_part = _softmax_part(x.q, ctx_k[:, :, last], ctx_v[:, :, last], ctx_valid[:, None, None, last], x.scale)
    else:
        window_part = _blocked_window_part(x.q, ctx_k, ctx_v, ctx_valid, front, x.window, x.scale)
    sink_k, sink_v, sink_valid = _sinks(x, state)
    query_pos = seen + torch.arange(n, device=x.q.device)[:, None]  # [T, 1]
    outside = torch.arange(sink_k.shape[2], device=x.q.device)[None, :] <= query_pos - x.window  # [T, S]
    sink_part = _softmax_part(x.q, sink_k, sink_v, outside & sink_valid[:, None, None, :], x.scale)

    o = _combine(num, den, (window_part, sink_part), x.eps)

    kept = min(x.window, buffered + n)
    k_kept, v_kept, fk_kept = (t[:, :, -kept:] for t in (ctx_k, ctx_v, ctx_fk))
    final = WindowState(
        linear_state, k_kept, v_kept, fk_kept, ctx_valid[:, -kept:], sink_k, sink_v, sink_valid, seen + n
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
    x = _args((q, k, v, fq, fk), options, None)
    q, k, v, fq, fk = x.q, x.k, x.v, x.fq, x.fk
    n = q.shape[2]
    pos = torch.arange(n, device=q.device)
    lag = pos[:, None] - pos[None, :]  # [T, T], i − j
    key_ok = x.valid[:, None, None, :]  # [B, 1, 1, T]
    softmax_keys = (lag >= 0) & ((lag < x.window) | (pos[None, :] < x.sinks)) & key_ok  # [B, 1, T, T]
    linear_keys = (lag >= x.window) & (pos[None, :] >= x.sinks) & key_ok  # [B, 1, T, T]
    scores = (q @ k.transpose(-1, -2) * x.scale).masked_fill(~softmax_keys, float("-inf"))  # [B, H, T, T]
    soft = (scores - _finite(scores.amax(-1, keepdim=True)).detach()).exp()
    log_decay = q.new_zeros(q.shape[1]) if x.log_decay is None else x.log_decay
    decay = (log_decay[:, None, None] * lag.clamp(min=0)).exp()  # [H, T, T], γ^(i−j)
    lin = (fq @ fk.transpose(-1, -2)) * decay * x.mix[:, None, None] * linear_keys  # [B, H, T, T]
    weights = soft + lin
    return (weights @ v / (weights.sum(-1, keepdim=True) + x.eps)).to(x.out_dtype)


def _linear_part(
    x: _Args,
    ctx_fk: torch.Tensor,
    ctx_v: torch.Tensor,
    ctx_valid: torch.Tensor,
    front: int,
    seen: int,
    state: LinearAttentionState,
    linear_op: LinearAttentionOp,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, LinearAttentionState]:
    """g·Σ_{j ∈ L(i)} γ^(i−j) fq_i·fk_j v_j [B, H, T, d_v], its normaliser [B, H, T] and the op's final state.

    The key entering the linear sum at query t is ctx[t] once ctx is front-padded by ``front`` (its absolute
    position is seen − w + t); sinks, padding and not-yet-existing positions enter as zero.
    """
    b, h, n, _ = x.fq.shape
    entering_fk = F.pad(ctx_fk, (0, 0, front, 0))[:, :, :n]  # [B, H, T, m]
    entering_v = F.pad(ctx_v, (0, 0, front, 0))[:, :, :n]  # [B, H, T, d_v]
    entering_valid = F.pad(ctx_valid, (front, 0), value=False)[:, :n]  # [B, T]
    position = seen - x.window + torch.arange(n, device=x.fq.device)  # [T]
    enters = entering_valid & (position >= x.sinks)[None, :]  # [B, T]
    entering_fk = entering_fk * enters[:, None, :, None].to(entering_fk.dtype)
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
    )
    gain = x.mix
    if x.log_decay is not None:
        gain = gain * (x.window * x.log_decay).exp()  # γ^w: the shift's decay
    out = out * gain[:, None, None]
    assert final is not None  # output_final_state=True
    return out[..., :-1], out[..., -1], final


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
    weights = (scores - _finite(row_max)[..., None]).exp()
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
    num: torch.Tensor,
    den: torch.Tensor,
    parts: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...],
    eps: float,
) -> torch.Tensor:
    """o [B, H, T, d_v] from the linear numerator [B, H, T, d_v] and normaliser [B, H, T] plus the softmax parts
    (:func:`_softmax_part`'s three results each), brought to their common row maximum first."""
    row_max = _finite(torch.stack([part[2] for part in parts]).amax(0))  # [B, H, T]
    for part_num, part_den, part_max in parts:
        rescale = (part_max - row_max).exp()  # [B, H, T], 0 for a part with nothing visible
        num = num + part_num * rescale[..., None]
        den = den + part_den * rescale
    return num / (den + eps)[..., None]


def _finite(t: torch.Tensor) -> torch.Tensor:
    """``t`` with −inf (a query that sees no key) replaced by 0, so exp(−inf − 0) = 0 rather than NaN."""
    return torch.where(t.isfinite(), t, torch.zeros_like(t))


def _unblock(t: torch.Tensor, n: int) -> torch.Tensor:
    """[B, H, N, w, ...] → [B, H, T, ...]: blocks back to a sequence, the padded tail dropped."""
    return t.flatten(2, 3)[:, :, :n]


def _sinks(x: _Args, state: WindowState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sinks' k [B, H, S, d], v [B, H, S, d_v] and valid [B, S]: those carried, then the first tokens of this
    call while fewer than n_s tokens have been seen."""
    new = max(0, x.sinks - state.seen)
    return (
        torch.cat([state.sink_k.to(x.acc), x.k[:, :, :new]], dim=2),
        torch.cat([state.sink_v.to(x.acc), x.v[:, :, :new]], dim=2),
        torch.cat([state.sink_valid, x.valid[:, :new]], dim=1),
    )


def _empty_state(x: _Args) -> WindowState:
    """The state before the first token: no tokens, a zero linear state S [B, H, m, d_v + 1]."""
    b, h, _, d = x.q.shape
    d_v, m = x.v.shape[-1], x.fq.shape[-1]
    empty = x.q.new_zeros(b, h, 0, 1, dtype=x.acc)
    no_tokens = torch.zeros(b, 0, dtype=torch.bool, device=x.q.device)
    return WindowState(
        linear=LinearAttentionState(S=x.q.new_zeros(b, h, m, d_v + 1, dtype=x.acc)),
        k=empty.expand(b, h, 0, d),
        v=empty.expand(b, h, 0, d_v),
        fk=empty.expand(b, h, 0, m),
        valid=no_tokens,
        sink_k=empty.expand(b, h, 0, d),
        sink_v=empty.expand(b, h, 0, d_v),
        sink_valid=no_tokens,
        seen=0,
    )


def _args(inputs: tuple[torch.Tensor, ...], options: WindowOptions, state: WindowState | None) -> _Args:
    """Check q, k, v, fq, fk (``inputs``), the options and ``state`` (docstring of
    :func:`sliding_window_linear_attention`), fill in the defaults and cast to the accumulation dtype."""
    given, required = set(options), WindowOptions.__required_keys__
    allowed = required | WindowOptions.__optional_keys__
    if not required <= given:
        raise TypeError(f"sliding-window attention needs the option(s) {sorted(required - given)}")
    if not given <= allowed:
        raise TypeError(f"unknown sliding-window option(s) {sorted(given - allowed)}; allowed: {sorted(allowed)}")
    window, sinks, mix, valid = options["window"], options.get("sinks", 0), options["mix"], options.get("valid")
    check_int("window", window)
    check_int("sinks", sinks, minimum=0)
    _check_shapes(inputs, mix, valid, state)
    q, k, v = inputs[:3]
    out_dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    acc = torch.promote_types(out_dtype, torch.float32)
    log_decay = options.get("log_decay")
    q, k, v, fq, fk = (t.to(acc) for t in inputs)
    return _Args(
        q,
        k,
        v,
        fq,
        fk,
        window=window,
        sinks=sinks,
        scale=options["scale"],
        mix=mix.to(acc),
        log_decay=None if log_decay is None else log_decay.to(acc),
        valid=q.new_ones(q.shape[0], q.shape[2], dtype=torch.bool) if valid is None else valid,
        eps=options.get("eps", 1e-6),
        acc=acc,
        out_dtype=out_dtype,
    )


def _check_shapes(
    inputs: tuple[torch.Tensor, ...], mix: torch.Tensor, valid: torch.Tensor | None, state: WindowState | None
) -> None:
    for name, t in zip(("q", "k", "v", "fq", "fk"), inputs):
        if t.dim() != 4:
            raise ShapeError(f"{name} must be 4-D [B, H, T, features], got shape {tuple(t.shape)}")
    q, k, v, fq, fk = inputs
    b, h, n, _ = q.shape
    if n < 1:
        raise ShapeError(f"sequence length T must be at least 1, got q of shape {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ShapeError(f"k has shape {tuple(k.shape)}; it must equal q's {tuple(q.shape)}")
    if v.shape[:3] != (b, h, n):
        raise ShapeError(f"v has shape {tuple(v.shape)}; its first three sizes must be {(b, h, n)}")
    if fq.shape[:3] != (b, h, n) or fk.shape != fq.shape:
        raise ShapeError(
            f"fq {tuple(fq.shape)} and fk {tuple(fk.shape)} must both be [B, H, T, m] with (B, H, T) = {(b, h, n)}"
        )
    if mix.shape != (h,):
        raise ShapeError(f"mix must have shape [H]=({h},), got {tuple(mix.shape)}")
    if valid is not None and (valid.shape != (b, n) or valid.dtype != torch.bool):
        raise ShapeError(f"valid must be a bool tensor of shape {(b, n)}, got {valid.dtype} {tuple(valid.shape)}")
    if state is not None and state.k.shape[:2] != (b, h):
        raise ShapeError(f"initial_state holds batch and heads {tuple(state.k.shape[:2])}, the inputs {(b, h)}")
