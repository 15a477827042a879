"""The Modal app: GPU consumers, the launcher that starts them, and the reducer.

    modal deploy qworker/modal_app.py
    modal run qworker/modal_app.py --queue montecarlo --job producers/montecarlo.toml --seeds 0:500

Functions, all configured from ``qworker.modal_config`` (``FUNCTION_SETTINGS``):

* ``consume(queue)``: one input runs one consumer with one slot on the
  queue's default lane. ``@modal.concurrent`` lets ``max_inputs`` inputs share
  one container and its GPU. An input returns after ``idle_exit_s`` seconds
  without a task, so the app scales to zero.
* ``consume_solo(queue)``: the same for lane ``solo``, one input per
  container, for tasks that need a GPU to themselves (for example tasks that
  ran out of GPU memory next to another one).
* ``launch(queue)``: runs the reconciler, then spawns inputs for the work
  that the running inputs cannot take (``count_inputs_to_spawn``).
* ``launch_scheduled()``: calls ``launch`` every ``launch_period_s`` seconds
  for each queue in the registry ``modal.Dict`` (``<app_name>-queues``) that
  ``qworker push --backend modal`` writes. A queue leaves the registry once
  it has no pending task.
* ``reduce(queue)``: folds the queue's results on the Volume and returns the
  report as plain data.

Results live on the Volume mounted at ``/results``: ``/results/<queue>/`` for
result files and reducer state, ``/results/_dead_letters/<queue>/`` for
dead-letter records.

Running inputs are tracked in the ``modal.Dict`` ``qworker-<queue>-inputs``:
the launcher records each input it spawns as ``starting``, and the input then
writes a heartbeat every ``heartbeat_s`` seconds and deletes its key when it
returns. In the worst case, an input killed without deleting its key is still
counted until its heartbeat expires (``3 * heartbeat_s``), or, if it never
started, until ``STARTING_EXPIRY_S`` after the spawn. Until then the launcher
spawns that many inputs fewer.

Importing this module contacts nothing: ``from_name`` lookups and the image
are resolved only when the app is deployed or run.
"""

import dataclasses
import json
import logging
import os
import shutil
import sqlite3
import sys
import tempfile
import time
import uuid
from contextlib import closing
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import Any, Awaitable, Callable, Mapping

import anyio
import modal

from qworker import render
from qworker.backends.modal_queue import (
    ModalQueueSettings,
    ModalTaskQueue,
    modal_object_names,
)
from qworker.consumer import Consumer, ConsumerSettings, ConsumerStats, make_owner_id
from qworker.errors import ConfigError, QworkerError
from qworker.gpu import MemoryGate, make_memory_gate
from qworker.jobs import load_job, parse_seeds
from qworker.log import configure_logging
from qworker.modal_config import (
    CONFIG_JSON_ENV,
    MIN_CONTAINERS,
    ModalDeployConfig,
    load_config,
)
from qworker.producer import push_job
from qworker.queue import PutResult
from qworker.reducer import STATE_FILE, Reducer, ReduceReport
from qworker.results import REDUCER_DIR
from qworker.sink import SinkSettings
from qworker.task import DEFAULT_LANE, SOLO_LANE, validate_queue_name
from qworker.workloads import Aggregation, get_workload

logger = logging.getLogger("qworker.modal_app")

RESULTS_MOUNT = PurePosixPath("/results")
DEAD_LETTERS_DIR = "_dead_letters"

# How long ``launch`` and ``launch_scheduled`` may run. Each launch reads the
# whole ledger twice (reconcile and stats), which grows with the queue.
LAUNCH_TIMEOUT_S = 900

# How long a spawned input counts as starting before it writes a heartbeat.
# It covers the image pull, the wait for a free GPU and the wait behind
# max_containers.
STARTING_EXPIRY_S = 600.0

# An input stops claiming this long before its Modal timeout, at most half
# the timeout, so its running task can finish and its results be committed.
STOP_RESERVE_S = 90.0

# Maximum wait between claims of an idle input. Each claim of an empty lane
# costs one QueueGet per partition.
IDLE_POLL_MAX_S = 2.0

# A Volume commit reloads the Volume afterwards, and the reload fails while
# another input of the container has a file open (modal 1.6.4 Volume.commit),
# so commit_volume tries up to this many times.
COMMIT_ATTEMPTS = 8

