"""The embedded default: a small MiMo (hybrid SWA/global with sinks, sigmoid MoE, 3 MTP layers)
that trains on 2 CPU cores in minutes on byte-level Python source.

Sized for CPU throughput: the layers run unrolled (``scan_layers=False``: on CPU the scanned
stack spends part of each step zero-filling and copying the stacked residuals, and at this depth
compiling unrolled is no slower); the dense FFN (layer 0 and each MTP block) is narrow, since the
3 MTP blocks (kept for 3-draft speculative decoding) would otherwise cost as much as the decoder.
The MoE runs on the blocked grouped matmul (``mimo_jax.moe.grouped_matmul``). The measurements
behind these choices are in bench/README.md; docs/training.md explains the schedule.
"""

from configs.base import base_config, model_dict


def get_config():
    c = base_config()
    c.model = model_dict(
        # global_every=6: layer 0 global (dense FFN), 1-4 SWA, 5 global (1-5 MoE). On CPU each
        # layer costs about the same (small ops, not FLOPs) and in a fixed time more updates of
        # fewer layers learned more than fewer updates of more layers.
        num_layers=6,
        vocab_size=256,
        embed_dim=128,
        mlp_dim=192,
        moe_mlp_dim=96,
        num_heads=4,
        num_kv_heads=1,
        swa_num_kv_heads=2,
        head_dim=48,
        v_head_dim=32,
        sliding_window=33,  # < seq_len: SWA layers see 33 keys, global layers all 256
        num_experts=8,
        num_experts_per_tok=2,
        num_mtp_layers=3,
        max_position_embeddings=4096,
        scan_layers=False,
        dtype="auto",  # bf16 on accelerators, fp32 on CPU
        param_dtype="float32",
        initializer_range=0.02,
    )
    # Small batches: on CPU a step of 2 x 256 tokens runs at nearly the tokens/s of a larger
    # one, and more updates learn more per token.
    c.keep_freed_memory = True  # a CPU config: see process_setup.keep_freed_memory
    c.train.steps = 2800
    c.train.batch_size = 2
    c.train.seq_len = 256
    c.train.lr = 3e-3
    c.train.warmup_steps = 100
    c.train.hold_steps = 1400  # the recipe's shape: hold the peak lr, then cosine
    c.train.weight_decay = 0.3  # the recipe's 0.1 ended with a higher validation loss here
    # The technical report's rate of 1e-3 needs ~100 steps to move a bias by 0.1, and until
    # then whole experts get no tokens; 1e-2 moves it in ~10 steps of this short run.
    c.train.bias_update_rate = 1e-2
    c.train.log_every = 100
    c.train.eval_every = 600
    # 128 windows of 256 bytes spread evenly over the validation split: a cheap estimate of the
    # whole split's loss (--mode=eval --config.train.eval_batches=0 measures it exactly).
    c.train.eval_batches = 64
    c.train.checkpoint_every = 600
    return c
