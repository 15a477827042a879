"""Tests for the incremental reducer, run on real parquet files in tmp_path."""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qworker import reducer as reducer_module
from qworker.errors import ConfigError
from qworker.reducer import ReduceReport, Reducer
from qworker.results import QUARANTINE_DIR, REDUCER_DIR, SEGMENTS_DIR
from qworker.workloads.base import Aggregation

CONTRACTS = Aggregation(keys=("contract",), sums=("payoff_sum", "count"))


def write_result(results_dir: Path, name: str, columns: dict[str, Any]) -> Path:
    """Write one result file; ``name`` may include the ``_segments/`` folder."""
    path = results_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def contract_rows(task_id: str, contract: str, payoff: float, count: int = 1) -> dict[str, Any]:
    return {"task_id": [task_id], "contract": [contract], "payoff_sum": [payoff], "count": [count]}


def groups_by_contract(table: pa.Table) -> dict[str, dict[str, Any]]:
    return {row.pop("contract"): row for row in table.to_pylist()}


def single_row(report: ReduceReport) -> dict[str, Any]:
    rows = report.aggregate.to_pylist()
    assert len(rows) == 1
    return rows[0]


def test_reduce_incremental(tmp_path: Path) -> None:
    results = tmp_path / "results"
    files = {
        "t1.parquet": contract_rows("t1", "call", 1.5, 2),
        "t2.parquet": contract_rows("t2", "put", 2.0, 3),
        "t3.parquet": {"task_id": ["t3", "t3"], "contract": ["call", "put"], "payoff_sum": [0.5, 4.0], "count": [1, 1]},
        "t4.parquet": contract_rows("t4", "call", 3.0, 5),
        f"{SEGMENTS_DIR}/s1.parquet": {
            "task_id": ["t5", "t6"],
            "contract": ["put", "digital"],
            "payoff_sum": [1.0, 7.0],
            "count": [1, 2],
        },
    }
    names = list(files)
    for name in names[:3]:
        write_result(results, name, files[name])

    first = Reducer(results, CONTRACTS).run()
    for name in names[3:]:
        write_result(results, name, files[name])
    second = Reducer(results, CONTRACTS).run()

    assert first.files_folded == 3
    assert second.files_folded == 2
    assert second.files_skipped == 3
    assert second.tasks_folded == 3
    assert second.rows_folded == 3
    assert second.total_tasks == 6

    groups = groups_by_contract(second.aggregate)
    assert groups["call"] == {"payoff_sum": 5.0, "count": 8, "rows": 3, "tasks": 3}
    assert groups["put"] == {"payoff_sum": 7.0, "count": 5, "rows": 3, "tasks": 3}
    assert groups["digital"] == {"payoff_sum": 7.0, "count": 2, "rows": 1, "tasks": 1}

    scratch = tmp_path / "scratch"
    for name, columns in files.items():
        write_result(scratch, name, columns)
    from_scratch = Reducer(scratch, CONTRACTS, batch_files=2).run()
    assert from_scratch.files_folded == 5
    assert second.aggregate.equals(from_scratch.aggregate)


def test_reduce_schema_drift(tmp_path: Path) -> None:
    write_result(tmp_path, "a.parquet", {"task_id": ["t1", "t2"], "x": pa.array([1, 2], pa.int64())})
    write_result(tmp_path, "b.parquet", {"task_id": ["t3"], "x": pa.array([0.5], pa.float64()), "extra": [7]})
    write_result(
        tmp_path,
        "c.parquet",
        {"task_id": ["t4", "t5"], "x": pa.array([None, None]), "note": pa.array([None, None]), "label": ["u", "v"]},
    )

    report = Reducer(tmp_path).run()
    row = single_row(report)

    assert report.quarantined == ()
    assert report.aggregate.schema.field("x").type == pa.float64()
    assert report.aggregate.schema.field("extra").type == pa.int64()
    assert row["x"] == 3.5
    assert row["extra"] == 7
    assert row["rows"] == 5
    assert row["tasks"] == 5
    # A column that is null in every file has nothing to sum, and strings are never summed.
    assert "note" not in report.aggregate.column_names
    assert "label" not in report.aggregate.column_names


