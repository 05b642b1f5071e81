"""Training loss: next-token cross-entropy plus the MTP depths and the sequence balance loss.

``chunked_cross_entropy`` computes the same loss without materialising the [B, T, V] logits
(the real model's V = 152K), recomputing each chunk's logits in the backward pass.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from mimo_jax.model import MiMoV2Flash, ModelOutput


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean token cross-entropy over masked positions.

    Args:
      logits: [B, T, V] fp32.
      labels: int [B, T].
      mask: [B, T] 1 where the label counts.

    Returns:
      [] mean loss (nats).
    """
    return _nll_sum(logits, labels, mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _nll_sum(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Summed masked NLL: logits [B, T, V], labels int [B, T], mask [B, T] -> []."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]  # [B, T]
    return jnp.sum(nll * mask)


def chunked_cross_entropy(
    head: Callable[[jax.Array], jax.Array],
    hidden: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    chunk: int,
) -> jax.Array:
    """``cross_entropy(head(hidden), labels, mask)`` without materialising the [B, T, V] logits.

    The positions are cut into chunks of ``chunk``; each chunk's logits are computed, reduced to
    a summed NLL and dropped, and the backward pass recomputes them (``jax.checkpoint``). Peak
    logits memory falls from B * T * V to B * chunk * V floats: for the real model (V = 152K,
    T = 4096, four heads with MTP) from ~16 GiB per sequence to a few hundred MiB.

    Args:
      head: hidden [B, c, D] -> fp32 logits [B, c, V] (the model's final projection).
      hidden: [B, T, D].
      labels: int [B, T].
      mask: [B, T] 1 where the label counts.
      chunk: positions per chunk (T need not be a multiple; the tail is padded and masked).

    Returns:
      [] mean loss (nats), equal to ``cross_entropy`` on the full logits.
    """
    b, t, d = hidden.shape
    pad = -t % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        labels = jnp.pad(labels, ((0, 0), (0, pad)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
    n = (t + pad) // chunk

    def split(x):  # [B, T, ...] -> [n, B, chunk, ...]
        return jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def chunk_nll(args):
        h, y, m = args  # [B, c, D], [B, c], [B, c]
        return _nll_sum(head(h), y, m)  # the [B, c, V] logits live only inside this chunk

    nll = jax.lax.map(chunk_nll, (split(hidden), split(labels), split(mask)))  # [n]
    return jnp.sum(nll) / jnp.maximum(jnp.sum(mask), 1.0)


def compute_loss(
    out: ModelOutput,
    labels: jax.Array,
    *,
    mtp_weight: float,
    aux_weight: float,
    head: Callable[[jax.Array], jax.Array] | None = None,
    chunk: int = 0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """CE + (mtp_weight / D) * sum_k CE_k + aux_weight * sequence balance loss.

    MTP depth k at position i predicts label i + k + 1 (token i + k + 2 of the input); the last
    k + 1 positions of each row have no label and are masked out.

    Args:
      out: model output for inputs [B, T].
      labels: int [B, T], the inputs shifted left by one.
      mtp_weight: lambda, the total MTP loss weight.
      aux_weight: weight of the sequence-wise balance loss (0 disables it).
      head: with ``chunk`` > 0, the model's hidden -> fp32 logits projection, applied to
        ``out.hidden`` / ``out.mtp_hidden`` (``out.logits`` may then be None).
      chunk: 0 to use ``out.logits``; else positions per chunk (``chunked_cross_entropy``).

    Returns:
      (total loss, metrics with ``ce``, ``mtp_ce_<k>``, ``aux_loss``).
    """
    if chunk:
        if head is None:
            raise ValueError("compute_loss: chunk > 0 needs the model's logits head")
        heads_in = (out.hidden, *out.mtp_hidden)

        def ce_of(x, y, m):
            return chunked_cross_entropy(head, x, y, m, chunk)
    else:
        heads_in = (out.logits, *out.mtp_logits)
        ce_of = cross_entropy
    b, t = labels.shape
    ones = jnp.ones((b, t), jnp.float32)
    ce = ce_of(heads_in[0], labels, ones)
    metrics = {"ce": ce}
    loss = ce
    depth = len(heads_in) - 1
    for k, x in enumerate(heads_in[1:]):
        shifted = jnp.roll(labels, -(k + 1), axis=1)
        mask = (jnp.arange(t) < t - (k + 1)).astype(jnp.float32)[None] * ones
        mtp_ce = ce_of(x, shifted, mask)
        metrics[f"mtp_ce_{k}"] = mtp_ce
        loss = loss + (mtp_weight / depth) * mtp_ce
    aux = jnp.sum(out.aux["seq_aux_loss"])
    metrics["aux_loss"] = aux
    if aux_weight:
        loss = loss + aux_weight * aux
    return loss, metrics


def model_loss(
    model: MiMoV2Flash, tokens: jax.Array, *, mtp_weight: float, aux_weight: float, chunk: int
) -> tuple[jax.Array, dict[str, jax.Array], ModelOutput]:
    """Forward pass and ``compute_loss`` on tokens [B, T + 1].

    Args:
      model: the model.
      tokens: int [B, T + 1]; inputs are ``tokens[:, :-1]``, labels ``tokens[:, 1:]``.
      mtp_weight: see ``compute_loss``.
      aux_weight: see ``compute_loss``.
      chunk: ``config.train.loss_chunk``: 0 computes the full logits, else the loss is chunked
        (``chunked_cross_entropy``) and the model skips its logits.

    Returns:
      (loss, metrics, model output; its logits are None when chunked).
    """
    out = model(tokens[:, :-1], logits=not chunk)
    loss, metrics = compute_loss(
        out, tokens[:, 1:], mtp_weight=mtp_weight, aux_weight=aux_weight, head=model.logits,
        chunk=chunk,
    )  # fmt: skip
    return loss, metrics, out
