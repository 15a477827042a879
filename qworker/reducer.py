"""Incremental reducer: fold a queue's finished result files into one aggregate.

Each run reads only the result files that no earlier run folded, drops the rows
of tasks that are already counted, groups the remaining rows and adds the
partial aggregate to the stored one. A run costs in proportion to the files
that are new to it: it lists the folder and looks every name up in the
state, but reads no folded file again. State lives in a SQLite database at
``<results_dir>/_reducer/state.db``:

* ``folded_files``: every folded file by relative name, with its size,
  mtime_ns and the rows and tasks it contributed;
* ``counted_tasks``: every counted task id and the file it was counted from;
* ``aggregate``: the current aggregate table, stored as parquet bytes;
* ``meta``: the aggregation that built the state.

Each batch of files is folded in one transaction, so a reducer killed at any
point and run again never counts a task twice and never loses a fold. The
transaction holds the database write lock from the re-check of what is folded
until the commit, so two reducers on one folder never fold the same file twice.
``aggregate.parquet`` is a copy written at the end of each run: after a crash
it lags the state database until the next run.

A task counts once: the first file that contains it, in sorted order of
relative names, supplies all of its rows, and rows of that task in any later
file are dropped. A file is folded once by name, so a per-task file that is
rewritten in place after being folded is not read again.

Files that cannot be read, or lack a column the aggregation needs, are moved
to ``<results_dir>/_quarantine/`` and listed in its ``report.jsonl``. Only the
columns the aggregation uses are read, so a file whose other columns are
damaged is folded, not quarantined.

How a batch is folded, for speed: a pool of threads, one per CPU, reads the
next batch while the current one is folded. Each thread reads a job of
``READ_JOB_FILES`` files and groups their rows by file, task and keys, which
leaves one row per key value of a per-task file. The fold then works on
those grouped rows: it finds counted tasks with vectorized Arrow operations
on integer codes of the task ids and records the batch's files and tasks
with one ``executemany`` each, with no Python loop over rows.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import ConfigError
from .results import (
    QUARANTINE_DIR,
    REDUCER_DIR,
    TASK_ID_COLUMN,
    iter_result_files,
    write_parquet_atomic,
)
from .workloads.base import Aggregation

logger = logging.getLogger("qworker.reducer")

STATE_FILE = "state.db"
AGGREGATE_FILE = "aggregate.parquet"
QUARANTINE_REPORT = "report.jsonl"
ROWS_COLUMN = "rows"
TASKS_COLUMN = "tasks"

DEFAULT_BATCH_FILES = 256
# Files per job of the read threads. Grouping a job's rows costs a fixed
# setup per call, which a job of a few dozen files spreads thin.
READ_JOB_FILES = 32
BUSY_TIMEOUT_MS = 60_000
# Values per "IN (...)" query. SQLite before 3.32.0 allows at most 999 host
# parameters by default (SQLITE_MAX_VARIABLE_NUMBER, sqlite.org/limits.html).
SQL_CHUNK = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS folded_files (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    tasks INTEGER NOT NULL,
    folded_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS counted_tasks (
    task_id TEXT PRIMARY KEY,
    file_id INTEGER NOT NULL REFERENCES folded_files (id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS aggregate (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    parquet BLOB NOT NULL,
    updated_at REAL NOT NULL
);
"""

# Position of a row's file in its batch, in the grouped rows of a read job.
_FILE_COLUMN = "__qworker_file"
# Names the reducer uses for its own columns, so no key or sum may take them.
_RESERVED_COLUMNS = (TASK_ID_COLUMN, ROWS_COLUMN, TASKS_COLUMN, _FILE_COLUMN)
# Type of the task id column after a file is read. pyarrow's parquet writer
# stores a per-task file's ids as a dictionary of one value by default, and
# reading that dictionary is cheaper than building one string per row.
_TASK_ID_TYPE = pa.dictionary(pa.int32(), pa.string())


@dataclass(frozen=True)
class QuarantinedFile:
    """A result file moved to the quarantine folder, with the error that caused the move.

    ``path`` is where the file was found and ``moved_to`` is where it is now.
    """

    path: Path
    error: str
    moved_to: Path


@dataclass(frozen=True)
class ReduceReport:
    """Counts from one :meth:`Reducer.run` and the aggregate after it.

    ``rows_folded`` and ``tasks_folded`` count only rows and tasks new to this
    run. ``duplicate_tasks`` is the number of distinct task ids whose rows were
    dropped because an earlier file had already counted them.
    """

    files_folded: int
    files_skipped: int
    rows_folded: int
    tasks_folded: int
    duplicate_tasks: int
    quarantined: tuple[QuarantinedFile, ...]
    total_tasks: int
    aggregate: pa.Table
    elapsed_s: float


@dataclass
class _ReadResult:
    """One result file as read from disk: its checked columns, or why it must be quarantined."""

    name: str
    path: str
    # Position of the file in its batch, in sorted order of names.
    position: int
    size: int = 0
    mtime_ns: int = 0
    # The task_id, key and sum columns. Keys stored as strings are dictionary-encoded.
    table: pa.Table | None = None
    # The table's schema with dictionary types decoded, as the stored aggregate has them.
    schema: pa.Schema | None = None
    error: str | None = None
    vanished: bool = False


