"""A small FHIR R4 server over real HTTP, serving the resources of fixture bundles.

Written for the end-to-end tests (tests/e2e/), where a browser-based CDS client and the
service both talk to it. It answers what they need and refuses the rest:

- CORS on every answer, and preflight (OPTIONS);
- `GET /metadata`: a CapabilityStatement listing what is below;
- `GET /{type}/{id}`: a read;
- `GET /{type}?...` and `POST /{type}/_search` (form-encoded body): searches by `patient`
  (or `subject`), token parameters (`code`, `status`, `clinical-status`, ...; comma = OR),
  `date` with prefixes, `_sort=-date` and `_count` (SEARCH_PARAMETERS lists them per type);
- paging: a page never holds more than `max_page_size` entries; `Bundle.link[next]`
  points back here with `_offset`.

An unknown search parameter or sort is a 400 OperationOutcome, not silently ignored, so a
change in the service's prefetch templates that this server cannot answer shows up as an
error rather than as a patient with no data. It listens on 127.0.0.1 only, on a free port.
"""
from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

FHIR_JSON = "application/fhir+json"
MAX_BODY_BYTES = 64 * 1024
_PAGING = ("_sort", "_count", "_offset")
SEARCH_PARAMETERS = {
    "Patient": ("_id", *_PAGING),
    "Observation": ("patient", "subject", "code", "status", "date", *_PAGING),
    "Condition": ("patient", "subject", "code", "clinical-status", "verification-status", *_PAGING),
    "Procedure": ("patient", "subject", "code", "status", "date", *_PAGING),
    "MedicationRequest": ("patient", "subject", "code", "status", "intent", *_PAGING),
    "ServiceRequest": ("patient", "subject", "code", "status", *_PAGING),
}
PARAMETER_TYPES = {
    "_id": "token", "patient": "reference", "subject": "reference", "code": "token", "status": "token",
    "intent": "token", "clinical-status": "token", "verification-status": "token", "date": "date",
}
# FHIR R4 search prefixes for dates (3.1.1.4.2); a value without one means eq.
DATE_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le")
# The only sort the prefetch templates use; others are refused rather than ignored.
SORTS = {"date", "-date"}


@dataclass
class Seen:
    """One request the server answered: enough for a test to tell what the clients did."""

    method: str
    path: str
    status: int
    user_agent: str
    body: str = ""  # a POST _search's form parameters


