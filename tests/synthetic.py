"""A deterministic synthetic FHIR Bulk Data export, for screening tests and benchmarks.

Every patient is drawn from one profile, and each profile's values are drawn from ranges
chosen so that the rule set in rules/ decides the same way for every draw: the export
knows which patients must be flagged, and by which rule.

    python -m tests.synthetic OUT_DIR --patients 10000 [--seed 7] [--now 2026-11-01T12:00:00Z] [--references uuid]
"""
from __future__ import annotations

import argparse
import json
import random
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
DEFAULT_NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)

# profile -> (weight, rule ids that must fire). Values per profile are drawn in `_patient`.
PROFILES: dict[str, tuple[int, tuple[str, ...]]] = {
    "esrd-high-product": (15, ("calciphylaxis-risk",)),  # ESRD, Ca x P >= 72, labs current
    "esrd-labs-due": (8, ("ckd-mbd-labs-due",)),  # ESRD, no PTH in 180 days
    "metastatic": (7, ("metastatic-calcification",)),  # no kidney failure, Ca > 10.5, Ca x P >= 70
    "esrd-controlled": (20, ()),  # ESRD, Ca x P <= 50, labs current
    "esrd-labs-apart": (5, ()),  # ESRD, high Ca and P drawn 10-20 days apart: no product
    "refuted-esrd": (5, ()),  # ESRD refuted, normal eGFR and labs
    "healthy": (35, ()),  # normal eGFR and labs
    "no-data": (5, ()),  # a Patient and nothing else
}


@dataclass
class SyntheticExport:
    folder: Path
    profiles: dict[str, str] = field(default_factory=dict)  # patient id -> profile

    def expected(self, patient_id: str) -> tuple[str, ...]:
        return PROFILES[self.profiles[patient_id]][1]

    @property
    def flagged(self) -> dict[str, tuple[str, ...]]:
        """Patients at least one rule must fire for, with the rule ids."""
        return {pid: self.expected(pid) for pid in self.profiles if self.expected(pid)}


# How resources point at their Patient, as different servers write it (Bulk Data exports):
REFERENCE_STYLES = {
    "relative": lambda pid, n: f"Patient/{pid}",
    "versioned": lambda pid, n: f"Patient/{pid}/_history/{n % 3 + 1}",
    "absolute": lambda pid, n: f"https://fhir.example.org/r4/Patient/{pid}",
    "uuid": lambda pid, n: f"urn:uuid:{pid}",  # Synthea, Pathling: the Patient's id is the uuid
}


