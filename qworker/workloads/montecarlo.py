"""Monte Carlo pricing of European and geometric-average Asian calls under Black–Scholes.

Each task simulates ``paths`` price paths of geometric Brownian motion with torch
and returns the sum and the sum of squares of the discounted payoffs. The reducer
adds these up per contract, and :func:`summarize` turns the totals into a price,
a standard error and a z-score against the closed-form price.

The paths use exact log-normal increments over ``steps`` equal time steps, and
the Asian average is taken at those same dates. Both closed forms are exact for
that discrete monitoring, so the z-score measures only Monte Carlo error (and
bugs). Across many contracts it should look standard normal.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import time
from typing import TYPE_CHECKING, Any, Mapping

import pyarrow as pa

from ..errors import ConfigError
from .base import Aggregation, Workload

if TYPE_CHECKING:
    import types

    from ..context import TaskContext
    from ..task import Task

EUROPEAN = "european"
ASIAN_GEOMETRIC = "asian_geometric"
KINDS = (EUROPEAN, ASIAN_GEOMETRIC)

REQUIRED_KEYS = ("contract", "kind", "s0", "strike", "rate", "sigma", "maturity", "steps", "paths")
_POSITIVE_KEYS = ("s0", "strike", "sigma", "maturity")

# Upper limits for one task. MAX_PATHS at 64 steps is 3.2e9 normal draws, so
# larger runs belong in more tasks. The two limits are checked separately.
MAX_PATHS = 50_000_000
MAX_STEPS = 100_000

# Default maximum number of float64 values in one chunk of normal draws (32 MiB).
# With 64 steps a chunk contains 65,536 paths. The chunk size depends only on
# ``steps`` and the optional config key ``chunk_elements``, so a seed gives the
# same paths on every run, but another chunk size gives other paths for a seed.
# A chunk's draws are most of a task's peak device memory: about 8 bytes per element.
_CHUNK_ELEMENTS = 2**22
MAX_CHUNK_ELEMENTS = 2**36

AGGREGATION = Aggregation(
    keys=("contract", "kind", "s0", "strike", "rate", "sigma", "maturity", "steps"),
    sums=("payoff_sum", "payoff_sq_sum", "count"),
)

SUMMARY_SCHEMA = pa.schema(
    [
        ("contract", pa.string()),
        ("kind", pa.string()),
        ("tasks", pa.int64()),
        ("paths", pa.int64()),
        ("price", pa.float64()),
        ("std_error", pa.float64()),
        ("closed_form", pa.float64()),
        ("z_score", pa.float64()),
    ]
)

_MARKET = {"s0": 100.0, "rate": 0.05, "sigma": 0.2, "maturity": 1.0}

# The contracts that the demo pushes. European prices do not depend on
# ``steps``, so those contracts use fewer steps to save time.
DEFAULT_CONTRACTS: list[dict[str, Any]] = [
    {"contract": "euro-atm", "kind": EUROPEAN, **_MARKET, "strike": 100.0, "steps": 16, "paths": 20_000},
    {"contract": "euro-otm", "kind": EUROPEAN, **_MARKET, "strike": 110.0, "steps": 16, "paths": 20_000},
    {"contract": "asian-atm", "kind": ASIAN_GEOMETRIC, **_MARKET, "strike": 100.0, "steps": 64, "paths": 20_000},
    {"contract": "asian-otm", "kind": ASIAN_GEOMETRIC, **_MARKET, "strike": 105.0, "steps": 64, "paths": 20_000},
]


# ---------------------------------------------------------------------------
# Config validation


def validate_config(config: Mapping[str, Any]) -> None:
    """Raise ConfigError unless ``config`` describes a contract that :func:`handle` can price.

    The message names the key, its value and the fix. Keys outside
    ``REQUIRED_KEYS`` are allowed because other layers add their own.
    """
    if not isinstance(config, Mapping):
        raise ConfigError(f"invalid montecarlo config {config!r}: expected a dict")

    contract = config.get("contract")
    where = f" (contract {contract!r})" if isinstance(contract, str) and contract else ""
    for key in REQUIRED_KEYS:
        if key not in config:
            raise ConfigError(f"missing config key {key!r}{where}: add it to the task config")

    if not isinstance(contract, str) or not contract:
        raise _invalid_value("contract", contract, where, "use a non-empty string")

    kind = config["kind"]
    if kind not in KINDS:
        raise _invalid_value("kind", kind, where, f"use {EUROPEAN!r} or {ASIAN_GEOMETRIC!r}")

    for key in _POSITIVE_KEYS:
        value = config[key]
        if not _is_real(value) or value <= 0:
            raise _invalid_value(key, value, where, "use a positive number")

    rate = config["rate"]
    if not _is_real(rate):
        raise _invalid_value("rate", rate, where, "use a number, such as 0.05 for 5% a year")

    steps = config["steps"]
    if not _is_int(steps) or not 1 <= steps <= MAX_STEPS:
        raise _invalid_value("steps", steps, where, f"use an integer from 1 to {MAX_STEPS:,}")

    paths = config["paths"]
    if not _is_int(paths) or not 2 <= paths <= MAX_PATHS:
        raise _invalid_value(
            "paths", paths, where, f"use an integer from 2 to {MAX_PATHS:,}, and split larger runs over more tasks"
        )

    chunk = config.get("chunk_elements", _CHUNK_ELEMENTS)
    if not _is_int(chunk) or not 1 <= chunk <= MAX_CHUNK_ELEMENTS:
        raise _invalid_value("chunk_elements", chunk, where, f"use an integer from 1 to {MAX_CHUNK_ELEMENTS:,}")


def _invalid_value(key: str, value: object, where: str, fix: str) -> ConfigError:
    return ConfigError(f"invalid config value {key}={value!r}{where}: {fix}")


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------
# Closed forms


def normal_cdf(x: float) -> float:
    """Return the standard normal CDF at ``x``.

    erfc keeps full relative precision in the lower tail, where 1 + erf(x) cancels.
    """
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def black_scholes_call(s0: float, strike: float, rate: float, sigma: float, maturity: float) -> float:
    """Return the Black–Scholes price of a European call on a non-dividend stock."""
    sd = sigma * math.sqrt(maturity)
    d1 = (math.log(s0 / strike) + (rate + 0.5 * sigma * sigma) * maturity) / sd
    d2 = d1 - sd
    return s0 * normal_cdf(d1) - strike * math.exp(-rate * maturity) * normal_cdf(d2)


def geometric_asian_call(s0: float, strike: float, rate: float, sigma: float, maturity: float, steps: int) -> float:
    """Return the price of a call on the geometric average of S at t_i = i*T/steps, i = 1..steps.

    Under Black–Scholes, log G is normal with mean mu_G and variance var_G below,
    so the price is a Black–Scholes-style formula in those two moments. With
    steps=1 it equals :func:`black_scholes_call`.
    """
    n = steps
    mu_g = math.log(s0) + (rate - 0.5 * sigma * sigma) * maturity * (n + 1) / (2 * n)
    var_g = sigma * sigma * maturity * (n + 1) * (2 * n + 1) / (6 * n * n)
    sd_g = math.sqrt(var_g)
    d2 = (mu_g - math.log(strike)) / sd_g
    d1 = d2 + sd_g
    expected_payoff = math.exp(mu_g + 0.5 * var_g) * normal_cdf(d1) - strike * normal_cdf(d2)
    return math.exp(-rate * maturity) * expected_payoff


def closed_form_price(config: Mapping[str, Any]) -> float:
    """Return the exact price of the contract that ``config`` describes.

    Raises ConfigError for an unknown ``kind``.
    """
    kind = config["kind"]
    market = (
        float(config["s0"]),
        float(config["strike"]),
        float(config["rate"]),
        float(config["sigma"]),
        float(config["maturity"]),
    )
    if kind == EUROPEAN:
        return black_scholes_call(*market)
    if kind == ASIAN_GEOMETRIC:
        return geometric_asian_call(*market, int(config["steps"]))
    raise ConfigError(f"invalid config value kind={kind!r}: use {EUROPEAN!r} or {ASIAN_GEOMETRIC!r}")


# ---------------------------------------------------------------------------
# Simulation

@functools.cache
def _load_torch() -> types.ModuleType:
    """Import torch on first use, so config checks and summaries work without it."""
    import torch

    return torch


def handle(task: Task, ctx: TaskContext) -> dict[str, Any]:
    """Simulate the task's paths on ``ctx.device`` and return one row of payoff sums.

    The draws come from a torch.Generator on that device seeded with
    ``task.seed``, so a seed gives the same sums on the same hardware and torch
    build. CPU and CUDA generators produce different streams. Raises
    ConfigError for an invalid config. Errors from torch, such as
    torch.cuda.OutOfMemoryError, propagate unchanged.

    NOTE: the CUDA path has only been run with a CPU build of torch, where it
    raises. Check the z-scores of a small run on a GPU before a long one.
    """
    config = task.config
    validate_config(config)
    torch = _load_torch()
    device = ctx.device

    started = time.perf_counter()
    with torch.inference_mode(), _slot_stream(torch, device):
        payoff_sum, payoff_sq_sum = _simulate_payoff_sums(torch, config, task.seed, device)
    elapsed_s = time.perf_counter() - started

    # Float keys are stored as float even when the config gave an int, so every
    # result file has the same column types and the reducer can group them.
    return {
        "contract": config["contract"],
        "kind": config["kind"],
        "s0": float(config["s0"]),
        "strike": float(config["strike"]),
        "rate": float(config["rate"]),
        "sigma": float(config["sigma"]),
        "maturity": float(config["maturity"]),
        "steps": int(config["steps"]),
        "seed": task.seed,
        "payoff_sum": payoff_sum,
        "payoff_sq_sum": payoff_sq_sum,
        "count": int(config["paths"]),
        "device": str(device),
        "elapsed_s": elapsed_s,
    }


_thread_streams = threading.local()


def _slot_stream(torch: types.ModuleType, device: str) -> Any:
    """Return a context that runs the task on a CUDA stream of its own worker thread, or does nothing off CUDA.

    Slots run sync handlers in worker threads. On one shared stream their
    kernels would queue behind each other, while a stream per thread lets the
    GPU overlap one task's kernels with another's launches and copies.
    """
    if not str(device).startswith("cuda"):
        return contextlib.nullcontext()
    streams = getattr(_thread_streams, "by_device", None)
    if streams is None:
        streams = _thread_streams.by_device = {}
    if device not in streams:
        streams[device] = torch.cuda.Stream(device=device)
    return torch.cuda.stream(streams[device])


def _simulate_payoff_sums(
    torch: types.ModuleType, config: Mapping[str, Any], seed: int, device: str
) -> tuple[float, float]:
    """Return the sum and the sum of squares of the discounted payoffs over all paths.

    Paths are drawn in chunks of at most ``_CHUNK_ELEMENTS`` normals, so memory
    stays bounded for any ``paths``. The sums stay on the device until the end,
    which avoids a host sync per chunk on CUDA.
    """
    steps = int(config["steps"])
    paths = int(config["paths"])
    strike = float(config["strike"])
    rate = float(config["rate"])
    sigma = float(config["sigma"])
    maturity = float(config["maturity"])
    is_european = config["kind"] == EUROPEAN

    dt = maturity / steps
    drift_per_step = (rate - 0.5 * sigma * sigma) * dt
    vol_per_step = sigma * math.sqrt(dt)
    log_s0 = math.log(float(config["s0"]))
    discount = math.exp(-rate * maturity)

    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    chunk_paths = max(1, min(paths, int(config.get("chunk_elements", _CHUNK_ELEMENTS)) // steps))

    payoff_sum = torch.zeros((), dtype=torch.float64, device=device)
    payoff_sq_sum = torch.zeros((), dtype=torch.float64, device=device)
    done = 0
    while done < paths:
        size = min(chunk_paths, paths - done)

        # Row p becomes log S of path p at t_1 .. t_steps. Each step adds an
        # exact log-normal increment, so there is no discretisation error.
        log_prices = torch.randn((size, steps), generator=generator, dtype=torch.float64, device=device)
        log_prices.mul_(vol_per_step).add_(drift_per_step).cumsum_(dim=1).add_(log_s0)

        if is_european:
            log_underlying = log_prices[:, -1]
        else:
            log_underlying = log_prices.mean(dim=1)  # log of the geometric average
        payoffs = log_underlying.exp().sub_(strike).clamp_(min=0.0).mul_(discount)

        payoff_sum += payoffs.sum()
        payoff_sq_sum += payoffs.square().sum()
        done += size

    return payoff_sum.item(), payoff_sq_sum.item()


# ---------------------------------------------------------------------------
# Summary


def summarize(aggregate: pa.Table) -> pa.Table:
    """Turn the reducer's per-contract sums into prices, standard errors and z-scores.

    Each aggregate row (one contract and parameter set) gives one output row
    with the columns of ``SUMMARY_SCHEMA``, sorted by contract name. Two
    parameter sets under one contract name give two rows with that name.
    ``price`` is null when a contract has no paths or a null payoff sum,
    ``std_error`` is null when it has fewer than 2 paths or a null sum, and
    ``z_score`` is null when ``std_error`` is null or 0.
    """
    groups = sorted(aggregate.to_pylist(), key=lambda group: tuple(group[key] for key in AGGREGATION.keys))
    rows = [_summarize_group(group) for group in groups]
    return pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)


def _summarize_group(group: Mapping[str, Any]) -> dict[str, Any]:
    # The reducer stores null for a sum column that its result files lack.
    count = int(group["count"] or 0)
    payoff_sum = group["payoff_sum"]
    payoff_sq_sum = group["payoff_sq_sum"]

    price = None
    if count >= 1 and payoff_sum is not None:
        price = payoff_sum / count

    std_error = None
    if count >= 2 and payoff_sum is not None and payoff_sq_sum is not None:
        # Sample variance from the two running sums. Rounding can push it
        # slightly below zero when every payoff is equal, hence the clamp.
        variance = max(0.0, (payoff_sq_sum - payoff_sum * payoff_sum / count) / (count - 1))
        std_error = math.sqrt(variance / count)

    closed_form = closed_form_price(group)
    z_score = None
    if price is not None and std_error:
        z_score = (price - closed_form) / std_error

    return {
        "contract": group["contract"],
        "kind": group["kind"],
        "tasks": int(group["tasks"]),
        "paths": count,
        "price": price,
        "std_error": std_error,
        "closed_form": closed_form,
        "z_score": z_score,
    }


WORKLOAD = Workload(
    name="montecarlo",
    handler=handle,
    validate_config=validate_config,
    aggregation=AGGREGATION,
    summarize=summarize,
    description=(
        "Price European and geometric-average Asian calls by Monte Carlo with torch. "
        "The summary compares each price with its exact closed form."
    ),
)
