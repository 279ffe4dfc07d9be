"""Load `rules/` into a RuleSet, or say exactly what is wrong: file, line, rule, field.

Layout of the folder:
  settings.yaml         topic system, source label, disclaimer
  facts.yaml            shared facts and definitions (kidney failure, Ca x P, ...)
  valuesets/*.yaml      one value set per file
  <rule-id>.yaml        one rule per file, named after its id
Every error is collected, so a rule author sees all mistakes from one run.
"""
from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Callable

import cerberus
import yaml

from . import schema
from .durations import DurationError, parse_duration
from .logic import ALL_OPERATORS, NUMERIC_OPERATORS, PRESENCE_OPERATORS
from .model import (
    Action, AllOf, AnyOf, CardSpec, ConditionFact, DefinitionFact, DetailLine, Expr, Fact, Leaf, Link,
    NotOf, ObservationFact, OrderFact, OverrideReason, PatientFact, ProcedureFact, ProductFact, Rule, RuleSet,
    Settings, Suggestion, SustainedFact,
    facts_in,
)
from .templates import Placeholder, Template, TemplateError
from .units import ANALYTES
from .valuesets import ICD10CM, CodeIndex, ValueSet, normalise_code

SUMMARY_MAX = 139
INDICATOR_RANK = {"info": 0, "warning": 1, "critical": 2}
OPERATORS_BY_KIND = {
    "number": set(NUMERIC_OPERATORS) | PRESENCE_OPERATORS,
    "condition": set(PRESENCE_OPERATORS),
    "text": {"eq", "ne", "in"} | PRESENCE_OPERATORS,
    "boolean": {"is"},
}
ResourceValidator = Callable[[dict], "str | None"]


@dataclass(frozen=True)
class RuleError:
    """One mistake in a rule file, located for the person who has to fix it."""

    file: str
    field: str
    message: str
    rule: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        who = f" rule '{self.rule}'," if self.rule else ""
        field = f" {self.field}:" if self.field else ""
        return f"{where}:{who}{field} {self.message}"


class RuleSetError(Exception):
    """The rule set cannot be loaded; `errors` lists every mistake found."""

    def __init__(self, errors: list[RuleError]) -> None:
        super().__init__(f"{len(errors)} error(s) in rule files:\n" + "\n".join(f"  {e}" for e in errors))
        self.errors = errors


class _File:
    """A parsed YAML file that can turn a field path back into a line number."""

    def __init__(self, path: Path, root: Path) -> None:
        self.path = path
        self.name = str(path.relative_to(root.parent)) if root.parent in path.parents else str(path)
        self.text = path.read_text(encoding="utf-8")
        self.data: Any = yaml.safe_load(self.text)
        self.node = yaml.compose(self.text)

    def line(self, path: tuple) -> int | None:
        node, line = self.node, None
        for step in path:
            if node is None:
                break
            line = node.start_mark.line + 1
            if isinstance(node, yaml.MappingNode):
                node = next((v for k, v in node.value if k.value == step), None)
            elif isinstance(node, yaml.SequenceNode) and isinstance(step, int) and step < len(node.value):
                node = node.value[step]
            else:
                node = None
        return node.start_mark.line + 1 if node is not None else line


def _dotted(path: tuple) -> str:
    out = ""
    for step in path:
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else str(step))
    return out


