"""The per-task context handed to a handler."""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .errors import ConfigError

if TYPE_CHECKING:
    import httpx

    from .task import Task


@functools.cache
def select_device(requested: str = "auto") -> str:
    """Resolve ``auto`` to ``cuda`` when torch finds a GPU, else ``cpu``; other values pass through.

    torch is imported only here, so workloads that never ask for a device do not pay for it.
    """
    if requested != "auto":
        return requested
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def validate_device(requested: str) -> None:
    """Reject a device name torch cannot use here, before any task is claimed."""
    if requested in ("auto", "cpu"):
        return
    if not re.fullmatch(r"cuda(:\d+)?", requested):
        raise ConfigError(f"invalid device {requested!r}: use auto, cpu, cuda or cuda:N")
    try:
        import torch
    except ImportError:
        raise ConfigError(f"device {requested!r} needs torch: install qworker[torch] with a CUDA build") from None
    if not torch.cuda.is_available():
        raise ConfigError(
            f"device {requested!r} is not available: torch {torch.__version__} sees no CUDA GPU;"
            " use --device auto or cpu, or install a CUDA build of torch"
        )
    index = int(requested.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device {requested!r} not found: this machine has {torch.cuda.device_count()} CUDA devices")


@dataclass
class TaskContext:
    """Per-task context of a handler: device, HTTP client, logger and scratch folder.

    ``scratch_dir`` (``scratch_root / task_id``) is created on first use and
    removed after the task finishes. ``http`` is one client shared by every slot of the consumer process.
    """

    task: Task
    logger: logging.LoggerAdapter
    scratch_root: Path
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
    def scratch_path(self) -> Path:
        return self.scratch_root / self.task.task_id

    @property
    def scratch_dir(self) -> Path:
        if not self.scratch_created:
            self.scratch_path.mkdir(parents=True, exist_ok=True)
            self.scratch_created = True
        return self.scratch_path
