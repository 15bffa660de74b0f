"""`graftmesh models|promote|rollback|infer` against a real registry agent and router agent."""

from __future__ import annotations

import io
import json
import re
import uuid
from collections.abc import Callable, Iterator

import pytest
import torch
from rich.console import Console

from common.config import StartupConfig, load_config
from services.registry import cli as registry_cli
from services.router import cli as router_cli
from tests.integration.test_router_agent import Mesh
from tests.integration.test_trainer_agent import write_config
from tests.ports import free_port
from tests.unit.router import model_factory as mf

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def mesh(
    tmp_path_factory: pytest.TempPathFactory, system_nats_url: str, system_redis_url: str
) -> Iterator[Mesh]:
    shared = Mesh(tmp_path_factory.mktemp("model-cli"), system_nats_url, system_redis_url)
    yield shared
    shared.close()


# A router and a registry that the config names but that never run.
DEAD_ROUTER = f"router-{uuid.uuid4().hex[:8]}"
DEAD_REGISTRY = f"registry-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def cfg(
    tmp_path_factory: pytest.TempPathFactory, system_nats_url: str, system_redis_url: str
) -> StartupConfig:
    """A config on the system NATS/Redis (where the live agents announce themselves) that
    also names a router and a registry on ports nothing listens on."""
    dead = {
        DEAD_ROUTER: {"module": "services.router"},
        DEAD_REGISTRY: {"module": "services.registry"},
    }
    agents = {
        n: {**e, "port": free_port(), "health_check_port": free_port()} for n, e in dead.items()
    }
    path = tmp_path_factory.mktemp("model-cli-config") / "startup_config.yaml"
    return load_config(write_config(path, system_nats_url, system_redis_url, agents))


def console() -> Console:
    return Console(file=io.StringIO(), width=1000, color_system=None)


def text(out: Console) -> str:
    return out.file.getvalue()  # type: ignore[attr-defined,no-any-return]


def _name() -> str:
    return f"m{uuid.uuid4().hex[:10]}"


def test_models_lists_versions_and_promote_and_rollback_move_production(
    mesh: Mesh, cfg: StartupConfig
) -> None:
    name = _name()
    mesh.register(name, mf.mlp(seed=1), aliases=("production",))
    mesh.register(name, mf.mlp(seed=2), aliases=("canary",))
    reg = mesh.registry.name

    listing = console()
    assert registry_cli.models(cfg, listing, agent=reg) == registry_cli.EXIT_OK
    row = next(line for line in text(listing).splitlines() if line.split()[:1] == [name])
    assert "v2" in row and "canary=v2" in row and "production=v1" in row

    versions = console()
    assert registry_cli.models(cfg, versions, name=name, agent=reg) == registry_cli.EXIT_OK
    rows = {line.split()[0]: line for line in text(versions).splitlines() if line.strip()}
    assert "canary" in rows["v2"] and "production" not in rows["v2"]
    assert "production" in rows["v1"]
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", rows["v1"])  # created time

    promoted = console()
    assert registry_cli.promote(cfg, name, promoted, agent=reg) == registry_cli.EXIT_OK
    assert f"{name}: production v1 -> v2" in text(promoted)
    assert mesh.alias_version(name, "production") == 2

    again = console()
    assert registry_cli.promote(cfg, name, again, version=2, agent=reg) == registry_cli.EXIT_OK
    assert "already at v2" in text(again)

    rolled = console()
    assert registry_cli.rollback(cfg, name, rolled, agent=reg) == registry_cli.EXIT_OK
    assert f"{name}: production v2 -> v1" in text(rolled)
    assert mesh.alias_version(name, "production") == 1

    explicit = console()
    assert registry_cli.promote(cfg, name, explicit, version=2, agent=reg) == registry_cli.EXIT_OK
    assert mesh.alias_version(name, "production") == 2


