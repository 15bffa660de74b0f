"""ensure_infra and EmbeddedServer against real servers and real processes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import nats
import psutil
import pytest
import redis.asyncio as aioredis

from common.config import InfraConfig
from common.errors import InvalidArgumentError
from common.infra import (
    EmbeddedServer,
    EmbeddedServerError,
    Infra,
    InfraUnavailableError,
    ensure_infra,
    probe_nats,
    probe_redis,
)
from tests.ports import free_port
from tests.wait import eventually

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _children() -> set[int]:
    """Live child processes of this test process (session servers included)."""
    return {p.pid for p in psutil.Process().children(recursive=True) if not _gone(p.pid)}


async def _jetstream_round_trip(url: str, stream: str) -> int:
    nc = await nats.connect(url, allow_reconnect=False)
    try:
        js = nc.jetstream()
        await js.add_stream(name=stream, subjects=[f"{stream}.>"])
        ack = await js.publish(f"{stream}.x", b"hello")
        return ack.seq
    finally:
        await nc.close()


@pytest.fixture
def listening_socket() -> Iterator[socket.socket]:
    """A port that something (this socket) is listening on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock


async def test_never_uses_the_system_servers_when_they_answer(
    system_nats_url: str, system_redis_url: str, tmp_path: Path
) -> None:
    cfg = InfraConfig(nats_url=system_nats_url, redis_url=system_redis_url, embedded="never")
    infra = await ensure_infra(cfg, tmp_path)
    assert (infra.nats_url, infra.redis_url) == (system_nats_url, system_redis_url)
    assert infra.started == []
    await infra.stop()
    assert not (tmp_path / "logs").exists()


