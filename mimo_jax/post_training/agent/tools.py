"""The agent's three tools: the text format a model turn uses to call one, and their dispatch.

A model turn is plain text holding exactly one tool call; text before or after it is ignored::

    <bash>cat calc.py</bash>
    <str_replace path="calc.py"><old>    return a - b</old><new>    return a + b</new></str_replace>
    <finish/>

Arguments are raw text, with no escaping, so a bash command cannot contain ``</bash>``, ``old``
cannot contain ``</old>``, ``new`` cannot contain ``</new>``, and a path cannot contain ``"`` or a
newline. Whitespace between the parts of a ``str_replace`` call is allowed; the contents of
``<bash>``, ``<old>`` and ``<new>`` are taken exactly, whitespace included. The tool's result comes
back as an observation, ``<output>...</output>`` or ``<error>...</error>``.
"""

import dataclasses
import re

from mimo_jax.post_training.agent.sandbox import Sandbox, ToolResult

TOOLS = ("bash", "str_replace", "finish")
_ARGS = {"bash": ("command",), "str_replace": ("path", "old", "new"), "finish": ()}
USAGE = (
    'write exactly one of <bash>COMMAND</bash>, <str_replace path="PATH"><old>OLD</old>'
    "<new>NEW</new></str_replace> or <finish/>"
)

_CALL_START = re.compile(r"<(bash|str_replace|finish)(?![\w-])")
_ANY_TAG = re.compile(r"<([A-Za-z_][\w-]*)(?=[\s/>])")
_FINISH = re.compile(r"<finish\s*/>|<finish></finish>")
_STR_REPLACE_OPEN = re.compile(r'<str_replace\s+path="([^"\n]*)"\s*>')


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One tool call.

    Attributes:
      name: one of ``TOOLS``.
      args: bash: ``{"command"}``; str_replace: ``{"path", "old", "new"}``; finish: ``{}``.
    """

    name: str
    args: dict[str, str]

    def __post_init__(self):
        if self.name not in TOOLS:
            raise ValueError(f"ToolCall.name must be one of {TOOLS}, got {self.name!r}")
        expected = _ARGS[self.name]
        if not isinstance(self.args, dict) or sorted(self.args) != sorted(expected):
            raise ValueError(
                f"ToolCall.args of {self.name} must have keys {expected}, got {self.args!r}"
            )
        for key, value in self.args.items():
            if not isinstance(value, str):
                raise ValueError(
                    f"ToolCall.args[{key!r}] must be a str, got {type(value).__name__}"
                )


class ToolFormatError(ValueError):
    """A model turn that does not hold exactly one well-formed tool call; the message is for the
    model."""


def parse_call(text: str) -> ToolCall:
    """Parses the one tool call of a model turn.

    Args:
      text: the model's turn.

    Returns:
      The call.

    Raises:
      ToolFormatError: no call, several calls, an unknown tool, an unclosed call, a str_replace
        without a path or without ``<old>``/``<new>``, an empty bash command.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    start = _CALL_START.search(text)
    if start is None:
        unknown = _ANY_TAG.search(text)
        if unknown is not None:
            raise ToolFormatError(
                f"unknown tool {unknown.group(1)!r}: the tools are {', '.join(TOOLS)}; {USAGE}"
            )
        raise ToolFormatError(f"no tool call found: {USAGE}")
    parse = {"bash": _parse_bash, "str_replace": _parse_str_replace, "finish": _parse_finish}
    call, end = parse[start.group(1)](text, start.start())
    if _CALL_START.search(text, end) is not None:
        raise ToolFormatError(f"several tool calls in one turn: {USAGE}")
    return call


def _parse_bash(text: str, pos: int) -> tuple[ToolCall, int]:
    if not text.startswith("<bash>", pos):
        raise ToolFormatError("a bash call starts with <bash> (no attributes)")
    body_start = pos + len("<bash>")
    body_end = text.find("</bash>", body_start)
    if body_end < 0:
        raise ToolFormatError("<bash> is not closed: end the command with </bash>")
    command = text[body_start:body_end]
    if not command.strip():
        raise ToolFormatError("the bash command is empty")
    return ToolCall("bash", {"command": command}), body_end + len("</bash>")