STARTING, IDLE, BUSY = "starting", "idle", "busy"

Spawn = Callable[[str], Awaitable[str]]
Commit = Callable[[], Awaitable[None]]


# -- launch arithmetic ---------------------------------------------------------


def count_inputs_to_spawn(*, claimable: int, running: int, idle: int, capacity: int) -> int:
    """Return how many consumer inputs to spawn for one lane.

    ``claimable`` is the work a new input could claim now. A claim takes a
    whole queue item, so it is the number of items in the lane, capped by the
    lane's depth in tasks. ``running`` counts the inputs starting or running,
    and ``idle`` those of them that hold no task. The idle inputs take the
    first ``idle`` items, every other item gets a new input, and no more than
    ``capacity`` inputs run in all.
    """
    unserved = max(0, claimable - idle)
    room = max(0, capacity - running)
    return min(unserved, room)


def graceful_stop_after_s(timeout_s: float) -> float:
    """Return the time after its start, in seconds, at which an input stops claiming to finish before its timeout."""
    return timeout_s - min(STOP_RESERVE_S, timeout_s / 2)


# -- running inputs ------------------------------------------------------------


def inputs_dict_name(queue_name: str) -> str:
    """Return the name of the ``modal.Dict`` that tracks the running inputs of a queue."""
    tasks_name, _ = modal_object_names(queue_name)
    return tasks_name.removesuffix("-tasks") + "-inputs"


@dataclasses.dataclass(frozen=True)
class LaneInputs:
    """Inputs of one lane that are starting or running, and how many of them hold no task."""

    running: int = 0
    idle: int = 0


class InputTracker:
    """The starting and running consumer inputs of one queue, in a ``modal.Dict``.

    A key is ``<lane>/<input id>`` and its value is JSON with the input's
    ``state`` (``starting``, ``idle`` or ``busy``) and ``expires_at`` (Unix
    time), after which the launcher no longer counts it and deletes the key.
    """

    def __init__(self, inputs: Any) -> None:
        self._inputs = inputs

    @classmethod
    async def open(cls, queue_name: str) -> "InputTracker":
        inputs = modal.Dict.from_name(inputs_dict_name(queue_name), create_if_missing=True)
        await inputs.hydrate.aio()
        return cls(inputs)

    @staticmethod
    def key(lane: str, input_id: str) -> str:
        return f"{lane}/{input_id}"

    async def record(self, key: str, state: str, expires_at: float) -> None:
        await self._inputs.put.aio(key, _input_value(state, expires_at))

    async def record_starting(self, lane: str, input_ids: list[str], expires_at: float) -> None:
        """Record spawned inputs, unless an input already wrote its own heartbeat."""
        for input_id in input_ids:
            await self._inputs.put.aio(self.key(lane, input_id), _input_value(STARTING, expires_at), skip_if_exists=True)

    async def remove(self, key: str) -> None:
        await self._inputs.pop.aio(key, None)

    async def scan(self, now: float) -> dict[str, LaneInputs]:
        """Count the inputs per lane whose entry has not expired, and delete the expired entries."""
        running: dict[str, int] = {}
        idle: dict[str, int] = {}
        expired: list[str] = []
        async for key, value in self._inputs.items.aio():
            lane, _, _ = str(key).partition("/")
            try:
                entry = json.loads(value)
            except (TypeError, ValueError):
                expired.append(key)
                continue
            if entry.get("expires_at", 0) <= now:
                expired.append(key)
                continue
            running[lane] = running.get(lane, 0) + 1
            if entry.get("state") != BUSY:
                idle[lane] = idle.get(lane, 0) + 1

        for key in expired:
            await self._inputs.pop.aio(key, None)
        if expired:
            logger.info("deleted %d expired input entries", len(expired))
        return {lane: LaneInputs(running=count, idle=idle.get(lane, 0)) for lane, count in running.items()}


def _input_value(state: str, expires_at: float) -> str:
    return json.dumps({"state": state, "expires_at": round(expires_at, 3)})


# -- consumer inputs -------------------------------------------------------------


def _queue_settings(config: ModalDeployConfig) -> ModalQueueSettings:
    return ModalQueueSettings(reconcile_interval_s=config.reconcile_interval_s)


