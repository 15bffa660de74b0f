"""`graftmesh models|promote|rollback`: the registry's client side.

Each function is a whole command; the `graftmesh` CLI maps its options onto it
and exits with what it returns. The registry is found through its Redis ready
key, falling back to the config (`common.ready.resolve_address`).

Exit codes: 0 success; 1 the registry is not reachable, or it refused the
change for the alias's state (`production` moved meanwhile, nothing to roll
back to); 2 an unknown model, version or alias, or a bad argument (usage).
"""

from __future__ import annotations

import getpass
from typing import Final

import grpc
from google.protobuf import timestamp_pb2
from rich.console import Console
from rich.table import Table
from rich.text import Text

from common.client_cli import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    connect,
    print_error,
    rpc_failure,
)
from common.config import StartupConfig
from common.stubs import common_pb2, registry_pb2, registry_pb2_grpc

__all__ = [
    "DEFAULT_AGENT",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "models",
    "promote",
    "rollback",
]

# 3 is reserved for `up`, so a registry that cannot be reached is a failed command (1).
DEFAULT_AGENT: Final = "registry"
PRODUCTION: Final = "production"
CANARY: Final = "canary"
_TIMEOUT_S: Final = 30.0
_PAGE_SIZE: Final = 500
# Bounds the paging loops: 200 pages of 500 is far beyond any real registry.
_MAX_PAGES: Final = 200


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no login name (a container without a passwd entry)
        return "cli"


def _when(stamp: timestamp_pb2.Timestamp) -> str:
    if not stamp.seconds and not stamp.nanos:
        return "-"
    return stamp.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")


def _version(stub: registry_pb2_grpc.RegistryServiceStub, name: str, alias: str) -> int | None:
    """The version `alias` of `name` points at; None when the alias (or model) does not exist."""
    try:
        found = stub.GetModelVersion(
            registry_pb2.GetModelVersionRequest(model=common_pb2.ModelRef(name=name, alias=alias)),
            timeout=_TIMEOUT_S,
        ).model_version
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise
    return int(found.version)


def _list_models(stub: registry_pb2_grpc.RegistryServiceStub) -> list[registry_pb2.ModelSummary]:
    found: list[registry_pb2.ModelSummary] = []
    token = ""
    for _ in range(_MAX_PAGES):
        reply = stub.ListModels(
            registry_pb2.ListModelsRequest(
                page=common_pb2.PageRequest(page_size=_PAGE_SIZE, page_token=token)
            ),
            timeout=_TIMEOUT_S,
        )
        found.extend(reply.models)
        token = reply.page.next_page_token
        if not token:
            break
    return found


def _list_versions(
    stub: registry_pb2_grpc.RegistryServiceStub, name: str
) -> list[registry_pb2.ModelVersion]:
    found: list[registry_pb2.ModelVersion] = []
    token = ""
    for _ in range(_MAX_PAGES):
        reply = stub.SearchModelVersions(
            registry_pb2.SearchModelVersionsRequest(
                name=name, page=common_pb2.PageRequest(page_size=_PAGE_SIZE, page_token=token)
            ),
            timeout=_TIMEOUT_S,
        )
        found.extend(reply.model_versions)
        token = reply.page.next_page_token
        if not token:
            break
    return found


def _models_table(summaries: list[registry_pb2.ModelSummary]) -> Table:
    table = Table(header_style="bold", box=None)
    for column in ("model", "latest", "versions", "aliases", "updated"):
        table.add_column(column)
    for s in summaries:
        aliases = "  ".join(f"{a}=v{v}" for a, v in sorted(s.aliases.items())) or "-"
        table.add_row(
            Text(s.name), f"v{s.latest_version}", str(s.version_count), aliases, _when(s.updated_at)
        )
    return table


def _versions_table(name: str, versions: list[registry_pb2.ModelVersion]) -> Table:
    table = Table(header_style="bold", box=None, title=Text(name))
    for column in ("version", "aliases", "metrics", "created", "job"):
        table.add_column(column)
    for v in versions:
        metrics = "  ".join(f"{k}={val:.4g}" for k, val in sorted(v.metrics.items())) or "-"
        table.add_row(
            f"v{v.version}",
            ", ".join(v.aliases) or "-",
            Text(metrics),
            _when(v.created_at),
            Text(v.lineage.job_id or "-"),
        )
    return table