def test_reduce_schema_drift_across_runs(tmp_path: Path) -> None:
    write_result(tmp_path, "a.parquet", contract_rows("t1", "call", 1.0, 2))
    reducer = Reducer(tmp_path, CONTRACTS)
    first = reducer.run()

    write_result(
        tmp_path,
        "b.parquet",
        {"task_id": ["t2"], "contract": ["call"], "payoff_sum": pa.array([None]), "count": pa.array([0.5], pa.float64())},
    )
    write_result(tmp_path, "c.parquet", {"task_id": ["t3"], "contract": ["put"], "count": [4]})
    second = reducer.run()
    groups = groups_by_contract(second.aggregate)

    assert first.aggregate.schema.field("count").type == pa.int64()
    assert second.aggregate.schema.field("count").type == pa.float64()
    assert second.aggregate.schema.field("payoff_sum").type == pa.float64()
    assert groups["call"] == {"payoff_sum": 1.0, "count": 2.5, "rows": 2, "tasks": 2}
    # File c has no payoff_sum column, so that sum counts as null.
    assert groups["put"] == {"payoff_sum": None, "count": 4.0, "rows": 1, "tasks": 1}


def test_reduce_corrupt_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_result(tmp_path, "good1.parquet", {"task_id": ["g1"], "x": [1]})
    write_result(tmp_path, "good2.parquet", {"task_id": ["g2"], "x": [2]})
    valid = write_result(tmp_path, "truncated.parquet", {"task_id": ["c1"] * 100, "x": list(range(100))})
    valid.write_bytes(valid.read_bytes()[:-20])
    (tmp_path / "text.parquet").write_text("task_id,x\nc2,3\n")
    write_result(tmp_path, "no_task_id.parquet", {"x": [4]})

    with caplog.at_level(logging.WARNING, logger="qworker.reducer"):
        report = Reducer(tmp_path).run()

    quarantine = tmp_path / QUARANTINE_DIR
    bad_names = {"truncated.parquet", "text.parquet", "no_task_id.parquet"}
    errors = {item.path.name: item.error for item in report.quarantined}
    assert report.files_folded == 2
    assert single_row(report)["x"] == 3
    assert set(errors) == bad_names
    assert "missing column 'task_id'" in errors["no_task_id.parquet"]
    assert "unreadable parquet file" in errors["text.parquet"]
    for name in bad_names:
        assert not (tmp_path / name).exists()
        assert (quarantine / name).is_file()
        assert name in caplog.text

    lines = [json.loads(line) for line in (quarantine / "report.jsonl").read_text().splitlines()]
    assert {line["file"] for line in lines} == bad_names
    for line in lines:
        assert line["error"] == errors[line["file"]]
        assert isinstance(line["quarantined_at"], float)

    rerun = Reducer(tmp_path).run()
    assert rerun.quarantined == ()
    assert rerun.files_folded == 0
    assert rerun.files_skipped == 2


def test_reduce_quarantine_name_clash(tmp_path: Path) -> None:
    (tmp_path / "bad.parquet").write_text("not parquet")
    (tmp_path / SEGMENTS_DIR).mkdir()
    (tmp_path / SEGMENTS_DIR / "bad.parquet").write_text("not parquet either")

    report = Reducer(tmp_path).run()
    moved = sorted(item.moved_to.name for item in report.quarantined)

    assert moved == ["bad-1.parquet", "bad.parquet"]
    assert (tmp_path / QUARANTINE_DIR / "bad-1.parquet").is_file()


def test_reduce_missing_key_column(tmp_path: Path) -> None:
    write_result(tmp_path, "a.parquet", contract_rows("t1", "call", 1.0))
    write_result(tmp_path, "b.parquet", {"task_id": ["t2"], "payoff_sum": [2.0]})
    write_result(tmp_path, "c.parquet", {"task_id": ["t3"], "contract": [5], "payoff_sum": [3.0]})

    report = Reducer(tmp_path, CONTRACTS).run()
    errors = {item.path.name: item.error for item in report.quarantined}

    assert report.files_folded == 1
    assert "missing key column 'contract'" in errors["b.parquet"]
    assert "column types conflict" in errors["c.parquet"]
    assert report.total_tasks == 1


