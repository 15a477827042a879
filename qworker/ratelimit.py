"""A rate limiter shared by every slot of every consumer process.

A budget such as "50 requests per second to api.example.com" must hold for
the whole system. A per-process ``aiolimiter.AsyncLimiter`` alone lets N
processes send N times the budget, and it starts full, so it lets a burst
through at start-up. qworker therefore grants every request a token from a
global bucket that all processes share:

* inside a process, one dispatcher coroutine per budget requests from the global bucket
  for as many tokens as there are waiters and wakes that many, so thousands
  of waiting coroutines cost one poll, not thousands;
* the embedded backend keeps the bucket in the SQLite queue file
  (:class:`SqliteBucket`): one short ``BEGIN IMMEDIATE`` transaction grants
  several tokens at once;
* an ``aiolimiter.AsyncLimiter`` in front smooths one process's requests so
  it never asks for more than the whole budget.

The bucket follows GCRA (the generic cell rate algorithm): tokens are spaced
``period_s / rate`` apart, and up to ``burst`` may come early. So in any
half-open window of one period the API sees at most ``rate + burst``
requests, from the first request on. A 429 or 503 with ``Retry-After``
pauses the whole budget for every process, not one request.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import math
import sqlite3
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import anyio
import anyio.to_thread
from aiolimiter import AsyncLimiter

from .errors import ConfigError

logger = logging.getLogger("qworker.ratelimit")

# Tokens are spaced this much wider than the budget allows, so that jitter
# between a grant and the request reaching the server cannot squeeze two
# requests into less than the budget's spacing. With 2% a process delayed by
# its neighbours' start-up let one request too many through in about 1 of 20
# cold starts of 4 processes on 2 cores; 5% leaves 50 ms at 50 requests/s.
SPACING_HEADROOM = 0.05
# Maximum tokens one bucket transaction grants.
MAX_GRANT = 64
# Maximum seconds a dispatcher sleeps before it calls the bucket again.
MAX_POLL_S = 0.25


@dataclass(frozen=True)
class Budget:
    """A request budget: at most ``rate + burst`` requests in any window of ``period_s`` seconds.

    ``name`` is a host (``api.example.com``) that requests to it use, or a key
    that a request names with the ``qworker_budget`` extension.
    """

    name: str
    rate: float
    period_s: float = 1.0
    burst: int = 0

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("rate limit budget needs a name: a host such as api.example.com, or a key")
        if not (isinstance(self.rate, (int, float)) and self.rate > 0 and math.isfinite(self.rate)):
            raise ConfigError(f"invalid rate {self.rate!r} for budget {self.name!r}: use a positive number of requests")
        if not (isinstance(self.period_s, (int, float)) and self.period_s > 0):
            raise ConfigError(f"invalid period_s {self.period_s!r} for budget {self.name!r}: use a positive number of seconds")
        if isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst < 0:
            raise ConfigError(f"invalid burst {self.burst!r} for budget {self.name!r}: use an integer of 0 or more")

    @property
    def interval_s(self) -> float:
        """Seconds between two tokens, with the headroom."""
        return self.period_s / self.rate * (1 + SPACING_HEADROOM)

    @classmethod
    def from_mapping(cls, name: str, data: Mapping[str, Any]) -> Budget:
        unknown = sorted(set(data) - {"rate", "period_s", "burst"})
        if unknown:
            raise ConfigError(f"unknown key {unknown[0]!r} in rate limit budget {name!r}: use rate, period_s, burst")
        if "rate" not in data:
            raise ConfigError(f"rate limit budget {name!r} is missing 'rate' (requests per period_s)")
        return cls(name=name, rate=data["rate"], period_s=data.get("period_s", 1.0), burst=data.get("burst", 0))


@dataclass(frozen=True)
class Grant:
    """Result of a bucket call: ``tokens`` to use now, or else the wait before the next call."""

    tokens: int
    wait_s: float = 0.0


@dataclass(frozen=True)
class BudgetStats:
    """Counters of one budget, summed over every process that shares it."""

    name: str
    granted: int = 0
    waited_s: float = 0.0
    throttled: int = 0  # 429 and 503 responses seen
    paused_until: float = 0.0


class GlobalBucket(abc.ABC):
    """The token bucket that every process of a deployment shares."""

    @abc.abstractmethod
    async def take(self, budget: Budget, wanted: int, waited_s: float = 0.0) -> Grant:
        """Grant up to ``wanted`` tokens for immediate use, or return the wait until the next one.

        ``waited_s`` is time that this process's requests spent waiting since the
        last call, added to the shared counters in the same write.
        """

    @abc.abstractmethod
    async def pause(self, budget: Budget, until: float) -> None:
        """Grant no token of ``budget`` before the unix time ``until``."""

    @abc.abstractmethod
    async def record(self, budget: Budget, *, waited_s: float = 0.0, throttled: int = 0) -> None:
        """Add to the budget's shared counters."""

    @abc.abstractmethod
    async def stats(self) -> list[BudgetStats]:
        """Return the counters of every budget."""

    async def flush(self) -> None:
        """Write counters kept in this process to the shared store; the default keeps none."""


