"""Server-side request forgery: a hook call may name only a trusted fhirServer, and links never follow Host.

Every FHIR server here is a thread on 127.0.0.1; "another origin" is another port.
"""
from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from service.cds_hooks.auth import ConfigurationError, TrustedIssuers
from tests.api.test_trust import jwks_for, token
from tests.conftest import make_app
from tests.requests_builder import request_with_prefetch, request_without_prefetch

from . import servers
from .test_downloads import NAME, URL, answer_from_scenario

ISSUER = "https://ehr.example.org"


@pytest.fixture(scope="module")
def key():
    return ec.generate_private_key(ec.SECP384R1())


@pytest.fixture
def trusted():
    with servers.serve(answer_from_scenario) as (origin, paths):
        yield origin, paths


@pytest.fixture
def stranger():
    """An internal address a caller would like the service to probe."""
    with servers.serve(answer_from_scenario) as (origin, paths):
        yield origin, paths


def secured_app(tmp_path, key, issuer_settings: dict, **overrides):
    issuers = tmp_path / "issuers.json"
    issuers.write_text(json.dumps({ISSUER: {"jwks": jwks_for(key), **issuer_settings}}))
    return make_app(tmp_path, AUTH="enabled", TRUSTED_ISSUERS=str(issuers), **overrides)


def post(app, body: dict, bearer: str | None = None):
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    return app.test_client().post(URL, json=body, headers=headers)


def without_prefetch(fhir_server: str) -> dict:
    request = request_without_prefetch(NAME)
    request["fhirServer"] = fhir_server
    return request


def test_a_fhir_server_not_listed_for_the_issuer_is_refused_before_any_fetch(tmp_path, key, trusted, stranger):
    app = secured_app(tmp_path, key, {"fhir_servers": [trusted[0]]})
    refused = post(app, without_prefetch(stranger[0] + "/fhir"), token(key))
    assert refused.status_code == 400
    assert refused.json["error"]["code"] == "untrusted_fhir_server" and refused.json["error"]["field"] == "fhirServer"
    assert stranger[1] == []
    accepted = post(app, without_prefetch(trusted[0] + "/fhir"), token(key))
    assert accepted.status_code == 200 and accepted.json["cards"]
    assert trusted[1]


def test_origins_compare_by_scheme_host_and_port_whatever_their_spelling(tmp_path, key, trusted):
    port = trusted[0].rsplit(":", 1)[1]
    app = secured_app(tmp_path, key, {"fhir_servers": [f"HTTP://127.0.0.1:{port}/"]})
    assert post(app, without_prefetch(f"http://127.0.0.1:{port}/fhir"), token(key)).status_code == 200
    # Userinfo does not make another host look like the trusted one.
    tricked = post(app, without_prefetch(f"http://127.0.0.1:{port}@127.0.0.1:1/fhir"), token(key))
    assert tricked.json["error"]["code"] == "untrusted_fhir_server"


def test_an_untrusted_fhir_server_is_refused_even_when_prefetch_is_complete(tmp_path, key, trusted, stranger):
    app = secured_app(tmp_path, key, {"fhir_servers": [trusted[0]]})
    request = request_with_prefetch(NAME)
    request["fhirServer"] = stranger[0] + "/fhir"
    assert post(app, request, token(key)).json["error"]["code"] == "untrusted_fhir_server"


def test_with_auth_disabled_cds_fhir_servers_is_the_allow_list(tmp_path, trusted, stranger):
    app = make_app(tmp_path, FHIR_SERVERS=f"{trusted[0]}, http://127.0.0.1:1")
    assert post(app, without_prefetch(stranger[0] + "/fhir")).json["error"]["code"] == "untrusted_fhir_server"
    assert stranger[1] == []
    assert post(app, without_prefetch(trusted[0] + "/fhir")).status_code == 200
    assert app.test_client().get("/status").json["fhir_servers"] == "allow-listed"


def test_no_allow_list_means_any_server_with_a_start_up_warning_and_a_status_flag(tmp_path, key, log_lines, stranger):
    app = secured_app(tmp_path, key, {})
    (warning,) = [line for line in log_lines() if line.get("event") == "fhir_servers_unrestricted"]
    assert warning["for"] == [ISSUER] and warning["level"] == "warning"
    assert app.test_client().get("/status").json["fhir_servers"] == "any"
    assert post(app, without_prefetch(stranger[0] + "/fhir"), token(key)).status_code == 200
    assert secured_app(tmp_path, key, {"fhir_servers": ["https://127.0.0.1"]}).test_client().get("/status").json["fhir_servers"] == "allow-listed"


@pytest.mark.parametrize("bad", [["https://127.0.0.1/fhir"], ["ftp://127.0.0.1"], [], "https://127.0.0.1"])
def test_fhir_servers_that_are_not_a_list_of_origins_are_a_configuration_error(key, bad):
    with pytest.raises(ConfigurationError, match="is not an origin|list of origins"):
        TrustedIssuers.from_mapping({ISSUER: {"jwks": jwks_for(key), "fhir_servers": bad}})


def test_a_bad_cds_fhir_servers_stops_start_up_naming_it(tmp_path):
    with pytest.raises(SystemExit, match="CDS_FHIR_SERVERS"):
        make_app(tmp_path, FHIR_SERVERS="http://127.0.0.1:8/fhir")


# --- audience and links never follow the Host header ------------------------------------------------

def test_with_auth_enabled_a_missing_public_base_url_stops_start_up_naming_it(tmp_path, key):
    with pytest.raises(SystemExit, match="CDS_PUBLIC_BASE_URL"):
        secured_app(tmp_path, key, {}, PUBLIC_BASE_URL="")


def test_a_token_for_the_host_the_caller_chose_is_refused_and_links_keep_the_public_url(tmp_path, key):
    app = secured_app(tmp_path, key, {})
    forged = token(key, aud="http://evil.example" + URL)
    refused = app.test_client().post(URL, json=request_with_prefetch(NAME), headers={"Host": "evil.example", "Authorization": f"Bearer {forged}"})
    assert refused.status_code == 401
    ok = app.test_client().post(URL, json=request_with_prefetch(NAME), headers={"Host": "evil.example", "Authorization": f"Bearer {token(key)}"})
    assert ok.status_code == 200
    assert all(card["source"]["url"].startswith("https://cds.example.org/") for card in ok.json["cards"])


def test_with_auth_disabled_links_follow_the_host_header_as_the_readme_says(tmp_path):
    app = make_app(tmp_path, PUBLIC_BASE_URL="")
    cards = app.test_client().post(URL, json=request_with_prefetch(NAME), headers={"Host": "demo.localhost:8080"}).json["cards"]
    assert cards and all(card["source"]["url"].startswith("http://demo.localhost:8080/rules/") for card in cards)