def test_reduce_no_double_count(tmp_path: Path) -> None:
    # "_segments/..." sorts before "t1.parquet", so the segment counts t1.
    write_result(tmp_path, "t1.parquet", {"task_id": ["t1", "t1"], "x": [100, 100]})
    write_result(tmp_path, f"{SEGMENTS_DIR}/s1.parquet", {"task_id": ["t1", "t2", "t2"], "x": [1, 2, 3]})
    reducer = Reducer(tmp_path)
    first = reducer.run()

    assert first.files_folded == 2
    assert first.tasks_folded == 2
    assert first.rows_folded == 3
    assert first.duplicate_tasks == 1
    assert single_row(first)["x"] == 6

    write_result(tmp_path, "t1.parquet", {"task_id": ["t1"], "x": [1000]})
    write_result(tmp_path, f"{SEGMENTS_DIR}/s2.parquet", {"task_id": ["t2", "t3"], "x": [50, 4]})
    second = reducer.run()

    assert second.files_folded == 1
    assert second.files_skipped == 2
    assert second.tasks_folded == 1
    assert second.duplicate_tasks == 1
    assert second.total_tasks == 3
    assert single_row(second) == {"x": 10, "rows": 4, "tasks": 3}


def test_reduce_duplicates_across_batches(tmp_path: Path) -> None:
    for index in range(5):
        write_result(tmp_path, f"{SEGMENTS_DIR}/s{index}.parquet", {"task_id": ["same", f"own{index}"], "x": [1, 10]})

    report = Reducer(tmp_path, batch_files=2).run()

    assert report.files_folded == 5
    assert report.duplicate_tasks == 1
    assert report.total_tasks == 6
    assert single_row(report) == {"x": 51, "rows": 6, "tasks": 6}


def test_reduce_restart_safety(tmp_path: Path) -> None:
    for index in range(4):
        write_result(tmp_path, f"t{index}.parquet", contract_rows(f"t{index}", "call", 1.0, index))
    first = Reducer(tmp_path, CONTRACTS).run()

    restarted = Reducer(tmp_path, CONTRACTS).run()

    assert restarted.files_folded == 0
    assert restarted.files_skipped == 4
    assert restarted.total_tasks == first.total_tasks
    assert restarted.aggregate.equals(first.aggregate)


def test_reduce_crash_mid_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for index in range(4):
        write_result(tmp_path, f"t{index}.parquet", contract_rows(f"t{index}", "call", 1.0, index))
    store_aggregate = reducer_module._store_aggregate
    stores = []

    def store_then_crash(conn: Any, aggregate: pa.Table) -> None:
        stores.append(aggregate)
        if len(stores) == 2:
            raise KeyboardInterrupt("simulated crash")
        store_aggregate(conn, aggregate)

    monkeypatch.setattr(reducer_module, "_store_aggregate", store_then_crash)
    with pytest.raises(KeyboardInterrupt):
        Reducer(tmp_path, CONTRACTS, batch_files=2).run()
    monkeypatch.undo()

    # The first batch committed and the second rolled back as a whole.
    after_crash = Reducer(tmp_path, CONTRACTS).aggregate()
    resumed = Reducer(tmp_path, CONTRACTS).run()

    assert after_crash.column("tasks").to_pylist() == [2]
    assert resumed.files_folded == 2
    assert resumed.files_skipped == 2
    assert resumed.total_tasks == 4
    assert groups_by_contract(resumed.aggregate)["call"] == {"payoff_sum": 4.0, "count": 6, "rows": 4, "tasks": 4}


def test_reduce_grouped_aggregation(tmp_path: Path) -> None:
    write_result(
        tmp_path,
        "t1.parquet",
        {"task_id": ["t1", "t1", "t1"], "contract": ["call", "put", "call"], "payoff_sum": [1.0, 2.0, 3.0], "count": [1, 2, 3]},
    )
    write_result(tmp_path, "t2.parquet", contract_rows("t2", "put", 10.0, 4))
    write_result(
        tmp_path,
        f"{SEGMENTS_DIR}/s1.parquet",
        {"task_id": ["t3", "t4"], "contract": [None, "call"], "payoff_sum": [5.0, None], "count": [1, 1]},
    )

    report = Reducer(tmp_path, CONTRACTS).run()
    groups = groups_by_contract(report.aggregate)

    assert report.aggregate.column_names == ["contract", "payoff_sum", "count", "rows", "tasks"]
    assert report.aggregate.schema.field("rows").type == pa.int64()
    assert report.aggregate.schema.field("tasks").type == pa.int64()
    assert groups["call"] == {"payoff_sum": 4.0, "count": 5, "rows": 3, "tasks": 2}
    assert groups["put"] == {"payoff_sum": 12.0, "count": 6, "rows": 2, "tasks": 2}
    assert groups[None] == {"payoff_sum": 5.0, "count": 1, "rows": 1, "tasks": 1}
    assert report.total_tasks == 4
    assert report.rows_folded == 6


