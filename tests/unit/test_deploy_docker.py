"""docker/: the image, the per-machine compose files and the infra configs, checked statically.

No Docker engine runs here, so each artifact is read and held against what it uses:
the Dockerfile's COPY sources exist and every `graftmesh` command line in it and in
the compose files parses against the real CLI; each machine's compose file runs
exactly that machine's groups of the config it mounts; nats.conf and redis.conf are
loaded by the bundled servers themselves.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.config import StartupConfig, load_config
from common.infra import nats_server_binary, redis_server_binary
from tests.unit.graftmesh_argv import parse_graftmesh

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
CONFIG = DOCKER / "config" / "startup_config.yaml"
MACHINES = ("mainpc", "pc2")
# What the issue asks of every agent health check (ML agents start slowly).
AGENT_HEALTHCHECK: dict[str, Any] = {
    "interval": "60s",
    "timeout": "30s",
    "retries": 5,
    "start_period": "120s",
}


# --- the CLI the artifacts call -------------------------------------------------------


def test_parse_graftmesh_refuses_unknown_verbs_and_options() -> None:
    assert list(parse_graftmesh(["graftmesh", "up", "--group", "ops"])[1]["group"]) == ["ops"]
    with pytest.raises(AssertionError, match="not a command"):
        parse_graftmesh(["graftmesh", "bogus"])
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        parse_graftmesh(["graftmesh", "probe", "--no-such-option"])


# --- Dockerfile -----------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped, with their stage."""
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    out: list[Instruction] = []
    stage = -1
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(keyword, args.strip(), stage))
    return out


def exec_form(args: str) -> list[str]:
    parsed = yaml.safe_load(args)
    assert isinstance(parsed, list), f"not exec (JSON) form: {args}"
    return [str(a) for a in parsed]


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


def _final(instructions: list[Instruction]) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def _arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    defaults: dict[str, str] = {}
    for i in instructions:
        if i.keyword == "ARG" and "=" in i.args:
            name, _, value = i.args.partition("=")
            defaults.setdefault(name, value)
    return defaults


def test_base_images_are_pinned_by_tag(dockerfile: list[Instruction]) -> None:
    defaults = _arg_defaults(dockerfile)
    stages = {i.args.split()[2] for i in dockerfile if i.keyword == "FROM" and " AS " in i.args}
    for i in dockerfile:
        if i.keyword != "FROM":
            continue
        image = i.args.split()[0]
        if image in stages:
            continue
        image = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], image)
        _, _, tag = image.partition(":")
        assert tag, f"FROM {image}: no tag"
        assert tag != "latest" and re.match(r"\d+\.\d+\.\d+", tag), f"{image}: not a pinned tag"


