"""Quantization primitives: grids, SQNR floors, Hessians, damping, the closed-form (S, Z) step, error ordering."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compression.errors import CompressionError
from compression.methods.quant_decoupleq import decoupleq_quantize, solve_scale_zero
from compression.methods.quant_gptq import gptq_quantize
from compression.methods.quant_rtn import rtn_quantize
from compression.primitives.hessian import HessianAccumulator, inverse_cholesky, layer_loss, unfold_conv_input
from compression.primitives.quant import (
    code_range,
    dequantize,
    expand_groups,
    minmax_params,
    quantize,
    row_errors,
    sqnr_db,
)
from compression.types import QuantizedLayer


def gaussian(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def correlated_hessian(cols: int, seed: int = 0) -> torch.Tensor:
    """A full-rank, correlated, unevenly scaled Hessian like real layer inputs give."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=generator) / cols**0.5 + torch.eye(cols)
    samples = torch.randn(4 * cols, cols, generator=generator) @ mixing * torch.linspace(0.2, 3.0, cols)
    return (samples.T.double() @ samples.double()) / samples.shape[0]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_codes_in_range_and_dequantize_matches_quantized_layer(
    bits: int, group_size: int | None, symmetric: bool
) -> None:
    weight = gaussian(8, 40)  # 40 columns: the last group of 16 is short
    codes, scales, zeros = rtn_quantize(weight, bits, group_size, symmetric)
    lo, hi = code_range(bits)
    assert codes.dtype == torch.int8 and int(codes.min()) >= lo and int(codes.max()) <= hi
    assert scales.shape == zeros.shape == (8, 1 if group_size is None else 3)
    if symmetric:
        assert torch.equal(zeros, torch.zeros_like(zeros))
    layer = QuantizedLayer("w", "linear", bits, group_size, codes, scales, zeros, (8, 40))
    assert torch.equal(layer.dequantize(), dequantize(codes, scales, zeros, group_size))
    # Nearest rounding: every weight is within half a step of its grid point unless clipped.
    step = expand_groups(scales, 40, group_size)
    error = (dequantize(codes, scales, zeros, group_size) - weight).abs()
    clipped = (codes == lo) | (codes == hi)
    assert bool((error[~clipped] <= step[~clipped] / 2 + 1e-6).all())


def test_asymmetric_grid_spans_each_group_exactly() -> None:
    weight = gaussian(4, 32) + 3.0  # a shifted range: min/max map to the end codes
    scales, zeros = minmax_params(weight, 4, 16, "float")
    lo, hi = code_range(4)
    grouped = weight.view(4, 2, 16)
    torch.testing.assert_close(lo * scales + zeros, grouped.amin(-1))
    torch.testing.assert_close(hi * scales + zeros, grouped.amax(-1))


@pytest.mark.parametrize(
    ("bits", "group_size", "floor_db"),
    # Measured on N(0, 1) 256x512 (seed 0): 4-bit 19.3 / 20.8 dB, 8-bit 43.6 / 45.0 dB; floors ~1 dB below.
    [(4, None, 18.5), (4, 64, 20.0), (8, None, 42.5), (8, 64, 44.0)],
)
def test_rtn_sqnr_floors(bits: int, group_size: int | None, floor_db: float) -> None:
    weight = gaussian(256, 512)
    codes, scales, zeros = rtn_quantize(weight, bits, group_size)
    assert sqnr_db(weight, dequantize(codes, scales, zeros, group_size)) >= floor_db


