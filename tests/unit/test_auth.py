"""Tests for CDS Client JWT authentication (CDS Hooks 2.0 "Trusting CDS Clients")."""

from __future__ import annotations

import json
import secrets
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
import requests
import responses
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from service.cds_hooks.auth import (
    AuthenticationError,
    ClientAuthenticator,
    ConfigurationError,
    MemoryReplayCache,
    ReplayCache,
    TrustedIssuers,
)

# The schemathesis pytest plugin imports a deprecated jsonschema name around every test call,
# which -W error turns into a failure unrelated to this module.

NOW = 1_700_000_000.0
ISS = "https://ehr.example.org/"
OTHER_ISS = "https://other-ehr.example.net/"
AUD = "https://cds.example.org/cds-services/calciphylaxis-risk"
# Mocked with `responses`; loopback-looking so that no test names a real host to fetch.
JWKS_URL = "https://127.0.0.1:8443/.well-known/jwks.json"
JKU_URL = "https://127.0.0.2:8443/jwks.json"
DROP = object()  # marks a claim or header to leave out of a token


class FakeClock:
    """A settable clock so expiry and caching can be tested without sleeping."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(frozen=True)
class SigningKey:
    """A CDS Client's key pair, its kid and the algorithm it signs with."""

    kid: str
    alg: str
    private: Any

    @property
    def public_jwk(self) -> dict[str, Any]:
        algorithm = ECAlgorithm if self.alg.startswith("ES") else RSAAlgorithm
        jwk = algorithm.to_jwk(self.private.public_key(), as_dict=True)
        return {**jwk, "kid": self.kid, "alg": self.alg, "use": "sig"}

    def sign(self, *, now: float = NOW, headers: dict[str, Any] | None = None, **claims: Any) -> str:
        payload = {
            "iss": ISS,
            "aud": AUD,
            "iat": int(now),
            "exp": int(now) + 300,
            "jti": uuid.uuid4().hex,
            "tenant": "2ddd6c3a-8e9a-44c6-a305-52111ad302a2",
            **claims,
        }
        header = {"kid": self.kid, **(headers or {})}
        return jwt.encode(
            {k: v for k, v in payload.items() if v is not DROP},
            self.private,
            algorithm=self.alg,
            headers={k: v for k, v in header.items() if v is not DROP},
        )


@pytest.fixture(scope="session")
def ec_key() -> SigningKey:
    return SigningKey("ec-2024", "ES384", ec.generate_private_key(ec.SECP384R1()))


