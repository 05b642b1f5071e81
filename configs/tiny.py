"""The embedded default: a small MiMo (hybrid SWA/global with sinks, sigmoid MoE, 3 MTP layers)
that trains on 2 CPU cores in minutes on byte-level Python source.

Sized for CPU throughput: the layers run unrolled (``scan_layers=False``: on CPU the scanned
stack spends about a tenth of the step zero-filling and copying the stacked residuals, and at 6-8
layers compiling unrolled is no slower); the dense FFN (layer 0 and each MTP block) is narrow,
since the 3 MTP blocks (kept for 3-draft speculative decoding) would otherwise cost as much as the
decoder. The MoE runs on the blocked grouped matmul (``mimo_jax.moe.grouped_matmul``).
"""

from configs.base import base_config, model_dict


def get_config():
    c = base_config()
    c.model = model_dict(
        # global_every=6: layer 0 global (dense FFN), 1-4 SWA, 5 global (1-5 MoE). Each layer
        # costs about the same on CPU (~25 ms of a ~240 ms step: small ops, not FLOPs), and
        # updates were the scarce resource: 6 layers x 2800 steps beat 8 x 2400 in the same time.
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
    # Small batches: on 2 CPU cores a step of 2 x 256 tokens runs at nearly the tokens/s of one
    # of 8 x 256 (2200 vs 2500), and 4x the updates learn more per token. Validation bits/byte on
    # the whole split (--mode=eval --config.train.eval_batches=0), one run each: 8 layers, 2400
    # steps, plain cosine, weight decay 0.1: 2.09-2.13 (two runs); the same held at the peak for
    # 1200 steps: 2.08. 6 layers held for half the run, weight decay 0.1: 2600 / 2800 / 3000
    # steps: 2.047 / 2.012 / 1.983 (2800 steps: 10.5-12.7 min); 2800 steps with weight decay
    # 0 / 0.1 / 0.2 / 0.3: 2.057 / 2.012 / 1.989 / 1.979. Any change of setting moves the result
    # by up to ~0.03 (float rounding takes another path); runs sharing a config prefix matched
    # to the last digit over it. Earlier, on the split's first 64 windows (~0.1 easier): lr 6e-3
    # learned slower, min_lr_ratio 0 ended worse (+0.04), 4 x 256 for 1200 steps: +0.18.
    c.keep_freed_memory = True  # a CPU config: see mimo_jax/host.py
    c.train.steps = 2800
    c.train.batch_size = 2
    c.train.seq_len = 256
    c.train.lr = 3e-3
    c.train.warmup_steps = 100
    c.train.hold_steps = 1400  # the recipe's shape: hold the peak lr, then cosine
    c.train.weight_decay = 0.3  # the recipe's 0.1 measured worse here (see above)
    # The paper's 1e-3 needs ~100 steps to move a bias by 0.1; until then whole experts get no
    # tokens (a third of the parameters had zero gradient at step 25). 1e-2 balances in ~10.
    c.train.bias_update_rate = 1e-2
    c.train.log_every = 100
    c.train.eval_every = 600
    # 128 of the split's 1370 windows of 256 bytes, spread evenly; on every model tried they
    # read ~0.06 bits/byte harder than the whole split (e.g. 2.034 vs 1.979).
    c.train.eval_batches = 64
    c.train.checkpoint_every = 600
    return c
