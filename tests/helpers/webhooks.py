"""Real listeners for webhook tests: an HTTP receiver that records requests and a socket that never answers."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class Receiver:
    """What an HTTP receiver saw (header names lower-cased).

    `fail_next` answers that many requests 500 (with `response_body`); `delay_s` slows each answer.
    """

    def __init__(self, delay_s: float = 0.0) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.fail_next = 0
        self.delay_s = delay_s
        self.response_body = b""
        self.url = ""
        self.port = 0
        self._lock = threading.Lock()

    def handle(self, headers: dict[str, str], body: bytes) -> int:
        time.sleep(self.delay_s)
        with self._lock:
            self.requests.append((headers, body))
            status = 500 if self.fail_next > 0 else 204
            self.fail_next -= 1
        return status


@contextmanager
def http_receiver(delay_s: float = 0.0, tls: ssl.SSLContext | None = None) -> Iterator[Receiver]:
    """A threading HTTP(S) server on 127.0.0.1; `tls` wraps it in that server-side context."""
    state = Receiver(delay_s)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            status = state.handle({k.lower(): v for k, v in self.headers.items()}, body)
            payload = state.response_body if status != 204 else b""
            self.send_response(status)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    state.port = server.server_port
    state.url = f"{'https' if tls else 'http'}://127.0.0.1:{state.port}/hook"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


class SilentListener:
    """Accepts TCP connections and never answers; counts connections and the most open at once."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"
        self.accepted = 0
        self.open = 0
        self.max_open = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with self._lock:
                self.accepted += 1
                self.open += 1
                self.max_open = max(self.max_open, self.open)
            threading.Thread(target=self._hold, args=(conn,), daemon=True).start()

    def _hold(self, conn: socket.socket) -> None:
        """Read and ignore the request until the client gives up and closes."""
        conn.settimeout(0.2)
        with conn:
            while not self._stop.is_set():
                try:
                    if not conn.recv(65536):
                        break
                except TimeoutError:
                    continue
                except OSError:
                    break
        with self._lock:
            self.open -= 1

    def wait_for_connections(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.accepted < count:
            assert time.monotonic() < deadline, f"only {self.accepted} of {count} connections arrived"
            time.sleep(0.02)


@contextmanager
def silent_listener() -> Iterator[SilentListener]:
    listener = SilentListener()
    thread = threading.Thread(target=listener.serve, daemon=True)
    thread.start()
    try:
        yield listener
    finally:
        listener._stop.set()
        thread.join(5)
        listener.sock.close()


def self_signed_localhost(directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context trusting it) for a certificate valid for `localhost` only."""
    import subprocess

    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    return server, client
