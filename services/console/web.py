"""The console's HTTP side: pages, the JSON API and the event streams (Starlette).

Pages are rendered on the server (Jinja2, autoescaped) with a little script of our
own for live updates and charts; the JSON API under `/api/` returns the same
views. Every change is a POST that needs the mesh's token (see `access`): pages
post forms carrying the session's CSRF token; API clients send
`Authorization: Bearer <token>`. Failures become a short message (a page or
`{"error": ...}`), never a stack trace: an agent that cannot be reached is a
banner naming it, unknown ids are 404, bad input 400 with the field it concerns.
"""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote, urlsplit

import grpc
import jinja2
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import (
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.bus import ErrorBus, Severity
from common.logging import get_logger
from common.stubs import compiler_pb2, trainer_pb2
from services.console import forms, views
from services.console.access import (
    SESSION_COOKIE,
    Access,
    Decision,
    Session,
    SessionStore,
    bearer_token,
    tokens_match,
)
from services.console.clients import CallFailed, MeshClients
from services.console.feed import LiveFeed
from services.console.settings import ConsoleSettings

__all__ = ["ConsoleApp", "build_app"]

_log = get_logger(__name__)

_HERE: Final = Path(__file__).resolve().parent
_KEEPALIVE_S: Final = 15.0
_ALERT_GROUPS_SHOWN: Final = 25
# The gallery asks the registry for the latest version of this many models at most.
_GALLERY_METRICS: Final = 60
_MAX_BODY: Final = 256 * 1024
_PRODUCTION: Final = "production"
_CANARY: Final = "canary"
_SECURITY_HEADERS: Final = (
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
)
_STATUS_OF: Final[Mapping[grpc.StatusCode, int]] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class ConsoleError(Exception):
    """A request the console answers with `status` and a message for people."""

    def __init__(self, status: int, message: str, fields: Mapping[str, str] | None = None) -> None:
        self.status = status
        self.message = message
        self.fields = dict(fields or {})
        super().__init__(message)


def _failure(exc: CallFailed) -> ConsoleError:
    status = _STATUS_OF.get(exc.code, 502)
    return ConsoleError(status, exc.describe())


# ----------------------------------------------------------------------------- formatting


def _fmt_num(value: object, digits: int = 4) -> str:
    if value is None or isinstance(value, bool):
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else "-"
    return str(value)


def _fmt_time(value: object) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S")
    return str(value).replace("T", " ").removesuffix("+00:00")


def _fmt_pct(value: object) -> str:
    return f"{value * 100:.0f}%" if isinstance(value, int | float) else "-"


def _fmt_duration(seconds: object) -> str:
    if not isinstance(seconds, int | float) or seconds <= 0:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _templates() -> Jinja2Templates:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(_HERE / "templates")),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(num=_fmt_num, time=_fmt_time, pct=_fmt_pct, duration=_fmt_duration)
    return Jinja2Templates(env=env)


# ----------------------------------------------------------------------------- the app


@dataclass
class _Page:
    """What a page handler hands to its template, besides its own data."""

    title: str
    nav: str
    banners: list[str] = field(default_factory=list)


