"""Where a data directory keeps the queue file, results, scratch folders and logs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DATA_DIR = Path(os.environ.get("QWORKER_DATA_DIR", "qworker-data"))


@dataclass(frozen=True)
class Layout:
    """Paths under one data directory::

        qworker.db            the embedded queue (SQLite)
        results/<queue>/      parquet results, see qworker.results
        scratch/              per-task scratch folders
        logs/                 consumer logs written by ``qworker demo``
    """

    data_dir: Path

    @property
    def db_path(self) -> Path:
        return self.data_dir / "qworker.db"

    def results_dir(self, queue: str) -> Path:
        return self.data_dir / "results" / queue

    @property
    def scratch_dir(self) -> Path:
        return self.data_dir / "scratch"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"
