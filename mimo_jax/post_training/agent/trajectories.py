"""Synthetic successful episodes, the SFT warm-up data of agentic RL.

A tiny model's initial solve rate must be above zero before RL can raise it, so it first sees
scripted solutions: ``cat`` the file the issue names, the reference ``str_replace``, ``finish``.
Each episode is played in a real ``AgentEnv``, so the tool segments are the environment's own
observations, byte for byte what a rollout sees, and the reward is checked to be 1.0.
"""

from mimo_jax.post_training.agent import tools
from mimo_jax.post_training.agent.env import AgentEnv, EnvConfig
from mimo_jax.post_training.agent.repos import AgentTask

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
