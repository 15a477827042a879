"""Compare qworker's embedded SQLite backend with Huey, Celery, RQ, arq and Dramatiq on no-op tasks.

    .venv/bin/python benchmarks/peers/run.py [--tasks 20000] [--runs 3] [--only qworker,huey] [--skip-redis]

Set-up: the peers live in their own virtual environments, created and filled
on the first run and again when a requirements file changes:
benchmarks/peers/.venv (requirements.txt: Huey, Celery, RQ, Dramatiq) and
benchmarks/peers/.venv-arq (requirements-arq.txt), because arq needs
redis<6 and Celery's Redis transport needs redis>=6.4. The Redis-based peers share one redis-server that this
script starts on a free port of 127.0.0.1 with the persistence that
``--redis-persistence`` picks (default: ``--save '' --appendonly no``, no
fsync) and stops by its PID at the end, also on an error, Ctrl-C or SIGTERM.
If redis-server is missing, Debian's package is installed with apt-get.

Workload: N tasks whose function does nothing but count itself, and 2 worker
processes for every system. Every variant runs in both modes, and the
variants take turns within each round, so drift in machine load spreads over
all of them:

* end to end: the workers are started and have become ready and idle (every
  worker reported ready where the system has a start-up hook, and no process
  of theirs used over 10% of a core for two 0.25 s samples). Then the
  producer, already started and connected, pushes N tasks. Timed from the
  first push to the last finished task.
* drain: the producer fills the queue with N tasks and exits. Then the
  workers start. Timed from starting the first worker process to the last
  finished task, so process start-up and imports are included.

Completion: each peer worker process keeps an in-memory count and the time of
its first and last finished task, and a background thread writes them every
50 ms to one small file per process (completion.py). The harness polls those
files every 50 ms; a run ends at the latest finish time once the counts add
up to N, so no system does I/O per task for the measurement. qworker is
measured from its queue file instead: the end is the largest ``finished_at``
(the ack, after the task's result row is durable), as benchmarks/throughput.py
does. No peer stores results (ignore_result or its equivalent). qworker's
no-op returns None, which qworker still records as one id-only result row
per task in segment files (1,000 rows or 0.2 s per fsynced file).

A run that does not finish within ``--timeout-s`` is recorded as failed with
the number of tasks done, and its workers are stopped (SIGTERM to each PID,
then SIGKILL to what is left).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from qworker.arguments import positive_float, positive_int

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Sibling modules, found through the path entry above.
import peer_runner  # noqa: E402
import qworker_runner  # noqa: E402
from redis_server import PERSISTENCE, RedisError, RedisServer, ensure_redis_server  # noqa: E402
from report import MODES, MODE_TITLES, RunRecord, Series, highlights, print_highlights, print_ratios, print_table, ratio_rows  # noqa: E402
from processes import WorkerError  # noqa: E402
from timing import RunFailed  # noqa: E402
from variants import DURABILITY_TEXT, POWER_CUT, PROCESS_CRASH, PeerVariant, peer_variants  # noqa: E402

PEERS_DIR = Path(__file__).resolve().parent
REPO_DIR = PEERS_DIR.parent.parent
# Virtual environment name -> (folder, requirements file). arq needs redis<6 and kombu's redis extra needs redis>=6.4.
ENVIRONMENTS = {
    "main": (PEERS_DIR / ".venv", PEERS_DIR / "requirements.txt"),
    "arq": (PEERS_DIR / ".venv-arq", PEERS_DIR / "requirements-arq.txt"),
}
STAMP_NAME = "requirements.sha256"
PIP_TIMEOUT_S = 900
SYSTEMS = ("qworker", "huey", "celery", "rq", "arq", "dramatiq")


class SetupError(RuntimeError):
    """The peers' virtual environment or the Redis server could not be set up."""


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived; raised once so that every finally block cleans up.

    A BaseException, like KeyboardInterrupt, so no ``except Exception`` on the way up swallows it.
    """


@dataclass(frozen=True)
class Entry:
    """One system variant to run: a peer variant, or qworker at one SQLite synchronous mode."""

    system: str
    variant: str
    durability: str
    settings: dict[str, Any]
    peer: PeerVariant | None = None
    qworker: qworker_runner.QworkerVariant | None = None


# -- set-up ----------------------------------------------------------------


def ensure_peer_venv(name: str) -> Path:
    """Create the peers' virtual environment ``name`` and install its requirements unless they are installed; return its python."""
    folder, requirements = ENVIRONMENTS[name]
    python = folder / "bin" / "python"
    stamp = folder / STAMP_NAME
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return python
    if not python.exists():
        print(f"creating the peers' virtual environment {folder}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    print(f"installing {requirements.name} into {folder} (pip)", flush=True)
    try:
        result = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", "-r", str(requirements)],
                                capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise SetupError(f"pip install -r {requirements} did not finish within {PIP_TIMEOUT_S} s: check that the package index"
                         " is reachable, or run with --only qworker") from None
    if result.returncode != 0:
        tail = " | ".join(result.stderr.strip().splitlines()[-3:])
        raise SetupError(f"pip install -r {requirements} failed ({tail}): check that the package index is reachable,"
                         " or run with --only qworker")
    stamp.write_text(digest + "\n")
    return python


def peer_versions(python: Path) -> dict[str, Any]:
    freeze = subprocess.run([str(python), "-m", "pip", "freeze", "--disable-pip-version-check"], capture_output=True, text=True, check=True)
    probe = subprocess.run([str(python), "-c", "import sqlite3, sys; print(sys.version.split()[0]); print(sqlite3.sqlite_version)"],
                           capture_output=True, text=True, check=True)
    python_version, sqlite_version = probe.stdout.split()
    return {"python": python_version, "sqlite": sqlite_version, "packages": freeze.stdout.split()}


def harness_versions() -> dict[str, Any]:
    packages = {}
    for name in ("qworker", "anyio", "pyarrow"):
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = "not installed"
    git: dict[str, Any] = {}
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--", "qworker"], cwd=REPO_DIR, capture_output=True, text=True,
                                 check=True).stdout.splitlines()
        git = {"head": head, "qworker_uncommitted": [line[3:] for line in changed]}
    except (OSError, subprocess.CalledProcessError) as exc:
        git = {"error": f"git failed: {exc}"}
    return {"python": sys.version.split()[0], "sqlite": sqlite3.sqlite_version, "packages": packages, "git": git}


