"""Multi-turn agent rollouts: model turns and tool results in one growing context per episode.

A batch of B episodes runs turn by turn. Each row keeps one context in a ``generate.DecodeState``
(token buffer, KV caches, log-probs, routing): a model turn is ``generate.decode_loop`` until the
stop token (or ``max_turn_tokens``); the host decodes it, steps the row's environment, and the
observation is *appended* to the same caches (``_append``: chunked ``model.extend`` from the
row's newest token on). Nothing is re-prefilled, so the routing recorded for earlier turns is the
routing of that very forward, and R3 replays one consistent record per episode.

Per position the rollout records the training layout of ``rl_step``: model tokens have mask 1 and
the rollout's log-prob; prompt and tool tokens mask 0 and log-prob 0 (context, never trained on);
routing at every position the model ran (-1 at the episode's last token, sampled but never fed).

Context management (``compact_fraction``): when a row's context would pass that fraction of
``max_context`` tokens, its observation is followed by the environment's summary request; the
model's next turn is the summary; the full history is archived to a file in the sandbox
(``env.archive``), the row's segment so far is closed (a training row of its own), and the row
restarts from its first observation plus the summary, in the same batch: its caches are emptied
(``KVCache.truncate`` to 0) and the new context appended from position 0.
"""

import concurrent.futures
import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax.data import Tokenizer
from mimo_jax.generate import DecodeState, decode_loop
from mimo_jax.model import MiMoV2Flash
from mimo_jax.post_training.rollout import stop_token
from mimo_jax.sampling import Sampling, pick, token_logprobs

COMPACTED = "[Earlier context archived to {path}; summary follows.]\n"


@dataclasses.dataclass
class Segment:
    """One training row of an episode: a context from its start to a compaction or the end.

    Attributes:
      tokens: int32 [S] the context, then padding (0).
      mask: float32 [S] 1 at model tokens (stop tokens included).
      logprobs: float32 [S] the rollout's log-prob of each model token (0 elsewhere).
      routing: int32 [L, S, k] or None: experts at each position the model ran (-1 elsewhere).
      length: valid tokens (the rest of ``tokens`` is padding).
      text: the context as text (model turns and observations).
    """

    tokens: np.ndarray
    mask: np.ndarray
    logprobs: np.ndarray
    routing: np.ndarray | None
    length: int
    text: str


@dataclasses.dataclass
class Episode:
    """One episode: its segments (more than one after context compactions) and its outcome.

    Attributes:
      segments: training rows, in order.
      reward: the environment's final reward (0 when the episode was cut).
      turns: model turns taken.
      info: the environment's last ``info``, plus ``cut`` ("max_turns" / "token_budget") when
        the rollout ended the episode.
      transcript: [(role, text)] with role "prompt", "model", "tool" or "summary_request", every
        turn of every segment in order.
    """

    segments: list[Segment]
    reward: float
    turns: int
    info: dict
    transcript: list[tuple[str, str]]


def _reset_rows(s: DecodeState, rows: jax.Array) -> DecodeState:
    """Empties the caches, tokens, log-probs and routing of ``rows`` (bool [B])."""
    big = jnp.iinfo(jnp.int32).max
    keep = jnp.where(rows, 0, big)  # [B] positions kept per row

    def cut(c):
        return c.truncate(keep) if hasattr(c, "truncate") else c

    cache = jax.tree.map(cut, s.cache, is_leaf=lambda c: hasattr(c, "truncate"))
    routing = s.routing
    if routing is not None:
        routing = jnp.where(rows[None, :, None, None], -1, routing)
    return s.replace(
        cache=cache,
        tokens=jnp.where(rows[:, None], 0, s.tokens),
        logprobs=jnp.where(rows[:, None], 0.0, s.logprobs),
        routing=routing,
    )


