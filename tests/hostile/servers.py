"""Hostile and faulty HTTP servers as threads on 127.0.0.1 (port 0), each behaviour bounded in time."""
from __future__ import annotations

import http.server
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# No behaviour keeps a connection longer than this, so a test without the fix ends too.
MAX_SECONDS = 12.0

Handler = Callable[[http.server.BaseHTTPRequestHandler], None]


class _Dispatch(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    behave: Handler

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.server.paths.append(self.path)  # type: ignore[attr-defined]
        try:
            self.behave()  # type: ignore[misc]
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up, as it should

    def log_message(self, *args) -> None:
        pass


@contextmanager
def serve(behave: Handler) -> Iterator[tuple[str, list[str]]]:
    """Run a server whose every GET is answered by `behave(handler)`; yield its origin and the paths asked."""
    handler = type("Handler", (_Dispatch,), {"behave": behave})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.paths = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.paths  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()


def send(handler, body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> None:
    handler.send_response(status)
    for name, value in {"Content-Type": "application/fhir+json", "Content-Length": str(len(body)), **(headers or {})}.items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body)


def trickle_body(handler) -> None:
    """Headers at once, then one byte of a JSON body every 2 s."""
    handler.send_response(200)
    handler.send_header("Content-Type", "application/fhir+json")
    handler.send_header("Content-Length", "1000")
    handler.end_headers()
    handler.wfile.flush()
    _trickle(handler, b'{"resourceType": "Bundle", "type": "searchset", ' + b" " * 1000)


def trickle_headers(handler) -> None:
    """The status line and headers themselves, one byte every 2 s."""
    _trickle(handler, b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\n" + b"X-Slow: " + b"a" * 1000)


def _trickle(handler, data: bytes) -> None:
    started = time.monotonic()
    handler.close_connection = True
    for byte in data:
        if time.monotonic() - started > MAX_SECONDS:
            return
        handler.wfile.write(bytes([byte]))
        handler.wfile.flush()
        time.sleep(2.0)


def chunked(handler, pieces: Iterator[bytes], headers: dict[str, str] | None = None) -> None:
    """A body in chunked transfer encoding, with no Content-Length to refuse it by."""
    handler.send_response(200)
    handler.send_header("Content-Type", "application/fhir+json")
    handler.send_header("Transfer-Encoding", "chunked")
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.end_headers()
    started = time.monotonic()
    for piece in pieces:
        if time.monotonic() - started > MAX_SECONDS:
            return
        handler.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
    handler.wfile.write(b"0\r\n\r\n")
    handler.close_connection = True


def huge_bundle(megabytes: int) -> Iterator[bytes]:
    """A valid, empty searchset Bundle padded with whitespace to `megabytes` MB."""
    yield b'{"resourceType": "Bundle", "type": "searchset", "entry": []'
    for _ in range(megabytes):
        yield b" " * (1024 * 1024)
    yield b"}"


def gzip_bomb(megabytes: int) -> bytes:
    """huge_bundle(megabytes) gzip-compressed: about a thousandth of its size."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
    return b"".join(compressor.compress(piece) for piece in huge_bundle(megabytes)) + compressor.flush()
