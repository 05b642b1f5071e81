"""Decoding: prefill, a device-side token loop, sampling, MTP speculative decoding.

The loop is a state machine over ``DecodeState``. With ``d = num_draft_tokens`` and ``base`` the
position of the newest committed token, one step is

  1. ``draft``: every MTP depth k runs on the d + 1 indices ``base - 1 - d .. base - 1`` (index i
     consumes token i + k + 1 and depth k - 1's hidden state at index i); the last one drafts
     token ``base + k + 1``, which depth k + 1 then consumes.
  2. ``verify``: the main model runs on [token ``base``, d drafts] in one pass over its cache.
  3. ``accept``: the longest agreeing prefix plus one token from the main model is committed
     (greedy: equality; sampling: rejection sampling, so the output distribution is the main
     model's own).

With d = 0 this is plain decoding. ``prefill`` fills the caches from the prompts first. Everything
after the argument checks runs in one ``jax.jit``. docs/decoding.md explains why d + 1 MTP indices
keep every MTP cache entry a draft reads exact, and why rejected tokens need no rollback: the next
step writes the same cache slots before any query reads them.
"""

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mimo_jax.decode_output import GenerateResult, Stream, finish
from mimo_jax.model import MiMoV2Flash
from mimo_jax.sampling import Sampling, pick, probs, token_logprobs


def max_new_per_step(num_draft_tokens: int) -> int:
    """Most positions one decoding step writes into any cache: the d + 1 verified tokens.

    Each MTP depth also writes d + 1 positions per step (see ``draft``). A ring of
    ``sliding_window + max_new_per_step(d)`` slots then never loses a key that a query of the
    step, or of a later one, still sees (docs/decoding.md).
    """
    return num_draft_tokens + 1


@struct.dataclass
class DecodeState:
    """The loop state between steps (one row per sequence).

    Attributes:
      tokens: int32 [B, S] row b's committed tokens at their positions through ``base[b]``;
        anything after them is scratch.
      cache: decoder and MTP caches (``MiMoV2Flash.init_cache``; MTP depths 0..d-1 only).
      base: int32 [B] position of the newest committed token.
      hidden: [B, d + 1, D] the main model's post-norm hidden states at indices
        ``base - 1 - d .. base - 1``: MTP depth 0's inputs (zeros before the sequence start).
      n_new: int32 [B] tokens generated so far (may pass ``max_new_tokens`` in the last step).
      done: bool [B] the row has produced EOS.
      key: PRNG key.
      steps: int32 [] steps taken.
      committed: int32 [] tokens committed by rows still active in their step, summed.
      accepted: int32 [max(d, 1)] per draft depth, active row-steps that accepted it.
      active_steps: int32 [] active row-steps.
      logprobs: fp32 [B, S] or None: each committed token's log-probability at its position
        (``token_logprobs``); scratch like ``tokens`` after ``base``.
      routing: int32 [L, B, S, k] or None: the main model's expert ids at each position it has
        run (prefill and verify; -1 on dense layers); positions after ``base`` are scratch.
    """

    tokens: jax.Array
    cache: dict
    base: jax.Array
    hidden: jax.Array
    n_new: jax.Array
    done: jax.Array
    key: jax.Array
    steps: jax.Array
    committed: jax.Array
    accepted: jax.Array
    active_steps: jax.Array
    logprobs: jax.Array | None = None
    routing: jax.Array | None = None


@struct.dataclass
class Drafts:
    """What ``draft`` hands to ``verify`` and ``accept``.

    Attributes:
      tokens: int32 [B, d + 1] the token at ``base`` followed by the d drafts.
      probs: [B, d, V] the distributions the drafts were sampled from (None when greedy).
    """

    tokens: jax.Array
    probs: jax.Array | None


def _leading_true(ok: jax.Array) -> jax.Array:
    """int32 [B]: how many of ``ok`` [B, d]'s first entries per row are all True.

    Unrolled over the static d: ``jnp.cumprod`` lowers to a reduce-window, which on CPU costs
    more than the rest of the acceptance together.
    """
    run = jnp.ones(ok.shape[:1], bool)
    n = jnp.zeros(ok.shape[:1], jnp.int32)
    for j in range(ok.shape[1]):
        run = run & ok[:, j]
        n = n + run
    return n


