"""DiSHA math (Bone, mini, Bat-Col, Bat-Row): slow references beside the fast forms.

Notation: base weight W of shape (d_out, d_in) (``nn.Linear.weight``), shard size r. For Bat, W is cut into
r×r blocks W_ij, i the output block (I = d_out/r of them), j the input block (J = d_in/r of them).

- Bone: M (r, d_out); ΔW[o, i] = M[i mod r, o].
- mini: m (r, mini_r); ΔW[o, i] = m[i mod r, o mod mini_r].
- Bat-Col: B (I, r, r); ΔW_ij = W_ij·B_i + B_i.
- Bat-Row: B (J, r, r); ΔW_ij = W_ij·B_j + B_j.

References (``*_reference``) loop over indices or blocks and are meant for tests; the fast forms never form
more than they need.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bone_delta_reference(m: torch.Tensor, d_in: int) -> torch.Tensor:
    """Bone ΔW by its definition ΔW[o, i] = M[i mod r, o]. m: (r, d_out) → (d_out, d_in)."""
    r, d_out = m.shape
    delta = m.new_zeros(d_out, d_in)
    for i in range(d_in):
        delta[:, i] = m[i % r]
    return delta


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


def mini_full_block(m: torch.Tensor, d_out: int) -> torch.Tensor:
    """mini's small block tiled along the outputs: m (r, mini_r) → (r, d_out)."""
    return m.repeat(1, d_out // m.shape[1])


def mini_delta_reference(m: torch.Tensor, d_in: int, d_out: int) -> torch.Tensor:
    """mini ΔW by its definition ΔW[o, i] = m[i mod r, o mod mini_r]. m: (r, mini_r) → (d_out, d_in)."""
    r, mini_r = m.shape
    delta = m.new_zeros(d_out, d_in)
    for o in range(d_out):
        for i in range(d_in):
            delta[o, i] = m[i % r, o % mini_r]
    return delta


def mini_delta(x: torch.Tensor, m: torch.Tensor, d_out: int) -> torch.Tensor:
    """mini's ``x @ ΔWᵀ``: (..., d_in), m (r, mini_r) → (..., d_out), through the (..., mini_r) product."""
    y = shard_sum(x, m.shape[0]) @ m  # (..., mini_r)
    return y.repeat(*([1] * (y.dim() - 1)), d_out // m.shape[1])  # (..., mini_r) → (..., d_out)


def bat_col_delta_reference(weight: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Bat-Col ΔW block by block: ΔW_ij = W_ij·B_i + B_i. weight (d_out, d_in), b (I, r, r) → (d_out, d_in)."""
    n_out, r, _ = b.shape
    n_in = weight.shape[1] // r
    delta = torch.zeros_like(weight)
    for i in range(n_out):
        for j in range(n_in):
            block = weight[i * r : (i + 1) * r, j * r : (j + 1) * r]
            delta[i * r : (i + 1) * r, j * r : (j + 1) * r] = block @ b[i] + b[i]
    return delta


def bat_col_delta_weight(weight: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Bat-Col ΔW_ij = W_ij·B_i + B_i with one batched matmul. weight (d_out, d_in), b (I, r, r) → (d_out, d_in).

    Row (a, j) of ``weight.view(I, r·J, r)[i]`` is row a of block W_ij, so one right-multiplication by B_i
    transforms every block of out-block i at once.
    """
    n_out, r, _ = b.shape
    d_out, d_in = weight.shape
    w = weight.reshape(n_out, d_in, r)  # (d_out, d_in) → (I, r·J, r)
    delta = torch.bmm(w, b).view(n_out, r, d_in // r, r) + b.unsqueeze(2)  # (I, r, J, r) + B_i for every j
    return delta.view(d_out, d_in)


def bat_col_merged_weight(weight: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Bat-Col W' = W + ΔW. weight (d_out, d_in), b (I, r, r) → (d_out, d_in)."""
    return weight + bat_col_delta_weight(weight, b)


def bat_col_unmerged_weight(merged: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Inverse of Bat-Col's merge: W_ij = (W'_ij − B_i)(I + B_i)⁻¹, in float32. (d_out, d_in) → (d_out, d_in)."""
    n_out, r, _ = b.shape
    d_out, d_in = merged.shape
    b32 = b.float()
    eye = torch.eye(r, dtype=torch.float32, device=b.device)
    inverse = torch.linalg.inv(eye + b32)  # (I, r, r)
    shifted = merged.float().reshape(n_out, r, d_in // r, r) - b32.unsqueeze(2)  # (I, r, J, r)
    base = shifted.reshape(n_out, d_in, r) @ inverse  # rows (a, j) of out-block i, times (I + B_i)⁻¹
    return base.reshape(d_out, d_in).to(merged.dtype)


class BatColLinear(torch.autograd.Function):
    """``F.linear(x, W + ΔW_BatCol, bias)`` that saves only x and B for backward.

    The merged weight (d_out × d_in) is formed in the forward, used, and freed; the backward forms it again
    (cost d_out·d_in·r flops, small next to the matmuls) instead of keeping it alive as autograd would.
    With G = ∂L/∂W' (d_out, d_in): ∂L/∂B_i = Σ_j (W_ij + I)ᵀ G_ij, ∂L/∂W_ij = G_ij (I + B_i)ᵀ.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, b):  # noqa: ANN001, ANN205 (autograd signature)
        ctx.save_for_backward(x, weight, bias, b)
        return F.linear(x, bat_col_merged_weight(weight, b), bias)

    @staticmethod
    def backward(ctx, grad_y):  # noqa: ANN001, ANN205
        x, weight, bias, b = ctx.saved_tensors
        n_out, r, _ = b.shape
        d_out, d_in = weight.shape
        grad_x = grad_w = grad_bias = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ bat_col_merged_weight(weight, b)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
            g = grad_y.reshape(-1, d_out).t() @ x.reshape(-1, d_in)  # (d_out, d_in)
            g_rows = g.view(n_out, d_in, r)  # rows (a, j) of out-block i
            if ctx.needs_input_grad[3]:
                w_rows = weight.reshape(n_out, d_in, r)
                grad_b = w_rows.transpose(1, 2) @ g_rows + g.view(n_out, r, d_in // r, r).sum(2)
            if ctx.needs_input_grad[1]:
                grad_w = torch.baddbmm(g_rows, g_rows, b.transpose(1, 2)).view(d_out, d_in)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = grad_y.reshape(-1, d_out).sum(0)
        return grad_x, grad_w, grad_bias, grad_b


def bat_col_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, b: torch.Tensor
) -> torch.Tensor:
    """Bat-Col adapted linear layer: (..., d_in) → (..., d_out), weight (d_out, d_in), b (I, r, r)."""
    return BatColLinear.apply(x, weight.contiguous(), bias, b)


def bat_row_delta_reference(weight: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Bat-Row ΔW block by block: ΔW_ij = W_ij·B_j + B_j. weight (d_out, d_in), b (J, r, r) → (d_out, d_in)."""
    n_in, r, _ = b.shape
    n_out = weight.shape[0] // r
    delta = torch.zeros_like(weight)
    for i in range(n_out):
        for j in range(n_in):
            block = weight[i * r : (i + 1) * r, j * r : (j + 1) * r]
            delta[i * r : (i + 1) * r, j * r : (j + 1) * r] = block @ b[j] + b[j]
    return delta


def bat_row_delta_weight(weight: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Bat-Row ΔW_ij = W_ij·B_j + B_j. weight (d_out, d_in), b (J, r, r) → (d_out, d_in)."""
    n_in, r, _ = b.shape
    d_out, d_in = weight.shape
    cols = weight.reshape(d_out, n_in, r).transpose(0, 1)  # (J, d_out, r): the columns of in-block j
    delta = torch.bmm(cols, b).transpose(0, 1)  # (d_out, J, r)
    delta = delta.reshape(d_out // r, r, n_in, r) + b.transpose(0, 1)  # (I, r, J, r) + B_j[a, c]
    return delta.reshape(d_out, d_in)


def bat_row_unmerged_weight(merged: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Inverse of Bat-Row's merge: W_ij = (W'_ij − B_j)(I + B_j)⁻¹, in float32."""
    n_in, r, _ = b.shape
    d_out, d_in = merged.shape
    b32 = b.float()
    inverse = torch.linalg.inv(torch.eye(r, dtype=torch.float32, device=b.device) + b32)  # (J, r, r)
    shifted = merged.float().reshape(d_out // r, r, n_in, r) - b32.transpose(0, 1)  # (I, r, J, r)
    cols = shifted.reshape(d_out, n_in, r).transpose(0, 1)  # (J, d_out, r)
    return (cols @ inverse).transpose(0, 1).reshape(d_out, d_in).to(merged.dtype)


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
