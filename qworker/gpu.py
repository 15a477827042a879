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
from types import ModuleType
from typing import Any, AsyncIterator, Callable, Mapping

import anyio

from .context import select_device
from .task import validate_gpu_memory

logger = logging.getLogger("qworker.gpu")

# Share of the GPU's free memory that admitted estimates may fill. The rest is
# left for allocator fragmentation and for estimates that are too low.
ADMISSION_SHARE = 0.9
GIB = 1024**3


def is_out_of_memory(exc: BaseException) -> bool:
    """Return whether ``exc`` is torch's out-of-memory error (``torch.OutOfMemoryError``, also ``torch.cuda.OutOfMemoryError``)."""
    torch = _loaded_torch()
    if torch is None:
        return False
    error_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return error_type is not None and isinstance(exc, error_type)


def free_cached_memory() -> None:
    """Collect garbage and return torch's cached CUDA blocks to the driver, where CUDA is in use."""
    gc.collect()
    torch = _loaded_torch()
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _loaded_torch() -> ModuleType | None:
    """Return torch if some code has started importing it, else None, so this module never loads it first.

    Another slot's thread may be importing torch right now, and the module in
    ``sys.modules`` is then still partly initialised. ``import`` waits for
    that import to finish.
    """
    if "torch" not in sys.modules:
        return None
    import torch

    return torch


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
    """Admits tasks into the slots of the consumers that share one device.

    A task with a memory estimate is admitted while the estimates in use
    leave room for it within ``capacity_bytes`` (no limit when None). A task
    whose estimate exceeds the capacity is admitted once no other estimate
    is in use, so it runs alone rather than never. A task admitted ``alone``
    (a solo-lane task) waits until nothing else runs and keeps every other
    task out until it ends. Waiters are admitted in arrival order, so a large
    or solo task is not starved by a stream of small ones.

    ``measure_capacity``, called on the first task with an estimate, sets the
    capacity from the device, so a gate of tasks without estimates never imports torch.
    """

    def __init__(
        self, capacity_bytes: int | None = None, *, measure_capacity: Callable[[], int | None] | None = None
    ) -> None:
        if capacity_bytes is not None and capacity_bytes <= 0:
            raise ValueError(f"invalid capacity_bytes {capacity_bytes}: must be positive")
        self.capacity_bytes = capacity_bytes
        self._measure_capacity = measure_capacity
        self.in_use_bytes = 0
        self.running = 0
        self._alone = False
        self._waiting: list[int] = []  # ticket numbers in arrival order
        self._next_ticket = 0
        self._changed: anyio.Event | None = None

    @asynccontextmanager
    async def admit(self, estimate_bytes: int | None, *, alone: bool = False) -> AsyncIterator[None]:
        """Wait until the task may run, hold its share while the body runs, then give it back."""
        estimate = estimate_bytes or 0
        if self._waiting or not self._fits(estimate, alone):
            await self._wait_turn(estimate, alone)

        self.in_use_bytes += estimate
        self.running += 1
        self._alone = alone
        try:
            yield
        finally:
            self.in_use_bytes -= estimate
            self.running -= 1
            self._alone = False
            self._notify()

    async def _wait_turn(self, estimate: int, alone: bool) -> None:
        ticket = self._next_ticket
        self._next_ticket += 1
        self._waiting.append(ticket)
        try:
            while self._waiting[0] != ticket or not self._fits(estimate, alone):
                if self._changed is None:
                    self._changed = anyio.Event()
                await self._changed.wait()
        finally:
            self._waiting.remove(ticket)
            self._notify()

    def _fits(self, estimate: int, alone: bool) -> bool:
        if self._alone:
            return False
        if alone:
            return self.running == 0
        if estimate == 0 or self.in_use_bytes == 0:
            return True
        if self._measure_capacity is not None:
            self.capacity_bytes, self._measure_capacity = self._measure_capacity(), None
        return self.capacity_bytes is None or self.in_use_bytes + estimate <= self.capacity_bytes

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None


def make_memory_gate(requested_device: str, limit_gb: float | None) -> MemoryGate:
    """Return the gate for consumers on ``requested_device``: ``limit_gb`` GiB if given, else a share of free GPU memory.

    The GPU is measured when the first task with an estimate arrives. On a
    CPU device with no limit, the gate has no capacity: estimates are
    ignored, and it only lets solo-lane tasks run alone.
    """
    if limit_gb is not None:
        return MemoryGate(int(limit_gb * GIB))
    if requested_device == "cpu":
        return MemoryGate(None)
    return MemoryGate(None, measure_capacity=lambda: _admission_capacity(requested_device))


def _admission_capacity(requested_device: str) -> int | None:
    device = select_device(requested_device)
    free = free_memory_bytes(device)
    if free is None:
        logger.info("no GPU memory gate on device=%s: memory estimates are ignored", device)
        return None
    logger.info("GPU memory gate device=%s capacity_gb=%.2f", device, free * ADMISSION_SHARE / GIB)
    return int(free * ADMISSION_SHARE)
