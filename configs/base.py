"""Shared ml_collections layout of every config: model, data, train."""

import ml_collections

from mimo_jax.config import GLOBAL_EVERY, NUM_DENSE_LAYERS


def model_dict(**fields) -> ml_collections.ConfigDict:
    """A ``config.model`` dict: ModelConfig fields plus the compact pattern keys.

    ``num_layers`` / ``num_dense_layers`` / ``global_every`` build ``layer_types`` and
    ``mlp_layer_types`` (``mimo_jax.config.layer_pattern``, via ``from_config_dict``), so
    ``--config.model.num_layers=4`` works from the command line.
    """
    pattern = {"num_dense_layers": NUM_DENSE_LAYERS, "global_every": GLOBAL_EVERY}
    return ml_collections.ConfigDict({**pattern, **fields})


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    # glibc malloc keeps freed memory (process_setup.py, applied by main.py): no page faults on
    # XLA:CPU's per-step temporaries, but the process stays at its peak resident memory. CPU
    # configs only.
    c.keep_freed_memory = False
    c.model = model_dict()

    # Device mesh (data, fsdp, expert, tensor; one -1 takes the remaining devices) and the rule
    # preset of mimo_jax/sharding.py that maps parameters and batches onto it (docs/sharding.md).
    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (1, -1, 1, 1)
    c.mesh.rules = "fsdp"

    c.data = ml_collections.ConfigDict()
    # "stdlib": this Python's own standard library sources, byte-tokenised (embedded default).
    # "files": token files (.bin / .npy) or text files tokenised with `tokenizer`.
    c.data.source = "stdlib"
    c.data.train_files = ""  # glob
    c.data.validation_files = ""  # glob
    c.data.tokenizer = ""  # path to a tokenizer.json; empty means bytes
    c.data.val_percent = 2  # stdlib: share of files held out for validation
    c.data.max_bytes = 0  # stdlib: cap on bytes read (0 = all)

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.batch_size = 16
    c.train.seq_len = 256
    c.train.grad_accum = 1  # micro-batches per optimizer step
    # Positions per cross-entropy chunk; 0 = whole sequence. > 0 never holds the [B, T, V] fp32
    # logits: each chunk's are recomputed in the backward pass
    # (mimo_jax.loss.chunked_cross_entropy).
    c.train.loss_chunk = 0
    c.train.lr = 3e-3
    c.train.min_lr_ratio = 0.1
    c.train.warmup_steps = 50
    c.train.hold_steps = 0  # steps at the peak lr after warmup, before the cosine decay
    c.train.b1 = 0.9
    c.train.b2 = 0.95
    c.train.eps = 1e-8
    c.train.weight_decay = 0.1
    c.train.grad_clip = 1.0
    c.train.mtp_loss_weight = 0.3  # the paper's stage-1 value
    c.train.aux_loss_weight = 1e-5  # sequence-wise balance loss (paper: 1e-5)
    c.train.bias_update_rate = 1e-3  # aux-loss-free expert-bias rate (paper: 1e-3)
    c.train.log_every = 25
    c.train.eval_every = 250
    c.train.eval_batches = 8  # spread evenly over the validation split; 0 = every window
    c.train.checkpoint_every = 250
    c.train.keep_checkpoints = 3
    c.train.sample_len = 200
    c.train.sample_prompt = "def "
    return c