async def test_never_names_the_unreachable_server(system_nats_url: str, tmp_path: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    cfg = InfraConfig(nats_url=system_nats_url, redis_url=dead, embedded="never")
    with pytest.raises(InfraUnavailableError) as caught:
        await ensure_infra(cfg, tmp_path)
    message = str(caught.value)
    assert f"Redis is not reachable at {dead}" in message
    assert "NATS" not in message
    assert "'never'" in message


async def test_never_names_both_when_both_are_down(tmp_path: Path) -> None:
    nats_url, redis_url = f"nats://127.0.0.1:{free_port()}", f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(InfraUnavailableError) as caught:
        await ensure_infra(
            InfraConfig(nats_url=nats_url, redis_url=redis_url, embedded="never"), tmp_path
        )
    assert nats_url in str(caught.value)
    assert redis_url in str(caught.value)


async def test_auto_starts_bundled_servers_that_answer_and_stop_cleanly(
    tmp_path: Path, unique_name: str
) -> None:
    nats_port, redis_port = free_port(), free_port()
    cfg = InfraConfig(
        nats_url=f"nats://127.0.0.1:{nats_port}",
        redis_url=f"redis://127.0.0.1:{redis_port}/3",
        embedded="auto",
    )
    infra = await ensure_infra(cfg, tmp_path)
    try:
        assert sorted(infra.started) == ["nats", "redis"]
        assert (infra.nats_url, infra.redis_url) == (cfg.nats_url, cfg.redis_url)
        pids = [server.pid for server in infra.servers.values()]
        assert await probe_nats(infra.nats_url)
        assert await _jetstream_round_trip(infra.nats_url, unique_name.upper()) == 1
        client = aioredis.Redis.from_url(infra.redis_url)
        try:
            assert await client.set("k", "v")
            assert await client.get("k") == b"v"
        finally:
            await client.aclose()
        assert (tmp_path / "nats" / "jetstream").is_dir()
        assert (tmp_path / "redis" / "appendonly.aof").is_file()
        assert (tmp_path / "logs" / "nats-server.log").stat().st_size > 0
    finally:
        await infra.stop()
    for pid in pids:
        assert pid is not None
        assert _gone(pid), f"embedded server {pid} still runs after stop()"
    assert not await probe_redis(cfg.redis_url, 0.3)


async def test_auto_starts_only_what_is_missing(system_nats_url: str, tmp_path: Path) -> None:
    cfg = InfraConfig(
        nats_url=system_nats_url, redis_url=f"redis://127.0.0.1:{free_port()}/0", embedded="auto"
    )
    async with await ensure_infra(cfg, tmp_path) as infra:
        assert infra.started == ["redis"]
        assert await probe_redis(infra.redis_url)
    assert not await probe_redis(cfg.redis_url, 0.3)


async def test_auto_requires_the_configured_credentials_on_embedded_servers(
    tmp_path: Path,
) -> None:
    nats_port, redis_port = free_port(), free_port()
    cfg = InfraConfig(
        nats_url=f"nats://app:n-ts%pw@127.0.0.1:{nats_port}",
        redis_url=f"redis://:r3dis%20pw@127.0.0.1:{redis_port}/1",
        embedded="auto",
    )
    async with await ensure_infra(cfg, tmp_path) as infra:
        assert await probe_nats(infra.nats_url)
        assert await probe_redis(infra.redis_url)
        assert not await probe_nats(f"nats://127.0.0.1:{nats_port}", 0.5)
        assert not await probe_redis(f"redis://127.0.0.1:{redis_port}/1", 0.5)
        assert not await probe_redis(f"redis://:wrong@127.0.0.1:{redis_port}/1", 0.5)
    assert (tmp_path / "redis" / "auth.conf").stat().st_mode & 0o077 == 0


async def test_embedded_nats_accepts_a_token_from_the_url(tmp_path: Path) -> None:
    port = free_port()
    server = EmbeddedServer.nats("127.0.0.1", port, tmp_path, username="t0ken")
    await server.start()
    try:
        assert await probe_nats(f"nats://t0ken@127.0.0.1:{port}")
        assert not await probe_nats(f"nats://other@127.0.0.1:{port}", 0.5)
    finally:
        await server.stop()


async def test_auto_refuses_to_start_servers_for_a_remote_host(tmp_path: Path) -> None:
    # 192.0.2.0/24 is reserved for documentation: nothing answers there.
    cfg = InfraConfig(
        nats_url="nats://192.0.2.1:4222", redis_url="redis://192.0.2.1:6379/0", embedded="auto"
    )
    before = _children()
    with pytest.raises(InfraUnavailableError, match="loopback"):
        await ensure_infra(cfg, tmp_path, probe_timeout_s=0.2)
    assert _children() <= before


async def test_always_on_a_taken_port_fails_and_leaves_nothing_running(
    listening_socket: socket.socket, tmp_path: Path
) -> None:
    taken = listening_socket.getsockname()[1]
    redis_port = free_port()
    cfg = InfraConfig(
        nats_url=f"nats://127.0.0.1:{taken}",
        redis_url=f"redis://127.0.0.1:{redis_port}/0",
        embedded="always",
    )
    before = _children()
    with pytest.raises(EmbeddedServerError) as caught:
        await ensure_infra(cfg, tmp_path)
    assert f"NATS on 127.0.0.1:{taken}" in str(caught.value)
    assert "port is taken" in str(caught.value)
    assert not await probe_redis(cfg.redis_url, 0.3)
    assert _children() <= before


async def test_auto_explains_a_port_held_by_something_that_is_not_the_server(
    listening_socket: socket.socket, tmp_path: Path
) -> None:
    taken = listening_socket.getsockname()[1]
    cfg = InfraConfig(
        nats_url=f"nats://127.0.0.1:{taken}",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        embedded="auto",
    )
    before = _children()
    with pytest.raises(InfraUnavailableError) as caught:
        await ensure_infra(cfg, tmp_path, probe_timeout_s=0.3)
    assert f"NATS with JetStream is not reachable at nats://127.0.0.1:{taken}" in str(caught.value)
    assert "something else listens on that port" in str(caught.value)
    assert _children() <= before


async def test_always_with_a_remote_host_is_a_config_error(tmp_path: Path) -> None:
    cfg = InfraConfig(
        nats_url=f"nats://127.0.0.1:{free_port()}",
        redis_url="redis://192.0.2.1:6379/0",
        embedded="always",
    )
    before = _children()
    with pytest.raises(InvalidArgumentError, match="loopback") as caught:
        await ensure_infra(cfg, tmp_path)
    assert caught.value.field == "infra.redis_url"
    assert _children() <= before


async def test_always_starts_servers_even_when_others_answer_elsewhere(
    system_nats_url: str, tmp_path: Path
) -> None:
    cfg = InfraConfig(
        nats_url=f"nats://localhost:{free_port()}",
        redis_url=f"redis://localhost:{free_port()}/0",
        embedded="always",
    )
    async with await ensure_infra(cfg, tmp_path) as infra:
        assert sorted(infra.started) == ["nats", "redis"]
        assert await probe_nats(infra.nats_url)
        assert await probe_redis(infra.redis_url)


async def test_server_that_exits_at_start_reports_its_log(tmp_path: Path) -> None:
    # A file where JetStream wants its store directory makes nats-server exit at once.
    (tmp_path / "nats").mkdir()
    (tmp_path / "nats" / "jetstream").write_text("not a directory")
    server = EmbeddedServer.nats("127.0.0.1", free_port(), tmp_path)
    with pytest.raises(EmbeddedServerError) as caught:
        await server.start()
    assert "exited with code" in str(caught.value)
    assert "storage directory is not a directory" in str(caught.value)
    assert server.pid is None


async def test_embedded_servers_restart_on_their_existing_data(
    tmp_path: Path, unique_name: str
) -> None:
    stream = unique_name.upper()
    nats_server = EmbeddedServer.nats("127.0.0.1", free_port(), tmp_path)
    redis_server = EmbeddedServer.redis("127.0.0.1", free_port(), tmp_path)
    await asyncio.gather(nats_server.start(), redis_server.start())
    try:
        assert await _jetstream_round_trip(nats_server.url, stream) == 1
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            await client.set("kept", "yes")
        finally:
            await client.aclose()
    finally:
        await asyncio.gather(nats_server.stop(), redis_server.stop())

    await asyncio.gather(nats_server.start(), redis_server.start())
    try:
        nc = await nats.connect(nats_server.url, allow_reconnect=False)
        try:
            info = await nc.jetstream().stream_info(stream)
            assert info.state.messages == 1
        finally:
            await nc.close()
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            assert await client.get("kept") == b"yes"
        finally:
            await client.aclose()
    finally:
        await asyncio.gather(nats_server.stop(), redis_server.stop())


async def test_stop_is_idempotent_and_start_after_stop_works(tmp_path: Path) -> None:
    server = EmbeddedServer.redis("127.0.0.1", free_port(), tmp_path)
    await server.stop()
    await server.start()
    first = server.pid
    await server.stop()
    await server.stop()
    assert first is not None and _gone(first)
    await server.start()
    try:
        assert server.running
        assert server.pid != first
    finally:
        await server.stop()


_ORPHAN_PARENT = textwrap.dedent(
    """
    import asyncio, sys, time
    from pathlib import Path
    from common.infra import EmbeddedServer

    server = EmbeddedServer.nats("127.0.0.1", int(sys.argv[1]), Path(sys.argv[2]))
    asyncio.run(server.start())
    print(f"server-pid={server.pid}", flush=True)
    time.sleep(120)
    """
)


async def _read_server_pid(parent: asyncio.subprocess.Process) -> int:
    assert parent.stdout is not None
    seen = []
    for _ in range(100):
        line = (await parent.stdout.readline()).decode()
        if line.startswith("server-pid="):
            return int(line.removeprefix("server-pid="))
        if not line:
            break
        seen.append(line)
    raise AssertionError(f"no server pid from the parent (exit code {parent.returncode}): {seen}")


async def test_embedded_server_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    parent = await asyncio.create_subprocess_exec(
        *[sys.executable, "-c", _ORPHAN_PARENT, str(free_port()), str(tmp_path)],
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    server_pid: int | None = None
    try:
        server_pid = await asyncio.wait_for(_read_server_pid(parent), 20)
        assert not _gone(server_pid)
        # The server runs in its own session: only the death signal can reach it.
        assert os.getsid(server_pid) == server_pid
        parent.send_signal(signal.SIGKILL)
        await asyncio.wait_for(parent.wait(), 5)
        await eventually(lambda: _gone(server_pid), 5.0, f"nats-server {server_pid} exiting")
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()
        if server_pid is not None and not _gone(server_pid):
            os.kill(server_pid, signal.SIGKILL)


async def test_infra_stop_leaves_servers_it_found_alone(
    system_nats_url: str, system_redis_url: str, tmp_path: Path
) -> None:
    infra = Infra(nats_url=system_nats_url, redis_url=system_redis_url)
    await infra.stop()
    assert await probe_nats(system_nats_url)
    assert await probe_redis(system_redis_url)
