"""Property-based fuzzing of the HTTP API with schemathesis, driven by openapi.yaml.

Requests are generated from the spec and sent to the Flask app in-process (WSGI, `case.call()`).
Every response must be free of server errors and conform to the spec: status code, content type,
headers and body. Auth is disabled (AUTH=disabled, as in `make run`), so schemathesis'
`ignored_auth` check, which expects a 401 without credentials, does not apply. Any FHIR server a
generated request names is answered by an in-memory fake, so nothing leaves the machine.

Three runs, each bounded (and derandomized, so a failure reproduces) to keep the module well
under a minute:
- every operation of the spec as written: ids and hooks are free strings, so most calls stop at
  404 or 400;
- the hook and feedback endpoints with the service id and hook pinned, positive and negative
  bodies, so generated bodies get past routing and reach prefetch handling and feedback parsing;
- hook calls whose prefetch is a generated patient chart (codes from the loaded value sets,
  values around the rules' thresholds, odd units, dates, statuses and shapes), so generated
  patients go through validation and the rule engine and come back as cards.

Failures the fuzzing found in the service are kept at the end as strict xfails.
"""
from __future__ import annotations

import copy
import functools
import json
from datetime import timedelta

import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from schemathesis import DataGenerationMethod, experimental
from schemathesis.checks import ALL_CHECKS
from schemathesis.specs.openapi.checks import ignored_auth, negative_data_rejection

from service.config import PROJECT_ROOT
from service.engine.loader import load_ruleset
from tests.conftest import RULES, SCENARIO_TIME, make_app

experimental.OPEN_API_3_1.enable()


# schemathesis 3.x subclasses jsonschema's deprecated RefResolver (not our code); pyproject turns
# warnings into errors, so this one is let through for the fuzz tests only.
pytestmark = pytest.mark.filterwarnings("ignore:jsonschema.RefResolver is deprecated:DeprecationWarning")

SPEC_PATH = PROJECT_ROOT / "openapi.yaml"
SERVICE_ID = "calcinosis-risk"
PATIENT_ID = "fuzz-patient"

# Negative cases (bodies that break the spec) are sent too, but the service is deliberately more
# lenient than CDS Hooks in places (e.g. token_type "bearer", fhirAuthorization without scope), so
# "negative data must be rejected" is not asserted; no 5xx and a documented response still are.
CHECKS = tuple(check for check in ALL_CHECKS if check not in (ignored_auth, negative_data_rejection))

FUZZ_SETTINGS = settings(
    max_examples=30,
    deadline=None,
    database=None,  # no .hypothesis/ folder in the project
    derandomize=True,  # the same examples every run: a failure here is reproducible, not flaky
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)


class FakeEhrSession(requests.Session):
    """Stands in for every FHIR server a generated request names: searches find nothing, reads 404."""

    def get(self, url, *args, **kwargs):
        response = requests.Response()
        response.url = url
        if "?" in url:
            response.status_code = 200
            response._content = json.dumps({"resourceType": "Bundle", "type": "searchset", "entry": []}).encode()
        else:
            response.status_code = 404
            response._content = b'{"resourceType": "OperationOutcome", "issue": []}'
        response.headers["Content-Type"] = "application/fhir+json"
        return response


def load_spec() -> dict:
    return yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory):
    return make_app(tmp_path_factory.mktemp("fuzz"), AUTH="disabled", HTTP_SESSION=FakeEhrSession())


def _load(raw: dict, app):
    return schemathesis.from_dict(
        raw,
        app=app,
        location=SPEC_PATH.as_uri(),
        data_generation_methods=[DataGenerationMethod.positive, DataGenerationMethod.negative],
    )


def pinned(raw: dict) -> dict:
    """The spec with the one service id and its hook fixed, so calls get past 404 and hook_mismatch."""
    raw = copy.deepcopy(raw)
    raw["components"]["parameters"]["ServiceId"]["schema"] = {"type": "string", "enum": [SERVICE_ID]}
    raw["components"]["schemas"]["HookRequest"]["properties"]["hook"] = {"type": "string", "enum": ["patient-view"]}
    return raw


@pytest.fixture(scope="module")
def api_schema(fuzz_app):
    return _load(load_spec(), fuzz_app)


@pytest.fixture(scope="module")
def pinned_schema(fuzz_app):
    return _load(pinned(load_spec()), fuzz_app).include(method="POST", path_regex="^/cds-services/")


@pytest.fixture(scope="module")
def invoke_schema(fuzz_app):
    return _load(pinned(load_spec()), fuzz_app).include(method="POST", path="/cds-services/{id}")


