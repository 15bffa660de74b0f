"""The mesh's shared token and optional TLS on gRPC: one place for both ends of every call.

Settings come from the environment, so secrets stay out of `startup_config.yaml`
(and the supervisor hands them to every agent it starts):

- `GRAFTMESH_TOKEN`, or `GRAFTMESH_TOKEN_FILE` naming a file that holds it: when
  set, every gRPC server of the mesh requires `authorization: Bearer <token>`
  metadata (UNAUTHENTICATED otherwise) and every channel opened through
  `common.channels` sends it. `grpc.health.v1` and reflection stay open, so that
  probes (Kubernetes' gRPC probes, load balancers) need no secret.
- `GRAFTMESH_TLS_CERT` + `GRAFTMESH_TLS_KEY` (PEM files): servers speak TLS.
  `GRAFTMESH_TLS_CA`: clients speak TLS and verify servers against that CA. The
  certificate must name every address clients use (the machines' hosts, and
  127.0.0.1 for the supervisor's control port).
"""

from __future__ import annotations

import functools
import hmac
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from common.errors import ConfigError

TOKEN_ENV = "GRAFTMESH_TOKEN"
TOKEN_FILE_ENV = "GRAFTMESH_TOKEN_FILE"
TLS_CERT_ENV = "GRAFTMESH_TLS_CERT"
TLS_KEY_ENV = "GRAFTMESH_TLS_KEY"
TLS_CA_ENV = "GRAFTMESH_TLS_CA"

AUTH_METADATA_KEY = "authorization"
# Probes and service discovery must work without the secret.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as err:
        raise ConfigError([f"{what}: cannot read {path} ({err.strerror})"]) from None


@dataclass(frozen=True, repr=False)
class Security:
    """What the environment says about the token and TLS; `Security()` is the open default."""

    token: str | None = None
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    tls_ca: bytes | None = None

    def __repr__(self) -> str:  # never print the secret
        return (
            f"Security(token={'set' if self.token else 'none'}, "
            f"server_tls={self.server_tls}, client_tls={self.client_tls})"
        )

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Security:
        """Read the settings; ConfigError naming every unusable one."""
        env = os.environ if environ is None else environ
        problems: list[str] = []
        token = env.get(TOKEN_ENV) or None
        if token is None and env.get(TOKEN_FILE_ENV):
            try:
                token = _read(env[TOKEN_FILE_ENV], TOKEN_FILE_ENV).decode("utf-8").strip()
            except ConfigError as err:
                problems.extend(err.problems)
            except UnicodeDecodeError:
                problems.append(f"{TOKEN_FILE_ENV}: the token file is not UTF-8 text")
            else:
                if not token:
                    problems.append(f"{TOKEN_FILE_ENV}: the token file is empty")
        if token is not None and (token != token.strip() or any(c in token for c in "\r\n")):
            problems.append(f"{TOKEN_ENV}: the token must not contain spaces or line breaks")
        files: dict[str, bytes | None] = {}
        for key in (TLS_CERT_ENV, TLS_KEY_ENV, TLS_CA_ENV):
            files[key] = None
            if env.get(key):
                try:
                    files[key] = _read(env[key], key)
                except ConfigError as err:
                    problems.extend(err.problems)
        if bool(env.get(TLS_CERT_ENV)) != bool(env.get(TLS_KEY_ENV)):
            problems.append(f"{TLS_CERT_ENV} and {TLS_KEY_ENV} go together: give both or neither")
        if problems:
            raise ConfigError(problems)
        return cls(token, files[TLS_CERT_ENV], files[TLS_KEY_ENV], files[TLS_CA_ENV])

    @property
    def server_tls(self) -> bool:
        return self.tls_cert is not None and self.tls_key is not None

    @property
    def client_tls(self) -> bool:
        return self.tls_ca is not None

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if self.tls_cert is None or self.tls_key is None:
            return None
        return grpc.ssl_server_credentials([(self.tls_key, self.tls_cert)])

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if self.tls_ca is None:
            return None
        return grpc.ssl_channel_credentials(root_certificates=self.tls_ca)

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((AUTH_METADATA_KEY, f"Bearer {self.token}"),) if self.token else ()

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [TokenAuthInterceptor(self.token)] if self.token else []

    def intercept_sync(self, channel: grpc.Channel) -> grpc.Channel:
        if not self.token:
            return channel
        return grpc.intercept_channel(channel, _SyncTokenInterceptor(self.call_metadata()))


@functools.cache
def current() -> Security:
    """This process's settings, read from its environment once."""
    return Security.from_environ()


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without the mesh's token (UNAUTHENTICATED), except health and reflection."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()
        # Denying handlers are built once per method, like the error-mapping wrappers.
        self._denials: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        if method.startswith(OPEN_METHOD_PREFIXES) or self._authorised(handler_call_details):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        denial = self._denials.get(method)
        if denial is None:
            denial = self._denials[method] = _denying_handler(handler)
        return denial

    def _authorised(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == AUTH_METADATA_KEY:
                given = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(given, self._expected)
        return False


_DENIED = "missing or wrong mesh token (authorization: Bearer <GRAFTMESH_TOKEN>)"


async def _deny_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)


async def _deny_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)
    yield  # pragma: no cover - abort raises; this makes the function an async generator


def _denying_handler(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(_deny_unary, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(_deny_unary, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(_deny_stream, **kwargs)
    return grpc.stream_stream_rpc_method_handler(_deny_stream, **kwargs)


class _SyncTokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """The token on the blocking channels of the command-line clients."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _details(self, details: Any) -> Any:
        return details._replace(metadata=[*(details.metadata or ()), *self._metadata])

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(
        self, continuation: Any, details: Any, request_iterator: Any
    ) -> Any:
        return continuation(self._details(details), request_iterator)