class _Loader:
    def __init__(self, root: Path, validate_resource: ResourceValidator | None) -> None:
        self.root = root
        self.validate_resource = validate_resource
        self.errors: list[RuleError] = []
        self.facts: dict[str, Fact] = {}
        self.valuesets: dict[str, ValueSet] = {}
        self._fact_origin: dict[str, tuple[_File, tuple, str | None]] = {}
        # Names whose own definition already has an error: uses of them are not reported again.
        self.broken_facts: set[str] = set()
        self.broken_rules: set[str] = set()
        self.settings: Settings | None = None

    # --- reporting -------------------------------------------------------------------------

    def error(self, file: _File | str, path: tuple, message: str, rule: str | None = None) -> None:
        if isinstance(file, _File):
            self.errors.append(RuleError(file.name, _dotted(path), message, rule, file.line(path)))
        else:
            self.errors.append(RuleError(file, _dotted(path), message, rule))

    def check_schema(self, file: _File, document: Any, shape: dict, base: tuple = (), rule: str | None = None) -> bool:
        if not isinstance(document, dict):
            self.error(file, base, f"expected a mapping of fields, got {type(document).__name__}", rule)
            return False
        validator = cerberus.Validator(shape)
        if validator.validate(document):
            document.clear()
            document.update(validator.document)  # keep coerced values
            return True
        self._flatten(file, validator.errors, base, rule)
        return False

    def _flatten(self, file: _File, errors: dict, base: tuple, rule: str | None) -> None:
        for key, messages in errors.items():
            for message in messages:
                if isinstance(message, dict):
                    self._flatten(file, message, base + (key,), rule)
                else:
                    self.error(file, base + (key,), _friendly(message), rule)

    def open(self, path: Path) -> _File | None:
        try:
            return _File(path, self.root)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            name = str(path.relative_to(self.root.parent))
            self.errors.append(RuleError(name, "", f"not valid YAML: {getattr(exc, 'problem', exc)}", None, mark.line + 1 if mark else None))
        except (OSError, UnicodeDecodeError) as exc:
            self.errors.append(RuleError(str(path), "", f"cannot read file: {exc}"))
        return None

    # --- files ---------------------------------------------------------------------------------

    def load(self) -> RuleSet:
        if not self.root.is_dir():
            raise RuleSetError([RuleError(str(self.root), "", "rules folder not found")])
        settings = self.settings = self.load_settings()
        for path in sorted((self.root / "valuesets").glob("*.y*ml")):
            self.load_valueset(path)
        facts_path = self.root / "facts.yaml"
        if facts_path.exists() and (file := self.open(facts_path)):
            if self.check_schema(file, file.data, schema.FACTS_FILE):
                self.collect_facts(file, file.data["facts"], ("facts",), None)
        rule_files = [
            (path, file)
            for path in sorted(self.root.glob("*.y*ml"))
            if path.stem not in ("settings", "facts") and (file := self.open(path))
        ]
        documents = [
            (f, f.data) for _, f in rule_files
            if self.check_schema(f, f.data, schema.RULE, rule=_rule_id(f.data, f.path.stem))
        ]
        for file, document in documents:  # rule-local facts first, so any rule may read them
            if "facts" in document:
                self.collect_facts(file, document["facts"], ("facts",), document["id"])
        self.check_facts()
        rules = [r for file, document in documents if (r := self.build_rule(file, document))]
        self._rule_files = {d["id"]: f for f, d in documents}
        self.broken_rules = {d["id"] for _, d in documents} - {r.id for r in rules}
        suppressors = self.check_rules(rules)
        if not rules and not self.errors:
            self.error(str(self.root), (), "no rule files found")
        if self.errors or settings is None:
            raise RuleSetError(self.errors)
        return RuleSet(
            rules=tuple(rules),
            facts=dict(self.facts),
            valuesets=dict(self.valuesets),
            settings=settings,
            code_index=CodeIndex(list(self.valuesets.values())),
            fingerprint=fingerprint(self.root),
            loaded_at=datetime.now(UTC),
            directory=str(self.root),
            suppressors=suppressors,
        )

    def load_settings(self) -> Settings | None:
        path = self.root / "settings.yaml"
        if not path.exists():
            self.error(str(path), (), "missing: every rule set needs settings.yaml (topic_system, source_label)")
            return None
        file = self.open(path)
        if file is None or not self.check_schema(file, file.data, schema.SETTINGS):
            return None
        data = file.data
        url = data.get("documentation_url")
        if url:
            try:
                url.format(rule_id="x")
            except (KeyError, IndexError, ValueError):
                self.error(file, ("documentation_url",), "the only placeholder allowed is {rule_id}")
                return None
        system, reasons = None, ()
        if "override_reasons" in data:
            system = data["override_reasons"]["system"]
            reasons = tuple(OverrideReason(r["code"], r["display"]) for r in data["override_reasons"]["reasons"])
            codes = [r.code for r in reasons]
            for i, code in enumerate(codes):
                if code in codes[:i]:
                    self.error(file, ("override_reasons", "reasons", i, "code"), f"override reason '{code}' is listed twice")
        return Settings(data["topic_system"], data["source_label"], data.get("disclaimer", ""), url, system, reasons)

    def load_valueset(self, path: Path) -> None:
        file = self.open(path)
        if file is None:
            return
        for i, entry in enumerate(file.data.get("codes") or [] if isinstance(file.data, dict) else []):
            if isinstance(entry, dict) and isinstance(entry.get("code"), (int, float)):
                # YAML reads 0123 as 83 and 1.10 as 1.1: an unquoted code may not be the code you wrote.
                self.error(file, ("codes", i, "code"), f'write codes in quotes, e.g. code: "{file.text.splitlines()[file.line(("codes", i, "code")) - 1].split(":", 1)[1].strip()}"')
                entry["code"] = str(entry["code"])
        if not self.check_schema(file, file.data, schema.VALUESET):
            return
        data = file.data
        if data["id"] != path.stem:
            self.error(file, ("id",), f"value set id '{data['id']}' must match its file name '{path.stem}'")
        if data["id"] in self.valuesets:
            self.error(file, ("id",), f"value set '{data['id']}' is defined twice")
        exact, prefixes = set(), []
        for i, entry in enumerate(data["codes"]):
            system, code = entry["system"], entry["code"].strip()
            if code.endswith("*"):
                if system != ICD10CM:
                    self.error(file, ("codes", i, "code"), f"prefix form '{code}' is allowed only for ICD-10-CM ({ICD10CM})")
                    continue
                prefixes.append((system, normalise_code(system, code[:-1])))
            else:
                exact.add((system, normalise_code(system, code)))
        self.valuesets[data["id"]] = ValueSet(data["id"], data["title"], data.get("description", ""), frozenset(exact), tuple(prefixes), file.name)

    # --- facts -----------------------------------------------------------------------------------

    def collect_facts(self, file: _File, facts: dict, base: tuple, rule: str | None) -> None:
        for name, spec in facts.items():
            path = base + (name,)
            if name in self.facts or name in self._fact_origin:
                self.error(file, path, f"fact '{name}' is defined twice (also in {self._fact_origin[name][0].name})", rule)
                continue
            self._fact_origin[name] = (file, path, rule)
            fact = self.build_fact(file, path, name, spec, rule)
            if fact is not None:
                self.facts[name] = fact
            else:
                self.broken_facts.add(name)

    def build_fact(self, file: _File, path: tuple, name: str, spec: dict, rule: str | None) -> Fact | None:
        kinds = [k for k in schema.FACT_KINDS if k in spec]
        if len(kinds) != 1:
            self.error(file, path, f"a fact needs exactly one of {', '.join(schema.FACT_KINDS)}; found {', '.join(kinds) or 'none'}", rule)
            return None
        kind = kinds[0]
        extra = set(spec) - {"title", kind} - schema.FACT_KEYS_BY_KIND[kind]
        for key in sorted(extra):
            self.error(file, path + (key,), f"'{key}' does not apply to a {kind} fact", rule)
        for key in sorted(schema.FACT_REQUIRED_BY_KIND.get(kind, set()) - set(spec)):
            self.error(file, path + (key,), f"required for a {kind} fact", rule)
        if extra or schema.FACT_REQUIRED_BY_KIND.get(kind, set()) - set(spec):
            return None
        title = spec["title"]
        if kind == "observation":
            # Check every part, so one run shows every mistake in the fact.
            known = self.known_valueset(file, path + ("observation",), spec["observation"], rule)
            analyte = ANALYTES[spec["analyte"]]
            unit_ok = analyte.factor(spec["unit"]) is not None
            if not unit_ok:
                self.error(file, path + ("unit",), f"'{spec['unit']}' is not a {analyte.name} unit (expected one of: {', '.join(analyte.spellings)})", rule)
            lookback = self.duration(file, path + ("lookback",), spec["lookback"], rule)
            low, high = spec["plausible"]
            plausible_ok = 0 <= low < high
            if not plausible_ok:
                self.error(file, path + ("plausible",), f"expected [low, high] with 0 <= low < high, in {spec['unit']}", rule)
            if not (known and unit_ok and lookback and plausible_ok):
                return None
            return ObservationFact(
                name, title, spec["observation"], analyte.name, spec["unit"], lookback, spec.get("default_upper_limit"), (float(low), float(high)),
            )
        if kind == "procedure":
            known = self.known_valueset(file, path + ("procedure",), spec["procedure"], rule)
            lookback = self.duration(file, path + ("lookback",), spec["lookback"], rule)
            return ProcedureFact(name, title, spec["procedure"], lookback) if known and lookback else None
        if kind == "sustained":
            apart = self.duration(file, path + ("apart",), spec["apart"], rule)
            lookback = self.duration(file, path + ("lookback",), spec["lookback"], rule)
            if apart and lookback and apart >= lookback:
                self.error(file, path + ("apart",), f"must be shorter than the look-back ({spec['lookback']})", rule)
                return None
            return SustainedFact(name, title, spec["sustained"], float(spec["below"]), apart, lookback, spec.get("too_short")) if apart and lookback else None
        if kind == "condition":
            return ConditionFact(name, title, spec["condition"]) if self.known_valueset(file, path + ("condition",), spec["condition"], rule) else None
        if kind == "patient":
            return PatientFact(name, title, spec["patient"])
        if kind == "order":
            return OrderFact(name, title, spec["order"]) if self.known_valueset(file, path + ("order",), spec["order"], rule) else None
        if kind == "product":
            within = self.duration(file, path + ("within",), spec["within"], rule)
            return ProductFact(name, title, tuple(spec["product"]), within, spec["unit"]) if within else None
        # Definitions are parsed after all facts are known (they may name each other).
        return DefinitionFact(name, title, spec["definition"])  # type: ignore[arg-type]

    def check_facts(self) -> None:
        for name, fact in list(self.facts.items()):
            file, path, rule = self._fact_origin[name]
            if isinstance(fact, ProductFact):
                for i, part in enumerate(fact.of):
                    if not isinstance(self.facts.get(part), ObservationFact):
                        if part not in self.broken_facts:
                            self.error(file, path + ("product", i), f"'{part}' must name an observation fact{self.suggest(part)}", rule)
                        self.facts.pop(name, None)
                        self.broken_facts.add(name)
            elif isinstance(fact, SustainedFact):
                if not isinstance(self.facts.get(fact.of), ObservationFact):
                    if fact.of not in self.broken_facts:
                        self.error(file, path + ("sustained",), f"'{fact.of}' must name an observation fact{self.suggest(fact.of)}", rule)
                    self.facts.pop(name, None)
                    self.broken_facts.add(name)
            elif isinstance(fact, DefinitionFact):
                expr = self.expr(file, path + ("definition",), fact.when, rule)
                if expr is None:
                    self.facts.pop(name, None)
                    self.broken_facts.add(name)
                else:
                    self.facts[name] = DefinitionFact(name, fact.title, expr)
        self.check_definition_cycles()

    def check_definition_cycles(self) -> None:
        in_cycle: set[str] = set()

        def visit(name: str, stack: list[str]) -> None:
            fact = self.facts.get(name)
            if not isinstance(fact, DefinitionFact) or name in in_cycle:
                return
            if name in stack:
                loop = stack[stack.index(name):]
                if not in_cycle & set(loop):
                    file, path, rule = self._fact_origin[name]
                    self.error(file, path, f"definitions refer to each other in a circle: {' -> '.join(loop + [name])}", rule)
                in_cycle.update(loop)
                return
            for inner in facts_in(fact.when):
                visit(inner, stack + [name])

        for name in list(self.facts):
            visit(name, [])
        # A circular definition cannot be evaluated: drop it, so rules using it fail quietly
        # (the circle itself is the error reported) instead of recursing forever.
        for name in in_cycle:
            self.facts.pop(name, None)
            self.broken_facts.add(name)

    def known_valueset(self, file: _File, path: tuple, vs_id: str, rule: str | None) -> bool:
        if vs_id in self.valuesets:
            return True
        close = difflib.get_close_matches(vs_id, self.valuesets, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(sorted(self.valuesets))})"
        self.error(file, path, f"unknown value set '{vs_id}'{hint}", rule)
        return False

    def duration(self, file: _File, path: tuple, text: str, rule: str | None):
        try:
            return parse_duration(text)
        except DurationError as exc:
            self.error(file, path, str(exc), rule)
            return None

    def suggest(self, name: str) -> str:
        close = difflib.get_close_matches(name, self.facts, n=1)
        return f" (did you mean '{close[0]}'?)" if close else ""

    # --- conditions ---------------------------------------------------------------------------------

    def expr(self, file: _File, path: tuple, node: Any, rule: str | None) -> Expr | None:
        if not isinstance(node, dict):
            self.error(file, path, "expected a condition: {all: [...]}, {any: [...]}, {not: ...} or {fact, operator, value}", rule)
            return None
        combinators = [k for k in ("all", "any", "not") if k in node]
        if combinators:
            if len(node) != 1:
                self.error(file, path, f"'{combinators[0]}' must stand alone in its mapping; found also {', '.join(sorted(set(node) - {combinators[0]}))}", rule)
                return None
            key = combinators[0]
            if key == "not":
                inner = self.expr(file, path + ("not",), node["not"], rule)
                return NotOf(inner) if inner else None
            items = node[key]
            if not isinstance(items, list) or not items:
                self.error(file, path + (key,), "expected a non-empty list of conditions", rule)
                return None
            parsed = [self.expr(file, path + (key, i), item, rule) for i, item in enumerate(items)]
            if any(p is None for p in parsed):
                return None
            return (AllOf if key == "all" else AnyOf)(tuple(parsed))
        return self.leaf(file, path, node, rule)

    def leaf(self, file: _File, path: tuple, node: dict, rule: str | None) -> Leaf | None:
        unknown = set(node) - {"fact", "operator", "value"}
        if unknown:
            self.error(file, path + (sorted(unknown)[0],), "unknown key; a condition has fact, operator and value (or all/any/not)", rule)
            return None
        for key in ("fact", "operator"):
            if not isinstance(node.get(key), str):
                self.error(file, path + (key,), "required (a string)", rule)
                return None
        name, _, attribute = node["fact"].partition(".")
        fact = self.facts.get(name)
        if fact is None:
            if name not in self.broken_facts:
                self.error(file, path + ("fact",), f"unknown fact '{name}'{self.suggest(name)}", rule)
            return None
        kind = fact.kind
        if attribute:
            if attribute not in fact.attributes:
                self.error(file, path + ("fact",), f"'{name}' has no attribute '{attribute}' (has: {', '.join(fact.attributes) or 'none'})", rule)
                return None
            kind = "number"
        operator = node["operator"]
        if operator not in ALL_OPERATORS:
            close = difflib.get_close_matches(operator, ALL_OPERATORS, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            self.error(file, path + ("operator",), f"unknown operator '{operator}' ({hint}operators: {', '.join(ALL_OPERATORS)})", rule)
            return None
        if operator not in OPERATORS_BY_KIND[kind]:
            self.error(file, path + ("operator",), f"operator '{operator}' does not apply to {kind} fact '{node['fact']}' (use: {', '.join(sorted(OPERATORS_BY_KIND[kind]))})", rule)
            return None
        value = node.get("value")
        problem = _check_value(operator, value, kind)
        if problem:
            self.error(file, path + ("value",), problem, rule)
            return None
        if operator == "between":
            value = (float(value[0]), float(value[1]))
        elif operator in NUMERIC_OPERATORS and kind == "number":
            value = float(value)
        return Leaf(name, attribute or None, operator, value)

    # --- rules ----------------------------------------------------------------------------------------

    def build_rule(self, file: _File, doc: dict) -> Rule | None:
        rule_id = doc["id"]
        before = len(self.errors)
        if rule_id != file.path.stem:
            self.error(file, ("id",), f"rule id '{rule_id}' must match its file name '{file.path.stem}'", rule_id)
        if "tests" in doc:
            self.error(file, ("tests",), "rule files no longer list fixtures: write each scenario's `expect: [rule ids]` beside its reason in fixtures/fhir/scenarios.yaml", rule_id)
        when = self.expr(file, ("when",), doc["when"], rule_id)
        card = self.build_card(file, doc["card"], rule_id)
        reasons = self.override_reasons(file, doc, rule_id)
        snooze = self.snooze(file, doc, reasons, rule_id)
        if len(self.errors) > before or when is None or card is None:
            return None
        evidence = self._expanded(facts_in(when) + card.summary.fact_names)
        rule = Rule(
            id=rule_id,
            title=doc["title"],
            description=doc["description"].strip(),
            sources=tuple(doc.get("sources", ())),
            when=when,
            card=card,
            suppresses=tuple(doc.get("suppresses", ())),
            evidence_facts=tuple(evidence),
            file=file.name,
            hooks=tuple(dict.fromkeys(doc.get("hooks", ("patient-view",)))),
            override_reasons=reasons,
            snooze=snooze,
            snooze_fingerprint=rule_fingerprint(doc, self._definitions_read(when, card)),
        )
        orders = [n for n in rule.facts_read if isinstance(self.facts.get(n), OrderFact)]
        if orders and "patient-view" in rule.hooks:
            # patient-view carries no draft orders: such a rule could never fire there, silently.
            self.error(file, ("hooks",) if "hooks" in doc else ("id",), f"reads draft orders ({', '.join(orders)}) but serves patient-view, which has none; serve order-select and/or order-sign instead", rule_id)
            return None
        return rule

    def _definitions_read(self, when: Expr, card: CardSpec) -> list[str]:
        """The specs of every fact the rule reads, shared definitions followed to their leaves.

        A snooze belongs to what the rule decided: editing a shared definition in facts.yaml
        (kidney failure, a look-back, a threshold) changes the rule as much as editing its file.
        """
        names = facts_in(when) + card.summary.fact_names
        for line in card.detail:
            names += list(line.facts) + (facts_in(line.when) if line.when else [])
        seen: dict[str, str] = {}
        while names:
            name = names.pop()
            fact = self.facts.get(name)
            if name in seen or fact is None:
                continue
            seen[name] = repr(fact)
            if isinstance(fact, DefinitionFact):
                names += facts_in(fact.when)
        return [seen[n] for n in sorted(seen)]

    def override_reasons(self, file: _File, doc: dict, rule: str) -> tuple[str, ...]:
        """The reason codes this rule's cards offer: all of settings' list, or the rule's narrower one."""
        offered = tuple(r.code for r in self.settings.override_reasons) if self.settings else ()
        if "override_reasons" not in doc:
            return offered
        if self.settings is None:
            return ()  # settings.yaml has its own error
        chosen: list[str] = []
        for i, code in enumerate(doc["override_reasons"]):
            if code in chosen:
                self.error(file, ("override_reasons", i), f"override reason '{code}' is listed twice", rule)
            elif code not in offered:
                close = difflib.get_close_matches(code, offered, n=1)
                known = f"did you mean '{close[0]}'?" if close else f"settings.yaml declares: {', '.join(offered) or 'none'}"
                self.error(file, ("override_reasons", i), f"unknown override reason '{code}' ({known})", rule)
            else:
                chosen.append(code)
        return tuple(chosen)

    def snooze(self, file: _File, doc: dict, offered: tuple[str, ...], rule: str) -> dict:
        """Override reason -> how long overridden feedback with it keeps the card away."""
        snooze: dict = {}
        if self.settings is None:
            return snooze  # settings.yaml has its own error; its reasons are unknown
        for code, text in doc.get("snooze", {}).items():
            path = ("snooze", code)
            if code not in offered:
                self.error(file, path, f"'{code}' is not one of this rule's override reasons ({', '.join(offered) or 'none'})", rule)
                continue
            duration = self.duration(file, path, text, rule)
            if duration is not None and duration.total_seconds() <= 0:
                self.error(file, path, f"a snooze must last longer than zero, got {text!r}", rule)
            elif duration is not None:
                snooze[code] = duration
        return snooze

    def _expanded(self, names: list[str]) -> tuple[str, ...]:
        """The non-definition facts behind `names`, definitions broken down, in order."""
        out: list[str] = []
        self._expand(names, out)
        return tuple(out)

    def _expand(self, names: list[str], out: list[str]) -> None:
        for name in names:
            fact = self.facts.get(name)
            if fact is None:
                continue
            if isinstance(fact, DefinitionFact):
                self._expand(facts_in(fact.when), out)
            elif name not in out:
                out.append(name)

    def template(self, file: _File, path: tuple, text: str, rule: str) -> Template | None:
        try:
            template = Template.parse(text)
        except TemplateError as exc:
            self.error(file, path, str(exc), rule)
            return None
        for name in template.fact_names:
            if name not in self.facts:
                if name not in self.broken_facts:
                    self.error(file, path, f"placeholder names an unknown fact '{name}'{self.suggest(name)}", rule)
                return None
        parts = []
        for part in template.parts:
            if isinstance(part, Placeholder) and not part.absent_of:
                fact = self.facts[part.fact]
                allowed = template_attributes(fact)
                attribute = part.attribute or allowed[0] if allowed else part.attribute
                if attribute not in allowed:
                    shows = ", ".join(allowed) or "nothing (use it in conditions)"
                    self.error(file, path, f"placeholder {{{part.fact}.{attribute or 'value'}}}: fact '{part.fact}' shows {shows}", rule)
                    return None
                part = Placeholder(part.fact, attribute, part.number_format)
            parts.append(part)
        return Template(template.source, tuple(parts))

    def build_card(self, file: _File, card: dict, rule: str) -> CardSpec | None:
        summary = self.template(file, ("card", "summary"), card["summary"], rule)
        if summary is not None:
            longest = summary.max_length(lambda name: self.facts[name].title)
            if longest > SUMMARY_MAX:
                self.error(file, ("card", "summary"), f"can render to {longest} characters with the widest values; CDS Hooks allows fewer than 140 (placeholders count as their widest: numbers 9, units 16, dates 10, displays 40)", rule)
        detail = []
        for i, line in enumerate(card["detail"]):
            path = ("card", "detail", i)
            if isinstance(line, dict):
                if not self.check_schema(file, line, schema.DETAIL_LINE, path, rule):
                    continue
                text = self.template(file, path + ("text",), line["text"], rule)
                when = self.expr(file, path + ("when",), line["when"], rule)
                if text and when:
                    detail.append(DetailLine(text, when, self._expanded(facts_in(when) + text.fact_names)))
            elif (text := self.template(file, path, line, rule)) is not None:
                detail.append(DetailLine(text, None, self._expanded(text.fact_names)))
        suggestions = tuple(self.suggestion(file, ("card", "suggestions", i), s, rule) for i, s in enumerate(card.get("suggestions", ())))
        source = card.get("source", {})
        links = tuple(Link(l["label"], l["url"], l.get("type", "absolute")) for l in card.get("links", ()))
        escalate = []
        for i, step in enumerate(card.get("escalate", ())):
            path = ("card", "escalate", i)
            if INDICATOR_RANK[step["indicator"]] <= INDICATOR_RANK[card["indicator"]]:
                self.error(file, path + ("indicator",), f"'{step['indicator']}' is not above the card's indicator '{card['indicator']}'", rule)
                continue
            when = self.expr(file, path + ("when",), step["when"], rule)
            if when is not None:
                escalate.append((step["indicator"], when, self._expanded(facts_in(when))))
        if summary is None or any(s is None for s in suggestions):
            return None
        return CardSpec(card["indicator"], summary, tuple(detail), source.get("label"), source.get("url"), links, suggestions, card.get("selection"), tuple(escalate))  # type: ignore[arg-type]

    def suggestion(self, file: _File, path: tuple, data: dict, rule: str) -> Suggestion | None:
        actions = []
        for i, action in enumerate(data["actions"]):
            where = path + ("actions", i)
            resource = action.get("resource")
            if action["type"] in ("create", "update") and not isinstance(resource, dict):
                self.error(file, where + ("resource",), f"a {action['type']} action needs the FHIR resource to {action['type']}", rule)
                return None
            if action["type"] == "delete" and not action.get("resource_id"):
                self.error(file, where + ("resource_id",), "a delete action needs resource_id (e.g. ServiceRequest/123, or {order_fact.id})", rule)
                return None
            resource_id, order = action.get("resource_id"), None
            if resource_id and "{" in resource_id:
                order = self.order_placeholder(file, where + ("resource_id",), resource_id, rule)
                if order is None:
                    return None
                resource_id = None
            if action["type"] == "update" and order is None:
                self.error(file, where + ("resource_id",), "an update action changes a draft order: give resource_id as {order_fact.id}", rule)
                return None
            copy = action.get("copy_from_order")
            copy_fields: tuple[str, ...] = ()
            if copy is not None:
                if action["type"] != "create" or not isinstance(resource, dict) or resource.get("resourceType") != "ServiceRequest":
                    self.error(file, where + ("copy_from_order",), "copy_from_order applies to a create action of a ServiceRequest", rule)
                    return None
                if order is not None and copy["fact"] != order:
                    self.error(file, where + ("copy_from_order", "fact"), f"copies from '{copy['fact']}' but the action is about '{order}'", rule)
                    return None
                if not isinstance(self.facts.get(copy["fact"]), OrderFact):
                    if copy["fact"] not in self.broken_facts:
                        self.error(file, where + ("copy_from_order", "fact"), f"'{copy['fact']}' must name an order fact{self.suggest(copy['fact'])}", rule)
                    return None
                order, copy_fields = copy["fact"], tuple(dict.fromkeys(copy["fields"]))
            if resource is not None:
                problem = self.check_resource(resource)
                if problem:
                    self.error(file, where + ("resource",), problem, rule)
                    return None
            when = None
            if "when" in action:
                when = self.expr(file, where + ("when",), action["when"], rule)
                if when is None:
                    return None
            facts = self._expanded(facts_in(when) if when is not None else []) + ((order,) if order else ())
            actions.append(Action(action["type"], action["description"], resource, resource_id, when, tuple(dict.fromkeys(facts)), order, copy_fields))
        return Suggestion(data["label"], tuple(actions), data.get("recommended", False))

    def order_placeholder(self, file: _File, path: tuple, text: str, rule: str) -> str | None:
        """Check that `text` is exactly {fact.id} of an order fact; return the fact name."""
        try:
            template = Template.parse(text)
        except TemplateError as exc:
            self.error(file, path, str(exc), rule)
            return None
        parts = template.parts
        if len(parts) != 1 or not isinstance(parts[0], Placeholder) or parts[0].attribute != "id":
            self.error(file, path, "write the draft order's id as {order_fact.id}, with nothing around it", rule)
            return None
        name = parts[0].fact
        if not isinstance(self.facts.get(name), OrderFact):
            if name not in self.broken_facts:
                self.error(file, path, f"'{name}' must name an order fact{self.suggest(name)}", rule)
            return None
        return name

    def check_resource(self, resource: dict) -> str | None:
        if not isinstance(resource.get("resourceType"), str):
            return "a FHIR resource needs resourceType"
        if self.validate_resource is None:
            return None
        # The card builder adds the patient as subject at request time; check the resource as it will be sent.
        candidate = {"subject": {"reference": "Patient/example"}} | resource if resource["resourceType"] in ("ServiceRequest",) else resource
        problem = self.validate_resource(candidate)
        return f"not a valid FHIR R4 {resource['resourceType']}: {problem}" if problem else None

    def check_rules(self, rules: list[Rule]) -> dict[str, tuple[str, ...]]:
        ids = [r.id for r in rules]
        for rule in rules:
            if ids.count(rule.id) > 1:
                self.error(self._rule_files.get(rule.id, rule.file), ("id",), f"rule id '{rule.id}' is used twice", rule.id)
        suppressors: dict[str, list[str]] = {}
        for rule in rules:
            for i, target in enumerate(rule.suppresses):
                if target in self.broken_rules:
                    continue
                if target == rule.id or target not in ids:
                    close = difflib.get_close_matches(target, ids, n=1)
                    hint = f" (did you mean '{close[0]}'?)" if close and target != rule.id else ""
                    why = "a rule cannot suppress itself" if target == rule.id else f"unknown rule '{target}'{hint}"
                    self.error(self._rule_files.get(rule.id, rule.file), ("suppresses", i), why, rule.id)
                else:
                    suppressors.setdefault(target, []).append(rule.id)

        def cycle(rule_id: str, stack: list[str]) -> list[str] | None:
            if rule_id in stack:
                return stack + [rule_id]
            for s in suppressors.get(rule_id, ()):
                found = cycle(s, stack + [rule_id])
                if found:
                    return found
            return None

        for rule_id in suppressors:
            loop = cycle(rule_id, [])
            if loop:
                self.error(self._rule_files.get(rule_id, rule_id), ("suppresses",), f"suppression goes in a circle: {' <- '.join(loop)}", rule_id)
                break
        return {k: tuple(v) for k, v in suppressors.items()}


def _rule_id(document: Any, stem: str) -> str:
    """The rule id for messages, even from a file that fails its schema."""
    return document.get("id") if isinstance(document, dict) and isinstance(document.get("id"), str) else stem


def template_attributes(fact: Fact) -> tuple[str, ...]:
    """What a placeholder may show of a fact; the first is what `{fact}` alone shows."""
    if isinstance(fact, ObservationFact):
        return ("value", "unit", "date", "sent", "upper_limit", "uln_multiple")
    if isinstance(fact, ProductFact):
        return ("value", "unit", "date")
    if isinstance(fact, (ConditionFact, ProcedureFact)):
        return ("display", "code", "date")
    if isinstance(fact, PatientFact):
        return ("value",)
    if isinstance(fact, OrderFact):
        return ("display", "id", "code")
    return ()


def _check_value(operator: str, value: Any, kind: str) -> str | None:
    number = (int, float)
    if kind == "text" and operator in ("eq", "ne"):
        return None if isinstance(value, str) else f"'{operator}' on a text fact needs a word, got {value!r}"
    if operator in PRESENCE_OPERATORS:
        return None if value is None else f"'{operator}' takes no value"
    if operator == "between":
        ok = isinstance(value, list) and len(value) == 2 and all(isinstance(v, number) and not isinstance(v, bool) for v in value)
        if not ok:
            return "'between' takes [low, high], two numbers"
        return None if value[0] <= value[1] else f"low {value[0]} is above high {value[1]}"
    if operator in NUMERIC_OPERATORS:
        return None if isinstance(value, number) and not isinstance(value, bool) else f"'{operator}' needs a number, got {value!r}"
    if operator == "is":
        return None if isinstance(value, bool) else f"'is' takes true or false, got {value!r}"
    if operator == "in":
        return None if isinstance(value, list) and value and all(isinstance(v, str) for v in value) else "'in' takes a list of words"
    return None if isinstance(value, str) else f"'{operator}' on a text fact needs a word, got {value!r}"


def _friendly(message: str) -> str:
    """Reword cerberus's terse messages for rule authors."""
    return {
        "unknown field": "unknown field (check its spelling and indentation)",
        "required field": "required field is missing",
    }.get(message, message)


def fingerprint(root: Path) -> str:
    """Hash the content of every rule file, to say which rule set is serving."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.y*ml")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def rule_fingerprint(doc: dict, facts: list[str] = ()) -> str:
    """Hash what a rule decides and says (`when`, `card` and the facts they read), not its sources or snooze times."""
    text = json.dumps({"when": doc["when"], "card": doc["card"], "facts": list(facts)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_signature(root: Path) -> tuple:
    """Cheap change detector: names, sizes and modification times of the rule files."""
    return tuple(
        (str(p.relative_to(root)), s.st_size, s.st_mtime_ns)
        for p in sorted(root.rglob("*.y*ml"))
        if (s := p.stat())
    )


def load_ruleset(directory: str | Path, *, validate_resource: ResourceValidator | None = None) -> RuleSet:
    """Load and check every file under `directory`; raise RuleSetError listing all mistakes."""
    return _Loader(Path(directory).resolve(), validate_resource).load()
