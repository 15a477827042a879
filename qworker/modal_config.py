"""Settings of the Modal deployment in ``qworker/modal_app.py``.

The settings come from the ``[modal]`` table of the TOML file named by the
``QWORKER_MODAL_CONFIG`` environment variable, or are the defaults below when
it is unset::

    [modal]
    gpu = "L4"
    max_inputs = 2
    max_containers = 20
    secrets = ["huggingface"]

``modal deploy`` reads the file on the machine that deploys. The deployed
functions receive the same values as JSON in ``QWORKER_MODAL_CONFIG_JSON``,
because the file does not exist inside their containers. That variable takes
precedence over the file.

Importing this module imports neither ``modal`` nor anything that connects
to a server.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError

CONFIG_ENV = "QWORKER_MODAL_CONFIG"
CONFIG_JSON_ENV = "QWORKER_MODAL_CONFIG_JSON"
CONFIG_TABLE = "modal"

# The deployed functions always scale to zero when no input is running.
MIN_CONTAINERS = 0

# Modal's timeouts guide (modal.com/docs/guide/timeouts) allows timeouts from
# 1 second to 24 hours. modal 1.6.4 checks that scaledown_window is 2 to 3600 seconds.
MODAL_MAX_TIMEOUT_S = 24 * 3600
MODAL_MIN_SCALEDOWN_WINDOW_S = 2
MODAL_MAX_SCALEDOWN_WINDOW_S = 3600

# Modal object names (App, Volume, Dict, Secret): letters, digits, "-", "_"
# and ".", at most 64 characters (modal 1.6.4, modal/_utils/name_utils.py).
_MODAL_NAME_PATTERN = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
# A GPU type such as "A10G", "H100" or "A100-80GB", optionally with a count ("H100:2").
_GPU_PATTERN = re.compile(r"[A-Za-z0-9\-]+(:[1-9][0-9]*)?")
_PINNED_PACKAGE_PATTERN = re.compile(r"[A-Za-z0-9_.\-\[\],]+==[A-Za-z0-9_.+!\-]+")

# The packages that qworker imports in a container, pinned to the versions of
# the development environment. The development environment has the CPU build
# of torch (2.13.0+cpu); the image installs the same version from PyPI, whose
# Linux wheels are built with CUDA.
PINNED_PACKAGES = (
    "aiolimiter==1.3.0",
    "anyio==4.16.0",
    "httpx==0.29.0",
    "modal==1.6.4",
    "numpy==2.4.6",
    "pyarrow==26.0.1",
    "rich==15.0.0",
    "torch==2.13.0",
)


@dataclass(frozen=True)
class ModalDeployConfig:
    """Settings of the deployed Modal functions and of the consumers they run. Times are in seconds.

    ``target_inputs`` None leaves Modal's autoscaler to aim at ``max_inputs``
    inputs per container, which is Modal's default. A smaller target makes the
    autoscaler start another container first and fill containers up to
    ``max_inputs`` only when it cannot start one. ``gpu`` "" runs the consumers
    without a GPU.
    """

    app_name: str = "qworker"
    volume_name: str = "qworker-results"
    gpu: str = "A10G"
    max_inputs: int = 2  # concurrent consumer inputs per container, each running one task at a time
    target_inputs: int | None = None
    buffer_containers: int = 1
    max_containers: int = 10
    scaledown_window_s: int = 60
    timeout_s: int = 3600  # per input; Modal's default is 300
    idle_exit_s: float = 60.0  # an input returns after this long without a task
    secrets: tuple[str, ...] = ()  # names of modal.Secret objects
    packages: tuple[str, ...] = PINNED_PACKAGES
    lease_s: float = 60.0
    batch_rows: int = 0  # 0 writes one result file per task; above 0 writes segment files of this many rows
    commit_every: int = 500  # results per Volume commit
    commit_s: float = 5.0  # maximum age of an uncommitted result
    launch_period_s: float = 60.0  # how often the scheduled launcher runs
    heartbeat_s: float = 10.0  # how often a running input records that it is alive
    reconcile_interval_s: float = 30.0  # minimum time between two reconciler runs of an idle input

    def __post_init__(self) -> None:
        _check_name("app_name", self.app_name)
        _check_name("volume_name", self.volume_name)
        if not isinstance(self.gpu, str) or (self.gpu and not _GPU_PATTERN.fullmatch(self.gpu)):
            raise ConfigError(
                f"gpu = {self.gpu!r} is invalid: use a Modal GPU type such as \"A10G\" or \"H100:2\", or \"\" for no GPU"
            )

        _check_int("max_inputs", self.max_inputs, 1, 1000)
        if self.target_inputs is not None:
            _check_int("target_inputs", self.target_inputs, 1, self.max_inputs)
        _check_int("max_containers", self.max_containers, 1, 10_000)
        _check_int("buffer_containers", self.buffer_containers, 0, self.max_containers)
        _check_int("scaledown_window_s", self.scaledown_window_s, MODAL_MIN_SCALEDOWN_WINDOW_S, MODAL_MAX_SCALEDOWN_WINDOW_S)
        _check_int("timeout_s", self.timeout_s, 1, MODAL_MAX_TIMEOUT_S)
        _check_int("batch_rows", self.batch_rows, 0, 10_000_000)
        _check_int("commit_every", self.commit_every, 1, 10_000_000)

        _check_seconds("idle_exit_s", self.idle_exit_s, 0.1, self.timeout_s)
        _check_seconds("lease_s", self.lease_s, 1.0, MODAL_MAX_TIMEOUT_S)
        _check_seconds("commit_s", self.commit_s, 0.1, 3600.0)
        _check_seconds("launch_period_s", self.launch_period_s, 1.0, 86_400.0)
        _check_seconds("heartbeat_s", self.heartbeat_s, 0.1, 3600.0)
        _check_seconds("reconcile_interval_s", self.reconcile_interval_s, 0.1, 3600.0)

        for name in self.secrets:
            _check_name("secrets", name)
        if not self.packages:
            raise ConfigError("packages is empty: list the pinned packages the image installs, such as \"anyio==4.16.0\"")
        for requirement in self.packages:
            if not isinstance(requirement, str) or not _PINNED_PACKAGE_PATTERN.fullmatch(requirement):
                raise ConfigError(
                    f"packages entry {requirement!r} is invalid: pin an exact version, as in \"anyio==4.16.0\""
                )

    @property
    def capacity(self) -> int:
        """Maximum number of ``consume`` inputs that run at once: every container full."""
        return self.max_containers * self.max_inputs

    @property
    def solo_capacity(self) -> int:
        """Maximum number of ``consume_solo`` inputs that run at once: one per container."""
        return self.max_containers

    @property
    def heartbeat_expiry_s(self) -> float:
        """Age at which an input's heartbeat no longer counts it as running: three missed heartbeats."""
        return 3 * self.heartbeat_s

    @property
    def registry_name(self) -> str:
        """Name of the ``modal.Dict`` that lists the queues the scheduled launcher serves."""
        return f"{self.app_name}-queues"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


