"""deploy/: the Kubernetes manifests, the Prometheus rules and the Grafana board, statically.

The kustomizations are rendered here as kustomize would for what they use
(resources, namespace, configMap/secret generators, images, JSON 6902 patches),
and every object of the base and of each overlay is validated against the
Kubernetes schemas (`kubernetes_validate`, strict). The manifests are then held
against deploy/base/startup_config.yaml through the one config loader: one
Deployment and Service per agent, ports, probes, commands that parse against the
real CLI. Alert and dashboard expressions may only name metrics the code registers.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from common.config import StartupConfig, load_config
from tests.unit.graftmesh_argv import parse_graftmesh

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "base"
OVERLAYS = ("dev", "prod")
KUBERNETES_VERSION = "1.30.0"
# Agents whose `port` serves HTTP, not gRPC (services/console/service.py): no gRPC
# probes for them.
HTTP_AGENTS = {"console"}
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")

Obj = dict[str, Any]


# --- a small kustomize ----------------------------------------------------------------

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume"}


def _load_docs(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def _kustomization(folder: Path) -> Obj:
    data = yaml.safe_load((folder / "kustomization.yaml").read_text(encoding="utf-8"))
    assert data["kind"] == "Kustomization"
    allowed = {
        "apiVersion",
        "kind",
        "namespace",
        "resources",
        "configMapGenerator",
        "secretGenerator",
        "images",
        "patches",
    }
    assert set(data) <= allowed, f"{folder}: not rendered by this test: {set(data) - allowed}"
    return dict(data)


def _generated(kind: str, spec: Obj, folder: Path) -> Obj:
    data: dict[str, str] = {}
    for name in spec.get("files", []):
        key, _, file = name.rpartition("=")
        path = folder / file
        assert path.is_file(), f"{folder}: generator file {file} is missing"
        data[key or Path(file).name] = path.read_text(encoding="utf-8")
    for literal in spec.get("literals", []):
        key, _, value = literal.partition("=")
        data[key] = value
    obj: Obj = {"apiVersion": "v1", "kind": kind, "metadata": {"name": spec["name"]}}
    obj["stringData" if kind == "Secret" else "data"] = data
    if kind == "Secret":
        obj["type"] = "Opaque"
    return obj


def _pointer(path: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]


def _apply_json_patch(obj: Obj, operations: list[Obj]) -> None:
    for op in operations:
        *parents, last = _pointer(op["path"])
        node: Any = obj
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if op["op"] == "replace":
            key: Any = int(last) if isinstance(node, list) else last
            # Unlike add, replace needs its target to exist.
            assert key < len(node) if isinstance(node, list) else key in node, op["path"]
            node[key] = op["value"]
        elif op["op"] == "add":
            if isinstance(node, list):
                node.insert(len(node) if last == "-" else int(last), op["value"])
            else:
                node[last] = op["value"]
        else:
            raise AssertionError(f"patch op {op['op']} is not rendered by this test")


def _containers(obj: Obj) -> list[Obj]:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return list(spec.get("containers", [])) + list(spec.get("initContainers", []))


def render(folder: Path) -> list[Obj]:
    """The objects `kustomize build folder` makes (name hash suffixes aside)."""
    k = _kustomization(folder)
    objects: list[Obj] = []
    for resource in k.get("resources", []):
        path = (folder / resource).resolve()
        assert path.exists(), f"{folder}/kustomization.yaml: resource {resource} is missing"
        objects += render(path) if path.is_dir() else _load_docs(path)
    for spec in k.get("configMapGenerator", []):
        objects.append(_generated("ConfigMap", spec, folder))
    for spec in k.get("secretGenerator", []):
        objects.append(_generated("Secret", spec, folder))
    objects = copy.deepcopy(objects)
    for patch in k.get("patches", []):
        target = patch["target"]
        matched = [
            o
            for o in objects
            if o["kind"] == target["kind"] and o["metadata"]["name"] == target["name"]
        ]
        assert matched, f"{folder}: patch target {target} matches nothing"
        for obj in matched:
            _apply_json_patch(obj, yaml.safe_load(patch["patch"]))
    for image in k.get("images", []):
        for obj in objects:
            for container in _containers(obj):
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    new_name = image.get("newName", name)
                    container["image"] = f"{new_name}:{image.get('newTag', tag)}"
    if "namespace" in k:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = k["namespace"]
    return objects


def by_kind(objects: list[Obj], kind: str) -> dict[str, Obj]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def _without_hash_suffixes(objects: list[Obj]) -> dict[tuple[str, str], Obj]:
    """Objects by kind and name, with generated names' hash suffixes and Secret encoding undone."""
    text = json.dumps(objects)
    text = re.sub(r"\b(graftmesh-config|graftmesh-secrets)-[a-z0-9]{10}\b", r"\1", text)
    out = {}
    for obj in json.loads(text):
        if obj["kind"] == "Secret" and "data" in obj:
            data = obj.pop("data")
            obj["stringData"] = {k: base64.b64decode(v).decode() for k, v in data.items()}
        out[(obj["kind"], obj["metadata"]["name"])] = obj
    return out


