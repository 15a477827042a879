"""Task files: read tasks from CSV, JSONL or parquet rows and write them back.

Each row is one task. Columns (CSV, parquet) or keys (JSONL):

``seed``
    Required. An integer from 0 to 2**63-1. In CSV, surrounding spaces and a
    leading ``+`` are allowed.
``config``
    Optional. A JSON object: JSON text in CSV, an object or JSON text in JSONL,
    and a string of JSON text, a struct or a map in parquet. An empty cell or a
    null is ``{}``. Without this column, every other column becomes a config key.
    Beside a ``config`` column, any other config column makes a CSV or parquet
    file invalid and a JSONL row rejected. The exception is ``attempt``, which
    ``Task.to_dict`` writes: it is ignored there, so pushed tasks start at attempt 0.
``task_id``, ``lane``, ``max_attempts``
    Optional. An empty CSV cell or a null means the default: a task id derived
    from the seed and config, and the ``lane`` and ``max_attempts`` arguments.

Values of config columns in CSV go through :func:`parse_csv_value`. A cell that
is a JSON integer becomes an int, a JSON number with a fraction or exponent a
float, and ``true``, ``false`` or ``null`` a bool or None. Every other cell,
including ``007``, ``.5``, ``nan`` and ``True``, stays a string.

Rejected rows are located by ``line`` for CSV and JSONL: the 1-based physical
line where the record starts, so the CSV header is line 1 and the first data
row line 2 (unless blank lines come first). For parquet, ``line`` is the
0-based index of the row in the file, counted across row groups.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import re
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ConfigError, QworkerError, TaskValidationError
from .results import atomic_file
from .task import (
    DEFAULT_LANE,
    DEFAULT_MAX_ATTEMPTS,
    Task,
    canonical_json,
    validate_lane,
    validate_seed,
    validate_task_id,
)
from .workloads.base import Workload

CSV = "csv"
JSONL = "jsonl"
PARQUET = "parquet"
FORMATS = (CSV, JSONL, PARQUET)

_SUFFIX_FORMATS = {".csv": CSV, ".jsonl": JSONL, ".ndjson": JSONL, ".parquet": PARQUET}
_FORMAT_ALIASES = {CSV: CSV, JSONL: JSONL, "ndjson": JSONL, PARQUET: PARQUET}
_ACCEPTED_SUFFIXES = ", ".join(_SUFFIX_FORMATS)

# Columns that set task fields. In column mode every other column is a config key.
_TASK_COLUMNS = ("seed", "task_id", "lane", "max_attempts")
# Columns that may sit beside a ``config`` column. ``attempt`` is read and ignored.
_CONFIG_MODE_COLUMNS = frozenset((*_TASK_COLUMNS, "config", "attempt"))

# The column order that write_task_file uses for CSV and parquet.
_WRITE_COLUMNS = ("seed", "task_id", "lane", "max_attempts", "config")

_PARQUET_BATCH_ROWS = 10_000
_PARQUET_WRITE_ROWS = 65_536
_PARQUET_SCHEMA = pa.schema(
    [
        ("seed", pa.int64()),
        ("task_id", pa.string()),
        ("lane", pa.string()),
        ("max_attempts", pa.int64()),
        ("config", pa.string()),
    ]
)

_INTEGER_TEXT = re.compile(r"[+-]?[0-9]+")
_JSON_INTEGER = re.compile(r"-?(?:0|[1-9][0-9]*)")
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_JSON_LITERALS: dict[str, Any] = {"true": True, "false": False, "null": None}


@dataclass(frozen=True)
class RejectedRow:
    """A row of a task file that did not become a task, and why.

    ``line`` is a 1-based line number when ``unit`` is ``"line"`` (CSV, JSONL)
    and a 0-based row index when ``unit`` is ``"row"`` (parquet). ``field`` is
    the column or key that failed, or None when the whole record is malformed.
    ``row`` is the record as read from the file.
    """

    file: str
    line: int
    field: str | None
    value: Any
    reason: str
    row: Any = None
    unit: str = "line"

    @property
    def location(self) -> str:
        return f"{self.unit} {self.line}"

    def __str__(self) -> str:
        if self.field is None:
            return f"{self.file} {self.location}: {self.reason}"
        return f"{self.file} {self.location}: field {self.field!r}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        """Convert to the record that :func:`write_rejected` writes, with every value made JSON-safe."""
        return {
            "file": self.file,
            "line": self.line,
            "location": self.location,
            "field": self.field,
            "value": _json_safe(self.value),
            "reason": self.reason,
            "row": _json_safe(self.row),
        }


@dataclass
class TaskFileResult:
    """The valid tasks of a task file, in file order, and the rows that were rejected.

    ``duplicates_in_file`` counts rows identical to an earlier row's task,
    which are dropped. A row that reuses an earlier task id for a different
    task is rejected instead.
    """

    tasks: list[Task]
    rejected: list[RejectedRow]
    duplicates_in_file: int
    format: str


@dataclass
class _RowFields:
    """The task fields of one record, converted from the file's types but not yet validated."""

    seed: Any
    config: dict[str, Any]
    task_id: Any = None
    lane: Any = None
    max_attempts: Any = None


