"""The C allocator's thresholds for processes that move large messages.

glibc's malloc adapts two thresholds as a process runs: blocks above the *mmap
threshold* get pages of their own (mapped, faulted in zeroed, unmapped on free),
and free memory above the *trim threshold* at the top of a heap goes back to the
kernel. Both start low (128 KiB), and the trim threshold is applied to each
thread's heap. A process that keeps a few 1 MiB gRPC messages alive at a time
(an upload to the registry, the trainer sending one, a batch of tensors through
the router) frees more than that at once, so the heap shrinks after every few
messages and the next ones are written into fresh pages again. Measured on a
50 MB `RegisterModel`: page faults and page clearing were about a third of the
receiver's CPU, and the stream alone took 60-130 ms; with the thresholds below,
30-36 ms, and half the sender's CPU.

`tune_allocator` sets, from the start, the values glibc's own adaptive rule ends
at: the mmap threshold at its ceiling on 64-bit (32 MiB) and the trim threshold
at twice that. The cost is memory a process has used and freed staying mapped
(up to the trim threshold per heap) instead of being returned at once.

Nothing is changed when the user set either threshold (in `GLIBC_TUNABLES`, or
glibc's `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_`), or when the C
library has no working `mallopt` (musl, other systems).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Mapping

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "tune_allocator"]

MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD
# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _user_chose(environ: Mapping[str, str]) -> bool:
    """Whether either threshold was set through the environment (glibc's two ways)."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    return any(
        f"glibc.malloc.{name.lower()}=" in tunables or f"MALLOC_{name}_" in environ
        for name in ("MMAP_THRESHOLD", "TRIM_THRESHOLD")
    )


def tune_allocator(environ: Mapping[str, str] | None = None) -> bool:
    """Set the thresholds above (once, at process start); whether they were set."""
    if not sys.platform.startswith("linux") or _user_chose(
        os.environ if environ is None else environ
    ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # Each call returns 1 on success; the mmap threshold first (setting either
    # one stops glibc adapting both).
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
