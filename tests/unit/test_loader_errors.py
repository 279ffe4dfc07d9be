"""Each kind of mistake in a rule folder is reported with its file, line, rule id and field path.

Rule files are written as YAML text so the line a mistake is on is known: `line_of`
finds it by a marker that appears only on that line.
"""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fakes import FACTS, ICD10CM, SNOMED, write_ruleset
from service.engine.loader import RuleError, RuleSetError, load_ruleset
from service.patient.validation import validation_error

PROJECT = Path(__file__).resolve().parents[2]


def rule_text(rule_id: str = "calcium-high", *, when: str | None = None, card: str | None = None, extra: str = "") -> str:
    """A valid rule file; `when`, `card` and `extra` replace or add sections (YAML, already indented)."""
    when = when or "  all:\n    - {fact: calcium, operator: gt, value: 10}\n"
    card = card or "  indicator: info\n  summary: \"Calcium {calcium} mg/dL is high\"\n  detail:\n    - Calcium is above 10 mg/dL.\n"
    return f"id: {rule_id}\ntitle: Calcium high\ndescription: Calcium above 10 mg/dL.\nwhen:\n{when}card:\n{card}{extra}"


def line_of(text: str, marker: str) -> int:
    """The 1-based line of the only line containing `marker`."""
    lines = [i for i, line in enumerate(text.splitlines(), 1) if marker in line]
    assert len(lines) == 1, f"marker {marker!r} is on lines {lines}"
    return lines[0]


def errors(tmp_path: Path, rules: dict[str, str], **kwargs) -> list[RuleError]:
    root = write_ruleset(tmp_path / "rules", rules, **kwargs)
    with pytest.raises(RuleSetError) as raised:
        load_ruleset(root, validate_resource=validation_error)
    assert str(raised.value).startswith(f"{len(raised.value.errors)} error(s) in rule files:")
    return raised.value.errors


def the_error(found: list[RuleError], field: str) -> RuleError:
    matching = [e for e in found if e.field == field]
    assert matching, f"no error at {field!r}; errors: {[str(e) for e in found]}"
    return matching[0]


def assert_located(error: RuleError, *, file: str, line: int | None, rule: str | None, field: str, says: str) -> None:
    """The error and its one-line message name the file, line, rule and field, and say what is wrong."""
    assert (error.file, error.line, error.rule, error.field) == (file, line, rule, field)
    text = str(error)
    assert text.startswith(f"{file}:{line}:" if line else f"{file}:")
    if rule:
        assert f"rule '{rule}'" in text
    if field:
        assert f" {field}:" in text
    assert says in text


# --- YAML and shape ------------------------------------------------------------------------------------


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    text = "id: calcium-high\ntitle: [Calcium high\ndescription: x\n"
    (error,) = errors(tmp_path, {"calcium-high": text})
    assert error.file == "rules/calcium-high.yaml"
    assert error.line == 3
    assert "not valid YAML" in str(error)
    assert str(error).startswith("rules/calcium-high.yaml:3:")


def test_unknown_top_level_key_is_reported_at_its_line(tmp_path):
    text = rule_text(extra="severity: high\n")
    (error,) = errors(tmp_path, {"calcium-high": text})
    assert_located(
        error, file="rules/calcium-high.yaml", line=line_of(text, "severity"), rule="calcium-high", field="severity", says="unknown field"
    )


def test_missing_required_field_is_reported(tmp_path):
    text = rule_text().replace("description: Calcium above 10 mg/dL.\n", "")
    (error,) = errors(tmp_path, {"calcium-high": text})
    assert_located(error, file="rules/calcium-high.yaml", line=1, rule="calcium-high", field="description", says="required field is missing")


def test_missing_nested_required_field_names_the_whole_path(tmp_path):
    text = rule_text(card="  indicator: info\n  detail:\n    - Calcium is above 10 mg/dL.\n")
    (error,) = errors(tmp_path, {"calcium-high": text})
    assert error.field == "card.summary"
    assert error.file == "rules/calcium-high.yaml"
    assert "required field is missing" in str(error)


