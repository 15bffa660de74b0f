"""The `graftmesh` command line.

Each agent owns the client side of its own verbs (e.g. `services.alerts.cli`),
imported lazily here; the supervisor process itself never imports them.

Exit codes (a public contract): 0 success (also `up` after a clean shutdown on
SIGINT/SIGTERM); 1 the command failed (e.g. no supervisor is running); 2 invalid
configuration or usage; 3 a required agent failed to become healthy; 4
infrastructure (NATS/Redis) unavailable.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from google.protobuf.json_format import MessageToDict
from rich.console import Console
from rich.table import Table

from common import security
from common.channels import open_sync_channel
from common.config import StartupConfig, load_config
from common.errors import ConfigError
from common.process import tail_lines
from common.stubs import common_pb2, supervisor_pb2, supervisor_pb2_grpc
from services.supervisor import check
from services.supervisor.exits import EXIT_CONFIG, EXIT_FAILED
from services.supervisor.process import log_path

app = typer.Typer(
    name="graftmesh",
    help="Graftmesh: grow neural networks while they train, on a supervised mesh of agents.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Piped output is not wrapped or cut at 80 columns: scripts and logs read it whole.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 240)
err = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 240)

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="startup_config.yaml (default: $GRAFTMESH_CONFIG, else ./startup_config.yaml)",
    ),
]
MachineOpt = Annotated[
    str | None, typer.Option("--machine", help="this machine (default: the config's `machine`)")
]


def _load(config: Path | None, machine: str | None = None) -> StartupConfig:
    try:
        return load_config(config, machine=machine)
    except ConfigError as exc:
        err.print("[bold red]invalid configuration:[/]")
        for problem in exc.problems:
            err.print(f"  {problem}", markup=False, highlight=False)
        raise typer.Exit(EXIT_CONFIG) from None


def _stub(cfg: StartupConfig) -> tuple[grpc.Channel, supervisor_pb2_grpc.SupervisorServiceStub]:
    channel = open_sync_channel(f"127.0.0.1:{cfg.supervisor.control_port}")
    return channel, supervisor_pb2_grpc.SupervisorServiceStub(channel)


def _call(cfg: StartupConfig, method: str, request: Any, timeout_s: float = 30.0) -> Any:
    """One control-API call; a clear message and exit 1 when no supervisor answers."""
    channel, stub = _stub(cfg)
    try:
        return getattr(stub, method)(request, timeout=timeout_s)
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        if code == grpc.StatusCode.UNAVAILABLE:
            err.print(
                f"no supervisor is running for this config (nothing on 127.0.0.1:"
                f"{cfg.supervisor.control_port}); start one with `graftmesh up`"
            )
        else:
            details = exc.details() if hasattr(exc, "details") else str(exc)
            err.print(f"{method} failed: {details}", markup=False)
        raise typer.Exit(EXIT_FAILED) from None
    finally:
        channel.close()


@app.command()
def up(
    config: ConfigOpt = None,
    group: Annotated[
        list[str] | None,
        typer.Option("--group", "-g", help="start only these groups (repeatable)"),
    ] = None,
    machine: MachineOpt = None,
) -> None:
    """Start the mesh (or this machine's groups of it) and supervise it until SIGINT/SIGTERM."""
    from services.supervisor.run import run_up

    cfg = _load(config, machine)
    _check_security()
    unknown = [g for g in group or [] if g not in cfg.agent_groups]
    if unknown:
        err.print(f"unknown group(s): {', '.join(unknown)}; known: {', '.join(cfg.agent_groups)}")
        raise typer.Exit(EXIT_CONFIG)
    raise typer.Exit(run_up(cfg, group or None, out, err))


def _check_security() -> None:
    """Unreadable token or TLS files stop a start with exit 2, before anything runs."""
    try:
        security.current()
    except ConfigError as exc:
        err.print("[bold red]invalid security settings:[/]")
        for problem in exc.problems:
            err.print(f"  {problem}", markup=False, highlight=False)
        raise typer.Exit(EXIT_CONFIG) from None


@app.command("agent")
def run_agent(
    name: str,
    config: ConfigOpt = None,
    machine: MachineOpt = None,
    bind: Annotated[
        str | None,
        typer.Option(
            "--bind", help="listen here (e.g. 0.0.0.0 in a container) instead of the machine's host"
        ),
    ] = None,
) -> None:
    """Run ONE agent in the foreground, without a supervisor (one container or pod per agent).

    It gets the environment the supervisor would give it; its container runtime
    or Kubernetes restarts it. NATS and Redis must already answer (nothing
    embedded is started here).
    """
    from services.supervisor.process import agent_argv, agent_environment

    cfg = _load(config, machine)
    _check_security()
    agents = cfg.agents()
    if name not in agents:
        err.print(f"unknown agent {name!r}; known: {', '.join(sorted(agents))}")
        raise typer.Exit(EXIT_CONFIG)
    assert cfg.source is not None
    env = agent_environment(
        agents[name],
        nats_url=cfg.infra.nats_url,
        redis_url=cfg.infra.redis_url,
        config_path=cfg.source,
        run_dir=cfg.run_dir.resolve(),
    )
    env.pop("GRAFTMESH_SUPERVISOR_PID")  # no supervisor watches this one
    if bind:
        env["GRAFTMESH_BIND_HOST"] = bind
    argv = agent_argv(agents[name])
    sys.stdout.flush()
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        err.print(f"cannot start {name}: {argv[0]}: {exc.strerror}", markup=False)
        raise typer.Exit(EXIT_FAILED) from None


@app.command()
def probe(
    agent_names: Annotated[
        list[str] | None, typer.Argument(metavar="[AGENT]...", help="agents to check")
    ] = None,
    *,
    group: Annotated[
        list[str] | None, typer.Option("--group", "-g", help="every agent of these groups")
    ] = None,
    config: ConfigOpt = None,
    machine: MachineOpt = None,
    timeout_s: Annotated[float, typer.Option("--timeout", help="seconds per check")] = 5.0,
    host: Annotated[
        str | None,
        typer.Option("--host", help="ask this address instead of each agent's machine host"),
    ] = None,
) -> None:
    """Ask agents for their health over the ZMQ protocol; exit 0 when all are up.

    No names and no groups: every agent of this machine's groups. Up means
    `healthy` or `degraded`; anything else (or no answer) exits 1. Used by
    container health checks; in a pod, `--host 127.0.0.1` asks the agent of this pod.
    """
    from common.health import HealthClient, HealthResult

    cfg = _load(config, machine)
    agents = cfg.agents()
    unknown = [n for n in agent_names or [] if n not in agents]
    unknown += [f"group {g}" for g in group or [] if g not in cfg.agent_groups]
    if unknown:
        err.print(f"unknown: {', '.join(unknown)}")
        raise typer.Exit(EXIT_CONFIG)
    if agent_names or group:
        names, groups = set(agent_names or ()), set(group or ())
        chosen = [a for n, a in agents.items() if n in names or a.group in groups]
    else:
        chosen = [a for a in agents.values() if a.machine == cfg.machine]

    async def sweep() -> dict[tuple[str, int], HealthResult]:
        client = HealthClient()
        try:
            targets = [(host or a.host, a.spec.health_check_port) for a in chosen]
            return await client.check_many(targets, timeout_s=timeout_s)
        finally:
            client.close()

    by_address = asyncio.run(sweep()) if chosen else {}
    results = [by_address[(host or a.host, a.spec.health_check_port)] for a in chosen]
    for agent, result in zip(chosen, results, strict=True):
        latency = f"{result.latency_s * 1000:.1f} ms" if result.latency_s is not None else "-"
        why = f" ({result.error})" if result.error else ""
        out.print(f"{agent.name}: {result.status.value} {latency}{why}", markup=False)
    if not all(r.is_up for r in results):
        raise typer.Exit(EXIT_FAILED)


@app.command()
def demo(config: ConfigOpt = None) -> None:
    """The main job: bring the mesh up, grow a model, register and serve it, provoke a fault."""
    from services.supervisor.demo import run_demo
    from services.supervisor.run import run_up

    cfg = _load(config)
    _check_security()
    raise typer.Exit(run_up(cfg, None, out, err, then=functools.partial(run_demo, out=out)))


@app.command()
def down(config: ConfigOpt = None) -> None:
    """Stop the running supervisor gracefully (agents in reverse dependency order)."""
    cfg = _load(config)
    reply = _call(cfg, "Shutdown", supervisor_pb2.ShutdownRequest(reason="graftmesh down"))
    out.print(f"stopping: {', '.join(reply.stopping_agents) or '(no agents)'}")


_STATE_STYLE = {
    "HEALTHY": "green",
    "DEGRADED": "yellow",
    "STARTING": "cyan",
    "PENDING": "dim",
    "UNHEALTHY": "red",
    "BACKOFF": "magenta",
    "FAILED": "bold red",
    "SKIPPED": "dim",
    "EXTERNAL": "blue",
    "STOPPED": "dim",
}


def _short(enum_value_name: str, prefix: str) -> str:
    return enum_value_name.removeprefix(prefix)


def _uptime(seconds: float) -> str:
    if seconds <= 0:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


@app.command()
def status(
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Show every agent: state, pid, uptime, restarts, breaker, last health."""
    cfg = _load(config)
    reply = _call(cfg, "GetStatus", supervisor_pb2.GetStatusRequest())
    if as_json:
        print(json.dumps(MessageToDict(reply, preserving_proto_field_name=True), indent=2))
        return
    mesh = _short(supervisor_pb2.MeshState.Name(reply.mesh_state), "MESH_STATE_")
    out.print(f"mesh [bold]{mesh}[/] on {reply.machine} (groups: {', '.join(reply.groups)})")
    table = Table(box=None, header_style="bold")
    for column in (
        "AGENT",
        "GROUP",
        "MACHINE",
        "STATE",
        "PID",
        "UPTIME",
        "RESTARTS",
        "BREAKER",
        "HEALTH",
        "LATENCY",
        "MESSAGE",
    ):
        table.add_column(column)
    for a in reply.agents:
        state = _short(supervisor_pb2.AgentState.Name(a.state), "AGENT_STATE_")
        health = common_pb2.HealthStatus.Name(a.last_health_status)
        table.add_row(
            a.agent,
            a.group,
            a.machine,
            f"[{_STATE_STYLE.get(state, '')}]{state}[/]",
            str(a.pid or "-"),
            _uptime(a.uptime_s),
            str(a.restarts),
            _short(supervisor_pb2.BreakerState.Name(a.breaker_state), "BREAKER_STATE_").lower(),
            _short(health, "HEALTH_STATUS_").lower(),
            f"{a.last_health_latency_ms:.1f}ms" if a.last_health_latency_ms else "-",
            a.message,
        )
    out.print(table)


@app.command()
def restart(agent: str, config: ConfigOpt = None) -> None:
    """Restart one agent now (its restart breaker is reset)."""
    cfg = _load(config)
    _call(cfg, "RestartAgent", supervisor_pb2.RestartAgentRequest(agent=agent, reset_breaker=True))
    out.print(f"restarting {agent}")


@app.command()
def stop(agent: str, config: ConfigOpt = None) -> None:
    """Stop one agent; it stays STOPPED until `graftmesh restart`."""
    cfg = _load(config)
    reply = _call(cfg, "StopAgent", supervisor_pb2.StopAgentRequest(agent=agent), timeout_s=120)
    out.print(
        f"{agent}: {_short(supervisor_pb2.AgentState.Name(reply.agent.state), 'AGENT_STATE_')}"
    )


@app.command()
def logs(
    agent: str,
    config: ConfigOpt = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing new lines")] = False,
    lines: Annotated[int, typer.Option("--lines", "-n", help="lines to show first")] = 50,
) -> None:
    """Show an agent's log (its stdout and stderr, as the supervisor captured them)."""
    cfg = _load(config)
    if agent not in cfg.agents():
        err.print(f"unknown agent {agent!r}; known: {', '.join(sorted(cfg.agents()))}")
        raise typer.Exit(EXIT_CONFIG)
    path = log_path(cfg.run_dir, agent)
    if not path.exists() and not follow:
        err.print(f"no log yet for {agent} ({path})")
        raise typer.Exit(EXIT_FAILED)
    text = tail_lines(path, lines)
    if text:
        print(text, flush=True)
    if follow:
        _follow(path)


def _follow(path: Path) -> None:
    """Print lines appended to `path` until Ctrl-C, following rotation."""
    position = path.stat().st_size if path.exists() else 0
    try:
        while True:
            size = path.stat().st_size if path.exists() else 0
            if size < position:  # rotated
                position = 0
            if size > position:
                with path.open("rb") as fh:
                    fh.seek(position)
                    chunk = fh.read()
                position += len(chunk)
                sys.stdout.write(chunk.decode("utf-8", errors="replace"))
                sys.stdout.flush()
            time.sleep(0.25)
    except KeyboardInterrupt:
        return


@app.command()
def alerts(
    *,
    config: ConfigOpt = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="keep printing new alerts")
    ] = False,
    severity: Annotated[
        str | None, typer.Option("--severity", "-s", help="this severity or worse")
    ] = None,
    last: Annotated[int, typer.Option("--last", "-n", help="recent alerts to show first")] = 20,
    agent: Annotated[str | None, typer.Option("--agent", help="only this agent's")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON alert per line")] = False,
) -> None:
    """Show the mesh's alerts (from the ALERTS stream on NATS), and follow new ones."""
    # Each agent owns the client side of its verbs; the CLI only gathers them.
    from services.alerts.cli import follow_alerts

    cfg = _load(config)
    raise typer.Exit(
        follow_alerts(
            cfg.infra.nats_url, follow, severity, out, last=last, agent=agent, as_json=as_json
        )
    )


@app.command()
def train(
    spec: Annotated[Path, typer.Argument(help="job spec (YAML); see README, Training")],
    config: ConfigOpt = None,
    detach: Annotated[bool, typer.Option("--detach", help="submit and return at once")] = False,
) -> None:
    """Submit a training job and show its progress until it ends."""
    from services.trainer import cli as trainer_cli

    raise typer.Exit(trainer_cli.train(_load(config), spec, detach, out))


@app.command()
def jobs(config: ConfigOpt = None) -> None:
    """List the trainer's jobs."""
    from services.trainer import cli as trainer_cli

    raise typer.Exit(trainer_cli.jobs(_load(config), out))


@app.command()
def job(job_id: str, config: ConfigOpt = None) -> None:
    """Show one job: state, progress, metrics, slots, result."""
    from services.trainer import cli as trainer_cli

    raise typer.Exit(trainer_cli.job(_load(config), job_id, out))


@app.command()
def cancel(job_id: str, config: ConfigOpt = None) -> None:
    """Cancel a queued or running job."""
    from services.trainer import cli as trainer_cli

    raise typer.Exit(trainer_cli.cancel(_load(config), job_id, out))


@app.command()
def models(
    name: Annotated[str | None, typer.Argument(help="a model: list its versions")] = None,
    config: ConfigOpt = None,
) -> None:
    """List registered models, or one model's versions with metrics and aliases."""
    from services.registry import cli as registry_cli

    raise typer.Exit(registry_cli.models(_load(config), out, name=name))


@app.command()
def promote(
    name: str,
    config: ConfigOpt = None,
    version: Annotated[
        int | None, typer.Option("--version", help="default: the canary's version")
    ] = None,
) -> None:
    """Move a model's `production` alias (to its canary by default)."""
    from services.registry import cli as registry_cli

    raise typer.Exit(registry_cli.promote(_load(config), name, out, version=version))


@app.command()
def rollback(
    name: str,
    config: ConfigOpt = None,
    alias: Annotated[str, typer.Option("--alias", help="the alias to move back")] = "production",
) -> None:
    """Move an alias back to where it pointed before its last change."""
    from services.registry import cli as registry_cli

    raise typer.Exit(registry_cli.rollback(_load(config), name, out, alias=alias))


@app.command()
def infer(
    name: str,
    inputs: Annotated[str, typer.Argument(help='JSON tensor, e.g. "[[0.1, 0.2]]", or {"x": ...}')],
    config: ConfigOpt = None,
    alias: Annotated[str, typer.Option("--alias")] = "production",
    version: Annotated[int | None, typer.Option("--version")] = None,
) -> None:
    """Run inference through the router and show the outputs and who served them."""
    from services.router import cli as router_cli

    raise typer.Exit(
        router_cli.infer(_load(config), name, inputs, out, alias=alias, version=version)
    )


@app.command("check-config")
def check_config(config: ConfigOpt = None, machine: MachineOpt = None) -> None:
    """Validate the config, and byte-compile and import-check every `module:` agent."""
    cfg = _load(config, machine)
    problems = asyncio.run(check.check_agents(cfg))
    if problems:
        err.print(f"[bold red]{len(problems)} problem(s):[/]")
        for problem in problems:
            err.print(f"  {problem}", markup=False, highlight=False)
        raise typer.Exit(EXIT_CONFIG)
    out.print(f"config OK: {len(cfg.agents())} agents in {len(cfg.agent_groups)} groups")


def main() -> None:
    app()
