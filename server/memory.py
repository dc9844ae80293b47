"""Giving freed memory back to the operating system after a large request.

glibc's allocator keeps the heap it grew for a big ``Detect`` (an hour at 48 kHz: the decoded
audio, its 16 kHz copy for offline diarization, the pipeline's intermediate arrays) mapped
after the arrays are freed: measured +518 MB RSS that stayed after one such request, so a
server's footprint ratcheted up to its largest request. ``malloc_trim`` returns the free
pages; it takes milliseconds, so it runs in a worker thread after the request, not per chunk.
Elsewhere (musl, macOS) it is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache


@cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def trim_heap() -> None:
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
