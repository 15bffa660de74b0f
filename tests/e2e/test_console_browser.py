"""The web console in a real headless browser against a mesh started by `graftmesh up`.

Chromium comes from Debian's `chromium` package (`/usr/bin/chromium`), driven by
Playwright for Python; the test never downloads a browser. One mesh and one
browser per module; a screenshot of each page is saved under
`tests/artifacts/console/`.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from common.stubs import router_pb2, router_pb2_grpc
from tests.integration.test_console_api import (
    AGENTS,
    Console,
    job_spec,
    start_console_mesh,
    stop_console_mesh,
)
from tests.wait import wait_until

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "console"
# Without the background-networking flags Chromium tries to reach Google's services and
# its first connections stall on a closed network.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STEP_MS = 60_000

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason=f"{CHROMIUM} is absent: install Debian's chromium and chromium-driver packages",
    ),
]

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is needed")


@pytest.fixture(scope="module")
def console(
    tmp_path_factory: pytest.TempPathFactory, system_nats_url: str, system_redis_url: str
) -> Iterator[Console]:
    mesh, client = start_console_mesh(
        tmp_path_factory.mktemp("console-e2e"), system_nats_url, system_redis_url
    )
    try:
        yield client
    finally:
        stop_console_mesh(mesh)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Any, console: Console) -> Iterator[Any]:
    """A fresh browser context, logged in with the mesh's token through the login form."""
    context = browser.new_context(viewport={"width": 1300, "height": 900})
    context.set_default_timeout(STEP_MS)
    tab = context.new_page()
    tab.goto(f"{console.base}/mesh")
    assert "/login" in tab.url
    tab.fill("#token", console.token)
    tab.click("#login-form button[type=submit]")
    tab.wait_for_url(re.compile(r".*/mesh$"))
    try:
        yield tab
    finally:
        context.close()