def _read(x: jax.Array, start: jax.Array, n: int) -> jax.Array:
    """x [B, S, ...] at rows ``start[b] .. start[b] + n - 1`` (clipped into range): [B, n, ...]."""
    idx = jnp.clip(start[:, None] + jnp.arange(n), 0, x.shape[1] - 1)  # [B, n]
    return jnp.take_along_axis(x, idx.reshape(*idx.shape, *([1] * (x.ndim - 2))), axis=1)


def _write(x: jax.Array, start: jax.Array, val: jax.Array) -> jax.Array:
    """x [B, S] with ``x[b, start[b] + j] = val[b, j]`` (out of range dropped)."""
    idx = start[:, None] + jnp.arange(val.shape[1])  # [B, n]
    return x.at[jnp.arange(x.shape[0])[:, None], idx].set(val, mode="drop")


def mtp_prefill_start(
    lengths: jax.Array, t: int, k: int, d: int, window: int
) -> tuple[int, jax.Array]:
    """Where the prefill runs MTP depth k: n indices from ``start`` per row, ending at the prompt's.

    The first step's depth-j queries (positions L - d + j .. L + j) see entries from index
    L - d - W on (W = ``window``); an entry needs depth j - 1's output at its index exact, and
    that output needs depth j - 1's keys W - 1 indices further back. So depth k needs indices
    from L - d - W - (d - 1 - k) * (W - 1) on (or from 0): the MTP prefill costs O(d^2 W)
    whatever the prompt's length, and its caches hold what a full prefill's would where any later
    query reads (docs/decoding.md).

    Args:
      lengths: int [B] prompt lengths L.
      t: T, the padded prompt length.
      k: the depth.
      d: draft tokens (MTP depths run).
      window: the MTP layers' sliding window W.

    Returns:
      n (static, <= T) and start int32 [B] (>= 0, start + n <= T).
    """
    n = min(t, d + window + (d - 1 - k) * (window - 1))
    return n, jnp.clip(lengths - n, 0, t - n).astype(jnp.int32)


def prefill(
    model: MiMoV2Flash,
    ids: jax.Array,
    lengths: jax.Array,
    key: jax.Array,
    *,
    d: int,
    max_new: int,
    sampling: Sampling,
    pad: int,
    eos: tuple[int, ...] | None = None,
    logprobs: bool = False,
    routing: bool = False,
) -> DecodeState:
    """Fills the caches from right-padded prompts and picks the first new token.

    Args:
      model: the model.
      ids: int32 [B, T] prompts, row b valid up to ``lengths[b]``.
      lengths: int32 [B] prompt lengths.
      key: PRNG key.
      d: draft tokens per step.
      max_new: tokens to generate per row (sizes the token buffer and the global caches).
      sampling: how tokens are picked.
      pad: filler of the token buffer.
      eos: the tokens that finish a row (any of them), or None.
      logprobs: record committed tokens' log-probabilities (``DecodeState.logprobs``).
      routing: record the main model's routing (``DecodeState.routing``).

    Returns:
      The state before the first step: ``base = lengths``, the first new token committed there.
    """
    b, t = ids.shape
    rows = jnp.arange(b)
    # The furthest position a generating row's step touches: verify writes up to base + d,
    # accept base + d + 1, and base < t + max_new - 1 while the row generates.
    max_len = t + max_new + d
    cache = model.init_cache(b, max_len, max_new_per_step(d))
    hidden, cache, route = model.prefill(ids, lengths, cache)  # [B, T, D], [L, B, T, k]
    # MTP depth k's entry i sits at position i + k + 1 and needs token i + k + 1 < length; the
    # first step writes the rest. Each depth runs only on the prompt's end (mtp_prefill_start).
    mtp = list(cache["mtp"][:d])
    h, prev = hidden, jnp.zeros_like(lengths)
    for k in range(d):
        n, start = mtp_prefill_start(lengths, t, k, d, model.cfg.sliding_window)
        ids_k = _read(ids, start + k + 1, n)  # [B, n] token i + k + 1 at index i = start + j
        pos_k = start[:, None] + k + 1 + jnp.arange(n)  # [B, n]
        h = _read(h, start - prev, n)  # [B, n, D] depth k - 1's output at the same indices
        h, mtp[k] = model.mtp_extend(
            k, ids_k, h, pos_k, mtp[k], lengths - (k + 1) - start, offset=start + k + 1
        )  # [B, n, D]
        prev = start
    key, sub = jax.random.split(key)
    last = model.logits(hidden[rows, lengths - 1])  # [B, V]
    first, _ = pick(last, sub, sampling)  # [B]
    tokens = jnp.full((b, max_len), pad, jnp.int32).at[:, :t].set(ids)
    tokens = tokens.at[rows, lengths].set(first)  # [B, S]
    # MTP depth 0's window before the first step: indices length - 1 - d .. length - 1.
    win = lengths[:, None] - 1 - d + jnp.arange(d + 1)  # [B, d + 1]
    hid = jnp.where((win >= 0)[..., None], _read(hidden, lengths - 1 - d, d + 1), 0)
    return DecodeState(
        tokens=tokens,
        cache={**cache, "mtp": mtp},
        base=lengths,
        hidden=hid.astype(hidden.dtype),  # [B, d + 1, D]
        n_new=jnp.ones((b,), jnp.int32),
        done=jnp.isin(first, jnp.asarray(eos)) if eos else jnp.zeros((b,), bool),
        key=key,
        steps=jnp.zeros((), jnp.int32),
        committed=jnp.zeros((), jnp.int32),
        accepted=jnp.zeros((max(d, 1),), jnp.int32),
        active_steps=jnp.zeros((), jnp.int32),
        logprobs=(
            jnp.zeros((b, max_len), jnp.float32)
            .at[rows, lengths]
            .set(token_logprobs(last, first, sampling))
            if logprobs
            else None
        ),
        routing=(
            jnp.full((route.shape[0], b, max_len, route.shape[-1]), -1, jnp.int32)
            .at[:, :, :t]
            .set(route)
            if routing
            else None
        ),
    )