@dataclass
class FhirTestServer:
    """Serve `resources` (plain FHIR JSON dicts) on 127.0.0.1; use as a context manager."""

    resources: list[dict]
    max_page_size: int = 3
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def from_bundles(cls, paths: Iterable[Path], **kwargs) -> FhirTestServer:
        """Load every resource of every bundle file (e.g. fixtures/fhir/*.json)."""
        resources = []
        for path in paths:
            bundle = json.loads(Path(path).read_text(encoding="utf-8"))
            resources.extend(entry["resource"] for entry in bundle.get("entry", []) if "resource" in entry)
        return cls(resources, **kwargs)

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "the server is not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FhirTestServer:
        server = self

        class Handler(_Handler):
            fhir = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fhir-test-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self) -> FhirTestServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def record(self, method: str, path: str, status: int, user_agent: str, body: str = "") -> None:
        with self._lock:
            self.seen.append(Seen(method, path, status, user_agent, body))

    # --- the FHIR side ---

    def read(self, kind: str, rid: str) -> dict | None:
        return next((r for r in self.resources if r.get("resourceType") == kind and r.get("id") == rid), None)

    def search(self, kind: str, params: list[tuple[str, str]]) -> tuple[int, dict]:
        """Answer a search as (status, Bundle or OperationOutcome)."""
        allowed = SEARCH_PARAMETERS.get(kind)
        if allowed is None:
            return 404, outcome("not-supported", f"this test server does not serve {kind}")
        unknown = sorted({name for name, _ in params if name not in allowed})
        if unknown:
            return 400, outcome("not-supported", f"unsupported search parameter(s) for {kind}: {', '.join(unknown)}")
        query: dict[str, list[str]] = {}
        for name, value in params:
            query.setdefault(name, []).append(value)
        repeated = sorted(name for name, values in query.items() if len(values) > 1 and name != "date")
        if repeated:
            return 400, outcome("not-supported", f"search parameter(s) {', '.join(repeated)} given twice; use commas for OR")
        try:
            count = int(query.get("_count", [self.max_page_size])[0])
            offset = int(query.get("_offset", [0])[0])
        except ValueError:
            return 400, outcome("invalid", "_count and _offset must be integers")
        if count < 0 or offset < 0:
            return 400, outcome("invalid", "_count and _offset must not be negative")
        sort = query.get("_sort", [None])[0]
        if sort is not None and sort not in SORTS:
            return 400, outcome("not-supported", f"unsupported _sort {sort!r}")
        for value in query.get("date", []):
            if not _DATE.fullmatch(value):
                return 400, outcome("invalid", f"date={value!r}: expected an optional prefix ({', '.join(DATE_PREFIXES)}) and a date")

        matching = [r for r in self.resources if r.get("resourceType") == kind and _matches(r, query)]
        if sort:
            matching.sort(key=_date_of, reverse=sort.startswith("-"))
        page_size = min(count, self.max_page_size)
        page = matching[offset:offset + page_size]
        bundle = {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(matching),
            "link": [{"relation": "self", "url": self._page_url(kind, query, offset)}],
            "entry": [{"fullUrl": f"{self.base_url}/{kind}/{r['id']}", "resource": r, "search": {"mode": "match"}} for r in page],
        }
        if offset + page_size < len(matching) and page_size > 0:
            bundle["link"].append({"relation": "next", "url": self._page_url(kind, query, offset + page_size)})
        return 200, bundle

    def _page_url(self, kind: str, query: dict[str, list[str]], offset: int) -> str:
        params = [(k, v) for k, values in query.items() if k not in ("_count", "_offset") for v in values]
        params.append(("_count", str(min(int(query.get("_count", [self.max_page_size])[0]), self.max_page_size))))
        if offset:
            params.append(("_offset", str(offset)))
        return f"{self.base_url}/{kind}?{urlencode(params)}"

    def capability_statement(self) -> dict:
        return {
            "resourceType": "CapabilityStatement",
            "status": "active",
            "date": "2026-11-01",
            "kind": "instance",
            "software": {"name": "calcinosis-cds FHIR test server"},
            "implementation": {"description": "fixtures for end-to-end tests", "url": self.base_url},
            "fhirVersion": "4.0.1",
            "format": ["json"],
            "rest": [{
                "mode": "server",
                "resource": [
                    {
                        "type": kind,
                        "interaction": [{"code": "read"}, {"code": "search-type"}],
                        "searchParam": [
                            {"name": name, "type": PARAMETER_TYPES[name]} for name in names if name not in _PAGING
                        ],
                    }
                    for kind, names in SEARCH_PARAMETERS.items()
                ],
            }],
        }


def outcome(code: str, text: str) -> dict:
    return {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code, "diagnostics": text}]}


def _matches(resource: dict, query: dict[str, list[str]]) -> bool:
    for name, values in query.items():
        value = values[0]
        if name in ("patient", "subject"):
            wanted = {v if "/" in v else f"Patient/{v}" for v in value.split(",")}
            if resource.get("subject", {}).get("reference") not in wanted:
                return False
        elif name == "_id":
            if resource.get("id") not in value.split(","):
                return False
        elif name == "code":
            concept = resource.get("code") or resource.get("medicationCodeableConcept")
            if not _token_match(concept, value):
                return False
        elif name in ("clinical-status", "verification-status"):
            field = "clinicalStatus" if name == "clinical-status" else "verificationStatus"
            if not _token_match(resource.get(field), value):
                return False
        elif name in ("status", "intent"):
            if resource.get(name) not in value.split(","):
                return False
        elif name == "date":
            if not all(_date_match(_date_of(resource), v) for v in values):
                return False
    return True


def _token_match(concept: dict | None, value: str) -> bool:
    """FHIR token search on a CodeableConcept: `system|code` or bare `code`, commas for OR."""
    codings = (concept or {}).get("coding", [])
    for token in value.split(","):
        system, bar, code = token.rpartition("|")
        for coding in codings:
            if coding.get("code") == code and (not bar or coding.get("system") == system):
                return True
    return False


