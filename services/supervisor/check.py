"""`graftmesh check-config`: what can be checked about the agents without starting them.

Each `module:` agent is byte-compiled (its entry: the module itself, or a
package's `__main__`) and imported in a separate interpreter, so a syntax
error, a missing dependency or an import-time crash shows before `up`. Each
`command:` agent's executable must exist and be executable. All agents are
checked, concurrently, and every problem is reported.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from pathlib import Path

from common.config import Agent, StartupConfig

IMPORT_TIMEOUT_S = 120.0

# Runs in a fresh interpreter: find the module's entry file, compile it, import the module.
_PROBE = r"""
import importlib, importlib.util, py_compile, sys
name = sys.argv[1]
spec = importlib.util.find_spec(name)
if spec is None:
    sys.exit(f"module {name!r} not found")
entry = spec
if spec.submodule_search_locations is not None:
    entry = importlib.util.find_spec(name + ".__main__")
    if entry is None:
        sys.exit(f"package {name!r} has no __main__ module, so `python -m {name}` cannot run it")
if entry.origin and entry.origin.endswith(".py"):
    try:
        py_compile.compile(entry.origin, doraise=True, cfile=None)
    except py_compile.PyCompileError as exc:
        sys.exit(exc.msg.strip())
importlib.import_module(name)
"""


async def _check_module(agent: Agent, cwd: Path) -> str | None:
    assert agent.spec.module is not None
    env = {**os.environ, **agent.spec.env, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _PROBE,
        agent.spec.module,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), IMPORT_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return f"importing took over {IMPORT_TIMEOUT_S:g}s"
    if proc.returncode == 0:
        return None
    lines = stderr.decode("utf-8", errors="replace").strip().splitlines()
    return lines[-1] if lines else f"import failed with exit code {proc.returncode}"


def _check_command(agent: Agent, cwd: Path) -> str | None:
    assert agent.spec.command is not None
    exe = agent.spec.command[0]
    path = Path(exe) if os.sep in exe else None
    if path is not None:
        resolved = path if path.is_absolute() else cwd / path
        if not resolved.exists():
            return f"command {exe!r} does not exist"
        if not os.access(resolved, os.X_OK):
            return f"command {exe!r} is not executable"
        return None
    return None if shutil.which(exe) else f"command {exe!r} is not on PATH"


async def check_agents(cfg: StartupConfig) -> list[str]:
    """Every problem found with the agents' entry points, as `group.agent: problem` lines."""
    cwd = (cfg.source or Path("startup_config.yaml")).resolve().parent
    agents = list(cfg.agents().values())
    # At most a few interpreters at once: importing ML agents is heavy.
    gate = asyncio.Semaphore(max(2, os.cpu_count() or 2))

    async def one(agent: Agent) -> str | None:
        where = f"agent_groups.{agent.group}.agents.{agent.name}"
        if agent.spec.command is not None:
            problem = _check_command(agent, cwd)
            return f"{where}.command: {problem}" if problem else None
        async with gate:
            problem = await _check_module(agent, cwd)
        return f"{where}.module: {problem}" if problem else None

    results = await asyncio.gather(*(one(a) for a in agents))
    return [r for r in results if r]
