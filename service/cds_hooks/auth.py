"""Authenticate CDS Clients from the signed JWT bearer token on each request.

Implements CDS Hooks 2.0, "Security and Safety" > "Trusting CDS Clients" and its
"JWT Signing Algorithm" subsection: every call carries ``Authorization: Bearer <JWT>``
signed with an asymmetric key from the client's JWK Set; the service keeps an
allow-list of ``iss`` and ``jku`` values, requires ``aud`` to be the endpoint URL
being invoked, and uses ``jti`` to refuse replays.
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

import jwt
import requests
import yaml

from service.bounded_http import DownloadFailed, bounded_get, bounded_session, parse_origin

__all__ = [
    "ALGORITHM_NOT_ALLOWED",
    "DEFAULT_ALGORITHMS",
    "DEFAULT_MAX_LIFETIME",
    "ERROR_CODES",
    "INVALID_AUDIENCE",
    "INVALID_CLAIMS",
    "INVALID_SIGNATURE",
    "INVALID_TOKEN",
    "JWKS_UNAVAILABLE",
    "MISSING_TOKEN",
    "REPLAYED_TOKEN",
    "ROTATION_REFETCH_INTERVAL",
    "TOKEN_EXPIRED",
    "TOKEN_NOT_YET_VALID",
    "UNKNOWN_KEY",
    "UNTRUSTED_ISSUER",
    "UNTRUSTED_JKU",
    "AuthenticationError",
    "ClientAuthenticator",
    "ConfigurationError",
    "MemoryReplayCache",
    "ReplayCache",
    "TrustedIssuer",
    "TrustedIssuers",
]

log = logging.getLogger(__name__)

# Stable error codes, safe to put in a 401 body.
MISSING_TOKEN = "missing_token"
INVALID_TOKEN = "invalid_token"
ALGORITHM_NOT_ALLOWED = "algorithm_not_allowed"
UNTRUSTED_ISSUER = "untrusted_issuer"
UNTRUSTED_JKU = "untrusted_jku"
UNKNOWN_KEY = "unknown_key"
JWKS_UNAVAILABLE = "jwks_unavailable"
INVALID_SIGNATURE = "invalid_signature"
INVALID_AUDIENCE = "invalid_audience"
INVALID_CLAIMS = "invalid_claims"
TOKEN_EXPIRED = "token_expired"
TOKEN_NOT_YET_VALID = "token_not_yet_valid"
REPLAYED_TOKEN = "replayed_token"
ERROR_CODES = frozenset({
    MISSING_TOKEN, INVALID_TOKEN, ALGORITHM_NOT_ALLOWED, UNTRUSTED_ISSUER, UNTRUSTED_JKU,
    UNKNOWN_KEY, JWKS_UNAVAILABLE, INVALID_SIGNATURE, INVALID_AUDIENCE, INVALID_CLAIMS,
    TOKEN_EXPIRED, TOKEN_NOT_YET_VALID, REPLAYED_TOKEN,
})

# ES384 and RS384 are the spec's RECOMMENDED algorithms; the 256 variants are widely deployed.
DEFAULT_ALGORITHMS = ("ES384", "RS384", "ES256", "RS256")
# The spec forbids "none" and every symmetric (HMAC) algorithm, so only these may be configured.
_ASYMMETRIC_ALGORITHMS = frozenset({
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
})
_REQUIRED_CLAIMS = ("iss", "aud", "exp", "iat", "jti")
# CDS Hooks 2.0: exp is "5 minutes in the future" of the token's issue.
DEFAULT_MAX_LIFETIME = 300.0
# An unknown kid may mean key rotation, but forged kids must not turn us into a fetch amplifier.
ROTATION_REFETCH_INTERVAL = 10.0
# Bounds on attacker-supplied input and on what an allow-listed URL may make us read
# (counted after decompression, within the JWKS time budget).
_MAX_TOKEN_CHARS = 16_384
_MAX_JWKS_BYTES = 512 * 1024
# The signature part may be empty so that alg=none tokens get the precise error code.
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_ISSUER_FIELDS = ("jwks_url", "jwks", "jku", "fhir_servers")


class ConfigurationError(Exception):
    """The trusted-issuer configuration or authenticator settings are invalid."""


class AuthenticationError(Exception):
    """A bearer token was rejected: ``code`` is client-safe, ``reason`` is for logs only."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.code}: {self.reason}"


