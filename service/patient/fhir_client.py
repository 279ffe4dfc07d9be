"""Read and search the EHR's FHIR server when prefetch did not bring the data.

Policy (documented in README "FHIR server fallback"):
- the whole fetch for one hook call, every byte of every page, ends within a time budget,
  and each response is capped in bytes counted after decompression (service.bounded_http);
- redirects are followed only within the origin of `fhirServer`;
- searches follow Bundle.link[next] up to `max_pages`; the bearer token is only ever
  sent to the origin of `fhirServer`, so a next link to another host is not followed;
- a next link already visited (a loop) ends paging: the pages read are complete;
- hitting `max_pages` ends paging and the result is marked incomplete;
- timeouts, connection errors, HTTP errors (a 404 on a search too), non-JSON bodies,
  OperationOutcome bodies and oversized bodies raise FhirUnavailable: its category is
  what the 412 body says, its reason goes to the log only.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import orjson
import requests

from service.bounded_http import BoundedResponse, DownloadFailed, bounded_get
from service.bounded_http import TIMEOUT as _DOWNLOAD_TIMEOUT, TOO_LARGE as _DOWNLOAD_TOO_LARGE

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


# What a CDS client may learn about a failure (README "FHIR server fallback"); the detail is
# logged only, so the 412 cannot be used to probe hosts and ports through this service.
UNREACHABLE = "unreachable"
TIMEOUT = "timeout"
HTTP_ERROR = "http_error"
INVALID_RESPONSE = "invalid_response"
TOO_LARGE = "too_large"
CATEGORIES = (UNREACHABLE, TIMEOUT, HTTP_ERROR, INVALID_RESPONSE, TOO_LARGE)
# Internal reasons that have a name of their own in logs.
RESPONSE_TOO_LARGE = "response_too_large"
_MAX_REDIRECTS = 5


class FhirUnavailable(Exception):
    """The FHIR server could not supply the data: `category` may be shown, `reason` only logged."""

    def __init__(self, category: str, reason: str) -> None:
        super().__init__(f"{category}: {reason}")
        self.category = category
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
        max_bytes: int = 32 * 1024 * 1024,
        log_context: dict | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/") + "/"
        self.origin = urlsplit(self.base_url)[:2]
        self.session = session
        self.timeout = timeout
        self.max_pages = max_pages
        self.max_bytes = max_bytes
        # One deadline for every request of this hook call, connect, headers and body included.
        self.deadline = time.monotonic() + budget
        self.headers = {"Accept": "application/fhir+json"}
        if access_token:
            self.headers["Authorization"] = f"Bearer {access_token}"
        self.calls = 0
        self._log_context = log_context or {}

    def _get(self, url: str) -> dict | None:
        """GET a FHIR resource; None for 404. Redirects are followed within the same origin only."""
        for _ in range(_MAX_REDIRECTS + 1):
            self.calls += 1
            try:
                response = bounded_get(
                    self.session, url, headers=self.headers, deadline=self.deadline,
                    read_timeout=self.timeout, max_bytes=self.max_bytes,
                )
            except DownloadFailed as exc:
                if exc.kind == _DOWNLOAD_TOO_LARGE:
                    raise FhirUnavailable(TOO_LARGE, f"{RESPONSE_TOO_LARGE}: {exc.detail}") from None
                raise FhirUnavailable(TIMEOUT if exc.kind == _DOWNLOAD_TIMEOUT else UNREACHABLE, exc.detail) from None
            if response.status_code in (301, 302, 303, 307, 308) and response.headers.get("Location"):
                target = urljoin(url, response.headers["Location"])
                # The bearer token goes to fhirServer's origin only, as for next links.
                if urlsplit(target)[:2] != self.origin:
                    raise FhirUnavailable(HTTP_ERROR, f"HTTP {response.status_code} redirect to another origin, not followed")
                url = target
                continue
            return self._parse(response)
        raise FhirUnavailable(HTTP_ERROR, f"more than {_MAX_REDIRECTS} redirects")

    def _parse(self, response: BoundedResponse) -> dict | None:
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise FhirUnavailable(HTTP_ERROR, f"HTTP {response.status_code}")
        try:
            body = orjson.loads(response.body)
        except orjson.JSONDecodeError:
            raise FhirUnavailable(INVALID_RESPONSE, "a body that is not JSON") from None
        if not isinstance(body, dict) or not isinstance(body.get("resourceType"), str):
            raise FhirUnavailable(INVALID_RESPONSE, "JSON that is not a FHIR resource")
        if body["resourceType"] == "OperationOutcome":
            raise FhirUnavailable(INVALID_RESPONSE, "an OperationOutcome")
        return body

    def read(self, relative: str) -> dict | None:
        """Read one resource; None when the server says it does not exist."""
        return self._get(urljoin(self.base_url, relative))

    def search(self, relative: str) -> SearchResult:
        """Run a search and follow its next links within the paging policy."""
        url = urljoin(self.base_url, relative)
        bundle = self._get(url)
        if bundle is None:
            raise FhirUnavailable(HTTP_ERROR, "the search answered HTTP 404")
        return self.continue_search(bundle, pages=1, seen={url})

    def continue_search(self, bundle: dict | None, *, pages: int = 0, seen: set[str] | None = None) -> SearchResult:
        """Collect a search bundle's entries, fetching its further pages."""
        from .record import resources_in

        resources: list[dict] = []
        seen = seen or set()
        while bundle is not None:
            if bundle.get("resourceType") != "Bundle":
                raise FhirUnavailable(INVALID_RESPONSE, f"the search answered a {bundle.get('resourceType')}, not a Bundle")
            resources += resources_in(bundle)
            next_url = next_link(bundle)
            if not next_url:
                return SearchResult(resources, pages, True)
            next_url = urljoin(self.base_url, next_url)
            if next_url in seen:
                log.warning("FHIR next link loops; paging stopped", extra={"event": "fhir_paging_loop", **self._log_context})
                return SearchResult(resources, pages, True, "next link repeated a page already read")
            if urlsplit(next_url)[:2] != self.origin:
                raise FhirUnavailable(INVALID_RESPONSE, "a next link points to another origin; the access token is not sent there")
            if pages >= self.max_pages:
                log.warning("FHIR paging bound reached", extra={"event": "fhir_paging_bound", "pages": pages, **self._log_context})
                return SearchResult(resources, pages, False, f"stopped after {pages} pages (bound)")
            seen.add(next_url)
            bundle = self._get(next_url)
            pages += 1
        raise FhirUnavailable(HTTP_ERROR, "a next page answered HTTP 404")