class _RowError(Exception):
    """Raised while converting a record to a task, for the first field that fails."""

    def __init__(self, field_name: str | None, value: Any, reason: str) -> None:
        super().__init__(reason)
        self.field_name = field_name
        self.value = value
        self.reason = reason


@dataclass(frozen=True)
class _TaskOptions:
    base_config: Mapping[str, Any]
    workload: Workload | None
    max_attempts: int
    lane: str


@dataclass
class _Record:
    """One record read from a file: where it starts, its original form, and its task fields or the error."""

    position: int
    original: Any
    fields: _RowFields | None = None
    error: _RowError | None = None


# ---------------------------------------------------------------------------
# Reading


def read_task_file(
    path: Path | str,
    *,
    base_config: Mapping[str, Any] | None = None,
    workload: Workload | None = None,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    lane: str = DEFAULT_LANE,
    format: str | None = None,
) -> TaskFileResult:
    """Read and validate one task per row of a CSV, JSONL or parquet file.

    The format comes from ``format`` (csv, jsonl, ndjson or parquet) or else
    from the file's suffix. ``base_config`` is merged under each row's config
    by top-level key, so a row's key replaces the base value whole.
    ``max_attempts`` and ``lane`` apply to rows that leave those fields empty.
    When ``workload`` is given, its ``validate_config`` checks each merged config.

    Every row is validated before this returns. A bad row becomes a
    :class:`RejectedRow` and the other rows still become tasks. Raises
    ConfigError for a problem with the whole file: not found, not readable,
    not UTF-8, malformed CSV quoting, corrupt parquet, or no ``seed`` column.
    """
    path = Path(path)
    label = str(path)
    file_format = _resolve_format(path, label, format)
    options = _task_options(base_config, workload, max_attempts, lane)

    size = _checked_size(path, label)
    if size == 0:
        return TaskFileResult(tasks=[], rejected=[], duplicates_in_file=0, format=file_format)

    if file_format == CSV:
        records = _read_csv(path, label)
    elif file_format == JSONL:
        records = _read_jsonl(path, label)
    else:
        records = _read_parquet(path, label)

    unit = "row" if file_format == PARQUET else "line"
    return _collect_tasks(records, options, label, unit, file_format)


def parse_csv_value(text: str) -> Any:
    """Convert a CSV cell of a config column to an int, float, bool, None or the original string.

    Surrounding spaces are ignored for the test but kept in a returned string.
    A number that overflows a float, such as ``1e999``, stays a string.
    """
    stripped = text.strip()
    if _JSON_INTEGER.fullmatch(stripped):
        return int(stripped)
    if _JSON_NUMBER.fullmatch(stripped):
        number = float(stripped)
        return number if math.isfinite(number) else text
    if stripped in _JSON_LITERALS:
        return _JSON_LITERALS[stripped]
    return text


def _resolve_format(path: Path, label: str, format: str | None) -> str:
    if format is not None:
        resolved = _FORMAT_ALIASES.get(format.lower())
        if resolved is None:
            raise ConfigError(f"invalid task file format {format!r} for {label!r}: use csv, jsonl, ndjson or parquet")
        return resolved

    resolved = _SUFFIX_FORMATS.get(path.suffix.lower())
    if resolved is None:
        raise ConfigError(
            f"unknown format of task file {label!r}: its name must end in {_ACCEPTED_SUFFIXES}, "
            "or name the format (csv, jsonl or parquet)"
        )
    return resolved