def test_schema_error_in_a_rule_file_names_the_rule(tmp_path):
    text = rule_text(extra="severity: high\n")
    (error,) = errors(tmp_path, {"calcium-high": text})
    assert error.rule == "calcium-high"


# --- conditions -------------------------------------------------------------------------------------------


def test_unknown_fact_is_reported_with_a_did_you_mean(tmp_path):
    text = rule_text(when="  all:\n    - {fact: calcum, operator: gt, value: 10}\n")
    (error,) = errors(tmp_path, {"calcium-high": text})
    assert_located(
        error,
        file="rules/calcium-high.yaml",
        line=line_of(text, "calcum"),
        rule="calcium-high",
        field="when.all[0].fact",
        says="unknown fact 'calcum' (did you mean 'calcium'?)",
    )


def test_unknown_operator_is_reported_with_a_did_you_mean(tmp_path):
    text = rule_text(when="  all:\n    - {fact: calcium, operator: betwen, value: [8, 10]}\n")
    (error,) = errors(tmp_path, {"calcium-high": text})
    assert_located(
        error,
        file="rules/calcium-high.yaml",
        line=line_of(text, "betwen"),
        rule="calcium-high",
        field="when.all[0].operator",
        says="unknown operator 'betwen' (did you mean 'between'?",
    )


def test_operator_not_valid_for_the_fact_kind_is_reported(tmp_path):
    text = rule_text(when="  any:\n    - {fact: calcium, operator: gt, value: 10}\n    - {fact: kidney_dx, operator: gt, value: 1}\n")
    (error,) = errors(tmp_path, {"calcium-high": text})
    assert_located(
        error,
        file="rules/calcium-high.yaml",
        line=line_of(text, "kidney_dx"),
        rule="calcium-high",
        field="when.any[1].operator",
        says="operator 'gt' does not apply to condition fact 'kidney_dx' (use: absent, present)",
    )


@pytest.mark.parametrize(
    ("condition", "says"),
    [
        ("{fact: calcium, operator: gt, value: high}", "'gt' needs a number, got 'high'"),
        ("{fact: calcium, operator: gt, value: true}", "'gt' needs a number, got True"),
        ("{fact: kidney_failure, operator: is, value: yes please}", "'is' takes true or false"),
        ("{fact: sex, operator: in, value: female}", "'in' takes a list of words"),
        ("{fact: calcium, operator: present, value: 1}", "'present' takes no value"),
        ("{fact: calcium, operator: between, value: [8]}", "'between' takes [low, high], two numbers"),
    ],
)
def test_wrong_value_type_is_reported(tmp_path, condition, says):
    text = rule_text(when=f"  all:\n    - {condition}  # marker\n")
    (error,) = errors(tmp_path, {"calcium-high": text})
    assert_located(
        error, file="rules/calcium-high.yaml", line=line_of(text, "marker"), rule="calcium-high", field="when.all[0].value", says=says
    )


def test_between_with_low_above_high_is_reported(tmp_path):
    text = rule_text(when="  fact: calcium\n  operator: between\n  value: [10.5, 8.5]\n")
    (error,) = errors(tmp_path, {"calcium-high": text})
    assert_located(
        error, file="rules/calcium-high.yaml", line=line_of(text, "[10.5, 8.5]"), rule="calcium-high", field="when.value", says="low 10.5 is above high 8.5"
    )


# --- facts -----------------------------------------------------------------------------------------------

LOCAL_FACT = "facts:\n  calcium_recent:\n    title: Recent calcium\n    observation: {vs}\n    analyte: calcium\n    unit: mg/dL\n    lookback: {lookback}\n    plausible: [1, 25]\n"


def test_unknown_value_set_is_reported_with_a_did_you_mean(tmp_path):
    text = rule_text(extra=LOCAL_FACT.format(vs="calcum", lookback="P30D"))
    (error,) = errors(tmp_path, {"calcium-high": text})
    assert_located(
        error,
        file="rules/calcium-high.yaml",
        line=line_of(text, "observation: calcum"),
        rule="calcium-high",
        field="facts.calcium_recent.observation",
        says="unknown value set 'calcum' (did you mean 'calcium'?)",
    )


