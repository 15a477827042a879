"""An in-memory server for the modal client's Queue and Dict RPCs, on 127.0.0.1.

Tests and local runs point the real modal client (``modal>=1.6,<1.7``) at this
server instead of Modal's cloud::

    with LocalModalServer() as server:
        point_client_at(server.url)
        queue = modal.Queue.from_name("jobs", create_if_missing=True)

or run it as its own process, which prints its URL on stdout::

    python -m qworker.testing.modal_server --port 0

``ModalServicer`` implements the RPCs behind ``modal.Queue`` and ``modal.Dict``
and returns ``UNIMPLEMENTED`` for every other RPC. Values and keys are the
client's pickled bytes, stored and compared as bytes and never unpickled here.
The server enforces the queue limits that Modal documents for ``modal.Queue``
(see ``QueueLimits``). All state lives in memory and is lost on stop.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import collections
import dataclasses
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpclib.const
import grpclib.server
from google.protobuf import empty_pb2
from grpclib import GRPCError, Status
from modal_proto import api_grpc, api_pb2

logger = logging.getLogger("qworker.testing.modal_server")

HOST = "127.0.0.1"

# The modal client sends this TTL when the caller passes none (24 hours).
DEFAULT_PARTITION_TTL_S = 24 * 3600

# `Dict.len` in modal 1.6 documents that it returns at most 100,000.
MAX_REPORTED_DICT_LEN = 100_000

# NOTE: Modal does not document how many items one QueueNextItems response
# carries. The client keeps asking until a response is empty, so any positive
# batch size gives the same iteration.
NEXT_ITEMS_BATCH = 100


@dataclasses.dataclass(frozen=True)
class QueueLimits:
    """Per-queue limits, by default those in the ``modal.Queue`` docstring of modal 1.6.4.

    A put over an item-count, partition-size or partition-count limit gets
    RESOURCE_EXHAUSTED, which modal 1.6.4 retries and then raises as
    ``queue.Full``. A larger item gets INVALID_ARGUMENT. NOTE: the client code
    shows RESOURCE_EXHAUSTED for a full partition, but the statuses Modal uses
    for the size and partition-count limits are assumed.
    """

    max_items_per_partition: int = 5_000
    max_item_bytes: int = 1024 * 1024
    max_partition_bytes: int = 64 * 1024 * 1024
    max_partition_key_bytes: int = 64
    max_partitions: int = 100_000


# --- In-memory objects -------------------------------------------------------


@dataclasses.dataclass
class _Partition:
    # Items in FIFO order as (entry id, serialized value).
    items: collections.deque[tuple[int, bytes]] = dataclasses.field(default_factory=collections.deque)
    size_bytes: int = 0
    expires_at: float = 0.0


class _QueueObject:
    def __init__(self, object_id: str, name: str, created_at: float) -> None:
        self.object_id = object_id
        self.name = name
        self.created_at = created_at
        self.partitions: dict[bytes, _Partition] = {}
        # Entry ids increase across the whole queue and are never reused, so an
        # iterator's last entry id stays valid after a partition expires.
        self.next_entry_id = 1
        # One event per partition that has waiters, set and removed by the next put.
        self.waiters: dict[bytes, asyncio.Event] = {}

    def metadata(self) -> api_pb2.QueueMetadata:
        return api_pb2.QueueMetadata(
            name=self.name,
            creation_info=api_pb2.CreationInfo(created_at=self.created_at, created_by="qworker-local"),
        )


class _DictObject:
    def __init__(self, object_id: str, name: str, created_at: float) -> None:
        self.object_id = object_id
        self.name = name
        self.created_at = created_at
        # Keys are the serialized keys, so two keys are equal when their pickles are.
        self.entries: dict[bytes, bytes] = {}

    def metadata(self) -> api_pb2.DictMetadata:
        return api_pb2.DictMetadata(
            name=self.name,
            creation_info=api_pb2.CreationInfo(created_at=self.created_at, created_by="qworker-local"),
        )


def _describe_partition(partition_key: bytes) -> str:
    if not partition_key:
        return "default partition"
    return f"partition {partition_key.decode('utf-8', 'replace')!r}"


def _new_object_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:22]}"


async def _receive(stream: grpclib.server.Stream) -> Any:
    request = await stream.recv_message()
    if request is None:
        raise GRPCError(Status.INVALID_ARGUMENT, "request message is missing")
    return request


# --- The servicer --------------------------------------------------------------


class ModalServicer(api_grpc.ModalClientBase):
    """Implements the Queue and Dict RPCs of ``modal.client.ModalClient`` in memory.

    All handlers run on the server's event loop, which is the only writer of
    the object state. ``rpc_counts`` and ``reset_counts`` may be called from any
    thread, and a test may replace ``limits`` between requests. ``clock``
    returns seconds and drives partition TTLs only, so a test can pass a fake
    clock to expire partitions without sleeping.
    """

    def __init__(
        self,
        *,
        limits: QueueLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits or QueueLimits()
        self.clock = clock
        self._queues: dict[str, _QueueObject] = {}
        self._dicts: dict[str, _DictObject] = {}
        # (kind, environment name, deployment name) -> object id
        self._names: dict[tuple[str, str, str], str] = {}
        self._counts: collections.Counter[str] = collections.Counter()
        self._counts_lock = threading.Lock()
        self._warned_unimplemented: set[str] = set()

    # --- RPC counters ---

    def rpc_counts(self) -> dict[str, int]:
        """Return how many times each RPC was called, by method name (``"QueuePut"``)."""
        with self._counts_lock:
            return dict(self._counts)

    def reset_counts(self) -> None:
        with self._counts_lock:
            self._counts.clear()

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        """Return the base class's RPC table with every handler wrapped to count its calls."""
        mapping = super().__mapping__()
        return {
            path: handler._replace(func=self._counting(path.rsplit("/", 1)[-1], handler.func))
            for path, handler in mapping.items()
        }

    def _counting(
        self, method_name: str, func: Callable[[grpclib.server.Stream], Awaitable[None]]
    ) -> Callable[[grpclib.server.Stream], Awaitable[None]]:
        async def counted(stream: grpclib.server.Stream) -> None:
            with self._counts_lock:
                self._counts[method_name] += 1
            await func(stream)

        return counted

    def _reject_unimplemented(self, method_name: str) -> None:
        if method_name not in self._warned_unimplemented:
            self._warned_unimplemented.add(method_name)
            logger.warning("rejected RPC %s: the local Modal server does not implement it", method_name)
        raise GRPCError(Status.UNIMPLEMENTED, f"{method_name} is not implemented by the local Modal test server")

    # --- Client ---

    async def ClientHello(self, stream: grpclib.server.Stream) -> None:
        await _receive(stream)
        await stream.send_message(api_pb2.ClientHelloResponse())

    # --- Object registry ---

    def _get_or_create(
        self,
        kind: str,
        registry: dict[str, Any],
        factory: Callable[[str, str, float], Any],
        request: Any,
    ) -> tuple[Any, bool]:
        """Resolve a GetOrCreate request to an object; return it and whether it is new."""
        creation_type = request.object_creation_type
        name = request.deployment_name
        prefix = "qu" if kind == "Queue" else "di"

        if creation_type in (api_pb2.OBJECT_CREATION_TYPE_EPHEMERAL, api_pb2.OBJECT_CREATION_TYPE_ANONYMOUS_OWNED_BY_APP):
            obj = factory(_new_object_id(prefix), "", time.time())
            registry[obj.object_id] = obj
            return obj, True

        if not name:
            raise GRPCError(Status.INVALID_ARGUMENT, f"{kind} name is missing: pass a deployment name")

        key = (kind, request.environment_name, name)
        existing_id = self._names.get(key)
        existing = registry.get(existing_id) if existing_id else None
        where = f"{kind} {name!r} in environment {request.environment_name or '(default)'!r}"

        if creation_type == api_pb2.OBJECT_CREATION_TYPE_UNSPECIFIED:
            if existing is None:
                raise GRPCError(Status.NOT_FOUND, f"{where} not found: create it with create_if_missing=True")
            return existing, False
        if creation_type == api_pb2.OBJECT_CREATION_TYPE_CREATE_IF_MISSING and existing is not None:
            return existing, False
        if creation_type == api_pb2.OBJECT_CREATION_TYPE_CREATE_FAIL_IF_EXISTS and existing is not None:
            raise GRPCError(Status.ALREADY_EXISTS, f"{where} already exists")
        if creation_type not in (
            api_pb2.OBJECT_CREATION_TYPE_CREATE_IF_MISSING,
            api_pb2.OBJECT_CREATION_TYPE_CREATE_FAIL_IF_EXISTS,
            api_pb2.OBJECT_CREATION_TYPE_CREATE_OVERWRITE_IF_EXISTS,
        ):
            raise GRPCError(Status.INVALID_ARGUMENT, f"object creation type {creation_type} is invalid for {kind}")

        if existing is not None:
            # CREATE_OVERWRITE_IF_EXISTS replaces the object, and its id, under the name.
            del registry[existing.object_id]
            if isinstance(existing, _QueueObject):
                self._notify_all(existing)
        obj = factory(_new_object_id(prefix), name, time.time())
        registry[obj.object_id] = obj
        self._names[key] = obj.object_id
        logger.info("created %s %s named %r", kind, obj.object_id, name)
        return obj, True

    def _delete(self, kind: str, registry: dict[str, Any], object_id: str) -> Any:
        obj = registry.pop(object_id, None)
        if obj is None:
            raise GRPCError(Status.NOT_FOUND, f"{kind} {object_id} not found")
        for key in [key for key, value in self._names.items() if value == object_id]:
            del self._names[key]
        logger.info("deleted %s %s", kind, object_id)
        return obj

    # --- Queue helpers ---

    def _queue(self, queue_id: str) -> _QueueObject:
        queue = self._queues.get(queue_id)
        if queue is None:
            raise GRPCError(Status.NOT_FOUND, f"Queue {queue_id} not found: it was deleted or never created")
        return queue

    def _check_partition_key(self, partition_key: bytes) -> None:
        # An empty key is the default partition.
        max_bytes = self.limits.max_partition_key_bytes
        if len(partition_key) > max_bytes:
            raise GRPCError(
                Status.INVALID_ARGUMENT,
                f"Queue partition key is {len(partition_key)} bytes, over the limit of {max_bytes} bytes",
            )

    def _live_partition(self, queue: _QueueObject, partition_key: bytes, now: float) -> _Partition | None:
        """Return the partition, first dropping it if its TTL has passed."""
        partition = queue.partitions.get(partition_key)
        if partition is not None and partition.expires_at <= now:
            del queue.partitions[partition_key]
            return None
        return partition

    def _drop_expired_partitions(self, queue: _QueueObject, now: float) -> None:
        expired = [key for key, partition in queue.partitions.items() if partition.expires_at <= now]
        for key in expired:
            del queue.partitions[key]

    def _notify(self, queue: _QueueObject, partition_key: bytes) -> None:
        event = queue.waiters.pop(partition_key, None)
        if event is not None:
            event.set()

    def _notify_all(self, queue: _QueueObject) -> None:
        for key in list(queue.waiters):
            self._notify(queue, key)

    async def _wait_for_put(self, queue: _QueueObject, partition_key: bytes, timeout: float) -> None:
        """Wait until the next put to the partition, or for ``timeout`` seconds."""
        event = queue.waiters.get(partition_key)
        if event is None:
            event = queue.waiters[partition_key] = asyncio.Event()
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def _check_put(self, queue: _QueueObject, partition_key: bytes, values: list[bytes], now: float) -> _Partition:
        """Return the partition the values go to, or raise GRPCError if a limit rejects the put."""
        limits = self.limits
        for index, value in enumerate(values):
            if len(value) > limits.max_item_bytes:
                raise GRPCError(
                    Status.INVALID_ARGUMENT,
                    f"Queue item {index} is {len(value)} bytes serialized,"
                    f" over the limit of {limits.max_item_bytes} bytes per item",
                )

        partition = self._live_partition(queue, partition_key, now)
        if partition is None:
            if len(queue.partitions) >= limits.max_partitions:
                self._drop_expired_partitions(queue, now)
            if len(queue.partitions) >= limits.max_partitions:
                raise GRPCError(
                    Status.RESOURCE_EXHAUSTED,
                    f"Queue {queue.object_id} is at its limit of {limits.max_partitions} partitions:"
                    " put to an existing partition, or clear partitions or wait for them to expire",
                )
            partition = _Partition()

        count = len(partition.items) + len(values)
        if count > limits.max_items_per_partition:
            raise GRPCError(
                Status.RESOURCE_EXHAUSTED,
                f"Queue {_describe_partition(partition_key)} is full: it holds {len(partition.items)} items,"
                f" {len(values)} more would exceed the limit of {limits.max_items_per_partition} items",
            )
        size = partition.size_bytes + sum(len(value) for value in values)
        if size > limits.max_partition_bytes:
            raise GRPCError(
                Status.RESOURCE_EXHAUSTED,
                f"Queue {_describe_partition(partition_key)} is full: {size} bytes would exceed"
                f" the limit of {limits.max_partition_bytes} bytes",
            )
        return partition

    # --- Queue RPCs ---

    async def QueueGetOrCreate(self, stream: grpclib.server.Stream) -> None:
        request = await _receive(stream)
        queue, _ = self._get_or_create("Queue", self._queues, _QueueObject, request)
        await stream.send_message(api_pb2.QueueGetOrCreateResponse(queue_id=queue.object_id, metadata=queue.metadata()))

    async def QueueGetById(self, stream: grpclib.server.Stream) -> None:
        request = await _receive(stream)
        queue = self._queue(request.queue_id)
        await stream.send_message(api_pb2.QueueGetByIdResponse(queue_id=queue.object_id, metadata=queue.metadata()))

    async def QueueDelete(self, stream: grpclib.server.Stream) -> None:
        request = await _receive(stream)
        queue = self._delete("Queue", self._queues, request.queue_id)
        # Blocked getters wake up, find the queue gone and return NOT_FOUND.
        self._notify_all(queue)
        await stream.send_message(empty_pb2.Empty())

    async def QueueHeartbeat(self, stream: grpclib.server.Stream) -> None:
        # NOTE: ephemeral queues and dicts are kept until the server stops, with or without heartbeats.
        request = await _receive(stream)
        self._queue(request.queue_id)
        await stream.send_message(empty_pb2.Empty())

    async def QueuePut(self, stream: grpclib.server.Stream) -> None:
        request = await _receive(stream)
        queue = self._queue(request.queue_id)
        partition_key = bytes(request.partition_key)
        self._check_partition_key(partition_key)
        values = list(request.values)
        if not values:
            # An empty put changes nothing, not even the partition's TTL.
            await stream.send_message(empty_pb2.Empty())
            return
        now = self.clock()

        partition = self._check_put(queue, partition_key, values, now)
        for value in values:
            partition.items.append((queue.next_entry_id, value))
            partition.size_bytes += len(value)
            queue.next_entry_id += 1
        ttl = request.partition_ttl_seconds if request.partition_ttl_seconds > 0 else DEFAULT_PARTITION_TTL_S
        partition.expires_at = now + ttl
        queue.partitions[partition_key] = partition
        self._notify(queue, partition_key)
        await stream.send_message(empty_pb2.Empty())

    async def QueueGet(self, stream: grpclib.server.Stream) -> None:
        request = await _receive(stream)
        partition_key = bytes(request.partition_key)
        self._check_partition_key(partition_key)
        n_values = max(request.n_values, 1)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(request.timeout, 0.0)

        while True:
            # Look the queue up on every pass, so a delete during the wait ends it.
            queue = self._queue(request.queue_id)
            partition = self._live_partition(queue, partition_key, self.clock())
            if partition is not None and partition.items:
                values = []
                while partition.items and len(values) < n_values:
                    _, value = partition.items.popleft()
                    partition.size_bytes -= len(value)
                    values.append(value)
                if not partition.items:
                    # An empty partition no longer counts towards max_partitions.
                    del queue.partitions[partition_key]
                await stream.send_message(api_pb2.QueueGetResponse(values=values))
                return

            remaining = deadline - loop.time()
            if remaining <= 0:
                await stream.send_message(api_pb2.QueueGetResponse())
                return
            await self._wait_for_put(queue, partition_key, remaining)

    async def QueueLen(self, stream: grpclib.server.Stream) -> None:
        request = await _receive(stream)
        queue = self._queue(request.queue_id)
        partition_key = bytes(request.partition_key)
        self._check_partition_key(partition_key)
        now = self.clock()

        if request.total:
            self._drop_expired_partitions(queue, now)
            length = sum(len(partition.items) for partition in queue.partitions.values())
        else:
            partition = self._live_partition(queue, partition_key, now)
            length = len(partition.items) if partition is not None else 0
        await stream.send_message(api_pb2.QueueLenResponse(len=length))

    async def QueueClear(self, stream: grpclib.server.Stream) -> None:
        request = await _receive(stream)
        queue = self._queue(request.queue_id)
        partition_key = bytes(request.partition_key)
        self._check_partition_key(partition_key)

        if request.all_partitions:
            queue.partitions.clear()
        else:
            queue.partitions.pop(partition_key, None)
        await stream.send_message(empty_pb2.Empty())

    async def QueueNextItems(self, stream: grpclib.server.Stream) -> None:
        """Return the items after ``last_entry_id`` without removing them, waiting up to ``item_poll_timeout``."""
        request = await _receive(stream)
        partition_key = bytes(request.partition_key)
        self._check_partition_key(partition_key)
        try:
            last_entry_id = int(request.last_entry_id) if request.last_entry_id else 0
        except ValueError:
            raise GRPCError(
                Status.INVALID_ARGUMENT, f"last_entry_id {request.last_entry_id!r} is invalid: pass an entry id or ''"
            ) from None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(request.item_poll_timeout, 0.0)

        while True:
            queue = self._queue(request.queue_id)
            partition = self._live_partition(queue, partition_key, self.clock())
            items = []
            if partition is not None:
                for entry_id, value in partition.items:
                    if entry_id > last_entry_id:
                        items.append(api_pb2.QueueItem(value=value, entry_id=str(entry_id)))
                        if len(items) == NEXT_ITEMS_BATCH:
                            break
            remaining = deadline - loop.time()
            if items or remaining <= 0:
                await stream.send_message(api_pb2.QueueNextItemsResponse(items=items))
                return
            await self._wait_for_put(queue, partition_key, remaining)

    # --- Dict RPCs ---

    def _dict(self, dict_id: str) -> _DictObject:
        obj = self._dicts.get(dict_id)
        if obj is None:
            raise GRPCError(Status.NOT_FOUND, f"Dict {dict_id} not found: it was deleted or never created")
        return obj

    async def DictGetOrCreate(self, stream: grpclib.server.Stream) -> None:
        request = await _receive(stream)
        obj, created = self._get_or_create("Dict", self._dicts, _DictObject, request)
        if created:
            # `data` contains the initial entries of a new Dict.
            for entry in request.data:
                obj.entries[bytes(entry.key)] = bytes(entry.value)
        await stream.send_message(api_pb2.DictGetOrCreateResponse(dict_id=obj.object_id, metadata=obj.metadata()))

    async def DictGetById(self, stream: grpclib.server.Stream) -> None:
        request = await _receive(stream)
        obj = self._dict(request.dict_id)
        await stream.send_message(api_pb2.DictGetByIdResponse(dict_id=obj.object_id, metadata=obj.metadata()))

    async def DictDelete(self, stream: grpclib.server.Stream) -> None:
        request = await _receive(stream)
        self._delete("Dict", self._dicts, request.dict_id)
        await stream.send_message(empty_pb2.Empty())

    async def DictHeartbeat(self, stream: grpclib.server.Stream) -> None:
        request = await _receive(stream)
        self._dict(request.dict_id)
        await stream.send_message(empty_pb2.Empty())

    async def DictUpdate(self, stream: grpclib.server.Stream) -> None:
        """Write the entries; with ``if_not_exists`` keep existing keys and report whether any entry was written."""
        request = await _receive(stream)
        obj = self._dict(request.dict_id)
        created = False
        for entry in request.updates:
            key = bytes(entry.key)
            if request.if_not_exists and key in obj.entries:
                continue
            obj.entries[key] = bytes(entry.value)
            created = True
        await stream.send_message(api_pb2.DictUpdateResponse(created=created))

    async def DictGet(self, stream: grpclib.server.Stream) -> None:
        request = await _receive(stream)
        value = self._dict(request.dict_id).entries.get(bytes(request.key))
        if value is None:
            await stream.send_message(api_pb2.DictGetResponse(found=False))
        else:
            await stream.send_message(api_pb2.DictGetResponse(found=True, value=value))

    async def DictPop(self, stream: grpclib.server.Stream) -> None:
        request = await _receive(stream)
        value = self._dict(request.dict_id).entries.pop(bytes(request.key), None)
        if value is None:
            await stream.send_message(api_pb2.DictPopResponse(found=False))
        else:
            await stream.send_message(api_pb2.DictPopResponse(found=True, value=value))

    async def DictContains(self, stream: grpclib.server.Stream) -> None:
        request = await _receive(stream)
        found = bytes(request.key) in self._dict(request.dict_id).entries
        await stream.send_message(api_pb2.DictContainsResponse(found=found))

    async def DictLen(self, stream: grpclib.server.Stream) -> None:
        request = await _receive(stream)
        length = min(len(self._dict(request.dict_id).entries), MAX_REPORTED_DICT_LEN)
        await stream.send_message(api_pb2.DictLenResponse(len=length))

    async def DictClear(self, stream: grpclib.server.Stream) -> None:
        request = await _receive(stream)
        self._dict(request.dict_id).entries.clear()
        await stream.send_message(empty_pb2.Empty())

    async def DictContents(self, stream: grpclib.server.Stream) -> None:
        """Stream one ``DictEntry`` per entry, in insertion order, from a snapshot taken at the start.

        Every entry carries its key, because ``Dict.values()`` in modal 1.6
        reads the key to name it in deserialization errors. The value is sent
        only when the request sets ``values``.
        """
        request = await _receive(stream)
        snapshot = list(self._dict(request.dict_id).entries.items())
        for key, value in snapshot:
            entry = api_pb2.DictEntry(key=key, value=value if request.values else b"")
            await stream.send_message(entry)


