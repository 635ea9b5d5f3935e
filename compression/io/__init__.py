"""Model and data I/O: load ONNX / torch.export / Hugging Face models, read datasets, export artifacts."""

from compression.io.data import load_batches
from compression.io.errors import CompressionIOError, DatasetError, ExportError, ModelLoadError
from compression.io.export import ExportOptions, export_artifacts, verify_onnx
from compression.io.loaded import InputSpec, LoadedModel
from compression.io.model import load_model

__all__ = [
    "CompressionIOError",
    "DatasetError",
    "ExportError",
    "ExportOptions",
    "InputSpec",
    "LoadedModel",
    "ModelLoadError",
    "export_artifacts",
    "load_batches",
    "load_model",
    "verify_onnx",
]
