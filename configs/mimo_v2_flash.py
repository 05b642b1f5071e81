"""The released MiMo-V2-Flash architecture (309B total / 15B active), bf16, on a production mesh.

The mesh is sized for 256 accelerators (e.g. a v5p-512 slice or 32 hosts of 8 H100/H200):
16-way FSDP x 16-way expert parallelism (16 of the 256 experts per device), with the
``fsdp_ep`` rule preset. Launch one process per host with ``--distributed`` (README, "Multi-host").
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
            # time: 16 x 1024 x 8 rows (1 GiB) per buffer instead of 16 x 4096 x 8.
            moe_token_chunk=1024,
        )
    )
    c.model = model_dict(**fields)
    c.mesh.shape = (1, -1, 16, 1)  # data, fsdp (fills: 16 on 256 devices), expert, tensor
    c.mesh.rules = "fsdp_ep"
    c.train.seq_len = 4096
    c.train.batch_size = 256  # one 4K sequence per device
    c.train.lr = 3.2e-4  # reference section 6: peak LR of pre-training
    # The 4 heads' fp32 logits would take 4 x 4096 x 152K x 4 B = 9.3 GiB per sequence, more
    # with their softmax and gradients; chunked, 1024 positions at a time.
    c.train.loss_chunk = 1024
    return c
