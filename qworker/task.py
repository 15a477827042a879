"""The task model: a seed, a JSON config and a stable id.

Tasks travel as JSON, never pickle, so a queue file or queue item cannot run
code when it is read.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from .errors import TaskValidationError

DEFAULT_LANE = "default"
SOLO_LANE = "solo"
LANES = (DEFAULT_LANE, SOLO_LANE)

DEFAULT_MAX_ATTEMPTS = 3

# Config key holding a task's estimated peak GPU memory in GiB; consumers on a
# GPU admit the task into a slot only while the estimates of running tasks leave room.
GPU_MEMORY_KEY = "gpu_memory_gb"

# Seeds feed RNGs such as torch.Generator.manual_seed, which take non-negative
# 64-bit values, and SQLite stores signed 64-bit integers.
MAX_SEED = 2**63 - 1

# A task id names its result file, so it may hold only characters that are
# safe in a file name on every platform, and it may not start with a dot.
# That rules out "..", "/" and "\\", so no id can escape the results folder.
_TASK_ID_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")
_QUEUE_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,47}")


@dataclass(frozen=True, slots=True)
class Task:
    """One unit of work: a seed, its config and a stable id.

    ``attempt`` counts deliveries: 0 before the first claim, 1 during the first
    run. ``lane`` selects the sub-queue the task waits in.
    """

    seed: int
    config: Mapping[str, Any]
    task_id: str
    attempt: int = 0
    lane: str = DEFAULT_LANE
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    enqueued_at: float = field(default=0.0, compare=False)

    @classmethod
    def create(
        cls,
        seed: int,
        config: Mapping[str, Any] | None = None,
        task_id: str | None = None,
        *,
        lane: str = DEFAULT_LANE,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> Task:
        """Validate the parts of a new task and derive its id when none is given."""
        config = dict(config or {})
        validate_seed(seed)
        canonical = canonical_json(config)
        if task_id is None:
            task_id = derive_task_id(seed, canonical)
        validate_task_id(task_id)
        validate_lane(lane)
        validate_gpu_memory(config)
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise TaskValidationError(f"invalid max_attempts {max_attempts!r}: use an integer of 1 or more")
        return cls(seed=seed, config=config, task_id=task_id, lane=lane, max_attempts=max_attempts)

    def with_attempt(self, attempt: int) -> Task:
        return replace(self, attempt=attempt)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "seed": self.seed,
            "config": dict(self.config),
            "attempt": self.attempt,
            "lane": self.lane,
            "max_attempts": self.max_attempts,
        }

    @classmethod
    def from_json(cls, text: str | bytes) -> Task:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise TaskValidationError(f"invalid task JSON: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Task:
        if not isinstance(data, Mapping):
            raise TaskValidationError(f"invalid task record {data!r}: expected a JSON object")
        for key in ("task_id", "seed", "config"):
            if key not in data:
                raise TaskValidationError(f"task record is missing {key!r}: {dict(data)!r}")
        task = cls.create(
            data["seed"],
            data["config"],
            data["task_id"],
            lane=data.get("lane", DEFAULT_LANE),
            max_attempts=data.get("max_attempts", DEFAULT_MAX_ATTEMPTS),
        )
        attempt = data.get("attempt", 0)
        if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 0:
            raise TaskValidationError(f"invalid attempt {attempt!r} in task {task.task_id!r}")
        return task.with_attempt(attempt)


def canonical_json(config: Mapping[str, Any]) -> str:
    """Serialise a config with sorted keys and no whitespace, so equal configs give equal text."""
    if not isinstance(config, Mapping):
        raise TaskValidationError(f"invalid config {config!r}: expected a JSON object (a dict)")
    _check_json_value(config, "config")
    return json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def derive_task_id(seed: int, canonical_config: str) -> str:
    """Return ``<seed>-<16 hex digits of sha256(config)>``: stable across runs and machines."""
    digest = hashlib.sha256(canonical_config.encode()).hexdigest()[:16]
    return f"{seed}-{digest}"


def validate_seed(seed: object) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TaskValidationError(f"invalid seed {seed!r}: expected an integer")
    if not 0 <= seed <= MAX_SEED:
        raise TaskValidationError(f"invalid seed {seed}: use a value from 0 to 2**63-1")


def validate_task_id(task_id: object) -> None:
    if not isinstance(task_id, str) or not _TASK_ID_PATTERN.fullmatch(task_id):
        raise TaskValidationError(
            f"invalid task id {task_id!r}: use 1 to 128 letters, digits, '_', '.' or '-', "
            "not starting with '.' or '-' (ids name result files)"
        )


def validate_gpu_memory(config: Mapping[str, Any]) -> float | None:
    """Return the config's GPU memory estimate in GiB, or None when it gives none; reject a value that is not positive."""
    value = config.get(GPU_MEMORY_KEY)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise TaskValidationError(
            f"invalid {GPU_MEMORY_KEY} {value!r}: give the task's peak GPU memory as a positive number of GiB"
        )
    return float(value)


def validate_lane(lane: object) -> None:
    if lane not in LANES:
        raise TaskValidationError(f"invalid lane {lane!r}: use one of {', '.join(LANES)}")


def validate_queue_name(name: object) -> str:
    if not isinstance(name, str) or not _QUEUE_NAME_PATTERN.fullmatch(name):
        raise TaskValidationError(
            f"invalid queue name {name!r}: use 1 to 48 letters, digits, '_' or '-', starting with a letter or digit"
        )
    return name


def _check_json_value(value: object, where: str) -> None:
    """Reject values that JSON cannot carry exactly, naming the path to the first one."""
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TaskValidationError(f"invalid value {value!r} at {where}: JSON has no NaN or infinity")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TaskValidationError(f"invalid key {key!r} at {where}: JSON object keys must be strings")
            _check_json_value(item, f"{where}.{key}")
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_json_value(item, f"{where}[{index}]")
        return
    raise TaskValidationError(
        f"invalid value {value!r} at {where}: type {type(value).__name__} is not JSON (use str, int, float, bool, list, dict or null)"
    )
