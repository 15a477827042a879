"""Producer and operator commands on the Modal adapter, through the CLI and the local Modal-compatible server."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import qworker_env
from qworker.layout import Layout
from qworker.results import iter_result_files

pytestmark = pytest.mark.usefixtures("modal_server")


def qworker(data_dir: Path, *args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qworker", *args, "--backend", "modal-local", "--data-dir", str(data_dir)],
        capture_output=True, text=True, timeout=120, env={**qworker_env(), **extra_env}, stdin=subprocess.DEVNULL,
    )


def write_job(tmp_path: Path, workload: str, **config: object) -> tuple[Path, str]:
    queue = f"ops-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"queue": queue, "workload": workload, "max_attempts": 1, "config": config}))
    return path, queue


def status(data_dir: Path, queue: str) -> dict:
    result = qworker(data_dir, "status", "--queue", queue, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def write_rows(tmp_path: Path, suffix: str) -> tuple[Path, str]:
    """Write three rows, the second with an invalid seed; return the file and where the bad row is."""
    path = tmp_path / f"tasks{suffix}"
    if suffix == ".jsonl":
        path.write_text('{"seed": 1}\n{"seed": -4}\n{"seed": 2}\n')
        return path, "tasks.jsonl line 2"
    if suffix == ".csv":
        path.write_text("seed\n1\n-4\n2\n")
        return path, "tasks.csv line 3"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"seed": [1, -4, 2]}), path)
    return path, "tasks.parquet row 1"


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_push_from_file_on_modal(data_dir: Path, tmp_path: Path, suffix: str) -> None:
    job, queue = write_job(tmp_path, "sleep", sleep_s=0)
    rows, bad_row = write_rows(tmp_path, suffix)

    refused = qworker(data_dir, "push", "--job", str(job), "--from", str(rows))
    pushed = qworker(data_dir, "push", "--job", str(job), "--from", str(rows), "--skip-invalid")
    again = qworker(data_dir, "push", "--job", str(job), "--from", str(rows), "--skip-invalid")

    assert refused.returncode == 2
    assert f"{bad_row}: field 'seed'" in refused.stderr
    assert "pushed 2 tasks" in pushed.stderr
    assert "skipped 2" in again.stderr
    assert status(data_dir, queue)["queued"] == 2


def test_dead_requeue_after_fix_on_modal(data_dir: Path, tmp_path: Path) -> None:
    job, queue = write_job(tmp_path, "support_workloads:fails_until_fixed")
    qworker(data_dir, "push", "--job", str(job), "--seeds", "0:4")
    qworker(data_dir, "work", "--queue", queue, "--burst")

    dead = json.loads(qworker(data_dir, "dead", "list", "--queue", queue, "--json").stdout)
    requeued = qworker(data_dir, "dead", "requeue", "--queue", queue, "--match", "not fixed")
    fixed = qworker(data_dir, "work", "--queue", queue, "--burst", QWORKER_TEST_FIXED="1")

    assert len(dead) == 4
    assert "requeued 4 dead letters" in requeued.stdout
    assert fixed.returncode == 0, fixed.stderr
    counts = status(data_dir, queue)
    assert counts["done"] == 4
    assert counts["dead"] == 0


def test_drain_export_round_trips_on_modal(data_dir: Path, tmp_path: Path) -> None:
    job, queue = write_job(tmp_path, "sleep", sleep_s=0)
    export = tmp_path / "left.jsonl"
    qworker(data_dir, "push", "--job", str(job), "--seeds", "0:6")

    drained = qworker(data_dir, "drain", "--queue", queue, "--export", str(export), "--timeout-s", "20")
    refused = qworker(data_dir, "push", "--job", str(job), "--from", str(export))
    qworker(data_dir, "resume", "--queue", queue)
    pushed = qworker(data_dir, "push", "--job", str(job), "--from", str(export))

    assert drained.returncode == 0, drained.stderr
    assert "moved 6 waiting tasks" in drained.stderr
    assert refused.returncode == 2
    assert "pushed 6 tasks" in pushed.stderr
    assert status(data_dir, queue)["queued"] == 6


def test_reconcile_restores_deleted_results_on_modal(data_dir: Path, tmp_path: Path) -> None:
    job, queue = write_job(tmp_path, "sleep", sleep_s=0)
    qworker(data_dir, "push", "--job", str(job), "--seeds", "0:5")
    qworker(data_dir, "work", "--queue", queue, "--burst")
    results = Layout(data_dir).results_dir(queue)
    for path in sorted(iter_result_files(results))[:2]:
        path.unlink()

    reconciled = qworker(data_dir, "reconcile", "--queue", queue)
    rerun = qworker(data_dir, "work", "--queue", queue, "--burst")

    assert "delivered 2 done tasks without a result again" in reconciled.stdout
    assert rerun.returncode == 0, rerun.stderr
    assert len(list(iter_result_files(results))) == 5
    assert status(data_dir, queue)["done"] == 5
