"""Deterministic synthetic CDS Hooks requests: one dialysis patient with N Observations.

The patient has end-stage kidney disease on dialysis, type 2 diabetes and secondary
hyperparathyroidism. Her Observations are spread over two years before `NOW`:
CKD-MBD labs (total calcium, phosphate, intact PTH, eGFR, albumin; some in SI units)
and unrelated results a dialysis unit also sends (hemoglobin, potassium, sodium,
creatinine, urea nitrogen, glucose, bicarbonate, ferritin, ionized calcium, body
weight). Dates are uniform over the two years, so most results fall outside the
rules' look-back windows (90 and 180 days) and some inside. A few carry statuses
the rules skip (preliminary, entered-in-error) or accept (amended, corrected).

Every request also holds one recent draw (4 days before `NOW`) of calcium,
phosphate, PTH, eGFR and albumin with a high calcium x phosphate product, so the
calciphylaxis-risk rule fires and the card-rendering path is exercised at every size.

Same `n` and seed, same bytes: `body(100)` is identical on every machine and run.

    python -m bench.data 100 > /tmp/request-100.json
"""
from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache

import orjson

SEED = 20261101
NOW = "2026-11-01T12:00:00Z"  # the pinned evaluation time (CDS_NOW) the data is written for
PATIENT_ID = "bench-dialysis-0001"
HOOK_INSTANCE = "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea"
SERVICE_ID = "calcinosis-risk"
SPAN_DAYS = 730

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
COND_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"
BASE = "https://ehr.example.org/fhir"


@dataclass(frozen=True)
class Test:
    """One LOINC-coded result type, with a plausible distribution for a dialysis patient."""

    analyte: str
    code: str
    display: str
    unit: str
    mean: float
    sd: float
    decimals: int
    low: float | None = None
    high: float | None = None
    category: str = "laboratory"


