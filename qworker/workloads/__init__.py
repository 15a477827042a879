"""Workload lookup: built-in names or a ``module:attribute`` import path."""

from __future__ import annotations

import importlib
from typing import Callable

from ..errors import UnknownWorkloadError
from .base import Aggregation, Handler, Rows, Workload

__all__ = ["Aggregation", "Handler", "Rows", "Workload", "BUILTIN_WORKLOADS", "get_workload"]

# name -> "module:attribute" of a Workload object; imported only when asked for,
# so that listing workloads does not import torch.
BUILTIN_WORKLOADS = {
    "http": "qworker.workloads.http_enrich:WORKLOAD",
    "montecarlo": "qworker.workloads.montecarlo:WORKLOAD",
    "noop": "qworker.workloads.noop:WORKLOAD",
    "sleep": "qworker.workloads.noop:SLEEP_WORKLOAD",
}


def get_workload(name: str) -> Workload:
    """Resolve a built-in workload name or a ``package.module:attribute`` path.

    The attribute may be a :class:`Workload` or a plain handler function.
    """
    path = BUILTIN_WORKLOADS.get(name, name)
    if ":" not in path:
        known = ", ".join(sorted(BUILTIN_WORKLOADS))
        raise UnknownWorkloadError(f"unknown workload {name!r}: use one of {known}, or a module:function path")

    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownWorkloadError(f"workload {name!r}: cannot import module {module_name!r}: {exc}") from None
    target = getattr(module, attribute, None)
    if target is None:
        raise UnknownWorkloadError(f"workload {name!r}: module {module_name!r} has no attribute {attribute!r}")
    return _as_workload(name, target)


def _as_workload(name: str, target: Workload | Callable) -> Workload:
    if isinstance(target, Workload):
        return target
    if callable(target):
        return Workload(name=name, handler=target)
    raise UnknownWorkloadError(f"workload {name!r} is a {type(target).__name__}, not a Workload or a function")