async def _open_queue(queue_name: str, results_root: Path, config: ModalDeployConfig, commit: Commit | None) -> ModalTaskQueue:
    return await ModalTaskQueue.open(
        queue_name, results_root / DEAD_LETTERS_DIR, _queue_settings(config), commit=commit
    )


async def run_consumer_input(
    queue_name: str,
    lane: str,
    config: ModalDeployConfig,
    *,
    results_root: Path,
    commit: Commit,
    input_id: str | None = None,
) -> dict[str, Any]:
    """Run one consumer with one slot on ``lane`` until it idles, nears its timeout or is stopped; return its counters.

    Results go to ``results_root / queue_name``, and ``commit`` makes them
    durable before their tasks are acked. ``input_id`` is the input's key in
    the tracker, which is its function call id on Modal. The input deletes
    that key when it returns or fails.
    """
    validate_queue_name(queue_name)
    owner = make_owner_id()
    tracker = await InputTracker.open(queue_name)
    key = tracker.key(lane, input_id or owner)

    try:
        consumer = await _make_consumer(queue_name, lane, config, results_root=results_root, commit=commit, owner=owner)
        async with anyio.create_task_group() as group:
            group.start_soon(_send_heartbeats, tracker, key, consumer, config.heartbeat_s, config.heartbeat_expiry_s)
            group.start_soon(_stop_when_idle, consumer, config.idle_exit_s)
            group.start_soon(_stop_before_timeout, consumer, graceful_stop_after_s(config.timeout_s))
            stats = await consumer.run()
            group.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            try:
                await tracker.remove(key)
            except Exception as exc:  # noqa: BLE001 - the entry expires on its own
                logger.warning("deleting input entry %s failed, it expires on its own: %r", key, exc)
    return {"queue": queue_name, "lane": lane, "input": key, **dataclasses.asdict(stats)}


async def _make_consumer(
    queue_name: str, lane: str, config: ModalDeployConfig, *, results_root: Path, commit: Commit, owner: str
) -> Consumer:
    queue = await _open_queue(queue_name, results_root, config, commit)
    workload_name = (await queue.metadata()).get("workload")
    if workload_name is None:
        raise ConfigError(f"queue {queue_name!r} has no recorded workload: push a job to it first")
    workload = get_workload(workload_name)

    reserve_s = config.timeout_s - graceful_stop_after_s(config.timeout_s)
    settings = ConsumerSettings(
        slots=1,
        lane=lane,
        lease_s=config.lease_s,
        grace_s=reserve_s / 3,
        poll_max_s=IDLE_POLL_MAX_S,
        sink=SinkSettings(batch_rows=config.batch_rows, commit_every=config.commit_every, commit_s=config.commit_s),
        scratch_root=Path(tempfile.gettempdir()) / "qworker-scratch",
    )
    memory_gate = _container_memory_gate() if lane == DEFAULT_LANE else None
    return Consumer(
        queue, workload, results_root / queue_name, settings, owner=owner, commit=commit, memory_gate=memory_gate,
    )


_memory_gate: MemoryGate | None = None


def _container_memory_gate() -> MemoryGate:
    """Return the GPU memory gate shared by every input of this container.

    Inputs under ``@modal.concurrent`` share one event loop and one GPU, so
    one gate admits their tasks by memory estimate.
    """
    global _memory_gate
    if _memory_gate is None:
        _memory_gate = make_memory_gate("auto", None)
    return _memory_gate


async def _send_heartbeats(tracker: InputTracker, key: str, consumer: Consumer, interval_s: float, expiry_s: float) -> None:
    failures = 0
    while True:
        stats: ConsumerStats = consumer.stats()
        state = BUSY if stats.running or stats.buffered else IDLE
        try:
            await tracker.record(key, state, time.time() + expiry_s)
            failures = 0
        except Exception as exc:  # noqa: BLE001 - a missed heartbeat only makes the launcher spawn more
            failures += 1
            if failures == 1 or failures % 10 == 0:
                logger.warning("heartbeat %s failed %d times in a row: %r", key, failures, exc)
        await anyio.sleep(interval_s)