def test_copy_sources_exist_and_are_not_ignored(dockerfile: list[Instruction]) -> None:
    ignored = [
        line.strip()
        for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = []
    for i in dockerfile:
        if i.keyword not in ("COPY", "ADD"):
            continue
        parts = shlex.split(i.args)
        if any(p.startswith("--from") for p in parts):
            continue
        sources = [p for p in parts[:-1] if not p.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the build context"
            assert source not in ignored, f"COPY {source}: excluded by Dockerfile.dockerignore"
            copied.append(source)
    # What `pip install .` needs: the metadata, the pins, the readme it names, the packages.
    for needed in ("pyproject.toml", "constraints.txt", "README.md", "common", "services"):
        assert needed in copied


def test_the_runtime_user_is_not_root(dockerfile: list[Instruction]) -> None:
    users = [i.args for i in _final(dockerfile) if i.keyword == "USER"]
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    # Numeric, so Kubernetes' runAsNonRoot can verify it; the manifests run as that uid.
    assert user.isdigit()
    for path in (ROOT / "deploy" / "base").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "Deployment":
                ctx = doc["spec"]["template"]["spec"]["securityContext"]
                assert str(ctx["runAsUser"]) == user, path.name


def test_dependencies_install_through_the_constraints(dockerfile: list[Instruction]) -> None:
    installs = [i.args for i in dockerfile if i.keyword == "RUN" and "pip install" in i.args]
    assert installs
    for command in installs:
        words = shlex.split(command.split("&&")[0])
        assert words[words.index("-c") + 1] == "constraints.txt", command
    defaults = _arg_defaults(dockerfile)
    # CPU torch unless the build asks for a CUDA index.
    assert defaults["TORCH_VARIANT"] == "cpu"
    assert "${TORCH_VARIANT}" in defaults["TORCH_INDEX_URL"]
    assert any("${TORCH_INDEX_URL}" in c for c in installs)
    torch_pins = [
        line
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line.startswith("torch==")
    ]
    assert torch_pins, "constraints.txt does not pin torch"


def test_entrypoint_and_healthcheck_are_real_commands(dockerfile: list[Instruction]) -> None:
    final = {i.keyword: i.args for i in _final(dockerfile)}
    entrypoint = exec_form(final["ENTRYPOINT"])
    assert entrypoint == ["graftmesh"]
    verb, _ = parse_graftmesh(entrypoint + exec_form(final["CMD"]))
    assert verb == "up"
    # The agent verb the Kubernetes manifests run through this entrypoint.
    assert parse_graftmesh(["graftmesh", "agent", "router", "--bind", "0.0.0.0"])[0] == "agent"

    health = final["HEALTHCHECK"]
    options = dict(re.findall(r"--([\w-]+)=(\S+)", health))
    assert options == {
        "interval": AGENT_HEALTHCHECK["interval"],
        "timeout": AGENT_HEALTHCHECK["timeout"],
        "start-period": AGENT_HEALTHCHECK["start_period"],
        "retries": str(AGENT_HEALTHCHECK["retries"]),
    }
    command = exec_form(health.split(" CMD ", 1)[1])
    verb, params = parse_graftmesh(command)
    assert verb == "probe"
    assert params["timeout_s"] < _seconds(AGENT_HEALTHCHECK["timeout"])


def test_the_image_carries_the_compose_config_and_exposes_its_ports(
    dockerfile: list[Instruction],
) -> None:
    final = _final(dockerfile)
    copies = [shlex.split(i.args) for i in final if i.keyword == "COPY"]
    env = " ".join(i.args for i in final if i.keyword == "ENV")
    config_target = re.search(r"GRAFTMESH_CONFIG=(\S+)", env)
    assert config_target
    assert ["docker/config/startup_config.yaml", config_target.group(1)] in copies
    exposed = {int(p) for i in final if i.keyword == "EXPOSE" for p in i.args.split()}
    cfg = load_config(CONFIG)
    wanted = {cfg.supervisor.control_port}
    for agent in cfg.agents().values():
        spec = agent.spec
        wanted |= {p for p in (spec.port, spec.health_check_port, spec.effective_metrics_port) if p}
    assert wanted <= exposed, f"not exposed: {sorted(wanted - exposed)}"


# --- the compose config ---------------------------------------------------------------


def test_the_compose_config_is_valid_for_each_machine() -> None:
    reference = load_config(ROOT / "startup_config.yaml")
    for machine in MACHINES:
        cfg = load_config(CONFIG, machine=machine)
        assert cfg.machine == machine
        assert cfg.infra.embedded == "never"
        assert cfg.machines[machine].host == machine
        assert Path(cfg.supervisor.run_dir).is_absolute()
        # The same agents on the same ports as the one-machine mesh, only spread out.
        assert {n: _ports(a.spec) for n, a in cfg.agents().items()} == {
            n: _ports(a.spec) for n, a in reference.agents().items()
        }
    cfg = load_config(CONFIG)
    placement = {name: group.machine for name, group in cfg.agent_groups.items()}
    assert placement == {
        "training": "mainpc",
        "growth": "mainpc",
        "ops": "mainpc",
        "serving": "pc2",
    }


def _ports(spec: Any) -> tuple[int | None, int, int | None]:
    return (spec.port, spec.health_check_port, spec.effective_metrics_port)


@pytest.mark.slow
def test_check_config_accepts_the_compose_config() -> None:
    """`graftmesh check-config` also import-checks every agent module, as the image will.

    Once, as pc2 (not the file's default machine); the modules are the same for both.
    """
    proc = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "graftmesh"), "check-config", "--config", str(CONFIG)],
        env={**os.environ, "GRAFTMESH_MACHINE": "pc2"},
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- compose files --------------------------------------------------------------------


class ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's merge tags (`!reset`, `!override`) kept as plain values."""


def _tagged(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node)
    return loader.construct_scalar(node)  # type: ignore[arg-type]


ComposeLoader.add_constructor("!reset", _tagged)
ComposeLoader.add_constructor("!override", _tagged)


def load_compose(name: str) -> dict[str, Any]:
    data = yaml.load((DOCKER / name).read_text(encoding="utf-8"), Loader=ComposeLoader)
    assert isinstance(data, dict)
    return data


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m|h)", value)
    assert match, value
    return int(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def _mesh_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in compose["services"].items()
        if svc.get("command") and svc["command"][0] == "up"
    }


