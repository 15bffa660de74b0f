"""One agent's OS process: started in its own group, output to a rotating log file."""

from __future__ import annotations

import asyncio
import logging
import logging.handlers
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from common.config import Agent
from common.process import orphan_proof, signal_group, tail_lines, terminate_group

LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 3


def agent_argv(agent: Agent) -> list[str]:
    """The command line of an agent: `python -m module` or its own `command`, plus `args`."""
    if agent.spec.module is not None:
        return [sys.executable, "-m", agent.spec.module, *agent.spec.args]
    assert agent.spec.command is not None
    return [*agent.spec.command, *agent.spec.args]


def log_path(run_dir: Path, agent: str) -> Path:
    return run_dir / "logs" / f"{agent}.log"


class _LogPump:
    """Copies a child's output, line by line, into a size-rotated file.

    The child cannot rotate a file it writes to directly, so its stdout/stderr is
    a pipe and the rotation is done here by the standard library's handler.
    """

    def __init__(self, agent: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS, encoding="utf-8"
        )
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        self._name = agent

    def write(self, line: str) -> None:
        record = logging.LogRecord(self._name, logging.INFO, "", 0, line, None, None)
        self._handler.emit(record)

    async def run(self, stream: asyncio.StreamReader) -> None:
        try:
            while True:
                raw = await stream.readline()
                if not raw:
                    return
                self.write(raw.decode("utf-8", errors="replace").rstrip("\n"))
        except ValueError:  # a line over the reader's limit: keep what we can
            self.write("[supervisor: over-long output line dropped]")
            await self.run(stream)
        finally:
            self._handler.flush()

    def close(self) -> None:
        self._handler.close()


class AgentProcess:
    """The running OS process of one agent (one instance per start)."""

    def __init__(
        self,
        agent: Agent,
        env: Mapping[str, str],
        cwd: Path,
        log_file: Path,
        argv: Sequence[str] | None = None,
    ) -> None:
        self.agent = agent
        self.argv = list(argv) if argv is not None else agent_argv(agent)
        self._env = dict(env)
        self._cwd = cwd
        self.log_file = log_file
        self._proc: asyncio.subprocess.Process | None = None
        self._pump_task: asyncio.Task[None] | None = None
        self._pump: _LogPump | None = None
        self.started_at: float | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> int:
        """Start the process (from the event loop's thread: see common.process); its pid."""
        self._pump = _LogPump(self.agent.name, self.log_file)
        self._pump.write(
            f"[supervisor {time.strftime('%Y-%m-%dT%H:%M:%S')}] starting: {' '.join(self.argv)}"
        )
        argv, preexec_fn = orphan_proof(self.argv)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                cwd=self._cwd,
                env=self._env,
                start_new_session=True,
                preexec_fn=preexec_fn,
                limit=1024 * 1024,
            )
        except OSError as err:
            self._pump.write(f"[supervisor] cannot start: {err}")
            self._pump.close()
            raise
        self.started_at = time.monotonic()
        assert self._proc.stdout is not None
        self._pump_task = asyncio.create_task(
            self._pump.run(self._proc.stdout), name=f"log-{self.agent.name}"
        )
        return self._proc.pid

    async def wait(self) -> int:
        assert self._proc is not None
        code = await self._proc.wait()
        await self._finish_pump()
        return code

    async def stop(self, grace_s: float) -> int | None:
        """SIGTERM to its group, SIGKILL after `grace_s`; the exit code (None if never started)."""
        if self._proc is None:
            return None
        code = await terminate_group(self._proc, grace_s)
        await self._finish_pump()
        return code

    def kill(self) -> None:
        """SIGKILL the whole group at once (no grace)."""
        if self._proc is not None:
            signal_group(self._proc.pid, signal.SIGKILL)

    async def _finish_pump(self) -> None:
        if self._pump_task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._pump_task), timeout=2.0)
            except TimeoutError:
                # A grandchild still holds the pipe open; its group was killed, stop reading.
                self._pump_task.cancel()
            self._pump_task = None
        if self._pump is not None:
            self._pump.close()
            self._pump = None

    def tail(self, lines: int = 20) -> str:
        return tail_lines(self.log_file, lines)


def agent_environment(
    agent: Agent,
    *,
    nats_url: str,
    redis_url: str,
    config_path: Path,
    run_dir: Path,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of an agent: ours, the GRAFTMESH_* contract, then the agent's `env`."""
    env = dict(os.environ if base is None else base)
    env.update(
        {
            "GRAFTMESH_AGENT": agent.name,
            "GRAFTMESH_GROUP": agent.group,
            "GRAFTMESH_MACHINE": agent.machine,
            "GRAFTMESH_HOST": agent.host,
            "GRAFTMESH_PORT": "" if agent.spec.port is None else str(agent.spec.port),
            "GRAFTMESH_HEALTH_PORT": str(agent.spec.health_check_port),
            "GRAFTMESH_METRICS_PORT": str(agent.spec.effective_metrics_port or ""),
            "GRAFTMESH_NATS_URL": nats_url,
            "GRAFTMESH_REDIS_URL": redis_url,
            "GRAFTMESH_CONFIG": str(config_path),
            "GRAFTMESH_RUN_DIR": str(run_dir),
            # Lets the agent check at start that its supervisor still lives (common.process).
            "GRAFTMESH_SUPERVISOR_PID": str(os.getpid()),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(agent.spec.env)
    return env
