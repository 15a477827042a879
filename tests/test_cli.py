"""The command line: user mistakes give one line and exit 2; the commands work together."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import qworker_env, run_qworker

REPO = Path(__file__).parent.parent
JOB = REPO / "producers" / "montecarlo.toml"


def single_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def write_job(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(text)
    return path


def test_push_work_reduce_status(tmp_path: Path) -> None:
    data = str(tmp_path / "data")

    pushed = run_qworker("push", "--job", str(JOB), "--seeds", "0:3", "--data-dir", data)
    again = run_qworker("push", "--job", str(JOB), "--seeds", "0:4", "--data-dir", data)
    worked = run_qworker("work", "--queue", "montecarlo", "--burst", "--processes", "2", "--data-dir", data)
    reduced = run_qworker("reduce", "--queue", "montecarlo", "--json", "--data-dir", data)
    status = run_qworker("status", "--queue", "montecarlo", "--json", "--data-dir", data)

    assert pushed.returncode == 0, pushed.stderr
    assert "pushed 12 tasks" in pushed.stderr
    assert "pushed 4 tasks" in again.stderr
    assert "skipped 12 whose id the queue already holds" in again.stderr
    assert worked.returncode == 0, worked.stderr
    report = json.loads(reduced.stdout)
    assert report["total_tasks"] == 16
    assert {row["contract"]: row["tasks"] for row in report["summary"]} == {
        "asian-atm": 4, "asian-otm": 4, "euro-atm": 4, "euro-otm": 4,
    }
    counts = json.loads(status.stdout)
    assert counts["done"] == 16
    assert counts["depth"] == 0


def test_dry_run_pushes_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"

    result = run_qworker("push", "--job", str(JOB), "--seeds", "0:10", "--dry-run", "--data-dir", str(data))

    assert result.returncode == 0
    assert "40 tasks" in result.stderr
    assert not (data / "qworker.db").exists()


@pytest.mark.parametrize(
    ("job_text", "expected"),
    [
        ('queue = "q"\n', "missing key 'workload'"),
        ('queue = "q"\nworkload = "nope"\n', "unknown workload 'nope'"),
        ('queue = "q"\nworkload = "montecarlo"\n[config]\nkind = "european"\n', "missing config key"),
        ('queue = "q"\nworkload = "montecarlo"\nflavour = 1\n', "unknown key 'flavour'"),
        ('queue = "../x"\nworkload = "noop"\n', "invalid queue name '../x'"),
        ('queue = "q"\nworkload = "noop"\nmax_attempts = 0\n', "invalid max_attempts 0"),
        ("queue = \n", "is not valid TOML"),
    ],
)
def test_push_rejects_bad_job(tmp_path: Path, job_text: str, expected: str) -> None:
    job = write_job(tmp_path, job_text)

    result = run_qworker("push", "--job", str(job), "--seeds", "0:2", "--data-dir", str(tmp_path / "data"))

    assert result.returncode == 2
    assert expected in single_error_line(result)
    assert not (tmp_path / "data" / "qworker.db").exists()


def test_missing_job_file_rejected(tmp_path: Path) -> None:
    result = run_qworker("push", "--job", str(tmp_path / "nope.toml"), "--seeds", "0:2",
                         "--data-dir", str(tmp_path / "data"))

    assert result.returncode == 2
    assert "cannot read job file" in single_error_line(result)
    assert "check the path" in single_error_line(result)


def test_bad_job_names_file_once(tmp_path: Path) -> None:
    job = write_job(tmp_path, 'queue = "q"\nworkload = "noop"\nmax_attempts = 0\n')

    result = run_qworker("push", "--job", str(job), "--seeds", "0:2", "--data-dir", str(tmp_path / "data"))

    assert single_error_line(result).count(str(job)) == 1


def test_push_rejects_bad_config_value(tmp_path: Path) -> None:
    job = write_job(tmp_path, JOB.read_text().replace("sigma = 0.2", "sigma = -0.2"))

    result = run_qworker("push", "--job", str(job), "--seeds", "0:2", "--data-dir", str(tmp_path / "data"))

    assert result.returncode == 2
    assert "sigma=-0.2" in single_error_line(result)


@pytest.mark.parametrize("seeds", ["5:x", "9:3", "-1:4", "a"])
def test_push_rejects_malformed_seed_range(tmp_path: Path, seeds: str) -> None:
    result = run_qworker("push", "--job", str(JOB), f"--seeds={seeds}", "--data-dir", str(tmp_path / "data"))

    assert result.returncode == 2
    assert f"invalid seed range '{seeds}'" in single_error_line(result)


def test_push_rejects_workload_change(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    run_qworker("push", "--job", str(JOB), "--seeds", "0:1", "--data-dir", data)
    job = write_job(tmp_path, 'queue = "montecarlo"\nworkload = "noop"\n')

    result = run_qworker("push", "--job", str(job), "--seeds", "0:1", "--data-dir", data)

    assert result.returncode == 2
    assert "runs workload 'montecarlo', not 'noop'" in single_error_line(result)


def test_unreadable_queue_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "qworker.db").write_text("not a database")

    result = run_qworker("status", "--queue", "q", "--data-dir", str(data))

    assert result.returncode == 2
    assert "cannot be opened as a SQLite database" in single_error_line(result)


def test_foreign_sqlite_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with sqlite3.connect(data / "qworker.db") as db:
        db.execute("CREATE TABLE other (x)")

    result = run_qworker("status", "--queue", "q", "--data-dir", str(data))

    assert result.returncode == 2
    assert "is not a qworker queue" in single_error_line(result)


def test_missing_queue(tmp_path: Path) -> None:
    result = run_qworker("status", "--queue", "q", "--data-dir", str(tmp_path / "data"))

    assert result.returncode == 2
    assert "not found" in single_error_line(result)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["work", "--queue", "q", "--slots", "0"], "argument --slots: invalid value '0'"),
        (["work", "--queue", "q", "--lease-s", "soon"], "argument --lease-s: invalid value 'soon'"),
        (["push"], "the following arguments are required: --job"),
        (["launch"], "invalid choice: 'launch'"),
    ],
)
def test_bad_arguments(tmp_path: Path, args: list[str], expected: str) -> None:
    result = run_qworker(*args)

    assert result.returncode == 2
    assert expected in single_error_line(result)


@pytest.mark.parametrize("command", ["push", "work", "reduce", "status", "demo"])
def test_help_has_example(command: str) -> None:
    result = run_qworker(command, "--help")

    assert result.returncode == 0
    assert f"example:\n  qworker {command}" in result.stdout


def test_demo_small_run(tmp_path: Path) -> None:
    result = run_qworker(
        "demo", "--seeds", "20", "--paths", "5000", "--processes", "2", "--slots", "2", "--json",
        "--data-dir", str(tmp_path / "data"), timeout_s=120,
    )

    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["failures"] == []
    assert summary["tasks"] == 80
    assert [row["tasks"] for row in summary["contracts"]] == [20, 20, 20, 20]
    assert all(abs(row["z_score"]) <= 4 for row in summary["contracts"])


@pytest.mark.parametrize(("device", "expected"), [("tpu", "invalid device 'tpu'"), ("cuda:7", "device 'cuda:7'")])
def test_work_rejects_unusable_device(tmp_path: Path, device: str, expected: str) -> None:
    data = str(tmp_path / "data")
    run_qworker("push", "--job", str(JOB), "--seeds", "0:1", "--data-dir", data)

    result = run_qworker("work", "--queue", "montecarlo", "--burst", "--device", device, "--data-dir", data)

    assert result.returncode == 2
    assert expected in single_error_line(result)


def test_push_rejects_empty_seed_range(tmp_path: Path) -> None:
    result = run_qworker("push", "--job", str(JOB), "--seeds", "", "--data-dir", str(tmp_path / "data"))

    assert result.returncode == 2
    assert "invalid seed range ''" in single_error_line(result)


def env_without_modal(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in qworker_env().items() if not key.startswith("MODAL_")}
    env["HOME"] = str(tmp_path)  # no ~/.modal.toml
    env["MODAL_CONFIG_PATH"] = str(tmp_path / "missing.toml")
    return {**env, **extra}


def test_modal_without_credentials(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "qworker", "status", "--queue", "q", "--backend", "modal"],
        capture_output=True, text=True, timeout=60, env=env_without_modal(tmp_path),
    )

    assert result.returncode == 2
    assert "run 'modal token new'" in single_error_line(result)


def test_modal_local_without_server(tmp_path: Path) -> None:
    env = env_without_modal(tmp_path, MODAL_SERVER_URL="http://127.0.0.1:1", MODAL_TOKEN_ID="x", MODAL_TOKEN_SECRET="y")

    result = subprocess.run(
        [sys.executable, "-m", "qworker", "status", "--queue", "q", "--backend", "modal-local"],
        capture_output=True, text=True, timeout=60, env=env,
    )

    assert result.returncode == 2
    assert "no Modal-compatible server answers at http://127.0.0.1:1" in single_error_line(result)


SLEEP_JOB = 'queue = "files"\nworkload = "sleep"\n[config]\nsleep_s = 0\n'


def test_push_from_csv(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    job = write_job(tmp_path, SLEEP_JOB)
    rows = tmp_path / "tasks.csv"
    rows.write_text("seed,sleep_s\n1,0\n2,0.01\n3,0\n")

    pushed = run_qworker("push", "--job", str(job), "--from", str(rows), "--data-dir", data)
    again = run_qworker("push", "--job", str(job), "--from", str(rows), "--data-dir", data)
    status = run_qworker("status", "--queue", "files", "--json", "--data-dir", data)

    assert pushed.returncode == 0, pushed.stderr
    assert "pushed 3 tasks" in pushed.stderr
    assert "skipped 3" in again.stderr
    assert json.loads(status.stdout)["queued"] == 3


def test_push_from_file_with_bad_rows_pushes_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    job = write_job(tmp_path, SLEEP_JOB)
    rows = tmp_path / "tasks.jsonl"
    rows.write_text('{"seed": 1}\n{"seed": "x"}\n{"seed": 3, "sleep_s": -1}\n')

    result = run_qworker("push", "--job", str(job), "--from", str(rows), "--data-dir", str(data))

    assert result.returncode == 2
    line = single_error_line(result)
    assert "2 rows of" in line
    assert "tasks.jsonl line 2: field 'seed'" in line
    assert "--skip-invalid" in line
    assert not (data / "qworker.db").exists()


def test_push_from_file_skip_invalid(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    job = write_job(tmp_path, SLEEP_JOB)
    rows = tmp_path / "tasks.jsonl"
    rows.write_text('{"seed": 1}\n{"seed": "x"}\n{"seed": 3, "sleep_s": -1}\n{"seed": 4}\n')

    result = run_qworker("push", "--job", str(job), "--from", str(rows), "--skip-invalid", "--data-dir", data)
    status = run_qworker("status", "--queue", "files", "--json", "--data-dir", data)

    assert result.returncode == 0, result.stderr
    assert "pushed 2 tasks" in result.stderr
    assert "rejected 2 invalid rows" in result.stderr
    rejected = [json.loads(line) for line in (tmp_path / "tasks.jsonl.rejected.jsonl").read_text().splitlines()]
    assert [row["line"] for row in rejected] == [2, 3]
    assert "sleep_s" in rejected[1]["reason"]
    assert json.loads(status.stdout)["queued"] == 2


def test_push_from_file_and_seeds_rejected(tmp_path: Path) -> None:
    job = write_job(tmp_path, SLEEP_JOB)
    rows = tmp_path / "tasks.csv"
    rows.write_text("seed\n1\n")

    result = run_qworker("push", "--job", str(job), "--from", str(rows), "--seeds", "0:2", "--data-dir", str(tmp_path / "d"))

    assert result.returncode == 2
    assert "either --seeds or --from FILE" in single_error_line(result)


def test_push_file_script(tmp_path: Path) -> None:
    job = write_job(tmp_path, SLEEP_JOB)
    rows = tmp_path / "tasks.csv"
    rows.write_text("seed\n1\n2\n")

    result = subprocess.run(
        [sys.executable, str(REPO / "producers" / "push_file.py"), "--job", str(job), "--from", str(rows),
         "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=60, env=qworker_env(),
    )

    assert result.returncode == 0, result.stderr
    assert "pushed 2" in result.stdout


def test_workload_module_in_current_folder(tmp_path: Path) -> None:
    # The console script, unlike "python -m qworker", does not put the current folder on the import path itself.
    script = Path(sys.executable).parent / "qworker"
    (tmp_path / "local_handler.py").write_text("def handle(task, ctx):\n    return {'seed': task.seed}\n")
    (tmp_path / "job.toml").write_text('queue = "local"\nworkload = "local_handler:handle"\n')
    common = ["--data-dir", str(tmp_path / "data")]

    pushed = subprocess.run([str(script), "push", "--job", "job.toml", "--seeds", "0:3", *common],
                            capture_output=True, text=True, cwd=tmp_path, env=qworker_env(), timeout=60)
    worked = subprocess.run([str(script), "work", "--queue", "local", "--burst", "--processes", "2", *common],
                            capture_output=True, text=True, cwd=tmp_path, env=qworker_env(), timeout=60)
    status = subprocess.run([str(script), "status", "--queue", "local", "--json", *common],
                            capture_output=True, text=True, cwd=tmp_path, env=qworker_env(), timeout=60)

    assert pushed.returncode == 0, pushed.stderr
    assert worked.returncode == 0, worked.stderr
    assert json.loads(status.stdout)["done"] == 3


def test_closed_stdout_exits_quietly(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    run_qworker("push", "--job", str(JOB), "--seeds", "0:2", "--data-dir", data)
    read_end, write_end = os.pipe()
    os.close(read_end)  # as "| head" does once it has read enough

    try:
        result = subprocess.run([sys.executable, "-m", "qworker", "status", "--queue", "montecarlo", "--json",
                                 "--data-dir", data], stdout=write_end, stderr=subprocess.PIPE, text=True,
                                env=qworker_env(), timeout=60)
    finally:
        os.close(write_end)

    assert result.returncode == 141
    assert "Traceback" not in result.stderr
