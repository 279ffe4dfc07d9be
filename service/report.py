"""`feedback report` output: CSV, JSON, and an HTML page with an inline SVG chart per rule.

The charts are SVG written here, so the report needs no plotting library and the
service's runtime dependencies stay as they are.
"""
from __future__ import annotations

import csv
import io
import json
from html import escape
from typing import Iterable

from .store import RuleReport

FIELDS = ("rule", "issued", "accepted", "overridden", "acceptance_rate", "suggestions_taken",
          "withheld_by_snooze", "reasons_not_offered", "override_reasons")


def _record(row: RuleReport) -> dict:
    return {
        "rule": row.rule_id,
        "issued": row.cards_issued,
        "accepted": row.accepted,
        "overridden": row.overridden,
        "acceptance_rate": round(row.accepted / row.cards_issued, 4) if row.cards_issued else None,
        "suggestions_taken": row.suggestions_taken,
        "withheld_by_snooze": row.withheld,
        "reasons_not_offered": row.reasons_not_offered,
        "override_reasons": dict(row.override_reasons),
    }


def as_json(rows: Iterable[RuleReport]) -> str:
    return json.dumps({"rules": [_record(row) for row in rows]}, indent=2)


def as_csv(rows: Iterable[RuleReport]) -> str:
    """One line per rule; override reasons as 'label=count; label=count'."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(FIELDS)
    for row in rows:
        record = _record(row)
        record["override_reasons"] = "; ".join(f"{label}={n}" for label, n in row.override_reasons)
        record["acceptance_rate"] = "" if record["acceptance_rate"] is None else record["acceptance_rate"]
        writer.writerow([record[field] for field in FIELDS])
    return out.getvalue()


_SERIES = (("issued", "#1f77b4"), ("accepted", "#2ca02c"), ("overridden", "#d62728"))
_W, _H, _PAD = 640, 220, 40


def _chart(rule_id: str, days: list[tuple[str, int, int, int]]) -> str:
    """Lines for issued, accepted and overridden cards per day, as inline SVG."""
    top = max([max(d[1:]) for d in days] + [1])
    step = (_W - 2 * _PAD) / max(len(days) - 1, 1)

    def point(i: int, value: int) -> str:
        return f"{_PAD + i * step:.1f},{_H - _PAD - (_H - 2 * _PAD) * value / top:.1f}"

    parts = [
        f'<svg class="chart" data-rule="{escape(rule_id)}" xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}"'
        f' viewBox="0 0 {_W} {_H}" role="img" aria-label="{escape(rule_id)}: cards per day">',
        f'<line x1="{_PAD}" y1="{_H - _PAD}" x2="{_W - _PAD}" y2="{_H - _PAD}" stroke="#888"/>',
        f'<line x1="{_PAD}" y1="{_PAD}" x2="{_PAD}" y2="{_H - _PAD}" stroke="#888"/>',
        f'<text x="{_PAD - 6}" y="{_PAD + 4}" text-anchor="end" font-size="11">{top}</text>',
        f'<text x="{_PAD - 6}" y="{_H - _PAD + 4}" text-anchor="end" font-size="11">0</text>',
        f'<text x="{_PAD}" y="{_H - _PAD + 16}" font-size="11">{escape(days[0][0])}</text>',
        f'<text x="{_W - _PAD}" y="{_H - _PAD + 16}" text-anchor="end" font-size="11">{escape(days[-1][0])}</text>',
    ]
    for index, (name, colour) in enumerate(_SERIES, start=1):
        points = " ".join(point(i, day[index]) for i, day in enumerate(days))
        parts.append(f'<polyline class="series" data-series="{name}" fill="none" stroke="{colour}" stroke-width="2" points="{points}"/>')
        parts.extend(f'<circle cx="{point(i, day[index]).split(",")[0]}" cy="{point(i, day[index]).split(",")[1]}" r="3" fill="{colour}"/>'
                     for i, day in enumerate(days))
        parts.append(f'<text x="{_W - _PAD - 200 + 70 * (index - 1)}" y="{_PAD - 14}" font-size="12" fill="{colour}">{name}</text>')
    parts.append("</svg>")
    return "".join(parts)


def as_html(rows: list[RuleReport], timeline: dict[str, list[tuple[str, int, int, int]]], title: str) -> str:
    """A self-contained page: the totals table, then a chart per rule over time (UTC days)."""
    head = "".join(f"<th>{escape(f.replace('_', ' '))}</th>" for f in FIELDS)
    body = []
    for row in rows:
        record = _record(row)
        record["acceptance_rate"] = "-" if record["acceptance_rate"] is None else f"{record['acceptance_rate']:.0%}"
        record["override_reasons"] = ", ".join(f"{label} ({n})" for label, n in row.override_reasons) or "-"
        body.append("<tr>" + "".join(f"<td>{escape(str(record[f]))}</td>" for f in FIELDS) + "</tr>")
    sections = []
    for rule_id, days in timeline.items():
        sections.append(f'<section class="rule"><h2>{escape(rule_id)}</h2>{_chart(rule_id, days)}</section>')
    if not sections:
        sections.append("<p>No cards issued and no feedback received in this period.</p>")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child,td:last-child{text-align:left}</style>"
        f"</head><body><h1>{escape(title)}</h1>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
        "<p>Per rule and UTC day: cards issued, and cards accepted or overridden (feedback received that day).</p>"
        f"{''.join(sections)}</body></html>\n"
    )