def models(
    cfg: StartupConfig, out: Console, *, name: str | None = None, agent: str = DEFAULT_AGENT
) -> int:
    """A table of the registered models; with `name`, that model's versions (newest first)
    with their aliases, metrics and creation time. An unknown `name` is a usage error (2)."""
    channel = connect(out, cfg, agent)
    if channel is None:
        return EXIT_UNREACHABLE
    with channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        try:
            if name is None:
                summaries = _list_models(stub)
            else:
                versions = _list_versions(stub, name)
        except grpc.RpcError as exc:
            return rpc_failure(out, exc, agent)
    if name is None:
        if not summaries:
            out.print("no models registered")
        else:
            out.print(_models_table(summaries))
        return EXIT_OK
    if not versions:
        print_error(out, f"model {name!r} is not registered")
        return EXIT_USAGE
    out.print(_versions_table(name, versions))
    return EXIT_OK


def promote(
    cfg: StartupConfig,
    name: str,
    out: Console,
    *,
    version: int | None = None,
    agent: str = DEFAULT_AGENT,
    reason: str = "",
) -> int:
    """Point `production` of `name` at `version`, or at the version `canary` points at now.

    The move is a compare-and-set against the version `production` pointed at when
    the command read it: if it moved meanwhile (say the router promoted or rolled
    back a canary), nothing changes and the command fails (1).
    """
    if version is not None and version < 1:
        print_error(out, f"a version is >= 1, not {version}")
        return EXIT_USAGE
    channel = connect(out, cfg, agent)
    if channel is None:
        return EXIT_UNREACHABLE
    with channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        current: int | None = None
        try:
            target = version if version is not None else _version(stub, name, CANARY)
            if target is None:
                known = bool(_list_versions(stub, name))
                print_error(
                    out,
                    f"model {name!r} has no {CANARY!r} alias; give the version"
                    if known
                    else f"model {name!r} is not registered",
                )
                return EXIT_USAGE
            current = _version(stub, name, PRODUCTION)
            if current == target:
                out.print(f"{name}: {PRODUCTION} already at v{target}")
                return EXIT_OK
            reply = stub.SetAlias(
                registry_pb2.SetAliasRequest(
                    name=name,
                    alias=PRODUCTION,
                    version=target,
                    expected_version=current or 0,
                    actor=_actor(),
                    reason=reason or "promoted by cli",
                ),
                timeout=_TIMEOUT_S,
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                print_error(
                    out,
                    f"{name}: {PRODUCTION} changed while promoting "
                    f"(was v{current or '-'}); nothing changed: {exc.details()}",
                )
                return EXIT_FAILED
            return rpc_failure(out, exc, agent)
    entry = reply.entry
    before = f"v{entry.from_version}" if entry.from_version else "(none)"
    out.print(f"{name}: {PRODUCTION} {before} -> v{entry.to_version}", markup=False)
    return EXIT_OK


def rollback(
    cfg: StartupConfig,
    name: str,
    out: Console,
    *,
    alias: str = PRODUCTION,
    agent: str = DEFAULT_AGENT,
    reason: str = "",
) -> int:
    """Point `alias` of `name` back at the version it pointed at before its latest change.

    Nothing to roll back to is a failure (1); an unknown model or alias is a usage error (2).
    """
    channel = connect(out, cfg, agent)
    if channel is None:
        return EXIT_UNREACHABLE
    with channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        try:
            reply = stub.Rollback(
                registry_pb2.RollbackRequest(
                    name=name, alias=alias, actor=_actor(), reason=reason or "rolled back by cli"
                ),
                timeout=_TIMEOUT_S,
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                print_error(out, f"{name}: cannot roll {alias} back: {exc.details()}")
                return EXIT_FAILED
            return rpc_failure(out, exc, agent)
    entry = reply.entry
    before = f"v{entry.from_version}" if entry.from_version else "(none)"
    out.print(f"{name}: {alias} {before} -> v{reply.model_version.version}", markup=False)
    return EXIT_OK
