"""Tests of the local Modal server, driven through the real modal client.

``modal.Client.from_env()`` caches one client per process, bound to the
server URL it was created with, so the tests share the session-wide
in-thread server of the ``modal_server`` fixture in conftest.py. Each test
works on objects with names of its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import queue
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import grpclib.client
import modal
import modal.exception
import pytest
from grpclib import GRPCError, Status
from modal_proto import api_grpc, api_pb2

from qworker.testing.modal_server import (
    LocalModalServer,
    ModalServicer,
    client_env,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def fresh_queue(modal_server: LocalModalServer) -> modal.Queue:
    return modal.Queue.from_name(unique_name("queue"), create_if_missing=True)


@pytest.fixture
def fresh_dict(modal_server: LocalModalServer) -> modal.Dict:
    return modal.Dict.from_name(unique_name("dict"), create_if_missing=True)


def raw_call(server: LocalModalServer, method: str, request: object) -> object:
    """Call one RPC with a plain grpclib stub, bypassing the modal client's own checks and retries."""

    async def call() -> object:
        channel = grpclib.client.Channel("127.0.0.1", server.port)
        try:
            stub = api_grpc.ModalClientStub(channel)
            return await getattr(stub, method)(request)
        finally:
            channel.close()

    return asyncio.run(call())


# --- Objects and names ---


def test_from_name_same_name_same_id(modal_server: LocalModalServer) -> None:
    name = unique_name("named")
    first = modal.Queue.from_name(name, create_if_missing=True)
    second = modal.Queue.from_name(name)
    first.hydrate()
    second.hydrate()
    assert first.object_id == second.object_id
    assert first.object_id.startswith("qu-")

    d = modal.Dict.from_name(name, create_if_missing=True)
    d.hydrate()
    assert d.object_id.startswith("di-")
    assert modal.Dict.from_name(name).hydrate().object_id == d.object_id


def test_from_name_missing_raises_not_found(modal_server: LocalModalServer) -> None:
    with pytest.raises(modal.exception.NotFoundError, match="not found"):
        modal.Queue.from_name(unique_name("missing")).hydrate()
    with pytest.raises(modal.exception.NotFoundError, match="not found"):
        modal.Dict.from_name(unique_name("missing")).hydrate()


def test_objects_create_rejects_existing_name(modal_server: LocalModalServer) -> None:
    name = unique_name("created")
    modal.Queue.objects.create(name)
    with pytest.raises(modal.exception.AlreadyExistsError):
        modal.Queue.objects.create(name)
    modal.Queue.objects.create(name, allow_existing=True)


def test_objects_delete_removes_name(modal_server: LocalModalServer) -> None:
    name = unique_name("deleted")
    modal.Dict.from_name(name, create_if_missing=True).put("k", 1)
    modal.Dict.objects.delete(name)
    with pytest.raises(modal.exception.NotFoundError):
        modal.Dict.from_name(name).hydrate()


def test_ephemeral_queue_round_trip(modal_server: LocalModalServer) -> None:
    with modal.Queue.ephemeral() as q:
        q.put("hello")
        assert q.get(timeout=1) == "hello"
        assert q.object_id.startswith("qu-")


# --- Queue ---


def test_queue_put_get_fifo(fresh_queue: modal.Queue) -> None:
    fresh_queue.put("a")
    fresh_queue.put_many(["b", "c", "d"])
    assert fresh_queue.get() == "a"
    assert fresh_queue.get_many(2) == ["b", "c"]
    assert fresh_queue.get_many(10) == ["d"]


def test_queue_partitions_are_independent(fresh_queue: modal.Queue) -> None:
    fresh_queue.put_many([1, 2], partition="left")
    fresh_queue.put_many([3, 4], partition="right")
    fresh_queue.put(0)

    assert fresh_queue.get(partition="right") == 3
    assert fresh_queue.get_many(5, partition="left") == [1, 2]
    assert fresh_queue.get(block=False, partition="left") is None
    assert fresh_queue.get() == 0
    assert fresh_queue.get_many(5, partition="right") == [4]


