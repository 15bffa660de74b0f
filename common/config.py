"""`startup_config.yaml` (version 1): typed models, the one loader, and validation.

Every problem is reported with the path of the offending key, agent or cycle, and
all problems are reported at once, so an operator fixes the file in one pass.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.errors import ConfigError

DEFAULT_CONFIG_FILE = "startup_config.yaml"

Port = int
# Environment variables that replace `infra.*` URLs (the same ones every agent gets).
INFRA_URL_ENV = {"nats_url": "GRAFTMESH_NATS_URL", "redis_url": "GRAFTMESH_REDIS_URL"}
METRICS_PORT_OFFSET = 1000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HealthCheckSettings(_Strict):
    interval_s: float = Field(5.0, gt=0)
    timeout_s: float = Field(1.0, gt=0)
    retries: int = Field(3, ge=1)
    start_period_s: float = Field(30.0, ge=0)


class RestartSettings(_Strict):
    policy: Literal["always", "on-failure", "never"] = "on-failure"
    backoff_initial_s: float = Field(0.5, gt=0)
    backoff_max_s: float = Field(30.0, gt=0)


class CircuitBreakerSettings(_Strict):
    failure_threshold: int = Field(5, ge=1)
    window_s: float = Field(60.0, gt=0)
    reset_timeout_s: float = Field(60.0, gt=0)


class Settings(_Strict):
    """Defaults for every agent; each agent may override any of them."""

    health_check: HealthCheckSettings = HealthCheckSettings()
    restart: RestartSettings = RestartSettings()
    circuit_breaker: CircuitBreakerSettings = CircuitBreakerSettings()
    stop_grace_s: float = Field(10.0, gt=0)


class Resources(_Strict):
    vram_budget_pct: float | None = Field(None, gt=0, le=100)
    vram_limit_mb: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_of(self) -> Resources:
        if self.vram_budget_pct is not None and self.vram_limit_mb is not None:
            raise ValueError("give either vram_budget_pct or vram_limit_mb, not both")
        return self


class AgentSpec(_Strict):
    module: str | None = None
    command: list[str] | None = None
    port: Port | None = Field(None, ge=1, le=65535)
    health_check_port: Port = Field(..., ge=1, le=65535)
    # Prometheus scrape port; omitted: health_check_port + METRICS_PORT_OFFSET; 0: none.
    metrics_port: Port | None = Field(None, ge=0, le=65535)
    required: bool = True
    dependencies: list[str] = []
    readiness: Literal["health", "redis", "both"] = "health"
    env: dict[str, str] = {}
    args: list[str] = []
    restart_dependents: bool = False
    resources: Resources | None = None
    # Per-agent overrides of `settings` (partial: only the keys given).
    health_check: dict[str, Any] | None = None
    restart: dict[str, Any] | None = None
    circuit_breaker: dict[str, Any] | None = None
    stop_grace_s: float | None = Field(None, gt=0)

    @property
    def effective_metrics_port(self) -> int | None:
        if self.metrics_port is None:
            derived = self.health_check_port + METRICS_PORT_OFFSET
            return derived if derived <= 65535 else None
        return self.metrics_port or None

    @model_validator(mode="after")
    def _module_or_command(self) -> AgentSpec:
        if (self.module is None) == (self.command is None):
            raise ValueError("give exactly one of 'module' or 'command'")
        if self.command is not None and not self.command:
            raise ValueError("'command' must not be empty")
        return self


class AgentGroup(_Strict):
    machine: str
    agents: dict[str, AgentSpec]


class MachineSpec(_Strict):
    host: str = "127.0.0.1"


class InfraConfig(_Strict):
    nats_url: str = "nats://127.0.0.1:4222"
    redis_url: str = "redis://127.0.0.1:6379/0"
    embedded: Literal["auto", "always", "never"] = "auto"


class SupervisorConfig(_Strict):
    control_port: Port = Field(5570, ge=1, le=65535)
    run_dir: str = ".graftmesh"


class Agent(BaseModel):
    """One agent as the supervisor sees it: its spec, its place and its effective settings."""

    model_config = ConfigDict(frozen=True)

    name: str
    group: str
    machine: str
    host: str
    spec: AgentSpec
    settings: Settings


class StartupConfig(_Strict):
    version: Literal[1]
    machine: str
    infra: InfraConfig = InfraConfig()
    supervisor: SupervisorConfig = SupervisorConfig()
    settings: Settings = Settings()
    machines: dict[str, MachineSpec]
    agent_groups: dict[str, AgentGroup] = {}

    # Where the file was loaded from; agents get it as GRAFTMESH_CONFIG.
    source: Path | None = Field(None, exclude=True)

    @property
    def run_dir(self) -> Path:
        """`supervisor.run_dir`, relative paths taken from the config file's folder."""
        run_dir = Path(self.supervisor.run_dir)
        if run_dir.is_absolute() or self.source is None:
            return run_dir
        return self.source.parent / run_dir

    def agents(self) -> dict[str, Agent]:
        """Every agent of every group, by name, with its effective settings."""
        out: dict[str, Agent] = {}
        for group_name, group in self.agent_groups.items():
            host = self.machines[group.machine].host
            for name, spec in group.agents.items():
                out[name] = Agent(
                    name=name,
                    group=group_name,
                    machine=group.machine,
                    host=host,
                    spec=spec,
                    settings=merge_settings(self.settings, spec),
                )
        return out

    def agent(self, name: str) -> Agent:
        agents = self.agents()
        if name not in agents:
            raise ConfigError([f"unknown agent {name!r}; known: {', '.join(sorted(agents))}"])
        return agents[name]


