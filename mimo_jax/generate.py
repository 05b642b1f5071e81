"""Decoding: prefill, a device-side token loop, sampling, MTP speculative decoding.

Each loop step (``num_draft_tokens = d``), with ``base`` the position of the newest committed token:
  1. Draft: every MTP depth k runs on the 2d indices ``base - a - d .. base - a + d - 1`` (index i
     consumes token i + k + 1 and depth k - 1's hidden state at i; ``a`` is the previous step's
     accepted count), and the query at index ``base - 1`` drafts token ``base + k + 1``; depth
     k + 1 consumes that draft and depth k's hidden states.
  2. Verify: the main model runs on [newest committed token, d drafts] in one pass over its cache.
  3. Accept the longest agreeing prefix plus one token from the main model (greedy: equality;
     sampling: rejection sampling, so the output distribution is the main model's own), then
     invalidate the cache slots of rejected tokens.
With d = 0 this is plain decoding. Everything after argument checks runs in one ``jax.jit``.

Why 2d MTP indices and not d + 1: depth k's cache entry at position P depends on every token up
to P, and a step keeps depth k's entries up to ``base + k``, i.e. ones built from this step's
drafts. When the main model rejects some of those drafts, the entries are stale; starting the
next step d - 1 indices earlier rewrites them (and, in the first step, writes the entries of
positions ``L .. L + k - 1`` that the prefill could not, token L being unknown then). Stale MTP
entries never change the output, only the drafts, so they show up as lower acceptance only. The
main model's hidden states of the last 2d indices are carried from step to step for this.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from mimo_jax.cache import max_new_per_step
from mimo_jax.model import MiMoV2Flash


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
    """

    tokens: jax.Array
    lengths: jax.Array
    mean_accepted_length: jax.Array
    acceptance_rate: jax.Array
    num_steps: jax.Array


def _probs(logits, temperature, top_k, top_p):
    """Softmax of temperature-scaled logits restricted to top-k / nucleus top-p. [..., V]."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        srt = jnp.sort(logits, axis=-1)[..., ::-1]
        cum = jnp.cumsum(jax.nn.softmax(srt, axis=-1), axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        cutoff_idx = jnp.sum(cum < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(srt, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.nn.softmax(logits, axis=-1)


def _pick(logits, key, temperature, top_k, top_p):
    """(token int32 [B], probabilities [B, V] or None for greedy)."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), None
    p = _probs(logits, temperature, top_k, top_p)
    return jax.random.categorical(key, jnp.log(p)).astype(jnp.int32), p


def _take(x, idx):
    """x [B, S, ...] at per-row indices idx [B, n] -> [B, n, ...]."""
    idx = idx.reshape(*idx.shape, *([1] * (x.ndim - 2)))
    return jnp.take_along_axis(x, idx, axis=1)


def _set(x, idx, val, keep=None):
    """x [B, S] with x[b, idx[b, j]] = val[b, j] where keep[b, j] (out of range dropped)."""
    if keep is not None:
        idx = jnp.where(keep, idx, x.shape[1])
    return x.at[jnp.arange(x.shape[0])[:, None], idx].set(val, mode="drop")


