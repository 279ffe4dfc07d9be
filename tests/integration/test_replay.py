"""`replay`: fixtures in-process, hook requests, a running service, signed calls, population screening."""
from __future__ import annotations

import orjson

import csv
import io
import json
import re
import shutil
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from werkzeug.serving import make_server

from service.cds_hooks.services import prefetch_templates
from service.config import PROJECT_ROOT
from service.engine.loader import load_ruleset
from service.harness import hook_request_for, load_cases
from service.replay import main
from tests.synthetic import write_bulk_export

FIXTURES = PROJECT_ROOT / "fixtures" / "fhir"
RULES = PROJECT_ROOT / "rules"
SCENARIO_NOW = "2026-11-01T12:00:00Z"
HIGH_PRODUCT = "esrd-dialysis-high-product.json"


def table_rows(out: str) -> dict[str, list[str]]:
    """Patient -> rule ids, read back from the readable table (it ends at the first blank line)."""
    rows: dict[str, list[str]] = {}
    for line in out.split("\n\n")[0].splitlines()[1:]:
        if line.startswith(" "):  # a further card of the same patient
            rows[current].append(line.split()[0])
        else:
            current, rule = line.split()[:2]
            rows[current] = [] if rule == "-" else [rule]
    return rows


def json_lines(out: str) -> dict[str, dict]:
    objects = [json.loads(line) for line in out.splitlines() if line.strip()]
    return {o["case"]: o for o in objects}


