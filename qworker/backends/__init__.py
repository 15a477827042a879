"""Queue backends: the embedded SQLite queue (default) and the Modal adapter.

``sqlite`` keeps everything in one file on this machine. ``modal`` uses
``modal.Queue`` and ``modal.Dict`` through the modal client, with credentials
from the environment. ``modal-local`` is the same adapter pointed at a
Modal-compatible server on 127.0.0.1 (``python -m qworker.testing.modal_server``),
with results in a local folder that replaces the Volume.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..layout import Layout
    from ..ratelimit import GlobalBucket
    from .modal_queue import ModalQueueSettings
    from ..queue import TaskQueue

SQLITE, MODAL, MODAL_LOCAL = "sqlite", "modal", "modal-local"
BACKENDS = (SQLITE, MODAL_LOCAL, MODAL)


async def open_queue(
    backend: str,
    layout: Layout,
    name: str,
    *,
    create: bool = True,
    synchronous: str = "NORMAL",
    modal_settings: ModalQueueSettings | None = None,
) -> TaskQueue:
    """Open queue ``name`` on ``backend``; with ``create=False`` a queue no producer created raises QueueNotFoundError.

    ``synchronous`` applies to SQLite and ``modal_settings`` to the Modal backends.
    """
    if backend == SQLITE:
        from .sqlite import SqliteQueue, open_existing_queue

        if create:
            return SqliteQueue(layout.db_path, name, synchronous=synchronous)
        return await open_existing_queue(layout.db_path, name, synchronous=synchronous)

    if backend in (MODAL, MODAL_LOCAL):
        from ..errors import QueueNotFoundError

        if backend == MODAL_LOCAL and not os.environ.get("MODAL_SERVER_URL", "").startswith("http://127.0.0.1:"):
            raise ConfigError(
                "backend 'modal-local' needs MODAL_SERVER_URL=http://127.0.0.1:PORT: start"
                " 'python -m qworker.testing.modal_server', set MODAL_SERVER_URL to the URL it prints,"
                " and MODAL_TOKEN_ID and MODAL_TOKEN_SECRET to any non-empty value"
            )
        if backend == MODAL_LOCAL:
            _check_local_server(os.environ["MODAL_SERVER_URL"])
        queue = await _open_modal_queue(backend, name, layout, modal_settings)
        if not create and not await queue.exists():
            raise QueueNotFoundError(f"queue {name!r} not found on backend {backend!r}: push tasks to it first")
        return queue

    raise ConfigError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")


def open_bucket(backend: str, layout: Layout) -> GlobalBucket:
    """Return the rate limit bucket that every consumer of ``backend`` shares."""
    if backend == SQLITE:
        from ..ratelimit import SqliteBucket

        return SqliteBucket(layout.db_path)
    if backend in (MODAL, MODAL_LOCAL):
        from .modal_bucket import ModalBucket

        return ModalBucket()
    raise ConfigError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")


async def _open_modal_queue(
    backend: str, name: str, layout: Layout, settings: ModalQueueSettings | None
) -> TaskQueue:
    """Open the Modal adapter, turning the client's authentication and connection errors into one-line errors."""
    import modal.exception

    from .modal_queue import ModalTaskQueue

    try:
        return await ModalTaskQueue.open(name, layout.data_dir / "dead_letters", settings)
    except modal.exception.AuthError as exc:
        fix = "set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET to any non-empty value" if backend == MODAL_LOCAL else (
            "run 'modal token new' or set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET"
        )
        raise ConfigError(f"backend {backend!r}: Modal rejected the credentials ({exc}): {fix}") from None
    except modal.exception.ConnectionError as exc:
        raise ConfigError(f"backend {backend!r}: cannot reach the Modal server ({exc}): check the network or MODAL_SERVER_URL") from None


def _check_local_server(url: str) -> None:
    """Fail at once when nothing listens at the local server's address, instead of after the client's retries."""
    import socket
    from urllib.parse import urlsplit

    address = urlsplit(url)
    try:
        with socket.create_connection((address.hostname or "127.0.0.1", address.port or 80), timeout=2.0):
            pass
    except OSError as exc:
        raise ConfigError(
            f"no Modal-compatible server answers at {url} ({exc.strerror or exc}): start"
            " 'python -m qworker.testing.modal_server' and set MODAL_SERVER_URL to the URL it prints"
        ) from None