@pytest.mark.parametrize("folder", ["base", "overlays/dev", "overlays/prod"])
def test_the_rendering_is_what_kubectl_kustomize_builds(folder: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    built = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / folder)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    theirs = _without_hash_suffixes([d for d in yaml.safe_load_all(built) if d])
    ours = _without_hash_suffixes(render(DEPLOY / folder))
    assert sorted(theirs) == sorted(ours)
    for key, obj in ours.items():
        assert theirs[key] == obj, key


@pytest.fixture(scope="module")
def base() -> list[Obj]:
    return render(BASE)


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[Obj]]:
    return str(request.param), render(DEPLOY / "overlays" / str(request.param))


@pytest.fixture(scope="module")
def cfg() -> StartupConfig:
    return load_config(BASE / "startup_config.yaml")


# --- schemas --------------------------------------------------------------------------


def _validate(objects: list[Obj]) -> Iterator[str]:
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(p) for p in exc.path)
            yield f"{obj['kind']}/{obj['metadata']['name']}: {where}: {exc.message}"


def test_every_base_object_validates(base: list[Obj]) -> None:
    assert not list(_validate(base))


def test_every_overlay_object_validates(overlay: tuple[str, list[Obj]]) -> None:
    name, objects = overlay
    assert objects
    assert not list(_validate(objects)), name


def test_the_validator_rejects_a_wrong_field(base: list[Obj]) -> None:
    broken = copy.deepcopy(by_kind(base, "Deployment")["router"])
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProb"] = {}
    assert list(_validate([broken]))


def test_every_object_is_in_the_namespace(overlay: tuple[str, list[Obj]]) -> None:
    _, objects = overlay
    (namespace,) = by_kind(objects, "Namespace")
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace


# --- the config the manifests use -----------------------------------------------------


def test_each_agent_has_a_machine_named_by_its_service(cfg: StartupConfig) -> None:
    assert cfg.infra.embedded == "never"
    assert Path(cfg.supervisor.run_dir).is_absolute()
    for name, agent in cfg.agents().items():
        # Where clients reach the agent is its Service's DNS name.
        assert DNS_1035.fullmatch(agent.host), f"{name}: {agent.host} is not a Service name"
        assert agent.machine == agent.host
        machine_groups = [g for g in cfg.agent_groups.values() if g.machine == agent.machine]
        assert [list(g.agents) for g in machine_groups] == [[name]]
    reference = load_config(ROOT / "startup_config.yaml")
    assert sorted(cfg.agents()) == sorted(reference.agents())
    for name, agent in reference.agents().items():
        assert cfg.agents()[name].spec.port == agent.spec.port
        assert cfg.agents()[name].spec.health_check_port == agent.spec.health_check_port
        assert cfg.agents()[name].spec.dependencies == agent.spec.dependencies