def test_unparsable_duration_is_reported(tmp_path):
    text = rule_text(extra=LOCAL_FACT.format(vs="calcium", lookback="90 days"))
    (error,) = errors(tmp_path, {"calcium-high": text})
    assert_located(
        error,
        file="rules/calcium-high.yaml",
        line=line_of(text, "90 days"),
        rule="calcium-high",
        field="facts.calcium_recent.lookback",
        says="expected an ISO 8601 duration such as P90D, P2W or PT12H, got '90 days'",
    )
    assert "months" not in error.message


def test_duration_in_months_is_refused_with_a_hint_to_write_days(tmp_path):
    text = rule_text(extra=LOCAL_FACT.format(vs="calcium", lookback="P3M"))
    (error,) = errors(tmp_path, {"calcium-high": text})
    assert_located(
        error,
        file="rules/calcium-high.yaml",
        line=line_of(text, "P3M"),
        rule="calcium-high",
        field="facts.calcium_recent.lookback",
        says="months and years vary in length: write days, e.g. P180D",
    )


def test_unit_that_is_not_a_unit_of_the_analyte_is_reported(tmp_path):
    text = rule_text(extra=LOCAL_FACT.format(vs="calcium", lookback="P30D").replace("unit: mg/dL", "unit: pg/mL"))
    (error,) = errors(tmp_path, {"calcium-high": text})
    assert_located(
        error,
        file="rules/calcium-high.yaml",
        line=line_of(text, "pg/mL"),
        rule="calcium-high",
        field="facts.calcium_recent.unit",
        says="'pg/mL' is not a calcium unit",
    )


def test_duplicate_fact_names_both_files(tmp_path):
    text = rule_text(extra=LOCAL_FACT.format(vs="calcium", lookback="P30D").replace("calcium_recent:", "calcium:"))
    (error,) = errors(tmp_path, {"calcium-high": text})
    assert_located(
        error,
        file="rules/calcium-high.yaml",
        line=line_of(text, "title: Recent calcium"),
        rule="calcium-high",
        field="facts.calcium",
        says="fact 'calcium' is defined twice (also in rules/facts.yaml)",
    )


def test_definition_cycle_is_reported(tmp_path):
    facts_text = textwrap.dedent(
        """\
        facts:
          calcium:
            title: Total calcium
            observation: calcium
            analyte: calcium
            unit: mg/dL
            lookback: P90D
            plausible: [1, 25]
          alpha:
            title: Alpha
            definition: {fact: beta, operator: is, value: true}
          beta:
            title: Beta
            definition: {fact: alpha, operator: is, value: true}
        """
    )
    found = errors(tmp_path, {"calcium-high": rule_text()}, facts_text=facts_text)
    error = the_error(found, "facts.alpha")
    assert_located(
        error,
        file="rules/facts.yaml",
        line=line_of(facts_text, "title: Alpha"),
        rule=None,
        field="facts.alpha",
        says="definitions refer to each other in a circle: alpha -> beta -> alpha",
    )


def test_definition_cycle_used_by_a_rule_is_reported_not_a_crash(tmp_path):
    cycle = {
        "alpha": {"title": "Alpha", "definition": {"fact": "beta", "operator": "is", "value": True}},
        "beta": {"title": "Beta", "definition": {"fact": "alpha", "operator": "is", "value": True}},
    }
    text = rule_text(when="  all:\n    - {fact: alpha, operator: is, value: true}\n")
    found = errors(tmp_path, {"calcium-high": text}, extra_facts=cycle)
    assert any("in a circle" in e.message for e in found)


def test_error_in_a_rule_local_definition_names_the_rule(tmp_path):
    text = rule_text(extra="facts:\n  very_high:\n    title: Very high\n    definition: {fact: calcum, operator: gt, value: 12}\n")
    found = errors(tmp_path, {"calcium-high": text})
    error = the_error(found, "facts.very_high.definition.fact")
    assert error.line == line_of(text, "calcum")
    assert error.rule == "calcium-high"


