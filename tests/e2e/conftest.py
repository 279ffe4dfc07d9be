"""End-to-end fixtures: the service, the FHIR test server and the sandbox on loopback, and chromium.

Opt-in: these tests carry the `e2e` mark, which `make test` deselects; `make e2e` runs them.
Without CDS_E2E_SANDBOX_DIR (the sandbox's built files) they skip and say why.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import FIXTURES
from tests.fhir_test_server import FhirTestServer

from .sandbox import ARTEFACTS, CHROMIUM_ARGS, Browser, Sandbox
from .stack import StaticFiles, sandbox_issuer, start_service

CHROMIUM = os.environ.get("CDS_E2E_CHROMIUM", "/usr/bin/chromium")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """On failure, save screenshots and the browser console, and name the files in the failure."""
    try:
        return (yield)
    except Exception as exc:
        sandbox = item.funcargs.get("sandbox")
        if isinstance(sandbox, Sandbox) and sandbox.pages:
            try:
                saved = sandbox.save_artefacts(item.name)
                exc.add_note("e2e artefacts (screenshots, browser console):\n" + "\n".join(f"  {p}" for p in saved))
            except Exception as failure:  # never hide the test's own failure behind this one
                exc.add_note(f"e2e artefacts could not be saved: {type(failure).__name__}: {failure}")
        raise


@pytest.fixture(scope="session")
def sandbox_dir() -> Path:
    configured = os.environ.get("CDS_E2E_SANDBOX_DIR")
    if not configured:
        pytest.skip("CDS_E2E_SANDBOX_DIR is not set: it must name the CDS Hooks Sandbox's built files (README, 'End-to-end tests')")
    folder = Path(configured)
    if not (folder / "index.html").is_file():
        pytest.skip(f"CDS_E2E_SANDBOX_DIR={configured} holds no index.html: build the sandbox first (README, 'End-to-end tests')")
    return folder


@pytest.fixture(scope="session")
def sandbox_jwks(sandbox_dir) -> dict:
    """The sandbox's public signing key, as it publishes it in its build."""
    import json

    path = sandbox_dir / ".well-known" / "jwks.json"
    if not path.is_file():
        pytest.fail(f"{path} is missing: the sandbox's build should contain its public key")
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def e2e_dir(tmp_path_factory) -> Path:
    if ARTEFACTS.exists():
        shutil.rmtree(ARTEFACTS)  # artefacts of an earlier run would only mislead
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def fhir_server():
    with FhirTestServer.from_bundles(sorted(FIXTURES.glob("*.json"))) as server:
        yield server


@pytest.fixture(scope="session")
def static_files(sandbox_dir):
    server = StaticFiles(sandbox_dir)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def service(e2e_dir, sandbox_jwks, fhir_server):
    """The service under gunicorn, trusting the sandbox's own key."""
    service = start_service(e2e_dir / "service", sandbox_issuer(sandbox_jwks, fhir_server), workers=2)
    yield service
    service.stop()


@pytest.fixture(scope="session")
def browser_context(sandbox_dir, e2e_dir):
    """Debian's chromium with a fresh profile; never a browser downloaded by Playwright."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"no chromium at {CHROMIUM}: install Debian's (apt-get install chromium) or set CDS_E2E_CHROMIUM")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(e2e_dir / "chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
        )
        yield Browser(context)
        context.close()


@pytest.fixture
def sandbox(browser_context, static_files, fhir_server):
    """The sandbox for one test; its pages are closed afterwards (after any artefacts are saved)."""
    sandbox = Sandbox(browser_context, static_files.base_url, fhir_server.base_url, ARTEFACTS)
    yield sandbox
    sandbox.close_pages()
