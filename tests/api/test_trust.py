"""Trust and feedback over HTTP: JWT-verified CDS clients, durable feedback, health, metrics, no PHI in logs."""
from __future__ import annotations

import io
import json
import logging
import threading
import time
import uuid

import jwt
import pytest
import responses
from cryptography.hazmat.primitives.asymmetric import ec

from service.logs import JsonFormatter
from tests.conftest import make_app
from tests.requests_builder import request_with_prefetch

BASE = "https://cds.example.org"
URL = "/cds-services/calcinosis-risk"
ISSUER = "https://ehr.example.org"
JWKS_URL = "https://127.0.0.1:8443/.well-known/jwks.json"  # mocked with `responses`


@pytest.fixture(scope="module")
def key():
    return ec.generate_private_key(ec.SECP384R1())


def jwks_for(key, kid="ehr-key-1") -> dict:
    public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    return {"keys": [public | {"kid": kid, "use": "sig", "alg": "ES384"}]}


def token(key, *, aud=BASE + URL, iss=ISSUER, exp_in=300, jti=None, kid="ehr-key-1", alg="ES384", headers=None, signing_key=None) -> str:
    now = int(time.time())
    claims = {"iss": iss, "aud": aud, "exp": now + exp_in, "iat": now, "jti": jti or str(uuid.uuid4())}
    return jwt.encode(claims, signing_key or key, algorithm=alg, headers={"kid": kid, "typ": "JWT", **(headers or {})})


@pytest.fixture
def secured(tmp_path, key):
    issuers = tmp_path / "issuers.json"
    issuers.write_text(json.dumps({ISSUER: {"jwks": jwks_for(key)}}))
    return make_app(tmp_path, AUTH="enabled", TRUSTED_ISSUERS=str(issuers))


def call(app, bearer: str | None, url: str = URL, body: dict | None = None):
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    return app.test_client().post(url, json=body or request_with_prefetch("esrd-dialysis-high-product.json"), headers=headers)


def test_a_valid_es384_token_for_this_endpoint_is_accepted(secured, key):
    response = call(secured, token(key))
    assert response.status_code == 200 and response.json["cards"]


def test_a_missing_token_is_401_with_a_stable_code_and_no_detail(secured):
    response = call(secured, None)
    assert response.status_code == 401
    assert response.json["error"]["code"] == "missing_token"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "case",
    ["expired", "wrong_aud", "unknown_iss", "jku_not_allowed", "alg_none", "hmac", "tampered"],
)
def test_bad_tokens_are_refused_with_401(secured, key, case):
    if case == "expired":
        bad = token(key, exp_in=-600)
    elif case == "wrong_aud":
        bad = token(key, aud=BASE + "/cds-services")  # the discovery URL, not the service invoked
    elif case == "unknown_iss":
        bad = token(key, iss="https://stranger.example.com")
    elif case == "jku_not_allowed":
        # A kid that is not pinned inline, so the key would have to come from the jku.
        bad = token(key, kid="attacker-key", headers={"jku": "https://127.0.0.9/jwks.json"})
    elif case == "alg_none":
        bad = jwt.encode({"iss": ISSUER, "aud": BASE + URL, "exp": int(time.time()) + 300, "iat": int(time.time()), "jti": "x"}, None, algorithm="none", headers={"kid": "ehr-key-1"})
    elif case == "hmac":
        bad = token(key, alg="HS256", signing_key=b"a-shared-secret-that-is-long-enough-for-hs256")
    else:
        head, body, signature = token(key).split(".")
        claims = json.loads(jwt.utils.base64url_decode(body))
        claims["iss"] = ISSUER + "/other"
        bad = ".".join([head, jwt.utils.base64url_encode(json.dumps(claims).encode()).decode(), signature])
    response = call(secured, bad)
    assert response.status_code == 401, case
    assert response.json["error"]["code"] == "invalid_token"
    assert set(response.json["error"]) == {"code", "message"}


def test_a_replayed_jti_is_refused_even_by_another_worker(tmp_path, key):
    issuers = tmp_path / "issuers.json"
    issuers.write_text(json.dumps({ISSUER: {"jwks": jwks_for(key)}}))
    # Two app instances on one store stand for two gunicorn workers.
    first, second = (make_app(tmp_path, AUTH="enabled", TRUSTED_ISSUERS=str(issuers)) for _ in range(2))
    once = token(key)
    assert call(first, once).status_code == 200
    replay = call(second, once)
    assert replay.status_code == 401 and replay.json["error"]["code"] == "invalid_token"


def test_audience_uses_the_configured_public_base_url(tmp_path, key):
    issuers = tmp_path / "issuers.json"
    issuers.write_text(json.dumps({ISSUER: {"jwks": jwks_for(key)}}))
    app = make_app(tmp_path, AUTH="enabled", TRUSTED_ISSUERS=str(issuers), PUBLIC_BASE_URL="https://proxy.example.net/cds")
    assert call(app, token(key, aud="https://proxy.example.net/cds" + URL)).status_code == 200
    assert call(app, token(key)).status_code == 401


