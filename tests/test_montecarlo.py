"""Tests for the Monte Carlo option pricing workload."""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pytest

from qworker.context import TaskContext
from qworker.errors import ConfigError
from qworker.task import Task
from qworker.workloads import montecarlo
from qworker.workloads.montecarlo import (
    AGGREGATION,
    DEFAULT_CONTRACTS,
    WORKLOAD,
    black_scholes_call,
    closed_form_price,
    geometric_asian_call,
    handle,
    summarize,
    validate_config,
)

MARKET = {"s0": 100.0, "rate": 0.05, "sigma": 0.2, "maturity": 1.0}


def make_context(task: Task, tmp_path: Path) -> TaskContext:
    return TaskContext(
        task=task,
        logger=logging.LoggerAdapter(logging.getLogger("test"), {}),
        scratch_root=tmp_path,
        requested_device="cpu",
        http_factory=lambda: None,
    )


def run_task(seed: int, config: dict, tmp_path: Path) -> dict:
    task = Task.create(seed, config)
    return handle(task, make_context(task, tmp_path))


def contract(name: str) -> dict:
    return next(dict(c) for c in DEFAULT_CONTRACTS if c["contract"] == name)


def aggregate_rows(rows: list[dict]) -> pa.Table:
    """Sum result rows per contract the way the reducer does, including ``rows`` and ``tasks``."""
    groups: dict[tuple, dict] = {}
    for row in rows:
        key = tuple(row[k] for k in AGGREGATION.keys)
        if key not in groups:
            groups[key] = {**dict(zip(AGGREGATION.keys, key)), "rows": 0, "tasks": 0}
            groups[key].update({column: 0 for column in AGGREGATION.sums})
        group = groups[key]
        for column in AGGREGATION.sums:
            group[column] += row[column]
        group["rows"] += 1
        group["tasks"] += 1
    return pa.Table.from_pylist(list(groups.values()))


# ---------------------------------------------------------------------------
# Closed forms


def test_black_scholes_known_value():
    assert black_scholes_call(100.0, 100.0, 0.05, 0.2, 1.0) == pytest.approx(10.4506, abs=5e-5)


def test_black_scholes_put_call_parity_holds():
    # C - P = S - K e^{-rT}, with the put priced by its own formula.
    s0, strike, rate, sigma, maturity = 100.0, 110.0, 0.05, 0.2, 1.0
    sd = sigma * math.sqrt(maturity)
    d1 = (math.log(s0 / strike) + (rate + 0.5 * sigma**2) * maturity) / sd
    d2 = d1 - sd
    normal = montecarlo.normal_cdf
    put = strike * math.exp(-rate * maturity) * normal(-d2) - s0 * normal(-d1)
    call = black_scholes_call(s0, strike, rate, sigma, maturity)
    assert call - put == pytest.approx(s0 - strike * math.exp(-rate * maturity), abs=1e-12)


def test_geometric_asian_one_step_equals_european():
    # With one monitoring date the geometric average is S_T itself.
    for strike in (90.0, 100.0, 110.0):
        asian = geometric_asian_call(100.0, strike, 0.05, 0.2, 1.0, 1)
        assert asian == pytest.approx(black_scholes_call(100.0, strike, 0.05, 0.2, 1.0), rel=1e-12)


def test_geometric_asian_continuous_limit():
    # Continuous monitoring: log G has mean ln S0 + (r - sigma^2/2) T/2 and
    # variance sigma^2 T/3. Written here in cost-of-carry form, b = (r - sigma^2/6)/2.
    s0, strike, rate, sigma, maturity = 100.0, 100.0, 0.05, 0.2, 1.0
    sd = sigma * math.sqrt(maturity / 3)
    b = 0.5 * (rate - sigma**2 / 6)
    d1 = (math.log(s0 / strike) + (b + 0.5 * sd**2 / maturity) * maturity) / sd
    d2 = d1 - sd
    normal = montecarlo.normal_cdf
    continuous = s0 * math.exp((b - rate) * maturity) * normal(d1) - strike * math.exp(-rate * maturity) * normal(d2)

    assert geometric_asian_call(s0, strike, rate, sigma, maturity, 100_000) == pytest.approx(continuous, abs=1e-4)