def test_the_config_map_is_the_config(base: list[Obj], cfg: StartupConfig) -> None:
    config_map = by_kind(base, "ConfigMap")["graftmesh-config"]
    assert yaml.safe_load(config_map["data"]["startup_config.yaml"]) == yaml.safe_load(
        (BASE / "startup_config.yaml").read_text()
    )


# --- one Deployment and Service per agent ---------------------------------------------


def _agent_container(deployment: Obj) -> Obj:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


def _env(container: Obj) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_every_agent_has_a_deployment_and_a_service(base: list[Obj], cfg: StartupConfig) -> None:
    deployments, services = by_kind(base, "Deployment"), by_kind(base, "Service")
    agents = cfg.agents()
    assert sorted(deployments) == sorted(a.host for a in agents.values())
    for name, agent in agents.items():
        deployment, service = deployments[agent.host], services[agent.host]
        pod = deployment["spec"]["template"]
        labels = pod["metadata"]["labels"]
        assert labels["graftmesh.io/agent"] == name
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items()
        assert service["spec"]["selector"] == selector

        container = _agent_container(deployment)
        verb, params = parse_graftmesh(["graftmesh", *container["args"]])
        assert verb == "agent"
        assert params["name"] == name
        assert params["bind"] == "0.0.0.0"
        assert "command" not in container  # the image's entrypoint: graftmesh

        spec = agent.spec
        wanted = {"health": spec.health_check_port, "metrics": spec.effective_metrics_port}
        if spec.port:
            wanted["http" if name in HTTP_AGENTS else "grpc"] = spec.port
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == wanted, name
        service_ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
        assert service_ports == {k: (v, k) for k, v in wanted.items()}, name

        annotations = pod["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(spec.effective_metrics_port)


def test_probes_use_grpc_health_or_the_zmq_probe(base: list[Obj], cfg: StartupConfig) -> None:
    deployments = by_kind(base, "Deployment")
    for name, agent in cfg.agents().items():
        container = _agent_container(deployments[agent.host])
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container[kind]
            if agent.spec.port and name not in HTTP_AGENTS:
                # grpc.health.v1, which the token does not guard.
                assert probe["grpc"] == {"port": agent.spec.port}, (name, kind)
            else:
                verb, params = parse_graftmesh(probe["exec"]["command"])
                assert verb == "probe"
                assert list(params["agent_names"]) == [name]
                # The probe's own wait ends before Kubernetes gives up on it.
                assert params["timeout_s"] < probe["timeoutSeconds"]
                # It asks the agent of its own pod (which listens on every interface).
                assert params["host"] == "127.0.0.1", (name, kind)
        # Slow starters (torch, model loading) get minutes before liveness counts.
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 120


def test_agents_get_config_token_and_infra_from_the_cluster(
    base: list[Obj], cfg: StartupConfig
) -> None:
    pvcs = by_kind(base, "PersistentVolumeClaim")
    for name, agent in cfg.agents().items():
        deployment = by_kind(base, "Deployment")[agent.host]
        pod = deployment["spec"]["template"]["spec"]
        container = _agent_container(deployment)
        env = _env(container)
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}

        config_path = Path(env["GRAFTMESH_CONFIG"])
        config_volume = volumes[mounts[str(config_path.parent)]]
        assert config_volume["configMap"]["name"] == "graftmesh-config"
        assert env["GRAFTMESH_MACHINE"] == agent.machine

        token_path = Path(env["GRAFTMESH_TOKEN_FILE"])
        token_volume = volumes[mounts[str(token_path.parent)]]["secret"]
        assert token_volume["secretName"] == "graftmesh-secrets"
        assert {"key": "token", "path": token_path.name} in token_volume["items"]
        for key in ("GRAFTMESH_NATS_URL", "GRAFTMESH_REDIS_URL"):
            assert env[key]["secretKeyRef"]["name"] == "graftmesh-secrets", (name, key)
        assert "GRAFTMESH_TOKEN" not in env

        assert str(cfg.run_dir) in mounts
        for claim in (
            v["persistentVolumeClaim"]["claimName"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        ):
            assert claim in pvcs, (name, claim)
            path = next(p for p, v in mounts.items() if v == claim)
            assert path.startswith(str(cfg.run_dir) + "/")
            # One pod on a ReadWriteOnce volume: the old pod must go before the new one comes.
            assert deployment["spec"]["strategy"]["type"] == "Recreate"

        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_state_volumes_hold_what_each_agent_keeps(base: list[Obj], cfg: StartupConfig) -> None:
    run_dir = cfg.run_dir
    expected = {
        "registry": run_dir / "registry",
        "compiler": run_dir / "compiler" / "kernels",
        "trainer": run_dir / "trainer",
    }
    for name, path in expected.items():
        container = _agent_container(by_kind(base, "Deployment")[cfg.agent(name).host])
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert str(path) in mounts, name


def test_secret_keys_are_provided(overlay: tuple[str, list[Obj]]) -> None:
    name, objects = overlay
    wanted: dict[str, bool] = {}
    for deployment in by_kind(objects, "Deployment").values():
        pod = deployment["spec"]["template"]["spec"]
        for container in pod["containers"]:
            for value in _env(container).values():
                if isinstance(value, dict) and "secretKeyRef" in value:
                    ref = value["secretKeyRef"]
                    if ref["name"] == "graftmesh-secrets":
                        wanted[ref["key"]] = wanted.get(ref["key"], False) or not ref.get(
                            "optional", False
                        )
        for volume in pod["volumes"]:
            if volume.get("secret", {}).get("secretName") == "graftmesh-secrets":
                for item in volume["secret"]["items"]:
                    wanted[item["key"]] = True
    required = {k for k, needed in wanted.items() if needed}
    secret = by_kind(objects, "Secret").get("graftmesh-secrets")
    if secret is not None:
        assert required <= set(secret["stringData"]), name
    else:
        # Made out of band from the documented example.
        example = (DEPLOY / "overlays" / name / "secrets.env.example").read_text()
        documented = {
            line.split("=")[0] for line in example.splitlines() if "=" in line and line[0] != "#"
        }
        assert set(wanted) <= documented, name


def test_dev_runs_the_infra_the_config_names(cfg: StartupConfig) -> None:
    objects = render(DEPLOY / "overlays" / "dev")
    services = by_kind(objects, "Service")
    secret = by_kind(objects, "Secret")["graftmesh-secrets"]["stringData"]
    for config_url, secret_url in (
        (cfg.infra.nats_url, secret["nats-url"]),
        (cfg.infra.redis_url, secret["redis-url"]),
    ):
        host, port = re.match(r"\w+://([^:/]+):(\d+)", config_url).groups()  # type: ignore[union-attr]
        assert int(port) in {p["port"] for p in services[host]["spec"]["ports"]}
        assert re.sub(r"//.*@", "//", secret_url) == config_url


def test_prod_gives_the_trainer_a_gpu_and_routers_replicas() -> None:
    objects = render(DEPLOY / "overlays" / "prod")
    deployments = by_kind(objects, "Deployment")
    trainer = _agent_container(deployments["trainer"])
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert trainer["image"].endswith("-cuda")
    for name, deployment in deployments.items():
        if name != "trainer":
            assert not _agent_container(deployment)["image"].endswith("-cuda"), name
            assert "nvidia.com/gpu" not in _agent_container(deployment)["resources"]["limits"]
    hpa = by_kind(objects, "HorizontalPodAutoscaler")["router"]
    assert hpa["spec"]["minReplicas"] >= 2
    assert deployments["router"]["spec"]["replicas"] >= hpa["spec"]["minReplicas"]


def test_router_autoscaler_and_disruption_budget_select_the_router(base: list[Obj]) -> None:
    router = by_kind(base, "Deployment")["router"]
    hpa = by_kind(base, "HorizontalPodAutoscaler")["router"]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "router",
    }
    labels = router["spec"]["template"]["metadata"]["labels"]
    budgets = by_kind(base, "PodDisruptionBudget")
    assert any(
        b["spec"]["selector"]["matchLabels"].items() <= labels.items() for b in budgets.values()
    )


