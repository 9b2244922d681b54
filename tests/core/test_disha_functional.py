"""DiSHA's fast forms against the slow loop references of ``cases.py``, on odd shapes, in float64/float32/bfloat16."""

from __future__ import annotations

import pytest
import torch

from cases import bat_delta_reference, bone_delta_reference, mini_delta_reference, relative_error
from slimtune.functional import disha as F_disha

AXES = {"bat_col": 0, "bat_row": 1}  # Bat-Col: one B per output block (W's dim 0); Bat-Row: per input block

SHAPES = [(6, 18, 3), (30, 42, 6), (20, 15, 5), (9, 27, 9)]  # (d_in, d_out, r): r divides both


def random(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize(("d_in", "r"), [(30, 4), (30, 7), (13, 13), (13, 1), (17, 5)])
def test_bone_delta_and_shard_sum_match_the_definition(d_in, r):
    m = random(r, 11, seed=0)
    x = random(3, 4, d_in, seed=1)
    dense = bone_delta_reference(m, d_in)
    assert torch.equal(F_disha.bone_delta_weight(m, d_in), dense)
    torch.testing.assert_close(F_disha.bone_delta(x, m), x @ dense.t())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize(("d_in", "d_out", "r"), [(30, 42, 4), (30, 18, 7), (13, 11, 13), (17, 9, 5), (42, 30, 6)])
def test_fused_bone_linear_matches_the_dense_layer(d_in, d_out, r, with_bias, dtype):
    """Outputs and gradients for x, W, bias and M (W trained too), r dividing d_in or not (padded last shard)."""
    x = random(2, 5, d_in, seed=0, dtype=dtype).requires_grad_()
    weight = random(d_out, d_in, seed=1, dtype=dtype).requires_grad_()
    bias = random(d_out, seed=2, dtype=dtype).requires_grad_() if with_bias else None
    m = (random(r, d_out, seed=3, dtype=dtype) * 0.3).requires_grad_()
    upstream = random(2, 5, d_out, seed=4, dtype=dtype)
    leaves = [t for t in (x, weight, bias, m) if t is not None]

    y = F_disha.bone_linear(x, weight, bias, m)
    fast = [y, *torch.autograd.grad((y * upstream).sum(), leaves)]
    wide = [t.detach().double().requires_grad_() for t in leaves]  # the reference in float64
    x64, w64, m64 = wide[0], wide[1], wide[-1]
    b64 = wide[2] if with_bias else None
    y_ref = torch.nn.functional.linear(x64, w64 + bone_delta_reference(m64, d_in), b64)
    reference = [y_ref, *torch.autograd.grad((y_ref * upstream.double()).sum(), wide)]
    bound = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2e-2}[dtype]
    for got, expected in zip(fast, reference):
        assert got.dtype == dtype and relative_error(got.double(), expected) < bound


def test_fused_bone_linear_keeps_no_input_when_the_base_weight_is_frozen():
    x = random(4, 30, seed=0, dtype=torch.float32).requires_grad_()
    weight, m = random(18, 30, seed=1, dtype=torch.float32), random(6, 18, seed=2, dtype=torch.float32)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        F_disha.bone_linear(x, weight, None, m.requires_grad_())
    assert all(t.shape != x.shape for t in saved)  # the shard sums (4, 6), W and M only


def test_mini_matches_the_definition():
    m = random(5, 3, seed=0)
    x = random(2, 7, 17, seed=1)
    dense = mini_delta_reference(m, 17, 12)
    torch.testing.assert_close(F_disha.mini_delta(x, m, 12), x @ dense.t())
    torch.testing.assert_close(F_disha.bone_delta_weight(F_disha.mini_full_block(m, 12), 17), dense)


@pytest.mark.parametrize("variant", list(AXES))
@pytest.mark.parametrize(("d_in", "d_out", "r"), SHAPES)
def test_bat_delta_matches_blocks(d_in, d_out, r, variant):
    axis = AXES[variant]
    weight, b = random(d_out, d_in, seed=0), random((d_out, d_in)[axis] // r, r, r, seed=1)
    torch.testing.assert_close(F_disha.bat_delta_weight(weight, b, axis), bat_delta_reference(weight, b, variant))


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
    merged = weight + bat_delta_reference(weight, b, "bat_col")
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
    dense = torch.nn.functional.linear(x, weight + bat_delta_reference(weight, b, "bat_row"), bias)
    assert relative_error(y, dense) < 1e-5


PRECISION = [(torch.float64, 1e-13), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)]  # (dtype, relative tolerance)


@pytest.mark.parametrize(("dtype", "tolerance"), PRECISION)
@pytest.mark.parametrize("variant", list(AXES))
@pytest.mark.parametrize(("d_in", "d_out", "r"), SHAPES)
def test_bat_unmerge_inverts_merge(d_in, d_out, r, variant, dtype, tolerance):
    """float64 stays float64 (no round trip through float32); lower precisions are inverted in float32."""
    axis = AXES[variant]
    weight = random(d_out, d_in, seed=0).to(dtype)
    b = (random((d_out, d_in)[axis] // r, r, r, seed=1) * 0.2).to(dtype)
    merged = F_disha.bat_merged_weight(weight, b, axis)
    restored = F_disha.bat_unmerged_weight(merged, b, axis)
    assert restored.dtype == dtype
    assert relative_error(restored, weight) < tolerance


def test_bat_col_bfloat16_close_to_float32():
    d_in, d_out, r = 60, 42, 6
    x, weight = random(8, d_in, seed=0, dtype=torch.float32), random(d_out, d_in, seed=1, dtype=torch.float32)
    b = random(d_out // r, r, r, seed=2, dtype=torch.float32) * 0.1
    y32 = F_disha.bat_col_linear(x, weight, None, b)
    y16 = F_disha.bat_col_linear(x.bfloat16(), weight.bfloat16(), None, b.bfloat16())
    assert y16.dtype == torch.bfloat16 and relative_error(y16, y32) < 2e-2
