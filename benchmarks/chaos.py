"""Run the fault-injection ("chaos") run of qworker/testing/chaos.py from the command line.

It pushes the Monte Carlo job with poison, transient and out-of-memory tasks,
kills and restarts consumer processes, truncates result files and kills a
reducer run, at times drawn from --seed. It then prints the report and exits
1 if any check failed.

    python benchmarks/chaos.py --backend sqlite --tasks 2000 --seed 7
    python benchmarks/chaos.py --backend modal-local --tasks 2000 --seed 7 --json chaos.json
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from qworker.backends import MODAL_LOCAL, SQLITE
from qworker.errors import ConfigError
from qworker.log import LOG_LEVELS, configure_logging
from qworker.testing.chaos import ChaosOptions, run_chaos, write_json

logger = logging.getLogger("benchmarks.chaos")


def build_parser() -> argparse.ArgumentParser:
    defaults = ChaosOptions()
    parser = argparse.ArgumentParser(
        description="Run the Monte Carlo job under injected faults and check that no task is lost or counted twice.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python benchmarks/chaos.py --backend sqlite --tasks 2000 --seed 7",
    )
    parser.add_argument("--backend", choices=(SQLITE, MODAL_LOCAL), default=defaults.backend,
                        help="queue backend. modal-local starts a Modal-compatible server on 127.0.0.1 (default: %(default)s)")
    parser.add_argument("--tasks", type=int, default=defaults.tasks, help="tasks pushed, over 4 contracts (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="seed of the fault choice and of the fault times (default: %(default)s)")

    parser.add_argument("--paths", type=int, default=defaults.paths, help="simulated paths per task (default: %(default)s)")
    parser.add_argument("--max-faults", type=int, default=None,
                        help="stop injecting after this many fault events (default: no limit)")
    parser.add_argument("--task-s", type=float, default=defaults.task_s,
                        help="seconds each task sleeps before it simulates, so the faults land mid-run (default: %(default)s)")
    parser.add_argument("--poison-share", type=float, default=defaults.poison_share,
                        help="fraction of tasks that always raise (default: %(default)s)")
    parser.add_argument("--transient-share", type=float, default=defaults.transient_share,
                        help="fraction of tasks that raise on their first attempt (default: %(default)s)")
    parser.add_argument("--oom-share", type=float, default=defaults.oom_share,
                        help="fraction of tasks that raise torch.OutOfMemoryError on the default lane (default: %(default)s)")

    parser.add_argument("--batch-rows", type=int, default=defaults.batch_rows,
                        help="rows per result segment file, or 0 for one parquet file per task (default: %(default)s)")
    parser.add_argument("--timeout-s", type=float, default=defaults.timeout_s,
                        help="seconds after which the run stops waiting and reports what it has (default: %(default)s)")

    parser.add_argument("--data-dir", type=Path,
                        help="data folder to use and keep (default: a temporary folder, removed at the end)")
    parser.add_argument("--keep-data", action="store_true", help="keep the temporary data folder, with the consumer logs")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the report as JSON to PATH")

    parser.add_argument("--log-level", default="INFO", choices=LOG_LEVELS,
                        help="log level of the driver on standard error (default: %(default)s)")
    parser.add_argument("--consumer-log-level", default=defaults.log_level, choices=LOG_LEVELS,
                        help="log level of the consumer and reducer log files in the data folder (default: %(default)s)")
    return parser


def main() -> int:
    args = build_parser().parse_args()
    configure_logging(args.log_level)
    try:
        options = ChaosOptions(
            backend=args.backend,
            tasks=args.tasks,
            seed=args.seed,
            paths=args.paths,
            task_s=args.task_s,
            max_faults=args.max_faults,
            poison_share=args.poison_share,
            transient_share=args.transient_share,
            oom_share=args.oom_share,
            batch_rows=args.batch_rows,
            timeout_s=args.timeout_s,
            data_dir=args.data_dir,
            keep_data=args.keep_data,
            log_level=args.consumer_log_level,
        )
    except ConfigError as exc:
        sys.stderr.write(f"chaos: error: {exc}\n")
        return 2

    report = run_chaos(options)
    if args.json is not None:
        write_json(report, args.json)
        logger.info("wrote the report to %s", args.json)
    print(report.format())
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
