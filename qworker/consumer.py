"""The consumer: claims tasks, runs the handler in several slots and settles each task.

One consumer runs in one process (or Modal container) on an anyio event loop:

* the claimer leases tasks in batches into a bounded prefetch buffer;
* each slot takes a task from the buffer, runs the handler (async handlers on
  the loop, sync ones in a worker thread), converts its rows and hands them
  to the sink;
* the sink writes results and reports them durable; only then is the task
  acked;
* the settler records acks, retries and dead letters in batches;
* the lease keeper extends every held lease well before it expires, so a task
  that runs longer than its lease never starts a second copy;
* a task that runs out of GPU memory beside other tasks is moved to the
  ``solo`` lane without counting the attempt, and a task whose config gives a
  GPU memory estimate waits for a slot until the estimate fits (``gpu.py``).

Stopping (SIGTERM, SIGINT, :meth:`Consumer.stop`, or an empty queue in burst
mode) stops claiming, releases the tasks still in the buffer, gives running
tasks ``grace_s`` seconds to finish, releases those that do not, flushes the
sink and the settler, and logs a summary.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import shutil
import signal
import tempfile
import socket
import time
import traceback as traceback_module
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import anyio
import anyio.abc
import anyio.to_thread

from .context import TaskContext
from .errors import ConfigError, PermanentTaskError, TaskValidationError
from .gpu import MemoryGate, free_cached_memory, is_out_of_memory, make_memory_gate, memory_estimate_bytes
from .http_settings import HttpSettings
from .queue import DeadLetter, Lease, OomMove, Retry, TaskQueue
from .ratelimit import GlobalBucket, RateLimiter
from .results import result_table
from .retry import Backoff
from .sink import CommitBatcher, FileSink, SegmentSink, SinkSettings
from .task import DEFAULT_LANE, SOLO_LANE
from .workloads.base import Workload

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger("qworker.consumer")

# Weight of the newest task in the moving average of task durations.
DURATION_SMOOTHING = 0.05
# Seconds to wait before settling again after the backend raised an error.
BACKEND_RETRY_S = 1.0


@dataclass(frozen=True)
class ConsumerSettings:
    """Settings of one consumer process. Times are in seconds."""

    slots: int = 4
    prefetch: int | None = None  # tasks leased ahead of a free slot; None adapts it to task duration
    claim_batch: int = 100
    lease_s: float = 30.0
    grace_s: float = 30.0
    poll_min_s: float = 0.01
    poll_max_s: float = 0.5
    settle_interval_s: float = 0.01
    health_interval_s: float = 30.0
    lane: str = DEFAULT_LANE
    burst: bool = False
    device: str = "auto"
    gpu_memory_limit_gb: float | None = None  # memory that task estimates may fill; None: 90% of the GPU's free memory
    backoff: Backoff = field(default_factory=Backoff)
    sink: SinkSettings = field(default_factory=SinkSettings)
    scratch_root: Path | None = None
    http: HttpSettings = field(default_factory=HttpSettings)

    prefetch_target_s: float = 0.05  # with adaptive prefetch: seconds of work to hold ahead of the slots

    def for_solo_lane(self) -> ConsumerSettings:
        """Return these settings for a solo-lane consumer: one slot and nothing leased ahead, so each task runs alone."""
        return replace(self, lane=SOLO_LANE, slots=1, prefetch=0)


@dataclass(frozen=True)
class ConsumerStats:
    """Counters of one consumer since it started."""

    owner: str
    claimed: int
    done: int
    retried: int
    dead: int
    released: int
    lost_leases: int
    running: int
    buffered: int
    uptime_s: float
    rate_limit_waiting: int = 0  # requests of this process waiting for a rate limit token
    oom_moves: int = 0  # tasks moved to the solo lane after running out of GPU memory

    def as_log_fields(self) -> str:
        return (
            f"owner={self.owner} claimed={self.claimed} done={self.done} retried={self.retried} dead={self.dead}"
            f" released={self.released} oom_moves={self.oom_moves} lost_leases={self.lost_leases} running={self.running}"
            f" buffered={self.buffered} rate_limit_waiting={self.rate_limit_waiting} uptime_s={self.uptime_s:.0f}"
        )


def make_owner_id() -> str:
    """Return an id unique to this consumer: host, pid and a random suffix."""
    return f"{socket.gethostname()[:24]}.{os.getpid()}.{uuid.uuid4().hex[:6]}"


class Consumer:
    """Runs a workload's handler over the tasks of one queue lane."""

    def __init__(
        self,
        queue: TaskQueue,
        workload: Workload,
        results_dir: Path,
        settings: ConsumerSettings | None = None,
        *,
        owner: str | None = None,
        commit: Callable[[], Awaitable[None]] | None = None,
        bucket: GlobalBucket | None = None,
        memory_gate: MemoryGate | None = None,
    ) -> None:
        """``commit`` makes written results visible and durable, as ``modal.Volume.commit`` does.

        With it, tasks are acked only after a commit that covers their results.
        ``bucket`` is the rate limit bucket shared with other processes; it is
        needed when ``settings.http`` has budgets. ``memory_gate`` admits tasks
        by GPU memory estimate and runs solo-lane tasks alone. Pass one gate to
        every consumer that shares a device in one event loop. Without it, the
        consumer makes its own.
        """
        self.queue = queue
        self.workload = workload
        self.results_dir = results_dir
        self.settings = settings or ConsumerSettings()
        self.owner = owner or make_owner_id()
        self._is_async = inspect.iscoroutinefunction(workload.handler)

        self._pending_acks: list[Lease] = []
        self._pending_retries: list[Retry] = []
        self._pending_dead: list[DeadLetter] = []
        self._pending_releases: list[Lease] = []
        self._pending_oom_moves: list[OomMove] = []
        self._held: dict[str, Lease] = {}  # every lease not yet settled, by task id
        self._running: dict[str, anyio.CancelScope] = {}
        self._buffered = 0
        self._average_task_s: float | None = None
        self._counts = {
            "claimed": 0, "done": 0, "retried": 0, "dead": 0, "released": 0, "oom_moves": 0, "lost_leases": 0,
        }
        self._started = time.monotonic()

        self._stopping = anyio.Event()
        self._slot_freed = anyio.Event()
        self._thread_limiter = anyio.CapacityLimiter(self.settings.slots)
        self._http: httpx.AsyncClient | None = None
        self.settings.http.headers()  # a missing credential variable fails here, before any task is claimed
        self.rate_limiter = self._make_rate_limiter(bucket)
        self._committer = CommitBatcher(commit, self._on_durable, self.settings.sink) if commit else None
        self._sink = self._make_sink()
        self._task_logger = logging.getLogger(f"qworker.task.{workload.name}")
        scratch_root = self.settings.scratch_root or Path(tempfile.gettempdir()) / "qworker-scratch"
        self._scratch_dir = scratch_root / self.owner
        self._memory_gate = memory_gate  # made in run() unless shared
        self._burst_follows: Consumer | None = None
        self.finished = False  # set once run() has returned

    def _make_rate_limiter(self, bucket: GlobalBucket | None) -> RateLimiter | None:
        budgets = self.settings.http.budgets
        if not budgets:
            return None
        if bucket is None:
            raise ConfigError("rate limit budgets need a shared bucket: pass bucket= to the Consumer")
        return RateLimiter(bucket, budgets)

    def _make_sink(self) -> FileSink | SegmentSink:
        sink_settings = self.settings.sink
        on_written = self._committer.add if self._committer else self._on_durable
        if sink_settings.batch_rows > 0:
            return SegmentSink(self.results_dir, on_written, self.owner, sink_settings)
        return FileSink(self.results_dir, on_written, fsync=sink_settings.fsync)

    # -- public ----------------------------------------------------------

    def stop(self) -> None:
        """Ask the consumer to stop claiming and shut down gracefully."""
        if not self._stopping.is_set():
            logger.info("consumer stopping owner=%s grace_s=%.0f", self.owner, self.settings.grace_s)
            self._stopping.set()

    def stats(self) -> ConsumerStats:
        return ConsumerStats(
            owner=self.owner,
            **self._counts,
            running=len(self._running),
            buffered=self._buffered,
            uptime_s=time.monotonic() - self._started,
            rate_limit_waiting=self._rate_limit_waiting(),
        )

    def _rate_limit_waiting(self) -> int:
        if self.rate_limiter is None:
            return 0
        try:
            return sum(self.rate_limiter.waiting(name) for name in self.rate_limiter.budgets)
        except RuntimeError:  # no running event loop, so nothing can be waiting
            return 0

    async def run(self, *, handle_signals: bool = False) -> ConsumerStats:
        """Consume until stopped (or, in burst mode, until the queue is empty); return the final counters."""
        settings = self.settings
        logger.info(
            "consumer started owner=%s queue=%s lane=%s workload=%s slots=%d prefetch=%s lease_s=%.0f burst=%s",
            self.owner, self.queue.name, settings.lane, self.workload.name, settings.slots,
            "adaptive" if settings.prefetch is None else settings.prefetch, settings.lease_s, settings.burst,
        )
        self._started = time.monotonic()
        if self._memory_gate is None:
            self._memory_gate = make_memory_gate(settings.device, settings.gpu_memory_limit_gb)
        try:
            async with anyio.create_task_group() as services:
                services.start_soon(self._keep_leases)
                services.start_soon(self._settle_periodically)
                services.start_soon(self._log_health)
                services.start_soon(self._sink.run)
                if self._committer is not None:
                    services.start_soon(self._committer.run)
                if handle_signals:
                    services.start_soon(self._watch_signals)

                await self._consume()

                await self._flush_results()
                await self._flush_settlements()
                services.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._release_unsettled()
                if self._http is not None:
                    await self._http.aclose()

        final = self.stats()
        self.finished = True
        logger.info("consumer stopped %s", final.as_log_fields())
        return final

    # -- claiming and running --------------------------------------------

    async def _consume(self) -> None:
        send, receive = anyio.create_memory_object_stream[Lease](max_buffer_size=math.inf)
        async with anyio.create_task_group() as slots:
            for _ in range(self.settings.slots):
                slots.start_soon(self._run_slot, receive.clone())
            receive.close()
            async with send:
                await self._claim_loop(send)
            await self._finish_running_within_grace()

    async def _claim_loop(self, send: anyio.abc.ObjectSendStream[Lease]) -> None:
        settings = self.settings
        poll_s = settings.poll_min_s

        while not self._stopping.is_set():
            free = settings.slots + self._prefetch() - self._buffered - len(self._running)
            if free <= 0:
                await self._wait_for_slot()
                continue

            try:
                leases = await self.queue.claim(self.owner, min(free, settings.claim_batch), settings.lease_s, settings.lane)
            except Exception as exc:
                logger.error("claim failed owner=%s queue=%s, retrying in %.1f s: %s", self.owner, self.queue.name,
                             BACKEND_RETRY_S, exc, exc_info=True)
                with anyio.move_on_after(BACKEND_RETRY_S):
                    await self._stopping.wait()
                continue
            if leases:
                poll_s = settings.poll_min_s
                for lease in leases:
                    self._on_claimed(lease)
                    send.send_nowait(lease)
                continue

            if self._held and not self._running and not self._buffered:
                await self._flush_results()
            if settings.burst and self._may_exit_burst() and not await self.queue.has_pending(settings.lane):
                logger.info("queue drained, burst consumer exiting owner=%s", self.owner)
                self.stop()
                break
            with anyio.move_on_after(poll_s):
                await self._stopping.wait()
            poll_s = min(settings.poll_max_s, poll_s * 2)

    def follow_in_burst(self, other: Consumer) -> None:
        """Keep this consumer claiming in burst mode until ``other`` has stopped.

        A solo-lane consumer follows the default-lane consumer of its process
        this way: until that one stops, any of its tasks may still run out of
        memory and move to the solo lane.
        """
        self._burst_follows = other

    def _may_exit_burst(self) -> bool:
        return not self._held and (self._burst_follows is None or self._burst_follows.finished)

    async def _flush_results(self) -> None:
        """Write buffered results and commit them now: with nothing to claim, waiting for the timers only adds latency."""
        await self._sink.flush()
        if self._committer is not None:
            await self._committer.commit()

    def _prefetch(self) -> int:
        """Return how many tasks to lease ahead of the slots.

        Unless set, prefetch holds about ``prefetch_target_s`` seconds of work,
        judged by a moving average of task durations: short tasks are claimed
        up to ``claim_batch`` at a time so one claim serves many tasks, while
        long tasks keep only ``slots`` leased ahead, leaving the rest to other
        consumers.
        """
        settings = self.settings
        if settings.prefetch is not None:
            return settings.prefetch
        if self._average_task_s is None:
            return settings.slots
        wanted = settings.slots * settings.prefetch_target_s / max(self._average_task_s, 1e-6)
        return int(min(max(wanted, settings.slots), max(settings.claim_batch, settings.slots)))

    def _record_duration(self, duration_s: float) -> None:
        if self._average_task_s is None:
            self._average_task_s = duration_s
        else:
            self._average_task_s += DURATION_SMOOTHING * (duration_s - self._average_task_s)

    def _on_claimed(self, lease: Lease) -> None:
        self._held[lease.task_id] = lease
        self._buffered += 1
        self._counts["claimed"] += 1
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "task claimed id=%s attempt=%d wait_ms=%.0f",
                lease.task_id, lease.task.attempt, _wait_ms(lease),
            )

    async def _finish_running_within_grace(self) -> None:
        """Give running tasks ``grace_s`` seconds to finish, then interrupt them (they are released)."""
        with anyio.move_on_after(self.settings.grace_s):
            while self._running:
                await anyio.sleep(0.02)
        if self._running:
            logger.warning("grace period of %.0f s over, interrupting %d running tasks", self.settings.grace_s, len(self._running))
            self._interrupt_running()

    def _interrupt_running(self) -> None:
        for scope in self._running.values():
            scope.cancel()

    async def _wait_for_slot(self) -> None:
        self._slot_freed = anyio.Event()
        with anyio.move_on_after(self.settings.poll_max_s):
            await self._slot_freed.wait()

    async def _run_slot(self, receive: anyio.abc.ObjectReceiveStream[Lease]) -> None:
        async with receive:
            async for lease in receive:
                self._buffered -= 1
                if self._stopping.is_set():
                    self._queue_release(lease)
                    continue
                await self._run_task(lease)
                self._slot_freed.set()

    async def _run_task(self, lease: Lease) -> None:
        task = lease.task
        started = time.time()
        if task.attempt > 1 and self._sink.has_result(task.task_id):
            logger.info("task done id=%s attempt=%d result=existing", task.task_id, task.attempt)
            await self._on_durable([lease])
            return

        if task.task_id in self._running:
            # On Modal a task can be delivered again while its first delivery
            # still runs here; the running copy settles it.
            logger.warning("task already running id=%s attempt=%d: skipping this delivery", task.task_id, task.attempt)
            return

        scope = anyio.CancelScope()
        self._running[task.task_id] = scope
        context = self._make_context(lease)
        try:
            with scope:
                async with self._admit(task.config):
                    rows = await self._call_handler(context)
                table = result_table(task.task_id, rows)
            if scope.cancelled_caught:
                logger.warning("task interrupted id=%s attempt=%d: grace period over, releasing", task.task_id, task.attempt)
                self._queue_release(lease)
                return
        except Exception as exc:  # noqa: BLE001 - any handler error settles the task, never the consumer
            self._on_failed(lease, exc, time.time() - started)
            return
        finally:
            del self._running[task.task_id]
            _remove_scratch(context)

        duration_s = time.time() - started
        self._record_duration(duration_s)
        await self._sink.store(lease, table)
        if logger.isEnabledFor(logging.INFO):
            logger.info(
                "task done id=%s attempt=%d wait_ms=%.0f duration_ms=%.1f rows=%d",
                task.task_id, task.attempt, _wait_ms(lease), duration_s * 1000, 1 if table is None else table.num_rows,
            )

    def _admit(self, config: Any) -> contextlib.AbstractAsyncContextManager[None]:
        """Return the admission of a task with this config into the device that this consumer shares."""
        assert self._memory_gate is not None, "run() makes the gate before any task runs"
        return self._memory_gate.admit(memory_estimate_bytes(config), alone=self.settings.lane == SOLO_LANE)

    async def _call_handler(self, context: TaskContext) -> Any:
        handler = self.workload.handler
        if self._is_async:
            return await handler(context.task, context)
        return await anyio.to_thread.run_sync(
            handler, context.task, context, limiter=self._thread_limiter, abandon_on_cancel=True
        )

    def _make_context(self, lease: Lease) -> TaskContext:
        return TaskContext(
            task=lease.task,
            logger=logging.LoggerAdapter(self._task_logger, {"task_id": lease.task_id}),
            scratch_root=self._scratch_dir,
            requested_device=self.settings.device,
            http_factory=self._http_client,
        )

    def _http_client(self) -> httpx.AsyncClient:
        if self._http is None:
            from .http import make_http_client  # imports httpx, which handlers without ctx.http never need

            self._http = make_http_client(self.settings.http, self.rate_limiter)
        return self._http

    # -- outcomes --------------------------------------------------------

    def _on_failed(self, lease: Lease, exc: Exception, duration_s: float) -> None:
        task = lease.task
        error = f"{type(exc).__name__}: {exc}"
        trace = "".join(traceback_module.format_exception(exc))
        if is_out_of_memory(exc):
            _free_memory_after(exc)
            if task.lane != SOLO_LANE:
                self._move_to_solo(lease, error, trace, duration_s)
                return
        if task.attempt >= task.max_attempts or isinstance(exc, (PermanentTaskError, TaskValidationError)):
            logger.error(
                "task dead id=%s attempt=%d/%d duration_ms=%.1f error=%s",
                task.task_id, task.attempt, task.max_attempts, duration_s * 1000, error,
            )
            self._counts["dead"] += 1
            self._pending_dead.append(DeadLetter(lease, error, trace))
        else:
            delay_s = self.settings.backoff.delay_s(task.attempt)
            logger.warning(
                "task retry id=%s attempt=%d/%d duration_ms=%.1f delay_s=%.2f error=%s",
                task.task_id, task.attempt, task.max_attempts, duration_s * 1000, delay_s, error,
            )
            self._counts["retried"] += 1
            self._pending_retries.append(Retry(lease, delay_s, error, trace))
        self._held.pop(task.task_id, None)

    def _move_to_solo(self, lease: Lease, error: str, trace: str, duration_s: float) -> None:
        task = lease.task
        logger.warning(
            "task moved to lane %s id=%s attempt=%d duration_ms=%.1f error=%s",
            SOLO_LANE, task.task_id, task.attempt, duration_s * 1000, error,
        )
        self._counts["oom_moves"] += 1
        self._pending_oom_moves.append(OomMove(lease, error, trace))
        self._held.pop(task.task_id, None)

    async def _on_durable(self, leases: Any) -> None:
        for lease in leases:
            self._held.pop(lease.task_id, None)
        self._pending_acks.extend(leases)
        self._counts["done"] += len(leases)

    def _queue_release(self, lease: Lease) -> None:
        self._held.pop(lease.task_id, None)
        self._pending_releases.append(lease)
        self._counts["released"] += 1

    async def _flush_settlements(self) -> None:
        if not (
            self._pending_acks or self._pending_retries or self._pending_dead or self._pending_releases
            or self._pending_oom_moves
        ):
            return
        acks, self._pending_acks = self._pending_acks, []
        retries, self._pending_retries = self._pending_retries, []
        dead, self._pending_dead = self._pending_dead, []
        releases, self._pending_releases = self._pending_releases, []
        oom_moves, self._pending_oom_moves = self._pending_oom_moves, []
        try:
            await self.queue.settle(acks=acks, retries=retries, dead=dead, releases=releases, oom_moves=oom_moves)
        except BaseException:
            # Keep the outcomes for the next round, also when shutdown cancels
            # this call: the final flush then writes them. Until then their
            # leases stay held, and if the backend stays down they expire and
            # the tasks run again. If the cancelled call had already written
            # them, the second write changes nothing on SQLite, which ignores
            # outcomes for leases no longer held. On Modal it rewrites the
            # same states, and a release sent twice delivers its task twice.
            self._pending_acks[:0] = acks
            self._pending_retries[:0] = retries
            self._pending_dead[:0] = dead
            self._pending_releases[:0] = releases
            self._pending_oom_moves[:0] = oom_moves
            raise

    async def _release_unsettled(self) -> None:
        """Return every lease still held (buffered or interrupted) and flush what is pending."""
        for lease in list(self._held.values()):
            self._queue_release(lease)
        self._buffered = 0
        try:
            await self._flush_settlements()
        except Exception:
            logger.exception("releasing leases failed owner=%s; they return to the queue when they expire", self.owner)

    # -- background loops --------------------------------------------------

    async def _settle_periodically(self) -> None:
        while True:
            await anyio.sleep(self.settings.settle_interval_s)
            try:
                await self._flush_settlements()
            except Exception as exc:
                logger.error("settling failed owner=%s acks=%d, retrying in %.1f s: %s", self.owner,
                             len(self._pending_acks), BACKEND_RETRY_S, exc, exc_info=True)
                await anyio.sleep(BACKEND_RETRY_S)

    async def _keep_leases(self) -> None:
        """Extend held leases every third of the lease time, so one missed round is harmless."""
        interval = self.settings.lease_s / 3
        while True:
            await anyio.sleep(interval)
            leases = list(self._held.values())
            if not leases:
                continue
            try:
                lost = await self.queue.extend(self.owner, leases, self.settings.lease_s)
            except Exception as exc:
                logger.error("extending %d leases failed owner=%s, retrying next round: %s",
                             len(leases), self.owner, exc, exc_info=True)
                continue
            for task_id in lost:
                if self._held.pop(task_id, None) is not None:
                    self._counts["lost_leases"] += 1
                    logger.warning("lease lost id=%s owner=%s: another consumer may run the task", task_id, self.owner)

    async def _log_health(self) -> None:
        while True:
            await anyio.sleep(self.settings.health_interval_s)
            logger.info("health %s", self.stats().as_log_fields())

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                self.handle_stop_signal(signum)

    def handle_stop_signal(self, signum: int) -> None:
        """Stop gracefully on the first SIGTERM or SIGINT; interrupt running tasks on the next."""
        name = signal.Signals(signum).name
        if not self._stopping.is_set():
            logger.info("received %s, stopping gracefully owner=%s", name, self.owner)
            self.stop()
        else:
            logger.warning("received %s again, interrupting %d running tasks", name, len(self._running))
            self._interrupt_running()


def _wait_ms(lease: Lease) -> float:
    return max(0.0, (lease.claimed_at - lease.task.enqueued_at) * 1000) if lease.task.enqueued_at else 0.0


def _free_memory_after(exc: BaseException) -> None:
    """Drop the local variables of the frames ``exc`` passed through, so their tensors can go, then free the CUDA cache."""
    traceback_module.clear_frames(exc.__traceback__)
    free_cached_memory()


def _remove_scratch(context: TaskContext) -> None:
    if context.scratch_created:
        shutil.rmtree(context.scratch_path, ignore_errors=True)