@responses.activate
def test_jwks_is_fetched_once_for_many_calls(tmp_path, key):
    responses.add(responses.GET, JWKS_URL, json=jwks_for(key))
    issuers = tmp_path / "issuers.yaml"
    issuers.write_text(f"{ISSUER}:\n  jwks_url: {JWKS_URL}\n")
    app = make_app(tmp_path, AUTH="enabled", TRUSTED_ISSUERS=str(issuers))
    for _ in range(5):
        assert call(app, token(key)).status_code == 200
    assert len(responses.calls) == 1


@responses.activate
def test_an_unreachable_jwks_is_503_not_a_silent_pass(tmp_path, key):
    responses.add(responses.GET, JWKS_URL, status=500)
    issuers = tmp_path / "issuers.yaml"
    issuers.write_text(f"{ISSUER}:\n  jwks_url: {JWKS_URL}\n")
    app = make_app(tmp_path, AUTH="enabled", TRUSTED_ISSUERS=str(issuers))
    response = call(app, token(key))
    assert response.status_code == 503 and response.json["error"]["code"] == "auth_unavailable"


def test_with_no_trusted_issuers_every_hook_call_is_refused(tmp_path, key):
    app = make_app(tmp_path, AUTH="enabled", TRUSTED_ISSUERS="")
    assert call(app, token(key)).status_code == 401
    assert app.test_client().get("/status").json["auth"] == "enabled"


def test_disabled_auth_is_announced_on_the_status_endpoint(client):
    assert client.get("/status").json["auth"] == "disabled"


def test_feedback_needs_a_token_when_auth_is_on(secured, key):
    body = {"feedback": [{"card": "x", "outcome": "overridden", "outcomeTimestamp": "2026-11-01T12:00:00Z"}]}
    assert secured.test_client().post(URL + "/feedback", json=body).status_code == 401
    response = secured.test_client().post(URL + "/feedback", json=body, headers={"Authorization": "Bearer " + token(key, aud=BASE + URL + "/feedback")})
    assert response.status_code == 200


# --- feedback ------------------------------------------------------------------------------

def issue_cards(client) -> list[dict]:
    cards = client.post(URL, json=request_with_prefetch("dialysis-livedo-high-product.json")).json["cards"]
    assert len(cards) == 2
    return cards


def test_feedback_is_tied_to_the_rule_and_survives_a_restart(tmp_path):
    app = make_app(tmp_path, UUID=lambda: str(uuid.uuid4()))
    cards = issue_cards(app.test_client())
    workup = next(c for c in cards if c["source"]["topic"]["code"] == "calciphylaxis-workup")
    risk = next(c for c in cards if c["source"]["topic"]["code"] == "calciphylaxis-risk")
    body = {"feedback": [
        {"card": workup["uuid"], "outcome": "accepted", "acceptedSuggestions": [{"id": workup["suggestions"][0]["uuid"]}], "outcomeTimestamp": "2026-11-01T12:05:00Z"},
        {"card": risk["uuid"], "outcome": "overridden", "overrideReason": {"reason": {"code": "aware", "system": "urn:x", "display": "Already aware"}}, "outcomeTimestamp": "2026-11-01T12:06:00Z"},
        {"card": "never-issued", "outcome": "overridden", "outcomeTimestamp": "2026-11-01T12:07:00Z"},
    ]}
    response = app.test_client().post(URL + "/feedback", json=body)
    assert response.status_code == 200
    assert response.json == {"stored": 3, "unknownCards": ["never-issued"]}
    restarted = make_app(tmp_path)
    report = {r.rule_id: r for r in restarted.extensions["calcinosis"].store.report()}
    assert report["calciphylaxis-workup"].accepted == 1
    assert report["calciphylaxis-risk"].overridden == 1
    assert any("Already aware" in reason for reason, _ in report["calciphylaxis-risk"].top_override_reasons)


