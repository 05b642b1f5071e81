"""The agent task suite: determinism, a train/held-out split with no shared instance, hidden tests
that fail the buggy repository and pass the reference fix (and no other operator, constant or
bound), and no answer leaked through the files or the issue."""

import os
import re
import sys
import types

import pytest

from mimo_jax.post_training.agent import repos
from mimo_jax.post_training.agent.sandbox import Sandbox

FULL = {split: repos.suite(split) for split in repos.SPLITS}
# A sample of each split with every bug kind, for the tests that run the hidden tests.
SAMPLE = repos.suite("train", 6, seed=3) + repos.suite("heldout", 6, seed=5)


def _fixed(task, new=None):
    """The task's files with the buggy line replaced by ``new`` (default: the reference fix)."""
    path, old, ref = task.fix
    files = dict(task.files)
    files[path] = files[path].replace(old, ref if new is None else new)
    return files


def _run_hidden(task, files):
    """(passed, total) of the hidden tests, run by ``repos.run_hidden_tests`` in a sandbox."""
    with Sandbox(files) as sandbox:
        for path in [*task.hidden_tests, repos.RUNNER_PATH]:
            assert not os.path.exists(os.path.join(sandbox.root, path))
        return repos.run_hidden_tests(task, sandbox, timeout_s=30.0)


def _passes_in_process(task, files) -> bool:
    """Whether every hidden test passes on ``files``, imported in this process (fast, for the
    many wrong-fix variants; the runner itself is exercised by ``_run_hidden``)."""
    ((path, source),) = files.items()
    (test_source,) = task.hidden_tests.values()
    module = types.ModuleType(path.removesuffix(".py"))
    exec(source, module.__dict__)
    namespace = {}
    saved = sys.modules.get(module.__name__)
    sys.modules[module.__name__] = module
    try:
        exec(test_source, namespace)
    finally:
        if saved is None:
            del sys.modules[module.__name__]
        else:
            sys.modules[module.__name__] = saved
    tests = [f for name, f in namespace.items() if name.startswith("test_")]
    assert len(tests) == repos.hidden_test_count(task)
    for test in tests:
        try:
            test()
        except AssertionError:
            return False
    return True


def _mutations(line: str) -> set[str]:
    """Lines that differ from ``line`` by one integer literal (0..10) or one of + - *."""
    head, expr = line.split("return ", 1)
    out = set()
    for match in re.finditer(r"\d+|[-+*]", expr):
        token = match.group()
        options = [str(v) for v in range(11)] if token.isdigit() else ["+", "-", "*"]
        for option in options:
            out.add(f"{head}return {expr[: match.start()]}{option}{expr[match.end() :]}")
    return out - {line}


def _instance(task):
    """What the fix changes: the ``def`` line above the buggy line, the buggy and fixed lines."""
    path, old, new = task.fix
    lines = task.files[path].splitlines()
    return lines[lines.index(old) - 1], old, new


def test_suite_is_deterministic_and_seeded():
    assert repos.suite("train", 20, seed=1) == repos.suite("train", 20, seed=1)
    assert repos.suite("train", 20, seed=1) != repos.suite("train", 20, seed=2)
    assert repos.suite("heldout") == FULL["heldout"]
    tasks = repos.suite("heldout", 9, seed=4)
    assert [t.name for t in tasks] == [f"heldout/{i:04d}" for i in range(9)]
    assert [t.bug for t in tasks] == list(repos.BUGS) * 3


def test_train_and_heldout_share_no_instance():
    train = {_instance(t) for t in FULL["train"]}
    heldout = {_instance(t) for t in FULL["heldout"]}
    assert len(train) == len(FULL["train"]) and len(heldout) == len(FULL["heldout"])
    assert not train & heldout
    for split, others in (("train", heldout), ("heldout", train)):
        for seed in range(3):
            assert not {_instance(t) for t in repos.suite(split, 30, seed=seed)} & others
    # Every bug kind is held out and trained on, and held-out functions are seen in training.
    for split in repos.SPLITS:
        assert {t.bug for t in FULL[split]} == set(repos.BUGS)
    train_defs = {d.split("(")[0] for d, _, _ in train}
    assert {d.split("(")[0] for d, _, _ in heldout} <= train_defs


@pytest.mark.parametrize("task", SAMPLE, ids=lambda t: t.name)
def test_hidden_tests_fail_the_bug_and_pass_the_fix(task):
    passed, total = _run_hidden(task, task.files)
    assert total >= 4 and passed < total
    passed, total = _run_hidden(task, _fixed(task))
    assert passed == total


@pytest.mark.parametrize("split", repos.SPLITS)
def test_hidden_tests_reject_every_other_edit_of_the_line(split):
    for task in repos.suite(split, 30, seed=7):
        path, old, new = task.fix
        assert _passes_in_process(task, _fixed(task))
        assert not _passes_in_process(task, task.files)
        for wrong in _mutations(new):
            assert not _passes_in_process(task, _fixed(task, wrong)), (task.name, wrong)


@pytest.mark.parametrize("split", repos.SPLITS)
def test_repository_reveals_neither_the_fix_nor_the_tests(split):
    for task in FULL[split]:
        path, old, new = task.fix
        assert list(task.files) == [path] and task.issue.startswith(f"{path}: ")
        assert task.files[path].count(old) == 1 and old != new
        assert not any(new in text for text in task.files.values())
        assert not any("#" in text or "test" in text for text in task.files.values())
        assert not any(".git" in p or "test" in p for p in task.files)
        assert set(task.hidden_tests).isdisjoint(task.files)
        assert old.strip() not in task.issue and new.strip() not in task.issue
        if task.bug == "constant":
            wrong = old.rsplit(" ", 1)[1]
            assert wrong not in re.findall(r"(?<![A-Za-z0-9_])\d+", task.issue), task.issue


def test_runner_ignores_bytecode_the_agent_cached_before_its_edit():
    # The fix keeps the file's size and usually lands within the same second as the cached import,
    # so a runner reading __pycache__ would test the buggy code.
    task = next(t for t in SAMPLE if len(t.fix[1]) == len(t.fix[2]))
    path, old, new = task.fix
    module = path.removesuffix(".py")
    with Sandbox(task.files) as sandbox:
        cached = sandbox.bash(
            f"python3 -c 'import sys; sys.dont_write_bytecode = False; import {module}'"
            " && ls __pycache__"
        )
        assert cached.ok and module in cached.output
        assert sandbox.str_replace(path, old, new).ok
        passed, total = repos.run_hidden_tests(task, sandbox, timeout_s=30.0)
    assert passed == total


def test_runner_output_parsing():
    assert repos.parse_runner_output(0, "noise\npassed 3/6\n") == 3
    assert repos.parse_runner_output(1, "passed 6/6\n") == 0
    assert repos.parse_runner_output(0, "passed 6/6\nmore") == 0
    assert repos.parse_runner_output(0, "") == 0


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="'valid'"):
        repos.suite("valid")
    with pytest.raises(ValueError, match="n must be"):
        repos.suite("train", -1)
    task = FULL["train"][0]
    with pytest.raises(ValueError, match="occur once"):
        repos.AgentTask(**{**vars(task), "fix": (task.fix[0], "nowhere", "x")})