def draft(
    model: MiMoV2Flash, s: DecodeState, d: int, sampling: Sampling
) -> tuple[DecodeState, Drafts]:
    """Drafts tokens ``base + 1 .. base + d`` with MTP depths 0..d-1 (step 1).

    Each depth runs on the d + 1 indices ``base - 1 - d .. base - 1``, rewriting the cache entries
    that earlier steps built from drafts (docs/decoding.md); the last index drafts.

    Args:
      model: the model.
      s: the loop state.
      d: draft tokens.
      sampling: how drafts are picked.

    Returns:
      The state with updated MTP caches and key, and the drafts.
    """
    window = _read(s.tokens, s.base - d, d + 1)  # [B, d + 1] committed tokens base - d .. base
    if d == 0:
        return s, Drafts(tokens=window, probs=None)
    idx = s.base[:, None] - 1 - d + jnp.arange(d + 1)  # [B, d + 1] MTP indices
    key, mtp, h = s.key, list(s.cache["mtp"]), s.hidden
    drafts, probs = [], []
    for k in range(d):
        ids_k = jnp.concatenate([window[:, k:], *drafts], axis=1)  # [B, d + 1] token i + k + 1
        # Indices before the sequence start (short prompts) neither write nor see keys.
        pos_k = jnp.where(idx >= 0, idx + k + 1, -1)  # [B, d + 1]
        h, mtp[k] = model.mtp_extend(k, ids_k, h, pos_k, mtp[k])  # [B, d + 1, D]
        sub = None
        if not sampling.greedy:  # greedy needs no randomness: no key splits in its loop
            key, sub = jax.random.split(key)
        y, q = pick(model.logits(h[:, -1]), sub, sampling)  # index base - 1: token base + k + 1
        drafts.append(y[:, None])
        probs.append(q)
    tokens = jnp.concatenate([window[:, -1:], *drafts], axis=1)  # [B, d + 1]
    stacked = None if sampling.greedy else jnp.stack(probs, axis=1)  # [B, d, V]
    return s.replace(cache={**s.cache, "mtp": mtp}, key=key), Drafts(tokens, stacked)


