"""GPU memory: recognising out-of-memory errors, freeing the cache, and admitting tasks by memory estimate.

Several slots of one consumer share a GPU. A task that runs out of memory
there is not at fault: the consumer frees what it can and moves the task to
the ``solo`` lane. A task that states its need in its config
(``gpu_memory_gb``, in GiB) is admitted into a slot only while the estimates of the
running tasks leave room for it, so such tasks wait instead of failing.

torch is imported only when it is already loaded or a CUDA device is used, so
CPU-only workloads never pay for it.
"""

from __future__ import annotations

import gc
import logging
import sys
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Mapping

import anyio

from .task import validate_gpu_memory

logger = logging.getLogger("qworker.gpu")

# Share of the GPU's free memory that admitted estimates may fill. The rest is
# left for allocator fragmentation and for estimates that are too low.
ADMISSION_SHARE = 0.9
GIB = 1024**3


def is_out_of_memory(exc: BaseException) -> bool:
    """Return whether ``exc`` is torch's out-of-memory error (``torch.OutOfMemoryError``, also ``torch.cuda.OutOfMemoryError``)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    error_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return error_type is not None and isinstance(exc, error_type)


def free_cached_memory() -> None:
    """Collect garbage and return torch's cached CUDA blocks to the driver, where CUDA is in use."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def memory_estimate_bytes(config: Mapping[str, Any]) -> int | None:
    """Return the task's GPU memory estimate in bytes, or None when its config gives none.

    Raises TaskValidationError for a value that is not a positive number of GiB.
    """
    estimate_gb = validate_gpu_memory(config)
    return None if estimate_gb is None else int(estimate_gb * GIB)


def free_memory_bytes(device: str) -> int | None:
    """Return the free memory of CUDA ``device`` in bytes, or None for a device that is not CUDA."""
    if not device.startswith("cuda"):
        return None
    import torch

    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return free


class MemoryGate:
    """Admits tasks into slots while the sum of their memory estimates fits ``capacity_bytes``.

    A task with no estimate is admitted at once and counts as zero. A task
    whose estimate exceeds the capacity is admitted once no other estimate is
    in use, so it runs alone rather than never. Waiters are admitted in
    arrival order, so a large task is not starved by a stream of small ones.
    """

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"invalid capacity_bytes {capacity_bytes}: must be positive")
        self.capacity_bytes = capacity_bytes
        self.in_use_bytes = 0
        self._waiting: list[int] = []  # ticket numbers in arrival order
        self._next_ticket = 0
        self._changed = anyio.Event()

    @asynccontextmanager
    async def admit(self, estimate_bytes: int | None) -> AsyncIterator[None]:
        """Wait until the estimate fits, hold it while the body runs, then give it back."""
        if not estimate_bytes:
            yield
            return

        ticket = self._next_ticket
        self._next_ticket += 1
        self._waiting.append(ticket)
        try:
            while not self._fits(ticket, estimate_bytes):
                changed = self._changed
                await changed.wait()
        finally:
            self._waiting.remove(ticket)
            self._notify()

        self.in_use_bytes += estimate_bytes
        try:
            yield
        finally:
            self.in_use_bytes -= estimate_bytes
            self._notify()

    def _fits(self, ticket: int, estimate_bytes: int) -> bool:
        if self._waiting[0] != ticket:
            return False
        return self.in_use_bytes == 0 or self.in_use_bytes + estimate_bytes <= self.capacity_bytes

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()


def make_memory_gate(device: str, limit_gb: float | None) -> MemoryGate | None:
    """Return the gate for a consumer on ``device``: ``limit_gb`` GiB if given, else a share of the GPU's free memory.

    Returns None on a CPU device with no limit, where estimates are ignored.
    """
    if limit_gb is not None:
        return MemoryGate(int(limit_gb * GIB))
    free = free_memory_bytes(device)
    if free is None:
        return None
    logger.info("GPU memory gate device=%s capacity_gb=%.2f", device, free * ADMISSION_SHARE / GIB)
    return MemoryGate(int(free * ADMISSION_SHARE))