async def _stop_when_idle(consumer: Consumer, idle_exit_s: float) -> None:
    """Stop the consumer once it has claimed nothing and held no task for ``idle_exit_s`` seconds."""
    last_claimed = -1
    idle_since = time.monotonic()
    while True:
        await anyio.sleep(min(1.0, idle_exit_s / 4))
        stats = consumer.stats()
        if stats.claimed != last_claimed or stats.running or stats.buffered:
            last_claimed = stats.claimed
            idle_since = time.monotonic()
            continue
        if time.monotonic() - idle_since >= idle_exit_s:
            logger.info("no task for %.0f s, stopping owner=%s", idle_exit_s, consumer.owner)
            consumer.stop()
            return


async def _stop_before_timeout(consumer: Consumer, stop_after_s: float) -> None:
    await anyio.sleep(stop_after_s)
    logger.info("stopping owner=%s %.0f s after start, before the Modal timeout", consumer.owner, stop_after_s)
    consumer.stop()


# -- launcher ----------------------------------------------------------------------


async def count_queued_items(queue: ModalTaskQueue, lane: str) -> int:
    """Return the number of items in the lane's partitions, using the partition count of ``queue.settings``."""
    tasks_name, _ = modal_object_names(queue.name)
    task_queue = modal.Queue.from_name(tasks_name, create_if_missing=True)
    total = 0
    for index in range(queue.settings.partitions):
        total += await task_queue.len.aio(partition=queue.partition_key(lane, index))
    return total


async def launch_queue(
    queue_name: str,
    config: ModalDeployConfig,
    *,
    results_root: Path,
    commit: Commit | None,
    spawners: Mapping[str, Spawn],
) -> dict[str, Any]:
    """Reconcile the queue, then spawn consumer inputs for each lane; return what was seen and spawned.

    ``spawners`` maps a lane to a function that spawns one input for a queue
    and returns its function call id. ``drained`` in the result is true when
    the queue has no pending task.
    """
    validate_queue_name(queue_name)
    queue = await _open_queue(queue_name, results_root, config, commit)
    if not await queue.exists():
        return {"queue": queue_name, "exists": False, "drained": True, "lanes": []}

    reconciled = await queue.reconcile()
    stats = await queue.stats()
    tracker = await InputTracker.open(queue_name)
    now = time.time()
    inputs = await tracker.scan(now)

    lanes = []
    for lane, capacity in ((DEFAULT_LANE, config.capacity), (SOLO_LANE, config.solo_capacity)):
        depth = stats.lane_depth.get(lane, 0)
        items = await count_queued_items(queue, lane) if depth else 0
        seen = inputs.get(lane, LaneInputs())
        count = count_inputs_to_spawn(
            claimable=min(depth, items), running=seen.running, idle=seen.idle, capacity=capacity
        )
        for _ in range(count):
            # Recorded one by one, so a failed spawn leaves the earlier ones counted.
            call_id = await spawners[lane](queue_name)
            await tracker.record_starting(lane, [call_id], now + STARTING_EXPIRY_S)
        if count:
            logger.info("spawned %d inputs queue=%s lane=%s depth=%d items=%d running=%d idle=%d",
                        count, queue_name, lane, depth, items, seen.running, seen.idle)
        lanes.append({"lane": lane, "depth": depth, "items": items, "running": seen.running,
                      "idle": seen.idle, "capacity": capacity, "spawned": count})

    return {
        "queue": queue_name,
        "exists": True,
        "drained": stats.pending == 0,
        "reconciled": dataclasses.asdict(reconciled),
        "stats": stats.as_dict(),
        "lanes": lanes,
    }


def deployed_function(config: ModalDeployConfig, name: str) -> modal.Function | None:
    """Look up function ``name`` of the deployed app; return None when the app or the function is not deployed."""
    function = modal.Function.from_name(config.app_name, name)
    try:
        function.hydrate()
    except modal.exception.NotFoundError:
        return None
    return function


def register_queue(config: ModalDeployConfig, queue_name: str) -> None:
    """Add the queue to the registry that the scheduled launcher serves."""
    registry = modal.Dict.from_name(config.registry_name, create_if_missing=True)
    registry.put(validate_queue_name(queue_name), json.dumps({"token": uuid.uuid4().hex, "registered_at": time.time()}))