@functools.partial(
    jax.jit,
    static_argnames=(
        "graphdef",
        "max_new",
        "d",
        "temperature",
        "top_k",
        "top_p",
        "eos",
        "pad",
        "stream",
    ),
)
def _generate(
    state, graphdef, ids, lengths, key, *, max_new, d, temperature, top_k, top_p, eos, pad, stream
):
    model: MiMoV2Flash = nnx.merge(graphdef, state)
    b, t = ids.shape
    width = d + 1  # tokens per verify step
    mw = 2 * d  # MTP indices per step (see the module docstring)
    # Room for the furthest position a step can touch: MTP depth d - 1 reads up to 2d ahead.
    max_len = t + max_new + 2 * width
    cache = model.init_cache(b, max_len, max_new_per_step(d))
    rows = jnp.arange(b)

    # Prefill: main model over the prompt, then every MTP depth over it (depth k's entry i sits
    # at position i + k + 1 and needs token i + k + 1 < length).
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    h, _, dec = model.decoder(model.embed_tokens(ids), pos, None, cache, lengths)
    hidden = model.norm(h)  # [B, T, D]
    mtp_cache = list(cache["mtp"][:d])
    h_prev = hidden
    for k in range(d):
        emb = model.embed_tokens(jnp.roll(ids, -(k + 1), axis=1))
        h_prev, mtp_cache[k] = model.mtp[k](
            emb, h_prev, pos + k + 1, mtp_cache[k], lengths - (k + 1), offset=k + 1
        )
    last_hidden = hidden[rows, lengths - 1]  # [B, D]
    key, sub = jax.random.split(key)
    first, _ = _pick(model.lm_head(last_hidden), sub, temperature, top_k, top_p)
    tokens = jnp.full((b, max_len), pad, jnp.int32).at[:, :t].set(ids)
    tokens = tokens.at[rows, lengths].set(first)
    if stream is not None:  # row 0's tokens go to the host as soon as they are committed
        jax.debug.callback(stream, first[:1], jnp.ones((), jnp.int32), ordered=True)

    # Loop state: the last verify started at p0 and accepted a drafts; hid holds the main
    # model's hidden states at indices p0 - d + 1 .. p0 + d (valid up to p0 + a), the inputs of
    # MTP depth 0. The prefill stands in for a verify at p0 = length - 1 with a = 0.
    p0 = lengths - 1
    hid_idx = p0[:, None] - d + 1 + jnp.arange(max(mw, 1))[None]  # [B, 2d]
    hid = jnp.where(
        (hid_idx >= 0)[..., None], _take(hidden, jnp.clip(hid_idx, 0, t - 1)), 0
    ).astype(hidden.dtype)  # [B, 2d, D]; entries past p0 only feed discarded MTP queries
    loop = dict(
        tokens=tokens,
        dec=dec,
        mtp=mtp_cache,
        p0=p0,
        hid=hid,
        a=jnp.zeros((b,), jnp.int32),
        n_new=jnp.ones((b,), jnp.int32),
        done=(first == eos) if eos is not None else jnp.zeros((b,), bool),
        key=key,
        steps=jnp.zeros((), jnp.int32),
        committed=jnp.zeros((), jnp.int32),
        accepted=jnp.zeros((max(d, 1),), jnp.int32),
        active_steps=jnp.zeros((), jnp.int32),
    )
    offs = jnp.arange(width, dtype=jnp.int32)[None]  # [1, d + 1]
    m_offs = jnp.arange(mw, dtype=jnp.int32)[None]  # [1, 2d]

    def cond(s):
        return jnp.any(~s["done"] & (s["n_new"] < max_new))

    def body(s):
        tokens, key = s["tokens"], s["key"]
        active = ~s["done"] & (s["n_new"] < max_new)  # [B]
        base = s["p0"] + s["a"] + 1  # position of the newest committed token
        mtp_cache, draft_probs = list(s["mtp"]), []
        h_in = s["hid"]
        idx = s["p0"][:, None] - d + 1 + m_offs  # [B, 2d] MTP indices; base - 1 is at d - 1 + a
        for k in range(d):
            pos_k = idx + k + 1  # positions of the consumed tokens (and of the cache entries)
            emb = model.embed_tokens(_take(tokens, jnp.maximum(pos_k, 0)))
            # Indices before the sequence start (short prompts) neither write nor see keys.
            h_k, c = model.mtp[k](emb, h_in, jnp.where(idx >= 0, pos_k, -1), mtp_cache[k])
            mtp_cache[k] = c.truncate(base + k + 1)  # positions past the newest draft input
            key, sub = jax.random.split(key)
            h_draft = h_k[rows, d - 1 + s["a"]]  # index base - 1 -> token base + k + 1
            y, q = _pick(model.lm_head(h_draft), sub, temperature, top_k, top_p)
            tokens = _set(tokens, (base + 1 + k)[:, None], y[:, None])
            draft_probs.append(q)
            h_in = h_k

        pos_v = base[:, None] + offs  # [B, d + 1]
        h, _, dec = model.decoder(model.embed_tokens(_take(tokens, pos_v)), pos_v, None, s["dec"])
        hv = model.norm(h)  # [B, d + 1, D] main hidden states at base .. base + d
        logits = model.lm_head(hv)  # [B, d + 1, V]
        drafts = _take(tokens, pos_v[:, 1:])  # [B, d]
        key, sub = jax.random.split(key)
        if temperature == 0:
            z = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, d + 1]
            ok = drafts == z[:, :d]
            new_a = jnp.sum(jnp.cumprod(ok, axis=-1), axis=-1).astype(jnp.int32)
            final = z[rows, new_a]
        else:
            p = _probs(logits, temperature, top_k, top_p)  # [B, d + 1, V]
            keys = jax.random.split(sub, 2)
            if d:
                q = jnp.stack(draft_probs, axis=1)  # [B, d, V]
                p_y = jnp.take_along_axis(p[:, :d], drafts[..., None], -1)[..., 0]
                q_y = jnp.take_along_axis(q, drafts[..., None], -1)[..., 0]
                u = jax.random.uniform(keys[0], (b, d))
                ok = u * q_y < p_y  # accept with probability min(1, p / q)
                new_a = jnp.sum(jnp.cumprod(ok, axis=-1), axis=-1).astype(jnp.int32)
                # Rejected at j: resample from max(p - q, 0); all accepted: sample p_d.
                residual = jnp.maximum(p[:, :d] - q, 0.0)
                residual = jnp.concatenate([residual, p[:, d:]], axis=1)  # [B, d + 1, V]
                dist = residual[rows, new_a]
            else:
                new_a = jnp.zeros((b,), jnp.int32)
                dist = p[:, 0]
            final = jax.random.categorical(keys[1], jnp.log(dist)).astype(jnp.int32)
        tokens = _set(tokens, (base + 1 + new_a)[:, None], final[:, None])
        # A finished row keeps its state: its writes land past its length and are invalidated.
        new_a = jnp.where(active, new_a, s["a"])
        p0 = jnp.where(active, base, s["p0"])
        if d:
            # Next step's indices base - d + 1 .. base + d: the d - 1 before base come from the
            # old buffer (old index p0 - d + 1 + j sits at j), the rest from this verify.
            m = m_offs[0]
            src = jnp.where(m < d - 1, s["a"][:, None] + 1 + m[None], mw + m[None] - (d - 1))
            hid = _take(jnp.concatenate([s["hid"], hv], axis=1), src)  # [B, 2d, D]
            hid = jnp.where(active[:, None, None], hid, s["hid"])
        else:
            hid = s["hid"]
        keep_len = p0 + new_a + 1  # main cache holds positions < keep_len
        dec = _truncate_all(dec, keep_len)
        committed = jnp.where(active, new_a + 1, 0)
        if stream is not None:
            count = jnp.minimum(committed[0], max_new - s["n_new"][0])
            new_tokens = _take(tokens, base[:, None] + 1 + offs)[0]  # [d + 1]
            jax.debug.callback(stream, new_tokens, count, ordered=True)
        n_new = s["n_new"] + committed
        done = s["done"]
        if eos is not None:
            new_pos = base[:, None] + 1 + offs  # positions committed this step (masked below)
            is_new = offs <= new_a[:, None]
            done = done | jnp.any((_take(tokens, new_pos) == eos) & is_new & active[:, None], -1)
        n_act = jnp.sum(active)
        acc = s["accepted"]
        if d:
            acc = acc + jnp.sum(
                (jnp.arange(d)[None] < new_a[:, None]) & active[:, None], axis=0
            ).astype(jnp.int32)
        return dict(
            tokens=tokens,
            dec=dec,
            mtp=mtp_cache,
            p0=p0,
            hid=hid,
            a=new_a,
            n_new=n_new,
            done=done,
            key=key,
            steps=s["steps"] + 1,
            committed=s["committed"] + jnp.sum(committed),
            accepted=acc,
            active_steps=s["active_steps"] + n_act,
        )

    s = jax.lax.while_loop(cond, body, loop)
    return s


