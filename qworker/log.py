"""Logging set-up shared by the CLI and consumer processes."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s %(message)s"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def configure_logging(level: str = "INFO", file: Path | None = None) -> None:
    """Send qworker's log lines to ``file`` (appending) or to standard error."""
    handler: logging.Handler
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # httpx logs every request at INFO with its full URL, query string included,
    # which may hold credentials, and one line per request is noise in any case.
    logging.getLogger("httpx").setLevel(logging.WARNING)