async def forget_queue_if_unchanged(registry: Any, queue_name: str, entry: str | None) -> bool:
    """Remove a drained queue from the registry unless it was registered again since ``entry`` was read.

    NOTE: the read and the delete are two RPCs, because ``modal.Dict`` has no
    compare-and-delete. A push that registers the queue between them loses
    its entry. Its own launch call still runs, and the next push registers
    the queue again.
    """
    if entry is None or await registry.get.aio(queue_name) != entry:
        return False
    await registry.pop.aio(queue_name, None)
    return True


# -- reducer ---------------------------------------------------------------------------


class _LocalStateReducer(Reducer):
    """A reducer whose SQLite state lives on local disk, while results and the aggregate stay in ``results_dir``.

    A Volume offers no file locking, and its files are last-write-wins, so
    the state database is copied in from the Volume before a run and written
    back as one file after it.
    """

    def __init__(self, results_dir: Path, aggregation: Aggregation | None, state_path: Path) -> None:
        super().__init__(results_dir, aggregation)
        self._local_state_path = state_path

    @property
    def state_path(self) -> Path:
        return self._local_state_path


def reduce_with_local_state(results_dir: Path, aggregation: Aggregation | None, *, reset: bool = False) -> ReduceReport:
    """Run the reducer on ``results_dir`` with its state copied to local disk and back."""
    stored_state = results_dir / REDUCER_DIR / STATE_FILE
    with tempfile.TemporaryDirectory(prefix="qworker-reduce-") as scratch:
        local_state = Path(scratch) / STATE_FILE
        for suffix in ("", "-wal"):
            source = stored_state.with_name(STATE_FILE + suffix)
            if source.exists():
                shutil.copyfile(source, local_state.with_name(STATE_FILE + suffix))

        reducer = _LocalStateReducer(results_dir, aggregation, local_state)
        if reset:
            reducer.reset()
        report = reducer.run()
        _store_state(local_state, stored_state)
    return report


def _store_state(local_state: Path, stored_state: Path) -> None:
    """Write a consistent one-file copy of the local state database over ``stored_state``."""
    snapshot = local_state.with_name("snapshot.db")
    with closing(sqlite3.connect(local_state)) as source, closing(sqlite3.connect(snapshot)) as target:
        source.backup(target)

    stored_state.parent.mkdir(parents=True, exist_ok=True)
    temporary = stored_state.with_name(f".{STATE_FILE}.{uuid.uuid4().hex[:8]}.tmp")
    with open(snapshot, "rb") as reader, open(temporary, "wb") as writer:
        shutil.copyfileobj(reader, writer)
        writer.flush()
        os.fsync(writer.fileno())
    os.replace(temporary, stored_state)
    # A state file written with its WAL beside it would be read with that stale WAL.
    for suffix in ("-wal", "-shm"):
        stored_state.with_name(STATE_FILE + suffix).unlink(missing_ok=True)


async def reduce_queue(
    queue_name: str,
    config: ModalDeployConfig,
    *,
    results_root: Path,
    workload_name: str = "",
    reset: bool = False,
) -> dict[str, Any]:
    """Fold the queue's new results with its workload's aggregation; return the report as plain data.

    The result has the keys of ``render.reduce_report_json`` plus
    ``summary_columns``, the column names of the summary in order.
    """
    validate_queue_name(queue_name)
    if not workload_name:
        queue = await _open_queue(queue_name, results_root, config, None)
        workload_name = (await queue.metadata()).get("workload") or ""
        if not workload_name:
            raise ConfigError(f"queue {queue_name!r} has no recorded workload: pass the workload name")
    workload = get_workload(workload_name)

    report = await anyio.to_thread.run_sync(
        lambda: reduce_with_local_state(results_root / queue_name, workload.aggregation, reset=reset)
    )
    summary = workload.summarize(report.aggregate) if workload.summarize else report.aggregate
    return {**render.reduce_report_json(report, summary), "summary_columns": summary.column_names}


