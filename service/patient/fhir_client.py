"""Read and search the EHR's FHIR server when prefetch did not bring the data.

Policy (documented in README "FHIR server fallback"):
- every call has a timeout, and the whole fetch for one hook call has a time budget;
- searches follow Bundle.link[next] up to `max_pages`; the bearer token is only ever
  sent to the origin of `fhirServer`, so a next link to another host is not followed;
- a next link already visited (a loop) ends paging: the pages read are complete;
- hitting `max_pages` ends paging and the result is marked incomplete;
- timeouts, connection errors, HTTP errors, non-JSON bodies and OperationOutcome
  bodies raise FhirUnavailable with a reason fit for a 412 body and a log line.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import orjson
import requests

log = logging.getLogger(__name__)


def next_link(bundle: dict) -> str | None:
    """The Bundle's `next` page URL; a malformed link list counts as none."""
    links = bundle.get("link")
    if not isinstance(links, list):
        return None
    return next(
        (l["url"] for l in links if isinstance(l, dict) and l.get("relation") == "next" and isinstance(l.get("url"), str) and l["url"]),
        None,
    )


class FhirUnavailable(Exception):
    """The FHIR server could not supply the data; `reason` is safe to show and log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class SearchResult:
    resources: list[dict]
    pages: int
    complete: bool
    note: str | None = None


class FhirClient:
    def __init__(
        self,
        base_url: str,
        access_token: str | None,
        *,
        session: requests.Session,
        timeout: float = 5.0,
        max_pages: int = 10,
        budget: float = 10.0,
        log_context: dict | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/") + "/"
        self.origin = urlsplit(self.base_url)[:2]
        self.session = session
        self.timeout = timeout
        self.max_pages = max_pages
        self.deadline = time.monotonic() + budget
        self.headers = {"Accept": "application/fhir+json"}
        if access_token:
            self.headers["Authorization"] = f"Bearer {access_token}"
        self.calls = 0
        self._log_context = log_context or {}

    def _get(self, url: str) -> dict | None:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise FhirUnavailable("FHIR server time budget used up")
        self.calls += 1
        try:
            response = self.session.get(url, headers=self.headers, timeout=min(self.timeout, remaining))
        except requests.Timeout:
            raise FhirUnavailable(f"FHIR server did not answer within {min(self.timeout, remaining):.1f} s") from None
        except requests.RequestException as exc:
            raise FhirUnavailable(f"FHIR server unreachable ({type(exc).__name__})") from None
        if response.status_code == 404:
            return None
        if response.status_code in (401, 403):
            raise FhirUnavailable(f"FHIR server refused access (HTTP {response.status_code})")
        if response.status_code >= 400:
            raise FhirUnavailable(f"FHIR server answered HTTP {response.status_code}")
        try:
            body = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise FhirUnavailable("FHIR server answered with a body that is not JSON") from None
        if not isinstance(body, dict) or not isinstance(body.get("resourceType"), str):
            raise FhirUnavailable("FHIR server answered with JSON that is not a FHIR resource")
        if body["resourceType"] == "OperationOutcome":
            raise FhirUnavailable("FHIR server answered with an OperationOutcome")
        return body

    def read(self, relative: str) -> dict | None:
        """Read one resource; None when the server says it does not exist."""
        return self._get(urljoin(self.base_url, relative))

    def search(self, relative: str) -> SearchResult:
        """Run a search and follow its next links within the paging policy."""
        url = urljoin(self.base_url, relative)
        return self.continue_search(self._get(url), pages=1, seen={url})

    def continue_search(self, bundle: dict | None, *, pages: int = 0, seen: set[str] | None = None) -> SearchResult:
        """Collect a search bundle's entries, fetching its further pages."""
        from .record import resources_in

        resources: list[dict] = []
        seen = seen or set()
        while bundle is not None:
            if bundle.get("resourceType") != "Bundle":
                raise FhirUnavailable(f"FHIR search answered a {bundle.get('resourceType')}, not a Bundle")
            resources += resources_in(bundle)
            next_url = next_link(bundle)
            if not next_url:
                return SearchResult(resources, pages, True)
            next_url = urljoin(self.base_url, next_url)
            if next_url in seen:
                log.warning("FHIR next link loops; paging stopped", extra={"event": "fhir_paging_loop", **self._log_context})
                return SearchResult(resources, pages, True, "next link repeated a page already read")
            if urlsplit(next_url)[:2] != self.origin:
                raise FhirUnavailable("FHIR next link points to another host; the access token is not sent there")
            if pages >= self.max_pages:
                log.warning("FHIR paging bound reached", extra={"event": "fhir_paging_bound", "pages": pages, **self._log_context})
                return SearchResult(resources, pages, False, f"stopped after {pages} pages (bound)")
            seen.add(next_url)
            bundle = self._get(next_url)
            pages += 1
        raise FhirUnavailable("FHIR next link points to a page that does not exist")
