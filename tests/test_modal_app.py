"""The Modal app without Modal's cloud: settings, launch arithmetic, and the function bodies on the local server.

Tests that read the app's settings import ``qworker.modal_app`` in a child
process, with network connections made to fail, so each config gets a fresh
module and an import that tried to reach Modal fails. Tests of the launcher,
the consumer input and the reducer run their core functions in this process
against the local Modal-compatible server (the session's ``modal_server``
fixture), with a folder standing in for the results Volume.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest
from grpclib import GRPCError, Status

from conftest import TESTS_DIR, make_tasks
from qworker.backends.modal_queue import ModalQueueSettings, ModalTaskQueue
from qworker.errors import ConfigError
from qworker.modal_config import (
    CONFIG_ENV,
    CONFIG_JSON_ENV,
    PINNED_PACKAGES,
    ModalDeployConfig,
    config_from_mapping,
    load_config,
    load_config_file,
)
from qworker.reducer import STATE_FILE
from qworker.results import REDUCER_DIR, iter_result_files
from qworker.task import DEFAULT_LANE, SOLO_LANE
from qworker.testing.modal_server import LocalModalServer, ModalServicer, client_env

REPO_ROOT = TESTS_DIR.parent
FUNCTION_NAMES = ("consume", "consume_solo", "launch", "launch_scheduled", "reduce")

# Run in a child process: fail every network connection, import the app and
# print what each function would be deployed with. The autoscaler settings
# are read from the closure that modal 1.6.4 builds the FunctionCreate request
# from, because FunctionInfo does not carry them.
DESCRIBE_APP = r"""
import json
import socket
import sys

def fail_connection(*args, **kwargs):
    raise AssertionError(f"importing the Modal app opened a connection: {args!r}")

socket.socket.connect = fail_connection
socket.socket.connect_ex = fail_connection
socket.create_connection = fail_connection
socket.getaddrinfo = fail_connection

import qworker.modal_app as modal_app
from modal._utils.async_utils import synchronizer

AUTOSCALER_FIELDS = ("min_containers", "max_containers", "buffer_containers", "scaledown_window")

def autoscaler(function):
    load = synchronizer._translate_in(function)._load
    cells = dict(zip(load.__code__.co_freevars, (cell.cell_contents for cell in load.__closure__)))
    settings = cells["autoscaler_settings"]
    return {name: getattr(settings, name) if settings.HasField(name) else None for name in AUTOSCALER_FIELDS}

described = {}
for name in sys.argv[1:]:
    function = getattr(modal_app, name)
    info = function.info()
    concurrency = info.concurrency_info
    described[name] = {
        "gpus": [list(gpu) for gpu in info.gpus],
        "timeout": info.timeout,
        "schedule": info.schedule,
        "volumes": {path: mount.name for path, mount in info.volumes.items()},
        "secrets": info.secrets,
        "max_inputs": concurrency.max_inputs if concurrency else None,
        "target_inputs": concurrency.target_inputs if concurrency else None,
        "autoscaler": autoscaler(function),
        "settings": {key: value for key, value in modal_app.FUNCTION_SETTINGS[name].items()
                     if value is None or isinstance(value, (int, str))},
    }
described["app_name"] = modal_app.app.name
described["concurrency"] = modal_app.CONCURRENCY_SETTINGS
described["config"] = json.loads(modal_app.config.to_json())
print(json.dumps(described))
"""


def child_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in (CONFIG_ENV, CONFIG_JSON_ENV)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), str(TESTS_DIR), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def describe_app(**extra_env: str) -> dict[str, Any]:
    completed = run_python(DESCRIBE_APP, *FUNCTION_NAMES, env=child_env(**extra_env))
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


def run_python(code: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], check=False, capture_output=True, text=True,
                          timeout=120, env=env, cwd=REPO_ROOT)


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "modal.toml"
    path.write_text(text, encoding="utf-8")
    return path


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


# -- config ------------------------------------------------------------------------


def test_config_defaults() -> None:
    config = load_config({})

    assert config == ModalDeployConfig()
    assert config.gpu == "A10G"
    assert config.max_inputs == 2
    assert config.target_inputs is None
    assert config.capacity == config.max_containers * config.max_inputs
    assert config.solo_capacity == config.max_containers
    assert config.heartbeat_expiry_s == 3 * config.heartbeat_s
    assert config.registry_name == "qworker-queues"


def test_config_file_sets_values(tmp_path: Path) -> None:
    path = write_config(tmp_path, """
