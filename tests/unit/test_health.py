"""The ZMQ health protocol: state, responder and client, over real sockets on loopback."""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from common.health import (
    MAX_REQUEST_BYTES,
    HealthBindError,
    HealthClient,
    HealthResponder,
    HealthResult,
    HealthState,
    HealthStatus,
    check_health,
    classify_reply,
)
from tests.ports import free_port

HOST = "127.0.0.1"
REPLY_KEYS = {"status", "service", "timestamp", "issues", "details"}


# --- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture
def context() -> Iterator[zmq.Context[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def state() -> HealthState:
    return HealthState("test-agent")


@pytest.fixture
def responder(state: HealthState) -> Iterator[HealthResponder]:
    served = HealthResponder(state, f"tcp://{HOST}:0")
    served.start()
    yield served
    served.stop()


@pytest.fixture
async def client() -> AsyncIterator[HealthClient]:
    checker = HealthClient()
    yield checker
    checker.close()


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    """Poll `condition` until it holds; fail naming `what` once `timeout_s` has passed."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.005)


def exchange(
    context: zmq.Context[Any], port: int, frames: list[bytes], timeout_s: float = 5.0
) -> dict[str, Any]:
    """Send `frames` as one message from a plain REQ socket and return the decoded reply."""
    sock = context.socket(zmq.REQ)
    sock.linger = 0
    sock.rcvtimeo = int(timeout_s * 1000)
    try:
        sock.connect(f"tcp://{HOST}:{port}")
        sock.send_multipart(frames)
        reply: dict[str, Any] = json.loads(sock.recv())
        return reply
    finally:
        sock.close()


def silent_socket(context: zmq.Context[Any]) -> tuple[zmq.Socket[Any], int]:
    """A bound REP socket that never reads, like an agent that hangs."""
    sock = context.socket(zmq.REP)
    sock.linger = 0
    return sock, sock.bind_to_random_port(f"tcp://{HOST}")


# --- normalisation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "status", "note"),
    [
        ({"status": "ok", "issues": []}, HealthStatus.HEALTHY, None),
        ({"status": "healthy"}, HealthStatus.HEALTHY, None),
        ({"status": "OK"}, HealthStatus.HEALTHY, None),
        ({"status": "degraded", "issues": ["disk 91% full"]}, HealthStatus.DEGRADED, None),
        ({"status": "degraded"}, HealthStatus.DEGRADED, "carries no issues"),
        ({"status": "degraded", "issues": []}, HealthStatus.DEGRADED, "carries no issues"),
        ({"status": "degraded", "issues": "disk"}, HealthStatus.DEGRADED, "carries no issues"),
        ({"status": "unhealthy", "issues": ["db down"]}, HealthStatus.UNHEALTHY, None),
        (
            {"status": "error", "error": "unknown action"},
            HealthStatus.UNREACHABLE,
            "unknown action",
        ),
        ({"status": "rebooting"}, HealthStatus.UNREACHABLE, "unknown status"),
        ({"service": "x"}, HealthStatus.UNREACHABLE, "no status"),
        ({"status": 1}, HealthStatus.UNREACHABLE, "no status"),
        (["healthy"], HealthStatus.UNREACHABLE, "expected a JSON object"),
        ("healthy", HealthStatus.UNREACHABLE, "expected a JSON object"),
        (None, HealthStatus.UNREACHABLE, "expected a JSON object"),
    ],
)
def test_reply_status_normalises_to_health_status(
    reply: object, status: HealthStatus, note: str | None
) -> None:
    got_status, got_note = classify_reply(reply)
    assert got_status is status
    if note is None:
        assert got_note is None
    else:
        assert got_note is not None and note in got_note


@pytest.mark.parametrize(
    ("status", "is_up", "is_healthy"),
    [
        (HealthStatus.HEALTHY, True, True),
        (HealthStatus.DEGRADED, True, False),
        (HealthStatus.UNHEALTHY, False, False),
        (HealthStatus.UNREACHABLE, False, False),
    ],
)
def test_result_counts_degraded_as_up_but_not_healthy(
    status: HealthStatus, is_up: bool, is_healthy: bool
) -> None:
    result = HealthResult(status, None, None, None)
    assert (result.is_up, result.is_healthy) == (is_up, is_healthy)


# --- HealthState ---------------------------------------------------------------------------


def test_snapshot_carries_every_key_and_an_iso_utc_timestamp(state: HealthState) -> None:
    state.set("degraded", ["cache cold"], {"step": 3})
    before = datetime.now(UTC)
    reply = state.snapshot()
    assert set(reply) == REPLY_KEYS
    assert reply["status"] == "degraded"
    assert reply["service"] == "test-agent"
    assert reply["issues"] == ["cache cold"]
    assert reply["details"] == {"step": 3}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", reply["timestamp"])
    stamp = datetime.fromisoformat(reply["timestamp"])
    assert stamp.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= stamp <= datetime.now(UTC) + timedelta(seconds=1)


def test_new_state_reports_healthy_with_nothing_to_say(state: HealthState) -> None:
    reply = state.snapshot()
    assert (reply["status"], reply["issues"], reply["details"]) == ("healthy", [], {})


def test_snapshot_is_a_copy_the_caller_may_change(state: HealthState) -> None:
    state.set("healthy", details={"queue": [1, 2]})
    state.snapshot()["details"]["queue"].append(3)
    assert state.snapshot()["details"] == {"queue": [1, 2]}


def test_set_without_details_keeps_them_and_update_merges(state: HealthState) -> None:
    state.set("healthy", details={"step": 1, "loss": 0.5})
    state.set("unhealthy", ["nan loss"])
    state.update_details(step=2, lr=0.01)
    reply = state.snapshot()
    assert reply["status"] == "unhealthy"
    assert reply["issues"] == ["nan loss"]
    assert reply["details"] == {"step": 2, "loss": 0.5, "lr": 0.01}


def test_degraded_without_issues_is_refused(state: HealthState) -> None:
    with pytest.raises(ValueError, match="at least one issue"):
        state.set("degraded")
    assert state.snapshot()["status"] == "healthy"


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"status": "fine"}, ValueError),
        ({"status": "healthy", "issues": "one string"}, TypeError),
        ({"status": "healthy", "details": {"loss": float("nan")}}, ValueError),
        ({"status": "healthy", "details": {"when": datetime.now(UTC)}}, ValueError),
    ],
)
def test_values_that_cannot_go_on_the_wire_are_refused_at_set(
    state: HealthState, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        state.set(**kwargs)
    assert state.snapshot()["status"] == "healthy"


def test_update_details_refuses_what_is_not_json(state: HealthState) -> None:
    with pytest.raises(ValueError, match="JSON"):
        state.update_details(blob=object())
    assert state.snapshot()["details"] == {}


# --- responder and client, end to end ------------------------------------------------------


async def test_health_check_reply_is_the_state_snapshot(
    state: HealthState, responder: HealthResponder, client: HealthClient
) -> None:
    state.set("ok", details={"step": 42})
    result = await client.check(HOST, responder.port)
    assert result.status is HealthStatus.HEALTHY
    assert result.error is None
    assert result.latency_s is not None and result.latency_s > 0
    assert result.reply is not None and set(result.reply) == REPLY_KEYS
    assert result.reply["status"] == "ok"
    assert result.reply["service"] == "test-agent"
    assert result.reply["details"] == {"step": 42}


async def test_degraded_reply_carries_its_issues(
    state: HealthState, responder: HealthResponder, client: HealthClient
) -> None:
    state.set("degraded", ["gpu 0 at 95 C", "queue backlog"])
    result = await client.check(HOST, responder.port)
    assert result.status is HealthStatus.DEGRADED
    assert result.is_up and not result.is_healthy
    assert result.reply is not None
    assert result.reply["issues"] == ["gpu 0 at 95 C", "queue backlog"]
    assert result.error is None


async def test_state_changes_show_in_the_next_check(
    state: HealthState, responder: HealthResponder, client: HealthClient
) -> None:
    assert (await client.check(HOST, responder.port)).status is HealthStatus.HEALTHY
    state.set("unhealthy", ["redis unreachable"])
    result = await client.check(HOST, responder.port)
    assert result.status is HealthStatus.UNHEALTHY
    assert result.reply is not None and result.reply["issues"] == ["redis unreachable"]


_NESTED = b"[" * 50_000


@pytest.mark.parametrize(
    ("frames", "why"),
    [
        ([random.Random(7).randbytes(512)], "not"),
        ([b"\xff\xfe{\x80"], "UTF-8"),
        ([b"{not json"], "not valid JSON"),
        ([b"[1, 2, 3]"], "JSON object"),
        ([b'"health_check"'], "JSON object"),
        ([b"{}"], "unknown action"),
        ([b'{"action": "reboot"}'], "unknown action"),
        ([b'{"action": ["health_check"]}'], "unknown action"),
        ([_NESTED], "nested too deeply"),
        ([b'{"action": "health_check"}', b'{"action": "health_check"}'], "2 frames"),
        ([b"", b"x", b"y"], "3 frames"),
        ([b""], "not valid JSON"),
    ],
    ids=[
        "random-bytes",
        "invalid-utf8",
        "broken-json",
        "json-array",
        "json-string",
        "no-action",
        "wrong-action",
        "action-not-a-string",
        "deeply-nested",
        "multipart",
        "multipart-3",
        "empty",
    ],
)
async def test_malformed_request_gets_error_reply_and_the_next_is_answered(
    context: zmq.Context[Any],
    responder: HealthResponder,
    client: HealthClient,
    frames: list[bytes],
    why: str,
) -> None:
    reply = exchange(context, responder.port, frames)
    assert reply["status"] == "error"
    assert why in reply["error"]
    assert responder.bad_requests == 1
    result = await client.check(HOST, responder.port)
    assert result.status is HealthStatus.HEALTHY, result.error
    assert responder.requests_served == 2


async def test_dealer_speaking_req_envelope_is_answered_and_one_without_is_dropped(
    context: zmq.Context[Any], responder: HealthResponder, client: HealthClient
) -> None:
    dealer = context.socket(zmq.DEALER)
    dealer.linger = 0
    dealer.rcvtimeo = 5000
    try:
        dealer.connect(f"tcp://{HOST}:{responder.port}")
        dealer.send_multipart([b"no envelope at all"])  # nothing can go back to this one
        dealer.send_multipart([b"tag", b"", b'{"action": "health_check"}'])
        tag, empty, body = dealer.recv_multipart()
    finally:
        dealer.close()
    assert (tag, empty, json.loads(body)["status"]) == (b"tag", b"", "healthy")
    assert (responder.requests_served, responder.bad_requests) == (1, 1)
    assert (await client.check(HOST, responder.port)).status is HealthStatus.HEALTHY


async def test_request_with_extra_keys_is_answered(
    context: zmq.Context[Any], responder: HealthResponder
) -> None:
    reply = exchange(context, responder.port, [b'{"action":"health_check","from":"cli"}'])
    assert reply["status"] == "healthy"
    assert responder.bad_requests == 0


async def test_oversized_frame_drops_its_sender_and_a_fresh_client_is_answered(
    context: zmq.Context[Any], responder: HealthResponder, client: HealthClient
) -> None:
    sender = context.socket(zmq.REQ)
    sender.linger = 0
    monitor = sender.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
    monitor.rcvtimeo = 100
    try:
        sender.connect(f"tcp://{HOST}:{responder.port}")
        sender.send(b"{" + b" " * (1024 * 1024) + b"}")  # 1 MiB, far over MAX_REQUEST_BYTES
        seen: list[int] = []
        deadline = time.monotonic() + 5.0
        while zmq.EVENT_DISCONNECTED not in seen:
            assert time.monotonic() < deadline, f"sender never dropped; monitor saw {seen}"
            try:
                seen.append(recv_monitor_message(monitor)["event"])
            except zmq.Again:
                continue
    finally:
        sender.disable_monitor()
        monitor.close()
        sender.close()
    result = await client.check(HOST, responder.port)
    assert result.status is HealthStatus.HEALTHY, result.error
    assert responder.requests_served == 1  # the oversized frame never reached the responder


async def test_frame_just_under_the_limit_gets_an_error_reply(
    context: zmq.Context[Any], responder: HealthResponder
) -> None:
    reply = exchange(context, responder.port, [b"x" * (MAX_REQUEST_BYTES - 1)])
    assert reply["status"] == "error"


async def test_peers_that_leave_before_their_reply_do_not_wedge_the_responder(
    context: zmq.Context[Any], responder: HealthResponder, client: HealthClient
) -> None:
    for _ in range(5):
        quitter = context.socket(zmq.REQ)
        quitter.linger = 0
        quitter.connect(f"tcp://{HOST}:{responder.port}")
        quitter.send(b'{"action": "health_check"}')
        quitter.close()
    result = await client.check(HOST, responder.port)
    assert result.status is HealthStatus.HEALTHY, result.error


async def test_raw_tcp_garbage_does_not_stop_the_responder(
    responder: HealthResponder, client: HealthClient
) -> None:
    # libzmq takes such bytes for a ZMTP 1.0 peer and hands its "messages" on;
    # the check right after them is the one a REP socket would lose.
    for attempt in range(4):
        for payload in (
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            random.Random(attempt).randbytes(4096),
        ):
            with socket.create_connection((HOST, responder.port), timeout=5) as raw:
                raw.sendall(payload)
        result = await client.check(HOST, responder.port)
        assert result.status is HealthStatus.HEALTHY, f"attempt {attempt}: {result.error}"


async def test_silent_agent_times_out_and_the_same_client_recovers_on_that_port(
    context: zmq.Context[Any], state: HealthState, client: HealthClient
) -> None:
    silent, port = silent_socket(context)
    result = await client.check(HOST, port, timeout_s=0.2)
    assert result.status is HealthStatus.UNREACHABLE
    assert result.error is not None and "no reply" in result.error
    assert result.latency_s is None and result.reply is None
    silent.close()

    # The agent comes back on the same port; the client's next check must not be
    # stuck on the request that was never answered.
    deadline = time.monotonic() + 5.0
    while True:  # the old listener closes in libzmq's I/O thread, shortly after close()
        try:
            revived = HealthResponder(state, f"tcp://{HOST}:{port}")
            revived.start()
            break
        except HealthBindError:
            assert time.monotonic() < deadline, f"port {port} stayed taken after close"
            await asyncio.sleep(0.01)
    try:
        result = await client.check(HOST, port, timeout_s=5.0)
        assert result.status is HealthStatus.HEALTHY, result.error
    finally:
        revived.stop()


async def test_nothing_listening_is_unreachable_with_no_connection(client: HealthClient) -> None:
    result = await client.check(HOST, free_port(), timeout_s=0.2)
    assert result.status is HealthStatus.UNREACHABLE
    assert result.error is not None and "no connection" in result.error


async def test_error_reply_makes_the_agent_unreachable(
    context: zmq.Context[Any], client: HealthClient
) -> None:
    router = context.socket(zmq.ROUTER)
    router.linger = 0
    port = router.bind_to_random_port(f"tcp://{HOST}")

    def answer_once(reply: bytes) -> None:
        if router.poll(5000):
            frames = router.recv_multipart()
            router.send_multipart([*frames[:-1], reply])

    for reply, expected in [
        (b'{"status": "error", "error": "unknown action"}', "unknown action"),
        (b"not json at all", "not JSON"),
        (b'["healthy"]', "JSON object"),
    ]:
        answering = threading.Thread(target=answer_once, args=(reply,))
        answering.start()
        result = await client.check(HOST, port, timeout_s=5.0)
        answering.join(5)
        assert result.status is HealthStatus.UNREACHABLE
        assert result.error is not None and expected in result.error
        assert result.latency_s is not None  # a reply did arrive


async def test_check_many_sends_every_request_before_waiting_for_replies(
    context: zmq.Context[Any], client: HealthClient
) -> None:
    # One ROUTER behind two ports answers nobody until both requests are in:
    # a client that waited for the first reply before sending the second
    # request would get neither answer.
    router = context.socket(zmq.ROUTER)
    router.linger = 0
    ports = [router.bind_to_random_port(f"tcp://{HOST}") for _ in range(2)]
    reply = HealthState("pair").snapshot()

    def answer_when_all_arrived() -> None:
        pending: list[list[bytes]] = []
        deadline = time.monotonic() + 5.0
        while len(pending) < 2 and time.monotonic() < deadline:
            if router.poll(50):
                pending.append(router.recv_multipart())
        for frames in pending:
            router.send_multipart([*frames[:-1], json.dumps(reply).encode()])

    answering = threading.Thread(target=answer_when_all_arrived)
    answering.start()
    results = await client.check_many([(HOST, p) for p in ports], timeout_s=3.0)
    answering.join(5)
    assert [results[(HOST, p)].status for p in ports] == [HealthStatus.HEALTHY] * 2


async def test_check_many_reports_each_target_on_its_own(
    context: zmq.Context[Any], client: HealthClient
) -> None:
    states = {name: HealthState(name) for name in ("good", "slow", "sick")}
    states["slow"].set("degraded", ["backlog"])
    states["sick"].set("unhealthy", ["oom"])
    responders = {name: HealthResponder(s, f"tcp://{HOST}:0") for name, s in states.items()}
    for r in responders.values():
        r.start()
    _, silent_port = silent_socket(context)
    dead_port = free_port()
    try:
        targets = [(HOST, r.port) for r in responders.values()]
        targets += [(HOST, silent_port), (HOST, dead_port), targets[0]]  # and a duplicate
        results = await client.check_many(targets, timeout_s=0.3)
        second = await client.check_many(targets[:3], timeout_s=3.0)
    finally:
        for r in responders.values():
            r.stop()
    assert len(results) == 5
    by_name = {name: results[(HOST, r.port)] for name, r in responders.items()}
    assert by_name["good"].status is HealthStatus.HEALTHY
    assert by_name["slow"].status is HealthStatus.DEGRADED
    assert by_name["sick"].status is HealthStatus.UNHEALTHY
    assert by_name["sick"].reply is not None and by_name["sick"].reply["service"] == "sick"
    assert results[(HOST, silent_port)].status is HealthStatus.UNREACHABLE
    assert results[(HOST, dead_port)].status is HealthStatus.UNREACHABLE
    assert [r.status for r in second.values()] == [
        HealthStatus.HEALTHY,
        HealthStatus.DEGRADED,
        HealthStatus.UNHEALTHY,
    ]


async def test_concurrent_checks_of_one_target_each_get_a_reply(
    responder: HealthResponder, client: HealthClient
) -> None:
    results = await asyncio.gather(*(client.check(HOST, responder.port) for _ in range(5)))
    assert [r.status for r in results] == [HealthStatus.HEALTHY] * 5


async def test_cancelled_check_leaves_the_client_usable(
    context: zmq.Context[Any], responder: HealthResponder, client: HealthClient
) -> None:
    _, silent_port = silent_socket(context)
    pending = asyncio.ensure_future(client.check(HOST, silent_port, timeout_s=10.0))
    await asyncio.sleep(0)  # let the check send its request
    pending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending
    assert (await client.check(HOST, responder.port)).status is HealthStatus.HEALTHY


async def test_closing_the_client_ends_checks_in_flight_as_unreachable(
    context: zmq.Context[Any],
) -> None:
    _, silent_port = silent_socket(context)
    checker = HealthClient()
    pending = asyncio.ensure_future(checker.check(HOST, silent_port, timeout_s=10.0))
    await asyncio.sleep(0)  # let the check send its request
    checker.close()
    result = await asyncio.wait_for(pending, 5.0)
    assert result.status is HealthStatus.UNREACHABLE
    assert result.error is not None and "closed" in result.error
    checker.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        await checker.check(HOST, silent_port)


def test_client_outlives_its_event_loop(responder: HealthResponder) -> None:
    # Each asyncio.run() is a new loop; sockets cached under the old, closed
    # one must be replaced, not used.
    checker = HealthClient()
    try:
        statuses = [asyncio.run(checker.check(HOST, responder.port)).status for _ in range(3)]
    finally:
        checker.close()
    assert statuses == [HealthStatus.HEALTHY] * 3


async def test_check_health_one_shot(responder: HealthResponder) -> None:
    result = await check_health(HOST, responder.port)
    assert result.status is HealthStatus.HEALTHY


# --- responder lifecycle -------------------------------------------------------------------


async def test_stop_is_idempotent_and_frees_the_port(state: HealthState) -> None:
    first = HealthResponder(state, f"tcp://{HOST}:0")
    first.start()
    port = first.port
    first.stop()
    first.stop()
    assert not [t for t in threading.enumerate() if t.name == f"health-responder:{port}"]

    again = HealthResponder(state, f"tcp://{HOST}:{port}")
    again.start()
    try:
        assert (await check_health(HOST, port, timeout_s=5.0)).status is HealthStatus.HEALTHY
    finally:
        again.stop()


def test_binding_a_taken_port_names_the_port(
    state: HealthState, responder: HealthResponder
) -> None:
    second = HealthResponder(state, f"tcp://{HOST}:{responder.port}")
    with pytest.raises(HealthBindError, match=rf"health port {responder.port} is already in use"):
        second.start()
    second.stop()  # safe after a failed start
    with pytest.raises(RuntimeError):
        second.start()


def test_endpoint_reports_the_port_actually_bound(responder: HealthResponder) -> None:
    assert responder.port > 0
    assert responder.endpoint == f"tcp://{HOST}:{responder.port}"


def test_stop_before_start_is_harmless(state: HealthState) -> None:
    never = HealthResponder(state, f"tcp://{HOST}:0")
    never.stop()
    with pytest.raises(RuntimeError, match="not started"):
        _ = never.port


@pytest.mark.parametrize("endpoint", ["127.0.0.1:5000", "ipc:///tmp/x", "tcp://127.0.0.1:http"])
def test_endpoint_that_is_not_tcp_host_port_is_refused(state: HealthState, endpoint: str) -> None:
    with pytest.raises(ValueError, match="tcp://"):
        HealthResponder(state, endpoint)


def test_responders_can_share_one_context(context: zmq.Context[Any], state: HealthState) -> None:
    pair = [HealthResponder(state, f"tcp://{HOST}:0", context=context) for _ in range(2)]
    for r in pair:
        r.start()
    try:
        replies = [exchange(context, r.port, [b'{"action": "health_check"}']) for r in pair]
    finally:
        for r in pair:
            r.stop()
    assert [r["status"] for r in replies] == ["healthy", "healthy"]
    assert not context.closed  # it belongs to the caller
