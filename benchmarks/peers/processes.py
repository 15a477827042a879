"""Worker processes of one run: start them, find their children, wait until idle, stop them by PID.

Every worker command starts in its own session, so a Ctrl-C at the terminal
reaches only the harness, which then stops the workers itself. Stopping
sends SIGTERM to each started PID, waits, and then sends SIGKILL to every
PID of the started processes and their descendants that is still alive.
Descendants are found through the parent PIDs in /proc.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

logger = logging.getLogger("peers.processes")

IDLE_SAMPLE_S = 0.25
IDLE_CPU_SHARE = 0.1  # a process using under 10% of a core over one sample counts as idle
IDLE_SAMPLES_NEEDED = 2
STOP_TIMEOUT_S = 10.0


class WorkerError(RuntimeError):
    """Worker processes exited early, did not become ready, or could not be stopped."""


def parent_pids() -> dict[int, int]:
    """Return a map of PID to parent PID for every process visible in /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))) is not None:
            parents[int(entry.name)] = int(fields[1])
    return parents


def descendants(roots: list[int]) -> list[int]:
    """Return the PIDs of ``roots`` and all their living descendants, roots first."""
    children: dict[int, list[int]] = {}
    for pid, parent in parent_pids().items():
        children.setdefault(parent, []).append(pid)
    found = []
    pending = list(roots)
    while pending:
        pid = pending.pop(0)
        if pid in found:
            continue
        found.append(pid)
        pending.extend(children.get(pid, []))
    return found


def cpu_ticks(pid: int) -> int | None:
    """Return user plus system CPU time of ``pid`` in clock ticks, or None when it has exited."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[11]) + int(fields[12])


def wait_until_idle(roots: Callable[[], list[int]], check_running: Callable[[], None], ready_count: Callable[[], int],
                    expected: int, timeout_s: float) -> None:
    """Wait until ``ready_count()`` reaches ``expected`` and the process tree of ``roots()`` is idle for two samples in a row.

    A process is idle when it used under IDLE_CPU_SHARE of a core over one
    IDLE_SAMPLE_S sample, read from /proc. A process that appeared since the
    last sample counts as busy. ``check_running`` raises WorkerError when a
    worker has exited. Raises WorkerError when ``timeout_s`` passes first.
    """
    ticks_per_s = os.sysconf("SC_CLK_TCK")
    busy_limit = IDLE_CPU_SHARE * IDLE_SAMPLE_S * ticks_per_s
    deadline = time.monotonic() + timeout_s
    previous = {pid: cpu_ticks(pid) for pid in descendants(roots())}
    idle_samples = 0
    while time.monotonic() < deadline:
        time.sleep(IDLE_SAMPLE_S)
        check_running()
        current = {pid: cpu_ticks(pid) for pid in descendants(roots())}
        busy = [pid for pid, ticks in current.items()
                if ticks is not None and (previous.get(pid) is None or ticks - previous[pid] > busy_limit)]
        idle_samples = 0 if busy else idle_samples + 1
        previous = current
        if idle_samples >= IDLE_SAMPLES_NEEDED and ready_count() >= expected:
            return
    raise WorkerError(f"workers were not ready and idle within {timeout_s:g} s ({ready_count()} of {expected} ready markers)")


@dataclass
class WorkerGroup:
    """The processes started for one run, and the log file that contains their output."""

    log_path: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    started_at: float = 0.0  # unix seconds, taken right before the first process is started

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def start(self, commands: list[list[str]], *, env: dict[str, str], cwd: Path) -> None:
        with open(self.log_path, "ab") as log:
            self.started_at = time.time()
            for command in commands:
                process = subprocess.Popen(command, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True)
                self.processes.append(process)
        logger.debug("started worker processes pids=%s", self.pids)

    def exited(self) -> list[int]:
        """Return the exit codes of started processes that have already exited."""
        return [code for code in (process.poll() for process in self.processes) if code is not None]

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.strip().splitlines()[-lines:])

    def wait_until_ready(self, ready_count: Callable[[], int], expected: int, timeout_s: float) -> None:
        """Wait until ``ready_count()`` reaches ``expected`` and every process of the tree is idle; see :func:`wait_until_idle`."""
        wait_until_idle(lambda: self.pids, self._check_running, ready_count, expected, timeout_s)

    def _check_running(self) -> None:
        if self.exited():
            raise WorkerError(f"worker processes exited while starting up (codes {self.exited()}); log tail:\n{self.log_tail()}")

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop every started process and its descendants: SIGTERM to the started PIDs, then SIGKILL to what is left."""
        tree = _identities(descendants([process.pid for process in self.processes if process.poll() is None]))
        for process in self.processes:
            if process.poll() is None:
                _signal_pid(process.pid, signal.SIGTERM)

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(process.poll() is not None for process in self.processes) and not _still_running(tree):
                break
            time.sleep(0.05)
        else:
            # Look again: a worker may have started new children since the first look.
            tree.update(_identities(descendants([process.pid for process in self.processes if process.poll() is None])))
            left = _still_running(tree)
            logger.warning("worker processes still running %g s after SIGTERM: sending SIGKILL to pids %s", timeout_s, left)
            for pid in left:
                _signal_pid(pid, signal.SIGKILL)
        for process in self.processes:
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                raise WorkerError(f"worker pid {process.pid} did not exit after SIGKILL") from None
        self.processes.clear()


def _signal_pid(pid: int, signum: signal.Signals) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass  # it has exited in the meantime


def _stat_fields(pid: int) -> list[str] | None:
    """Return the fields of /proc/PID/stat after the command name (field 3 onwards), or None when it has exited."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _identities(pids: list[int]) -> dict[int, str]:
    """Map each PID to its start time (field 22 of /proc/PID/stat), which distinguishes a reused PID from the original."""
    identities = {}
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            identities[pid] = fields[19]
    return identities


def _still_running(identities: dict[int, str]) -> list[int]:
    """Return the PIDs that still run as the same process; a zombie (exited, not yet reaped) counts as gone."""
    running = []
    for pid, start_time in sorted(identities.items()):
        fields = _stat_fields(pid)
        if fields is not None and fields[19] == start_time and fields[0] != "Z":
            running.append(pid)
    return running
