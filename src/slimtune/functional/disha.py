"""DiSHA math (Bone, mini, Bat-Col, Bat-Row): the fast forms; the slow loop references are in ``tests/cases.py``.

Notation: base weight W of shape (d_out, d_in) (``nn.Linear.weight``), shard size r. For Bat, W is cut into
r×r blocks W_ij, i the output block (I = d_out/r of them), j the input block (J = d_in/r of them).

- Bone: M (r, d_out); ΔW[o, i] = M[i mod r, o].
- mini: m (r, mini_r); ΔW[o, i] = m[i mod r, o mod mini_r].
- Bat: ΔW_ij = W_ij·B_k + B_k, one block B_k per r-block k along ``axis`` of W: axis 0 (Bat-Col) B (I, r, r)
  with k = i, axis 1 (Bat-Row) B (J, r, r) with k = j.

The fast forms never form more than they need.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F


def bone_delta_weight(m: torch.Tensor, d_in: int) -> torch.Tensor:
    """Bone ΔW by tiling. m: (r, d_out) → (d_out, d_in)."""
    r = m.shape[0]
    repeats = -(-d_in // r)
    return m.t().repeat(1, repeats)[:, :d_in]  # (d_out, repeats*r) → (d_out, d_in)


def shard_sum(x: torch.Tensor, r: int) -> torch.Tensor:
    """Sum of the r-wide shards of x, the last one zero-padded: (..., d_in) → (..., r).

    Only the short tail is padded, so no copy of x is made when r does not divide d_in.
    """
    d_in = x.shape[-1]
    n_full, rem = divmod(d_in, r)
    total = x[..., : n_full * r].unflatten(-1, (n_full, r)).sum(-2)  # (..., n_full, r) → (..., r)
    if rem:
        total = total + F.pad(x[..., n_full * r :], (0, r - rem))  # tail (..., rem) → (..., r)
    return total


def bone_delta(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Bone's ``x @ ΔWᵀ`` without ΔW: (..., d_in), m (r, d_out) → (..., d_out)."""
    return shard_sum(x, m.shape[0]) @ m