def test_reduce_writes_aggregate_file(tmp_path: Path) -> None:
    write_result(tmp_path, "t1.parquet", contract_rows("t1", "call", 1.0))

    report = Reducer(tmp_path, CONTRACTS).run()
    written = pq.read_table(tmp_path / REDUCER_DIR / "aggregate.parquet")

    assert written.equals(report.aggregate)
    assert (tmp_path / REDUCER_DIR / "state.db").is_file()


def test_reduce_empty_aggregate(tmp_path: Path) -> None:
    reducer = Reducer(tmp_path, CONTRACTS)

    before = reducer.aggregate()
    report = reducer.run()

    assert before.num_rows == 0
    assert before.column_names == ["contract", "payoff_sum", "count", "rows", "tasks"]
    assert report.files_folded == 0
    assert report.total_tasks == 0


def test_reduce_reset(tmp_path: Path) -> None:
    write_result(tmp_path, "t1.parquet", contract_rows("t1", "call", 1.0))
    reducer = Reducer(tmp_path, CONTRACTS)
    first = reducer.run()

    reducer.reset()
    cleared = reducer.aggregate()
    again = reducer.run()

    assert cleared.num_rows == 0
    assert again.files_folded == 1
    assert again.total_tasks == 1
    assert again.aggregate.equals(first.aggregate)


def test_reduce_aggregation_mismatch(tmp_path: Path) -> None:
    write_result(tmp_path, "t1.parquet", contract_rows("t1", "call", 1.0))
    Reducer(tmp_path, CONTRACTS).run()

    with pytest.raises(ConfigError, match="reset"):
        Reducer(tmp_path).run()

    other = Reducer(tmp_path)
    other.reset()
    assert other.run().files_folded == 1


@pytest.mark.parametrize(
    "aggregation",
    [Aggregation(keys=("rows",)), Aggregation(sums=("task_id",)), Aggregation(keys=("a",), sums=("a",))],
)
def test_reduce_invalid_aggregation(tmp_path: Path, aggregation: Aggregation) -> None:
    with pytest.raises(ConfigError):
        Reducer(tmp_path, aggregation)


def test_reduce_logs_counts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_result(tmp_path, "t1.parquet", {"task_id": ["t1"], "x": [1]})

    with caplog.at_level(logging.INFO, logger="qworker.reducer"):
        Reducer(tmp_path).run()

    messages = [record.getMessage() for record in caplog.records if record.levelno == logging.INFO]
    assert len(messages) == 1
    assert "folded 1 files (1 rows, 1 new tasks)" in messages[0]


def test_reduce_skips_temp_files(tmp_path: Path) -> None:
    write_result(tmp_path, "t1.parquet", {"task_id": ["t1"], "x": [1]})
    (tmp_path / ".t2.parquet.abcd1234.tmp").write_text("half written")
    shutil.copy(tmp_path / "t1.parquet", tmp_path / ".t3.parquet")

    report = Reducer(tmp_path).run()

    assert report.files_folded == 1
    assert report.quarantined == ()


# Batches, read jobs and the state database


def folded_file_counts(results_dir: Path) -> dict[str, tuple[int, int]]:
    """Return the rows and tasks that the state records for each folded file."""
    with closing(sqlite3.connect(results_dir / REDUCER_DIR / "state.db")) as conn:
        return {name: (rows, tasks) for name, rows, tasks in conn.execute("SELECT name, rows, tasks FROM folded_files")}


def counted_task_files(results_dir: Path) -> dict[str, str]:
    """Return, for each counted task id, the name of the file it was counted from."""
    with closing(sqlite3.connect(results_dir / REDUCER_DIR / "state.db")) as conn:
        query = "SELECT task_id, name FROM counted_tasks JOIN folded_files ON folded_files.id = counted_tasks.file_id"
        return dict(conn.execute(query).fetchall())


