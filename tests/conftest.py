"""Test defaults: CPU, 8 fake devices for mesh tests, a shared XLA compilation cache, the repo
root importable."""

import os
import shutil
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests are dominated by XLA compile time on tiny shapes. LLVM -O0 halves it. The legacy
# elemental emitters instead of XLA:CPU's MLIR fusion emitters, with LLVM's expensive passes off,
# cut it ~3x again (the debug config's train step: 7.8 s -> 2.4 s). None enables fast-math; the
# emitters may round transcendentals differently in the last bit, and every comparison in the
# suite runs both sides under the same flags.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
    "--xla_cpu_use_fusion_emitters=false --xla_llvm_disable_expensive_passes=true",
)
# Many tests compile identical programs (the debug config's train and eval steps, in-process and
# in main.py subprocesses); a persistent cache compiles each once per session. The pytest process
# that creates it sets the variable before xdist workers, subprocesses and notebook kernels
# start, so they all share it; that process deletes it at the end (pytest_unconfigure).
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mimo-jax-tests-xla-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