def test_network_policies_name_real_ports_and_pods(base: list[Obj]) -> None:
    policies = by_kind(base, "NetworkPolicy")
    assert any(p["spec"]["podSelector"] == {} for p in policies.values()), "no default deny"
    pods = [
        d["spec"]["template"]["metadata"]["labels"] for d in by_kind(base, "Deployment").values()
    ]
    port_names = {
        p["name"]
        for d in by_kind(base, "Deployment").values()
        for p in _agent_container(d)["ports"]
    }
    for name, policy in policies.items():
        selector = policy["spec"]["podSelector"].get("matchLabels", {})
        assert any(selector.items() <= labels.items() for labels in pods), name
        for rule in policy["spec"].get("ingress", []):
            for port in rule.get("ports", []):
                assert isinstance(port["port"], int) or port["port"] in port_names, name


# --- Prometheus and Grafana -----------------------------------------------------------

# Metrics the code does not export yet; the rules and panels that use them say so.
PENDING_METRICS: set[str] = set()
# Made by Prometheus itself, or by kube-state-metrics on Kubernetes.
EXTERNAL_METRICS = {"up", "kube_pod_container_status_waiting_reason"}
_INSTRUMENT = re.compile(
    r"\.create_(counter|up_down_counter|histogram|gauge|observable_counter|"
    r"observable_up_down_counter|observable_gauge)\(\s*[\"']([a-zA-Z_:][a-zA-Z0-9_:]*)[\"']"
)


