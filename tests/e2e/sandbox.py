"""Drive the CDS Hooks Sandbox in Debian's chromium through Playwright, and read what it renders.

Only loopback is reachable: every request to another host is aborted in the browser (and
chromium's resolver maps every other name to nothing), and each aborted URL is kept for the
console artefact. Waits always go through Playwright: its sync API serves request routing
only while a Playwright call is running, so a plain `time.sleep` would stall the page.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode, urlsplit

from service.config import PROJECT_ROOT

ARTEFACTS = Path(os.environ.get("CDS_E2E_ARTEFACTS") or PROJECT_ROOT / "artefacts" / "e2e")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost , EXCLUDE 127.0.0.1",
]
NOT_LOOPBACK = re.compile(r"^(?!(https?|wss?)://(127\.0\.0\.1|localhost)(:\d+)?/)")
# Every page load starts from nothing persisted: the sandbox keeps services and patients in localStorage.
FORGET_STORAGE = "try { window.localStorage.clear(); window.sessionStorage.clear(); } catch (e) {}"
WAIT_MS = 30_000
CARD = '[class*="card-list__decision-card"]'
_INDICATOR = re.compile(r"card-list__alert-([a-z]+)___")
NO_CARDS_TEXT = "No recommendations to display"


@dataclass(frozen=True, order=True)
class Card:
    """What a clinician sees of a card: its indicator, its summary, and the rule its source names."""

    indicator: str
    summary: str
    rule: str


@dataclass
class HookCall:
    """One hook call the browser made and the answer it got."""

    status: int
    request: dict
    response: dict

    @property
    def cards(self) -> list[dict]:
        return self.response.get("cards", []) if self.status == 200 else []


def rule_of(source_url: str) -> str:
    """The rule id a card's source link names: the last path segment of /rules/{ruleId}."""
    return urlsplit(source_url).path.rstrip("/").rsplit("/", 1)[-1]


def card_from_service(card: dict) -> Card:
    return Card(card["indicator"], card["summary"], rule_of(card["source"]["url"]))


class Browser:
    """A browser context that reaches loopback only and forgets the sandbox's storage on each load."""

    def __init__(self, context) -> None:
        self.context = context
        self.blocked: list[str] = []
        context.set_default_timeout(WAIT_MS)
        context.add_init_script(FORGET_STORAGE)
        # Matched inside the browser driver, so loopback requests never wait for this Python process.
        context.route(NOT_LOOPBACK, self._block)

    def _block(self, route) -> None:
        self.blocked.append(route.request.url)
        route.abort("blockedbyclient")


