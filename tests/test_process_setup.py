"""process_setup.keep_freed_memory: glibc malloc keeps XLA's freed temp buffers (measured by page
faults)."""

import os
import platform
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A jitted program with ~32 MB of temporaries (sin(x), cos(x) of a 16 MB x): 10 calls for the
# heap to reach its steady state, then the minor page faults per call over 10 more.
_PROGRAM = """
import resource, sys
import process_setup
if sys.argv[1] == "keep":
    assert process_setup.keep_freed_memory()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum(jnp.sin(x) @ jnp.cos(x)))
x = jnp.ones((2048, 2048))
for _ in range(10):
    f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    f(x).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def _faults_per_call(mode: str) -> float:
    # One CPU device and default XLA flags: the setting is what a main.py run gets.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": ROOT}
    out = subprocess.run(
        [sys.executable, "-c", _PROGRAM, mode], env=env, capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting")
def test_keep_freed_memory_stops_refaulting_temp_buffers():
    default, keep = _faults_per_call("default"), _faults_per_call("keep")
    # 32 MB of temporaries is ~8,000 pages: glibc mmaps and munmaps them on every call unless
    # freed memory is kept (measured: ~8,200 vs 0-820 faults per call).
    assert default > 4000, default
    assert keep < default / 4, (keep, default)