def test_geometric_asian_moments_match_brute_force_sums():
    # Compute mean and variance of log G from the sums over monitoring dates
    # directly, then integrate the payoff over the normal density numerically.
    s0, strike, rate, sigma, maturity, n = 100.0, 105.0, 0.05, 0.2, 1.0, 5
    dt = maturity / n
    mean = math.log(s0) + sum((rate - 0.5 * sigma**2) * i * dt for i in range(1, n + 1)) / n
    variance = sigma**2 * dt * sum(min(i, j) for i in range(1, n + 1) for j in range(1, n + 1)) / n**2
    sd = math.sqrt(variance)

    # Midpoint rule over z in [-10, 10] for E[max(exp(mean + sd z) - K, 0)].
    points = 200_000
    width = 20.0 / points
    expected = 0.0
    for k in range(points):
        z = -10.0 + (k + 0.5) * width
        expected += max(math.exp(mean + sd * z) - strike, 0.0) * math.exp(-0.5 * z * z)
    expected *= width / math.sqrt(2 * math.pi)

    price = math.exp(-rate * maturity) * expected
    assert geometric_asian_call(s0, strike, rate, sigma, maturity, n) == pytest.approx(price, rel=1e-8)


def test_closed_form_price_dispatches_on_kind():
    for config in DEFAULT_CONTRACTS:
        price = closed_form_price(config)
        assert math.isfinite(price)
        assert price > 0
    assert closed_form_price(contract("euro-atm")) == pytest.approx(10.4506, abs=5e-5)


# ---------------------------------------------------------------------------
# Handler


def test_handle_row_contents(tmp_path):
    config = {"contract": "c", "kind": "european", "s0": 100, "strike": 100, "rate": 0, "sigma": 0.2, "maturity": 1, "steps": 4, "paths": 1_000}
    row = run_task(3, config, tmp_path)

    assert row["contract"] == "c"
    assert row["kind"] == "european"
    assert row["seed"] == 3
    assert row["count"] == 1_000
    assert row["steps"] == 4
    assert row["device"] == "cpu"
    for key in ("s0", "strike", "rate", "sigma", "maturity", "payoff_sum", "payoff_sq_sum", "elapsed_s"):
        assert isinstance(row[key], float), key
    assert row["payoff_sum"] > 0
    assert row["payoff_sq_sum"] > 0
    assert row["elapsed_s"] >= 0


def test_handle_same_seed_same_sums(tmp_path):
    config = contract("asian-atm")
    first = run_task(7, config, tmp_path)
    second = run_task(7, config, tmp_path)
    assert first["payoff_sum"] == second["payoff_sum"]
    assert first["payoff_sq_sum"] == second["payoff_sq_sum"]


def test_handle_different_seed_different_sums(tmp_path):
    config = contract("asian-atm")
    assert run_task(7, config, tmp_path)["payoff_sum"] != run_task(8, config, tmp_path)["payoff_sum"]


def test_handle_chunks_cover_all_paths(tmp_path, monkeypatch):
    # 1,000 paths per chunk of 16 steps, so 2,500 paths take 3 chunks, the last one partial.
    monkeypatch.setattr(montecarlo, "_CHUNK_ELEMENTS", 16_000)
    config = {**contract("euro-atm"), "paths": 2_500}
    chunked = run_task(11, config, tmp_path)

    count = chunked["count"]
    price = chunked["payoff_sum"] / count
    variance = (chunked["payoff_sq_sum"] - chunked["payoff_sum"] * price) / (count - 1)
    std_error = math.sqrt(variance / count)
    assert count == 2_500
    assert abs(price - closed_form_price(config)) < 4 * std_error


def test_chunk_elements_from_config(tmp_path, monkeypatch):
    config = {**contract("euro-atm"), "paths": 2_500, "chunk_elements": 16_000}
    from_config = run_task(11, config, tmp_path)
    monkeypatch.setattr(montecarlo, "_CHUNK_ELEMENTS", 16_000)
    from_constant = run_task(11, {**contract("euro-atm"), "paths": 2_500}, tmp_path)

    assert from_config["count"] == 2_500
    assert from_config["payoff_sum"] == from_constant["payoff_sum"]
    assert from_config["payoff_sq_sum"] == from_constant["payoff_sq_sum"]


