"""`graftmesh alerts`: the recent alerts of the `ALERTS` stream, and new ones as they come.

`follow_alerts` is the whole command; the `graftmesh` CLI maps its options onto it
and exits with what it returns.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import threading
from dataclasses import dataclass
from datetime import UTC, datetime

import nats
import nats.errors
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from rich.console import Console
from rich.table import Table
from rich.text import Text

from common.bus import ALERTS_STREAM, SEVERITIES, ensure_streams
from common.infra import redact_url
from services.alerts.model import Alert, InvalidEventError, parse_alert, severity_at_least

__all__ = ["EXIT_INFRA", "EXIT_OK", "EXIT_USAGE", "follow_alerts", "format_alert"]

EXIT_OK, EXIT_USAGE, EXIT_INFRA = 0, 2, 4

# How far back the history looks for the last alerts that pass the filters.
_SCAN_MESSAGES = 10_000
_HISTORY_WAIT_S = 5.0
_POLL_S = 0.2

_SEVERITY_STYLES = {
    "debug": "dim",
    "info": "cyan",
    "warning": "yellow",
    "error": "red",
    "critical": "bold white on red",
}


def _utc_time(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%d %H:%M:%S")


def format_alert(alert: Alert) -> Text:
    """One alert as one line: time (UTC), severity, kind, agent, count, message."""
    line = Text()
    line.append(f"{_utc_time(alert.timestamp)}  ")
    line.append(f"{alert.severity.upper():<8}", style=_SEVERITY_STYLES.get(alert.severity, ""))
    line.append(f"  {alert.kind.value:<15}  {alert.agent:<16}  x{alert.count:<5}  ")
    line.append(alert.message)
    return line


def _table(alerts: list[Alert]) -> Table:
    table = Table(box=None, header_style="bold", title=f"last {len(alerts)} alert(s)")
    for column in ("TIME (UTC)", "SEVERITY", "KIND", "AGENT", "COUNT", "MESSAGE"):
        table.add_column(column)
    for alert in alerts:
        table.add_row(
            _utc_time(alert.timestamp),
            Text(alert.severity, style=_SEVERITY_STYLES.get(alert.severity, "")),
            alert.kind.value,
            alert.agent,
            str(alert.count),
            Text(alert.message),
        )
    return table


def follow_alerts(
    nats_url: str,
    follow: bool,
    severity: str | None,
    out: Console,
    *,
    last: int = 20,
    agent: str | None = None,
    stop: threading.Event | None = None,
    connect_timeout_s: float = 5.0,
    as_json: bool = False,
) -> int:
    """Print the last `last` alerts at `severity` or worse (all when None), and with
    `follow` every new one as it comes, until Ctrl-C (or `stop` is set).

    `agent` keeps one agent's alerts; `as_json` prints each alert as one JSON line
    (the `ALERTS` payload) instead of a table. The history is the last `last` matching alerts
    among the stream's last 10,000. Returns the exit code: 0, 2 for an unknown
    severity or a bad `last`, 4 when NATS cannot be reached.
    """
    if severity is not None and severity.lower() not in SEVERITIES:
        out.print(f"unknown severity {severity!r}; use one of {', '.join(SEVERITIES)}")
        return EXIT_USAGE
    if last < 0:
        out.print(f"--last must be >= 0, not {last}")
        return EXIT_USAGE
    request = _Request(
        nats_url=nats_url,
        follow=follow,
        minimum=severity.lower() if severity is not None else "debug",
        last=last,
        agent=agent,
        stop=stop,
        connect_timeout_s=connect_timeout_s,
        as_json=as_json,
    )
    try:
        return asyncio.run(_follow(request, out))
    except KeyboardInterrupt:
        return EXIT_OK


@dataclass(frozen=True)
class _Request:
    nats_url: str
    follow: bool
    minimum: str
    last: int
    agent: str | None
    stop: threading.Event | None
    connect_timeout_s: float
    as_json: bool = False


async def _follow(request: _Request, out: Console) -> int:
    nats_url, follow, minimum, last = (
        request.nats_url,
        request.follow,
        request.minimum,
        request.last,
    )
    agent, stop = request.agent, request.stop
    try:
        nc: Client = await nats.connect(
            nats_url,
            name="graftmesh-alerts-cli",
            connect_timeout=request.connect_timeout_s,
            max_reconnect_attempts=1,
            reconnect_time_wait=0,
            allow_reconnect=follow,
            error_cb=_ignore_error,  # a refused connect is reported once, below
        )
    except Exception as err:
        out.print(f"NATS unavailable at {redact_url(nats_url)}: {err or type(err).__name__}")
        return EXIT_INFRA
    try:
        nc.options["max_reconnect_attempts"] = -1
        nc.options["reconnect_time_wait"] = 0.5
        js = nc.jetstream()
        try:
            await ensure_streams(js)
            info = await js.stream_info(ALERTS_STREAM)
        except Exception as err:
            out.print(f"NATS JetStream unavailable at {redact_url(nats_url)}: {err!r}")
            return EXIT_INFRA
        start = max(info.state.first_seq, info.state.last_seq - _SCAN_MESSAGES + 1, 1)
        sub = await js.subscribe(
            f"alerts.*.{agent}" if agent else "alerts.>",
            stream=ALERTS_STREAM,
            ordered_consumer=True,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=start,
                ack_policy=AckPolicy.NONE,
            ),
        )
        history: collections.deque[Alert] = collections.deque(maxlen=last)
        consumer = await sub.consumer_info()
        delivered = consumer.delivered.consumer_seq if consumer.delivered is not None else 0
        more = bool(consumer.num_pending) or delivered > 0
        while more:
            try:
                msg = await sub.next_msg(timeout=_HISTORY_WAIT_S)
            except nats.errors.TimeoutError:
                break
            more = msg.metadata.num_pending > 0
            alert = _matching(msg.data, minimum)
            if alert is not None and last:
                history.append(alert)
        if request.as_json:
            for alert in history:
                _print_json(out, alert)
        elif history:
            out.print(_table(list(history)))
        elif last:
            out.print("no alerts" + (" yet" if follow else ""))
        while follow and (stop is None or not stop.is_set()):
            try:
                msg = await sub.next_msg(timeout=_POLL_S)
            except nats.errors.TimeoutError:
                continue
            alert = _matching(msg.data, minimum)
            if alert is not None and request.as_json:
                _print_json(out, alert)
            elif alert is not None:
                out.print(format_alert(alert))
        return EXIT_OK
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                await nc.close()


def _print_json(out: Console, alert: Alert) -> None:
    out.print(json.dumps(alert.to_json()), markup=False, highlight=False, soft_wrap=True)


async def _ignore_error(err: Exception) -> None:
    return None


def _matching(data: bytes, minimum: str) -> Alert | None:
    try:
        alert = parse_alert(data)
    except InvalidEventError:
        return None
    return alert if severity_at_least(alert.severity, minimum) else None
