"""`FlaggedRows`: a population's flagged rows, written in patient order without holding them all."""
from __future__ import annotations

import csv
import json
import random

import fsspec
import pyarrow.parquet as pq
import pytest

from service.screening.output import PARQUET_BATCH, FlaggedRows, SpillError, write_rows

COLUMNS = ["ca_x_p", "pth"]


def row(n: int) -> dict:
    rules = ["calciphylaxis-risk"] if n % 3 else ["calciphylaxis-risk", "pth-due"]
    return {"patient": f"p{n:06d}", "rules": rules,
            "values": {"ca_x_p": {"value": f"{70 + n % 10} mg²/dL²", "date": "2026-10-01"}, "pth": {"value": "610 pg/mL", "date": None}}}


def partitions(count: int, seed: int) -> list[list[dict]]:
    """Rows as workers hand them back: patients hashed to partitions, partitions finishing in any order."""
    rows = [row(n) for n in range(count)]
    random.Random(seed).shuffle(rows)
    return [rows[i : i + 37] for i in range(0, count, 37)]


def test_rows_past_the_spill_limit_go_to_disk_and_come_back_in_patient_order():
    with FlaggedRows(spill_rows=100) as flagged:
        for part in partitions(1000, seed=1):
            flagged.add(part)
            assert len(flagged._rows) < 100  # never more than one batch held
        assert len(flagged._runs) >= 9
        folder = flagged._folder
        back = list(flagged.in_order())
    assert [r["patient"] for r in back] == [f"p{n:06d}" for n in range(1000)]
    assert back[3] == row(3)  # values and a missing date survive the trip through disk
    assert flagged.count == 1000 and flagged.by_rule == {"calciphylaxis-risk": 1000, "pth-due": 334}
    assert not folder.exists()  # the runs are deleted when it closes


def test_the_same_rows_give_the_same_file_whatever_order_partitions_finished_in(tmp_path):
    outputs = []
    for seed in (1, 2):
        with FlaggedRows(spill_rows=50) as flagged:
            for part in partitions(300, seed):
                flagged.add(part)
            target = tmp_path / f"flagged-{seed}.csv"
            write_rows(str(target), flagged.in_order(), COLUMNS)
        outputs.append(target.read_bytes())
    assert outputs[0] == outputs[1]
    with (tmp_path / "flagged-1.csv").open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 300 and rows[0]["patient"] == "p000000" and rows[0]["pth_date"] == ""


def test_parquet_is_written_in_row_groups_and_an_empty_result_still_has_its_columns(tmp_path):
    count = PARQUET_BATCH + 5
    with FlaggedRows(spill_rows=4000) as flagged:
        for part in partitions(count, seed=3):
            flagged.add(part)
        write_rows(str(tmp_path / "flagged.parquet"), flagged.in_order(), COLUMNS)
    parquet = pq.ParquetFile(tmp_path / "flagged.parquet")
    assert parquet.metadata.num_rows == count and parquet.metadata.num_row_groups == 2
    assert parquet.read().column("patient").to_pylist()[:2] == ["p000000", "p000001"]

    with FlaggedRows() as nothing:
        write_rows(str(tmp_path / "none.parquet"), nothing.in_order(), COLUMNS)
    empty = pq.read_table(tmp_path / "none.parquet")
    assert empty.num_rows == 0 and empty.column_names == ["patient", "rules", "ca_x_p", "ca_x_p_date", "pth", "pth_date"]


def test_ndjson_keeps_each_rows_shape(tmp_path):
    with FlaggedRows(spill_rows=10) as flagged:
        flagged.add([row(2), row(1)])
        flagged.add([row(0)] + [row(n) for n in range(3, 30)])
        write_rows(str(tmp_path / "flagged.ndjson"), flagged.in_order(), COLUMNS)
    lines = [json.loads(line) for line in (tmp_path / "flagged.ndjson").read_text(encoding="utf-8").splitlines()]
    assert lines == [row(n) for n in range(30)]


def test_taking_a_tallys_rows_leaves_its_counts_and_holds_no_second_copy():
    from service.screening.core import Tally

    tally = Tally(screened=5, rows=[row(1), row(0)])
    with FlaggedRows() as flagged:
        flagged.take(tally)
        assert tally.rows == [] and tally.screened == 5
        assert [r["patient"] for r in flagged.in_order()] == ["p000000", "p000001"]


def test_a_temporary_folder_that_cannot_take_the_rows_is_a_named_error_not_a_traceback(tmp_path, monkeypatch):
    not_a_folder = tmp_path / "tmp-is-a-file"
    not_a_folder.write_text("")
    monkeypatch.setattr("tempfile.mkdtemp", lambda prefix="": str(not_a_folder))
    with FlaggedRows(spill_rows=10) as flagged, pytest.raises(SpillError) as caught:
        flagged.add(partitions(20, seed=4)[0])
    assert str(not_a_folder) in str(caught.value) and "cannot keep flagged rows" in str(caught.value)


def rows_then_failure(count: int):
    yield from (row(n) for n in range(count))
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("name", ["flagged.csv", "flagged.ndjson", "flagged.parquet"])
def test_a_write_that_fails_half_way_leaves_the_previous_file_as_it_was_and_no_partial_one(tmp_path, name):
    target = tmp_path / name
    write_rows(str(target), (row(n) for n in range(5)), COLUMNS)
    before = target.read_bytes()
    with pytest.raises(OSError, match="No space left"):
        write_rows(str(target), rows_then_failure(PARQUET_BATCH + 3), COLUMNS)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no .partial file left beside it


def test_a_write_to_a_url_that_fails_half_way_leaves_no_file_there():
    fs = fsspec.filesystem("memory")
    try:
        with pytest.raises(OSError, match="No space left"):
            write_rows("memory://results-fail/flagged.csv", rows_then_failure(50), COLUMNS)
        assert not fs.exists("/results-fail/flagged.csv")
        write_rows("memory://results-fail/flagged.csv", (row(n) for n in range(3)), COLUMNS)
        assert fs.cat("/results-fail/flagged.csv").decode().count("\n") == 4
    finally:
        if fs.exists("/results-fail"):
            fs.rm("/results-fail", recursive=True)
