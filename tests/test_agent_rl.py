"""Agent tasks in the post-training loops: SFT rows from scripted episodes, the RL batch of
episodes (segments as rows), and a short ``--mode=rl`` run on the agent suite end to end."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import agent_tiny
from mimo_jax.data import ByteTokenizer
from mimo_jax.post_training import rl
from mimo_jax.post_training.agent import episodes, repos, trajectories
from mimo_jax.post_training.agent.rollout import Episode, Segment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _small_config():
    c = agent_tiny.get_config()
    c.model.num_layers = 2
    c.model.embed_dim = 32
    c.agent.train_tasks = 4
    c.agent.rl_tasks = 4
    c.agent.recovery_share = 0.5
    c.agent.heldout_tasks = 3
    c.agent.max_turn_tokens = 24
    c.agent.max_turns = 4  # a recovery episode's turns
    c.train.steps = 2
    c.train.eval_every = 2
    c.sft.num_examples = 12
    c.rl.steps = 2
    c.rl.prompts_per_step = 2
    c.rl.group_size = 2
    c.rl.heldout_every = 2
    c.rl.log_every = 1
    return c


def test_sft_examples_are_the_turns_of_scripted_episodes():
    c = _small_config()
    rows = episodes.sft_examples(c, ByteTokenizer())
    tasks, rl_tasks = episodes.training_tasks(c)
    assert len(tasks) == 4 and len(rl_tasks) == 4
    assert not {t.files[t.fix[0]] for t in tasks} & {t.files[t.fix[0]] for t in rl_tasks}
    assert len(rows) == 3 * len(tasks) + 2 * 2  # cat, str_replace, finish; 2 recoveries
    clean, recovered = rows[:12], rows[12:]
    for task, turns in zip(tasks, np.reshape(clean, (len(tasks), 3)), strict=True):
        segments = trajectories.successful_episode(task, episodes.env_config(c))
        assert trajectories.scripted_episode(task, episodes.env_config(c)) == segments
        # Each prompt is the context a rollout holds before that turn: every earlier model
        # turn followed by the stop byte, then the tool's output.
        context = segments[0][1]
        for k, row in enumerate(turns):
            model_turn = segments[1 + 2 * k][1]
            assert row == {"prompt": context, "response": model_turn, "domain": "agent"}
            context += model_turn + "\n" + (segments[2 + 2 * k][1] if k < 2 else "")
        assert task.fix[1] in turns[2]["prompt"] and task.fix[2] in turns[1]["response"]
    # A recovery episode: the slip and its error in the context, then the reference call and
    # finish as the responses; the real environment gives the same segments and reward 1.
    for i, task in enumerate(tasks[:2]):
        mistake = trajectories.slip(task, seed=c.seed * 100_003 + i)
        assert mistake not in task.files[task.fix[0]] and mistake != task.fix[2]
        segments = trajectories.successful_episode(task, episodes.env_config(c), mistake)
        assert trajectories.scripted_episode(task, episodes.env_config(c), mistake) == segments
        assert [r for r, _ in segments] == ["prompt"] + ["model", "tool"] * 3 + ["model"]
        assert segments[4][1] == f"<error>\nold string not found in {task.fix[0]}\n</error>\n"
        fix, finish = recovered[2 * i : 2 * i + 2]
        assert fix["response"] == segments[5][1] and finish["response"] == segments[7][1]
        assert fix["prompt"].endswith(segments[3][1] + "\n" + segments[4][1])
        assert not any(mistake in r["response"] for r in recovered)


def test_slip_changes_one_name_or_digit():
    for task in repos.suite("train", 60, seed=2):
        old = task.fix[1]
        for seed in range(3):
            text = trajectories.slip(task, seed)
            assert len(text) == len(old) and text not in task.files[task.fix[0]]
            assert sum(a != b for a, b in zip(text, old, strict=True)) == 1


def _segment(size, length, fill):
    tokens = np.zeros(size, np.int32)
    tokens[:length] = fill
    mask = np.zeros(size, np.float32)
    mask[length // 2 : length] = 1.0
    routing = np.full((2, size, 1), -1, np.int32)
    routing[:, : length - 1] = fill
    return Segment(tokens, mask, -mask, routing, length, "")


def test_to_batch_puts_each_segment_in_its_row_with_its_episode_advantage():
    size = 10
    eps = [
        Episode([_segment(size, 6, 1)], 1.0, 2, {}, []),
        Episode([_segment(size, 4, 2), _segment(size, 8, 3)], 0.0, 3, {}, []),
    ]
    adv = np.array([0.7, -0.7], np.float32)
    batch = episodes.to_batch(eps, adv, max_segments=2)
    assert batch["tokens"].shape == (4, size) and batch["mask"].shape == (4, size - 1)
    np.testing.assert_array_equal(batch["tokens"][:, 0], [1, 0, 2, 3])  # row 1: unused
    np.testing.assert_array_equal(batch["advantages"], np.float32([0.7, 0.0, -0.7, -0.7]))
    assert batch["mask"][1].sum() == 0
    np.testing.assert_array_equal(batch["mask"][3], eps[1].segments[1].mask[1:])
    np.testing.assert_array_equal(batch["rollout_logp"][0], eps[0].segments[0].logprobs[1:])
    assert batch["routing"].shape == (4, 2, size - 1, 1)
    np.testing.assert_array_equal(batch["routing"][2], eps[1].segments[0].routing[:, :-1])
    with pytest.raises(ValueError, match="max_segments=1"):
        episodes.to_batch(eps, adv, max_segments=1)


def test_heldout_samples_each_task_k_times_at_the_rl_temperature(monkeypatch):
    c = _small_config()
    c.agent.heldout_samples = 3
    calls = []

    def fake(self, model, tasks_, *, temperature, seed, record):
        calls.append(([t.name for t in tasks_], temperature))
        won = {t.name: i % 2 for i, t in enumerate(self.heldout_tasks)}  # tasks 1, 3, ... solved
        return [Episode([], float(won[t.name]), 3, {}, []) for t in tasks_]

    monkeypatch.setattr(episodes.AgentSource, "_episodes", fake)
    source = episodes.AgentSource(c, ByteTokenizer())
    m = source.heldout(model=None)
    names = [t.name for t in source.heldout_tasks]
    assert calls == [(names, 0.0), ([n for n in names for _ in range(3)], c.rl.temperature)]
    assert m["heldout_success"] == m["heldout_sampled_success"] == 1 / 3


def test_bad_agent_config_names_the_field():
    c = _small_config()
    c.agent.max_turns = 0
    with pytest.raises(ValueError, match="config.agent.max_turns"):
        episodes.check_config(c)
    c = _small_config()
    c.agent.heldout_samples = -1
    with pytest.raises(ValueError, match="config.agent.heldout_samples"):
        episodes.check_config(c)


def test_agent_rl_run_end_to_end(tmp_path, monkeypatch):
    c = _small_config()
    workdir = str(tmp_path / "agent")
    scored = []
    heldout = episodes.AgentSource.heldout
    monkeypatch.setattr(episodes.AgentSource, "heldout",
                        lambda self, model: scored.append(1) or heldout(self, model))  # fmt: skip
    last = rl.run(c, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    with open(os.path.join(workdir, "sft", "metrics.jsonl")) as f:
        warm = [json.loads(line) for line in f][-1]
    assert rows[0]["step"] == 0 and 0 <= rows[0]["heldout_success"] <= 1
    assert 0 <= rows[0]["heldout_sampled_success"] <= 1  # 4 sampled episodes per held-out task
    # Step 0 is the warm-up's last evaluation, not run again: SFT step 2 and RL step 2 only.
    assert rows[0]["heldout_success"] == warm["heldout_success"] and len(scored) == 2
    assert [r["step"] for r in rows[1:]] == [1, 2]
    for key in ("reward_mean", "turns", "model_tokens", "cut_share", "r3_kl_replay", "loss"):
        assert np.isfinite(last[key]), key
    assert 1 <= last["turns"] <= c.agent.max_turns and last["model_tokens"] > 0
    assert "heldout_success" in last
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
    # The warm-up ran on the scripted episodes first.
    assert os.path.isfile(os.path.join(workdir, "sft", "metrics.jsonl"))

    # --mode=episode plays the policy on a held-out task and prints the transcript.
    sizes = {"heldout_tasks": 3, "max_turn_tokens": 24, "max_turns": 3}
    flags = [f"--config.agent.{k}={v}" for k, v in sizes.items()]
    out = subprocess.run(
        [sys.executable, "main.py", "--mode=episode", "--config=configs/agent_tiny.py",
         f"--workdir={workdir}", "--task_index=2", *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    task = repos.suite("heldout", 3, seed=c.seed)[2]
    assert f"Issue: {task.issue}" in out.stdout and "--- model ---" in out.stdout
    assert "--- reward 0.0 after" in out.stdout and "task=heldout/0002" in out.stdout
