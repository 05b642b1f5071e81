"""Decoding: cached and speculative generation against the no-cache forward, cache sizes, errors.

Every reference here is computed from ``model(ids)``, the full-sequence forward without any
cache, on a fixed padded length (causal, so trailing padding changes nothing and one compile
serves every step):

* greedy: the forward's argmax continuation, token by token;
* speculative greedy: a host-side simulation of the draft / verify / accept loop in which every
  draft is the argmax of the forward's MTP logits on the committed tokens plus earlier drafts,
  so acceptance statistics must match exactly (stale MTP cache entries would change drafts);
* sampling: the exact joint distribution of the first three new tokens, by enumeration.

Each ``generate`` configuration compiles once (~10-20 s on CPU), so models, prompts and shapes
are shared through module fixtures: one 7-layer model (window 5, so the SWA and MTP rings wrap
several times over 32 new tokens) in two weight settings, and one 2-layer model with vocab 8
for the statistics.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from numerics_testing import FP32_REL, assert_close

import mimo_jax
from mimo_jax import train
from mimo_jax.cache import KVCache
from mimo_jax.generate import (
    draft,
    generate,
    max_new_per_step,
    mtp_prefill_start,
    prefill,
)
from mimo_jax.model import cache_bytes
from mimo_jax.sampling import Sampling

WINDOW = 5
MAX_NEW = 32
LENGTHS = (9, 13, 2)  # unequal; 2 < num_draft_tokens + 1 exercises MTP indices before 0
T = max(LENGTHS)
REF_LEN = T + MAX_NEW + 8  # fixed length of the reference forward (room for 3 drafts + bonus)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids):
    out = nnx.merge(graphdef, state)(ids)
    return out.logits, out.mtp_logits


def forward(model, seqs):
    """Logits [B, REF_LEN, V] and MTP logits of the no-cache forward on right-padded seqs."""
    ids = np.zeros((len(seqs), REF_LEN), np.int32)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
    logits, mtp = _forward(*nnx.split(model), jnp.asarray(ids))
    return np.asarray(logits), [np.asarray(x) for x in mtp]


def reference_greedy(model, prompts, n):
    """The no-cache forward's greedy continuation of each prompt alone (batched only for speed:
    rows never interact)."""
    seqs = [list(p) for p in prompts]
    for _ in range(n):
        logits, _ = forward(model, seqs)
        for i, s in enumerate(seqs):
            s.append(int(np.argmax(logits[i, len(s) - 1])))
    return [s[len(p) :] for s, p in zip(seqs, prompts, strict=True)]


def reference_speculative(model, prompt, n, d):
    """Greedy draft / verify / accept on the no-cache forward, as ``generate`` specifies it.

    Returns (new tokens, verify steps, tokens committed, per-depth accepted counts).
    """
    seq = list(prompt)
    logits, _ = forward(model, [seq])
    seq.append(int(np.argmax(logits[0, len(seq) - 1])))
    n_new, steps, committed, accepted = 1, 0, 0, np.zeros(d, np.int64)
    while n_new < n:
        base = len(seq) - 1  # newest committed token
        drafts = []
        for k in range(d):
            # MTP depth k at index base - 1 consumes token base + k (committed or a draft).
            _, mtp = forward(model, [seq + drafts])
            drafts.append(int(np.argmax(mtp[k][0, base - 1])))
        logits, _ = forward(model, [seq + drafts])
        z = np.argmax(logits[0, base : base + d + 1], axis=-1)
        a = 0
        while a < d and drafts[a] == z[a]:
            a += 1
        seq += drafts[:a] + [int(z[a])]
        n_new += a + 1
        steps += 1
        committed += a + 1
        accepted[:a] += 1
    return seq[len(prompt) : len(prompt) + n], steps, committed, accepted


def _cfg(**kw):
    return mimo_jax.tiny(
        num_layers=7, num_mtp_layers=3, sliding_window=WINDOW, initializer_range=0.1, **kw
    )


@pytest.fixture(scope="module")
def model():
    return mimo_jax.MiMoV2Flash(_cfg(), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def agreeing_model(model):
    """Same architecture, weights set so that the MTP layers mostly agree with the main model.

    Every decoder layer's residual branches (attention and FFN outputs) are zeroed, so the main
    model is a bigram model: logits = lm_head(norm(embed(token))). Each MTP layer's ``eh_proj``
    passes the embedding half through and drops the hidden half, and its FFN output is zeroed,
    so it predicts that same bigram from the token it consumes, plus its attention output (kept,
    random), which depends on the MTP cache and makes about a quarter of the drafts disagree.
    Same graph as ``model``, so compiled ``generate`` calls are shared.
    """
    m = nnx.clone(model)
    d = m.cfg.embed_dim

    def edit(path, x):
        names = [str(getattr(p, "key", getattr(p, "idx", p))) for p in path]
        if names[0] == "mtp":
            if names[2] == "eh_proj":
                return jnp.concatenate([jnp.eye(d), jnp.zeros((d, d))]).astype(x.dtype)
            return jnp.zeros_like(x) if names[-2] == "down_proj" else x
        if names[0] in ("layers", "scanned") and names[-2:] in (
            ["o_proj", "kernel"],
            ["down_proj", "kernel"],
            ["mlp", "wo"],
        ):
            return jnp.zeros_like(x)
        return x

    state = nnx.state(m, nnx.Param)
    pure = jax.tree_util.tree_map_with_path(edit, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(m, state)
    return m


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, n).tolist() for n in LENGTHS]


def batch(prompts, side="right", fill=-1):
    """[B, T] prompts padded with ``fill`` (never a valid token: padding must not be read)."""
    ids = np.full((len(prompts), T), fill, np.int64)
    for i, p in enumerate(prompts):
        if side == "right":
            ids[i, : len(p)] = p
        else:
            ids[i, T - len(p) :] = p
    return ids


def new_tokens(result, prompts):
    toks, lens = np.asarray(result.tokens), np.asarray(result.lengths)
    return [toks[i, len(p) : lens[i]].tolist() for i, p in enumerate(prompts)]


@pytest.fixture(scope="module")
def greedy_ref(model, prompts):
    return reference_greedy(model, prompts, MAX_NEW)


@pytest.fixture(scope="module")
def run(prompts):
    """generate() on the shared batch (right padding unless given), memoised per arguments."""
    cache = {}

    def go(m, side="right", **kw):
        key = (id(m), side, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = generate(
                m,
                batch(prompts, side, fill=-1 if side == "right" else 3),
                max_new_tokens=MAX_NEW,
                prompt_lengths=LENGTHS,
                padding_side=side,
                **kw,
            )
        return cache[key]

    return go


def test_ring_buffers_wrap(model):
    cache = model.init_cache(1, T + MAX_NEW, max_new_per_step(3))
    ring = cache["mtp"][0].size
    assert ring == cache["layers"][2].size == WINDOW + max_new_per_step(3)
    assert 3 * ring < T + MAX_NEW  # positions wrap around the rings more than 3 times
    assert cache["layers"][0].size == T + MAX_NEW  # layer 0 is global: linear cache


def test_truncate_serves_stacked_caches():
    """A stacked cache (pos [R, B, S], one per scanned repeat) is cut in every repeat."""
    one = KVCache.empty(2, 6, 1, 4, 4, jnp.float32)
    one = one.replace(pos=jnp.array([[0, 1, 2, 3, 4, 5], [6, 1, 2, 3, 4, 5]], jnp.int32))
    keep = jnp.array([3, 5])
    want = [[0, 1, 2, -1, -1, -1], [-1, 1, 2, 3, 4, -1]]
    np.testing.assert_array_equal(one.truncate(keep).pos, want)
    stacked = jax.tree.map(lambda x: jnp.stack([x, x]), one)  # [R=2, B, S, ...]
    np.testing.assert_array_equal(stacked.truncate(keep).pos, [want, want])


def test_train_sample_is_generate(model, prompts, greedy_ref):
    """train.sample (the training run's sample) decodes with generate: greedy = the forward's."""
    got = train.sample(model, np.asarray(prompts[0]), MAX_NEW, temperature=0.0, seed=0)
    assert got.dtype == np.int32 and got.tolist() == greedy_ref[0]


@pytest.mark.parametrize("side", ["right", "left"])
def test_cached_greedy_equals_forward(model, prompts, greedy_ref, run, side):
    r = run(model, side)
    np.testing.assert_array_equal(r.lengths, [n + MAX_NEW for n in LENGTHS])
    assert new_tokens(r, prompts) == greedy_ref
    toks = np.asarray(r.tokens)
    for i, p in enumerate(prompts):  # prompt first (moved left for left padding), then padding
        assert toks[i, : len(p)].tolist() == p
        assert np.all(toks[i, len(p) + MAX_NEW :] == 0)
    assert float(r.mean_accepted_length) == 1.0 and r.acceptance_rate.shape == (0,)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_speculative_greedy_equals_plain(model, prompts, greedy_ref, run, d):
    r = run(model, num_draft_tokens=d)
    assert new_tokens(r, prompts) == greedy_ref
    assert r.acceptance_rate.shape == (d,)
    assert 1.0 <= float(r.mean_accepted_length) <= d + 1


@pytest.mark.parametrize("d", [1, 2, 3])
def test_speculative_acceptance_matches_reference(agreeing_model, prompts, run, d):
    """Drafts get accepted (and rejected) often; tokens and statistics equal the simulation."""
    r = run(agreeing_model, num_draft_tokens=d)
    steps = committed = 0
    accepted = np.zeros(d)
    want = []
    for p in prompts:
        toks, s, c, a = reference_speculative(agreeing_model, p, MAX_NEW, d)
        want.append(toks)
        steps, committed, accepted = steps + s, committed + c, accepted + a
    assert new_tokens(r, prompts) == want
    assert want == reference_greedy(agreeing_model, prompts, MAX_NEW)
    np.testing.assert_allclose(r.mean_accepted_length, committed / steps, rtol=1e-6)
    np.testing.assert_allclose(r.acceptance_rate, accepted / steps, rtol=1e-6)
    print(f"d={d}: mean accepted length {committed / steps:.3f}, per depth {accepted / steps}")
    assert committed / steps > 1.4  # drafts really are accepted ...
    assert accepted[0] < steps  # ... and really are rejected


@pytest.mark.parametrize("d", [0, 3])
def test_eos_stops_rows(agreeing_model, prompts, run, d):
    full = new_tokens(run(agreeing_model, num_draft_tokens=d), prompts)
    eos = full[0][10]  # some row ends mid-way (with d = 3 possibly inside an accepted run)
    r = run(agreeing_model, num_draft_tokens=d, eos_token_id=eos, pad_token_id=255)
    toks, lens = np.asarray(r.tokens), np.asarray(r.lengths)
    for i, p in enumerate(prompts):
        want = full[i][: full[i].index(eos) + 1] if eos in full[i] else full[i]
        assert lens[i] == len(p) + len(want)
        assert toks[i, len(p) : lens[i]].tolist() == want
        assert np.all(toks[i, lens[i] :] == 255)  # nothing after EOS
    assert lens[0] == LENGTHS[0] + full[0].index(eos) + 1 < LENGTHS[0] + MAX_NEW


@pytest.mark.parametrize("d", [2, 3])
def test_mtp_prefill_of_the_prompt_end_drafts_exactly(model, d):
    """The prefill runs each MTP depth on the prompt's end only (``mtp_prefill_start``); on
    prompts longer than that, the first step's draft distributions still equal the cache-less
    forward's MTP distributions (depth k > 0 reads depth k - 1's outputs, so a window cut too
    short changes them)."""
    lengths = np.array([36, 30])  # two lengths: per-row windows
    n, start = mtp_prefill_start(jnp.asarray(lengths), 36, 0, d, WINDOW)
    assert n < 30 and np.all(np.asarray(start) == lengths - n)  # depth 0 really is cut
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 256, (2, 36)).astype(np.int32)
    sampling = Sampling(temperature=1.0)
    s = prefill(model, jnp.asarray(ids), jnp.asarray(lengths), jax.random.key(0), d=d, max_new=4,
                sampling=sampling, pad=0)  # fmt: skip
    _, drafts = draft(model, s, d, sampling)  # probs [B, d, V] at index L - 1 per depth
    for i, n in enumerate(lengths):
        seq = ids[i, :n].tolist() + np.asarray(drafts.tokens[i]).tolist()  # token L, d drafts
        _, mtp = forward(model, [seq])
        for k in range(d):
            want = jax.nn.softmax(jnp.asarray(mtp[k][0, n - 1], jnp.float32))
            assert_close(drafts.probs[i, k], want, FP32_REL, f"row {i} depth {k}")


# --- sampling: speculative and plain both draw from the main model's exact distribution ---

SAMPLES = 3000
TEMPERATURE = 0.8
TOP_K = 6  # of 8: the filtered distribution is what both must reproduce


@pytest.fixture(scope="module")
def small_vocab():
    cfg = mimo_jax.tiny(
        num_layers=2, vocab_size=8, num_mtp_layers=3, sliding_window=5, initializer_range=0.08
    )
    model = mimo_jax.MiMoV2Flash(cfg, rngs=nnx.Rngs(3))
    prompt = [1, 5, 2, 7, 3, 0]
    # Exact joint p(y1, y2, y3) from one forward over all 64 (y1, y2) continuations.
    n = len(prompt)
    ids = np.array([prompt + [a, b] for a in range(8) for b in range(8)], np.int32)
    logits = np.asarray(_forward(*nnx.split(model), jnp.asarray(ids))[0], np.float64)
    logits /= TEMPERATURE

    def probs(x):
        kth = np.sort(x, axis=-1)[..., -TOP_K][..., None]
        x = np.where(x < kth, -np.inf, x)
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p1 = probs(logits[0, n - 1])  # [8]
    p2 = probs(logits[::8, n])  # [8 (y1), 8]
    p3 = probs(logits[:, n + 1]).reshape(8, 8, 8)  # [y1, y2, 8]
    joint = p1[:, None, None] * p2[:, :, None] * p3
    return model, prompt, joint


def chi2_gof(counts, expected, name):
    """Pearson chi-squared goodness of fit; asserts below the p = 1e-4 quantile.

    Cells expected below 5 are pooled. The quantile uses the Wilson-Hilferty approximation
    (scipy is not a dependency), accurate to a few percent for these degrees of freedom.
    """
    counts, expected = counts.ravel(), expected.ravel()
    small = expected < 5
    o = np.append(counts[~small], counts[small].sum())
    e = np.append(expected[~small], expected[small].sum())
    o, e = o[e > 0], e[e > 0]
    stat = float(np.sum((o - e) ** 2 / e))
    df = len(e) - 1
    z = 3.719  # standard normal upper 1e-4 quantile
    limit = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    assert stat < limit, f"{name}: chi2 {stat:.1f} >= {limit:.1f} (df {df})"
    return stat, limit


@pytest.mark.parametrize("d", [0, 2, 3])
def test_sampling_matches_exact_distribution(small_vocab, d):
    model, prompt, joint = small_vocab
    ids = np.tile(prompt, (SAMPLES, 1))
    r = generate(
        model, ids, max_new_tokens=3, temperature=TEMPERATURE, top_k=TOP_K,
        num_draft_tokens=d, seed=d + 11,
    )  # fmt: skip
    y = np.asarray(r.tokens)[:, len(prompt) :]
    assert y.shape == (SAMPLES, 3) and np.all(np.asarray(r.lengths) == len(prompt) + 3)
    counts = np.zeros((8, 8, 8))
    np.add.at(counts, (y[:, 0], y[:, 1], y[:, 2]), 1)
    # The joint, plus each position's marginal: a per-position bias has more power there.
    results = [chi2_gof(counts, SAMPLES * joint, f"d={d} joint")]
    for axis, name in ((0, "y1"), (1, "y2"), (2, "y3")):
        others = tuple(a for a in range(3) if a != axis)
        results.append(chi2_gof(counts.sum(others), SAMPLES * joint.sum(others), f"d={d} {name}"))
    if d:  # drafts are accepted often enough for the rejection path to matter
        assert 0.2 < float(r.acceptance_rate[0]) < 0.95, r.acceptance_rate
    print(f"d={d}: chi2 (stat, limit) joint, y1, y2, y3: {np.round(results, 1).tolist()}")


# --- cache sizes of the released model at 256K context ---


def test_cache_bytes_real_config_256k():
    cfg = mimo_jax.mimo_v2_flash()
    n, slack = 262144, max_new_per_step(3)
    got = cache_bytes(cfg, batch=2, max_length=n, max_new_per_step=slack)
    kinds = ["full_attention" if t == "full_attention" else "sliding" for t in cfg.layer_types]
    n_global, n_swa, n_mtp = kinds.count("full_attention"), kinds.count("sliding"), 3
    assert (n_global, n_swa, cfg.num_mtp_layers) == (9, 39, n_mtp)
    kv_row = 192 + 128  # k head dim + v head dim
    ring = cfg.sliding_window + slack  # 129 + 4 slots
    bf16, pos = 2, 4  # bytes per k/v element, per slot position (int32)
    want_global = n_global * n * (4 * kv_row * bf16 + pos)
    want_swa = n_swa * ring * (8 * kv_row * bf16 + pos)
    want_mtp = n_mtp * ring * (8 * kv_row * bf16 + pos)
    assert got["global"] == want_global == 9 * 262144 * (4 * 320 * 2 + 4)
    assert got["swa"] == want_swa and got["mtp"] == want_mtp
    assert got["total"] == want_global + want_swa + want_mtp
    want_all_global = n * (
        (n_global * 4 + (n_swa + n_mtp) * 8) * kv_row * bf16 + (n_global + n_swa + n_mtp) * pos
    )
    assert got["all_global"] == want_all_global
    assert got["kv_only"] == got["total"] - (n_global * n + (n_swa + n_mtp) * ring) * pos
    assert got["all_global_kv_only"] == n * (9 * 4 + 42 * 8) * kv_row * bf16
    print(
        f"\nMiMo-V2-Flash cache per sequence at {n} tokens (3 drafts): "
        f"{got['total'] / 2**30:.3f} GiB (global {got['global'] / 2**30:.3f}, "
        f"SWA rings {got['swa'] / 2**20:.2f} MiB, MTP rings {got['mtp'] / 2**20:.2f} MiB) vs "
        f"{got['all_global'] / 2**30:.2f} GiB if every layer were global "
        f"({got['ratio']:.2f}x)"
    )
    assert 10 < got["ratio"] < 10.5


# --- bad input ---


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_ids=np.zeros((1, 4090), np.int32), max_new_tokens=7), "max_position"),
        (dict(input_ids=[[1, 2, 256]]), r"outside \[0, vocab_size=256\)"),
        (dict(input_ids=[[1, -2, 3]]), r"outside \[0, vocab_size=256\)"),
        (dict(num_draft_tokens=4), "num_draft_tokens=4 must be in 0..3"),
        (dict(num_draft_tokens=-1), "num_draft_tokens"),
        (dict(prompt_lengths=[3, 0]), "prompt_lengths"),
        (dict(prompt_lengths=[3, 4]), "prompt_lengths"),
        (dict(prompt_lengths=[3]), "prompt_lengths"),
        (dict(input_ids=np.zeros((2, 0), np.int32)), "T >= 1"),
        (dict(padding_side="middle"), "padding_side"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
    ],
)
def test_bad_input_raises(model, kwargs, match):
    args = dict(input_ids=[[1, 2, 3], [4, 5, 6]], max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=match):
        generate(model, **args)


def test_stream_delivers_exactly_the_generated_tokens():
    cfg = mimo_jax.tiny(num_layers=3, num_mtp_layers=2, sliding_window=5, initializer_range=0.1)
    model = mimo_jax.MiMoV2Flash(cfg, rngs=nnx.Rngs(3))
    ids = np.random.RandomState(1).randint(1, 256, (2, 7))
    got = []
    res = mimo_jax.generate(
        model, ids, max_new_tokens=13, num_draft_tokens=2, stream=lambda t: got.extend(t.tolist())
    )
    assert got == np.asarray(res.tokens[0, 7 : int(res.lengths[0])]).tolist()
    assert len(got) == 13