def test_handle_threads_match_serial_runs(tmp_path):
    # The consumer runs several handlers at once in worker threads of one process.
    config = contract("asian-otm")
    serial = [run_task(seed, config, tmp_path)["payoff_sum"] for seed in range(8)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(lambda seed: run_task(seed, config, tmp_path)["payoff_sum"], range(8)))
    assert threaded == serial


def test_handle_propagates_cuda_out_of_memory(tmp_path, monkeypatch):
    # The consumer handles OutOfMemoryError itself, so the handler must not catch it.
    torch = montecarlo._load_torch()

    def raise_out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 32.00 MiB")

    monkeypatch.setattr(torch, "randn", raise_out_of_memory)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        run_task(1, contract("euro-atm"), tmp_path)


def test_handle_draws_on_requested_device(tmp_path):
    # Without a GPU, asking for cuda must fail in torch rather than fall back to the CPU.
    torch = montecarlo._load_torch()
    if torch.cuda.is_available():
        pytest.skip("this check needs a machine without CUDA")
    task = Task.create(1, contract("euro-atm"))
    context = make_context(task, tmp_path)
    context.requested_device = "cuda"
    with pytest.raises(RuntimeError, match="CUDA"):
        handle(task, context)


def test_handle_rejects_invalid_config(tmp_path):
    with pytest.raises(ConfigError, match="sigma"):
        run_task(1, {**contract("euro-atm"), "sigma": -0.2}, tmp_path)


def test_prices_match_closed_forms(tmp_path):
    # 20 tasks x 20,000 paths per contract. Seeds are fixed, so this is deterministic.
    for config in DEFAULT_CONTRACTS:
        rows = [run_task(seed, config, tmp_path) for seed in range(20)]
        count = sum(row["count"] for row in rows)
        payoff_sum = sum(row["payoff_sum"] for row in rows)
        payoff_sq_sum = sum(row["payoff_sq_sum"] for row in rows)

        price = payoff_sum / count
        variance = (payoff_sq_sum - payoff_sum**2 / count) / (count - 1)
        std_error = math.sqrt(variance / count)
        expected = closed_form_price(config)

        assert count == 400_000
        assert abs(price - expected) < 4 * std_error, (config["contract"], price, expected, std_error)

        summary = summarize(aggregate_rows(rows)).to_pylist()
        assert len(summary) == 1
        assert summary[0]["price"] == pytest.approx(price, rel=1e-12)
        assert summary[0]["std_error"] == pytest.approx(std_error, rel=1e-9)
        assert abs(summary[0]["z_score"]) < 4


# ---------------------------------------------------------------------------
# Config validation


def test_validate_config_accepts_default_contracts():
    for config in DEFAULT_CONTRACTS:
        validate_config(config)


def test_validate_config_allows_unknown_keys():
    validate_config({**contract("euro-atm"), "job": "nightly"})


def test_validate_config_missing_key():
    config = contract("euro-atm")
    del config["strike"]
    with pytest.raises(ConfigError) as excinfo:
        validate_config(config)
    message = str(excinfo.value)
    assert "missing config key 'strike'" in message
    assert "euro-atm" in message


def test_validate_config_negative_sigma():
    with pytest.raises(ConfigError) as excinfo:
        validate_config({**contract("euro-atm"), "sigma": -0.2})
    assert "sigma=-0.2" in str(excinfo.value)
    assert "positive" in str(excinfo.value)


def test_validate_config_unknown_kind():
    with pytest.raises(ConfigError) as excinfo:
        validate_config({**contract("euro-atm"), "kind": "asian_arithmetic"})
    assert "kind='asian_arithmetic'" in str(excinfo.value)
    assert "asian_geometric" in str(excinfo.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("contract", ""),
        ("contract", 5),
        ("s0", 0),
        ("strike", "100"),
        ("maturity", -1.0),
        ("sigma", float("nan")),
        ("rate", None),
        ("rate", True),
        ("steps", 0),
        ("steps", 64.0),
        ("steps", montecarlo.MAX_STEPS + 1),
        ("paths", 1),
        ("paths", montecarlo.MAX_PATHS + 1),
        ("paths", "20000"),
        ("chunk_elements", 0),
        ("chunk_elements", 1024.0),
        ("chunk_elements", montecarlo.MAX_CHUNK_ELEMENTS + 1),
    ],
)
def test_validate_config_rejects_value(key, value):
    with pytest.raises(ConfigError) as excinfo:
        validate_config({**contract("asian-atm"), key: value})
    assert f"{key}=" in str(excinfo.value)