@dataclass
class Sandbox:
    """The sandbox's pages for one test, on its static files and the FHIR test server."""

    browser: Browser
    static_url: str
    fhir_url: str
    artefacts: Path
    pages: list = field(default_factory=list)
    console: dict = field(default_factory=dict)  # page -> lines

    def __post_init__(self) -> None:
        self.browser.blocked.clear()

    @property
    def blocked(self) -> list[str]:
        return self.browser.blocked

    def url(self, service_url: str, patient_id: str) -> str:
        query = {
            "serviceDiscoveryURL": f"{service_url}/cds-services",
            "fhirServiceUrl": self.fhir_url,
            "patientId": patient_id,
        }
        return f"{self.static_url}/index.html?{urlencode(query)}"

    def new_page(self):
        page = self.browser.context.new_page()
        lines: list[str] = []
        self.pages.append(page)
        self.console[page] = lines
        page.on("console", lambda message: lines.append(f"console.{message.type}: {message.text}"))
        page.on("pageerror", lambda error: lines.append(f"pageerror: {error}"))
        page.on("requestfailed", lambda request: lines.append(f"requestfailed: {request.method} {request.url} ({request.failure})"))
        page.on("response", lambda response: lines.append(f"response: {response.status} {response.request.method} {response.url}"))
        return page

    def open_patient(self, service_url: str, patient_id: str, service_id: str = "calcinosis-risk"):
        """Open the patient view and return (page, the patient-view hook call the sandbox made)."""
        page = self.new_page()
        hook_url = f"{service_url}/cds-services/{service_id}"
        with page.expect_response(lambda r: r.url == hook_url and r.request.method == "POST", timeout=WAIT_MS) as answer:
            page.goto(self.url(service_url, patient_id))
        return page, hook_call(answer.value)

    def view_patients(self, service_url: str, patient_ids: list[str], expected: dict[str, list[Card]], *,
                      width: int = 3, service_id: str = "calcinosis-risk") -> dict[str, PatientView]:
        """Open each patient's view, `width` pages at a time, and read what the sandbox renders.

        A view whose hook call failed, or whose cards differ from `expected[patient_id]`, gets
        its screenshot and console saved at once, while the page still shows it.
        """
        hook_url = f"{service_url}/cds-services/{service_id}"
        views: dict[str, PatientView] = {}
        for start in range(0, len(patient_ids), width):
            opened = []
            for patient_id in patient_ids[start:start + width]:
                page = self.new_page()
                answers: list = []
                page.on("response", lambda r, answers=answers: answers.append(r) if r.url == hook_url and r.request.method == "POST" else None)
                # Only the navigation is awaited here; the pages load side by side.
                page.goto(self.url(service_url, patient_id), wait_until="commit")
                opened.append((patient_id, page, answers))
            for patient_id, page, answers in opened:
                views[patient_id] = self._read_view(patient_id, page, answers, expected[patient_id])
            for _, page, _ in opened:
                self.close_page(page)
        return views

    def _read_view(self, patient_id: str, page, answers: list, expected: list[Card]) -> PatientView:
        view = PatientView(patient_id)
        deadline = time.monotonic() + WAIT_MS / 1000
        while not answers and time.monotonic() < deadline:
            page.wait_for_timeout(100)  # a Playwright wait: events and routes keep flowing
        try:
            if not answers:
                view.problem = f"the sandbox made no patient-view call within {WAIT_MS / 1000:.0f} s"
            else:
                view.call = hook_call(answers[0])
                if view.call.status != 200:
                    view.problem = f"the service answered the sandbox's hook call with {view.call.status}: {view.call.response}"
                else:
                    view.cards = sorted(rendered_cards(page, expected_count=len(view.call.cards)))
        except Exception as exc:  # reported with the artefacts below, not raised past the other patients
            view.problem = f"{type(exc).__name__}: {exc}"
        if view.problem or view.cards != expected:
            view.artefacts = self.save_page(page, f"patient-view-{patient_id}")
        return view

    def save_artefacts(self, name: str) -> list[Path]:
        """Save a full-page screenshot and the console of every page this test opened."""
        saved = []
        for number, page in enumerate(self.pages, start=1):
            saved += self.save_page(page, f"{name}-page{number}")
        return saved

    def save_page(self, page, name: str) -> list[Path]:
        self.artefacts.mkdir(parents=True, exist_ok=True)
        base = self.artefacts / re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        saved = []
        try:
            page.screenshot(path=str(base.with_suffix(".png")), full_page=True, timeout=10_000)
            saved.append(base.with_suffix(".png"))
        except Exception as exc:  # a crashed page still gets its console saved below
            self.console[page].append(f"(no screenshot: {type(exc).__name__}: {exc})")
        lines = self.console[page] + [f"blocked (not loopback): {url}" for url in self.blocked]
        base.with_suffix(".console.txt").write_text("\n".join(lines) + "\n")
        saved.append(base.with_suffix(".console.txt"))
        return saved

    def close_page(self, page) -> None:
        page.close()
        self.pages.remove(page)
        self.console.pop(page, None)

    def close_pages(self) -> None:
        for page in list(self.pages):
            self.close_page(page)


@dataclass
class PatientView:
    """What one patient's view came to: the hook call, the cards rendered, or what went wrong."""

    patient_id: str
    call: HookCall | None = None
    cards: list[Card] | None = None
    problem: str | None = None
    artefacts: list[Path] = field(default_factory=list)


def hook_call(response) -> HookCall:
    try:
        body = response.json()
    except Exception:  # the body is shown in the failure, not guessed at
        body = {"unparsed": response.text()[:500]}
    return HookCall(response.status, json.loads(response.request.post_data or "{}"), body)


def rendered_cards(page, expected_count: int) -> list[Card]:
    """Wait until the sandbox shows `expected_count` cards (or its no-cards message), then read them."""
    from playwright.sync_api import expect

    cards = page.locator(CARD)
    if expected_count:
        expect(cards).to_have_count(expected_count, timeout=WAIT_MS)
    else:
        expect(page.get_by_text(NO_CARDS_TEXT)).to_be_visible(timeout=WAIT_MS)
        expect(cards).to_have_count(0)
    found = []
    for card in cards.all():
        indicator = _INDICATOR.search(card.get_attribute("class") or "")
        summary = card.locator("p").first.inner_text().strip()
        source = card.locator('[class*="card-list__source-link"]').first.get_attribute("href") or ""
        found.append(Card(indicator.group(1) if indicator else "(no indicator class)", summary, rule_of(source)))
    return found


def card_locator(page, summary: str):
    """The rendered card whose summary is `summary`."""
    return page.locator(CARD).filter(has=page.locator("p", has_text=summary))