def _mounted_config(service: dict[str, Any]) -> tuple[Path, str]:
    target = service["environment"]["GRAFTMESH_CONFIG"]
    for volume in service["volumes"]:
        source, _, rest = volume.partition(":")
        if rest.split(":")[0] == target:
            return (DOCKER / source).resolve(), target
    raise AssertionError(f"nothing is mounted at GRAFTMESH_CONFIG={target}")


@pytest.fixture(params=MACHINES)
def machine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def compose(machine: str) -> dict[str, Any]:
    return load_compose(f"docker-compose.{machine}.yml")


@pytest.fixture
def mesh(compose: dict[str, Any]) -> dict[str, Any]:
    services = _mesh_services(compose)
    # One supervisor per machine: the control port is the machine's.
    assert len(services) == 1, sorted(services)
    return next(iter(services.values()))


@pytest.fixture
def cfg(machine: str, mesh: dict[str, Any]) -> StartupConfig:
    path, _ = _mounted_config(mesh)
    assert path == CONFIG.resolve()
    return load_config(path, machine=mesh["environment"]["GRAFTMESH_MACHINE"])


def test_each_machine_runs_exactly_its_groups(
    machine: str, mesh: dict[str, Any], cfg: StartupConfig
) -> None:
    assert mesh["environment"]["GRAFTMESH_MACHINE"] == machine
    verb, params = parse_graftmesh(["graftmesh", *mesh["command"]])
    assert verb == "up"
    mine = {name for name, group in cfg.agent_groups.items() if group.machine == machine}
    assert mine
    assert set(params["group"]) == mine


def test_every_group_runs_on_exactly_one_machine() -> None:
    cfg = load_config(CONFIG)
    seen: list[str] = []
    for machine in MACHINES:
        (mesh,) = _mesh_services(load_compose(f"docker-compose.{machine}.yml")).values()
        seen += parse_graftmesh(["graftmesh", *mesh["command"]])[1]["group"]
    assert sorted(seen) == sorted(cfg.agent_groups)


def test_the_mesh_health_check_probes_its_agents_over_zmq(
    machine: str, mesh: dict[str, Any], cfg: StartupConfig
) -> None:
    check = mesh["healthcheck"]
    assert {k: check[k] for k in AGENT_HEALTHCHECK} == AGENT_HEALTHCHECK
    test = check["test"]
    assert test[0] == "CMD"
    verb, params = parse_graftmesh(test[1:])
    assert verb == "probe"
    _, up = parse_graftmesh(["graftmesh", *mesh["command"]])
    assert set(params["group"]) == set(up["group"])
    # A probe that waits longer than Docker does would be killed, not answered.
    assert params["timeout_s"] < _seconds(check["timeout"])


def test_infra_is_a_healthy_dependency(compose: dict[str, Any], mesh: dict[str, Any]) -> None:
    depends = mesh["depends_on"]
    assert depends, "the mesh waits for nothing"
    for name, condition in depends.items():
        assert condition == {"condition": "service_healthy"}, name
        dependency = compose["services"][name]
        assert dependency["healthcheck"]["test"], name


