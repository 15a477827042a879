"""Task files: reading CSV, JSONL and parquet rows as tasks, rejected rows and round trips."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qworker import sources
from qworker.errors import ConfigError
from qworker.sources import (
    RejectedRow,
    TaskFileResult,
    parse_csv_value,
    read_task_file,
    write_rejected,
    write_task_file,
)
from qworker.task import Task
from qworker.workloads.noop import SLEEP_WORKLOAD


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def write_parquet(path: Path, columns: dict[str, Any]) -> Path:
    table = columns if isinstance(columns, pa.Table) else pa.table(columns)
    pq.write_table(table, path)
    return path


def rejected_by_line(result: TaskFileResult) -> dict[int, RejectedRow]:
    return {row.line: row for row in result.rejected}


def sample_tasks() -> list[Task]:
    return [
        Task.create(0, {}),
        Task.create(1, {"paths": 1000, "sigma": 0.2, "contract": "euro-atm"}),
        Task.create(
            2,
            {"nested": {"list": [1, 2.5, None, True]}, "text": 'comma, "quote"\nnewline é'},
            "shard-0002",
            lane="solo",
            max_attempts=7,
        ),
        Task.create(2**63 - 1, {"whole": 1.0, "small": 1e-300, "big": 10**30, "flag": False}),
    ]


# ---------------------------------------------------------------------------
# CSV


def test_csv_config_column_rows(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "tasks.csv",
        [
            "seed,task_id,lane,max_attempts,config",
            '0,,,,"{""paths"": 100}"',
            '7,shard-7,solo,5,"{""paths"": 200, ""kind"": ""asian""}"',
            "8,,,,",
        ],
    )

    result = read_task_file(path)

    assert result.format == "csv"
    assert result.rejected == []
    assert result.duplicates_in_file == 0
    assert result.tasks == [
        Task.create(0, {"paths": 100}),
        Task.create(7, {"paths": 200, "kind": "asian"}, "shard-7", lane="solo", max_attempts=5),
        Task.create(8, {}),
    ]


def test_csv_columns_become_config(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "tasks.csv",
        [
            "seed,paths,sigma,kind,antithetic,note,lane",
            "3,1000,0.25,european,true,null,solo",
            " +4 ,007,1e3,asian,false,,",
        ],
    )

    result = read_task_file(path)

    assert result.rejected == []
    first, second = result.tasks
    assert first.seed == 3
    assert first.lane == "solo"
    assert dict(first.config) == {"paths": 1000, "sigma": 0.25, "kind": "european", "antithetic": True, "note": None}
    assert second.seed == 4
    assert second.lane == "default"
    assert dict(second.config) == {"paths": "007", "sigma": 1000.0, "kind": "asian", "antithetic": False, "note": ""}
    assert isinstance(second.config["sigma"], float)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12", 12),
        ("-3", -3),
        ("0", 0),
        (" 42 ", 42),
        ("123456789012345678901234567890", 123456789012345678901234567890),
        ("2.5", 2.5),
        ("-0.125", -0.125),
        ("1e3", 1000.0),
        ("1.5E-2", 0.015),
        ("true", True),
        ("false", False),
        ("null", None),
        ("", ""),
        ("007", "007"),
        (".5", ".5"),
        ("1.", "1."),
        ("+1", "+1"),
        ("1_000", "1_000"),
        ("nan", "nan"),
        ("inf", "inf"),
        ("1e999", "1e999"),
        ("True", "True"),
        ("NULL", "NULL"),
        (" text ", " text "),
        ('{"a": 1}', '{"a": 1}'),
    ],
)
def test_parse_csv_value(text: str, expected: Any) -> None:
    value = parse_csv_value(text)

    assert value == expected
    assert type(value) is type(expected)


def test_csv_bad_rows_rejected_with_lines(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "tasks.csv",
        [
            "seed,task_id,lane,max_attempts,config",  # line 1
            "0,,,,{}",  # line 2: valid
            "x,,,,{}",  # line 3
            "-1,,,,{}",  # line 4
            "5,,,,not json",  # line 5
            "6,../x,,,{}",  # line 6
            "7,,fast,,{}",  # line 7
            "8,,,0,{}",  # line 8
            '9,,,,"[1, 2]"',  # line 9
            ",,,,{}",  # line 10
            "11,,,,{}",  # line 11: valid
        ],
    )

    result = read_task_file(path)

    assert [task.seed for task in result.tasks] == [0, 11]
    rejected = rejected_by_line(result)
    assert sorted(rejected) == [3, 4, 5, 6, 7, 8, 9, 10]
    assert (rejected[3].field, rejected[3].value) == ("seed", "x")
    assert rejected[3].reason == "invalid seed 'x': expected an integer"
    assert (rejected[4].field, rejected[4].value) == ("seed", -1)
    assert "use a value from 0 to 2**63-1" in rejected[4].reason
    assert (rejected[5].field, rejected[5].value) == ("config", "not json")
    assert "invalid JSON in config" in rejected[5].reason
    assert (rejected[6].field, rejected[6].value) == ("task_id", "../x")
    assert "invalid task id '../x'" in rejected[6].reason
    assert (rejected[7].field, rejected[7].value) == ("lane", "fast")
    assert "invalid lane 'fast'" in rejected[7].reason
    assert (rejected[8].field, rejected[8].value) == ("max_attempts", 0)
    assert (rejected[9].field, rejected[9].value) == ("config", [1, 2])
    assert "expected a JSON object, got list" in rejected[9].reason
    assert rejected[10].field == "seed"
    assert "missing seed" in rejected[10].reason
    assert rejected[3].row == {"seed": "x", "task_id": "", "lane": "", "max_attempts": "", "config": "{}"}
    assert all(row.unit == "line" for row in result.rejected)


def test_csv_rejected_row_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_lines(tmp_path / "tasks.csv", ["seed,paths", "1,10", "2,10", "3,10", "4,10", "5,10", "x,10"])

    result = read_task_file("tasks.csv")

    assert [str(row) for row in result.rejected] == ["tasks.csv line 7: field 'seed': invalid seed 'x': expected an integer"]


def test_csv_multiline_field_keeps_start_line(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "tasks.csv",
        [
            "seed,note",
            '1,"first',
            'second"',
            "",
            "bad,plain",
            "3,plain",
        ],
    )

    result = read_task_file(path)

    assert [task.seed for task in result.tasks] == [1, 3]
    assert result.tasks[0].config["note"] == "first\nsecond"
    assert [row.line for row in result.rejected] == [5]


def test_csv_wrong_field_count_rejected(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "tasks.csv", ["seed,paths", "1,10,extra", "2", "3,30"])

    result = read_task_file(path)

    assert [task.seed for task in result.tasks] == [3]
    assert [row.line for row in result.rejected] == [2, 3]
    assert result.rejected[0].field is None
    assert "found 3 fields but the header has 2" in result.rejected[0].reason
    assert result.rejected[0].row == ["1", "10", "extra"]


def test_csv_blank_lines_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "tasks.csv"
    path.write_bytes(b"\xef\xbb\xbf\r\nseed,paths\r\n1,10\r\n\r\nx,20\r\n")

    result = read_task_file(path)

    assert [task.seed for task in result.tasks] == [1]
    assert [row.line for row in result.rejected] == [5]


def test_csv_without_seed_column_raises(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "tasks.csv", ["Seed,paths", "1,10"])

    with pytest.raises(ConfigError) as raised:
        read_task_file(path)

    message = str(raised.value)
    assert str(path) in message
    assert "no 'seed' column" in message
    assert "'Seed', 'paths'" in message


def test_csv_header_only_without_seed_raises(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "tasks.csv", ["paths,kind"])

    with pytest.raises(ConfigError, match="no 'seed' column"):
        read_task_file(path)


def test_csv_config_and_extra_columns_raise(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "tasks.csv", ["seed,config,paths", "1,{},10"])

    with pytest.raises(ConfigError, match="'config' column and the config columns 'paths'"):
        read_task_file(path)


def test_csv_duplicate_column_raises(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "tasks.csv", ["seed,paths,paths", "1,10,20"])

    with pytest.raises(ConfigError, match="column 'paths' twice"):
        read_task_file(path)


def test_csv_unnamed_column_raises(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "tasks.csv", ["seed,paths,", "1,10,"])

    with pytest.raises(ConfigError, match="column without a name"):
        read_task_file(path)


def test_csv_header_only_returns_no_tasks(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "tasks.csv", ["seed,paths"])

    result = read_task_file(path)

    assert result.tasks == []
    assert result.rejected == []


def test_csv_bad_quoting_raises(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "tasks.csv", ["seed,note", "1,ok", '2,"open"quote'])

    with pytest.raises(ConfigError) as raised:
        read_task_file(path)

    assert "not valid CSV at line 3" in str(raised.value)
    assert str(path) in str(raised.value)


def test_csv_not_utf8_raises(tmp_path: Path) -> None:
    path = tmp_path / "tasks.csv"
    path.write_bytes(b"seed,note\n1,ok\n2,caf\xe9\n")

    with pytest.raises(ConfigError) as raised:
        read_task_file(path)

    message = str(raised.value)
    assert "not valid UTF-8" in message
    assert "0xe9 on line 3" in message
    assert "save the file as UTF-8" in message


def test_csv_large_file_reads_quickly(tmp_path: Path) -> None:
    path = tmp_path / "tasks.csv"
    lines = ["seed,paths,kind,sigma"]
    lines.extend(f"{seed},{1000 + seed % 7},european,0.{seed % 9 + 1}" for seed in range(100_000))
    write_lines(path, lines)

    started = time.monotonic()
    result = read_task_file(path, workload=SLEEP_WORKLOAD)
    elapsed_s = time.monotonic() - started

    assert len(result.tasks) == 100_000
    assert result.rejected == []
    assert result.tasks[-1].seed == 99_999
    # The read took about 1.5 to 2 s on a 2-core AMD EPYC machine when this test
    # was written. The bound is loose so that it catches quadratic behaviour, not slow hardware.
    assert elapsed_s < 30


# ---------------------------------------------------------------------------
# JSONL


def test_jsonl_rows(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "tasks.jsonl",
        [
            '{"seed": 0, "config": {"paths": 100}}',
            '{"seed": 1, "config": "{\\"paths\\": 200}", "task_id": "shard-1", "lane": "solo", "max_attempts": 4}',
            '{"seed": 2, "paths": 300, "kind": "asian", "task_id": null, "lane": null}',
            '{"seed": 3, "config": null}',
        ],
    )

    result = read_task_file(path)

    assert result.format == "jsonl"
    assert result.rejected == []
    assert result.tasks == [
        Task.create(0, {"paths": 100}),
        Task.create(1, {"paths": 200}, "shard-1", lane="solo", max_attempts=4),
        Task.create(2, {"paths": 300, "kind": "asian"}),
        Task.create(3, {}),
    ]


def test_jsonl_bad_rows_rejected_with_lines(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "tasks.jsonl",
        [
            '{"seed": 0, "config": {}}',  # line 1: valid
            '{"seed": "x", "config": {}}',  # line 2
            '{"seed": -1, "config": {}}',  # line 3
            '{"seed": 3, "config": "not json"}',  # line 4
            "",  # line 5: blank, skipped
            '{"seed": 5, "config": {}, "task_id": "../x"}',  # line 6
            '{"seed": 6, "config": {}, "lane": "fast"}',  # line 7
            '{"seed": 7, "config": {',  # line 8: malformed JSON
            "[1, 2]",  # line 9
            '{"config": {}}',  # line 10
            '{"seed": 10, "config": {}, "paths": 5}',  # line 11
            '{"seed": 11, "config": {"x": NaN}}',  # line 12
            '{"seed": 12.0}',  # line 13
            '{"seed": 13, "config": []}',  # line 14
            '{"seed": 14, "config": {}}',  # line 15: valid
        ],
    )

    result = read_task_file(path)

    assert [task.seed for task in result.tasks] == [0, 14]
    rejected = rejected_by_line(result)
    assert sorted(rejected) == [2, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    assert rejected[2].field == "seed"
    assert rejected[2].reason == "invalid seed 'x': expected an integer"
    assert (rejected[3].field, rejected[3].value) == ("seed", -1)
    assert (rejected[4].field, rejected[4].value) == ("config", "not json")
    assert (rejected[6].field, rejected[6].value) == ("task_id", "../x")
    assert (rejected[7].field, rejected[7].value) == ("lane", "fast")
    assert rejected[8].field is None
    assert rejected[8].reason.startswith("invalid JSON:")
    assert rejected[8].row == '{"seed": 7, "config": {'
    assert rejected[9].field is None
    assert "got list" in rejected[9].reason
    assert rejected[10].field == "seed"
    assert "missing seed" in rejected[10].reason
    assert (rejected[11].field, rejected[11].value) == ("paths", 5)
    assert "beside 'config'" in rejected[11].reason
    assert rejected[12].field == "config"
    assert "at config.x" in rejected[12].reason
    assert (rejected[13].field, rejected[13].value) == ("seed", 12.0)
    assert rejected[14].field == "config"
    assert str(rejected[2]) == f"{path} line 2: field 'seed': invalid seed 'x': expected an integer"


def test_jsonl_task_to_json_lines_read_back(tmp_path: Path) -> None:
    tasks = sample_tasks()
    path = write_lines(tmp_path / "tasks.jsonl", [task.with_attempt(2).to_json() for task in tasks])

    result = read_task_file(path)

    assert result.rejected == []
    assert result.tasks == tasks
    assert all(task.attempt == 0 for task in result.tasks)


def test_jsonl_not_utf8_raises(tmp_path: Path) -> None:
    path = tmp_path / "tasks.jsonl"
    path.write_bytes(b'{"seed": 1}\n{"seed": 2, "note": "\xff"}\n')

    with pytest.raises(ConfigError, match="not valid UTF-8: byte 0xff on line 2"):
        read_task_file(path)


def test_ndjson_suffix_reads_as_jsonl(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "tasks.NDJSON", ['{"seed": 4}'])

    result = read_task_file(path)

    assert result.format == "jsonl"
    assert result.tasks == [Task.create(4, {})]


# ---------------------------------------------------------------------------
# Parquet


def test_parquet_config_string_struct_and_map(tmp_path: Path) -> None:
    text_path = write_parquet(
        tmp_path / "text.parquet",
        {"seed": [0, 1], "config": ['{"paths": 100}', None], "lane": [None, "solo"], "max_attempts": [None, 6]},
    )
    struct_path = write_parquet(
        tmp_path / "struct.parquet",
        {"seed": pa.array([2], pa.int32()), "config": pa.array([{"paths": 100, "kind": "asian"}])},
    )
    map_path = write_parquet(
        tmp_path / "map.parquet",
        {"seed": [3], "config": pa.array([[("paths", 100)]], type=pa.map_(pa.string(), pa.int64()))},
    )

    text_result = read_task_file(text_path)
    struct_result = read_task_file(struct_path)
    map_result = read_task_file(map_path)

    assert text_result.format == "parquet"
    assert text_result.rejected == []
    assert text_result.tasks == [Task.create(0, {"paths": 100}), Task.create(1, {}, lane="solo", max_attempts=6)]
    assert struct_result.tasks == [Task.create(2, {"paths": 100, "kind": "asian"})]
    assert map_result.tasks == [Task.create(3, {"paths": 100})]


def test_parquet_columns_become_config(tmp_path: Path) -> None:
    path = write_parquet(
        tmp_path / "tasks.parquet",
        {"seed": [0, 1], "paths": [100, 200], "sigma": [0.2, None], "tags": [["a"], []], "task_id": ["a-0", None]},
    )

    result = read_task_file(path)

    assert result.rejected == []
    assert result.tasks == [
        Task.create(0, {"paths": 100, "sigma": 0.2, "tags": ["a"]}, "a-0"),
        Task.create(1, {"paths": 200, "sigma": None, "tags": []}),
    ]


def test_parquet_bad_rows_rejected_with_row_indexes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Small batches check that row indexes keep counting from one batch to the next.
    monkeypatch.setattr(sources, "_PARQUET_BATCH_ROWS", 2)
    path = write_parquet(
        tmp_path / "tasks.parquet",
        {
            "seed": pa.array([0, -1, 2, 3, 4, 5, None, 7], pa.int64()),
            "task_id": [None, None, "../x", None, None, None, None, None],
            "lane": [None, None, None, "fast", None, None, None, None],
            "config": ["{}", "{}", "{}", "{}", "not json", '{"x": 1}', "{}", "{}"],
        },
    )

    result = read_task_file(path)

    assert [task.seed for task in result.tasks] == [0, 5, 7]
    rejected = rejected_by_line(result)
    assert sorted(rejected) == [1, 2, 3, 4, 6]
    assert (rejected[1].field, rejected[1].value) == ("seed", -1)
    assert (rejected[2].field, rejected[2].value) == ("task_id", "../x")
    assert (rejected[3].field, rejected[3].value) == ("lane", "fast")
    assert (rejected[4].field, rejected[4].value) == ("config", "not json")
    assert rejected[6].field == "seed"
    assert all(row.unit == "row" for row in result.rejected)
    assert str(rejected[1]).startswith(f"{path} row 1: field 'seed': invalid seed -1")
    assert rejected[1].row == {"seed": -1, "task_id": None, "lane": None, "config": "{}"}


def test_parquet_string_seed_rejected(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "tasks.parquet", {"seed": ["1", "x"]})

    result = read_task_file(path)

    assert result.tasks == []
    assert [(row.line, row.field, row.value) for row in result.rejected] == [(0, "seed", "1"), (1, "seed", "x")]


def test_parquet_without_seed_column_raises(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "tasks.parquet", {"paths": [1], "kind": ["a"]})

    with pytest.raises(ConfigError, match=r"no 'seed' column.*'paths', 'kind'"):
        read_task_file(path)


def test_parquet_corrupt_raises(tmp_path: Path) -> None:
    path = tmp_path / "tasks.parquet"
    path.write_bytes(b"this is not a parquet file at all")

    with pytest.raises(ConfigError) as raised:
        read_task_file(path)

    message = str(raised.value)
    assert str(path) in message
    assert "check that it is a complete parquet file" in message


def test_parquet_truncated_raises(tmp_path: Path) -> None:
    whole = write_task_file([Task.create(seed, {"paths": seed}) for seed in range(1000)], tmp_path / "whole.parquet")
    data = (tmp_path / "whole.parquet").read_bytes()
    path = tmp_path / "tasks.parquet"
    path.write_bytes(data[: len(data) // 2])

    assert whole == 1000
    with pytest.raises(ConfigError, match="check that it is a complete parquet file"):
        read_task_file(path)


# ---------------------------------------------------------------------------
# Rules shared by every format


def write_format(tmp_path: Path, file_format: str, rows: list[dict[str, Any]]) -> Path:
    """Write ``rows`` of seed, config and optional task fields, with the config as JSON text where needed."""
    path = tmp_path / f"tasks.{file_format}"
    if file_format == "jsonl":
        return write_lines(path, [json.dumps(row) for row in rows])

    columns = ["seed", "task_id", "config"]
    records = [{**row, "config": json.dumps(row.get("config", {}))} for row in rows]
    if file_format == "parquet":
        return write_parquet(path, {name: [record.get(name) for record in records] for name in columns})

    lines = [",".join(columns)]
    for record in records:
        config = record["config"].replace('"', '""')
        lines.append(f'{record["seed"]},{record.get("task_id") or ""},"{config}"')
    return write_lines(path, lines)


FORMATS = ["csv", "jsonl", "parquet"]
# The position of the second row of a file written by write_format.
SECOND_ROW = {"csv": 3, "jsonl": 2, "parquet": 1}


@pytest.mark.parametrize("file_format", FORMATS)
def test_workload_validate_config_names_key(tmp_path: Path, file_format: str) -> None:
    path = write_format(tmp_path, file_format, [{"seed": 0, "config": {"sleep_s": 0.5}}, {"seed": 1, "config": {"sleep_s": -1}}])

    result = read_task_file(path, workload=SLEEP_WORKLOAD)

    assert [task.seed for task in result.tasks] == [0]
    assert len(result.rejected) == 1
    rejected = result.rejected[0]
    assert rejected.line == SECOND_ROW[file_format]
    assert rejected.field == "config"
    assert "sleep_s=-1" in rejected.reason


@pytest.mark.parametrize("file_format", FORMATS)
def test_base_config_merged_under_row(tmp_path: Path, file_format: str) -> None:
    path = write_format(tmp_path, file_format, [{"seed": 0, "config": {"paths": 5}}, {"seed": 1}])
    base = {"paths": 1000, "kind": "european", "nested": {"a": 1}}

    result = read_task_file(path, base_config=base)

    assert result.rejected == []
    assert [dict(task.config) for task in result.tasks] == [
        {"paths": 5, "kind": "european", "nested": {"a": 1}},
        {"paths": 1000, "kind": "european", "nested": {"a": 1}},
    ]
    assert result.tasks[0].task_id == Task.create(0, {"paths": 5, "kind": "european", "nested": {"a": 1}}).task_id
    assert base == {"paths": 1000, "kind": "european", "nested": {"a": 1}}


@pytest.mark.parametrize("file_format", FORMATS)
def test_defaults_apply_to_empty_fields(tmp_path: Path, file_format: str) -> None:
    path = write_format(tmp_path, file_format, [{"seed": 0, "config": {"paths": 5}}])

    result = read_task_file(path, lane="solo", max_attempts=9)

    assert result.tasks == [Task.create(0, {"paths": 5}, lane="solo", max_attempts=9)]


@pytest.mark.parametrize("file_format", FORMATS)
def test_duplicates_in_file_keep_first(tmp_path: Path, file_format: str) -> None:
    rows = [
        {"seed": 0, "config": {"paths": 5}},
        {"seed": 1, "config": {}, "task_id": "fixed"},
        {"seed": 0, "config": {"paths": 5}},
        {"seed": 1, "config": {}, "task_id": "fixed"},
        {"seed": 2, "config": {}, "task_id": "fixed"},
    ]
    path = write_format(tmp_path, file_format, rows)

    result = read_task_file(path)

    assert result.tasks == [Task.create(0, {"paths": 5}), Task.create(1, {}, "fixed")]
    assert result.duplicates_in_file == 2
    assert len(result.rejected) == 1
    assert result.rejected[0].field == "task_id"
    assert "duplicate task id 'fixed'" in result.rejected[0].reason
    assert f"{result.rejected[0].unit} {SECOND_ROW[file_format]} has this id" in result.rejected[0].reason


@pytest.mark.parametrize("file_format", FORMATS)
def test_round_trip_keeps_tasks(tmp_path: Path, file_format: str) -> None:
    tasks = sample_tasks()
    path = tmp_path / f"export.{file_format}"

    written = write_task_file(tasks, path)
    result = read_task_file(path)

    assert written == len(tasks)
    assert result.rejected == []
    assert result.duplicates_in_file == 0
    assert result.tasks == tasks
    assert [task.task_id for task in result.tasks] == [task.task_id for task in tasks]
    assert isinstance(result.tasks[3].config["whole"], float)
    assert result.tasks[3].config["big"] == 10**30


@pytest.mark.parametrize("file_format", FORMATS)
def test_round_trip_empty_task_list(tmp_path: Path, file_format: str) -> None:
    path = tmp_path / f"export.{file_format}"

    written = write_task_file([], path)
    result = read_task_file(path)

    assert written == 0
    assert result.tasks == []
    assert result.rejected == []


def test_round_trip_many_parquet_rows(tmp_path: Path) -> None:
    tasks = [Task.create(seed, {"paths": seed % 13}) for seed in range(70_000)]
    path = tmp_path / "export.parquet"

    write_task_file(iter(tasks), path)
    result = read_task_file(path)

    assert result.tasks == tasks


def test_write_task_file_explicit_format(tmp_path: Path) -> None:
    tasks = sample_tasks()
    path = tmp_path / "export.txt"

    write_task_file(tasks, path, format="csv")
    result = read_task_file(path, format="CSV")

    assert result.format == "csv"
    assert result.tasks == tasks
    assert path.read_text(encoding="utf-8").splitlines()[0] == "seed,task_id,lane,max_attempts,config"


@pytest.mark.parametrize("file_format", FORMATS)
def test_empty_file_returns_no_tasks(tmp_path: Path, file_format: str) -> None:
    path = tmp_path / f"tasks.{file_format}"
    path.write_bytes(b"")

    result = read_task_file(path)

    assert result.tasks == []
    assert result.rejected == []
    assert result.duplicates_in_file == 0
    assert result.format == file_format


def test_missing_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "missing.csv"

    with pytest.raises(ConfigError, match=r"task file '.*missing\.csv' not found: check the path"):
        read_task_file(path)


def test_directory_raises(tmp_path: Path) -> None:
    path = tmp_path / "folder.csv"
    path.mkdir()

    with pytest.raises(ConfigError, match="is a directory"):
        read_task_file(path)


def test_unknown_suffix_raises(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "tasks.txt", ["seed", "1"])

    with pytest.raises(ConfigError) as raised:
        read_task_file(path)

    message = str(raised.value)
    assert str(path) in message
    assert ".csv, .jsonl, .ndjson, .parquet" in message


def test_invalid_format_name_raises(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "tasks.csv", ["seed", "1"])

    with pytest.raises(ConfigError, match="invalid task file format 'xlsx'"):
        read_task_file(path, format="xlsx")


@pytest.mark.parametrize(
    "options",
    [{"lane": "fast"}, {"max_attempts": 0}, {"base_config": {"x": float("nan")}}, {"base_config": [1]}],
)
def test_invalid_defaults_raise(tmp_path: Path, options: dict[str, Any]) -> None:
    path = write_lines(tmp_path / "tasks.csv", ["seed", "1"])

    with pytest.raises(ConfigError):
        read_task_file(path, **options)


def test_write_rejected_jsonl(tmp_path: Path) -> None:
    source = write_lines(tmp_path / "tasks.csv", ["seed,paths", "1,10", "x,20", "-4,30"])
    result = read_task_file(source)
    output = tmp_path / "rejected.jsonl"

    written = write_rejected(result.rejected, output)
    records = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]

    assert written == 2
    assert records[0] == {
        "file": str(source),
        "line": 3,
        "location": "line 3",
        "field": "seed",
        "value": "x",
        "reason": "invalid seed 'x': expected an integer",
        "row": {"seed": "x", "paths": "20"},
    }
    assert records[1]["line"] == 4
    assert records[1]["value"] == -4
    assert records[1]["row"] == {"seed": "-4", "paths": "30"}


def test_write_rejected_non_json_values(tmp_path: Path) -> None:
    source = write_parquet(
        tmp_path / "tasks.parquet",
        {"seed": [1, 2], "sigma": [float("nan"), 0.5], "when": pa.array([0, 0], pa.timestamp("s")), "blob": [b"a", b"b"]},
    )
    result = read_task_file(source)
    output = tmp_path / "rejected.jsonl"

    write_rejected(result.rejected, output)
    records = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]

    assert result.tasks == []
    assert [record["location"] for record in records] == ["row 0", "row 1"]
    assert records[0]["field"] == "config"
    assert records[0]["row"]["sigma"] == "nan"
    assert records[0]["row"]["when"] == "1970-01-01 00:00:00"
    assert records[1]["value"]["sigma"] == 0.5