# analyte -> (share of all Observations, variants with their share within the analyte)
CATALOGUE: dict[str, tuple[float, list[tuple[float, Test]]]] = {
    # --- read by the rules ------------------------------------------------------------------
    "calcium": (0.17, [
        (0.9, Test("calcium", "17861-6", "Calcium [Mass/volume] in Serum or Plasma", "mg/dL", 9.4, 0.6, 1, 8.5, 10.5)),
        (0.1, Test("calcium", "2000-8", "Calcium [Moles/volume] in Serum or Plasma", "mmol/L", 2.35, 0.15, 2, 2.15, 2.55)),
    ]),
    "phosphate": (0.17, [
        (0.9, Test("phosphate", "2777-1", "Phosphate [Mass/volume] in Serum or Plasma", "mg/dL", 5.8, 1.2, 1, 2.5, 4.5)),
        (0.1, Test("phosphate", "14879-1", "Phosphate [Moles/volume] in Serum or Plasma", "mmol/L", 1.87, 0.4, 2, 0.81, 1.45)),
    ]),
    "pth": (0.05, [
        (1.0, Test("pth", "2731-8", "Parathyrin.intact [Mass/volume] in Serum or Plasma", "pg/mL", 450, 150, 0, 15, 65)),
    ]),
    "egfr": (0.08, [
        (0.6, Test("egfr", "62238-1", "Glomerular filtration rate/1.73 sq M.predicted [Volume Rate/Area] in Serum, Plasma or Blood by Creatinine-based formula (CKD-EPI)", "mL/min/{1.73_m2}", 9, 2, 0, 60, None)),
        (0.4, Test("egfr", "98979-8", "Glomerular filtration rate/1.73 sq M.predicted [Volume Rate/Area] in Serum, Plasma or Blood by Creatinine-based formula (CKD-EPI 2021)", "mL/min/{1.73_m2}", 9, 2, 0, 60, None)),
    ]),
    "albumin": (0.08, [
        (0.8, Test("albumin", "1751-7", "Albumin [Mass/volume] in Serum or Plasma", "g/dL", 3.6, 0.3, 1, 3.5, 5.0)),
        (0.2, Test("albumin", "61151-7", "Albumin [Mass/volume] in Serum or Plasma by Bromocresol green (BCG) dye binding method", "g/L", 36, 3, 0, 35, 50)),
    ]),
    # --- not read by any rule (ionized calcium is indexed, then ignored) ---------------------
    "hemoglobin": (0.08, [(1.0, Test("hemoglobin", "718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL", 10.5, 1.0, 1, 12.0, 15.5))]),
    "potassium": (0.09, [(1.0, Test("potassium", "2823-3", "Potassium [Moles/volume] in Serum or Plasma", "mmol/L", 5.0, 0.5, 1, 3.5, 5.1))]),
    "sodium": (0.05, [(1.0, Test("sodium", "2951-2", "Sodium [Moles/volume] in Serum or Plasma", "mmol/L", 138, 3, 0, 135, 145))]),
    "creatinine": (0.06, [(1.0, Test("creatinine", "2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "mg/dL", 7.5, 1.5, 2, 0.5, 1.1))]),
    "urea": (0.05, [(1.0, Test("urea", "3094-0", "Urea nitrogen [Mass/volume] in Serum or Plasma", "mg/dL", 55, 12, 0, 7, 20))]),
    "glucose": (0.04, [(1.0, Test("glucose", "2345-7", "Glucose [Mass/volume] in Serum or Plasma", "mg/dL", 140, 35, 0, 70, 99))]),
    "bicarbonate": (0.03, [(1.0, Test("bicarbonate", "1963-8", "Bicarbonate [Moles/volume] in Serum or Plasma", "mmol/L", 22, 2, 0, 22, 29))]),
    "ferritin": (0.02, [(1.0, Test("ferritin", "2276-4", "Ferritin [Mass/volume] in Serum or Plasma", "ng/mL", 600, 200, 0, 11, 307))]),
    "ionized-calcium": (0.01, [(1.0, Test("ionized-calcium", "1995-0", "Calcium.ionized [Moles/volume] in Serum or Plasma", "mmol/L", 1.18, 0.06, 2, 1.15, 1.33))]),
    "weight": (0.02, [(1.0, Test("weight", "29463-7", "Body weight", "kg", 72, 2, 1, None, None, "vital-signs"))]),
}
RULE_ANALYTES = ("calcium", "phosphate", "pth", "egfr", "albumin")

# The recent draw every request holds: Ca 10.3 x P 7.4 = 76 mg²/dL² (>= 70), PTH ~9x ULN, eGFR < 15.
RECENT_DRAW = {"calcium": 10.3, "phosphate": 7.4, "pth": 612, "egfr": 8, "albumin": 3.2}
RECENT_DAYS_AGO = 4

STATUSES = [(0.955, "final"), (0.02, "amended"), (0.01, "corrected"), (0.01, "preliminary"), (0.005, "entered-in-error")]


def _now(now: str = NOW) -> datetime:
    return datetime.fromisoformat(now.replace("Z", "+00:00"))


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _pick(rng: random.Random, weighted):
    x, total = rng.random(), 0.0
    for weight, item in weighted:
        total += weight
        if x < total:
            return item
    return weighted[-1][1]


def _quantity(value: float, unit: str) -> dict:
    return {"value": value, "unit": unit, "system": UCUM, "code": unit}


def observation(index: int, test: Test, value: float, effective: datetime, status: str, patient_id: str = PATIENT_ID) -> dict:
    """One Observation as a US lab interface would send it (FHIR R4)."""
    issued = effective + timedelta(hours=4, minutes=(index * 7) % 60)
    value = round(value, test.decimals) if test.decimals else float(round(value))
    resource: dict = {
        "resourceType": "Observation",
        "id": f"{patient_id}-obs-{index:05d}",
        "meta": {"versionId": "1", "lastUpdated": _iso(issued)},
        "status": status,
        "category": [{"coding": [{"system": OBS_CATEGORY, "code": test.category, "display": "Laboratory" if test.category == "laboratory" else "Vital Signs"}]}],
        "code": {"coding": [{"system": LOINC, "code": test.code, "display": test.display}], "text": test.display},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": _iso(effective),
        "issued": _iso(issued),
        "performer": [{"reference": "Organization/dialysis-unit-lab", "display": "Dialysis Unit Laboratory"}],
        "valueQuantity": _quantity(value, test.unit),
    }
    if test.low is not None or test.high is not None:
        reference_range = {}
        if test.low is not None:
            reference_range["low"] = _quantity(test.low, test.unit)
        if test.high is not None:
            reference_range["high"] = _quantity(test.high, test.unit)
        resource["referenceRange"] = [reference_range]
        flag = "L" if test.low is not None and value < test.low else "H" if test.high is not None and value > test.high else "N"
        display = {"L": "Low", "H": "High", "N": "Normal"}[flag]
        resource["interpretation"] = [{"coding": [{"system": INTERPRETATION, "code": flag, "display": display}]}]
    return resource


def observations(n: int, *, seed: int = SEED, now: str = NOW, patient_id: str = PATIENT_ID) -> list[dict]:
    """`n` Observations, newest first (as `_sort=-date` returns them)."""
    if n < len(RECENT_DRAW):
        raise ValueError(f"n must be at least {len(RECENT_DRAW)} (the recent draw)")
    rng = random.Random(seed)
    at = _now(now)
    out: list[tuple[datetime, dict]] = []
    recent = (at - timedelta(days=RECENT_DAYS_AGO)).replace(hour=7, minute=30, second=0)
    for i, (analyte, value) in enumerate(RECENT_DRAW.items()):
        test = CATALOGUE[analyte][1][0][1]
        out.append((recent, observation(i, test, value, recent, "final", patient_id)))
    shares = [(share, analyte) for analyte, (share, _) in CATALOGUE.items()]
    for i in range(len(RECENT_DRAW), n):
        test = _pick(rng, CATALOGUE[_pick(rng, shares)][1])
        # Uniform over two years and older than the recent draw, so the same rules fire at every size.
        effective = at - timedelta(days=RECENT_DAYS_AGO + 1) - timedelta(minutes=rng.randrange((SPAN_DAYS - RECENT_DAYS_AGO - 1) * 24 * 60))
        value = max(rng.gauss(test.mean, test.sd), test.mean / 4)
        out.append((effective, observation(i, test, value, effective, _pick(rng, STATUSES), patient_id)))
    out.sort(key=lambda pair: pair[0], reverse=True)
    return [resource for _, resource in out]


ADVERSARIAL_SHARE = 0.8  # of an adversarial chart's results: unusable, and newer than every usable one


def adversarial_observations(n: int, *, seed: int = SEED, now: str = NOW, patient_id: str = PATIENT_ID) -> list[dict]:
    """`n` Observations of which most are unusable and newest: the chart that made pairing quadratic.

    The plain chart's first `n - k` results are kept (the recent usable draw among them); the
    other k = 80% are calcium, phosphate, PTH and eGFR results dated after the recent draw that
    cannot be used: half carry `dataAbsentReason`, half a value that is not a number. Valid
    JSON and, for half of them, valid FHIR; a rule must pass over every one to reach the draw.
    """
    k = int(n * ADVERSARIAL_SHARE)
    plain = observations(max(n - k, len(RECENT_DRAW)), seed=seed, now=now, patient_id=patient_id)
    rng = random.Random(seed + 1)
    at = _now(now)
    tests = [CATALOGUE[a][1][0][1] for a in ("calcium", "phosphate", "pth", "egfr")]
    bad: list[tuple[datetime, dict]] = []
    for j in range(n - len(plain)):
        test = tests[j % len(tests)]
        effective = at - timedelta(minutes=rng.randrange(1, (RECENT_DAYS_AGO * 24 - 1) * 60))
        resource = observation(100_000 + j, test, test.mean, effective, "final", patient_id)
        if j % 2:
            del resource["valueQuantity"]
            resource.pop("interpretation", None)
            resource["dataAbsentReason"] = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason", "code": "error", "display": "Error"}]}
        else:
            resource["valueQuantity"]["value"] = "see comment"
        bad.append((effective, resource))
    bad.sort(key=lambda pair: pair[0], reverse=True)
    return [r for _, r in bad] + plain


def _condition(cid: str, codings: list[tuple[str, str, str]], onset: str, patient_id: str) -> dict:
    return {
        "resourceType": "Condition",
        "id": f"{patient_id}-{cid}",
        "meta": {"versionId": "1", "lastUpdated": onset[:10] + "T09:00:00Z"},
        "clinicalStatus": {"coding": [{"system": CLINICAL, "code": "active", "display": "Active"}]},
        "verificationStatus": {"coding": [{"system": VERIFICATION, "code": "confirmed", "display": "Confirmed"}]},
        "category": [{"coding": [{"system": COND_CATEGORY, "code": "problem-list-item", "display": "Problem List Item"}]}],
        "code": {"coding": [{"system": s, "code": c, "display": d} for s, c, d in codings], "text": codings[0][2]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "onsetDateTime": onset,
        "recordedDate": onset[:10] + "T09:00:00Z",
    }


def conditions(patient_id: str = PATIENT_ID) -> list[dict]:
    """Problem list: three the rules read (ESRD on dialysis, diabetes, SHPT), two they do not."""
    return [
        _condition("esrd", [(SNOMED, "236435004", "End stage renal failure on dialysis (disorder)"), (ICD10CM, "N18.6", "End stage renal disease")], "2023-02-10T00:00:00Z", patient_id),
        _condition("t2dm", [(ICD10CM, "E11.22", "Type 2 diabetes mellitus with diabetic chronic kidney disease")], "2009-06-01T00:00:00Z", patient_id),
        _condition("shpt", [(ICD10CM, "N25.81", "Secondary hyperparathyroidism of renal origin")], "2023-09-14T00:00:00Z", patient_id),
        _condition("htn", [(SNOMED, "38341003", "Hypertensive disorder, systemic arterial (disorder)"), (ICD10CM, "I10", "Essential (primary) hypertension")], "2005-03-22T00:00:00Z", patient_id),
        _condition("anemia", [(ICD10CM, "D63.1", "Anemia in chronic kidney disease")], "2023-04-05T00:00:00Z", patient_id),
    ]


def patient(patient_id: str = PATIENT_ID) -> dict:
    return {
        "resourceType": "Patient",
        "id": patient_id,
        "meta": {"versionId": "3", "lastUpdated": "2026-01-15T10:12:00Z"},
        "identifier": [{"system": "urn:oid:2.16.840.1.113883.3.9999.1", "value": "MRN-00481516"}],
        "active": True,
        "name": [{"use": "official", "family": "Okafor", "given": ["Grace", "Adaeze"]}],
        "telecom": [{"system": "phone", "value": "555-0142", "use": "home"}],
        "gender": "female",
        "birthDate": "1961-03-14",
        "address": [{"line": ["12 Riverside Ave"], "city": "Springfield", "state": "IL", "postalCode": "62701"}],
    }


def _searchset(resources: list[dict], query: str) -> dict:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(resources),
        "link": [{"relation": "self", "url": f"{BASE}/{query}"}],
        "entry": [
            {"fullUrl": f"{BASE}/{r['resourceType']}/{r['id']}", "resource": r, "search": {"mode": "match"}}
            for r in resources
        ],
    }


def hook_request(n: int, *, seed: int = SEED, now: str = NOW, adversarial: bool = False) -> dict:
    """A patient-view request whose prefetch answers every template the service advertises."""
    make = adversarial_observations if adversarial else observations
    return {
        "hook": "patient-view",
        "hookInstance": HOOK_INSTANCE,
        "context": {"userId": "Practitioner/bench-nephrologist", "patientId": PATIENT_ID},
        "prefetch": {
            "patient": patient(),
            "observations": _searchset(make(n, seed=seed, now=now), f"Observation?patient={PATIENT_ID}&_sort=-date"),
            "conditions": _searchset(conditions(), f"Condition?patient={PATIENT_ID}&clinical-status=active,recurrence,relapse"),
        },
    }


@lru_cache(maxsize=None)
def body(n: int, seed: int = SEED, adversarial: bool = False) -> bytes:
    """The request as the EHR would POST it (`adversarial`: most results unusable and newest)."""
    return orjson.dumps(hook_request(n, seed=seed, adversarial=adversarial))


def describe(n: int, *, seed: int = SEED, now: str = NOW) -> dict[str, int]:
    """How many Observations the rules could read, and how many fall inside 90/180 days."""
    at = _now(now)
    codes = {t.code for a in RULE_ANALYTES for _, t in CATALOGUE[a][1]}
    obs = observations(n, seed=seed, now=now)
    rule_obs = [o for o in obs if o["code"]["coding"][0]["code"] in codes]
    age = lambda o: (at - datetime.fromisoformat(o["effectiveDateTime"].replace("Z", "+00:00"))).days  # noqa: E731
    return {
        "observations": len(obs),
        "read_by_rules": len(rule_obs),
        "within_90_days": sum(1 for o in rule_obs if age(o) <= 90),
        "within_180_days": sum(1 for o in rule_obs if age(o) <= 180),
        "unrelated": len(obs) - len(rule_obs),
        "body_bytes": len(body(n, seed)),
    }


if __name__ == "__main__":
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    sys.stdout.buffer.write(orjson.dumps(hook_request(size), option=orjson.OPT_INDENT_2) + b"\n")
