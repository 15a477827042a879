"""Operator commands on the embedded backend: dead letters and purge."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import make_tasks, push, qworker_env, run_qworker, stats


def run_with_env(*args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
    env = {**qworker_env(), **extra_env}
    return subprocess.run([sys.executable, "-m", "qworker", *args], capture_output=True, text=True, timeout=120,
                          env=env, stdin=subprocess.DEVNULL)


def make_dead_letters(data_dir: Path) -> None:
    push(data_dir, "q", "support_workloads:fails_until_fixed", make_tasks(3, {}, max_attempts=1))
    push(data_dir, "q", "support_workloads:fails_until_fixed", make_tasks(2, {"other": 1}, max_attempts=1))
    worked = run_qworker("work", "--data-dir", str(data_dir), "--queue", "q", "--burst")
    assert worked.returncode == 0, worked.stderr


def test_dead_list_filters(data_dir: Path) -> None:
    make_dead_letters(data_dir)

    listed = run_qworker("dead", "list", "--queue", "q", "--json", "--data-dir", str(data_dir))
    matched = run_qworker("dead", "list", "--queue", "q", "--json", "--match", "seed=1", "--data-dir", str(data_dir))

    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)) == 5
    assert {row["seed"] for row in json.loads(matched.stdout)} == {1}


def test_dead_show_prints_traceback(data_dir: Path) -> None:
    make_dead_letters(data_dir)
    [first] = json.loads(run_qworker("dead", "list", "--queue", "q", "--json", "--match", "seed=0",
                                     "--data-dir", str(data_dir)).stdout)[:1]

    shown = run_qworker("dead", "show", "--queue", "q", "--task-id", first["task_id"], "--data-dir", str(data_dir))

    assert shown.returncode == 0
    assert "ValueError: not fixed yet, seed=0" in shown.stdout
    assert "support_workloads.py" in shown.stdout


def test_requeue_after_fix_completes(data_dir: Path) -> None:
    make_dead_letters(data_dir)

    refused = run_qworker("dead", "requeue", "--queue", "q", "--data-dir", str(data_dir))
    requeued = run_qworker("dead", "requeue", "--queue", "q", "--match", "not fixed", "--data-dir", str(data_dir))
    fixed = run_with_env("work", "--data-dir", str(data_dir), "--queue", "q", "--burst", QWORKER_TEST_FIXED="1")

    assert refused.returncode == 2
    assert "--match TEXT, --task-id ID or --all" in refused.stderr
    assert "requeued 5 dead letters" in requeued.stdout
    assert fixed.returncode == 0, fixed.stderr
    counts = stats(data_dir, "q")
    assert counts.done == 5
    assert counts.dead == 0


def test_dead_export_round_trips(data_dir: Path, tmp_path: Path) -> None:
    make_dead_letters(data_dir)
    export = tmp_path / "dead.jsonl"
    job = tmp_path / "job.toml"
    job.write_text('queue = "retry"\nworkload = "support_workloads:fails_until_fixed"\n')

    exported = run_qworker("dead", "export", str(export), "--queue", "q", "--data-dir", str(data_dir))
    pushed = run_qworker("push", "--job", str(job), "--from", str(export), "--data-dir", str(data_dir))

    assert exported.returncode == 0, exported.stderr
    assert len(export.read_text().splitlines()) == 5
    assert pushed.returncode == 0, pushed.stderr
    assert stats(data_dir, "retry").queued == 5


def test_purge_needs_confirmation(data_dir: Path) -> None:
    push(data_dir, "q", "sleep", make_tasks(4, {}))

    refused = run_with_env("purge", "--queue", "q", "--data-dir", str(data_dir))
    purged = run_qworker("purge", "--queue", "q", "--yes", "--data-dir", str(data_dir))

    assert refused.returncode == 2
    assert "pass --yes" in refused.stderr
    assert "purged 4 tasks" in purged.stdout
    assert stats(data_dir, "q").total == 0


def test_ops_help_has_examples() -> None:
    for command in ("dead", "purge", "drain", "resume", "reconcile", "stream"):
        result = run_qworker(command, "--help")
        assert result.returncode == 0
        assert "example:\n" in result.stdout
        assert f"qworker {command} " in result.stdout.partition("example:")[2]
    assert os.environ.get("QWORKER_TEST_FIXED") is None


SLEEP_JOB = 'queue = "q"\nworkload = "sleep"\n[config]\nsleep_s = 0.01\n'


def test_drain_waits_for_consumers(data_dir: Path, tmp_path: Path, processes: list) -> None:
    from conftest import start_qworker

    push(data_dir, "q", "sleep", make_tasks(30, {"sleep_s": 0.05}))
    worker = start_qworker("work", "--data-dir", str(data_dir), "--queue", "q", "--slots", "2",
                           log_path=tmp_path / "w.log")
    processes.append(worker)
    job = tmp_path / "job.toml"
    job.write_text(SLEEP_JOB)

    drained = run_qworker("drain", "--queue", "q", "--timeout-s", "60", "--data-dir", str(data_dir))
    refused = run_qworker("push", "--job", str(job), "--seeds", "100:101", "--data-dir", str(data_dir))
    resumed = run_qworker("resume", "--queue", "q", "--data-dir", str(data_dir))
    accepted = run_qworker("push", "--job", str(job), "--seeds", "100:101", "--data-dir", str(data_dir))

    assert drained.returncode == 0, drained.stderr
    assert "is drained" in drained.stderr
    assert stats(data_dir, "q").done >= 30
    assert refused.returncode == 2
    assert "is draining and accepts no tasks" in refused.stderr
    assert resumed.returncode == 0
    assert accepted.returncode == 0, accepted.stderr


def test_drain_times_out(data_dir: Path) -> None:
    push(data_dir, "q", "sleep", make_tasks(3, {}))

    drained = run_qworker("drain", "--queue", "q", "--timeout-s", "1", "--data-dir", str(data_dir))

    assert drained.returncode == 1
    assert "timed out after 1 s with 3 tasks pending" in drained.stderr


def test_drain_export_round_trips(data_dir: Path, tmp_path: Path) -> None:
    push(data_dir, "q", "sleep", make_tasks(10, {"sleep_s": 0}))
    export = tmp_path / "left.jsonl"
    job = tmp_path / "job.toml"
    job.write_text(SLEEP_JOB)

    drained = run_qworker("drain", "--queue", "q", "--export", str(export), "--timeout-s", "10",
                          "--data-dir", str(data_dir))
    emptied = stats(data_dir, "q").total
    run_qworker("resume", "--queue", "q", "--data-dir", str(data_dir))
    pushed = run_qworker("push", "--job", str(job), "--from", str(export), "--data-dir", str(data_dir))

    assert drained.returncode == 0, drained.stderr
    assert "moved 10 waiting tasks" in drained.stderr
    assert emptied == 0
    assert pushed.returncode == 0, pushed.stderr
    assert "pushed 10 tasks" in pushed.stderr
    assert sorted(json.loads(line)["seed"] for line in export.read_text().splitlines()) == list(range(10))


def test_reconcile_redelivers_missing_results(data_dir: Path) -> None:
    from qworker.layout import Layout
    from qworker.reducer import Reducer
    from qworker.results import iter_result_files

    push(data_dir, "q", "sleep", make_tasks(5, {"sleep_s": 0}))
    run_qworker("work", "--data-dir", str(data_dir), "--queue", "q", "--burst")
    results = Layout(data_dir).results_dir("q")
    files = sorted(iter_result_files(results))
    files[0].unlink()
    files[1].unlink()
    files[2].write_bytes(files[2].read_bytes()[:20])

    dry = run_qworker("reconcile", "--queue", "q", "--dry-run", "--data-dir", str(data_dir))
    done_during_dry_run = stats(data_dir, "q").done
    reconciled = run_qworker("reconcile", "--queue", "q", "--data-dir", str(data_dir))
    rerun = run_qworker("work", "--data-dir", str(data_dir), "--queue", "q", "--burst")

    assert "3 done tasks have no result and would run again" in dry.stdout
    assert done_during_dry_run == 5
    assert "delivered 3 done tasks without a result again" in reconciled.stdout
    assert rerun.returncode == 0, rerun.stderr
    assert stats(data_dir, "q").done == 5
    assert Reducer(results).run().total_tasks == 5


def test_ops_scripts(data_dir: Path) -> None:
    repo = Path(__file__).parent.parent
    make_dead_letters(data_dir)

    def script(name: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(repo / "ops" / name), "--data-dir", str(data_dir), *args],
                              capture_output=True, text=True, timeout=60, env={**qworker_env(), **env})

    requeued = script("requeue_dead.py", "--queue", "q", "--match", "seed=2")
    timed_out = script("drain.py", "--queue", "q", "--timeout-s", "0")
    reconciled = script("reconcile.py", "--queue", "q")

    assert "requeued 1 dead letters" in requeued.stdout
    assert timed_out.returncode == 1
    assert "1 tasks still pending" in timed_out.stdout
    assert reconciled.returncode == 0, reconciled.stderr


def test_status_reports_throughput(data_dir: Path) -> None:
    push(data_dir, "q", "sleep", make_tasks(6, {"sleep_s": 0}))
    run_qworker("work", "--data-dir", str(data_dir), "--queue", "q", "--burst")
    push(data_dir, "q", "sleep", make_tasks(3, {"sleep_s": 1}))

    status = json.loads(run_qworker("status", "--queue", "q", "--json", "--data-dir", str(data_dir)).stdout)
    text = run_qworker("status", "--queue", "q", "--data-dir", str(data_dir)).stdout

    assert status["throughput_per_s"] == round(6 / 300, 3)
    assert status["eta_s"] == 150.0
    assert "time left: 2m30s" in text


def test_status_watch_redraws(data_dir: Path) -> None:
    push(data_dir, "q", "sleep", make_tasks(1, {}))
    watcher = subprocess.Popen(
        [sys.executable, "-m", "qworker", "status", "--queue", "q", "--json", "--watch", "0.2", "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE, text=True, env=qworker_env(),
    )
    try:
        lines = [watcher.stdout.readline() for _ in range(40)]
    finally:
        watcher.send_signal(2)
        watcher.wait(timeout=10)
        watcher.stdout.close()

    assert sum(line.startswith('  "queue": "q"') for line in lines) >= 2
