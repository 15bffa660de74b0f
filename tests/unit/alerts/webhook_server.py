"""A real local HTTP server standing in for an alert webhook, recording what it gets."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class WebhookServer:
    """Answers each POST with the next of `statuses` (then 200), except that the first
    POST of an alert of agent `fail_once_for` gets a 500. Bound to 127.0.0.1."""

    def __init__(self, statuses: list[int] | None = None, fail_once_for: str | None = None) -> None:
        self.statuses = list(statuses or [])
        self.fail_once_for = fail_once_for
        self.bodies: list[dict[str, Any]] = []
        self.answered: list[int] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status = server._answer(body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _answer(self, body: dict[str, Any]) -> int:
        with self._lock:
            status = self.statuses.pop(0) if self.statuses else 200
            if self.fail_once_for is not None and body.get("agent") == self.fail_once_for:
                self.fail_once_for = None
                status = 500
            self.bodies.append(body)
            self.answered.append(status)
            return status

    def received(self, agent: str) -> list[tuple[int, dict[str, Any]]]:
        """(status answered, body) of every POST about `agent`'s alerts, in order."""
        with self._lock:
            return [
                (status, body)
                for status, body in zip(self.answered, self.bodies, strict=True)
                if body.get("agent") == agent
            ]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
