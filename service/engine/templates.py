"""Card text templates: `{fact}`, `{fact.attribute}` and `{fact:.1f}`, nothing more.

Rendering never evaluates code: a placeholder names a fact and one of a fixed set of
attributes. Each attribute renders to at most a known width, so the loader can prove
that a summary stays under the 140 characters CDS Hooks allows, whatever the values.
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass
from datetime import datetime
from typing import Callable

# Widest rendering of each attribute; values are clamped to it when rendered.
WIDTHS = {
    "value": 9,
    "unit": 16,
    "date": 10,
    "sent": 26,
    "display": 40,
    "code": 40,
    "id": 64,  # a draft order's Type/id
    "upper_limit": 9,
    "uln_multiple": 9,
}
_FORMAT = re.compile(r"^\.[0-3]f$")
# Characters that would change how patient-sourced text renders (emphasis, links, HTML, tables).
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|])")


def escape_markdown(text: str) -> str:
    """Keep patient-sourced text from turning into emphasis, links, HTML or table cells."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


class TemplateError(ValueError):
    """A placeholder a rule author wrote that the engine cannot render."""


@dataclass(frozen=True)
class Placeholder:
    fact: str
    attribute: str
    number_format: str | None
    absent_of: tuple[str, ...] = ()  # {absent:a,b}: the titles of those facts that have no value


@dataclass(frozen=True)
class Template:
    source: str
    parts: tuple[str | Placeholder, ...]

    @classmethod
    def parse(cls, source: str) -> "Template":
        """Split a template into literal text and placeholders, rejecting anything else."""
        parts: list[str | Placeholder] = []
        try:
            parsed = list(string.Formatter().parse(source))
        except ValueError as exc:
            raise TemplateError(f"{exc} (write {{{{ or }}}} for a literal brace)") from exc
        for literal, field_name, spec, conversion in parsed:
            if literal:
                parts.append(literal)
            if field_name is None:
                continue
            if field_name == "absent":
                names = tuple(n.strip() for n in (spec or "").split(",") if n.strip())
                if not names:
                    raise TemplateError("{absent:...} needs fact names, e.g. {absent:calcium,phosphate}")
                parts.append(Placeholder("absent", "", None, names))
                continue
            if conversion or not re.fullmatch(r"[a-z][a-z0-9_]*(\.[a-z_]+)?", field_name):
                raise TemplateError(f"placeholder {{{field_name}}} must be a fact name, optionally .attribute")
            if spec and not _FORMAT.match(spec):
                raise TemplateError(f"format ':{spec}' in {{{field_name}}}: only :.0f to :.3f are allowed")
            fact, _, attribute = field_name.partition(".")
            parts.append(Placeholder(fact, attribute or "", spec or None))
        return cls(source, tuple(parts))

    @property
    def placeholders(self) -> list[Placeholder]:
        return [p for p in self.parts if isinstance(p, Placeholder) and not p.absent_of]

    @property
    def fact_names(self) -> list[str]:
        """Every fact a template reads, including those in {absent:...}."""
        return [n for p in self.parts if isinstance(p, Placeholder) for n in (p.absent_of or (p.fact,))]

    def max_length(self, title: Callable[[str], str]) -> int:
        """Return the longest text this template can render to (placeholders resolved by the loader)."""
        total = 0
        for p in self.parts:
            if isinstance(p, str):
                total += len(p)
            elif p.absent_of:
                total += sum(len(title(n)) for n in p.absent_of) + 5 * (len(p.absent_of) - 1)
            else:
                total += WIDTHS[p.attribute or "value"]
        return total

    def render(self, lookup: Callable[[Placeholder], object], *, markdown: bool) -> str:
        """Render with values from `lookup`; patient-sourced text is escaped for Markdown."""
        out = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            value = lookup(part)
            text = value if part.absent_of else format_value(value, part)
            out.append(escape_markdown(text) if markdown and part.attribute in ("display", "sent", "unit", "code") else text)
        return "".join(out)


def format_number(value: float, number_format: str | None = None) -> str:
    """Show a lab number the way a clinician writes it: 74.9, 10.4, 2.63, 450."""
    if number_format:
        text = format(value, number_format)
    else:
        magnitude = abs(value)
        decimals = 0 if magnitude >= 100 else 1 if magnitude >= 10 else 2
        text = f"{value:.{decimals}f}"
        if "." in text:
            text = text.rstrip("0").rstrip(".")
    return text if len(text) <= WIDTHS["value"] else f"{value:.1e}"


def format_value(value: object, placeholder: Placeholder) -> str:
    """Render one value within its attribute's width."""
    width = WIDTHS.get(placeholder.attribute or "value", WIDTHS["value"])
    if value is None:
        return "unknown"
    if isinstance(value, datetime):
        return value.date().isoformat()
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return format_number(float(value), placeholder.number_format)
    text = str(value)
    return text if len(text) <= width else text[: width - 1] + "…"