def machine_facts() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average": list(os.getloadavg())}


# -- runs ------------------------------------------------------------------


def qworker_entries() -> list[Entry]:
    entries = []
    for synchronous, durability in (("NORMAL", PROCESS_CRASH), ("FULL", POWER_CUT)):
        variant = qworker_runner.QworkerVariant(synchronous)
        entries.append(Entry(system="qworker", variant=synchronous, durability=durability, settings=variant.settings(), qworker=variant))
    return entries


def select_entries(args: argparse.Namespace) -> list[Entry]:
    entries = qworker_entries() + [
        Entry(system=v.system, variant=v.name, durability=v.durability, settings=v.settings, peer=v)
        for v in peer_variants(args.redis_persistence)
    ]
    if args.only:
        entries = [e for e in entries if e.system in args.only]
    if args.skip_redis:
        entries = [e for e in entries if e.peer is None or not e.peer.needs_redis]
    return entries


def run_one(entry: Entry, mode: str, args: argparse.Namespace, peers: peer_runner.PeerEnvironment | None,
            qworker_tasks: list[Any]) -> tuple[RunRecord, dict[str, Any] | None]:
    folder = Path(tempfile.mkdtemp(prefix="qworker-peers-run-"))
    record = RunRecord(round_index=0)
    described = None
    try:
        if entry.qworker is not None:
            record.timing = qworker_runner.run(entry.qworker, mode, qworker_tasks, folder, args.timeout_s)
        else:
            assert entry.peer is not None and peers is not None
            record.timing, described = peer_runner.run(entry.peer, mode, args.tasks, peers, folder, args.timeout_s)
    except RunFailed as exc:
        record.error = str(exc)
        record.done = exc.done
        record.timeout_s = args.timeout_s if exc.timed_out else None
    except WorkerError as exc:
        record.error = f"workers could not be stopped: {exc}"
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    record.load_1m = os.getloadavg()[0]
    return record, described