def test_prefix_code_outside_icd10cm_is_reported(tmp_path):
    text = f"id: bad\ntitle: Bad\ncodes:\n  - system: {ICD10CM}\n    code: N18.*\n  - system: {SNOMED}\n    code: \"4617*\"\n"
    found = errors(tmp_path, {"calcium-high": rule_text()}, valueset_texts={"bad": text})
    (error,) = found
    assert_located(
        error,
        file="rules/valuesets/bad.yaml",
        line=line_of(text, "4617*"),
        rule=None,
        field="codes[1].code",
        says=f"prefix form '4617*' is allowed only for ICD-10-CM ({ICD10CM})",
    )


def test_value_set_id_must_match_its_file_name(tmp_path):
    text = f"id: other\ntitle: Bad\ncodes:\n  - system: {ICD10CM}\n    code: N18.6\n"
    (error,) = errors(tmp_path, {"calcium-high": rule_text()}, valueset_texts={"bad": text})
    assert_located(error, file="rules/valuesets/bad.yaml", line=1, rule=None, field="id", says="must match its file name 'bad'")


# --- cards ------------------------------------------------------------------------------------------------


def card(summary: str, more: str = "") -> str:
    return f"  indicator: info\n  summary: \"{summary}\"\n  detail:\n    - Detail.\n{more}"


def test_summary_that_could_exceed_140_characters_is_refused(tmp_path):
    # 100 literal characters + value (9) + unit (16) + date (10) + 4 spaces = 139: allowed; one more is not.
    fits = "x" * 100 + " {calcium} {calcium.unit} {calcium.date} "
    write_ruleset(tmp_path / "ok" / "rules", {"calcium-high": rule_text(card=card(fits))})
    load_ruleset(tmp_path / "ok" / "rules")
    text = rule_text(card=card(fits + "!"))
    (error,) = errors(tmp_path, {"calcium-high": text})
    assert_located(
        error,
        file="rules/calcium-high.yaml",
        line=line_of(text, "summary:"),
        rule="calcium-high",
        field="card.summary",
        says="can render to 140 characters with the widest values",
    )


def test_unknown_placeholder_is_reported_with_a_did_you_mean(tmp_path):
    text = rule_text(card=card("Calcium {calcum} is high"))
    (error,) = errors(tmp_path, {"calcium-high": text})
    assert_located(
        error,
        file="rules/calcium-high.yaml",
        line=line_of(text, "{calcum}"),
        rule="calcium-high",
        field="card.summary",
        says="placeholder names an unknown fact 'calcum' (did you mean 'calcium'?)",
    )


def test_placeholder_attribute_the_fact_does_not_have_is_reported(tmp_path):
    text = rule_text(card=card("Lesion {kidney_dx.uln_multiple}"))
    (error,) = errors(tmp_path, {"calcium-high": text})
    assert (error.field, error.rule) == ("card.summary", "calcium-high")
    assert "{kidney_dx.uln_multiple}" in error.message
    assert "display, code, date" in error.message


@pytest.mark.parametrize(
    ("summary", "says"),
    [
        ("Calcium {calcium:.5f}", "format ':.5f' in {calcium}: only :.0f to :.3f are allowed"),
        ("Calcium {calcium:>20}", "only :.0f to :.3f are allowed"),
        ("Calcium {calcium!r}", "placeholder {calcium} must be a fact name"),
        ("Calcium {calcium", "write {{ or }} for a literal brace"),
    ],
)
def test_bad_format_spec_is_reported(tmp_path, summary, says):
    text = rule_text(card=card(summary))
    (error,) = errors(tmp_path, {"calcium-high": text})
    assert_located(error, file="rules/calcium-high.yaml", line=line_of(text, "summary:"), rule="calcium-high", field="card.summary", says=says)