_FIELDS = {field.name: field for field in dataclasses.fields(ModalDeployConfig)}
_TUPLE_FIELDS = ("secrets", "packages")


def load_config(environ: Mapping[str, str] | None = None) -> ModalDeployConfig:
    """Read the settings from ``QWORKER_MODAL_CONFIG_JSON``, else the TOML file in ``QWORKER_MODAL_CONFIG``, else use the defaults."""
    environ = os.environ if environ is None else environ
    text = environ.get(CONFIG_JSON_ENV)
    if text:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{CONFIG_JSON_ENV} is not valid JSON: {exc}") from None
        return config_from_mapping(data, source=CONFIG_JSON_ENV)

    path = environ.get(CONFIG_ENV)
    if path:
        return load_config_file(Path(path))
    return ModalDeployConfig()


def load_config_file(path: Path) -> ModalDeployConfig:
    """Read the ``[modal]`` table of a TOML file; errors name the file and the key."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read Modal config file {str(path)!r} (from {CONFIG_ENV}): {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Modal config file {str(path)!r} is not valid TOML: {exc}") from None

    table = data.get(CONFIG_TABLE)
    if not isinstance(table, dict):
        raise ConfigError(f"Modal config file {str(path)!r} has no [{CONFIG_TABLE}] table: put the settings under [{CONFIG_TABLE}]")
    return config_from_mapping(table, source=str(path))


def config_from_mapping(data: Any, *, source: str = "<config>") -> ModalDeployConfig:
    """Build a validated config from a mapping of setting names to values; errors name ``source`` and the key."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the Modal settings must be a table, got {type(data).__name__}")
    if "min_containers" in data:
        raise ConfigError(
            f"{source}: min_containers cannot be set: it is always {MIN_CONTAINERS} so that an idle app"
            " scales to zero; remove the key"
        )
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"{source}: unknown Modal setting {unknown[0]!r}: use one of {', '.join(sorted(_FIELDS))}")

    values = dict(data)
    for key in _TUPLE_FIELDS:
        if key in values:
            if not isinstance(values[key], (list, tuple)):
                raise ConfigError(f"{source}: {key} = {values[key]!r} is invalid: use a list of strings")
            values[key] = tuple(values[key])
    try:
        return ModalDeployConfig(**values)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _check_name(key: str, value: Any) -> None:
    if not isinstance(value, str) or not _MODAL_NAME_PATTERN.fullmatch(value):
        raise ConfigError(
            f"{key} = {value!r} is invalid: a Modal name has 1 to 64 letters, digits, '-', '_' or '.'"
        )


def _check_int(key: str, value: Any, minimum: int, maximum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ConfigError(f"{key} = {value!r} is invalid: use an integer from {minimum} to {maximum}")


def _check_seconds(key: str, value: Any, minimum: float, maximum: float) -> None:
    valid = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not valid or not minimum <= value <= maximum:
        raise ConfigError(f"{key} = {value!r} is invalid: use a number of seconds from {minimum:g} to {maximum:g}")
