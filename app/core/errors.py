"""One error shape for every 4xx/5xx: {"error": {"code", "message", "details"}}."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from python_multipart.exceptions import MultipartParseError
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.core.redact import redact_paths, redact_value
from app.schemas.api import ErrorOut

ERROR_DESCRIPTIONS = {
    400: "the body could not be parsed",
    401: "missing, unknown or revoked API key",
    404: "no such object in this project",
    409: "conflicts with the object's current state",
    413: "body or upload larger than the server's limit, or an archive that unpacks past it",
    415: "wrong content type",
    422: "the request failed validation (`details` names each field)",
    429: "too many dry runs at once (`Retry-After` says when to retry)",
    503: "a dependency is not ready",
}


class APIError(Exception):
    def __init__(
        self, status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details
        self.headers = headers


def not_found(what: str, ident: str) -> APIError:
    return APIError(404, "not_found", f"{what} {ident} not found")


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries declaring the error shape for these status codes."""
    return {status: {"model": ErrorOut, "description": ERROR_DESCRIPTIONS[status]} for status in statuses}


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details}}


def validation_details(errors: list[Any]) -> list[dict[str, Any]]:
    """Pydantic errors as [{path, message, type}] with dotted field paths."""
    return [
        {
            "path": ".".join(str(p) for p in err.get("loc", ())),
            "message": err.get("msg"),
            "type": err.get("type"),
        }
        for err in errors
    ]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        body = error_body(exc.code, redact_paths(exc.message), redact_value(exc.details))
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = validation_details(list(exc.errors()))
        return JSONResponse(error_body("invalid_request", "request failed validation", details), 422)

    @app.exception_handler(MultipartParseError)
    async def _bad_multipart(_: Request, exc: MultipartParseError) -> JSONResponse:
        return JSONResponse(error_body("invalid_body", f"malformed multipart body: {exc}"), status_code=400)

    @app.exception_handler(DataError)
    async def _refused_value(_: Request, exc: DataError) -> JSONResponse:
        # The database refused a value the request carried (PostgreSQL: a NUL byte, an over-long string);
        # the transaction never commits, so this is the client's 422 and nothing is half-written.
        message = f"a value in the request cannot be stored or looked up: {str(exc.orig).splitlines()[0]}"
        return JSONResponse(error_body("invalid_value", message), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code)
