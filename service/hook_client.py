"""A CDS Hooks client, as an EHR calls the service: discovery, one signed POST per patient.

CDS Hooks 2.0: discovery (`GET {base}/cds-services`), calling a service (`POST
{base}/cds-services/{id}`), and "Trusting CDS Clients" (a JWT signed by the client, ES384 or
RS384). Used by `replay --url`; knows nothing about argument parsing or output.
"""
from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

SERVICE_ID = "calcinosis-risk"
# The service that answers each hook: a saved order-select / order-sign request replays against its own.
SERVICE_BY_HOOK = {"patient-view": SERVICE_ID, "order-select": "calcinosis-order-select", "order-sign": "calcinosis-order-sign"}
DEFAULT_TIMEOUT = 10.0
JWT_LIFETIME_SECONDS = 300  # CDS Hooks 2.0: exp SHOULD be no more than 5 minutes ahead


class HookClientError(Exception):
    """Something that stops the whole run (not one patient): unreadable key, no discovery."""


# --- what one case produced ----------------------------------------------------------------------

@dataclass
class Card:
    rule: str
    indicator: str
    summary: str


@dataclass
class Outcome:
    """One case's answer, from the engine in-process or from the service."""

    name: str
    patient: str | None
    source: str
    cards: list[Card] = field(default_factory=list)
    evaluated_at: str | None = None
    error: dict | None = None  # {"status": int | None, "code": str | None, "message": str}
    expected: list[str] | None = None  # None: no expectation (or --expect not asked for)
    invalid: list[str] = field(default_factory=list)  # --validate: "Type/id: problem" per invalid resource

    @property
    def fired(self) -> list[str]:
        return [c.rule for c in self.cards]

    @property
    def missing(self) -> list[str]:
        return [r for r in self.expected or () if r not in self.fired]

    @property
    def unexpected(self) -> list[str]:
        return [r for r in self.fired if self.expected is not None and r not in self.expected]

    @property
    def expectation(self) -> str:
        if self.expected is None:
            return "none"
        return "mismatch" if self.error or self.missing or self.unexpected else "ok"

    def to_json(self, with_expectation: bool) -> dict:
        body = {
            "case": self.name,
            "patient": self.patient,
            "source": self.source,
            "evaluated_at": self.evaluated_at,
            "rules": self.fired,
            "cards": [{"rule": c.rule, "indicator": c.indicator, "summary": c.summary} for c in self.cards],
            "error": self.error,
        }
        if self.invalid:
            body["invalid"] = self.invalid
        if with_expectation:
            body |= {"expectation": self.expectation, "expected": self.expected, "missing": self.missing, "unexpected": self.unexpected}
        return body


def _error(code: str, message: str, status: int | None = None) -> dict:
    return {"status": status, "code": code, "message": message}


# --- signing and calling --------------------------------------------------------------------------

class Signer:
    """Signs each hook call as an EHR would (CDS Hooks 2.0, "Trusting CDS Clients"); also SMART client assertions."""

    def __init__(self, pem_path: str, issuer: str, kid: str | None = None) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec, rsa

        try:
            key = serialization.load_pem_private_key(Path(pem_path).read_bytes(), password=None)
        except OSError as exc:
            raise HookClientError(f"--jwt-key {pem_path}: cannot read it ({exc.strerror or exc})") from None
        except (TypeError, ValueError) as exc:
            raise HookClientError(f"--jwt-key {pem_path}: not an unencrypted PEM private key ({exc})") from None
        if isinstance(key, rsa.RSAPrivateKey):
            self.algorithm = "RS384"
        elif isinstance(key, ec.EllipticCurvePrivateKey):
            # JWA binds each ES algorithm to one curve; ES384 (P-384) is the spec's recommendation.
            curves = {"secp384r1": "ES384", "secp256r1": "ES256", "secp521r1": "ES512"}
            if key.curve.name not in curves:
                raise HookClientError(f"--jwt-key {pem_path}: EC curve {key.curve.name} has no JWS algorithm; use P-384")
            self.algorithm = curves[key.curve.name]
        else:
            raise HookClientError(f"--jwt-key {pem_path}: a {type(key).__name__} cannot sign ES384 or RS384 tokens; use an EC P-384 or RSA key")
        self.key = key
        self.issuer = issuer
        self.kid = kid or jwk_thumbprint(key.public_key())

    def token(self, audience: str, subject: str | None = None, lifetime: int = JWT_LIFETIME_SECONDS) -> str:
        """A fresh JWT for `audience`; `subject` for a SMART Backend Services client assertion (sub = iss = client id)."""
        import jwt

        now = int(time.time())
        claims = {"iss": self.issuer, "aud": audience, "exp": now + lifetime, "iat": now, "jti": str(uuid.uuid4())}
        if subject is not None:
            claims["sub"] = subject
        return jwt.encode(claims, self.key, algorithm=self.algorithm, headers={"kid": self.kid, "typ": "JWT"})


