"""The per-task context handed to a handler."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import httpx

    from .task import Task


@functools.cache
def select_device(requested: str = "auto") -> str:
    """Resolve ``auto`` to ``cuda`` when torch sees a GPU, else ``cpu``; other values pass through.

    torch is imported only here, so workloads that never ask for a device do not pay for it.
    """
    if requested != "auto":
        return requested
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class TaskContext:
    """What a handler gets besides its task: device, HTTP client, logger and scratch folder.

    ``scratch_dir`` is created on first use and removed after the task
    finishes. ``http`` is one client shared by every slot of the consumer process.
    """

    task: Task
    logger: logging.LoggerAdapter
    scratch_path: Path
    requested_device: str
    http_factory: Callable[[], httpx.AsyncClient]
    scratch_created: bool = False

    @property
    def device(self) -> str:
        return select_device(self.requested_device)

    @property
    def http(self) -> httpx.AsyncClient:
        return self.http_factory()

    @property
    def scratch_dir(self) -> Path:
        if not self.scratch_created:
            self.scratch_path.mkdir(parents=True, exist_ok=True)
            self.scratch_created = True
        return self.scratch_path
