"""openapi.yaml is a valid OpenAPI 3.1 document, and the service's real responses conform to it.

Every response below comes from the Flask test client and is checked with openapi-core against
the spec: status code, content type, body schema and declared headers. A disagreement in either
direction (the service changed, or the spec is wrong) fails the test that made the call.
"""
from __future__ import annotations

import copy
import json
import time
import uuid
from pathlib import Path

import jwt
import pytest
import requests
import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from openapi_core import OpenAPI
from openapi_core.contrib.werkzeug import WerkzeugOpenAPIRequest, WerkzeugOpenAPIResponse
from openapi_core.validation.request.validators import (
    V31RequestBodyValidator,
    V31RequestParametersValidator,
    V31RequestSecurityValidator,
)
from openapi_spec_validator import OpenAPIV31SpecValidator, validate as validate_spec

from service.cds_hooks.services import prefetch_templates
from service.config import PROJECT_ROOT
from service.harness import hook_request_for, load_cases
from tests.conftest import FIXTURES, RULES, make_app

SPEC_PATH = PROJECT_ROOT / "openapi.yaml"
URL = "/cds-services/calcinosis-risk"
FEEDBACK_URL = URL + "/feedback"
HOOK_INSTANCE = "5b0f7e0a-4c1e-4d8e-9a51-0f3f6b1c2d7e"
FIXTURE_FILES = sorted(p.name for p in FIXTURES.glob("*.json"))


# ------------------------------------------------------------------ helpers


def load_spec() -> dict:
    return yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def openapi() -> OpenAPI:
    return OpenAPI.from_dict(load_spec())


@pytest.fixture(scope="module")
def shared_app(tmp_path_factory):
    """One app for the many read-only calls (building one takes ~0.3 s)."""
    return make_app(tmp_path_factory.mktemp("openapi"))


@pytest.fixture
def shared_client(shared_app):
    return shared_app.test_client()


class SentRequest(WerkzeugOpenAPIRequest):
    """The test client's request as openapi-core sees it; the app has consumed the body stream,
    so the body is the bytes the test sent."""

    def __init__(self, request, body: bytes = b"") -> None:
        super().__init__(request)
        self._body = body

    @property
    def body(self) -> bytes:
        return self._body


def post(client, path: str, body: object, **kwargs):
    """POST `body` as JSON, remembering the bytes sent so the request can be validated too."""
    data = json.dumps(body).encode()
    response = client.post(path, data=data, content_type="application/json", **kwargs)
    response.sent_body = data
    return response


def conforms(openapi: OpenAPI, response) -> None:
    """Raise (failing the test) unless `response` is what the spec says this request may get."""
    __tracebackhide__ = True
    request = SentRequest(response.request, getattr(response, "sent_body", b""))
    openapi.validate_response(request, WerkzeugOpenAPIResponse(response))


def request_conforms(openapi: OpenAPI, response) -> None:
    """Raise unless the request that got `response` is valid per the spec (body, path, parameters)."""
    __tracebackhide__ = True
    request = SentRequest(response.request, response.sent_body)
    # Security is checked only when the test sent credentials: these tests run with auth disabled.
    validators = [V31RequestBodyValidator, V31RequestParametersValidator]
    if "Authorization" in response.request.headers:
        validators.append(V31RequestSecurityValidator)
    for validator in validators:
        validator(openapi.spec).validate(request)


def hook_request(app, fixture: str) -> dict:
    """The request an EHR honouring every prefetch template sends for a fixture scenario."""
    templates = prefetch_templates(app.extensions["calcinosis"].rules.current, app.config["PREFETCH_COUNT"])
    (case,) = load_cases([FIXTURES / fixture])
    return copy.deepcopy(hook_request_for(case, templates, HOOK_INSTANCE))


class FailingSession(requests.Session):
    """An HTTP session whose every request fails as if the network were down."""

    def get(self, *args, **kwargs):  # noqa: D401 - requests API
        raise requests.ConnectionError("network is down (test)")


# ------------------------------------------------------------------ the document itself


def test_spec_is_a_valid_openapi_3_1_document():
    spec = load_spec()
    assert spec["openapi"].startswith("3.1.")
    # Both raise OpenAPIValidationError on any structural mistake; the first also picks the version itself.
    validate_spec(spec, base_uri=SPEC_PATH.as_uri())
    validate_spec(spec, base_uri=SPEC_PATH.as_uri(), cls=OpenAPIV31SpecValidator)