def _unimplemented_handler(method_name: str) -> Callable[[ModalServicer, grpclib.server.Stream], Awaitable[None]]:
    async def handler(self: ModalServicer, stream: grpclib.server.Stream) -> None:
        self._reject_unimplemented(method_name)

    handler.__name__ = method_name
    return handler


# Every RPC in ModalClientBase is abstract, and a handler that returns without
# a response makes grpclib log a protocol error, so the RPCs not implemented
# above get a handler that returns UNIMPLEMENTED.
for _method_name in sorted(ModalServicer.__abstractmethods__):
    setattr(ModalServicer, _method_name, _unimplemented_handler(_method_name))
abc.update_abstractmethods(ModalServicer)
del _method_name


# --- Serving -------------------------------------------------------------------


class _Server(grpclib.server.Server):
    """A grpclib server whose ``close_connections`` closes the accepted connections.

    grpclib 0.4 ``Server.close`` stops listening and cancels running handlers
    but leaves established connections open, and Python 3.11's asyncio server
    cannot close them, so a stopped server would leak sockets. The tracking
    wraps grpclib's private ``_protocol_factory``, checked with grpclib 0.4.9.
    """

    def __init__(self, handlers: list[Any]) -> None:
        super().__init__(handlers)
        # Open connections: protocol -> its transport.
        self._connections: dict[Any, asyncio.BaseTransport] = {}

    def _protocol_factory(self) -> Any:
        protocol = super()._protocol_factory()
        connection_made = protocol.connection_made
        connection_lost = protocol.connection_lost

        def track_connection_made(transport: asyncio.BaseTransport) -> None:
            self._connections[protocol] = transport
            connection_made(transport)

        def track_connection_lost(exc: Exception | None) -> None:
            self._connections.pop(protocol, None)
            connection_lost(exc)

        protocol.connection_made = track_connection_made
        protocol.connection_lost = track_connection_lost
        return protocol

    def close_connections(self) -> None:
        for transport in list(self._connections.values()):
            transport.close()


