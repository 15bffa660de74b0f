"""The gRPC contracts: committed stubs are fresh, and the protos keep the house style."""

from __future__ import annotations

import importlib
import pkgutil
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FileDescriptor

import common.stubs

_REPO_ROOT = Path(__file__).resolve().parents[2]
_GENERATOR = _REPO_ROOT / "tools" / "gen_proto.py"
_STUBS_DIR = Path(common.stubs.__file__).parent
_GENERATED_NAME = re.compile(r"^(__init__\.py|\w+_pb2(_grpc)?\.pyi?)$")
_SNAKE_CASE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")

_SERVICES = {
    "CompilerService": "compiler",
    "SeedSelectorService": "seed_selector",
    "TrainerService": "trainer",
    "RegistryService": "registry",
    "RouterService": "router",
    "SupervisorService": "supervisor",
}


def _run_generator(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(_GENERATOR), *args],
        cwd=_REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _generated_files(directory: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(directory.iterdir())
        if p.is_file() and _GENERATED_NAME.match(p.name)
    }


@pytest.fixture(scope="module")
def fresh_stubs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stubs")
    result = _run_generator("--out", str(out))
    assert result.returncode == 0, f"generator failed:\n{result.stdout}{result.stderr}"
    return out


def _pb2_modules() -> list[ModuleType]:
    names = sorted(
        info.name
        for info in pkgutil.iter_modules(common.stubs.__path__)
        if info.name.endswith("_pb2")
    )
    return [importlib.import_module(f"common.stubs.{name}") for name in names]


def _files() -> list[FileDescriptor]:
    return [module.DESCRIPTOR for module in _pb2_modules()]


def _messages(descriptors: list[Descriptor]) -> Iterator[Descriptor]:
    for message in descriptors:
        yield message
        yield from _messages(list(message.nested_types))


def _all_messages() -> list[Descriptor]:
    return [m for f in _files() for m in _messages(list(f.message_types_by_name.values()))]


def _all_enums() -> list[EnumDescriptor]:
    enums = [e for f in _files() for e in f.enum_types_by_name.values()]
    enums += [e for m in _all_messages() for e in m.enum_types]
    return enums


def test_committed_stubs_match_a_fresh_generation(fresh_stubs: Path) -> None:
    fresh = _generated_files(fresh_stubs)
    committed = _generated_files(_STUBS_DIR)
    stale = sorted(
        name for name in fresh.keys() | committed.keys() if fresh.get(name) != committed.get(name)
    )
    assert fresh, "the generator produced no files"
    assert not stale, f"stale stubs in {_STUBS_DIR} (run `make proto`): {', '.join(stale)}"


def test_check_mode_names_changed_and_leftover_stubs(fresh_stubs: Path, tmp_path: Path) -> None:
    stubs = tmp_path / "stubs"
    shutil.copytree(fresh_stubs, stubs)
    assert _run_generator("--check", "--out", str(stubs)).returncode == 0

    (stubs / "router_pb2.py").write_bytes(b"# edited by hand\n")
    (stubs / "retired_pb2.py").write_bytes(b"")
    result = _run_generator("--check", "--out", str(stubs))

    assert result.returncode == 1, result.stdout + result.stderr
    assert "router_pb2.py" in result.stderr
    assert "retired_pb2.py" in result.stderr
    assert "trainer_pb2.py" not in result.stderr
    assert (stubs / "router_pb2.py").read_bytes() == b"# edited by hand\n", "--check wrote files"


@pytest.mark.parametrize(("service", "module"), sorted(_SERVICES.items()))
def test_service_descriptor_has_its_full_name(service: str, module: str) -> None:
    pb2 = importlib.import_module(f"common.stubs.{module}_pb2")
    pb2_grpc = importlib.import_module(f"common.stubs.{module}_pb2_grpc")

    descriptor = pb2.DESCRIPTOR.services_by_name[service]

    assert descriptor.full_name == f"graftmesh.v1.{service}"
    assert pb2.DESCRIPTOR.name == f"graftmesh/v1/{module}.proto"
    for name in (f"{service}Stub", f"{service}Servicer", f"add_{service}Servicer_to_server"):
        assert hasattr(pb2_grpc, name), f"{pb2_grpc.__name__} lacks {name}"


def test_package_holds_exactly_the_known_services() -> None:
    found = {s.full_name for f in _files() for s in f.services_by_name.values()}

    assert found == {f"graftmesh.v1.{name}" for name in _SERVICES}
    assert {f.package for f in _files()} == {"graftmesh.v1"}


@pytest.mark.parametrize("enum", _all_enums(), ids=lambda e: e.full_name)
def test_enum_zero_value_is_unspecified_and_prefixes_every_value(enum: EnumDescriptor) -> None:
    zero = enum.values_by_number.get(0)

    assert zero is not None, f"{enum.full_name} has no zero value"
    assert zero.name.endswith("_UNSPECIFIED"), f"{enum.full_name} zero value is {zero.name}"
    prefix = zero.name.removesuffix("UNSPECIFIED")
    unprefixed = [v.name for v in enum.values if not v.name.startswith(prefix)]
    assert not unprefixed, f"{enum.full_name} values without the {prefix} prefix: {unprefixed}"


def test_every_rpc_has_its_own_request_and_response_named_for_it() -> None:
    problems: list[str] = []
    used: dict[str, str] = {}
    for service in (s for f in _files() for s in f.services_by_name.values()):
        for method in service.methods:
            rpc = f"{service.name}.{method.name}"
            for message, suffix in (
                (method.input_type, "Request"),
                (method.output_type, "Response"),
            ):
                # Buf's RPC_REQUEST_STANDARD_NAME: `<Rpc>Request`, or `<Service><Rpc>Request`
                # where several services of the package share an RPC name (GetStats).
                allowed = {f"{method.name}{suffix}", f"{service.name}{method.name}{suffix}"}
                if message.name not in allowed:
                    problems.append(f"{rpc} uses {message.name}, expected one of {sorted(allowed)}")
                if message.full_name in used:
                    problems.append(
                        f"{message.full_name} serves {used[message.full_name]} and {rpc}"
                    )
                used[message.full_name] = rpc
    assert used, "no RPCs found"
    assert not problems, "\n".join(problems)


def test_every_field_name_is_snake_case() -> None:
    bad = [
        f"{message.full_name}.{field.name}"
        for message in _all_messages()
        for field in message.fields
        if not _SNAKE_CASE.match(field.name)
    ]
    assert not bad, f"fields not in snake_case: {bad}"


def _value_names(enum_name: str, module: str) -> list[str]:
    pb2 = importlib.import_module(f"common.stubs.{module}_pb2")
    enum: EnumDescriptor = pb2.DESCRIPTOR.enum_types_by_name[enum_name]
    return [v.name for v in sorted(enum.values, key=lambda v: v.number)]


def test_seed_state_enum_is_exactly_the_seed_lifecycle() -> None:
    states = "DORMANT GERMINATED TRAINING BLENDING HOLDING FOSSILIZED CULLED EMBARGOED"

    assert _value_names("SeedState", "common") == [
        f"SEED_STATE_{s}" for s in ["UNSPECIFIED", *states.split()]
    ]


def test_agent_state_enum_is_exactly_the_supervisor_states() -> None:
    states = "PENDING STARTING HEALTHY DEGRADED UNHEALTHY BACKOFF FAILED SKIPPED EXTERNAL STOPPED"

    assert _value_names("AgentState", "supervisor") == [
        f"AGENT_STATE_{s}" for s in ["UNSPECIFIED", *states.split()]
    ]
