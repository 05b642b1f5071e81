"""A tiny suite of buggy Python repositories for agentic RL, with hidden tests.

Each repository is one module of two one-line functions; one of them carries a one-line bug of
one of three kinds (``BUGS``):

* ``"operator"``: a swapped arithmetic operator (``add`` returns ``a - b``);
* ``"constant"``: a wrong constant (``mul4`` returns ``x * 3``);
* ``"off_by_one"``: a wrong range bound (``sum_to`` sums ``range(n)``, not ``range(n + 1)``).

The family is small and regular on purpose: a byte-level tiny model has to learn to read the file
(``<bash>cat calc.py</bash>``), copy the buggy line into ``<old>`` and write the fixed line into
``<new>``. The issue names the file and a failing call with its expected result, never the buggy
line nor the wrong constant, so solving it needs the file; the function name says what is meant
(``add``, ``mul4``, ``sum_to`` up to and including ``n``). The other function is correct; it makes
the agent find the right line, and its hidden tests fail an edit that breaks it.

An *instance* is what the fix changes: (bug kind, function, parameters, buggy expression). Train
and held-out split the instances by ``crc32`` of that key (stable across processes, unlike
``hash()``), so no held-out instance is ever a train one, whatever the seeds; the surface of a
task (module name, the other function, their order, the calls in the issue and the tests) is
drawn per task.

Repositories carry no history, comment or test: the hidden tests (plain Python, several calls per
function, chosen so that any other operator, constant or bound fails) are written into the
sandbox only at ``finish``, with a runner (``RUNNER_PATH``) that prints ``passed K/N``
(``run_hidden_tests``). Code the agent left behind runs in the same process as the runner, so a
policy could in principle fake that line; the tiny tasks here do not reward anything that finds
it, but a larger suite would run each test in its own process.
"""

import ast
import dataclasses
import random
import re
import zlib

SPLITS = ("train", "heldout")
BUGS = ("operator", "constant", "off_by_one")
RUNNER_PATH = "_run_hidden_tests.py"

# crc32 buckets [0, 20) of an instance key are held out.
_HELDOUT_BUCKETS = 20
# Large name pools: a policy must read names off the repository rather than recall them.
_MODULES = ("calc", "mathx", "ops", "util", "nums", "arith", "funcs", "helpers", "core", "lib",
            "tools", "num", "basic", "simple", "small", "misc", "algo", "maths", "fns")  # fmt: skip
_LETTERS = "abcdefghijkmnpqrstuvwxyz"  # no l, o: they read like 1, 0
_OPERATORS = ("+", "-", "*")
_OPERATOR_NAMES = {"add": "+", "plus": "+", "sub": "-", "minus": "-", "mul": "*", "times": "*"}
_OPERATOR_PARAMS = tuple((a, b) for a in _LETTERS for b in _LETTERS if a < b)
# Pairs on which +, - and * all differ, so a test call catches any swapped operator.
_OPERATOR_ARGS = ((2, 5), (7, 3), (4, 6), (9, 2), (3, 8), (6, 4))
_CONSTANT_PREFIXES = {"add": "+", "sub": "-", "mul": "*"}  # mul4(x) = x * 4
_CONSTANTS = tuple(range(2, 10))
_CONSTANT_PARAMS = tuple(_LETTERS)
_CONSTANT_ARGS = tuple(range(2, 10))
# Off-by-one functions count up to and including the bound; ``{b}`` is the range's end.
_RANGE_FORMS = {
    "sum_to": "sum(range({b}))",
    "count_to": "list(range(1, {b}))",
    "squares_to": "[i * i for i in range({b})]",
}
_RANGE_PARAMS = tuple(c for c in _LETTERS if c != "i")  # i is the comprehension variable
_RANGE_BAD_OFFSETS = ("", " - 1", " + 2")
_RANGE_ARGS = (2, 3, 4, 5)
_TESTS_PER_BUGGY = 4
_TESTS_PER_OTHER = 2
_RESULT_LINE = re.compile(r"passed (\d+)/(\d+)")

RUNNER_SOURCE = '''\
"""Hidden-test runner: imports each module named on the command line and calls its test_*."""
import contextlib
import importlib
import io
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
# Bytecode the agent's own runs cached could be stale (an edit of the same size within the same
# second keeps its mtime key), so read none and write none.
sys.dont_write_bytecode = True
sys.pycache_prefix = os.path.join(HERE, ".no_pycache")
passed = total = 0
for name in sys.argv[1:]:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            module = importlib.import_module(name)
        except (Exception, SystemExit):
            continue
        for test in sorted(t for t in vars(module) if t.startswith("test_")):
            total += 1
            try:
                getattr(module, test)()
                passed += 1
            except (Exception, SystemExit):
                pass
print(f"passed {passed}/{total}")
'''