def test_every_service_restarts_unless_stopped(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        assert service["restart"] == "unless-stopped", name
        assert "healthcheck" in service, name


def test_the_machine_that_runs_the_trainer_reserves_a_gpu(
    machine: str, mesh: dict[str, Any], cfg: StartupConfig
) -> None:
    runs_trainer = cfg.agents()["trainer"].machine == machine
    devices = mesh.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
    if not runs_trainer:
        assert not devices
        return
    assert devices
    assert any("gpu" in d["capabilities"] and d["driver"] == "nvidia" for d in devices)
    # ... and the CPU override removes exactly that.
    override = load_compose(f"docker-compose.{machine}.cpu.yml")
    (name,) = override["services"]
    assert override["services"][name] == {"deploy": {}}
    assert name in _mesh_services(load_compose(f"docker-compose.{machine}.yml"))


def test_state_lives_in_volumes(
    compose: dict[str, Any], mesh: dict[str, Any], cfg: StartupConfig
) -> None:
    mounts = {}
    for volume in mesh["volumes"]:
        source, target = volume.split(":")[:2]
        mounts[target] = source
    run_dir = cfg.run_dir
    assert str(run_dir) in mounts
    local = {a.name for a in cfg.agents().values() if a.machine == cfg.machine}
    expected = {
        "compiler": run_dir / "compiler" / "kernels",
        "registry": run_dir / "registry",
        "trainer": run_dir / "trainer",
    }
    for agent, path in expected.items():
        if agent in local:
            assert str(path) in mounts, f"{agent}: {path} is not a volume"
    named = {s for t, s in mounts.items() if not s.startswith(".")}
    assert named <= set(compose["volumes"])
    # Named volumes start as a copy of the image's folder, owned by its user.
    dockerfile = DOCKERFILE.read_text()
    for target, source in mounts.items():
        if source in named:
            assert target in dockerfile, f"{target}: not created in the image"


def test_hosts_network_and_infra_urls_agree_with_the_config(
    machine: str, compose: dict[str, Any], mesh: dict[str, Any], cfg: StartupConfig
) -> None:
    assert mesh["network_mode"] == "host"
    hosts = {entry.split(":")[0] for entry in mesh["extra_hosts"]}
    assert {m.host for m in cfg.machines.values()} <= hosts
    env = mesh["environment"]
    for key, config_url in (
        ("GRAFTMESH_NATS_URL", cfg.infra.nats_url),
        ("GRAFTMESH_REDIS_URL", cfg.infra.redis_url),
    ):
        url = env[key]
        # Only the credentials differ from the config's URL.
        assert re.sub(r"//.*@", "//", url) == config_url, key
        assert "${" in url, f"{key}: credentials must come from the environment"
    assert env["GRAFTMESH_TOKEN"].startswith("${GRAFTMESH_TOKEN")
    if "nats" in compose["services"]:
        published = {p.split(":")[-2] for p in compose["services"]["nats"]["ports"]}
        assert str(cfg.infra.nats_url.rsplit(":", 1)[1]) in published
        published = {p.split(":")[-2] for p in compose["services"]["redis"]["ports"]}
        assert cfg.infra.redis_url.rsplit(":", 1)[1].split("/")[0] in published


def test_the_env_example_documents_every_variable() -> None:
    documented = {
        line.split("=", 1)[0]
        for line in (DOCKER / ".env.example").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    }
    for machine in MACHINES:
        text = (DOCKER / f"docker-compose.{machine}.yml").read_text()
        used = set(re.findall(r"(?<!\$)\$\{(\w+)", text))
        assert used <= documented, f"{machine}: undocumented {sorted(used - documented)}"


# --- infra configs --------------------------------------------------------------------


def _directives(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            out[key] = value.strip()
    return out


def test_redis_conf_has_the_required_settings() -> None:
    directives = _directives(DOCKER / "config" / "redis.conf")
    assert directives["maxmemory"] == "2gb"
    assert directives["maxmemory-policy"] == "allkeys-lru"
    assert directives["appendonly"] == "yes"
    assert directives["appendfsync"] == "everysec"
    assert "requirepass" not in directives  # the password comes from the environment


def test_redis_loads_redis_conf(tmp_path: Path) -> None:
    """The bundled redis-server starts from the file (on a socket, not a port) and reports it."""
    socket = tmp_path / "redis.sock"
    server = subprocess.Popen(
        [
            str(redis_server_binary()),
            str(DOCKER / "config" / "redis.conf"),
            *("--port", "0", "--unixsocket", str(socket)),
            *("--requirepass", "test-password"),
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while not socket.exists():
            assert server.poll() is None, server.stdout.read().decode() if server.stdout else ""
            assert time.monotonic() < deadline, "redis-server did not open its socket"
            time.sleep(0.05)
        cli = redis_server_binary().with_name("redis-cli")
        got = subprocess.run(
            [
                str(cli),
                "-s",
                str(socket),
                "--no-auth-warning",
                "-a",
                "test-password",
                "CONFIG",
                "GET",
                "maxmemory*",
            ],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.split()
        settings = dict(zip(got[::2], got[1::2], strict=True))
        assert settings["maxmemory"] == str(2 * 1024**3)
        assert settings["maxmemory-policy"] == "allkeys-lru"
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_nats_server_accepts_nats_conf() -> None:
    conf = DOCKER / "config" / "nats.conf"
    text = conf.read_text()
    assert re.search(r"^jetstream\s*\{", text, re.M)
    assert re.search(r"^authorization\s*\{", text, re.M)
    env = {**os.environ, "NATS_PASSWORD": "a", "NATS_READER_PASSWORD": "b"}
    proc = subprocess.run(
        [str(nats_server_binary()), "-c", str(conf), "-t"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Without the passwords the server refuses to start: no default credentials.
    env.pop("NATS_PASSWORD")
    proc = subprocess.run(
        [str(nats_server_binary()), "-c", str(conf), "-t"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode != 0
    assert "NATS_PASSWORD" in proc.stdout + proc.stderr
