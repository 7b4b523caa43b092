"""Process settings of a router that serves for hours: its BLAS, its allocator, its collector.

The router's steady state is many short requests, each reading about a megabyte of hidden
states into slab-sized numpy buffers and freeing them again. The defaults of the libraries
underneath are tuned for other work, and each costs the router CPU on exactly this load.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import platform

from threadpoolctl import threadpool_info, threadpool_limits

__all__ = ["KEEP_FREED_BYTES", "MAP_FROM_BYTES", "blas_pools", "freeze_startup_objects", "tune_process"]

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Buffers below this come from the heap, not fresh pages: a slab (1 MB) and its float32 widening
# (2 MB) stay under it. Bigger ones (a long document's results) are rare enough to map afresh.
MAP_FROM_BYTES = 4 << 20
# Free memory kept at the top of each heap for the next requests instead of returned to the OS:
# enough for the slabs of a few dozen concurrent passages (measured: page faults per multi-vector
# passage fell from 100 to 45 going from 8 MB to this).
KEEP_FREED_BYTES = 32 << 20


def tune_process() -> None:
    """One BLAS thread, and a heap that keeps request-sized buffers; logs what numpy's BLAS is."""
    # A BLAS thread pool per request fights the event loop (and vLLM, on a shared machine) for
    # cores. Measured: multi-vector projection 79 ms of CPU per passage with the pool, 5.8 ms without.
    threadpool_limits(1)
    for pool in blas_pools():
        log.info("numpy BLAS: %s %s, %s kernel, %d thread(s)", pool.get("internal_api"), pool.get("version"),
                 pool.get("architecture"), pool.get("num_threads"))
    _keep_freed_memory()


def blas_pools() -> list[dict]:
    """What numpy's BLAS is in this process: library, version, kernel (``architecture``), threads."""
    return [pool for pool in threadpool_info() if pool.get("user_api") == "blas"]


def _keep_freed_memory() -> None:
    """glibc maps buffers over its (adaptive) threshold fresh from the kernel and trims freed heap
    tops back to it; a request-sized buffer is then page-faulted in again on every request.
    Measured on the replay ceiling: 9-670 page faults and up to 1 ms of kernel time per passage
    with the defaults; 1 (single-vector) and 40-55 (multi-vector) with these settings. Only glibc
    has mallopt; elsewhere nothing changes."""
    if platform.libc_ver()[0] != "glibc":
        return
    name = ctypes.util.find_library("c")
    if name is None:
        return
    libc = ctypes.CDLL(name)
    if not (libc.mallopt(_M_MMAP_THRESHOLD, MAP_FROM_BYTES) and libc.mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES)):
        log.warning("mallopt refused the router's allocator settings; glibc's defaults stay")


def freeze_startup_objects() -> None:
    """Everything loaded at startup lives as long as the process: keep it out of the collector's
    full scans, which otherwise walk every module, model and schema object again and again."""
    gc.collect()
    gc.freeze()