@dataclasses.dataclass(frozen=True)
class AgentTask:
    """One buggy repository and the tests that decide whether the agent fixed it.

    Attributes:
      name: unique id, ``"<split>/<index>"``.
      issue: the problem statement the agent sees.
      files: the repository, relative path -> text; no test, comment or history in it.
      hidden_tests: test modules, relative path -> text, copied into the sandbox only at finish.
      bug: one of ``BUGS``.
      fix: (path, old, new), the reference ``str_replace``: whole lines without the newline.
    """

    name: str
    issue: str
    files: dict[str, str]
    hidden_tests: dict[str, str]
    bug: str
    fix: tuple[str, str, str]

    def __post_init__(self):
        if self.bug not in BUGS:
            raise ValueError(f"AgentTask.bug must be one of {BUGS}, got {self.bug!r}")
        path, old, _ = self.fix
        if path not in self.files:
            raise ValueError(f"AgentTask.fix path {path!r} is not in files {sorted(self.files)}")
        if self.files[path].count(old) != 1:
            raise ValueError(f"AgentTask.fix old text {old!r} must occur once in {path!r}")
        if set(self.files) & set(self.hidden_tests) or RUNNER_PATH in self.files:
            raise ValueError(f"AgentTask {self.name!r}: hidden test paths collide with files")


@dataclasses.dataclass(frozen=True)
class _Function:
    """A one-line function ``def name(params): return expr``; ``good`` is the intended expr."""

    bug: str
    name: str
    params: tuple[str, ...]
    good: str
    bad: str

    def source(self, expr: str) -> str:
        return f"def {self.name}({', '.join(self.params)}):\n    return {expr}\n"

    def line(self, expr: str) -> str:
        return f"    return {expr}"

    def key(self) -> str:
        return f"{self.bug}|{self.name}|{','.join(self.params)}|{self.bad}"


def _instances() -> list[_Function]:
    """Every buggy function of the suite, in a fixed order."""
    out = []
    for name, op in _OPERATOR_NAMES.items():
        for a, b in _OPERATOR_PARAMS:
            out += [
                _Function("operator", name, (a, b), f"{a} {op} {b}", f"{a} {bad} {b}")
                for bad in _OPERATORS
                if bad != op
            ]
    for prefix, op in _CONSTANT_PREFIXES.items():
        for k in _CONSTANTS:
            for x in _CONSTANT_PARAMS:
                out += [
                    _Function("constant", f"{prefix}{k}", (x,), f"{x} {op} {k}", f"{x} {op} {bad}")
                    for bad in _CONSTANTS
                    if bad != k
                ]
    for name, form in _RANGE_FORMS.items():
        for n in _RANGE_PARAMS:
            out += [
                _Function(
                    "off_by_one",
                    name,
                    (n,),
                    form.format(b=f"{n} + 1"),
                    form.format(b=f"{n}{offset}"),
                )
                for offset in _RANGE_BAD_OFFSETS
            ]
    return out


_INSTANCES = _instances()
# The correct functions the other (distractor) function is drawn from, one per (name, params).
_CORRECT = list(
    {(f.name, f.params): dataclasses.replace(f, bad=f.good) for f in _INSTANCES}.values()
)


def _split_of(function: _Function) -> str:
    """``"heldout"`` or ``"train"``: the split of a buggy function, from its instance key."""
    bucket = zlib.crc32(function.key().encode()) % 100
    return "heldout" if bucket < _HELDOUT_BUCKETS else "train"


def _arg_pool(function: _Function) -> tuple[tuple[int, ...], ...]:
    if function.bug == "operator":
        return _OPERATOR_ARGS
    pool = _CONSTANT_ARGS if function.bug == "constant" else _RANGE_ARGS
    return tuple((x,) for x in pool)


def _call(function: _Function, expr: str, args: tuple[int, ...]):
    """Value of the function with body ``expr`` at ``args``; runs only the suite's own code."""
    namespace = {}
    exec(function.source(expr), namespace)
    return namespace[function.name](*args)


def _call_text(function: _Function, args: tuple[int, ...]) -> str:
    return f"{function.name}({', '.join(map(str, args))})"


def _issue(path: str, function: _Function, args: tuple[int, ...]) -> str:
    got, want = _call(function, function.bad, args), _call(function, function.good, args)
    return f"{path}: {_call_text(function, args)} returns {got!r}, expected {want!r}."


def _reveals(issue: str, function: _Function) -> bool:
    """Whether the issue shows the buggy line, or the wrong constant as a number of its own."""
    if function.bad in issue:
        return True
    if function.bug != "constant":
        return False
    wrong = function.bad.rsplit(" ", 1)[1]
    # Digits inside a name (``mul4``) are the intended constant, not the wrong one.
    return wrong in re.findall(r"(?<![A-Za-z0-9_])\d+", issue)


