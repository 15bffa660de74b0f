"""The write queue of an upload: in order, bounded, failures surfaced, nothing left running."""

from __future__ import annotations

import asyncio
import threading

import pytest

from services.registry.registry import _WriteQueue

WAIT_S = 10.0


async def test_writes_run_in_order_and_drain_waits_for_all_of_them() -> None:
    queue = _WriteQueue(max_bytes=1 << 20)
    written: list[bytes] = []
    for i in range(50):
        await queue.put(written.append, bytes([i]) * 100)
    await queue.drain()
    assert written == [bytes([i]) * 100 for i in range(50)]
    await queue.close()


async def test_put_waits_while_more_than_the_limit_is_queued() -> None:
    queue = _WriteQueue(max_bytes=10)
    release = threading.Event()
    written: list[bytes | memoryview] = []

    def slow_write(data: bytes | memoryview) -> None:
        assert release.wait(WAIT_S)
        written.append(data)

    await queue.put(slow_write, b"12345")  # within the limit: returns at once
    blocked = asyncio.create_task(queue.put(slow_write, b"6789012345"))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not blocked.done() and written == []  # the disk holds the upload back
    release.set()
    await asyncio.wait_for(blocked, WAIT_S)
    await asyncio.wait_for(queue.drain(), WAIT_S)
    assert written == [b"12345", b"6789012345"]
    await queue.close()


async def test_a_failed_write_is_raised_by_drain_and_not_by_close() -> None:
    queue = _WriteQueue(max_bytes=1 << 20)
    written: list[bytes | memoryview] = []

    def failing(data: bytes | memoryview) -> None:
        raise OSError("disk gone")

    await queue.put(written.append, b"a")
    await queue.put(failing, b"b")
    with pytest.raises(OSError, match="disk gone"):
        await queue.drain()
    await queue.close()  # the upload is dropped anyway: closing does not raise again
    assert written == [b"a"]


async def test_close_waits_for_a_write_still_running() -> None:
    queue = _WriteQueue(max_bytes=1 << 20)
    started, release = threading.Event(), threading.Event()
    done: list[bool] = []

    def long_write(data: bytes | memoryview) -> None:
        started.set()
        assert release.wait(WAIT_S)
        done.append(True)

    await queue.put(long_write, b"x")
    assert await asyncio.to_thread(started.wait, WAIT_S)
    closing = asyncio.create_task(queue.close())
    await asyncio.sleep(0)
    assert not closing.done()
    release.set()
    await asyncio.wait_for(closing, WAIT_S)
    assert done == [True]


async def test_closing_an_unused_queue_is_immediate() -> None:
    await _WriteQueue(max_bytes=1).close()