@dataclass(frozen=True)
class _GroupedRows:
    """Rows of some files of a batch, grouped by file, task and keys, with a ``rows`` count per group.

    ``table`` has the columns ``_FILE_COLUMN`` (the file's position in the
    batch), ``task_id``, the keys with decoded types, the sums and ``rows``.
    It is None when the files have no rows.
    """

    positions: frozenset[int]
    table: pa.Table | None


@dataclass(frozen=True)
class _ReadJob:
    """The files of one job of the read threads, and their rows grouped by file, task and keys."""

    reads: list[_ReadResult]
    grouped: list[_GroupedRows]


@dataclass
class _RunTally:
    files_folded: int = 0
    files_skipped: int = 0
    rows_folded: int = 0
    tasks_folded: int = 0
    duplicate_task_ids: set[str] = field(default_factory=set)
    quarantined: list[QuarantinedFile] = field(default_factory=list)


@dataclass(frozen=True)
class _NewRows:
    """The grouped rows of a batch's new tasks, and what each file of the batch contributed.

    In ``table`` the ``task_id`` column contains integer codes, one per task
    id of the batch, which is all that counting distinct tasks needs.
    """

    table: pa.Table
    # Rows and new tasks by the file's position in the batch; a file with none is left out.
    rows_by_file: dict[int, int]
    tasks_by_file: dict[int, int]
    # New task ids, each with the position of the file that counts it.
    task_ids: list[str]
    task_files: list[int]
    duplicate_ids: set[str]


@dataclass(frozen=True)
class _SchemaCheck:
    """The checks of a file that depend only on its schema, done once per distinct schema.

    ``usable_as_read`` is true when the file has exactly the needed columns
    with the expected types, and ``schema`` is then the decoded schema. Else
    the file must be prepared column by column, or ``error`` is the reason it
    must be quarantined.
    """

    error: str | None = None
    usable_as_read: bool = False
    schema: pa.Schema | None = None


class _InvalidResultFile(Exception):
    """Raised inside the reducer for a result file that must be quarantined."""