@dataclass(frozen=True)
class TrustedIssuer:
    """One allow-listed CDS Client issuer and where its public keys come from."""

    iss: str
    jwks_url: str | None = None
    jwks: Mapping[str, Any] | None = None
    jku: tuple[str, ...] = ()
    # Origins this client's fhirServer may name; None means any (warned about at start-up).
    fhir_servers: tuple[str, ...] | None = None


class TrustedIssuers:
    """The allow-list of ``iss`` values, each with its key source and allowed ``jku`` URLs."""

    def __init__(self, issuers: Iterable[TrustedIssuer]) -> None:
        self._by_iss = {}
        for issuer in issuers:
            key = _issuer_key(issuer.iss)
            if key in self._by_iss:
                raise ConfigurationError(
                    f"issuers {self._by_iss[key].iss!r} and {issuer.iss!r} differ only by a trailing slash"
                )
            self._by_iss[key] = issuer

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TrustedIssuers:
        """Read a JSON (``.json``) or YAML (anything else) file mapping iss -> settings."""
        path = Path(path)
        is_json = path.suffix.lower() == ".json"
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"trusted issuers file {path}: cannot read it: {exc}") from exc
        try:
            data = json.loads(text) if is_json else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as exc:
            kind = "JSON" if is_json else "YAML"
            raise ConfigurationError(f"trusted issuers file {path}: invalid {kind}: {exc}") from exc
        return cls.from_mapping(data, source=str(path))

    @classmethod
    def from_mapping(cls, data: Any, *, source: str = "<mapping>") -> TrustedIssuers:
        """Build the allow-list from already-parsed data; ``source`` names it in errors."""
        if not isinstance(data, Mapping):
            raise ConfigurationError(
                f"trusted issuers file {source}: expected a mapping of issuer -> settings, "
                f"got {type(data).__name__}"
            )
        return cls(_parse_issuer(iss, entry, source) for iss, entry in data.items())

    def get(self, iss: str) -> TrustedIssuer | None:
        """Return the settings for ``iss`` (with or without a trailing slash), or None if it is not trusted."""
        return self._by_iss.get(_issuer_key(iss))

    def __contains__(self, iss: object) -> bool:
        return isinstance(iss, str) and _issuer_key(iss) in self._by_iss

    def __iter__(self) -> Iterator[TrustedIssuer]:
        return iter(self._by_iss.values())

    def __len__(self) -> int:
        return len(self._by_iss)


def _issuer_key(iss: str) -> str:
    """Issuers are compared without one trailing slash: clients differ on whether they send it."""
    return iss[:-1] if iss.endswith("/") else iss


