"""Helpers for tests that start JAX processes of their own (``jax.distributed`` over localhost)."""

import os
import re
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    """A localhost TCP port that is free now (for a ``jax.distributed`` coordinator)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(devices: int, argv: list[str], stdout=subprocess.PIPE) -> subprocess.Popen:
    """Starts ``python *argv`` in the repository root on ``devices`` fake CPU devices.

    The child keeps the suite's compile-speed XLA flags (tests/conftest.py) with its own device
    count, and imports the repository's packages.

    Args:
      devices: fake CPU devices of the child.
      argv: arguments after the interpreter (a script and its flags, or ``-c CODE ...``).
      stdout: where the child's stdout and stderr go (default: a pipe; text mode).

    Returns:
      The running process.
    """
    xla = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=REPO,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {xla}",
    )
    return subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, stdout=stdout,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