def test_queue_nonblocking_get_on_empty(fresh_queue: modal.Queue) -> None:
    assert fresh_queue.get(block=False) is None
    assert fresh_queue.get_many(3, block=False) == []


def test_blocking_get_times_out(modal_server: LocalModalServer, fresh_queue: modal.Queue) -> None:
    fresh_queue.hydrate()
    gets_before = modal_server.rpc_counts().get("QueueGet", 0)

    started = time.monotonic()
    with pytest.raises(queue.Empty):
        fresh_queue.get(timeout=0.5)
    elapsed = time.monotonic() - started

    assert elapsed >= 0.5
    assert elapsed < 1.5
    # The server keeps the request open for the whole timeout, so the client sends it once.
    assert modal_server.rpc_counts()["QueueGet"] - gets_before == 1


def test_blocking_get_returns_early_on_put(fresh_queue: modal.Queue) -> None:
    fresh_queue.hydrate()
    putter = threading.Timer(0.3, lambda: fresh_queue.put("late", partition="p"))
    putter.start()
    try:
        started = time.monotonic()
        value = fresh_queue.get(timeout=10, partition="p")
        elapsed = time.monotonic() - started
    finally:
        putter.join()

    assert value == "late"
    assert elapsed < 3


def test_queue_len_per_partition_and_total(fresh_queue: modal.Queue) -> None:
    fresh_queue.put_many([1, 2, 3])
    fresh_queue.put_many([4, 5], partition="p")

    assert fresh_queue.len() == 3
    assert fresh_queue.len(partition="p") == 2
    assert fresh_queue.len(partition="empty") == 0
    assert fresh_queue.len(total=True) == 5

    fresh_queue.get(partition="p")
    assert fresh_queue.len(total=True) == 4


def test_iterate_does_not_remove(fresh_queue: modal.Queue) -> None:
    fresh_queue.put_many(["x", "y", "z"], partition="p")

    assert list(fresh_queue.iterate(partition="p")) == ["x", "y", "z"]
    assert fresh_queue.len(partition="p") == 3
    assert list(fresh_queue.iterate(partition="p")) == ["x", "y", "z"]
    assert list(fresh_queue.iterate()) == []


def test_iterate_pages_through_many_items(fresh_queue: modal.Queue) -> None:
    values = list(range(250))
    fresh_queue.put_many(values)

    assert list(fresh_queue.iterate()) == values


def test_queue_clear_partition_and_all(fresh_queue: modal.Queue) -> None:
    fresh_queue.put_many([1, 2])
    fresh_queue.put_many([3], partition="a")
    fresh_queue.put_many([4], partition="b")

    fresh_queue.clear(partition="a")
    assert fresh_queue.len(partition="a") == 0
    assert fresh_queue.len(total=True) == 3

    fresh_queue.clear()
    assert fresh_queue.len() == 0
    assert fresh_queue.len(partition="b") == 1

    fresh_queue.clear(all=True)
    assert fresh_queue.len(total=True) == 0


def test_full_partition_put_raises_full(fresh_queue: modal.Queue) -> None:
    fresh_queue.put_many(list(range(5000)), partition="p")
    assert fresh_queue.len(partition="p") == 5000

    started = time.monotonic()
    with pytest.raises(queue.Full, match="limit of 5000 items"):
        fresh_queue.put_many([1, 2], partition="p", timeout=0.5)
    elapsed = time.monotonic() - started
    assert elapsed < 1.5

    with pytest.raises(queue.Full):
        fresh_queue.put(1, partition="p", block=False)

    # The rejected puts added nothing, and other partitions still accept puts.
    assert fresh_queue.len(partition="p") == 5000
    fresh_queue.put(1, partition="other")