# ------------------------------------------------------------------ clinical-shaped prefetch


@functools.cache
def _codings(kind: str) -> list[list[dict]]:
    """Per value set the rules read as `kind` (observation or condition), its codings; a prefix
    entry (ICD-10-CM `M33.1*`) gives one code under it."""
    ruleset = load_ruleset(RULES)
    ids = ruleset.observation_valuesets() if kind == "observation" else ruleset.condition_valuesets()
    sets = []
    for vs in (ruleset.valuesets[vs_id] for vs_id in ids):
        pairs = sorted(vs.exact) + [(system, prefix + "0") for system, prefix in vs.prefixes]
        sets.append([{"system": system, "code": code} for system, code in pairs])
    return sets


_ODD_CODINGS = [
    {"system": "http://loinc.org", "code": "0000-0"}, {"system": "", "code": ""}, {"code": "17861-6"},
    {"system": "http://loinc.org", "code": "17861-6 "}, {"system": "http://loinc.org", "code": 17861}, {"system": None},
]
_ODD_CONCEPTS = [{}, {"coding": "x"}, {"coding": {"code": "17861-6"}}, {"coding": [None, 3]}, {"text": "calcium"}, "active", 7]
_ODD_REFERENCES = [{"reference": "Patient/someone-else"}, {}, {"reference": 7}, "Patient/x"]
_WHEN = [
    (SCENARIO_TIME - timedelta(days=days)).isoformat().replace("+00:00", "Z") for days in (0, 1, 2, 5, 6, 7, 8, 20, 30, 89, 90, 91, 179, 181)
]
_ODD_WHEN = [
    (SCENARIO_TIME + timedelta(days=3)).isoformat(),  # in the future
    "2026-10", "2026", "2026-10-30", "2026-10-30T10:00:00+05:00", "2026-10-30T10:00", "not-a-date", "", "2026-02-30", 20261030, None,
]
# Values around the rules' thresholds in mg/dL, mmol/L, pg/mL and mL/min.
_VALUES = [0, 1.1, 1.45, 2.2, 2.4, 2.6, 3.5, 4.5, 5.5, 6.5, 7.2, 8.5, 9.2, 9.6, 10, 10.4, 11.5, 12, 14.99, 15, 40, 59, 60, 80, 480, 1200]
_ODD_VALUES = [-1, 1e9, "12", True, [], 1e-300, None]
_UNITS = ["mg/dL"] * 4 + ["mmol/L", "pg/mL", "pmol/L", "mL/min/{1.73_m2}", "mL/min/1.73m2", "g/dL"]
_ODD_UNITS = ["ng/L", "%", "", "furlongs", None, 5]


def mostly(likely: st.SearchStrategy, odd: list) -> st.SearchStrategy:
    """`likely` about five times in six, else one of the `odd` values."""
    return st.integers(0, 5).flatmap(lambda n: likely if n < 5 else st.sampled_from(odd))  # shrinks towards likely


def _concept(system: str, codes: list[str]) -> st.SearchStrategy:
    return mostly(st.sampled_from(codes).map(lambda c: {"coding": [{"system": system, "code": c}]}), _ODD_CONCEPTS)


