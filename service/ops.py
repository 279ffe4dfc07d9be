"""Operational endpoints outside CDS Hooks: health, readiness, rule status, rule documentation."""
from __future__ import annotations

import html

from flask import Blueprint, Response, current_app

from . import metrics
from .cds_hooks.routes import json_response
from .errors import NotFound

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    """The process is up."""
    return json_response({"status": "ok"})


@bp.get("/readyz")
def readyz() -> Response:
    """Rules are loaded (and the store answers, once wired)."""
    ext = current_app.extensions["calcinosis"]
    checks = {"rules": "ok" if ext.rules.current.rules else "no rules"}
    try:
        ext.store.ping()
        checks["store"] = "ok"
    except Exception as exc:  # any failure means not ready; the type says enough
        checks["store"] = f"unreachable ({type(exc).__name__})"
    ok = all(v == "ok" for v in checks.values())
    return json_response({"status": "ready" if ok else "not ready", "checks": checks}, 200 if ok else 503)


@bp.get("/status")
def status() -> Response:
    """Which rule set is serving, whether the last reload failed, and whether auth is on."""
    ext = current_app.extensions["calcinosis"]
    return json_response({
        "rules": ext.rules.status(),
        "auth": "disabled" if ext.auth_disabled else "enabled",
        # "any": some caller may name any fhirServer, and the service would fetch from it.
        "fhir_servers": "any" if ext.fhir_servers_unrestricted else "allow-listed",
        "clock": "pinned to " + current_app.config["NOW"] if current_app.config.get("NOW") else "real",
    })


@bp.get("/metrics")
def prometheus() -> Response:
    """Prometheus exposition: requests, latency, cards by rule, FHIR fallback, reloads."""
    body, content_type = metrics.exposition()
    return Response(body, content_type=content_type)


@bp.get("/rules/<rule_id>")
def rule_page(rule_id: str) -> Response:
    """A plain page explaining one rule: the card's source.url points here."""
    ruleset = current_app.extensions["calcinosis"].rules.current
    rule = ruleset.rule(rule_id)
    if rule is None:
        raise NotFound(f"no rule with id '{rule_id}'", code="unknown_rule")
    sources = "".join(f"<li>{html.escape(s)}</li>" for s in rule.sources)
    body = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(rule.title)}</title></head><body>"
        f"<h1>{html.escape(rule.title)}</h1><p><code>{html.escape(rule.id)}</code> &middot; rule set {ruleset.fingerprint}</p>"
        f"<p>{html.escape(rule.description)}</p>"
        f"<p>Answers the CDS Hooks {html.escape(', '.join(rule.hooks))} hook{'s' if len(rule.hooks) > 1 else ''}.</p>"
        + (f"<h2>Sources</h2><ul>{sources}</ul>" if sources else "")
        + f"<p><em>{html.escape(ruleset.settings.disclaimer)}</em></p></body></html>"
    )
    return Response(body, mimetype="text/html")