def verify(
    model: MiMoV2Flash, s: DecodeState, drafts: Drafts
) -> tuple[DecodeState, jax.Array, jax.Array]:
    """Runs the main model on [token ``base``, drafts] against its cache (step 2).

    Args:
      model: the model.
      s: the loop state.
      drafts: from ``draft``.

    Returns:
      The state with updated decoder caches (and routing at ``base .. base + d``: the next
      steps overwrite what belongs to rejected drafts), fp32 logits [B, d + 1, V] (row j
      predicts the token at ``base + j + 1``), post-norm hidden states [B, d + 1, D].
    """
    s, hidden = _extend(model, s, drafts.tokens)
    return s, model.logits(hidden), hidden


def _extend(model: MiMoV2Flash, s: DecodeState, tokens: jax.Array) -> tuple[DecodeState, jax.Array]:
    """Runs the main model on ``tokens`` [B, n] at ``base ..``; records their routing if asked.

    Returns:
      The state with updated decoder caches and routing, post-norm hidden states [B, n, D].
    """
    positions = s.base[:, None] + jnp.arange(tokens.shape[1])  # [B, n]
    hidden, cache, route = model.extend(tokens, positions, s.cache)  # [B, n, D], [L, B, n, k]
    routing = s.routing
    if routing is not None:
        rows = jnp.arange(tokens.shape[0])[:, None]  # [B, 1]
        routing = routing.at[:, rows, positions].set(route, mode="drop")
    return s.replace(cache=cache, routing=routing), hidden


def accept(
    s: DecodeState,
    drafts: Drafts,
    logits: jax.Array,
    hidden: jax.Array,
    *,
    sampling: Sampling,
    max_new: int,
    eos: tuple[int, ...] | None,
    stream: Callable | None = None,
) -> DecodeState:
    """Commits the longest accepted draft prefix plus one token of the main model (step 3).

    Greedy: draft j is accepted while it equals the main model's argmax. Sampling: draft y is
    accepted with probability min(1, p(y) / q(y)); at the first rejection the token is drawn from
    max(p - q, 0) renormalised, after d acceptances from p: the committed tokens are distributed
    exactly as the main model's own samples. Finished rows keep their tokens and counters;
    what their caches then receive is never read into their output.

    Args:
      s: the state after ``verify``.
      drafts: from ``draft``.
      logits: fp32 [B, d + 1, V] from ``verify``.
      hidden: [B, d + 1, D] from ``verify``.
      sampling: how tokens are picked.
      max_new: tokens to generate per row.
      eos: the tokens that finish a row (any of them), or None.
      stream: optional host callback ``stream(tokens [d + 1], count, start index)``, row 0.

    Returns:
      The state after the step.
    """
    b, width = drafts.tokens.shape
    d = width - 1
    j = jnp.arange(width)[None]  # [1, d + 1]
    y = drafts.tokens[:, 1:]  # [B, d]
    key = s.key
    if sampling.greedy:
        z = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, d + 1]
        n_acc = _leading_true(y == z[:, :d])  # [B]
        new = z  # the accepted drafts equal z, so z[:, :n_acc + 1] are the committed tokens
    else:
        p = probs(logits, sampling)  # [B, d + 1, V]
        key, sub = jax.random.split(key)
        keys = jax.random.split(sub, 2)
        if d:
            q = drafts.probs  # [B, d, V]
            p_y = jnp.take_along_axis(p[:, :d], y[..., None], -1)[..., 0]  # [B, d]
            q_y = jnp.take_along_axis(q, y[..., None], -1)[..., 0]
            ok = jax.random.uniform(keys[0], (b, d)) * q_y < p_y  # probability min(1, p / q)
            n_acc = _leading_true(ok)  # [B]
            residual = jnp.concatenate([jnp.maximum(p[:, :d] - q, 0.0), p[:, d:]], axis=1)
            dist = jnp.take_along_axis(residual, n_acc[:, None, None], axis=1)[:, 0]  # [B, V]
        else:
            n_acc = jnp.zeros((b,), jnp.int32)
            dist = p[:, 0]
        final = jax.random.categorical(keys[1], jnp.log(dist)).astype(jnp.int32)  # [B]
        y_pad = jnp.concatenate([y, final[:, None]], axis=1)  # [B, d + 1]
        new = jnp.where(j < n_acc[:, None], y_pad, final[:, None])
    active = ~s.done & (s.n_new < max_new)  # [B]
    committed = jnp.where(active, n_acc + 1, 0)  # [B]
    # Tokens past base + 1 + n_acc are scratch: the next step overwrites them.
    tokens = _write(s.tokens, s.base + 1, new)  # [B, S]
    logprobs = s.logprobs
    if logprobs is not None:  # the main model's, from the verify logits: exact under drafting
        logprobs = _write(logprobs, s.base + 1, token_logprobs(logits, new, sampling))
    if stream is not None:
        count = jnp.minimum(committed[0], max_new - s.n_new[0])
        jax.debug.callback(stream, new[0], count, s.n_new[0])
    done = s.done
    if eos:
        hit = jnp.isin(new, jnp.asarray(eos)) & (j <= n_acc[:, None])  # [B, d + 1]
        done = done | (active & jnp.any(hit, axis=-1))
    hid = s.hidden
    if d:
        # Next step's MTP window ends at the new base - 1 = base + n_acc: rows n_acc + 1 ..
        # n_acc + d + 1 of [this window, verified hidden states at base .. base + d].
        both = jnp.concatenate([s.hidden, hidden.astype(s.hidden.dtype)], axis=1)  # [B, 2d+2, D]
        hid = jnp.where(active[:, None, None], _read(both, n_acc + 1, d + 1), s.hidden)
    accepted = s.accepted
    if d:
        took = (jnp.arange(d)[None] < n_acc[:, None]) & active[:, None]  # [B, d]
        accepted = accepted + jnp.sum(took, axis=0).astype(jnp.int32)
    return s.replace(
        tokens=tokens,
        base=s.base + committed,
        hidden=hid,
        n_new=s.n_new + committed,
        done=done,
        key=key,
        steps=s.steps + 1,
        committed=s.committed + jnp.sum(committed),
        accepted=accepted,
        active_steps=s.active_steps + jnp.sum(active).astype(jnp.int32),
        logprobs=logprobs,
    )


