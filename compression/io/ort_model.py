"""An exported ONNX file in ONNX Runtime behind the `module(**batch)` interface the metrics use.

The job measures the artifact it ships: `OrtModel` wraps one ORT session (the job passes the very session
the latency benchmark times) so `compare_outputs`, `spearman_metric` and the export checks run the file, not the
PyTorch model it came from. Inputs the graph does not take are dropped, dtypes follow the graph's
inputs, and a graph with a static batch dimension is fed that many rows at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


class OrtModel(nn.Module):
    """`OrtModel(session)(**batch)` -> the graph's output as a CPU tensor, or a tuple when it has several."""

    def __init__(self, session: Any, path: Path | None = None) -> None:
        super().__init__()
        self.session, self.path = session, path
        self.inputs = {i.name: i for i in session.get_inputs()}
        static = [i.shape[0] for i in self.inputs.values() if i.shape and isinstance(i.shape[0], int)]
        self.static_batch: int | None = static[0] if static else None

    @classmethod
    def open(cls, path: Path) -> OrtModel:
        """A plain CPU session (the job opens its sessions with `compression.evaluate.latency.make_session`)."""
        import onnxruntime as ort

        return cls(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), Path(path))

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def feeds(self, batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        missing = sorted(set(self.inputs) - set(batch))
        if missing:
            raise ValueError(f"the ONNX graph needs inputs {missing} the batch does not have")
        arrays = {name: batch[name].detach().cpu().numpy() for name in self.inputs}
        return {
            name: np.ascontiguousarray(array.astype(_ORT_DTYPES.get(self.inputs[name].type, array.dtype), copy=False))
            for name, array in arrays.items()
        }

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The session's outputs; a static batch dimension is filled by repeating the last row, then trimmed."""
        rows = next(iter(feeds.values())).shape[0] if feeds else 0
        step = self.static_batch
        if not step or step == rows:
            return self.session.run(None, feeds)
        parts: list[list[np.ndarray]] = []
        for start in range(0, rows, step):
            chunk = {k: _fill_rows(v[start : start + step], step) for k, v in feeds.items()}
            taken = min(step, rows - start)
            parts.append([out[:taken] for out in self.session.run(None, chunk)])
        return [np.concatenate(column, axis=0) for column in zip(*parts, strict=True)]

    def forward(self, **batch: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        outputs = [torch.from_numpy(np.asarray(out)) for out in self.run(self.feeds(batch))]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def _fill_rows(array: np.ndarray, rows: int) -> np.ndarray:
    if array.shape[0] == rows:
        return array
    fill = np.repeat(array[-1:], rows - array.shape[0], axis=0)
    return np.concatenate([array, fill], axis=0)
