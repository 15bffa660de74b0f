"""startup_config.yaml: the schema, the loader and every validation error's wording."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.config import (
    find_cycle,
    load_config,
    merge_settings,
    parse_config,
    resolve_config_path,
)
from common.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _base() -> dict[str, Any]:
    return {
        "version": 1,
        "machine": "mainpc",
        "machines": {"mainpc": {"host": "127.0.0.1"}, "pc2": {"host": "10.0.0.2"}},
        "agent_groups": {
            "core": {
                "machine": "mainpc",
                "agents": {
                    "registry": {
                        "module": "services.registry",
                        "port": 50051,
                        "health_check_port": 50151,
                    },
                    "router": {
                        "module": "services.router",
                        "port": 50052,
                        "health_check_port": 50152,
                        "dependencies": ["registry"],
                    },
                },
            },
            "gpu": {
                "machine": "pc2",
                "agents": {
                    "trainer": {
                        "command": ["/bin/trainer"],
                        "health_check_port": 50153,
                        "dependencies": ["registry"],
                        "restart": {"policy": "always"},
                        "health_check": {"retries": 7},
                    },
                },
            },
        },
    }


def _problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.problems


def test_repository_default_config_is_valid() -> None:
    cfg = load_config(ROOT / "startup_config.yaml")
    assert cfg.version == 1
    assert cfg.machine in cfg.machines


def test_defaults_fill_unset_sections() -> None:
    cfg = parse_config(_base())
    assert cfg.infra.embedded == "auto"
    assert cfg.supervisor.control_port == 5570
    assert cfg.settings.health_check.start_period_s == 30


def test_agent_settings_merge_overrides_onto_defaults() -> None:
    cfg = parse_config(_base())
    trainer = cfg.agent("trainer")
    assert trainer.settings.restart.policy == "always"
    assert trainer.settings.restart.backoff_max_s == 30  # untouched default kept
    assert trainer.settings.health_check.retries == 7
    assert trainer.settings.health_check.interval_s == 5
    assert cfg.agent("registry").settings.restart.policy == "on-failure"
    assert trainer.host == "10.0.0.2" and trainer.group == "gpu" and trainer.machine == "pc2"


def test_unknown_key_is_reported_with_its_path() -> None:
    data = _base()
    data["agent_groups"]["core"]["agents"]["registry"]["portt"] = 1
    assert _problems(data) == ["agent_groups.core.agents.registry.portt: unknown key"]


def test_unknown_top_level_key() -> None:
    data = _base()
    data["extras"] = {}
    assert _problems(data) == ["extras: unknown key"]


def test_unknown_key_in_settings_override_is_reported() -> None:
    data = _base()
    data["agent_groups"]["gpu"]["agents"]["trainer"]["restart"] = {"polcy": "always"}
    assert _problems(data) == ["agent_groups.gpu.agents.trainer.restart.polcy: unknown key"]


def test_missing_health_check_port_is_reported() -> None:
    data = _base()
    del data["agent_groups"]["core"]["agents"]["registry"]["health_check_port"]
    assert _problems(data) == [
        "agent_groups.core.agents.registry.health_check_port: required key is missing"
    ]


def test_module_and_command_together_are_rejected() -> None:
    data = _base()
    data["agent_groups"]["core"]["agents"]["registry"]["command"] = ["x"]
    assert _problems(data) == [
        "agent_groups.core.agents.registry: give exactly one of 'module' or 'command'"
    ]


def test_wrong_version_is_rejected() -> None:
    data = _base()
    data["version"] = 2
    (problem,) = _problems(data)
    assert problem.startswith("version: ")


def test_duplicate_agent_across_groups() -> None:
    data = _base()
    data["agent_groups"]["gpu"]["agents"]["registry"] = {"module": "m", "health_check_port": 50999}
    assert _problems(data) == [
        "agent_groups.gpu.agents.registry: duplicate agent (also in group 'core')"
    ]


def test_duplicate_port_on_one_host() -> None:
    data = _base()
    data["agent_groups"]["core"]["agents"]["router"]["health_check_port"] = 50051
    assert _problems(data) == [
        "agent_groups.core.agents.router.health_check_port: duplicate port 50051 "
        "(also agent_groups.core.agents.registry.port)"
    ]


def test_same_port_on_different_hosts_is_allowed() -> None:
    data = _base()
    data["agent_groups"]["gpu"]["agents"]["trainer"]["health_check_port"] = 50151
    parse_config(data)


def test_agent_port_may_not_take_the_control_port() -> None:
    data = _base()
    data["agent_groups"]["core"]["agents"]["router"]["port"] = 5570
    assert _problems(data) == [
        "agent_groups.core.agents.router.port: duplicate port 5570 (also supervisor.control_port)"
    ]


def test_derived_metrics_port_collision_is_reported() -> None:
    data = _base()
    data["agent_groups"]["core"]["agents"]["router"]["port"] = 51151  # registry's metrics port
    (problem,) = _problems(data)
    assert "duplicate port 51151" in problem and "registry.metrics_port" in problem


def test_unknown_dependency() -> None:
    data = _base()
    data["agent_groups"]["core"]["agents"]["router"]["dependencies"] = ["registy"]
    assert _problems(data) == [
        "agent_groups.core.agents.router.dependencies: unknown dependency 'registy'"
    ]


def test_dependency_cycle_is_printed_as_a_path() -> None:
    data = _base()
    data["agent_groups"]["core"]["agents"]["registry"]["dependencies"] = ["trainer"]
    assert _problems(data) == ["dependency cycle: registry -> trainer -> registry"]


def test_three_node_cycle() -> None:
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b"], "b": ["c"], "c": []}) is None
    assert find_cycle({"a": ["b", "c"], "b": ["d"], "c": ["d"], "d": []}) is None


def test_group_on_unknown_machine() -> None:
    data = _base()
    data["agent_groups"]["gpu"]["machine"] = "pc3"
    assert "agent_groups.gpu.machine: unknown machine 'pc3'" in _problems(data)


def test_all_problems_are_reported_at_once() -> None:
    data = _base()
    data["agent_groups"]["core"]["agents"]["router"]["dependencies"] = ["nope"]
    data["agent_groups"]["gpu"]["machine"] = "pc3"
    assert len(_problems(data)) == 2


def test_resources_take_one_budget_only() -> None:
    data = _base()
    data["agent_groups"]["gpu"]["agents"]["trainer"]["resources"] = {
        "vram_budget_pct": 50,
        "vram_limit_mb": 1000,
    }
    (problem,) = _problems(data)
    assert problem.startswith("agent_groups.gpu.agents.trainer.resources: give either")


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("version: 1\nmachine: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "invalid YAML at line" in str(info.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config"):
        load_config(tmp_path / "absent.yaml")


def test_machine_override_from_argument_and_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_base()))
    assert load_config(path, machine="pc2").machine == "pc2"
    monkeypatch.setenv("GRAFTMESH_MACHINE", "pc2")
    assert load_config(path).machine == "pc2"


def test_infra_urls_from_the_environment_replace_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**_base(), "infra": {"embedded": "never"}}))
    monkeypatch.delenv("GRAFTMESH_NATS_URL", raising=False)
    monkeypatch.setenv("GRAFTMESH_REDIS_URL", "redis://:s3cret@10.0.0.1:6379/2")
    cfg = load_config(path)
    assert cfg.infra.redis_url == "redis://:s3cret@10.0.0.1:6379/2"
    assert cfg.infra.nats_url == "nats://127.0.0.1:4222" and cfg.infra.embedded == "never"


def test_config_path_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GRAFTMESH_CONFIG", raising=False)
    assert resolve_config_path() == tmp_path / "startup_config.yaml"
    monkeypatch.setenv("GRAFTMESH_CONFIG", str(tmp_path / "env.yaml"))
    assert resolve_config_path() == tmp_path / "env.yaml"
    assert resolve_config_path("explicit.yaml") == tmp_path / "explicit.yaml"


def test_run_dir_is_relative_to_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_base()))
    assert load_config(path).run_dir == tmp_path / ".graftmesh"


def test_invalid_override_value_is_reported() -> None:
    data = _base()
    data["agent_groups"]["gpu"]["agents"]["trainer"]["health_check"] = {"retries": 0}
    (problem,) = _problems(data)
    assert problem.startswith("agent_groups.gpu.agents.trainer.health_check.retries: ")


def test_merge_settings_does_not_mutate_defaults() -> None:
    cfg = parse_config(_base())
    before = copy.deepcopy(cfg.settings.model_dump())
    merge_settings(cfg.settings, cfg.agent("trainer").spec)
    assert cfg.settings.model_dump() == before
