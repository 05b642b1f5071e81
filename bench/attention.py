"""CPU benchmark of the pure-JAX attention path: banded sliding window vs full causal.

Both rows go through the same front door, ``pallas_kernels.attention(..., implementation="xla")``:
``swa`` with ``sliding_window=W`` (banded, O(T * W)) and ``full`` with ``sliding_window=None``
(dense causal, O(T^2)). Each is jitted as forward + backward (``jax.grad`` of the output sum with
respect to q, k, v and sinks) and compiled ahead of time, so timings exclude compilation. Peak
memory is XLA's ``memory_analysis().temp_size_in_bytes`` of the compiled executable, which CPU
reports too. The table gives, per row, the time and memory growth from the shortest to the
longest T: ~linear for SWA, ~quadratic for full attention.

Full attention at the longest T is the point of the comparison but takes minutes per step on a
2-core CPU, so it runs ``--full_repeats`` times (default 1) instead of ``--repeats``. The JSON
records the load average: on a shared machine absolute times inflate, the ratios much less.

Usage: python bench/attention.py [--seqs 2048,8192] [--heads 8] [--kv_heads 2] [--window 129]
       python bench/attention.py --quick   # seconds: small sizes, T = 128..512, no JSON w/o --out

``sweep(args)`` runs the rows and returns times by mode; ``notebooks/03_attention_kernels.ipynb``
plots it.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pallas_kernels import attention  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "attention.json")


# --quick: a smoke-sized sweep (seconds on a CPU) for tests and notebooks; explicit flags still win.
QUICK = dict(
    seqs="128,256,512", heads=4, kv_heads=2, head_dim=64, v_head_dim=32, window=33, repeats=2,
    out="",
)  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags; defaults are MiMo-V2-Flash SWA head dims with fewer heads.

    Args:
      argv: flags without the program name (default: ``sys.argv[1:]``).

    Returns:
      The parsed flags; with ``--quick`` the defaults are the ``QUICK`` sizes.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seqs", default="2048,8192", help="comma-separated T (= S) values")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8, help="query heads N")
    parser.add_argument("--kv_heads", type=int, default=2, help="kv heads K")
    parser.add_argument("--head_dim", type=int, default=192, help="q/k head dim H")
    parser.add_argument("--v_head_dim", type=int, default=128, help="v head dim P")
    parser.add_argument("--window", type=int, default=129, help="sliding window W")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per row")
    parser.add_argument(
        "--full_repeats", type=int, default=1, help="timed steps for full attention at T >= 8192"
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON results path ('' = none)")
    parser.add_argument("--quick", action="store_true", help="small sizes; a smoke test")
    args = parser.parse_args(argv)
    if args.quick:  # re-parse so that flags given explicitly override the quick sizes
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    return args


def make_step(args: argparse.Namespace, window: int | None):
    """Jitted forward + backward of attention; returns d(sum(out)) / d(q, k, v, sinks)."""

    def loss(q, k, v, sinks):
        out = attention(q, k, v, sinks=sinks, sliding_window=window, implementation="xla")
        return jnp.sum(out.astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


def make_inputs(args: argparse.Namespace, t: int):
    """Random q [B, T, N, H], k [B, T, K, H], v [B, T, K, P] and sinks [N]."""
    rng = np.random.default_rng(0)
    dtype = jnp.dtype(args.dtype)
    b, n, kh, h, p = args.batch, args.heads, args.kv_heads, args.head_dim, args.v_head_dim
    shapes = [(b, t, n, h), (b, t, kh, h), (b, t, kh, p), (n,)]
    return [jnp.asarray(rng.standard_normal(s, np.float32), dtype) for s in shapes]


def run_row(args: argparse.Namespace, mode: str, t: int) -> dict:
    """Compiles and times one (mode, T) configuration.

    Args:
      args: parsed flags.
      mode: "swa" (banded) or "full" (global causal).
      t: sequence length T = S.

    Returns:
      Dict with compile time, step times (s) and XLA temp memory (bytes).
    """
    window = args.window if mode == "swa" else None
    inputs = make_inputs(args, t)
    start = time.perf_counter()
    compiled = make_step(args, window).lower(*inputs).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    temp_bytes = int(mem.temp_size_in_bytes) if mem is not None else None
    # An AOT-compiled call does no compilation, so the expensive full-attention row can skip the
    # warm-up step; cheap rows warm up to keep allocator first-touch out of the timings.
    repeats = args.full_repeats if mode == "full" and t >= 8192 else args.repeats
    if repeats == args.repeats:
        jax.block_until_ready(compiled(*inputs))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*inputs))
        times.append(time.perf_counter() - start)
    row = dict(
        mode=mode,
        t=t,
        window=window,
        compile_s=compile_s,
        times_s=times,
        median_s=statistics.median(times),
        temp_bytes=temp_bytes,
    )
    print(
        f"  {mode:>4} T={t:>6}: {row['median_s']:8.3f} s/step (x{repeats}), "
        f"temp {temp_bytes / 2**20 if temp_bytes is not None else float('nan'):9.1f} MiB, "
        f"compile {compile_s:.1f} s",
        flush=True,
    )
    return row


def print_table(rows: list[dict], seqs: list[int]) -> dict:
    """Prints time and memory per row and the longest / shortest T ratios; returns the ratios."""
    by_key = {(r["mode"], r["t"]): r for r in rows}
    lo, hi = seqs[0], seqs[-1]
    header = f"{'mode':>5} " + " ".join(f"{'t(T=' + str(t) + ')':>13}" for t in seqs)
    header += f" {'time ratio':>11} " + " ".join(f"{'mem(T=' + str(t) + ')':>15}" for t in seqs)
    header += f" {'mem ratio':>10}"
    print("\n" + header)
    ratios = {}
    for mode in ("swa", "full"):
        line = f"{mode:>5} " + " ".join(f"{by_key[mode, t]['median_s']:11.3f} s" for t in seqs)
        t_ratio = by_key[mode, hi]["median_s"] / by_key[mode, lo]["median_s"]
        m_lo, m_hi = by_key[mode, lo]["temp_bytes"], by_key[mode, hi]["temp_bytes"]
        m_ratio = m_hi / m_lo if m_lo and m_hi is not None else float("nan")
        line += f" {t_ratio:10.2f}x " + " ".join(
            f"{by_key[mode, t]['temp_bytes'] / 2**20:11.1f} MiB" for t in seqs
        )
        line += f" {m_ratio:9.2f}x"
        print(line)
        ratios[mode] = dict(time_ratio=t_ratio, mem_ratio=m_ratio)
    print(f"(ratios are T={hi} over T={lo}; T grows {hi / lo:.0f}x)")
    return ratios


def sweep(args: argparse.Namespace) -> dict:
    """Runs every (mode, T) row: SWA and full attention at each sequence length of ``args``.

    Args:
      args: parsed flags (``parse_args``).

    Returns:
      Dict with ``seqs`` (sorted T values), ``rows`` (``run_row`` results, SWA rows first),
      ``median_s`` and ``temp_bytes``: mode -> one value per T.
    """
    seqs = sorted(int(s) for s in args.seqs.split(","))
    rows = [run_row(args, mode, t) for mode in ("swa", "full") for t in seqs]
    by_mode = {m: [r for r in rows if r["mode"] == m] for m in ("swa", "full")}
    return dict(
        seqs=seqs,
        rows=rows,
        median_s={m: [r["median_s"] for r in rs] for m, rs in by_mode.items()},
        temp_bytes={m: [r["temp_bytes"] for r in rs] for m, rs in by_mode.items()},
    )


def main(argv=None) -> None:
    """Runs every (mode, T) row, prints the table and writes the JSON results."""
    args = parse_args(argv)
    print(
        f"attention xla fwd+bwd on {jax.devices()[0].platform} ({os.cpu_count()} cores): "
        f"B={args.batch} N={args.heads} K={args.kv_heads} H={args.head_dim} "
        f"P={args.v_head_dim} W={args.window} {args.dtype}",
        flush=True,
    )
    result = sweep(args)
    seqs, rows = result["seqs"], result["rows"]
    ratios = print_table(rows, seqs)
    if not args.out:
        return
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    result = dict(
        config={k: v for k, v in vars(args).items() if k != "out"},
        backend=jax.devices()[0].platform,
        cpu_count=os.cpu_count(),
        load_average=os.getloadavg(),
        machine=platform.machine(),
        jax_version=jax.__version__,
        rows=rows,
        ratios=ratios,
    )
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
