"""Parse and check a CDS Hooks 2.0 service request ("Calling a CDS Service")."""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from service.engine.model import ORDER_HOOKS
from service.errors import BadRequest

from .orders import DraftOrders, parse_draft_orders


@dataclass(frozen=True)
class HookRequest:
    hook: str
    hook_instance: str
    patient_id: str
    user_id: str
    context: dict
    fhir_server: str | None
    access_token: str | None
    prefetch: dict
    draft_orders: DraftOrders | None = None  # order-select / order-sign only
    encounter_id: str | None = None

    def __repr__(self) -> str:  # never let the access token reach a log through repr()
        return f"HookRequest(hook={self.hook!r}, hook_instance={self.hook_instance!r})"


def _string(body: dict, key: str, where: str = "") -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value.strip():
        problem = "is missing" if value is None else "must be a non-empty string"
        raise BadRequest(f"{where}{key} {problem}", code="invalid_request", field=f"{where}{key}")
    return value


def parse_hook_request(body: object, expected_hook: str) -> HookRequest:
    """Check the fields CDS Hooks requires; raise BadRequest naming the first problem."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object", code="invalid_request")
    hook = _string(body, "hook")
    hook_instance = _string(body, "hookInstance")
    if hook != expected_hook:
        raise BadRequest(f"this service answers the {expected_hook} hook, not {hook}", code="hook_mismatch", field="hook")
    context = body.get("context")
    if not isinstance(context, dict):
        raise BadRequest("context is missing or not an object", code="invalid_request", field="context")
    patient_id = _string(context, "patientId", "context.")
    user_id = _string(context, "userId", "context.")
    fhir_server = body.get("fhirServer")
    if fhir_server is not None:
        try:
            parts = urlsplit(fhir_server) if isinstance(fhir_server, str) else None
        except ValueError:  # e.g. "http://[": not a URL at all
            parts = None
        if not parts or parts.scheme not in ("http", "https") or not parts.netloc:
            raise BadRequest("fhirServer must be an absolute http(s) URL", code="invalid_request", field="fhirServer")
    authorization = body.get("fhirAuthorization")
    access_token = None
    if authorization is not None:
        if not isinstance(authorization, dict):
            raise BadRequest("fhirAuthorization must be an object", code="invalid_request", field="fhirAuthorization")
        if fhir_server is None:
            # Spec: "If fhirAuthorization is provided, this field is REQUIRED."
            raise BadRequest("fhirServer is required when fhirAuthorization is given", code="invalid_request", field="fhirServer")
        access_token = _string(authorization, "access_token", "fhirAuthorization.")
        token_type = authorization.get("token_type", "Bearer")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise BadRequest("fhirAuthorization.token_type must be Bearer", code="invalid_request", field="fhirAuthorization.token_type")
    prefetch = body.get("prefetch", {})
    if prefetch is None:
        prefetch = {}
    if not isinstance(prefetch, dict):
        raise BadRequest("prefetch must be an object", code="invalid_request", field="prefetch")
    for key, value in prefetch.items():
        if value is not None and not (isinstance(value, dict) and isinstance(value.get("resourceType"), str)):
            raise BadRequest(f"prefetch.{key} must be a FHIR resource or null", code="invalid_request", field=f"prefetch.{key}")
    draft_orders = parse_draft_orders(context, hook, patient_id) if hook in ORDER_HOOKS else None
    encounter_id = context.get("encounterId") if isinstance(context.get("encounterId"), str) else None
    return HookRequest(hook, hook_instance, patient_id, user_id, context, fhir_server, access_token, prefetch, draft_orders, encounter_id)