@functools.partial(jax.jit, static_argnames=("chunk", "sampling", "eos"))
def _append(
    model: MiMoV2Flash,
    s: DecodeState,
    feed: jax.Array,
    start: jax.Array,
    length: jax.Array,
    reset: jax.Array,
    *,
    chunk: int,
    sampling: Sampling,
    eos: tuple[int, ...],
) -> DecodeState:
    """Runs each row's ``feed`` through the model at ``start ..`` and samples the next token.

    Args:
      model: the rollout model.
      s: the state; a row's cache holds its context before ``start``.
      feed: int32 [B, F] tokens per row (F a multiple of ``chunk``), valid up to ``length``.
      start: int32 [B] position of ``feed[:, 0]``.
      length: int32 [B] valid feed tokens; 0 leaves the row as it is, and done.
      reset: bool [B] empty the row first (a new segment from position 0).
      chunk: tokens per ``model.extend`` call: at most the ring caches' spare slots.
      sampling: how the next token is picked.
      eos: the tokens that end a turn.

    Returns:
      The state with ``base`` at the newly sampled token (``start + length``), one token
      generated in the turn.
    """
    s = _reset_rows(s, reset)
    b, width = s.tokens.shape
    rows = jnp.arange(b)
    n_chunks = (jnp.max(length) + chunk - 1) // chunk

    def body(c, carry):
        cache, routing, last = carry
        j = c * chunk + jnp.arange(chunk)  # [C] feed indices
        ids = jax.lax.dynamic_slice_in_dim(feed, c * chunk, chunk, axis=1)  # [B, C]
        valid = j[None] < length[:, None]  # [B, C]
        pos = jnp.where(valid, start[:, None] + j[None], -1)  # [B, C]
        hidden, cache, route = model.extend(ids, pos, cache)  # [B, C, D], [L, B, C, k]
        if routing is not None:
            at = jnp.where(valid, pos, width)  # out of range: dropped
            routing = routing.at[:, rows[:, None], at].set(route, mode="drop")
        is_last = j[None] == length[:, None] - 1  # [B, C]
        pick_last = jnp.sum(jnp.where(is_last[..., None], hidden, 0), axis=1)  # [B, D]
        last = jnp.where(jnp.any(is_last, axis=1)[:, None], pick_last.astype(last.dtype), last)
        return cache, routing, last

    last0 = jnp.zeros((b, s.hidden.shape[-1]), s.hidden.dtype)
    cache, routing, last = jax.lax.fori_loop(0, n_chunks, body, (s.cache, s.routing, last0))
    idx = start[:, None] + jnp.arange(feed.shape[1])[None]  # [B, F]
    at = jnp.where(jnp.arange(feed.shape[1])[None] < length[:, None], idx, width)
    tokens = s.tokens.at[rows[:, None], at].set(feed, mode="drop")
    key, sub = jax.random.split(s.key)
    logits = model.logits(last)  # [B, V]
    first, _ = pick(logits, sub, sampling)  # [B]
    active = length > 0
    base = jnp.where(active, start + length, s.base)
    tokens = tokens.at[rows, jnp.where(active, base, width)].set(first, mode="drop")
    logprobs = s.logprobs.at[rows, jnp.where(active, base, width)].set(
        token_logprobs(logits, first, sampling), mode="drop"
    )
    return s.replace(
        tokens=tokens,
        cache=cache,
        routing=routing,
        logprobs=logprobs,
        base=base,
        n_new=jnp.ones_like(s.n_new),
        done=~active | jnp.isin(first, jnp.asarray(eos)),
        key=key,
    )


@functools.partial(jax.jit, static_argnames=("sampling", "max_new", "eos"))
def _turn(model: MiMoV2Flash, s: DecodeState, *, sampling, max_new, eos) -> DecodeState:
    return decode_loop(model, s, d=0, sampling=sampling, max_new=max_new, eos=eos)


def _initial_state(model: MiMoV2Flash, b: int, size: int, chunk: int, seed: int, routing: bool):
    cfg = model.cfg
    cache = model.init_cache(b, size, chunk)
    return DecodeState(
        tokens=jnp.zeros((b, size), jnp.int32),
        cache=cache,
        base=jnp.zeros((b,), jnp.int32),
        hidden=jnp.zeros((b, 1, cfg.embed_dim), jnp.dtype(cfg.dtype)),  # unread at d = 0
        n_new=jnp.zeros((b,), jnp.int32),
        done=jnp.ones((b,), bool),
        key=jax.random.key(seed),
        steps=jnp.zeros((), jnp.int32),
        committed=jnp.zeros((), jnp.int32),
        accepted=jnp.zeros((1,), jnp.int32),
        active_steps=jnp.zeros((), jnp.int32),
        logprobs=jnp.zeros((b, size), jnp.float32),
        routing=(
            jnp.full((len(cfg.layer_types), b, size, cfg.num_experts_per_tok), -1, jnp.int32)
            if routing
            else None
        ),
    )


