"""calcinosis-cds: a CDS Hooks 2.0 service for calciphylaxis risk and calcinosis workup.

`create_app()` is the one place where things are wired: configuration, the rule
store, the protocol blueprint, error handlers. gunicorn and `make run` both serve it.
"""
from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from typing import Callable

import requests
from flask import Flask, Request, request
from werkzeug.exceptions import HTTPException

from . import config as config_module
from . import logs
from .errors import ServiceError, Unauthorized

log = logging.getLogger(__name__)


class Calcinosis:
    """What the routes need, injected so tests can replace the clock, uuids and HTTP session."""

    def __init__(self, app: Flask) -> None:
        from service.cds_hooks.prefetch import FetchSettings
        from service.engine.reloading import RuleStore
        from service.patient.validation import validation_error

        self.config = app.config
        self.rules = RuleStore(app.config["RULES_DIR"], validate_resource=validation_error)
        self.session: requests.Session = app.config.get("HTTP_SESSION") or requests.Session()
        self.fetch_settings = FetchSettings(self.session, app.config["FHIR_TIMEOUT"], app.config["FHIR_MAX_PAGES"], app.config["FHIR_BUDGET"])
        fixed = app.config.get("NOW")
        self._clock: Callable[[], datetime] = app.config.get("CLOCK") or (
            (lambda: datetime.fromisoformat(fixed.replace("Z", "+00:00"))) if fixed else (lambda: datetime.now(UTC))
        )
        self.new_uuid: Callable[[], str] = app.config.get("UUID") or (lambda: str(uuid.uuid4()))
        self.auth_disabled = str(app.config["AUTH"]).lower() == "disabled"

    def now(self) -> datetime:
        return self._clock()

    def base_url(self) -> str:
        """The public base URL: configured (behind a proxy) or as the request reached us."""
        return (self.config["PUBLIC_BASE_URL"] or request.host_url).rstrip("/")

    def documentation_url(self, rule_id: str) -> str:
        template = self.rules.current.settings.documentation_url
        return template.format(rule_id=rule_id) if template else f"{self.base_url()}/rules/{rule_id}"

    def authenticate(self, req: Request, service_id: str) -> None:
        """Verify the CDS client's JWT (wired in by the trust layer)."""
        if self.auth_disabled:
            return
        raise Unauthorized("a trusted CDS client JWT is required", code="invalid_token")

    def cards_issued(self, hook_instance: str, service_id: str, cards: list[dict], rule_ids: list[str]) -> None:
        """Record issued cards so feedback can be tied to rules (wired in by the feedback store)."""


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

    if ext.auth_disabled:
        log.warning("CDS client authentication is DISABLED (CDS_AUTH=disabled): local demos only", extra={"event": "auth_disabled"})

    @app.before_request
    def start_rule_watcher() -> None:
        # Started lazily in each process: gunicorn forks workers after the app is built.
        ext.rules.watch(app.config["RULES_POLL_SECONDS"])

    log.info("service ready", extra={"event": "started", "rules": ext.rules.status()["rules"], "fingerprint": ext.rules.current.fingerprint})
    return app


def _register_error_handlers(app: Flask) -> None:
    from .cds_hooks.routes import json_response

    @app.errorhandler(ServiceError)
    def service_error(exc: ServiceError):
        log.info(
            "request refused",
            extra={"event": "request_error", "status": exc.status, "code": exc.code, "path": request.path},
        )
        return json_response(exc.body(), exc.status)

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