@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_scale_zero_step_equals_the_normal_equations(group_size: int | None, symmetric: bool) -> None:
    rows, cols = 5, 40  # last group short
    weight, hessian = gaussian(rows, cols, seed=1), correlated_hessian(cols)
    codes, _, _ = rtn_quantize(weight, 3, group_size)
    scales, zeros = solve_scale_zero(weight, codes, hessian, group_size, symmetric)
    group = group_size or cols
    for row in range(rows):
        basis = []  # Ŵ_row = Σ_g s_g·(codes masked to g) + z_g·(ones masked to g)
        for start in range(0, cols, group):
            mask = torch.zeros(cols, dtype=torch.float64)
            mask[start : start + group] = 1
            basis.append(codes[row].double() * mask)
        if not symmetric:
            for start in range(0, cols, group):
                mask = torch.zeros(cols, dtype=torch.float64)
                mask[start : start + group] = 1
                basis.append(mask)
        design = torch.stack(basis)
        solution = torch.linalg.solve(design @ hessian @ design.T, design @ hessian @ weight[row].double())
        groups = len(basis) // (1 if symmetric else 2)
        torch.testing.assert_close(scales[row].double(), solution[:groups], rtol=1e-6, atol=1e-9)
        if not symmetric:
            torch.testing.assert_close(zeros[row].double(), solution[groups:], rtol=1e-6, atol=1e-9)


def test_scale_zero_step_is_a_minimum() -> None:
    weight, hessian = gaussian(6, 32, seed=2), correlated_hessian(32, seed=2)
    codes, _, _ = rtn_quantize(weight, 2, 16)
    scales, zeros = solve_scale_zero(weight, codes, hessian, 16)
    best = row_errors(dequantize(codes, scales, zeros, 16) - weight, hessian)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        moved_s = scales + 1e-3 * torch.randn(scales.shape, generator=generator)
        moved_z = zeros + 1e-3 * torch.randn(zeros.shape, generator=generator)
        assert bool((row_errors(dequantize(codes, moved_s, moved_z, 16) - weight, hessian) >= best - 1e-12).all())


def test_singular_scale_zero_system_does_not_produce_nan() -> None:
    weight, hessian = gaussian(3, 32, seed=3), correlated_hessian(32)
    codes = torch.zeros(3, 32, dtype=torch.int8)  # all-zero codes: the scale is undetermined
    scales, zeros = solve_scale_zero(weight, codes, hessian, 16)
    assert bool(torch.isfinite(scales).all() and torch.isfinite(zeros).all())


def test_conv_hessian_samples_match_the_convolution() -> None:
    generator = torch.Generator().manual_seed(0)
    for conv in [
        nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
        nn.Conv2d(3, 5, (3, 2), padding="same", dilation=2, padding_mode="reflect"),
        nn.Conv2d(3, 4, 1),
    ]:
        x = torch.randn(2, conv.in_channels, 9, 8, generator=generator)
        patches = unfold_conv_input(conv, x)  # [groups, n, d]
        rows_per_group = conv.out_channels // conv.groups
        weight = conv.weight.detach().flatten(1).view(conv.groups, rows_per_group, -1)
        manual = torch.cat([patches[g] @ weight[g].T for g in range(conv.groups)], dim=1)
        expected = (conv(x) - conv.bias[:, None, None]).permute(0, 2, 3, 1).reshape(-1, conv.out_channels)
        torch.testing.assert_close(manual, expected, rtol=1e-4, atol=1e-5)


def test_hessian_drops_padding_tokens_and_rejects_nan() -> None:
    layer = nn.Linear(4, 2)
    inputs = torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    accumulator = HessianAccumulator("layer")
    accumulator.add(layer, inputs, mask)
    kept = inputs[mask.bool()].double()
    torch.testing.assert_close(accumulator.hessian()[0], kept.T @ kept / 3)
    with pytest.raises(CompressionError) as error:
        accumulator.add(layer, torch.full((1, 4), float("nan")))
    assert error.value.code == "non_finite_activations"


def test_inverse_cholesky_escalates_damping_then_fails_clearly() -> None:
    hessian = torch.diag(torch.tensor([1.0, 1.0, -0.05], dtype=torch.float64))  # needs more than 1 % damping
    upper = inverse_cholesky(hessian, 0.01)
    damped = hessian + 0.1 * hessian.diagonal().mean() * torch.eye(3, dtype=torch.float64)  # the 2nd try
    torch.testing.assert_close(upper.T @ upper, torch.linalg.inv(damped))
    with pytest.raises(CompressionError) as error:
        inverse_cholesky(-torch.eye(3, dtype=torch.float64), 0.01)
    assert error.value.code == "cholesky_failed"


