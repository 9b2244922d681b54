"""The arguments every linear-attention op of ``ops.py`` takes: the carried state, the keyword options, their checks.

Options (:class:`LinearAttentionOptions`; one left out takes its value in ``DEFAULT_OPTIONS``):

- log_decay: None or [H], per query head, every entry finite and ≤ 0 (checked; on a GPU the check synchronises once).
- normalize: divide by the normaliser (the ``ops`` module docstring).
- initial_state / output_final_state: a :class:`LinearAttentionState` in, and one out.
- eps: added to the normaliser, in the units of the kernel (``ops``).
- chunk_size: used by ``chunked``, accepted and ignored elsewhere, so the ops are interchangeable.
- key_log_scale: None or [B, Hkv, T]: key s counts as k_s·exp(l_s). A feature map's exact stabiliser passes the
  per-token shift it took out of φ(k_s) here (``feature_maps``), so the op computes with the unshifted features.
- query_log_scale: None or [B, H, T]: query t counts as q_t·exp(l_t).

Any other option name is a ConfigError.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

import torch

from slimtune.errors import ConfigError, ShapeError


@dataclass
class LinearAttentionState:
    """The fixed-size state carried between calls, per batch element and query head.

    S: [B, H, m, d_v], Σ_s γ^(T−1−s) k_s v_sᵀ (plus the decayed initial S), divided by exp(shift).
    z: [B, H, m], Σ_s γ^(T−1−s) k_s, divided by exp(shift); present exactly when the attention is normalised.
    shift: [B, H] or None (0): the log of the common scale S and z are held in, a running maximum of the keys'
    log weights (−inf before any key), so that S and z stay bounded however large the exponents grow.
    All float32 (float64 for float64 inputs).
    """

    S: torch.Tensor
    z: torch.Tensor | None = None
    shift: torch.Tensor | None = None

    def unshifted(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """S and z in the kernel's own units, S·exp(shift) and z·exp(shift) (may overflow: for tests and checks)."""
        if self.shift is None:
            return self.S, self.z
        scale = finite_or_zero(self.shift).exp() * self.shift.isfinite()  # [B, H], 0 for an empty state
        return self.S * scale[..., None, None], None if self.z is None else self.z * scale[..., None]


class LinearAttentionOptions(TypedDict, total=False):
    """The keyword options of every op (module docstring)."""

    log_decay: torch.Tensor | None
    normalize: bool
    initial_state: LinearAttentionState | None
    output_final_state: bool
    eps: float
    chunk_size: int
    key_log_scale: torch.Tensor | None
    query_log_scale: torch.Tensor | None


DEFAULT_OPTIONS: LinearAttentionOptions = {
    "log_decay": None,
    "normalize": False,
    "initial_state": None,
    "output_final_state": False,
    "eps": 1e-6,
    "chunk_size": 64,
    "key_log_scale": None,
    "query_log_scale": None,
}


