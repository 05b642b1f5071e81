"""Process-wide settings of the command line (``main.py``) and the bench scripts.

Nothing here belongs to the library: how much a process logs, how a user's mistake ends it, and
how glibc's malloc hands memory back are choices of the program that runs the library.

* ``quiet_logs``: absl logs at WARNING unless ``--verbosity`` is given. The checkpointing library
  (orbax) logs each save in dozens of INFO lines; the run's own progress is printed, not logged.
* ``exit_on_user_error``: a ``ValueError`` or ``OSError`` raised by the project's own code (a check
  of a flag, a config value, a workdir, a file) ends the process with one line on stderr. Errors
  raised inside third-party code, and every other exception type, keep their traceback: they
  are bugs to report, not mistakes to correct. ``--verbosity=1`` keeps every traceback.
* ``keep_freed_memory``: glibc malloc keeps XLA:CPU's per-step temporaries (see its docstring).
"""

import contextlib
import ctypes
import os
import platform
import sys
from collections.abc import Iterator

from absl import flags, logging

import mimo_jax
import pallas_kernels

# Where a raise means "the input is wrong": the project's packages and this directory's scripts.
_PROJECT_DIRS = tuple(
    os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (mimo_jax, pallas_kernels)
)
_SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))

# glibc <malloc.h> mallopt parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1


def quiet_logs() -> None:
    """absl logging at WARNING unless ``--verbosity`` was given (``--verbosity=0`` shows INFO).

    Call from ``main`` (after absl parsed the flags: ``app.run`` raises the default to INFO).
    """
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def _raised_by_project(e: BaseException) -> bool:
    """Whether the innermost frame of ``e``'s traceback is in the project's own code."""
    tb = e.__traceback__
    # JAX cuts its own frames out of a traceback that crosses a jit boundary, so the innermost
    # frame left may be the project's although JAX raised; it marks such an exception with a
    # note or an ``UnfilteredStackTrace`` cause.
    notes = getattr(e, "__notes__", ())
    if tb is None or any("JAX_TRACEBACK_FILTERING" in n for n in notes):
        return False
    if type(e.__cause__).__name__ == "UnfilteredStackTrace":
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = os.path.abspath(tb.tb_frame.f_code.co_filename)
    return path.startswith(_PROJECT_DIRS) or os.path.dirname(path) == _SCRIPT_DIR


def _one_line(e: BaseException) -> str:
    """The message of ``e`` on one line (unwrapping ml_collections' AttributeError(KeyError))."""
    while e.args and isinstance(e.args[0], BaseException):
        e = e.args[0]
    message = e.args[0] if len(e.args) == 1 and isinstance(e.args[0], str) else str(e)
    return " ".join(message.split())


@contextlib.contextmanager
def exit_on_flag_error(prog: str) -> Iterator[None]:
    """Ends the process with one line on stderr (status 2) if parsing the flags fails.

    Wraps the parsing of flags and the loading of the ``--config`` file with its overrides: a
    bad value, an unknown flag or config field, or a missing config file.

    Args:
      prog: the program's name, first on the error line.
    """
    try:
        yield
    except (flags.Error, ValueError, OSError) as e:
        while e.__cause__ is not None:  # config_flags reports a failed load as a chain
            e = e.__cause__
        sys.stderr.write(f"{prog}: error: {_one_line(e)} (--helpshort lists the flags)\n")
        sys.exit(2)
    except (KeyError, AttributeError) as e:  # ml_collections: a --config.<path> it lacks
        sys.stderr.write(f"{prog}: error: no config field {_one_line(e)}\n")
        sys.exit(2)


@contextlib.contextmanager
def exit_on_user_error(prog: str) -> Iterator[None]:
    """Turns a user's mistake into ``<prog>: error: <message>`` on stderr and exit status 1.

    A user's mistake is a ``ValueError`` or ``OSError`` (missing file, not writable, exists)
    raised by the project's own code: its messages are written for the user. The same types
    raised inside a dependency, and all other exceptions, propagate with their traceback, as do
    all exceptions under ``--verbosity`` >= 1. Ctrl-C ends with one line and status 130.

    Args:
      prog: the program's name, first on the error line.
    """
    try:
        yield
    except KeyboardInterrupt:
        if flags.FLAGS.verbosity >= 1:
            raise
        sys.stderr.write(f"\n{prog}: interrupted\n")
        sys.exit(130)
    except (ValueError, OSError) as e:
        if flags.FLAGS.verbosity >= 1 or not _raised_by_project(e):
            raise
        sys.stderr.write(f"{prog}: error: {_one_line(e)}\n")
        sys.exit(1)


def keep_freed_memory() -> bool:
    """Makes glibc malloc keep freed memory for reuse instead of handing it back to the kernel.

    XLA:CPU allocates each executable's temporary buffer afresh on every call and frees it
    after. A block that large (the tiny config's train step: ~130 MB) is served by ``mmap`` and
    returned by ``munmap``, so every step faults all its pages in again; kept, it is reused.

    Three settings, all needed (each alone or in pairs left the page faults unchanged): one
    malloc arena (other arenas are mmap-ed heaps that cannot hold such a block), no mmap for
    large blocks, no trimming of the heap top. The process's resident memory then stays at its
    peak, which is why only the CPU configs turn this on (``config.keep_freed_memory``): on an
    accelerator host, multi-GB checkpoint buffers would stay resident. The single arena's lock
    is contended, so part of the gain goes back to user time (bench/README.md has the figures).

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