def registered_metrics() -> set[str]:
    """Every metric name the code registers, as the Prometheus exporter exposes it."""
    names: set[str] = set()
    for path in [*(ROOT / "common").rglob("*.py"), *(ROOT / "services").rglob("*.py")]:
        if "stubs" in path.parts:
            continue
        for kind, name in _INSTRUMENT.findall(path.read_text(encoding="utf-8")):
            if kind in ("counter", "observable_counter"):
                names.add(name if name.endswith("_total") else f"{name}_total")
            elif kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            else:
                names.add(name)
    return names


KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}


def promql_metrics(expr: str) -> set[str]:
    """The metric names of a PromQL expression; fails when it is not balanced."""
    stripped = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    stack: list[str] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    for ch in stripped:
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs:
            assert stack and stack[-1] == pairs[ch], f"unbalanced {ch!r} in {expr}"
            stack.pop()
    assert not stack, f"unclosed {stack} in {expr}"
    # Label matchers, ranges and grouping label lists name no metrics.
    without = re.sub(r"\{[^{}]*\}", " ", stripped)
    without = re.sub(r"\[[^\[\]]*\]", " ", without)
    without = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", without
    )
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", without):
        name = match.group(0)
        after = without[match.end() :].lstrip()
        if after.startswith("(") or name.lower() in KEYWORDS:
            continue  # a function or an operator
        names.add(name)
    return names


def test_promql_metrics_reads_names_and_refuses_unbalanced() -> None:
    expr = 'sum by (agent) (rate(a_total{x="}"}[5m])) / on(agent) b unless c{y=~"a|b"}'
    assert promql_metrics(expr) == {"a_total", "b", "c"}
    with pytest.raises(AssertionError, match="unclosed"):
        promql_metrics("sum(rate(a[5m])")
    with pytest.raises(AssertionError, match="unbalanced"):
        promql_metrics("sum(rate(a[5m)))")