def test_bad_placeholder_in_a_detail_line_names_its_index(tmp_path):
    text = rule_text(card="  indicator: info\n  summary: Calcium high\n  detail:\n    - Fine.\n    - \"Value {calcum}\"\n")
    (error,) = errors(tmp_path, {"calcium-high": text})
    assert_located(
        error, file="rules/calcium-high.yaml", line=line_of(text, "{calcum}"), rule="calcium-high", field="card.detail[1]", says="unknown fact 'calcum'"
    )


SUGGESTION = """\
  suggestions:
    - label: Order calcium
      actions:
        - type: {type}
          description: Repeat calcium
{body}"""


def test_suggestion_resource_invalid_for_fhir_resources_is_reported(tmp_path):
    body = "          resource:\n            resourceType: ServiceRequest\n            status: draft\n            intent: proposal\n            priority: whenever\n            colour: blue\n"
    text = rule_text(card=card("Calcium high", SUGGESTION.format(type="create", body=body)))
    (error,) = errors(tmp_path, {"calcium-high": text})
    assert_located(
        error,
        file="rules/calcium-high.yaml",
        line=line_of(text, "resourceType"),
        rule="calcium-high",
        field="card.suggestions[0].actions[0].resource",
        says="not a valid FHIR R4 ServiceRequest: colour",
    )


def test_suggestion_resource_is_not_checked_without_a_validator(tmp_path):
    body = "          resource:\n            resourceType: ServiceRequest\n            colour: blue\n"
    root = write_ruleset(tmp_path / "rules", {"calcium-high": rule_text(card=card("Calcium high", SUGGESTION.format(type="create", body=body)))})
    assert load_ruleset(root).rule("calcium-high") is not None


def test_create_action_without_a_resource_is_reported(tmp_path):
    text = rule_text(card=card("Calcium high", SUGGESTION.format(type="create", body="")))
    (error,) = errors(tmp_path, {"calcium-high": text})
    assert error.field == "card.suggestions[0].actions[0].resource"
    assert error.rule == "calcium-high"
    assert "a create action needs the FHIR resource to create" in error.message


def test_delete_action_without_resource_id_is_reported(tmp_path):
    text = rule_text(card=card("Calcium high", SUGGESTION.format(type="delete", body="")))
    (error,) = errors(tmp_path, {"calcium-high": text})
    assert_located(
        error,
        file="rules/calcium-high.yaml",
        line=line_of(text, "type: delete"),
        rule="calcium-high",
        field="card.suggestions[0].actions[0].resource_id",
        says="a delete action needs resource_id",
    )


# --- rules together -------------------------------------------------------------------------------------------


def test_suppression_of_an_unknown_rule_is_reported(tmp_path):
    text = rule_text(extra="suppresses: [calcium-low]\n")
    (error,) = errors(tmp_path, {"calcium-high": text})
    assert (error.file, error.rule, error.field) == ("rules/calcium-high.yaml", "calcium-high", "suppresses[0]")
    assert "unknown rule 'calcium-low'" in str(error)
    assert "rule 'calcium-high', suppresses[0]:" in str(error)


def test_rule_cannot_suppress_itself(tmp_path):
    (error,) = errors(tmp_path, {"calcium-high": rule_text(extra="suppresses: [calcium-high]\n")})
    assert (error.rule, error.field) == ("calcium-high", "suppresses[0]")
    assert "a rule cannot suppress itself" in error.message


def test_suppression_cycle_is_reported(tmp_path):
    found = errors(
        tmp_path,
        {
            "calcium-high": rule_text(extra="suppresses: [calcium-very-high]\n"),
            "calcium-very-high": rule_text("calcium-very-high", extra="suppresses: [calcium-high]\n"),
        },
    )
    (error,) = found
    assert error.field == "suppresses"
    assert error.rule in ("calcium-high", "calcium-very-high")
    assert error.file == f"rules/{error.rule}.yaml"
    assert "suppression goes in a circle" in error.message
    assert "calcium-high" in error.message and "calcium-very-high" in error.message


