"""Named hook requests, built from the fixture scenarios (as the sandbox's tests name their stubs)."""
from __future__ import annotations

import copy

from service.cds_hooks.services import prefetch_templates
from service.engine.loader import load_ruleset
from service.harness import hook_request_for, load_cases

from .conftest import FIXTURES, RULES

_RULESET = load_ruleset(RULES)
TEMPLATES = prefetch_templates(_RULESET)
FHIR_SERVER = "http://127.0.0.1:8/fhir"  # mocked with `responses`: loopback-looking, never a real host


def scenario(name: str):
    """Load one fixture scenario as a harness Case."""
    return next(load_cases([FIXTURES / name]))


def request_with_prefetch(name: str, hook_instance: str = "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea") -> dict:
    """The request an EHR sends when it honours every prefetch template."""
    return copy.deepcopy(hook_request_for(scenario(name), TEMPLATES, hook_instance))


def request_without_prefetch(name: str, *, token: str | None = "opaque-fhir-token") -> dict:
    """The request an EHR sends when the service must fetch from its FHIR server."""
    request = request_with_prefetch(name)
    request.pop("prefetch")
    request["fhirServer"] = FHIR_SERVER
    if token:
        request["fhirAuthorization"] = {"access_token": token, "token_type": "Bearer", "expires_in": 300, "scope": "patient/*.read", "subject": "calcinosis-cds"}
    return request
