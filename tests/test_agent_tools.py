"""The agent's tool-call text format, str_replace, and dispatch into a sandbox."""

import os

import pytest

from mimo_jax.post_training.agent import tools
from mimo_jax.post_training.agent.sandbox import Limits, Sandbox, ToolResult
from mimo_jax.post_training.agent.tools import ToolCall, ToolFormatError

LIMITS = Limits(wall_s=2.0)
CALC = "def add(a, b):\n    return a - b\n\n\ndef sub(a, b):\n    return a - b\n"


@pytest.fixture
def sb():
    with Sandbox({"calc.py": CALC, "pkg/util.py": "X = 1\n"}, LIMITS) as sandbox:
        yield sandbox


CALLS = [
    ToolCall("bash", {"command": "cat calc.py"}),
    ToolCall("bash", {"command": "\n  python -c 'print(1 < 2 > 0)' <in >out\n"}),
    ToolCall("bash", {"command": 'echo "<bash>" </old> <finish/>'}),
    ToolCall(
        "str_replace", {"path": "calc.py", "old": "    return a - b", "new": "    return a + b"}
    ),
    ToolCall("str_replace", {"path": "a b/c>d.py", "old": "<new>x</new>", "new": ""}),
    ToolCall("str_replace", {"path": "x.py", "old": "", "new": "\n\t</str_replace>\n"}),
    ToolCall("finish", {}),
]


@pytest.mark.parametrize("call", CALLS)
def test_format_then_parse_is_identity(call):
    text = tools.format_call(call)
    assert tools.parse_call(text) == call
    # Text around the one call is ignored.
    assert tools.parse_call(f"I will look first.\n{text}\nthen see.") == call


def test_format_is_the_documented_syntax():
    assert tools.format_call(CALLS[0]) == "<bash>cat calc.py</bash>"
    assert tools.format_call(CALLS[3]) == (
        '<str_replace path="calc.py"><old>    return a - b</old>'
        "<new>    return a + b</new></str_replace>"
    )
    assert tools.format_call(CALLS[-1]) == "<finish/>"


def test_parse_accepts_whitespace_between_str_replace_parts_and_finish_variants():
    text = '<str_replace path="calc.py">\n<old>a</old>\n<new> b </new>\n</str_replace>'
    assert tools.parse_call(text) == ToolCall(
        "str_replace", {"path": "calc.py", "old": "a", "new": " b "}
    )
    for text in ("<finish/>", "<finish />", "<finish></finish>"):
        assert tools.parse_call(text) == ToolCall("finish", {})


@pytest.mark.parametrize(
    "text, message",
    [
        ("I think the bug is in calc.py", "no tool call found"),
        ("", "no tool call found"),
        ("<python>print(1)</python>", "unknown tool 'python'"),
        ("<bash>ls</bash><bash>pwd</bash>", "several tool calls"),
        ("<bash>ls</bash> and then <finish/>", "several tool calls"),
        ("<bash>ls", "<bash> is not closed"),
        ("<bash>  \n</bash>", "bash command is empty"),
        ('<bash cwd="x">ls</bash>', "starts with <bash>"),
        ("<str_replace><old>a</old><new>b</new></str_replace>", "needs a path"),
        ('<str_replace path=""><old>a</old><new>b</new></str_replace>', "non-empty path"),
        ('<str_replace path="a.py"><new>b</new></str_replace>', "needs <old>OLD</old> then"),
        ('<str_replace path="a.py"><old>a</old></str_replace>', "needs <old>OLD</old> then"),
        ('<str_replace path="a.py"><old>a<new>b</new></str_replace>', "<old> is not closed"),
        ('<str_replace path="a.py"><old>a</old><new>b', "<new> is not closed"),
        ('<str_replace path="a.py"><old>a</old><new>b</new>', "<str_replace> is not closed"),
        ("<finish>", "write <finish/>"),
        ("<finish now/>", "write <finish/>"),
    ],
)
def test_parse_errors_tell_the_model_what_is_wrong(text, message):
    with pytest.raises(ToolFormatError, match=message.replace("(", r"\(")) as info:
        tools.parse_call(text)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "call",
    [
        ToolCall("bash", {"command": "echo </bash>"}),
        ToolCall("bash", {"command": " "}),
        ToolCall("str_replace", {"path": 'a"b', "old": "x", "new": "y"}),
        ToolCall("str_replace", {"path": "a\nb", "old": "x", "new": "y"}),
        ToolCall("str_replace", {"path": "", "old": "x", "new": "y"}),
        ToolCall("str_replace", {"path": "a", "old": "</old>", "new": "y"}),
        ToolCall("str_replace", {"path": "a", "old": "x", "new": "</new>"}),
    ],
)
def test_format_refuses_what_would_not_parse_back(call):
    with pytest.raises(ValueError, match="must not"):
        tools.format_call(call)


