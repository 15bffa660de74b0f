"""`tune_allocator`: large buffers freed and allocated again reuse their pages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from common.allocator import tune_allocator

_ROOT = Path(__file__).resolve().parents[2]

# Rounds of eight 1 MiB buffers alive at once, then freed, on a thread of its own
# (as gRPC messages are): the page faults they cost, printed.
_CHURN = """
import resource, sys, threading
from common.allocator import tune_allocator
if sys.argv[1] == "tuned":
    assert tune_allocator({})
faults = []
def churn():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(40):
        blocks = [bytearray(1 << 20) for _ in range(8)]
        del blocks
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=churn)
thread.start()
thread.join()
print(faults[0])
"""


def _faults(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _CHURN, mode],
        cwd=_ROOT,
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return int(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_buffers_reuse_their_pages_instead_of_faulting_in_new_ones() -> None:
    untuned, tuned = _faults("default"), _faults("tuned")
    pages_per_round = 8 * (1 << 20) // 4096
    # Untuned, each round's buffers land in fresh pages again (the heap was trimmed).
    assert untuned > 20 * pages_per_round
    # Tuned, the first round's pages are reused by the other 39.
    assert tuned < 3 * pages_per_round


@pytest.mark.parametrize(
    "environ",
    [
        {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1048576"},
        {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=65536"},
        {"MALLOC_MMAP_THRESHOLD_": "65536"},
        {"MALLOC_TRIM_THRESHOLD_": "0"},
    ],
)
def test_thresholds_the_user_set_are_left_alone(environ: dict[str, str]) -> None:
    assert tune_allocator(environ) is False
