"""Shared pieces of the benchmarks: JAX vs transformers helpers, timing, results.

Importing this module puts the repository root on ``sys.path``, so a bench script run as
``python bench/<name>.py`` can then import ``mimo_jax`` and ``configs``; import it before them.
"""

import argparse
import ast
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import process_setup  # noqa: E402  (needs the path above)
from mimo_jax import hf  # noqa: E402

RESULTS = os.path.join(REPO, "bench", "results")


def perturb_sinks_and_bias(model: torch.nn.Module, seed: int = 0) -> None:
    """Random attention sinks and expert correction biases, in place.

    transformers initialises both to constants, which would leave the sink and bias code paths
    of a comparison untested; random values make both sides route and attend alike for real.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))


def to_jax(model: torch.nn.Module, **overrides):
    """Our MiMoV2Flash with the same weights: ``save_pretrained`` then ``hf.load_hf``.

    Going through the checkpoint format (rather than copying tensors) also exercises the
    converter that real checkpoints take.
    """
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return hf.load_hf(tmp, **overrides)


def median_seconds(fn, warmup: int, runs: int) -> tuple[float, list[float]]:
    """Median wall time of ``fn()`` over ``runs`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def add_malloc_flag(p: argparse.ArgumentParser) -> None:
    """``--keep-freed-memory`` (default on, as in the CPU configs): see ``process_setup.py``."""
    p.add_argument(
        "--keep-freed-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="glibc malloc keeps freed memory, for both sides (process_setup.py)",
    )


def apply_malloc_flag(a: argparse.Namespace) -> bool:
    """Applies ``--keep-freed-memory``; call first in main(), before JAX or torch start threads.

    Returns:
      Whether the setting is in effect (False when off, or where the C library is not glibc).
    """
    return process_setup.keep_freed_memory() if a.keep_freed_memory else False


def host_info() -> dict:
    """CPU count, architecture and load average: timings on a shared host need the load."""
    return {
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "loadavg_1_5_15": list(os.getloadavg()),
    }


def write_json(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")


def interleaved_medians(fns: dict, runs: int) -> dict:
    """Median seconds of each ``fns[name]()`` over ``runs`` rounds that call every fn once.

    Each fn runs once untimed first (compilation). Interleaving puts the configurations under the
    same machine load, which on a shared machine moves more than any difference measured here.
    """
    for f in fns.values():
        f()
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def load_config(path: str, overrides: list[str], *args):
    """A config file's ``get_config(*args)`` with ``FIELD=VALUE`` overrides (``--set``).

    Values are Python literals where they parse as one, else plain strings; a FIELD not in
    the config is a ValueError.
    """
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(*args)
    for item in overrides:
        key, sep, raw = item.partition("=")
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        if not sep or leaf not in node:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE with FIELD in the config")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a plain string
        node[leaf] = value
    return config