def _clinical_prefetch() -> st.SearchStrategy:
    """A patient chart as an EHR's prefetch: mostly plausible resources, with malformed ones mixed in.

    Plausible is the common case because that is what gets past validation to the rules and cards;
    the odd values (wrong types, bad dates and units, other patients, repeated ids) probe the
    parsing and validation around them.
    """
    when = mostly(st.sampled_from(_WHEN), _ODD_WHEN)
    subject = mostly(st.just({"reference": f"Patient/{PATIENT_ID}"}), _ODD_REFERENCES)

    def code(kind: str) -> st.SearchStrategy:
        # Value set first, then a code in it: each lab or diagnosis is as likely as the others.
        coding = mostly(st.sampled_from(_codings(kind)).flatmap(st.sampled_from), _ODD_CODINGS)
        return mostly(st.lists(coding, min_size=1, max_size=2).map(lambda c: {"coding": c}), _ODD_CONCEPTS)

    quantity = st.fixed_dictionaries(
        {"value": mostly(st.sampled_from(_VALUES), _ODD_VALUES), "unit": mostly(st.sampled_from(_UNITS), _ODD_UNITS)},
        optional={"system": st.just("http://unitsofmeasure.org"), "comparator": st.sampled_from(["<", ">", "<=", ">="])},
    )
    # effective[x] and value[x] are FHIR choice types: one of each, or the resource is invalid FHIR.
    effective = mostly(
        when.map(lambda w: {"effectiveDateTime": w}),
        [{}, {"effectivePeriod": {"start": "2026-10-30T12:00:00Z"}}, {"effectiveDateTime": "2026-10-30", "effectivePeriod": {}}],
    )
    value = mostly(
        quantity.map(lambda q: {"valueQuantity": q}),
        [{}, {"valueQuantity": {}}, {"valueQuantity": {"value": 10}}, {"valueQuantity": "10 mg/dL"}, {"valueString": "10.4"},
         {"dataAbsentReason": {"text": "not done"}}, {"valueQuantity": {"value": 10.4, "unit": "mg/dL"}, "valueString": "x"}],
    )
    observation = st.tuples(
        st.fixed_dictionaries(
            {
                "resourceType": st.just("Observation"),
                "id": st.sampled_from([f"o{n}" for n in range(12)]),  # an occasional repeat exercises de-duplication
                "status": mostly(st.sampled_from(["final", "amended", "corrected"]), ["preliminary", "registered", "cancelled", "entered-in-error", "unknown", 1]),
                "code": code("observation"),
                "subject": subject,
            },
            optional={
                "issued": when,
                "referenceRange": st.lists(
                    st.fixed_dictionaries({"high": st.fixed_dictionaries({"value": st.sampled_from(_VALUES), "unit": st.sampled_from(_UNITS)})}),
                    max_size=2,
                ),
            },
        ),
        effective,
        value,
    ).map(lambda parts: parts[0] | parts[1] | parts[2])
    condition = st.fixed_dictionaries(
        {
            "resourceType": st.just("Condition"),
            "id": st.sampled_from([f"c{n}" for n in range(8)]),
            "code": code("condition"),
            "subject": subject,
            "clinicalStatus": _concept(
                "http://terminology.hl7.org/CodeSystem/condition-clinical", ["active"] * 5 + ["recurrence", "relapse", "inactive", "remission", "resolved"]
            ),
        },
        optional={
            "verificationStatus": _concept(
                "http://terminology.hl7.org/CodeSystem/condition-ver-status", ["confirmed"] * 5 + ["provisional", "unconfirmed", "refuted", "entered-in-error"]
            ),
            "recordedDate": when,
            "onsetDateTime": when,
            "abatementDateTime": when,
        },
    )
    patient = st.fixed_dictionaries(
        {"resourceType": st.just("Patient"), "id": mostly(st.just(PATIENT_ID), ["someone-else", 7])},
        optional={
            "birthDate": st.sampled_from(["1950-01-01", "2010-06-30", "2026-10", "1980", "not-a-date", 1980]),
            "gender": st.sampled_from(["female", "male", "other", "unknown", "f"]),
            "deceasedBoolean": st.booleans(),
        },
    )

    def bundle(resource: st.SearchStrategy) -> st.SearchStrategy:
        entries = st.lists(mostly(st.fixed_dictionaries({"resource": resource}), [{}, {"resource": None}, {"resource": "x"}]), max_size=10)
        return st.fixed_dictionaries({"resourceType": st.just("Bundle"), "type": st.just("searchset"), "entry": entries})

    return st.fixed_dictionaries(
        {
            "patient": mostly(patient, [None]),
            "observations": mostly(bundle(observation), [None, {"resourceType": "Bundle"}, {"resourceType": "Bundle", "entry": "x"}]),
            "conditions": mostly(bundle(mostly(condition, [{"resourceType": "Observation", "id": "x"}])), [None, {"resourceType": "Condition", "id": "lone"}]),
        }
    )


# ------------------------------------------------------------------ the runs


def lazy(fixture_name: str):
    # Explicit Nones: schemathesis 3.x's defaults here would raise its own filter-argument deprecation warning.
    return schemathesis.from_pytest_fixture(fixture_name, method=None, endpoint=None, tag=None, operation_id=None)


api = lazy("api_schema")
pinned_api = lazy("pinned_schema")
invoke_api = lazy("invoke_schema")


def call_and_check(case) -> None:
    __tracebackhide__ = True
    response = case.call()  # in-process: the schema was loaded with the WSGI app
    case.validate_response(response, checks=CHECKS)


# Positive only: with free-string path parameters there is nothing to negate, and schemathesis
# would spend seconds per operation finding that out.
@api.parametrize(data_generation_methods=[DataGenerationMethod.positive])
@FUZZ_SETTINGS
def test_every_operation_of_the_spec(case):
    call_and_check(case)


@pinned_api.parametrize()
@FUZZ_SETTINGS
def test_hook_and_feedback_bodies_for_the_real_service(case):
    call_and_check(case)