def test_reduce_same_task_twice_in_batch(tmp_path: Path) -> None:
    write_result(
        tmp_path,
        "a.parquet",
        {
            "task_id": ["t1", "t1", "t2"],
            "contract": ["call", "put", "put"],
            "payoff_sum": [1.0, 2.0, 3.0],
            "count": [1, 1, 1],
        },
    )
    write_result(
        tmp_path,
        "b.parquet",
        {"task_id": ["t1", "t3"], "contract": ["call", "call"], "payoff_sum": [100.0, 4.0], "count": [100, 1]},
    )
    write_result(
        tmp_path,
        "c.parquet",
        {"task_id": ["t2", "t2"], "contract": ["put", "put"], "payoff_sum": [200.0, 200.0], "count": [9, 9]},
    )

    report = Reducer(tmp_path, CONTRACTS).run()
    groups = groups_by_contract(report.aggregate)

    assert report.files_folded == 3
    assert report.duplicate_tasks == 2
    assert report.tasks_folded == 3
    assert report.rows_folded == 4
    assert groups["call"] == {"payoff_sum": 5.0, "count": 2, "rows": 2, "tasks": 2}
    assert groups["put"] == {"payoff_sum": 5.0, "count": 2, "rows": 2, "tasks": 2}
    assert folded_file_counts(tmp_path) == {"a.parquet": (3, 2), "b.parquet": (1, 1), "c.parquet": (0, 0)}
    assert counted_task_files(tmp_path) == {"t1": "a.parquet", "t2": "a.parquet", "t3": "b.parquet"}


def reference_groups(files: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, Any]]:
    """Fold ``files`` by the reducer's rules in plain Python: the first file by name supplies a task's rows."""
    first_file: dict[str, str] = {}
    for name in sorted(files):
        for task in files[name]["task_id"]:
            first_file.setdefault(task, name)

    groups: dict[str, dict[str, Any]] = {}
    tasks: dict[str, set[str]] = {}
    for name in sorted(files):
        columns = files[name]
        rows = zip(columns["task_id"], columns["contract"], columns["payoff_sum"], columns["count"])
        for task, contract, payoff, count in rows:
            if first_file[task] != name:
                continue
            group = groups.setdefault(contract, {"payoff_sum": 0.0, "count": 0, "rows": 0, "tasks": 0})
            group["payoff_sum"] += payoff
            group["count"] += count
            group["rows"] += 1
            tasks.setdefault(contract, set()).add(task)
    for contract, group in groups.items():
        group["tasks"] = len(tasks[contract])
    return groups


def overlapping_files(count: int) -> dict[str, dict[str, list[Any]]]:
    """Return ``count`` files in which file i contains tasks t{i} and t{(i + 3) % 10}, so tasks t0 to t9 repeat."""
    return {
        f"f{index:03d}.parquet": {
            "task_id": [f"t{index}", f"t{(index + 3) % 10}"],
            "contract": ["call", "put"],
            "payoff_sum": [float(index), 10.0 * index],
            "count": [1, 2],
        }
        for index in range(count)
    }


@pytest.mark.parametrize(("batch_files", "job_files"), [(1, 1), (3, 1), (5, 2), (256, 3), (256, 32)])
def test_reduce_batch_and_job_sizes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch_files: int, job_files: int
) -> None:
    # Most tasks appear in two files, and the first file by name must win
    # whether the two share a read job, a batch or neither.
    monkeypatch.setattr(reducer_module, "READ_JOB_FILES", job_files)
    files = overlapping_files(12)
    for name, columns in files.items():
        write_result(tmp_path, name, columns)

    report = Reducer(tmp_path, CONTRACTS, batch_files=batch_files).run()

    assert groups_by_contract(report.aggregate) == reference_groups(files)
    assert report.total_tasks == 12
    assert report.duplicate_tasks == 10
    assert report.rows_folded == 12
    counted = counted_task_files(tmp_path)
    assert counted["t3"] == "f000.parquet"
    assert counted["t10"] == "f010.parquet"