def screenshot(tab: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    tab.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def no_trace(tab: Any) -> None:
    text = tab.content()
    assert "Traceback" not in text and 'File "' not in text


def test_mesh_page_shows_every_agent_healthy(page: Any, console: Console) -> None:
    for agent in AGENTS:
        page.wait_for_selector(f"#agent-{agent}[data-state=HEALTHY]")
    rows = page.locator("#agents tbody tr")
    assert rows.count() == len(AGENTS)
    assert page.inner_text("#mesh-state") == "RUNNING"
    page.wait_for_selector("#live[data-live=yes]")
    screenshot(page, "mesh")


def test_a_job_submitted_from_the_form_appears_and_its_curve_grows(
    page: Any, console: Console
) -> None:
    name = f"{console.model_prefix}-form"
    page.goto(f"{console.base}/training")
    page.fill("#f-name", name)
    page.fill("#f-max_steps", "120")
    page.fill("#f-register_as", name)
    screenshot(page, "training")
    page.click("#submit-job")
    page.wait_for_url(re.compile(r".*/training/jobs/job-[0-9a-f]+$"))
    job_id = page.url.rsplit("/", 1)[1]
    points = page.locator("#loss-chart")
    first = int(
        wait_until(
            lambda: int(points.get_attribute("data-points") or 0) or None,
            STEP_MS / 1000,
            "the first points of the loss curve",
        )
    )
    wait_until(
        lambda: int(points.get_attribute("data-points") or 0) > first,
        STEP_MS / 1000,
        "the loss curve to grow",
    )
    page.locator("#job-state", has_text="SUCCEEDED").wait_for()
    page.locator("#stream-state", has_text="the job has ended").wait_for()
    assert page.locator("#loss-chart polyline").count() >= 1
    assert int(page.locator("#param-chart").get_attribute("data-points") or 0) >= 1
    # The slots and the final figures are fetched again once the job has ended.
    wait_until(lambda: page.locator("#slots tbody tr").count() == 2, 10, "both slots listed")
    wait_until(lambda: name in page.inner_text("#job-registered"), 10, "the registered model")
    assert page.locator("#cancel-form").count() == 0
    screenshot(page, "job")
    page.goto(f"{console.base}/training")
    row = page.locator(f"#jobs tr[data-job='{job_id}']")
    assert row.get_attribute("data-state") == "SUCCEEDED"
    assert name in row.inner_text()


def _routed_versions(console: Console, name: str) -> list[int]:
    port = console.mesh.config["agent_groups"]["serving"]["agents"]["router"]["port"]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        routes = (
            router_pb2_grpc.RouterServiceStub(channel)
            .GetRoutes(router_pb2.GetRoutesRequest(model_name=name), timeout=5)
            .routes
        )
    found = [[t.version for t in r.targets] for r in routes if r.alias == "production"]
    return found[0] if found else []


def test_promoting_a_version_on_the_models_page_changes_the_routers_route(
    page: Any, console: Console
) -> None:
    name = f"{console.model_prefix}-{secrets.token_hex(3)}"
    for _ in range(2):
        reply = console.call("POST", "/api/jobs", {"spec": job_spec(name, register_as=name)})
        assert reply.status == 201, reply.text
        assert console.wait_job(reply.json()["job"]["job_id"])["state"] == "SUCCEEDED"
    promoted = console.call("POST", f"/api/models/{name}/promote", {"version": 1})
    assert promoted.status == 200, promoted.text
    wait_until(lambda: _routed_versions(console, name) == [1], 30, "production routed to v1")

    page.goto(f"{console.base}/models")
    page.wait_for_selector(f".card[data-model='{name}']")
    screenshot(page, "models")
    page.click(f".card[data-model='{name}']")
    page.wait_for_selector("#versions tr[data-version='2']")
    page.click("#promote-2")
    assert "Move production of" in page.inner_text(".question")
    screenshot(page, "confirm")
    page.click("#confirm")
    page.wait_for_selector("#routes tr[data-alias=production]")
    wait_until(lambda: _routed_versions(console, name) == [2], 30, "production routed to v2")
    page.reload()
    route = page.locator("#routes tr[data-alias=production] td.route")
    assert (route.get_attribute("data-route") or "").startswith("2:")
    assert "v1 → v2" in page.inner_text("#history")
    screenshot(page, "model")

    page.click("#rollback-production")
    assert "back to the version it pointed at before" in page.inner_text(".question")
    page.click("#confirm")
    page.wait_for_selector("#routes tr[data-alias=production]")
    wait_until(lambda: _routed_versions(console, name) == [1], 30, "production back on v1")
    assert "rollback" in page.inner_text("#history")


def test_a_bad_blueprint_shows_its_field_error(page: Any, console: Console) -> None:
    page.goto(f"{console.base}/blueprints")
    page.wait_for_selector("#catalogue .blueprint[data-blueprint=bottleneck_mlp]")
    page.fill("#f-name", "broken_one")
    page.fill(
        "#f-nodes",
        '[{"name": "down", "op": "linear", "inputs": ["input"], "attrs": {"out_features": -3}},'
        ' {"name": "up", "op": "linear", "inputs": ["down"],'
        ' "attrs": {"out_features": "out", "zero_init": true}}]',
    )
    page.click("#add-blueprint")
    error = page.locator("#error-nodes")
    error.wait_for()
    assert "nodes[0]" in error.inner_text()
    assert page.locator("#f-nodes").get_attribute("aria-invalid") == "true"
    no_trace(page)
    screenshot(page, "blueprints-error")


def test_bad_input_gets_clear_messages_and_no_stack_traces(
    browser: Any, page: Any, console: Console
) -> None:
    page.goto(f"{console.base}/training")
    page.fill("#f-lr", "fast")
    page.fill("#f-model_params", "{not json")
    page.click("#submit-job")
    assert "not a number" in page.inner_text("#error-lr")
    assert "not JSON" in page.inner_text("#error-model_params")
    no_trace(page)
    page.fill("#f-lr", "0.01")
    page.fill("#f-model_params", '{"hidden": [8]}')
    page.fill("#f-dataset", "no_such_dataset")
    page.click("#submit-job")
    assert "unknown dataset" in page.inner_text("#error-dataset")

    for path, words in (
        ("/training/jobs/job-nope", "no job 'job-nope' on the trainer"),
        ("/models/nope", "model 'nope' is not registered"),
        ("/nowhere", "no such page"),
    ):
        reply = page.goto(f"{console.base}{path}")
        assert reply.status == 404
        assert words in page.inner_text("#error-message")
        no_trace(page)
    screenshot(page, "not-found")

    stranger = browser.new_context()
    try:
        tab = stranger.new_page()
        tab.goto(f"{console.base}/training")
        assert "/login" in tab.url
        tab.fill("#token", "not-the-token")
        tab.click("#login-form button[type=submit]")
        assert "not the mesh's token" in tab.inner_text("#login-error")
        assert console.token not in tab.content()
        screenshot(tab, "login")
    finally:
        stranger.close()
