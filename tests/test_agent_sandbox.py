"""The agent sandbox: commands run confined, hostile ones are stopped and leave nothing behind."""

import os
import resource
import time
import uuid

import pytest

from mimo_jax.post_training.agent import sandbox as sandbox_lib
from mimo_jax.post_training.agent.sandbox import Limits, Sandbox, ToolResult

WALL_S = 2.0
LIMITS = Limits(wall_s=WALL_S)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = {"calc.py": "def add(a, b):\n    return a - b\n", "pkg/util.py": "X = 1\n"}


@pytest.fixture
def sb():
    with Sandbox(FILES, LIMITS) as sandbox:
        yield sandbox


def _sandbox_pids(root: str) -> list[int]:
    """Live processes started by commands of the sandbox at ``root`` (their HOME is ``root``)."""
    marker = f"HOME={root}".encode()
    pids = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except (OSError, ValueError):
            continue
        if marker in environ:
            pids.append(int(name))
    return pids


def _snapshot(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _assert_stopped(sb: Sandbox, result: ToolResult, outside, before) -> None:
    """The command failed visibly, left no process, changed nothing outside; the sandbox works."""
    assert not result.ok, result
    assert result.output.strip(), "an error must say something to the model"
    assert _sandbox_pids(sb.root) == []
    assert _snapshot(outside) == before
    assert sb.bash("echo ok") == ToolResult("ok\n", True)


def test_commands_run_in_the_sandbox_and_files_persist(sb):
    assert sb.bash("pwd") == ToolResult(sb.root + "\n", True)
    assert sb.bash("cat calc.py").output == FILES["calc.py"]
    assert sb.bash("echo 2 > new.txt && mkdir -p d && echo 3 > d/x").ok
    assert sb.bash("cat new.txt d/x pkg/util.py") == ToolResult("2\n3\nX = 1\n", True)
    assert sb.read_file("new.txt") == "2\n"
    sb.write_file("hidden/test_calc.py", "assert True\n")
    assert sb.bash("ls hidden").output == "test_calc.py\n"
    # stdout and stderr share one stream, in order; stdin is empty.
    assert sb.bash("echo out; echo err >&2; cat") == ToolResult("out\nerr\n", True)


def test_nonzero_exit_is_an_error_with_its_code(sb):
    assert sb.bash("echo partial; exit 3") == ToolResult("partial\n[exit code 3]", False)
    assert sb.bash("false") == ToolResult("[exit code 1]", False)


def test_output_cap_truncates_and_marks():
    with Sandbox({}, Limits(wall_s=WALL_S, output_bytes=100)) as sb:
        result = sb.bash("printf 'a%.0s' $(seq 300)")
        assert result == ToolResult("a" * 100 + "\n[output truncated at 100 bytes]", False)
        assert sb.bash("printf 'a%.0s' $(seq 100)") == ToolResult("a" * 100, True)


@pytest.mark.parametrize(
    "command",
    [
        "echo x > {outside}/outside.txt",
        "rm {outside}/outside.txt",
        "touch {work}/{name}",
        "touch /var/tmp/{name}",
        "touch /dev/shm/{name}",
        "mount -o remount,rw / && touch /var/tmp/{name}",
        "unshare -rm sh -c 'mount -o remount,rw / && touch /var/tmp/{name}'",
        "touch {repo}/{name}",
        "cat {repo}/mimo_jax/post_training/agent/sandbox.py",
    ],
)
def test_nothing_outside_is_writable_or_the_checkout_readable(sb, tmp_path, command):
    (tmp_path / "outside.txt").write_text("before")
    before = _snapshot(tmp_path)
    name = f"mimo_sandbox_probe_{uuid.uuid4().hex}"
    work = os.path.dirname(REPO)
    result = sb.bash(command.format(outside=tmp_path, work=work, repo=REPO, name=name))
    if "{work}" in command and work == "/tmp":
        # A checkout right under /tmp (a CI clone): every command sees /tmp as its own fresh
        # tmpfs, so the write succeeds there; the host's /tmp is checked below.
        assert result.ok and _snapshot(tmp_path) == before
    else:
        _assert_stopped(sb, result, tmp_path, before)
    for directory in (work, "/var/tmp", "/dev/shm", REPO):
        assert not os.path.exists(os.path.join(directory, name))


def test_no_network(sb, tmp_path):
    before = _snapshot(tmp_path)
    command = "python -c \"import socket; socket.create_connection(('1.1.1.1', 80), timeout=2)\""
    result = sb.bash(command)
    _assert_stopped(sb, result, tmp_path, before)
    assert "Network is unreachable" in result.output


def test_fork_bomb_is_capped_and_leaves_no_process(sb, tmp_path):
    before = _snapshot(tmp_path)
    start = time.monotonic()
    result = sb.bash(":(){ :|:& };:; sleep 1")
    assert time.monotonic() - start < WALL_S + 1
    _assert_stopped(sb, result, tmp_path, before)
    assert "fork: retry: Resource temporarily unavailable" in result.output
    if sandbox_lib._pids_cgroup_parent() is not None:
        assert result.output.endswith("[process limit of 32 reached]")
    # Without the trailing sleep the shell exits at once; the PID namespace kills the rest.
    sb.bash(":(){ :|:& };:")
    assert _sandbox_pids(sb.root) == []


def test_infinite_loop_times_out_and_background_processes_die(sb, tmp_path):
    before = _snapshot(tmp_path)
    start = time.monotonic()
    result = sb.bash("sleep 60 & echo started; while true; do :; done")
    assert time.monotonic() - start < WALL_S + 1
    assert result == ToolResult(f"started\n[timed out after {WALL_S} s]", False)
    _assert_stopped(sb, result, tmp_path, before)
    # A command that exits normally does not leave its background jobs running either.
    assert sb.bash("sleep 60 & echo bye") == ToolResult("bye\n", True)
    assert _sandbox_pids(sb.root) == []


def test_gigabytes_of_output_are_cut_quickly(sb, tmp_path):
    before = _snapshot(tmp_path)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    result = sb.bash("yes | head -c 3000000000")
    assert time.monotonic() - start < 1.0
    assert result.output == "y\n" * 1024 + "[output truncated at 2048 bytes]"
    _assert_stopped(sb, result, tmp_path, before)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    assert peak_kib < 64 << 10, f"host memory grew by {peak_kib} KiB"


def test_memory_cpu_and_file_size_limits():
    limits = Limits(wall_s=4.0, cpu_s=1, file_bytes=1 << 20)
    with Sandbox({}, limits) as sb:
        result = sb.bash("python -c 'x = bytearray(2 << 30)'")
        assert not result.ok and "MemoryError" in result.output
        start = time.monotonic()
        result = sb.bash("while true; do :; done")
        # SIGXCPU kills the shell after 1 s of CPU, well before the 4 s wall limit.
        assert time.monotonic() - start < 3.0
        assert result == ToolResult(f"[exit code {128 + 24}]", False)
        result = sb.bash("head -c 5000000 /dev/zero > big")
        assert not result.ok and "File size limit exceeded" in result.output
        assert os.path.getsize(os.path.join(sb.root, "big")) == 1 << 20


def test_run_python_reports_exit_code_and_drains_long_output():
    with Sandbox({"t.py": "import sys\nprint('x' * 5000)\nsys.exit(3)\n"}, LIMITS) as sb:
        code, output = sb.run_python(["t.py"], timeout_s=WALL_S)
        assert code == 3
        assert output == "x" * 2048 + "\n[output truncated at 2048 bytes]\n[exit code 3]"
        assert sb.run_python(["-c", "print('hi')"], timeout_s=WALL_S) == (0, "hi\n")
        code, output = sb.run_python(["-c", "while True: pass"], timeout_s=1.0)
        assert (code, output) == (-9, "[timed out after 1.0 s]")


def test_host_side_files_refuse_escapes(sb):
    assert sb.bash("ln -s /etc/passwd link && ln -s .. up").ok
    for path in ("link", "up/x", "/etc/passwd", "../x", "pkg/../../x", ""):
        with pytest.raises(ValueError, match="path"):
            sb.read_file(path)
        with pytest.raises(ValueError, match="path"):
            sb.write_file(path, "x")


@pytest.mark.parametrize("path", ["/etc/evil", "../evil", "pkg/../../evil", "a/../b", ""])
def test_constructor_refuses_bad_paths_and_cleans_up(tmp_path, monkeypatch, path):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with pytest.raises(ValueError, match=f"path {path!r}|non-empty"):
        Sandbox({"ok.py": "", path: "x"}, LIMITS)
    assert list(tmp_path.iterdir()) == []
    assert not os.path.exists("/etc/evil")


def test_close_removes_everything_and_is_idempotent():
    sb = Sandbox(FILES, LIMITS)
    root = sb.root
    assert sb.bash("mkdir -p locked/inner && touch locked/inner/f && chmod 000 locked").ok
    sb.close()
    assert not os.path.exists(root)
    sb.close()
    with pytest.raises(ValueError, match="closed"):
        sb.bash("true")


def test_limits_are_validated():
    with pytest.raises(ValueError, match="wall_s"):
        Limits(wall_s=0)
    with pytest.raises(ValueError, match="processes"):
        Limits(processes=1)
    with pytest.raises(TypeError, match="limits"):
        Sandbox({}, limits={"wall_s": 1})
