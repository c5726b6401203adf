"""Host memory: glibc malloc settings for XLA:CPU programs, and giving freed memory back to the OS.

XLA:CPU allocates each run's temporaries (one buffer, tens to hundreds of MB) afresh. glibc serves a request of
over 32 MB with its own mmap and unmaps it on free, and a worker thread's arena is a heap that is dropped once
empty: either way every step touches fresh pages, and the page faults cost the train step of bench/train.py
~0.4 s of system time (124k faults per step). `tune_malloc` keeps freed memory in the process instead: one arena
(M_ARENA_MAX 1), no per-allocation mmap (M_MMAP_MAX 0), trim only above 1 GiB free at the heap top
(M_TRIM_THRESHOLD). Our programs (CLIs, benches) call it at start, before XLA starts its threads; library code
never does. QWEN3_JAX_MALLOC=system leaves glibc's defaults. It is a CPU heuristic: on a host whose programs run
on an accelerator (qwen3_jax.kernels.host_platform) it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_tuned = False


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def tune_malloc(platform: str | None = None) -> bool:
    """Apply the settings above (glibc, CPU programs only; idempotent). Returns whether they are in effect.
    platform: where this process's programs run (default: qwen3_jax.kernels.host_platform(), which starts no
    backend)."""
    global _tuned
    if _tuned:
        return True
    if platform is None:
        from qwen3_jax.kernels import host_platform

        platform = host_platform()
    if platform != "cpu":
        return False
    libc = _libc()
    if libc is None or os.environ.get("QWEN3_JAX_MALLOC", "").lower() == "system" or not hasattr(libc, "mallopt"):
        return False
    _tuned = all(libc.mallopt(opt, val) == 1 for opt, val in
                 ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 1 << 30)))
    return _tuned


def release_host_memory():
    """Return freed host memory to the OS (malloc_trim: also the free pages inside the heap)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
