"""A small FHIR Bulk Data server for tests, on 127.0.0.1: kick-off, status, manifest, files, errors, auth.

It serves a fixed export (NDJSON bytes per file) and can be told to misbehave the ways real
servers do: 429 with Retry-After at kick-off, several 202 polls with X-Progress, tokens that
stop working after a few uses (401), a file whose first transfer breaks off, a failed export.
Every request is recorded for the test to inspect.
"""
from __future__ import annotations

import json
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field

import jwt
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response


@dataclass
class BulkServerConfig:
    files: dict[str, tuple[str, bytes]]  # file name -> (resource type, NDJSON bytes)
    errors: list[dict] = field(default_factory=list)  # OperationOutcomes for the error file
    static_token: str | None = None
    smart_client_id: str | None = None
    smart_public_key: object = None
    token_uses: int = 1000  # requests a token is good for; then 401, as if it had expired
    requires_access_token: bool = True
    capability_type_filter: bool = True
    kickoff_429s: int = 0  # 429 with Retry-After: 1 before accepting the kick-off
    polls_in_progress: int = 1  # 202 answers with X-Progress before the manifest
    break_first_transfer_of: str | None = None  # this file's first download stops half-way
    kickoff_failure: tuple[int, dict] | None = None
    status_failure: tuple[int, dict] | None = None


@dataclass
class Seen:
    method: str
    path: str
    query: dict
    headers: dict
    status: int = 0


