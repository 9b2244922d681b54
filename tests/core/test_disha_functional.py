"""DiSHA's fast forms against their slow references, on odd shapes, in float64/float32/bfloat16."""

from __future__ import annotations

import pytest
import torch

from cases import relative_error
from slimtune.functional import disha as F_disha

SHAPES = [(6, 18, 3), (30, 42, 6), (20, 15, 5), (9, 27, 9)]  # (d_in, d_out, r): r divides both


def random(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize(("d_in", "r"), [(30, 4), (30, 7), (13, 13), (13, 1), (17, 5)])
def test_bone_delta_and_shard_sum_match_the_definition(d_in, r):
    m = random(r, 11, seed=0)
    x = random(3, 4, d_in, seed=1)
    dense = F_disha.bone_delta_reference(m, d_in)
    assert torch.equal(F_disha.bone_delta_weight(m, d_in), dense)
    torch.testing.assert_close(F_disha.bone_delta(x, m), x @ dense.t())


def test_mini_matches_the_definition():
    m = random(5, 3, seed=0)
    x = random(2, 7, 17, seed=1)
    dense = F_disha.mini_delta_reference(m, 17, 12)
    torch.testing.assert_close(F_disha.mini_delta(x, m, 12), x @ dense.t())
    torch.testing.assert_close(F_disha.bone_delta_weight(F_disha.mini_full_block(m, 12), 17), dense)


@pytest.mark.parametrize(("d_in", "d_out", "r"), SHAPES)
def test_bat_col_delta_matches_blocks(d_in, d_out, r):
    weight, b = random(d_out, d_in, seed=0), random(d_out // r, r, r, seed=1)
    torch.testing.assert_close(F_disha.bat_col_delta_weight(weight, b), F_disha.bat_col_delta_reference(weight, b))


@pytest.mark.parametrize(("d_in", "d_out", "r"), SHAPES)
def test_bat_row_delta_matches_blocks(d_in, d_out, r):
    weight, b = random(d_out, d_in, seed=0), random(d_in // r, r, r, seed=1)
    torch.testing.assert_close(F_disha.bat_row_delta_weight(weight, b), F_disha.bat_row_delta_reference(weight, b))


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize(("d_in", "d_out", "r"), SHAPES)
def test_bat_col_autograd_function_matches_dense_autograd(d_in, d_out, r, with_bias):
    """Outputs and gradients for x, W, bias and B, including ∂W when the base weight is trained too."""
    x = random(2, 5, d_in, seed=0).requires_grad_()
    weight = random(d_out, d_in, seed=1).requires_grad_()
    bias = random(d_out, seed=2).requires_grad_() if with_bias else None
    b = (random(d_out // r, r, r, seed=3) * 0.3).requires_grad_()
    upstream = random(2, 5, d_out, seed=4)
    leaves = [t for t in (x, weight, bias, b) if t is not None]

    y = F_disha.bat_col_linear(x, weight, bias, b)
    fast = [y, *torch.autograd.grad((y * upstream).sum(), leaves)]
    merged = weight + F_disha.bat_col_delta_reference(weight, b)
    y_ref = torch.nn.functional.linear(x, merged, bias)
    reference = [y_ref, *torch.autograd.grad((y_ref * upstream).sum(), leaves)]
    for got, expected in zip(fast, reference):
        torch.testing.assert_close(got, expected)


def test_bat_col_keeps_no_merged_weight_for_backward():
    """Saved for backward: x, the base weight itself (no copy) and B; never a second d_out×d_in tensor."""
    d_in, d_out, r = 48, 36, 12
    x = torch.randn(4, d_in, requires_grad=True)
    weight = torch.randn(d_out, d_in)
    b = torch.zeros(d_out // r, r, r, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        F_disha.bat_col_linear(x, weight, None, b).sum().backward()
    full_size = [t for t in saved if t.numel() >= d_out * d_in]
    assert len(full_size) == 1 and full_size[0].data_ptr() == weight.data_ptr()


@pytest.mark.parametrize(("d_in", "d_out", "r"), SHAPES)
def test_bat_row_factorised_forward_equals_dense(d_in, d_out, r):
    x = random(3, d_in, seed=0, dtype=torch.float32)
    weight, bias = random(d_out, d_in, seed=1, dtype=torch.float32), random(d_out, seed=2, dtype=torch.float32)
    b = random(d_in // r, r, r, seed=3, dtype=torch.float32) * 0.3
    z = F_disha.bat_row_shift(x, b)
    y = F_disha.bat_row_output(torch.nn.functional.linear(x + z.flatten(-2), weight, bias), z)
    dense = torch.nn.functional.linear(x, weight + F_disha.bat_row_delta_reference(weight, b), bias)
    assert relative_error(y, dense) < 1e-5


@pytest.mark.parametrize("variant", ["col", "row"])
@pytest.mark.parametrize(("d_in", "d_out", "r"), SHAPES)
def test_bat_unmerge_inverts_merge_in_float32(d_in, d_out, r, variant):
    weight = random(d_out, d_in, seed=0, dtype=torch.float32)
    n_blocks = d_out // r if variant == "col" else d_in // r
    b = random(n_blocks, r, r, seed=1, dtype=torch.float32) * 0.2
    delta = F_disha.bat_col_delta_weight if variant == "col" else F_disha.bat_row_delta_weight
    unmerge = F_disha.bat_col_unmerged_weight if variant == "col" else F_disha.bat_row_unmerged_weight
    restored = unmerge(weight + delta(weight, b), b)
    assert relative_error(restored, weight) < 1e-5


def test_bat_col_bfloat16_close_to_float32():
    d_in, d_out, r = 60, 42, 6
    x, weight = random(8, d_in, seed=0, dtype=torch.float32), random(d_out, d_in, seed=1, dtype=torch.float32)
    b = random(d_out // r, r, r, seed=2, dtype=torch.float32) * 0.1
    y32 = F_disha.bat_col_linear(x, weight, None, b)
    y16 = F_disha.bat_col_linear(x.bfloat16(), weight.bfloat16(), None, b.bfloat16())
    assert y16.dtype == torch.bfloat16 and relative_error(y16, y32) < 2e-2
