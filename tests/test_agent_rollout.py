"""Multi-turn agent rollouts: masks, log-probs and routing of episodes whose later turns reuse
the KV cache and routing of earlier ones, against a fresh forward over the whole episode; and
context compaction."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from numerics_testing import FP32_REL, assert_close

import mimo_jax
from configs import agent_tiny
from mimo_jax.data import ByteTokenizer, load_tokenizer
from mimo_jax.post_training import r3
from mimo_jax.post_training.agent import rollout as agent_rollout
from mimo_jax.post_training.rollout import stop_token
from mimo_jax.sampling import Sampling, token_logprobs

# Window 6 and chunk 8: observations of 20-40 bytes span several chunks and pass the window.
CFG = mimo_jax.tiny(num_layers=4, sliding_window=6, initializer_range=0.2, moe_impl="ragged")
# Bytes ("\n" ends a turn) and the agent suite's BPE tokenizer (EOS ends a turn).
TOKENIZERS = {"bytes": ByteTokenizer(), "bpe": load_tokenizer(agent_tiny.TOKENIZER)}
TEMPERATURE = 1.0


@dataclasses.dataclass
class Step:
    observation: str
    reward: float
    done: bool
    info: dict


class ScriptedEnv:
    """Observations of several lengths; done after ``turns`` steps with reward ``turns / 10``."""

    def __init__(self, name: str, turns: int):
        self.name, self.turns, self.n, self.archives = name, turns, 0, []

    def reset(self) -> str:
        self.n = 0
        return f"task {self.name}: fix it.\n"

    def step(self, action: str) -> Step:
        self.n += 1
        obs = f"<output>\nturn {self.n} of {self.name} " + "x" * (7 * self.n) + "\n</output>\n"
        return Step(obs, self.turns / 10, self.n >= self.turns, {"steps": self.n})

    def archive(self, history: str) -> str:
        self.archives.append(history)
        return f".agent/history_{len(self.archives)}.txt"

    def summary_request(self, path: str) -> str:
        return f"Summarise; history in {path}.\n"


@pytest.fixture(scope="module")
def model():
    return mimo_jax.MiMoV2Flash(CFG, rngs=nnx.Rngs(0))


def _episodes(model, envs, tok=TOKENIZERS["bytes"], **kw):
    args = dict(max_context=256, max_turn_tokens=12, temperature=TEMPERATURE, seed=3, chunk=8)
    return agent_rollout.run_episodes(model, tok, envs, **{**args, **kw})


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_masks_logprobs_and_routing_match_a_fresh_forward(model, tokenizer):
    tok = TOKENIZERS[tokenizer]
    if tok.vocab_size != CFG.vocab_size:
        model = mimo_jax.MiMoV2Flash(dataclasses.replace(CFG, vocab_size=tok.vocab_size),
                                     rngs=nnx.Rngs(0))  # fmt: skip
    envs = [ScriptedEnv("a", 3), ScriptedEnv("bb", 1), ScriptedEnv("ccc", 4)]
    episodes = _episodes(model, envs, tok)
    assert [e.turns for e in episodes] == [3, 1, 4]
    assert [e.reward for e in episodes] == [0.3, 0.1, 0.4]
    tokens = np.stack([e.segments[0].tokens for e in episodes])  # [B, S]
    mask = np.stack([e.segments[0].mask for e in episodes])
    logp = np.stack([e.segments[0].logprobs for e in episodes])
    routing = np.stack([e.segments[0].routing for e in episodes], axis=1)  # [L, B, S, k]
    stop = stop_token(tok)
    for e, row, m in zip(episodes, tokens, mask, strict=True):
        # Model turns are exactly the masked tokens; prompt and tool text never are.
        turns = [t for role, t in e.transcript if role == "model"]
        edges = np.flatnonzero(np.diff(np.concatenate([[0], m, [0]])))  # run starts / ends
        runs = [row[a:b] for a, b in zip(edges[::2], edges[1::2], strict=True)]
        assert len(runs) == len(turns)  # one masked run per model turn
        for ids, text in zip(runs, turns, strict=True):
            assert tok.decode(ids[:-1] if ids[-1] == stop else ids) == text
        context = tok.decode(row[m == 0])
        for role, text in e.transcript[:-1]:  # the final observation ends the episode unseen
            if role in ("prompt", "tool"):
                assert text in context
        assert e.transcript[-1][1] not in context
    assert (logp[mask == 0] == 0).all() and (logp[mask > 0] < 0).all()

    # A fresh forward over the whole episode gives the recorded log-probs and routing.
    out = jax.jit(lambda m, t: m(t, mtp=False))(model, tokens[:, :-1])
    fresh = np.asarray(token_logprobs(out.logits, tokens[:, 1:], Sampling(TEMPERATURE)))
    m = mask[:, 1:] > 0
    assert_close(logp[:, 1:][m], fresh[m], FP32_REL, "recorded vs fresh log-probs")
    ends = np.array([e.segments[0].length for e in episodes])
    ran = np.arange(tokens.shape[1] - 1)[None] < (ends - 1)[:, None]  # every fed position
    moe = r3.moe_layer_mask(CFG)
    fresh_route = np.asarray(out.aux["routing"])[moe]  # [L', B, S - 1, k]
    recorded = routing[moe][:, :, :-1]
    agree = (fresh_route == recorded).all(-1)[:, ran]
    assert agree.mean() == 1.0, f"routing agreement {agree.mean()}"
    # Replaying the recorded routing reproduces the log-probs too (R3 across turns).
    replay = jax.jit(lambda m, t, r: m(t, routing=r, mtp=False))(
        model, tokens[:, :-1], routing[:, :, :-1]
    )
    replayed = np.asarray(token_logprobs(replay.logits, tokens[:, 1:], Sampling(TEMPERATURE)))
    assert_close(logp[:, 1:][m], replayed[m], FP32_REL, "recorded vs replayed log-probs")


def test_compaction_archives_history_and_restarts_from_the_summary(model):
    env = ScriptedEnv("long", 6)
    (episode,) = _episodes(model, [env], max_context=256, compact_fraction=0.35)
    assert len(episode.segments) >= 2, "the context never passed 35% of max_context"
    assert env.archives, "no history was archived"
    roles = [r for r, _ in episode.transcript]
    assert "summary_request" in roles
    # The archive holds the whole history up to the request: every turn before it.
    cut = roles.index("summary_request")
    for _, text in episode.transcript[:cut]:
        assert text in env.archives[0]
    # The next segment starts from the first observation, the archive note and the summary.
    tok = ByteTokenizer()
    second = episode.segments[1]
    summary = episode.transcript[cut + 1][1]
    prompt = episode.transcript[cut + 2][1]
    assert prompt.startswith(env.reset()) and prompt.endswith(summary + "\n")
    assert ".agent/history_1.txt" in prompt
    start = tok.decode(second.tokens[: len(tok.encode(prompt))])
    assert start == prompt and second.mask[: len(tok.encode(prompt))].sum() == 0
    # The first segment ends with the summary turn (trained), not with later turns.
    first = episode.segments[0]
    assert tok.decode(first.tokens[first.mask > 0]).replace("\n", "").endswith(summary)
    assert episode.reward == 0.6 and episode.turns == 6 + len(episode.segments) - 1
