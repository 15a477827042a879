"""Streaming producer: push JSON task records from standard input, a growing file or an HTTP endpoint, in batches.

Each line is one task record with the same rules as a JSONL task file
(``seed``, optional ``task_id``, ``config`` or top-level config keys,
optional ``lane`` and ``max_attempts``). In follow mode a checkpoint file
stores the input's inode and the byte offset of the first unpushed line,
written only after the lines before it are pushed. Task ids are stable and
the queue skips ids it already holds, so after a crash the lines between the
checkpoint and the crash are pushed again as duplicates and every record ends
up in the queue exactly once.
"""

from __future__ import annotations

import json
import logging
import os
import queue as thread_queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import anyio

from .errors import ConfigError
from .jobs import JobSpec
from .producer import push_job_tasks
from .queue import TaskQueue
from .sources import RecordParser, RejectedRow
from .task import Task
from .workloads import get_workload

logger = logging.getLogger("qworker.stream")

FOLLOW_POLL_S = 0.2
HIGH_WATER_POLL_S = 0.5
HIGH_WATER_REPORT_S = 5.0
# Lines the standard input thread may read ahead of the stream. With this bound,
# a stream that waits at its high-water mark stops reading, so the pipe fills and
# the writer blocks instead of this process holding the whole input in memory.
STDIN_READ_AHEAD_LINES = 10_000


@dataclass(frozen=True)
class StreamOptions:
    """Batching, backpressure and stop settings of one stream."""

    batch_size: int = 500
    batch_s: float = 1.0
    high_water: int | None = None
    checkpoint: Path | None = None
    stop_at_eof: bool = False


@dataclass
class StreamSummary:
    """Counts of one stream run."""

    added: int = 0
    duplicates: int = 0
    rejected: int = 0


@dataclass
class _Line:
    """One complete input line and the position just after it."""

    text: bytes
    number: int
    inode: int | None
    end_offset: int


@dataclass
class _Position:
    path: str
    inode: int
    offset: int
    line: int


# ---------------------------------------------------------------------------
# Checkpoint


