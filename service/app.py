"""The app factory: `create_app()` is the one place where things are wired: configuration, the rule
store, the protocol blueprint, error handlers. gunicorn and `make run` both serve it.
"""
from __future__ import annotations

import gc
import logging
import time
import uuid
from datetime import UTC, datetime
from typing import Callable

import requests
from flask import Flask, Request, g, request
from werkzeug.exceptions import HTTPException

from . import config as config_module
from . import logs, metrics
from .bounded_http import bounded_session, origin, parse_origin
from .store import Store
from .errors import BadRequest, ServiceError, ServiceUnavailable, Unauthorized

log = logging.getLogger(__name__)
_access = logging.getLogger("service.access")


class Calcinosis:
    """What the routes need, injected so tests can replace the clock, uuids and HTTP session."""

    def __init__(self, app: Flask) -> None:
        from service.cds_hooks.prefetch import FetchSettings
        from service.engine.reloading import RuleStore
        from service.patient.validation import validation_error

        self.config = app.config
        self.rules = RuleStore(app.config["RULES_DIR"], validate_resource=validation_error)
        self.session: requests.Session = app.config.get("HTTP_SESSION") or bounded_session()
        self.fetch_settings = FetchSettings(
            self.session, app.config["FHIR_TIMEOUT"], app.config["FHIR_MAX_PAGES"], app.config["FHIR_BUDGET"],
            app.config["FHIR_MAX_BYTES"],
        )
        fixed = app.config.get("NOW")
        self._clock: Callable[[], datetime] = app.config.get("CLOCK") or (
            (lambda: datetime.fromisoformat(fixed.replace("Z", "+00:00"))) if fixed else (lambda: datetime.now(UTC))
        )
        self.new_uuid: Callable[[], str] = app.config.get("UUID") or (lambda: str(uuid.uuid4()))
        self.store = app.config.get("STORE") or Store.from_url(app.config["DATABASE_URL"])
        self.auth_disabled = str(app.config["AUTH"]).lower() == "disabled"
        if not self.auth_disabled and not app.config["PUBLIC_BASE_URL"]:
            # The JWT audience must not come from the Host header, which the caller chooses.
            raise SystemExit(
                "CDS_PUBLIC_BASE_URL is required when CDS client authentication is enabled: set it to the "
                "service's public URL (the JWT aud is that URL + the endpoint path), or set CDS_AUTH=disabled"
            )
        try:
            self.fhir_servers = tuple(parse_origin(o) for o in str(app.config["FHIR_SERVERS"]).split(",") if o.strip())
        except ValueError as exc:
            raise SystemExit(f"CDS_FHIR_SERVERS: {exc}") from None
        self.authenticator = None if self.auth_disabled else self._authenticator(app.config)
        self.fhir_servers_unrestricted = self._warn_if_fhir_servers_unrestricted()
        self.rules.listeners.append(lambda ok: metrics.RULE_RELOADS.labels("ok" if ok else "refused").inc())

    def _authenticator(self, config):
        from service.cds_hooks.auth import ClientAuthenticator, ConfigurationError, TrustedIssuers

        path = config["TRUSTED_ISSUERS"]
        try:
            issuers = TrustedIssuers.load(path) if path else TrustedIssuers([])
        except (ConfigurationError, OSError) as exc:
            raise SystemExit(f"CDS_TRUSTED_ISSUERS: {exc}") from None
        if not len(issuers):
            log.warning("no trusted CDS client issuers configured: every hook call will be refused", extra={"event": "no_trusted_issuers"})
        return ClientAuthenticator(
            issuers,
            session=self.session,
            clock=config.get("AUTH_CLOCK") or time.time,
            replay_cache=_StoreReplayCache(self.store),
            max_lifetime=config["MAX_TOKEN_LIFETIME"],
        )

    def _warn_if_fhir_servers_unrestricted(self) -> bool:
        """Say at start-up when a hook call may name any fhirServer (the service would fetch from it)."""
        if self.fhir_servers:
            return False
        if self.auth_disabled:
            open_to = ["every caller (CDS_AUTH=disabled)"]
        else:
            open_to = [issuer.iss for issuer in self.authenticator.issuers if issuer.fhir_servers is None]
        if open_to:
            log.warning(
                "any fhirServer is accepted: set fhir_servers per trusted issuer or CDS_FHIR_SERVERS",
                extra={"event": "fhir_servers_unrestricted", "for": open_to},
            )
        return bool(open_to)

    def check_fhir_server(self, fhir_server: str | None) -> None:
        """Refuse a fhirServer whose origin is not trusted for this caller, before anything is fetched."""
        if fhir_server is None:
            return
        allowed = self.fhir_servers
        if not self.auth_disabled:
            issuer = self.authenticator.issuers.get(g.get("cds_client") or "")
            if issuer is not None and issuer.fhir_servers is not None:
                allowed = issuer.fhir_servers
        if allowed and origin(fhir_server) not in allowed:
            raise BadRequest(
                "fhirServer is not a FHIR server this service trusts for this client",
                code="untrusted_fhir_server", field="fhirServer",
            )

    def now(self) -> datetime:
        return self._clock()

    def base_url(self) -> str:
        """The public base URL: configured (required with auth), or as the request reached us (auth disabled)."""
        return (self.config["PUBLIC_BASE_URL"] or request.host_url).rstrip("/")

    def documentation_url(self, rule_id: str) -> str:
        template = self.rules.current.settings.documentation_url
        return template.format(rule_id=rule_id) if template else f"{self.base_url()}/rules/{rule_id}"

    def authenticate(self, req: Request, service_id: str) -> None:
        """Verify the CDS client's JWT: CDS Hooks 2.0 "Trusting CDS Clients"; aud is the URL invoked."""
        if self.auth_disabled:
            return
        from service.cds_hooks.auth import JWKS_UNAVAILABLE, MISSING_TOKEN, AuthenticationError

        audience = self.base_url() + req.path
        try:
            claims = self.authenticator.authenticate(req.headers.get("Authorization"), audience)
        except AuthenticationError as exc:
            # The reason is for operators; the client learns only a stable code.
            log.warning("CDS client refused", extra={"event": "auth_refused", "code": exc.code, "reason": exc.reason, "service": service_id})
            if exc.code == JWKS_UNAVAILABLE:
                raise ServiceUnavailable("the CDS client's keys could not be fetched; try again", code="auth_unavailable") from None
            raise Unauthorized("a valid CDS client JWT is required", code=MISSING_TOKEN if exc.code == MISSING_TOKEN else "invalid_token") from None
        g.cds_client = claims.get("iss")

    def cards_issued(self, hook_instance: str, service_id: str, cards: list[dict], rule_ids: list[str]) -> None:
        """Record issued cards (ids and rule only, no patient data) so feedback can be tied to rules."""
        from service.store import IssuedCard

        issued = [
            IssuedCard(card["uuid"], rule_id, card["indicator"], tuple(s["uuid"] for s in card.get("suggestions", ())))
            for card, rule_id in zip(cards, rule_ids)
        ]
        for card in issued:
            metrics.CARDS.labels(card.rule_id, card.indicator).inc()
        try:
            self.store.record_cards(hook_instance, service_id, issued, self.now())
        except Exception as exc:  # the clinician still gets the cards; only feedback attribution is lost
            metrics.CARD_RECORD_FAILURES.inc()
            log.error(
                "issued cards not recorded; answering them anyway",
                extra={"event": "cards_not_recorded", "hookInstance": hook_instance, "service": service_id,
                       "cards": len(issued), "error_type": type(exc).__name__},
            )


