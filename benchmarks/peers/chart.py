"""Draw the throughput chart of a peer comparison from the JSON that run.py writes.

One horizontal bar per system and variant, for each mode (end to end and
drain), at the median tasks/s of its runs, with a line from the minimum to
the maximum. qworker's bars are coloured apart from the peers'.

    python benchmarks/peers/chart.py peers.json --out docs/img/throughput.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

MODES = (("end_to_end", "end to end"), ("drain", "drain"))
QWORKER_COLOR = "#1f6fb4"
PEER_COLOR = "#9aa5b1"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="JSON file written by run.py --json")
    parser.add_argument("--out", type=Path, default=Path("docs/img/throughput.png"), help="PNG file to write")
    args = parser.parse_args()

    try:
        report = json.loads(args.results.read_text())
    except (OSError, ValueError) as exc:
        print(f"cannot read {str(args.results)!r}: {exc}: pass the file that run.py --json wrote", file=sys.stderr)
        return 2
    draw(report, args.out)
    print(f"wrote {args.out}")
    return 0


def draw(report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(MODES), figsize=(13, 6))
    for axis, (mode, title) in zip(axes, MODES):
        _draw_mode(axis, report, mode, title)

    parameters = report.get("parameters", {})
    figure.suptitle(
        f"no-op tasks/s, {parameters.get('tasks', '?'):,} tasks, {parameters.get('worker_processes', 2)} worker"
        f" processes, median of {parameters.get('runs', '?')} runs ({report.get('started_utc', '')[:10]})"
    )
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)


def _draw_mode(axis: Any, report: dict[str, Any], mode: str, title: str) -> None:
    labels, medians, lows, highs, colors = [], [], [], [], []
    for variant in report["variants"]:
        figures = variant["modes"].get(mode) or {}
        if not figures.get("ok"):
            continue
        labels.append(f"{variant['system']} {variant['variant']}")
        medians.append(figures["median_per_s"])
        lows.append(figures["median_per_s"] - figures["min_per_s"])
        highs.append(figures["max_per_s"] - figures["median_per_s"])
        colors.append(QWORKER_COLOR if variant["system"] == "qworker" else PEER_COLOR)

    positions = range(len(labels))
    axis.barh(positions, medians, xerr=[lows, highs], color=colors, capsize=3)
    axis.set_yticks(list(positions), labels)
    axis.invert_yaxis()
    axis.xaxis.set_major_formatter(lambda value, _position: f"{value / 1000:.0f}k")
    axis.set_xlabel("tasks/s (bar: median, line: min to max)")
    axis.set_title(title)
    axis.grid(axis="x", alpha=0.3)


if __name__ == "__main__":
    sys.exit(main())
