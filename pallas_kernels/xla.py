"""Pure-JAX attention path (placeholder: dense masked; to be replaced by the banded version)."""

from pallas_kernels.reference import attention_reference


def attention_xla(q, k, v, **kwargs):
    return attention_reference(q, k, v, **kwargs)
