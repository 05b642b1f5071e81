"""Rollouts: the policy at the inference engine's precision, sampled responses, held-out success.

An RL step samples with ``generate`` from a copy of the policy cast to ``rollout_dtype`` (bf16
rollouts of an fp32 policy, as inference engines serve it) and keeps, per token, what the
training side needs: the response mask, the rollout's log-probabilities (for the
training-inference importance weights) and the experts the rollout used (for routing replay).
Prompts are byte strings of a ``tasks.Task``; every row of a batch has the same shape, so
``generate`` compiles once per run.
"""

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mimo_jax.data import ByteTokenizer, Tokenizer
from mimo_jax.generate import generate
from mimo_jax.model import MiMoV2Flash
from mimo_jax.post_training import tasks

ROLLOUT_DTYPES = ("policy", "float32", "bfloat16")
# The longest prompt of the tasks' rollouts: their prompts are under 32 bytes (``tasks``), so
# under 32 tokens for any tokenizer.
PROMPT_LEN = 32
# A batch's prompts are padded to a multiple of this: a few compiled shapes per run, not one per
# longest prompt, and little padding for short prompts.
_PAD_MULTIPLE = 16


def rollout_model(policy: MiMoV2Flash, dtype: str) -> MiMoV2Flash:
    """The policy as the rollout engine runs it: weights and activations in ``dtype``.

    Args:
      policy: the trained model (left unchanged).
      dtype: "policy" (the policy itself, no copy), "float32" or "bfloat16". Floating
        parameters are cast; the router's expert bias stays float32 as in the policy.

    Returns:
      A model of the same architecture with ``dtype`` compute and parameters.
    """
    if dtype not in ROLLOUT_DTYPES:
        raise ValueError(f"config.rl.rollout_dtype={dtype!r} must be one of {ROLLOUT_DTYPES}")
    if dtype == "policy":
        return policy
    cfg = dataclasses.replace(policy.cfg, dtype=dtype, param_dtype=dtype)
    model = nnx.eval_shape(lambda: MiMoV2Flash(cfg, rngs=nnx.Rngs(0)))
    sync_rollout_model(model, policy)
    return model


def sync_rollout_model(model: MiMoV2Flash, policy: MiMoV2Flash) -> None:
    """Copies the policy's current weights into ``model`` (from ``rollout_model``), cast."""
    if model is policy:
        return
    params = nnx.state(policy, nnx.Param)
    dtype = jnp.dtype(model.cfg.param_dtype)
    nnx.update(model, jax.tree.map(lambda x: x.astype(dtype), params))
    nnx.update(model, nnx.state(policy, nnx.Not(nnx.Param)))


@dataclasses.dataclass(frozen=True)
class Rollouts:
    """Sampled responses of a batch of prompts, with what the training side replays.

    Attributes:
      prompts: the B prompt strings.
      completions: the B decoded responses (through the end token when one was sampled).
      tokens: int32 [B, S] prompt, response, then padding (S = T0 + max_new_tokens, T0 the
        padded prompt width of ``encode_prompts``).
      response_mask: float32 [B, S] 1 at sampled tokens, end token included; 0 at prompt and
        padding.
      logprobs: float32 [B, S] or None: the rollout model's log-probability of each sampled
        token (0 elsewhere).
      routing: int32 [L, B, S, k] or None: the rollout model's experts at every valid position
        (-1 on dense layers and padding).
      mean_accepted_length: tokens committed per decoding step (1 without drafts).
    """

    prompts: list[str]
    completions: list[str]
    tokens: np.ndarray
    response_mask: np.ndarray
    logprobs: np.ndarray | None
    routing: np.ndarray | None
    mean_accepted_length: float


def stop_token(tokenizer: Tokenizer) -> int:
    """The token that ends a response: the task terminator's byte, or the tokenizer's EOS."""
    if isinstance(tokenizer, ByteTokenizer):
        return int(tokenizer.encode(tasks.TERMINATOR)[0])
    eos = getattr(tokenizer, "eos_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no eos_id: rollouts need a token that ends a response")
    return int(eos)


