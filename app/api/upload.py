"""Stream a multipart upload straight into the store's spool while hashing it (memory stays flat).

Starlette's own form parser would first copy the whole file into a temp file; this reads the request
body chunk by chunk, writes the `file` part into a `Spool`, and stops at the size limit with a 413.
Everything else in the body is bounded too: the number of parts, each part's headers, and the bytes of
all the other (form field) parts together.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from app.core.errors import APIError
from app.storage.store import Spool, Store, TooLarge

MAX_PARTS = 16
MAX_PART_HEADER_BYTES = 16 * 1024
MAX_FIELD_BYTES = 64 * 1024  # all non-file parts together


@dataclass
class _PartState:
    spool: Spool
    headers: dict[bytes, bytes] = field(default_factory=dict)
    header_field: bytes = b""
    header_value: bytes = b""
    in_file: bool = False
    filename: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    field_name: str | None = None
    field_value: bytes = b""
    parts: int = 0
    in_headers: bool = False
    header_bytes: int = 0
    field_bytes: int = 0

    def begin_part(self) -> None:
        self.parts += 1
        self.in_headers, self.header_bytes = True, 0
        if self.parts > MAX_PARTS:
            raise APIError(400, "too_many_parts", f"the multipart body has more than {MAX_PARTS} parts")

    def begin_part_data(self) -> None:
        self.in_headers = False
        _, params = parse_options_header(self.headers.get(b"content-disposition", b""))
        name = params.get(b"name", b"").decode()
        self.in_file = name == "file"
        self.field_name = None if self.in_file else name
        if self.in_file and self.filename is not None:
            raise APIError(400, "duplicate_file", "the multipart body has more than one 'file' part")
        if self.in_file:
            self.filename = params.get(b"filename", b"upload").decode(errors="replace")

    def count_header(self, size: int) -> None:
        self.header_bytes += size
        if self.header_bytes > MAX_PART_HEADER_BYTES:
            raise APIError(400, "invalid_part_header", f"a multipart part's headers pass {MAX_PART_HEADER_BYTES} bytes")

    def count_field(self, size: int) -> None:
        self.field_bytes += size
        if self.field_bytes > MAX_FIELD_BYTES:
            raise APIError(413, "fields_too_large", f"the form fields pass {MAX_FIELD_BYTES} bytes in all")


@dataclass
class Received:
    spool: Spool
    filename: str
    fields: dict[str, str]


def _callbacks(state: _PartState) -> dict[str, object]:
    def on_header_field(data: bytes, start: int, end: int) -> None:
        state.count_header(end - start)
        state.header_field += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state.count_header(end - start)
        state.header_value += data[start:end]

    def on_header_end() -> None:
        state.headers[state.header_field.lower()] = state.header_value
        state.header_field, state.header_value = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state.in_file:
            state.spool.write(data[start:end])
        else:
            state.count_field(end - start)
            state.field_value += data[start:end]

    def on_part_end() -> None:
        if state.field_name:
            state.fields[state.field_name] = state.field_value.decode(errors="replace")
        state.headers, state.field_value, state.in_file = {}, b"", False

    return {
        "on_part_begin": state.begin_part,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_headers_finished": state.begin_part_data,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
    }


async def receive_file(request: Request, *, store: Store, limit: int) -> Received:
    """The `file` part of a multipart body, spooled; raises 413 past `limit`, 400 without a file."""
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise APIError(415, "unsupported_media_type", "send multipart/form-data with a 'file' part")
    declared = int(request.headers.get("content-length") or 0)
    if declared > limit + 64 * 1024:
        raise APIError(413, "too_large", f"upload is {declared} bytes; the limit is {limit}")
    state = _PartState(spool=store.spool(limit=limit))
    parser = MultipartParser(params[b"boundary"], _callbacks(state))
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except TooLarge as exc:
        raise APIError(413, "too_large", str(exc)) from exc
    except MultipartParseError as exc:
        state.spool.discard()
        code = "invalid_part_header" if state.in_headers else "invalid_multipart"
        raise APIError(400, code, f"the multipart body is malformed or too large: {exc}") from exc
    except BaseException:
        state.spool.discard()
        raise
    if state.filename is None:
        state.spool.discard()
        raise APIError(400, "missing_file", "the multipart body has no 'file' part")
    state.spool.close()
    return Received(spool=state.spool, filename=state.filename, fields=state.fields)
