"""Job files and seed ranges: what ``qworker push`` turns into tasks.

A job file (TOML or JSON) names the queue and workload, a base config for
every task, and optional variants; each seed yields one task per variant,
whose config is the base config updated with the variant::

    queue = "montecarlo"
    workload = "montecarlo"
    max_attempts = 3

    [config]
    paths = 20000

    [[variants]]
    contract = "euro-atm"
    kind = "european"
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from .errors import ConfigError, QworkerError, SeedRangeError
from .http_settings import HttpSettings
from .task import DEFAULT_LANE, DEFAULT_MAX_ATTEMPTS, MAX_SEED, Task, validate_lane, validate_queue_name
from .workloads import get_workload

_JOB_KEYS = {"queue", "workload", "max_attempts", "lane", "config", "variants", "seeds", "http"}
_RANGE_PATTERN = re.compile(r"(\d+)(?::(\d+))?")


@dataclass(frozen=True)
class JobSpec:
    """A validated job: which queue and workload, and the configs each seed is run with."""

    queue: str
    workload: str
    configs: tuple[Mapping[str, Any], ...]
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    lane: str = DEFAULT_LANE
    seeds: str | None = None
    source: str = "<job>"
    http: HttpSettings = field(default_factory=HttpSettings)

    def tasks(self, seeds: Sequence[int]) -> Iterator[Task]:
        for config in self.configs:
            for seed in seeds:
                yield Task.create(seed, config, lane=self.lane, max_attempts=self.max_attempts)

    def count(self, seeds: Sequence[int]) -> int:
        return len(self.configs) * len(seeds)


def load_job(path: Path | str) -> JobSpec:
    """Read and validate a TOML or JSON job file; errors name the file and the key."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read job file {str(path)!r}: {exc.strerror or exc}: check the path,"
            " or start from producers/montecarlo.toml"
        ) from None

    try:
        if path.suffix.lower() == ".json":
            data = json.loads(raw)
        else:
            data = tomllib.loads(raw.decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"job file {str(path)!r} is not valid {'JSON' if path.suffix.lower() == '.json' else 'TOML'}: {exc}") from None
    return job_from_mapping(data, source=str(path))


_EXAMPLES = {"queue": "montecarlo", "workload": "montecarlo"}


def job_from_mapping(data: Any, *, source: str = "<job>") -> JobSpec:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: a job must be a table of keys, got {type(data).__name__}")
    unknown = sorted(set(data) - _JOB_KEYS)
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r}: use {', '.join(sorted(_JOB_KEYS))}")
    for key in ("queue", "workload"):
        if key not in data:
            raise ConfigError(f"{source}: missing key {key!r}: add it to the job file, such as {key} = \"{_EXAMPLES[key]}\"")

    base = data.get("config", {})
    variants = data.get("variants", [{}])
    if not isinstance(base, Mapping):
        raise ConfigError(f"{source}: 'config' must be a table, got {base!r}")
    if not isinstance(variants, list) or not variants or not all(isinstance(v, Mapping) for v in variants):
        raise ConfigError(f"{source}: 'variants' must be a non-empty list of tables")

    try:
        spec = JobSpec(
            queue=validate_queue_name(data["queue"]),
            workload=str(data["workload"]),
            configs=tuple({**base, **variant} for variant in variants),
            max_attempts=_positive_int(data.get("max_attempts", DEFAULT_MAX_ATTEMPTS), "max_attempts"),
            lane=data.get("lane", DEFAULT_LANE),
            seeds=data.get("seeds"),
            source=source,
            http=HttpSettings.from_mapping(data.get("http", {})),
        )
        validate_lane(spec.lane)
    except QworkerError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    validate_job_configs(spec)
    return spec


def validate_job_configs(spec: JobSpec) -> None:
    """Check every task config with the workload's own check, before any task is pushed."""
    workload = get_workload(spec.workload)
    for index, config in enumerate(spec.configs):
        try:
            Task.create(0, config)
            if workload.validate_config is not None:
                workload.validate_config(config)
        except QworkerError as exc:
            where = f"variant {index + 1}" if len(spec.configs) > 1 else "config"
            raise ConfigError(f"{spec.source}: {where}: {exc}") from None


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"invalid {key} {value!r}: use an integer of 1 or more")
    return value


def parse_seeds(text: str) -> range | list[int]:
    """Parse ``START:STOP`` (STOP exclusive), a single seed, or a comma-separated list of those."""
    parts = [part.strip() for part in str(text).split(",")]
    ranges = [_parse_seed_part(part, text) for part in parts]
    if len(ranges) == 1:
        return ranges[0]
    seeds: list[int] = []
    seen: set[int] = set()
    for seed_range in ranges:
        for seed in seed_range:
            if seed not in seen:
                seen.add(seed)
                seeds.append(seed)
    return seeds


def _parse_seed_part(part: str, text: str) -> range:
    match = _RANGE_PATTERN.fullmatch(part)
    if not match:
        raise SeedRangeError(f"invalid seed range {text!r}: use START:STOP such as 0:500, a seed such as 7, or a list such as 0:10,20:30")
    start = int(match.group(1))
    stop = int(match.group(2)) if match.group(2) is not None else start + 1
    if stop <= start:
        raise SeedRangeError(f"invalid seed range {text!r}: STOP must be greater than START in {part!r}")
    if stop - 1 > MAX_SEED:
        raise SeedRangeError(f"invalid seed range {text!r}: seeds go up to 2**63-1")
    return range(start, stop)
