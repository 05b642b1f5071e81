"""Forward-pass throughput: our jitted JAX model vs transformers' MiMoV2FlashForCausalLM.

Builds one random tiny-but-not-trivial MiMo-V2-Flash in transformers (eager attention, fp32),
converts it to ours through ``save_pretrained`` + ``mimo_jax.hf.load_hf`` (so both run the same
weights), checks that the logits agree, then times a full-sequence forward of each: the JAX
forward jitted, after warmup, synchronised with ``block_until_ready``; the torch forward under
``torch.no_grad`` with one thread per core. Reports the median of several runs as tokens/s.

    python bench/forward_vs_torch.py [--batch 4 --seq 512 ...]
    python bench/forward_vs_torch.py --quick    # seconds: a smoke-sized model, no JSON

Writes bench/results/forward_vs_torch.json.
"""

import argparse
import os
import time

import common
import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM

from mimo_jax.config import FULL, SLIDING, ModelConfig, layer_pattern

# --quick: a smoke-sized run (seconds on a CPU) for tests; explicit flags still win.
QUICK = dict(
    batch=1, seq=48, hidden=32, layers=2, heads=4, kv_heads=1, head_dim=24, v_head_dim=8,
    mlp_dim=64, moe_mlp_dim=16, experts=4, top_k=2, vocab=128, window=17, warmup=0, runs=1, out="",
)  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags (``argv`` without the program name; default ``sys.argv[1:]``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=6, help="layer 0 GA + dense, then 5 SWA : 1 GA")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2, help="GA kv heads (SWA gets twice as many)")
    p.add_argument("--head-dim", type=int, default=48)
    p.add_argument("--v-head-dim", type=int, default=32)
    p.add_argument("--mlp-dim", type=int, default=1024)
    p.add_argument("--moe-mlp-dim", type=int, default=128)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument(
        "--window", type=int, default=ModelConfig.sliding_window, help="keys per query incl. itself"
    )
    p.add_argument("--moe-impl", default="ragged", choices=["ragged", "dense"])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    p.add_argument(
        "--out", default=os.path.join(common.RESULTS, "forward_vs_torch.json"), help="'' = none"
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, one run; a smoke test")
    common.add_malloc_flag(p)
    a = p.parse_args(argv)
    if a.quick:  # re-parse so that flags given explicitly override the quick sizes
        p.set_defaults(**QUICK)
        a = p.parse_args(argv)
    return a


def torch_model(a: argparse.Namespace) -> MiMoV2FlashForCausalLM:
    layer_types, mlp_layer_types = layer_pattern(a.layers)  # the released model's pattern
    rope = {"rope_type": "default", "partial_rotary_factor": ModelConfig.partial_rotary_factor}
    cfg = MiMoV2FlashConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.mlp_dim,
        moe_intermediate_size=a.moe_mlp_dim,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        head_dim=a.head_dim,
        v_head_dim=a.v_head_dim,
        layer_types=list(layer_types),
        mlp_layer_types=list(mlp_layer_types),
        rope_parameters={
            FULL: {**rope, "rope_theta": ModelConfig.rope_theta},
            SLIDING: {**rope, "rope_theta": ModelConfig.swa_rope_theta},
        },
        n_routed_experts=a.experts,
        num_experts_per_tok=a.top_k,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=1.0,
        sliding_window=a.window,
        attention_value_scale=ModelConfig.attention_value_scale,
        max_position_embeddings=max(4096, a.seq),
        tie_word_embeddings=False,
        initializer_range=0.05,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = MiMoV2FlashForCausalLM(cfg).eval()
    common.perturb_sinks_and_bias(model)
    return model


def main(argv=None) -> dict:
    """Runs the comparison, prints the table, writes the JSON (unless ``--out ''``).

    Args:
      argv: flags without the program name (default ``sys.argv[1:]``).

    Returns:
      The result dict (also the JSON's content).
    """
    a = parse_args(argv)
    keep_freed = common.apply_malloc_flag(a)
    torch.set_num_threads(a.threads)
    tm = torch_model(a)
    model = common.to_jax(tm, moe_impl=a.moe_impl)
    ids = np.random.default_rng(0).integers(0, a.vocab, (a.batch, a.seq))
    ids_t, ids_j = torch.from_numpy(ids), jnp.asarray(ids)

    # Main-model logits only: transformers has no MTP (this model has none anyway).
    fwd = jax.jit(lambda m, x: m(x, mtp=False).logits)
    t0 = time.perf_counter()
    logits_j = fwd(model, ids_j).block_until_ready()
    compile_s = time.perf_counter() - t0

    def run_torch():
        with torch.no_grad():
            return tm(ids_t, use_cache=False).logits

    logits_t = run_torch().numpy()
    got = np.asarray(logits_j)
    if not (np.isfinite(got).all() and np.isfinite(logits_t).all()):
        raise SystemExit("non-finite logits")
    max_diff = float(np.abs(got - logits_t).max())

    jax_s, jax_all = common.median_seconds(
        lambda: fwd(model, ids_j).block_until_ready(), a.warmup, a.runs
    )
    torch_s, torch_all = common.median_seconds(run_torch, a.warmup, a.runs)
    tokens = a.batch * a.seq
    result = {
        "config": {k: v for k, v in vars(a).items() if k != "out"},
        "tokens_per_forward": tokens,
        "jax": {
            "median_s": jax_s,
            "runs_s": jax_all,
            "tokens_per_s": tokens / jax_s,
            "compile_plus_first_run_s": compile_s,
            "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()],
            "version": jax.__version__,
        },
        "torch": {
            "median_s": torch_s,
            "runs_s": torch_all,
            "tokens_per_s": tokens / torch_s,
            "threads": torch.get_num_threads(),
            "version": torch.__version__,
        },
        "speedup_jax_over_torch": torch_s / jax_s,
        "max_abs_logit_diff": max_diff,
        "max_abs_logit": float(np.abs(logits_t).max()),
        "host": {**common.host_info(), "keep_freed_memory": keep_freed},
    }

    print(
        f"MiMo-V2-Flash forward, batch {a.batch} x seq {a.seq} = {tokens} tokens, "
        f"hidden {a.hidden}, {a.layers} layers, {a.experts} experts top-{a.top_k}, "
        f"window {a.window}, vocab {a.vocab}"
    )
    rows = [
        (f"jax ({jax.default_backend()}, jit, moe {a.moe_impl})", jax_s),
        (f"transformers (cpu eager, {torch.get_num_threads()} threads)", torch_s),
    ]
    print(f"{'implementation':<38} {'median s':>10} {'tokens/s':>10}")
    for name, sec in rows:
        print(f"{name:<38} {sec:>10.3f} {tokens / sec:>10.0f}")
    print(
        f"speedup jax / torch: {torch_s / jax_s:.2f}x   (jit compile + first run {compile_s:.1f}s)"
    )
    print(f"max |logits diff|: {max_diff:.3g}   (max |logits| {result['max_abs_logit']:.3g})")
    if a.out:
        common.write_json(result, a.out)
    return result


if __name__ == "__main__":
    main()