def test_every_route_of_the_app_is_in_the_spec_and_vice_versa(app):
    """No endpoint is served undocumented, and the spec documents no endpoint that does not exist."""
    spec_operations = {
        (path, method.upper())
        for path, item in load_spec()["paths"].items()
        for method in item
        if method in ("get", "post", "put", "patch", "delete", "options")
    }
    app_operations = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = rule.rule.replace("<service_id>", "{id}").replace("<rule_id>", "{ruleId}")
        assert "<" not in path, f"unmapped path parameter in {rule.rule}"
        # HEAD is implied by GET; OPTIONS is documented only where CORS needs it.
        app_operations |= {(path, m) for m in rule.methods - {"HEAD", "OPTIONS"}}
    spec_without_options = {op for op in spec_operations if op[1] != "OPTIONS"}
    assert app_operations == spec_without_options
    cds_paths = {path for path, _ in app_operations if path.startswith("/cds-services")}
    assert {path for path, method in spec_operations if method == "OPTIONS"} == cds_paths


def test_the_validator_catches_a_spec_that_disagrees_with_the_service(app, client):
    """Guard against vacuous validation: a deliberately wrong spec must reject a real response."""
    from openapi_core.validation.response.exceptions import InvalidData, MissingRequiredHeader

    response = post(client, URL, hook_request(app, "esrd-skin-ulcer-scleroderma.json"))
    assert response.status_code == 200 and response.json["cards"]

    too_short = load_spec()
    too_short["components"]["schemas"]["Card"]["properties"]["summary"]["maxLength"] = 10
    with pytest.raises(InvalidData):
        conforms(OpenAPI.from_dict(too_short), response)

    renamed = load_spec()
    headers = renamed["paths"]["/cds-services/{id}"]["post"]["responses"]["200"]["headers"]
    headers["X-Calcinosis-Ruleset"] = headers.pop("X-Calcinosis-Rules")
    with pytest.raises(MissingRequiredHeader):
        conforms(OpenAPI.from_dict(renamed), response)


# ------------------------------------------------------------------ discovery


def test_discovery_conforms(openapi, client):
    response = client.get("/cds-services")
    assert response.status_code == 200
    conforms(openapi, response)
    assert [s["id"] for s in response.json["services"]] == ["calcinosis-risk", "calcinosis-order-select", "calcinosis-order-sign"]


# ------------------------------------------------------------------ invocation


@pytest.mark.parametrize("fixture", FIXTURE_FILES)
def test_invocation_with_each_fixture_conforms(openapi, shared_app, shared_client, fixture):
    """Every scenario's request is a valid request per the spec, and its answer a valid answer."""
    body = hook_request(shared_app, fixture)
    response = post(shared_client, URL, body)
    assert response.status_code == 200, response.json
    # The request side too: the fixture-built request must satisfy the documented request schema.
    request_conforms(openapi, response)
    conforms(openapi, response)


def test_invocation_with_suggestions_conforms(openapi, app, client):
    """A scenario whose cards carry suggestions, actions and selectionBehavior."""
    response = post(client, URL, hook_request(app, "esrd-skin-ulcer-scleroderma.json"))
    conforms(openapi, response)
    cards = response.json["cards"]
    assert any(card.get("suggestions") for card in cards)
    assert response.headers["X-Calcinosis-Rules"] == app.extensions["calcinosis"].rules.current.fingerprint


def test_invocation_answered_from_the_fhir_server_conforms(openapi, tmp_path):
    """A missing prefetch key fetched from fhirServer (here: a server with nothing on file)."""

    class EmptyFhirServer(requests.Session):
        def get(self, url, *args, **kwargs):
            response = requests.Response()
            response.status_code = 200 if "?" in url else 404
            response._content = json.dumps({"resourceType": "Bundle", "type": "searchset", "entry": []}).encode()
            return response

    app = make_app(tmp_path, HTTP_SESSION=EmptyFhirServer())
    client = app.test_client()
    body = hook_request(app, "esrd-dialysis-high-product.json")
    body.pop("prefetch")
    body["fhirServer"] = "http://127.0.0.1:8/fhir"
    body["fhirAuthorization"] = {
        "access_token": "opaque", "token_type": "Bearer", "expires_in": 300, "scope": "user/*.read", "subject": "calcinosis-cds",
    }
    response = post(client, URL, body)
    assert response.status_code == 200, response.json
    request_conforms(openapi, response)
    conforms(openapi, response)


