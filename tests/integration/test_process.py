"""Children started through common.process die with their parent, whichever way is used."""

from __future__ import annotations

import signal
import subprocess
import sys

import psutil
import pytest

from common.process import _setpriv
from tests.integration.mesh import ROOT
from tests.wait import wait_until

pytestmark = pytest.mark.integration

_PARENT = """
import subprocess, sys, time
import common.process as p
if sys.argv[1] == "prctl":
    p._setpriv = lambda: None
argv, preexec = p.orphan_proof([sys.executable, "-c", "import time; time.sleep(60)"])
child = subprocess.Popen(argv, preexec_fn=preexec, start_new_session=True)
print(child.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("way", ["setpriv", "prctl"])
def test_child_dies_when_its_parent_is_sigkilled(way: str) -> None:
    if way == "setpriv" and _setpriv() is None:
        pytest.skip("setpriv with --pdeathsig is not available here")
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, way], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        child = psutil.Process(child_pid)
        assert child.is_running()
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        wait_until(
            lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE,
            10,
            f"child {child_pid} to die with its parent ({way})",
        )
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
