"""Train-step throughput: our jitted ``train.make_train_step`` vs transformers + torch AdamW.

Both sides train the model of ``configs/tiny.py`` with MTP off (``num_mtp_layers=0``):
transformers' MiMoV2FlashForCausalLM has no MTP head, so ours runs without one too. The model is
built in transformers from ``config_to_hf(cfg)`` (eager attention, fp32), given random sinks and
expert correction biases, and converted to ours through ``save_pretrained`` + ``hf.load_hf``, so
both start from identical weights and see the same batch of random bytes.

  ours:  train.make_train_step (AdamW after global-norm clipping, the tiny config's lr schedule,
         betas, eps and weight decay), lowered and compiled once, synchronised with
         ``block_until_ready``. It also does work transformers does not: the 1e-5-weighted
         sequence balance loss, the aux-loss-free expert-bias update and step metrics.
  torch: loss = model(x, labels=y, shift_labels=y).loss, backward, clip_grad_norm_(1.0),
         torch.optim.AdamW (same lr schedule via LambdaLR, betas, eps, weight decay off norms
         and sinks as ours), zero_grad; one intra-op thread per core.

Steps of the two alternate (one each per round) so background load on a shared host hits both
alike; the median over the timed rounds is reported. The first-step losses must agree (same
weights, same batch, lr 0 at step 0 on both sides). FLOP/s are set against this CPU's measured
fp32 matmul rate (a jitted 2048 x 2048 ``jnp.dot``), with FLOPs from an analytic count of the
useful work (6 * active params * tokens + attention) and from XLA's cost analysis, both of the
compiled step and of an unrolled copy (XLA counts a scanned layer stack's loop body only once).

    python bench/train_vs_torch.py [--batch 16 --seq 256 --steps 3 ...]   (default: tiny's)

Writes bench/results/train_vs_torch.json.
"""

import argparse
import dataclasses
import math
import os
import statistics
import time

import common
import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM

from configs import tiny
from mimo_jax import train
from mimo_jax.config import DENSE, FULL, ModelConfig
from mimo_jax.hf_config import config_to_hf
from mimo_jax.model import MiMoV2Flash
from mimo_jax.moe import grouped_matmul_impl

# ModelConfig fields that config.json does not carry; load_hf must be told them.
NON_HF_FIELDS = ("dtype", "param_dtype", "attention_impl", "moe_impl", "scan_layers", "remat")
LOSS_TOL = 1e-4


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=None, help="default: the tiny config's batch")
    p.add_argument("--seq", type=int, default=None, help="default: the tiny config's seq_len")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds after compilation")
    p.add_argument("--steps", type=int, default=3, help="timed rounds (one step of each side)")
    p.add_argument("--moe-impl", default=None, choices=["ragged", "dense"], help="default: tiny's")
    p.add_argument(
        "--torch-experts",
        default=None,
        help="transformers experts_implementation (eager, grouped_mm, ...); default: its own",
    )
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    p.add_argument("--peak-size", type=int, default=2048, help="square fp32 matmul for the peak")
    p.add_argument("--peak-runs", type=int, default=5)
    p.add_argument("--out", default=os.path.join(common.RESULTS, "train_vs_torch.json"))
    common.add_malloc_flag(p)
    return p.parse_args()


# ---------------------------------------------------------------------------------------------
# Models.


def torch_model(cfg: ModelConfig, experts_impl: str | None) -> MiMoV2FlashForCausalLM:
    """transformers' model of ``cfg`` (fp32, eager attention), random init plus sinks/bias."""
    d = config_to_hf(cfg)
    # Not MiMoV2FlashConfig arguments: the class is chosen here, and transformers has no MTP.
    d.pop("architectures")
    d.pop("num_nextn_predict_layers")
    kw = {"attn_implementation": "eager"}
    if experts_impl:
        kw["experts_implementation"] = experts_impl
    torch.manual_seed(0)
    model = MiMoV2FlashForCausalLM(MiMoV2FlashConfig(**d, **kw))
    common.perturb_sinks_and_bias(model)
    return model.float().train()


