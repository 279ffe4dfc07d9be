"""Write flagged patients (CSV, NDJSON or Parquet) and the run's summary.

CSV and Parquet are flat: `patient`, `rules` (space-separated ids), then for each fact a rule
reads `<fact>` (value and unit, as a card shows it) and `<fact>_date`. NDJSON keeps the row's
shape: {"patient", "rules": [...], "values": {fact: {"value", "date"}}}.
"""
from __future__ import annotations

import csv
import heapq
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager, suppress
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

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


class SpillError(OSError):
    """The temporary folder could not take the flagged rows (full, gone, not writable)."""


@contextmanager
def _open(target: str, mode: str):
    """Write `target` so that it is there whole or not at all: a local path or any fsspec URL.

    A local file is written beside it as `.<name>.partial` and renamed over it when complete, so
    an interrupted or failed run leaves the previous file, if any, as it was. A URL (memory://,
    s3://...; fsspec is only needed for URLs) is written in place and removed if the write fails.
    """
    text = {"newline": "", "encoding": "utf-8"} if "b" not in mode else {}
    if "://" in target:
        import fsspec

        try:
            with fsspec.open(target, mode, **text) as handle:
                yield handle
        except BaseException:
            with suppress(Exception):
                fs, path = fsspec.core.url_to_fs(target)
                fs.rm(path)
            raise
        return
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        with partial.open(mode, **text) as handle:
            yield handle
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


# Rows per Parquet row group, and the most rows `FlaggedRows` holds before it writes a sorted run to disk.
PARQUET_BATCH = 10_000
SPILL_ROWS = 20_000


def _patient(row: dict) -> str:
    return row["patient"]


class FlaggedRows:
    """Flagged rows as partitions finish, handed back in patient order with bounded memory.

    A population's flagged rows grow with it (a third of a synthetic export is flagged), so the
    process that writes the output must not hold them all. Up to `spill_rows` rows are kept in
    memory; past that each batch is sorted and written to a temporary file (a run), and
    `in_order` merges the runs. The output is the same file whatever order workers finished in.
    Use as a context manager: the temporary files go when it closes.
    """

    def __init__(self, spill_rows: int = SPILL_ROWS):
        self.spill_rows = spill_rows
        self.count = 0
        self.by_rule: Counter = Counter()
        self._rows: list[dict] = []
        self._runs: list[Path] = []
        self._folder: Path | None = None

    def add(self, rows: list[dict]) -> None:
        for row in rows:
            self.by_rule.update(row["rules"])
        self.count += len(rows)
        self._rows += rows
        if len(self._rows) >= self.spill_rows:
            self._spill()

    def take(self, tally) -> None:
        """Move a `Tally`'s rows here: the tally keeps its counts, this holds (or spills) the rows."""
        self.add(tally.rows)
        tally.rows = []

    def _spill(self) -> None:
        try:
            if self._folder is None:
                self._folder = Path(tempfile.mkdtemp(prefix="screen-rows-"))
            run = self._folder / f"run-{len(self._runs):05d}.ndjson"
            encode = msgspec.json.Encoder().encode
            with run.open("wb") as handle:
                handle.writelines(encode(row) + b"\n" for row in sorted(self._rows, key=_patient))
        except OSError as exc:
            where = self._folder or tempfile.gettempdir()
            raise SpillError(f"cannot keep flagged rows in the temporary folder {where}: {exc.strerror or exc}") from None
        self._runs.append(run)
        self._rows = []

    def in_order(self):
        """Every row, sorted by patient id: a merge of the runs on disk and the rows still held."""
        decode = msgspec.json.Decoder(dict).decode
        handles = [run.open("rb") for run in self._runs]
        try:
            streams = [(decode(line) for line in handle) for handle in handles]
            yield from heapq.merge(*streams, sorted(self._rows, key=_patient), key=_patient)
        finally:
            for handle in handles:
                handle.close()

    def per_rule(self, ruleset) -> dict[str, int]:
        """Patients flagged per rule, in the rule set's order."""
        return {rule.id: self.by_rule[rule.id] for rule in ruleset.rules if self.by_rule[rule.id]}

    def close(self) -> None:
        self._rows = []
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder, self._runs = None, []

    def __enter__(self) -> FlaggedRows:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_rows(target: str, rows, columns: list[str]) -> None:
    """Write `rows`, already in the order wanted (`FlaggedRows.in_order`), streaming: no format holds them all."""
    kind = output_format(target)
    if kind == "csv":
        with _open(target, "w") as handle:
            writer = csv.writer(handle)
            writer.writerow(flat_columns(columns))
            writer.writerows(["" if c is None else c for c in _flat(row, columns)] for row in rows)
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        names = flat_columns(columns)
        schema = pa.schema([(name, pa.string()) for name in names])

        def batches():
            batch: list[list[str | None]] = []
            for row in rows:
                batch.append(_flat(row, columns))
                if len(batch) == PARQUET_BATCH:
                    yield batch
                    batch = []
            if batch:
                yield batch

        with _open(target, "wb") as handle, pq.ParquetWriter(handle, schema) as writer:
            wrote = False
            for batch in batches():
                writer.write_table(pa.table({name: [cells[i] for cells in batch] for i, name in enumerate(names)}, schema=schema))
                wrote = True
            if not wrote:  # a file with the columns and no rows, as before
                writer.write_table(schema.empty_table())
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
