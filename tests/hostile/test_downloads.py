"""Downloads from the EHR's FHIR server and the client's JWKS are bounded in time and bytes, whatever the server does.

Each test runs a misbehaving server on 127.0.0.1 (tests/hostile/servers.py) and checks the
answer a CDS client gets: a 412 naming only a category, within the budget, and the detail in the log.
"""
from __future__ import annotations

import time

import orjson
import pytest

from service.bounded_http import bounded_session
from service.cds_hooks.auth import AuthenticationError, ClientAuthenticator, TrustedIssuer, TrustedIssuers
from tests.conftest import make_app
from tests.fhir_server import searchset
from tests.requests_builder import request_without_prefetch, scenario

from . import servers

URL = "/cds-services/calcinosis-risk"
NAME = "esrd-dialysis-high-product.json"


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """100 MB of valid JSON in about 100 kB of gzip."""
    compressed = servers.gzip_bomb(100)
    assert len(compressed) < 1024 * 1024
    return compressed


def hook_call(app, fhir_server: str):
    request = request_without_prefetch(NAME)
    request["fhirServer"] = fhir_server
    started = time.monotonic()
    response = app.test_client().post(URL, json=request)
    return response, time.monotonic() - started


def answer_from_scenario(handler) -> None:
    """A well-behaved FHIR server for the scenario: Patient read, Observation and Condition searches."""
    resources = scenario(NAME).resources
    kind = handler.path.split("/fhir/", 1)[1].split("?")[0].split("/")[0]
    if kind == "Patient":
        servers.send(handler, orjson.dumps(next(r for r in resources if r["resourceType"] == "Patient")))
    else:
        servers.send(handler, orjson.dumps(searchset([r for r in resources if r["resourceType"] == kind])))


@pytest.mark.parametrize("trickle", [servers.trickle_body, servers.trickle_headers], ids=["body", "headers"])
def test_a_server_trickling_one_byte_every_two_seconds_gives_412_within_the_budget(tmp_path, log_lines, trickle):
    app = make_app(tmp_path, FHIR_BUDGET=2.0, FHIR_TIMEOUT=5.0)
    with servers.serve(trickle) as (origin, _):
        response, elapsed = hook_call(app, origin + "/fhir")
    assert response.status_code == 412
    assert elapsed < 2.0 + 1.0
    assert {m["reason"] for m in response.json["error"]["missing"]} == {"not in prefetch; FHIR server: timeout"}
    assert {line["category"] for line in log_lines() if line.get("event") == "fhir_fallback_failed"} == {"timeout"}


def test_a_100_mb_page_is_refused_as_too_large_without_reading_it_all(tmp_path, log_lines):
    app = make_app(tmp_path)  # the default cap, 32 MB
    with servers.serve(lambda h: servers.chunked(h, servers.huge_bundle(100))) as (origin, _):
        response, elapsed = hook_call(app, origin + "/fhir")
    assert response.status_code == 412
    assert {m["reason"] for m in response.json["error"]["missing"]} == {"not in prefetch; FHIR server: too_large"}
    failures = [line for line in log_lines() if line.get("event") == "fhir_fallback_failed"]
    assert failures and all(line["reason"].startswith("response_too_large") for line in failures)
    assert elapsed < 10


def test_a_gzip_bomb_is_counted_after_decompression_and_refused(tmp_path, bomb):
    app = make_app(tmp_path, FHIR_MAX_BYTES=8 * 1024 * 1024)
    with servers.serve(lambda h: servers.send(h, bomb, headers={"Content-Encoding": "gzip"})) as (origin, _):
        response, _ = hook_call(app, origin + "/fhir")
    assert response.status_code == 412
    assert {m["reason"] for m in response.json["error"]["missing"]} == {"not in prefetch; FHIR server: too_large"}


def test_a_page_under_the_cap_is_read_whole(tmp_path):
    app = make_app(tmp_path, FHIR_MAX_BYTES=64 * 1024)
    with servers.serve(answer_from_scenario) as (origin, _):
        response, _ = hook_call(app, origin + "/fhir")
    assert response.status_code == 200 and response.json["cards"]


def test_a_redirect_to_another_origin_is_not_followed(tmp_path, log_lines):
    app = make_app(tmp_path)
    with servers.serve(answer_from_scenario) as (elsewhere, asked_elsewhere):
        redirect = lambda h: servers.send(h, b"", status=302, headers={"Location": elsewhere + h.path})  # noqa: E731
        with servers.serve(redirect) as (origin, _):
            response, _ = hook_call(app, origin + "/fhir")
    assert response.status_code == 412
    assert {m["reason"] for m in response.json["error"]["missing"]} == {"not in prefetch; FHIR server: http_error"}
    assert asked_elsewhere == []
    assert any("another origin" in line.get("reason", "") for line in log_lines())


def test_a_redirect_within_the_same_origin_is_followed(tmp_path):
    def moved(handler) -> None:
        if handler.path.startswith("/old/"):
            servers.send(handler, b"", status=301, headers={"Location": handler.path.replace("/old/", "/fhir/", 1)})
        else:
            answer_from_scenario(handler)

    app = make_app(tmp_path)
    with servers.serve(moved) as (origin, paths):
        response, _ = hook_call(app, origin + "/old")
    assert response.status_code == 200 and response.json["cards"]
    assert any(p.startswith("/fhir/Observation") for p in paths)


# --- the CDS client's JWKS -----------------------------------------------------------------------

def authenticator_for(jwks_url: str, **options) -> ClientAuthenticator:
    # Built directly: the trusted-issuers file accepts only https JWKS URLs, and these servers are plain http.
    issuers = TrustedIssuers([TrustedIssuer("https://ehr.example.org", jwks_url=jwks_url)])
    return ClientAuthenticator(issuers, session=bounded_session(), **options)


def some_token() -> str:
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec

    now = int(time.time())
    claims = {"iss": "https://ehr.example.org", "aud": "https://cds.example.org/x", "iat": now, "exp": now + 60, "jti": "j"}
    return jwt.encode(claims, ec.generate_private_key(ec.SECP384R1()), algorithm="ES384", headers={"kid": "k1"})


@pytest.mark.parametrize("trickle", [servers.trickle_body, servers.trickle_headers], ids=["body", "headers"])
def test_a_trickling_jwks_server_is_jwks_unavailable_within_the_budget(trickle):
    with servers.serve(trickle) as (origin, _):
        authenticator = authenticator_for(origin + "/jwks", jwks_budget=1.5)
        started = time.monotonic()
        with pytest.raises(AuthenticationError) as info:
            authenticator.authenticate("Bearer " + some_token(), "https://cds.example.org/x")
        elapsed = time.monotonic() - started
    assert info.value.code == "jwks_unavailable" and "timeout" in info.value.reason
    assert elapsed < 1.5 + 1.0


def test_a_gzip_bomb_jwks_is_jwks_unavailable(bomb):
    with servers.serve(lambda h: servers.send(h, bomb, headers={"Content-Encoding": "gzip"})) as (origin, _):
        with pytest.raises(AuthenticationError) as info:
            authenticator_for(origin + "/jwks").authenticate("Bearer " + some_token(), "https://cds.example.org/x")
    assert info.value.code == "jwks_unavailable" and "too_large" in info.value.reason