def torch_optimizer(model: torch.nn.Module, tc) -> tuple[torch.optim.Optimizer, object]:
    """AdamW + the same warmup-cosine schedule as ours; no decay on norms or sinks, as ours."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # Norm scales are "*norm.weight" (input_layernorm, post_attention_layernorm, model.norm).
        (no_decay if name.endswith(("norm.weight", "sinks")) else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tc.lr,
        betas=(tc.b1, tc.b2),
        eps=tc.eps,
        weight_decay=tc.weight_decay,
    )
    schedule = train.learning_rate_schedule(tc)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: float(schedule(s)) / tc.lr)
    return opt, sched


# ---------------------------------------------------------------------------------------------
# FLOPs.


def analytic_flops(cfg: ModelConfig, batch: int, seq: int) -> dict:
    """Training FLOPs of one step: 6 * active params * tokens + 3 * attention forward.

    Active params are those a token multiplies through: projections, the dense FFN or the
    router plus top-k experts, and the LM head (the embedding is a gather, not a matmul).
    Attention counts only the (query, key) pairs the causal / sliding mask keeps: 2 FLOPs per
    multiply-add for QK^T (head_dim) and PV (v_head_dim); the backward pass is twice the forward.
    """
    d, n, h, pv = cfg.embed_dim, cfg.num_heads, cfg.head_dim, cfg.v_head_dim
    active = d * cfg.vocab_size
    attn_fwd = 0
    for layer_type, mlp_type in zip(cfg.layer_types, cfg.mlp_layer_types, strict=True):
        kv = cfg.num_kv_heads if layer_type == FULL else cfg.swa_num_kv_heads
        active += d * n * h + d * kv * (h + pv) + n * pv * d
        if mlp_type == DENSE:
            active += 3 * d * cfg.mlp_dim
        else:
            active += d * cfg.num_experts + cfg.num_experts_per_tok * 3 * d * cfg.moe_mlp_dim
        window = seq if layer_type == FULL else cfg.sliding_window
        pairs = sum(min(i + 1, window) for i in range(seq))  # keys seen, summed over queries
        attn_fwd += 2 * batch * n * pairs * (h + pv)
    matmul = 6 * active * batch * seq
    return {
        "active_params": active,
        "matmul_flops": matmul,
        "attention_flops": 3 * attn_fwd,
        "total_flops": matmul + 3 * attn_fwd,
    }


def xla_flops(stage) -> float | None:
    """The "flops" of a Lowered/Compiled ``cost_analysis()``: a dict, or a list of one per module.

    XLA counts a while loop's body once, whatever its trip count, so layers run under
    ``lax.scan`` are undercounted; see ``xla_flops_unrolled``.
    """
    ca = stage.cost_analysis()
    if isinstance(ca, list | tuple):
        ca = ca[0] if ca else None
    if not ca or "flops" not in ca:
        return None
    return float(ca["flops"])


def xla_flops_unrolled(cfg: ModelConfig, tc, tokens: jax.Array) -> float | None:
    """XLA's FLOPs of the same train step with every layer unrolled (``scan_layers=False``).

    Counted on the lowered (unoptimised) HLO of an abstract model: no compilation and no
    weights, a few seconds. Dots are counted as in the compiled module; what XLA executes on this
    backend (the padding rows of the CPU's blocked grouped matmul; on CPU ``ragged_dot`` would
    show up as a masked dot over every expert) shows up here.
    """
    cfg = cfg.replace(scan_layers=False)

    def build():
        model = MiMoV2Flash(cfg, rngs=nnx.Rngs(0))
        return model, train.make_optimizer(model, tc)

    graphdef, state = nnx.split(nnx.eval_shape(build))
    tokens = jax.ShapeDtypeStruct(tokens.shape, tokens.dtype)
    return xla_flops(train.make_train_step(graphdef, cfg, tc).lower(state, tokens))


def matmul_peak(size: int, runs: int) -> dict:
    """fp32 square matmul FLOP/s of jitted jnp.dot (the reference peak) and of torch.mm."""
    flops = 2 * size**3
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    dot = jax.jit(jnp.dot)
    jax_s, _ = common.median_seconds(lambda: dot(a, b).block_until_ready(), 1, runs)
    at, bt = torch.from_numpy(np.array(a)), torch.from_numpy(np.array(b))  # writable copies
    torch_s, _ = common.median_seconds(lambda: torch.mm(at, bt), 1, runs)
    return {"size": size, "jax_flops_per_s": flops / jax_s, "torch_flops_per_s": flops / torch_s}


# ---------------------------------------------------------------------------------------------
# Main.


def main():
    a = parse_args()
    keep_freed = common.apply_malloc_flag(a)
    load_start = os.getloadavg()
    torch.set_num_threads(a.threads)
    config = tiny.get_config()
    config.model.num_mtp_layers = 0  # transformers has no MTP: both sides train without it
    if a.moe_impl:
        config.model.moe_impl = a.moe_impl
    tc = config.train
    a.batch = a.batch or tc.batch_size
    a.seq = a.seq or tc.seq_len
    cfg = train.model_config(config)

    tm = torch_model(cfg, a.torch_experts)
    model = common.to_jax(tm, **{f: getattr(cfg, f) for f in NON_HF_FIELDS})
    if model.cfg != cfg:
        diff = [
            f.name
            for f in dataclasses.fields(cfg)
            if getattr(cfg, f.name) != getattr(model.cfg, f.name)
        ]
        raise SystemExit(f"to_hf -> transformers -> load_hf changed config fields {diff}")

    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (a.batch, a.seq + 1))
    tokens_j = jnp.asarray(tokens[None], jnp.int32)  # [A=1, B, T + 1]
    # Contiguous: transformers' loss calls .view() on shift_labels.
    x_t = torch.from_numpy(tokens[:, :-1]).contiguous()
    y_t = torch.from_numpy(tokens[:, 1:]).contiguous()

    # Ours: compile once through lower(), which also yields XLA's FLOP count of the step.
    opt = train.make_optimizer(model, tc)
    graphdef, state = nnx.split((model, opt))
    step = train.make_train_step(graphdef, cfg, tc)
    t0 = time.perf_counter()
    compiled = step.lower(state, tokens_j).compile()
    compile_s = time.perf_counter() - t0
    flops_xla = xla_flops(compiled)
    flops_xla_unrolled = xla_flops_unrolled(cfg, tc, tokens_j)
    flops = analytic_flops(cfg, a.batch, a.seq)

    topt, sched = torch_optimizer(tm, tc)
    params = [p for p in tm.parameters() if p.requires_grad]

    def jax_step():
        nonlocal state
        state, metrics = compiled(state, tokens_j)
        jax.block_until_ready((state, metrics))
        return metrics

    def torch_step():
        # shift_labels: labels are already next tokens, so the loss covers all T positions,
        # like ours (plain labels= would shift them again and drop the last position).
        loss = tm(input_ids=x_t, labels=y_t, shift_labels=y_t, use_cache=False).loss
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        topt.step()
        sched.step()
        topt.zero_grad(set_to_none=True)
        return loss.item(), gnorm.item()

    peak = matmul_peak(a.peak_size, a.peak_runs)

    jax_times, torch_times, losses = [], [], []
    for r in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        m = jax_step()
        jax_s = time.perf_counter() - t0
        # Let the other framework's worker threads stop spin-waiting before the next timing.
        time.sleep(0.2)
        t0 = time.perf_counter()
        t_loss, t_gnorm = torch_step()
        torch_s = time.perf_counter() - t0
        time.sleep(0.2)
        losses.append(
            {
                "jax_ce": float(m["ce"]),
                "torch_ce": t_loss,
                "jax_grad_norm": float(m["grad_norm"]),
                "torch_grad_norm": t_gnorm,
            }
        )
        if r >= a.warmup:
            jax_times.append(jax_s)
            torch_times.append(torch_s)
        tag = " (warmup)" if r < a.warmup else ""
        print(
            f"round {r}{tag}: jax {jax_s:.3f}s  torch {torch_s:.3f}s  "
            f"ce {losses[-1]['jax_ce']:.6f} / {t_loss:.6f}",
            flush=True,
        )
    load_end = os.getloadavg()

    first = losses[0]
    loss_diff = abs(first["jax_ce"] - first["torch_ce"])
    gnorm_rel = abs(first["jax_grad_norm"] - first["torch_grad_norm"]) / first["torch_grad_norm"]
    jax_s, torch_s = statistics.median(jax_times), statistics.median(torch_times)
    n_tok = a.batch * a.seq
    pk = peak["jax_flops_per_s"]
    total = flops["total_flops"]
    xla = {"compiled_as_run": flops_xla, "lowered_unrolled": flops_xla_unrolled}

    def rate(f, sec):
        return None if f is None else f / sec

    result = {
        "config": {
            **{k: v for k, v in vars(a).items() if k != "out"},
            "model": "configs/tiny.py, num_mtp_layers=0",
            "model_config": dataclasses.asdict(cfg),
            "train": {k: tc[k] for k in ("lr", "b1", "b2", "eps", "weight_decay", "grad_clip")},
        },
        "tokens_per_step": n_tok,
        "jax": {
            "median_s": jax_s,
            "steps_s": jax_times,
            "tokens_per_s": n_tok / jax_s,
            "compile_s": compile_s,
            "flops_per_s_analytic": total / jax_s,
            "flops_per_s_xla_unrolled": rate(flops_xla_unrolled, jax_s),
            "backend": jax.default_backend(),
            "grouped_matmul": grouped_matmul_impl(),
            "version": jax.__version__,
        },
        "torch": {
            "median_s": torch_s,
            "steps_s": torch_times,
            "tokens_per_s": n_tok / torch_s,
            "flops_per_s_analytic": total / torch_s,
            "threads": torch.get_num_threads(),
            "experts_implementation": tm.config._experts_implementation,
            "attn_implementation": tm.config._attn_implementation,
            "version": torch.__version__,
        },
        "speedup_jax_over_torch": torch_s / jax_s,
        "flops_per_step": {**flops, "xla_cost_analysis": xla},
        "matmul_peak": peak,
        "fraction_of_peak": {
            "jax_analytic": total / jax_s / pk,
            "jax_xla_unrolled": rate(flops_xla_unrolled, jax_s * pk),
            "torch_analytic": total / torch_s / pk,
        },
        "first_step": {**first, "abs_ce_diff": loss_diff, "rel_grad_norm_diff": gnorm_rel},
        "losses": losses,
        "host": {
            **common.host_info(),
            "loadavg_start": list(load_start),
            "keep_freed_memory": keep_freed,
        },
    }
    result["host"]["loadavg_end"] = result["host"].pop("loadavg_1_5_15")

    def fmt_load(la):
        return "/".join(f"{x:.2f}" for x in la)

    print(
        f"\nMiMo-V2-Flash train step, configs/tiny.py with MTP off on both sides (transformers has "
        f"none): {cfg.num_layers} layers, hidden {cfg.embed_dim}, {cfg.num_experts} experts "
        f"top-{cfg.num_experts_per_tok}, window {cfg.sliding_window}, vocab {cfg.vocab_size}, fp32"
    )
    print(
        f"batch {a.batch} x seq {a.seq} = {n_tok} tokens/step; median of {a.steps} interleaved "
        f"steps after {a.warmup} warmup; {os.cpu_count()} CPUs, load average 1/5/15 min "
        f"{fmt_load(load_start)} at start, {fmt_load(load_end)} at end; glibc malloc keeps "
        f"freed memory: {'yes' if keep_freed else 'no'} (--keep-freed-memory)"
    )
    # The grouped matmul behind moe_impl="ragged" depends on the backend (blocked on CPU).
    moe_label = cfg.moe_impl + (f" {grouped_matmul_impl()}" if cfg.moe_impl == "ragged" else "")
    rows = [
        (f"jax ({jax.default_backend()}, jit train_step, moe {moe_label})", jax_s),
        (
            f"transformers (eager attn, {tm.config._experts_implementation} experts, "
            f"{torch.get_num_threads()} thr)",
            torch_s,
        ),
    ]
    print(f"\n{'implementation':<56} {'median s':>9} {'tokens/s':>9} {'GFLOP/s':>8} {'% peak':>7}")
    for name, sec in rows:
        print(
            f"{name:<56} {sec:>9.3f} {n_tok / sec:>9.0f} {total / sec / 1e9:>8.2f} "
            f"{100 * total / sec / pk:>6.1f}%"
        )
    print(f"speedup jax / torch: {torch_s / jax_s:.2f}x   (jax compile {compile_s:.1f}s)")
    print(
        f"\nFLOPs/step  analytic {total / 1e9:.3f} G = 6 x {flops['active_params'] / 1e6:.3f}M "
        f"active params x {n_tok} tokens ({flops['matmul_flops'] / 1e9:.3f} G) + attention "
        f"({flops['attention_flops'] / 1e9:.3f} G)"
    )
    for label, f in (
        ("compiled step as run (scanned layers' loop body counted once)", flops_xla),
        ("same step unrolled, scan_layers=False (every layer)", flops_xla_unrolled),
    ):
        g = "no 'flops' entry" if f is None else f"{f / 1e9:.3f} G = {f / total:.2f}x analytic"
        print(f"            XLA cost_analysis, {label}: {g}")
    if flops_xla_unrolled is not None:
        print(
            f"            -> jax executes {flops_xla_unrolled / jax_s / 1e9:.2f} GFLOP/s by XLA's "
            f"unrolled count, {100 * flops_xla_unrolled / jax_s / pk:.1f}% of peak"
        )
    print(
        f"matmul peak (fp32 {a.peak_size}^2, median of {a.peak_runs}): jax "
        f"{pk / 1e9:.1f} GFLOP/s (the % peak reference), torch "
        f"{peak['torch_flops_per_s'] / 1e9:.1f} GFLOP/s"
    )
    ok = loss_diff <= LOSS_TOL and math.isfinite(loss_diff)
    print(
        f"first-step CE: jax {first['jax_ce']:.6f}  torch {first['torch_ce']:.6f}  "
        f"|diff| {loss_diff:.2e} ({'ok' if ok else 'MISMATCH'}, tol {LOSS_TOL:g}); grad norm "
        f"jax {first['jax_grad_norm']:.5f} torch {first['torch_grad_norm']:.5f} "
        f"(rel diff {gnorm_rel:.1e})"
    )
    common.write_json(result, a.out)
    if not ok:
        raise SystemExit(f"first-step losses differ by {loss_diff:.3g} > {LOSS_TOL:g}")


if __name__ == "__main__":
    main()