def _parse_str_replace(text: str, pos: int) -> tuple[ToolCall, int]:
    opening = _STR_REPLACE_OPEN.match(text, pos)
    if opening is None:
        raise ToolFormatError(
            'str_replace needs a path attribute: <str_replace path="PATH"> (no " or newline in it)'
        )
    path = opening.group(1)
    if not path:
        raise ToolFormatError("str_replace needs a non-empty path")
    old, pos = _element(text, opening.end(), "old")
    new, pos = _element(text, pos, "new")
    close = re.compile(r"\s*</str_replace>").match(text, pos)
    if close is None:
        raise ToolFormatError(
            "<str_replace> is not closed: end it with </str_replace> after </new>"
        )
    return ToolCall("str_replace", {"path": path, "old": old, "new": new}), close.end()


def _element(text: str, pos: int, tag: str) -> tuple[str, int]:
    """The raw content of ``<tag>...</tag>`` at ``pos`` (after optional whitespace), and its end."""
    opening = re.compile(rf"\s*<{tag}>").match(text, pos)
    if opening is None:
        raise ToolFormatError(
            "str_replace needs <old>OLD</old> then <new>NEW</new> inside <str_replace ...>"
        )
    end = text.find(f"</{tag}>", opening.end())
    if end < 0:
        raise ToolFormatError(f"<{tag}> is not closed: end it with </{tag}>")
    return text[opening.end() : end], end + len(f"</{tag}>")


def _parse_finish(text: str, pos: int) -> tuple[ToolCall, int]:
    match = _FINISH.match(text, pos)
    if match is None:
        raise ToolFormatError("finish takes no arguments: write <finish/>")
    return ToolCall("finish", {}), match.end()


def format_call(call: ToolCall) -> str:
    """Writes a call in the text format; ``parse_call(format_call(call)) == call``.

    Args:
      call: the call.

    Returns:
      Its text.

    Raises:
      ValueError: an argument holds what the raw format cannot carry (its closing tag, a quote
        or newline in the path) or would not parse back (an empty command or path).
    """
    args = call.args
    if call.name == "finish":
        return "<finish/>"
    if call.name == "bash":
        _check_no(args["command"], "</bash>", "command")
        if not args["command"].strip():
            raise ValueError("a bash command must not be empty")
        return f"<bash>{args['command']}</bash>"
    for bad in ('"', "\n"):
        _check_no(args["path"], bad, "path")
    if not args["path"]:
        raise ValueError("a str_replace path must not be empty")
    _check_no(args["old"], "</old>", "old")
    _check_no(args["new"], "</new>", "new")
    return (
        f'<str_replace path="{args["path"]}"><old>{args["old"]}</old>'
        f"<new>{args['new']}</new></str_replace>"
    )


def _check_no(value: str, forbidden: str, name: str) -> None:
    if forbidden in value:
        raise ValueError(f"{name} must not contain {forbidden!r}: the tool format has no escaping")


def format_observation(result: ToolResult) -> str:
    """The text appended to the context after a tool call.

    Args:
      result: the tool's result.

    Returns:
      ``"<output>\\n...\\n</output>\\n"`` when ``result.ok``, ``"<error>\\n...\\n</error>\\n"``
      otherwise.
    """
    tag = "output" if result.ok else "error"
    body = (
        result.output if result.output.endswith("\n") or not result.output else result.output + "\n"
    )
    return f"<{tag}>\n{body}</{tag}>\n"


def execute(call: ToolCall, sandbox: Sandbox) -> ToolResult:
    """Runs a call in a sandbox.

    Args:
      call: the call.
      sandbox: the episode's sandbox.

    Returns:
      The tool's result; ``finish`` returns an empty success (the environment runs the tests).
    """
    if call.name == "bash":
        return sandbox.bash(call.args["command"])
    if call.name == "str_replace":
        return sandbox.str_replace(call.args["path"], call.args["old"], call.args["new"])
    return ToolResult("", True)
