"""The peer variants: the commands that start 2 worker processes, their environment, settings and durability.

Every variant runs its workers with a peers' virtual environment, from the
benchmarks/peers folder, with ``PYTHONPATH`` set to it so the ``*_peer``
modules and ``completion`` import. Each variant records every setting it
changes and the defaults it relies on, as the output and the JSON file show.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

# Durability classes, from weakest to strongest.
WORKER_CRASH = "worker crash"
PROCESS_CRASH = "process crash"
POWER_CUT = "power cut"

DURABILITY_TEXT = {
    WORKER_CRASH: "queued tasks survive a worker crash only: they live in Redis memory, and a crash or restart of"
                  " the Redis server (or a power cut) loses them",
    PROCESS_CRASH: "queued tasks survive a crash of any process, the broker or queue file included, but a power cut"
                   " may lose the latest commits",
    POWER_CUT: "queued tasks survive a power cut: every commit is fsynced",
}

# Redis persistence setting -> durability of the tasks that Redis holds.
REDIS_DURABILITY = {"none": WORKER_CRASH, "aof-everysec": PROCESS_CRASH, "aof-always": POWER_CUT}

WORKER_PROCESSES = 2


@dataclass(frozen=True)
class RunPaths:
    """Paths and addresses of one run, filled in by the harness."""

    bin_dir: Path  # bin folder of the peers' virtual environment
    redis_url: str
    huey_db: Path


@dataclass(frozen=True)
class PeerVariant:
    """One peer configuration.

    ``commands`` builds the worker command lines: one entry per started
    process. ``ready`` selects how the harness detects that the workers are ready:
    ``"markers"`` counts ``ready-<pid>`` files, ``"rq-workers"`` counts the
    members of RQ's ``rq:workers`` set in Redis. ``fill_env`` overrides
    ``env`` for the producer that fills the queue before a drain run.
    """

    system: str
    name: str
    commands: Callable[[RunPaths], list[list[str]]]
    settings: dict[str, Any]
    durability: str
    ready: str
    ready_expected: int
    needs_redis: bool = True
    environment: str = "main"  # the virtual environment: "main" (.venv) or "arq" (.venv-arq)
    env: dict[str, str] = field(default_factory=dict)
    fill_env: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.system} {self.name}"


def huey_variants() -> list[PeerVariant]:
    def consumer(extra: list[str]) -> Callable[[RunPaths], list[list[str]]]:
        return lambda paths: [[str(paths.bin_dir / "huey_consumer"), "huey_peer.huey", "-w", "2", "-k", "process", *extra]]

    common = {
        "storage": "SqliteHuey (WAL journal, busy timeout 5 s, cache 8 MB), results=False",
        "processes": "huey_consumer -k process -w 2: 2 worker processes, plus the consumer's main process and its scheduler process",
        "concurrency": "2 processes x 1 task",
        "dequeue": "one task per exclusive transaction (SELECT, DELETE, COMMIT)",
        "enqueue": "noop(seed): one INSERT and one commit per task",
        "drain fill": "the queue is filled with fsync=False (PRAGMA synchronous = OFF) to save set-up time; the fill is not timed",
    }
    fast_poll = ["-d", "0.001", "-m", "0.01", "-q"]
    return [
        PeerVariant(
            system="huey", name="defaults", commands=consumer([]), needs_redis=False,
            settings={**common, "fsync": "None: SQLite's default synchronous=FULL", "polling": "-d 0.1 -m 10 -b 1.15 (defaults)",
                      "logging": "INFO (default): log lines per task, to a file"},
            durability=POWER_CUT, ready="markers", ready_expected=2,
            env={"PEERS_HUEY_FSYNC": "default"}, fill_env={"PEERS_HUEY_FSYNC": "off"},
        ),
        PeerVariant(
            system="huey", name="fast poll", commands=consumer(fast_poll), needs_redis=False,
            settings={**common, "fsync": "None: SQLite's default synchronous=FULL", "polling": "-d 0.001 -m 0.01 -b 1.15",
                      "logging": "-q: WARNING"},
            durability=POWER_CUT, ready="markers", ready_expected=2,
            env={"PEERS_HUEY_FSYNC": "default"}, fill_env={"PEERS_HUEY_FSYNC": "off"},
        ),
        PeerVariant(
            system="huey", name="fast poll, fsync off", commands=consumer(fast_poll), needs_redis=False,
            settings={**common, "fsync": "False: PRAGMA synchronous = OFF", "polling": "-d 0.001 -m 0.01 -b 1.15",
                      "logging": "-q: WARNING"},
            durability=PROCESS_CRASH, ready="markers", ready_expected=2,
            env={"PEERS_HUEY_FSYNC": "off"}, fill_env={"PEERS_HUEY_FSYNC": "off"},
        ),
    ]


def celery_variants(redis_durability: str) -> list[PeerVariant]:
    def prefork(paths: RunPaths) -> list[list[str]]:
        return [[str(paths.bin_dir / "celery"), "-A", "celery_peer", "worker", "-c", "2", "-n", "peers@%h"]]

    def solo(paths: RunPaths) -> list[list[str]]:
        return [
            [str(paths.bin_dir / "celery"), "-A", "celery_peer", "worker", "-P", "solo", "--prefetch-multiplier", "100",
             "--without-gossip", "--without-mingle", "--without-heartbeat", "-n", f"peers{index}@%h"]
            for index in range(WORKER_PROCESSES)
        ]

    common = {"broker": "Redis (kombu), no result backend, ignore_result=True", "acks_late": "False (default)",
              "enqueue": "noop.delay(seed), one message per task", "logging": "WARNING (default)"}
    return [
        PeerVariant(
            system="celery", name="defaults", commands=prefork,
            settings={**common, "processes": "1 worker node: main process + 2 prefork pool processes (-c 2)",
                      "concurrency": "2 pool processes x 1 task", "pool": "prefork (default)",
                      "prefetch": "multiplier 4 (default): 8 messages", "gossip/mingle/heartbeat": "on (default)"},
            durability=redis_durability, ready="markers", ready_expected=1,
        ),
        PeerVariant(
            system="celery", name="solo, prefetch 100", commands=solo,
            settings={**common, "processes": "2 worker nodes, each one process (-P solo)",
                      "concurrency": "2 processes x 1 task", "pool": "solo: tasks run in the consuming process",
                      "prefetch": "--prefetch-multiplier 100: 100 messages per process",
                      "gossip/mingle/heartbeat": "off (--without-gossip --without-mingle --without-heartbeat)"},
            durability=redis_durability, ready="markers", ready_expected=2,
        ),
    ]


def rq_variants(redis_durability: str) -> list[PeerVariant]:
    def workers(extra: list[str]) -> Callable[[RunPaths], list[list[str]]]:
        return lambda paths: [
            [str(paths.bin_dir / "rq"), "worker", "peers", "--url", paths.redis_url, "-n", f"peers{index}", *extra]
            for index in range(WORKER_PROCESSES)
        ]

    common = {"processes": "2 rq worker processes", "concurrency": "2 processes x 1 job",
              "enqueue": "Queue.enqueue_many, 1000 jobs per pipeline, result_ttl=0 (no result stored, job deleted when done)"}
    return [
        PeerVariant(
            system="rq", name="defaults", commands=workers([]),
            settings={**common, "worker_class": "rq.Worker (default): forks a work horse process for every job",
                      "logging": "INFO (default): log lines per job, to a file",
                      "completion": "each work horse appends one line to a count file before it exits (no thread survives it)"},
            durability=redis_durability, ready="rq-workers", ready_expected=2,
            env={"PEERS_FINISH_MODE": "append"},
        ),
        PeerVariant(
            system="rq", name="SimpleWorker", commands=workers(["-w", "rq.worker.SimpleWorker", "--quiet"]),
            settings={**common, "worker_class": "rq.worker.SimpleWorker: runs jobs in the worker process, no fork",
                      "logging": "--quiet: WARNING"},
            durability=redis_durability, ready="rq-workers", ready_expected=2,
        ),
    ]


def arq_variants(redis_durability: str) -> list[PeerVariant]:
    def workers(settings_class: str, extra: list[str]) -> Callable[[RunPaths], list[list[str]]]:
        return lambda paths: [[str(paths.bin_dir / "arq"), f"arq_peer.{settings_class}", *extra] for _ in range(WORKER_PROCESSES)]

    common = {"processes": "2 arq worker processes", "keep_result": "0 (no result stored)",
              "enqueue": "enqueue_job per job, 50 concurrent calls"}
    return [
        PeerVariant(
            system="arq", name="defaults", commands=workers("DefaultSettings", []),
            settings={**common, "max_jobs": "10 (default)", "concurrency": "2 processes x 10 jobs",
                      "poll_delay": "0.5 s (default)", "queue_read_limit": "100 (default: max(max_jobs * 5, 100))",
                      "logging": "INFO (default): log lines per job, to a file"},
            durability=redis_durability, ready="markers", ready_expected=2, environment="arq",
        ),
        PeerVariant(
            system="arq", name="max_jobs 100, poll 10 ms",
            commands=workers("TunedSettings", ["--custom-log-dict", "arq_peer.QUIET_LOG_CONFIG"]),
            settings={**common, "max_jobs": "100", "concurrency": "2 processes x 100 jobs", "poll_delay": "0.01 s",
                      "queue_read_limit": "500 (default: max(max_jobs * 5, 100))", "logging": "WARNING"},
            durability=redis_durability, ready="markers", ready_expected=2, environment="arq",
        ),
    ]


def dramatiq_variants(redis_durability: str) -> list[PeerVariant]:
    def workers(paths: RunPaths) -> list[list[str]]:
        return [[str(paths.bin_dir / "dramatiq"), "dramatiq_peer", "--processes", "2", "--threads", "8"]]

    common = {"processes": "dramatiq --processes 2: 2 worker processes plus the main process",
              "concurrency": "2 processes x 8 threads (--threads 8, the default)",
              "middleware": "defaults (AgeLimit, TimeLimit, ShutdownNotifications, Callbacks, Pipelines, Retries), no Results",
              "enqueue": "noop.send(seed), one message per task", "logging": "INFO (default): no per-message lines"}
    return [
        PeerVariant(
            system="dramatiq", name="defaults", commands=workers,
            settings={**common, "prefetch": "16 per process (default: 2 x threads)"},
            durability=redis_durability, ready="markers", ready_expected=2,
        ),
        PeerVariant(
            system="dramatiq", name="prefetch 100", commands=workers,
            settings={**common, "prefetch": "100 per process (dramatiq_queue_prefetch=100)"},
            durability=redis_durability, ready="markers", ready_expected=2,
            env={"dramatiq_queue_prefetch": "100"},
        ),
    ]


def peer_variants(redis_persistence: str) -> list[PeerVariant]:
    redis_durability = REDIS_DURABILITY[redis_persistence]
    return [
        *huey_variants(),
        *celery_variants(redis_durability),
        *rq_variants(redis_durability),
        *arq_variants(redis_durability),
        *dramatiq_variants(redis_durability),
    ]
