"""Process-level settings for CPU runs; they must be applied before JAX starts its backend.

XLA:CPU allocates each executable's temporary buffer afresh on every call and frees it after. For
the tiny config's train step that block is ~130 MB, so glibc serves it with ``mmap`` and returns
it with ``munmap``, and every step faults all its pages in again. Measured on a 2-core VM
(``getrusage`` over 100 tiny steps): 33,600 minor page faults and 130 ms of kernel time per
~290 ms step; with ``keep_freed_memory()`` 670 faults and 9 ms. The step ran 237-268 ms against
294-303 ms in runs that alternated the two, but user time rose by ~60 ms per step (the single
arena's lock is contended), and in a whole tiny run CPU time was unchanged (24 + 1082 s against
288 + 793 s in an earlier run): part of the gain goes back to that contention.
"""

import ctypes
import platform

from absl import logging

# glibc <malloc.h> mallopt parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1


def keep_freed_memory() -> bool:
    """Makes glibc malloc keep freed memory for reuse instead of handing it back to the kernel.

    Three settings, all needed (each alone or in pairs left the page faults unchanged):
    one malloc arena (other arenas are mmap-ed heaps that cannot hold a 130 MB block), no mmap
    for large blocks, no trimming of the heap top. The process's resident memory then stays at
    its peak, which is why only the CPU configs turn this on (``config.keep_freed_memory``):
    on an accelerator host, multi-GB checkpoint buffers would stay resident.

    Call it before the first JAX computation: a thread that has already allocated keeps its own
    arena, and XLA's worker threads start with the backend.

    Returns:
      True if applied; False if the C library is not glibc (nothing is changed, and a warning is
      logged).

    Raises:
      OSError: glibc rejected a setting.
    """
    if platform.libc_ver()[0] != "glibc":
        logging.warning("keep_freed_memory: C library is not glibc; malloc settings unchanged")
        return False
    libc = ctypes.CDLL("libc.so.6")
    for name, param, value in (
        ("M_ARENA_MAX", _M_ARENA_MAX, 1),
        ("M_MMAP_THRESHOLD", _M_MMAP_THRESHOLD, _INT_MAX),
        ("M_TRIM_THRESHOLD", _M_TRIM_THRESHOLD, _INT_MAX),
    ):
        if libc.mallopt(param, value) != 1:
            raise OSError(f"glibc mallopt({name}, {value}) failed")
    return True
