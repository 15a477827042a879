"""Push no-op tasks into one peer's queue; run by the harness with the peers' Python.

    python produce.py SYSTEM --count N [--wait-go]

SYSTEM is a module name without ``_peer`` (huey, celery, rq, arq,
dramatiq). The script imports the peer and builds its producer (connections,
imports), then prints one JSON line ``{"ready": ...}`` with the settings
that the producer reads at run time (for Huey, its connection's PRAGMA
synchronous). With ``--wait-go`` it then waits for a line on standard
input, so the harness can start the clock right before the first push. At the end it
prints ``{"first_push": T0, "pushed": T1}`` in unix seconds.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

SYSTEMS = ("huey", "celery", "rq", "arq", "dramatiq")


def main() -> int:
    parser = argparse.ArgumentParser(description="Push no-op tasks into one peer's queue and print the push times.")
    parser.add_argument("system", choices=SYSTEMS, help="peer to push to")
    parser.add_argument("--count", type=int, required=True, help="tasks to push, with seeds 0 to COUNT - 1")
    parser.add_argument("--wait-go", action="store_true", help="wait for a line on standard input before the first push")
    args = parser.parse_args()

    module = importlib.import_module(f"{args.system}_peer")
    producer = module.Producer()
    print(json.dumps({"ready": producer.describe()}), flush=True)
    if args.wait_go and not sys.stdin.readline():
        print("produce: standard input closed before the go line: the harness stopped", file=sys.stderr)
        return 1

    first_push = time.time()
    producer.push(range(args.count))
    pushed = time.time()
    print(json.dumps({"first_push": first_push, "pushed": pushed}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