class BulkServer:
    def __init__(self, config: BulkServerConfig) -> None:
        self.config = config
        self.base = ""  # set when served
        self.seen: list[Seen] = []
        self.tokens: dict[str, int] = {}  # token -> uses left
        self.tokens_issued = 0
        self.deleted: list[str] = []
        self._polls = 0
        self._kickoff_429s = 0
        self._broken: set[str] = set()
        self._jtis: set[str] = set()
        self._lock = threading.Lock()

    # --- helpers
    def _json(self, status: int, body: object, headers: dict | None = None, content_type: str = "application/fhir+json") -> Response:
        return Response(json.dumps(body), status=status, headers=headers or {}, content_type=content_type)

    def _outcome(self, status: int, code: str, text: str) -> Response:
        return self._json(status, {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code, "diagnostics": text}]})

    def _authorized(self, request: Request) -> bool:
        c = self.config
        header = request.headers.get("Authorization", "")
        token = header.removeprefix("Bearer ") if header.startswith("Bearer ") else None
        if c.static_token is not None:
            return token == c.static_token
        if c.smart_client_id is not None:
            with self._lock:
                left = self.tokens.get(token or "", 0)
                if left <= 0:
                    return False
                self.tokens[token] = left - 1
            return True
        return True

    # --- WSGI
    def __call__(self, environ, start_response):
        request = Request(environ)
        seen = Seen(request.method, request.path, request.args.to_dict(flat=False),
                    {k: v for k, v in request.headers.items() if k in ("Accept", "Prefer", "Range", "Authorization")})
        self.seen.append(seen)
        response = self.route(request)
        seen.status = response.status_code
        return response(environ, start_response)

    def route(self, request: Request) -> Response:
        c, path = self.config, request.path
        if path == "/fhir/metadata":
            operations = [{"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export"}]
            body = {"resourceType": "CapabilityStatement", "status": "active", "kind": "instance", "fhirVersion": "4.0.1",
                    "rest": [{"mode": "server", "operation": operations}]}
            if c.capability_type_filter:
                body["rest"][0]["extension"] = [{"url": "http://example.org/bulk-export-parameters", "valueString": "_type,_typeFilter,_since"}]
            return self._json(200, body)
        if path == "/fhir/.well-known/smart-configuration":
            return self._json(200, {"token_endpoint": f"{self.base}/auth/token", "grant_types_supported": ["client_credentials"],
                                    "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"]}, content_type="application/json")
        if path == "/auth/token" and request.method == "POST":
            return self.token(request)
        if path.endswith("/$export"):
            return self.kick_off(request)
        if path.startswith("/status/"):
            return self.status(request)
        if path.startswith("/files/"):
            return self.file(request)
        return self._outcome(404, "not-found", f"no route {path}")

    def token(self, request: Request) -> Response:
        c = self.config
        form = request.form
        if form.get("grant_type") != "client_credentials" or form.get("client_assertion_type") != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer":
            return self._json(400, {"error": "invalid_request"}, content_type="application/json")
        try:
            claims = jwt.decode(form.get("client_assertion", ""), c.smart_public_key, algorithms=["RS384", "ES384"],
                                audience=f"{self.base}/auth/token", issuer=c.smart_client_id,
                                options={"require": ["iss", "sub", "aud", "exp", "jti"]})
        except jwt.InvalidTokenError as exc:
            return self._json(401, {"error": "invalid_client", "error_description": str(exc)}, content_type="application/json")
        if claims["sub"] != c.smart_client_id or claims["jti"] in self._jtis or claims["exp"] - claims.get("iat", claims["exp"]) > 300:
            return self._json(401, {"error": "invalid_client", "error_description": "bad sub, reused jti or long-lived assertion"}, content_type="application/json")
        self._jtis.add(claims["jti"])
        token = uuid.uuid4().hex
        with self._lock:
            self.tokens[token] = c.token_uses
            self.tokens_issued += 1
        return self._json(200, {"access_token": token, "token_type": "bearer", "expires_in": 3600, "scope": form.get("scope", "")},
                          content_type="application/json")

    def kick_off(self, request: Request) -> Response:
        c = self.config
        if not self._authorized(request):
            return self._outcome(401, "login", "token missing, wrong or expired")
        if request.headers.get("Prefer") != "respond-async":
            return self._outcome(400, "invalid", "Prefer: respond-async is required")
        if self._kickoff_429s < c.kickoff_429s:
            self._kickoff_429s += 1
            return self._json(429, {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "throttled"}]}, {"Retry-After": "1"})
        if c.kickoff_failure:
            status, outcome = c.kickoff_failure
            return self._json(status, outcome)
        return Response(status=202, headers={"Content-Location": f"{self.base}/status/job-1"})

    def status(self, request: Request) -> Response:
        c = self.config
        if request.method == "DELETE":
            self.deleted.append(request.path)
            return Response(status=202)
        if not self._authorized(request):
            return self._outcome(401, "login", "token missing, wrong or expired")
        if c.status_failure:
            status, outcome = c.status_failure
            return self._json(status, outcome)
        if self._polls < c.polls_in_progress:
            self._polls += 1
            return Response(status=202, headers={"X-Progress": f"{50 * self._polls}% exported", "Retry-After": "1"})
        manifest = {
            "transactionTime": "2026-11-01T12:00:00Z", "request": f"{self.base}/fhir/Patient/$export",
            "requiresAccessToken": c.requires_access_token,
            "output": [{"type": kind, "url": f"{self.base}/files/{name}"} for name, (kind, _) in c.files.items()],
            "error": [{"type": "OperationOutcome", "url": f"{self.base}/files/errors.ndjson"}] if c.errors else [],
        }
        return self._json(200, manifest, content_type="application/json")

    def file(self, request: Request) -> Response:
        c = self.config
        if c.requires_access_token and not self._authorized(request):
            return self._outcome(401, "login", "token missing, wrong or expired")
        name = request.path.removeprefix("/files/")
        if name == "errors.ndjson" and c.errors:
            data = "".join(json.dumps(o) + "\n" for o in c.errors).encode()
        elif name in c.files:
            data = c.files[name][1]
        else:
            return self._outcome(404, "not-found", name)
        start = 0
        if request.range and request.range.ranges:
            start = request.range.ranges[0][0]
        body = data[start:]
        headers = {"Content-Length": str(len(body))}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if name == c.break_first_transfer_of and name not in self._broken:
            self._broken.add(name)

            def broken():  # half the file, then the connection drops
                yield body[: len(body) // 2]
                raise ConnectionResetError("dropped by the test server")

            return Response(broken(), status=206 if start else 200, headers=headers, content_type="application/fhir+ndjson")
        return Response(body, status=206 if start else 200, headers=headers, content_type="application/fhir+ndjson")


@contextmanager
def serve_bulk(config: BulkServerConfig):
    """Serve a BulkServer on a free loopback port in a thread; yield it (its `base` set)."""
    server = BulkServer(config)
    http = make_server("127.0.0.1", 0, server, threaded=True)
    server.base = f"http://127.0.0.1:{http.server_port}"
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        http.shutdown()
        http.server_close()
        thread.join(5)
