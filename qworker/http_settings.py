"""Settings of ``ctx.http``: budgets, credential headers and timeout.

This module does not import httpx, so consumers whose handlers never use
``ctx.http`` start without it (``qworker/http.py`` builds the client).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import ConfigError
from .ratelimit import Budget


@dataclass(frozen=True)
class HttpSettings:
    """Budgets, credentials and timeouts of ``ctx.http``.

    ``header_env`` maps a header name to the environment variable holding its
    value, such as ``{"Authorization": "SEARCH_API_TOKEN"}``; the value is read
    when the client is created, in the consumer's process or container.
    """

    budgets: tuple[Budget, ...] = ()
    header_env: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = 30.0

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> HttpSettings:
        """Read the ``http`` table of a job file: ``budgets``, ``header_env`` and ``timeout_s``."""
        unknown = sorted(set(data) - {"budgets", "header_env", "timeout_s"})
        if unknown:
            raise ConfigError(f"unknown key {unknown[0]!r} in the http settings: use budgets, header_env, timeout_s")
        budgets = data.get("budgets", {})
        if not isinstance(budgets, Mapping):
            raise ConfigError("http.budgets must be a table of budgets, such as {'api.example.com': {rate = 50}}")
        header_env = data.get("header_env", {})
        if not isinstance(header_env, Mapping) or not all(isinstance(v, str) for v in header_env.values()):
            raise ConfigError("http.header_env must map header names to environment variable names")
        timeout_s = data.get("timeout_s", 30.0)
        if not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
            raise ConfigError(f"invalid http.timeout_s {timeout_s!r}: use a positive number of seconds")
        return cls(
            budgets=tuple(Budget.from_mapping(name, spec) for name, spec in budgets.items()),
            header_env=dict(header_env),
            timeout_s=float(timeout_s),
        )

    def to_mapping(self) -> dict[str, Any]:
        return {
            "budgets": {b.name: {"rate": b.rate, "period_s": b.period_s, "burst": b.burst} for b in self.budgets},
            "header_env": dict(self.header_env),
            "timeout_s": self.timeout_s,
        }

    def headers(self) -> dict[str, str]:
        """Read the credential headers from the environment; a missing variable is a config error."""
        headers = {}
        for header, variable in self.header_env.items():
            value = os.environ.get(variable)
            if not value:
                raise ConfigError(
                    f"environment variable {variable!r} for header {header!r} is not set: export it"
                    " (on Modal, add it to a modal.Secret)"
                )
            headers[header] = value
        return headers
