"""Seconds-long config for tests: three layers (global + dense FFN, then two SWA + MoE), one MTP
layer."""

from configs.base import base_config, model_dict


def get_config():
    c = base_config()
    c.model = model_dict(
        num_layers=3,
        vocab_size=256,
        embed_dim=32,
        mlp_dim=64,
        moe_mlp_dim=24,
        num_heads=4,
        num_kv_heads=1,
        swa_num_kv_heads=2,
        head_dim=24,
        v_head_dim=8,
        sliding_window=9,
        num_experts=4,
        num_experts_per_tok=2,
        num_mtp_layers=1,
        max_position_embeddings=1024,
        dtype="auto",  # bf16 on accelerators, fp32 on CPU
        param_dtype="float32",
    )
    c.keep_freed_memory = True  # a CPU config: see process_setup.keep_freed_memory
    c.mesh.shape = (1, 1, 1, 1)  # one device, even where tests fake 8
    return c
