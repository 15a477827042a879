"""Results of the peer comparison: the per-run records, the summary table, the ratios and the JSON document."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from timing import RunTiming
from variants import DURABILITY_TEXT, POWER_CUT, PROCESS_CRASH

MODES = ("end_to_end", "drain")
MODE_TITLES = {"end_to_end": "end to end", "drain": "drain"}
DURABLE = (PROCESS_CRASH, POWER_CUT)


@dataclass
class RunRecord:
    """One run of one series: its timing, or the error and the tasks finished before it failed."""

    round_index: int
    timing: RunTiming | None = None
    error: str | None = None
    done: int = 0
    timeout_s: float | None = None  # set when the run timed out: ``done`` tasks finished within this many seconds
    load_1m: float = 0.0  # the 1-minute load average when the run ended

    def as_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {"round": self.round_index + 1, "ok": self.timing is not None, "load_1m_after": self.load_1m}
        if self.timing is None:
            record.update({"error": self.error, "done": self.done})
            if self.timeout_s:
                record["tasks_per_s_until_timeout"] = round(self.done / self.timeout_s, 1)
            return record
        t = self.timing
        record.update({
            "tasks": t.tasks, "done": t.done, "tasks_per_s": round(t.tasks_per_s, 1), "elapsed_s": round(t.elapsed_s, 4),
            "startup_s": round(t.startup_s, 4), "push_s": None if t.push_s is None else round(t.push_s, 4),
            "started_at": t.started_at, "first_finish": t.first_finish, "last_finish": t.last_finish,
        })
        return record


@dataclass
class Series:
    """The runs of one system variant in one mode."""

    system: str
    variant: str
    mode: str
    durability: str
    runs: list[RunRecord] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.system} {self.variant}"

    def timings(self) -> list[RunTiming]:
        return [run.timing for run in self.runs if run.timing is not None]

    def rates(self) -> list[float]:
        return [timing.tasks_per_s for timing in self.timings()]

    def median_rate(self) -> float | None:
        rates = self.rates()
        return statistics.median(rates) if rates else None

    def summary(self) -> dict[str, Any]:
        rates = self.rates()
        timings = self.timings()
        pushes = [timing.push_s for timing in timings if timing.push_s is not None]
        return {
            "runs": len(self.runs),
            "ok": len(rates),
            "median_per_s": round(statistics.median(rates), 1) if rates else None,
            "min_per_s": round(min(rates), 1) if rates else None,
            "max_per_s": round(max(rates), 1) if rates else None,
            "median_startup_s": round(statistics.median(t.startup_s for t in timings), 3) if timings else None,
            "median_push_s": round(statistics.median(pushes), 3) if pushes else None,
            "errors": [run.error for run in self.runs if run.error],
        }


def _number(value: float | None, width: int, digits: int = 0) -> str:
    if value is None:
        return f"{'-':>{width}}"
    return f"{value:>{width},.{digits}f}"


def print_table(series: list[Series]) -> None:
    header = (f"{'system':<9} {'variant':<26} {'mode':<10} {'ok':>4} {'median/s':>9} {'min/s':>9} {'max/s':>9}"
              f" {'start s':>7} {'push s':>7}  durability")
    print(header)
    print("-" * len(header))
    for mode in MODES:
        for item in (s for s in series if s.mode == mode):
            summary = item.summary()
            print(
                f"{item.system:<9} {item.variant:<26} {MODE_TITLES[mode]:<10} {summary['ok']:>2}/{summary['runs']:<1}"
                f" {_number(summary['median_per_s'], 9)} {_number(summary['min_per_s'], 9)} {_number(summary['max_per_s'], 9)}"
                f" {_number(summary['median_startup_s'], 7, 2)} {_number(summary['median_push_s'], 7, 2)}  {item.durability}"
            )
    failed = [(item, run) for item in series for run in item.runs if run.timing is None]
    if failed:
        print("failed runs:")
        for item, run in failed:
            until = f" ({run.done / run.timeout_s:,.0f} tasks/s until the timeout)" if run.timeout_s else ""
            print(f"  {item.label}, {MODE_TITLES[item.mode]}, round {run.round_index + 1}{until}: {str(run.error).splitlines()[0]}")
    print("median/s, min/s, max/s: tasks / (timer start to the last finished task), over the runs that finished.")
    print("start s: median seconds from the timer start to the first finished task (start-up, first poll, first claim).")
    print("push s: median seconds the producer took to push every task (in drain mode, the fill before the timer starts).")


def ratio_rows(series: list[Series]) -> list[dict[str, Any]]:
    """Return qworker's median rate at NORMAL and FULL divided by each peer variant's median rate, per mode."""
    rows = []
    for mode in MODES:
        qworker = {s.variant: s.median_rate() for s in series if s.mode == mode and s.system == "qworker"}
        for peer in (s for s in series if s.mode == mode and s.system != "qworker"):
            peer_rate = peer.median_rate()
            row: dict[str, Any] = {"mode": mode, "peer": peer.label, "durability": peer.durability, "peer_median_per_s": peer_rate}
            for name, rate in qworker.items():
                row[f"qworker {name}"] = round(rate / peer_rate, 2) if rate and peer_rate else None
            rows.append(row)
    return rows


def print_ratios(series: list[Series]) -> None:
    rows = ratio_rows(series)
    if not rows:
        return
    qworker_names = [key for key in rows[0] if key.startswith("qworker ")]
    if not qworker_names:
        return
    print("\nqworker median / peer median (above 1: qworker is faster)")
    header = f"{'mode':<10} {'peer variant':<36} " + " ".join(f"{name:>22}" for name in qworker_names)
    print(header)
    print("-" * len(header))
    for row in rows:
        ratios = " ".join(_number(row[name], 22, 2) for name in qworker_names)
        print(f"{MODE_TITLES[row['mode']]:<10} {row['peer']:<36} {ratios}")


def highlights(series: list[Series]) -> list[dict[str, Any]]:
    """Pick, per mode, the fastest durable peer variant, the fastest power-cut-safe one, the fastest overall, and Huey with fsync off."""
    picks = []
    for mode in MODES:
        peers = [s for s in series if s.mode == mode and s.system != "qworker" and s.median_rate() is not None]
        choices = {
            "fastest durable peer (survives a crash of any process)": [s for s in peers if s.durability in DURABLE],
            "fastest peer that survives a power cut": [s for s in peers if s.durability == POWER_CUT],
            "fastest peer overall": peers,
            "Huey with fsync off": [s for s in peers if s.system == "huey" and "fsync off" in s.variant],
        }
        for title, candidates in choices.items():
            if candidates:
                best = max(candidates, key=lambda s: s.median_rate() or 0.0)
                picks.append({"mode": mode, "title": title, "peer": best.label, "durability": best.durability,
                              "median_per_s": round(best.median_rate() or 0.0, 1)})
    return picks


def print_highlights(series: list[Series]) -> None:
    qworker = {(s.mode, s.variant): s.median_rate() for s in series if s.system == "qworker"}
    picks = highlights(series)
    if not picks:
        return
    print()
    for pick in picks:
        ratios = ", ".join(
            f"qworker {variant} {rate / pick['median_per_s']:.2f}x"
            for (mode, variant), rate in qworker.items() if mode == pick["mode"] and rate
        )
        print(f"{MODE_TITLES[pick['mode']]}: {pick['title']}: {pick['peer']} at {pick['median_per_s']:,.0f}/s"
              f" ({pick['durability']}){'; ' + ratios if ratios else ''}")
    print("\nDurability classes (what happens to tasks that are queued and not yet started):")
    for name, text in DURABILITY_TEXT.items():
        print(f"  {name}: {text}")