def _tests(module: str, function: _Function, args: list[tuple[int, ...]]) -> list[str]:
    return [
        f"def test_{function.name}_{i}():\n"
        f"    assert {module}.{_call_text(function, a)} == {_call(function, function.good, a)!r}\n"
        for i, a in enumerate(args)
    ]


def _render(name: str, function: _Function, rng: random.Random) -> AgentTask:
    """A task for one buggy function, its surface drawn from ``rng``."""
    module = rng.choice(_MODULES)
    path = f"{module}.py"
    old, new = function.line(function.bad), function.line(function.good)
    others = [f for f in _CORRECT if f.name != function.name and f.line(f.good) not in (old, new)]
    other = rng.choice(others)
    functions = [(function, function.bad), (other, other.good)]
    rng.shuffle(functions)
    source = "\n".join(f.source(expr) for f, expr in functions)
    pool = list(_arg_pool(function))
    rng.shuffle(pool)
    issue_args = next(a for a in pool if not _reveals(_issue(path, function, a), function))
    test_args = [issue_args] + [a for a in pool if a != issue_args][: _TESTS_PER_BUGGY - 1]
    other_args = rng.sample(_arg_pool(other), _TESTS_PER_OTHER)
    tests = _tests(module, function, test_args) + _tests(module, other, other_args)
    test_source = f"import {module}\n\n\n" + "\n\n".join(tests)
    return AgentTask(
        name=name,
        issue=_issue(path, function, issue_args),
        files={path: source},
        hidden_tests={f"test_{module}.py": test_source},
        bug=function.bug,
        fix=(path, old, new),
    )


def suite(split: str, n: int | None = None, seed: int = 0) -> list[AgentTask]:
    """Tasks of one split, a pure function of (split, n, seed).

    Args:
      split: ``"train"`` or ``"heldout"``; the two never share an instance (module docstring).
      n: number of tasks; the bug kinds take turns (``BUGS`` order) and instances repeat with a
        fresh surface. ``None``: every instance of the split once, in a seeded order (most of
        them ``"constant"``, the largest family).
      seed: an int; different seeds draw different instances and surfaces.

    Returns:
      list of ``AgentTask`` named ``"<split>/<index>"``.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise ValueError(f"n must be None or an int >= 0, got {n!r}")
    rng = random.Random(zlib.crc32(f"{split}|{seed}".encode()))
    instances = [f for f in _INSTANCES if _split_of(f) == split]
    if n is None:
        chosen = rng.sample(instances, len(instances))
    else:
        by_bug = {bug: [f for f in instances if f.bug == bug] for bug in BUGS}
        chosen = [rng.choice(by_bug[BUGS[i % len(BUGS)]]) for i in range(n)]
    return [_render(f"{split}/{i:04d}", f, rng) for i, f in enumerate(chosen)]


def hidden_test_count(task: AgentTask) -> int:
    """Number of ``test_*`` functions in the task's hidden tests.

    Args:
      task: an ``AgentTask``.

    Returns:
      the count, read with ``ast`` (nothing is imported).
    """
    return sum(
        isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
        for text in task.hidden_tests.values()
        for node in ast.parse(text).body
    )


def parse_runner_output(rc: int, output: str) -> int:
    """Tests passed, from the runner's exit status and output.

    Args:
      rc: the runner's exit status; anything but 0 (a crash, a timeout) counts as none passed.
      output: its combined output; the count is read from the last line, ``passed K/N``.

    Returns:
      K, or 0 when the last line is not a result line.
    """
    lines = output.strip().splitlines()
    match = _RESULT_LINE.fullmatch(lines[-1].strip()) if lines else None
    return int(match.group(1)) if rc == 0 and match else 0


def run_hidden_tests(task: AgentTask, sandbox, timeout_s: float) -> tuple[int, int]:
    """Writes the hidden tests and the runner into a sandbox and runs them there, confined.

    Args:
      task: the task whose hidden tests to run.
      sandbox: a ``sandbox.Sandbox`` holding the agent's edited repository.
      timeout_s: wall-clock limit of the test run.

    Returns:
      (passed, total): total is ``hidden_test_count(task)``, whatever the runner printed.
    """
    for path, text in task.hidden_tests.items():
        sandbox.write_file(path, text)
    sandbox.write_file(RUNNER_PATH, RUNNER_SOURCE)
    modules = [path.removesuffix(".py").replace("/", ".") for path in task.hidden_tests]
    rc, output = sandbox.run_python([RUNNER_PATH, *modules], timeout_s)
    return parse_runner_output(rc, output), hidden_test_count(task)
