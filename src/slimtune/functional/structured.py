"""SURM structured matrices (circulant, Toeplitz, LDR, Kronecker): fast FFT forms beside dense forms.

Tiling. A layer d_in → d_out (ΔW of shape (d_out, d_in), ``nn.Linear`` orientation) is cut into b×b blocks, b
dividing both dims: p = d_out/b block rows, q = d_in/b block columns. Block (i, j) maps the input slice
x_j = x[..., j·b:(j+1)·b] into output slice i, and each block is its own structured matrix, so every parameter
has leading dims (p, q). Per block, with r, s in [0, b):

- circulant: c (p, q, b); Circ(c)[r, s] = c[(r − s) mod b]. b parameters per block.
- Toeplitz: t (p, q, 2b − 1), T(t)[r, s] = t[r − s + b − 1]; symmetric: t (p, q, b), T(t)[r, s] = t[|r − s|].
- Toeplitz product (the paper's LoRA form): block = T(u)·T(w), u and w both general or both symmetric.
- LDR of displacement rank K: c, h (p, q, K, b); block = Σ_k Circ(c_k)·SkewCirc(h_k), 2bK parameters per block,
  SkewCirc(h)[r, s] = h[r − s] if r ≥ s else −h[r − s + b].
- Kronecker (not tiled): ΔW = kron(B, A) with A (a_out, a_in), B (d_out/a_out, d_in/a_in), i.e.
  ΔW[i1·a_out + i2, j1·a_in + j2] = B[i1, j1]·A[i2, j2]; (d_out·d_in)/(a_out·a_in) + a_out·a_in parameters.
  SURM's shapes A (r, d_in/r), B (d_out/r, r) are the case a_out = r, a_in = d_in/r: valid whenever r divides
  d_in and d_out, and exactly d_in + d_out parameters for every such r (``kronecker_factor_shapes``).

Fast forms (``*_apply``) compute y = x @ ΔWᵀ: x (..., d_in) → y (..., d_out) without forming ΔW. Dense forms
(``dense_delta_*``) build ΔW (d_out, d_in) entry by entry from the definitions above (index tables written as
loops, then one gather); the layers merge with them. The tests check both against references written apart from
this module (``scipy.linalg``, ``torch.kron`` and loops in ``tests/cases.py``).

Functions are pure: no scale α, no dropout; callers scale. FFTs run in float32 or float64 (torch has no bfloat16
FFT on CPU): the compute dtype is float64 if x or a parameter is float64, else float32. Outputs take x's dtype.
"""

from __future__ import annotations

import math
from functools import reduce

import torch

from slimtune.errors import ShapeError

_COMPLEX = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def common_divisors(d_in: int, d_out: int) -> list[int]:
    """The integers dividing both d_in and d_out, ascending."""
    g = math.gcd(d_in, d_out)
    return [k for k in range(1, g + 1) if g % k == 0]


def _check_divides(name: str, value: int, d_in: int, d_out: int) -> None:
    is_count = isinstance(value, int) and not isinstance(value, bool) and value > 0
    if is_count and d_in % value == 0 and d_out % value == 0:
        return
    allowed = common_divisors(d_in, d_out)
    shown = ", ".join(map(str, allowed[:8])) + (", …" if len(allowed) > 8 else "")
    raise ShapeError(
        f"{name}={value!r} must be a positive integer dividing both d_in={d_in} and d_out={d_out}; allowed: {shown}"
    )


def default_block_size(d_in: int, d_out: int) -> int:
    """The largest block size that tiles a d_in → d_out layer: gcd(d_in, d_out)."""
    return math.gcd(d_in, d_out)


def check_block_size(block_size: int, d_in: int, d_out: int) -> tuple[int, int]:
    """Validate the tiling of a d_in → d_out layer into block_size² blocks; return the grid (p, q).

    Raises ShapeError naming block_size, d_in, d_out and the common divisors when block_size divides not both.
    """
    _check_divides("block_size", block_size, d_in, d_out)
    return d_out // block_size, d_in // block_size