class _Stream:
    """Host side of ``stream``: slices the fixed-size device buffer to its valid part.

    Hashable by identity so it can be a static argument of the jitted loop.
    """

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, tokens, count):
        n = int(count)
        if n > 0:
            self.fn(np.asarray(tokens)[:n])


def _truncate_all(dec, keep_len):
    """Invalidates slots at positions >= keep_len [B] in every decoder cache (stacked too)."""
    layers = [c.truncate(keep_len) for c in dec["layers"]]
    scanned = [
        c.replace(pos=jnp.where(c.pos >= keep_len[None, :, None], -1, c.pos))
        for c in dec["scanned"]
    ]
    return {"layers": layers, "scanned": scanned}


def generate(
    model: MiMoV2Flash,
    input_ids,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    num_draft_tokens: int = 0,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    prompt_lengths=None,
    padding_side: str = "right",
    seed: int = 0,
    stream: Callable[[np.ndarray], None] | None = None,
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
      eos_token_id: stop a row after this token.
      pad_token_id: filler after each row's end.
      prompt_lengths: int [B] valid prompt tokens per row (default: all T).
      padding_side: "right" or "left": where the padding of shorter prompts is.
      seed: sampling seed.
      stream: optional ``stream(new_tokens)``, called from the device loop (in order) with row
        0's newly committed tokens (int32 [n]), including any EOS and nothing past
        ``max_new_tokens``.

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
        raise ValueError(
            f"bad sampling args: temperature={temperature}, top_k={top_k}, top_p={top_p}"
        )
    graphdef, state = nnx.split(model)
    s = _generate(
        state,
        graphdef,
        jnp.asarray(ids, jnp.int32),
        jnp.asarray(lengths, jnp.int32),
        jax.random.key(seed),
        max_new=max_new_tokens,
        d=num_draft_tokens,
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
        eos=eos_token_id,
        pad=pad_token_id,
        stream=None if stream is None else _Stream(stream),
    )
    return _finish(s, ids, lengths, max_new_tokens, num_draft_tokens, eos_token_id, pad_token_id)


def _finish(s, ids, lengths, max_new, d, eos, pad) -> GenerateResult:
    """Crops each row to its prompt + generated tokens (through EOS) and computes statistics."""
    b, t = ids.shape
    buf = np.asarray(s["tokens"])
    n_new = np.minimum(np.asarray(s["n_new"]), max_new)
    out = np.full((b, t + max_new), pad, np.int32)
    out_len = np.zeros((b,), np.int32)
    for r in range(b):
        new = buf[r, lengths[r] : lengths[r] + n_new[r]]
        if eos is not None and (hit := np.nonzero(new == eos)[0]).size:
            new = new[: hit[0] + 1]
        row = np.concatenate([ids[r, : lengths[r]], new])
        out[r, : len(row)] = row
        out_len[r] = len(row)
    active = max(int(s["active_steps"]), 1)
    return GenerateResult(
        tokens=jnp.asarray(out),
        lengths=jnp.asarray(out_len),
        mean_accepted_length=jnp.asarray(float(s["committed"]) / active),
        acceptance_rate=jnp.asarray(np.asarray(s["accepted"])[:d] / active),
        num_steps=s["steps"],
    )
