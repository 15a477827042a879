"""A small JSON API on 127.0.0.1 that records when every request arrived, for rate limit tests.

Routes:

* ``GET /records?seed=N&count=K`` returns K JSON records derived only from
  the seed, so the same request always returns the same records;
* ``/error/STATUS/...`` (any method) responds with that status, so a task
  can be pointed at a failing endpoint, such as ``/error/500``;
* ``POST /control/fail-next?status=429&retry_after=2&count=1`` makes the
  next ``count`` API requests fail with ``status``, for a server running in
  another process (in-process code calls :meth:`HttpApi.fail_next`);
* every other path responds with 404.

The server enforces its own limit when given one: it responds with 429 and
``Retry-After`` when more than ``limit`` requests (including this one) arrived
within the last ``window_s`` seconds.

Every API request is recorded with its arrival time (``time.time()`` when
its request line was read), status and headers. Control requests are not. The
headers stay in memory for tests that check credentials arrived: they are
never logged nor written to the arrivals file.

Run it as its own process, which prints its URL on stdout::

    python -m qworker.testing.http_api --port 0 --limit 50
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import json
import logging
import random
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from types import FrameType
from typing import Any, Iterable, Mapping, TextIO
from urllib.parse import parse_qs, urlsplit

logger = logging.getLogger("qworker.testing.http_api")

HOST = "127.0.0.1"
MAX_RECORDS = 10_000
CATEGORIES = ("alpha", "beta", "gamma", "delta")
# Seconds an idle keep-alive connection stays open before the server closes it.
IDLE_CONNECTION_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class RequestRecord:
    """One API request as the server saw it.

    ``arrived_at`` is the unix time in seconds when the server read the
    request line. ``headers`` has the header names in lower case.
    """

    arrived_at: float
    method: str
    path: str
    status: int
    headers: Mapping[str, str]

    def __repr__(self) -> str:
        # The headers may contain credentials, so the repr names them without their values.
        return (f"RequestRecord(arrived_at={self.arrived_at:.6f}, method={self.method!r}, path={self.path!r},"
                f" status={self.status}, headers=<{', '.join(sorted(self.headers))}>)")


@dataclass(frozen=True)
class _ForcedFailure:
    status: int
    retry_after: str | None


def make_records(seed: int, count: int) -> list[dict[str, Any]]:
    """Return ``count`` records derived only from ``seed``; record i is the same for every count above i."""
    rng = random.Random(seed)
    records = []
    for index in range(count):
        records.append({
            "id": f"{seed}-{index}",
            "index": index,
            "category": CATEGORIES[rng.randrange(len(CATEGORIES))],
            "value": round(rng.uniform(0.0, 100.0), 6),
        })
    return records


def max_in_window(times: Iterable[float], window_s: float = 1.0) -> int:
    """Return the maximum number of times in any half-open window ``[t, t + window_s)`` that starts at one of them.

    A window that starts elsewhere contains no more than the one starting at
    its first time, so this is the maximum over all windows.
    """
    ordered = sorted(times)
    best = 0
    for start_index, start in enumerate(ordered):
        end_index = bisect.bisect_left(ordered, start + window_s, lo=start_index)
        best = max(best, end_index - start_index)
    return best


def utilisation(times: Iterable[float], rate: float, period_s: float = 1.0) -> float:
    """Return requests / (span between first and last request x rate per second); 0.0 for fewer than two.

    A short run can exceed 1.0 because a budget allows a burst on top of its rate.
    """
    ordered = sorted(times)
    if len(ordered) < 2 or ordered[-1] <= ordered[0]:
        return 0.0
    return len(ordered) / ((ordered[-1] - ordered[0]) * rate / period_s)


class HttpApi:
    """Runs the API on 127.0.0.1 on an event loop in a background thread.

    Use it as a context manager or call start() and stop(). One event loop
    serves every connection, so no thread starts per connection and the
    recorded arrival times carry little delay of the server's own.
    """

    def __init__(
        self,
        port: int = 0,
        *,
        limit: int | None = None,
        window_s: float = 1.0,
        retry_after_s: int = 1,
        arrivals_file: Path | None = None,
    ) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"invalid limit {limit!r}: use a positive number of requests per window, or None")
        self.limit = limit
        self.window_s = window_s
        self.retry_after_s = retry_after_s
        self.arrivals_file = arrivals_file
        self._requested_port = port
        self._port: int | None = None
        self._lock = threading.Lock()  # guards the records, the limit's window and the forced failures
        self._records: list[RequestRecord] = []
        self._recent: collections.deque[float] = collections.deque()
        self._forced: collections.deque[_ForcedFailure] = collections.deque()
        self._arrivals: TextIO | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._connections: set[asyncio.Task[None]] = set()

    # -- lifecycle -----------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("HttpApi is not started: call start() first")
        return self._port

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> HttpApi:
        """Bind 127.0.0.1 (port 0 picks a free one) and serve in a background thread; return once it accepts."""
        if self._thread is not None:
            raise RuntimeError("HttpApi is already started")
        sock = socket.create_server((HOST, self._requested_port))
        self._port = sock.getsockname()[1]
        if self.arrivals_file is not None:
            self.arrivals_file.parent.mkdir(parents=True, exist_ok=True)
            self._arrivals = open(self.arrivals_file, "a", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        self._thread = threading.Thread(target=self._run, args=(sock,), name=f"http-api-{self._port}", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout_s):
            raise TimeoutError(f"http api on port {self._port} did not start within {timeout_s} s")
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise RuntimeError(f"http api on port {self._port} failed to start") from self._error
        logger.info("http api started url=%s limit=%s window_s=%.2f", self.url, self.limit, self.window_s)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Close the listening socket and every connection, and end the thread. Calling it again does nothing."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        thread.join(timeout_s)
        if thread.is_alive():
            logger.error("http api thread did not end within %.0f s of stop()", timeout_s)
        with self._lock:
            if self._arrivals is not None:
                self._arrivals.close()
                self._arrivals = None
        logger.info("http api stopped, %d requests recorded", len(self._records))

    def __enter__(self) -> HttpApi:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self, sock: socket.socket) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            server = loop.run_until_complete(asyncio.start_server(self._serve_connection, sock=sock))
        except BaseException as exc:  # noqa: BLE001 - handed to start(), which raises it in the caller's thread
            self._error = exc
            sock.close()
            loop.close()
            self._started.set()
            return

        self._started.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._close_connections(server))
            loop.close()

    async def _close_connections(self, server: asyncio.Server) -> None:
        server.close()
        connections = list(self._connections)
        for connection in connections:
            connection.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        await server.wait_closed()

    # -- what tests read and set ------------------------------------------------

    def requests(self) -> list[RequestRecord]:
        """Return a copy of every API request recorded so far, in arrival order."""
        with self._lock:
            return list(self._records)

    def arrival_times(self) -> list[float]:
        with self._lock:
            return [record.arrived_at for record in self._records]

    def status_counts(self) -> collections.Counter[int]:
        with self._lock:
            return collections.Counter(record.status for record in self._records)

    def fail_next(self, status: int, retry_after: float | None = None, count: int = 1) -> None:
        """Respond to the next ``count`` API requests with ``status`` (and ``Retry-After`` when given), before any other check."""
        if not 400 <= status <= 599:
            raise ValueError(f"invalid status {status!r}: use an error status from 400 to 599")
        header = None if retry_after is None else f"{retry_after:g}"
        with self._lock:
            self._forced.extend(_ForcedFailure(status, header) for _ in range(count))

    def clear(self) -> None:
        """Forget recorded requests, the limit's window and pending forced failures."""
        with self._lock:
            self._records.clear()
            self._recent.clear()
            self._forced.clear()

    # -- serving ---------------------------------------------------------------

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve the requests of one keep-alive connection until the client closes it or sends ``Connection: close``."""
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            keep_alive = True
            while keep_alive:
                request_line = await asyncio.wait_for(reader.readline(), IDLE_CONNECTION_TIMEOUT_S)
                arrived_at = time.time()
                if not request_line:
                    return
                request = await _read_request(reader, request_line)
                response = self._respond(request, arrived_at)
                keep_alive = request.keep_alive
                writer.write(_encode_response(*response, keep_alive=keep_alive))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
            logger.debug("connection closed: %s", type(exc).__name__)
        except ValueError as exc:
            # A malformed request line or header, or one longer than the stream's 64 KiB limit.
            logger.warning("malformed request, closing the connection: %s", exc)
            writer.write(_encode_response(HTTPStatus.BAD_REQUEST, {"error": "malformed request"}, {}, keep_alive=False))
        finally:
            self._connections.discard(task)
            writer.close()

    def _respond(self, request: _Request, arrived_at: float) -> tuple[int, Any, dict[str, str]]:
        parts = urlsplit(request.target)
        query = parse_qs(parts.query)
        if parts.path == "/control/fail-next" and request.method == "POST":
            return self._control_fail_next(query)

        failure = self._admit(arrived_at)
        if failure is not None:
            status, body, headers = failure.status, {"error": _reason(failure.status)}, {}
            if failure.retry_after is not None:
                headers["Retry-After"] = failure.retry_after
        else:
            status, body, headers = _route(request.method, parts.path, query)

        self._record(RequestRecord(arrived_at, request.method, parts.path, int(status), request.headers))
        return status, body, headers

    def _control_fail_next(self, query: Mapping[str, list[str]]) -> tuple[int, Any, dict[str, str]]:
        try:
            status = int(query["status"][0])
            retry_after = float(query["retry_after"][0]) if "retry_after" in query else None
            count = int(query.get("count", ["1"])[0])
            self.fail_next(status, retry_after, count)
        except (KeyError, ValueError) as exc:
            return HTTPStatus.BAD_REQUEST, {"error": f"invalid fail-next request: {exc}"}, {}
        return HTTPStatus.OK, {"status": status, "retry_after": retry_after, "count": count}, {}

    def _admit(self, arrived_at: float) -> _ForcedFailure | None:
        """Return the failure this request gets, if a forced failure or the server's own limit applies."""
        with self._lock:
            if self._forced:
                return self._forced.popleft()
            if self.limit is None:
                return None
            self._recent.append(arrived_at)
            while self._recent and self._recent[0] <= arrived_at - self.window_s:
                self._recent.popleft()
            if len(self._recent) > self.limit:
                return _ForcedFailure(HTTPStatus.TOO_MANY_REQUESTS, str(self.retry_after_s))
            return None

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self._records.append(record)
            if self._arrivals is not None:
                line = {"arrived_at": record.arrived_at, "method": record.method, "path": record.path,
                        "status": record.status}
                self._arrivals.write(json.dumps(line) + "\n")
                self._arrivals.flush()


