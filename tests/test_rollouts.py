"""Rollout records of ``generate``: log-probabilities and routing against the training forward.

An RL step recomputes each sampled token's log-probability with ``model(tokens)`` and replays the
rollout's experts with ``model(tokens, routing=...)``. In fp32 both must agree with what
``generate`` recorded, with and without MTP drafts: the log-probabilities come from the verify
pass (the main model's), the routing from the prefill and verify passes (no extra pass: a row's
final token, not fed back, holds -1).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from numerics_testing import FP32_REL, assert_close

import mimo_jax
from mimo_jax import generate

LENGTHS = (7, 3)  # unequal: the shorter row ends in padding
T = max(LENGTHS)
MAX_NEW = 10
SAMPLINGS = {  # name: (temperature, top_k)
    "greedy": (0.0, 0),
    "t1": (1.0, 0),
    "t0.7_top5": (0.7, 5),
}


@pytest.fixture(scope="module")
def model():
    cfg = mimo_jax.tiny(
        num_layers=3, num_mtp_layers=2, sliding_window=5, initializer_range=0.1
    )  # layers: dense, then two MoE
    return mimo_jax.MiMoV2Flash(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def rollout(model):
    """generate() with both records on, memoised per (drafts, sampling)."""
    rng = np.random.default_rng(0)
    ids = np.full((len(LENGTHS), T), -1, np.int64)  # -1: padding must not be read
    for i, n in enumerate(LENGTHS):
        ids[i, :n] = rng.integers(0, 256, n)
    cache = {}

    def go(d, name, **kw):
        key = (d, name, tuple(sorted(kw.items())))
        if key not in cache:
            temperature, top_k = SAMPLINGS[name]
            cache[key] = generate(
                model, ids, max_new_tokens=MAX_NEW, prompt_lengths=LENGTHS, seed=3,
                temperature=temperature, top_k=top_k, num_draft_tokens=d, **kw,
            )  # fmt: skip
        return cache[key]

    return go


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, routing=None):
    out = nnx.merge(graphdef, state)(ids, routing=routing, mtp=False)
    return out.logits, out.aux["routing"]


def forward(model, ids, routing=None):
    logits, route = _forward(*nnx.split(model), jnp.asarray(ids), routing)
    return np.asarray(logits, np.float64), np.asarray(route)


def reference_logprobs(logits, tokens, temperature, top_k):
    """NumPy: log p(token i | tokens < i) from the forward's logits at i - 1, under the
    distribution tokens are drawn from ([B, T] with 0 at position 0)."""
    z = logits[:, :-1] / (temperature or 1.0)  # [B, T - 1, V]
    if top_k:
        kth = np.sort(z, axis=-1)[..., -top_k][..., None]
        z = np.where(z < kth, -np.inf, z)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    return np.concatenate([np.zeros_like(picked[:, :1]), picked], axis=1)


def generated(res):
    """bool [B, T + MAX_NEW]: the positions of generated tokens."""
    pos = np.arange(T + MAX_NEW)[None]
    return (pos >= np.array(LENGTHS)[:, None]) & (pos < np.asarray(res.lengths)[:, None])


@pytest.mark.parametrize("name", list(SAMPLINGS))
@pytest.mark.parametrize("d", [0, 2])
def test_logprobs_equal_training_forward(model, rollout, d, name):
    res = rollout(d, name, return_logprobs=True, return_routing=True)
    tokens, got = np.asarray(res.tokens), np.asarray(res.logprobs)
    assert got.shape == tokens.shape and got.dtype == np.float32
    gen = generated(res)
    assert gen.sum() == len(LENGTHS) * MAX_NEW  # no EOS: every row generates MAX_NEW tokens
    np.testing.assert_array_equal(got[~gen], 0.0)  # prompt and padding
    logits, _ = forward(model, tokens)
    want = reference_logprobs(logits, tokens, *SAMPLINGS[name])
    assert np.isfinite(want[gen]).all()  # every sampled token lies inside top-k
    assert_close(got[gen], want[gen], FP32_REL, f"d={d} {name} logprobs")


@pytest.mark.parametrize("name", ["greedy", "t1"])
@pytest.mark.parametrize("d", [0, 2])
def test_routing_equals_training_forward_and_replays(model, rollout, d, name):
    res = rollout(d, name, return_logprobs=True, return_routing=True)
    tokens, got = np.asarray(res.tokens), np.asarray(res.routing)
    cfg = model.cfg
    assert got.shape == (cfg.num_layers, len(LENGTHS), T + MAX_NEW, cfg.num_experts_per_tok)
    assert got.dtype == np.int32
    pos = np.arange(T + MAX_NEW)[None]
    valid = pos < np.asarray(res.lengths)[:, None]  # [B, S]
    # Recorded before each row's final token (sampled, not fed back), -1 from it on.
    recorded = pos < np.asarray(res.lengths)[:, None] - 1  # [B, S]
    dense = [i for i, m in enumerate(cfg.mlp_layer_types) if m == "dense"]
    moe = [i for i in range(cfg.num_layers) if i not in dense]
    np.testing.assert_array_equal(np.all(got[moe] >= 0, axis=(0, 3)), recorded)
    logits, want = forward(model, tokens)
    np.testing.assert_array_equal(got[:, recorded], want[:, recorded])
    np.testing.assert_array_equal(got[:, ~recorded], -1)
    assert dense and np.all(got[dense] == -1)
    replayed, route = forward(model, tokens, jnp.asarray(got))
    np.testing.assert_array_equal(route[:, valid], want[:, valid])  # -1 routes afresh
    assert_close(replayed[valid], logits[valid], FP32_REL, f"d={d} {name} replayed logits")


def test_records_are_off_by_default_and_change_no_token(rollout):
    plain = rollout(2, "t1")
    assert plain.logprobs is None and plain.routing is None
    recorded = rollout(2, "t1", return_logprobs=True, return_routing=True)
    np.testing.assert_array_equal(plain.tokens, recorded.tokens)