def encode_prompts(
    tokenizer: Tokenizer, prompts: Sequence[str], prompt_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded prompt ids.

    Args:
      tokenizer: the run's tokenizer.
      prompts: B prompt strings.
      prompt_len: the most tokens a prompt may have.

    Returns:
      (ids int32 [B, T0] padded with 0, lengths int32 [B]); T0 is the smallest multiple of 16
      (at most ``prompt_len``) that holds the longest prompt.
    """
    rows = [tokenizer.encode(p) for p in prompts]
    for p, row in zip(prompts, rows, strict=True):
        if not 0 < len(row) <= prompt_len:
            raise ValueError(f"prompt {p!r} is {len(row)} tokens; prompts must be 1..{prompt_len}")
    longest = max(len(r) for r in rows)
    width = min(prompt_len, -(-longest // _PAD_MULTIPLE) * _PAD_MULTIPLE)
    ids = np.zeros((len(prompts), width), np.int32)
    lengths = np.array([len(r) for r in rows], np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    return ids, lengths


def sample(
    model: MiMoV2Flash,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    *,
    prompt_len: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    top_k: int = 0,
    num_draft_tokens: int = 0,
    record: bool = True,
) -> Rollouts:
    """Samples one response per prompt (repeat a prompt G times for a group).

    Args:
      model: the rollout model.
      tokenizer: the run's tokenizer.
      prompts: B prompt strings.
      prompt_len: the most tokens a prompt may have (see ``encode_prompts``).
      max_new_tokens: response tokens at most; a response ends at ``stop_token``.
      temperature: sampling temperature (0: greedy).
      seed: the sampling seed.
      top_k: top-k filter (0: off); the recorded log-probabilities are of the truncated
        distribution the tokens were drawn from.
      num_draft_tokens: MTP drafts per step (exact: the main model's tokens and log-probs).
      record: record log-probabilities and routing (``Rollouts.logprobs`` / ``.routing``).

    Returns:
      Rollouts.
    """
    ids, lengths = encode_prompts(tokenizer, prompts, prompt_len)
    stop = stop_token(tokenizer)
    res = generate(
        model, ids, prompt_lengths=lengths, max_new_tokens=max_new_tokens,
        temperature=temperature, top_k=top_k, seed=seed, num_draft_tokens=num_draft_tokens,
        eos_token_id=stop, return_logprobs=record, return_routing=record,
    )  # fmt: skip
    tokens = np.asarray(res.tokens)  # [B, S]
    ends = np.asarray(res.lengths)
    pos = np.arange(tokens.shape[1])[None]
    mask = ((pos >= lengths[:, None]) & (pos < ends[:, None])).astype(np.float32)
    completions = [
        tokenizer.decode(row[n:e]) for row, n, e in zip(tokens, lengths, ends, strict=True)
    ]
    return Rollouts(
        prompts=list(prompts),
        completions=completions,
        tokens=tokens,
        response_mask=mask,
        logprobs=None if res.logprobs is None else np.asarray(res.logprobs, np.float32),
        routing=None if res.routing is None else np.asarray(res.routing),
        mean_accepted_length=float(res.mean_accepted_length),
    )


def heldout_success(
    model: MiMoV2Flash,
    task: tasks.Task,
    tokenizer: Tokenizer,
    *,
    num_prompts: int,
    prompt_len: int,
    batch_size: int = 200,
) -> float:
    """Greedy success rate on the task's first ``num_prompts`` held-out prompts.

    Args:
      model: the model to score.
      task: the task (its verifier scores the completions).
      tokenizer: the run's tokenizer.
      num_prompts: held-out prompts (always the same ones: ``task.heldout_prompts``).
      prompt_len: the most tokens a prompt may have (see ``encode_prompts``).
      batch_size: prompts per ``generate`` call; the last batch is padded to this size with
        repeats so the call compiles once.

    Returns:
      The share of prompts whose greedy completion the verifier scores 1.0.
    """
    prompts = task.heldout_prompts(num_prompts)
    max_new = task.max_response_bytes
    done: dict[str, list[str]] = {}
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        padded = chunk + [chunk[-1]] * (min(batch_size, len(prompts)) - len(chunk))
        out = sample(
            model, tokenizer, padded, prompt_len=prompt_len, max_new_tokens=max_new,
            temperature=0.0, seed=0, record=False,
        )  # fmt: skip
        for p, c in zip(chunk, out.completions[: len(chunk)], strict=True):
            done[p] = [c]
    return tasks.success_rate(task, done)


def heldout_metrics(
    model: MiMoV2Flash, mixture: tasks.Mixture, tokenizer: Tokenizer, *, num_prompts: int
) -> dict[str, float]:
    """Greedy held-out success of every domain with a verifier (``heldout_success``).

    Args:
      model: the model to score.
      mixture: the run's domains; those without a verifier are skipped.
      tokenizer: the run's tokenizer.
      num_prompts: held-out prompts per domain.

    Returns:
      ``heldout_success`` (the mean over the scored domains) and, for a mixture of several
      domains, ``heldout_success_<domain>`` of each; empty when no domain has a verifier.
    """
    scores = {
        d: heldout_success(
            model, mixture.task(d), tokenizer, num_prompts=num_prompts, prompt_len=PROMPT_LEN
        )
        for d in mixture.domains
        if mixture.task(d).verifiable
    }
    if not scores:
        return {}
    out = {"heldout_success": float(np.mean(list(scores.values())))}
    if len(mixture.domains) > 1:
        out.update({f"heldout_success_{d}": v for d, v in scores.items()})
    return out