[modal]
app_name = "qworker-staging"
gpu = "H100:2"
max_inputs = 4
target_inputs = 3
max_containers = 5
secrets = ["huggingface"]
idle_exit_s = 30
""")

    config = load_config({CONFIG_ENV: str(path)})

    assert config.app_name == "qworker-staging"
    assert config.gpu == "H100:2"
    assert config.max_inputs == 4
    assert config.target_inputs == 3
    assert config.max_containers == 5
    assert config.secrets == ("huggingface",)
    assert config.idle_exit_s == 30
    assert config.capacity == 20
    assert config.registry_name == "qworker-staging-queues"


def test_config_json_round_trip_wins_over_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[modal]\nmax_containers = 3\n")
    shipped = ModalDeployConfig(max_containers=7, secrets=("a", "b"), gpu="")

    config = load_config({CONFIG_ENV: str(path), CONFIG_JSON_ENV: shipped.to_json()})

    assert config == shipped


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_inputs", 0),
        ("max_inputs", True),
        ("target_inputs", 3),  # above the default max_inputs of 2
        ("buffer_containers", -1),
        ("max_containers", 0),
        ("scaledown_window_s", 1),
        ("scaledown_window_s", 3601),
        ("timeout_s", 0),
        ("timeout_s", 86_401),
        ("timeout_s", "3600"),
        ("idle_exit_s", 0),
        ("idle_exit_s", 4000),  # longer than the default timeout_s
        ("lease_s", float("nan")),
        ("commit_every", 0),
        ("commit_s", -1),
        ("launch_period_s", 0.5),
        ("heartbeat_s", 0),
        ("gpu", "A10G:0"),
        ("gpu", "A10G x2"),
        ("app_name", ""),
        ("volume_name", "results/v1"),
        ("secrets", ["bad name"]),
        ("packages", ["torch>=2"]),
        ("packages", []),
    ],
)
def test_config_rejects_invalid_value(tmp_path: Path, key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_mapping({key: value}, source="modal.toml")

    message = str(caught.value)
    assert message.startswith("modal.toml: ")
    assert key in message


def test_config_error_names_value_and_fix() -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_mapping({"max_containers": 0}, source="modal.toml")

    assert str(caught.value) == "modal.toml: max_containers = 0 is invalid: use an integer from 1 to 10000"


def test_config_rejects_min_containers() -> None:
    with pytest.raises(ConfigError, match="min_containers cannot be set: it is always 0"):
        config_from_mapping({"min_containers": 1})


def test_config_rejects_unknown_key() -> None:
    with pytest.raises(ConfigError, match="unknown Modal setting 'max_gpus'"):
        config_from_mapping({"max_gpus": 4})


def test_config_file_needs_modal_table(tmp_path: Path) -> None:
    path = write_config(tmp_path, "gpu = 'A10G'\n")

    with pytest.raises(ConfigError, match=r"has no \[modal\] table"):
        load_config_file(path)


def test_config_file_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read Modal config file"):
        load_config({CONFIG_ENV: str(tmp_path / "absent.toml")})


def test_docs_config_matches_defaults() -> None:
    import re
    import tomllib

    text = (REPO_ROOT / "docs" / "modal.md").read_text(encoding="utf-8")
    block = re.search(r"```toml\n(\[modal\].*?)```", text, re.DOTALL)
    assert block is not None, "docs/modal.md has no [modal] TOML example"

    documented = config_from_mapping(tomllib.loads(block.group(1))["modal"], source="docs/modal.md")

    assert documented == ModalDeployConfig()


def test_pinned_packages_match_environment() -> None:
    for requirement in PINNED_PACKAGES:
        name, _, pinned = requirement.partition("==")
        installed = importlib.metadata.version(name).split("+")[0]  # torch 2.13.0+cpu is pinned as 2.13.0
        assert pinned == installed, f"{name}: the image pins {pinned}, this environment has {installed}"


# -- launch arithmetic ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("claimable", "running", "idle", "capacity", "expected"),
    [
        (0, 0, 0, 20, 0),  # nothing to do
        (5, 0, 0, 20, 5),  # one input per item
        (500, 0, 0, 20, 20),  # capped by max_containers x max_inputs
        (500, 8, 0, 20, 12),  # busy inputs use up capacity
        (500, 20, 0, 20, 0),  # full
        (5, 3, 3, 20, 2),  # idle inputs take the first items
        (2, 4, 4, 20, 0),  # more idle inputs than items
        (10, 25, 0, 20, 0),  # more running than capacity, after a config change
    ],
)
def test_inputs_to_spawn(claimable: int, running: int, idle: int, capacity: int, expected: int) -> None:
    from qworker.modal_app import count_inputs_to_spawn

    assert count_inputs_to_spawn(claimable=claimable, running=running, idle=idle, capacity=capacity) == expected


def test_graceful_stop_before_timeout() -> None:
    from qworker.modal_app import STOP_RESERVE_S, graceful_stop_after_s

    assert graceful_stop_after_s(3600) == 3600 - STOP_RESERVE_S
    assert graceful_stop_after_s(60) == 30


# -- app settings, read in a child process ----------------------------------------------


def test_app_import_contacts_nothing() -> None:
    described = describe_app()

    assert described["app_name"] == "qworker"
    assert set(FUNCTION_NAMES) <= set(described)


def test_consume_matches_default_config() -> None:
    described = describe_app()
    config = ModalDeployConfig()
    consume = described["consume"]

    assert consume["gpus"] == [["A10G", 1]]
    assert consume["timeout"] == config.timeout_s
    assert consume["max_inputs"] == config.max_inputs
    assert consume["target_inputs"] is None
    assert consume["volumes"] == {"/results": config.volume_name}
    assert consume["autoscaler"] == {
        "min_containers": 0,
        "max_containers": config.max_containers,
        "buffer_containers": config.buffer_containers,
        "scaledown_window": config.scaledown_window_s,
    }
    assert consume["settings"] == {
        "gpu": "A10G",
        "timeout": config.timeout_s,
        "min_containers": 0,
        "max_containers": config.max_containers,
        "buffer_containers": config.buffer_containers,
        "scaledown_window": config.scaledown_window_s,
    }
    assert described["concurrency"] == {"max_inputs": config.max_inputs, "target_inputs": None}


def test_consume_solo_has_no_concurrency() -> None:
    described = describe_app()
    solo = described["consume_solo"]

    assert solo["max_inputs"] is None  # no @modal.concurrent: one input per container
    assert solo["target_inputs"] is None
    assert solo["gpus"] == described["consume"]["gpus"]
    assert solo["timeout"] == described["consume"]["timeout"]
    assert solo["autoscaler"]["min_containers"] == 0
    assert solo["autoscaler"]["max_containers"] == described["consume"]["autoscaler"]["max_containers"]
    assert solo["autoscaler"]["buffer_containers"] == 0


def test_launcher_and_reducer_settings() -> None:
    described = describe_app()

    for name in ("launch", "launch_scheduled", "reduce"):
        assert described[name]["gpus"] == [], name
        assert described[name]["max_inputs"] is None, name
        assert described[name]["autoscaler"]["min_containers"] == 0, name
        assert described[name]["autoscaler"]["max_containers"] == 1, name
    assert described["launch_scheduled"]["schedule"] == "Period(seconds=60.0)"
    assert described["launch"]["schedule"] is None
    assert described["launch"]["volumes"] == {"/results": "qworker-results"}
    assert described["reduce"]["volumes"] == {"/results": "qworker-results"}


def test_config_file_changes_app(tmp_path: Path) -> None:
    path = write_config(tmp_path, """