class Reducer:
    """Folds the result files under ``results_dir`` into an aggregate, incrementally.

    With ``aggregation`` the aggregate has one row per distinct value of its
    ``keys``, the sum of each of its ``sums`` columns, and ``rows`` and
    ``tasks`` counts. Without it (or with empty keys and sums) the aggregate
    is one row: ``rows``, ``tasks`` and the sum of every integer or
    floating-point column except ``task_id``. In that mode a result column
    named ``rows``, ``tasks`` or ``__qworker_file`` is not summed, because the
    reducer uses those names for its own columns.

    A sum column is int64, or float64 once any folded file stores that column
    as floating point. A sum over only nulls is null. A key column stored as
    a string type has type string in the aggregate.
    """

    def __init__(
        self,
        results_dir: Path,
        aggregation: Aggregation | None = None,
        *,
        batch_files: int = DEFAULT_BATCH_FILES,
    ) -> None:
        self.results_dir = Path(results_dir)
        self.aggregation = _validate_aggregation(aggregation or Aggregation())
        if batch_files < 1:
            raise ConfigError(f"batch_files must be at least 1, got {batch_files}")
        self.batch_files = batch_files
        # Filled by the read threads. A check depends only on the schema and
        # the aggregation, so it stays valid across runs.
        self._schema_checks: dict[pa.Schema, _SchemaCheck] = {}
        self._last_schema_check: tuple[pa.Schema, _SchemaCheck] | None = None
        self._last_column_selection: tuple[pq.ParquetSchema, list[str] | None] | None = None

    @property
    def state_path(self) -> Path:
        return self.results_dir / REDUCER_DIR / STATE_FILE

    @property
    def aggregate_path(self) -> Path:
        return self.results_dir / REDUCER_DIR / AGGREGATE_FILE

    @property
    def quarantine_dir(self) -> Path:
        return self.results_dir / QUARANTINE_DIR

    def run(self) -> ReduceReport:
        """Fold every result file not folded before, then write ``aggregate.parquet``.

        Raises :class:`ConfigError` when the state was built with another
        aggregation, because the stored aggregate cannot be combined with it.
        Call :meth:`reset` first to fold everything again with the new one.
        """
        started = time.monotonic()
        tally = _RunTally()

        with closing(self._connect()) as conn:
            self._check_aggregation(conn)
            names = self._list_unfolded(conn, tally)

            with ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="qworker-reduce") as pool:
                for jobs in self._read_batches(pool, names):
                    self._fold_batch(conn, jobs, tally)

            aggregate = self._load_aggregate(conn)
            total_tasks = _count_total_tasks(conn)

        write_parquet_atomic(aggregate, self.aggregate_path)

        report = ReduceReport(
            files_folded=tally.files_folded,
            files_skipped=tally.files_skipped,
            rows_folded=tally.rows_folded,
            tasks_folded=tally.tasks_folded,
            duplicate_tasks=len(tally.duplicate_task_ids),
            quarantined=tuple(tally.quarantined),
            total_tasks=total_tasks,
            aggregate=aggregate,
            elapsed_s=time.monotonic() - started,
        )
        _log_report(self.results_dir, report)
        return report

    def aggregate(self) -> pa.Table:
        """Return the stored aggregate, or an empty table when nothing is folded yet."""
        with closing(self._connect()) as conn:
            return self._load_aggregate(conn)

    def reset(self) -> None:
        """Delete the reducer state and ``aggregate.parquet``, so the next run folds every file again.

        Quarantined files stay in the quarantine folder.
        """
        with closing(self._connect()) as conn:
            with _immediate_transaction(conn):
                for table in ("counted_tasks", "folded_files", "aggregate", "meta"):
                    conn.execute(f"DELETE FROM {table}")
            conn.execute("VACUUM")

        self.aggregate_path.unlink(missing_ok=True)

    # State database

    def _connect(self) -> sqlite3.Connection:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None leaves transactions to the explicit BEGIN
        # IMMEDIATE in _immediate_transaction.
        conn = sqlite3.connect(self.state_path, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.executescript(_SCHEMA)
        except BaseException:
            conn.close()
            raise
        return conn

    def _check_aggregation(self, conn: sqlite3.Connection) -> None:
        expected = _aggregation_json(self.aggregation)
        with _immediate_transaction(conn):
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('aggregation', ?)", (expected,))
            (stored,) = conn.execute("SELECT value FROM meta WHERE key = 'aggregation'").fetchone()

        if stored != expected:
            raise ConfigError(
                f"reducer state in {self.state_path} was built with aggregation {stored}, not {expected}. "
                "Pass the same aggregation, or call Reducer.reset() to fold every result file again."
            )

    def _list_unfolded(self, conn: sqlite3.Connection, tally: _RunTally) -> list[str]:
        names = sorted(self._relative_name(path) for path in iter_result_files(self.results_dir))
        folded = _select_existing(conn, "SELECT name FROM folded_files WHERE name IN ({})", names)
        tally.files_skipped += len(folded)
        return [name for name in names if name not in folded]

    def _relative_name(self, path: Path) -> str:
        # Cutting the folder's prefix off the string takes less than half the
        # time of Path.relative_to, which adds up in a folder of many files.
        prefix = os.path.join(self.results_dir, "")
        text = os.fspath(path)
        if text.startswith(prefix):
            return text[len(prefix) :].replace(os.sep, "/")
        return path.relative_to(self.results_dir).as_posix()

    def _load_aggregate(self, conn: sqlite3.Connection) -> pa.Table:
        row = conn.execute("SELECT parquet FROM aggregate WHERE id = 1").fetchone()
        if row is None:
            return _empty_aggregate(self.aggregation)
        # One thread, because the aggregate is small and the read threads keep the CPUs busy.
        return pq.ParquetFile(pa.BufferReader(row[0])).read(use_threads=False)

    # Reading result files, in the read threads

    def _read_batches(self, pool: ThreadPoolExecutor, names: Sequence[str]) -> Iterator[list[_ReadJob]]:
        """Yield the read jobs of each batch of names in order, while the pool reads the next batch."""
        pending: deque[list[Future[_ReadJob]]] = deque()
        try:
            for batch in _chunks(names, self.batch_files):
                jobs = [
                    pool.submit(self._read_job, batch[start : start + READ_JOB_FILES], start)
                    for start in range(0, len(batch), READ_JOB_FILES)
                ]
                pending.append(jobs)
                if len(pending) > 1:
                    yield [job.result() for job in pending.popleft()]

            while pending:
                yield [job.result() for job in pending.popleft()]
        finally:
            # A failed fold stops the run, so jobs that have not started are dropped.
            for jobs in pending:
                for job in jobs:
                    job.cancel()

    def _read_job(self, names: Sequence[str], first_position: int) -> _ReadJob:
        reads = [self._read_result_file(name, first_position + index) for index, name in enumerate(names)]
        valid = [read for read in reads if read.table is not None]
        return _ReadJob(reads=reads, grouped=self._group_job(valid))

    def _read_result_file(self, name: str, position: int) -> _ReadResult:
        """Read and check the columns the aggregation needs.

        Size and mtime come from the same open file as the rows.
        """
        path = os.path.join(self.results_dir, name)
        try:
            # Unbuffered, because the file is read whole.
            with open(path, "rb", buffering=0) as handle:
                stat = os.fstat(handle.fileno())
                data = handle.readall()
            parquet = _open_parquet(data, [TASK_ID_COLUMN, *self.aggregation.keys])
            table = parquet.read(columns=self._select_columns(parquet), use_threads=False)
        except FileNotFoundError:
            return _ReadResult(name=name, path=path, position=position, vanished=True)
        except (OSError, pa.ArrowException) as exc:
            return _ReadResult(name=name, path=path, position=position, error=f"unreadable parquet file: {exc}")

        read = _ReadResult(name=name, path=path, position=position, size=stat.st_size, mtime_ns=stat.st_mtime_ns)
        try:
            read.table, read.schema = self._check_table(table)
        except _InvalidResultFile as exc:
            read.error = str(exc)
        return read

    def _select_columns(self, parquet: pq.ParquetFile) -> list[str] | None:
        """Return the columns of ``parquet`` to read, reusing the selection for the last parquet schema when it can."""
        if not self._grouped:
            # Which columns are summed depends on their Arrow types, which a
            # file's Arrow metadata can change without changing its parquet schema.
            return self._columns_to_read(parquet.schema_arrow)

        # With an aggregation the selection depends only on the column names.
        # Comparing parquet schemas costs less than converting one to Arrow.
        schema = parquet.metadata.schema
        last = self._last_column_selection
        if last is not None and last[0].equals(schema):
            return last[1]

        columns = self._columns_to_read(parquet.schema_arrow)
        self._last_column_selection = (schema, columns)
        return columns

    def _columns_to_read(self, schema: pa.Schema) -> list[str] | None:
        """Return the names of the columns the aggregation uses, or None when every column is needed or names repeat."""
        names = schema.names
        if len(set(names)) != len(names):
            # _prepare_table rejects the file and names the repeated columns.
            return None

        if self._grouped:
            wanted = {TASK_ID_COLUMN, *self.aggregation.keys, *self.aggregation.sums}
            columns = [name for name in names if name in wanted]
        else:
            columns = [
                field.name
                for field in schema
                if field.name == TASK_ID_COLUMN or (field.name not in _RESERVED_COLUMNS and _is_summable(field.type))
            ]
        # None skips pyarrow's lookup of the names when every column is needed.
        return None if len(columns) == len(names) else columns

    def _check_table(self, table: pa.Table) -> tuple[pa.Table, pa.Schema]:
        """Return the file's ``task_id``, key and sum columns and their decoded schema.

        Raises :class:`_InvalidResultFile` for a file that must be quarantined.

        Most files of a queue share one schema, so the checks of the schema
        run once for it, and a file with the expected types costs a null count.
        """
        check = self._find_schema_check(table.schema)
        if check.error is not None:
            raise _InvalidResultFile(check.error)
        if not check.usable_as_read or check.schema is None:
            prepared = self._prepare_table(table)
            return prepared, _decoded_schema(prepared.schema)

        nulls = table.column(TASK_ID_COLUMN).null_count
        if nulls:
            raise _InvalidResultFile(f"column {TASK_ID_COLUMN!r} contains {nulls} nulls")
        # The table has the checked columns, maybe in another order, which
        # concatenating by name does not mind.
        return table, check.schema

    def _find_schema_check(self, schema: pa.Schema) -> _SchemaCheck:
        # Comparing with the last schema took 0.03 us here, and hashing a
        # schema for the dictionary 3 us.
        last = self._last_schema_check
        if last is not None and last[0].equals(schema):
            return last[1]

        check = self._schema_checks.get(schema)
        if check is None:
            check = self._check_schema(schema)
            self._schema_checks[schema] = check
        self._last_schema_check = (schema, check)
        return check

    def _check_schema(self, schema: pa.Schema) -> _SchemaCheck:
        try:
            prepared = self._prepare_table(schema.empty_table())
        except _InvalidResultFile as exc:
            return _SchemaCheck(error=str(exc))

        unchanged = len(schema) == len(prepared.schema) and all(
            schema.get_field_index(field.name) >= 0 and schema.field(field.name).type == field.type
            for field in prepared.schema
        )
        if not unchanged:
            return _SchemaCheck()
        return _SchemaCheck(usable_as_read=True, schema=_decoded_schema(schema))

    def _prepare_table(self, table: pa.Table) -> pa.Table:
        """Return the file's ``task_id``, key and sum columns, or raise :class:`_InvalidResultFile`."""
        duplicates = sorted({name for name in table.column_names if table.column_names.count(name) > 1})
        if duplicates:
            raise _InvalidResultFile(f"duplicate column names: {', '.join(duplicates)}")

        columns = {TASK_ID_COLUMN: _task_id_column(table)}
        if self._grouped:
            columns.update(_key_columns(table, self.aggregation.keys))
            columns.update(_declared_sum_columns(table, self.aggregation.sums))
        else:
            columns.update(_numeric_columns(table))
        return pa.table(columns)

    @property
    def _grouped(self) -> bool:
        return bool(self.aggregation.keys or self.aggregation.sums)

    def _group_job(self, reads: list[_ReadResult]) -> list[_GroupedRows]:
        """Group the rows of a job's valid files by file, task and keys.

        When the files' tables do not concatenate, because a column is an
        integer in one file and a string in another, say, each file is grouped
        alone. The fold quarantines the files that conflict, and grouped rows
        have decoded keys, so those of the files it accepts concatenate.
        """
        if not reads:
            return []

        try:
            return [self._group_files(reads)]
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
            logger.debug("grouping %d result files one by one because their column types differ: %s", len(reads), exc)
        return [self._group_files([read]) for read in reads]

    def _group_files(self, reads: list[_ReadResult]) -> _GroupedRows:
        positions = frozenset(read.position for read in reads)
        nonempty = [read for read in reads if _table_of(read).num_rows]
        if not nonempty:
            return _GroupedRows(positions=positions, table=None)

        tables = [_table_of(read) for read in nonempty]
        table = pa.concat_tables(tables, promote_options="permissive").unify_dictionaries()
        files = _file_positions([part.num_rows for part in tables], [read.position for read in nonempty])
        # Grouping one contiguous table took less than half the time here of
        # grouping one chunk per file.
        table = table.append_column(_FILE_COLUMN, files).combine_chunks()

        keys = [_FILE_COLUMN, TASK_ID_COLUMN, *self.aggregation.keys]
        sums = self._sum_columns(table, exclude=keys)
        specs = [(name, "sum") for name in sums] + [([], "count_all")]
        grouped = table.group_by(keys, use_threads=False).aggregate(specs)

        columns = {_FILE_COLUMN: grouped.column(_FILE_COLUMN), TASK_ID_COLUMN: grouped.column(TASK_ID_COLUMN)}
        columns.update({key: _decode(grouped.column(key)) for key in self.aggregation.keys})
        columns.update({name: grouped.column(f"{name}_sum") for name in sums})
        columns[ROWS_COLUMN] = grouped.column("count_all")
        return _GroupedRows(positions=positions, table=pa.table(columns))

    def _sum_columns(self, table: pa.Table, exclude: Sequence[str]) -> list[str]:
        if self._grouped:
            return list(self.aggregation.sums)
        # A column of type null in every file of a group contains nothing to
        # sum, so it is left out until a file gives it a type.
        return [
            name
            for name in table.column_names
            if name not in exclude and not pa.types.is_null(table.schema.field(name).type)
        ]

    # Folding one batch, in the thread that called run()

    def _fold_batch(self, conn: sqlite3.Connection, jobs: list[_ReadJob], tally: _RunTally) -> None:
        """Fold one batch of read files in one transaction.

        The transaction starts before the re-check of folded names and the
        read of the stored aggregate, so a concurrent reducer cannot fold the
        same files or overwrite this batch's aggregate in between.
        """
        reads = [read for job in jobs for read in job.reads]
        with _immediate_transaction(conn):
            folded = _select_existing(conn, "SELECT name FROM folded_files WHERE name IN ({})", [r.name for r in reads])
            stored = self._load_aggregate(conn)
            accepted = self._accept_files(reads, folded, stored.schema, tally)
            if not accepted:
                return

            new_rows = _split_new_tasks(conn, self._accepted_rows(jobs, accepted), len(reads))
            _record_folded_files(conn, accepted, new_rows)
            tally.files_folded += len(accepted)
            tally.rows_folded += sum(new_rows.rows_by_file.values())
            tally.tasks_folded += len(new_rows.task_ids)
            tally.duplicate_task_ids.update(new_rows.duplicate_ids)

            if new_rows.table.num_rows:
                combined = self._combine(stored, self._aggregate_groups(new_rows.table))
                _store_aggregate(conn, combined)

    def _accept_files(
        self,
        reads: list[_ReadResult],
        folded: set[str],
        schema: pa.Schema,
        tally: _RunTally,
    ) -> list[_ReadResult]:
        """Return the reads to fold, in batch order, after quarantining invalid files and skipping folded ones.

        ``schema`` is the stored aggregate's. A file whose column types
        conflict with it or with an earlier file of the batch is quarantined.
        """
        accepted = []
        # File schemas already unified into ``schema``. Unifying one again
        # changes nothing, and most files of a batch share one schema object
        # (the cached check's), which an identity test finds without hashing.
        unified: set[pa.Schema] = set()
        last_unified: pa.Schema | None = None
        for read in reads:
            if read.name in folded:
                tally.files_skipped += 1
                continue
            if read.vanished:
                logger.warning("skipped result file %s because it was removed before it could be read", read.path)
                continue

            try:
                file_schema = _schema_of(read)
                if file_schema is not last_unified and file_schema not in unified:
                    schema = _unify_schema(schema, file_schema)
                    unified.add(file_schema)
                last_unified = file_schema
            except _InvalidResultFile as exc:
                quarantined = self._quarantine(read, str(exc))
                if quarantined is not None:
                    tally.quarantined.append(quarantined)
                continue
            accepted.append(read)
        return accepted

    def _accepted_rows(self, jobs: list[_ReadJob], accepted: list[_ReadResult]) -> pa.Table | None:
        """Return the grouped rows of the accepted files, or None when they have no rows.

        Rows that the read threads grouped together with a file that was
        quarantined or folded by another reducer are grouped again without it.
        """
        by_position = {read.position: read for read in accepted}
        accepted_positions = set(by_position)
        parts = []
        for job in jobs:
            for grouped in job.grouped:
                if not grouped.positions <= accepted_positions:
                    kept = [by_position[position] for position in sorted(grouped.positions & accepted_positions)]
                    grouped = self._group_files(kept)
                if grouped.table is not None:
                    parts.append(grouped.table)

        if not parts:
            return None
        return pa.concat_tables(parts, promote_options="permissive")

    def _quarantine(self, read: _ReadResult, error: str) -> QuarantinedFile | None:
        """Move ``read.path`` into the quarantine folder and append a line to its report.

        Returns None when the file is gone before it can be moved, because
        another reducer quarantined it first or a writer removed it.
        """
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        path = Path(read.path)
        target = _free_path(self.quarantine_dir, path.name)
        try:
            os.replace(path, target)
        except FileNotFoundError:
            logger.warning("result file %s was removed before it could be quarantined (%s)", read.path, error)
            return None

        line = {
            "file": read.name,
            "error": error,
            "quarantined_at": time.time(),
            "moved_to": target.relative_to(self.results_dir).as_posix(),
        }
        with open(self.quarantine_dir / QUARANTINE_REPORT, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")

        logger.warning("quarantined result file %s as %s: %s", read.path, target, error)
        return QuarantinedFile(path=path, error=error, moved_to=target)

    # Aggregation

    def _aggregate_groups(self, groups: pa.Table) -> pa.Table:
        """Group a batch's grouped rows by the keys into a partial aggregate with ``rows`` and ``tasks`` counts.

        The ``task_id`` codes of ``groups`` are unique per task within the
        batch. A task is counted in one batch only, so the distinct count of
        one batch adds up exactly with the stored one.
        """
        keys = list(self.aggregation.keys)
        sums = self._sum_columns(groups, exclude=[_FILE_COLUMN, TASK_ID_COLUMN, ROWS_COLUMN, *keys])
        specs = [(name, "sum") for name in sums] + [(ROWS_COLUMN, "sum"), (TASK_ID_COLUMN, "count_distinct")]
        grouped = groups.group_by(keys, use_threads=False).aggregate(specs)

        columns = {key: grouped.column(key) for key in keys}
        columns.update({name: grouped.column(f"{name}_sum") for name in sums})
        columns[ROWS_COLUMN] = grouped.column(f"{ROWS_COLUMN}_sum")
        columns[TASKS_COLUMN] = grouped.column(f"{TASK_ID_COLUMN}_count_distinct")
        return pa.table(columns)

    def _combine(self, stored: pa.Table, partial: pa.Table) -> pa.Table:
        """Add a partial aggregate to the stored one, group by group.

        Adding ``tasks`` is exact because each task is counted in one fold only.
        """
        merged = pa.concat_tables([stored, partial], promote_options="permissive")
        keys = list(self.aggregation.keys)
        values = [name for name in merged.column_names if name not in keys]

        grouped = merged.group_by(keys, use_threads=False).aggregate([(name, "sum") for name in values])

        columns = {key: grouped.column(key) for key in keys}
        columns.update({name: grouped.column(f"{name}_sum") for name in values})
        combined = pa.table(columns)
        if keys:
            combined = combined.sort_by([(key, "ascending") for key in keys])
        return combined


# Reading and checking result files


def _open_parquet(data: bytes, dictionary_columns: list[str]) -> pq.ParquetFile:
    """Open a parquet file held in memory, reading the string ones of ``dictionary_columns`` as dictionaries.

    Parsing from memory avoids the calls back into Python that pyarrow makes
    for each read from a Python file object. pyarrow raises KeyError when a
    file lacks one of ``dictionary_columns``. Such a file is opened without
    dictionary reading, and its check reports the missing column.
    """
    try:
        return pq.ParquetFile(pa.BufferReader(data), read_dictionary=dictionary_columns, pre_buffer=False)
    except KeyError:
        return pq.ParquetFile(pa.BufferReader(data), pre_buffer=False)


def _table_of(read: _ReadResult) -> pa.Table:
    if read.table is None:
        raise ValueError(f"result file {read.path} has no checked table")
    return read.table


def _schema_of(read: _ReadResult) -> pa.Schema:
    """Return the decoded schema of a checked file, or raise :class:`_InvalidResultFile` with the reason it failed."""
    if read.error is not None:
        raise _InvalidResultFile(read.error)
    if read.schema is None:
        raise ValueError(f"result file {read.path} has neither a schema nor an error")
    return read.schema


def _task_id_column(table: pa.Table) -> pa.ChunkedArray:
    if TASK_ID_COLUMN not in table.column_names:
        raise _InvalidResultFile(f"missing column {TASK_ID_COLUMN!r}")

    column = table.column(TASK_ID_COLUMN)
    column_type = column.type
    if pa.types.is_dictionary(column_type):
        column_type = column_type.value_type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise _InvalidResultFile(f"column {TASK_ID_COLUMN!r} has type {column.type}; expected string")

    # A dictionary read from parquet has no null values, because parquet
    # stores nulls as definition levels, so null_count counts every null.
    if column.null_count:
        raise _InvalidResultFile(f"column {TASK_ID_COLUMN!r} contains {column.null_count} nulls")
    if column.type != _TASK_ID_TYPE:
        column = column.cast(_TASK_ID_TYPE)
    return column


def _key_columns(table: pa.Table, keys: Sequence[str]) -> dict[str, pa.ChunkedArray]:
    columns = {}
    for key in keys:
        if key not in table.column_names:
            raise _InvalidResultFile(f"missing key column {key!r}")

        column = table.column(key)
        # Keys stored as strings are read as dictionaries with int32 indices.
        # Any other index type is cast to that, so the files' keys concatenate.
        if pa.types.is_dictionary(column.type) and column.type.index_type != pa.int32():
            column = column.cast(pa.dictionary(pa.int32(), column.type.value_type))
        columns[key] = column
    return columns


def _declared_sum_columns(table: pa.Table, sums: Sequence[str]) -> dict[str, pa.ChunkedArray | pa.Array]:
    columns: dict[str, pa.ChunkedArray | pa.Array] = {}
    for name in sums:
        if name not in table.column_names:
            columns[name] = pa.nulls(table.num_rows)
            continue

        column = table.column(name)
        if not _is_summable(column.type):
            raise _InvalidResultFile(f"sum column {name!r} has type {column.type}; expected an integer or floating-point type")
        columns[name] = _widen_numeric(name, column)
    return columns


def _numeric_columns(table: pa.Table) -> dict[str, pa.ChunkedArray]:
    """Return every integer, floating-point or all-null column except the reserved ones."""
    columns = {}
    for name in table.column_names:
        column = table.column(name)
        if name in _RESERVED_COLUMNS or not _is_summable(column.type):
            continue
        columns[name] = _widen_numeric(name, column)
    return columns


def _is_summable(data_type: pa.DataType) -> bool:
    return pa.types.is_integer(data_type) or pa.types.is_floating(data_type) or pa.types.is_null(data_type)


def _widen_numeric(name: str, column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Cast integers to int64 and floats to float64, so every file's sum columns unify."""
    if pa.types.is_integer(column.type):
        target = pa.int64()
    elif pa.types.is_floating(column.type):
        target = pa.float64()
    else:
        return column

    try:
        return column.cast(target)
    except pa.ArrowInvalid as exc:
        raise _InvalidResultFile(f"sum column {name!r} cannot be cast to {target}: {exc}") from None


def _unify_schema(schema: pa.Schema, file_schema: pa.Schema) -> pa.Schema:
    try:
        return pa.unify_schemas([schema, file_schema], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise _InvalidResultFile(f"column types conflict with earlier results: {exc}") from None


def _decoded_schema(schema: pa.Schema) -> pa.Schema:
    """Return ``schema`` with each dictionary type replaced by its value type."""
    return pa.schema(
        [field.with_type(field.type.value_type) if pa.types.is_dictionary(field.type) else field for field in schema]
    )


def _decode(column: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_dictionary(column.type):
        return column.cast(column.type.value_type)
    return column


def _file_positions(row_counts: list[int], positions: list[int]) -> pa.Array:
    """Return, for each row of the concatenated files, the int64 position of its file."""
    runs = [(position, count) for position, count in zip(positions, row_counts) if count]
    run_ends = pa.array(list(accumulate(count for _, count in runs)), pa.int64())
    values = pa.array([position for position, _ in runs], pa.int64())
    return pc.run_end_decode(pa.RunEndEncodedArray.from_arrays(run_ends, values))


# Finding new tasks and recording them


def _split_new_tasks(conn: sqlite3.Connection, groups: pa.Table | None, stride: int) -> _NewRows:
    """Keep the grouped rows of the tasks that no committed file and no earlier file of the batch counted.

    ``groups`` contains the grouped rows of the batch's accepted files, or is None
    when they have no rows. Every file position in it is below ``stride``. The task ids get integer codes
    for the whole batch, so finding each task's first file takes a few
    vectorized steps, and the counted tasks one query per ``SQL_CHUNK``
    distinct task ids.
    """
    if groups is None:
        return _NewRows(pa.table({}), {}, {}, [], [], set())

    dictionary, codes = _task_id_codes(groups.column(TASK_ID_COLUMN))
    # One key per (task, file) pair: code * stride + position.
    pair_keys = pc.add(pc.multiply(codes, stride), groups.column(_FILE_COLUMN).combine_chunks())
    pairs = pc.unique(pair_keys)
    present_codes = pc.unique(pc.divide(pairs, stride))
    counted = _select_existing(
        conn, "SELECT task_id FROM counted_tasks WHERE task_id IN ({})", dictionary.take(present_codes).to_pylist()
    )

    if len(pairs) == len(present_codes) and not counted:
        # Each task is in one file of the batch and new to the state: keep every row.
        kept_pairs = pairs
        duplicate_ids: set[str] = set()
    else:
        kept_pairs = _first_file_pairs(pairs, stride, dictionary, counted)
        mask = pc.is_in(pair_keys, value_set=kept_pairs)
        groups = groups.filter(mask)
        codes = codes.filter(mask)
        dropped = pairs.filter(pc.invert(pc.is_in(pairs, value_set=kept_pairs)))
        duplicate_ids = set(dictionary.take(pc.unique(pc.divide(dropped, stride))).to_pylist())

    kept_codes = pc.divide(kept_pairs, stride)
    kept_files = pc.subtract(kept_pairs, pc.multiply(kept_codes, stride))
    table = groups.set_column(groups.schema.get_field_index(TASK_ID_COLUMN), TASK_ID_COLUMN, codes)
    return _NewRows(
        table=table,
        rows_by_file=_sum_rows_by_file(table),
        tasks_by_file=_count_values(kept_files),
        task_ids=dictionary.take(kept_codes).to_pylist(),
        task_files=kept_files.to_pylist(),
        duplicate_ids=duplicate_ids,
    )


def _task_id_codes(column: pa.ChunkedArray) -> tuple[pa.Array, pa.Array]:
    """Return the distinct task ids of a dictionary column, and per row the int64 position of its id among them."""
    column = pa.table({TASK_ID_COLUMN: column}).unify_dictionaries().column(TASK_ID_COLUMN)
    dictionary = column.chunk(0).dictionary
    codes = pc.cast(pa.concat_arrays([chunk.indices for chunk in column.chunks]), pa.int64())

    # Arrow does not require distinct dictionary values, and unifying leaves
    # the dictionary of a single chunk as it is. Two codes for one task id
    # would count that task twice, so repeated values are merged.
    distinct = pc.unique(dictionary)
    if len(distinct) != len(dictionary):
        codes = pc.take(pc.cast(pc.index_in(dictionary, value_set=distinct), pa.int64()), codes)
        dictionary = distinct
    return dictionary, codes


def _first_file_pairs(pairs: pa.Array, stride: int, dictionary: pa.Array, counted: set[str]) -> pa.Array:
    """Return the (task, file) pair keys to keep: for each task not counted yet, the pair of its first file."""
    codes = pc.divide(pairs, stride)
    candidates = pa.table({"code": codes, "file": pc.subtract(pairs, pc.multiply(codes, stride))})
    if counted:
        counted_codes = pc.index_in(pa.array(sorted(counted), pa.string()), value_set=dictionary)
        candidates = candidates.filter(pc.invert(pc.is_in(candidates.column("code"), value_set=counted_codes)))

    first = candidates.group_by("code", use_threads=False).aggregate([("file", "min")])
    return pc.add(pc.multiply(first.column("code"), stride), first.column("file_min")).combine_chunks()


def _sum_rows_by_file(groups: pa.Table) -> dict[int, int]:
    sums = groups.group_by(_FILE_COLUMN, use_threads=False).aggregate([(ROWS_COLUMN, "sum")])
    return dict(zip(sums.column(_FILE_COLUMN).to_pylist(), sums.column(f"{ROWS_COLUMN}_sum").to_pylist()))


def _count_values(values: pa.Array) -> dict[int, int]:
    counts = pc.value_counts(values)
    return dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()))


def _record_folded_files(conn: sqlite3.Connection, accepted: list[_ReadResult], new_rows: _NewRows) -> None:
    """Insert the batch's files and their new task ids, with one ``executemany`` per table."""
    # The transaction holds the write lock, so no other reducer takes these ids.
    (last_id,) = conn.execute("SELECT COALESCE(MAX(id), 0) FROM folded_files").fetchone()
    file_ids = {read.position: last_id + 1 + index for index, read in enumerate(accepted)}
    folded_at = time.time()

    conn.executemany(
        "INSERT INTO folded_files (id, name, size, mtime_ns, rows, tasks, folded_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            (
                file_ids[read.position],
                read.name,
                read.size,
                read.mtime_ns,
                new_rows.rows_by_file.get(read.position, 0),
                new_rows.tasks_by_file.get(read.position, 0),
                folded_at,
            )
            for read in accepted
        ),
    )
    conn.executemany(
        "INSERT INTO counted_tasks (task_id, file_id) VALUES (?, ?)",
        ((task_id, file_ids[position]) for task_id, position in zip(new_rows.task_ids, new_rows.task_files)),
    )


def _store_aggregate(conn: sqlite3.Connection, aggregate: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(aggregate, sink)
    conn.execute(
        "INSERT OR REPLACE INTO aggregate (id, parquet, updated_at) VALUES (1, ?, ?)",
        (sink.getvalue().to_pybytes(), time.time()),
    )


def _count_total_tasks(conn: sqlite3.Connection) -> int:
    # Every counted task is counted from exactly one folded file.
    (total,) = conn.execute("SELECT COALESCE(SUM(tasks), 0) FROM folded_files").fetchone()
    return int(total)


def _select_existing(conn: sqlite3.Connection, query: str, values: Iterable[str]) -> set[str]:
    """Return the values that ``query`` (with one ``IN ({})`` placeholder) finds, querying in chunks."""
    found: set[str] = set()
    for chunk in _chunks(list(values), SQL_CHUNK):
        placeholders = ", ".join("?" * len(chunk))
        found.update(row[0] for row in conn.execute(query.format(placeholders), chunk))
    return found


@contextmanager
def _immediate_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """Run the block in one transaction that holds the write lock from its start."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


# Small helpers


def _validate_aggregation(aggregation: Aggregation) -> Aggregation:
    names = list(aggregation.keys) + list(aggregation.sums)
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"aggregation lists {', '.join(repeated)} more than once. Name each key or sum column once.")

    reserved = sorted(set(names) & set(_RESERVED_COLUMNS))
    if reserved:
        raise ConfigError(
            f"aggregation uses reserved column {', '.join(reserved)}. Rename it, because the reducer "
            f"uses the names {', '.join(_RESERVED_COLUMNS)} for its own columns."
        )
    return Aggregation(keys=tuple(aggregation.keys), sums=tuple(aggregation.sums))


def _aggregation_json(aggregation: Aggregation) -> str:
    return json.dumps({"keys": list(aggregation.keys), "sums": list(aggregation.sums)})


def _empty_aggregate(aggregation: Aggregation) -> pa.Table:
    """Return a zero-row aggregate whose key and sum columns have type null until a folded file gives them a type."""
    columns = {name: pa.array([], pa.null()) for name in (*aggregation.keys, *aggregation.sums)}
    columns[ROWS_COLUMN] = pa.array([], pa.int64())
    columns[TASKS_COLUMN] = pa.array([], pa.int64())
    return pa.table(columns)


def _free_path(folder: Path, name: str) -> Path:
    """Return ``folder / name``, or the first ``<stem>-<n><suffix>`` that does not exist."""
    target = folder / name
    number = 1
    while target.exists():
        target = folder / f"{Path(name).stem}-{number}{Path(name).suffix}"
        number += 1
    return target


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _log_report(results_dir: Path, report: ReduceReport) -> None:
    logger.info(
        "reduced %s: folded %d files (%d rows, %d new tasks), skipped %d already folded, "
        "dropped %d duplicate tasks, quarantined %d files, %d tasks in total, %.2fs",
        results_dir,
        report.files_folded,
        report.rows_folded,
        report.tasks_folded,
        report.files_skipped,
        report.duplicate_tasks,
        len(report.quarantined),
        report.total_tasks,
        report.elapsed_s,
    )
