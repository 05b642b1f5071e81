"""What ``generate`` hands back to the host: streamed tokens in order, and the cropped result.

The device loop (``mimo_jax.generate``) works on fixed-size buffers with scratch after each row's
newest token; this module turns them into per-row outputs.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class GenerateResult:
    """What ``generate`` returns.

    Attributes:
      tokens: int32 [B, T + max_new_tokens]; row b holds its prompt, then its new tokens, then
        padding (``pad_token_id``), right-aligned prompts first normalised to the left.
      lengths: int32 [B] valid tokens per row (prompt + generated, up to and including EOS).
      mean_accepted_length: [] mean tokens committed per verify step (1 without drafts).
      acceptance_rate: [num_draft_tokens] fraction of steps in which draft k was accepted.
      num_steps: [] loop steps taken.
      logprobs: with ``return_logprobs``, fp32 [B, T + max_new_tokens]: each generated token's
        log-probability under the main model's distribution it was drawn from
        (``sampling.token_logprobs``), 0 at prompt and padding positions; else None.
      routing: with ``return_routing``, int32 [L, B, T + max_new_tokens, k]: the main model's
        expert ids at every position before each row's final token, prompt included; -1 on
        dense layers, padding and the final token, which was sampled but not fed back (the
        layout ``model(ids, routing=...)`` replays, -1 meaning "route afresh"); else None.
    """

    tokens: jax.Array
    lengths: jax.Array
    mean_accepted_length: jax.Array
    acceptance_rate: jax.Array
    num_steps: jax.Array
    logprobs: jax.Array | None = None
    routing: jax.Array | None = None


class Stream:
    """Host side of ``stream``: passes on the valid part of each fixed-size device buffer, in
    order. The callbacks are unordered (a program on several devices cannot order them), so a
    part that arrives early waits for those before it. Hashable by identity: a static argument."""

    def __init__(self, fn):
        self.fn, self.next, self.held = fn, 0, {}

    def __call__(self, tokens, count, start):
        if int(count) > 0 and int(start) >= self.next:
            self.held[int(start)] = np.asarray(tokens)[: int(count)]
        while self.next in self.held:
            self.fn(part := self.held.pop(self.next))
            self.next += len(part)


def finish(
    s, ids: np.ndarray, lengths: np.ndarray, max_new: int, d: int, eos, pad: int
) -> GenerateResult:
    """Crops each row to its prompt + generated tokens (through EOS) and computes statistics.

    Args:
      s: the final ``generate.DecodeState``.
      ids: int [B, T] the prompts, left-aligned.
      lengths: int [B] prompt lengths.
      max_new: tokens generated per row at most.
      d: draft tokens per step.
      eos: the tokens that finish a row, or None.
      pad: filler after each row's end.

    Returns:
      GenerateResult.
    """
    b, t = ids.shape
    buf = np.asarray(s.tokens)
    n_new = np.minimum(np.asarray(s.n_new), max_new)
    out = np.full((b, t + max_new), pad, np.int32)
    out_len = np.zeros((b,), np.int32)
    for r in range(b):
        new = buf[r, lengths[r] : lengths[r] + n_new[r]]
        if eos and (hit := np.nonzero(np.isin(new, eos))[0]).size:
            new = new[: hit[0] + 1]
        row = np.concatenate([ids[r, : lengths[r]], new])
        out[r, : len(row)] = row
        out_len[r] = len(row)
    valid = np.arange(t + max_new)[None] < out_len[:, None]  # [B, T + max_new]
    logprobs = routing = None
    if s.logprobs is not None:
        new = valid & (np.arange(t + max_new)[None] >= lengths[:, None])
        logprobs = jnp.asarray(np.where(new, np.asarray(s.logprobs)[:, : t + max_new], 0.0))
    if s.routing is not None:
        r = np.asarray(s.routing)[:, :, : t + max_new]  # [L, B, T + max_new, k]
        # A row's final token came from the last verify's logits and was not fed back (its
        # slot may hold a rejected draft's experts): recorded only before it.
        consumed = np.arange(t + max_new)[None] < out_len[:, None] - 1
        routing = jnp.asarray(np.where(consumed[None, ..., None], r, -1).astype(np.int32))
    active = max(int(s.active_steps), 1)
    return GenerateResult(
        tokens=jnp.asarray(out),
        lengths=jnp.asarray(out_len),
        mean_accepted_length=jnp.asarray(float(s.committed) / active),
        acceptance_rate=jnp.asarray(np.asarray(s.accepted)[:d] / active),
        num_steps=s.steps,
        logprobs=logprobs,
        routing=routing,
    )