def test_validate_config_accepts_zero_and_negative_rate():
    validate_config({**contract("euro-atm"), "rate": 0})
    validate_config({**contract("euro-atm"), "rate": -0.01})


def test_validate_config_rejects_non_dict():
    with pytest.raises(ConfigError, match="expected a dict"):
        validate_config(["euro-atm"])


# ---------------------------------------------------------------------------
# Summary


def test_summarize_hand_built_aggregate():
    # Payoffs 1, 2, 3 and 4: mean 2.5, sample variance 5/3, standard error sqrt(5/12).
    base = {**contract("euro-atm"), "steps": 16}
    keys = {key: base[key] for key in AGGREGATION.keys}
    aggregate = pa.Table.from_pylist(
        [
            {**keys, "contract": "z-last", "payoff_sum": 10.0, "payoff_sq_sum": 30.0, "count": 4, "rows": 2, "tasks": 2},
            {**keys, "payoff_sum": 10.0, "payoff_sq_sum": 30.0, "count": 4, "rows": 2, "tasks": 2},
        ]
    )
    summary = summarize(aggregate)

    assert summary.schema == montecarlo.SUMMARY_SCHEMA
    rows = summary.to_pylist()
    assert [row["contract"] for row in rows] == ["euro-atm", "z-last"]
    row = rows[0]
    assert row["kind"] == "european"
    assert row["tasks"] == 2
    assert row["paths"] == 4
    assert row["price"] == pytest.approx(2.5)
    assert row["std_error"] == pytest.approx(math.sqrt(5 / 12))
    assert row["closed_form"] == pytest.approx(10.4506, abs=5e-5)
    assert row["z_score"] == pytest.approx((2.5 - row["closed_form"]) / math.sqrt(5 / 12))


def test_summarize_zero_variance_gives_null_z_score():
    keys = {key: contract("asian-otm")[key] for key in AGGREGATION.keys}
    aggregate = pa.Table.from_pylist([{**keys, "payoff_sum": 0.0, "payoff_sq_sum": 0.0, "count": 10, "rows": 1, "tasks": 1}])
    row = summarize(aggregate).to_pylist()[0]
    assert row["price"] == 0.0
    assert row["std_error"] == 0.0
    assert row["z_score"] is None


def test_summarize_empty_aggregate():
    # Before any result is folded, the reducer's aggregate has null-typed key and sum columns.
    columns = {name: pa.array([], pa.null()) for name in (*AGGREGATION.keys, *AGGREGATION.sums)}
    columns["rows"] = pa.array([], pa.int64())
    columns["tasks"] = pa.array([], pa.int64())
    for aggregate in (pa.table(columns), pa.table({})):
        summary = summarize(aggregate)
        assert summary.num_rows == 0
        assert summary.schema == montecarlo.SUMMARY_SCHEMA


def test_summarize_null_sums_give_null_price():
    # The reducer stores a null sum when result files lack a sum column.
    keys = {key: contract("euro-otm")[key] for key in AGGREGATION.keys}
    aggregate = pa.Table.from_pylist([{**keys, "payoff_sum": None, "payoff_sq_sum": None, "count": None, "rows": 3, "tasks": 3}])
    row = summarize(aggregate).to_pylist()[0]
    assert row["tasks"] == 3
    assert row["paths"] == 0
    assert row["price"] is None
    assert row["std_error"] is None
    assert row["z_score"] is None
    assert row["closed_form"] == pytest.approx(closed_form_price(contract("euro-otm")))


# ---------------------------------------------------------------------------
# Registration


def test_workload_definition():
    assert WORKLOAD.name == "montecarlo"
    assert WORKLOAD.handler is handle
    assert WORKLOAD.validate_config is validate_config
    assert WORKLOAD.summarize is summarize
    assert WORKLOAD.aggregation == AGGREGATION
    assert AGGREGATION.keys == ("contract", "kind", "s0", "strike", "rate", "sigma", "maturity", "steps")
    assert AGGREGATION.sums == ("payoff_sum", "payoff_sq_sum", "count")
    assert [c["contract"] for c in DEFAULT_CONTRACTS] == ["euro-atm", "euro-otm", "asian-atm", "asian-otm"]
