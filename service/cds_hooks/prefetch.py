"""Resolve each prefetch key: use what the EHR sent, else ask its FHIR server, else 412.

CDS Hooks 2.0 "Providing FHIR Resources to a CDS Service":
- a value is used; `null` means the EHR has no such data;
- an OperationOutcome is the EHR reporting an error: logged, treated as unavailable;
- a missing key is fetched from `fhirServer` (with the bearer token when one is given);
- data that can be had neither way answers 412, naming each key and why.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote
from dataclasses import dataclass, field

import requests

from service import metrics
from service.errors import PreconditionFailed
from service.patient.fhir_client import FhirClient, FhirUnavailable, next_link
from service.patient.record import resources_in

from .request import HookRequest
from .services import PATIENT_TOKEN

log = logging.getLogger(__name__)


@dataclass
class Resolved:
    resources: dict[str, list[dict]] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # key -> prefetch | prefetch-null | fhir-server
    incomplete: list[str] = field(default_factory=list)
    fhir_calls: int = 0


@dataclass(frozen=True)
class FetchSettings:
    session: requests.Session
    timeout: float
    max_pages: int
    budget: float
    max_bytes: int = 32 * 1024 * 1024


def resolve(request: HookRequest, templates: dict[str, str], settings: FetchSettings, log_context: dict) -> Resolved:
    """Gather the resources for every template key, or raise PreconditionFailed."""
    resolved = Resolved()
    missing: dict[str, str] = {}
    to_fetch: dict[str, tuple[str, dict | None]] = {}  # key -> (reason it needs the server, first page if any)
    for key, template in templates.items():
        if key not in request.prefetch:
            to_fetch[key] = ("not in prefetch", None)
            continue
        value = request.prefetch[key]
        if value is None:
            resolved.resources[key], resolved.sources[key] = [], "prefetch-null"
        elif value.get("resourceType") == "OperationOutcome":
            log.warning("prefetch key holds an OperationOutcome", extra={"event": "prefetch_operation_outcome", "key": key, **log_context})
            to_fetch[key] = ("prefetch holds an OperationOutcome from the EHR", None)
        elif value.get("resourceType") == "Bundle" and _has_next(value):
            # The EHR paginated its prefetch; the remaining pages come from its server.
            to_fetch[key] = ("prefetch is paginated", value)
        else:
            resolved.resources[key], resolved.sources[key] = resources_in(value), "prefetch"
    if to_fetch and not request.fhir_server:
        for key, (reason, _) in to_fetch.items():
            missing[key] = f"{reason} and no fhirServer was given"
    elif to_fetch:
        client = FhirClient(
            request.fhir_server, request.access_token, session=settings.session, timeout=settings.timeout,
            max_pages=settings.max_pages, budget=settings.budget, max_bytes=settings.max_bytes, log_context=log_context,
        )

        def fetch(key: str) -> tuple[str, list[dict] | None, str | None, bool]:
            reason, first_page = to_fetch[key]
            try:
                if first_page is not None:
                    result = client.continue_search(first_page)
                    return key, result.resources, None, result.complete
                # The id is data, never query syntax: "p1&patient=p2" must not add a search parameter.
                query = templates[key].replace(PATIENT_TOKEN, quote(request.patient_id, safe=""))
                if "?" not in query:  # an instance read, e.g. Patient/{{context.patientId}}
                    resource = client.read(query)
                    return key, [resource] if resource else [], None, True
                result = client.search(query)
                return key, result.resources, None, result.complete
            except FhirUnavailable as exc:
                log.warning(
                    "FHIR fallback failed",
                    extra={"event": "fhir_fallback_failed", "key": key, "category": exc.category, "reason": exc.reason, **log_context},
                )
                # Only the category reaches the client: the detail would make this service a port scanner.
                return key, None, f"{reason}; FHIR server: {exc.category}", False

        with ThreadPoolExecutor(max_workers=len(to_fetch)) as pool:
            for key, resources, problem, complete in pool.map(fetch, to_fetch):
                if resources is None:
                    metrics.FHIR_FAILURES.labels(key).inc()
                    missing[key] = problem or "unavailable"
                else:
                    resolved.resources[key], resolved.sources[key] = resources, "fhir-server"
                    if not complete:
                        resolved.incomplete.append(key)
        resolved.fhir_calls = client.calls
        metrics.FHIR_CALLS.inc(client.calls)
    if missing:
        raise PreconditionFailed(
            "required FHIR data could be had neither from prefetch nor from the FHIR server",
            missing=[{"key": key, "query": templates[key], "reason": reason} for key, reason in missing.items()],
        )
    return resolved


def _has_next(bundle: dict) -> bool:
    return next_link(bundle) is not None