def print_reduce_result(result: Mapping[str, Any]) -> None:
    """Print what ``reduce`` returned as ``qworker reduce`` prints a local report."""
    import pyarrow as pa

    rows = result["summary"]
    columns = result.get("summary_columns") or (list(rows[0]) if rows else [])
    summary = pa.Table.from_pylist(rows) if rows else pa.table({name: [] for name in columns})
    summary = summary.select(columns) if columns else summary
    report = SimpleNamespace(
        **{key: value for key, value in result.items() if key not in ("summary", "summary_columns", "quarantined")},
        quarantined=[SimpleNamespace(**item) for item in result["quarantined"]],
    )
    render.print_reduce_report(render.make_console(), report, summary)


# -- the Modal app -----------------------------------------------------------------------

config = load_config()

app = modal.App(config.app_name)

image = (
    modal.Image.debian_slim(python_version="3.11")
    .pip_install(*config.packages)
    .add_local_python_source("qworker")
)

volume = modal.Volume.from_name(config.volume_name, create_if_missing=True)

RESULTS_ROOT = Path(str(RESULTS_MOUNT))


def build_function_settings(
    config: ModalDeployConfig, image: modal.Image, volume: modal.Volume
) -> dict[str, dict[str, Any]]:
    """Return the ``app.function`` arguments of every function of the app, by function name.

    ``consume_solo`` keeps no buffer container, because its lane holds only
    the few tasks that need a GPU to themselves. ``launch``,
    ``launch_scheduled`` and ``reduce`` run at most one container with one
    input, so two launches never spawn for the same depth and two reducers
    never write the reducer state at once.
    """
    env = {CONFIG_JSON_ENV: config.to_json()}
    volumes = {str(RESULTS_MOUNT): volume}
    secrets = [modal.Secret.from_name(name) for name in config.secrets]
    consumer = {
        "image": image,
        "gpu": config.gpu or None,
        "volumes": volumes,
        "secrets": secrets,
        "env": env,
        "timeout": config.timeout_s,
        "min_containers": MIN_CONTAINERS,
        "max_containers": config.max_containers,
        "buffer_containers": config.buffer_containers,
        "scaledown_window": config.scaledown_window_s,
    }
    single = {"image": image, "env": env, "min_containers": MIN_CONTAINERS, "max_containers": 1}
    return {
        "consume": consumer,
        "consume_solo": {**consumer, "buffer_containers": 0},
        "launch": {**single, "volumes": volumes, "timeout": LAUNCH_TIMEOUT_S},
        "launch_scheduled": {
            **single, "timeout": LAUNCH_TIMEOUT_S, "schedule": modal.Period(seconds=config.launch_period_s),
        },
        "reduce": {**single, "volumes": volumes, "secrets": secrets, "timeout": config.timeout_s},
    }


FUNCTION_SETTINGS = build_function_settings(config, image, volume)
CONCURRENCY_SETTINGS = {"max_inputs": config.max_inputs, "target_inputs": config.target_inputs}

_logging_configured = False


def _configure_container_logging() -> None:
    global _logging_configured
    if not _logging_configured:
        configure_logging("INFO")
        _logging_configured = True


async def commit_volume() -> None:
    """Commit the results Volume, retrying while open files make the reload after the commit fail.

    NOTE: the error text matched here is the one modal 1.6.4 reports for a
    reload blocked by open files. It was read in the client source, never
    seen from Modal's servers.
    """
    delay_s = 0.1
    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        try:
            await volume.commit.aio()
            return
        except RuntimeError as exc:
            if "open files" not in str(exc) or attempt == COMMIT_ATTEMPTS:
                raise
            logger.warning("volume commit attempt %d of %d failed, retrying in %.1f s: %s",
                           attempt, COMMIT_ATTEMPTS, delay_s, exc)
            await anyio.sleep(delay_s)
            delay_s = min(2.0, delay_s * 2)


@app.function(**FUNCTION_SETTINGS["consume"])
@modal.concurrent(**CONCURRENCY_SETTINGS)
async def consume(queue_name: str) -> dict[str, Any]:
    """Run one consumer input on the queue's default lane; return its counters."""
    _configure_container_logging()
    return await run_consumer_input(
        queue_name, DEFAULT_LANE, config,
        results_root=RESULTS_ROOT, commit=commit_volume, input_id=modal.current_function_call_id(),
    )


