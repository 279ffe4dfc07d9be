"""Value sets: named lists of system + code, matched on both, never on display text."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"


def normalise_code(system: str, code: str) -> str:
    """Fold spellings that mean the same code; ICD-10-CM arrives both as N18.6 and N186."""
    code = code.strip()
    if system == ICD10CM:
        return code.replace(".", "").upper()
    return code


@dataclass(frozen=True)
class ValueSet:
    id: str
    title: str
    description: str
    exact: frozenset[tuple[str, str]]
    prefixes: tuple[tuple[str, str], ...]  # (system, normalised prefix) for entries written as `M33.1*`
    source: str

    def contains(self, system: str, code: str) -> bool:
        """Say whether a coding is in this value set."""
        code = normalise_code(system, code)
        return (system, code) in self.exact or any(s == system and code.startswith(p) for s, p in self.prefixes)

    def search_tokens(self) -> list[str] | None:
        """Return `system|code` tokens for a FHIR search, or None if a prefix entry makes that impossible."""
        if self.prefixes:
            return None
        return sorted(f"{system}|{code}" for system, code in self.exact)


class CodeIndex:
    """Map a coding to the value sets that hold it, built once per rule set."""

    def __init__(self, valuesets: list[ValueSet]) -> None:
        exact: dict[tuple[str, str], set[str]] = defaultdict(set)
        prefixes: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for vs in valuesets:
            for key in vs.exact:
                exact[key].add(vs.id)
            for system, prefix in vs.prefixes:
                prefixes[system].append((prefix, vs.id))
        self._exact = {key: frozenset(ids) for key, ids in exact.items()}
        self._prefixes = dict(prefixes)
        self.systems = frozenset(system for system, _ in self._exact) | frozenset(self._prefixes)

    def match(self, system: str | None, code: str | None) -> frozenset[str]:
        """Return the ids of the value sets that contain this coding."""
        if not system or not code or system not in self.systems:
            return frozenset()
        code = normalise_code(system, code)
        found = self._exact.get((system, code), frozenset())
        for prefix, vs_id in self._prefixes.get(system, ()):
            if code.startswith(prefix):
                found = found | {vs_id}
        return found
