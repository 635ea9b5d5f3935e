"""Bit-packing: exact round trips, the documented byte layout, and ONNX Runtime's MatMulNBits reading it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compression.primitives.pack import pack_codes, packed_width, unpack_codes
from compression.primitives.quant import code_range


def random_codes(shape: tuple[int, ...], bits: int, seed: int = 0) -> torch.Tensor:
    lo, hi = code_range(bits)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, shape, generator=generator, dtype=torch.int16).to(torch.int8)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("cols", [1, 3, 5, 7, 8, 13, 64, 100, 257])
def test_round_trip_is_exact(bits: int, cols: int) -> None:
    codes = random_codes((6, cols), bits, seed=cols)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    codes_per_unit = {2: 4, 3: 8, 4: 2, 8: 1}[bits]  # the fewest codes that fill whole bytes
    assert packed.shape == (6, packed_width(cols, bits)) == (6, -(-cols // codes_per_unit) * codes_per_unit * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, cols), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_round_trip_with_block_padding_and_leading_dims(bits: int) -> None:
    codes = random_codes((2, 3, 200), bits)
    packed = pack_codes(codes, bits, pad_to=64)
    assert packed.shape == (2, 3, 256 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, 200), codes)
    padding = unpack_codes(packed, bits, 256)[..., 200:]
    assert torch.equal(padding, torch.zeros_like(padding))  # pads with code 0 (dequantizes to Z)


def test_byte_layout_is_low_bits_first() -> None:
    two_bit = pack_codes(torch.tensor([[-2, -1, 0, 1]], dtype=torch.int8), 2)
    assert two_bit.tolist() == [[0 | 1 << 2 | 2 << 4 | 3 << 6]]
    four_bit = pack_codes(torch.tensor([[-8, 7, 0]], dtype=torch.int8), 4)
    assert four_bit.tolist() == [[0 | 15 << 4, 8 | 8 << 4]]  # the pad code 0 is stored as unsigned 8
    eight_bit = pack_codes(torch.tensor([[-128, 127, -1]], dtype=torch.int8), 8)
    assert eight_bit.tolist() == [[0, 255, 127]]


def test_three_bit_is_a_little_endian_bit_stream() -> None:
    codes = random_codes((1, 16), 3, seed=3)
    unsigned = (codes.to(torch.int64) + 4).flatten().tolist()
    stream = sum(value << (3 * index) for index, value in enumerate(unsigned))
    expected = [(stream >> (8 * byte)) & 0xFF for byte in range(6)]
    assert pack_codes(codes, 3).flatten().tolist() == expected


def test_rejects_out_of_range_codes_and_bad_arguments() -> None:
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([[2]], dtype=torch.int8), 2)
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([[-5]], dtype=torch.int8), 3)
    with pytest.raises(ValueError):
        pack_codes(torch.zeros(1, 4, dtype=torch.int8), 5)
    with pytest.raises(ValueError):
        pack_codes(torch.zeros(1, 4, dtype=torch.int8), 2, pad_to=3)
    with pytest.raises(TypeError):
        unpack_codes(torch.zeros(1, 4, dtype=torch.int32), 2, 4)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_onnxruntime_matmulnbits_reads_the_layout(bits: int) -> None:
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    rows, cols, block = 8, 200, 32
    codes = random_codes((rows, cols), bits)
    scales = torch.rand(rows, -(-cols // block), generator=torch.Generator().manual_seed(1)) + 0.5
    packed = pack_codes(codes, bits, pad_to=block).reshape(rows, -1, block * bits // 8)
    node = helper.make_node(
        "MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft", K=cols, N=rows, bits=bits, block_size=block
    )
    graph = helper.make_graph(
        [node],
        "matmulnbits",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, cols])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, rows])],
        initializer=[
            numpy_helper.from_array(packed.numpy(), "B"),
            numpy_helper.from_array(scales.numpy().reshape(-1), "scales"),
        ],
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    inputs = np.random.default_rng(0).standard_normal((3, cols)).astype(np.float32)
    weight = codes.float() * scales.repeat_interleave(block, dim=1)[:, :cols]
    expected = inputs @ weight.numpy().T
    np.testing.assert_allclose(session.run(None, {"A": inputs})[0], expected, rtol=1e-4, atol=1e-3)