def _parse_issuer(iss: Any, entry: Any, source: str) -> TrustedIssuer:
    """Validate one issuer entry of the trusted-issuers file."""

    def fail(message: str) -> ConfigurationError:
        return ConfigurationError(f"trusted issuers file {source}: issuer {iss!r}: {message}")

    if not isinstance(iss, str) or not iss:
        raise fail("the issuer must be a non-empty string")
    if not isinstance(entry, Mapping):
        raise fail(f"settings must be a mapping, got {type(entry).__name__}")
    unknown = sorted(str(key) for key in entry if key not in _ISSUER_FIELDS)
    if unknown:
        # Catches typos such as "jwks_uri" that would otherwise silently leave no key source.
        raise fail(f"unknown field(s) {unknown}; allowed fields are {list(_ISSUER_FIELDS)}")
    jwks_url, jwks, jku = entry.get("jwks_url"), entry.get("jwks"), entry.get("jku", [])
    if jwks_url is not None and jwks is not None:
        raise fail("set either jwks_url or jwks (inline), not both")
    if jwks_url is not None and not _is_https_url(jwks_url):
        raise fail(f"jwks_url must be an https URL, got {jwks_url!r}")
    if not isinstance(jku, list) or not all(_is_https_url(url) for url in jku):
        raise fail("jku must be a list of https URLs")
    if jwks_url is None and jwks is None and not jku:
        raise fail("no key source: set jwks_url, an inline jwks, or a jku allow-list")
    if jwks is not None:
        _check_inline_jwks(jwks, fail)
    fhir_servers = entry.get("fhir_servers")
    if fhir_servers is not None:
        if not isinstance(fhir_servers, list) or not fhir_servers:
            raise fail("fhir_servers must be a non-empty list of origins (scheme://host[:port])")
        try:
            fhir_servers = tuple(parse_origin(item) for item in fhir_servers)
        except ValueError as exc:
            raise fail(f"fhir_servers: {exc}") from None
    return TrustedIssuer(iss=iss, jwks_url=jwks_url, jwks=jwks, jku=tuple(jku), fhir_servers=fhir_servers)


def _check_inline_jwks(jwks: Any, fail: Callable[[str], ConfigurationError]) -> None:
    """Reject inline JWK Sets that could never verify a CDS Client token."""
    if not isinstance(jwks, Mapping) or not isinstance(jwks.get("keys"), list) or not jwks["keys"]:
        raise fail('jwks must be a JWK Set: {"keys": [ ...at least one key... ]}')
    for number, jwk in enumerate(jwks["keys"], start=1):
        if not isinstance(jwk, Mapping) or not isinstance(jwk.get("kid"), str) or not jwk["kid"]:
            raise fail(f"jwks key #{number} must be an object with a non-empty kid")
        if jwk.get("kty") == "oct":
            raise fail(f"jwks key {jwk['kid']!r} is symmetric; the spec forbids HMAC keys")
        if "d" in jwk:
            raise fail(f"jwks key {jwk['kid']!r} contains private key material; publish only the public key")
        try:
            jwt.PyJWK(dict(jwk))
        except jwt.PyJWTError as exc:
            raise fail(f"jwks key {jwk['kid']!r} is not a usable public key: {type(exc).__name__}") from exc


def _is_https_url(value: Any) -> bool:
    """True for absolute https URLs (the spec requires TLS for everything)."""
    if not isinstance(value, str):
        return False
    parts = urlsplit(value)
    return parts.scheme == "https" and bool(parts.netloc)


@runtime_checkable
class ReplayCache(Protocol):
    """Remembers (iss, jti) pairs until the token that carried them expires."""

    def check_and_store(self, iss: str, jti: str, expires_at: float) -> bool:
        """Record the pair; True if it was not already recorded, False if this is a replay."""
        ...