@pytest.fixture(scope="session")
def rsa_key() -> SigningKey:
    return SigningKey("rsa-2024", "RS384", rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture(scope="session")
def rotated_key() -> SigningKey:
    return SigningKey("ec-2025", "ES384", ec.generate_private_key(ec.SECP384R1()))


@pytest.fixture(autouse=True)
def http():
    """Mock all HTTP; an unregistered URL raises ConnectionError, so no test reaches the network."""
    with responses.RequestsMock() as mock:
        yield mock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def issuers(ec_key: SigningKey) -> TrustedIssuers:
    return TrustedIssuers.from_mapping({
        ISS: {"jwks_url": JWKS_URL, "jku": [JKU_URL]},
        OTHER_ISS: {"jwks": {"keys": [ec_key.public_jwk]}},
    })


@pytest.fixture
def authenticator(issuers: TrustedIssuers, clock: FakeClock) -> ClientAuthenticator:
    return ClientAuthenticator(issuers, clock=clock)


def serve_jwks(http: responses.RequestsMock, *keys: SigningKey, url: str = JWKS_URL) -> None:
    http.get(url, json={"keys": [key.public_jwk for key in keys]})


def bearer(token: str) -> str:
    return f"Bearer {token}"


def rejection(
    authenticator: ClientAuthenticator, header: str | None, token: str | None = None, audience: Any = AUD
) -> AuthenticationError:
    """Authenticate expecting failure; also check the log reason does not leak the token."""
    with pytest.raises(AuthenticationError) as info:
        authenticator.authenticate(header, audience)
    error = info.value
    if token:
        for secret in (token, *(part for part in token.split(".") if len(part) >= 16)):
            assert secret not in error.reason
            assert secret not in str(error)
            assert secret not in repr(error)
    return error


def test_a_valid_es384_token_is_accepted_and_its_claims_returned(authenticator, http, ec_key):
    serve_jwks(http, ec_key)
    token = ec_key.sign(jti="nonce-1")

    claims = authenticator.authenticate(bearer(token), AUD)

    assert claims["iss"] == ISS
    assert claims["aud"] == AUD
    assert claims["jti"] == "nonce-1"
    assert claims["tenant"] == "2ddd6c3a-8e9a-44c6-a305-52111ad302a2"


def test_a_valid_rs384_token_is_accepted(authenticator, http, rsa_key):
    serve_jwks(http, rsa_key)

    assert authenticator.authenticate(bearer(rsa_key.sign()), AUD)["iss"] == ISS


def test_a_lowercase_bearer_scheme_is_accepted_because_auth_schemes_are_case_insensitive(
    authenticator, http, ec_key
):
    serve_jwks(http, ec_key)

    assert authenticator.authenticate(f"bearer {ec_key.sign()}", AUD)["iss"] == ISS


def test_an_aud_array_containing_the_endpoint_is_accepted(authenticator, http, ec_key):
    serve_jwks(http, ec_key)
    token = ec_key.sign(aud=[AUD])

    assert authenticator.authenticate(bearer(token), AUD)["aud"] == [AUD]


def test_the_expected_audience_may_be_a_list_of_endpoint_urls(authenticator, http, ec_key):
    serve_jwks(http, ec_key)
    token = ec_key.sign()

    claims = authenticator.authenticate(bearer(token), ["https://cds.example.org/cds-services", AUD])

    assert claims["aud"] == AUD


def test_a_token_for_another_endpoint_is_rejected(authenticator, http, ec_key):
    serve_jwks(http, ec_key)
    token = ec_key.sign(aud="https://cds.example.org/cds-services/some-other-service")

    assert rejection(authenticator, bearer(token), token).code == "invalid_audience"


def test_an_expired_token_is_rejected(authenticator, http, ec_key):
    serve_jwks(http, ec_key)
    token = ec_key.sign(now=NOW - 400, exp=int(NOW) - 31)

    assert rejection(authenticator, bearer(token), token).code == "token_expired"


def test_a_token_expired_less_than_the_leeway_ago_is_still_accepted(authenticator, http, ec_key):
    serve_jwks(http, ec_key)
    token = ec_key.sign(now=NOW - 300, exp=int(NOW) - 29)

    assert authenticator.authenticate(bearer(token), AUD)["exp"] == int(NOW) - 29


def test_a_token_issued_in_the_future_beyond_the_leeway_is_rejected(authenticator, http, ec_key):
    serve_jwks(http, ec_key)
    token = ec_key.sign(now=NOW + 3600)

    assert rejection(authenticator, bearer(token), token).code == "token_not_yet_valid"


def test_a_token_accepted_now_is_rejected_once_the_clock_passes_its_expiry(authenticator, http, clock, ec_key):
    serve_jwks(http, ec_key)
    authenticator.authenticate(bearer(ec_key.sign()), AUD)
    token = ec_key.sign()

    clock.advance(300 + 30)

    assert rejection(authenticator, bearer(token), token).code == "token_expired"


def test_a_token_from_an_unlisted_issuer_is_rejected_without_fetching_keys(authenticator, http, ec_key):
    token = ec_key.sign(iss="https://attacker.example.com/")

    assert rejection(authenticator, bearer(token), token).code == "untrusted_issuer"
    assert len(http.calls) == 0


def test_a_jku_not_on_the_issuers_allow_list_is_rejected_without_fetching_it(authenticator, http, ec_key):
    token = ec_key.sign(headers={"jku": "https://127.0.0.9/jwks.json"})

    assert rejection(authenticator, bearer(token), token).code == "untrusted_jku"
    assert len(http.calls) == 0


def test_an_allowed_jku_is_where_the_keys_are_fetched_from(authenticator, http, ec_key):
    serve_jwks(http, ec_key, url=JKU_URL)
    token = ec_key.sign(headers={"jku": JKU_URL})

    assert authenticator.authenticate(bearer(token), AUD)["iss"] == ISS
    assert [call.request.url for call in http.calls] == [JKU_URL]


def test_an_unsigned_alg_none_token_is_rejected(authenticator, ec_key):
    token = jwt.encode(
        {"iss": ISS, "aud": AUD, "iat": int(NOW), "exp": int(NOW) + 300, "jti": "x"},
        None,
        algorithm="none",
        headers={"kid": ec_key.kid},
    )

    assert rejection(authenticator, bearer(token), token).code == "algorithm_not_allowed"


def test_an_hmac_signed_token_is_rejected(authenticator, ec_key):
    token = jwt.encode(
        {"iss": ISS, "aud": AUD, "iat": int(NOW), "exp": int(NOW) + 300, "jti": "x"},
        secrets.token_bytes(64),
        algorithm="HS256",
        headers={"kid": ec_key.kid},
    )

    assert rejection(authenticator, bearer(token), token).code == "algorithm_not_allowed"


def test_a_token_with_a_tampered_payload_fails_signature_verification(authenticator, http, ec_key):
    serve_jwks(http, ec_key)
    genuine = ec_key.sign(aud="https://cds.example.org/cds-services/other")
    forged_payload = ec_key.sign().split(".")[1]
    header, _, signature = genuine.split(".")
    token = f"{header}.{forged_payload}.{signature}"

    assert rejection(authenticator, bearer(token), token).code == "invalid_signature"


def test_a_token_signed_by_another_key_claiming_a_trusted_kid_is_rejected(authenticator, http, ec_key):
    serve_jwks(http, ec_key)
    impostor = SigningKey(ec_key.kid, "ES384", ec.generate_private_key(ec.SECP384R1()))
    token = impostor.sign()

    assert rejection(authenticator, bearer(token), token).code == "invalid_signature"


def test_a_key_published_for_one_alg_is_not_used_with_another(authenticator, http, rsa_key):
    serve_jwks(http, rsa_key)
    token = SigningKey(rsa_key.kid, "RS256", rsa_key.private).sign()

    assert rejection(authenticator, bearer(token), token).code == "invalid_token"


def test_a_replayed_jti_is_refused_on_second_use(authenticator, http, ec_key):
    serve_jwks(http, ec_key)
    token = ec_key.sign()
    authenticator.authenticate(bearer(token), AUD)

    assert rejection(authenticator, bearer(token), token).code == "replayed_token"


def test_the_same_jti_from_two_issuers_is_not_a_replay(authenticator, http, ec_key):
    serve_jwks(http, ec_key)
    authenticator.authenticate(bearer(ec_key.sign(jti="shared")), AUD)

    assert authenticator.authenticate(bearer(ec_key.sign(iss=OTHER_ISS, jti="shared")), AUD)["iss"] == OTHER_ISS


def test_a_rejected_token_does_not_use_up_its_jti(authenticator, http, ec_key):
    serve_jwks(http, ec_key)
    rejection(authenticator, bearer(ec_key.sign(jti="j", aud="https://elsewhere.example.org/")))

    assert authenticator.authenticate(bearer(ec_key.sign(jti="j")), AUD)["jti"] == "j"


@pytest.mark.parametrize("header", [None, "", "   ", "Bearer", "Bearer   "])
def test_a_request_without_a_bearer_token_is_rejected_as_missing_token(authenticator, header):
    assert rejection(authenticator, header).code == "missing_token"


@pytest.mark.parametrize("scheme", ["Basic", "Token", ""])
def test_a_jwt_presented_without_the_bearer_scheme_is_rejected(authenticator, ec_key, scheme):
    token = ec_key.sign()

    assert rejection(authenticator, f"{scheme} {token}".strip(), token).code == "invalid_token"


@pytest.mark.parametrize("credentials", ["not-a-jwt", "a.b", "a.b.c.d", "e30.e30.sig!"])
def test_a_bearer_credential_that_is_not_a_jwt_is_rejected(authenticator, credentials):
    assert rejection(authenticator, bearer(credentials)).code == "invalid_token"


def test_a_token_without_kid_is_rejected(authenticator, ec_key):
    token = ec_key.sign(headers={"kid": DROP})

    assert rejection(authenticator, bearer(token), token).code == "invalid_token"


def test_a_token_whose_typ_is_not_jwt_is_rejected(authenticator, ec_key):
    token = ec_key.sign(headers={"typ": "at+jwt"})

    assert rejection(authenticator, bearer(token), token).code == "invalid_token"


@pytest.mark.parametrize("claim", ["aud", "exp", "iat", "jti"])
def test_a_token_missing_a_required_claim_is_rejected(authenticator, http, ec_key, claim):
    serve_jwks(http, ec_key)
    token = ec_key.sign(**{claim: DROP})

    assert rejection(authenticator, bearer(token), token).code == "invalid_claims"


def test_a_token_without_iss_is_rejected_before_any_key_fetch(authenticator, http, ec_key):
    token = ec_key.sign(iss=DROP)

    assert rejection(authenticator, bearer(token), token).code == "invalid_claims"
    assert len(http.calls) == 0


def test_the_jwks_is_fetched_once_and_cached_across_many_requests(authenticator, http, clock, ec_key, rsa_key):
    serve_jwks(http, ec_key, rsa_key)

    for _ in range(10):
        authenticator.authenticate(bearer(ec_key.sign()), AUD)
        authenticator.authenticate(bearer(rsa_key.sign()), AUD)
        clock.advance(10)

    assert len(http.calls) == 1
    assert http.calls[0].request.req_kwargs["timeout"] == (2, 5)


def test_the_jwks_is_fetched_again_once_the_cache_lifetime_has_passed(authenticator, http, clock, ec_key):
    serve_jwks(http, ec_key)
    authenticator.authenticate(bearer(ec_key.sign()), AUD)

    clock.advance(300)
    authenticator.authenticate(bearer(ec_key.sign(now=clock.now)), AUD)

    assert len(http.calls) == 2


def test_an_unknown_kid_triggers_one_refetch_and_then_succeeds(authenticator, http, clock, ec_key, rotated_key):
    serve_jwks(http, ec_key)
    serve_jwks(http, ec_key, rotated_key)
    authenticator.authenticate(bearer(ec_key.sign()), AUD)
    clock.advance(60)

    claims = authenticator.authenticate(bearer(rotated_key.sign(now=clock.now)), AUD)

    assert claims["iss"] == ISS
    assert len(http.calls) == 2


def test_unknown_kids_cause_at_most_one_refetch_per_ten_seconds(authenticator, http, clock, ec_key):
    serve_jwks(http, ec_key)
    authenticator.authenticate(bearer(ec_key.sign()), AUD)
    clock.advance(10)
    forged = [SigningKey(f"forged-{n}", "ES384", ec_key.private).sign(now=clock.now) for n in range(5)]

    codes = [rejection(authenticator, bearer(token), token).code for token in forged]
    clock.advance(9)
    codes.append(rejection(authenticator, bearer(forged[0])).code)

    assert codes == ["unknown_key"] * 6
    assert len(http.calls) == 2


@pytest.mark.parametrize(
    "failure",
    [
        # The 500 carries a usable JWK Set so that only the status check can reject it.
        lambda key: {"status": 500, "json": {"keys": [key.public_jwk]}},
        lambda key: {"body": requests.exceptions.ConnectTimeout("connect timed out")},
        lambda key: {"body": "<html>not json</html>"},
        lambda key: {"json": {"not": "a jwk set"}},
    ],
    ids=["http-500", "timeout", "not-json", "not-a-jwk-set"],
)
def test_a_broken_jwks_endpoint_is_reported_as_jwks_unavailable(authenticator, http, ec_key, failure):
    http.get(JWKS_URL, **failure(ec_key))
    token = ec_key.sign()

    assert rejection(authenticator, bearer(token), token).code == "jwks_unavailable"


def test_a_redirect_from_the_jwks_url_is_not_followed(authenticator, http, ec_key):
    elsewhere = "https://127.0.0.9/jwks.json"
    http.assert_all_requests_are_fired = False
    http.get(JWKS_URL, status=302, headers={"Location": elsewhere})
    serve_jwks(http, ec_key, url=elsewhere)
    token = ec_key.sign()

    assert rejection(authenticator, bearer(token), token).code == "jwks_unavailable"
    assert [call.request.url for call in http.calls] == [JWKS_URL]


def test_a_failed_jwks_fetch_is_not_retried_for_ten_seconds(authenticator, http, clock, ec_key):
    http.get(JWKS_URL, status=503)
    serve_jwks(http, ec_key)
    rejection(authenticator, bearer(ec_key.sign()))

    clock.advance(5)
    assert rejection(authenticator, bearer(ec_key.sign(now=clock.now))).code == "jwks_unavailable"
    assert len(http.calls) == 1

    clock.advance(5)
    assert authenticator.authenticate(bearer(ec_key.sign(now=clock.now)), AUD)["iss"] == ISS
    assert len(http.calls) == 2


def test_inline_jwks_verify_tokens_without_any_http_request(authenticator, http, ec_key):
    claims = authenticator.authenticate(bearer(ec_key.sign(iss=OTHER_ISS)), AUD)

    assert claims["iss"] == OTHER_ISS
    assert len(http.calls) == 0


def test_an_inline_key_verifies_a_token_whose_jku_is_not_allow_listed_without_fetching_it(authenticator, http, ec_key):
    # The CDS Hooks Sandbox always sends a jku; an operator who pinned its key inline must not need it.
    token = ec_key.sign(iss=OTHER_ISS, headers={"jku": "https://127.0.0.3/sandbox-jwks.json"})

    assert authenticator.authenticate(bearer(token), AUD)["iss"] == OTHER_ISS
    assert len(http.calls) == 0


def test_a_jku_that_is_not_allow_listed_is_refused_when_the_kid_is_not_pinned_inline(authenticator, http, rotated_key):
    token = rotated_key.sign(iss=OTHER_ISS, headers={"jku": "https://127.0.0.3/attacker-jwks.json"})

    assert rejection(authenticator, bearer(token), token).code == "untrusted_jku"
    assert len(http.calls) == 0


@pytest.mark.parametrize("sent", ["https://ehr.example.org", "https://ehr.example.org/"])
@pytest.mark.parametrize("configured", ["https://ehr.example.org", "https://ehr.example.org/"])
def test_the_issuer_matches_with_or_without_a_trailing_slash(clock, ec_key, configured, sent):
    authenticator = ClientAuthenticator(
        TrustedIssuers.from_mapping({configured: {"jwks": {"keys": [ec_key.public_jwk]}}}), clock=clock
    )

    assert authenticator.authenticate(bearer(ec_key.sign(iss=sent)), AUD)["iss"] == sent


def test_two_issuers_that_differ_only_by_a_trailing_slash_are_a_configuration_error(ec_key):
    inline = {"jwks": {"keys": [ec_key.public_jwk]}}
    with pytest.raises(ConfigurationError, match="trailing slash"):
        TrustedIssuers.from_mapping({"https://ehr.example.org": inline, "https://ehr.example.org/": inline})


def test_a_token_that_lives_longer_than_five_minutes_is_refused(authenticator, http, ec_key):
    token = ec_key.sign(iss=OTHER_ISS, exp=int(NOW) + 100 * 365 * 86400)

    error = rejection(authenticator, bearer(token), token)
    assert error.code == "invalid_claims" and "at most 300s" in error.reason


def test_the_token_lifetime_cap_is_configurable(issuers, clock, ec_key):
    authenticator = ClientAuthenticator(issuers, clock=clock, max_lifetime=3600)

    assert authenticator.authenticate(bearer(ec_key.sign(iss=OTHER_ISS, exp=int(NOW) + 3600)), AUD)
    token = ec_key.sign(iss=OTHER_ISS, exp=int(NOW) + 3601)
    assert rejection(authenticator, bearer(token), token).code == "invalid_claims"


def test_an_unknown_kid_for_an_inline_jwks_is_rejected(authenticator, rotated_key):
    token = rotated_key.sign(iss=OTHER_ISS)

    assert rejection(authenticator, bearer(token), token).code == "unknown_key"


@pytest.mark.parametrize("algorithms", [("ES384", "HS256"), ("none",), ()])
def test_configuring_a_symmetric_none_or_empty_algorithm_list_is_refused(issuers, algorithms):
    with pytest.raises(ConfigurationError):
        ClientAuthenticator(issuers, algorithms=algorithms)


def test_trusted_issuers_load_from_yaml(tmp_path, ec_key):
    path = tmp_path / "issuers.yaml"
    path.write_text(
        f"{ISS}:\n"
        f"  jwks_url: {JWKS_URL}\n"
        f"  jku:\n"
        f"    - {JKU_URL}\n"
        f"{OTHER_ISS}:\n"
        f"  jwks: {json.dumps({'keys': [ec_key.public_jwk]})}\n",
        encoding="utf-8",
    )

    issuers = TrustedIssuers.load(path)

    assert len(issuers) == 2
    assert issuers.get(ISS).jwks_url == JWKS_URL
    assert issuers.get(ISS).jku == (JKU_URL,)
    assert issuers.get(OTHER_ISS).jwks["keys"][0]["kid"] == ec_key.kid
    assert issuers.get("https://unknown.example.com/") is None


def test_trusted_issuers_load_from_json(tmp_path):
    path = tmp_path / "issuers.json"
    path.write_text(json.dumps({ISS: {"jwks_url": JWKS_URL}}), encoding="utf-8")

    issuers = TrustedIssuers.load(path)

    assert ISS in issuers
    assert issuers.get(ISS).jku == ()


@pytest.mark.parametrize(
    ("suffix", "content", "expected"),
    [
        (".json", '{"https://ehr.example.org/": ', "invalid JSON"),
        (".yaml", "https://ehr.example.org/: [unclosed", "invalid YAML"),
        (".yaml", "", "expected a mapping"),
        (".yaml", "- https://ehr.example.org/\n", "expected a mapping"),
        (".json", json.dumps({ISS: {"jwks_uri": JWKS_URL}}), f"issuer {ISS!r}: unknown field(s) ['jwks_uri']"),
        (".json", json.dumps({ISS: {"jwks_url": "http://ehr.example.org/jwks"}}), f"issuer {ISS!r}: jwks_url must"),
        (".json", json.dumps({ISS: {"jwks_url": JWKS_URL, "jku": JKU_URL}}), f"issuer {ISS!r}: jku must"),
        (".json", json.dumps({ISS: {}}), f"issuer {ISS!r}: no key source"),
        (".json", json.dumps({ISS: {"jwks_url": JWKS_URL, "jwks": {"keys": []}}}), f"issuer {ISS!r}: set either"),
        (".json", json.dumps({ISS: {"jwks": {"keys": [{"kty": "oct", "kid": "k", "k": "c2VjcmV0"}]}}}), "symmetric"),
        (".json", json.dumps({ISS: "https://ehr.example.org/jwks"}), f"issuer {ISS!r}: settings must be a mapping"),
    ],
    ids=[
        "bad-json", "bad-yaml", "empty", "a-list", "typo-field", "plain-http", "jku-not-list",
        "no-key-source", "both-sources", "hmac-key", "entry-not-mapping",
    ],
)
def test_a_broken_trusted_issuers_file_names_the_file_and_the_problem(tmp_path, suffix, content, expected):
    path = tmp_path / f"issuers{suffix}"
    path.write_text(content, encoding="utf-8")

    with pytest.raises(ConfigurationError) as info:
        TrustedIssuers.load(path)

    assert str(path) in str(info.value)
    assert expected in str(info.value)


def test_an_inline_private_key_is_refused_so_secrets_do_not_live_in_the_allow_list(tmp_path, ec_key):
    private_jwk = {**ECAlgorithm.to_jwk(ec_key.private, as_dict=True), "kid": ec_key.kid}
    path = tmp_path / "issuers.json"
    path.write_text(json.dumps({ISS: {"jwks": {"keys": [private_jwk]}}}), encoding="utf-8")

    with pytest.raises(ConfigurationError, match="private key material"):
        TrustedIssuers.load(path)


def test_a_missing_trusted_issuers_file_is_a_configuration_error(tmp_path):
    with pytest.raises(ConfigurationError, match="cannot read"):
        TrustedIssuers.load(tmp_path / "absent.yaml")


def test_the_memory_replay_cache_satisfies_the_replay_cache_protocol():
    assert isinstance(MemoryReplayCache(), ReplayCache)


def test_the_memory_replay_cache_forgets_a_jti_once_its_token_has_expired(clock):
    cache = MemoryReplayCache(clock=clock)
    assert cache.check_and_store(ISS, "a", NOW + 60) is True
    assert cache.check_and_store(ISS, "b", NOW + 600) is True
    assert cache.check_and_store(ISS, "a", NOW + 60) is False

    clock.advance(60)

    assert len(cache) == 1
    assert cache.check_and_store(ISS, "a", NOW + 120) is True
    assert cache.check_and_store(ISS, "b", NOW + 600) is False


def test_the_memory_replay_cache_admits_a_jti_only_once_under_concurrency():
    cache = MemoryReplayCache()
    barrier = threading.Barrier(16)
    results: list[bool] = []

    def attempt() -> None:
        barrier.wait()
        results.append(cache.check_and_store(ISS, "contended", 4_102_444_800.0))

    threads = [threading.Thread(target=attempt) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(results) == [False] * 15 + [True]


SPEC_EXAMPLE_TOKEN = (
    "eyJhbGciOiJFUzM4NCIsInR5cCI6IkpXVCIsImtpZCI6ImV4YW1wbGUta2lkIiwiamt1IjoiaHR0cHM6Ly9maGlyLWVoci5leGFtcGxlLmNv"
    "bS9qd2tfdXJpIn0.eyJpc3MiOiJodHRwczovL2ZoaXItZWhyLmV4YW1wbGUuY29tLyIsImF1ZCI6Imh0dHBzOi8vY2RzLmV4YW1wbGUub3Jn"
    "L2Nkcy1zZXJ2aWNlcy9zb21lLXNlcnZpY2UiLCJleHAiOjE0MjI1Njg4NjAsImlhdCI6MTMxMTI4MDk3MCwianRpIjoiZWUyMmIwMjEtZTFi"
    "Ny00NjExLWJhNWItOGVlYzZhMzNhYzFlIiwidGVuYW50IjoiMmRkZDZjM2EtOGU5YS00NGM2LWEzMDUtNTIxMTFhZDMwMmEyIn0.d1WfLjGRK"
    "lcWB94l9do4cM8REXeYJLL6SGUBO8VHZhfM8mwKYP70EMxJ67War4TQblEpaQrp11wx5p7oPFm2ETYgCicS84vXWEIYTdjooZdooCSDf2L8-i"
    "4awdoUwiEb"
)
SPEC_EXAMPLE_JWK = {
    "kty": "EC",
    "use": "sig",
    "crv": "P-384",
    "kid": "example-kid",
    "x": "46SDH7Znh821wblCBglA61sNE9ZrHYKKt3qRtRTmSXyOI_FIGBLWrWa0GPUkDCEk",
    "y": "XMcRuuoGW7CXjQdy-F5i3FeBE0x9hPLdeFdSoDd3ELmx404tLX0VRRcqzAsPhXcI",
    "alg": "ES384",
}


def test_the_example_token_from_the_cds_hooks_spec_is_accepted_while_it_was_valid(http):
    # The key is pinned inline, so the token's jku header (fhir-ehr.example.com) is never fetched;
    # the spec's example lives 3.5 years, far over the default lifetime cap.
    issuers = TrustedIssuers.from_mapping({"https://fhir-ehr.example.com/": {"jwks": {"keys": [SPEC_EXAMPLE_JWK]}}})
    authenticator = ClientAuthenticator(issuers, clock=FakeClock(1_400_000_000), max_lifetime=4 * 365 * 86400)

    claims = authenticator.authenticate(bearer(SPEC_EXAMPLE_TOKEN), "https://cds.example.org/cds-services/some-service")

    assert claims["jti"] == "ee22b021-e1b7-4611-ba5b-8eec6a33ac1e"
    assert claims["tenant"] == "2ddd6c3a-8e9a-44c6-a305-52111ad302a2"