def _listening_socket(port: int) -> socket.socket:
    # asyncio and grpclib set TCP_NODELAY only on sockets whose proto is
    # IPPROTO_TCP. Accepted sockets inherit the proto, and with proto 0 each
    # RPC took about 44 ms on Linux, waiting for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def serve(
    sock: socket.socket, servicer: ModalServicer, stop: asyncio.Event, started: Callable[[], None] | None = None
) -> None:
    """Serve ``servicer`` on the listening socket until ``stop`` is set, then close every connection."""
    try:
        server = _Server([servicer])
        await server.start(sock=sock)
    except BaseException:
        sock.close()
        raise
    port = sock.getsockname()[1]
    logger.info("local Modal server listening on http://%s:%d", HOST, port)
    try:
        if started is not None:
            started()
        await stop.wait()
    finally:
        server.close()
        await server.wait_closed()
        server.close_connections()
        # Let the transports run their close callbacks before the loop goes away.
        await asyncio.sleep(0)
        logger.info("local Modal server on port %d stopped", port)


def client_env(url: str) -> dict[str, str]:
    """Return the environment variables that point a modal client at the server at ``url``.

    The token is a placeholder because the local server accepts any token.
    ``MODAL_CONFIG_PATH`` names a file that does not exist, so a developer's
    ``~/.modal.toml`` cannot change the profile, server or token, and
    ``MODAL_DISABLE_API_PROXY`` keeps HTTP proxy settings from routing the
    connection elsewhere.
    """
    missing_config = os.path.join(tempfile.gettempdir(), f"qworker-no-modal-config-{uuid.uuid4().hex}.toml")
    return {
        "MODAL_SERVER_URL": url,
        "MODAL_TOKEN_ID": "ak-qworker-local",
        "MODAL_TOKEN_SECRET": "as-qworker-local",
        "MODAL_CONFIG_PATH": missing_config,
        "MODAL_DISABLE_API_PROXY": "1",
    }


