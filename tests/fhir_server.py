"""A FHIR server faked with `responses`: answers reads and searches from a scenario's resources."""
from __future__ import annotations

import re
from urllib.parse import parse_qs, urlsplit

import orjson
import responses

from .requests_builder import FHIR_SERVER


def searchset(resources: list[dict], next_url: str | None = None) -> dict:
    bundle = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}
    if next_url:
        bundle["link"] = [{"relation": "next", "url": next_url}]
    return bundle


class FakeFhirServer:
    """Serve Patient reads and Observation/Condition searches, optionally in pages of `page_size`."""

    def __init__(self, mock: responses.RequestsMock, resources: list[dict], page_size: int | None = None, base: str = FHIR_SERVER) -> None:
        self.resources = resources
        self.page_size = page_size
        self.calls: list = []
        self.base = base
        pattern = re.compile(re.escape(base) + r"/.*")
        mock.add_callback(responses.GET, pattern, callback=self._answer)

    def _answer(self, request):
        self.calls.append(request)
        parts = urlsplit(request.url)
        path = parts.path[len(urlsplit(self.base).path):].strip("/")
        query = parse_qs(parts.query)
        kind, _, rid = path.partition("/")
        if rid:
            found = [r for r in self.resources if r["resourceType"] == kind and r.get("id") == rid]
            if not found:
                return 404, {}, orjson.dumps({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-found"}]})
            return 200, {"Content-Type": "application/fhir+json"}, orjson.dumps(found[0])
        matching = [r for r in self.resources if r["resourceType"] == kind]
        page = int(query.get("_page", ["0"])[0])
        if self.page_size:
            chunk = matching[page * self.page_size:(page + 1) * self.page_size]
            more = (page + 1) * self.page_size < len(matching)
            next_url = f"{self.base}/{kind}?patient=x&_page={page + 1}" if more else None
            return 200, {}, orjson.dumps(searchset(chunk, next_url))
        return 200, {}, orjson.dumps(searchset(matching))