def test_registered_metrics_are_found() -> None:
    # The RPC metrics of common/grpc_server.py: if they are renamed, so must the rules be.
    assert {
        "graftmesh_rpc_server_calls_total",
        "graftmesh_rpc_server_duration_seconds_bucket",
    } <= registered_metrics()
    assert not PENDING_METRICS & registered_metrics(), "now registered: drop from PENDING_METRICS"


def _grafana_to_promql(expr: str) -> str:
    """A panel query with Grafana's variables given values, as Grafana sends it."""
    for variable, value in (("$__rate_interval", "1m"), ("$__range", "6h"), ("$agent", ".*")):
        expr = expr.replace(variable, value)
    return expr


def test_expressions_parse_as_promql() -> None:
    """The real PromQL grammar, where its parser (promql-parser, dev extra) is installed."""
    parser = pytest.importorskip("promql_parser")
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
    board = json.loads((DEPLOY / "grafana" / "graftmesh-dashboard.json").read_text())
    exprs = [r["expr"] for g in rules for r in g["rules"]]
    exprs += [_grafana_to_promql(t["expr"]) for p in board["panels"] for t in p["targets"]]
    for expr in exprs:
        parser.parse(expr)
    with pytest.raises(ValueError):
        parser.parse("sum(rate(graftmesh_rpc_server_calls_total[5m])")


def _known() -> set[str]:
    return registered_metrics() | PENDING_METRICS | EXTERNAL_METRICS


def test_alert_rules_are_complete_and_name_known_metrics() -> None:
    text = (DEPLOY / "prometheus" / "alerts.yml").read_text()
    rules = [r for g in yaml.safe_load(text)["groups"] for r in g["rules"]]
    known = _known()
    for rule in rules:
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        metrics = promql_metrics(rule["expr"])
        assert metrics, rule["alert"]
        assert metrics <= known, f"{rule['alert']}: unknown {sorted(metrics - known)}"
    for pending in PENDING_METRICS:
        assert f"PENDING METRIC {pending}" in text, pending
    names = {r["alert"] for r in rules}
    for wanted in (
        "GraftmeshAgentDown",
        "GraftmeshBreakerOpen",
        "GraftmeshErrorFlood",
        "GraftmeshCanaryRolledBack",
        "GraftmeshInputDrift",
    ):
        assert wanted in names


def test_prometheus_scrapes_what_the_deployments_announce() -> None:
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    for rule_file in prometheus["rule_files"]:
        assert (DEPLOY / "prometheus" / rule_file).is_file()
    jobs = {j["job_name"]: j for j in prometheus["scrape_configs"]}
    relabel = jobs["graftmesh"]["relabel_configs"]
    sources = {s for r in relabel for s in r.get("source_labels", [])}
    assert "__meta_kubernetes_pod_annotation_prometheus_io_scrape" in sources
    assert "__meta_kubernetes_pod_annotation_prometheus_io_port" in sources
    assert "__meta_kubernetes_pod_label_graftmesh_io_agent" in sources
    # The Compose job lists every agent at its machine and metrics port.
    compose = load_config(ROOT / "docker" / "config" / "startup_config.yaml")
    targets = {
        t: c["labels"]["agent"]
        for c in jobs["graftmesh-compose"]["static_configs"]
        for t in c["targets"]
    }
    assert targets == {
        f"{a.host}:{a.spec.effective_metrics_port}": name for name, a in compose.agents().items()
    }


def test_the_dashboard_plots_known_metrics() -> None:
    board = json.loads((DEPLOY / "grafana" / "graftmesh-dashboard.json").read_text())
    assert board["uid"] and board["title"]
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    known = _known()
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    assert exprs
    for expr in exprs:
        metrics = promql_metrics(expr)
        assert metrics and metrics <= known, f"{expr}: unknown {sorted(metrics - known)}"
    # Every registered metric family is on the board.
    plotted = set().union(*(promql_metrics(e) for e in exprs))
    families = {re.sub(r"_(bucket|sum|count)$", "", m) for m in registered_metrics()}
    for family in families:
        assert any(m.startswith(family) for m in plotted), family