def _task_options(
    base_config: Mapping[str, Any] | None, workload: Workload | None, max_attempts: int, lane: str
) -> _TaskOptions:
    """Validate the arguments that apply to every row, so a bad one is reported once and not once per row."""
    base = {} if base_config is None else base_config
    if not isinstance(base, Mapping):
        raise ConfigError(f"invalid base config {base!r}: expected a dict")
    try:
        canonical_json(base)
        validate_lane(lane)
    except TaskValidationError as exc:
        raise ConfigError(f"invalid default for task files: {exc}") from None
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise ConfigError(f"invalid default max_attempts {max_attempts!r}: use an integer of 1 or more")
    return _TaskOptions(base_config=dict(base), workload=workload, max_attempts=max_attempts, lane=lane)


def _checked_size(path: Path, label: str) -> int:
    try:
        file_stat = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"task file {label!r} not found: check the path") from None
    except OSError as exc:
        raise ConfigError(f"cannot read task file {label!r}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(file_stat.st_mode):
        raise ConfigError(f"task file {label!r} is a directory: pass a file ending in {_ACCEPTED_SUFFIXES}")
    return file_stat.st_size


def _open_binary(path: Path, label: str) -> IO[bytes]:
    try:
        return open(path, "rb")
    except OSError as exc:
        raise ConfigError(f"cannot read task file {label!r}: {exc.strerror or exc}") from None


def _decoded_lines(handle: IO[bytes], label: str) -> Iterator[str]:
    """Yield each line of the file as text, raising ConfigError with the line number at the first invalid UTF-8.

    A UTF-8 byte order mark at the start of the file is dropped.
    """
    for number, raw in enumerate(handle, start=1):
        try:
            yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"task file {label!r} is not valid UTF-8: byte {raw[exc.start]:#04x} on line {number}: "
                "save the file as UTF-8"
            ) from None


def _read_csv(path: Path, label: str) -> Iterator[_Record]:
    with _open_binary(path, label) as handle:
        reader = csv.reader(_decoded_lines(handle, label), strict=True)
        layout: _CsvLayout | None = None
        last_line = 0
        while True:
            start_line = last_line + 1
            try:
                cells = next(reader, None)
            except csv.Error as exc:
                raise ConfigError(
                    f"task file {label!r} is not valid CSV at line {reader.line_num}: {exc}: "
                    "check the quotes on that line"
                ) from None
            last_line = reader.line_num
            if cells is None:
                return
            if not cells:
                continue  # blank line

            if layout is None:
                layout = _CsvLayout.from_header(cells, label)
                continue

            yield layout.record(start_line, cells)


@dataclass(frozen=True)
class _CsvLayout:
    """The columns of a CSV task file and how each maps onto a task."""

    header: tuple[str, ...]
    config_columns: tuple[str, ...]
    has_config_column: bool

    @classmethod
    def from_header(cls, header: list[str], label: str) -> _CsvLayout:
        _check_columns(header, label)
        has_config_column = "config" in header
        config_columns = tuple(name for name in header if name not in _TASK_COLUMNS)
        return cls(header=tuple(header), config_columns=config_columns, has_config_column=has_config_column)

    def record(self, line: int, cells: list[str]) -> _Record:
        if len(cells) != len(self.header):
            error = _RowError(
                None,
                None,
                f"found {len(cells)} fields but the header has {len(self.header)}: "
                "quote any field that contains a comma",
            )
            return _Record(position=line, original=cells, error=error)

        row = dict(zip(self.header, cells))
        try:
            fields = self._fields(row)
        except _RowError as error:
            return _Record(position=line, original=row, error=error)
        return _Record(position=line, original=row, fields=fields)

    def _fields(self, row: dict[str, str]) -> _RowFields:
        seed_text = row["seed"]
        if not seed_text.strip():
            raise _RowError("seed", seed_text, "missing seed: every row needs an integer seed of 0 or more")

        if self.has_config_column:
            config = _config_from_text(row["config"]) if row["config"].strip() else {}
        else:
            config = {name: parse_csv_value(row[name]) for name in self.config_columns}

        return _RowFields(
            seed=_int_from_text(seed_text),
            config=config,
            task_id=row.get("task_id") or None,
            lane=row.get("lane") or None,
            max_attempts=_int_from_text(row["max_attempts"]) if row.get("max_attempts") else None,
        )


