"""accuracy_level is a job option written into every MatMulNBits node, and the report measures its effect: the
shipped ONNX against the same file at the other level, on the evaluation batches (top-1 agreement, metric)."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto

from compression.io.onnx_rewrite import matmul_nbits_levels, set_accuracy_level
from tests.compression.test_shipped_artifact import _ort_accuracy, _run, _spec, tiny  # noqa: F401


def _accuracy_at(onnx_path: Path, level: int, data: Path, folder: Path) -> float:
    model = onnx.load(str(onnx_path))
    set_accuracy_level(model, level)
    onnx.save_model(model, str(folder / f"level{level}.onnx"))
    return _ort_accuracy(folder / f"level{level}.onnx", data)


@pytest.mark.parametrize(("level", "other"), [(4, 0), (0, 4)])
def test_accuracy_level_is_written_and_its_effect_reported(
    tiny: dict[str, Path],  # noqa: F811
    tmp_path: Path,
    level: int,
    other: int,
) -> None:
    config = {"bits": 4, "group_size": None, "zero_point": "integer", "accuracy_level": level}
    output = _run(_spec(tiny, tmp_path / "job", config=config))
    model = onnx.load(str(output.artifacts["onnx"]))
    assert matmul_nbits_levels(model) == {level}
    points = {n.input[3] for n in model.graph.node if n.op_type == "MatMulNBits" and len(n.input) > 3}
    assert points and {i.data_type for i in model.graph.initializer if i.name in points} == {TensorProto.UINT8}
    effect = output.report["fidelity"]["accuracy_level"]
    assert (effect["shipped"], effect["compared_with"]) == (level, other)
    assert effect["samples"] == 96 and 0.0 <= effect["top1_agreement"] <= 1.0
    by_level = effect["metric"]["by_level"]
    assert by_level[str(level)] == output.report["fidelity"]["metric"]["compressed"]
    # the other level's accuracy, from a session of our own on the rewritten file
    assert by_level[str(other)] == _accuracy_at(output.artifacts["onnx"], other, tiny["eval"], tmp_path)
    assert effect["metric"]["drop_from_level_0"] == pytest.approx(by_level["0"] - by_level["4"])
    assert not list(output.artifacts["onnx"].parent.glob(".accuracy-level-*"))  # the rewritten copy is gone
    # int8 activations are not an export error: the export check runs the same graph at level 0
    check = output.report["export_check"]
    assert check.get("checked_at_accuracy_level") == (0 if level else None) and check["max_rel_error"] < 1e-5


def test_a_graph_without_matmul_nbits_reports_no_accuracy_level(tiny: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    config = {"bits": 3, "group_size": None}  # 3-bit: the packed dequantize subgraph, no MatMulNBits
    output = _run(_spec(tiny, tmp_path, config=config))
    assert "accuracy_level" not in output.report["fidelity"]
    assert "MatMulNBits" not in {node.op_type for node in onnx.load(str(output.artifacts["onnx"])).graph.node}
