"""The sizes each notebook runs at: full size for users, small under ``MIMO_NOTEBOOK_SMALL=1``.

Every size that differs between the two modes comes from one function here, called with
``small``. ``tests/test_notebooks.py`` runs each notebook small; ``tests/test_notebook_configs.py``
builds and validates each full-size configuration (model, schedule, mesh, shapes) without
running it, so a full-size setting the library refuses fails in the tests, not halfway through
a user's run.
"""

import ml_collections

import mimo_jax
from configs import debug, mopd_tiny, rl_tiny, tiny


def quickstart(small: bool) -> ml_collections.ConfigDict:
    """``01_quickstart``: the model and the short training run.

    Args:
      small: a 2-layer model (``configs/debug.py``) for 20 steps; otherwise the embedded default
        model (``configs/tiny.py``) for 200 steps of 8 x 128 bytes.

    Returns:
      The config (``config.model``, ``config.data``, ``config.train``).
    """
    if small:
        config = debug.get_config()
        config.model.num_layers = 2  # global + SWA, 1 MTP layer
        config.data.max_bytes = 300_000
        config.train.update(steps=20, batch_size=4, seq_len=64, warmup_steps=5)
        return config
    config = tiny.get_config()
    # A 200-step slice of the tiny recipe: its warmup and hold are sized for 2800 steps, so both
    # shrink with the run, keeping its shape (warmup, the peak held for half the run, cosine).
    config.train.update(steps=200, batch_size=8, seq_len=128, warmup_steps=10, hold_steps=100)
    return config


def conversion(small: bool) -> tuple[int, int]:
    """``02_huggingface_conversion``: the sliding window and the compared sequence length.

    Args:
      small: a shorter sequence.

    Returns:
      (W, T): the tiny transformers model's sliding window and the length of the sequences whose
      logits are compared; T > W, so positions past the window are compared too.
    """
    return 9, (24 if small else 64)


def kernels(small: bool) -> tuple[int, list[str]]:
    """``03_attention_kernels``: the kernel check's length and the timing sweep's flags.

    Args:
      small: a shorter check and ``bench/attention.py --quick``.

    Returns:
      (T, flags): the sequence length at which every implementation is compared with the
      reference, and the flags of ``bench.attention.parse_args`` for the timing sweep (full size:
      MiMo's head dims H = 192, P = 128, W = 129 with 4 query / 2 kv heads).
    """
    if small:
        return 80, ["--quick"]
    return 300, ["--seqs", "512,1024,2048,4096", "--heads", "4", "--out", ""]


def sharding(small: bool) -> ml_collections.ConfigDict:
    """``04_sharding``: the 8-device mesh, its preset, and the small sharded model.

    Args:
      small: 3 training steps instead of 20.

    Returns:
      The config; ``config.mesh.shape`` is (data, fsdp, expert, tensor) = (1, 2, 2, 2) and
      ``config.mesh.rules`` the preset of the sharded model and its training steps.
    """
    config = debug.get_config()
    config.mesh.shape = (1, 2, 2, 2)
    config.mesh.rules = "fsdp_ep"
    config.model.num_layers = 2  # layer 0: global attention + dense FFN; layer 1: SWA + MoE
    config.model.num_mtp_layers = 0  # MTP blocks shard like decoder layers; left out for speed
    config.model.num_kv_heads = 2  # tp_ep splits the global layers' kv heads over tensor = 2
    config.model.moe_impl = "expert_parallel"
    config.data.max_bytes = 200_000
    config.train.update(batch_size=8, seq_len=32, steps=3 if small else 20, warmup_steps=1)
    return config


def checkpoint_on_a_mesh(small: bool) -> tuple[mimo_jax.ModelConfig, int]:
    """``05_checkpoint_on_a_mesh``: the synthetic hub checkpoint's model and the reply length.

    Args:
      small: a 2-layer model with 8 experts (a few MB) and an 8-token reply; otherwise 6 layers
        with 16 experts (about 50M parameters, 60 MB in FP8) and 24 tokens.

    Returns:
      (cfg, max_new_tokens). Every dim is divisible as the ``decode`` preset splits it on the
      notebook's (1, 2, 2, 2) mesh; ``embed_dim`` is not a multiple of 128, so FP8 blocks are
      ragged; the vocabulary holds the notebook's 400-token tokenizer.
    """
    common = dict(
        num_mtp_layers=1,
        num_heads=4,
        num_kv_heads=2,
        swa_num_kv_heads=4,
        head_dim=192,  # MiMo's head dims
        v_head_dim=128,
        vocab_size=512,
        param_dtype="bfloat16",  # as the hub stores its non-FP8 tensors
    )
    if small:
        cfg = mimo_jax.tiny(
            num_layers=2, embed_dim=160, mlp_dim=256, moe_mlp_dim=128, num_experts=8, **common
        )
        return cfg, 8
    cfg = mimo_jax.tiny(
        num_layers=6, embed_dim=544, mlp_dim=1024, moe_mlp_dim=256, num_experts=16, **common
    )
    return cfg, 24


def post_training(small: bool) -> ml_collections.ConfigDict:
    """``06_post_training``: the SFT warm-up and the RL run.

    Args:
      small: a 2-layer model (one MoE layer, 1 MTP layer), 4 SFT steps and 2 RL steps of
        2 prompts x 2 samples, held-out success on 16 prompts; otherwise ``configs/rl_tiny.py``
        as shipped.

    Returns:
      The config (``model``, ``task``, ``train`` and ``sft`` for the warm-up, ``rl``).
    """
    config = rl_tiny.get_config()
    if not small:
        return config
    config.model.update(num_layers=2, num_mtp_layers=1)  # layer 0 dense FFN, layer 1 MoE
    config.train.update(
        steps=4, batch_size=8, warmup_steps=1, log_every=2, eval_every=2, checkpoint_every=4
    )
    config.sft.update(num_examples=64, heldout_prompts=16)
    config.rl.update(
        steps=2, prompts_per_step=2, group_size=2, warmup_steps=1, log_every=1, heldout_every=1,
        heldout_prompts=16, checkpoint_every=2,
    )  # fmt: skip
    return config


def mopd(
    small: bool,
) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """``07_mopd``: the two domain teachers and the student.

    Args:
      small: a 2-layer model (one MoE layer, 1 MTP layer), 4 SFT steps and 2 RL / MOPD steps of
        2 prompts x 2 samples, held-out success on 16 prompts; otherwise ``configs/mopd_tiny.py``
        as shipped.

    Returns:
      (reversal teacher, addition teacher, student): ``get_config("teacher_reversal")``,
      ``get_config("teacher_addition")`` (``--mode=rl``: GRPO on one task from the student; the
      notebook sets ``init_from``) and ``get_config()`` (``domains``: both tasks; ``--mode=sft``
      then ``--mode=mopd``).
    """
    configs = tuple(mopd_tiny.get_config(a) for a in ("teacher_reversal", "teacher_addition"))
    configs += (mopd_tiny.get_config(),)
    if small:
        for config in configs:
            shipped = post_training(True)  # 06's small sizes, on this config's tasks
            for field in ("model", "train", "rl"):
                config[field] = shipped[field]
            config.sft.update(num_examples=64, heldout_prompts=16)
    return configs
