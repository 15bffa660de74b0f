"""What every agent's command-line client shares: finding the agent, and saying why a call failed.

Each agent owns the client side of its `graftmesh` verbs (`services/<agent>/cli.py`);
they all reach their agent and report errors the same way, with the same exit codes.
"""

from __future__ import annotations

import asyncio

import grpc
from rich.console import Console
from rich.text import Text

from common.channels import open_sync_channel
from common.config import StartupConfig
from common.errors import NotFoundError
from common.ready import resolve_address

# The `graftmesh` exit codes a client verb can end with (3 and 4 belong to `up`).
EXIT_OK = 0
EXIT_FAILED = 1  # the call failed, or the agent cannot be reached
EXIT_USAGE = 2  # bad input, or an unknown model, job, version...
EXIT_UNREACHABLE = EXIT_FAILED


def print_error(out: Console, message: str) -> None:
    # Text, not markup: names and server messages may hold brackets (`inputs[x]`).
    out.print(Text.assemble(("error: ", "red"), message))


def connect(out: Console, cfg: StartupConfig, agent: str) -> grpc.Channel | None:
    """A channel to `agent` (ready key, else config); None, said on `out`, when it is unknown."""
    try:
        host, port = asyncio.run(resolve_address(cfg, agent))
    except NotFoundError as exc:
        print_error(out, f"cannot find the {agent}: {exc}")
        return None
    return open_sync_channel(f"{host}:{port}")


def rpc_failure(out: Console, exc: grpc.RpcError, agent: str) -> int:
    """Say why a call to `agent` failed; the exit code for it."""
    code, details = exc.code(), exc.details()
    if code == grpc.StatusCode.UNAVAILABLE:
        print_error(out, f"the {agent} is not reachable: {details}")
        return EXIT_UNREACHABLE
    if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
        print_error(out, details or code.name)
        return EXIT_USAGE
    print_error(out, f"{code.name}: {details}")
    return EXIT_FAILED
