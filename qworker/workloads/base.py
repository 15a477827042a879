"""The workload type: a handler plus the checks and aggregation of its results."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping, Union

if TYPE_CHECKING:
    import pyarrow as pa

    from ..context import TaskContext
    from ..task import Task

# Return value of a handler: a table, a list of row dicts, one row dict, or
# None for a task whose only result is that it finished.
Rows = Union["pa.Table", list[dict[str, Any]], dict[str, Any], None]
Handler = Callable[["Task", "TaskContext"], Union[Rows, Awaitable[Rows]]]


@dataclass(frozen=True)
class Aggregation:
    """Reducer folding rule: group by ``keys`` and add up ``sums``.

    Every group also gets ``rows`` and ``tasks`` counts.
    """

    keys: tuple[str, ...] = ()
    sums: tuple[str, ...] = ()


@dataclass(frozen=True)
class Workload:
    """A named handler with the checks and aggregation that go with it.

    ``validate_config`` raises :class:`~qworker.errors.ConfigError` naming the
    bad key, and runs when tasks are pushed, so a bad value is rejected before
    any task is claimed. ``summarize`` turns the reducer's aggregate into the
    table that ``qworker reduce`` prints.
    """

    name: str
    handler: Handler
    validate_config: Callable[[Mapping[str, Any]], None] | None = None
    aggregation: Aggregation | None = None
    summarize: Callable[["pa.Table"], "pa.Table"] | None = None
    description: str = ""
