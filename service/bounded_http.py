"""HTTP GETs bounded as a whole: one deadline for connect, headers and body, and a byte cap.

A requests timeout bounds each socket read, not the download: a server that sends one
byte every two seconds never trips it. Here a watchdog shuts the socket down when the
deadline passes, whatever phase the request is in, and the body is read as a stream
and counted after decompression (urllib3 inflates at most the asked-for bytes per read),
so neither a trickle nor a gzip bomb can hold a worker or its memory.

Used for the EHR's FHIR server (service.patient.fhir_client) and the CDS client's JWKS
(service.cds_hooks.auth). Sessions get the watchdog with `bounded_session()`.
"""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from typing import Mapping
from urllib.parse import urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection

__all__ = ["BoundedResponse", "DownloadFailed", "bounded_get", "bounded_session", "origin", "parse_origin"]

_CHUNK = 64 * 1024
# Only the encodings urllib3 inflates in bounded steps; a body in any other encoding is refused.
ACCEPT_ENCODING = "gzip, deflate"

# Failure kinds; callers map them to their own client-visible codes.
UNREACHABLE = "unreachable"
TIMEOUT = "timeout"
TOO_LARGE = "too_large"


_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin(url: str) -> str | None:
    """The RFC 6454 origin of an http(s) URL as "scheme://host:port", or None if it has none."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    host = parts.hostname  # lower-cased, without userinfo or IPv6 brackets
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{port or _DEFAULT_PORTS[scheme]}"


def parse_origin(text: str) -> str:
    """A configured origin ("https://ehr.example.org[:port]"), normalised; ValueError saying why not."""
    parts = urlsplit(text.strip()) if isinstance(text, str) else None
    found = origin(text.strip()) if isinstance(text, str) else None
    if found is None or parts is None or parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError(f"{text!r} is not an origin: expected scheme://host[:port], http or https, no path")
    return found


class DownloadFailed(Exception):
    """The GET did not complete: `kind` is one of the constants above, `detail` is for logs."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class BoundedResponse:
    status_code: int
    headers: Mapping[str, str]
    body: bytes


class _Watch:
    """The connection a request is using, so the watchdog thread can cut it at the deadline."""

    def __init__(self) -> None:
        self.connection: HTTPConnection | None = None
        self.fired = False
        self._lock = threading.Lock()

    def fire(self) -> None:
        with self._lock:
            self.fired = True
            sock = getattr(self.connection, "sock", None)
        if sock is not None:
            try:
                # Wakes a recv() blocked in another thread; close() alone would not.
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


_current = threading.local()


class _WatchedMixin:
    def request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        watch = getattr(_current, "watch", None)
        if watch is not None:
            watch.connection = self
        return super().request(*args, **kwargs)  # type: ignore[misc]


class _WatchedHTTPConnection(_WatchedMixin, HTTPConnection):
    pass


class _WatchedHTTPSConnection(_WatchedMixin, HTTPSConnection):
    pass


class _WatchedHTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class _WatchedAdapter(HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


def bounded_session(session: requests.Session | None = None) -> requests.Session:
    """Mount the watchdog-aware adapters on `session` (a new one if None) and return it."""
    session = session if session is not None else requests.Session()
    for prefix in ("http://", "https://"):
        session.mount(prefix, _WatchedAdapter())
    return session


def bounded_get(
    session: requests.Session,
    url: str,
    *,
    headers: Mapping[str, str],
    deadline: float,
    read_timeout: float,
    max_bytes: int,
    connect_timeout: float | None = None,
) -> BoundedResponse:
    """GET `url` without following redirects, finishing by `deadline` (time.monotonic()) with at most
    `max_bytes` of decoded body; raise DownloadFailed otherwise."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise DownloadFailed(TIMEOUT, "time budget used up before the request")
    watch = _Watch()
    timer = threading.Timer(remaining, watch.fire)
    timer.daemon = True
    _current.watch = watch
    timer.start()
    response = None
    try:
        timeout = min(read_timeout, remaining)
        connect = min(connect_timeout, remaining) if connect_timeout is not None else timeout
        try:
            response = session.get(
                url, headers={**headers, "Accept-Encoding": ACCEPT_ENCODING},
                timeout=(connect, timeout), stream=True, allow_redirects=False,
            )
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise DownloadFailed(TOO_LARGE, f"Content-Length {length} is over the cap of {max_bytes} bytes")
            chunks, size = [], 0
            if response.raw is None:
                # An injected session (a test double) handed back a body already read.
                chunks, size = [response.content], len(response.content)
                if size > max_bytes:
                    raise DownloadFailed(TOO_LARGE, f"body is over the cap of {max_bytes} bytes")
            while response.raw is not None:
                chunk = response.raw.read1(_CHUNK, decode_content=True)
                if not chunk:
                    break
                size += len(chunk)
                if size > max_bytes:
                    raise DownloadFailed(TOO_LARGE, f"body is over the cap of {max_bytes} bytes once decoded")
                if time.monotonic() >= deadline:
                    raise DownloadFailed(TIMEOUT, f"body not read within the time budget ({size} bytes so far)")
                chunks.append(chunk)
        except DownloadFailed:
            raise
        except (requests.Timeout, urllib3.exceptions.TimeoutError):
            raise DownloadFailed(TIMEOUT, f"no answer within {timeout:.1f} s") from None
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            if watch.fired:
                raise DownloadFailed(TIMEOUT, "cut off at the end of the time budget") from None
            raise DownloadFailed(UNREACHABLE, type(exc).__name__) from None
        if watch.fired:
            # The watchdog cut the socket, which can look like a short but complete body.
            raise DownloadFailed(TIMEOUT, "cut off at the end of the time budget")
        return BoundedResponse(response.status_code, response.headers, b"".join(chunks))
    finally:
        timer.cancel()
        _current.watch = None
        if response is not None:
            response.close()
