"""The released MiMo-V2-Flash architecture (309B total / 15B active), trained on 256 devices.

Preset ``tp_ep`` on the mesh (data, fsdp, expert, tensor) = (1, 4, 16, 4): experts split 16 ways
(16 of the 256 per device), heads / FFN / vocab 4 ways over ``tensor``, ``embed`` 4 ways over
``fsdp``; the batch is split over data x fsdp x expert = 64 shards, one 4096-token sequence
each. ``bench/memory_plan.py`` puts this at 6.07 GiB of parameters + 12.13 GiB of Adam moments
+ 58.0 GiB of XLA temporaries = 76 GiB per device (temporaries as XLA:CPU compiles them; see
bench/README.md). That fits an H200 (141 GB) or a TPU v5p chip (95 GB; a v5p-512 slice has
256) with room to spare; an 80 GB H100 would have none left for the runtime and the estimate's
error, so it is not a target. ``fsdp_ep`` on (1, 16, 16, 1) needs 4.51 + 9.02 + 97.6 = 111 GiB
per device: an H200 only. Presets and meshes: docs/sharding.md.
Launch one process per host with ``--distributed`` (docs/sharding.md, "Multi-host").
"""

import dataclasses

from configs.base import base_config, model_dict
from mimo_jax.config import mimo_v2_flash


def get_config():
    c = base_config()
    # fp32 master weights (and so fp32 Adam moments), bf16 compute: a bf16 parameter cannot
    # absorb updates ~1e-3 of its size. Imported bf16 checkpoints are upcast on load.
    fields = dataclasses.asdict(
        mimo_v2_flash(
            moe_impl="expert_parallel",
            remat=True,
            param_dtype="float32",
            # Dropless expert parallelism with worst-case buffers, dispatched 1024 tokens at a
            # time: 16 x 1024 x 8 rows per buffer instead of 16 x 4096 x 8.
            moe_token_chunk=1024,
        )
    )
    c.model = model_dict(**fields)
    c.mesh.shape = (1, -1, 16, 4)  # data, fsdp (fills: 4 on 256 devices), expert, tensor
    c.mesh.rules = "tp_ep"
    c.train.seq_len = 4096
    c.train.batch_size = 64  # one 4K sequence per batch shard, the batch the memory plan measured
    c.train.lr = 3.2e-4  # peak LR of pre-training (MiMo-V2-Flash technical report, section 3)
    # The 4 heads' fp32 logits would take 4 x 4096 x 152K x 4 B = 9.3 GiB per sequence, more
    # with their softmax and gradients; chunked, 1024 positions at a time.
    c.train.loss_chunk = 1024
    return c
