"""Result rows and atomic parquet writes."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qworker.errors import ResultError
from qworker.queue import Lease
from qworker.results import is_complete_parquet, iter_result_files, result_table, rows_to_table, write_parquet_atomic
from qworker.sink import FileSink, SegmentSink, SinkSettings
from qworker.task import Task


def test_rows_to_table_adds_task_id_first() -> None:
    table = rows_to_table("t1", [{"x": 1}, {"x": 2}])

    assert table.column_names == ["task_id", "x"]
    assert table.column("task_id").to_pylist() == ["t1", "t1"]


def test_none_becomes_one_row() -> None:
    assert rows_to_table("t1", None).to_pylist() == [{"task_id": "t1"}]


def test_handler_task_id_column_is_replaced() -> None:
    table = rows_to_table("t1", pa.table({"task_id": ["other"], "y": [1.0]}))

    assert table.to_pylist() == [{"task_id": "t1", "y": 1.0}]


@pytest.mark.parametrize("rows", ["text", 3, [1, 2], [{"a": 1}, "b"]])
def test_bad_rows_raise_result_error(rows: object) -> None:
    with pytest.raises(ResultError, match="t1"):
        rows_to_table("t1", rows)


def test_atomic_write_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "r" / "t1.parquet"

    write_parquet_atomic(pa.table({"a": [1]}), path)

    assert pq.read_table(path).to_pylist() == [{"a": 1}]
    assert os.listdir(path.parent) == ["t1.parquet"]


def test_failed_write_keeps_old_file(tmp_path: Path) -> None:
    path = tmp_path / "t1.parquet"
    write_parquet_atomic(pa.table({"a": [1]}), path)

    with pytest.raises(AttributeError):
        write_parquet_atomic("not a table", path)  # type: ignore[arg-type]

    assert pq.read_table(path).to_pylist() == [{"a": 1}]
    assert os.listdir(tmp_path) == ["t1.parquet"]


def test_truncated_file_is_incomplete(tmp_path: Path) -> None:
    path = tmp_path / "t1.parquet"
    write_parquet_atomic(pa.table({"a": list(range(100))}), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    assert not is_complete_parquet(path)


def test_iter_result_files_skips_temp_files(tmp_path: Path) -> None:
    write_parquet_atomic(pa.table({"a": [1]}), tmp_path / "t1.parquet")
    write_parquet_atomic(pa.table({"a": [1]}), tmp_path / "_segments" / "s1.parquet")
    (tmp_path / ".t2.parquet.abc.tmp").write_bytes(b"partial")

    names = sorted(path.name for path in iter_result_files(tmp_path))

    assert names == ["s1.parquet", "t1.parquet"]


def test_segment_sink_writes_once_per_batch(tmp_path: Path) -> None:
    durable: list[list[str]] = []

    async def on_durable(leases) -> None:
        durable.append([lease.task_id for lease in leases])

    async def main() -> None:
        sink = SegmentSink(tmp_path, on_durable, "owner", SinkSettings(batch_rows=3, batch_s=60))
        for seed in range(7):
            lease = Lease(Task.create(seed, {}, f"t{seed}"), "owner", 0.0, 0.0)
            await sink.store(lease, rows_to_table(lease.task_id, {"v": seed}))
        await sink.flush()

    anyio.run(main)

    assert durable == [["t0", "t1", "t2"], ["t3", "t4", "t5"], ["t6"]]
    files = sorted(iter_result_files(tmp_path))
    assert [pq.read_metadata(path).num_rows for path in files] == [3, 3, 1]


def test_segment_sink_keeps_conflicting_schemas_apart(tmp_path: Path) -> None:
    async def on_durable(leases) -> None:
        pass

    async def main() -> None:
        sink = SegmentSink(tmp_path, on_durable, "owner", SinkSettings(batch_rows=100, batch_s=60))
        first = Lease(Task.create(1, {}, "t1"), "owner", 0.0, 0.0)
        second = Lease(Task.create(2, {}, "t2"), "owner", 0.0, 0.0)
        await sink.store(first, rows_to_table("t1", {"v": "text"}))
        await sink.store(second, rows_to_table("t2", {"v": 2.5}))
        await sink.flush()

    anyio.run(main)

    tables = [pq.read_table(path) for path in sorted(iter_result_files(tmp_path))]
    assert sorted(t.column("task_id")[0].as_py() for t in tables) == ["t1", "t2"]


def test_segment_sink_mixes_id_only_results(tmp_path: Path) -> None:
    async def on_durable(leases) -> None:
        pass

    async def main() -> None:
        sink = SegmentSink(tmp_path, on_durable, "owner", SinkSettings(batch_rows=100, batch_s=60))
        for seed in range(4):
            lease = Lease(Task.create(seed, {}, f"t{seed}"), "owner", 0.0, 0.0)
            rows = {"v": seed} if seed % 2 else None
            await sink.store(lease, result_table(lease.task_id, rows))
        await sink.flush()

    anyio.run(main)

    [path] = iter_result_files(tmp_path)
    rows = sorted(pq.read_table(path).to_pylist(), key=lambda row: row["task_id"])
    assert rows == [
        {"task_id": "t0", "v": None},
        {"task_id": "t1", "v": 1},
        {"task_id": "t2", "v": None},
        {"task_id": "t3", "v": 3},
    ]


def test_file_sink_writes_id_only_result(tmp_path: Path) -> None:
    async def on_durable(leases) -> None:
        pass

    async def main() -> None:
        sink = FileSink(tmp_path, on_durable, fsync=False)
        await sink.store(Lease(Task.create(1, {}, "t1"), "owner", 0.0, 0.0), result_table("t1", None))

    anyio.run(main)

    assert pq.read_table(tmp_path / "t1.parquet").to_pylist() == [{"task_id": "t1"}]


def test_result_table_none_for_no_rows() -> None:
    assert result_table("t1", None) is None
    assert result_table("t1", []) is None


@pytest.mark.parametrize("rows", [[], pa.table({"x": pa.array([], pa.int64())})])
def test_zero_rows_become_one_id_row(rows: object) -> None:
    assert rows_to_table("t1", rows).to_pylist() == [{"task_id": "t1"}]