@dataclass
class OpCall:
    """One op call's checked arguments: q [B, H, T, m]; k [B, H, T, m] and v [B, H, T, d_v] with the key/value
    heads repeated for GQA (dtypes as given), key_log_scale repeated likewise; every option set; ``out_dtype``, the
    promoted dtype of q, k, v."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    options: LinearAttentionOptions
    out_dtype: torch.dtype

    @property
    def acc(self) -> torch.dtype:
        """The accumulation dtype: float32 at least."""
        return torch.promote_types(self.out_dtype, torch.float32)

    def initial(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """S₀ [B, H, m, d_v], z₀ [B, H, m] and shift₀ [B, H] in ``dtype``: the initial state's (a state without a
        shift has shift 0), zeros and shift −inf (nothing seen) where there is none."""
        b, h, _, m = self.q.shape
        state = self.options["initial_state"]
        if state is None:
            empty = self.q.new_full((b, h), float("-inf"), dtype=dtype)
            return (
                self.q.new_zeros(b, h, m, self.v.shape[-1], dtype=dtype),
                self.q.new_zeros(b, h, m, dtype=dtype),
                empty,
            )
        z0 = self.q.new_zeros(b, h, m, dtype=dtype) if state.z is None else state.z.to(dtype)
        shift0 = self.q.new_zeros(b, h, dtype=dtype) if state.shift is None else state.shift.to(dtype)
        return state.S.to(dtype), z0, shift0

    def log_scales(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys' and queries' log scales [B, H, T] in ``dtype`` (zeros where not given)."""
        b, h, n, _ = self.q.shape
        key, query = self.options["key_log_scale"], self.options["query_log_scale"]
        zeros = self.q.new_zeros(b, h, n, dtype=dtype)
        return (zeros if key is None else key.to(dtype)), (zeros if query is None else query.to(dtype))

    def accumulated(self) -> tuple[torch.Tensor, ...]:
        """q, k, v, log_decay [H] (zeros when None), S₀, z₀, shift₀, key and query log scales, in the accumulation
        dtype."""
        log_decay = self.options["log_decay"]
        acc = self.acc
        log_decay = self.q.new_zeros(self.q.shape[1], dtype=acc) if log_decay is None else log_decay.to(acc)
        return (self.q.to(acc), self.k.to(acc), self.v.to(acc), log_decay, *self.initial(acc), *self.log_scales(acc))


def parse_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, given: LinearAttentionOptions) -> OpCall:
    """Check the options and shapes (``ops`` module docstring), fill in the defaults and repeat key/value heads (and
    key log scales) for GQA."""
    unknown = sorted(set(given) - set(DEFAULT_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown linear-attention option(s) {unknown}; allowed: {sorted(DEFAULT_OPTIONS)}")
    options = DEFAULT_OPTIONS.copy()
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
    for name, shape in (("key_log_scale", (b, h_kv, n)), ("query_log_scale", (b, h, n))):
        scale = options[name]  # type: ignore[literal-required]
        if scale is not None and scale.shape != shape:
            raise ShapeError(f"{name} must have shape {shape} ([B, heads, T]), got {tuple(scale.shape)}")
    rep = h // h_kv
    if rep > 1:
        k, v = (t.repeat_interleave(rep, dim=1) for t in (k, v))  # [B, H, T, ·], as repeat_kv
        if options["key_log_scale"] is not None:
            options["key_log_scale"] = options["key_log_scale"].repeat_interleave(rep, dim=1)  # [B, H, T]
    return OpCall(q, k, v, options, torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype))


def _check_decay(log_decay: torch.Tensor | None, h: int) -> None:
    if log_decay is None:
        return
    if log_decay.shape != (h,):
        raise ShapeError(f"log_decay must have shape [H]=({h},), got {tuple(log_decay.shape)}")
    if bool(((log_decay > 0) | ~log_decay.isfinite()).any()):
        raise ConfigError(f"log_decay must be finite and <= 0 (a decay 0 < γ <= 1), got {log_decay.tolist()}")


def _check_state(state: LinearAttentionState | None, normalize: bool, shape: tuple[int, int, int, int]) -> None:
    """``state`` fits S [B, H, m, d_v] = ``shape``, has z [B, H, m] exactly when ``normalize``, shift [B, H] or None."""
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
    if state.shift is not None and state.shift.shape != shape[:2]:
        raise ShapeError(f"initial_state.shift must have shape {shape[:2]}, got {tuple(state.shift.shape)}")


def ones_column(v: torch.Tensor, s0: torch.Tensor, z0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The normaliser as one more value column: v [B, H, T, d_v + 1] (ones last), S₀ [B, H, m, d_v + 1] (z₀ last)."""
    ones = v.new_ones(*v.shape[:-1], 1)
    return torch.cat([v, ones], dim=-1), torch.cat([s0, z0[..., None]], dim=-1)


def finite_or_zero(t: torch.Tensor) -> torch.Tensor:
    """``t`` with ±inf replaced by 0: a reference point to subtract, so that exp(−inf − 0) = 0 rather than NaN."""
    return torch.where(t.isfinite(), t, torch.zeros_like(t))