[modal]
app_name = "qworker-big"
volume_name = "big-results"
gpu = "H100:2"
max_inputs = 4
target_inputs = 3
buffer_containers = 2
max_containers = 5
scaledown_window_s = 120
timeout_s = 7200
launch_period_s = 30
secrets = ["huggingface"]
""")

    described = describe_app(**{CONFIG_ENV: str(path)})
    consume = described["consume"]

    assert described["app_name"] == "qworker-big"
    assert consume["gpus"] == [["H100", 2]]
    assert consume["timeout"] == 7200
    assert consume["max_inputs"] == 4
    assert consume["target_inputs"] == 3
    assert consume["volumes"] == {"/results": "big-results"}
    assert consume["autoscaler"] == {
        "min_containers": 0, "max_containers": 5, "buffer_containers": 2, "scaledown_window": 120,
    }
    assert any("huggingface" in secret for secret in consume["secrets"])
    assert described["consume_solo"]["max_inputs"] is None
    assert described["launch_scheduled"]["schedule"] == "Period(seconds=30.0)"
    assert described["config"]["max_inputs"] == 4


def test_config_file_without_gpu(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[modal]\ngpu = ""\n')

    described = describe_app(**{CONFIG_ENV: str(path)})

    assert described["consume"]["gpus"] == []
    assert described["consume_solo"]["gpus"] == []


def test_bad_config_fails_import(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[modal]\nmax_inputs = 0\n")

    completed = run_python("import qworker.modal_app", env=child_env(**{CONFIG_ENV: str(path)}))

    assert completed.returncode != 0
    assert "ConfigError" in completed.stderr
    assert "max_inputs = 0 is invalid" in completed.stderr


def test_app_imports_like_modal_cli() -> None:
    # `modal deploy qworker/modal_app.py` imports the file as the top-level module "modal_app".
    code = """
