"""The rate limit bucket of the Modal backends, built on ``modal.Dict``.

``modal.Dict`` has no atomic read-modify-write, so the GCRA row of
:class:`~qworker.ratelimit.SqliteBucket` cannot be shared by many containers.
The only atomic operation is create-if-absent (``Dict.put(key, value,
skip_if_exists=True)`` returns whether it created the key). This bucket
therefore hands out time slots:

* Slot ``k`` of a budget is the unix time ``k * interval_s``. A token is the
  successful creation of key ``s/<k>`` in the budget's slot Dict, so every
  slot is won by at most one process.
* A won slot may be granted only while ``slot_time <= now < slot_time +
  window_s`` on the granting container's clock. A background task claims
  slots up to ``lookahead_s`` ahead, one ``put`` RPC per slot, so the claim
  latency does not delay grants. ``take`` waits for an RPC only to read the
  pause of a budget when its cached copy is older than twice
  ``pause_refresh_s``: on the first call, and after an idle period.

**The bound.** Let ``N = floor(rate + burst)`` (at least 1) and ``b =
min(burst, N - 1)``. The window is ``b * interval_s + grace_s``, and
:func:`plan_slots` makes ``interval_s`` at least ``(period_s + grace_s +
max_skew_s) / (N - b)`` and at least ``Budget.interval_s``. Let ``skew`` be
the largest difference between two containers' clocks plus the spread of
the delay from grant to request. A token used in a half-open window ``[t, t
+ period_s)`` belongs to a slot whose time lies in an interval of length
``period_s + window_s + skew``. While ``skew`` is at most ``max_skew_s``, the
interval contains at most ``b + (N - b) = N`` slot times. So across all
containers, any window of one period contains at most ``rate + burst``
tokens, from the first token on. A skew ``d`` beyond ``max_skew_s`` adds at most
``ceil((d - max_skew_s) / interval_s)`` tokens to a window. The price is
throughput: at 50 per second with ``period_s = 1``, the defaults space slots
21.2 ms apart, so at most 47.2 tokens per second are granted after the burst.

**Cost.** A process that wins the slots it tries spends one ``put`` per
token. Every process tries every slot in its horizon until its waiters are
covered, because a lost ``put`` is the only way to learn that another
process has the slot. So while ``n`` processes all have more waiters than
slots, each token costs about ``n`` puts. Besides, each process with waiters
reads the pause key every ``pause_refresh_s`` seconds, writes its counters
at most every ``flush_interval_s`` seconds, and spends about four RPCs per
budget and hour on the slot Dict, its plan and the cleanup marker.

**Cleanup.** Slot keys go to one Dict per budget and hour,
``qworker-rl-<budget>-<hour>`` (at 50 per second, 170,000 keys an hour). The
first process to use an hour creates the marker ``gc/<budget>/<hour>`` in
the control Dict, and only the process that created it deletes the slot
Dicts of hours that ended at least one hour earlier. The hours still to
delete are kept in ``gc-pending/<budget>``, so a Dict left by a crash or by
an idle period is deleted by the next cleaner.

**Control Dict** (``qworker-rl-control``): ``p/<budget>`` is the unix time
before which no token is granted, ``c/<process>/<budget>`` the counters of
one process (written only by that process, so writes never race), and the
cleanup keys above. Every value in the control Dict is JSON text.

**Worst cases.** Each of these lowers throughput but keeps the bound:

* A claim RPC that takes longer than ``lookahead_s + window_s`` returns
  after the slot's window ended, so the slot is lost.
* A ``put`` that fails or times out is given up, even if it created the key.
* Slots reserved for waiters that were cancelled expire unused.

A pause reaches other processes up to ``pause_refresh_s`` plus one RPC
late, and the counters of a process that exits without :meth:`ModalBucket.flush`
miss up to ``flush_interval_s`` seconds of counts.

Every process that shares a budget must use the same ``Budget`` and the same
``max_skew_s`` and ``grace_s``. The first process to use an hour stores its
slot plan in the hour's Dict, and a process whose own plan differs uses the
stored one for that hour and logs a warning. NOTE: the bound does not cover a
window that spans the boundary between two hours with different plans.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import socket
import time
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any

from ..ratelimit import MAX_GRANT, MAX_POLL_S, Budget, BudgetStats, GlobalBucket, Grant

logger = logging.getLogger("qworker.ratelimit.modal")

CONTROL_DICT_NAME = "qworker-rl-control"
SLOT_DICT_PREFIX = "qworker-rl-"
PLAN_KEY = "plan"
SECONDS_PER_HOUR = 3600

# How often ``take`` polls while a claim RPC is in flight, because a slot it
# wins may be usable at once and only the next ``take`` can grant it.
CLAIM_POLL_S = 0.005
# The minimum time a claimed slot must stay usable after the claim returns.
MIN_CLAIM_MARGIN_S = 0.005
# A claimer stops when no ``take`` has requested tokens for this long. The
# ``RateLimiter`` dispatcher calls ``take`` at least every MAX_POLL_S while it has waiters.
DEMAND_TIMEOUT_S = 4 * MAX_POLL_S
# How long a claimer waits after a failed claim.
ERROR_BACKOFF_S = 0.25
# One failure per budget and operation is logged at most this often.
FAILURE_LOG_INTERVAL_S = 30.0
# Rounds of read, compare and write that ``pause`` makes to keep the latest time.
PAUSE_WRITE_ROUNDS = 3


@dataclass(frozen=True)
class SlotPlan:
    """The slot grid of one budget: slot ``k`` starts at ``k * interval_s`` and is usable for ``window_s``."""

    interval_s: float
    window_s: float

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SlotPlan:
        data = json.loads(text)
        return cls(interval_s=float(data["interval_s"]), window_s=float(data["window_s"]))

    def first_slot_after(self, moment: float) -> int:
        """Return the lowest slot whose usable window still contains a time later than ``moment``."""
        return math.floor((moment - self.window_s) / self.interval_s) + 1

    def slots_of_hour(self, hour: int) -> range:
        """Return the slots whose start lies in ``[hour * 3600, (hour + 1) * 3600)``."""
        first = math.ceil(hour * SECONDS_PER_HOUR / self.interval_s)
        end = math.ceil((hour + 1) * SECONDS_PER_HOUR / self.interval_s)
        return range(first, end)


def plan_slots(budget: Budget, max_skew_s: float, grace_s: float) -> SlotPlan:
    """Space the slots of ``budget`` so that no window of one period contains more than ``rate + burst`` tokens.

    See the module docstring for the derivation.
    """
    max_tokens_per_period = max(1, math.floor(budget.rate + budget.burst))
    burst_slots = min(budget.burst, max_tokens_per_period - 1)
    interval_s = max(
        budget.interval_s,
        (budget.period_s + grace_s + max_skew_s) / (max_tokens_per_period - burst_slots),
    )
    return SlotPlan(interval_s=interval_s, window_s=burst_slots * interval_s + grace_s)


def slot_dict_name(budget_name: str, hour: int) -> str:
    """Return the name of the ``modal.Dict`` of the slots of ``budget_name`` in ``hour``, counted from the epoch.

    Modal names allow letters, digits, ``-``, ``_`` and ``.`` up to 64
    characters, so the budget name is cut and cleaned, and a hash of the
    full name keeps two budgets apart.
    """
    readable = re.sub(r"[^A-Za-z0-9_.-]", "_", budget_name)[:28]
    digest = hashlib.sha256(budget_name.encode()).hexdigest()[:8]
    return f"{SLOT_DICT_PREFIX}{readable}-{digest}-{hour}"


@dataclass(frozen=True)
class _ReservedSlot:
    """A slot that this process won and has not granted yet. Times are unix seconds."""

    starts_at: float
    expires_at: float


@dataclass
class _Hour:
    slots: Any  # the hydrated modal.Dict
    plan: SlotPlan


@dataclass
class _Counters:
    granted: int = 0
    waited_s: float = 0.0
    throttled: int = 0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


@dataclass
class _BudgetState:
    """Per-budget state of this process. Times are unix seconds, except in fields named ``*_mono``."""

    budget: Budget
    reserved: list[_ReservedSlot] = field(default_factory=list)
    # This process already tried the slots below next_slot, on the grid of
    # next_slot_interval_s. It is an index, so that no rounding of times can
    # skip or repeat a slot.
    next_slot: int = 0
    next_slot_interval_s: float = 0.0
    demand: int = 0
    demand_at_mono: float = 0.0
    claimer: asyncio.Task[None] | None = None
    claim_in_flight: bool = False
    # When the claimer sleeps, the unix time at which it tries again.
    claimer_sleeps_until: float | None = None
    paused_until: float = 0.0
    pause_read_at_mono: float | None = None
    pause_reader: asyncio.Task[None] | None = None
    counters: _Counters = field(default_factory=_Counters)
    flushed: str = ""
    flushed_at_mono: float = 0.0
    flusher: asyncio.Task[None] | None = None

    def drop_expired(self, now: float) -> int:
        """Forget the reserved slots whose window ended; return how many."""
        kept = [slot for slot in self.reserved if slot.expires_at > now]
        dropped = len(self.reserved) - len(kept)
        self.reserved = kept
        return dropped

    def ready_count(self, now: float) -> int:
        return sum(1 for slot in self.reserved if slot.starts_at <= now)


class ModalBucket(GlobalBucket):
    """The global bucket of the ``modal`` and ``modal-local`` backends: time slots claimed in ``modal.Dict``.

    All times are in seconds. ``max_skew_s`` is the largest clock difference
    between two containers plus the spread of the delay from a grant to the
    request reaching the server. ``grace_s`` is how late after its start a
    slot may still be granted, beyond the burst. ``lookahead_s`` is how far
    ahead slots are claimed, and should exceed the latency of a Dict RPC.

    One instance may be used from successive event loops, but from one
    event loop at a time.
    """

    # NOTE: the 50 ms default of max_skew_s is an estimate, not a measured
    # skew between Modal containers.
    def __init__(
        self,
        *,
        max_skew_s: float = 0.05,
        grace_s: float = 0.01,
        lookahead_s: float = 0.25,
        pause_refresh_s: float = 0.2,
        flush_interval_s: float = 2.0,
        environment_name: str | None = None,
    ) -> None:
        if not (max_skew_s >= 0 and math.isfinite(max_skew_s)):
            raise ValueError(f"invalid max_skew_s {max_skew_s!r}: use a finite number of seconds, 0 or more")
        # grace_s = 0 would leave a budget without burst no time to grant a slot.
        for name, value in (
            ("grace_s", grace_s),
            ("lookahead_s", lookahead_s),
            ("pause_refresh_s", pause_refresh_s),
            ("flush_interval_s", flush_interval_s),
        ):
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"invalid {name} {value!r}: use a positive number of seconds")
        self.max_skew_s = max_skew_s
        self.grace_s = grace_s
        self.lookahead_s = lookahead_s
        self.pause_refresh_s = pause_refresh_s
        self.flush_interval_s = flush_interval_s
        self.environment_name = environment_name
        self.process_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"

        self._states: dict[str, _BudgetState] = {}
        self._hours: dict[tuple[str, int], _Hour] = {}
        self._control: Any = None
        self._claim_latency_s = 0.0
        self._flush_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )
        # Strong references to the cleanup tasks, which asyncio holds only weakly.
        self._cleanups: set[asyncio.Task[None]] = set()
        self._last_failure_log: dict[tuple[str, str], tuple[float, int]] = {}

    def plan(self, budget: Budget) -> SlotPlan:
        """Return this process's slot plan of ``budget``."""
        return plan_slots(budget, self.max_skew_s, self.grace_s)

    # -- GlobalBucket ----------------------------------------------------

    async def take(self, budget: Budget, wanted: int, waited_s: float = 0.0) -> Grant:
        state = self._state(budget)
        state.counters.waited_s += waited_s
        await self._refresh_pause(state)
        self._flush_in_background_if_due(state)

        now = time.time()
        dropped = state.drop_expired(now)
        if dropped:
            logger.debug("budget %s: %d reserved slots expired before a take could grant them", budget.name, dropped)
        if now < state.paused_until:
            state.demand = 0
            return Grant(0, state.paused_until - now)

        tokens = min(max(wanted, 0), state.ready_count(now), MAX_GRANT)
        if tokens:
            del state.reserved[:tokens]
            state.counters.granted += tokens
        state.demand = max(wanted, 0) - tokens
        state.demand_at_mono = time.monotonic()
        if state.demand > len(state.reserved):
            self._start_claimer(state)
        if tokens:
            return Grant(tokens)
        return Grant(0, self._next_poll_s(state, now))

    async def pause(self, budget: Budget, until: float) -> None:
        state = self._state(budget)
        state.paused_until = max(state.paused_until, until)
        control = await self._control_dict()
        key = f"p/{budget.name}"
        stored = 0.0
        # Dict writes are last-write-wins, so two processes pausing at once
        # may leave the earlier time. Reading back and writing again keeps
        # the latest time unless the writes interleave more than that often.
        for _ in range(PAUSE_WRITE_ROUNDS):
            stored = _parse_time(await control.get.aio(key))
            if stored >= until:
                break
            await control.put.aio(key, json.dumps(until))
        state.paused_until = max(state.paused_until, stored)
        state.pause_read_at_mono = time.monotonic()

    async def record(self, budget: Budget, *, waited_s: float = 0.0, throttled: int = 0) -> None:
        state = self._state(budget)
        state.counters.waited_s += waited_s
        state.counters.throttled += throttled
        await self._flush(state)

    async def stats(self) -> list[BudgetStats]:
        """Return the counters of every budget, summed over every process that flushed them.

        Reads the whole control Dict with one streaming RPC, after writing
        this process's counters.
        """
        await self.flush()
        control = await self._control_dict()
        totals: dict[str, _Counters] = {}
        paused: dict[str, float] = {}
        async for key, value in control.items.aio():
            if not isinstance(key, str):
                continue
            if key.startswith("c/"):
                _, _, budget_name = key.split("/", 2)
                counters = json.loads(value)
                total = totals.setdefault(budget_name, _Counters())
                total.granted += int(counters.get("granted", 0))
                total.waited_s += float(counters.get("waited_s", 0.0))
                total.throttled += int(counters.get("throttled", 0))
            elif key.startswith("p/"):
                paused[key[2:]] = _parse_time(value)
        return [
            BudgetStats(
                name=name,
                granted=totals.get(name, _Counters()).granted,
                waited_s=totals.get(name, _Counters()).waited_s,
                throttled=totals.get(name, _Counters()).throttled,
                paused_until=paused.get(name, 0.0),
            )
            for name in sorted(set(totals) | set(paused))
        ]

    async def flush(self) -> None:
        """Write this process's counters of every budget to the control Dict.

        Call it before a process exits: between flushes, up to
        ``flush_interval_s`` seconds of counts exist only in memory.
        """
        for state in list(self._states.values()):
            await self._flush(state)

    # -- slots -----------------------------------------------------------

    def _state(self, budget: Budget) -> _BudgetState:
        state = self._states.get(budget.name)
        if state is None:
            state = self._states[budget.name] = _BudgetState(budget)
        elif state.budget != budget:
            logger.warning(
                "budget %s changed from %s to %s in one process; pass one Budget per name",
                budget.name, state.budget, budget,
            )
            state.budget = budget
        return state

    def _next_poll_s(self, state: _BudgetState, now: float) -> float:
        """Return how long the dispatcher may sleep before a reserved or newly claimed slot could be granted."""
        wait = MAX_POLL_S
        if state.reserved:
            wait = min(wait, state.reserved[0].starts_at - now)
        if _running(state.claimer):
            if state.claimer_sleeps_until is None or state.claim_in_flight:
                wait = min(wait, CLAIM_POLL_S)
            else:
                wait = min(wait, state.claimer_sleeps_until - now + CLAIM_POLL_S)
        return max(wait, 0.001)

    def _start_claimer(self, state: _BudgetState) -> None:
        if not _running(state.claimer):
            state.claimer = asyncio.get_running_loop().create_task(
                self._claim_while_needed(state), name=f"qworker-modal-bucket-claim-{state.budget.name}"
            )

    async def _claim_while_needed(self, state: _BudgetState) -> None:
        """Claim slots until the reserved ones cover the waiters of the last ``take``, or ``take`` is not called."""
        while True:
            need = min(state.demand - len(state.reserved), MAX_GRANT)
            if need <= 0 or time.monotonic() - state.demand_at_mono > DEMAND_TIMEOUT_S:
                return
            try:
                retry_at = await self._claim_round(state, need)
            except Exception as exc:  # an RPC failed: Modal or the network
                self._log_failure(state.budget, f"claim slots, retrying in {ERROR_BACKOFF_S} s", exc)
                retry_at = time.time() + ERROR_BACKOFF_S
            if retry_at is not None:
                state.claimer_sleeps_until = retry_at
                try:
                    await asyncio.sleep(max(0.0, retry_at - time.time()))
                finally:
                    state.claimer_sleeps_until = None

    async def _claim_round(self, state: _BudgetState, need: int) -> float | None:
        """Try up to ``need`` untried slots in the horizon; return when to try again, or None to go on at once."""
        now = time.time()
        start = max(now, state.paused_until)
        margin = max(MIN_CLAIM_MARGIN_S, 2 * self._claim_latency_s)
        own_plan = self.plan(state.budget)
        tried_until = state.next_slot * state.next_slot_interval_s
        hour_index = math.floor(max(tried_until, start - own_plan.window_s) / SECONDS_PER_HOUR)
        hour = await self._hour(state.budget, hour_index)
        plan = hour.plan
        hour_slots = plan.slots_of_hour(hour_index)

        if state.next_slot_interval_s == plan.interval_s:
            untried = state.next_slot
        else:
            # The plan changed at an hour boundary, so the grids differ.
            untried = math.ceil(tried_until / plan.interval_s)
        first = max(untried, plan.first_slot_after(start + margin), hour_slots.start)
        if first >= hour_slots.stop:
            state.next_slot, state.next_slot_interval_s = hour_slots.stop, plan.interval_s
            return None
        last = min(first + need - 1, math.floor((now + self.lookahead_s) / plan.interval_s), hour_slots.stop - 1)
        if last < first:
            return first * plan.interval_s - self.lookahead_s

        won = await self._put_slots(state, hour, range(first, last + 1))
        state.next_slot, state.next_slot_interval_s = last + 1, plan.interval_s
        state.reserved.extend(_ReservedSlot(k * plan.interval_s, k * plan.interval_s + plan.window_s) for k in won)
        state.reserved.sort(key=lambda slot: slot.starts_at)
        return None

    async def _put_slots(self, state: _BudgetState, hour: _Hour, slots: range) -> list[int]:
        """Create the keys of ``slots`` at once; return the slots whose key this call created."""
        started = time.monotonic()
        state.claim_in_flight = True
        try:
            results = await asyncio.gather(
                *(hour.slots.put.aio(f"s/{k}", self.process_id, skip_if_exists=True) for k in slots),
                return_exceptions=True,
            )
        finally:
            state.claim_in_flight = False
        elapsed = time.monotonic() - started
        self._claim_latency_s = elapsed if self._claim_latency_s == 0 else 0.8 * self._claim_latency_s + 0.2 * elapsed

        won = []
        for slot, result in zip(slots, results):
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    raise result
                # A failed put may still have created the key. The slot is
                # given up, because using it could give it to two processes.
                self._log_failure(state.budget, "claim a slot, giving it up", result)
            elif result:
                won.append(slot)
        return won

    async def _hour(self, budget: Budget, hour_index: int) -> _Hour:
        """Return the slot Dict and plan of ``budget`` in ``hour_index``, creating the Dict and plan if missing."""
        cached = self._hours.get((budget.name, hour_index))
        if cached is not None:
            return cached

        import modal

        slots = modal.Dict.from_name(
            slot_dict_name(budget.name, hour_index), create_if_missing=True, environment_name=self.environment_name
        )
        await slots.hydrate.aio()
        plan = self.plan(budget)
        if not await slots.put.aio(PLAN_KEY, plan.to_json(), skip_if_exists=True):
            stored = SlotPlan.from_json(await slots.get.aio(PLAN_KEY))
            if stored != plan:
                logger.warning(
                    "budget %s: hour %d uses the slot plan %s stored by another process, not this process's %s;"
                    " give every process the same budget, max_skew_s and grace_s",
                    budget.name, hour_index, stored, plan,
                )
            plan = stored
        hour = _Hour(slots, plan)
        self._hours[(budget.name, hour_index)] = hour
        for key in [key for key in self._hours if key[0] == budget.name and key[1] < hour_index - 1]:
            del self._hours[key]

        task = asyncio.get_running_loop().create_task(self._delete_old_hours_if_first(budget, hour_index))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        return hour

    # -- cleanup ---------------------------------------------------------

    async def _delete_old_hours_if_first(self, budget: Budget, hour_index: int) -> None:
        try:
            control = await self._control_dict()
            if await control.put.aio(f"gc/{budget.name}/{hour_index}", self.process_id, skip_if_exists=True):
                await self.delete_old_hours(budget, hour_index)
        except Exception as exc:  # an RPC failed: the next hour's cleaner deletes what is left
            self._log_failure(budget, "delete old slot Dicts, leaving them to the next hour's cleaner", exc)

    async def delete_old_hours(self, budget: Budget, current_hour: int) -> list[int]:
        """Delete the slot Dicts of ``budget`` for hours before ``current_hour - 1``; return those hours.

        The hours returned include hours whose Dict was already gone.

        ``gc-pending/<budget>`` lists the hours used and not yet deleted. Only
        one process per hour should call this (the one that created the
        hour's ``gc/`` marker), because the list is rewritten without a lock.
        """
        import modal

        control = await self._control_dict()
        pending_key = f"gc-pending/{budget.name}"
        stored = await control.get.aio(pending_key)
        pending = sorted(set(json.loads(stored) if stored else []) | {current_hour - 1, current_hour})
        deleted = []
        for hour_index in pending:
            if hour_index >= current_hour - 1:
                continue
            await modal.Dict.objects.delete.aio(
                slot_dict_name(budget.name, hour_index), allow_missing=True, environment_name=self.environment_name
            )
            deleted.append(hour_index)
        await control.put.aio(pending_key, json.dumps([h for h in pending if h not in deleted]))
        await control.pop.aio(f"gc/{budget.name}/{current_hour - 1}", None)
        if deleted:
            logger.info("budget %s: deleted the slot Dicts of hours %s, where they existed", budget.name, deleted)
        return deleted

    # -- pause and counters ------------------------------------------------

    async def _refresh_pause(self, state: _BudgetState) -> None:
        """Keep the cached pause time at most ``pause_refresh_s`` old, reading in the background when it is close."""
        read_at = state.pause_read_at_mono
        age = math.inf if read_at is None else time.monotonic() - read_at
        if age <= self.pause_refresh_s:
            return
        if age > 2 * self.pause_refresh_s and not _running(state.pause_reader):
            await self._read_pause(state)
        elif not _running(state.pause_reader):
            state.pause_reader = asyncio.get_running_loop().create_task(self._read_pause_logged(state))

    async def _read_pause(self, state: _BudgetState) -> None:
        control = await self._control_dict()
        stored = _parse_time(await control.get.aio(f"p/{state.budget.name}"))
        state.paused_until = max(state.paused_until, stored)
        state.pause_read_at_mono = time.monotonic()

    async def _read_pause_logged(self, state: _BudgetState) -> None:
        try:
            await self._read_pause(state)
        except Exception as exc:  # an RPC failed: the next take reads again
            self._log_failure(state.budget, "read the pause, keeping the cached time", exc)

    def _flush_in_background_if_due(self, state: _BudgetState) -> None:
        if time.monotonic() - state.flushed_at_mono < self.flush_interval_s or _running(state.flusher):
            return
        if state.counters.to_json() == state.flushed:
            return
        state.flusher = asyncio.get_running_loop().create_task(self._flush_logged(state))

    async def _flush_logged(self, state: _BudgetState) -> None:
        try:
            await self._flush(state)
        except Exception as exc:  # an RPC failed: the counters are written at the next flush
            self._log_failure(state.budget, "write counters, keeping them for the next flush", exc)

    async def _flush(self, state: _BudgetState) -> None:
        # One flush at a time per event loop, so an older copy of the
        # counters never overwrites a newer one.
        loop = asyncio.get_running_loop()
        lock = self._flush_locks.get(loop)
        if lock is None:
            lock = self._flush_locks[loop] = asyncio.Lock()
        async with lock:
            snapshot = state.counters.to_json()
            state.flushed_at_mono = time.monotonic()
            if snapshot == state.flushed:
                return
            control = await self._control_dict()
            await control.put.aio(f"c/{self.process_id}/{state.budget.name}", snapshot)
            state.flushed = snapshot

    async def _control_dict(self) -> Any:
        if self._control is None:
            import modal

            control = modal.Dict.from_name(
                CONTROL_DICT_NAME, create_if_missing=True, environment_name=self.environment_name
            )
            await control.hydrate.aio()
            self._control = control
        return self._control

    # -- logging ---------------------------------------------------------

    def _log_failure(self, budget: Budget, operation: str, exc: Exception) -> None:
        key = (budget.name, operation)
        now = time.monotonic()
        last, suppressed = self._last_failure_log.get(key, (-math.inf, 0))
        if now - last < FAILURE_LOG_INTERVAL_S:
            self._last_failure_log[key] = (last, suppressed + 1)
            return
        self._last_failure_log[key] = (now, 0)
        logger.error(
            "rate limit budget %s: failed to %s (%d similar failures since the last message not logged): %s",
            budget.name, operation, suppressed, exc, exc_info=exc,
        )


def _running(task: asyncio.Task[None] | None) -> bool:
    """Return whether ``task`` is unfinished and belongs to the running event loop."""
    return task is not None and not task.done() and task.get_loop() is asyncio.get_running_loop()


def _parse_time(value: Any) -> float:
    return float(json.loads(value)) if value is not None else 0.0