def test_invalid_resources_are_reported_in_a_header_that_conforms(openapi, shared_app, shared_client):
    body = hook_request(shared_app, "esrd-dialysis-high-product.json")
    broken = {"resourceType": "Observation", "id": "broken", "status": "final", "code": {"coding": "not-a-list"}}
    body["prefetch"]["observations"]["entry"].append({"resource": broken})
    response = post(shared_client, URL, body)
    assert response.status_code == 200
    assert response.headers.get("X-Calcinosis-Skipped-Resources") == "1"
    conforms(openapi, response)


@pytest.mark.parametrize("payload", [b"", b"{not json", b"\xff\xfe"], ids=["empty", "broken", "not-utf8"])
def test_malformed_json_is_a_documented_400(openapi, shared_client, payload):
    response = shared_client.post(URL, data=payload, content_type="application/json")
    assert response.status_code == 400
    assert response.json["error"]["code"] == "malformed_json"
    conforms(openapi, response)


def test_hook_mismatch_is_a_documented_400(openapi, shared_app, shared_client):
    body = hook_request(shared_app, "esrd-dialysis-high-product.json")
    body["hook"] = "order-sign"
    response = post(shared_client, URL, body)
    assert response.status_code == 400
    assert response.json["error"] == {"code": "hook_mismatch", "message": response.json["error"]["message"], "field": "hook"}
    conforms(openapi, response)


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda b: b["context"].pop("patientId"), "context.patientId"),
        (lambda b: b.update(fhirServer="ftp://127.0.0.1/fhir"), "fhirServer"),
        (lambda b: b["prefetch"].update(patient=[1, 2]), "prefetch.patient"),
        (lambda b: b.update(context="pt-1"), "context"),
    ],
    ids=["no-patientId", "ftp-fhirServer", "prefetch-not-a-resource", "context-not-object"],
)
def test_invalid_request_is_a_documented_400(openapi, shared_app, shared_client, change, field):
    body = hook_request(shared_app, "esrd-dialysis-high-product.json")
    change(body)
    response = post(shared_client, URL, body)
    assert response.status_code == 400
    assert response.json["error"]["code"] == "invalid_request" and response.json["error"]["field"] == field
    conforms(openapi, response)


def test_unknown_service_is_a_documented_404(openapi, shared_app, shared_client):
    response = post(shared_client, "/cds-services/no-such-service", hook_request(shared_app, "esrd-dialysis-high-product.json"))
    assert response.status_code == 404
    assert response.json["error"]["code"] == "unknown_service"
    conforms(openapi, response)


def test_no_prefetch_and_no_fhir_server_is_a_documented_412(openapi, shared_app, shared_client):
    body = hook_request(shared_app, "esrd-dialysis-high-product.json")
    body.pop("prefetch")
    response = post(shared_client, URL, body)
    assert response.status_code == 412
    error = response.json["error"]
    assert error["code"] == "prefetch_unavailable"
    assert {m["key"] for m in error["missing"]} == set(prefetch_templates(shared_app.extensions["calcinosis"].rules.current, shared_app.config["PREFETCH_COUNT"]))
    conforms(openapi, response)


def test_unreachable_fhir_server_is_a_documented_412(openapi, tmp_path):
    app = make_app(tmp_path, HTTP_SESSION=FailingSession())
    client = app.test_client()
    body = hook_request(app, "esrd-dialysis-high-product.json")
    del body["prefetch"]["observations"]
    body["fhirServer"] = "http://127.0.0.1:8/fhir"
    response = post(client, URL, body)
    assert response.status_code == 412
    assert [m["key"] for m in response.json["error"]["missing"]] == ["observations"]
    conforms(openapi, response)


def test_body_over_the_configured_maximum_is_a_documented_413(openapi, tmp_path):
    client = make_app(tmp_path, MAX_CONTENT_LENGTH=2048).test_client()
    body = {"hook": "patient-view", "hookInstance": HOOK_INSTANCE, "context": {"patientId": "p", "userId": "u"}, "padding": "x" * 4096}
    response = post(client, URL, body)
    assert response.status_code == 413
    assert response.json["error"]["code"] == "payload_too_large"
    conforms(openapi, response)


def test_an_untrusted_fhir_server_is_a_documented_400(openapi, tmp_path):
    app = make_app(tmp_path, FHIR_SERVERS="http://127.0.0.1:9")
    body = hook_request(app, "esrd-dialysis-high-product.json")
    body["fhirServer"] = "http://127.0.0.1:8/fhir"
    response = post(app.test_client(), URL, body)
    assert response.status_code == 400 and response.json["error"]["code"] == "untrusted_fhir_server"
    conforms(openapi, response)