def read_checkpoint(path: Path) -> _Position | None:
    """Read a checkpoint file, or return None when it does not exist."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"invalid checkpoint file {str(path)!r}: {exc}: delete it to start from the beginning") from None
    try:
        return _Position(path=str(data["path"]), inode=int(data["inode"]), offset=int(data["offset"]),
                         line=int(data.get("line", 0)))
    except (KeyError, TypeError, ValueError):
        raise ConfigError(
            f"invalid checkpoint file {str(path)!r}: expected path, inode and offset: delete it to start from the beginning"
        ) from None


def write_checkpoint(path: Path, position: _Position) -> None:
    """Replace the checkpoint file atomically: write a temporary file, fsync it, rename it, fsync the folder."""
    temporary = path.with_name(path.name + ".tmp")
    data = {"path": position.path, "inode": position.inode, "offset": position.offset, "line": position.line}
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(data, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


# ---------------------------------------------------------------------------
# Readers


class FollowReader:
    """Read complete lines from a file that keeps growing and may be rotated.

    Rotation is detected at the end of the open file: when the path names
    another inode, or the file is shorter than the read offset (truncated),
    the reader opens the path again from offset 0.
    """

    def __init__(self, path: Path, start: _Position | None) -> None:
        self.path = path
        self._handle: IO[bytes] | None = None
        self._inode: int | None = None
        self._line = 0
        self._start = start

    def _open(self) -> bool:
        try:
            handle = open(self.path, "rb")  # noqa: SIM115 - closed on rotation and by close()
        except FileNotFoundError:
            return False
        inode = os.fstat(handle.fileno()).st_ino
        self._handle, self._inode, self._line = handle, inode, 0
        start = self._start
        self._start = None
        if start is not None and start.inode == inode and start.offset <= os.fstat(handle.fileno()).st_size:
            handle.seek(start.offset)
            self._line = start.line
        elif start is not None:
            logger.warning("input %s was rotated since the checkpoint (inode %d, now %d): reading it from the start",
                           self.path, start.inode, inode)
        return True

    def read_available(self, limit: int) -> list[_Line]:
        """Return up to ``limit`` complete lines that are available now, following a rotation."""
        if self._handle is None and not self._open():
            return []
        lines = self._read_open_file(limit)
        if not lines and self._rotated():
            # The old file is read to its end, so continue with the new one from the start.
            logger.warning("input %s was rotated or truncated: reading the new file from the start", self.path)
            self.close()
            if self._open():
                lines = self._read_open_file(limit)
        return lines

    def _read_open_file(self, limit: int) -> list[_Line]:
        assert self._handle is not None
        lines: list[_Line] = []
        while len(lines) < limit:
            start = self._handle.tell()
            text = self._handle.readline()
            if not text:
                break
            if not text.endswith(b"\n"):
                # A line still being written: read it again once its newline arrives.
                self._handle.seek(start)
                break
            self._line += 1
            lines.append(_Line(text=text, number=self._line, inode=self._inode, end_offset=self._handle.tell()))
        return lines

    def _rotated(self) -> bool:
        assert self._handle is not None
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            return False
        return current.st_ino != self._inode or current.st_size < self._handle.tell()

    def read_partial_tail(self) -> list[_Line]:
        """Return the last line when it has no newline, for a stream that stops at the end of input."""
        if self._handle is None:
            return []
        text = self._handle.read()
        if not text.strip():
            return []
        self._line += 1
        return [_Line(text=text, number=self._line, inode=self._inode, end_offset=self._handle.tell())]

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class HttpPollReader:
    """Poll an HTTP endpoint for task records with httpx.

    ``GET URL?after=CURSOR&limit=N`` must return up to N JSON lines, the
    records that follow the first CURSOR ones, and with an empty body when
    there is none yet. The cursor counts the records read, and the checkpoint
    stores it, so a restarted stream asks for the records after the last
    pushed one. A failed poll is logged and tried again after ``poll_s``.
    """

    def __init__(self, url: str, start: _Position | None, poll_s: float, timeout_s: float = 30.0) -> None:
        import httpx

        self.url = url
        self.poll_s = poll_s
        self.drained = False  # the last poll returned no record
        self._cursor = start.offset if start is not None else 0
        self._client = httpx.Client(timeout=timeout_s)
        self._next_poll = 0.0
        self._http_error = httpx.HTTPError

    def read_available(self, limit: int) -> list[_Line]:
        now = time.monotonic()
        if now < self._next_poll:
            return []
        try:
            response = self._client.get(self.url, params={"after": self._cursor, "limit": limit})
            response.raise_for_status()
        except self._http_error as exc:
            logger.warning("polling %s failed, trying again in %.1f s: %s", self.url, self.poll_s, exc)
            self._next_poll = now + self.poll_s
            return []

        lines = []
        for text in response.content.splitlines()[:limit]:
            if not text.strip():
                continue
            self._cursor += 1
            lines.append(_Line(text=text + b"\n", number=self._cursor, inode=0, end_offset=self._cursor))
        self.drained = not lines
        if not lines:
            self._next_poll = now + self.poll_s
        return lines

    def close(self) -> None:
        self._client.close()


class StdinReader:
    """Read lines from a binary stream in a daemon thread, so a blocking read never stalls batching.

    The thread stops reading while ``max_lines`` lines wait to be taken.
    """

    def __init__(self, stream: IO[bytes], max_lines: int = STDIN_READ_AHEAD_LINES) -> None:
        self._lines: thread_queue.Queue[bytes | None] = thread_queue.Queue(maxsize=max_lines)
        self._number = 0
        self.exhausted = False
        threading.Thread(target=self._run, args=(stream,), daemon=True, name="qworker-stream-stdin").start()

    def _run(self, stream: IO[bytes]) -> None:
        for text in stream:
            self._lines.put(text)
        self._lines.put(None)

    def read_available(self, limit: int) -> list[_Line]:
        lines: list[_Line] = []
        while len(lines) < limit and not self.exhausted:
            try:
                text = self._lines.get_nowait()
            except thread_queue.Empty:
                break
            if text is None:
                self.exhausted = True
                break
            self._number += 1
            lines.append(_Line(text=text, number=self._number, inode=None, end_offset=0))
        return lines


# ---------------------------------------------------------------------------
# Streaming


def record_parser_for(job: JobSpec) -> RecordParser:
    """Build the parser of input lines from the job: its first config as the base config, its lane and max_attempts."""
    # NOTE: like 'qworker push --from', only the job's first config is the base config, so variants are ignored.
    return RecordParser(base_config=job.configs[0], workload=get_workload(job.workload),
                        max_attempts=job.max_attempts, lane=job.lane)


class _StopFlag:
    """Flag set by SIGTERM or SIGINT. The stream then pushes what it buffered and returns."""

    def __init__(self) -> None:
        self.stopped = False

    def install(self) -> Callable[[], None]:
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        return restore

    def _handle(self, signum: int, frame: Any) -> None:
        logger.warning("received %s: pushing the buffered records, then stopping", signal.Signals(signum).name)
        self.stopped = True


@dataclass
class _Stream:
    queue: TaskQueue
    job: JobSpec
    options: StreamOptions
    label: str
    checkpoint_input: str | None  # the file path or URL that the checkpoint names
    stop: _StopFlag
    summary: StreamSummary = field(default_factory=StreamSummary)
    buffer: list[Task] = field(default_factory=list)
    pending_position: _Position | None = None
    first_buffered_at: float | None = None

    async def wait_below_high_water(self) -> None:
        high_water = self.options.high_water
        if high_water is None:
            return
        last_report = float("-inf")
        while not self.stop.stopped:
            depth = (await self.queue.stats()).depth
            if depth < high_water:
                return
            now = time.monotonic()
            if now - last_report >= HIGH_WATER_REPORT_S:
                last_report = now
                logger.warning("queue %s contains %d waiting tasks, above the high-water mark %d: waiting",
                               self.queue.name, depth, high_water)
            await anyio.sleep(HIGH_WATER_POLL_S)

    async def flush(self) -> None:
        """Push the buffered tasks, then commit the checkpoint to the line after the last of them."""
        if self.buffer:
            await self.wait_below_high_water()
            result = await push_job_tasks(self.queue, self.job, self.buffer)
            self.summary.added += result.added
            self.summary.duplicates += result.duplicates
            self.buffer = []
        self.first_buffered_at = None
        if self.options.checkpoint is not None and self.pending_position is not None:
            write_checkpoint(self.options.checkpoint, self.pending_position)
            self.pending_position = None

    def accept(self, line: _Line, parser: RecordParser) -> None:
        parsed = parser.parse(line.text, file=self.label, line=line.number)
        if isinstance(parsed, RejectedRow):
            self.reject(parsed)
        else:
            self.buffer.append(parsed)
            if self.first_buffered_at is None:
                self.first_buffered_at = time.monotonic()
        if line.inode is not None and self.checkpoint_input is not None:
            self.pending_position = _Position(path=self.checkpoint_input, inode=line.inode,
                                              offset=line.end_offset, line=line.number)

    def reject(self, row: RejectedRow) -> None:
        self.summary.rejected += 1
        checkpoint = self.options.checkpoint
        if checkpoint is None:
            logger.warning("skipped invalid record: %s", row)
            return
        rejected_path = checkpoint.with_name(checkpoint.name + ".rejected.jsonl")
        logger.warning("rejected invalid record: %s (written to %s)", row, rejected_path)
        with open(rejected_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row.to_dict(), sort_keys=True) + "\n")

    def batch_due(self) -> bool:
        if len(self.buffer) >= self.options.batch_size:
            return True
        started = self.first_buffered_at
        return started is not None and time.monotonic() - started >= self.options.batch_s


async def stream_tasks(
    queue: TaskQueue,
    job: JobSpec,
    *,
    follow: Path | None = None,
    stdin: IO[bytes] | None = None,
    http: str | None = None,
    poll_s: float = 1.0,
    options: StreamOptions = StreamOptions(),
) -> StreamSummary:
    """Push task records from ``follow`` (a growing file), ``stdin`` or ``http`` (an endpoint polled every ``poll_s`` seconds).

    It runs until the input ends or a signal stops it.

    Must run in the main thread, because it installs SIGTERM and SIGINT handlers.
    Standard input ends at its end of file. A followed file ends, and an
    endpoint ends at its first empty response, only with ``options.stop_at_eof``.
    Invalid lines are rejected and the stream goes on.
    """
    if sum(source is not None for source in (follow, stdin, http)) != 1:
        raise ConfigError("stream needs exactly one input: --stdin, --follow FILE or --http URL")
    if options.batch_size < 1 or options.batch_s <= 0:
        raise ConfigError(f"invalid batch settings {options.batch_size} records, {options.batch_s} s: use positive values")
    parser = record_parser_for(job)

    reader: FollowReader | StdinReader | HttpPollReader
    checkpoint_input = str(follow) if follow is not None else http
    start = read_checkpoint(options.checkpoint) if options.checkpoint is not None else None
    if start is not None and start.path != checkpoint_input:
        raise ConfigError(f"checkpoint {str(options.checkpoint)!r} belongs to input {start.path!r}, not"
                          f" {checkpoint_input!r}: use another checkpoint file")
    if follow is not None:
        reader = FollowReader(follow, start)
        label = str(follow)
    elif http is not None:
        reader = HttpPollReader(http, start, poll_s)
        label = http
    else:
        assert stdin is not None
        reader = StdinReader(stdin)
        label = "<stdin>"

    stop = _StopFlag()
    restore_signals = stop.install()
    stream = _Stream(queue=queue, job=job, options=options, label=label, checkpoint_input=checkpoint_input, stop=stop)
    try:
        while not stop.stopped:
            lines = reader.read_available(options.batch_size - len(stream.buffer))
            for line in lines:
                stream.accept(line, parser)
            if stream.batch_due():
                await stream.flush()
                continue
            if lines:
                continue

            input_done = isinstance(reader, StdinReader) and reader.exhausted
            if isinstance(reader, HttpPollReader) and options.stop_at_eof and reader.drained:
                input_done = True
            if isinstance(reader, FollowReader) and options.stop_at_eof:
                for line in reader.read_partial_tail():
                    stream.accept(line, parser)
                input_done = True
            if input_done:
                break
            await anyio.sleep(FOLLOW_POLL_S)
        await stream.flush()
    finally:
        restore_signals()
        if isinstance(reader, (FollowReader, HttpPollReader)):
            reader.close()
    return stream.summary