def merge_settings(defaults: Settings, spec: AgentSpec) -> Settings:
    """The agent's settings: the defaults with the agent's overrides laid on top."""
    merged = defaults.model_dump()
    for key in ("health_check", "restart", "circuit_breaker"):
        override = getattr(spec, key)
        if override:
            merged[key] = {**merged[key], **override}
    if spec.stop_grace_s is not None:
        merged["stop_grace_s"] = spec.stop_grace_s
    return Settings.model_validate(merged)


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """A dependency cycle as a closed path (`[a, b, a]`), or None when the graph is acyclic.

    Only edges to nodes of the graph count; unknown names are reported elsewhere.
    """
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(graph, white)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        color[node] = grey
        stack.append(node)
        for dep in sorted(graph[node]):
            if dep not in color:
                continue
            if color[dep] == grey:
                return [*stack[stack.index(dep) :], dep]
            if color[dep] == white and (cycle := visit(dep)):
                return cycle
        stack.pop()
        color[node] = black
        return None

    for node in sorted(graph):
        if color[node] == white and (cycle := visit(node)):
            return cycle
    return None


def _format_loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "<root>"


def _pydantic_problems(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        # Drop pydantic's internal model-validator frame names from the path.
        loc = tuple(p for p in e["loc"] if not str(p).startswith("function-"))
        if e["type"] == "extra_forbidden":
            problems.append(f"{_format_loc(loc)}: unknown key")
        elif e["type"] == "missing":
            problems.append(f"{_format_loc(loc)}: required key is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            problems.append(f"{_format_loc(loc)}: {msg}")
    return problems


def _cross_check(cfg: StartupConfig) -> list[str]:
    problems: list[str] = []
    if cfg.machine not in cfg.machines:
        problems.append(
            f"machine: {cfg.machine!r} is not one of machines ({', '.join(cfg.machines)})"
        )
    owner: dict[str, str] = {}
    for group_name, group in cfg.agent_groups.items():
        if group.machine not in cfg.machines:
            problems.append(f"agent_groups.{group_name}.machine: unknown machine {group.machine!r}")
        for name in group.agents:
            if name in owner:
                problems.append(
                    f"agent_groups.{group_name}.agents.{name}: duplicate agent "
                    f"(also in group {owner[name]!r})"
                )
            else:
                owner[name] = group_name
    # Ports must be unique per host: two machines on one host share its ports.
    # Every machine runs a supervisor on control_port, so no agent may take it anywhere.
    taken: dict[tuple[str, int], str] = {}
    for group_name, group in cfg.agent_groups.items():
        host = cfg.machines[group.machine].host if group.machine in cfg.machines else "?"
        taken.setdefault((host, cfg.supervisor.control_port), "supervisor.control_port")
        for name, spec in group.agents.items():
            path = f"agent_groups.{group_name}.agents.{name}"
            ports = {
                "port": spec.port,
                "health_check_port": spec.health_check_port,
                "metrics_port": spec.effective_metrics_port,
            }
            for key, port in ports.items():
                if port is None:
                    continue
                where = f"{path}.{key}"
                if (host, port) in taken:
                    problems.append(f"{where}: duplicate port {port} (also {taken[(host, port)]})")
                else:
                    taken[(host, port)] = where
            try:
                merge_settings(cfg.settings, spec)
            except ValidationError as err:
                problems.extend(f"{path}.{p}" for p in _pydantic_problems(err))
            for dep in spec.dependencies:
                if dep not in owner:
                    problems.append(f"{path}.dependencies: unknown dependency {dep!r}")
                elif dep == name:
                    problems.append(f"{path}.dependencies: an agent cannot depend on itself")
    graph = {
        name: [d for d in spec.dependencies if d != name]
        for group in cfg.agent_groups.values()
        for name, spec in group.agents.items()
    }
    if cycle := find_cycle(graph):
        problems.append("dependency cycle: " + " -> ".join(cycle))
    return problems


def parse_config(data: Any, source: Path | None = None) -> StartupConfig:
    """Validate an already-parsed config document; raise ConfigError with every problem."""
    if not isinstance(data, dict):
        raise ConfigError(["<root>: the config must be a mapping"])
    try:
        cfg = StartupConfig.model_validate({**data, "source": source})
    except ValidationError as err:
        raise ConfigError(_pydantic_problems(err)) from None
    if problems := _cross_check(cfg):
        raise ConfigError(problems)
    return cfg


def resolve_config_path(path: str | os.PathLike[str] | None = None) -> Path:
    """`--config F`, else `$GRAFTMESH_CONFIG`, else `./startup_config.yaml`."""
    chosen = path or os.environ.get("GRAFTMESH_CONFIG") or DEFAULT_CONFIG_FILE
    return Path(chosen).expanduser().resolve()


def load_config(
    path: str | os.PathLike[str] | None = None, *, machine: str | None = None
) -> StartupConfig:
    """Load and validate the config.

    `machine` (or `$GRAFTMESH_MACHINE`) overrides `machine:`; `$GRAFTMESH_NATS_URL` and
    `$GRAFTMESH_REDIS_URL` override `infra.nats_url` and `infra.redis_url`.
    """
    source = resolve_config_path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError([f"{source}: cannot read the config ({err.strerror})"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError([f"{source}: invalid YAML at {where}: {problem}"]) from None
    override = machine or os.environ.get("GRAFTMESH_MACHINE")
    if override and isinstance(data, dict):
        data = {**data, "machine": override}
    # The infra URLs may carry credentials, which belong in the environment, not the file.
    infra_env = {key: os.environ[var] for key, var in INFRA_URL_ENV.items() if os.environ.get(var)}
    if infra_env and isinstance(data, dict):
        infra = data.get("infra")
        data = {**data, "infra": {**(infra if isinstance(infra, dict) else {}), **infra_env}}
    return parse_config(data, source)
