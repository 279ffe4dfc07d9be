"""Unit conversion per analyte (../shared/CLINICAL.md, "Units"), and its use by the engine."""
from __future__ import annotations

import pytest

from fakes import NOW, FakeRecord, days_ago, load, observation, rule_doc
from service.engine.evaluate import Evaluator
from service.engine.units import ANALYTES


def convert(analyte: str, value: float, source: str | None, target: str) -> float | None:
    return ANALYTES[analyte].convert(value, source, target)


# --- the factors CLINICAL.md gives -----------------------------------------------------------------


def test_calcium_mmol_per_litre_times_4_008_is_mg_per_dl():
    assert convert("calcium", 2.5, "mmol/L", "mg/dL") == pytest.approx(10.02)
    assert convert("calcium", 1.0, "mmol/L", "mg/dL") == pytest.approx(4.008)


def test_calcium_mg_per_dl_back_to_mmol_per_litre_divides_by_4_008():
    assert convert("calcium", 10.02, "mg/dL", "mmol/L") == pytest.approx(2.5)


def test_phosphate_mmol_per_litre_times_3_097_is_mg_per_dl():
    assert convert("phosphate", 1.0, "mmol/L", "mg/dL") == pytest.approx(3.097)
    assert convert("phosphate", 2.0, "mmol/L", "mg/dL") == pytest.approx(6.194)


def test_phosphate_is_not_converted_with_the_calcium_factor():
    assert convert("phosphate", 1.0, "mmol/L", "mg/dL") != pytest.approx(4.008)


def test_pth_pmol_per_litre_times_9_43_is_pg_per_ml():
    assert convert("pth", 10.0, "pmol/L", "pg/mL") == pytest.approx(94.3)


def test_pth_ng_per_litre_equals_pg_per_ml():
    assert convert("pth", 250.0, "ng/L", "pg/mL") == pytest.approx(250.0)


@pytest.mark.parametrize("unit", ["mL/min", "mL/min/{1.73_m2}", "mL/min/1.73m2", "mL/min/1.73_m2", "mL/min/{1.73m2}"])
def test_egfr_plain_ml_per_min_and_per_1_73_m2_are_the_same_scale(unit):
    assert convert("egfr", 42.0, unit, "mL/min/{1.73_m2}") == pytest.approx(42.0)


def test_albumin_grams_per_litre_divided_by_10_is_grams_per_decilitre():
    assert convert("albumin", 35.0, "g/L", "g/dL") == pytest.approx(3.5)


def test_canonical_unit_converts_to_itself():
    for analyte in ANALYTES.values():
        assert analyte.convert(7.0, analyte.canonical, analyte.canonical) == pytest.approx(7.0)


# --- spelling --------------------------------------------------------------------------------------


@pytest.mark.parametrize("unit", ["Mg/dl", "MG/DL", "mg/dl", " mg/dL ", "mg / dL"])
def test_units_match_case_insensitively_and_ignore_spaces(unit):
    assert convert("calcium", 9.0, unit, "mg/dL") == pytest.approx(9.0)


def test_molar_unit_matches_case_insensitively():
    assert convert("calcium", 2.5, "MMOL/L", "mg/dL") == pytest.approx(10.02)


@pytest.mark.parametrize("unit", ["mmol/kg", "mEq/L", "mg/L", "%", "pg/mL", "", None])
def test_unknown_calcium_unit_gives_none(unit):
    assert ANALYTES["calcium"].factor(unit) is None
    assert convert("calcium", 9.0, unit, "mg/dL") is None


def test_unknown_target_unit_gives_none():
    assert convert("calcium", 9.0, "mg/dL", "mmol/kg") is None


def test_unit_of_one_analyte_is_not_accepted_for_another():
    # pg/mL is a PTH unit, not a calcium unit; g/L is albumin, not phosphate.
    assert convert("calcium", 9.0, "pg/mL", "mg/dL") is None
    assert convert("phosphate", 9.0, "g/L", "mg/dL") is None


def test_spellings_list_the_units_the_engine_understands():
    assert {u.lower() for u in ANALYTES["pth"].spellings} == {"ng/l", "pg/ml", "pmol/l"}
    assert "mmol/l" in {u.lower() for u in ANALYTES["calcium"].spellings}


# --- CLINICAL.md examples: Ca x P thresholds in SI ----------------------------------------------------------

