"""Synthetic successful episodes, the SFT warm-up data of agentic RL.

A tiny model's initial solve rate must be above zero before RL can raise it, so it first sees
scripted solutions: ``cat`` the file the issue names, the reference ``str_replace``, ``finish``.
Each episode is played in a real ``AgentEnv``, so the tool segments are the environment's own
observations, byte for byte what a rollout sees, and the reward is checked to be 1.0.
"""

from mimo_jax.post_training.agent import tools
from mimo_jax.post_training.agent.env import AgentEnv, EnvConfig
from mimo_jax.post_training.agent.repos import AgentTask
from mimo_jax.post_training.agent.sandbox import ToolResult

Segment = tuple[str, str]  # (role, text); role in ("prompt", "model", "tool")
_DEFAULT_CONFIG = EnvConfig()


def successful_episode(task: AgentTask, config: EnvConfig = _DEFAULT_CONFIG) -> list[Segment]:
    """The scripted solution of a task, as the segments of its context.

    Args:
      task: the task to solve.
      config: episode settings; ``max_turns`` must allow the three turns.

    Returns:
      ``[("prompt", reset observation), ("model", bash cat), ("tool", its output),
      ("model", str_replace), ("tool", its output), ("model", finish)]``: model texts are exactly
      ``tools.format_call`` (the rollout appends a stop token itself); the observation after
      ``finish`` is left out, since a rollout's context ends with the finish call.

    Raises:
      RuntimeError: naming the task, when the scripted solution does not earn reward 1.0.
    """
    path, old, new = task.fix
    calls = [
        tools.ToolCall("bash", {"command": f"cat {path}"}),
        tools.ToolCall("str_replace", {"path": path, "old": old, "new": new}),
        tools.ToolCall("finish", {}),
    ]
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


def scripted_episode(task: AgentTask, config: EnvConfig = _DEFAULT_CONFIG) -> list[Segment]:
    """``successful_episode``'s segments built from the task alone, without a sandbox.

    The observations of the scripted solution are known in advance (the file's text, the
    replacement's confirmation), so SFT data for thousands of tasks needs no subprocess;
    tests/test_agent_rl.py checks that these segments equal ``successful_episode``'s.

    Args:
      task: the task to solve.
      config: episode settings (its ``system_prompt``).

    Returns:
      The same list as ``successful_episode(task, config)``.
    """
    path, old, new = task.fix
    cat = tools.ToolCall("bash", {"command": f"cat {path}"})
    replace = tools.ToolCall("str_replace", {"path": path, "old": old, "new": new})
    return [
        ("prompt", f"{config.system_prompt}Issue: {task.issue}\n"),
        ("model", tools.format_call(cat)),
        ("tool", tools.format_observation(ToolResult(task.files[path], True))),
        ("model", tools.format_call(replace)),
        ("tool", tools.format_observation(ToolResult(f"replaced 1 occurrence in {path}", True))),
        ("model", tools.format_call(tools.ToolCall("finish", {}))),
    ]