def test_promote_without_a_canary_and_rollback_without_history_are_refused(
    mesh: Mesh, cfg: StartupConfig
) -> None:
    name = _name()
    mesh.register(name, mf.mlp(), aliases=("production",))
    reg = mesh.registry.name
    no_canary = console()
    assert registry_cli.promote(cfg, name, no_canary, agent=reg) == registry_cli.EXIT_USAGE
    assert "no 'canary' alias" in text(no_canary)
    missing = console()
    assert registry_cli.promote(cfg, name, missing, version=9, agent=reg) == registry_cli.EXIT_USAGE
    nothing = console()
    assert registry_cli.rollback(cfg, name, nothing, agent=reg) == registry_cli.EXIT_FAILED
    assert "cannot roll production back" in text(nothing)
    assert mesh.alias_version(name, "production") == 1


def test_unknown_models_are_usage_errors_that_name_the_model(
    mesh: Mesh, cfg: StartupConfig
) -> None:
    unknown = _name()
    reg = mesh.registry.name
    calls: tuple[Callable[[Console], int], ...] = (
        lambda out: registry_cli.models(cfg, out, name=unknown, agent=reg),
        lambda out: registry_cli.promote(cfg, unknown, out, agent=reg),
        lambda out: registry_cli.promote(cfg, unknown, out, version=1, agent=reg),
        lambda out: registry_cli.rollback(cfg, unknown, out, agent=reg),
        lambda out: router_cli.infer(cfg, unknown, "[[0.0]]", out, agent=mesh.router.name),
    )
    for call in calls:
        out = console()
        assert call(out) == 2
        assert unknown in text(out)


def _printed_output(shown: str) -> torch.Tensor:
    line = next(line for line in shown.splitlines() if line.split()[:1] == ["output[0]"])
    return torch.tensor(json.loads(line.split("]", 2)[2].strip()))


def test_infer_prints_outputs_with_the_serving_version_replica_latency_and_cost(
    mesh: Mesh, cfg: StartupConfig
) -> None:
    name = _name()
    module = mf.mlp(seed=3)
    mesh.register(name, module, aliases=("production",))
    x = torch.randn(2, mf.IN_FEATURES)
    with torch.inference_mode():
        expected = module(x)
    router = mesh.router.name
    for inputs, version in ((json.dumps(x.tolist()), None), (json.dumps({"x": x.tolist()}), 1)):
        out = console()
        assert router_cli.infer(cfg, name, inputs, out, agent=router, version=version) == 0
        shown = text(out)
        assert f"float32[2, {mf.OUT_FEATURES}]" in shown
        assert torch.allclose(_printed_output(shown), expected, atol=1e-5)
        assert f"{name} v1" in shown and f"{name}-v1-r" in shown
        assert re.search(r"latency\s+\d+\.\d{3} ms", shown)
        assert re.search(r"cost\s+\d", shown)


def test_bad_inputs_are_usage_errors_naming_the_problem(mesh: Mesh, cfg: StartupConfig) -> None:
    name = _name()
    mesh.register(name, mf.mlp(), aliases=("production",))
    router = mesh.router.name
    for inputs, says in (
        ("not json", "not JSON"),
        ("[[1, 2], [3]]", "rows of different lengths"),
        ('{"x": "abc"}', "inputs[x]"),
        ("[[1.0, 2.0]]", "x"),  # the router names the input whose shape is wrong
    ):
        out = console()
        assert router_cli.infer(cfg, name, inputs, out, agent=router) == 2, inputs
        assert says in text(out)


def test_an_unreachable_router_or_registry_is_a_failed_command(cfg: StartupConfig) -> None:
    out = console()
    assert router_cli.infer(cfg, "m", "[[0.0]]", out, agent=DEAD_ROUTER) == 1
    assert f"the {DEAD_ROUTER} is not reachable" in text(out)
    out = console()
    assert registry_cli.models(cfg, out, agent=DEAD_REGISTRY) == 1
    assert f"the {DEAD_REGISTRY} is not reachable" in text(out)
    out = console()
    nobody = f"nobody-{uuid.uuid4().hex}"
    assert router_cli.infer(cfg, "m", "[[0.0]]", out, agent=nobody) == 1
    assert f"cannot find the {nobody}" in text(out)


def test_the_inputs_encoding_round_trips_through_the_wire_format() -> None:
    values = [[0.5, -1.25], [3.0, 4.0]]
    tensor = router_cli.encode_tensor(values)
    assert list(tensor.shape) == [2, 2]
    assert router_cli.decode_tensor(tensor) == values