def test_suppression_error_names_the_line(tmp_path):
    text = rule_text(extra="suppresses: [calcium-low]\n")
    (error,) = errors(tmp_path, {"calcium-high": text})
    assert error.line == line_of(text, "suppresses")


def test_rule_id_not_matching_file_name_is_reported(tmp_path):
    text = rule_text("calcium-hi")
    (error,) = errors(tmp_path, {"calcium-high": text})
    assert_located(
        error, file="rules/calcium-high.yaml", line=1, rule="calcium-hi", field="id", says="rule id 'calcium-hi' must match its file name 'calcium-high'"
    )


def test_settings_yaml_missing_is_reported(tmp_path):
    (error,) = errors(tmp_path, {"calcium-high": rule_text()}, settings=None)
    assert error.file.endswith("rules/settings.yaml")
    assert "missing: every rule set needs settings.yaml" in str(error)


def test_settings_with_a_bad_field_is_reported(tmp_path):
    settings = "topic_system: not a url\nsource_label: Test\n"
    (error,) = errors(tmp_path, {"calcium-high": rule_text()}, settings=settings)
    assert (error.file, error.line, error.field) == ("rules/settings.yaml", 1, "topic_system")


def test_folder_without_rules_is_reported(tmp_path):
    (error,) = errors(tmp_path, {})
    assert "no rule files found" in error.message


def test_every_mistake_is_reported_from_one_run(tmp_path):
    found = errors(
        tmp_path,
        {
            "calcium-high": rule_text(when="  all:\n    - {fact: calcum, operator: gt, value: 10}\n"),
            "phosphate-high": rule_text("phosphate-high", when="  all:\n    - {fact: phosphate, operator: gtt, value: 5}\n"),
        },
    )
    assert {e.rule for e in found} == {"calcium-high", "phosphate-high"}


# --- the real rule set ---------------------------------------------------------------------------------------


def test_real_rules_folder_loads_cleanly_with_resource_validation():
    ruleset = load_ruleset(PROJECT / "rules", validate_resource=validation_error)
    assert {r.id for r in ruleset.rules} >= {"calciphylaxis-risk", "calciphylaxis-workup", "tumoral-calcinosis"}
    for rule in ruleset.rules:
        assert Path(rule.file).stem == rule.id


def test_real_rules_suppress_metastatic_calcification_with_tumoral_calcinosis():
    ruleset = load_ruleset(PROJECT / "rules")
    assert ruleset.suppressors["metastatic-calcification"] == ("tumoral-calcinosis",)


def _kind(spec: dict) -> str:
    if "patient" in spec:
        return "number" if spec["patient"] == "age" else "text"
    return {"observation": "number", "product": "number", "condition": "condition", "definition": "boolean"}[
        next(k for k in ("observation", "product", "condition", "definition") if k in spec)
    ]


def test_test_facts_mirror_the_real_facts_of_the_same_name():
    real = load_ruleset(PROJECT / "rules")
    shared = set(FACTS) & set(real.facts)
    assert shared >= {"calcium", "phosphate", "pth", "egfr", "albumin", "ca_x_p", "sex", "age", "kidney_failure"}
    assert {name: _kind(FACTS[name]) for name in shared} == {name: real.facts[name].kind for name in shared}


# --- the engine stays free of web dependencies -----------------------------------------------------------------

ENGINE_MODULES = sorted(p.stem for p in (PROJECT / "service" / "engine").glob("*.py") if p.stem != "__init__")
WEB = ("flask", "requests", "werkzeug")


def web_modules_after(imports: str) -> list[str]:
    """Run the imports in a fresh interpreter and list the web modules it ended up loading."""
    code = f"import sys\n{imports}\nprint(sorted({{m.split('.')[0] for m in sys.modules}} & {set(WEB)!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return ast.literal_eval(done.stdout.strip())