class ConsoleApp:
    """The console's handlers and what they share: clients, feed, sessions, templates."""

    def __init__(
        self,
        settings: ConsoleSettings,
        clients: MeshClients,
        feed: LiveFeed,
        bus: ErrorBus | None = None,
        *,
        machine: str = "",
    ) -> None:
        self.settings = settings
        self.clients = clients
        self.feed = feed
        self.bus = bus
        self.machine = machine
        self.access = Access(token=settings.token, readonly_open=settings.readonly_open)
        self.sessions = SessionStore(settings.session_ttl_s)
        self.templates = _templates()
        self.stopping = asyncio.Event()

    # ------------------------------------------------------------------ plumbing

    def _session(self, request: Request) -> Session | None:
        return self.sessions.get(request.cookies.get(SESSION_COOKIE))

    def _set_cookie(self, response: Response, session: Session) -> None:
        response.set_cookie(
            SESSION_COOKIE,
            session.id,
            max_age=int(self.settings.session_ttl_s),
            path="/",
            httponly=True,
            samesite="strict",
            secure=self.settings.secure_cookie,
        )

    def _api(self, request: Request) -> bool:
        return request.url.path.startswith("/api/")

    def _read_guard(self, request: Request) -> None:
        bearer = bearer_token(request.headers.get("authorization"))
        if bearer is not None and not tokens_match(bearer, self.settings.token):
            if self.access.open:
                return  # nothing to check against: open mode ignores credentials
            raise ConsoleError(401, "the token is not the mesh's token")
        if self.access.can_read(bearer, self._session(request)) is Decision.LOGIN:
            raise ConsoleError(401, "log in with the mesh's token to see this")

    def _same_origin(self, request: Request) -> None:
        origin = request.headers.get("origin")
        if origin in (None, "null"):
            if origin == "null":
                raise ConsoleError(403, "cross-site requests are refused")
            return
        host = request.headers.get("host", "")
        if urlsplit(origin).netloc != host:
            raise ConsoleError(403, "cross-site requests are refused")

    async def _form(self, request: Request) -> FormData:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > _MAX_BODY:
            raise ConsoleError(413, "the form is too large")
        try:
            return await request.form(max_files=0, max_fields=100, max_part_size=_MAX_BODY)
        except Exception:
            raise ConsoleError(400, "the form could not be read") from None

    async def _change_guard_form(self, request: Request) -> FormData:
        """A page POST: same origin, a live session with its CSRF token, and the token."""
        self._same_origin(request)
        form = await self._form(request)
        session = self._session(request)
        csrf = form.get("csrf")
        if session is None or not session.csrf_ok(csrf if isinstance(csrf, str) else None):
            raise ConsoleError(
                403, "the form expired or did not come from this console; reload the page"
            )
        if self.access.can_change(None, session) is Decision.LOGIN:
            raise ConsoleError(401, "log in with the mesh's token to change anything")
        return form

    async def _change_guard_api(self, request: Request) -> dict[str, Any]:
        """An API POST: the bearer token (or a session with its CSRF header), a JSON body."""
        self._same_origin(request)
        bearer = bearer_token(request.headers.get("authorization"))
        session = self._session(request) if bearer is None else None
        if bearer is not None and not tokens_match(bearer, self.settings.token):
            if not self.access.open:
                raise ConsoleError(401, "the token is not the mesh's token")
        elif (
            bearer is None
            and session is not None
            and not self.access.open
            and not session.csrf_ok(request.headers.get("x-csrf-token"))
        ):
            raise ConsoleError(403, "a session needs its X-CSRF-Token header")
        if self.access.can_change(bearer, session) is Decision.LOGIN:
            raise ConsoleError(401, "send Authorization: Bearer <the mesh's token>")
        # Cross-site pages can post text/plain without asking; JSON needs a preflight,
        # which this console never answers.
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise ConsoleError(415, "send a JSON body (Content-Type: application/json)")
        body = await request.body()
        if len(body) > _MAX_BODY:
            raise ConsoleError(413, "the body is too large")
        if not body:
            return {}
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ConsoleError(400, "the body is not JSON") from None
        if not isinstance(data, dict):
            raise ConsoleError(400, "the body is a JSON object")
        return data

    def _render(
        self,
        request: Request,
        template: str,
        page: _Page,
        context: dict[str, Any],
        status: int = 200,
    ) -> Response:
        session = self._session(request)
        fresh = session is None
        if session is None:
            session = self.sessions.new()
        authenticated = self.access.authenticated(None, session)
        response = self.templates.TemplateResponse(
            request,
            template,
            {
                "page": page,
                "csrf": session.csrf,
                "open_access": self.access.open,
                "readonly_open": self.access.readonly_open,
                "authenticated": authenticated and not self.access.open,
                "can_change": authenticated,
                "machine": self.machine,
                "request_path": request.url.path,
                **context,
            },
            status_code=status,
        )
        if fresh:
            self._set_cookie(response, session)
        return response

    def error_response(self, request: Request, exc: ConsoleError) -> Response:
        if self._api(request):
            body: dict[str, Any] = {"error": exc.message}
            if exc.fields:
                body["fields"] = exc.fields
            return JSONResponse(body, status_code=exc.status)
        if exc.status == 401 and request.method == "GET":
            return RedirectResponse(
                f"/login?next={quote(request.url.path, safe='/')}", status_code=303
            )
        return self._render(
            request,
            "error.html",
            _Page(title=f"Error {exc.status}", nav=""),
            {"status": exc.status, "message": exc.message},
            status=exc.status,
        )

    def internal_error(self, request: Request, exc: BaseException) -> Response:
        _log.error("console request failed", path=request.url.path, error=repr(exc))
        if self.bus is not None:
            self.bus.report_error(
                f"console request {request.method} {request.url.path} failed",
                severity=Severity.ERROR,
                exc=exc if isinstance(exc, Exception) else None,
            )
        return self.error_response(
            request, ConsoleError(500, "the console failed to answer this request (it is logged)")
        )

    # ------------------------------------------------------------------ mesh

    async def _mesh_data(self) -> tuple[dict[str, Any] | None, list[str]]:
        banners: list[str] = []
        mesh: dict[str, Any] | None = None
        try:
            mesh = views.mesh_view(await self.clients.status())
        except CallFailed as exc:
            banners.append(
                f"The supervisor is not reachable, so agent states are unknown: {exc.details}"
            )
        return mesh, banners

    def _alerts(self) -> dict[str, Any]:
        recent = list(self.feed.alerts)
        groups = views.alert_groups(recent)
        return {
            "groups": groups[:_ALERT_GROUPS_SHOWN],
            "more_groups": max(len(groups) - _ALERT_GROUPS_SHOWN, 0),
            "recent": list(reversed(recent[-50:])),
            "live": self.feed.stats.subscribed,
        }

    async def mesh_page(self, request: Request) -> Response:
        self._read_guard(request)
        mesh, banners = await self._mesh_data()
        if not self.feed.stats.subscribed:
            banners.append("Live events are not flowing yet: NATS is not connected.")
        return self._render(
            request,
            "mesh.html",
            _Page(title="Mesh", nav="mesh", banners=banners),
            {"mesh": mesh, "alerts": self._alerts()},
        )

    async def api_mesh(self, request: Request) -> Response:
        self._read_guard(request)
        mesh, banners = await self._mesh_data()
        return JSONResponse({"mesh": mesh, "problems": banners})

    async def api_alerts(self, request: Request) -> Response:
        self._read_guard(request)
        return JSONResponse(self._alerts())

    async def api_events(self, request: Request) -> Response:
        """Server-sent events: `agent`, `job`, `model` and `alert` messages as they come."""
        self._read_guard(request)
        sub = self.feed.subscribe()

        async def stream() -> AsyncIterator[str]:
            try:
                yield "retry: 2000\n\n"
                while not self.stopping.is_set():
                    try:
                        kind, data = await asyncio.wait_for(sub.queue.get(), _KEEPALIVE_S)
                    except TimeoutError:
                        yield ": keepalive\n\n"
                        continue
                    if kind == "end":
                        return
                    yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"
            finally:
                self.feed.unsubscribe(sub)

        return _sse(stream())

    # ------------------------------------------------------------------ training

    async def _jobs(self) -> tuple[list[dict[str, Any]], list[str]]:
        try:
            return [views.job_view(j) for j in await self.clients.list_jobs()], []
        except CallFailed as exc:
            if not exc.unavailable:
                raise _failure(exc) from None
            return [], [f"The trainer is not reachable, so jobs cannot be listed: {exc.details}"]

    async def training_page(self, request: Request) -> Response:
        self._read_guard(request)
        return await self._training(request, forms.FormResult(dict(forms.JOB_DEFAULTS)))

    async def _training(
        self, request: Request, form: forms.FormResult, status: int = 200, error: str = ""
    ) -> Response:
        jobs, banners = await self._jobs()
        return self._render(
            request,
            "training.html",
            _Page(title="Training", nav="training", banners=banners),
            {
                "jobs": jobs,
                "form": form,
                "form_error": error or form.errors.get("form", ""),
                "request_id": uuid.uuid4().hex,
                "strategies": forms.STRATEGIES,
            },
            status=status,
        )

    async def submit_job_form(self, request: Request) -> Response:
        data = await self._change_guard_form(request)
        spec, result = forms.job_spec(data)
        if spec is None:
            return await self._training(request, result, status=400)
        request_id = data.get("request_id")
        try:
            job = await self.clients.submit_job(
                spec, request_id if isinstance(request_id, str) else ""
            )
        except CallFailed as exc:
            if exc.code != grpc.StatusCode.INVALID_ARGUMENT:
                return await self._training(
                    request, result, status=_failure(exc).status, error=exc.describe()
                )
            target = forms.job_field_for(exc.field)
            if target is None:
                return await self._training(request, result, status=400, error=exc.details)
            result.errors[target] = f"{exc.field}: {exc.message}"
            return await self._training(request, result, status=400)
        return RedirectResponse(f"/training/jobs/{quote(job.job_id, safe='')}", status_code=303)

    async def _job(self, job_id: str) -> trainer_pb2.Job:
        try:
            return await self.clients.get_job(job_id)
        except CallFailed as exc:
            if exc.code == grpc.StatusCode.NOT_FOUND:
                raise ConsoleError(404, f"no job {job_id!r} on the trainer") from None
            raise _failure(exc) from None

    async def job_page(self, request: Request) -> Response:
        self._read_guard(request)
        job = await self._job(request.path_params["job_id"])
        view = views.job_view(job, detail=True)
        return self._render(
            request,
            "job.html",
            _Page(title=f"Job {job.job_id}", nav="training"),
            {"job": view, "terminal": view["state"] in ("SUCCEEDED", "FAILED", "CANCELLED")},
        )

    async def cancel_job_form(self, request: Request) -> Response:
        await self._change_guard_form(request)
        job_id = request.path_params["job_id"]
        try:
            await self.clients.cancel_job(job_id, "cancelled from the console")
        except CallFailed as exc:
            if exc.code == grpc.StatusCode.NOT_FOUND:
                raise ConsoleError(404, f"no job {job_id!r} on the trainer") from None
            raise _failure(exc) from None
        return RedirectResponse(f"/training/jobs/{quote(job_id, safe='')}", status_code=303)

    async def api_jobs(self, request: Request) -> Response:
        self._read_guard(request)
        try:
            jobs = await self.clients.list_jobs()
        except CallFailed as exc:
            raise _failure(exc) from None
        return JSONResponse({"jobs": [views.job_view(j) for j in jobs]})

    async def api_job(self, request: Request) -> Response:
        self._read_guard(request)
        job = await self._job(request.path_params["job_id"])
        return JSONResponse({"job": views.job_view(job, detail=True)})

    async def api_submit_job(self, request: Request) -> Response:
        body = await self._change_guard_api(request)
        try:
            spec = forms.job_spec_from_json(body.get("spec"))
        except ValueError as exc:
            raise ConsoleError(400, str(exc)) from None
        request_id = body.get("request_id", "")
        if not isinstance(request_id, str):
            raise ConsoleError(400, "request_id: a string")
        try:
            job = await self.clients.submit_job(spec, request_id)
        except CallFailed as exc:
            error = _failure(exc)
            if exc.field:
                error.fields = {exc.field: exc.message}
            raise error from None
        return JSONResponse({"job": views.job_view(job, detail=True)}, status_code=201)

    async def api_cancel_job(self, request: Request) -> Response:
        await self._change_guard_api(request)
        job_id = request.path_params["job_id"]
        try:
            job = await self.clients.cancel_job(job_id, "cancelled from the console")
        except CallFailed as exc:
            if exc.code == grpc.StatusCode.NOT_FOUND:
                raise ConsoleError(404, f"no job {job_id!r} on the trainer") from None
            raise _failure(exc) from None
        return JSONResponse({"job": views.job_view(job, detail=True)})

    async def api_job_events(self, request: Request) -> Response:
        """Server-sent events of one job: its retained events, then live ones until it ends.

        Each `job` event carries the `JobEvent` (`views.job_event_view`; progress
        events carry the model's parameter count). The stream resumes after
        `Last-Event-ID` (or `?after=`), and ends with an `end` event.
        """
        self._read_guard(request)
        job_id = request.path_params["job_id"]
        raw_after = request.headers.get("last-event-id") or request.query_params.get("after", "0")
        try:
            after = max(int(raw_after), 0)
        except ValueError:
            raise ConsoleError(400, "after: a whole number") from None
        await self._job(job_id)  # 404 for an unknown job, before the stream starts

        async def stream() -> AsyncIterator[str]:
            yield "retry: 2000\n\n"
            try:
                async for event in self.clients.watch_job(job_id, after):
                    view = views.job_event_view(event)
                    yield f"id: {event.sequence}\nevent: job\ndata: {json.dumps(view)}\n\n"
                    if self.stopping.is_set():
                        return
                yield "event: end\ndata: {}\n\n"
            except CallFailed as exc:
                yield f"event: failure\ndata: {json.dumps({'error': exc.describe()})}\n\n"

        return _sse(stream())

    # ------------------------------------------------------------------ models

    async def _models(self) -> list[dict[str, Any]]:
        """Every model with its latest version's metrics (for the first models only)."""
        try:
            summaries = await self.clients.list_models()
        except CallFailed as exc:
            raise _failure(exc) from None
        models = [views.model_summary_view(s) for s in summaries]
        shown = models[:_GALLERY_METRICS]
        latest = await asyncio.gather(
            *(self.clients.versions(m["name"], limit=1) for m in shown), return_exceptions=True
        )
        for model, found in zip(shown, latest, strict=True):
            if isinstance(found, list) and found:
                model["metrics"] = views.version_view(found[0])["metrics"]
        return models

    async def _model(self, name: str) -> dict[str, Any]:
        """Everything the model page shows; the router's part may be missing (`problems`)."""
        try:
            versions = await self.clients.versions(name)
            if not versions:
                raise ConsoleError(404, f"model {name!r} is not registered")
            history = await self.clients.alias_history(name)
        except CallFailed as exc:
            raise _failure(exc) from None
        problems: list[str] = []
        routes: list[dict[str, Any]] = []
        stats: dict[str, Any] = {"window_s": 0.0, "versions": {}, "replicas": []}
        try:
            routes = [views.route_view(r) for r in await self.clients.routes(name)]
            stats = views.stats_view(await self.clients.router_stats(name))
        except CallFailed as exc:
            problems.append(
                f"The router is not reachable, so routes and serving stats are missing: "
                f"{exc.details}"
            )
        version_views = [views.version_view(v) for v in versions]
        aliases = {a: v["version"] for v in version_views for a in v["aliases"]}
        return {
            "name": name,
            "versions": version_views,
            "aliases": dict(sorted(aliases.items())),
            "history": [views.history_view(e) for e in history],
            "routes": routes,
            "route_by_alias": {r["alias"]: r for r in routes},
            "stats": stats,
            "problems": problems,
        }

    async def models_page(self, request: Request) -> Response:
        self._read_guard(request)
        banners: list[str] = []
        models: list[dict[str, Any]] = []
        try:
            models = await self._models()
        except ConsoleError as exc:
            if exc.status != 503:
                raise
            banners.append(exc.message)
        return self._render(
            request,
            "models.html",
            _Page(title="Models", nav="models", banners=banners),
            {"models": models},
        )

    async def model_page(self, request: Request) -> Response:
        self._read_guard(request)
        model = await self._model(request.path_params["name"])
        return self._render(
            request,
            "model.html",
            _Page(title=f"Model {model['name']}", nav="models", banners=model["problems"]),
            {"model": model},
        )

    async def api_models(self, request: Request) -> Response:
        self._read_guard(request)
        return JSONResponse({"models": await self._models()})

    async def api_model(self, request: Request) -> Response:
        self._read_guard(request)
        return JSONResponse({"model": await self._model(request.path_params["name"])})

    def _version_arg(self, raw: object) -> int:
        if isinstance(raw, bool):
            raise ConsoleError(400, "version: a version number >= 1", {"version": "must be >= 1"})
        try:
            version = int(raw) if isinstance(raw, int | str) else 0
        except ValueError:
            version = 0
        if version < 1:
            raise ConsoleError(400, "version: a version number >= 1", {"version": "must be >= 1"})
        return version

    async def _promote(self, name: str, version: int, expected: int) -> dict[str, Any]:
        try:
            entry = await self.clients.set_alias(
                name, _PRODUCTION, version, expected, "promoted from the console"
            )
        except CallFailed as exc:
            if exc.code == grpc.StatusCode.FAILED_PRECONDITION:
                raise ConsoleError(
                    409, f"{_PRODUCTION} of {name} moved meanwhile; nothing changed ({exc.details})"
                ) from None
            raise _failure(exc) from None
        return views.history_view(entry)

    async def _rollback(self, name: str, alias: str) -> dict[str, Any]:
        try:
            reply = await self.clients.rollback(name, alias, "rolled back from the console")
        except CallFailed as exc:
            if exc.code == grpc.StatusCode.FAILED_PRECONDITION:
                message = f"cannot roll {alias} of {name} back: {exc.details}"
                raise ConsoleError(409, message) from None
            raise _failure(exc) from None
        return views.history_view(reply.entry)

    async def promote_form(self, request: Request) -> Response:
        form = await self._change_guard_form(request)
        name = request.path_params["name"]
        version = self._version_arg(form.get("version"))
        model = await self._model(name)
        if version not in {v["version"] for v in model["versions"]}:
            raise ConsoleError(404, f"model {name!r} has no version {version}")
        current = model["aliases"].get(_PRODUCTION, 0)
        expected_raw = form.get("expected")
        if form.get("confirm") != "yes":
            return self._render(
                request,
                "confirm.html",
                _Page(title="Confirm promotion", nav="models"),
                {
                    "action": f"/models/{quote(name, safe='')}/promote",
                    "question": (
                        f"Move {_PRODUCTION} of {name} from "
                        f"{'v' + str(current) if current else '(none)'} to v{version}?"
                    ),
                    "fields": {"version": str(version), "expected": str(current)},
                    "back": f"/models/{quote(name, safe='')}",
                },
            )
        digits = isinstance(expected_raw, str) and expected_raw.isdigit()
        expected = int(expected_raw) if digits and isinstance(expected_raw, str) else 0
        await self._promote(name, version, expected)
        return RedirectResponse(f"/models/{quote(name, safe='')}", status_code=303)

    async def rollback_form(self, request: Request) -> Response:
        form = await self._change_guard_form(request)
        name = request.path_params["name"]
        alias_raw = form.get("alias")
        alias = alias_raw if isinstance(alias_raw, str) and alias_raw else _PRODUCTION
        model = await self._model(name)
        if alias not in model["aliases"]:
            raise ConsoleError(404, f"model {name!r} has no alias {alias!r}")
        if form.get("confirm") != "yes":
            return self._render(
                request,
                "confirm.html",
                _Page(title="Confirm rollback", nav="models"),
                {
                    "action": f"/models/{quote(name, safe='')}/rollback",
                    "question": (
                        f"Move {alias} of {name} (now v{model['aliases'][alias]}) back to the "
                        f"version it pointed at before its latest change?"
                    ),
                    "fields": {"alias": alias},
                    "back": f"/models/{quote(name, safe='')}",
                },
            )
        await self._rollback(name, alias)
        return RedirectResponse(f"/models/{quote(name, safe='')}", status_code=303)

    async def api_promote(self, request: Request) -> Response:
        body = await self._change_guard_api(request)
        name = request.path_params["name"]
        model = await self._model(name)
        raw = body.get("version")
        if raw is None:
            raw = model["aliases"].get(_CANARY)
            if raw is None:
                raise ConsoleError(400, f"model {name!r} has no {_CANARY} alias; give the version")
        version = self._version_arg(raw)
        if version not in {v["version"] for v in model["versions"]}:
            raise ConsoleError(404, f"model {name!r} has no version {version}")
        entry = await self._promote(name, version, model["aliases"].get(_PRODUCTION, 0))
        return JSONResponse({"entry": entry})

    async def api_rollback(self, request: Request) -> Response:
        body = await self._change_guard_api(request)
        alias = body.get("alias", _PRODUCTION)
        if not isinstance(alias, str) or not alias:
            raise ConsoleError(400, "alias: a non-empty string")
        entry = await self._rollback(request.path_params["name"], alias)
        return JSONResponse({"entry": entry})

    # ------------------------------------------------------------------ blueprints

    async def _blueprints(self) -> dict[str, Any]:
        try:
            catalogue = await self.clients.blueprints()
            kernels = await self.clients.kernels()
        except CallFailed as exc:
            raise _failure(exc) from None
        entries, custom = views.blueprint_views(catalogue, kernels)
        return {"catalogue": entries, "custom": custom}

    async def blueprints_page(self, request: Request) -> Response:
        self._read_guard(request)
        return await self._blueprints_render(
            request, forms.FormResult(dict(forms.BLUEPRINT_DEFAULTS))
        )

    async def _blueprints_render(
        self,
        request: Request,
        form: forms.FormResult,
        status: int = 200,
        error: str = "",
        result: dict[str, Any] | None = None,
    ) -> Response:
        banners: list[str] = []
        data: dict[str, Any] = {"catalogue": [], "custom": []}
        try:
            data = await self._blueprints()
        except ConsoleError as exc:
            if exc.status != 503:
                raise
            banners.append(exc.message)
        return self._render(
            request,
            "blueprints.html",
            _Page(title="Blueprints", nav="blueprints", banners=banners),
            {
                **data,
                "form": form,
                "form_error": error or form.errors.get("form", ""),
                "result": result,
            },
            status=status,
        )

    async def _compile(
        self, request_pb: compiler_pb2.CompileRequest, result: forms.FormResult
    ) -> tuple[dict[str, Any] | None, str, int]:
        """(the stored kernel, a general error, the status) of compiling the form's blueprint;
        field errors land in `result`."""
        try:
            reply = await self.clients.compile(request_pb)
        except CallFailed as exc:
            if exc.code == grpc.StatusCode.INVALID_ARGUMENT:
                target = forms.blueprint_field_for(exc.field)
                if target is not None:
                    result.errors[target] = f"{exc.field}: {exc.message}"
                    return None, "", 400
                return None, exc.details, 400
            return None, exc.describe(), _failure(exc).status
        if not reply.HasField("kernel"):
            failed = [
                f"{c.name}: {c.detail}" for c in reply.validation.checks if c.outcome == 2
            ] or ["validation failed"]
            return None, "the kernel failed validation: " + "; ".join(failed), 422
        kernel = compiler_pb2.KernelInfo(
            kernel=reply.kernel, metadata=reply.metadata, validation=reply.validation
        )
        return {**views.kernel_view(kernel), "cache_hit": reply.cache_hit}, "", 200

    async def add_blueprint_form(self, request: Request) -> Response:
        data = await self._change_guard_form(request)
        request_pb, result = forms.compile_request(data)
        if request_pb is None:
            return await self._blueprints_render(request, result, status=400)
        kernel, error, status = await self._compile(request_pb, result)
        return await self._blueprints_render(request, result, status, error, kernel)

    async def measure_blueprint_form(self, request: Request) -> Response:
        await self._change_guard_form(request)
        name = request.path_params["name"]
        try:
            catalogue = await self.clients.blueprints()
        except CallFailed as exc:
            raise _failure(exc) from None
        info = next((b for b in catalogue if b.name == name), None)
        if info is None:
            raise ConsoleError(404, f"no blueprint {name!r} in the catalogue")
        request_pb = compiler_pb2.CompileRequest(
            blueprint=compiler_pb2.BlueprintSpec(name=name), target=info.param_count_target
        )
        result = forms.FormResult(dict(forms.BLUEPRINT_DEFAULTS))
        kernel, error, status = await self._compile(request_pb, result)
        if kernel is None:
            return await self._blueprints_render(request, result, status, error)
        return RedirectResponse(f"/blueprints#bp-{quote(name, safe='')}", status_code=303)

    async def api_blueprints(self, request: Request) -> Response:
        self._read_guard(request)
        return JSONResponse(await self._blueprints())

    async def api_add_blueprint(self, request: Request) -> Response:
        body = await self._change_guard_api(request)
        raw_slot = body.get("slot")
        slot: dict[str, Any] = raw_slot if isinstance(raw_slot, dict) else {}
        nodes = body.get("nodes")
        fields = {
            "name": str(body.get("name", "")),
            "slot_kind": str(slot.get("kind", "linear")),
            "features": str(slot.get("features", "")),
            "height": str(slot.get("height", "")),
            "width": str(slot.get("width", "")),
            "nodes": json.dumps(nodes) if nodes is not None else "",
            "output": str(body.get("output", "")),
        }
        request_pb, result = forms.compile_request(fields)
        if request_pb is None:
            raise ConsoleError(400, "the blueprint is not readable", result.errors)
        kernel, error, status = await self._compile(request_pb, result)
        if kernel is None:
            raise ConsoleError(status, error or "the blueprint is invalid", result.errors)
        return JSONResponse({"kernel": kernel}, status_code=201)

    # ------------------------------------------------------------------ login

    async def login_page(self, request: Request) -> Response:
        return self._render(
            request,
            "login.html",
            _Page(title="Log in", nav="login"),
            {"next": _local_path(request.query_params.get("next", "/mesh")), "error": ""},
        )

    async def login(self, request: Request) -> Response:
        self._same_origin(request)
        form = await self._form(request)
        session = self._session(request)
        csrf = form.get("csrf")
        next_path = _local_path(str(form.get("next") or "/mesh"))
        if session is None or not session.csrf_ok(csrf if isinstance(csrf, str) else None):
            raise ConsoleError(403, "the login form expired; reload the page")
        token = form.get("token")
        if self.access.open:
            return RedirectResponse(next_path, status_code=303)
        if not tokens_match(token if isinstance(token, str) else None, self.settings.token):
            _log.warning("console login refused")
            return self._render(
                request,
                "login.html",
                _Page(title="Log in", nav="login"),
                {"next": next_path, "error": "That is not the mesh's token."},
                status=401,
            )
        fresh = self.sessions.login(session)
        response = RedirectResponse(next_path, status_code=303)
        self._set_cookie(response, fresh)
        return response

    async def logout(self, request: Request) -> Response:
        self._same_origin(request)
        form = await self._form(request)
        session = self._session(request)
        csrf = form.get("csrf")
        if session is None or not session.csrf_ok(csrf if isinstance(csrf, str) else None):
            raise ConsoleError(403, "the form expired; reload the page")
        response = RedirectResponse("/login", status_code=303)
        self._set_cookie(response, self.sessions.logout(session))
        return response

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def favicon(self, request: Request) -> Response:
        return Response(status_code=204)

    async def root(self, request: Request) -> Response:
        return RedirectResponse("/mesh", status_code=303)