def test_full_partition_put_gives_up_before_timeout(fresh_queue: modal.Queue) -> None:
    # modal 1.6.4 stops retrying once its next backoff plus a 2 s attempt
    # floor would pass the deadline, so queue.Full comes before the timeout.
    fresh_queue.put_many(list(range(5000)))

    started = time.monotonic()
    with pytest.raises(queue.Full):
        fresh_queue.put("extra", timeout=3)
    elapsed = time.monotonic() - started

    assert elapsed < 3


def test_blocked_put_succeeds_after_get(fresh_queue: modal.Queue) -> None:
    fresh_queue.put_many(list(range(5000)))
    getter = threading.Timer(0.3, fresh_queue.get)
    getter.start()
    try:
        fresh_queue.put("extra", timeout=10)
    finally:
        getter.join()

    assert fresh_queue.len() == 5000


def test_item_over_1_mib_rejected(fresh_queue: modal.Queue) -> None:
    with pytest.raises(modal.exception.InvalidError, match=r"over the limit of 1048576 bytes"):
        fresh_queue.put(b"x" * (1024 * 1024))
    assert fresh_queue.len() == 0

    # The limit applies to the serialized item, which adds a few bytes of pickle framing.
    fresh_queue.put(b"x" * (1024 * 1024 - 64))
    assert fresh_queue.len() == 1


def test_partition_key_over_64_bytes_rejected(modal_server: LocalModalServer, fresh_queue: modal.Queue) -> None:
    # The client checks the key length itself, so the server's check is
    # reached only by a raw request.
    fresh_queue.hydrate()
    request = api_pb2.QueuePutRequest(
        queue_id=fresh_queue.object_id, values=[b"v"], partition_key=b"k" * 65, partition_ttl_seconds=60
    )
    with pytest.raises(GRPCError) as excinfo:
        raw_call(modal_server, "QueuePut", request)

    assert excinfo.value.status == Status.INVALID_ARGUMENT
    assert "65 bytes" in str(excinfo.value.message)


def test_partition_ttl_expires_after_last_put(fresh_queue: modal.Queue) -> None:
    fresh_queue.put("first", partition="short", partition_ttl=1)
    time.sleep(0.6)
    fresh_queue.put("second", partition="short", partition_ttl=1)
    time.sleep(0.6)

    # 1.2 s after the first put but 0.6 s after the last one.
    assert fresh_queue.len(partition="short") == 2

    time.sleep(0.6)
    assert fresh_queue.len(partition="short") == 0
    assert fresh_queue.get(block=False, partition="short") is None


def test_partition_ttl_uses_injected_clock() -> None:
    now = [1000.0]
    with LocalModalServer(servicer=ModalServicer(clock=lambda: now[0])) as server:
        create = api_pb2.QueueGetOrCreateRequest(
            deployment_name="q", object_creation_type=api_pb2.OBJECT_CREATION_TYPE_CREATE_IF_MISSING
        )
        queue_id = raw_call(server, "QueueGetOrCreate", create).queue_id
        put = api_pb2.QueuePutRequest(queue_id=queue_id, values=[b"v"], partition_key=b"p", partition_ttl_seconds=60)
        raw_call(server, "QueuePut", put)
        length = api_pb2.QueueLenRequest(queue_id=queue_id, partition_key=b"p")

        now[0] += 59.9
        assert raw_call(server, "QueueLen", length).len == 1
        now[0] += 0.1
        assert raw_call(server, "QueueLen", length).len == 0


def test_partition_count_limit(modal_server: LocalModalServer, fresh_queue: modal.Queue) -> None:
    servicer = modal_server.servicer
    default_limits = servicer.limits
    servicer.limits = dataclasses.replace(default_limits, max_partitions=2)
    try:
        fresh_queue.put(1, partition="a")
        fresh_queue.put(2, partition="b")
        with pytest.raises(queue.Full, match="partitions"):
            fresh_queue.put(3, partition="c", block=False)
        fresh_queue.put(4, partition="a")

        # An emptied partition stops counting.
        fresh_queue.get_many(5, partition="b")
        fresh_queue.put(5, partition="c")
    finally:
        servicer.limits = default_limits

    assert fresh_queue.len(total=True) == 3