_DATE = re.compile(r"(eq|ne|gt|lt|ge|le)?(\d{4}(-\d{2}(-\d{2}(T[0-9:.]+(Z|[+-]\d{2}:\d{2})?)?)?)?)")


def _date_match(when: str, value: str) -> bool:
    """Compare at the precision of the search value (enough for the fixtures' dates); undated never matches."""
    match = _DATE.fullmatch(value)
    prefix, date = match.group(1) or "eq", match.group(2)
    if not when:
        return False
    have = when[:len(date)]
    return {
        "eq": have == date, "ne": have != date, "gt": have > date,
        "lt": have < date, "ge": have >= date, "le": have <= date,
    }[prefix]


def _date_of(resource: dict) -> str:
    """The date `_sort=date` orders by; undated resources sort first in ascending order."""
    for key in ("effectiveDateTime", "performedDateTime", "authoredOn", "issued", "recordedDate", "onsetDateTime"):
        if isinstance(resource.get(key), str):
            return resource[key]
    period = resource.get("effectivePeriod") or resource.get("performedPeriod") or {}
    return period.get("start", "")


class _Handler(BaseHTTPRequestHandler):
    fhir: FhirTestServer
    # Bounded: a client that stops sending is dropped instead of holding a thread forever.
    timeout = 10
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        pass  # the `seen` list is the log; stderr stays quiet in test output

    def _send(self, status: int, body: dict | None, form: str = "") -> None:
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        self.send_header("Access-Control-Allow-Origin", self.headers.get("Origin") or "*")
        self.send_header("Vary", "Origin")
        if body is not None:
            self.send_header("Content-Type", f"{FHIR_JSON}; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.fhir.record(self.command, self.path, status, self.headers.get("User-Agent", ""), form)

    def do_OPTIONS(self) -> None:  # noqa: N802 - http.server's naming
        self.send_response(204)
        self.send_header("Access-Control-Allow-Origin", self.headers.get("Origin") or "*")
        self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.send_header(
            "Access-Control-Allow-Headers",
            self.headers.get("Access-Control-Request-Headers") or "Authorization, Content-Type, Accept",
        )
        self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Vary", "Origin")
        self.send_header("Content-Length", "0")
        self.end_headers()
        self.fhir.record("OPTIONS", self.path, 204, self.headers.get("User-Agent", ""))

    def do_GET(self) -> None:  # noqa: N802
        parts = urlsplit(self.path)
        segments = [s for s in parts.path.split("/") if s]
        if segments == ["metadata"]:
            return self._send(200, self.fhir.capability_statement())
        if len(segments) == 1:
            status, body = self.fhir.search(segments[0], parse_qsl(parts.query, keep_blank_values=True))
            return self._send(status, body)
        if len(segments) == 2:
            resource = self.fhir.read(*segments)
            if resource is None:
                return self._send(404, outcome("not-found", f"no {segments[0]} with id {segments[1]}"))
            return self._send(200, resource)
        return self._send(404, outcome("not-found", f"no route for GET {parts.path}"))

    def do_POST(self) -> None:  # noqa: N802
        parts = urlsplit(self.path)
        segments = [s for s in parts.path.split("/") if s]
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:
            self.close_connection = True
            return self._send(413, outcome("too-costly", f"a search body must be 0..{MAX_BODY_BYTES} bytes"))
        body = self.rfile.read(length).decode("utf-8", "replace")
        if len(segments) != 2 or segments[1] != "_search":
            return self._send(404, outcome("not-found", f"no route for POST {parts.path}"))
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if body and content_type != "application/x-www-form-urlencoded":
            return self._send(415, outcome("not-supported", "POST _search takes application/x-www-form-urlencoded"))
        # FHIR R4 3.1.0.1.2: parameters may come in the URL and the body together.
        params = parse_qsl(parts.query, keep_blank_values=True) + parse_qsl(body, keep_blank_values=True)
        status, answer = self.fhir.search(segments[0], params)
        return self._send(status, answer, form=body)