def _local_path(value: str) -> str:
    """`value` when it is a path on this console, else `/mesh` (no open redirects)."""
    if not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/mesh"
    return value


def _sse(stream: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        stream,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


class _SecurityHeaders:
    """Adds the console's security headers to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], *_SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


Handler = Callable[[Request], Awaitable[Response]]


def _guarded(console: ConsoleApp, handler: Handler) -> Handler:
    """`handler` with the console's errors turned into pages or JSON (never a traceback)."""

    async def run(request: Request) -> Response:
        try:
            return await handler(request)
        except ConsoleError as exc:
            return console.error_response(request, exc)
        except CallFailed as exc:
            return console.error_response(request, _failure(exc))

    return run


def build_app(console: ConsoleApp) -> Starlette:
    """The console's ASGI application."""
    c = console
    table: list[tuple[str, Handler, list[str]]] = [
        ("/", c.root, ["GET"]),
        ("/healthz", c.healthz, ["GET"]),
        ("/favicon.ico", c.favicon, ["GET"]),
        ("/login", c.login_page, ["GET"]),
        ("/login", c.login, ["POST"]),
        ("/logout", c.logout, ["POST"]),
        ("/mesh", c.mesh_page, ["GET"]),
        ("/training", c.training_page, ["GET"]),
        ("/training/jobs", c.submit_job_form, ["POST"]),
        ("/training/jobs/{job_id}", c.job_page, ["GET"]),
        ("/training/jobs/{job_id}/cancel", c.cancel_job_form, ["POST"]),
        ("/models", c.models_page, ["GET"]),
        ("/models/{name}", c.model_page, ["GET"]),
        ("/models/{name}/promote", c.promote_form, ["POST"]),
        ("/models/{name}/rollback", c.rollback_form, ["POST"]),
        ("/blueprints", c.blueprints_page, ["GET"]),
        ("/blueprints", c.add_blueprint_form, ["POST"]),
        ("/blueprints/{name}/measure", c.measure_blueprint_form, ["POST"]),
        ("/api/mesh", c.api_mesh, ["GET"]),
        ("/api/alerts", c.api_alerts, ["GET"]),
        ("/api/events", c.api_events, ["GET"]),
        ("/api/jobs", c.api_jobs, ["GET"]),
        ("/api/jobs", c.api_submit_job, ["POST"]),
        ("/api/jobs/{job_id}", c.api_job, ["GET"]),
        ("/api/jobs/{job_id}/events", c.api_job_events, ["GET"]),
        ("/api/jobs/{job_id}/cancel", c.api_cancel_job, ["POST"]),
        ("/api/models", c.api_models, ["GET"]),
        ("/api/models/{name}", c.api_model, ["GET"]),
        ("/api/models/{name}/promote", c.api_promote, ["POST"]),
        ("/api/models/{name}/rollback", c.api_rollback, ["POST"]),
        ("/api/blueprints", c.api_blueprints, ["GET"]),
        ("/api/blueprints", c.api_add_blueprint, ["POST"]),
    ]
    routes: list[Route | Mount] = [
        Route(path, _guarded(c, handler), methods=methods) for path, handler, methods in table
    ]
    routes.append(Mount("/static", app=StaticFiles(directory=str(_HERE / "static")), name="static"))

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        message = "no such page" if status == 404 else "this method is not allowed here"
        return c.error_response(request, ConsoleError(status, message))

    async def crashed(request: Request, exc: Exception) -> Response:
        return c.internal_error(request, exc)

    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: not_found, Exception: crashed},
    )
    app.add_middleware(_SecurityHeaders)
    return app
