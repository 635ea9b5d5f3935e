"""The three zero-point forms in ONNX Runtime's MatMulNBits: codes -> one-node ONNX run in ORT == the dequantized
weights' torch matmul, and accuracy_level 4 engaging int8 compute only where ORT prepacks (integer or no zp)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

from compression.io.onnx_rewrite import matmul_nbits_nodes
from compression.methods.quant_rtn import rtn_quantize
from compression.types import QuantizedLayer

ort = pytest.importorskip("onnxruntime")


def _layer(n: int, k: int, bits: int, group: int | None, zero_point: str, seed: int = 0) -> QuantizedLayer:
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05 + 0.02
    codes, scales, zeros = rtn_quantize(weight, bits, group, zero_point)
    return QuantizedLayer("w", "linear", bits, group, codes, scales, zeros, (n, k))


def _run(layer: QuantizedLayer, a: np.ndarray, level: int, **options: bool) -> tuple[np.ndarray, set[int]]:
    """(ORT output, the element types of the MatMulNBits zero_points inputs: {} when there are none)."""
    graph = matmul_nbits_nodes(layer, "A", "Y", "q", accuracy_level=level, **options)
    k = layer.codes.shape[1]
    model = helper.make_model(
        helper.make_graph(
            graph.nodes, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], graph.initializers,
        ),
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)],
    )  # fmt: skip
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    points = {node.input[3] for node in graph.nodes if node.op_type == "MatMulNBits" and len(node.input) > 3}
    return session.run(None, {"A": a})[0], {i.data_type for i in graph.initializers if i.name in points}


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [None, 16, 32, 64])
@pytest.mark.parametrize("zero_point", ["integer", "none", "float"])
def test_codes_run_in_ort_exactly_as_the_dequantized_matmul(bits: int, group: int | None, zero_point: str) -> None:
    layer = _layer(40, 96 if group != 64 else 192, bits, group, zero_point)  # 96/64: an odd number of zp per row
    assert layer.zero_point_kind() == zero_point
    a = np.random.default_rng(1).standard_normal((3, layer.codes.shape[1])).astype(np.float32)
    reference = (torch.from_numpy(a).double() @ layer.dequantize().double().T).numpy()
    out, zp_types = _run(layer, a, 0)
    if bits == 2:  # below accuracy_level 4 every 2-bit form takes float zero points (ORT's faster 2-bit path)
        assert zp_types == {TensorProto.FLOAT}
        assert _run(layer, a, 4)[1] == ({TensorProto.UINT8} if zero_point == "integer" else set())
    else:  # packed uint8 zero points for integer zp, none for symmetric or a float Z (the zero-term subgraph)
        assert zp_types == ({TensorProto.UINT8} if zero_point == "integer" else set())
    assert np.abs(out - reference).max() <= 2e-6 * np.abs(reference).max()


@pytest.mark.parametrize("bits", [4, 8])
def test_accuracy_level_4_quantizes_activations_only_on_the_prepacked_forms(bits: int) -> None:
    """Integer and symmetric zero points (and the float-Z form's zero-term subgraph, whose MatMulNBits has no zp)
    take the int8-activation kernels at level 4: a ~1e-3..1e-2 relative difference from level 0. Float zero
    points are not prepacked: at 4 bits level 4 falls back to the fp32 path there (no difference)."""
    a = np.random.default_rng(2).standard_normal((4, 256)).astype(np.float32)
    for zero_point in ("integer", "none", "float"):
        layer = _layer(64, 256, bits, 32, zero_point)
        exact, fast = _run(layer, a, 0)[0], _run(layer, a, 4)[0]
        assert 1e-5 < np.abs(fast - exact).max() / np.abs(exact).max() < 5e-2, zero_point
    if bits == 4:  # ORT refuses float zero points at 8 bits
        float_zp = _layer(64, 256, bits, 32, "float")
        exact, fast = (_run(float_zp, a, level, use_float_zero_points=True)[0] for level in (0, 4))
        assert np.abs(fast - exact).max() / np.abs(exact).max() < 1e-5