def test_dead_inputs_are_handled() -> None:
    weight, hessian = gaussian(8, 16), correlated_hessian(16)
    hessian[3, :] = hessian[:, 3] = 0  # input 3 is always zero
    for quantizer in (gptq_quantize, decoupleq_quantize):
        codes, scales, zeros = quantizer(weight, hessian, 2, None)
        assert bool(torch.isfinite(dequantize(codes, scales, zeros, None)).all())


@pytest.fixture(scope="module")
def digits_hidden_layer() -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, real Hessian) of the 2nd layer of a small MLP trained on sklearn digits."""
    datasets = pytest.importorskip("sklearn.datasets")
    data = datasets.load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16
    y = torch.tensor(data.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(100):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    with torch.no_grad():
        hidden = torch.relu(model[0](x))
    return model[2].weight.detach().clone(), (hidden.T.double() @ hidden.double() / len(x))


@pytest.mark.parametrize(("bits", "group_size"), [(2, None), (2, 32), (3, None), (4, 32)])
def test_error_ordering_on_a_real_hessian(
    digits_hidden_layer: tuple[torch.Tensor, torch.Tensor], bits: int, group_size: int | None
) -> None:
    weight, hessian = digits_hidden_layer
    losses = {}
    for name, (codes, scales, zeros) in {
        "rtn": rtn_quantize(weight, bits, group_size),
        "gptq": gptq_quantize(weight, hessian, bits, group_size),
        "decoupleq": decoupleq_quantize(weight, hessian, bits, group_size),
    }.items():
        losses[name] = layer_loss(weight, dequantize(codes, scales, zeros, group_size), hessian[None])[1]
    assert losses["gptq"] <= losses["rtn"]
    # decoupleQ keeps GPTQ's own rounding as one candidate, so decoupleQ <= GPTQ holds by construction and
    # proves nothing: the alternation must be worth a clear margin (measured 0.50-0.64x of GPTQ's loss).
    assert losses["decoupleq"] <= 0.8 * losses["gptq"]


def test_gptq_variants_and_pgd_integer_step(digits_hidden_layer: tuple[torch.Tensor, torch.Tensor]) -> None:
    weight, hessian = digits_hidden_layer
    rtn = layer_loss(weight, dequantize(*rtn_quantize(weight, 3, 32), 32), hessian[None])[0]
    for act_order in (False, True):  # dynamic groups / static groups
        for block_size in (8, 128):
            codes, scales, zeros = gptq_quantize(weight, hessian, 3, 32, act_order=act_order, block_size=block_size)
            assert layer_loss(weight, dequantize(codes, scales, zeros, 32), hessian[None])[0] < rtn
    gptq = layer_loss(weight, dequantize(*gptq_quantize(weight, hessian, 2, None), None), hessian[None])[0]
    pgd = decoupleq_quantize(weight, hessian, 2, None, integer_step="pgd", pgd_steps=20)
    assert layer_loss(weight, dequantize(*pgd, None), hessian[None])[0] <= gptq


def test_quantizers_do_not_mutate_their_inputs() -> None:
    weight, hessian = gaussian(8, 32), correlated_hessian(32)
    weight_copy, hessian_copy = weight.clone(), hessian.clone()
    gptq_quantize(weight, hessian, 2, 16)
    decoupleq_quantize(weight, hessian, 2, 16)
    assert torch.equal(weight, weight_copy) and torch.equal(hessian, hessian_copy)


def test_quantize_clamps_to_the_code_range() -> None:
    weight = torch.tensor([[-100.0, 0.0, 100.0]])
    codes = quantize(weight, torch.ones(1, 1), torch.zeros(1, 1), 2, None)
    assert codes.tolist() == [[-2, 0, 1]]
