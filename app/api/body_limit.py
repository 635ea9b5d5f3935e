"""Request bodies are bounded before anything reads them: auth, JSON parsing, the route.

A pure ASGI middleware: a declared Content-Length past the limit is refused at once; a chunked body
is read (at most `limit` bytes, so memory stays small) and refused as soon as it passes the limit,
otherwise replayed to the app. Streamed uploads (multipart to the upload routes) are left to
`app.api.upload`, which spools them to disk under their own, larger limit.
"""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.errors import error_body


class BodySizeLimit:
    def __init__(self, app: ASGIApp, *, limit: int, streamed_paths: frozenset[str]) -> None:
        self.app, self.limit, self.streamed_paths = app, limit, streamed_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _has_body(scope) or self._is_streamed(scope):
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._refuse(scope, receive, send)
            return
        body = await _read_at_most(receive, self.limit)
        if body is None:
            await self._refuse(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    def _is_streamed(self, scope: Scope) -> bool:
        return scope["method"] == "POST" and scope["path"] in self.streamed_paths

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"the request body is larger than {self.limit} bytes"
        response = JSONResponse(error_body("body_too_large", message), status_code=413)
        await response(scope, receive, send)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None


def _has_body(scope: Scope) -> bool:
    return _header(scope, b"content-length") is not None or _header(scope, b"transfer-encoding") is not None


async def _read_at_most(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None once it passes `limit` bytes (the rest is never read)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