def test_reduce_large_batches(tmp_path: Path) -> None:
    # 700 files make three batches of the default size, and tasks t0 to t9
    # repeat across them. Segment names sort before the per-task files, so a
    # segment counts the tasks it shares with them.
    files = overlapping_files(650)
    for index in range(50):
        files[f"{SEGMENTS_DIR}/s{index:02d}.parquet"] = {
            "task_id": [f"t{index * 13}", f"s{index}"],
            "contract": ["digital", "digital"],
            "payoff_sum": [1000.0, 1.0],
            "count": [1000, 1],
        }
    for name, columns in files.items():
        write_result(tmp_path, name, columns)

    report = Reducer(tmp_path, CONTRACTS).run()

    assert report.files_folded == 700
    assert groups_by_contract(report.aggregate) == reference_groups(files)
    assert report.total_tasks == 650 + 50
    assert sum(rows for rows, _ in folded_file_counts(tmp_path).values()) == report.rows_folded


def test_reduce_reads_only_new_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = overlapping_files(30)
    names = sorted(files)
    for name in names[:20]:
        write_result(tmp_path, name, files[name])
    Reducer(tmp_path, CONTRACTS).run()

    read_names: list[str] = []
    read_result_file = Reducer._read_result_file

    def record_read(self: Reducer, name: str, position: int) -> Any:
        read_names.append(name)
        return read_result_file(self, name, position)

    monkeypatch.setattr(Reducer, "_read_result_file", record_read)
    for name in names[20:]:
        write_result(tmp_path, name, files[name])
    report = Reducer(tmp_path, CONTRACTS).run()

    assert sorted(read_names) == names[20:]
    assert report.files_skipped == 20
    assert groups_by_contract(report.aggregate) == reference_groups(files)


def test_reduce_quarantine_inside_read_job(tmp_path: Path) -> None:
    write_result(tmp_path, "a.parquet", contract_rows("t1", "call", 1.0))
    Reducer(tmp_path, CONTRACTS).run()

    # b and c concatenate, so one read job groups them together, but b's int64
    # key conflicts with the stored string key and the fold quarantines b only.
    write_result(tmp_path, "b.parquet", {"task_id": ["t2"], "contract": [7], "payoff_sum": [2.0], "count": [1]})
    write_result(
        tmp_path,
        "c.parquet",
        {"task_id": ["t3", "t3"], "contract": [None, None], "payoff_sum": [3.0, 4.0], "count": [1, 1]},
    )
    write_result(tmp_path, "d.parquet", contract_rows("t4", "put", 5.0))
    report = Reducer(tmp_path, CONTRACTS).run()
    groups = groups_by_contract(report.aggregate)

    assert [item.path.name for item in report.quarantined] == ["b.parquet"]
    assert "column types conflict" in report.quarantined[0].error
    assert report.files_folded == 2
    assert groups[None] == {"payoff_sum": 7.0, "count": 2, "rows": 2, "tasks": 1}
    assert groups["put"] == {"payoff_sum": 5.0, "count": 1, "rows": 1, "tasks": 1}
    assert groups["call"] == {"payoff_sum": 1.0, "count": 1, "rows": 1, "tasks": 1}


def test_reduce_null_task_id(tmp_path: Path) -> None:
    write_result(tmp_path, "a.parquet", {"task_id": ["t1", None], "x": [1, 2]})
    write_result(tmp_path, "b.parquet", {"task_id": ["t2"], "x": [3]})

    report = Reducer(tmp_path).run()

    assert [item.path.name for item in report.quarantined] == ["a.parquet"]
    assert "contains 1 nulls" in report.quarantined[0].error
    assert single_row(report) == {"x": 3, "rows": 1, "tasks": 1}


def test_reduce_ignores_damaged_unused_column(tmp_path: Path) -> None:
    path = write_result(tmp_path, "a.parquet", {"task_id": ["t1", "t1"], "x": [1, 2], "note": ["n" * 200, "m" * 200]})
    note = pq.read_metadata(path).row_group(0).column(2)
    start = note.dictionary_page_offset if note.has_dictionary_page else note.data_page_offset
    data = bytearray(path.read_bytes())
    data[start : start + note.total_compressed_size] = b"\xff" * note.total_compressed_size
    path.write_bytes(bytes(data))
    with pytest.raises((OSError, pa.ArrowException)):
        pq.read_table(path)

    report = Reducer(tmp_path, Aggregation(sums=("x",))).run()

    assert report.quarantined == ()
    assert single_row(report) == {"x": 3, "rows": 2, "tasks": 1}


