"""Synthetic successful episodes, the SFT warm-up data of agentic RL.

A tiny model's initial solve rate must be above zero before RL can raise it, so it first sees
scripted solutions: ``cat`` the file the issue names, the reference ``str_replace``, ``finish``.
A *recovery* episode first makes a copying slip (``slip``: one name or digit of the buggy line
changed), gets the tool's error, and then makes the reference call: it shows that an error is
followed by another attempt, not by ``finish``. ``successful_episode`` plays an episode in a real
``AgentEnv``, so its tool segments are the environment's own observations, byte for byte what a
rollout sees, and the reward is checked to be 1.0; ``scripted_episode`` builds the same segments
without a sandbox.
"""

import random

from mimo_jax.post_training.agent import tools
from mimo_jax.post_training.agent.env import AgentEnv, EnvConfig
from mimo_jax.post_training.agent.repos import AgentTask
from mimo_jax.post_training.agent.sandbox import ToolResult

Segment = tuple[str, str]  # (role, text); role in ("prompt", "model", "tool")
_DEFAULT_CONFIG = EnvConfig()


def slip(task: AgentTask, seed: int) -> str:
    """The buggy line with one single-character name or digit changed, absent from the file.

    Args:
      task: the task whose ``fix`` old line is copied with a slip.
      seed: picks the character and its replacement.

    Returns:
      a string that ``str_replace`` does not find in the file, other than the fixed line.
    """
    path, old, new = task.fix
    rng = random.Random(seed)
    body = old.index("return") + len("return")
    spots = [i for i in range(body, len(old))
             if old[i].isalnum() and not old[i - 1].isalnum()
             and (i + 1 == len(old) or not old[i + 1].isalnum())]  # fmt: skip
    i = rng.choice(spots)
    pool = "23456789" if old[i].isdigit() else "abcdefghjkmnpqrstuvwxyz"
    for c in rng.sample(pool, len(pool)):
        text = old[:i] + c + old[i + 1 :]
        if c != old[i] and text != new and text not in task.files[path]:
            return text
    raise ValueError(f"task {task.name}: no slip of {old!r} is absent from {path}")


def _calls(task: AgentTask, mistake: str | None) -> list[tools.ToolCall]:
    path, old, new = task.fix
    calls = [tools.ToolCall("bash", {"command": f"cat {path}"})]
    if mistake is not None:
        calls.append(tools.ToolCall("str_replace", {"path": path, "old": mistake, "new": new}))
    calls.append(tools.ToolCall("str_replace", {"path": path, "old": old, "new": new}))
    return [*calls, tools.ToolCall("finish", {})]


def successful_episode(
    task: AgentTask, config: EnvConfig = _DEFAULT_CONFIG, mistake: str | None = None
) -> list[Segment]:
    """The scripted solution of a task, as the segments of its context.

    Args:
      task: the task to solve.
      config: episode settings; ``max_turns`` must allow the three turns (four with a mistake).
      mistake: if given, an ``old`` string (``slip``) tried before the reference one: a
        recovery episode.

    Returns:
      ``[("prompt", reset observation), ("model", bash cat), ("tool", its output),
      ("model", str_replace), ("tool", its output), ("model", finish)]`` (with a mistake, the
      failed ``str_replace`` and its error come before the reference one): model texts are
      exactly ``tools.format_call`` (the rollout appends a stop token itself); the observation
      after ``finish`` is left out, since a rollout's context ends with the finish call.

    Raises:
      RuntimeError: naming the task, when the scripted solution does not earn reward 1.0.
    """
    calls = _calls(task, mistake)
    with AgentEnv(task, config) as env:
        segments = [("prompt", env.reset())]
        for call in calls:
            text = tools.format_call(call)
            segments.append(("model", text))
            step = env.step(text)
            if step.done:
                break
            segments.append(("tool", step.observation))
    if step.reward != 1.0 or segments[-1][1] != tools.format_call(calls[-1]):
        raise RuntimeError(
            f"task {task.name}: the scripted solution got reward {step.reward} ({step.info})"
        )
    return segments


def scripted_episode(
    task: AgentTask, config: EnvConfig = _DEFAULT_CONFIG, mistake: str | None = None
) -> list[Segment]:
    """``successful_episode``'s segments built from the task alone, without a sandbox.

    The observations of the scripted solution are known in advance (the file's text, the
    replacement's confirmation), so SFT data for thousands of tasks needs no subprocess;
    tests/test_agent_rl.py checks that these segments equal ``successful_episode``'s.

    Args:
      task: the task to solve.
      config: episode settings (its ``system_prompt``).
      mistake: as for ``successful_episode``.

    Returns:
      The same list as ``successful_episode(task, config, mistake)``.
    """
    path = task.fix[0]
    results = [ToolResult(task.files[path], True)]
    if mistake is not None:
        results.append(ToolResult(f"old string not found in {path}", False))
    results.append(ToolResult(f"replaced 1 occurrence in {path}", True))
    segments = [("prompt", f"{config.system_prompt}Issue: {task.issue}\n")]
    for call, result in zip(_calls(task, mistake), [*results, None], strict=True):
        segments.append(("model", tools.format_call(call)))
        if result is not None:
            segments.append(("tool", tools.format_observation(result)))
    return segments
