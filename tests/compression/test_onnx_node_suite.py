"""ONNX's own backend node tests through our ONNX -> torch interpreter.

The cases come from `onnx.backend.test.case.node` (the generators of the `onnx/backend/test/data/node`
models, which the onnx wheel does not ship): for every operator in the interpreter's op table, every
single-node test of that operator runs through `OnnxModule` and must either match ONNX's expected
outputs (every output, shape and dtype included) or be refused at load with an `unsupported_operator`
error naming the operator and what it lacks (an attribute value, a tensor type, an output).
Multi-node cases (ONNX's `*_expanded` function bodies) test other operators' compositions and are
not node tests of the operator.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from compression.io.errors import ModelLoadError
from compression.io.onnx_ops import SUPPORTED_OPS, tensor_from_array
from compression.io.onnx_torch import OnnxModule


def _node_cases() -> list:
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore")  # the generators divide by zero on purpose (inf / nan cases)
        from onnx.backend.test.case.node import collect_testcases

        cases = collect_testcases()
    return [
        case
        for case in cases
        if len(case.model.graph.node) == 1
        and case.model.graph.node[0].domain in ("", "ai.onnx")
        and case.model.graph.node[0].op_type in SUPPORTED_OPS
    ]


CASES = {case.name: case for case in _node_cases()}


def _array(value: np.ndarray | TensorProto) -> np.ndarray:
    return numpy_helper.to_array(value) if isinstance(value, TensorProto) else np.asarray(value)


def _assert_output_matches(got: torch.Tensor, want: np.ndarray, case) -> None:
    if want.dtype.name == "bfloat16":  # numpy has no bfloat16: compare both in float32, at bfloat16's precision
        assert got.dtype == torch.bfloat16
        np.testing.assert_allclose(got.float().numpy(), want.astype(np.float32), rtol=1e-2, atol=1e-7)
        return
    got_array = got.numpy()
    assert got_array.dtype == want.dtype and got_array.shape == want.shape
    if np.issubdtype(want.dtype, np.floating):
        rtol = 1e-3 if want.dtype != np.float16 else 2e-3  # ONNX's backend tolerance; fp16 rounds once more
        np.testing.assert_allclose(got_array, want, rtol=rtol, atol=case.atol)
    else:
        np.testing.assert_array_equal(got_array, want)


def _outcome(case) -> str:
    """'passed' or 'refused'; an assertion error when the interpreter runs the node and differs."""
    op_type = case.model.graph.node[0].op_type
    try:
        module = OnnxModule(case.model)
    except ModelLoadError as error:
        assert error.code == "unsupported_operator" and f"{op_type}: " in error.message
        return "refused"
    inputs, outputs = case.data_sets[0]
    names = [value.name for value in case.model.graph.input]
    feeds = {name: tensor_from_array(_array(value)) for name, value in zip(names, inputs, strict=True)}
    with torch.no_grad():
        got = module(**feeds)
    got = got if isinstance(got, tuple) else (got,)
    assert len(got) == len(outputs)
    for tensor, want in zip(got, outputs, strict=True):
        _assert_output_matches(tensor, _array(want), case)
    return "passed"


@pytest.mark.parametrize("name", sorted(CASES))
def test_onnx_node_case(name: str) -> None:
    assert _outcome(CASES[name]) in ("passed", "refused")


def test_coverage_every_claimed_operator_runs_its_node_tests() -> None:
    per_op: dict[str, Counter] = {op: Counter() for op in SUPPORTED_OPS}
    for case in CASES.values():
        per_op[case.model.graph.node[0].op_type][_outcome(case)] += 1
    lines = [f"{op}: {c['passed']} passed, {c['refused']} refused" for op, c in sorted(per_op.items())]
    totals = sum(per_op.values(), Counter())
    print(f"ONNX importer: {len(SUPPORTED_OPS)} operators claimed, {len(CASES)} node tests, "
          f"{totals['passed']} passed, {totals['refused']} refused\n" + "\n".join(lines))  # fmt: skip
    assert not [op for op, counts in per_op.items() if counts["passed"] == 0]


# ---- attribute forms of older opsets, against ONNX Runtime ----------------------------------------------------


def _single_node_model(node: onnx.NodeProto, opset: int, x: np.ndarray, outputs: int = 1) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node],
        "legacy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(outputs)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


_node = helper.make_node
LEGACY_NODES = {
    "softmax_opset11_default_axis_1_coerced_2d": (_node("Softmax", ["x"], ["y0"]), 11),
    "logsoftmax_opset11_axis_2": (_node("LogSoftmax", ["x"], ["y0"], axis=2), 11),
    "softmax_opset13_default_last_axis": (_node("Softmax", ["x"], ["y0"]), 13),
    "pad_opset10_attributes_reflect": (_node("Pad", ["x"], ["y0"], pads=[0, 0, 1, 2, 0, 0, 2, 1], mode="reflect"), 10),
    "pad_opset10_constant_value": (_node("Pad", ["x"], ["y0"], pads=[0, 1, 0, 1, 0, 0, 2, 0], value=1.5), 10),
    "clip_opset10_min_max_attributes": (_node("Clip", ["x"], ["y0"], min=-0.5, max=0.25), 10),
    "slice_opset9_attributes": (_node("Slice", ["x"], ["y0"], starts=[1, -3], ends=[3, 100], axes=[1, 3]), 9),
    "squeeze_opset11_axes_attribute": (_node("Squeeze", ["x"], ["y0"], axes=[0]), 11),
    "unsqueeze_opset11_axes_attribute": (_node("Unsqueeze", ["x"], ["y0"], axes=[0, 3]), 11),
    "reducemean_opset13_axes_attribute": (_node("ReduceMean", ["x"], ["y0"], axes=[1, -1], keepdims=0), 13),
    "reducesum_opset11_axes_attribute": (_node("ReduceSum", ["x"], ["y0"], axes=[2]), 11),
    "split_opset11_split_attribute": (_node("Split", ["x"], ["y0", "y1"], axis=1, split=[1, 2]), 11),
    "resize_opset10_nearest_scales_input": (_node("Resize", ["x", "scales"], ["y0"], mode="nearest"), 10),
    "resize_opset10_linear_scales_input": (_node("Resize", ["x", "scales"], ["y0"], mode="linear"), 10),
    "resize_opset13_linear_half_pixel": (_node("Resize", ["x", "", "scales"], ["y0"], mode="linear"), 13),
    "upsample_opset9_nearest_scales_input": (_node("Upsample", ["x", "scales"], ["y0"], mode="nearest"), 9),
    "upsample_opset9_linear_scales_input": (_node("Upsample", ["x", "scales"], ["y0"], mode="linear"), 9),
    "upsample_opset7_scales_attribute": (_node("Upsample", ["x"], ["y0"], scales=[1.0, 1.0, 2.0, 3.0]), 7),
}  # fmt: skip
SCALES = numpy_helper.from_array(np.array([1.0, 1.0, 2.0, 1.5], dtype=np.float32), "scales")


@pytest.mark.parametrize("name", sorted(LEGACY_NODES))
def test_older_opset_forms_match_onnxruntime(name: str) -> None:
    node, opset = LEGACY_NODES[name]
    x = np.random.default_rng(0).standard_normal((1, 3, 4, 5)).astype(np.float32)
    model = _single_node_model(node, opset, x, outputs=len(node.output))
    if "scales" in node.input:
        model.graph.initializer.append(SCALES)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = session.run(None, {"x": x})
    with torch.no_grad():
        got = OnnxModule(model)(x=torch.from_numpy(x))
    got = got if isinstance(got, tuple) else (got,)
    assert len(got) == len(want)
    for tensor, expected in zip(got, want, strict=True):
        np.testing.assert_allclose(tensor.numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("padding", [{"auto_pad": "SAME_UPPER"}, {"auto_pad": "SAME_LOWER"}, {"pads": [0, 1, 2, 1]}])
def test_conv_layer_with_uneven_padding_matches_onnxruntime(padding: dict) -> None:
    """A Conv with a constant weight becomes an nn.Conv2d; padding it cannot hold is applied before it."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 7, 6)).astype(np.float32)
    weight = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 2)).astype(np.float32), "conv.weight")
    conv = _node("Conv", ["x", "conv.weight"], ["y0"], strides=[2, 1], **padding)
    model = _single_node_model(conv, 17, x)
    model.graph.initializer.append(weight)
    module = OnnxModule(model)
    assert isinstance(module.get_submodule("conv"), torch.nn.Conv2d)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        got = module(x=torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, session.run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)
