"""Python client for the modelpress API: the CLI's `compress` command is built on it.

Transient failures (connection errors, 429, 502-504) are retried with exponential backoff; uploads
are skipped when the server already holds a file with the same sha256. Errors carry the server's
details (each rejected field with its path, the valid method names), not only its summary line.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

EXIT_PASS, EXIT_GATE_FAILED, EXIT_JOB_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3, 4
EXIT_INCONCLUSIVE = 5  # the job ran but had no evaluation data: nothing to judge, not a pass
EXIT_INTERRUPTED = 130  # Ctrl-C: the shell convention (128 + SIGINT)
RETRY_STATUSES = {429, 502, 503, 504}


class ClientError(Exception):
    """An error with the CLI exit code it maps to."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.code, self.status = code, status


class ServerUnreachable(ClientError):
    exit_code = EXIT_UNREACHABLE


class WaitTimeout(ClientError):
    exit_code = EXIT_UNREACHABLE


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1024 * 1024):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def as_upload_file(path: Path) -> Path:
    """A directory (a Hugging Face model) is zipped; a file is sent as is."""
    if not path.is_dir():
        return path
    target = Path(tempfile.mkdtemp(prefix="modelpress-")) / path.name
    return Path(shutil.make_archive(str(target), "zip", root_dir=path))


class Client:
    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        retries: int | None = None,
        backoff_s: float = 0.5,
        timeout_s: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        url = checked_url(url or os.environ.get("MODELPRESS_URL") or "http://127.0.0.1:8000")
        api_key = api_key or os.environ.get("MODELPRESS_API_KEY")
        if not api_key:
            raise ClientError("no API key: set MODELPRESS_API_KEY or pass --api-key")
        self.retries = int(os.environ.get("MODELPRESS_CLIENT_RETRIES", "5")) if retries is None else retries
        self.backoff_s = backoff_s
        self.http = httpx.Client(
            base_url=url.rstrip("/"),
            timeout=timeout_s,
            transport=transport,
            headers={"Authorization": f"Bearer {api_key}"},
        )

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.retries + 1):
            try:
                response = self.http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if attempt == self.retries:
                    raise ServerUnreachable(f"{self.http.base_url} unreachable: {exc}") from exc
            else:
                if response.status_code not in RETRY_STATUSES or attempt == self.retries:
                    return _checked(response)
            time.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def validate_method(self, method: str, config: dict[str, Any], gate: dict[str, Any] | None) -> dict[str, Any]:
        """The server's own config check, before anything is uploaded (422s name the field or the methods)."""
        body = {"config": config, "gate": gate}
        return self.request("POST", f"/v1/methods/{method}/validate", json=body).json()

    def upload(self, kind: str, path: Path, **fields: str) -> dict[str, Any]:
        """POST /v1/{models,datasets} unless the server already has this exact file."""
        path = as_upload_file(path)
        digest = file_sha256(path)
        existing = self.request("GET", f"/v1/{kind}", params={"sha256": digest}).json()
        if existing:
            return existing[0] | {"reused": True}
        for attempt in range(self.retries + 1):
            with open(path, "rb") as fh:
                try:
                    response = self.http.post(f"/v1/{kind}", files={"file": (path.name, fh)}, data=fields)
                except httpx.TransportError as exc:
                    if attempt == self.retries:
                        raise ServerUnreachable(f"upload failed: {exc}") from exc
                    time.sleep(self.backoff_s * 2**attempt)
                    continue
            if response.status_code not in RETRY_STATUSES or attempt == self.retries:
                return _checked(response).json() | {"reused": False}
            time.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def create_job(self, body: dict[str, Any], *, idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self.request("POST", "/v1/jobs", json=body, headers=headers).json()

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{job_id}").json()

    def wait(
        self,
        job_id: str,
        *,
        timeout_s: float,
        on_update: Callable[[dict[str, Any]], None],
        poll_s: float = 1.0,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.get_job(job_id)
            on_update(job)
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            if time.monotonic() > deadline:
                raise WaitTimeout(f"job {job_id} still {job['status']} after {timeout_s:.0f}s")
            time.sleep(poll_s)

    def report(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{job_id}/report").json()

    def download(self, artifact: dict[str, Any], dest_dir: Path) -> Path:
        dest_dir.mkdir(parents=True, exist_ok=True)
        target = dest_dir / Path(artifact["filename"]).name
        with self.http.stream("GET", f"/v1/artifacts/{artifact['id']}") as response:
            _checked(response)
            with open(target, "wb") as fh:
                for chunk in response.iter_bytes():
                    fh.write(chunk)
        if file_sha256(target) != artifact["sha256"]:
            raise ClientError(f"download of {artifact['filename']} is corrupt (sha256 mismatch)")
        return target


def fetch_methods(url: str) -> list[dict[str, Any]]:
    """The server's `GET /v1/methods` (public: no API key needed)."""
    try:
        response = httpx.get(checked_url(url).rstrip("/") + "/v1/methods", timeout=30.0)
    except httpx.TransportError as exc:
        raise ServerUnreachable(f"{url} unreachable: {exc}") from exc
    return _checked(response).json()


def checked_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ClientError(f"server URL must look like http://host:port, got {url!r} (did you mean http://{url}?)")
    return url


def describe_error(error: dict[str, Any]) -> str:
    """`code: message`, then one line per detail the server gave (field paths, valid names, checks)."""
    lines = [f"{error.get('code')}: {error.get('message')}"]
    details = error.get("details")
    if isinstance(details, list):
        lines += [f"  {d['path']}: {d.get('message')}" for d in details if isinstance(d, dict) and "path" in d]
    elif isinstance(details, dict) and isinstance(details.get("known"), list):
        lines.append("  valid: " + ", ".join(str(name) for name in details["known"]))
    elif isinstance(details, dict) and isinstance(details.get("checks"), list):
        lines += [f"  {c.get('name')}: {c.get('message')}" for c in details["checks"] if not c.get("ok", True)]
    return "\n".join(lines)


def _checked(response: httpx.Response) -> httpx.Response:
    if response.status_code < 400:
        return response
    response.read()
    try:
        error = response.json()["error"]
    except Exception:
        error = {"code": "http_error", "message": response.text[:500]}
    cls = ServerUnreachable if response.status_code >= 500 else ClientError
    raise cls(describe_error(error), code=error.get("code"), status=response.status_code)