def run_rounds(entries: list[Entry], args: argparse.Namespace, peers: peer_runner.PeerEnvironment | None,
               series: dict[tuple[str, str], Series], described: dict[str, Any]) -> None:
    qworker_tasks = qworker_runner.make_tasks(args.tasks) if any(e.qworker for e in entries) else []
    total = args.runs * len(MODES) * len(entries)
    done = 0
    for round_index in range(args.runs):
        # Start each round at a different variant, so no variant always runs first after a mode switch.
        order = entries[round_index % len(entries):] + entries[: round_index % len(entries)]
        for mode in MODES:
            for entry in order:
                done += 1
                record, producer_settings = run_one(entry, mode, args, peers, qworker_tasks)
                record.round_index = round_index
                series[(f"{entry.system} {entry.variant}", mode)].runs.append(record)
                if producer_settings is not None:
                    described.setdefault(f"{entry.system} {entry.variant}", {})[mode] = producer_settings
                prefix = f"[{done}/{total}] round {round_index + 1} {MODE_TITLES[mode]:<10} {entry.system} {entry.variant}:"
                if record.timing is not None:
                    t = record.timing
                    print(f"{prefix} {t.tasks_per_s:,.0f} tasks/s ({t.elapsed_s:.2f} s, first finish after {t.startup_s:.2f} s,"
                          f" load {record.load_1m:.2f})", flush=True)
                else:
                    print(f"{prefix} FAILED: {record.error}", flush=True)


# -- output ----------------------------------------------------------------


def print_settings(entries: list[Entry], described: dict[str, Any]) -> None:
    print("\nSettings of every variant:")
    for entry in entries:
        print(f"  {entry.system} {entry.variant} [{entry.durability}]")
        for key, value in entry.settings.items():
            print(f"    {key}: {value}")
        for mode, producer_settings in described.get(f"{entry.system} {entry.variant}", {}).items():
            for key, value in producer_settings.items():
                print(f"    {MODE_TITLES[mode]} producer {key}: {value}")


def print_versions(versions: dict[str, Any]) -> None:
    print("\nVersions:")
    harness = versions["harness"]
    print(f"  harness: Python {harness['python']}, SQLite {harness['sqlite']}, "
          + ", ".join(f"{name} {version}" for name, version in harness["packages"].items()))
    git = harness["git"]
    if "head" in git:
        dirty = git["qworker_uncommitted"]
        print(f"  qworker source: commit {git['head'][:12]}" + (f", uncommitted changes in {', '.join(dirty)}" if dirty else ", clean"))
    for name, peers in versions.get("peers", {}).items():
        folder = ENVIRONMENTS[name][0].relative_to(REPO_DIR)
        print(f"  peers in {folder}: Python {peers['python']}, SQLite {peers['sqlite']}, " + ", ".join(peers["packages"]))
    if "redis" in versions:
        redis = versions["redis"]
        print(f"  Redis {redis['version']} on 127.0.0.1, persistence {redis['persistence']}: redis-server {shlex.join(redis['arguments'])}")


def build_document(args: argparse.Namespace, entries: list[Entry], series: dict[tuple[str, str], Series], versions: dict[str, Any],
                   described: dict[str, Any], started: str, finished: str, interrupted: bool) -> dict[str, Any]:
    all_series = list(series.values())
    return {
        "started_utc": started,
        "finished_utc": finished,
        "interrupted": interrupted,
        "command": " ".join([sys.executable, *sys.argv]),
        "parameters": {"tasks": args.tasks, "runs": args.runs, "timeout_s": args.timeout_s, "worker_processes": 2,
                       "modes": list(MODES), "redis_persistence": args.redis_persistence, "skip_redis": args.skip_redis},
        "machine": {**versions.get("machine", {}), "load_average_end": list(os.getloadavg())},
        "versions": {key: value for key, value in versions.items() if key != "machine"},
        "durability_classes": DURABILITY_TEXT,
        "notes": [
            "Peers store no results; qworker writes one id-only result row per task into fsynced segment files.",
            "Peer completion: per-process in-memory counts published every 50 ms to one file per process.",
            "qworker completion: the largest finished_at (ack time) in the queue file.",
            "Other jobs may have been running on the machine; see load_1m_after per run.",
        ],
        "variants": [
            {
                "system": e.system, "variant": e.variant, "durability": e.durability, "settings": e.settings,
                "producer": described.get(f"{e.system} {e.variant}"),
                "modes": {mode: {**series[(f"{e.system} {e.variant}", mode)].summary(),
                                 "runs": [r.as_json() for r in series[(f"{e.system} {e.variant}", mode)].runs]} for mode in MODES},
            }
            for e in entries
        ],
        "ratios": ratio_rows(all_series),
        "highlights": highlights(all_series),
    }