def test_concurrent_feedback_from_many_threads_loses_nothing(tmp_path):
    app = make_app(tmp_path, UUID=lambda: str(uuid.uuid4()))
    card = issue_cards(app.test_client())[0]
    errors: list = []

    def post(n: int) -> None:
        client = app.test_client()
        for i in range(20):
            body = {"feedback": [{"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": f"2026-11-01T12:{n:02d}:{i:02d}Z"}]}
            if client.post(URL + "/feedback", json=body).status_code != 200:
                errors.append((n, i))

    threads = [threading.Thread(target=post, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    (row,) = [r for r in app.extensions["calcinosis"].store.report() if r.rule_id == card["source"]["topic"]["code"]]
    assert row.feedback_events == 160 and row.overridden == 1  # 160 events about one card


def test_a_bad_feedback_item_is_400_naming_its_index_and_field(client):
    body = {"feedback": [
        {"card": "a", "outcome": "overridden", "outcomeTimestamp": "2026-11-01T12:00:00Z"},
        {"card": "b", "outcome": "accepted", "outcomeTimestamp": "2026-11-01T12:00:00Z"},
    ]}
    response = client.post(URL + "/feedback", json=body)
    assert response.status_code == 400
    error = response.json["error"]
    assert error["code"] == "invalid_feedback" and error["index"] == 1 and error["field"] == "acceptedSuggestions"
    assert "feedback[1].acceptedSuggestions" in error["message"]


def test_feedback_report_command_prints_per_rule_counts(tmp_path, capsys):
    app = make_app(tmp_path, UUID=lambda: str(uuid.uuid4()))
    card = issue_cards(app.test_client())[0]
    app.test_client().post(URL + "/feedback", json={"feedback": [{"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-11-01T12:00:00Z"}]})
    from service.cli import feedback_main

    assert feedback_main(["report", "--database", f"sqlite:///{tmp_path / 'store.db'}"]) == 0
    out = capsys.readouterr().out
    assert card["source"]["topic"]["code"] in out and "calciphylaxis-workup" in out


# --- operations -----------------------------------------------------------------------------

def test_health_and_readiness_are_open_and_report_the_store(client):
    assert client.get("/healthz").json == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json["checks"] == {"rules": "ok", "store": "ok"}


def test_readiness_fails_when_the_store_is_unreachable(app):
    app.extensions["calcinosis"].store.close()
    response = app.test_client().get("/readyz")
    assert response.status_code == 503 and response.json["checks"]["store"].startswith("unreachable")


def test_metrics_count_requests_and_cards_by_rule(client):
    client.post(URL, json=request_with_prefetch("esrd-dialysis-high-product.json"))
    text = client.get("/metrics").get_data(as_text=True)
    assert 'cds_requests_total{endpoint="invoke",service="calcinosis-risk",status="200"}' in text
    assert 'cds_cards_total{indicator="warning",rule="calciphylaxis-risk"}' in text
    assert "cds_request_seconds_bucket" in text and "cds_rule_reloads_total" in text


def test_logs_carry_the_hook_instance_and_rules_but_never_patient_data_or_tokens(tmp_path, key):
    issuers = tmp_path / "issuers.json"
    issuers.write_text(json.dumps({ISSUER: {"jwks": jwks_for(key)}}))
    app = make_app(tmp_path, AUTH="enabled", TRUSTED_ISSUERS=str(issuers))
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("service")
    logger.addHandler(handler)
    try:
        request = request_with_prefetch("esrd-dialysis-high-product.json", hook_instance="hook-instance-7f3a")
        patient_id = "patient-ZX81-distinctive"
        request["context"]["patientId"] = patient_id
        request["prefetch"]["patient"]["id"] = patient_id
        for entry in request["prefetch"]["observations"]["entry"] + request["prefetch"]["conditions"]["entry"]:
            entry["resource"]["subject"] = {"reference": f"Patient/{patient_id}"}
            if entry["resource"].get("valueQuantity", {}).get("value") == 10.4:
                entry["resource"]["valueQuantity"]["value"] = 10.4321
        request["fhirAuthorization"] = {"access_token": "fhir-token-SECRET-9931", "token_type": "Bearer"}
        request["fhirServer"] = "http://127.0.0.1:8/fhir"
        bearer = token(key)
        ok = call(app, bearer, body=request)
        assert [c["source"]["topic"]["code"] for c in ok.json["cards"]] == ["calciphylaxis-risk"]
        assert "sent as 10.4321 mg/dL" in ok.json["cards"][0]["detail"]  # the distinctive value was used...
        call(app, bearer, body=request)  # a replay: refused and logged
        call(app, "not-a-jwt-" + bearer[:20])
    finally:
        logger.removeHandler(handler)
    logged = stream.getvalue()
    assert "hook-instance-7f3a" in logged and "calciphylaxis-risk" in logged
    # ...and none of it, nor any credential, reached the log.
    for secret in (patient_id, "fhir-token-SECRET-9931", bearer, bearer.split(".")[2], "10.4321"):
        assert secret not in logged, secret


def test_a_seen_jti_is_kept_only_until_its_token_expires_plus_the_skew(secured, key):
    bearer = token(key, exp_in=120)
    assert call(secured, bearer).status_code == 200
    exp = jwt.decode(bearer, options={"verify_signature": False})["exp"]
    store = secured.extensions["calcinosis"].store
    with store._read() as cursor:  # noqa: SLF001 - the row itself is what is checked
        cursor.execute("SELECT expires_at FROM seen_jti")
        assert [row[0] for row in cursor.fetchall()] == [exp + 30]


def test_a_token_living_a_century_is_refused_and_leaves_no_jti_row(secured, key):
    response = call(secured, token(key, exp_in=100 * 365 * 86400))
    assert response.status_code == 401
    with secured.extensions["calcinosis"].store._read() as cursor:  # noqa: SLF001
        cursor.execute("SELECT COUNT(*) FROM seen_jti")
        assert cursor.fetchone()[0] == 0