def _check_columns(names: list[str], label: str) -> None:
    """Raise ConfigError unless the column names can map onto tasks."""
    found = ", ".join(repr(name) for name in names)
    if "seed" not in names:
        raise ConfigError(f"task file {label!r} has no 'seed' column: add one (the columns found are {found})")

    seen: set[str] = set()
    for name in names:
        if not name:
            raise ConfigError(f"task file {label!r} has a column without a name: name it or remove it (the columns found are {found})")
        if name in seen:
            raise ConfigError(f"task file {label!r} has the column {name!r} twice: rename or remove one")
        seen.add(name)

    if "config" in names:
        extra = [name for name in names if name not in _CONFIG_MODE_COLUMNS]
        if extra:
            raise ConfigError(
                f"task file {label!r} has a 'config' column and the config columns {', '.join(map(repr, extra))}: "
                "move those keys into the config JSON, or drop the 'config' column"
            )


def _int_from_text(text: str) -> Any:
    """Return the integer written in ``text``, or ``text`` itself so that validation rejects it and reports it as written."""
    stripped = text.strip()
    return int(stripped) if _INTEGER_TEXT.fullmatch(stripped) else text


def _config_from_text(text: str) -> dict[str, Any]:
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise _RowError("config", text, f"invalid JSON in config: {exc}: expected a JSON object such as {{\"paths\": 1000}}") from None
    if not isinstance(config, dict):
        raise _RowError("config", config, f"invalid config: expected a JSON object, got {type(config).__name__}")
    return config


def _read_jsonl(path: Path, label: str) -> Iterator[_Record]:
    with _open_binary(path, label) as handle:
        for number, line in enumerate(_decoded_lines(handle, label), start=1):
            text = line.strip()
            if not text:
                continue

            try:
                record = json.loads(text)
            except ValueError as exc:
                error = _RowError(None, None, f"invalid JSON: {exc}: write one JSON object per line")
                yield _Record(position=number, original=text, error=error)
                continue

            try:
                fields = _fields_from_mapping(record, config_is_map=False)
            except _RowError as error:
                yield _Record(position=number, original=record, error=error)
                continue
            yield _Record(position=number, original=record, fields=fields)


def _read_parquet(path: Path, label: str) -> Iterator[_Record]:
    try:
        parquet_file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise ConfigError(f"cannot read parquet task file {label!r}: {exc}: check that it is a complete parquet file") from None

    with parquet_file:
        schema = parquet_file.schema_arrow
        _check_columns(list(schema.names), label)
        config_is_map = "config" in schema.names and pa.types.is_map(schema.field("config").type)

        index = 0
        batches = parquet_file.iter_batches(batch_size=_PARQUET_BATCH_ROWS)
        while True:
            try:
                batch = next(batches, None)
            except (pa.ArrowException, OSError) as exc:
                raise ConfigError(
                    f"cannot read parquet task file {label!r} after row {index}: {exc}: "
                    "check that it is a complete parquet file"
                ) from None
            if batch is None:
                return

            for record in batch.to_pylist():
                try:
                    fields = _fields_from_mapping(record, config_is_map=config_is_map)
                except _RowError as error:
                    yield _Record(position=index, original=record, error=error)
                else:
                    yield _Record(position=index, original=record, fields=fields)
                index += 1


def _fields_from_mapping(record: Any, *, config_is_map: bool) -> _RowFields:
    """Convert a JSONL object or a parquet row, whose values already have JSON or Arrow types."""
    if not isinstance(record, dict):
        raise _RowError(
            None, record, f"invalid record: expected a JSON object such as {{\"seed\": 0}}, got {type(record).__name__}"
        )
    if record.get("seed") is None:
        raise _RowError("seed", None, "missing seed: every row needs an integer seed of 0 or more")

    if "config" in record:
        for name, value in record.items():
            if name not in _CONFIG_MODE_COLUMNS:
                raise _RowError(
                    name, value, "unexpected key beside 'config': move it into config, or drop 'config' and give every config key at the top level"
                )
        config = _config_from_value(record["config"], is_map=config_is_map)
    else:
        config = {name: value for name, value in record.items() if name not in _TASK_COLUMNS}

    return _RowFields(
        seed=record["seed"],
        config=config,
        task_id=record.get("task_id"),
        lane=record.get("lane"),
        max_attempts=record.get("max_attempts"),
    )


