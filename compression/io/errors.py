"""Errors with a stable machine-readable `code`; the service maps them to `{"error": {code, message}}`."""

from __future__ import annotations

from compression.errors import CompressionError


class CompressionIOError(CompressionError):
    """Base of the I/O errors: `code` is a short snake_case identifier, `message` a sentence for people."""


class ModelLoadError(CompressionIOError):
    """Codes: invalid_model, unsupported_format, unsupported_operator, pickle_refused, archive_too_large,
    decompression_bomb."""


class DatasetError(CompressionIOError):
    """Codes: invalid_dataset, dataset_mismatch, archive_too_large, decompression_bomb."""


class ExportError(CompressionIOError):
    """Codes: export_failed, export_mismatch, export_layer_missing, export_node_collision,
    export_dynamic_shapes_failed."""