class _StoreReplayCache:
    """Seen JWT ids in the shared store, so a replay is caught whichever worker it reaches."""

    def __init__(self, store) -> None:
        self.store = store

    def check_and_store(self, iss: str, jti: str, expires_at: float) -> bool:
        return self.store.check_and_store_jti(iss, jti, expires_at)


def create_app(test_config: dict | None = None) -> Flask:
    """Build the Flask app from defaults, CDS_* environment variables and `test_config`."""
    app = Flask(__name__)
    app.config.update(config_module.from_environment())
    if test_config:
        app.config.update(test_config)
    app.json.sort_keys = False
    logs.configure(app.config["LOG_LEVEL"])

    ext = Calcinosis(app)
    app.extensions["calcinosis"] = ext

    from .cds_hooks import cors, routes
    from . import ops

    app.register_blueprint(routes.bp)
    app.register_blueprint(ops.bp)
    cors.init_app(app)
    _register_error_handlers(app)

    _instrument(app)
    if app.config.get("NOW"):
        log.warning("evaluation clock pinned by CDS_NOW: test environments only", extra={"event": "clock_pinned", "now": app.config["NOW"]})
    if ext.auth_disabled:
        log.warning("CDS client authentication is DISABLED (CDS_AUTH=disabled): local demos only", extra={"event": "auth_disabled"})

    @app.before_request
    def start_rule_watcher() -> None:
        # Started lazily in each process: gunicorn forks workers after the app is built.
        ext.rules.watch(app.config["RULES_POLL_SECONDS"])

    log.info("service ready", extra={"event": "started", "rules": ext.rules.status()["rules"], "fingerprint": ext.rules.current.fingerprint})
    return app


