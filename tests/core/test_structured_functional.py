"""SURM structured matrices: fast FFT forms against dense references, on odd and non-square shapes.

Outputs and gradients (w.r.t. x and every parameter) in float64, float32 and bfloat16; the dense references
are themselves checked against loop-built definitions; PEFT C3A parity for the circulant case.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import pytest
import scipy.linalg
import torch

from cases import (
    circulant_by_loops,
    general_toeplitz,
    linear_matrix,
    relative_error,
    skew_circulant_by_loops,
)
from slimtune.errors import ShapeError
from slimtune.functional import structured as S

# (d_in, d_out, b): non-square layers, odd b, several block sizes for one layer.
TILINGS = [(15, 10, 5), (12, 18, 1), (12, 18, 2), (12, 18, 3), (12, 18, 6), (14, 21, 7), (18, 9, 9)]

# name → (fast form, dense ΔW, parameter shapes from (p, q, b))
STRUCTURES: dict[str, tuple[Callable, Callable, Callable]] = {
    "circulant": (S.circulant_apply, S.dense_delta_circulant, lambda p, q, b: [(p, q, b)]),
    "skew_circulant": (S.skew_circulant_apply, S.dense_delta_skew_circulant, lambda p, q, b: [(p, q, b)]),
    "toeplitz": (S.toeplitz_apply, S.dense_delta_toeplitz, lambda p, q, b: [(p, q, 2 * b - 1)]),
    "symmetric_toeplitz": (
        partial(S.toeplitz_apply, symmetric=True),
        partial(S.dense_delta_toeplitz, symmetric=True),
        lambda p, q, b: [(p, q, b)],
    ),
    "toeplitz_product": (
        S.toeplitz_product_apply,
        S.dense_delta_toeplitz_product,
        lambda p, q, b: [(p, q, 2 * b - 1)] * 2,
    ),
    "symmetric_toeplitz_product": (
        partial(S.toeplitz_product_apply, symmetric=True),
        partial(S.dense_delta_toeplitz_product, symmetric=True),
        lambda p, q, b: [(p, q, b)] * 2,
    ),
    **{f"ldr_k{k}": (S.ldr_apply, S.dense_delta_ldr, lambda p, q, b, k=k: [(p, q, k, b)] * 2) for k in (1, 2, 3)},
}

# dtype → (relative tolerance, dtype of the reference)
PRECISION = {
    torch.float64: (1e-12, torch.float64),
    torch.float32: (1e-5, torch.float32),
    torch.bfloat16: (1e-2, torch.float32),
}


def random(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def outputs_and_grads(
    fn: Callable, x: torch.Tensor, params: list[torch.Tensor], upstream: torch.Tensor
) -> list[torch.Tensor]:
    """[y, ∂x, ∂params...] for the loss Σ y·upstream."""
    leaves = [t.detach().requires_grad_() for t in (x, *params)]
    y = fn(*leaves)
    return [y, *torch.autograd.grad((y.to(upstream.dtype) * upstream).sum(), leaves)]


def assert_fast_matches_dense(
    fast: Callable, dense: Callable, x: torch.Tensor, params: list[torch.Tensor], dtype: torch.dtype
) -> None:
    """Fast form in `dtype` against x @ dense(params)ᵀ in the reference dtype, on the same (rounded) values."""
    tol, ref_dtype = PRECISION[dtype]
    x, params = x.to(dtype), [t.to(dtype) for t in params]
    upstream = random(*x.shape[:-1], dense(*params).shape[0], seed=99, dtype=ref_dtype)
    got = outputs_and_grads(fast, x, params, upstream)
    expected = outputs_and_grads(
        lambda x_, *ps: x_ @ dense(*ps).t(), x.to(ref_dtype), [t.to(ref_dtype) for t in params], upstream
    )
    assert got[0].dtype == dtype
    for name, g, e in zip(["y", "x", *(f"param{i}" for i in range(len(params)))], got, expected):
        assert g.shape == e.shape, name
        assert relative_error(g, e) < tol, (name, relative_error(g, e))


@pytest.mark.parametrize("dtype", list(PRECISION), ids=str)
@pytest.mark.parametrize(("d_in", "d_out", "b"), TILINGS)
@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_fast_form_matches_dense_reference(structure, d_in, d_out, b, dtype):
    fast, dense, shapes = STRUCTURES[structure]
    p, q = S.check_block_size(b, d_in, d_out)
    params = [random(*shape, seed=i + 1) for i, shape in enumerate(shapes(p, q, b))]
    x = random(2, 3, d_in, seed=0)
    assert dense(*params).shape == (d_out, d_in)
    assert_fast_matches_dense(fast, dense, x, params, dtype)


KRONECKER_FACTORS = [  # (d_in, d_out, B shape, A shape)
    (15, 10, (2, 5), (5, 3)),  # SURM shapes, r = 5
    (12, 18, (3, 6), (6, 2)),  # SURM shapes, r = 6
    (12, 18, (18, 1), (1, 12)),  # SURM shapes, r = 1
    (12, 18, (6, 3), (3, 4)),  # general a_out = 3, a_in = 4
    (14, 21, (7, 7), (3, 2)),  # general, non-square A
]


@pytest.mark.parametrize("dtype", list(PRECISION), ids=str)
@pytest.mark.parametrize(("d_in", "d_out", "b_shape", "a_shape"), KRONECKER_FACTORS)
def test_kronecker_matches_dense_reference(d_in, d_out, b_shape, a_shape, dtype):
    b_factor, a_factor = random(*b_shape, seed=1), random(*a_shape, seed=2)
    dense = S.dense_delta_kronecker(b_factor, a_factor)
    assert dense.shape == (d_out, d_in)
    assert torch.equal(dense, torch.kron(b_factor, a_factor))
    x = random(2, 3, d_in, seed=0)
    assert_fast_matches_dense(S.kronecker_apply, S.dense_delta_kronecker, x, [b_factor, a_factor], dtype)


def test_float32_parameters_with_bfloat16_input():
    """C3A's set-up: float32 kernel, bfloat16 activations. Output in bfloat16, gradients in their leaves' dtypes."""
    x = random(2, 3, 12, seed=0, dtype=torch.bfloat16).requires_grad_()
    c = random(3, 2, 6, seed=1, dtype=torch.float32).requires_grad_()
    y = S.circulant_apply(x, c)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16 and c.grad.dtype == torch.float32
    expected = x.float() @ S.dense_delta_circulant(c).t()
    assert relative_error(y, expected) < 1e-2


@pytest.mark.parametrize("b", [1, 4, 5, 7])
def test_dense_blocks_match_loop_definitions(b):
    """The gather-built dense forms, and the test references of ``cases.py``, against entry-by-entry loops over
    the definitions in the module docstring."""
    c, t, ts = random(b, seed=0), random(2 * b - 1, seed=1), random(b, seed=2)
    circ, skew, toep, sym = (torch.zeros(b, b, dtype=torch.float64) for _ in range(4))
    for r in range(b):
        for s in range(b):
            circ[r, s] = c[(r - s) % b]
            skew[r, s] = c[r - s] if r >= s else -c[r - s + b]
            toep[r, s] = t[r - s + b - 1]
            sym[r, s] = ts[abs(r - s)]
    one = (1, 1, -1)  # a 1×1 grid: ΔW is the single block
    assert torch.equal(S.dense_delta_circulant(c.view(one)), circ)
    assert torch.equal(S.dense_delta_skew_circulant(c.view(one)), skew)
    assert torch.equal(S.dense_delta_toeplitz(t.view(one)), toep)
    assert torch.equal(S.dense_delta_toeplitz(ts.view(one), symmetric=True), sym)
    transposed = t.flip(0).view(one)  # T(reversed t) = T(t)ᵀ
    torch.testing.assert_close(S.dense_delta_toeplitz_product(t.view(one), transposed), toep @ toep.t())
    torch.testing.assert_close(S.dense_delta_ldr(c.view(1, 1, 1, b), c.view(1, 1, 1, b)), circ @ skew)
    references = {
        "circulant": (linear_matrix(c, scipy.linalg.circulant), circ),
        "circulant_by_loops": (linear_matrix(c, circulant_by_loops), circ),
        "skew_circulant_by_loops": (linear_matrix(c, skew_circulant_by_loops), skew),
        "general_toeplitz": (linear_matrix(t, general_toeplitz), toep),
        "symmetric_toeplitz": (linear_matrix(ts, scipy.linalg.toeplitz), sym),
    }
    for name, (reference, definition) in references.items():
        assert torch.equal(reference, definition), name


def test_blocks_to_dense_places_block_ij_at_row_i_col_j():
    blocks = random(3, 2, 4, 4, seed=0)
    dense = S.blocks_to_dense(blocks)
    for i in range(3):
        for j in range(2):
            assert torch.equal(dense[i * 4 : (i + 1) * 4, j * 4 : (j + 1) * 4], blocks[i, j])


@pytest.mark.parametrize("b", [1, 2, 5, 8, 9])
def test_skew_twiddle_is_a_root_of_minus_one(b):
    eta = S.skew_twiddle(b)
    assert eta.shape == (b,) and eta.dtype == torch.complex128
    root = torch.exp(torch.tensor(1j * math.pi / b, dtype=torch.complex128))
    torch.testing.assert_close(eta, root ** torch.arange(b))
    torch.testing.assert_close(root**b, torch.tensor(-1.0 + 0j, dtype=torch.complex128))


def test_toeplitz_embedding_holds_the_matrix_in_its_top_left_block():
    b = 5
    for t, symmetric in [(random(2 * b - 1, seed=0), False), (random(b, seed=1), True)]:
        v = S.toeplitz_embedding(t.view(1, 1, -1), symmetric=symmetric)
        big = S.dense_delta_circulant(v)  # 2b × 2b
        torch.testing.assert_close(big[:b, :b], S.dense_delta_toeplitz(t.view(1, 1, -1), symmetric=symmetric))


def test_circulant_of_unit_vector_is_the_cyclic_shift():
    x = random(4, 7, seed=0)
    c = torch.zeros(1, 1, 7, dtype=torch.float64)
    c[..., 1] = 1.0
    torch.testing.assert_close(S.circulant_apply(x, c), x.roll(1, dims=-1))


def test_matches_peft_c3a_delta_weight_and_forward():
    """C3A's block at [r, s] is w[(s − r) mod b] scaled by 1/d_in; slimtune's c[k] = w[(−k) mod b] / d_in."""
    peft = pytest.importorskip("peft")
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(12, 18))
    peft_model = peft.get_peft_model(model, peft.C3AConfig(block_size=6, target_modules=["proj"]))
    layer = peft_model.base_model.model.proj
    kernel = layer.c3a_kernel["default"]
    assert kernel.shape == (3, 2, 6)
    with torch.no_grad():
        kernel.copy_(random(3, 2, 6, seed=0, dtype=torch.float32))
        expected = layer.get_delta_weight("default")
        c = S.c3a_kernel_to_circulant(kernel, d_in=12)
        assert relative_error(S.dense_delta_circulant(c), expected) < 1e-5
        x = random(2, 3, 12, seed=1, dtype=torch.float32)
        delta_y = layer(x) - layer.get_base_layer()(x)
        assert relative_error(S.circulant_apply(x, c), delta_y) < 1e-5


@pytest.mark.parametrize(("d_in", "d_out", "b"), TILINGS)
def test_parameter_counts(d_in, d_out, b):
    p, q = S.check_block_size(b, d_in, d_out)
    blocks = p * q
    assert blocks * b * b == d_in * d_out
    counts = {name: sum(math.prod(s) for s in shapes(p, q, b)) for name, (_, _, shapes) in STRUCTURES.items()}
    assert counts["circulant"] == b * blocks == d_in * d_out // b
    assert 2 * counts["circulant"] == 2 * b * blocks  # the layer's c_B ⊙ c_A
    assert counts["toeplitz"] == (2 * b - 1) * blocks
    assert counts["symmetric_toeplitz_product"] == 2 * b * blocks
    for k in (1, 2, 3):
        assert counts[f"ldr_k{k}"] == 2 * b * k * blocks
    b_shape, a_shape = S.kronecker_factor_shapes(d_in, d_out, b)
    assert math.prod(b_shape) + math.prod(a_shape) == d_in + d_out
    assert S.dense_delta_kronecker(torch.zeros(b_shape), torch.zeros(a_shape)).shape == (d_out, d_in)


def test_block_size_default_and_validation():
    assert S.default_block_size(12, 18) == 6 and S.default_block_size(15, 10) == 5
    assert S.check_block_size(3, 12, 18) == (6, 4)
    for bad in (4, 0, -5):
        with pytest.raises(ShapeError, match=rf"block_size={bad}.*d_in=15.*d_out=10.*allowed: 1, 5$"):
            S.check_block_size(bad, 15, 10)
    with pytest.raises(ShapeError, match=r"allowed: 1, 2, 3, 4, 5, 6, 8, 10, …"):
        S.check_block_size(7, 120, 240)
    with pytest.raises(ShapeError, match=r"r=4 .*d_in=12 and d_out=18; allowed: 1, 2, 3, 6"):
        S.kronecker_factor_shapes(12, 18, 4)


def test_shape_errors_name_the_argument():
    x = random(2, 12, seed=0)
    with pytest.raises(ShapeError, match=r"x.shape\[-1\]=12 must equal 2·5 = 10, .* c of shape \(3, 2, 5\)"):
        S.circulant_apply(x, random(3, 2, 5, seed=1))
    with pytest.raises(ShapeError, match=r"c must have 3 dims"):
        S.circulant_apply(x, random(2, 6, seed=1))
    with pytest.raises(ShapeError, match=r"t.shape\[-1\] = 2b − 1 \(odd\); got t.shape=\(3, 2, 6\)"):
        S.toeplitz_apply(x, random(3, 2, 6, seed=1))
    with pytest.raises(ShapeError, match=r"u and w must have the same 3-dim shape"):
        S.toeplitz_product_apply(x, random(3, 2, 11, seed=1), random(3, 2, 6, seed=2))
    with pytest.raises(ShapeError, match=r"c and h must have the same 4-dim shape"):
        S.ldr_apply(x, random(3, 2, 2, 6, seed=1), random(3, 2, 1, 6, seed=2))
