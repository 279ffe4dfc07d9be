"""Write flagged patients (CSV, NDJSON or Parquet) and the run's summary.

CSV and Parquet are flat: `patient`, `rules` (space-separated ids), then for each fact a rule
reads `<fact>` (value and unit, as a card shows it) and `<fact>_date`. NDJSON keeps the row's
shape: {"patient", "rules": [...], "values": {fact: {"value", "date"}}}.
"""
from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

FORMATS = {".csv": "csv", ".ndjson": "ndjson", ".jsonl": "ndjson", ".parquet": "parquet"}


def output_format(path: str) -> str | None:
    """The format a file name asks for, or None."""
    return FORMATS.get(Path(path.split("?")[0]).suffix.lower())


def flat_columns(columns: list[str]) -> list[str]:
    return ["patient", "rules"] + [name for column in columns for name in (column, f"{column}_date")]


def _flat(row: dict, columns: list[str]) -> list[str | None]:
    cells: list[str | None] = [row["patient"], " ".join(row["rules"])]
    for column in columns:
        value = row["values"].get(column) or {}
        cells += [value.get("value"), value.get("date")]
    return cells


def _open(target: str, mode: str):
    """A local path, or any fsspec URL (memory://, s3://...): fsspec is only needed for URLs."""
    if "://" in target:
        import fsspec

        return fsspec.open(target, mode, **({"newline": "", "encoding": "utf-8"} if "b" not in mode else {}))
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open(mode, **({"newline": "", "encoding": "utf-8"} if "b" not in mode else {}))


def write_rows(target: str, rows: list[dict], columns: list[str]) -> None:
    kind = output_format(target)
    rows = sorted(rows, key=lambda r: r["patient"])  # the same file whatever order workers finished in
    if kind == "csv":
        with _open(target, "w") as handle:
            writer = csv.writer(handle)
            writer.writerow(flat_columns(columns))
            writer.writerows(["" if c is None else c for c in _flat(row, columns)] for row in rows)
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        names = flat_columns(columns)
        data = {name: [] for name in names}
        for row in rows:
            for name, cell in zip(names, _flat(row, columns)):
                data[name].append(cell)
        table = pa.table({name: pa.array(values, type=pa.string()) for name, values in data.items()})
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        with _open(target, "wb") as handle:
            handle.write(buffer.getvalue())
    else:
        with _open(target, "w") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")


@dataclass
class Summary:
    engine: str  # "processes", "dask LocalCluster", "dask tcp://..."
    workers: int
    fingerprint: str
    screened: int
    flagged: int
    by_rule: dict[str, int]
    read: dict  # ReadReport.to_json(), plus invalid resources skipped
    errors: int
    wall_seconds: float
    output: str
    source: str
    extra: dict = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.screened / self.wall_seconds if self.wall_seconds > 0 else float("inf")

    def to_json(self) -> dict:
        return {
            "source": self.source, "output": self.output, "engine": self.engine, "workers": self.workers,
            "rules_fingerprint": self.fingerprint, "patients_screened": self.screened, "patients_flagged": self.flagged,
            "flagged_per_rule": self.by_rule, "patients_not_evaluated": self.errors, "resources": self.read,
            "wall_seconds": round(self.wall_seconds, 3), "patients_per_second": round(self.rate, 1), **self.extra,
        }

    def print(self, out=None) -> None:
        out = out or sys.stdout
        plural = "s" if self.workers > 1 else ""
        print(f"rules fingerprint {self.fingerprint}; source {self.source}", file=out)
        print(f"screened {self.screened} patients in {self.wall_seconds:.2f} s with {self.workers} worker{plural}: "
              f"{self.rate:,.0f} patients/s ({self.engine})", file=out)
        if "cluster_start_seconds" in self.extra:
            print(f"  of which {self.extra['cluster_start_seconds']:.2f} s connecting to or starting the cluster", file=out)
        print(f"{self.flagged} flagged -> {self.output}", file=out)
        for rule, count in self.by_rule.items():
            print(f"  {rule}: {count}", file=out)
        peaks = self.extra.get("peak_worker_rss_mb") or {}
        if peaks:
            print(f"peak memory per worker: {max(peaks.values()):.0f} MB (highest of {len(peaks)})", file=out)
        read = self.read
        print(f"resources: {read.get('lines', 0)} read, {read.get('skipped', 0)} skipped, "
              f"{read.get('unattributable', 0)} unattributable, {read.get('unreadable', 0)} unreadable", file=out)
        for reason, count in (read.get("unattributable_by_reason") or {}).items():
            print(f"  unattributable: {count} {reason}", file=out)
        for kind, count in (read.get("skipped_by_type") or {}).items():
            print(f"  skipped: {count} {kind}", file=out)
        for example in read.get("examples") or ():
            print(f"  e.g. {example}", file=out)