# The model goes in as a pytree (an NNX module is one): flattening it costs a fraction of what
# ``nnx.split`` does, which matters next to a decoding step of a small model.
@functools.partial(
    jax.jit,
    static_argnames=("max_new", "d", "sampling", "eos", "pad", "stream", "logprobs", "routing"),
)
def _generate(
    model: MiMoV2Flash,
    ids,
    lengths,
    key,
    *,
    max_new,
    d,
    sampling,
    eos,
    pad,
    stream,
    logprobs,
    routing,
) -> DecodeState:
    kw = dict(d=d, max_new=max_new, sampling=sampling, pad=pad, eos=eos)
    s = prefill(model, ids, lengths, key, **kw, logprobs=logprobs, routing=routing)
    if stream is not None:  # row 0's tokens go to the host as soon as they are committed
        first = s.tokens[:1, lengths[0]]  # [1]
        jax.debug.callback(stream, first, jnp.ones((), jnp.int32), jnp.zeros((), jnp.int32))
    return decode_loop(model, s, d=d, sampling=sampling, max_new=max_new, eos=eos, stream=stream)


def step(
    model: MiMoV2Flash,
    s: DecodeState,
    *,
    d: int,
    sampling: Sampling,
    max_new: int,
    eos: tuple[int, ...] | None,
    stream: Callable | None = None,
) -> DecodeState:
    """One loop step: ``draft``, ``verify``, ``accept`` (arguments as there)."""
    # Named scopes label each phase's ops in profiles and compiled HLO.
    with jax.named_scope("draft"):
        s, drafts = draft(model, s, d, sampling)
    with jax.named_scope("verify"):
        s, logits, hidden = verify(model, s, drafts)
    with jax.named_scope("accept"):
        return accept(
            s, drafts, logits, hidden, sampling=sampling, max_new=max_new, eos=eos, stream=stream
        )


def decode_loop(
    model: MiMoV2Flash,
    s: DecodeState,
    *,
    d: int,
    sampling: Sampling,
    max_new: int,
    eos: tuple[int, ...] | None,
    stream: Callable | None = None,
) -> DecodeState:
    """Runs ``step`` on device until every row has ``max_new`` tokens or its EOS."""
    kw = dict(d=d, sampling=sampling, max_new=max_new, eos=eos, stream=stream)
    return jax.lax.while_loop(
        lambda s: jnp.any(~s.done & (s.n_new < max_new)), lambda s: step(model, s, **kw), s
    )


