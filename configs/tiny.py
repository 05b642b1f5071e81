"""The embedded default: a small MiMo (hybrid SWA/global with sinks, sigmoid MoE, 3 MTP layers)
that trains on CPU in minutes on byte-level Python source."""

from configs.base import base_config, model_dict


def get_config():
    c = base_config()
    c.model = model_dict(
        num_layers=8,
        vocab_size=256,
        embed_dim=128,
        mlp_dim=352,
        moe_mlp_dim=96,
        num_heads=4,
        num_kv_heads=1,
        swa_num_kv_heads=2,
        head_dim=48,
        v_head_dim=32,
        sliding_window=33,
        num_experts=8,
        num_experts_per_tok=2,
        num_mtp_layers=3,
        max_position_embeddings=4096,
        dtype="auto",  # bf16 on accelerators, fp32 on CPU
        param_dtype="float32",
        initializer_range=0.02,
    )
    c.train.steps = 600
    c.train.batch_size = 8
    c.train.seq_len = 256
    c.train.warmup_steps = 30
    c.train.log_every = 25
    c.train.eval_every = 200
    c.train.checkpoint_every = 200
    return c
