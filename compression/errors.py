"""Errors the compression library raises on purpose, each with a stable machine-readable code."""

from __future__ import annotations


class CompressionError(Exception):
    """A compression step refused or failed: `code` is stable (API error bodies), `message` is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
