"""The chaos run, sized for CI: consumer kills, truncated results and a killed reducer lose and double-count nothing.

Each run starts real consumer processes that import torch, so on 2 cores one
run takes about half a minute. qworker/testing/chaos.py describes what the
run injects and checks.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qworker.testing.chaos import MAX_ABS_Z, ChaosOptions, ChaosReport, run_chaos


def assert_survived(report: ChaosReport) -> None:
    """Assert each check of the report on its own, then that no check failed."""
    assert report.lost == [], report.format()
    assert report.duplicates == 0, report.format()
    assert report.unreadable_result_files == 0, report.format()
    assert report.tasks_counted == report.tasks_expected, report.format()
    assert report.dead_letters == report.poison_tasks, report.format()
    assert report.dead_letters_injected_error + report.dead_letters_lease_expired == report.dead_letters, report.format()
    assert report.oom_moves >= report.oom_tasks, report.format()
    assert report.oom_tasks_on_solo == report.oom_tasks, report.format()
    assert all(check.counted for check in report.quarantined), report.format()
    assert report.reducer_kills == 1, report.format()
    assert all(abs(row["z_score"]) <= MAX_ABS_Z for row in report.contracts), report.format()
    assert report.failures == [], report.format()


@pytest.mark.timeout(300)
def test_chaos_on_sqlite(tmp_path: Path) -> None:
    # Seed 3 draws a SIGKILL, a truncation and a reducer run within the first 3 s.
    options = ChaosOptions(
        tasks=300, seed=3, task_s=0.2, event_gap_s=(0.3, 1.2), max_faults=20, timeout_s=150, data_dir=tmp_path / "data",
    )

    report = run_chaos(options)

    assert report.poison_tasks == 3
    assert report.oom_tasks == 6
    assert report.sigkills >= 1, report.format()
    assert report.truncations >= 1, report.format()
    assert_survived(report)


@pytest.mark.timeout(300)
def test_chaos_on_modal_local(tmp_path: Path, modal_server) -> None:
    # With 160 tasks, seed 3 draws two truncations and then four SIGKILLs within the first 5 s.
    options = ChaosOptions(
        backend="modal-local", tasks=160, seed=3, task_s=0.3, event_gap_s=(0.3, 1.2), max_faults=20, timeout_s=150,
        queue="chaos-modal",
        data_dir=tmp_path / "data", modal_server_url=modal_server.url,
    )

    report = run_chaos(options)

    assert report.sigkills >= 1, report.format()
    assert_survived(report)
