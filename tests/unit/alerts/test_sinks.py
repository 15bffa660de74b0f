"""The file sink (append, rotate) and the webhook sink against a real local HTTP server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.alerts.model import Alert, AlertKind
from services.alerts.sinks import JsonlFileSink, WebhookError, WebhookSink, webhook_retryable
from tests.unit.alerts.factories import T0
from tests.unit.alerts.webhook_server import WebhookServer
from tests.wait import eventually


def _alert(n: int, message: str = "m") -> Alert:
    return Alert(
        id=f"{n:032x}",
        timestamp=T0,
        kind=AlertKind.ERROR,
        severity="error",
        agent="trainer",
        fingerprint="f" * 32,
        count=1,
        first_seen=T0,
        last_seen=T0,
        message=message,
    )


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


async def test_file_sink_appends_one_json_line_per_alert(tmp_path: Path) -> None:
    path = tmp_path / "alerts" / "alerts.jsonl"
    sink = JsonlFileSink(path)
    sink.deliver(_alert(1))
    sink.deliver(_alert(2))
    assert _ids(path) == [f"{1:032x}", f"{2:032x}"]  # flushed: readable before close
    await sink.close()
    again = JsonlFileSink(path)
    again.deliver(_alert(3))
    await again.close()
    assert len(_ids(path)) == 3


async def test_file_sink_rotates_at_its_size_bound_keeping_backups(tmp_path: Path) -> None:
    path = tmp_path / "alerts.jsonl"
    line_size = len(_alert(0).encode()) + 1
    sink = JsonlFileSink(path, max_bytes=line_size * 2, backups=2)
    for n in range(7):
        sink.deliver(_alert(n))
    await sink.close()
    assert _ids(path) == [f"{6:032x}"]
    assert _ids(tmp_path / "alerts.jsonl.1") == [f"{4:032x}", f"{5:032x}"]
    assert _ids(tmp_path / "alerts.jsonl.2") == [f"{2:032x}", f"{3:032x}"]
    assert not (tmp_path / "alerts.jsonl.3").exists()


async def test_file_sink_failure_is_counted_not_raised(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    sink = JsonlFileSink(blocker / "alerts.jsonl")  # its parent is a file
    sink.deliver(_alert(1))
    assert sink.failures == 1 and sink.written == 0


@pytest.fixture
def hooks() -> Iterator[list[WebhookServer]]:
    servers: list[WebhookServer] = []
    yield servers
    for server in servers:
        server.close()


async def test_webhook_posts_each_alert_and_retries_after_a_server_error(
    hooks: list[WebhookServer],
) -> None:
    hook = WebhookServer([500])
    hooks.append(hook)
    sink = WebhookSink(hook.url, retry_initial_s=0.01, retry_max_delay_s=0.05)
    sink.start()
    sink.deliver(_alert(1))
    sink.deliver(_alert(2))
    await eventually(lambda: sink.stats.sent == 2, 10, "two alerts posted")
    await sink.close()
    assert hook.answered == [500, 200, 200]
    assert [b["id"] for b in hook.bodies] == [f"{1:032x}", f"{1:032x}", f"{2:032x}"]
    assert sink.stats.failed == 0 and sink.stats.last_error is None


async def test_webhook_gives_up_on_a_client_error_at_once_and_says_so(
    hooks: list[WebhookServer],
) -> None:
    hook = WebhookServer([400])
    hooks.append(hook)
    failures: list[tuple[str, BaseException]] = []
    sink = WebhookSink(
        hook.url, retry_initial_s=0.01, on_failure=lambda a, e: failures.append((a.id, e))
    )
    sink.start()
    sink.deliver(_alert(1))
    await eventually(lambda: sink.stats.failed == 1, 10, "alert given up")
    await sink.close()
    assert hook.answered == [400]
    assert failures and isinstance(failures[0][1], WebhookError) and failures[0][1].status == 400


async def test_webhook_retries_are_bounded_when_the_hook_is_unreachable() -> None:
    sink = WebhookSink(
        "http://127.0.0.1:9/unreachable", attempts=3, retry_initial_s=0.01, retry_max_delay_s=0.02
    )
    sink.start()
    sink.deliver(_alert(1))
    await eventually(lambda: sink.stats.failed == 1, 10, "alert given up")
    await sink.close()
    assert sink.stats.last_error is not None


async def test_webhook_queue_is_bounded_and_never_blocks_the_caller() -> None:
    sink = WebhookSink("http://127.0.0.1:9/never", queue_size=2)  # not started: nothing drains
    for n in range(5):
        sink.deliver(_alert(n))
    assert sink.stats.queued == 2 and sink.stats.dropped == 3
    await sink.close()


def test_which_webhook_failures_are_retried() -> None:
    assert webhook_retryable(WebhookError(503)) and webhook_retryable(WebhookError(429))
    assert not webhook_retryable(WebhookError(404))
    assert webhook_retryable(ConnectionRefusedError()) and webhook_retryable(TimeoutError())
    assert not webhook_retryable(ValueError())


def test_webhook_url_must_be_http() -> None:
    with pytest.raises(ValueError, match="http"):
        WebhookSink("ftp://example")
