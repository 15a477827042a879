"""Exceptions raised by qworker.

Every error a user can cause derives from :class:`QworkerError`, so the CLI can
print its message as one line and exit non-zero without a traceback.
"""

from __future__ import annotations


class QworkerError(Exception):
    """Base class of every error qworker raises on purpose."""


class ConfigError(QworkerError):
    """Raised when a job config, a task config or a setting is missing a key or has an invalid value."""


class TaskValidationError(QworkerError):
    """Raised when a task's seed, config, id or lane is invalid."""


class SeedRangeError(QworkerError):
    """Raised when a seed range such as ``0:500`` cannot be parsed."""


class UnknownWorkloadError(QworkerError):
    """Raised when a workload name or ``module:function`` path does not resolve to a handler."""


class QueueFileError(QworkerError):
    """Raised when the queue database cannot be opened or is not a qworker queue."""


class QueueNotFoundError(QworkerError):
    """Raised when a command names a queue that has never received a task."""


class ResultError(QworkerError):
    """Raised when a handler returns rows that cannot be written as a parquet result."""


class TaskTooLargeError(QworkerError):
    """Raised when a task's JSON form exceeds the backend's item size limit; nothing is sent."""


class QueueFullError(QworkerError):
    """Raised when a producer waited its whole backpressure timeout for room in a full queue."""


class PermanentTaskError(QworkerError):
    """Raised by a handler (or ``ctx.http``) for a failure that another attempt cannot fix.

    The consumer moves the task to the dead letters at once instead of retrying it.
    """


class RetryableHTTPError(Exception):
    """Raised by ``ctx.http`` for a 429, a 5xx, or a connect or read timeout.

    The task is retried with backoff, and the attempt counts against its ``max_attempts``.
    """


class PermanentHTTPError(PermanentTaskError):
    """Raised by ``ctx.http`` for a 4xx other than 429: the request itself is wrong."""