def test_engine_modules_themselves_never_import_flask_or_requests():
    # Stand in for the `service` package so only the engine's own imports are followed.
    imports = "\n".join(
        [
            "import types",
            "service = types.ModuleType('service')",
            f"service.__path__ = [{str(PROJECT / 'service')!r}]",
            "sys.modules['service'] = service",
        ]
        + [f"import service.engine.{m}" for m in ENGINE_MODULES]
    )
    assert len(ENGINE_MODULES) >= 10
    assert web_modules_after(imports) == []


def test_importing_the_engine_does_not_load_flask_or_requests():
    assert web_modules_after("import service.engine.evaluate") == []


def test_documentation_url_with_an_unknown_placeholder_is_an_error(tmp_path):
    import shutil

    from service.engine.loader import RuleSetError, load_ruleset
    from tests.conftest import RULES

    rules = tmp_path / "rules"
    shutil.copytree(RULES, rules)
    settings = rules / "settings.yaml"
    settings.write_text(settings.read_text() + "documentation_url: https://example.org/rules/{rule}\n")
    with pytest.raises(RuleSetError) as raised:
        load_ruleset(rules)
    (error,) = raised.value.errors
    assert error.field == "documentation_url" and "{rule_id}" in error.message


# --- order hooks -------------------------------------------------------------------------------

ORDER_VALUESETS = {"calcium": [("http://loinc.org", "17861-6")], "punch": [("http://www.ama-assn.org/go/cpt", "11104")]}
ORDER_FACTS = {
    "calcium": {"title": "Total calcium", "observation": "calcium", "analyte": "calcium", "unit": "mg/dL", "lookback": "P90D", "plausible": [1, 25]},
    "punch_order": {"title": "Draft punch biopsy", "order": "punch"},
}


def order_rule(hooks: str | None, action: str = "") -> str:
    hooks_line = f"hooks: {hooks}\n" if hooks is not None else ""
    return (
        f"id: punch-check\ntitle: Punch check\ndescription: A punch biopsy is ordered.\n{hooks_line}"
        "when: {fact: punch_order, operator: present}\n"
        "card:\n  indicator: warning\n  summary: \"{punch_order} ordered\"\n  detail:\n    - A punch biopsy.\n" + action
    )


def test_a_rule_reading_draft_orders_is_refused_on_patient_view_by_default(tmp_path):
    found = errors(tmp_path, {"punch-check": order_rule(None)}, valuesets=ORDER_VALUESETS, facts=ORDER_FACTS)
    error = the_error(found, "id")
    assert error.rule == "punch-check" and "reads draft orders (punch_order) but serves patient-view" in error.message


def test_a_rule_reading_draft_orders_is_refused_when_it_lists_patient_view(tmp_path):
    found = errors(tmp_path, {"punch-check": order_rule("[patient-view, order-sign]")}, valuesets=ORDER_VALUESETS, facts=ORDER_FACTS)
    assert "serves patient-view" in the_error(found, "hooks").message


def test_a_rule_reading_draft_orders_loads_on_the_order_hooks(tmp_path):
    from fakes import write_ruleset

    root = write_ruleset(tmp_path / "rules", {"punch-check": order_rule("[order-select, order-sign]")}, valuesets=ORDER_VALUESETS, facts=ORDER_FACTS)
    rule = load_ruleset(root).rule("punch-check")
    assert rule.hooks == ("order-select", "order-sign") and not rule.serves("patient-view")


def test_an_unknown_hook_is_reported(tmp_path):
    found = errors(tmp_path, {"punch-check": order_rule("[order-review]")}, valuesets=ORDER_VALUESETS, facts=ORDER_FACTS)
    assert the_error(found, "hooks[0]").rule == "punch-check"


def test_a_delete_action_naming_a_fact_that_is_not_an_order_is_reported(tmp_path):
    action = "  suggestions:\n    - label: Remove\n      actions:\n        - type: delete\n          description: Remove it\n          resource_id: \"{calcium.id}\"\n"
    found = errors(tmp_path, {"punch-check": order_rule("[order-sign]", action)}, valuesets=ORDER_VALUESETS, facts=ORDER_FACTS)
    assert "'calcium' must name an order fact" in the_error(found, "card.suggestions[0].actions[0].resource_id").message
