"""Test defaults: CPU, 8 fake devices for mesh tests, the repo root importable."""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# LLVM -O0: tests are dominated by XLA compile time on tiny shapes; this halves it and changes
# no numerics (XLA's CPU backend does not enable fast-math at any level).
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