from modal.cli.import_refs import ImportRef, import_file_or_module
module = import_file_or_module(ImportRef("qworker/modal_app.py", use_module_mode=False))
print(module.__name__, module.app.name, sorted(module.app.registered_entrypoints))
"""
    completed = run_python(code, env=child_env())

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split() == ["modal_app", "qworker", "['main']"]


# -- function bodies on the local Modal-compatible server ----------------------------------


class FakeSpawner:
    """Stands in for ``consume.spawn``: records each spawn and returns a made-up function call id."""

    def __init__(self, lane: str) -> None:
        self.lane = lane
        self.calls: list[str] = []

    async def __call__(self, queue_name: str) -> str:
        call_id = f"fc-{self.lane}-{len(self.calls)}"
        self.calls.append(queue_name)
        return call_id


async def push_tasks(tmp_path: Path, name: str, count: int, *, tasks_per_item: int, lane: str = DEFAULT_LANE,
                     workload: str = "noop", config: dict[str, Any] | None = None) -> None:
    queue = await ModalTaskQueue.open(name, tmp_path / "dead_letters", ModalQueueSettings(tasks_per_item=tasks_per_item))
    await queue.set_metadata({"workload": workload})
    await queue.put(make_tasks(count, config or {}, lane=lane))


async def launch(tmp_path: Path, name: str, config: ModalDeployConfig) -> tuple[dict[str, Any], FakeSpawner, FakeSpawner]:
    from qworker.modal_app import launch_queue

    default, solo = FakeSpawner(DEFAULT_LANE), FakeSpawner(SOLO_LANE)
    report = await launch_queue(name, config, results_root=tmp_path / "volume", commit=None,
                                spawners={DEFAULT_LANE: default, SOLO_LANE: solo})
    return report, default, solo


def lane_report(report: dict[str, Any], lane: str) -> dict[str, Any]:
    return next(entry for entry in report["lanes"] if entry["lane"] == lane)


async def tracked_inputs(name: str) -> dict[str, dict[str, Any]]:
    import modal

    from qworker.modal_app import inputs_dict_name

    inputs = modal.Dict.from_name(inputs_dict_name(name), create_if_missing=True)
    return {key: json.loads(value) async for key, value in inputs.items.aio()}


def test_launch_spawns_up_to_capacity(tmp_path: Path, modal_server: LocalModalServer) -> None:
    name = unique("launch")
    config = ModalDeployConfig(max_containers=2, max_inputs=2)

    async def main() -> tuple[dict[str, Any], FakeSpawner, dict[str, Any], FakeSpawner, dict[str, dict[str, Any]]]:
        await push_tasks(tmp_path, name, 10, tasks_per_item=1)
        await push_tasks(tmp_path, name, 3, tasks_per_item=1, lane=SOLO_LANE, config={"solo": True})
        first, default, _ = await launch(tmp_path, name, config)
        second, again, _ = await launch(tmp_path, name, config)
        return first, default, second, again, await tracked_inputs(name)

    first, default, second, again, inputs = anyio.run(main)

    assert lane_report(first, DEFAULT_LANE)["depth"] == 10
    assert lane_report(first, DEFAULT_LANE)["items"] == 10
    assert lane_report(first, DEFAULT_LANE)["spawned"] == 4  # max_containers x max_inputs
    assert len(default.calls) == 4
    assert lane_report(first, SOLO_LANE)["spawned"] == 2  # one input per container
    assert first["drained"] is False
    assert len(inputs) == 6
    assert {entry["state"] for entry in inputs.values()} == {"starting"}
    assert "default/fc-default-0" in inputs
    assert lane_report(second, DEFAULT_LANE)["running"] == 4
    assert lane_report(second, DEFAULT_LANE)["spawned"] == 0
    assert again.calls == []


def test_launch_counts_queue_items(tmp_path: Path, modal_server: LocalModalServer) -> None:
    name = unique("packed")
    config = ModalDeployConfig(max_containers=10, max_inputs=2)

    async def main() -> dict[str, Any]:
        await push_tasks(tmp_path, name, 250, tasks_per_item=100)
        report, _, _ = await launch(tmp_path, name, config)
        return report

    report = anyio.run(main)

    # A claim takes a whole item, so three items keep at most three inputs busy.
    assert lane_report(report, DEFAULT_LANE)["depth"] == 250
    assert lane_report(report, DEFAULT_LANE)["items"] == 3
    assert lane_report(report, DEFAULT_LANE)["spawned"] == 3


def test_launch_drops_expired_inputs(tmp_path: Path, modal_server: LocalModalServer) -> None:
    import time

    from qworker.modal_app import InputTracker

    name = unique("heartbeat")
    config = ModalDeployConfig(max_containers=2, max_inputs=2)

    async def main() -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        await push_tasks(tmp_path, name, 10, tasks_per_item=1)
        tracker = await InputTracker.open(name)
        now = time.time()
        await tracker.record("default/busy-1", "busy", now + 30)
        await tracker.record("default/idle-1", "idle", now + 30)
        await tracker.record("default/killed-1", "busy", now - 1)
        report, _, _ = await launch(tmp_path, name, config)
        return report, await tracked_inputs(name)

    report, inputs = anyio.run(main)
    default = lane_report(report, DEFAULT_LANE)

    assert default["running"] == 2
    assert default["idle"] == 1
    assert default["spawned"] == 2  # capacity 4 minus 2 running
    assert "default/killed-1" not in inputs
    assert "default/busy-1" in inputs


def test_launch_reports_drained_and_missing(tmp_path: Path, modal_server: LocalModalServer) -> None:
    name = unique("missing")

    async def main() -> dict[str, Any]:
        report, _, _ = await launch(tmp_path, name, ModalDeployConfig())
        return report

    report = anyio.run(main)

    assert report["exists"] is False
    assert report["drained"] is True


def test_registry_forgets_only_unchanged_entry(modal_server: LocalModalServer) -> None:
    import modal

    from qworker.modal_app import forget_queue_if_unchanged, register_queue

    config = ModalDeployConfig(app_name=unique("registry"))
    register_queue(config, "jobs")
    registry = modal.Dict.from_name(config.registry_name, create_if_missing=True)
    seen = registry.get("jobs")
    register_queue(config, "jobs")  # a push registers the queue again after the launcher read it

    async def main() -> tuple[bool, bool]:
        stale = await forget_queue_if_unchanged(registry, "jobs", seen)
        current = await registry.get.aio("jobs")
        return stale, await forget_queue_if_unchanged(registry, "jobs", current)

    stale, current = anyio.run(main)

    assert stale is False
    assert current is True
    assert registry.get("jobs") is None


def test_consumer_input_runs_and_idles_out(tmp_path: Path, modal_server: LocalModalServer) -> None:
    from qworker.modal_app import inputs_dict_name, run_consumer_input

    name = unique("input")
    volume = tmp_path / "volume"
    config = ModalDeployConfig(idle_exit_s=0.5, heartbeat_s=0.1, commit_s=0.1, lease_s=5)
    commits = 0
    heartbeats: list[dict[str, Any]] = []

    async def commit() -> None:
        nonlocal commits
        commits += 1

    async def watch_heartbeat(key: str) -> None:
        import modal

        inputs = modal.Dict.from_name(inputs_dict_name(name), create_if_missing=True)
        while not heartbeats:
            value = await inputs.get.aio(key)
            if value is not None:
                heartbeats.append(json.loads(value))
            await anyio.sleep(0.02)

    async def main() -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        await push_tasks(tmp_path, name, 6, tasks_per_item=2, workload="sleep", config={"sleep_s": 0.01})
        async with anyio.create_task_group() as group:
            group.start_soon(watch_heartbeat, "default/fc-1")
            with anyio.fail_after(60):
                result = await run_consumer_input(name, DEFAULT_LANE, config, results_root=volume,
                                                  commit=commit, input_id="fc-1")
            group.cancel_scope.cancel()
        return result, await tracked_inputs(name)

    result, inputs = anyio.run(main)

    assert result["queue"] == name
    assert result["lane"] == DEFAULT_LANE
    assert result["input"] == "default/fc-1"
    assert result["done"] == 6
    assert result["dead"] == 0
    assert commits >= 1
    assert heartbeats
    assert heartbeats[0]["state"] in ("idle", "busy")
    assert inputs == {}  # the input deleted its entry when it returned
    assert len(list(iter_result_files(volume / name))) == 6


def test_consumer_input_without_workload(tmp_path: Path, modal_server: LocalModalServer) -> None:
    import time

    from qworker.modal_app import InputTracker, run_consumer_input

    name = unique("no-workload")

    async def commit() -> None:
        return None

    async def main() -> dict[str, dict[str, Any]]:
        tracker = await InputTracker.open(name)
        await tracker.record_starting(DEFAULT_LANE, ["fc-1"], time.time() + 600)
        with pytest.raises(ConfigError, match="has no recorded workload"):
            await run_consumer_input(name, DEFAULT_LANE, ModalDeployConfig(), results_root=tmp_path,
                                     commit=commit, input_id="fc-1")
        return await tracked_inputs(name)

    inputs = anyio.run(main)

    assert inputs == {}  # the launcher's starting entry is gone, so it does not count a failed input


def test_reduce_keeps_state_in_one_file(tmp_path: Path, modal_server: LocalModalServer) -> None:
    from qworker.modal_app import reduce_queue, run_consumer_input

    name = unique("reduce")
    volume = tmp_path / "volume"
    config = ModalDeployConfig(idle_exit_s=0.3, heartbeat_s=0.1, commit_s=0.1)

    async def commit() -> None:
        return None

    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        await push_tasks(tmp_path, name, 4, tasks_per_item=4, workload="sleep", config={"sleep_s": 0})
        with anyio.fail_after(60):
            await run_consumer_input(name, DEFAULT_LANE, config, results_root=volume, commit=commit)
        first = await reduce_queue(name, config, results_root=volume)
        second = await reduce_queue(name, config, results_root=volume)
        return first, second

    first, second = anyio.run(main)
    reducer_dir = volume / name / REDUCER_DIR

    assert first["files_folded"] == 4
    assert first["total_tasks"] == 4
    assert first["summary"][0]["tasks"] == 4
    assert "tasks" in first["summary_columns"]
    json.dumps(first)  # plain data, as Modal returns it to the CLI
    assert second["files_folded"] == 0
    assert second["files_skipped"] == 4
    assert second["total_tasks"] == 4
    assert (reducer_dir / STATE_FILE).is_file()
    assert not (reducer_dir / f"{STATE_FILE}-wal").exists()
    assert not (reducer_dir / f"{STATE_FILE}-shm").exists()


def test_print_reduce_result(capsys: pytest.CaptureFixture[str]) -> None:
    from qworker.modal_app import print_reduce_result

    print_reduce_result({
        "files_folded": 2, "files_skipped": 1, "rows_folded": 2, "tasks_folded": 2, "duplicate_tasks": 0,
        "total_tasks": 3, "quarantined": [{"path": "/results/q/bad.parquet", "error": "not parquet"}],
        "summary": [{"contract": "euro-atm", "tasks": 3, "price": 10.5}],
        "summary_columns": ["contract", "tasks", "price"],
    })
    output = capsys.readouterr().out

    assert "euro-atm" in output
    assert "10.5000" in output
    assert "folded 2 new files" in output
    assert "/results/q/bad.parquet: not parquet" in output


# -- the CLI when the app is not deployed ------------------------------------------------------


class NotDeployedServicer(ModalServicer):
    """A local server on which no app is deployed: every function lookup fails with NOT_FOUND."""

    async def FunctionGet(self, stream: Any) -> None:
        await stream.recv_message()
        raise GRPCError(Status.NOT_FOUND, "App 'qworker' not found in environment 'main'")


@pytest.fixture
def undeployed_server() -> Any:
    with LocalModalServer(servicer=NotDeployedServicer()) as server:
        yield server


def run_cli(server: LocalModalServer, *args: str) -> subprocess.CompletedProcess[str]:
    env = child_env(**client_env(server.url))
    return subprocess.run([sys.executable, "-m", "qworker", *args, "--backend", "modal"],
                          check=False, capture_output=True, text=True, timeout=120, env=env, cwd=REPO_ROOT)


def test_cli_push_without_deployed_app(tmp_path: Path, undeployed_server: LocalModalServer) -> None:
    job = tmp_path / "job.toml"
    job.write_text('queue = "cli-push"\nworkload = "noop"\n', encoding="utf-8")

    completed = run_cli(undeployed_server, "push", "--job", str(job), "--seeds", "0:5", "--data-dir", str(tmp_path))
    errors = completed.stderr.strip().splitlines()

    assert completed.returncode == 1
    assert "pushed 5 tasks" in completed.stderr
    assert errors[-1] == (
        "qworker push: error: Modal app 'qworker' is not deployed, so no consumer started:"
        " run 'modal deploy qworker/modal_app.py' and its scheduled launcher runs the queued tasks"
    )
    assert undeployed_server.rpc_counts().get("FunctionGet") == 1
    registered = run_python(
        "import modal; print(modal.Dict.from_name('qworker-queues').get('cli-push') is not None)",
        env=child_env(**client_env(undeployed_server.url)),
    )
    assert registered.stdout.strip() == "True", registered.stderr


def test_cli_reduce_without_deployed_app(tmp_path: Path, undeployed_server: LocalModalServer) -> None:
    completed = run_cli(undeployed_server, "reduce", "--queue", "cli-reduce", "--data-dir", str(tmp_path))

    assert completed.returncode == 2
    assert completed.stderr.strip() == (
        "qworker reduce: error: Modal app 'qworker' is not deployed: run 'modal deploy qworker/modal_app.py'"
    )
