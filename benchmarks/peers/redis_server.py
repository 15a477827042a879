"""Start and stop a private Redis server on 127.0.0.1 for the Redis-based peers.

The server listens on a free port of 127.0.0.1 only, keeps its files in a
temporary folder and is stopped by its PID (SIGTERM, then SIGKILL). The
harness talks to it with a few RESP commands over a socket, so it needs no
Redis client library in the repository's virtual environment.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("peers.redis")

HOST = "127.0.0.1"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
APT_TIMEOUT_S = 600.0

# Persistence choices: the redis-server arguments and what survives which failure.
PERSISTENCE: dict[str, list[str]] = {
    "none": ["--save", "", "--appendonly", "no"],
    "aof-everysec": ["--save", "", "--appendonly", "yes", "--appendfsync", "everysec"],
    "aof-always": ["--save", "", "--appendonly", "yes", "--appendfsync", "always"],
}


class RedisError(RuntimeError):
    """Redis could not be installed, started, reached or stopped."""


def ensure_redis_server() -> str:
    """Return the path of ``redis-server``, installing Debian's package with apt-get if it is missing."""
    path = shutil.which("redis-server")
    if path:
        return path
    if shutil.which("apt-get") is None:
        raise RedisError("redis-server not found and apt-get is not available: install redis-server or pass --skip-redis")

    logger.info("redis-server not found: installing Debian's redis-server package with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "redis-server"]
    try:
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT_S)
        if result.returncode != 0:
            # The package lists may be missing or stale: update them once and try again.
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True, timeout=APT_TIMEOUT_S, check=False)
            result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RedisError(f"apt-get did not finish within {APT_TIMEOUT_S:g} s: install redis-server or pass --skip-redis") from None
    path = shutil.which("redis-server")
    if result.returncode != 0 or path is None:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise RedisError(f"redis-server not found and apt-get failed ({' | '.join(tail)}): install redis-server or pass --skip-redis")
    warn_about_system_service()
    return path


def warn_about_system_service() -> None:
    """Warn when installing the package started Debian's own redis-server service, which this harness does not stop."""
    for pid in _pids_named("redis-server"):
        logger.warning(
            "a redis-server process (pid %d) is running that this benchmark did not start, probably the system service"
            " that apt-get started: the benchmark leaves it alone; stop it with 'service redis-server stop' if unwanted",
            pid,
        )


def _pids_named(name: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() == name:
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def free_port() -> int:
    """Return a TCP port of 127.0.0.1 that was free a moment ago (the server is started right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


@dataclass
class RedisServer:
    """A redis-server process that this harness started, with its port, folder and arguments."""

    executable: str
    persistence: str
    port: int = 0
    folder: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    arguments: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> None:
        if self.persistence not in PERSISTENCE:
            raise RedisError(f"invalid Redis persistence {self.persistence!r}: use one of {', '.join(PERSISTENCE)}")
        self.folder = Path(tempfile.mkdtemp(prefix="qworker-peers-redis-"))
        self.port = free_port()
        self.arguments = [
            "--bind", HOST, "--port", str(self.port), "--protected-mode", "yes", "--daemonize", "no",
            "--dir", str(self.folder), "--logfile", str(self.folder / "redis.log"), *PERSISTENCE[self.persistence],
        ]
        self.process = subprocess.Popen([self.executable, *self.arguments], stdin=subprocess.DEVNULL, start_new_session=True)
        logger.info("started redis-server pid=%d on %s:%d (%s)", self.process.pid, HOST, self.port, self.persistence)

        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RedisError(f"redis-server exited with code {self.process.returncode} at start-up: see {self.folder / 'redis.log'}")
            try:
                if self.command("PING") == "PONG":
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RedisError(f"redis-server on port {self.port} did not respond to PING within {START_TIMEOUT_S:g} s:"
                                 f" see {self.folder / 'redis.log'}")
            time.sleep(0.05)

    def command(self, *arguments: str) -> str | int | list[object] | None:
        """Send one command and return the decoded reply; raise RedisError on an error reply."""
        request = f"*{len(arguments)}\r\n" + "".join(f"${len(item.encode())}\r\n{item}\r\n" for item in arguments)
        with socket.create_connection((HOST, self.port), timeout=5.0) as connection:
            connection.sendall(request.encode())
            reader = connection.makefile("rb")
            return _read_reply(reader)

    def info_field(self, section: str, name: str) -> str:
        text = self.command("INFO", section)
        for line in str(text).splitlines():
            if line.startswith(f"{name}:"):
                return line.split(":", 1)[1].strip()
        raise RedisError(f"INFO {section} has no field {name!r}")

    def flush(self) -> None:
        self.command("FLUSHALL")

    def stop(self) -> None:
        """Stop the server by its PID, SIGTERM first and SIGKILL after STOP_TIMEOUT_S, and remove its folder."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                logger.warning("redis-server pid=%d did not stop within %g s after SIGTERM: sending SIGKILL", process.pid, STOP_TIMEOUT_S)
                process.kill()
                process.wait()
            logger.info("stopped redis-server pid=%d", process.pid)
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def _read_reply(reader: io.BufferedReader) -> str | int | list[object] | None:
    line = reader.readline()
    if not line:
        raise RedisError("redis-server closed the connection without a reply")
    kind, body = line[:1], line[1:-2].decode()
    if kind == b"+":
        return body
    if kind == b"-":
        raise RedisError(f"redis-server replied with an error: {body}")
    if kind == b":":
        return int(body)
    if kind == b"$":
        length = int(body)
        if length < 0:
            return None
        data = reader.read(length + 2)
        return data[:-2].decode()
    if kind == b"*":
        count = int(body)
        return None if count < 0 else [_read_reply(reader) for _ in range(count)]
    raise RedisError(f"unexpected reply from redis-server: {line!r}")