@app.function(**FUNCTION_SETTINGS["consume_solo"])
async def consume_solo(queue_name: str) -> dict[str, Any]:
    """Run one consumer input on the queue's solo lane, alone in its container; return its counters."""
    _configure_container_logging()
    return await run_consumer_input(
        queue_name, SOLO_LANE, config,
        results_root=RESULTS_ROOT, commit=commit_volume, input_id=modal.current_function_call_id(),
    )


async def _spawn_consume(queue_name: str) -> str:
    call = await consume.spawn.aio(queue_name)
    return call.object_id


async def _spawn_consume_solo(queue_name: str) -> str:
    call = await consume_solo.spawn.aio(queue_name)
    return call.object_id


@app.function(**FUNCTION_SETTINGS["launch"])
async def launch(queue_name: str) -> dict[str, Any]:
    """Reconcile the queue and spawn the consumer inputs its depth needs; return what was seen and spawned."""
    _configure_container_logging()
    registry = modal.Dict.from_name(config.registry_name, create_if_missing=True)
    entry = await registry.get.aio(queue_name)
    report = await launch_queue(
        queue_name, config, results_root=RESULTS_ROOT, commit=commit_volume,
        spawners={DEFAULT_LANE: _spawn_consume, SOLO_LANE: _spawn_consume_solo},
    )
    if report["drained"] and await forget_queue_if_unchanged(registry, queue_name, entry):
        logger.info("queue %s has no pending task, removed it from registry %s", queue_name, config.registry_name)
    return report


@app.function(**FUNCTION_SETTINGS["launch_scheduled"])
async def launch_scheduled() -> dict[str, list[str]]:
    """Call ``launch`` for every queue in the registry; return the queues launched and those that failed."""
    _configure_container_logging()
    registry = modal.Dict.from_name(config.registry_name, create_if_missing=True)
    names = sorted([str(key) async for key in registry.keys.aio()])
    launched: list[str] = []
    failed: list[str] = []
    for name in names:
        try:
            await launch.remote.aio(name)
            launched.append(name)
        except Exception:  # noqa: BLE001 - one failed queue must not stop the others
            logger.exception("launch failed queue=%s", name)
            failed.append(name)
    return {"launched": launched, "failed": failed}


@app.function(**FUNCTION_SETTINGS["reduce"])
async def reduce(queue_name: str, workload: str = "", reset: bool = False) -> dict[str, Any]:
    """Fold the queue's new results on the Volume; return the report with summary rows and counts."""
    _configure_container_logging()
    await volume.reload.aio()
    result = await reduce_queue(queue_name, config, results_root=RESULTS_ROOT, workload_name=workload, reset=reset)
    await volume.commit.aio()
    return result


async def push_job_file(queue_name: str, job_path: str, seeds: str) -> PutResult:
    """Push a job file's tasks to the Modal queue ``queue_name``, the way ``qworker push --backend modal`` does."""
    job = dataclasses.replace(load_job(job_path), queue=validate_queue_name(queue_name))
    seed_text = seeds or job.seeds
    if not seed_text:
        raise ConfigError("no seeds: pass --seeds START:STOP or set 'seeds' in the job file")
    queue = await ModalTaskQueue.open(queue_name, Path(tempfile.gettempdir()) / "qworker-dead-letters")
    return await push_job(queue, job, parse_seeds(seed_text))


@app.local_entrypoint()
def main(queue: str, job: str = "", seeds: str = "") -> None:
    """Push a job (if given), then launch consumers until the queue is drained, and print the reduced results."""
    try:
        if job:
            pushed = anyio.run(push_job_file, queue, job, seeds)
            print(f"pushed {pushed.added} tasks to queue {queue!r}, skipped {pushed.duplicates} already in it")
        register_queue(config, queue)
    except QworkerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None

    while True:
        report = launch.remote(queue)
        if not report["exists"]:
            print(f"error: queue {queue!r} not found: pass --job to push tasks to it", file=sys.stderr)
            raise SystemExit(2)
        spawned = ", ".join(f"{lane['lane']}={lane['spawned']}" for lane in report["lanes"])
        stats = report["stats"]
        print(f"queue {queue}: depth={stats['depth']} in_flight={stats['in_flight']} done={stats['done']}"
              f" dead={stats['dead']}; spawned {spawned}")
        if report["drained"]:
            break
        time.sleep(config.launch_period_s)

    print_reduce_result(reduce.remote(queue))
