"""The task model: ids, validation and JSON round trips."""

from __future__ import annotations

import json

import pytest

from qworker.errors import TaskValidationError
from qworker.task import Task, canonical_json


def test_derived_id_is_stable_across_key_order() -> None:
    first = Task.create(7, {"a": 1, "b": {"c": [1, 2]}})
    second = Task.create(7, {"b": {"c": [1, 2]}, "a": 1})

    assert first.task_id == second.task_id
    assert first.task_id.startswith("7-")


def test_derived_id_depends_on_seed_and_config() -> None:
    base = Task.create(7, {"a": 1}).task_id

    assert Task.create(8, {"a": 1}).task_id != base
    assert Task.create(7, {"a": 2}).task_id != base


def test_given_id_is_kept() -> None:
    assert Task.create(1, {}, "shard-0001").task_id == "shard-0001"


@pytest.mark.parametrize("task_id", ["../etc", "a/b", "..", ".hidden", "-flag", "", "a\\b", "x" * 129, "a b", "é"])
def test_unsafe_ids_rejected(task_id: str) -> None:
    with pytest.raises(TaskValidationError, match="invalid task id"):
        Task.create(1, {}, task_id)


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, "3", True, None])
def test_invalid_seeds_rejected(seed: object) -> None:
    with pytest.raises(TaskValidationError, match="invalid seed"):
        Task.create(seed, {})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("config", "where"),
    [
        ({"x": float("nan")}, "config.x"),
        ({"x": {1: 2}}, "config.x"),
        ({"x": [1, {2, 3}]}, "config.x[1]"),
        ({"x": object()}, "config.x"),
    ],
)
def test_non_json_config_rejected(config: dict, where: str) -> None:
    with pytest.raises(TaskValidationError) as raised:
        Task.create(1, config)

    assert f"at {where}:" in str(raised.value)


def test_json_round_trip() -> None:
    task = Task.create(3, {"paths": 10, "nested": {"k": [1.5, None, True]}}, lane="solo", max_attempts=5)

    restored = Task.from_json(task.with_attempt(2).to_json())

    assert restored == task.with_attempt(2)
    assert json.loads(task.to_json())["config"] == {"paths": 10, "nested": {"k": [1.5, None, True]}}


def test_from_json_rejects_bad_records() -> None:
    with pytest.raises(TaskValidationError, match="invalid task JSON"):
        Task.from_json("{nope")
    with pytest.raises(TaskValidationError, match="missing 'seed'"):
        Task.from_json('{"task_id": "a", "config": {}}')
    with pytest.raises(TaskValidationError, match="invalid task id"):
        Task.from_json('{"task_id": "../a", "seed": 1, "config": {}}')


def test_invalid_lane_rejected() -> None:
    with pytest.raises(TaskValidationError, match="invalid lane 'fast'"):
        Task.create(1, {}, lane="fast")


def test_canonical_json_is_compact_and_sorted() -> None:
    assert canonical_json({"b": 1, "a": [1, 2]}) == '{"a":[1,2],"b":1}'
