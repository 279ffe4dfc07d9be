"""Validate single FHIR R4 resources with fhir.resources (its R4B models).

Validation costs ~200 µs a resource (measured with `make bench`), so it is applied to the
few resources a rule uses, never to a whole prefetch bundle.
"""
from __future__ import annotations

from functools import lru_cache

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError


@lru_cache(maxsize=None)
def _model(resource_type: str):
    return get_fhir_model_class(resource_type)


# fhir.resources checks structure, not codes (it accepts status "bogus"): the required
# bindings of the resources rules propose are checked here.
REQUIRED_CODES = {
    "ServiceRequest": {
        "status": {"draft", "active", "on-hold", "revoked", "completed", "entered-in-error", "unknown"},
        "intent": {"proposal", "plan", "directive", "order", "original-order", "reflex-order", "filler-order", "instance-order", "option"},
        "priority": {"routine", "urgent", "asap", "stat"},
    },
}


def validation_error(resource: dict) -> str | None:
    """Return None if the resource is valid FHIR R4, else a short description of the first problem."""
    resource_type = resource.get("resourceType") if isinstance(resource, dict) else None
    if not isinstance(resource_type, str):
        return "no resourceType"
    try:
        model = _model(resource_type)
    except (KeyError, ValueError):
        return f"unknown resourceType {resource_type!r}"
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        first = exc.errors()[0]
        location = ".".join(str(p) for p in first.get("loc", ()) if p != "__root__")
        count = exc.error_count()
        more = f" (+{count - 1} more)" if count > 1 else ""
        return f"{location or resource_type}: {first.get('msg', 'invalid')}{more}"
    except (TypeError, ValueError) as exc:  # fhir.resources raises these for some malformed primitives
        return str(exc).splitlines()[0]
    for field, allowed in REQUIRED_CODES.get(resource_type, {}).items():
        if field in resource and resource[field] not in allowed:
            return f"{field}: {resource[field]!r} is not one of {', '.join(sorted(allowed))}"
    return None