def test_tool_call_validates_name_and_args():
    with pytest.raises(ValueError, match="name"):
        ToolCall("python", {"code": "1"})
    with pytest.raises(ValueError, match="keys"):
        ToolCall("bash", {"cmd": "ls"})
    with pytest.raises(ValueError, match="keys"):
        ToolCall("finish", {"reason": "done"})
    with pytest.raises(ValueError, match="must be a str"):
        ToolCall("str_replace", {"path": "a", "old": 1, "new": "b"})


def test_format_observation():
    assert tools.format_observation(ToolResult("ok\n", True)) == "<output>\nok\n</output>\n"
    assert tools.format_observation(ToolResult("ok", True)) == "<output>\nok\n</output>\n"
    assert tools.format_observation(ToolResult("", True)) == "<output>\n</output>\n"
    assert tools.format_observation(ToolResult("[exit code 1]", False)) == (
        "<error>\n[exit code 1]\n</error>\n"
    )


def test_str_replace_exactly_one_match(sb):
    result = sb.str_replace(
        "calc.py", "    return a - b\n\n\ndef sub", "    return a + b\n\n\ndef sub"
    )
    assert result == ToolResult("replaced 1 occurrence in calc.py", True)
    assert sb.read_file("calc.py") == CALC.replace("a - b", "a + b", 1)
    assert (
        sb.bash("python -c 'import calc; print(calc.add(2, 3), calc.sub(2, 3))'").output == "5 -1\n"
    )


def test_str_replace_zero_or_several_matches_change_nothing(sb):
    assert sb.str_replace("calc.py", "return a * b", "x") == ToolResult(
        "old string not found in calc.py", False
    )
    assert sb.str_replace("calc.py", "    return a - b", "x") == ToolResult(
        "old string occurs 2 times in calc.py; it must be unique", False
    )
    sb.write_file("aaa.txt", "aaa")
    assert sb.str_replace("aaa.txt", "aa", "b") == ToolResult(
        "old string occurs 2 times in aaa.txt; it must be unique", False
    )
    assert not sb.str_replace("calc.py", "", "x").ok
    assert sb.read_file("calc.py") == CALC
    assert sb.read_file("aaa.txt") == "aaa"


def test_str_replace_keeps_line_endings_and_writes_subdirectories(sb):
    sb.write_file("win.txt", "a\r\nb\r\n")
    assert sb.str_replace("win.txt", "b", "c").ok
    with open(os.path.join(sb.root, "win.txt"), "rb") as f:
        assert f.read() == b"a\r\nc\r\n"
    assert sb.str_replace("pkg/util.py", "X = 1", "X = 2").ok
    assert sb.bash("cat pkg/util.py").output == "X = 2\n"


def test_str_replace_missing_file_and_escaping_paths(sb, tmp_path):
    outside = tmp_path / "outside.py"
    outside.write_text("secret = 1\n")
    assert sb.str_replace("nope.py", "a", "b") == ToolResult(
        "str_replace: no such file: nope.py", False
    )
    assert sb.bash(f"ln -s {outside} link.py && ln -s {tmp_path} up && mkdir d").ok
    for path in (str(outside), f"../{outside.name}", "link.py", "up/outside.py", "d/../../x", "d"):
        result = sb.str_replace(path, "secret = 1", "secret = 2")
        assert not result.ok and result.output.startswith("str_replace: "), (path, result)
    assert outside.read_text() == "secret = 1\n"


def test_execute_dispatches_to_the_sandbox(sb):
    bash = tools.execute(tools.parse_call("<bash>echo hi; echo err >&2</bash>"), sb)
    assert bash == ToolResult("hi\nerr\n", True)
    failed = tools.execute(tools.parse_call("<bash>exit 2</bash>"), sb)
    assert failed == ToolResult("[exit code 2]", False)
    text = '<str_replace path="calc.py"><old>add(a, b)</old><new>plus(a, b)</new></str_replace>'
    assert tools.execute(tools.parse_call(text), sb) == ToolResult(
        "replaced 1 occurrence in calc.py", True
    )
    assert "def plus(a, b)" in sb.read_file("calc.py")
    files_before = sorted(os.listdir(sb.root))
    assert tools.execute(tools.parse_call("<finish/>"), sb) == ToolResult("", True)
    assert sorted(os.listdir(sb.root)) == files_before