def kronecker_factor_shapes(d_in: int, d_out: int, r: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """SURM's Kronecker factors for rank-like size r: (B shape, A shape) = ((d_out/r, r), (r, d_in/r)).

    kron(B, A) is then (d_out, d_in) with d_out + d_in parameters. Raises ShapeError unless r divides both.
    """
    _check_divides("r", r, d_in, d_out)
    return (d_out // r, r), (r, d_in // r)


def c3a_kernel_to_circulant(kernel: torch.Tensor, d_in: int) -> torch.Tensor:
    """PEFT C3A's ``c3a_kernel`` w (p, q, b) → slimtune's c (p, q, b) with the same ΔW.

    C3A's block is w[(s − r) mod b] at [r, s] (the transpose of Circ(w)) and its ΔW is scaled by 1/d_in, so
    c[k] = w[(−k) mod b] / d_in.
    """
    b = kernel.shape[-1]
    return kernel[..., (-torch.arange(b, device=kernel.device)) % b] / d_in


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = reduce(torch.promote_types, (t.dtype for t in tensors))
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_param(name: str, param: torch.Tensor, dims: int, layout: str) -> None:
    if param.dim() != dims:
        raise ShapeError(f"{name} must have {dims} dims {layout}; got shape {tuple(param.shape)}")


def _check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, dims: int) -> None:
    if a.shape != b.shape or a.dim() != dims:
        raise ShapeError(
            f"{name_a} and {name_b} must have the same {dims}-dim shape; "
            f"got {name_a}.shape={tuple(a.shape)}, {name_b}.shape={tuple(b.shape)}"
        )


def _split_input(x: torch.Tensor, q: int, b: int, name: str, param: torch.Tensor) -> torch.Tensor:
    """x (..., q·b) → (..., q, b), or ShapeError when x does not match the parameter's tiling."""
    if x.shape[-1] != q * b:
        raise ShapeError(
            f"x.shape[-1]={x.shape[-1]} must equal {q}·{b} = {q * b}, the input width that {name} of shape "
            f"{tuple(param.shape)} tiles"
        )
    return x.unflatten(-1, (q, b))  # (..., d_in) → (..., q, b)


def _circulant_index(b: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([[(r - s) % b for s in range(b)] for r in range(b)], device=device)


def _circulant_blocks(c: torch.Tensor) -> torch.Tensor:
    """Circ(c) for every leading index: c (..., b) → (..., b, b)."""
    return c[..., _circulant_index(c.shape[-1], c.device)]


def _skew_circulant_blocks(h: torch.Tensor) -> torch.Tensor:
    """SkewCirc(h) for every leading index: h (..., b) → (..., b, b)."""
    b = h.shape[-1]
    sign = [[1.0 if r >= s else -1.0 for s in range(b)] for r in range(b)]
    return h[..., _circulant_index(b, h.device)] * torch.tensor(sign, dtype=h.dtype, device=h.device)


def _toeplitz_size(t: torch.Tensor, symmetric: bool) -> int:
    """Block size b from a Toeplitz parameter's last dim: b (symmetric) or 2b − 1 (general)."""
    length = t.shape[-1]
    if symmetric:
        return length
    if length % 2 == 0:
        raise ShapeError(f"a general Toeplitz t needs t.shape[-1] = 2b − 1 (odd); got t.shape={tuple(t.shape)}")
    return (length + 1) // 2


def _toeplitz_blocks(t: torch.Tensor, *, symmetric: bool) -> torch.Tensor:
    """T(t) for every leading index: t (..., 2b − 1) or symmetric (..., b) → (..., b, b)."""
    b = _toeplitz_size(t, symmetric)
    if symmetric:
        index = [[abs(r - s) for s in range(b)] for r in range(b)]
    else:
        index = [[r - s + b - 1 for s in range(b)] for r in range(b)]
    return t[..., torch.tensor(index, device=t.device)]


def blocks_to_dense(blocks: torch.Tensor) -> torch.Tensor:
    """Assemble a block grid into one matrix: (p, q, b, b) → (p·b, q·b), block (i, j) at rows i·b, cols j·b."""
    p, q, b, _ = blocks.shape
    return blocks.permute(0, 2, 1, 3).reshape(p * b, q * b)  # (p, b, q, b) → (d_out, d_in)


def dense_delta_circulant(c: torch.Tensor) -> torch.Tensor:
    """ΔW with block (i, j) = Circ(c[i, j]): c (p, q, b) → (p·b, q·b)."""
    _check_param("c", c, 3, "(p, q, b)")
    return blocks_to_dense(_circulant_blocks(c))


def dense_delta_skew_circulant(h: torch.Tensor) -> torch.Tensor:
    """ΔW with block (i, j) = SkewCirc(h[i, j]): h (p, q, b) → (p·b, q·b)."""
    _check_param("h", h, 3, "(p, q, b)")
    return blocks_to_dense(_skew_circulant_blocks(h))


def dense_delta_toeplitz(t: torch.Tensor, *, symmetric: bool = False) -> torch.Tensor:
    """ΔW with block (i, j) = T(t[i, j]): t (p, q, 2b − 1), or (p, q, b) if symmetric → (p·b, q·b)."""
    _check_param("t", t, 3, "(p, q, 2b − 1) or symmetric (p, q, b)")
    return blocks_to_dense(_toeplitz_blocks(t, symmetric=symmetric))


def dense_delta_toeplitz_product(u: torch.Tensor, w: torch.Tensor, *, symmetric: bool = False) -> torch.Tensor:
    """ΔW with block (i, j) = T(u[i, j])·T(w[i, j]); u, w as in ``dense_delta_toeplitz`` → (p·b, q·b)."""
    _check_same_shape("u", u, "w", w, 3)
    return blocks_to_dense(_toeplitz_blocks(u, symmetric=symmetric) @ _toeplitz_blocks(w, symmetric=symmetric))


def dense_delta_ldr(c: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """ΔW with block (i, j) = Σ_k Circ(c[i, j, k])·SkewCirc(h[i, j, k]): c, h (p, q, K, b) → (p·b, q·b)."""
    _check_same_shape("c", c, "h", h, 4)
    return blocks_to_dense((_circulant_blocks(c) @ _skew_circulant_blocks(h)).sum(2))  # (p, q, K, b, b) → K-sum


def dense_delta_kronecker(b_factor: torch.Tensor, a_factor: torch.Tensor) -> torch.Tensor:
    """ΔW[i1·a_out + i2, j1·a_in + j2] = B[i1, j1]·A[i2, j2]: B (m, n), A (a_out, a_in) → (m·a_out, n·a_in)."""
    _check_param("b_factor", b_factor, 2, "(d_out/a_out, d_in/a_in)")
    _check_param("a_factor", a_factor, 2, "(a_out, a_in)")
    (m, n), (a_out, a_in) = b_factor.shape, a_factor.shape
    rows = torch.arange(m * a_out, device=a_factor.device)[:, None]
    cols = torch.arange(n * a_in, device=a_factor.device)[None, :]
    return b_factor[rows // a_out, cols // a_in] * a_factor[rows % a_out, cols % a_in]


def circulant_apply(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """y = x @ ΔWᵀ with block (i, j) = Circ(c[i, j]): x (..., q·b), c (p, q, b) → (..., p·b).

    y_i = Σ_j irfft(rfft(c_ij)·rfft(x_j)), the j-sum taken in the frequency domain:
    O(N·(p + q)·b log b + N·p·q·b) time, no (p, q)-sized activation.
    """
    _check_param("c", c, 3, "(p, q, b)")
    _, q, b = c.shape
    dtype = _compute_dtype(x, c)
    x_f = torch.fft.rfft(_split_input(x.to(dtype), q, b, "c", c), n=b)  # (..., q, b//2 + 1)
    c_f = torch.fft.rfft(c.to(dtype), n=b)  # (p, q, b//2 + 1)
    y = torch.fft.irfft(torch.einsum("...jf,ijf->...if", x_f, c_f), n=b)  # (..., p, b)
    return y.flatten(-2).to(x.dtype)  # (..., p, b) → (..., d_out)


def skew_twiddle(
    b: int, dtype: torch.dtype = torch.complex128, device: torch.device | str | None = None
) -> torch.Tensor:
    """η^s for s in [0, b), η = exp(iπ/b), so η^b = −1: (b,) complex.

    SkewCirc(h) = D⁻¹·Circ(D h)·D with D = diag(η^s), so
    SkewCirc(h) x = η^{−r} ⊙ ifft(fft(η^s h)·fft(η^s x)).
    """
    s = torch.arange(b, dtype=torch.float64, device=device)
    return torch.polar(torch.ones_like(s), math.pi * s / b).to(dtype)


def skew_circulant_apply(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """y = x @ ΔWᵀ with block (i, j) = SkewCirc(h[i, j]): x (..., q·b), h (p, q, b) → (..., p·b)."""
    _check_param("h", h, 3, "(p, q, b)")
    _, q, b = h.shape
    dtype = _compute_dtype(x, h)
    eta = skew_twiddle(b, _COMPLEX[dtype], x.device)
    x_f = torch.fft.fft(eta * _split_input(x.to(dtype), q, b, "h", h))  # (..., q, b)
    h_f = torch.fft.fft(eta * h.to(dtype))  # (p, q, b)
    y = (torch.fft.ifft(torch.einsum("...jf,ijf->...if", x_f, h_f)) * eta.conj()).real  # (..., p, b)
    return y.flatten(-2).to(x.dtype)  # (..., p, b) → (..., d_out)


def ldr_apply(x: torch.Tensor, c: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """y = x @ ΔWᵀ with block (i, j) = Σ_k Circ(c[i, j, k])·SkewCirc(h[i, j, k]).

    x (..., q·b), c and h (p, q, K, b) → (..., p·b). The skew-circulant products z_ijk = SkewCirc(h_ijk) x_j
    differ for every (i, j, k), so this form holds an (..., p, q, K, b) intermediate and costs
    O(N·p·q·K·b log b); the circulant step sums over j and k in the frequency domain.
    """
    _check_same_shape("c", c, "h", h, 4)
    _, q, _, b = c.shape
    dtype = _compute_dtype(x, c, h)
    eta = skew_twiddle(b, _COMPLEX[dtype], x.device)
    x_f = torch.fft.fft(eta * _split_input(x.to(dtype), q, b, "c", c))  # (..., q, b)
    h_f = torch.fft.fft(eta * h.to(dtype))  # (p, q, K, b)
    x_f = x_f.unsqueeze(-2).unsqueeze(-4)  # (..., q, b) → (..., 1, q, 1, b)
    z = (torch.fft.ifft(x_f * h_f) * eta.conj()).real  # SkewCirc(h_ijk) x_j: (..., p, q, K, b)
    z_f = torch.fft.rfft(z, n=b)  # (..., p, q, K, b//2 + 1)
    c_f = torch.fft.rfft(c.to(dtype), n=b)  # (p, q, K, b//2 + 1)
    y = torch.fft.irfft(torch.einsum("...ijkf,ijkf->...if", z_f, c_f), n=b)  # (..., p, b)
    return y.flatten(-2).to(x.dtype)  # (..., p, b) → (..., d_out)


def toeplitz_embedding(t: torch.Tensor, *, symmetric: bool = False) -> torch.Tensor:
    """First column v of the 2b×2b circulant whose top-left b×b block is T(t).

    t (..., 2b − 1), or (..., b) if symmetric → v (..., 2b):

    v = [T[0, 0], …, T[b − 1, 0], 0, T[0, b − 1], …, T[0, 1]], since Circ(v)[r, s] = v[(r − s) mod 2b].
    """
    b = _toeplitz_size(t, symmetric)
    column, row_reversed = (t, t[..., 1:].flip(-1)) if symmetric else (t[..., b - 1 :], t[..., : b - 1])
    return torch.cat([column, t.new_zeros(*t.shape[:-1], 1), row_reversed], dim=-1)


def _toeplitz_spectrum(t: torch.Tensor, symmetric: bool, dtype: torch.dtype) -> torch.Tensor:
    """rfft of the 2b circulant embedding: t (..., 2b − 1) or (..., b) → (..., b + 1) complex."""
    b = _toeplitz_size(t, symmetric)
    return torch.fft.rfft(toeplitz_embedding(t.to(dtype), symmetric=symmetric), n=2 * b)


def toeplitz_apply(x: torch.Tensor, t: torch.Tensor, *, symmetric: bool = False) -> torch.Tensor:
    """y = x @ ΔWᵀ with block (i, j) = T(t[i, j]): x (..., q·b), t (p, q, 2b − 1) or symmetric (p, q, b).

    Each x_j is zero-padded to 2b and multiplied by the circulant embedding; the first b outputs are T(t) x_j.
    The j-sum is taken in the frequency domain. Returns (..., p·b).
    """
    _check_param("t", t, 3, "(p, q, 2b − 1) or symmetric (p, q, b)")
    q = t.shape[1]
    b = _toeplitz_size(t, symmetric)
    dtype = _compute_dtype(x, t)
    x_f = torch.fft.rfft(_split_input(x.to(dtype), q, b, "t", t), n=2 * b)  # zero-padded: (..., q, b + 1)
    t_f = _toeplitz_spectrum(t, symmetric, dtype)  # (p, q, b + 1)
    y = torch.fft.irfft(torch.einsum("...jf,ijf->...if", x_f, t_f), n=2 * b)  # (..., p, 2b)
    y = y[..., :b]  # (..., p, 2b) → (..., p, b): T(t) is the top-left block of the embedding
    return y.flatten(-2).to(x.dtype)  # (..., p, b) → (..., d_out)


def toeplitz_product_apply(
    x: torch.Tensor, u: torch.Tensor, w: torch.Tensor, *, symmetric: bool = False
) -> torch.Tensor:
    """y = x @ ΔWᵀ with block (i, j) = T(u[i, j])·T(w[i, j]): x (..., q·b), u and w as in ``toeplitz_apply``.

    Two successive Toeplitz products by FFT; the product of two Toeplitz matrices is not Toeplitz, so the
    inner result z_ij = T(w_ij) x_j is truncated to b and re-padded, and an (..., p, q, b) intermediate is
    held. Returns (..., p·b).
    """
    _check_same_shape("u", u, "w", w, 3)
    q = u.shape[1]
    b = _toeplitz_size(u, symmetric)
    dtype = _compute_dtype(x, u, w)
    x_f = torch.fft.rfft(_split_input(x.to(dtype), q, b, "u", u), n=2 * b)  # (..., q, b + 1)
    w_f = _toeplitz_spectrum(w, symmetric, dtype)  # (p, q, b + 1)
    z = torch.fft.irfft(x_f.unsqueeze(-3) * w_f, n=2 * b)[..., :b]  # T(w_ij) x_j: (..., p, q, b)
    z_f = torch.fft.rfft(z, n=2 * b)  # (..., p, q, b + 1)
    u_f = _toeplitz_spectrum(u, symmetric, dtype)  # (p, q, b + 1)
    y = torch.fft.irfft((z_f * u_f).sum(-2), n=2 * b)[..., :b]  # (..., p, 2b) → (..., p, b)
    return y.flatten(-2).to(x.dtype)  # (..., p, b) → (..., d_out)


def kronecker_apply(x: torch.Tensor, b_factor: torch.Tensor, a_factor: torch.Tensor) -> torch.Tensor:
    """y = x @ kron(B, A)ᵀ without forming it: x (..., n·a_in), B (m, n), A (a_out, a_in) → (..., m·a_out).

    With x viewed as X (..., n, a_in): Y = B·(X·Aᵀ), cost N·a_out·(d_in + m·n) (= N·r·(d_in + d_out) for
    SURM's shapes).
    """
    _check_param("b_factor", b_factor, 2, "(d_out/a_out, d_in/a_in)")
    _check_param("a_factor", a_factor, 2, "(a_out, a_in)")
    n, a_in = b_factor.shape[1], a_factor.shape[1]
    dtype = _compute_dtype(x, b_factor, a_factor)
    xs = _split_input(x.to(dtype), n, a_in, "a_factor", a_factor)  # (..., d_in) → (..., n, a_in)
    y = b_factor.to(dtype) @ (xs @ a_factor.to(dtype).t())  # (..., n, a_out) → (..., m, a_out)
    return y.flatten(-2).to(x.dtype)  # (..., m, a_out) → (..., d_out)