# -- command line ----------------------------------------------------------


def system_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SYSTEMS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"invalid system list {text!r}: use a comma-separated subset of {','.join(SYSTEMS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Time qworker and its peers (Huey, Celery, RQ, arq, Dramatiq) on no-op tasks.")
    parser.add_argument("--tasks", type=positive_int, default=20000, help="tasks per run (default: %(default)s)")
    parser.add_argument("--runs", type=positive_int, default=3, help="runs of each variant in each mode (default: %(default)s)")
    parser.add_argument("--only", type=system_list, help=f"comma-separated systems to run, from {','.join(SYSTEMS)} (default: all)")
    parser.add_argument("--skip-redis", action="store_true", help="run qworker and Huey only, without installing or starting Redis")
    parser.add_argument("--redis-persistence", choices=tuple(PERSISTENCE), default="none",
                        help="Redis persistence: none (--save '' --appendonly no), aof-everysec or aof-always (default: %(default)s)")
    parser.add_argument("--timeout-s", type=positive_float, default=120.0,
                        help="seconds one run may take before it is recorded as failed and its workers stopped (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=PEERS_DIR / "results.json",
                        help="file for the settings, versions and every run as JSON (default: benchmarks/peers/results.json)")
    return parser


def install_signal_handlers() -> None:
    """Turn the first SIGTERM or SIGINT into Interrupted; ignore repeats while the clean-up runs."""
    def handle(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def main() -> int:
    args = build_parser().parse_args()
    logging.basicConfig(level=logging.INFO, format="peers: %(levelname)s: %(message)s")
    entries = select_entries(args)
    if not entries:
        print("peers: error: --only and --skip-redis leave no system to run: pick at least one of qworker,huey", file=sys.stderr)
        return 2

    install_signal_handlers()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    versions: dict[str, Any] = {"machine": machine_facts(), "harness": harness_versions()}
    series = {(f"{e.system} {e.variant}", mode): Series(e.system, e.variant, mode, e.durability) for e in entries for mode in MODES}
    described: dict[str, Any] = {}
    redis: RedisServer | None = None
    interrupted = False
    exit_code = 0
    print(f"{args.tasks} tasks per run, {args.runs} runs per variant and mode, 2 worker processes per system, timeout {args.timeout_s:g} s,"
          f" {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; started {started}", flush=True)
    try:
        peers = None
        environments = sorted({e.peer.environment for e in entries if e.peer is not None})
        if environments:
            pythons = {name: ensure_peer_venv(name) for name in environments}
            versions["peers"] = {name: peer_versions(python) for name, python in pythons.items()}
            if any(e.peer is not None and e.peer.needs_redis for e in entries):
                redis = RedisServer(ensure_redis_server(), args.redis_persistence)
                redis.start()
                versions["redis"] = {"version": redis.info_field("server", "redis_version"), "persistence": args.redis_persistence,
                                     "arguments": redis.arguments}
            peers = peer_runner.PeerEnvironment(pythons=pythons, redis=redis)
        run_rounds(entries, args, peers, series, described)
    except (SetupError, RedisError) as exc:
        print(f"peers: error: {exc}", file=sys.stderr)
        exit_code = 1
    except Interrupted as exc:
        print(f"peers: interrupted by {exc}: stopping; the table shows the runs that finished", file=sys.stderr)
        interrupted = True
        exit_code = 130
    finally:
        if redis is not None:
            redis.stop()

    finished = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    all_series = list(series.values())
    if any(s.runs for s in all_series):
        print()
        print_table(all_series)
        print_ratios(all_series)
        print_highlights(all_series)
        print_settings(entries, described)
    print_versions(versions)
    print(f"\nStarted {started}, finished {finished} (UTC); load average at the end {os.getloadavg()[0]:.2f}."
          " Other jobs may have been running on this machine at the same time.")
    print("Peers store no results (ignore_result or equivalent). qworker's no-op returns None, but qworker still writes one"
          " id-only result row per task into fsynced segment files.")

    document = build_document(args, entries, series, versions, described, started, finished, interrupted)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {args.json}")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