_BUCKET_SCHEMA = """
CREATE TABLE IF NOT EXISTS rate_limits (
    budget TEXT PRIMARY KEY,
    tat REAL NOT NULL,          -- theoretical arrival time of the next token (GCRA), unix seconds
    paused_until REAL NOT NULL DEFAULT 0,
    granted INTEGER NOT NULL DEFAULT 0,
    waited_s REAL NOT NULL DEFAULT 0,
    throttled INTEGER NOT NULL DEFAULT 0
)
"""


class SqliteBucket(GlobalBucket):
    """The global bucket in a SQLite file, shared by every process that opens it."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._connection: sqlite3.Connection | None = None
        self._limiter = anyio.CapacityLimiter(1)

    def _db(self) -> sqlite3.Connection:
        if self._connection is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            connection.execute("PRAGMA busy_timeout = 30000")
            connection.execute("PRAGMA journal_mode = WAL")
            # A lost grant after a power cut costs nothing, so grants need not wait for fsync.
            connection.execute("PRAGMA synchronous = NORMAL")
            connection.execute(_BUCKET_SCHEMA)
            self._connection = connection
        return self._connection

    async def take(self, budget: Budget, wanted: int, waited_s: float = 0.0) -> Grant:
        return await anyio.to_thread.run_sync(self._take_sync, budget, wanted, waited_s, limiter=self._limiter)

    def _take_sync(self, budget: Budget, wanted: int, waited_s: float) -> Grant:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            now = time.time()
            row = db.execute("SELECT tat, paused_until FROM rate_limits WHERE budget = ?", (budget.name,)).fetchone()
            tat, paused_until = row if row else (now, 0.0)
            grant = _gcra(budget, tat, paused_until, now, wanted)
            if grant.tokens or waited_s or row is None:
                new_tat = max(tat, now) + grant.tokens * budget.interval_s if grant.tokens else tat
                db.execute(
                    "INSERT INTO rate_limits (budget, tat, granted, waited_s) VALUES (?, ?, ?, ?) ON CONFLICT (budget)"
                    " DO UPDATE SET tat = excluded.tat, granted = granted + excluded.granted,"
                    " waited_s = waited_s + excluded.waited_s",
                    (budget.name, new_tat, grant.tokens, waited_s),
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return grant

    async def pause(self, budget: Budget, until: float) -> None:
        await anyio.to_thread.run_sync(self._pause_sync, budget, until, limiter=self._limiter)

    def _pause_sync(self, budget: Budget, until: float) -> None:
        self._db().execute(
            "INSERT INTO rate_limits (budget, tat, paused_until) VALUES (?, ?, ?) ON CONFLICT (budget) DO UPDATE"
            " SET paused_until = max(paused_until, excluded.paused_until)",
            (budget.name, time.time(), until),
        )

    async def record(self, budget: Budget, *, waited_s: float = 0.0, throttled: int = 0) -> None:
        await anyio.to_thread.run_sync(self._record_sync, budget, waited_s, throttled, limiter=self._limiter)

    def _record_sync(self, budget: Budget, waited_s: float, throttled: int) -> None:
        self._db().execute(
            "INSERT INTO rate_limits (budget, tat, waited_s, throttled) VALUES (?, ?, ?, ?) ON CONFLICT (budget)"
            " DO UPDATE SET waited_s = waited_s + excluded.waited_s, throttled = throttled + excluded.throttled",
            (budget.name, time.time(), waited_s, throttled),
        )

    async def stats(self) -> list[BudgetStats]:
        return await anyio.to_thread.run_sync(self._stats_sync, limiter=self._limiter)

    def _stats_sync(self) -> list[BudgetStats]:
        rows = self._db().execute(
            "SELECT budget, granted, waited_s, throttled, paused_until FROM rate_limits ORDER BY budget"
        ).fetchall()
        return [BudgetStats(*row) for row in rows]

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def _gcra(budget: Budget, tat: float, paused_until: float, now: float, wanted: int) -> Grant:
    """Decide how many of ``wanted`` tokens GCRA allows at ``now``; the caller advances ``tat`` by that many."""
    if now < paused_until:
        return Grant(0, paused_until - now)
    tolerance = budget.burst * budget.interval_s
    tat = max(tat, now)
    # Token k (0-based) may go when tat + k * interval - tolerance <= now.
    # The epsilon keeps floating-point rounding (3 * i / i = 2.999...) from dropping a token.
    allowed = math.floor((now + tolerance - tat) / budget.interval_s + 1e-9) + 1
    tokens = max(0, min(wanted, allowed, MAX_GRANT))
    if tokens:
        return Grant(tokens)
    return Grant(0, tat - tolerance - now)


@dataclass
class _Waiter:
    future: asyncio.Future[None]
    enqueued: float


@dataclass
class _LoopState:
    """State of one budget in one event loop: waiters, the dispatcher and the local smoother."""

    smoother: AsyncLimiter
    waiters: deque[_Waiter] = field(default_factory=deque)
    unreported_wait_s: float = 0.0
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    dispatcher: asyncio.Task[None] | None = None


class RateLimiter:
    """Hands out tokens of several budgets, taken from a :class:`GlobalBucket`.

    One instance may be used from successive event loops (each ``asyncio.run``
    gets fresh waiters and dispatchers), because all loop-bound state is kept
    per running loop.
    """

    def __init__(self, bucket: GlobalBucket, budgets: Mapping[str, Budget] | list[Budget]) -> None:
        self.bucket = bucket
        items = budgets.values() if isinstance(budgets, Mapping) else budgets
        self.budgets: dict[str, Budget] = {budget.name: budget for budget in items}
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _LoopState]] = (
            weakref.WeakKeyDictionary()
        )
        self.local_waited_s = 0.0
        self.local_granted = 0

    def budget_for(self, key: str) -> Budget | None:
        return self.budgets.get(key)

    def waiting(self, name: str) -> int:
        """Return how many coroutines of the running loop wait for a token of budget ``name``."""
        state = self._states.get(asyncio.get_running_loop(), {}).get(name)
        return len(state.waiters) if state else 0

    async def acquire(self, name: str) -> float:
        """Wait for one token of budget ``name``; return the seconds waited."""
        budget = self.budgets[name]
        state = self._state(budget)
        started = time.monotonic()

        await state.smoother.acquire()
        waiter = _Waiter(asyncio.get_running_loop().create_future(), started)
        state.waiters.append(waiter)
        state.wakeup.set()
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                logger.debug("token of budget %s granted to a cancelled request and unused", name)
            raise

        waited = time.monotonic() - started
        state.unreported_wait_s += waited
        self.local_waited_s += waited
        self.local_granted += 1
        return waited

    async def pause(self, name: str, seconds: float) -> None:
        """Stop granting tokens of budget ``name`` for ``seconds``, in every process."""
        budget = self.budgets[name]
        await self.bucket.pause(budget, time.time() + seconds)
        await self.bucket.record(budget, throttled=1)
        logger.warning("budget %s paused for %.2f s after the server asked to slow down", name, seconds)

    def _state(self, budget: Budget) -> _LoopState:
        loop = asyncio.get_running_loop()
        states = self._states.setdefault(loop, {})
        state = states.get(budget.name)
        if state is None:
            state = _LoopState(smoother=AsyncLimiter(max(1.0, budget.rate + budget.burst), budget.period_s))
            states[budget.name] = state
        if state.dispatcher is None or state.dispatcher.done():
            state.dispatcher = loop.create_task(self._dispatch(budget, state), name=f"qworker-ratelimit-{budget.name}")
        return state

    async def _dispatch(self, budget: Budget, state: _LoopState) -> None:
        """Take tokens for the waiters of one budget, batch by batch, until none is left."""
        while True:
            self._drop_cancelled(state)
            if not state.waiters:
                state.wakeup.clear()
                await state.wakeup.wait()
                continue
            waited_s, state.unreported_wait_s = state.unreported_wait_s, 0.0
            try:
                grant = await self.bucket.take(budget, len(state.waiters), waited_s)
            except Exception as exc:
                state.unreported_wait_s += waited_s
                logger.error("rate limit bucket failed for budget %s, retrying: %s", budget.name, exc, exc_info=True)
                await asyncio.sleep(MAX_POLL_S)
                continue
            self._wake(state, grant.tokens)
            if not grant.tokens:
                await asyncio.sleep(min(MAX_POLL_S, max(grant.wait_s, 0.001)))

    @staticmethod
    def _drop_cancelled(state: _LoopState) -> None:
        while state.waiters and state.waiters[0].future.done():
            state.waiters.popleft()

    @staticmethod
    def _wake(state: _LoopState, tokens: int) -> None:
        while tokens and state.waiters:
            waiter = state.waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_result(None)
                tokens -= 1
