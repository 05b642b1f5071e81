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
        mimo_v2_flash(moe_impl="expert_parallel", remat=True, param_dtype="float32")
    )
    c.model = model_dict(**fields)
    c.mesh.shape = (1, -1, 16, 1)  # data, fsdp (fills: 16 on 256 devices), expert, tensor
    c.mesh.rules = "fsdp_ep"
    c.train.seq_len = 4096
    c.train.batch_size = 256  # one 4K sequence per device
    c.train.lr = 3.2e-4  # reference section 6: peak LR of pre-training
    return c