def write_bulk_export(folder: Path, patients: int, seed: int = 7, now: datetime = DEFAULT_NOW, references: str = "relative") -> SyntheticExport:
    """Write Patient.ndjson, Observation.ndjson and Condition.ndjson under `folder`.

    `references`: one of REFERENCE_STYLES, or "mixed" (each patient's style drawn in turn).
    With "uuid" (and for the uuid patients of "mixed") patient ids are uuids.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = list(PROFILES)
    weights = [PROFILES[n][0] for n in names]
    styles = list(REFERENCE_STYLES)
    export = SyntheticExport(folder)
    with (folder / "Patient.ndjson").open("w") as pat, (folder / "Observation.ndjson").open("w") as obs, (folder / "Condition.ndjson").open("w") as cond:
        for number in range(1, patients + 1):
            style = styles[number % len(styles)] if references == "mixed" else references
            pid = str(uuid.UUID(int=rng.getrandbits(128), version=4)) if style == "uuid" else f"synth-{number:06d}"
            profile = rng.choices(names, weights)[0]
            export.profiles[pid] = profile
            patient, observations, conditions = _patient(rng, pid, profile, now)
            for resource in observations + conditions:
                resource["subject"]["reference"] = REFERENCE_STYLES[style](pid, number)
            pat.write(json.dumps(patient) + "\n")
            obs.writelines(json.dumps(o) + "\n" for o in observations)
            cond.writelines(json.dumps(c) + "\n" for c in conditions)
    return export


def _patient(rng: random.Random, pid: str, profile: str, now: datetime) -> tuple[dict, list[dict], list[dict]]:
    born = now.date() - timedelta(days=rng.randint(30 * 365, 85 * 365))
    patient = {"resourceType": "Patient", "id": pid, "gender": rng.choice(["female", "male"]), "birthDate": born.isoformat()}
    observations: list[dict] = []
    conditions: list[dict] = []

    def lab(kind: str, value: float, days_ago: float) -> None:
        code, display, unit, high = LABS[kind]
        when = now - timedelta(days=days_ago, hours=rng.randint(0, 12))
        resource = {
            "resourceType": "Observation",
            "id": f"{pid}-{kind}-{len(observations) + 1}",
            "status": "final",
            "code": {"coding": [{"system": LOINC, "code": code, "display": display}]},
            "subject": {"reference": f"Patient/{pid}"},
            "effectiveDateTime": when.isoformat().replace("+00:00", "Z"),
            "valueQuantity": {"value": round(value, 2), "unit": unit, "system": UCUM, "code": unit},
        }
        if high is not None:
            resource["referenceRange"] = [{"high": {"value": high, "unit": unit, "system": UCUM, "code": unit}}]
        observations.append(resource)

    def esrd(verification: str = "confirmed") -> None:
        conditions.append({
            "resourceType": "Condition",
            "id": f"{pid}-esrd",
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
            "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": verification}]},
            "code": {"coding": [{"system": SNOMED, "code": "236435004", "display": "End stage renal failure on dialysis (disorder)"}]},
            "subject": {"reference": f"Patient/{pid}"},
            "recordedDate": (now - timedelta(days=rng.randint(200, 2000))).date().isoformat(),
        })

    def paired(calcium: float, phosphate: float, apart_days: float = 0) -> None:
        drawn = rng.uniform(1, 60)
        lab("calcium", calcium, drawn)
        lab("phosphate", phosphate, drawn + apart_days)

    if profile == "esrd-high-product":
        esrd()
        paired(rng.uniform(10.0, 11.0), rng.uniform(7.2, 8.5))  # product 72-93.5
        lab("pth", rng.uniform(300, 900), rng.uniform(1, 150))
        lab("egfr", rng.uniform(5, 14), rng.uniform(1, 150))
    elif profile == "esrd-labs-due":
        esrd()
        paired(rng.uniform(8.6, 10.0), rng.uniform(3.0, 5.0))
        if rng.random() < 0.5:
            lab("pth", rng.uniform(300, 900), rng.uniform(200, 400))  # outside the 180-day look-back
    elif profile == "metastatic":
        paired(rng.uniform(10.8, 12.0), rng.uniform(6.5, 8.0))  # product >= 70.2; calcium above 10.5
        lab("egfr", rng.uniform(65, 110), rng.uniform(1, 150))
    elif profile == "esrd-controlled":
        esrd()
        paired(rng.uniform(8.6, 10.0), rng.uniform(3.0, 5.0))  # product <= 50
        lab("pth", rng.uniform(150, 500), rng.uniform(1, 150))
    elif profile == "esrd-labs-apart":
        esrd()
        paired(rng.uniform(10.0, 11.0), rng.uniform(7.2, 8.5), apart_days=rng.uniform(10, 20))
        lab("pth", rng.uniform(300, 900), rng.uniform(1, 150))
    elif profile == "refuted-esrd":
        esrd("refuted")
        paired(rng.uniform(8.6, 10.0), rng.uniform(2.5, 4.5))
        lab("egfr", rng.uniform(65, 110), rng.uniform(1, 150))
    elif profile == "healthy":
        paired(rng.uniform(8.6, 10.0), rng.uniform(2.5, 4.5))  # product <= 45
        lab("egfr", rng.uniform(65, 110), rng.uniform(1, 150))
        if rng.random() < 0.5:
            lab("pth", rng.uniform(20, 60), rng.uniform(1, 150))
    return patient, observations, conditions


# kind -> (LOINC code, display, UCUM unit, reference-range upper limit)
LABS = {
    "calcium": ("17861-6", "Calcium [Mass/volume] in Serum or Plasma", "mg/dL", 10.5),
    "phosphate": ("2777-1", "Phosphate [Mass/volume] in Serum or Plasma", "mg/dL", 4.5),
    "pth": ("2731-8", "Parathyrin.intact [Mass/volume] in Serum or Plasma", "pg/mL", 65),
    "egfr": ("98979-8", "Glomerular filtration rate/1.73 sq M.predicted [Volume Rate/Area] in Serum, Plasma or Blood by Creatinine-based formula (CKD-EPI 2021)", "mL/min/{1.73_m2}", None),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.synthetic", description="Write a synthetic FHIR Bulk Data export.")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--patients", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--now", default="2026-11-01T12:00:00Z", help="the time the data is written for (use the same --now when screening)")
    parser.add_argument("--references", default="relative", choices=[*REFERENCE_STYLES, "mixed"], help="how resources reference their Patient")
    args = parser.parse_args(argv)
    now = datetime.fromisoformat(args.now.replace("Z", "+00:00"))
    export = write_bulk_export(args.folder, args.patients, args.seed, now, args.references)
    print(f"{args.patients} patients in {args.folder}; {len(export.flagged)} should be flagged")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