# --- Dict ---


def test_dict_put_get_skip_if_exists(fresh_dict: modal.Dict) -> None:
    assert fresh_dict.put("k", 1, skip_if_exists=True) is True
    assert fresh_dict.put("k", 2, skip_if_exists=True) is False
    assert fresh_dict.get("k") == 1

    assert fresh_dict.put("k", 3) is True
    assert fresh_dict.get("k") == 3
    assert fresh_dict.get("absent") is None
    assert fresh_dict.get("absent", "default") == "default"
    with pytest.raises(KeyError):
        fresh_dict["absent"]


def test_dict_pop_and_contains(fresh_dict: modal.Dict) -> None:
    fresh_dict["k"] = "v"

    assert fresh_dict.contains("k")
    assert "k" in fresh_dict
    assert fresh_dict.pop("k") == "v"
    assert not fresh_dict.contains("k")
    assert fresh_dict.pop("k", None) is None
    with pytest.raises(KeyError):
        fresh_dict.pop("k")


def test_dict_keys_compare_by_serialized_bytes(fresh_dict: modal.Dict) -> None:
    fresh_dict.update({1: "int", "1": "str", (1, "a"): "tuple"})

    assert fresh_dict.get(1) == "int"
    assert fresh_dict.get("1") == "str"
    assert fresh_dict.get((1, "a")) == "tuple"
    assert fresh_dict.len() == 3


def test_dict_update_and_contents(fresh_dict: modal.Dict) -> None:
    fresh_dict.update({"a": 1, "b": 2}, c=3)
    fresh_dict.update({"a": 10})

    assert fresh_dict.len() == 3
    assert sorted(fresh_dict.keys()) == ["a", "b", "c"]
    assert sorted(fresh_dict.values()) == [2, 3, 10]
    assert sorted(fresh_dict.items()) == [("a", 10), ("b", 2), ("c", 3)]


def test_dict_clear(fresh_dict: modal.Dict) -> None:
    fresh_dict.update({"a": 1, "b": 2})
    fresh_dict.clear()

    assert fresh_dict.len() == 0
    assert list(fresh_dict.items()) == []


# --- Async API ---


@pytest.mark.anyio
async def test_queue_and_dict_aio(modal_server: LocalModalServer) -> None:
    q = modal.Queue.from_name(unique_name("aio"), create_if_missing=True)
    await q.hydrate.aio()
    await q.put_many.aio([1, 2, 3], partition="p")
    assert await q.len.aio(partition="p") == 3
    assert [value async for value in q.iterate.aio(partition="p")] == [1, 2, 3]
    assert await q.get.aio(partition="p") == 1
    assert await q.get_many.aio(5, partition="p") == [2, 3]
    with pytest.raises(queue.Empty):
        await q.get.aio(timeout=0.2, partition="p")

    d = modal.Dict.from_name(unique_name("aio"), create_if_missing=True)
    assert await d.put.aio("k", "v", skip_if_exists=True) is True
    assert await d.put.aio("k", "w", skip_if_exists=True) is False
    await d.update.aio({"x": 1})
    assert sorted([item async for item in d.items.aio()]) == [("k", "v"), ("x", 1)]
    assert await d.pop.aio("x") == 1
    assert await d.len.aio() == 1


# --- Server plumbing ---


def test_rpc_counts_count_methods(modal_server: LocalModalServer) -> None:
    q = modal.Queue.from_name(unique_name("counted"), create_if_missing=True)
    modal_server.reset_counts()

    q.put(1)
    q.put_many([2, 3])
    q.len()
    q.get_many(3)

    assert modal_server.rpc_counts() == {"QueueGetOrCreate": 1, "QueuePut": 2, "QueueLen": 1, "QueueGet": 1}
    modal_server.reset_counts()
    assert modal_server.rpc_counts() == {}