@contextmanager
def serve(wsgi_app):
    """Serve a WSGI app on a free loopback port in a thread; yield its base URL."""
    server = make_server("127.0.0.1", 0, wsgi_app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def capture_authorization(wsgi_app, seen: list[tuple[str, str | None]]):
    def middleware(environ, start_response):
        seen.append((environ["PATH_INFO"], environ.get("HTTP_AUTHORIZATION")))
        return wsgi_app(environ, start_response)

    return middleware


# --- in-process ------------------------------------------------------------------------------------

def test_replaying_the_fixtures_with_expect_exits_0_and_prints_each_patients_rules(capsys):
    # The Bundles only: the table is keyed by patient, and the order requests in orders/ reuse them
    # (tests/integration/test_orders.py replays those).
    bundles = sorted(str(p) for p in FIXTURES.glob("*.json"))
    assert main([*bundles, "--expect", "--no-progress"]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    cases = len(bundles)
    assert len(rows) == cases
    assert rows["esrd-dialysis-high-product"] == ["calciphylaxis-risk"]
    assert rows["dialysis-livedo-high-product"] == ["calciphylaxis-risk", "calciphylaxis-workup"]
    assert rows["no-data-patient"] == []
    assert f"expectations: {cases} ok, 0 mismatch(es), 0 case(s) without expectation" in out


def test_validate_checks_every_resource_of_the_fixtures_fully_and_exits_0(capsys):
    assert main([str(FIXTURES), "--validate", "--no-progress"]) == 0
    assert "validation (fhir.resources, every resource): 0 invalid resource(s) in 0 case(s)" in capsys.readouterr().out


def test_validate_lists_a_resource_no_rule_reads_and_exits_1(tmp_path, capsys):
    bundle = json.loads((FIXTURES / HIGH_PRODUCT).read_text())
    bundle["entry"].append({"resource": {
        "resourceType": "Observation", "id": "weight-1", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
        "subject": {"reference": bundle["entry"][0]["resource"]["resourceType"] + "/" + bundle["entry"][0]["resource"]["id"]},
        "performer": "the scale",
    }})
    (tmp_path / HIGH_PRODUCT).write_text(json.dumps(bundle))
    assert main([str(tmp_path / HIGH_PRODUCT), "--validate", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "1 invalid resource(s) in 1 case(s)" in out
    assert f"INVALID {HIGH_PRODUCT}: Observation/weight-1: performer" in out
    # Without --validate the same file replays cleanly: nothing the rules read is wrong.
    assert main([str(tmp_path / HIGH_PRODUCT), "--no-progress"]) == 0


def test_expect_exits_1_and_names_the_mismatch_when_a_threshold_is_raised(tmp_path, capsys):
    rules = tmp_path / "rules"
    shutil.copytree(RULES, rules)
    rule_file = rules / "calciphylaxis-risk.yaml"
    text = rule_file.read_text()
    assert "{fact: ca_x_p, operator: ge, value: 70}" in text
    rule_file.write_text(text.replace("{fact: ca_x_p, operator: ge, value: 70}", "{fact: ca_x_p, operator: ge, value: 80}"))

    assert main([str(FIXTURES), "--expect", "--rules", str(rules), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert f"MISMATCH {HIGH_PRODUCT}: expected calciphylaxis-risk, fired no rule (missing calciphylaxis-risk)" in out
    assert "MISMATCH dialysis-livedo-high-product.json: expected calciphylaxis-risk, calciphylaxis-workup, fired calciphylaxis-workup (missing calciphylaxis-risk)" in out
    # Every scenario expecting calciphylaxis-risk with a product under 80 now misses it.
    assert "6 mismatch(es)" in out


def test_a_broken_rule_set_prints_its_errors_and_exits_1(tmp_path, capsys):
    rules = tmp_path / "rules"
    shutil.copytree(RULES, rules)
    rule_file = rules / "calciphylaxis-risk.yaml"
    rule_file.write_text(rule_file.read_text().replace("operator: ge, value: 70", "operator: gte, value: 70"))

    assert main([str(FIXTURES), "--rules", str(rules)]) == 1
    captured = capsys.readouterr()
    assert "calciphylaxis-risk.yaml" in captured.err
    assert captured.out == ""


def test_json_output_is_one_object_per_patient_with_the_fired_rule_ids(capsys):
    assert main([str(FIXTURES), "--json", "--expect", "--no-progress"]) == 0
    by_case = json_lines(capsys.readouterr().out)
    assert len(by_case) == len(list(FIXTURES.rglob("*.json")))
    assert by_case[HIGH_PRODUCT]["rules"] == ["calciphylaxis-risk"]
    assert by_case[HIGH_PRODUCT]["patient"] == "esrd-dialysis-high-product"
    assert by_case[HIGH_PRODUCT]["evaluated_at"] == "2026-11-01T12:00:00+00:00"  # the Bundle's timestamp
    assert by_case[HIGH_PRODUCT]["cards"][0]["indicator"] == "warning"
    assert by_case["esrd-skin-ulcer-scleroderma.json"]["rules"] == ["calciphylaxis-workup", "dystrophic-calcinosis"]
    assert by_case["no-data-patient.json"]["rules"] == []
    assert {o["expectation"] for o in by_case.values()} == {"ok"}


def test_a_case_no_scenario_names_has_no_expectation_rather_than_a_mismatch(tmp_path, capsys):
    shutil.copy(FIXTURES / HIGH_PRODUCT, tmp_path / "brand-new-scenario.json")
    assert main([str(tmp_path), "--expect", "--json"]) == 0
    captured = capsys.readouterr()
    result = json_lines(captured.out)["brand-new-scenario.json"]
    assert result["expectation"] == "none" and result["rules"] == ["calciphylaxis-risk"]
    assert "no expectation: brand-new-scenario.json" in captured.err


def test_a_cds_hooks_request_file_is_replayed_like_its_bundle(tmp_path, capsys):
    ruleset = load_ruleset(RULES)
    case = next(load_cases([FIXTURES / HIGH_PRODUCT]))
    request = hook_request_for(case, prefetch_templates(ruleset), str(uuid.uuid4()))
    assert request["hook"] == "patient-view"
    (tmp_path / HIGH_PRODUCT).write_text(json.dumps(request))
    shutil.copy(FIXTURES / "scenarios.yaml", tmp_path / "scenarios.yaml")  # the expectation lives beside the file

    assert main([str(tmp_path / HIGH_PRODUCT), "--json", "--expect", "--now", SCENARIO_NOW]) == 0
    result = json_lines(capsys.readouterr().out)[HIGH_PRODUCT]
    assert result["rules"] == ["calciphylaxis-risk"]
    assert result["expectation"] == "ok"


def test_a_progress_bar_is_drawn_on_a_terminal_for_more_than_20_cases_and_not_with_no_progress(monkeypatch, capsys):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for flags, drawn in (([], True), (["--no-progress"], False)):
        terminal = Terminal()
        monkeypatch.setattr("sys.stderr", terminal)
        assert main([str(FIXTURES), "--json", *flags]) == 0
        assert ("replaying:" in terminal.getvalue() and f"/{len(list(FIXTURES.rglob('*.json')))}" in terminal.getvalue()) is drawn
    assert len(json_lines(capsys.readouterr().out)) == len(list(FIXTURES.rglob("*.json")))  # the bar never lands on stdout


def test_unreadable_input_exits_2_naming_the_file(tmp_path, capsys):
    (tmp_path / "broken.json").write_text("{not json")
    assert main([str(tmp_path / "broken.json")]) == 2
    assert "broken.json" in capsys.readouterr().err


# --- against a running service ---------------------------------------------------------------------

def test_url_mode_sends_hook_calls_to_the_running_app_and_reads_the_cards_back(app, capsys):
    seen: list[tuple[str, str | None]] = []
    app.wsgi_app = capture_authorization(app.wsgi_app, seen)
    with serve(app) as base:
        assert main([str(FIXTURES), "--url", base, "--json", "--expect", "--no-progress"]) == 0
    by_case = json_lines(capsys.readouterr().out)
    assert by_case[HIGH_PRODUCT]["rules"] == ["calciphylaxis-risk"]
    assert by_case[HIGH_PRODUCT]["cards"][0]["summary"] == "Calciphylaxis risk: Ca x P 74.9 mg²/dL² with kidney failure"
    assert {o["expectation"] for o in by_case.values()} == {"ok"}  # the app's clock is the scenarios' time
    assert seen[0][0] == "/cds-services"  # discovery first
    # Each saved request goes to the service for its hook: order-select / order-sign requests to theirs.
    hooks = [orjson.loads(p.read_bytes()).get("hook", "patient-view") for p in FIXTURES.rglob("*.json")]
    expected = {"patient-view": "calcinosis-risk", "order-select": "calcinosis-order-select", "order-sign": "calcinosis-order-sign"}
    assert sorted(path for path, _ in seen[1:]) == sorted(f"/cds-services/{expected[h]}" for h in hooks)
    assert "/cds-services/calcinosis-order-sign" in {path for path, _ in seen}
    assert all(token is None for _, token in seen)  # unsigned unless --jwt-key


@pytest.mark.parametrize("key_type, algorithm, kid", [("ec", "ES384", "ehr-key-1"), ("rsa", "RS384", None)])
def test_url_mode_with_a_jwt_key_signs_each_call_with_verifiable_claims(app, tmp_path, capsys, key_type, algorithm, kid):
    key = ec.generate_private_key(ec.SECP384R1()) if key_type == "ec" else rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = tmp_path / "ehr.pem"
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    seen: list[tuple[str, str | None]] = []
    app.wsgi_app = capture_authorization(app.wsgi_app, seen)
    cases = [str(FIXTURES / HIGH_PRODUCT), str(FIXTURES / "no-data-patient.json")]
    with serve(app) as base:
        argv = [*cases, "--url", base, "--json", "--jwt-key", str(pem), "--jwt-iss", "https://ehr.example.org"]
        assert main(argv + (["--jwt-kid", kid] if kid else [])) == 0
    assert json_lines(capsys.readouterr().out)[HIGH_PRODUCT]["rules"] == ["calciphylaxis-risk"]

    tokens = [auth.removeprefix("Bearer ") for path, auth in seen if path == "/cds-services/calcinosis-risk"]
    assert len(tokens) == 2 and all(tokens)
    jtis, kids = set(), set()
    for token in tokens:
        header = jwt.get_unverified_header(token)
        assert header["alg"] == algorithm and header["typ"] == "JWT"
        assert header["kid"] == kid if kid else header["kid"]
        kids.add(header["kid"])
        claims = jwt.decode(
            token, key.public_key(), algorithms=[algorithm], audience=f"{base}/cds-services/calcinosis-risk",
            issuer="https://ehr.example.org", options={"require": ["iss", "aud", "exp", "iat", "jti"]},
        )
        assert claims["exp"] - claims["iat"] == 300
        assert uuid.UUID(claims["jti"]).version == 4
        jtis.add(claims["jti"])
    assert len(jtis) == 2 and len(kids) == 1


DISCOVERY = {"services": [{"id": "calcinosis-risk", "hook": "patient-view", "title": "t", "description": "d", "prefetch": {}}]}


def stub_service(hook_answer):
    """A tiny WSGI service: real discovery, and `hook_answer(environ)` -> (status, body) for calls."""
    def app(environ, start_response):
        status, body = ("200 OK", DISCOVERY) if environ["REQUEST_METHOD"] == "GET" else hook_answer(environ)
        data = json.dumps(body).encode()
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
        return [data]

    return app


def test_a_non_200_answer_is_reported_per_patient_with_its_status_and_error_code(capsys):
    overloaded = ("503 Service Unavailable", {"error": {"code": "overloaded", "message": "try again later"}})
    cases = [str(FIXTURES / HIGH_PRODUCT), str(FIXTURES / "no-data-patient.json")]
    with serve(stub_service(lambda environ: overloaded)) as base:
        assert main([*cases, "--url", base]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^esrd-dialysis-high-product\s+-\s+ERROR\s+HTTP 503 overloaded: try again later$", out, re.M)
    assert re.search(r"^no-data-patient\s+-\s+ERROR\s+HTTP 503 overloaded", out, re.M)
    assert "2 not answered" in out


def test_a_service_that_does_not_answer_in_time_is_reported_as_a_timeout(capsys):
    release = threading.Event()

    def slow(environ):
        release.wait(5)
        return "200 OK", {"cards": []}

    try:
        with serve(stub_service(slow)) as base:
            assert main([str(FIXTURES / HIGH_PRODUCT), "--url", base, "--timeout", "0.3", "--json"]) == 1
            release.set()
    finally:
        release.set()
    error = json_lines(capsys.readouterr().out)[HIGH_PRODUCT]["error"]
    assert error["code"] == "timeout" and error["status"] is None


# --- population screening ----------------------------------------------------------------------------

def test_screening_a_2000_patient_bulk_export_on_2_workers_writes_exactly_the_flagged_patients(tmp_path, capsys):
    export = write_bulk_export(tmp_path / "export", patients=2000, seed=11)
    assert sorted(p.name for p in export.folder.iterdir()) == ["Condition.ndjson", "Observation.ndjson", "Patient.ndjson"]
    assert 300 < len(export.flagged) < 1000
    out_file = tmp_path / "flagged.csv"

    assert main([str(export.folder), "--screen", str(out_file), "--workers", "2", "--now", SCENARIO_NOW, "--no-progress"]) == 0
    out = capsys.readouterr().out
    with out_file.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(export.flagged)
    assert {r["patient"]: tuple(r["rules"].split()) for r in rows} == export.flagged
    risk = next(r for r in rows if r["rules"] == "calciphylaxis-risk")
    assert re.fullmatch(r"\d+(\.\d+)? mg²/dL²", risk["ca_x_p"]) and float(risk["ca_x_p"].split()[0]) >= 72
    assert risk["pth"].endswith("pg/mL") and risk["kidney_failure_diagnosis"].startswith("End stage renal failure")
    assert re.search(r"screened 2000 patients in [\d.]+ s with 2 workers: [\d,]+ patients/s", out)
    assert f"{len(export.flagged)} flagged -> {out_file}" in out


def test_screening_to_ndjson_writes_one_object_per_flagged_patient(tmp_path, capsys):
    export = write_bulk_export(tmp_path / "export", patients=60, seed=3)
    out_file = tmp_path / "flagged.ndjson"
    assert main([str(export.folder), "--screen", str(out_file), "--workers", "1", "--now", SCENARIO_NOW]) == 0
    rows = [json.loads(line) for line in out_file.read_text(encoding="utf-8").splitlines()]
    assert {r["patient"]: tuple(r["rules"]) for r in rows} == export.flagged
    assert all(set(r) == {"patient", "rules", "values"} and r["values"] for r in rows)
    assert "patients/s" in capsys.readouterr().out