@dataclass(frozen=True)
class _Request:
    method: str
    target: str
    headers: dict[str, str]  # names in lower case
    keep_alive: bool


async def _read_request(reader: asyncio.StreamReader, request_line: bytes) -> _Request:
    """Read the headers and body that follow ``request_line``; raise ValueError when they are malformed."""
    method, target, version = request_line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    headers: dict[str, str] = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, separator, value = line.decode("latin-1").partition(":")
        if not separator:
            raise ValueError(f"header line without a colon in {method} {urlsplit(target).path}")
        headers[name.strip().lower()] = value.strip()

    length = int(headers.get("content-length") or 0)
    if length:
        await reader.readexactly(length)
    connection = headers.get("connection", "").lower()
    keep_alive = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
    return _Request(method, target, headers, keep_alive)


def _route(method: str, path: str, query: Mapping[str, list[str]]) -> tuple[int, Any, dict[str, str]]:
    if path == "/records" and method == "GET":
        return _records_response(query)
    segments = path.strip("/").split("/")
    if len(segments) >= 2 and segments[0] == "error" and segments[1].isdigit() and 400 <= int(segments[1]) <= 599:
        status = int(segments[1])
        return status, {"error": f"error {status} requested by the path"}, {}
    return HTTPStatus.NOT_FOUND, {"error": f"not found: {method} {path}"}, {}


