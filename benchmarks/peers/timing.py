"""Timings of one run, and the exception for a run that failed."""

from __future__ import annotations

from dataclasses import dataclass

POLL_S = 0.05  # how often the harness reads the count files or the queue file


class RunFailed(RuntimeError):
    """A run that timed out, lost its workers or could not start; ``done`` tasks had finished by then."""

    def __init__(self, message: str, *, done: int, timed_out: bool = False) -> None:
        super().__init__(message)
        self.done = done
        self.timed_out = timed_out


@dataclass(frozen=True)
class RunTiming:
    """One finished run. Times are unix seconds.

    ``started_at`` is the timer start: the first push (end to end) or the
    start of the worker processes (drain). ``first_finish`` and
    ``last_finish`` are the earliest and latest task finish times.
    """

    tasks: int
    done: int
    started_at: float
    first_finish: float
    last_finish: float
    push_s: float | None = None  # seconds the producer took to push every task, where measured

    @property
    def elapsed_s(self) -> float:
        return self.last_finish - self.started_at

    @property
    def tasks_per_s(self) -> float:
        return self.tasks / self.elapsed_s

    @property
    def startup_s(self) -> float:
        """Seconds from the timer start to the first finished task: process start-up, polling delay, first claim."""
        return self.first_finish - self.started_at
