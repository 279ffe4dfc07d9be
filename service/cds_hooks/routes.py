"""The CDS Hooks endpoints: discovery, service invocation, feedback.

Routes parse, call one function, and map domain errors to status codes; what a
card says comes from the rule engine, never from here.
"""
from __future__ import annotations

import logging
import time

import msgspec
import orjson
from flask import Blueprint, Response, current_app, request

from service.errors import BadRequest, NotFound, PayloadTooLarge
from service.patient.lazy import decode_hook_body

from . import hooks
from .feedback import FeedbackError, parse_feedback
from .services import SERVICES, prefetch_templates

log = logging.getLogger(__name__)
bp = Blueprint("cds_hooks", __name__)


def json_response(body: object, status: int = 200, headers: dict | None = None) -> Response:
    """Serialise with orjson: card lists for large patients are the hot path."""
    return Response(orjson.dumps(body), status=status, headers=headers, mimetype="application/json")


def read_json(*, lazy_prefetch: bool = False) -> object:
    """Parse the request body, or raise BadRequest saying why it is not JSON.

    With `lazy_prefetch`, prefetch Bundle entries stay raw JSON until a rule reads them
    (service.patient.lazy): the cost of a large chart is then mostly bytes, not objects.
    """
    data = request.get_data(cache=False)
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    # A chunked body has no Content-Length to refuse up front, and Werkzeug stops reading it at
    # the limit without a word: a body cut there could still parse. More bytes waiting means 413.
    if limit is not None and len(data) >= limit and request.content_length is None and request.environ["wsgi.input"].read(1):
        raise PayloadTooLarge(f"the request body is larger than the configured maximum of {limit} bytes")
    if not data:
        raise BadRequest("the request body is empty; expected a JSON object", code="malformed_json")
    try:
        return decode_hook_body(data) if lazy_prefetch else orjson.loads(data)
    except (msgspec.DecodeError, orjson.JSONDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}", code="malformed_json") from None
    except msgspec.ValidationError as exc:  # valid JSON syntax, but e.g. 1e999 where no resource holds it
        raise BadRequest(f"the request body holds a number out of range: {exc}", code="malformed_json") from None
    except RecursionError:
        raise BadRequest(
            "the request body is nested too deeply to read (FHIR resources need a few dozen levels)", code="malformed_json"
        ) from None


def service_or_404(service_id: str):
    service = SERVICES.get(service_id)
    if service is None:
        raise NotFound(f"no CDS service with id '{service_id}'", code="unknown_service")
    return service


@bp.get("/cds-services")
def discovery() -> Response:
    """CDS Hooks 2.0 "Discovery": the services and their prefetch templates."""
    ext = current_app.extensions["calcinosis"]
    ruleset = ext.rules.current
    services = [
        {
            "hook": s.hook,
            "title": s.title,
            "description": s.description,
            "id": s.id,
            "prefetch": prefetch_templates(ruleset, current_app.config["PREFETCH_COUNT"], s.hook),
            **({"usageRequirements": s.usage_requirements} if s.usage_requirements else {}),
        }
        for s in SERVICES.values()
    ]
    return json_response({"services": services})


@bp.post("/cds-services/<service_id>")
def invoke(service_id: str) -> Response:
    """CDS Hooks 2.0 "Calling a CDS Service"."""
    started = time.perf_counter()
    service = service_or_404(service_id)
    ext = current_app.extensions["calcinosis"]
    ext.authenticate(request, service_id)
    outcome = hooks.answer(service, read_json(lazy_prefetch=True), ext)
    headers = {"X-Calcinosis-Rules": ext.rules.current.fingerprint}
    if outcome.skipped_resources:
        headers["X-Calcinosis-Skipped-Resources"] = str(outcome.skipped_resources)
    if outcome.incomplete:
        headers["X-Calcinosis-Incomplete"] = ",".join(outcome.incomplete)
    if outcome.other_patient_orders:
        headers["X-Calcinosis-Ignored-Orders"] = str(outcome.other_patient_orders)
    log.info(
        "hook answered",
        extra={
            "event": "hook_answered",
            "service": service_id,
            "hookInstance": outcome.hook_instance,
            "rules_fired": outcome.rule_ids,
            "skipped_resources": outcome.skipped_resources,
            # Resources about another patient in this patient's prefetch: dropped, and worth an EHR ticket.
            "other_patient_resources": outcome.other_patient_resources,
            "unattributed_resources": outcome.unattributed_resources,
            # Draft orders about another patient in an order hook's context: ignored, and worth an EHR ticket.
            "other_patient_orders": outcome.other_patient_orders,
            "data_sources": outcome.sources,
            "ms": round((time.perf_counter() - started) * 1000, 1),
        },
    )
    return json_response({"cards": outcome.cards}, headers=headers)


@bp.post("/cds-services/<service_id>/feedback")
def feedback(service_id: str) -> Response:
    """CDS Hooks 2.0 "Feedback": store each item durably, tied to the rule that made the card."""
    service_or_404(service_id)
    ext = current_app.extensions["calcinosis"]
    ext.authenticate(request, service_id)
    try:
        items = parse_feedback(read_json(), max_items=current_app.config["FEEDBACK_MAX_ITEMS"])
    except FeedbackError as exc:
        details = {k: v for k, v in (("index", exc.index), ("field", exc.field)) if v is not None}
        raise BadRequest(str(exc), code=exc.code, **details) from None
    stored = ext.store.add_feedback(service_id, items, ext.now(), snooze_policy=_snooze_policy(ext.rules.current))
    unknown = [s.card for s in stored if not s.known_card]
    not_offered = [s.card for s in stored if s.reason_offered is False]
    for s in stored:
        if s.snooze is not None:
            log.info("snooze set", extra={"event": "snooze_set", "service": service_id, "hookInstance": s.snooze.hook_instance,
                                          "rule": s.snooze.rule_id, "reason": s.snooze.reason, "until": s.snooze.until.isoformat()})
    log.info(
        "feedback stored",
        extra={"event": "feedback_stored", "service": service_id, "items": len(stored), "unknown_cards": len(unknown),
               "outcomes": [s.outcome for s in stored], "rules": sorted({s.rule_id for s in stored if s.rule_id}),
               "reasons_not_offered": len(not_offered)},
    )
    body = {"stored": len(stored), "unknownCards": unknown}
    if not_offered:
        # Kept and counted like any other feedback; the client learns which reasons we did not offer.
        body["reasonsNotOffered"] = not_offered
    return json_response(body)


def _snooze_policy(ruleset):
    """rule id, reason code -> how long that rule's card stays away, from the loaded rules."""
    def policy(rule_id: str, code: str):
        rule = ruleset.rule(rule_id)
        return rule.snooze.get(code) if rule is not None else None

    return policy