def jwk_thumbprint(public_key) -> str:
    """RFC 7638 thumbprint of a public key: the default kid, stable for a key."""
    from jwt.algorithms import ECAlgorithm, RSAAlgorithm

    from cryptography.hazmat.primitives.asymmetric import rsa

    jwk = (RSAAlgorithm if isinstance(public_key, rsa.RSAPublicKey) else ECAlgorithm).to_jwk(public_key, as_dict=True)
    members = ("e", "kty", "n") if jwk["kty"] == "RSA" else ("crv", "kty", "x", "y")
    canonical = json.dumps({m: jwk[m] for m in members}, sort_keys=True, separators=(",", ":"))
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


class HookClient:
    """Discovery once, then one hook call per case; every call has a timeout."""

    def __init__(self, base_url: str, timeout: float, signer: Signer | None = None) -> None:
        import requests

        self.base = base_url.rstrip("/")
        self.endpoint = f"{self.base}/cds-services/{SERVICE_ID}"
        self.timeout = timeout
        self.signer = signer
        self.session = requests.Session()
        self.templates: dict[str, str] = {}
        self.offered: set[str] = set()

    def close(self) -> None:
        self.session.close()

    def discover(self) -> dict[str, str]:
        import requests

        url = f"{self.base}/cds-services"
        try:
            response = self.session.get(url, timeout=self.timeout, headers={"Accept": "application/json"})
        except requests.Timeout:
            raise HookClientError(f"discovery {url}: no answer within {self.timeout:g} s") from None
        except requests.RequestException as exc:
            raise HookClientError(f"discovery {url}: {type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            raise HookClientError(f"discovery {url}: HTTP {response.status_code} {_error_code(response) or ''}".rstrip())
        try:
            services = response.json()["services"]
            service = next(s for s in services if s.get("id") == SERVICE_ID)
        except (ValueError, KeyError, TypeError):
            raise HookClientError(f"discovery {url}: the answer is not a CDS Hooks discovery document") from None
        except StopIteration:
            raise HookClientError(f"discovery {url}: the service does not offer '{SERVICE_ID}'") from None
        self.templates = dict(service.get("prefetch") or {})
        self.offered = {s.get("id") for s in services if isinstance(s, dict)}
        return self.templates

    def call(self, case) -> Outcome:
        import requests

        from service.harness import hook_request_for

        outcome = Outcome(case.name, case.patient_id, case.source)
        service_id = SERVICE_BY_HOOK.get(case.hook)
        if service_id is None or service_id not in self.offered:
            outcome.error = _error("no_service", f"the service offers no '{service_id or case.hook}' service for hook {case.hook}")
            return outcome
        endpoint = f"{self.base}/cds-services/{service_id}"
        body = hook_request_for(case, self.templates, str(uuid.uuid4()))
        headers = {"Accept": "application/json"}
        if self.signer is not None:
            headers["Authorization"] = f"Bearer {self.signer.token(endpoint)}"
        try:
            response = self.session.post(endpoint, json=body, headers=headers, timeout=self.timeout)
        except requests.Timeout:
            outcome.error = _error("timeout", f"no answer within {self.timeout:g} s")
            return outcome
        except requests.RequestException as exc:
            outcome.error = _error("connection_failed", f"{type(exc).__name__}: {exc}")
            return outcome
        if response.status_code != 200:
            message = _error_message(response) or response.reason or ""
            outcome.error = _error(_error_code(response) or "http_error", message, response.status_code)
            return outcome
        try:
            cards = response.json()["cards"]
            outcome.cards = [
                Card(((c.get("source") or {}).get("topic") or {}).get("code") or "(no topic)", c.get("indicator", ""), c.get("summary", ""))
                for c in cards
            ]
        except (ValueError, KeyError, TypeError, AttributeError):
            outcome.error = _error("invalid_response", "HTTP 200 but the body is not a CDS Hooks response (no cards list)", 200)
        return outcome


def _error_body(response) -> dict:
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return {}
    return error if isinstance(error, dict) else {}


def _error_code(response) -> str | None:
    return _error_body(response).get("code")


def _error_message(response) -> str | None:
    return _error_body(response).get("message")