def test_too_many_feedback_items_is_a_documented_400(openapi, client):
    item = {"card": "c", "outcome": "overridden", "outcomeTimestamp": "2026-11-01T12:00:00Z"}
    response = post(client, FEEDBACK_URL, {"feedback": [item] * 101})
    assert response.status_code == 400 and response.json["error"]["code"] == "too_many_items"
    conforms(openapi, response)


def test_unexpected_failure_is_a_documented_500(openapi, app, client, monkeypatch):
    from service.cds_hooks import hooks

    def explode(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(hooks, "answer", explode)
    response = post(client, URL, hook_request(app, "esrd-dialysis-high-product.json"))
    assert response.status_code == 500
    assert response.json["error"]["code"] == "internal_error"
    conforms(openapi, response)


# ------------------------------------------------------------------ authentication enabled

ISSUER = "https://ehr.example.org"


@pytest.fixture(scope="module")
def signing_key():
    return ec.generate_private_key(ec.SECP384R1())


def client_jwt(key, aud: str) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": aud, "exp": now + 300, "iat": now, "jti": str(uuid.uuid4())}
    return jwt.encode(claims, key, algorithm="ES384", headers={"kid": "ehr-key-1", "typ": "JWT"})


def secured_app(tmp_path: Path, key, *, remote_keys: bool = False, **overrides):
    public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key())) | {"kid": "ehr-key-1", "alg": "ES384"}
    issuer = {"jwks_url": ISSUER + "/.well-known/jwks.json"} if remote_keys else {"jwks": {"keys": [public]}}
    issuers = tmp_path / "issuers.json"
    issuers.write_text(json.dumps({ISSUER: issuer}))
    return make_app(tmp_path, AUTH="enabled", TRUSTED_ISSUERS=str(issuers), **overrides)


@pytest.mark.parametrize("path", [URL, FEEDBACK_URL])
@pytest.mark.parametrize("authorization", [None, "Bearer not-a-jwt", "Basic dXNlcjpwdw=="], ids=["none", "garbage", "basic"])
def test_missing_or_refused_client_jwt_is_a_documented_401(openapi, tmp_path, signing_key, path, authorization):
    app = secured_app(tmp_path, signing_key)
    headers = {"Authorization": authorization} if authorization else {}
    response = post(app.test_client(), path, {"hook": "patient-view"}, headers=headers)
    assert response.status_code == 401
    assert response.json["error"]["code"] in ("missing_token", "invalid_token")
    conforms(openapi, response)


def test_a_valid_client_jwt_gets_a_documented_200(openapi, tmp_path, signing_key):
    app = secured_app(tmp_path, signing_key)
    body = hook_request(app, "esrd-dialysis-high-product.json")
    bearer = client_jwt(signing_key, "https://cds.example.org" + URL)
    response = post(app.test_client(), URL, body, headers={"Authorization": f"Bearer {bearer}"})
    assert response.status_code == 200, response.json
    conforms(openapi, response)


def test_client_keys_that_cannot_be_fetched_are_a_documented_503(openapi, tmp_path, signing_key):
    app = secured_app(tmp_path, signing_key, remote_keys=True, HTTP_SESSION=FailingSession())
    bearer = client_jwt(signing_key, "https://cds.example.org" + URL)
    response = post(app.test_client(), URL, hook_request(app, "esrd-dialysis-high-product.json"), headers={"Authorization": f"Bearer {bearer}"})
    assert response.status_code == 503
    assert response.json["error"]["code"] == "auth_unavailable"
    conforms(openapi, response)


# ------------------------------------------------------------------ feedback


def test_feedback_conforms(openapi, app):
    client = app.test_client()
    cards = post(client, URL, hook_request(app, "esrd-skin-ulcer-scleroderma.json")).json["cards"]
    card = next(c for c in cards if c.get("suggestions"))
    body = {
        "feedback": [
            {
                "card": card["uuid"],
                "outcome": "accepted",
                "acceptedSuggestions": [{"id": card["suggestions"][0]["uuid"]}],
                "outcomeTimestamp": "2026-11-01T12:03:10Z",
            },
            {
                "card": "not-a-card-we-issued",
                "outcome": "overridden",
                "overrideReason": {"reason": {"system": "urn:example:reasons", "code": "known", "display": "Already known"}, "userComment": "seen"},
                "outcomeTimestamp": "2026-11-01T12:04:00+02:00",
            },
        ]
    }
    response = post(client, FEEDBACK_URL, body)
    assert response.status_code == 200, response.json
    assert response.json == {"stored": 2, "unknownCards": ["not-a-card-we-issued"]}
    request_conforms(openapi, response)
    conforms(openapi, response)