class MemoryReplayCache:
    """Thread-safe in-process ReplayCache; protects one worker process only."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._expiry: dict[tuple[str, str], float] = {}
        self._heap: list[tuple[float, tuple[str, str]]] = []

    def check_and_store(self, iss: str, jti: str, expires_at: float) -> bool:
        """Record the pair; True if it was not already recorded, False if this is a replay."""
        key = (iss, jti)
        with self._lock:
            now = self._clock()
            self._evict(now)
            if key in self._expiry:
                return False
            if expires_at > now:
                self._expiry[key] = expires_at
                heapq.heappush(self._heap, (expires_at, key))
            return True

    def __len__(self) -> int:
        with self._lock:
            self._evict(self._clock())
            return len(self._expiry)

    def _evict(self, now: float) -> None:
        """Drop entries whose tokens have expired; the heap keeps this O(log n) per entry."""
        while self._heap and self._heap[0][0] <= now:
            _, key = heapq.heappop(self._heap)
            del self._expiry[key]


@dataclass
class _JwksEntry:
    """Cached JWK Set for one URL, plus bookkeeping for refetch throttling."""

    keys: dict[str, dict[str, Any]] | None = None
    fetched_at: float = -math.inf
    attempted_at: float = -math.inf
    lock: threading.Lock = field(default_factory=threading.Lock)


class ClientAuthenticator:
    """Verifies CDS Client bearer JWTs against the trusted-issuer allow-list."""

    def __init__(
        self,
        issuers: TrustedIssuers,
        *,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.time,
        leeway: float = 30,
        replay_cache: ReplayCache | None = None,
        jwks_cache_seconds: float = 300,
        http_timeout: float | tuple[float, float] = (2, 5),
        jwks_budget: float = 6.0,
        algorithms: Sequence[str] = DEFAULT_ALGORITHMS,
        max_lifetime: float = DEFAULT_MAX_LIFETIME,
    ) -> None:
        refused = [alg for alg in algorithms if alg not in _ASYMMETRIC_ALGORITHMS]
        if refused or not algorithms:
            raise ConfigurationError(
                f"algorithms must be non-empty and asymmetric (the spec forbids none and HMAC); "
                f"refusing {refused}"
            )
        if leeway < 0 or jwks_cache_seconds < 0:
            raise ConfigurationError("leeway and jwks_cache_seconds must not be negative")
        if not max_lifetime > 0:
            raise ConfigurationError("max_lifetime must be positive")
        self._issuers = issuers
        self.issuers = issuers
        self._session = session if session is not None else bounded_session()
        self._clock = clock
        self._leeway = float(leeway)
        self._replay = replay_cache if replay_cache is not None else MemoryReplayCache(clock=clock)
        self._jwks_ttl = float(jwks_cache_seconds)
        # A JWKS fetch ends within jwks_budget seconds all told, and no single wait exceeds the read timeout.
        self._connect_timeout, self._read_timeout = (
            http_timeout if isinstance(http_timeout, tuple) else (http_timeout, http_timeout)
        )
        self._jwks_budget = float(jwks_budget)
        self._algorithms = tuple(algorithms)
        self._max_lifetime = float(max_lifetime)
        # Only allow-listed URLs (jwks_url or an allowed jku) ever get an entry, so this stays small.
        self._jwks: dict[str, _JwksEntry] = {}
        self._jwks_lock = threading.Lock()

    def authenticate(self, authorization_header: str | None, audience: str | Sequence[str]) -> dict[str, Any]:
        """Verify the request's bearer JWT for the endpoint URL(s) ``audience``; return its claims."""
        audiences = _audiences(audience)
        token = _bearer_token(authorization_header)
        try:
            return self._verify(token, audiences)
        except AuthenticationError as exc:
            # Belt and braces: reasons go to logs, and a bearer token in a log is a usable credential.
            raise AuthenticationError(exc.code, _scrub(exc.reason, token)) from None

    def _verify(self, token: str, audiences: list[str]) -> dict[str, Any]:
        """Run every check in order; cheap, offline checks come before any key fetch."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise AuthenticationError(INVALID_TOKEN, f"malformed JWT header: {exc}") from None
        alg = header.get("alg")
        if alg not in self._algorithms:
            raise AuthenticationError(
                ALGORITHM_NOT_ALLOWED, f"alg {_show(alg)} is not one of {list(self._algorithms)}"
            )
        typ = header.get("typ")
        # typ is REQUIRED by the spec, but tolerate its absence; a different typ means another kind of token.
        if typ is not None and (not isinstance(typ, str) or typ.upper() != "JWT"):
            raise AuthenticationError(INVALID_TOKEN, f"typ {_show(typ)} is not JWT")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthenticationError(INVALID_TOKEN, "JWT header has no kid (REQUIRED by CDS Hooks)")
        jku = header.get("jku")
        if jku is not None and not isinstance(jku, str):
            raise AuthenticationError(INVALID_TOKEN, f"jku {_show(jku)} is not a string")

        # The payload is read unverified only to pick the issuer's keys; it is verified below.
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise AuthenticationError(INVALID_TOKEN, f"malformed JWT payload: {exc}") from None
        iss = unverified.get("iss")
        if not isinstance(iss, str) or not iss:
            raise AuthenticationError(INVALID_CLAIMS, "JWT has no iss claim")
        issuer = self._issuers.get(iss)
        if issuer is None:
            raise AuthenticationError(UNTRUSTED_ISSUER, f"iss {_show(iss)} is not a trusted issuer")

        jwk = self._find_key(issuer, kid, jku)
        if "alg" in jwk and jwk["alg"] != alg:
            raise AuthenticationError(
                INVALID_TOKEN, f"key {_show(kid)} is for alg {_show(jwk['alg'])}, token says {alg}"
            )
        try:
            key = jwt.PyJWK(jwk, algorithm=alg)
        except jwt.PyJWTError as exc:
            raise AuthenticationError(
                INVALID_TOKEN, f"key {_show(kid)} of iss {_show(iss)} cannot verify {alg}: {type(exc).__name__}"
            ) from None

        claims = self._decode(token, key, alg, iss, audiences, unverified.get("aud"))
        self._check_times(claims)
        jti = claims["jti"]
        if not isinstance(jti, str) or not jti:
            raise AuthenticationError(INVALID_CLAIMS, "jti is not a non-empty string")
        # Replay is checked last so that tokens failing other checks never occupy the cache.
        if not self._replay.check_and_store(iss, jti, float(claims["exp"]) + self._leeway):
            raise AuthenticationError(REPLAYED_TOKEN, f"jti {_show(jti)} of iss {_show(iss)} was already used")
        return claims

    def _decode(
        self, token: str, key: jwt.PyJWK, alg: str, iss: str, audiences: list[str], claimed_aud: Any
    ) -> dict[str, Any]:
        """Verify signature, iss, aud and claim presence with PyJWT; times are checked separately."""
        try:
            return jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=audiences,
                issuer=iss,
                options={
                    "require": list(_REQUIRED_CLAIMS),
                    # PyJWT reads the wall clock; _check_times uses the injected clock instead.
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                    "enforce_minimum_key_length": True,
                },
            )
        except jwt.InvalidSignatureError:
            raise AuthenticationError(
                INVALID_SIGNATURE, f"signature does not verify with key {_show(key.key_id)} of iss {_show(iss)}"
            ) from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthenticationError(INVALID_CLAIMS, f"required claim {exc.claim!r} is missing") from None
        except jwt.InvalidAudienceError:
            raise AuthenticationError(
                INVALID_AUDIENCE, f"aud {_show(claimed_aud)} does not match {audiences}"
            ) from None
        except jwt.PyJWTError as exc:
            raise AuthenticationError(INVALID_TOKEN, f"{type(exc).__name__}: {exc}") from None

    def _check_times(self, claims: Mapping[str, Any]) -> None:
        """Check exp, iat and nbf against the injected clock with leeway."""
        for name in ("exp", "iat", "nbf"):
            if name in claims and not _is_numeric_date(claims[name]):
                raise AuthenticationError(INVALID_CLAIMS, f"{name} {_show(claims[name])} is not a NumericDate")
        now, leeway = self._clock(), self._leeway
        if claims["exp"] <= now - leeway:
            raise AuthenticationError(
                TOKEN_EXPIRED, f"exp {claims['exp']} is {now - claims['exp']:.0f}s in the past (leeway {leeway:g}s)"
            )
        if claims["iat"] > now + leeway:
            raise AuthenticationError(
                TOKEN_NOT_YET_VALID,
                f"iat {claims['iat']} is {claims['iat'] - now:.0f}s in the future (leeway {leeway:g}s)",
            )
        # A long-lived token is a long-lived credential, and its jti would be kept for as long.
        if claims["exp"] - claims["iat"] > self._max_lifetime:
            raise AuthenticationError(
                INVALID_CLAIMS,
                f"exp is {claims['exp'] - claims['iat']:.0f}s after iat; at most {self._max_lifetime:g}s is accepted",
            )
        if "nbf" in claims and claims["nbf"] > now + leeway:
            raise AuthenticationError(
                TOKEN_NOT_YET_VALID,
                f"nbf {claims['nbf']} is {claims['nbf'] - now:.0f}s in the future (leeway {leeway:g}s)",
            )

    def _find_key(self, issuer: TrustedIssuer, kid: str, jku: str | None) -> dict[str, Any]:
        """Return the JWK for ``kid``: the inline set first, else the jku (if allowed), else the jwks_url.

        A key pinned inline verifies the token whatever its jku header says: clients such as the
        CDS Hooks Sandbox always send a jku, and an operator who pinned the key needs no fetch.
        """
        inline = (_index_jwks(issuer.jwks) or {}) if issuer.jwks is not None else {}
        if kid in inline:
            return inline[kid]
        if jku is not None:
            # Fetching an arbitrary jku would let anyone supply their own keys (and make us fetch any URL).
            if jku not in issuer.jku:
                raise AuthenticationError(
                    UNTRUSTED_JKU, f"jku {_show(jku)} is not allowed for iss {_show(issuer.iss)}"
                )
            return self._remote_key(jku, kid)
        if issuer.jwks_url is not None:
            return self._remote_key(issuer.jwks_url, kid)
        if issuer.jwks is not None:
            raise AuthenticationError(
                UNKNOWN_KEY, f"kid {_show(kid)} is not in the configured JWKS of iss {_show(issuer.iss)}"
            )
        raise AuthenticationError(
            UNKNOWN_KEY, f"iss {_show(issuer.iss)} publishes keys only via jku and the token has none"
        )

    def _remote_key(self, url: str, kid: str) -> dict[str, Any]:
        """Return the JWK for ``kid`` from the cached or freshly fetched JWK Set at ``url``."""
        with self._jwks_lock:
            entry = self._jwks.setdefault(url, _JwksEntry())
        # One lock per URL: concurrent requests wait for one fetch instead of each making their own.
        with entry.lock:
            now = self._clock()
            fresh = entry.keys is not None and now - entry.fetched_at < self._jwks_ttl
            if fresh and kid in entry.keys:
                return entry.keys[kid]
            # Throttle rotation refetches and retries after a failure; a plain expiry refetches at once.
            last_failed = entry.attempted_at > entry.fetched_at
            if (not fresh and not last_failed) or now - entry.attempted_at >= ROTATION_REFETCH_INTERVAL:
                entry.attempted_at = now
                entry.keys = self._fetch_jwks(url)
                entry.fetched_at = now
                if kid in entry.keys:
                    return entry.keys[kid]
                raise AuthenticationError(UNKNOWN_KEY, f"kid {_show(kid)} is not in the JWKS just fetched from {url}")
            if not fresh:
                raise AuthenticationError(
                    JWKS_UNAVAILABLE,
                    f"no current JWKS for {url}: the fetch {now - entry.attempted_at:.0f}s ago failed "
                    f"and is retried after {ROTATION_REFETCH_INTERVAL:g}s",
                )
            raise AuthenticationError(
                UNKNOWN_KEY,
                f"kid {_show(kid)} is not in the JWKS from {url}; refetched "
                f"{now - entry.attempted_at:.0f}s ago, at most once per {ROTATION_REFETCH_INTERVAL:g}s",
            )

    def _fetch_jwks(self, url: str) -> dict[str, dict[str, Any]]:
        """GET a JWK Set and index its signing keys by kid; any failure is jwks_unavailable."""
        try:
            # No redirects: the allow-listed URL is the one we trust, not wherever it points.
            response = bounded_get(
                self._session, url, headers={"Accept": "application/json"},
                deadline=time.monotonic() + self._jwks_budget, read_timeout=self._read_timeout,
                connect_timeout=self._connect_timeout, max_bytes=_MAX_JWKS_BYTES,
            )
        except DownloadFailed as exc:
            raise AuthenticationError(JWKS_UNAVAILABLE, f"GET {url} failed: {exc.kind}: {exc.detail}") from None
        if response.status_code != 200:
            raise AuthenticationError(JWKS_UNAVAILABLE, f"GET {url} returned HTTP {response.status_code}")
        try:
            document = json.loads(response.body)
        except (ValueError, RecursionError) as exc:
            raise AuthenticationError(JWKS_UNAVAILABLE, f"GET {url} did not return JSON: {type(exc).__name__}") from None
        keys = _index_jwks(document)
        if keys is None:
            raise AuthenticationError(JWKS_UNAVAILABLE, f'GET {url} did not return a JWK Set ({{"keys": [...]}})')
        log.info("fetched JWKS from %s: %d signing key(s)", url, len(keys))
        return keys


def _index_jwks(document: Any) -> dict[str, dict[str, Any]] | None:
    """Map kid -> JWK for the signing keys of a JWK Set; None if it is not a JWK Set."""
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        return None
    keys: dict[str, dict[str, Any]] = {}
    for jwk in document["keys"]:
        # Keys without a kid cannot be selected, and use=enc keys must not verify signatures.
        if isinstance(jwk, Mapping) and isinstance(jwk.get("kid"), str) and jwk.get("use", "sig") == "sig":
            # kid MUST be unique within the set; on a duplicate keep the first rather than guess.
            keys.setdefault(jwk["kid"], dict(jwk))
    return keys


def _bearer_token(authorization_header: str | None) -> str:
    """Extract the compact JWS from ``Authorization: Bearer <jwt>``; reasons never echo the header."""
    if authorization_header is None or not authorization_header.strip():
        raise AuthenticationError(MISSING_TOKEN, "no Authorization header")
    parts = authorization_header.split(None, 1)
    # Auth schemes are case-insensitive (RFC 7235 section 2.1).
    if parts[0].lower() != "bearer":
        raise AuthenticationError(INVALID_TOKEN, "Authorization header does not use the Bearer scheme")
    token = parts[1].strip() if len(parts) > 1 else ""
    if not token:
        raise AuthenticationError(MISSING_TOKEN, "Authorization header has the Bearer scheme but no token")
    if len(token) > _MAX_TOKEN_CHARS:
        raise AuthenticationError(INVALID_TOKEN, f"bearer token is longer than {_MAX_TOKEN_CHARS} characters")
    if not _COMPACT_JWS.fullmatch(token):
        raise AuthenticationError(INVALID_TOKEN, "bearer token is not a compact-serialised JWT")
    return token


def _audiences(audience: str | Sequence[str]) -> list[str]:
    """Normalise the expected audience(s); an empty or non-string audience is a programming error."""
    audiences = [audience] if isinstance(audience, str) else list(audience)
    if not audiences or not all(isinstance(aud, str) and aud for aud in audiences):
        raise ValueError("audience must be the endpoint URL or a non-empty list of URLs")
    return audiences


def _is_numeric_date(value: Any) -> bool:
    """True for a finite JSON number (bool is an int in Python, but not a NumericDate)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _show(value: Any, limit: int = 120) -> str:
    """repr() of an untrusted value, truncated; repr escapes control characters against log injection."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _scrub(reason: str, token: str) -> str:
    """Remove the token, and any long segment of it, from a log message."""
    for secret in (token, *(part for part in token.split(".") if len(part) >= 16)):
        reason = reason.replace(secret, "[token]")
    return reason