@invoke_api.parametrize(data_generation_methods=[DataGenerationMethod.positive])
@invoke_api.given(prefetch=st.deferred(_clinical_prefetch))
# No explicit phase: the spec's request example cannot supply the extra `prefetch` argument.
@settings(FUZZ_SETTINGS, max_examples=60, phases=[Phase.generate, Phase.target, Phase.shrink])
def test_generated_patients_through_the_rule_engine(case, prefetch):
    """A spec-generated hook call whose context and prefetch are a generated patient chart.

    Some charts deliberately stray from the spec's Bundle shape (an `entry` that is not an array, a
    bare resource where a search Bundle belongs): the service must still answer as documented.
    """
    case.body["context"] = {"patientId": PATIENT_ID, "userId": "Practitioner/fuzz"}
    case.body["prefetch"] = prefetch
    response = case.call()
    if response.status_code == 200:
        event(f"cards: {len(response.json['cards'])}")  # see --hypothesis-show-statistics
    case.validate_response(response, checks=CHECKS)


# ------------------------------------------------------------------ what the fuzzing found
# Each request below made the service answer 500 when it was found. They are strict xfails: once the
# service is fixed the test passes, pytest reports XPASS(strict) as a failure, and the marker (and,
# for the first one, the exclusion of `None` from _ODD_VALUES above) should be removed.

_CA = {"system": "http://loinc.org", "code": "17861-6"}


def _observation(**fields) -> dict:
    base = {"resourceType": "Observation", "id": "ca-1", "status": "final", "code": {"coding": [_CA]},
            "subject": {"reference": f"Patient/{PATIENT_ID}"}, "effectiveDateTime": "2026-10-30T12:00:00Z"}
    return base | fields


def _hook_call(**fields) -> dict:
    body = {
        "hook": "patient-view",
        "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
        "context": {"patientId": PATIENT_ID, "userId": "Practitioner/fuzz"},
        "prefetch": {"patient": None, "observations": None, "conditions": None},
    }
    return body | fields


def _observations(*resources, **bundle_fields) -> dict:
    bundle = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}
    return {"patient": None, "conditions": None, "observations": bundle | bundle_fields}


# Requests the fuzzer once answered with a 500; each is now a regression test.
FUZZ_FINDINGS = {
    # service/patient/record.py _reading: float(None)
    "valueQuantity.value null": ("/cds-services/calcinosis-risk", _hook_call(
        prefetch=_observations(_observation(valueQuantity={"value": None, "unit": "mg/dL"})))),
    # service/patient/record.py _reading: float(None) for the reference range
    "referenceRange.high.value null": ("/cds-services/calcinosis-risk", _hook_call(
        prefetch=_observations(_observation(valueQuantity={"value": 10.4, "unit": "mg/dL"}, referenceRange=[{"high": {"value": None, "unit": "mg/dL"}}])))),
    # service/cds_hooks/request.py parse_hook_request: urlsplit raises ValueError("Invalid IPv6 URL")
    "fhirServer with an unclosed IPv6 bracket": ("/cds-services/calcinosis-risk", _hook_call(fhirServer="http://[")),
    # service/cds_hooks/prefetch.py _has_next: iterates Bundle.link
    "prefetch Bundle.link not an array": ("/cds-services/calcinosis-risk", _hook_call(prefetch=_observations(link=5))),
    # service/patient/fhir_client.py continue_search: urljoin(base, 5)
    "prefetch Bundle next link url not a string": ("/cds-services/calcinosis-risk", _hook_call(
        fhirServer="http://127.0.0.1:8/fhir", prefetch=_observations(link=[{"relation": "next", "url": 5}]))),
    # service/cds_hooks/feedback.py _parse_timestamp: astimezone(UTC) overflows past year 9999
    "feedback outcomeTimestamp past 9999 in UTC": ("/cds-services/calcinosis-risk/feedback", {"feedback": [
        {"card": "c", "outcome": "overridden", "outcomeTimestamp": "9999-12-31T23:59:59-23:59"}]}),
    # ... and before year 1
    "feedback outcomeTimestamp before year 1 in UTC": ("/cds-services/calcinosis-risk/feedback", {"feedback": [
        {"card": "c", "outcome": "overridden", "outcomeTimestamp": "0001-01-01T00:30:00+01:00"}]}),
}


@pytest.mark.parametrize("name", list(FUZZ_FINDINGS))
def test_fuzz_finding_is_answered_without_a_server_error(fuzz_app, name):
    path, body = FUZZ_FINDINGS[name]
    response = fuzz_app.test_client().post(path, json=body)
    assert response.status_code < 500, response.json