@pytest.mark.parametrize(
    "body",
    [
        {"feedback": []},
        {"feedback": [{"card": "c", "outcome": "accepted", "outcomeTimestamp": "2026-11-01T12:00:00Z"}]},
        {"feedback": [{"card": "c", "outcome": "overridden", "outcomeTimestamp": "2026-11-01"}]},
        [],
    ],
    ids=["empty", "accepted-without-suggestions", "date-only", "not-an-object"],
)
def test_invalid_feedback_is_a_documented_400(openapi, app, body):
    response = post(app.test_client(), FEEDBACK_URL, body)
    assert response.status_code == 400
    assert response.json["error"]["code"] == "invalid_feedback"
    conforms(openapi, response)


def test_feedback_that_is_not_json_is_a_documented_400(openapi, app):
    response = app.test_client().post(FEEDBACK_URL, data=b"{", content_type="application/json")
    assert response.status_code == 400
    assert response.json["error"]["code"] == "malformed_json"
    conforms(openapi, response)


def test_feedback_for_an_unknown_service_is_a_documented_404(openapi, app):
    response = post(app.test_client(), "/cds-services/nope/feedback", {"feedback": []})
    assert response.status_code == 404
    conforms(openapi, response)


# ------------------------------------------------------------------ CORS preflight


@pytest.mark.parametrize("path", ["/cds-services", URL, FEEDBACK_URL])
def test_preflight_conforms_and_allows_browser_clients(openapi, shared_client, path):
    response = shared_client.options(
        path, headers={"Origin": "https://sandbox.example.org", "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}
    )
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "authorization" in response.headers["Access-Control-Allow-Headers"].lower()
    conforms(openapi, response)


# ------------------------------------------------------------------ operations


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/status", "/rules/calciphylaxis-risk"])
def test_operational_endpoints_conform(openapi, shared_client, path):
    response = shared_client.get(path)
    assert response.status_code == 200
    conforms(openapi, response)


def test_metrics_conform(openapi, app, client):
    client.get("/cds-services")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    conforms(openapi, response)


def test_unknown_rule_page_is_a_documented_404(openapi, shared_client):
    response = shared_client.get("/rules/no-such-rule")
    assert response.status_code == 404
    assert response.json["error"]["code"] == "unknown_rule"
    conforms(openapi, response)


def test_not_ready_is_a_documented_503(openapi, app, client, monkeypatch):
    ext = app.extensions["calcinosis"]
    monkeypatch.setattr(type(ext.rules), "current", property(lambda self: _without_rules(self._current)))
    response = client.get("/readyz")
    assert response.status_code == 503
    conforms(openapi, response)


def _without_rules(ruleset):
    import dataclasses

    return dataclasses.replace(ruleset, rules=())


def test_status_after_a_refused_reload_conforms(openapi, tmp_path):
    import shutil

    rules = tmp_path / "rules"
    shutil.copytree(RULES, rules)
    app = make_app(tmp_path, RULES_DIR=str(rules))
    (rules / "calciphylaxis-risk.yaml").write_text("id: [this is not a rule\n")
    assert app.extensions["calcinosis"].rules.refresh(force=True) is False
    response = app.test_client().get("/status")
    assert response.json["rules"]["last_reload_errors"]
    conforms(openapi, response)


ORDER_FIXTURES = sorted(p.name for p in (FIXTURES / "orders").glob("*.json"))


@pytest.mark.parametrize("fixture", ORDER_FIXTURES)
def test_order_hook_invocation_conforms(openapi, shared_client, fixture):
    """Each order-hook fixture is a valid request per the spec, and its answer (cards, actions) a valid answer."""
    body = json.loads((FIXTURES / "orders" / fixture).read_text())
    url = "/cds-services/calcinosis-" + body["hook"]
    response = post(shared_client, url, body)
    assert response.status_code == 200, response.json
    request_conforms(openapi, response)
    conforms(openapi, response)


def test_order_hook_errors_conform(openapi, shared_client):
    body = json.loads((FIXTURES / "orders" / "punch-biopsy-select-livedo.json").read_text())
    body["context"]["selections"] = ["ServiceRequest/not-there"]
    response = post(shared_client, "/cds-services/calcinosis-order-select", body)
    assert response.status_code == 400 and response.json["error"]["code"] == "unknown_selection"
    conforms(openapi, response)