def _records_response(query: Mapping[str, list[str]]) -> tuple[int, Any, dict[str, str]]:
    try:
        seed = int(query["seed"][0])
        count = int(query["count"][0])
    except (KeyError, ValueError):
        return HTTPStatus.BAD_REQUEST, {"error": "seed and count must be integers"}, {}
    if seed < 0 or not 0 <= count <= MAX_RECORDS:
        return HTTPStatus.BAD_REQUEST, {"error": f"use seed >= 0 and count from 0 to {MAX_RECORDS}"}, {}
    return HTTPStatus.OK, make_records(seed, count), {}


def _reason(status: int) -> str:
    """Return the reason phrase of ``status``, or "Error" for a code that ``http.HTTPStatus`` does not name."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _encode_response(status: int, body: Any, headers: Mapping[str, str], *, keep_alive: bool) -> bytes:
    data = json.dumps(body).encode()
    lines = [
        f"HTTP/1.1 {int(status)} {_reason(status)}",
        "Content-Type: application/json",
        f"Content-Length: {len(data)}",
        f"Connection: {'keep-alive' if keep_alive else 'close'}",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qworker.testing.http_api",
                                     description="Serve the test JSON API on 127.0.0.1 until SIGTERM or Ctrl-C.")
    parser.add_argument("--port", type=int, default=0, help="port to listen on; 0 picks a free one (default: %(default)s)")
    parser.add_argument("--limit", type=int, help="respond with 429 when more than this many requests arrive in one window"
                                                  " (default: no limit)")
    parser.add_argument("--window-s", type=float, default=1.0, help="length of the limit's window in seconds (default: %(default)s)")
    parser.add_argument("--retry-after-s", type=int, default=1,
                        help="Retry-After value in seconds sent with the limit's 429 (default: %(default)s)")
    parser.add_argument("--arrivals-file", type=Path,
                        help="append one JSON line per request (arrival time, method, path, status) to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")

    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, request_stop)

    with HttpApi(args.port, limit=args.limit, window_s=args.window_s, retry_after_s=args.retry_after_s,
                 arrivals_file=args.arrivals_file) as api:
        print(api.url, flush=True)
        while not stop.wait(0.5):
            pass
        counts = api.status_counts()
    summary = ", ".join(f"{status}: {count}" for status, count in sorted(counts.items())) or "none"
    print(f"requests by status: {summary}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
