"""Where alerts go besides NATS: a JSON-lines file and, optionally, a webhook.

A sink's `deliver` never blocks the consumer and never raises: the file sink
appends one line (local disk, flushed, not fsynced); the webhook sink puts the
alert in a bounded queue that a worker posts from, retrying with the mesh's
retry policy (`common.retry`), and drops (and counts) what does not fit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from common.logging import get_logger
from common.retry import retry_policy
from services.alerts.model import Alert

__all__ = [
    "DEFAULT_FILE_BACKUPS",
    "DEFAULT_FILE_MAX_BYTES",
    "AlertSink",
    "JsonlFileSink",
    "WebhookError",
    "WebhookSink",
    "WebhookStats",
    "webhook_retryable",
]

_log = get_logger(__name__)

DEFAULT_FILE_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_FILE_BACKUPS = 3


class AlertSink(Protocol):
    """A destination of published alerts (the whole of the surface)."""

    def deliver(self, alert: Alert) -> None:
        """Hand over one alert; returns at once, never raises."""

    async def close(self) -> None:
        """Deliver what is pending (bounded in time) and release resources."""


class JsonlFileSink:
    """Appends each alert as one JSON line to `path`, flushed at once.

    When the file would grow past `max_bytes` it is rotated first: `path` becomes
    `path.1`, `path.1` becomes `path.2`, and so on, keeping `backups` old files.
    A write that fails (disk full, permissions) is logged and counted, not raised.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = DEFAULT_FILE_MAX_BYTES,
        backups: int = DEFAULT_FILE_BACKUPS,
    ) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, not {max_bytes}")
        if backups < 0:
            raise ValueError(f"backups must be >= 0, not {backups}")
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.written = 0
        self.failures = 0
        self._file: IO[bytes] | None = None
        self._size = 0

    def deliver(self, alert: Alert) -> None:
        line = alert.encode() + b"\n"
        try:
            file = self._open()
            if self._size and self._size + len(line) > self.max_bytes:
                self._rotate()
                file = self._open()
            file.write(line)
            file.flush()
            self._size += len(line)
            self.written += 1
        except OSError as err:
            self.failures += 1
            _log.warning("alert file write failed", path=str(self.path), error=str(err))
            self._close_file()

    async def close(self) -> None:
        self._close_file()

    def _open(self) -> IO[bytes]:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("ab")
            self._size = self._file.tell()
        return self._file

    def _close_file(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(OSError):
                file.close()

    def _rotate(self) -> None:
        self._close_file()
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
            return
        for index in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{index + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))


class WebhookError(Exception):
    """The webhook answered with an HTTP error status."""

    def __init__(self, status: int, body: str = "") -> None:
        self.status = status
        super().__init__(f"webhook answered HTTP {status}{': ' + body if body else ''}")


def webhook_retryable(exc: BaseException) -> bool:
    """Worth another attempt: server errors, 408 and 429, and network trouble."""
    if isinstance(exc, WebhookError):
        return exc.status >= 500 or exc.status in (408, 429)
    return isinstance(exc, OSError | TimeoutError)


@dataclass(frozen=True)
class WebhookStats:
    sent: int
    failed: int  # given up after the retries
    dropped: int  # the queue was full
    queued: int
    last_error: str | None


class WebhookSink:
    """POSTs each alert's JSON to `url` from a worker task, retrying failures.

    Up to `queue_size` alerts wait; more are dropped and counted. Each POST has
    `timeout_s`; a failure that `webhook_retryable` accepts is retried (full-jitter
    backoff from `retry_initial_s`, at most `attempts` attempts and `retry_total_s`).
    The POST runs in a thread (stdlib `urllib`), so the event loop never waits on
    the network. `on_failure(alert, error)` is told about every alert given up on.
    """

    def __init__(
        self,
        url: str,
        *,
        queue_size: int = 1_000,
        timeout_s: float = 5.0,
        attempts: int = 5,
        retry_initial_s: float = 0.5,
        retry_max_delay_s: float = 5.0,
        retry_total_s: float = 30.0,
        on_failure: Callable[[Alert, BaseException], None] | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"webhook url {url!r} must start with http:// or https://")
        self.url = url
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.retry_initial_s = retry_initial_s
        self.retry_max_delay_s = retry_max_delay_s
        self.retry_total_s = retry_total_s
        self._on_failure = on_failure
        self._queue: asyncio.Queue[Alert] = asyncio.Queue(maxsize=queue_size)
        self._worker: asyncio.Task[None] | None = None
        self._sent = 0
        self._failed = 0
        self._dropped = 0
        self._last_error: str | None = None

    @property
    def stats(self) -> WebhookStats:
        return WebhookStats(
            sent=self._sent,
            failed=self._failed,
            dropped=self._dropped,
            queued=self._queue.qsize(),
            last_error=self._last_error,
        )

    def start(self) -> None:
        """Start the worker (on the running event loop)."""
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(
                self._work(), name="alerts-webhook"
            )

    def deliver(self, alert: Alert) -> None:
        try:
            self._queue.put_nowait(alert)
        except asyncio.QueueFull:
            self._dropped += 1
            _log.warning("webhook queue full; alert dropped", alert=alert.id)

    async def close(self, timeout_s: float = 5.0) -> None:
        """Post what is queued, for at most `timeout_s`, then stop the worker."""
        worker, self._worker = self._worker, None
        if worker is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._queue.join()
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker

    async def _work(self) -> None:
        while True:
            alert = await self._queue.get()
            try:
                await self._post_with_retries(alert)
            finally:
                self._queue.task_done()

    async def _post_with_retries(self, alert: Alert) -> None:
        body = alert.encode()
        try:
            async for attempt in retry_policy(
                "alert webhook",
                attempts=self.attempts,
                initial_s=self.retry_initial_s,
                max_delay_s=self.retry_max_delay_s,
                max_total_s=self.retry_total_s,
                retry_if=webhook_retryable,
            ):
                with attempt:
                    await asyncio.to_thread(self._post, body)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            self._failed += 1
            self._last_error = str(err)
            _log.warning(
                "alert webhook failed; alert not delivered", alert=alert.id, error=str(err)
            )
            if self._on_failure is not None:
                with contextlib.suppress(Exception):
                    self._on_failure(alert, err)
            return
        self._sent += 1
        self._last_error = None

    def _post(self, body: bytes) -> None:
        request = urllib.request.Request(
            self.url,
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", "User-Agent": "graftmesh-alerts"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                response.read()
        except urllib.error.HTTPError as err:
            text = ""
            with contextlib.suppress(Exception):
                text = err.read(200).decode("utf-8", "replace")
            raise WebhookError(err.code, text) from None
        except urllib.error.URLError as err:
            reason = err.reason
            if isinstance(reason, OSError):
                raise reason from None
            raise ConnectionError(f"webhook {self.url} unreachable: {reason}") from None