def freeze_long_lived_objects() -> None:
    """Move everything built so far out of the garbage collector's view (gunicorn.conf.py calls it).

    The app, the rule set and fhir.resources' models are ~100k long-lived objects; every
    full collection would walk them while a large prefetch body allocates tens of
    thousands of dicts (docs/performance.md). Frozen objects are never collected, which
    only matters for a rule set replaced by a reload: a few hundred kB, once per reload.
    """
    gc.collect()
    gc.freeze()


def request_labels() -> tuple[str, str]:
    """(service, endpoint) for metrics and the access log, from the matched route, never the raw path.

    Anyone can POST to /cds-services/<anything>: a label per path would let them grow /metrics
    without bound, so an id that is not a known service is "unknown".
    """
    from .cds_hooks.services import SERVICES

    rule = request.url_rule
    service_id = (request.view_args or {}).get("service_id")
    service = "-" if service_id is None else (service_id if service_id in SERVICES else "unknown")
    if rule is None:
        return ("unknown" if request.path.startswith("/cds-services/") else "-"), "unmatched"
    return service, (request.endpoint or "unmatched").rsplit(".", 1)[-1]


def _instrument(app: Flask) -> None:
    """Count and time every CDS Hooks request by known service, endpoint and status."""

    @app.before_request
    def start_timer() -> None:
        g.started = time.perf_counter()

    @app.after_request
    def observe(response):
        if request.path.startswith("/cds-services") and request.method != "OPTIONS":
            service, endpoint = request_labels()
            labels = (service, endpoint, str(response.status_code))
            metrics.REQUESTS.labels(*labels).inc()
            metrics.LATENCY.labels(*labels).observe(time.perf_counter() - g.get("started", time.perf_counter()))
        return response

    if app.config["ACCESS_LOG"]:

        @app.after_request
        def access_log(response):
            # Chosen fields only: no query string (it may name a patient), no body, no header.
            service, _ = request_labels()
            rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
            _access.info(
                "request",
                extra={
                    "event": "access", "method": request.method, "route": rule, "service": service,
                    "status": response.status_code,
                    "ms": round((time.perf_counter() - g.get("started", time.perf_counter())) * 1000, 1),
                    "client": request.remote_addr,
                },
            )
            return response


def _register_error_handlers(app: Flask) -> None:
    from .cds_hooks.routes import json_response

    @app.errorhandler(ServiceError)
    def service_error(exc: ServiceError):
        log.info(
            "request refused",
            extra={"event": "request_error", "status": exc.status, "code": exc.code, "path": request.path},
        )
        return json_response(exc.body(), exc.status, getattr(exc, "headers", None))

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        codes = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
        message = exc.description or exc.name
        if exc.code == 413:
            message = f"the request body is larger than the configured maximum of {app.config['MAX_CONTENT_LENGTH']} bytes"
        return json_response({"error": {"code": codes.get(exc.code, "http_error"), "message": message}}, exc.code or 500)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        # Only the exception type is logged: its message could quote patient data.
        log.error("unexpected error", extra={"event": "internal_error", "error_type": type(exc).__name__, "path": request.path})
        return json_response({"error": {"code": "internal_error", "message": "the service failed to answer; the failure is logged"}}, 500)
