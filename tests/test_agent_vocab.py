"""The agent suite's BPE tokenizer: shipped as built, context tokens equal a rollout's."""

import json
import os

from configs import agent_tiny
from mimo_jax import data
from mimo_jax.post_training.agent import episodes, repos, trajectories, vocab
from mimo_jax.post_training.rollout import stop_token


def _tokenizer():
    return data.load_tokenizer(agent_tiny.TOKENIZER)


def test_shipped_tokenizer_is_what_vocab_builds():
    with open(os.path.join(agent_tiny.TOKENIZER, "tokenizer.json"), encoding="utf-8") as f:
        shipped = json.load(f)
    assert json.loads(vocab.train().to_str()) == shipped
    tok = _tokenizer()
    assert tok.vocab_size == vocab.VOCAB_SIZE == agent_tiny.get_config().model.vocab_size
    assert stop_token(tok) == tok.eos_id == tok.tok.token_to_id(vocab.EOS)


def test_any_text_round_trips():
    tok = _tokenizer()
    text = "héllo ☃\x00\t\r\n<|end|>x <bash>rm -rf /</bash>"
    ids = tok.encode(text)
    assert tok.eos_id in ids  # EOS in text is the special token, not its characters
    assert tok.decode(ids) == text.replace(vocab.EOS, "")


def test_sft_prompts_tokenise_as_the_rollout_builds_them():
    """A rollout holds the first observation's tokens, each model turn's tokens and EOS, each
    tool output's tokens, concatenated; SFT tokenises the prompt text whole. They must agree,
    or SFT would train on contexts the policy never sees."""
    tok = _tokenizer()
    c = agent_tiny.get_config()
    c.agent.train_tasks = 60
    rows = episodes.sft_examples(c, tok)
    tasks = episodes.training_tasks(c)[0] + repos.suite("heldout", 60, seed=1)
    for n, task in enumerate(tasks):
        pieces = []
        segments = trajectories.scripted_episode(task, episodes.env_config(c))
        for role, text in segments:
            ids = list(tok.encode(text))
            pieces.append(ids + [tok.eos_id] if role == "model" else ids)
        context = [i for p in pieces for i in p]
        text = "".join(t + (vocab.EOS if r == "model" else "") for r, t in segments)
        assert list(tok.encode(text)) == context, task.name
        # The buggy line is the same tokens in the file and in the str_replace call.
        path, old, _ = task.fix
        file_ids, old_ids = list(tok.encode(task.files[path])), list(tok.encode(old))
        assert any(file_ids[i : i + len(old_ids)] == old_ids for i in range(len(file_ids)))
        assert len(context) < 260, (task.name, len(context))
        if n < 60:  # a training task: its SFT rows' prompts are the contexts before its turns
            starts = [sum(map(len, pieces[:k])) for k in (1, 3, 5)]
            for row, start in zip(rows[3 * n : 3 * n + 3], starts, strict=True):
                assert list(tok.encode(row["prompt"])) == context[:start]