def test_reduce_large_string_columns(tmp_path: Path) -> None:
    write_result(
        tmp_path,
        "a.parquet",
        {
            "task_id": pa.array(["t1", "t1"], pa.large_string()),
            "contract": pa.array(["call", "put"], pa.large_string()),
            "payoff_sum": [1.0, 2.0],
            "count": [1, 1],
        },
    )
    write_result(
        tmp_path,
        "b.parquet",
        {"task_id": ["t2"], "contract": pa.array(["call"]).dictionary_encode(), "payoff_sum": [3.0], "count": [1]},
    )

    report = Reducer(tmp_path, CONTRACTS).run()
    groups = groups_by_contract(report.aggregate)

    assert report.quarantined == ()
    assert report.aggregate.schema.field("contract").type == pa.string()
    assert groups["call"] == {"payoff_sum": 4.0, "count": 2, "rows": 2, "tasks": 2}
    assert groups["put"] == {"payoff_sum": 2.0, "count": 1, "rows": 1, "tasks": 1}


def test_reduce_internal_column_name(tmp_path: Path) -> None:
    write_result(tmp_path, "a.parquet", {"task_id": ["t1"], "x": [1], "__qworker_file": [5]})

    report = Reducer(tmp_path).run()

    assert single_row(report) == {"x": 1, "rows": 1, "tasks": 1}
    with pytest.raises(ConfigError, match="__qworker_file"):
        Reducer(tmp_path, Aggregation(keys=("__qworker_file",)))


def test_task_id_codes_merge_repeated_dictionary_values() -> None:
    # pyarrow writes distinct dictionary values, but another parquet writer
    # may not, and one task must get one code.
    indices = pa.array([0, 1, 2, 2], pa.int32())
    column = pa.chunked_array([pa.DictionaryArray.from_arrays(indices, pa.array(["a", "b", "a"]))])

    dictionary, codes = reducer_module._task_id_codes(column)

    assert sorted(dictionary.to_pylist()) == ["a", "b"]
    assert dictionary.take(codes).to_pylist() == ["a", "b", "a", "a"]
    assert len(set(codes.to_pylist())) == 2


def test_reduce_empty_result_file(tmp_path: Path) -> None:
    write_result(tmp_path, "a.parquet", {"task_id": pa.array([], pa.string()), "x": pa.array([], pa.int64())})

    first = Reducer(tmp_path).run()
    write_result(tmp_path, "b.parquet", {"task_id": ["t1"], "x": [4]})
    second = Reducer(tmp_path).run()

    assert first.files_folded == 1
    assert first.total_tasks == 0
    assert first.aggregate.num_rows == 0
    assert second.files_folded == 1
    assert single_row(second) == {"x": 4, "rows": 1, "tasks": 1}
    assert folded_file_counts(tmp_path) == {"a.parquet": (0, 0), "b.parquet": (1, 1)}


def test_reduce_file_folded_concurrently(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_result(tmp_path, "a.parquet", contract_rows("t1", "call", 1.0))
    write_result(tmp_path, "b.parquet", contract_rows("t2", "call", 10.0))
    write_result(tmp_path, "c.parquet", contract_rows("t3", "put", 100.0))
    fold_batch = Reducer._fold_batch

    def fold_after_other_reducer(self: Reducer, conn: sqlite3.Connection, jobs: Any, tally: Any) -> None:
        # Another reducer folds b.parquet after this one read it and before this one's transaction.
        conn.execute(
            "INSERT INTO folded_files (name, size, mtime_ns, rows, tasks, folded_at) VALUES ('b.parquet', 0, 0, 1, 1, 0)"
        )
        conn.execute("INSERT INTO counted_tasks (task_id, file_id) VALUES ('t2', last_insert_rowid())")
        fold_batch(self, conn, jobs, tally)

    monkeypatch.setattr(Reducer, "_fold_batch", fold_after_other_reducer)
    report = Reducer(tmp_path, CONTRACTS).run()
    groups = groups_by_contract(report.aggregate)

    assert report.files_folded == 2
    assert report.files_skipped == 1
    assert groups["call"] == {"payoff_sum": 1.0, "count": 1, "rows": 1, "tasks": 1}
    assert groups["put"] == {"payoff_sum": 100.0, "count": 1, "rows": 1, "tasks": 1}
    assert counted_task_files(tmp_path) == {"t1": "a.parquet", "t2": "b.parquet", "t3": "c.parquet"}