def close_cached_client() -> None:
    """Close the client that ``modal.Client.from_env()`` cached in this process, if any, and drop it.

    The next modal call then opens a client from the current environment.
    Objects hydrated with the closed client stop working. Call it from
    synchronous code: closing runs on the modal client's own event loop thread.
    """
    import modal
    from modal.client import _Client

    if _Client._client_from_env is not None:
        # With a cached client, from_env returns it without connecting anywhere.
        modal.Client.from_env().close()
        _Client._set_env_client(None)


def point_client_at(url: str) -> None:
    """Point the modal client in this process at the server at ``url``.

    ``modal.Client.from_env()`` caches the first client per process with the
    server URL it was created for, so besides setting ``os.environ`` this
    closes that cached client (see ``close_cached_client``).

    NOTE: modal reads ``MODAL_CONFIG_PATH`` once, when it is first imported, so
    in a process that imported modal earlier the config file it already read
    stays loaded. The variables set here override its server URL and token,
    but its other settings, such as ``environment``, still apply.
    """
    os.environ.update(client_env(url))
    close_cached_client()


class LocalModalServer:
    """Runs a ``ModalServicer`` on 127.0.0.1 in a background thread with its own event loop.

    The modal client's synchronous API blocks its caller until the RPC
    returns, so the server cannot share an event loop with code that calls it.
    """

    def __init__(self, port: int = 0, *, servicer: ModalServicer | None = None) -> None:
        self.servicer = servicer or ModalServicer()
        self._requested_port = port
        self._port: int | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("LocalModalServer is not started: call start() first")
        return self._port

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def client_env(self) -> dict[str, str]:
        """Return the environment variables that point a modal client at this server."""
        return client_env(self.url)

    def rpc_counts(self) -> dict[str, int]:
        return self.servicer.rpc_counts()

    def reset_counts(self) -> None:
        self.servicer.reset_counts()

    def start(self, timeout_s: float = 10.0) -> LocalModalServer:
        """Bind 127.0.0.1 (port 0 picks a free one) and start serving; return once the server accepts."""
        if self._thread is not None:
            raise RuntimeError("LocalModalServer is already started")
        sock = _listening_socket(self._requested_port)
        self._port = sock.getsockname()[1]
        self._thread = threading.Thread(
            target=self._run, args=(sock,), name=f"local-modal-server-{self._port}", daemon=True
        )
        self._thread.start()
        if not self._started.wait(timeout_s):
            raise TimeoutError(f"local Modal server on port {self._port} did not start within {timeout_s} s")
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise RuntimeError(f"local Modal server on port {self._port} failed to start") from self._error
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop serving, close all connections and end the thread. Calling it again does nothing."""
        thread = self._thread
        if thread is None:
            return
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        thread.join(timeout_s)
        if thread.is_alive():
            raise TimeoutError(f"local Modal server on port {self._port} did not stop within {timeout_s} s")
        self._thread = None

    def _run(self, sock: socket.socket) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._stop = asyncio.Event()
            loop.run_until_complete(serve(sock, self.servicer, self._stop, started=self._started.set))
        except BaseException as exc:
            self._error = exc
            if self._started.is_set():
                logger.exception("local Modal server on port %s failed", self._port)
        finally:
            self._started.set()
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    def __enter__(self) -> LocalModalServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# --- Command line --------------------------------------------------------------


async def _serve_until_signal(sock: socket.socket) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    url = f"http://{HOST}:{sock.getsockname()[1]}"

    def announce() -> None:
        # The URL is the only line on stdout, so a parent process can read it.
        print(url, flush=True)

    await serve(sock, ModalServicer(), stop, started=announce)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qworker.testing.modal_server",
        description=(
            "Serve the modal client's Queue and Dict RPCs from memory on 127.0.0.1, print the URL on"
            " stdout, and run until SIGINT or SIGTERM. Point clients at it with MODAL_SERVER_URL=URL,"
            " MODAL_TOKEN_ID and MODAL_TOKEN_SECRET set to any non-empty value."
        ),
    )
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1; 0 picks a free port (default: 0)")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level on stderr"
    )
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port} is invalid: use 0 to 65535")

    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    try:
        sock = _listening_socket(args.port)
    except OSError as exc:
        message = f"error: cannot listen on {HOST}:{args.port}: {exc}. Pick another --port, or 0 for a free one."
        print(message, file=sys.stderr)
        return 1
    asyncio.run(_serve_until_signal(sock))
    return 0


if __name__ == "__main__":
    sys.exit(main())