def _config_from_value(value: Any, *, is_map: bool) -> dict[str, Any]:
    if value is None:
        return {}
    if is_map:
        # pyarrow returns a map value as a list of (key, value) tuples.
        return dict(value)
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        return _config_from_text(value)
    raise _RowError("config", value, f"invalid config: expected a JSON object, got {type(value).__name__}")


def _collect_tasks(
    records: Iterable[_Record], options: _TaskOptions, label: str, unit: str, file_format: str
) -> TaskFileResult:
    tasks: list[Task] = []
    rejected: list[RejectedRow] = []
    duplicates = 0
    first_seen: dict[str, tuple[int, Task]] = {}

    for record in records:
        try:
            if record.error is not None:
                raise record.error
            assert record.fields is not None
            task = _build_task(record.fields, options)

            earlier = first_seen.get(task.task_id)
            if earlier is not None:
                earlier_position, earlier_task = earlier
                if earlier_task == task:
                    duplicates += 1
                    continue
                raise _RowError(
                    "task_id",
                    task.task_id,
                    f"duplicate task id {task.task_id!r}: {unit} {earlier_position} has this id for a different "
                    "seed, config, lane or max_attempts: give each task its own id",
                )
        except _RowError as error:
            rejected.append(
                RejectedRow(
                    file=label,
                    line=record.position,
                    field=error.field_name,
                    value=error.value,
                    reason=error.reason,
                    row=record.original,
                    unit=unit,
                )
            )
            continue

        first_seen[task.task_id] = (record.position, task)
        tasks.append(task)

    return TaskFileResult(tasks=tasks, rejected=rejected, duplicates_in_file=duplicates, format=file_format)


def _build_task(fields: _RowFields, options: _TaskOptions) -> Task:
    """Validate one row's fields in order and return its task, raising _RowError for the first that fails."""
    try:
        validate_seed(fields.seed)
    except TaskValidationError as exc:
        raise _RowError("seed", fields.seed, str(exc)) from None

    if fields.task_id is not None:
        try:
            validate_task_id(fields.task_id)
        except TaskValidationError as exc:
            raise _RowError("task_id", fields.task_id, str(exc)) from None

    lane = options.lane if fields.lane is None else fields.lane
    try:
        validate_lane(lane)
    except TaskValidationError as exc:
        raise _RowError("lane", lane, str(exc)) from None

    max_attempts = options.max_attempts if fields.max_attempts is None else fields.max_attempts
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise _RowError("max_attempts", max_attempts, f"invalid max_attempts {max_attempts!r}: use an integer of 1 or more")

    config = {**options.base_config, **fields.config}
    # Every other field is valid at this point, so an error from Task.create is about the config.
    try:
        task = Task.create(fields.seed, config, fields.task_id, lane=lane, max_attempts=max_attempts)
    except TaskValidationError as exc:
        raise _RowError("config", fields.config, str(exc)) from None

    validate_config = options.workload.validate_config if options.workload is not None else None
    if validate_config is not None:
        try:
            validate_config(task.config)
        except QworkerError as exc:
            raise _RowError("config", config, str(exc)) from None
    return task


# ---------------------------------------------------------------------------
# Writing


def write_rejected(rejected: Iterable[RejectedRow], path: Path | str) -> int:
    """Write rejected rows as JSONL, one object per row, and return how many were written.

    Each object has the keys ``file``, ``line``, ``location`` (such as
    ``"line 7"`` or ``"row 3"``), ``field``, ``value``, ``reason`` and ``row``,
    the original record. Values that JSON cannot carry, such as NaN or a
    timestamp from parquet, are written as strings. The file is replaced
    atomically.
    """
    count = 0
    with _atomic_text_file(Path(path)) as handle:
        for row in rejected:
            handle.write(json.dumps(row.to_dict(), ensure_ascii=False, allow_nan=False))
            handle.write("\n")
            count += 1
    return count