def generate(
    model: MiMoV2Flash,
    input_ids,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    num_draft_tokens: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    prompt_lengths=None,
    padding_side: str = "right",
    seed: int = 0,
    stream: Callable[[np.ndarray], None] | None = None,
    return_logprobs: bool = False,
    return_routing: bool = False,
) -> GenerateResult:
    """Generates continuations, optionally with MTP speculative decoding.

    Args:
      model: the model.
      input_ids: int [B, T] prompts, padded on ``padding_side`` when their lengths differ.
      max_new_tokens: tokens to generate per row (fewer if EOS comes first).
      temperature: 0 for greedy; otherwise sampling temperature.
      top_k: keep the k most likely tokens (0 = all).
      top_p: nucleus sampling mass (1 = all).
      num_draft_tokens: MTP draft tokens per step, 0..num_mtp_layers (0 = plain decoding).
      eos_token_id: stop a row after this token (or after any of these tokens).
      pad_token_id: filler after each row's end.
      prompt_lengths: int [B] valid prompt tokens per row (default: all T).
      padding_side: "right" or "left": where the padding of shorter prompts is.
      seed: sampling seed.
      stream: optional ``stream(new_tokens)``, called from the device loop (in order) with row
        0's newly committed tokens (int32 [n]), including any EOS and nothing past
        ``max_new_tokens``.
      return_logprobs: fill ``GenerateResult.logprobs``: each generated token's log-probability
        under the distribution it was drawn from. Sampling: the temperature-scaled softmax
        truncated to top-k / top-p and renormalised; greedy: the log-softmax of the raw logits
        (temperature 1). With drafts it is still the main model's, from the verify pass.
      return_routing: fill ``GenerateResult.routing`` (the main model's expert ids, prompt
        included), recorded in the prefill and verify passes at no extra forward pass. A row's
        final token is drawn but not fed back: its position holds -1, which a replay treats
        as "route afresh" and which no training loss reads (its label is past the row's end).

    Returns:
      GenerateResult.

    Raises:
      ValueError: for a prompt longer than the model's context, unknown token ids, a draft count
        above the number of MTP layers, or bad sampling arguments.
    """
    cfg = model.cfg
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be int [B, T] with T >= 1, got shape {ids.shape}")
    b, t = ids.shape
    lengths = np.full((b,), t) if prompt_lengths is None else np.asarray(prompt_lengths)
    if lengths.shape != (b,) or lengths.min() < 1 or lengths.max() > t:
        raise ValueError(f"prompt_lengths must be [B]={b} values in 1..{t}, got {lengths}")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if padding_side == "left":  # move each prompt to the front of its row
        ids = np.stack([np.roll(row, -(t - n)) for row, n in zip(ids, lengths, strict=True)])
    valid = np.arange(t)[None] < lengths[:, None]
    bad = ids[valid]
    if bad.size and (bad.min() < 0 or bad.max() >= cfg.vocab_size):
        raise ValueError(
            f"input_ids contain token ids outside [0, vocab_size={cfg.vocab_size}): "
            f"min {bad.min()}, max {bad.max()}"
        )
    ids = np.where(valid, ids, pad_token_id)
    if not 0 <= num_draft_tokens <= len(model.mtp):
        raise ValueError(
            f"num_draft_tokens={num_draft_tokens} must be in 0..{len(model.mtp)} "
            f"(the model has {len(model.mtp)} MTP layers)"
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if t + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(
            f"prompt length {t} + max_new_tokens {max_new_tokens} exceeds "
            f"max_position_embeddings={cfg.max_position_embeddings}"
        )
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"bad sampling args: {temperature=}, {top_k=}, {top_p=}")
    eos = None if eos_token_id is None else tuple(int(i) for i in np.ravel(eos_token_id))
    s = _generate(
        model,
        *(jnp.asarray(x, jnp.int32) for x in (ids, lengths)),
        jax.random.key(seed),
        max_new=max_new_tokens,
        d=num_draft_tokens,
        sampling=Sampling(float(temperature), int(top_k), float(top_p)),
        eos=eos,
        pad=pad_token_id,
        stream=None if stream is None else Stream(stream),
        logprobs=bool(return_logprobs),
        routing=bool(return_routing),
    )
    jax.effects_barrier()  # every streamed part is out before generate returns
    return finish(s, ids, lengths, max_new_tokens, num_draft_tokens, eos, pad_token_id)
