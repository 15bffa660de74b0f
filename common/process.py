"""Child processes that never outlive their parent, and stopping them as a group.

Every process the mesh starts (agents, embedded NATS/Redis) gets its own process
group, so that stopping it also stops whatever it started, and on Linux
`PR_SET_PDEATHSIG`, so that the kernel signals it when its parent dies, even by
SIGKILL. The death signal is tied to the *thread* that forked the child, so
children must be started from a thread that lives as long as the parent does
(the event loop's thread), never from a short-lived worker thread.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    prctl: Callable[..., int] = libc.prctl
    return prctl


# Resolved once in the parent: the child, between fork and exec, only makes the call.
_PRCTL = _load_prctl()


def die_with_parent(sig: signal.Signals = signal.SIGKILL) -> Callable[[], None]:
    """A `preexec_fn` that makes the child receive `sig` when this process dies.

    It also closes the race where the parent died before the call took effect:
    then the child exits at once instead of running as an orphan.
    """
    parent_pid = os.getpid()

    def setup() -> None:
        if _PRCTL is not None:
            _PRCTL(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent_pid:
            os._exit(1)

    return setup


@functools.cache
def _setpriv() -> str | None:
    """util-linux's `setpriv`, when it can set the parent-death signal (Linux only)."""
    path = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    if path is None:
        return None
    try:
        probe = subprocess.run(
            [path, "--pdeathsig", "KILL", "--", "true"], capture_output=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return path if probe.returncode == 0 else None


def orphan_proof(
    argv: Sequence[str], sig: signal.Signals = signal.SIGKILL
) -> tuple[list[str], Callable[[], None] | None]:
    """The command line and `preexec_fn` that start `argv` so it dies with this process.

    Through `setpriv --pdeathsig` when it is available: then no `preexec_fn` is
    needed and the standard library can spawn with vfork, ~40x cheaper than a
    fork of a large process (it matters when hundreds of agents start). Otherwise
    `die_with_parent` in a `preexec_fn`.
    """
    setpriv = _setpriv()
    if setpriv is not None:
        return [setpriv, "--pdeathsig", sig.name.removeprefix("SIG"), "--", *argv], None
    return list(argv), die_with_parent(sig)


def parent_is(pid: int | None) -> bool:
    """False when the process that started us (`pid`) is gone and we were re-parented.

    `setpriv` cannot close the race where the parent dies before the death signal
    is set; a child that checks this at start closes it.
    """
    return pid is None or os.getppid() == pid


def signal_group(pgid: int, sig: signal.Signals) -> bool:
    """Send `sig` to a whole process group; False when the group is already gone."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    return True


async def wait_exit(proc: asyncio.subprocess.Process, timeout_s: float) -> int | None:
    """The exit code, or None when `proc` is still running after `timeout_s`."""
    try:
        return await asyncio.wait_for(proc.wait(), timeout=timeout_s)
    except TimeoutError:
        return None


async def terminate_group(
    proc: asyncio.subprocess.Process, grace_s: float, sig: signal.Signals = signal.SIGTERM
) -> int:
    """Stop a process started with `start_new_session=True`, and its whole group.

    `sig` (SIGTERM) to the group, up to `grace_s` for the leader to exit, then
    SIGKILL to the group in any case, so no straggler of the group survives.
    """
    if proc.returncode is None:
        signal_group(proc.pid, sig)
        if await wait_exit(proc, grace_s) is None:
            signal_group(proc.pid, signal.SIGKILL)
    signal_group(proc.pid, signal.SIGKILL)
    return await proc.wait()


def tail_lines(path: Path, lines: int = 20, max_bytes: int = 64 * 1024) -> str:
    """The last `lines` lines of a text file (reading at most `max_bytes` from its end)."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
