"""ModalBucket through the real modal client, against the session's local Modal-compatible server.

The multi-process tests start child processes that run this file as a
script: each runs a RateLimiter on its own ModalBucket with many waiting
coroutines, and writes the unix time at which each token was granted.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import itertools
import json
import math
import os
import subprocess
import sys
import time
import types
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from qworker.backends import modal_bucket
from qworker.backends.modal_bucket import ModalBucket, plan_slots, slot_dict_name
from qworker.ratelimit import Budget, RateLimiter

PROCESSES = 3
WAITERS_PER_PROCESS = 25
RATE = 50
BURST = 5
RUN_S = 4.0
PAUSE_AT_S = 1.0
PAUSE_S = 1.5
# Children start this long after the last one reported ready.
START_DELAY_S = 0.3


# -- child process -------------------------------------------------------------


async def _run_child(config: dict[str, Any]) -> dict[str, Any]:
    budget = Budget(**config["budget"])
    bucket = ModalBucket()
    limiter = RateLimiter(bucket, [budget])
    # Connect and create the control Dict before the start, so start-up
    # costs do not count as lost throughput.
    await bucket.stats()
    print("ready", flush=True)
    start_at = float(sys.stdin.readline())
    await asyncio.sleep(max(0.0, start_at - time.time()))
    deadline = start_at + config["run_s"]

    times: list[float] = []
    pause: dict[str, float] = {}

    async def wait_for_tokens() -> None:
        while time.time() < deadline:
            await limiter.acquire(budget.name)
            times.append(time.time())

    async def pause_budget() -> None:
        await asyncio.sleep(max(0.0, start_at + config["pause_at_s"] - time.time()))
        pause["called"] = time.time()
        await limiter.pause(budget.name, config["pause_s"])
        pause["returned"] = time.time()

    coroutines = [wait_for_tokens() for _ in range(config["waiters"])]
    if config.get("pause_at_s") is not None:
        coroutines.append(pause_budget())
    await asyncio.gather(*coroutines)
    await bucket.flush()
    return {
        "times": times,
        "granted": limiter.local_granted,
        "waited_s": limiter.local_waited_s,
        "pause": pause,
        "start_at": start_at,
        "deadline": deadline,
    }


def _child_main(config_path: str, result_path: str) -> None:
    config = json.loads(Path(config_path).read_text())
    result = asyncio.run(_run_child(config))
    Path(result_path).write_text(json.dumps(result))


# -- parent side ---------------------------------------------------------------


@dataclass
class Run:
    """Results of the child processes of one scenario, and the RPCs that the server counted meanwhile."""

    budget: Budget
    results: list[dict[str, Any]]
    rpc_counts: dict[str, int]

    @property
    def times(self) -> list[float]:
        return sorted(t for result in self.results for t in result["times"])

    @property
    def start_at(self) -> float:
        return self.results[0]["start_at"]

    @property
    def deadline(self) -> float:
        return self.results[0]["deadline"]


def run_children(server: Any, directory: Path, budget: Budget, **options: Any) -> Run:
    """Run PROCESSES children on ``budget`` from one common start time; return their results."""
    directory.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **server.client_env()}
    before = server.rpc_counts()
    children: list[tuple[subprocess.Popen[str], Path, Path]] = []
    try:
        for index in range(PROCESSES):
            config = {
                "budget": dataclasses.asdict(budget),
                "run_s": RUN_S,
                "waiters": WAITERS_PER_PROCESS,
                **(options if index == 0 else {}),
            }
            config_path = directory / f"config-{index}.json"
            config_path.write_text(json.dumps(config))
            result_path = directory / f"result-{index}.json"
            log_path = directory / f"child-{index}.log"
            with open(log_path, "w") as log:
                process = subprocess.Popen(
                    [sys.executable, __file__, str(config_path), str(result_path)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                )
            children.append((process, result_path, log_path))

        for process, _, log_path in children:
            line = process.stdout.readline() if process.stdout else ""
            assert line.strip() == "ready", f"child {process.pid} did not start: {log_path.read_text()}"
        start_at = time.time() + START_DELAY_S
        for process, _, _ in children:
            assert process.stdin is not None
            process.stdin.write(f"{start_at}\n")
            process.stdin.close()

        results = []
        for process, result_path, log_path in children:
            returncode = process.wait(timeout=60)
            assert returncode == 0, f"child {process.pid} exited with {returncode}: {log_path.read_text()}"
            results.append(json.loads(result_path.read_text()))
    finally:
        for process, _, _ in children:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
            if process.stdout:
                process.stdout.close()

    after = server.rpc_counts()
    counts = {name: after.get(name, 0) - before.get(name, 0) for name in after}
    return Run(budget, results, counts)


def max_per_window(times: list[float], window_s: float) -> int:
    """Return the maximum count of times in any half-open window ``[t, t + window_s)``; ``times`` must be sorted.

    The fullest window can always start at one of the times.
    """
    return max((bisect.bisect_left(times, t + window_s) - i for i, t in enumerate(times)), default=0)


def count_between(times: Iterable[float], start: float, end: float) -> int:
    return sum(1 for t in times if start <= t < end)


@pytest.fixture(scope="module")
def free_run(modal_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Run:
    budget = Budget(f"rl-free-{uuid.uuid4().hex[:8]}", rate=RATE, period_s=1.0, burst=BURST)
    return run_children(modal_server, tmp_path_factory.mktemp("free_run"), budget)


@pytest.fixture(scope="module")
def paused_run(modal_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Run:
    budget = Budget(f"rl-pause-{uuid.uuid4().hex[:8]}", rate=RATE, period_s=1.0, burst=BURST)
    return run_children(
        modal_server, tmp_path_factory.mktemp("paused_run"), budget, pause_at_s=PAUSE_AT_S, pause_s=PAUSE_S
    )


def budget_stats(name: str) -> Any:
    async def read() -> Any:
        return await ModalBucket().stats()

    return next(stats for stats in asyncio.run(read()) if stats.name == name)


# -- tests ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "rate, period_s, burst",
    [(50, 1.0, 5), (50, 1.0, 0), (1, 1.0, 0), (2.5, 1.0, 0), (0.5, 1.0, 2), (1000, 1.0, 50), (10, 60.0, 3)],
)
def test_slot_plan_bounds_window(rate: float, period_s: float, burst: int) -> None:
    budget = Budget("plan", rate=rate, period_s=period_s, burst=burst)
    bucket = ModalBucket()
    plan = plan_slots(budget, bucket.max_skew_s, bucket.grace_s)
    allowed = max(1, math.floor(rate + burst))

    # Slot times of the tokens used in one period lie in an interval this long.
    spread_s = period_s + plan.window_s + bucket.max_skew_s
    assert math.ceil(spread_s / plan.interval_s - 1e-9) <= allowed
    assert plan.interval_s >= budget.interval_s
    assert plan.window_s >= bucket.grace_s


def test_window_within_rate_plus_burst(free_run: Run) -> None:
    times = free_run.times

    assert len(times) > RATE * RUN_S * 0.8
    assert max_per_window(times, 1.0) <= RATE + BURST
    for result in free_run.results:
        assert result["times"], "a process got no token"


def test_utilisation_at_least_90_percent(free_run: Run) -> None:
    times = free_run.times
    # The first second contains the burst, so utilisation is measured after it.
    steady_start = times[0] + 1.0
    steady_s = free_run.deadline - steady_start

    utilisation = count_between(times, steady_start, free_run.deadline) / (RATE * steady_s)
    assert utilisation >= 0.9


def test_slot_puts_per_token(free_run: Run) -> None:
    # Every process tries each slot of its horizon at most once.
    puts = free_run.rpc_counts.get("DictUpdate", 0)

    assert puts / len(free_run.times) <= PROCESSES + 0.5


def test_stats_sum_over_processes(free_run: Run) -> None:
    stats = budget_stats(free_run.budget.name)

    assert stats.granted == sum(result["granted"] for result in free_run.results)
    assert stats.granted == len(free_run.times)
    assert 0 < stats.waited_s <= sum(result["waited_s"] for result in free_run.results) + 1e-6
    assert stats.throttled == 0


def test_pause_stops_grants_in_all_processes(paused_run: Run) -> None:
    pauser = paused_run.results[0]
    called, returned = pauser["pause"]["called"], pauser["pause"]["returned"]
    until = called + PAUSE_S
    # Other processes read the pause at most pause_refresh_s after it was
    # written, plus one RPC and one poll of the dispatcher.
    seen_by_all = returned + ModalBucket().pause_refresh_s + 0.05

    assert count_between(pauser["times"], returned, until) == 0
    for index, result in enumerate(paused_run.results):
        assert count_between(result["times"], seen_by_all, until) == 0, f"process {index} got tokens while paused"
        assert count_between(result["times"], paused_run.start_at, called) > 0, f"process {index} got no token"
    assert count_between(paused_run.times, until, paused_run.deadline) > 0
    assert max_per_window(paused_run.times, 1.0) <= RATE + BURST


def test_pause_counted_and_stored(paused_run: Run) -> None:
    stats = budget_stats(paused_run.budget.name)
    pauser = paused_run.results[0]

    assert stats.throttled == 1
    assert stats.granted == len(paused_run.times)
    assert stats.paused_until == pytest.approx(pauser["pause"]["called"] + PAUSE_S, abs=0.05)


def test_limiter_across_event_loops(modal_server: Any) -> None:
    budget = Budget(f"rl-loops-{uuid.uuid4().hex[:8]}", rate=20, period_s=1.0, burst=2)
    limiter = RateLimiter(ModalBucket(), [budget])

    async def acquire(count: int) -> int:
        async def one() -> None:
            await limiter.acquire(budget.name)

        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(count))), timeout=10)
        return count

    assert asyncio.run(acquire(8)) == 8
    assert asyncio.run(acquire(8)) == 8
    assert limiter.local_granted == 16


def test_claims_cross_hour_boundary(modal_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # The bucket's clock starts 1 s before the next hour, so its claims move to a new slot Dict.
    real_now = time.time()
    boundary = (math.floor(real_now / 3600) + 1) * 3600
    offset_s = boundary - 1.0 - real_now
    clock = types.SimpleNamespace(time=lambda: time.time() + offset_s, monotonic=time.monotonic)
    monkeypatch.setattr(modal_bucket, "time", clock)
    budget = Budget(f"rl-hour-{uuid.uuid4().hex[:8]}", rate=RATE, period_s=1.0, burst=BURST)
    limiter = RateLimiter(ModalBucket(), [budget])
    times: list[float] = []

    async def run() -> None:
        deadline = clock.time() + 2.0

        async def wait_for_tokens() -> None:
            while clock.time() < deadline:
                await limiter.acquire(budget.name)
                times.append(clock.time())

        await asyncio.gather(*(wait_for_tokens() for _ in range(WAITERS_PER_PROCESS)))

    async def new_hour_exists() -> bool:
        import modal

        await modal.Dict.from_name(slot_dict_name(budget.name, math.floor(boundary / 3600))).hydrate.aio()
        return True

    asyncio.run(run())
    times.sort()
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]

    assert count_between(times, boundary - 1.0, boundary) > RATE * 0.5
    assert count_between(times, boundary, boundary + 1.0) > RATE * 0.8
    assert max(gaps) < 0.2
    assert max_per_window(times, 1.0) <= RATE + BURST
    assert asyncio.run(new_hour_exists())


def test_old_hour_dicts_deleted(modal_server: Any) -> None:
    import modal
    from modal.exception import NotFoundError

    budget = Budget(f"rl-gc-{uuid.uuid4().hex[:8]}", rate=RATE)
    bucket = ModalBucket()
    current = math.floor(time.time() / 3600)
    kept = [current - 1, current]

    async def scenario() -> tuple[list[int], list[int], list[int]]:
        for hour in [current - 5, current - 3, *kept]:
            slots = modal.Dict.from_name(slot_dict_name(budget.name, hour), create_if_missing=True)
            await slots.put.aio("s/1", "test")
        control = modal.Dict.from_name("qworker-rl-control", create_if_missing=True)
        await control.put.aio(f"gc-pending/{budget.name}", json.dumps([current - 5, current - 3]))

        deleted = await bucket.delete_old_hours(budget, current)
        missing, present = [], []
        for hour in [current - 5, current - 3, *kept]:
            try:
                await modal.Dict.from_name(slot_dict_name(budget.name, hour)).hydrate.aio()
                present.append(hour)
            except NotFoundError:
                missing.append(hour)
        return deleted, missing, present

    deleted, missing, present = asyncio.run(scenario())

    assert deleted == [current - 5, current - 3]
    assert missing == [current - 5, current - 3]
    assert present == kept


if __name__ == "__main__":
    _child_main(sys.argv[1], sys.argv[2])