def test_unimplemented_rpc_returns_unimplemented(modal_server: LocalModalServer) -> None:
    with pytest.raises(GRPCError) as excinfo:
        raw_call(modal_server, "AppCreate", api_pb2.AppCreateRequest())

    assert excinfo.value.status == Status.UNIMPLEMENTED
    assert modal_server.rpc_counts()["AppCreate"] >= 1


def test_rpc_round_trip_is_fast(modal_server: LocalModalServer, fresh_queue: modal.Queue) -> None:
    # Without TCP_NODELAY on the accepted sockets these 20 calls took about
    # 0.9 s on Linux (44 ms each), because each reply waited for a delayed ACK.
    fresh_queue.hydrate()
    started = time.monotonic()
    for _ in range(20):
        fresh_queue.len()
    elapsed = time.monotonic() - started

    assert elapsed < 0.5


def test_client_hello(modal_server: LocalModalServer) -> None:
    modal.Client.from_env().hello()


def test_server_stop_ends_blocked_get() -> None:
    server = LocalModalServer(servicer=ModalServicer()).start()
    errors: list[BaseException] = []

    def blocked_get(queue_id: str) -> None:
        try:
            raw_call(server, "QueueGet", api_pb2.QueueGetRequest(queue_id=queue_id, timeout=30))
        except BaseException as exc:
            errors.append(exc)

    try:
        request = api_pb2.QueueGetOrCreateRequest(
            deployment_name="q", object_creation_type=api_pb2.OBJECT_CREATION_TYPE_CREATE_IF_MISSING
        )
        queue_id = raw_call(server, "QueueGetOrCreate", request).queue_id
        getter = threading.Thread(target=blocked_get, args=(queue_id,))
        getter.start()
        time.sleep(0.2)
    finally:
        started = time.monotonic()
        server.stop()
    getter.join(5)

    assert not getter.is_alive()
    assert time.monotonic() - started < 5
    assert len(errors) == 1


CLIENT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import modal
    from qworker.testing.modal_server import point_client_at

    role, url = sys.argv[1], sys.argv[2]
    if url != "-":
        point_client_at(url)
    q = modal.Queue.from_name("shared", create_if_missing=True)
    if role == "producer":
        q.put_many(list(range(100)), partition="jobs", timeout=10)
    else:
        received = []
        while len(received) < 100:
            received += q.get_many(100 - len(received), timeout=20, partition="jobs")
        modal.Dict.from_name("shared-results", create_if_missing=True).put("sum", sum(received))
        print(json.dumps(received))
    """
)


def test_two_processes_share_server(tmp_path: Path) -> None:
    script = tmp_path / "client.py"
    script.write_text(CLIENT_SCRIPT)
    server_cmd = [sys.executable, "-m", "qworker.testing.modal_server", "--port", "0", "--log-level", "WARNING"]
    base_env = {key: value for key, value in os.environ.items() if not key.startswith("MODAL_")}

    with subprocess.Popen(server_cmd, cwd=REPO_ROOT, env=base_env, stdout=subprocess.PIPE, text=True) as server:
        try:
            url = server.stdout.readline().strip()
            assert url.startswith("http://127.0.0.1:")

            # The consumer finds the server in its environment, the producer through point_client_at.
            consumer_cmd = [sys.executable, str(script), "consumer", "-"]
            consumer_env = {**base_env, **client_env(url)}
            with subprocess.Popen(
                consumer_cmd, cwd=REPO_ROOT, env=consumer_env, stdout=subprocess.PIPE, text=True
            ) as consumer:
                producer = subprocess.run(
                    [sys.executable, str(script), "producer", url], cwd=REPO_ROOT, env=base_env, timeout=30
                )
                consumer_out, _ = consumer.communicate(timeout=30)

            assert producer.returncode == 0
            assert consumer.returncode == 0
            assert sorted(json.loads(consumer_out)) == list(range(100))
        finally:
            server.terminate()
            server.wait(timeout=10)

    assert server.returncode == 0
