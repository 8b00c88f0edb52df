"""Keep glibc's allocator from returning the engine's working memory to the kernel after every op.

A decode step allocates and frees many short-lived tensors of 0.1-30 MB (gathered spectral
entries, features, logits). glibc serves blocks above its mmap threshold (128 KiB, adapted
upwards only slowly) with a fresh ``mmap`` and unmaps them on free, so every such tensor pays
page faults on first touch; freed heap tops above the trim threshold are returned too. On this
2-core CPU that made one routed layer's delta 3.6 ms instead of 0.9 ms (64 rows, 256 x 256,
``bench/serve_throughput.py``; docs/benchmarks.md). Raising both thresholds once per process keeps
that memory in the heap for reuse; the cost is that up to ``TRIM_THRESHOLD`` of freed memory
stays mapped. Other C libraries (musl) have no ``mallopt``; there this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 << 20
TRIM_THRESHOLD = 1 << 30
_tuned = False


def keep_freed_memory_for_reuse() -> None:
    global _tuned
    if _tuned:
        return
    _tuned = True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        logger.info("no glibc mallopt; the CPU allocator keeps its defaults")
        return
    applied = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    logger.info("cpu allocator mmap_threshold=%d trim_threshold=%d applied=%s", MMAP_THRESHOLD, TRIM_THRESHOLD, applied)
