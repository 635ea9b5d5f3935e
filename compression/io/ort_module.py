"""An ONNX graph run by ONNX Runtime behind the `nn.Module` call convention.

A method whose result is a graph rather than torch layers (static int8: a QDQ graph whose integer
kernels exist only in ONNX Runtime) returns its model as an `OrtGraphModule`, so the job measures the
very graph it ships: `module(**inputs)` feeds the graph's inputs and returns torch tensors like any
loaded model (one tensor, or a tuple when the graph has several outputs).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn


class OrtGraphModule(nn.Module):
    """`onnx_bytes` run on ONNX Runtime's CPU provider. `parameters()` are the graph's initializers (frozen
    copies), so parameter counts see the graph's weights; there is nothing to train or fake-quantize."""

    def __init__(self, onnx_bytes: bytes, *, threads: int | None = None) -> None:
        super().__init__()
        self.onnx_bytes = onnx_bytes
        self.threads = threads
        self._session: Any = None

    @property
    def session(self) -> Any:
        if self._session is None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            if self.threads:
                options.intra_op_num_threads = self.threads
            self._session = ort.InferenceSession(self.onnx_bytes, options, providers=["CPUExecutionProvider"])
        return self._session

    def graph(self) -> onnx.ModelProto:
        return onnx.load_model_from_string(self.onnx_bytes)

    def parameters(self, recurse: bool = True) -> Any:  # type: ignore[override]
        for init in self.graph().graph.initializer:
            yield nn.Parameter(torch.from_numpy(numpy_helper.to_array(init).copy()), requires_grad=False)

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        wanted = {value.name: value.type for value in self.session.get_inputs()}
        feeds = {name: _as_numpy(t, wanted[name]) for name, t in inputs.items() if name in wanted}
        outputs = tuple(torch.from_numpy(np.asarray(out)) for out in self.session.run(None, feeds))
        return outputs[0] if len(outputs) == 1 else outputs

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_session"] = None  # sessions do not copy; the next call opens a new one
        return state


def _as_numpy(tensor: torch.Tensor, onnx_type: str) -> np.ndarray:
    """The feed in the dtype the graph declares (e.g. int64 ids given as int32)."""
    array = tensor.detach().cpu().numpy()
    wanted = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32}.get(onnx_type)
    return array.astype(wanted, copy=False) if wanted is not None else array
