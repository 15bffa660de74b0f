"""A foreign agent: any executable that speaks the health protocol, no project imports.

Used by the supervisor's tests and benchmark. Behaviour by environment:
  FOREIGN_MODE   ok (default) | exit_now | exit_after_ready | ignore_sigterm | silent
                 | unhealthy_after_ready
  FOREIGN_DELAY_S  seconds to wait before binding the health port (slow start)
  FOREIGN_RECORD   a file to append "<event> <agent> <time.time()>" lines to
                   (events: start, ready, term, exit)
  GRAFTMESH_AGENT, GRAFTMESH_HOST, GRAFTMESH_HEALTH_PORT  as the supervisor sets them
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from datetime import UTC, datetime

import zmq

AGENT = os.environ.get("GRAFTMESH_AGENT", "foreign")
MODE = os.environ.get("FOREIGN_MODE", "ok")
RECORD = os.environ.get("FOREIGN_RECORD")


def record(event: str) -> None:
    if RECORD:
        with open(RECORD, "a", encoding="utf-8") as fh:
            fh.write(f"{event} {AGENT} {time.time():.6f}\n")


def main() -> int:
    record("start")
    if MODE == "exit_now":
        record("exit")
        return 3
    stopping = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stopping
        record("term")
        if MODE != "ignore_sigterm":
            stopping = True

    signal.signal(signal.SIGTERM, on_term)
    time.sleep(float(os.environ.get("FOREIGN_DELAY_S", "0")))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REP)
    sock.setsockopt(zmq.LINGER, 0)
    host = os.environ.get("GRAFTMESH_HOST", "127.0.0.1")
    sock.bind(f"tcp://{host}:{os.environ['GRAFTMESH_HEALTH_PORT']}")
    answered = 0
    deadline_after_ready: float | None = None
    while not stopping:
        if deadline_after_ready is not None and time.monotonic() > deadline_after_ready:
            record("exit")
            return 1
        if not sock.poll(50):
            continue
        request = sock.recv()
        if MODE == "silent":
            continue  # never answers (a hung agent)
        try:
            ok = json.loads(request) == {"action": "health_check"}
        except ValueError:
            ok = False
        status = "healthy"
        if MODE == "unhealthy_after_ready" and answered > 0:
            status = "unhealthy"
        reply = (
            {
                "status": status,
                "service": AGENT,
                "timestamp": datetime.now(UTC).isoformat(),
                "issues": [],
                "details": {"pid": os.getpid()},
            }
            if ok
            else {"status": "error", "error": "unknown request"}
        )
        sock.send(json.dumps(reply).encode())
        if answered == 0:
            record("ready")
            if MODE == "exit_after_ready":
                deadline_after_ready = time.monotonic() + 0.3
        answered += 1
    sock.close()
    ctx.term()
    record("exit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
