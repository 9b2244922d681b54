"""The arguments of the sliding-window hybrid (``window.py``): its carried state, its options and their checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

import torch

from slimtune.config import check_int
from slimtune.errors import ShapeError
from slimtune.linear_attention.op_args import LinearAttentionState


@dataclass
class WindowState:
    """What :func:`slimtune.linear_attention.window.sliding_window_linear_attention` carries between calls (all
    float32, float64 for float64).

    linear: the linear op's state, S [B, H, m, d_v + 1] (last column: the normaliser's key sum) and its shift.
    k [B, H, L, d], v [B, H, L, d_v], fk [B, H, L, m], lk [B, H, L] (the keys' log scales), valid [B, L]: the last
    L = min(seen, w) tokens.
    sink_k [B, H, S, d], sink_v [B, H, S, d_v], sink_valid [B, S]: the first S = min(seen, n_s) tokens.
    seen: the number of tokens processed so far.
    """

    linear: LinearAttentionState
    k: torch.Tensor
    v: torch.Tensor
    fk: torch.Tensor
    lk: torch.Tensor
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
    """The keyword arguments of the hybrid, the same for the blocked form and its reference (``window`` module
    docstring).

    Required: window (w ≥ 1), scale (the softmax scale s), mix ([H], g > 0). Optional: sinks (n_s ≥ 0, default
    0), log_decay (None or [H], ≤ 0; default None: no decay), valid (None or [B, T] bool, False for a padding key;
    default None: all valid), eps (default 1e-6), and key_log_scale / query_log_scale (None or [B, H, T]: the
    per-token shifts an exact feature-map stabiliser took out of fk / fq; default None: per-token units).
    """

    sinks: int
    log_decay: torch.Tensor | None
    valid: torch.Tensor | None
    eps: float
    key_log_scale: torch.Tensor | None
    query_log_scale: torch.Tensor | None


@dataclass
class WindowArgs:
    """The hybrid's checked arguments, every option set. q, k [B, H, T, d], v [B, H, T, d_v], fq, fk [B, H, T, m],
    mix [H], log_decay [H] (or None), lk, lq [B, H, T] (zeros without log scales; lk −inf on padding) in ``acc``
    (float32 at least); valid [B, T] bool; ``kernel_units``: log scales were given (exact stabiliser)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    fq: torch.Tensor
    fk: torch.Tensor
    lk: torch.Tensor
    lq: torch.Tensor
    kernel_units: bool
    window: int
    sinks: int
    scale: float
    mix: torch.Tensor
    log_decay: torch.Tensor | None
    valid: torch.Tensor
    eps: float
    acc: torch.dtype
    out_dtype: torch.dtype


def parse_window_args(
    inputs: tuple[torch.Tensor, ...], options: WindowOptions, state: WindowState | None
) -> WindowArgs:
    """Check q, k, v, fq, fk (``inputs``), the options and ``state``, fill in the defaults and cast to the
    accumulation dtype."""
    given, required = set(options), WindowOptions.__required_keys__
    allowed = required | WindowOptions.__optional_keys__
    if not required <= given:
        raise TypeError(f"sliding-window attention needs the option(s) {sorted(required - given)}")
    if not given <= allowed:
        raise TypeError(f"unknown sliding-window option(s) {sorted(given - allowed)}; allowed: {sorted(allowed)}")
    window, sinks, mix, valid = options["window"], options.get("sinks", 0), options["mix"], options.get("valid")
    check_int("window", window)
    check_int("sinks", sinks, minimum=0)
    key_log, query_log = options.get("key_log_scale"), options.get("query_log_scale")
    _check_shapes(inputs, mix, valid, state, (key_log, query_log))
    q, k, v = inputs[:3]
    out_dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    acc = torch.promote_types(out_dtype, torch.float32)
    log_decay = options.get("log_decay")
    q, k, v, fq, fk = (t.to(acc) for t in inputs)
    valid = q.new_ones(q.shape[0], q.shape[2], dtype=torch.bool) if valid is None else valid
    zeros = q.new_zeros(q.shape[:3])
    lk = zeros if key_log is None else key_log.to(acc)
    return WindowArgs(
        q,
        k,
        v,
        fq,
        fk,
        lk=lk.masked_fill(~valid[:, None, :], float("-inf")),
        lq=zeros if query_log is None else query_log.to(acc),
        kernel_units=key_log is not None or query_log is not None,
        window=window,
        sinks=sinks,
        scale=options["scale"],
        mix=mix.to(acc),
        log_decay=None if log_decay is None else log_decay.to(acc),
        valid=valid,
        eps=options.get("eps", 1e-6),
        acc=acc,
        out_dtype=out_dtype,
    )


def empty_window_state(x: WindowArgs) -> WindowState:
    """The state before the first token: no tokens, a zero linear state S [B, H, m, d_v + 1] with shift −inf."""
    b, h, _, d = x.q.shape
    d_v, m = x.v.shape[-1], x.fq.shape[-1]
    empty = x.q.new_zeros(b, h, 0, 1, dtype=x.acc)
    no_tokens = torch.zeros(b, 0, dtype=torch.bool, device=x.q.device)
    linear = LinearAttentionState(
        S=x.q.new_zeros(b, h, m, d_v + 1, dtype=x.acc), shift=x.q.new_full((b, h), float("-inf"), dtype=x.acc)
    )
    return WindowState(
        linear=linear,
        k=empty.expand(b, h, 0, d),
        v=empty.expand(b, h, 0, d_v),
        fk=empty.expand(b, h, 0, m),
        lk=empty[..., 0],
        valid=no_tokens,
        sink_k=empty.expand(b, h, 0, d),
        sink_v=empty.expand(b, h, 0, d_v),
        sink_valid=no_tokens,
        seen=0,
    )


def _check_shapes(
    inputs: tuple[torch.Tensor, ...],
    mix: torch.Tensor,
    valid: torch.Tensor | None,
    state: WindowState | None,
    log_scales: tuple[torch.Tensor | None, torch.Tensor | None],
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
    for name, scale in zip(("key_log_scale", "query_log_scale"), log_scales):
        if scale is not None and scale.shape != (b, h, n):
            raise ShapeError(f"{name} must have shape {(b, h, n)} ([B, H, T]), got {tuple(scale.shape)}")
    if state is not None and state.k.shape[:2] != (b, h):
        raise ShapeError(f"initial_state holds batch and heads {tuple(state.k.shape[:2])}, the inputs {(b, h)}")