class BoneLinear(torch.autograd.Function):
    """``F.linear(x, W, bias) + bone_delta(x, M)`` as one function: the fast path of a Bone-adapted linear layer.

    The Bone product is the output buffer that the base product accumulates into (``addmm`` with ``out=``, which
    FlopCounterMode counts), and the backward adds Bone's input gradient, tiled over the shards, into the base's in
    place, so neither direction makes a separate (N, d_out) sum or an (N, d_in) tiled copy. Saves the shard sums
    s (N, r), W, M, and x only if W trains.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, m: torch.Tensor) -> Any:
        d_in = x.shape[-1]
        flat = x.reshape(-1, d_in)  # (..., d_in) → (N, d_in)
        sums = shard_sum(flat, m.shape[0])  # (N, r)
        out = sums @ m  # (N, d_out)
        if bias is not None:
            out += bias
        torch.addmm(out, flat, weight.t(), out=out)  # in place: the base product accumulates into it
        ctx.save_for_backward(sums, weight, m, flat if weight.requires_grad else None)
        ctx.has_bias, ctx.input_shape = bias is not None, x.shape
        return out.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> Any:
        sums, weight, m, flat = ctx.saved_tensors
        (d_out, d_in), r = weight.shape, m.shape[0]
        grad = grad_y.reshape(-1, d_out)  # (N, d_out)
        grad_x = grad_w = grad_bias = grad_m = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ weight  # (N, d_in)
            grad_sums = grad @ m.t()  # (N, r): the gradient of every shard
            n_full, rem = divmod(d_in, r)
            grad_x[:, : n_full * r].view(-1, n_full, r).add_(grad_sums.unsqueeze(1))
            if rem:
                grad_x[:, n_full * r :].add_(grad_sums[:, :rem])
            grad_x = grad_x.view(ctx.input_shape)
        if ctx.needs_input_grad[1]:
            grad_w = grad.t() @ flat
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0)
        if ctx.needs_input_grad[3]:
            grad_m = sums.t() @ grad
        return grad_x, grad_w, grad_bias, grad_m


def bone_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, m: torch.Tensor) -> torch.Tensor:
    """Bone-adapted linear layer ``x Wᵀ + bias + x ΔWᵀ``: (..., d_in), weight (d_out, d_in), m (r, d_out) →
    (..., d_out); every tensor in one dtype."""
    return BoneLinear.apply(x, weight, bias, m)


def mini_full_block(m: torch.Tensor, d_out: int) -> torch.Tensor:
    """mini's small block tiled along the outputs: m (r, mini_r) → (r, d_out)."""
    return m.repeat(1, d_out // m.shape[1])


def mini_delta(x: torch.Tensor, m: torch.Tensor, d_out: int) -> torch.Tensor:
    """mini's ``x @ ΔWᵀ``: (..., d_in), m (r, mini_r) → (..., d_out), through the (..., mini_r) product."""
    y = shard_sum(x, m.shape[0]) @ m  # (..., mini_r)
    return y.repeat(*([1] * (y.dim() - 1)), d_out // m.shape[1])  # (..., mini_r) → (..., d_out)


def _grouped_rows(weight: torch.Tensor, r: int, axis: int) -> torch.Tensor:
    """W's rows grouped by the block B_k that acts on them: (d_out, d_in) → (n, rows, r).

    axis 0: (I, r·J, r), a view; row (a, j) of group i is row a of W_ij. axis 1: (J, d_out, r); row (i, a) of
    group j is row a of W_ij. Right-multiplying group k by B_k transforms every block that shares B_k at once.
    """
    d_out, d_in = weight.shape
    if axis == 0:
        return weight.reshape(d_out // r, d_in, r)
    return weight.reshape(d_out, d_in // r, r).transpose(0, 1)


def _ungrouped_rows(rows: torch.Tensor, d_out: int, d_in: int, axis: int) -> torch.Tensor:
    """Inverse of :func:`_grouped_rows`: (n, rows, r) → (d_out, d_in)."""
    return (rows if axis == 0 else rows.transpose(0, 1)).reshape(d_out, d_in)


def _add_blocks(rows: torch.Tensor, b: torch.Tensor, axis: int) -> torch.Tensor:
    """Add B_k to every r×r block of group k: rows (n, rows, r) as :func:`_grouped_rows` → (n, rows, r)."""
    n, r, _ = b.shape
    blocks = rows.reshape(n, r, -1, r) if axis == 0 else rows.reshape(n, -1, r, r)  # (I, r, J, r) | (J, I, r, r)
    return (blocks + b.unsqueeze(2 - axis)).reshape(n, -1, r)


def bat_delta_weight(weight: torch.Tensor, b: torch.Tensor, axis: int) -> torch.Tensor:
    """Bat ΔW_ij = W_ij·B_k + B_k with one batched matmul: weight (d_out, d_in), b (n, r, r) → (d_out, d_in).

    ``axis`` 0 (Bat-Col): k = i, n = d_out/r; ``axis`` 1 (Bat-Row): k = j, n = d_in/r.
    """
    d_out, d_in = weight.shape
    rows = torch.bmm(_grouped_rows(weight, b.shape[1], axis), b)  # (n, rows, r): W_ij·B_k
    return _ungrouped_rows(_add_blocks(rows, b, axis), d_out, d_in, axis)


def bat_merged_weight(weight: torch.Tensor, b: torch.Tensor, axis: int) -> torch.Tensor:
    """Bat W' = W + ΔW. weight (d_out, d_in), b (n, r, r) as in :func:`bat_delta_weight` → (d_out, d_in)."""
    return weight + bat_delta_weight(weight, b, axis)


def bat_unmerged_weight(merged: torch.Tensor, b: torch.Tensor, axis: int) -> torch.Tensor:
    """Inverse of Bat's merge: W_ij = (W'_ij − B_k)(I + B_k)⁻¹, (d_out, d_in) → (d_out, d_in), b as in the merge.

    Computed in float64 for a float64 ``merged``, else in float32; returned in ``merged``'s dtype.
    """
    dtype = torch.promote_types(merged.dtype, torch.float32)
    (d_out, d_in), r = merged.shape, b.shape[1]
    b_wide = b.to(dtype)
    inverse = torch.linalg.inv(torch.eye(r, dtype=dtype, device=b.device) + b_wide)  # (n, r, r)
    shifted = _add_blocks(_grouped_rows(merged.to(dtype), r, axis), -b_wide, axis)  # (n, rows, r): W'_ij − B_k
    return _ungrouped_rows(shifted @ inverse, d_out, d_in, axis).to(merged.dtype)


class BatColLinear(torch.autograd.Function):
    """``F.linear(x, W + ΔW_BatCol, bias)`` that keeps no weight-sized tensor for backward.

    ``weight`` is the layer's stored weight and ``densify(weight)`` gives W (d_out, d_in) in B's dtype: a cast, or
    for a quantised layer a dequantisation. The forward forms W and the merged weight, uses and frees them; the
    backward forms them again (cost d_out·d_in·r flops, small next to the matmuls) instead of keeping them alive
    as autograd would. Only x, the stored weight (no copy), the bias and B are saved.
    With G = ∂L/∂W' (d_out, d_in): ∂L/∂B_i = Σ_j (W_ij + I)ᵀ G_ij, ∂L/∂W_ij = G_ij (I + B_i)ᵀ.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        b: torch.Tensor,
        densify: Callable[[torch.Tensor], torch.Tensor],
    ) -> Any:
        ctx.save_for_backward(x, weight, bias, b)
        ctx.densify = densify
        return F.linear(x, bat_merged_weight(densify(weight), b, axis=0), bias)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> Any:
        x, stored, bias, b = ctx.saved_tensors
        weight = ctx.densify(stored)  # (d_out, d_in)
        grad_y = grad_y.to(b.dtype)  # bfloat16 when autocast ran the forward's product
        n_out, r, _ = b.shape
        d_out, d_in = weight.shape
        grad_x = grad_w = grad_bias = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ bat_merged_weight(weight, b, axis=0)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
            g = grad_y.reshape(-1, d_out).t() @ x.reshape(-1, d_in)  # (d_out, d_in)
            g_rows = _grouped_rows(g, r, axis=0)  # (I, r·J, r): rows (a, j) of out-block i
            if ctx.needs_input_grad[3]:
                w_rows = _grouped_rows(weight, r, axis=0)
                grad_b = w_rows.transpose(1, 2) @ g_rows + g.view(n_out, r, d_in // r, r).sum(2)
            if ctx.needs_input_grad[1]:
                grad_w = torch.baddbmm(g_rows, g_rows, b.transpose(1, 2)).view(d_out, d_in)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = grad_y.reshape(-1, d_out).sum(0)
        return grad_x, grad_w, grad_bias, grad_b, None


def bat_col_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    b: torch.Tensor,
    densify: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Bat-Col adapted linear layer: (..., d_in) → (..., d_out), b (I, r, r).

    ``weight`` is W (d_out, d_in) in any floating dtype (cast to B's dtype where used), or with ``densify`` any
    stored form that ``densify`` turns into W (d_out, d_in) in B's dtype (a quantised weight, dequantised).
    """
    if densify is None:
        dtype = b.dtype
        return BatColLinear.apply(x, weight, bias, b, lambda w: w.to(dtype).contiguous())
    return BatColLinear.apply(x, weight, bias, b, densify)


def bat_row_shift(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """z = blockdiag(B_1..B_J)·x: (..., d_in), b (J, r, r) → (..., J, r), z_j = B_j x_j."""
    n_in, r, _ = b.shape
    blocks = x.reshape(-1, n_in, r).transpose(0, 1)  # (..., d_in) → (J, N, r)
    z = torch.bmm(blocks, b.transpose(1, 2))  # (J, N, r): row n is B_j x_{n,j}
    return z.transpose(0, 1).reshape(*x.shape[:-1], n_in, r)  # (J, N, r) → (..., J, r)


def bat_row_output(y_shifted: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Bat-Row's y = W(x + z) + b + tile(Σ_j z_j): y_shifted (..., d_out) = base(x + z), z (..., J, r)."""
    r = z.shape[-1]
    tiled = y_shifted.unflatten(-1, (-1, r)) + z.sum(-2, keepdim=True)  # (..., I, r) + (..., 1, r)
    return tiled.flatten(-2)