MG2_PER_MMOL2 = 4.008 * 3.097  # one mmol²/L² of Ca x P in mg²/dL²


@pytest.mark.parametrize(("si", "conventional"), [(4.43, 55), (5.64, 70), (6.04, 75)])
def test_ca_x_p_thresholds_in_si_match_the_conventional_thresholds(si, conventional):
    ca = convert("calcium", 1.0, "mmol/L", "mg/dL")
    p = convert("phosphate", 1.0, "mmol/L", "mg/dL")
    assert si * ca * p == pytest.approx(conventional, abs=0.1)


def _product_of(tmp_path, ca_mmol: float, p_mmol: float):
    ruleset = load(tmp_path / "rules", {"probe": rule_doc("probe", {"fact": "ca_x_p", "operator": "ge", "value": 70})})
    record = FakeRecord(
        observations={
            "calcium": [observation(ca_mmol, "mmol/L", at=days_ago(2))],
            "phosphate": [observation(p_mmol, "mmol/L", at=days_ago(1))],
        }
    )
    evaluator = Evaluator(ruleset, record, NOW)
    return evaluator.value_of("ca_x_p"), evaluator.test(ruleset.rules[0].when)[0]


def test_engine_computes_ca_x_p_in_mg2_per_dl2_from_si_results(tmp_path):
    # 2.40 mmol/L x 2.35 mmol/L = 5.64 mmol²/L², the SI form of 70 mg²/dL².
    product, fires = _product_of(tmp_path, 2.40, 2.35)
    assert product.value == pytest.approx(5.64 * MG2_PER_MMOL2)
    assert product.value == pytest.approx(70.0, abs=0.1)
    assert fires is True


def test_si_product_below_5_64_stays_below_70(tmp_path):
    product, fires = _product_of(tmp_path, 2.40, 2.30)  # 5.52 mmol²/L² = 68.5 mg²/dL²
    assert product.value == pytest.approx(68.5, abs=0.1)
    assert fires is False


def test_engine_reads_mixed_case_unit_as_the_known_unit(tmp_path):
    ruleset = load(tmp_path / "rules", {"probe": rule_doc("probe", {"fact": "calcium", "operator": "gt", "value": 10})})
    record = FakeRecord(observations={"calcium": [observation(10.4, "Mg/dl", at=days_ago(1))]})
    fact = Evaluator(ruleset, record, NOW).value_of("calcium")
    assert fact.state == "found"
    assert fact.value == pytest.approx(10.4)
    assert fact.unit == "mg/dL"


def test_engine_keeps_the_unit_as_sent_in_the_evidence(tmp_path):
    ruleset = load(tmp_path / "rules", {"probe": rule_doc("probe", {"fact": "calcium", "operator": "gt", "value": 10})})
    record = FakeRecord(observations={"calcium": [observation(2.6, "mmol/L", at=days_ago(1))]})
    fact = Evaluator(ruleset, record, NOW).value_of("calcium")
    assert fact.evidence[0].sent == "2.6 mmol/L"
    assert fact.evidence[0].value == pytest.approx(10.4208)


# --- the patient record picks the unit the engine converts -------------------------------------------------------


def _read(resource: dict):
    """Index one Observation in the real patient record and load its reading."""
    from service.engine.valuesets import CodeIndex, ValueSet
    from service.patient.record import PatientRecord

    calcium = ValueSet("calcium", "Calcium", "", frozenset({("http://loinc.org", "17861-6")}), (), "test")
    record = PatientRecord(CodeIndex([calcium]))
    record.add(resource)
    (entry,) = record.observations("calcium")
    return entry.reading()


def test_record_falls_back_to_the_unit_text_when_the_ucum_code_is_missing():
    reading = _read(
        {
            "resourceType": "Observation",
            "id": "o1",
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "17861-6"}]},
            "valueQuantity": {"value": 9.1, "unit": "Mg/dl"},
        }
    )
    assert reading.unit == "Mg/dl"
    assert ANALYTES["calcium"].factor(reading.unit) == 1.0


def test_record_ignores_a_code_from_a_local_unit_system():
    reading = _read(
        {
            "resourceType": "Observation",
            "id": "o1",
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "17861-6"}]},
            "valueQuantity": {"value": 2.4, "unit": "mmol/L", "system": "http://lab.example.org/units", "code": "CA-MMOL"},
        }
    )
    assert reading.unit == "mmol/L"
