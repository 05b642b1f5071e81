"""The agent environment and its synthetic episodes: rewards from the hidden tests, format errors,
turn limits, no hidden test before finish, history archives, scripted SFT episodes."""

import dataclasses

import pytest

from mimo_jax.post_training.agent import repos, tools
from mimo_jax.post_training.agent.env import SYSTEM_PROMPT, AgentEnv, EnvConfig
from mimo_jax.post_training.agent.trajectories import successful_episode

# One task per bug kind from each split.
TASKS = repos.suite("train", 3, seed=11) + repos.suite("heldout", 3, seed=11)
TASK = TASKS[0]


def _cat(path):
    return tools.format_call(tools.ToolCall("bash", {"command": f"cat {path}"}))


def _replace(task, new):
    path, old, _ = task.fix
    return tools.format_call(tools.ToolCall("str_replace", {"path": path, "old": old, "new": new}))


FINISH = tools.format_call(tools.ToolCall("finish", {}))


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_fix_then_finish_earns_reward_one(task):
    path, old, new = task.fix
    with AgentEnv(task) as env:
        first = env.reset()
        assert first == f"{SYSTEM_PROMPT}Issue: {task.issue}\n"
        step = env.step(_cat(path))
        assert old in step.observation and not step.done and step.reward == 0.0
        step = env.step(_replace(task, new))
        assert not step.done and step.info == {"turn": 2, "tool": "str_replace"}
        step = env.step(FINISH)
    total = repos.hidden_test_count(task)
    assert step.done and step.reward == 1.0
    assert step.info["tests_passed"] == step.info["tests_total"] == total
    assert f"passed {total}/{total}" in step.observation


def test_finish_without_the_fix_or_with_a_wrong_one_earns_zero():
    path, old, new = TASK.fix
    wrong = old.replace("return ", "return -")
    for actions in ([FINISH], [_replace(TASK, wrong), FINISH]):
        with AgentEnv(TASK) as env:
            env.reset()
            for action in actions:
                step = env.step(action)
        total = repos.hidden_test_count(TASK)
        assert step.done and step.reward == 0.0
        assert step.info["tests_total"] == total and step.info["tests_passed"] < total


def test_format_errors_cost_a_turn_but_keep_the_episode_going():
    with AgentEnv(TASK) as env:
        env.reset()
        for junk in ("hello", "<bash>ls", '<str_replace path="x"><old>a</old></str_replace>'):
            step = env.step(junk)
            assert step.observation.startswith("<error>\n") and step.observation.endswith(
                "\n</error>\n"
            )
            assert not step.done and step.reward == 0.0 and "format_error" in step.info
        step = env.step(_replace(TASK, TASK.fix[2]))
        assert not step.done and step.info["turn"] == 4
        assert env.step(FINISH).reward == 1.0


def test_max_turns_truncates_and_stepping_after_the_end_raises():
    config = EnvConfig(max_turns=2)
    with AgentEnv(TASK, config) as env:
        with pytest.raises(RuntimeError, match="before reset"):
            env.step(FINISH)
        env.reset()
        assert not env.step(_replace(TASK, TASK.fix[2])).done
        step = env.step("not a call")
        assert step.done and step.reward == 0.0 and step.info["truncated"] == "max_turns"
        with pytest.raises(RuntimeError, match="after the episode ended"):
            env.step(FINISH)
        # A finish on the last turn still counts.
        env.reset()
        env.step(_replace(TASK, TASK.fix[2]))
        step = env.step(FINISH)
        assert step.done and step.reward == 1.0 and "truncated" not in step.info
        with pytest.raises(RuntimeError, match="after the episode ended"):
            env.step(FINISH)
        # A reset starts over on a fresh copy of the buggy repository.
        env.reset()
        assert TASK.fix[1] in env.step(_cat(TASK.fix[0])).observation
    with pytest.raises(ValueError, match="max_turns"):
        EnvConfig(max_turns=0)


def test_hidden_tests_are_absent_before_finish():
    with AgentEnv(TASK) as env:
        env.reset()
        listing = env.step(tools.format_call(tools.ToolCall("bash", {"command": "ls -a"})))
        for path in [*TASK.hidden_tests, repos.RUNNER_PATH]:
            assert path not in listing.observation
            step = env.step(_cat(path))
            assert "assert" not in step.observation and "passed" not in step.observation
        assert TASK.fix[0] in listing.observation


def test_archive_keeps_the_full_history_readable_by_bash():
    history = "".join(f"turn {i}: <bash>ls</bash>\n" for i in range(400))  # over the output cap
    with AgentEnv(TASK) as env:
        with pytest.raises(RuntimeError, match="before reset"):
            env.archive(history)
        env.reset()
        path = env.archive(history)
        assert path == ".agent/history_0.txt"
        assert env.archive("short") == ".agent/history_1.txt"
        request = env.summary_request(path)
        assert path in request and len(request) < 120
        size = env.step(tools.format_call(tools.ToolCall("bash", {"command": f"wc -c < {path}"})))
        assert str(len(history.encode())) in size.observation
        head = env.step(_cat(".agent/history_1.txt"))
        assert "short" in head.observation


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_successful_episode_replays_the_environment(task):
    segments = successful_episode(task)
    path, old, new = task.fix
    assert [role for role, _ in segments] == ["prompt", "model", "tool", "model", "tool", "model"]
    assert [text for role, text in segments if role == "model"] == [
        _cat(path),
        _replace(task, new),
        FINISH,
    ]
    # The tool segments are the environment's own observations.
    with AgentEnv(task) as env:
        assert segments[0][1] == env.reset()
        assert segments[2][1] == env.step(segments[1][1]).observation
        assert segments[4][1] == env.step(segments[3][1]).observation
    assert old in segments[2][1]
    # Short enough for a tiny model's context.
    assert len("".join(text for _, text in segments).encode()) <= 720


def test_successful_episode_raises_when_the_script_fails():
    path, old, _ = TASK.fix
    broken = dataclasses.replace(TASK, fix=(path, old, old.replace("return ", "return -")))
    with pytest.raises(RuntimeError, match=TASK.name):
        successful_episode(broken)
    with pytest.raises(RuntimeError, match=TASK.name):
        successful_episode(TASK, EnvConfig(max_turns=2))
