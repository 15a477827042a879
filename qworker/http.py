"""``ctx.http``: an ``httpx.AsyncClient`` whose requests take tokens from the shared rate limiter.

Which budget a request uses: the ``qworker_budget`` request extension if
given (``ctx.http.get(url, extensions={"qworker_budget": "search"})``), else
the URL's host. Requests to a host without a budget are not limited.

Responses are checked for the handler:

* 429 or 503 with ``Retry-After`` pauses the whole budget, in every process,
  for that long;
* 429, 5xx, connect and read timeouts raise :class:`RetryableHTTPError`: the
  task is retried with backoff and the attempt counts;
* any other 4xx raises :class:`PermanentHTTPError`: the task goes to the dead
  letters at once, with the status and URL in the error.

Credentials come from environment variables named in the settings and are
sent as headers. They never appear in errors or logs: messages name the
method, the URL without its query string, and the status.
"""

from __future__ import annotations

import email.utils
import logging
import time

import httpx

from .errors import PermanentHTTPError, RetryableHTTPError
from .http_settings import HttpSettings
from .ratelimit import RateLimiter

__all__ = ["HttpSettings", "LimitedTransport", "describe", "make_http_client", "retry_after_s"]

logger = logging.getLogger("qworker.http")

BUDGET_EXTENSION = "qworker_budget"
RETRYABLE_STATUSES = frozenset({429}) | frozenset(range(500, 600))
PAUSE_STATUSES = frozenset({429, 503})
# A Retry-After longer than this is capped, so one bad header cannot stall a budget for hours.
MAX_PAUSE_S = 300.0


class LimitedTransport(httpx.AsyncBaseTransport):
    """Takes a token before each request and pauses the budget when the server pushes back."""

    def __init__(self, inner: httpx.AsyncBaseTransport, limiter: RateLimiter | None) -> None:
        self._inner = inner
        self._limiter = limiter

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        budget = self._budget_of(request)
        if budget is not None:
            await self._limiter.acquire(budget)  # type: ignore[union-attr]

        try:
            response = await self._inner.handle_async_request(request)
        except (httpx.ConnectTimeout, httpx.ReadTimeout, httpx.ConnectError) as exc:
            raise RetryableHTTPError(f"{type(exc).__name__} for {describe(request)}") from None

        if budget is not None and response.status_code in PAUSE_STATUSES:
            pause_s = retry_after_s(response.headers.get("Retry-After"))
            if pause_s is not None:
                await self._limiter.pause(budget, pause_s)  # type: ignore[union-attr]
        return response

    def _budget_of(self, request: httpx.Request) -> str | None:
        if self._limiter is None:
            return None
        name = request.extensions.get(BUDGET_EXTENSION) or request.url.host
        return name if self._limiter.budget_for(name) is not None else None

    async def aclose(self) -> None:
        await self._inner.aclose()


async def _raise_for_status(response: httpx.Response) -> None:
    status = response.status_code
    if status < 400:
        return
    where = describe(response.request)
    if status in RETRYABLE_STATUSES:
        raise RetryableHTTPError(f"HTTP {status} for {where}")
    raise PermanentHTTPError(f"HTTP {status} for {where}: the request was rejected, so retrying cannot help")


def describe(request: httpx.Request) -> str:
    """Name a request without its query string or headers, which may hold credentials."""
    url = request.url
    return f"{request.method} {url.scheme}://{url.host}{':' + str(url.port) if url.port else ''}{url.path}"


def retry_after_s(value: str | None) -> float | None:
    """Parse ``Retry-After`` (seconds or an HTTP date) into seconds from now, capped at ``MAX_PAUSE_S``."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            logger.warning("ignoring unreadable Retry-After header %r", value[:40])
            return None
    return min(MAX_PAUSE_S, max(0.0, seconds))


def make_http_client(settings: HttpSettings, limiter: RateLimiter | None) -> httpx.AsyncClient:
    """Build the client handed to handlers as ``ctx.http``."""
    transport = LimitedTransport(httpx.AsyncHTTPTransport(), limiter)
    return httpx.AsyncClient(
        transport=transport,
        headers=settings.headers(),
        timeout=httpx.Timeout(settings.timeout_s),
        event_hooks={"response": [_raise_for_status]},
    )