def write_task_file(tasks: Iterable[Task], path: Path | str, *, format: str | None = None) -> int:
    """Write tasks to a CSV, JSONL or parquet file that :func:`read_task_file` reads back as equal tasks.

    The format comes from ``format`` or the suffix, as for reading. Each row
    contains ``seed``, ``task_id``, ``lane``, ``max_attempts`` and ``config``.
    The config is a JSON object in JSONL and JSON text in CSV and parquet.
    ``attempt`` is not written, so a task read back starts at attempt 0.
    The file is replaced atomically. Returns the number of tasks written.
    """
    path = Path(path)
    file_format = _resolve_format(path, str(path), format)
    if file_format == PARQUET:
        return _write_parquet(tasks, path)

    count = 0
    with _atomic_text_file(path) as handle:
        if file_format == CSV:
            writer = csv.writer(handle)
            writer.writerow(_WRITE_COLUMNS)
            for task in tasks:
                writer.writerow([task.seed, task.task_id, task.lane, task.max_attempts, _config_text(task)])
                count += 1
        else:
            for task in tasks:
                record = {
                    "seed": task.seed,
                    "task_id": task.task_id,
                    "lane": task.lane,
                    "max_attempts": task.max_attempts,
                    "config": dict(task.config),
                }
                handle.write(json.dumps(record, ensure_ascii=False, allow_nan=False))
                handle.write("\n")
                count += 1
    return count


def _write_parquet(tasks: Iterable[Task], path: Path) -> int:
    count = 0
    with atomic_file(path, "wb", fsync=True) as handle:
        with pq.ParquetWriter(handle, _PARQUET_SCHEMA) as writer:
            chunk: list[Task] = []
            for task in tasks:
                chunk.append(task)
                if len(chunk) == _PARQUET_WRITE_ROWS:
                    writer.write_table(_tasks_table(chunk))
                    count += len(chunk)
                    chunk = []
            if chunk or count == 0:
                writer.write_table(_tasks_table(chunk))
                count += len(chunk)
    return count


def _tasks_table(tasks: list[Task]) -> pa.Table:
    columns = {
        "seed": [task.seed for task in tasks],
        "task_id": [task.task_id for task in tasks],
        "lane": [task.lane for task in tasks],
        "max_attempts": [task.max_attempts for task in tasks],
        "config": [_config_text(task) for task in tasks],
    }
    return pa.table(columns, schema=_PARQUET_SCHEMA)


def _config_text(task: Task) -> str:
    return json.dumps(dict(task.config), ensure_ascii=False, allow_nan=False, separators=(",", ":"))


@contextlib.contextmanager
def _atomic_text_file(path: Path) -> Iterator[io.TextIOWrapper]:
    """Yield a UTF-8 text file that is written beside ``path`` and renamed into place if the block succeeds."""
    with atomic_file(path, "wb", fsync=True) as binary:
        # newline="" keeps the csv module's \r\n row endings unchanged on every platform.
        text = io.TextIOWrapper(binary, encoding="utf-8", newline="")
        try:
            yield text
        finally:
            # detach() flushes and leaves the binary file open for atomic_file to fsync and close.
            text.detach()


def _json_safe(value: Any) -> Any:
    """Return ``value`` with anything that strict JSON cannot carry replaced by its string form."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return str(value)


class RecordParser:
    """Turns single JSON records, one task each as in a JSONL task file, into tasks.

    For producers that receive records one at a time, such as a stream.
    ``base_config``, ``workload``, ``max_attempts`` and ``lane`` mean what
    they mean for :func:`read_task_file`.
    """

    def __init__(
        self,
        *,
        base_config: Mapping[str, Any] | None = None,
        workload: Workload | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        lane: str = DEFAULT_LANE,
    ) -> None:
        self._options = _task_options(base_config, workload, max_attempts, lane)

    def parse(self, text: str | bytes, *, file: str, line: int) -> Task | RejectedRow:
        """Return the task of one JSON line, or the RejectedRow that says why it is invalid."""
        original: Any = text.decode("utf-8", errors="replace").strip() if isinstance(text, bytes) else text.strip()
        try:
            try:
                record = json.loads(text)
            except ValueError as exc:
                raise _RowError(None, None, f"invalid JSON: {exc}: write one JSON object per line") from None
            original = record
            return _build_task(_fields_from_mapping(record, config_is_map=False), self._options)
        except _RowError as error:
            return RejectedRow(file=file, line=line, field=error.field_name, value=error.value,
                               reason=error.reason, row=original)
