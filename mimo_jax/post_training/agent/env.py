"""A multi-turn tool environment over one ``repos.AgentTask``: bash, str_replace, finish.

The agent sees a minimal system prompt (the three tools and their syntax, no workflow) and the
issue, then acts one tool call per turn (MiMo-V2-Flash report 4.3.2). ``step`` parses the call
(``tools.parse_call``): a malformed call costs a turn and returns the parse error, a tool call
runs in the task's sandbox and returns its output, and ``finish`` copies the hidden tests into the
sandbox, runs them confined and ends the episode with reward 1.0 iff they all pass. The hidden
tests are not in the sandbox before ``finish``, so no command can read them. An episode that
reaches ``max_turns`` without finishing ends with reward 0.0.

Context management (report appendix C): ``archive`` writes the full history into the sandbox,
where bash can read it back, and ``summary_request`` is the observation that asks the model to
summarise its progress, naming the archive; the caller then replaces the context by the summary.
Observations stay short, since they go into a tiny model's context.
"""

import dataclasses

from mimo_jax.post_training.agent import repos, tools
from mimo_jax.post_training.agent.sandbox import Limits, Sandbox, ToolResult

SYSTEM_PROMPT = (
    "Fix the issue. One tool per turn:\n"
    "<bash>command</bash>\n"
    '<str_replace path="file"><old>text</old><new>text</new></str_replace>\n'
    "<finish/>\n"
)
ARCHIVE_DIR = ".agent"


@dataclasses.dataclass(frozen=True)
class EnvConfig:
    """Episode settings.

    Attributes:
      max_turns: model turns (tool calls, well-formed or not) before the episode is cut off.
      limits: resource limits of the sandbox's tool runs.
      test_timeout_s: wall-clock limit of the hidden-test run at ``finish``.
      system_prompt: text before the issue in the first observation.
    """

    max_turns: int = 6
    limits: Limits = Limits()
    test_timeout_s: float = 10.0
    system_prompt: str = SYSTEM_PROMPT

    def __post_init__(self):
        if self.max_turns < 1:
            raise ValueError(f"EnvConfig.max_turns must be >= 1, got {self.max_turns}")
        if not self.test_timeout_s > 0:
            raise ValueError(f"EnvConfig.test_timeout_s must be > 0, got {self.test_timeout_s}")


@dataclasses.dataclass(frozen=True)
class Step:
    """What one model turn returns.

    Attributes:
      observation: text appended to the context after the model's turn.
      reward: 1.0 for a finish whose hidden tests all pass, else 0.0.
      done: whether the episode ended (finish, or ``max_turns`` reached).
      info: ``"turn"`` (1-based); ``"tool"`` for a tool call, ``"format_error"`` for a malformed
        one; ``"tests_passed"`` / ``"tests_total"`` at finish; ``"truncated": "max_turns"``.
    """

    observation: str
    reward: float
    done: bool
    info: dict


class AgentEnv:
    """One task's episodes: ``reset`` gives a fresh sandbox, ``step`` plays one model turn.

    Args:
      task: the buggy repository and its hidden tests.
      config: episode settings.
    """

    def __init__(self, task: repos.AgentTask, config: EnvConfig = EnvConfig()):
        self.task = task
        self.config = config
        self._sandbox: Sandbox | None = None
        self._turn = 0
        self._done = False
        self._archives = 0

    def reset(self) -> str:
        """Starts an episode on a fresh copy of the repository.

        Returns:
          the first observation: the system prompt, then the issue.
        """
        self.close()
        self._sandbox = Sandbox(self.task.files, self.config.limits)
        self._turn = 0
        self._done = False
        self._archives = 0
        return f"{self.config.system_prompt}Issue: {self.task.issue}\n"

    def step(self, action: str) -> Step:
        """Plays one model turn.

        Args:
          action: the model's text for this turn: one tool call (``tools.format_call`` syntax).

        Returns:
          the ``Step``: the tool's output (or the parse error) and, at finish, the test result.

        Raises:
          RuntimeError: before ``reset`` or after the episode ended.
        """
        sandbox = self._live_sandbox("step")
        if self._done:
            raise RuntimeError(f"AgentEnv({self.task.name}): step() after the episode ended")
        self._turn += 1
        try:
            call = tools.parse_call(action)
        except tools.ToolFormatError as e:
            return self._end_turn(f"<error>\n{e}\n</error>\n", {"format_error": str(e)})
        if call.name != "finish":
            observation = tools.format_observation(tools.execute(call, sandbox))
            return self._end_turn(observation, {"tool": call.name})
        passed, total = repos.run_hidden_tests(self.task, sandbox, self.config.test_timeout_s)
        self._done = True
        solved = total > 0 and passed == total
        result = ToolResult(output=f"passed {passed}/{total}", ok=solved)
        info = {"turn": self._turn, "tool": "finish", "tests_passed": passed, "tests_total": total}
        return Step(tools.format_observation(result), float(solved), True, info)

    def archive(self, history: str) -> str:
        """Writes the full history into the sandbox, for the model to read back with bash.

        Args:
          history: the context so far, all of it.

        Returns:
          the file's path relative to the repository root, ``.agent/history_<k>.txt`` with k
          counting the archives of this episode from 0.
        """
        sandbox = self._live_sandbox("archive")
        path = f"{ARCHIVE_DIR}/history_{self._archives}.txt"
        sandbox.write_file(path, history)
        self._archives += 1
        return path

    def summary_request(self, archive_path: str) -> str:
        """The observation asking the model to summarise its progress.

        Args:
          archive_path: where ``archive`` put the full history.

        Returns:
          a short instruction naming the archive, which bash can read.
        """
        return (
            "Context full. Summarise your progress in a few lines. "
            f"The full history is in {archive_path}.\n"
        )

    def close(self) -> None:
        """Removes the sandbox; ``reset`` starts a new one."""
        if self._sandbox is not None:
            self._sandbox.close()
            self._sandbox = None

    def __enter__(self) -> "AgentEnv":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _live_sandbox(self, method: str) -> Sandbox:
        if self._sandbox is None:
            raise RuntimeError(f"AgentEnv({self.task.name}): {method}() before reset()")
        return self._sandbox

    def _end_turn(self, observation: str, info: dict) -> Step:
        """A non-finish turn's step: the episode goes on unless it used its last turn."""
        info = {"turn": self._turn, **info}
        if self._turn < self.config.max_turns:
            return Step(observation, 0.0, False, info)
        self._done = True
        return Step(observation, 0.0, True, {**info, "truncated": "max_turns"})
