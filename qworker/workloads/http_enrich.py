"""An API-bound workload: each task fetches its seed's records from a JSON API through ``ctx.http``.

Task config::

    url = "http://127.0.0.1:8000"   # base URL of the API
    count = 10                      # records requested per task

The handler sends ``GET {url}/records?seed={seed}&count={count}`` and
returns one row per record, with the task's seed added. The API must return
a JSON list of objects with ``id``, ``index``, ``category`` and a numeric
``value``, as ``python -m qworker.testing.http_api`` does. Requests take
tokens from the job's ``[http.budgets]``, and their errors follow
``ctx.http``: 429 and 5xx retry the task, any other 4xx sends it to the dead
letters at once.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping

import httpx

from ..errors import ConfigError, PermanentTaskError
from ..http import describe
from .base import Aggregation, Workload

if TYPE_CHECKING:
    from ..context import TaskContext
    from ..task import Task

MAX_COUNT = 10_000
RECORD_KEYS = ("id", "index", "category", "value")

AGGREGATION = Aggregation(keys=("category",), sums=("value",))


def validate_config(config: Mapping[str, Any]) -> None:
    """Raise ConfigError naming the key unless ``url`` is an http(s) base URL and ``count`` an integer in range."""
    if "url" not in config:
        raise ConfigError("missing config key 'url': set it to the API's base URL, such as http://127.0.0.1:8000")
    url = config["url"]
    if not isinstance(url, str) or not url:
        raise ConfigError(f"invalid config value url={url!r}: use an http or https base URL")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ConfigError(f"invalid config value url={url!r}: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"invalid config value url={url!r}: use an http or https URL with a host")
    if parsed.query or parsed.fragment:
        raise ConfigError(f"invalid config value url={url!r}: remove the query and fragment, the handler adds /records?seed=...")

    if "count" not in config:
        raise ConfigError("missing config key 'count': set it to the number of records each task requests")
    count = config["count"]
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_COUNT:
        raise ConfigError(f"invalid config value count={count!r}: use an integer from 1 to {MAX_COUNT}")


async def handle(task: Task, ctx: TaskContext) -> list[dict[str, Any]]:
    """Fetch the task's records and return them as rows with the task's seed."""
    url = task.config["url"].rstrip("/") + "/records"
    response = await ctx.http.get(url, params={"seed": task.seed, "count": task.config["count"]})
    where = describe(response.request)
    try:
        records = response.json()
    except ValueError:
        raise PermanentTaskError(f"{where} returned a body that is not JSON") from None
    if not isinstance(records, list):
        raise PermanentTaskError(f"{where} returned a JSON {type(records).__name__}, expected a list of records")
    return [_row(task.seed, record, where) for record in records]


def _row(seed: int, record: Any, where: str) -> dict[str, Any]:
    if not isinstance(record, dict) or any(key not in record for key in RECORD_KEYS):
        raise PermanentTaskError(f"{where} returned a record without the keys {', '.join(RECORD_KEYS)}")
    value = record["value"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PermanentTaskError(f"{where} returned a record whose value is not a finite number")
    return {
        "seed": seed,
        "id": str(record["id"]),
        "index": int(record["index"]),
        "category": str(record["category"]),
        "value": float(value),
    }


WORKLOAD = Workload(
    name="http",
    handler=handle,
    validate_config=validate_config,
    aggregation=AGGREGATION,
    description="Fetch config count records per seed from the JSON API at config url, through the rate-limited ctx.http.",
)