def _history(transcript: list[tuple[str, str]]) -> str:
    """The episode so far as one text (what the archive file holds)."""
    return "".join(f"[{role}]\n{text}\n" for role, text in transcript)


def run_episodes(
    model: MiMoV2Flash,
    tokenizer: Tokenizer,
    envs: Sequence,
    *,
    max_context: int,
    max_turn_tokens: int,
    temperature: float,
    seed: int,
    top_k: int = 0,
    chunk: int = 32,
    compact_fraction: float = 0.0,
    max_segments: int = 8,
    workers: int = 1,
    record: bool = True,
) -> list[Episode]:
    """Runs one episode per environment, all rows batched, until every episode ends.

    Args:
      model: the rollout model.
      tokenizer: the run's tokenizer; ``rollout.stop_token`` ends a model turn.
      envs: B environments (``agent.env.AgentEnv`` or anything with its ``reset``, ``step``,
        ``archive`` and ``summary_request``); each is reset here and left open.
      max_context: tokens a row's context may hold (the token buffer S); an episode whose next
        observation and turn would not fit is cut (reward 0, ``info["cut"] = "token_budget"``).
      max_turn_tokens: tokens one model turn may have.
      temperature: sampling temperature (0: greedy).
      seed: the sampling seed.
      top_k: top-k filter (0: off); log-probs are of the truncated distribution.
      chunk: tokens per ``model.extend`` call when appending a prompt or an observation (the ring
        caches keep this many spare slots).
      compact_fraction: context management: ask for a summary and restart the row from it when
        its context would pass this fraction of ``max_context`` (0: never).
      max_segments: contexts per episode at most: an episode that would need another
        compaction is cut (``info["cut"] = "max_segments"``).
      workers: threads stepping the environments of a turn (tools run in subprocesses).
      record: record log-probs and routing (training); False for evaluation.

    Returns:
      B Episodes, in the order of ``envs``.

    Raises:
      ValueError: for bad sizes, or a first observation that leaves no room for a turn.
    """
    b = len(envs)
    if b == 0 or max_turn_tokens < 1 or chunk < 1:
        raise ValueError(f"run_episodes: need envs, max_turn_tokens >= 1, chunk >= 1; got {b}, "
                         f"{max_turn_tokens}, {chunk}")  # fmt: skip
    if not 0 <= compact_fraction < 1:
        raise ValueError(f"compact_fraction={compact_fraction} must be in [0, 1) (0: off)")
    if max_context > model.cfg.max_position_embeddings:
        limit = model.cfg.max_position_embeddings
        raise ValueError(f"max_context={max_context} exceeds max_position_embeddings={limit}")
    eos = (stop_token(tokenizer),)
    sampling = Sampling(float(temperature), int(top_k), 1.0)
    size = max_context
    width = -(-size // chunk) * chunk  # feed buffer: any feed fits
    s = _initial_state(model, b, size, chunk, seed, record)

    first = [env.reset() for env in envs]
    transcripts = [[("prompt", o)] for o in first]
    episodes: list[Episode | None] = [None] * b
    closed: list[list[Segment]] = [[] for _ in range(b)]
    mask = np.zeros((b, size), np.float32)
    turn_start = np.zeros(b, np.int64)
    turns = np.zeros(b, np.int64)
    archived = [""] * b  # per row: the archive of a pending compaction
    feeds = [np.asarray(tokenizer.encode(o), np.int32) for o in first]
    for o, f in zip(first, feeds, strict=True):
        if len(f) + max_turn_tokens + 1 > size:
            raise ValueError(f"first observation of {len(f)} tokens leaves no room for a turn of "
                             f"{max_turn_tokens} in max_context={size}: {o[:80]!r}...")  # fmt: skip
    starts = np.zeros(b, np.int64)
    resets = np.zeros(b, bool)
    ends = np.zeros(b, np.int64)

    def segment(i: int, end: int, tokens, logprobs, routing) -> Segment:
        seg = np.zeros(size, np.int32)
        seg[:end] = tokens[i, :end]
        lp = np.where(mask[i] > 0, logprobs[i], 0.0).astype(np.float32)
        route = None
        if routing is not None:
            route = np.full(routing.shape[:1] + routing.shape[2:], -1, np.int32)  # [L, S, k]
            route[:, :end] = routing[:, i, :end]
        return Segment(seg, mask[i].copy(), lp, route, end, tokenizer.decode(seg[:end]))

    def end_episode(i: int, end: int, reward: float, info: dict) -> None:
        episodes[i] = Episode([], float(reward), int(turns[i]), dict(info), transcripts[i])
        ends[i] = end  # its last segment is read off the device once, after the loop

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        while True:
            live = [i for i in range(b) if episodes[i] is None]
            feed = np.zeros((b, width), np.int32)
            length = np.zeros(b, np.int32)
            for i in live:
                feed[i, : len(feeds[i])] = feeds[i]
                length[i] = len(feeds[i])
                turn_start[i] = starts[i] + len(feeds[i])
            s = _append(
                model, s, jnp.asarray(feed), jnp.asarray(starts, jnp.int32), jnp.asarray(length),
                jnp.asarray(resets), chunk=chunk, sampling=sampling, eos=eos,
            )  # fmt: skip
            s = _turn(model, s, sampling=sampling, max_new=max_turn_tokens, eos=eos)
            tokens, base = np.asarray(s.tokens), np.asarray(s.base)
            pending: dict[int, str] = {}  # rows whose segment closes here: the restart prompt
            feeds = [np.zeros(0, np.int32)] * b
            starts, resets = np.zeros(b, np.int64), np.zeros(b, bool)
            acting: list[tuple[int, str]] = []  # (row, model turn) to step in its environment
            for i in live:
                end = int(base[i]) + 1
                mask[i, turn_start[i] : end] = 1.0
                ids = tokens[i, turn_start[i] : end]
                text = tokenizer.decode(ids[:-1] if ids[-1] in eos else ids)
                transcripts[i].append(("model", text))
                turns[i] += 1
                if archived[i]:  # this turn is the summary: the row restarts from it
                    pending[i] = first[i] + COMPACTED.format(path=archived[i]) + text + "\n"
                    archived[i] = ""
                else:
                    acting.append((i, text))
            steps = pool.map(lambda a: envs[a[0]].step(a[1]), acting)
            for (i, _), step in zip(acting, steps, strict=True):
                end = int(base[i]) + 1
                transcripts[i].append(("tool", step.observation))
                if step.done:
                    end_episode(i, end, step.reward, step.info)
                    continue
                obs = step.observation
                grown = end + len(tokenizer.encode(obs))
                if compact_fraction and grown > compact_fraction * size:
                    if len(closed[i]) + 1 >= max_segments:
                        end_episode(i, end, 0.0, {**step.info, "cut": "max_segments"})
                        continue
                    archived[i] = envs[i].archive(_history(transcripts[i]))
                    request = envs[i].summary_request(archived[i])
                    transcripts[i].append(("summary_request", request))
                    obs += request
                ids_obs = np.asarray(tokenizer.encode(obs), np.int32)
                if end + len(ids_obs) + max_turn_tokens + 1 > size:
                    end_episode(i, end, 0.0, {**step.info, "cut": "token_budget"})
                    continue
                # The row's newest token was sampled but not yet run: it leads the feed.
                feeds[i], starts[i] = np.concatenate([tokens[i, end - 1 : end], ids_obs]), end - 1
            if pending:  # the compacted rows' contexts are about to be emptied: read them now
                logprobs = np.asarray(s.logprobs)
                routing = None if s.routing is None else np.asarray(s.routing)
                for i in pending:
                    closed[i].append(segment(i, int(base[i]) + 1, tokens, logprobs, routing))
            for i, prompt in pending.items():
                mask[i] = 0.0
                feeds[i] = np.asarray(tokenizer.encode(prompt), np.int32)
                starts[i], resets[i] = 0, True
                transcripts[i].append(("prompt", prompt))
            if all(e is not None for e in episodes):
                break
    # A finished row is never written again below its end: one read serves every last segment.
    tokens, logprobs = np.asarray(s.tokens), np.asarray(s.logprobs)
    routing = None if s.routing is None else np.asarray(s.routing)
    for i, e in enumerate(episodes):
        e.segments = [*closed[i], segment(i, int(ends[i]), tokens, logprobs, routing)]
    return episodes
