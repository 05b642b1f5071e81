"""A per-episode sandbox for agentic RL: a directory, and shell commands confined to it.

Each command runs in fresh namespaces (util-linux ``unshare``, then ``sandbox_init.py`` as the
init):
no network (a network namespace); every mount read-only, a private tmpfs on ``/tmp``, the sandbox
directory bound read-write at its own path and the mimo-jax checkout (task suite, hidden tests,
git history) covered by an empty one; then a nested user + mount namespace locks those mounts and
runs the command as uid 1000 without capabilities, unable to remount, unmount or nest further. A
PID namespace kills whatever the command leaves behind when it exits. Processes are capped by a
pids cgroup per command when one is writable (needed as root, whom ``RLIMIT_NPROC`` does not
bind), else by ``RLIMIT_NPROC``; ``RLIMIT_CPU``, ``RLIMIT_AS`` and ``RLIMIT_FSIZE`` apply, no core
dumps; the host enforces the wall time and the output cap and kills the whole tree. There is no
unconfined fallback: ``Sandbox()`` raises where this cannot be set up. Disk use in the sandbox
directory is bounded only by the file-size and wall-time limits.
"""

import contextlib
import dataclasses
import errno
import functools
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from mimo_jax.post_training.agent import sandbox_init

_MAX_COMMAND_BYTES = 64 << 10  # one argv string may not exceed 128 KiB (MAX_ARG_STRLEN)


@dataclasses.dataclass(frozen=True)
class Limits:
    """Resource limits of one command.

    Attributes:
      wall_s: wall-time limit of one command, seconds.
      output_bytes: stdout+stderr cap; longer output is cut, the command killed, and a marker
        line appended.
      cpu_s: ``RLIMIT_CPU``, seconds.
      memory_bytes: ``RLIMIT_AS`` of each process.
      processes: most processes and threads alive at once in one command (init included).
      file_bytes: ``RLIMIT_FSIZE``, the largest file a command may write.
      tmp_bytes: size of the command's private ``/tmp`` tmpfs.
    """

    wall_s: float = 5.0
    output_bytes: int = 2048
    cpu_s: int = 5
    memory_bytes: int = 512 << 20
    processes: int = 32
    file_bytes: int = 8 << 20
    tmp_bytes: int = 16 << 20

    def __post_init__(self):
        if not self.wall_s > 0:
            raise ValueError(f"Limits.wall_s must be > 0, got {self.wall_s}")
        for name in ("output_bytes", "cpu_s", "memory_bytes", "file_bytes", "tmp_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"Limits.{name} must be >= 1, got {getattr(self, name)}")
        if self.processes < 2:
            raise ValueError(f"Limits.processes must be >= 2 (init, command), got {self.processes}")


@dataclasses.dataclass(frozen=True)
class ToolResult:
    """The outcome of one tool call.

    Attributes:
      output: what the model sees.
      ok: False for any error (nonzero exit, timeout, truncated output, refused, bad arguments).
    """

    output: str
    ok: bool


@dataclasses.dataclass(frozen=True)
class _Run:
    returncode: int
    output: str  # capped, with marker lines
    timed_out: bool
    failed: bool  # nonzero exit, timeout, truncated output or process limit reached


class Sandbox:
    """A temporary directory holding one episode's repository, and tools confined to it.

    Args:
      files: initial files, relative path -> text content.
      limits: per-command resource limits.

    Raises:
      ValueError: a path in ``files`` is absolute or leaves the sandbox.
      RuntimeError: the machine cannot confine commands (no unprivileged user namespaces, or
        root without a writable pids cgroup).
    """

    def __init__(self, files: dict[str, str], limits: Limits = Limits()):
        if not isinstance(limits, Limits):
            raise TypeError(f"limits must be a Limits, got {type(limits).__name__}")
        _check_support()
        self.limits = limits
        self.root = tempfile.mkdtemp(prefix="mimo_sandbox_")
        self._closed = False
        try:
            for path, content in files.items():
                self.write_file(path, content)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def bash(self, command: str) -> ToolResult:
        """Runs ``bash -c command`` in the sandbox directory, confined.

        Args:
          command: the shell command.

        Returns:
          The combined stdout and stderr, capped, with a marker line on truncation
          ("[output truncated at N bytes]"), timeout ("[timed out after S s]") or a nonzero
          exit ("[exit code N]"); ``ok`` is False in all three cases.
        """
        if not isinstance(command, str):
            return ToolResult(f"bash: command must be a str, got {type(command).__name__}", False)
        if len(command.encode("utf-8", "surrogateescape")) > _MAX_COMMAND_BYTES:
            return ToolResult(f"bash: command longer than {_MAX_COMMAND_BYTES} bytes", False)
        run = self._run(["/bin/bash", "-c", command], self.limits.wall_s, kill_on_cap=True)
        return ToolResult(run.output, not run.failed)

    def run_python(self, args: list[str], timeout_s: float) -> tuple[int, str]:
        """Runs this interpreter on ``args`` in the sandbox, under the same confinement.

        For the environment (hidden tests); unlike ``bash``, output past the cap is read and
        dropped rather than killing the process, so a verbose test run still gets its verdict.

        Args:
          args: arguments after the interpreter, e.g. ``["-m", "pytest", "-q", "test_x.py"]``.
          timeout_s: wall-time limit, seconds.

        Returns:
          ``(exit code, capped output)``; the exit code is ``-9`` on timeout.
        """
        if not (isinstance(args, list) and all(isinstance(a, str) for a in args)):
            raise TypeError(f"args must be a list of str, got {args!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        run = self._run([sys.executable, *args], timeout_s, kill_on_cap=False)
        return (-signal.SIGKILL if run.timed_out else run.returncode), run.output

    def str_replace(self, path: str, old: str, new: str) -> ToolResult:
        """Replaces the one occurrence of ``old`` in a file of the sandbox by ``new``.

        Args:
          path: file path relative to the sandbox directory.
          old: text that must occur exactly once in the file.
          new: replacement text.

        Returns:
          "replaced 1 occurrence in <path>", or an error (``ok`` False): a path that is absolute
          or leaves the sandbox, a missing file, ``old`` empty, absent or not unique.
        """
        for name, value in (("path", path), ("old", old), ("new", new)):
            if not isinstance(value, str):
                return ToolResult(f"str_replace: {name} must be a string", False)
        try:
            full = self._resolve(path)
        except ValueError as e:
            return ToolResult(f"str_replace: {e}", False)
        if not os.path.lexists(full):
            return ToolResult(f"str_replace: no such file: {path}", False)
        if not os.path.isfile(full):
            return ToolResult(f"str_replace: not a regular file: {path}", False)
        if not old:
            return ToolResult("str_replace: old string must not be empty", False)
        try:
            with open(full, encoding="utf-8", newline="") as f:
                content = f.read()
        except UnicodeDecodeError:
            return ToolResult(f"str_replace: {path} is not UTF-8 text", False)
        except OSError as e:
            return ToolResult(f"str_replace: cannot read {path}: {e.strerror}", False)
        count = _count_overlapping(content, old)
        if count == 0:
            return ToolResult(f"old string not found in {path}", False)
        if count > 1:
            message = f"old string occurs {count} times in {path}; it must be unique"
            return ToolResult(message, False)
        with open(full, "w", encoding="utf-8", newline="") as f:
            f.write(content.replace(old, new, 1))
        return ToolResult(f"replaced 1 occurrence in {path}", True)

    def read_file(self, path: str) -> str:
        """Reads a file of the sandbox (host side, unconfined).

        Args:
          path: relative to the sandbox directory.

        Returns:
          The file's text (UTF-8).

        Raises:
          ValueError: ``path`` is absolute or leaves the sandbox.
        """
        with open(self._resolve(path), encoding="utf-8", newline="") as f:
            return f.read()

    def write_file(self, path: str, content: str) -> None:
        """Writes a file of the sandbox, creating its directories (host side, unconfined).

        Args:
          path: relative to the sandbox directory.
          content: the text to write (UTF-8).

        Raises:
          ValueError: ``path`` is absolute or leaves the sandbox.
          TypeError: ``content`` is not a string.
        """
        if not isinstance(content, str):
            raise TypeError(f"content of {path!r} must be a str, got {type(content).__name__}")
        full = self._resolve(path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w", encoding="utf-8", newline="") as f:
            f.write(content)

    def close(self) -> None:
        """Removes the sandbox directory; idempotent."""
        if not self._closed:
            self._closed = True
            shutil.rmtree(self.root, onerror=_make_writable_and_retry)

    def _resolve(self, path: str) -> str:
        """The real path of ``path``, which must stay inside the sandbox after symlinks."""
        if not isinstance(path, str) or not path:
            raise ValueError(f"path must be a non-empty string, got {path!r}")
        if os.path.isabs(path) or ".." in path.replace("\\", "/").split("/"):
            raise ValueError(f"path {path!r} must be relative to the sandbox, without '..'")
        if self._closed:
            raise ValueError(f"sandbox {self.root} is closed")
        root = os.path.realpath(self.root)
        full = os.path.realpath(os.path.join(root, path))
        if full == root or os.path.commonpath([root, full]) != root:
            raise ValueError(f"path {path!r} leaves the sandbox")
        return full

    def _run(self, argv: list[str], wall_s: float, kill_on_cap: bool) -> _Run:
        if self._closed:
            raise ValueError(f"sandbox {self.root} is closed")
        return _confined_run(self.root, argv, self.limits, wall_s, kill_on_cap)


def _count_overlapping(text: str, sub: str) -> int:
    count, start = 0, text.find(sub)
    while start >= 0:
        count += 1
        start = text.find(sub, start + 1)
    return count


def _make_writable_and_retry(function, path, exc_info):
    # A command may leave a directory without write or search permission.
    parent = os.path.dirname(path)
    os.chmod(parent, 0o700)
    if os.path.isdir(path) and not os.path.islink(path):
        os.chmod(path, 0o700)
        shutil.rmtree(path, onerror=_make_writable_and_retry)
    else:
        function(path)


# --- host side -----------------------------------------------------------------------------------


@functools.cache
def _check_support() -> None:
    """Raises RuntimeError unless a trivial command runs confined here (once per process)."""
    if shutil.which("unshare") is None:
        raise RuntimeError("agent sandbox needs unprivileged user namespaces and `unshare`")
    if os.getuid() == 0 and _pids_cgroup_parent() is None:
        raise RuntimeError(
            "agent sandbox run as root needs a writable pids cgroup (RLIMIT_NPROC does not "
            "bind uid 0, so nothing would stop a fork bomb); run as a non-root user instead"
        )
    root = tempfile.mkdtemp(prefix="mimo_sandbox_probe_")
    try:
        run = _confined_run(root, ["/bin/sh", "-c", "true"], Limits(), 10.0, kill_on_cap=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if run.returncode != 0:
        raise RuntimeError(
            "agent sandbox needs unprivileged user namespaces (user, mount, network, pid); "
            f"a confined `true` failed here: {run.output.strip()}"
        )


@functools.cache
def _pids_cgroup_parent() -> str | None:
    """A writable pids cgroup directory under which to make one cgroup per command, or None."""
    own = {}  # controller (or "" for cgroup v2) -> this process's cgroup path
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(","):
                own[controller] = path
    for mount in sandbox_init.mounts():
        if mount["fstype"] == "cgroup" and "pids" in mount["super_options"].split(","):
            candidate = mount["mount_point"] + own.get("pids", "/")
        elif mount["fstype"] == "cgroup2" and "" in own:
            candidate = mount["mount_point"] + own[""]
            try:
                with open(os.path.join(candidate, "cgroup.subtree_control")) as f:
                    if "pids" not in f.read().split():
                        continue
            except OSError:
                continue
        else:
            continue
        candidate = os.path.normpath(candidate)
        if os.access(candidate, os.W_OK):
            return candidate
    return None


def _confined_run(root: str, argv: list[str], limits: Limits, wall_s: float, kill_on_cap: bool):
    spec = {
        "root": root,
        "argv": argv,
        "env": {
            "PATH": f"{os.path.dirname(sys.executable)}:/usr/local/bin:/usr/bin:/bin",
            "HOME": root,
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
        },
        "hide": _hidden_dirs(root),
        "limits": dataclasses.asdict(limits),
        "cgroup_fd": None,
    }
    cgroup = _PidsCgroup(limits.processes) if _pids_cgroup_parent() is not None else None
    if cgroup is not None:
        spec["cgroup_fd"] = cgroup.procs_fd
    command = [
        *("unshare", "--user", "--map-root-user", "--net", "--mount", "--pid", "--fork"),
        *("--kill-child", "--mount-proc", "--"),
        *(sys.executable, "-I", "-S", os.path.abspath(sandbox_init.__file__), json.dumps(spec)),
    ]
    try:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            pass_fds=() if cgroup is None else (cgroup.procs_fd,),
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        )
    except BaseException:
        if cgroup is not None:
            cgroup.remove()
        raise
    if cgroup is not None:
        cgroup.close_procs_fd()
    try:
        data, timed_out, truncated = _read_capped(proc, wall_s, limits.output_bytes, kill_on_cap)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        hit_process_limit = cgroup is not None and cgroup.hit_limit()
        if cgroup is not None:
            cgroup.remove()
    text = data.decode("utf-8", errors="replace")
    markers = []
    if truncated:
        markers.append(f"[output truncated at {limits.output_bytes} bytes]")
    if hit_process_limit:
        markers.append(f"[process limit of {limits.processes} reached]")
    if timed_out:
        markers.append(f"[timed out after {wall_s} s]")
    elif proc.returncode != 0 and not (truncated and kill_on_cap):
        markers.append(f"[exit code {proc.returncode}]")
    if markers:
        text += ("\n" if text and not text.endswith("\n") else "") + "\n".join(markers)
    return _Run(proc.returncode, text, timed_out, bool(markers))


def _read_capped(proc: subprocess.Popen, wall_s: float, cap: int, kill_on_cap: bool):
    """Reads the output up to ``cap`` bytes, until exit or ``wall_s``; never buffers more."""
    deadline = time.monotonic() + wall_s
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    data, truncated, timed_out = bytearray(), False, False
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            if not selector.select(remaining):
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            room = cap - len(data)
            data += chunk[:room]
            if len(chunk) > room:
                truncated = True
                if kill_on_cap:
                    return bytes(data), False, True
    if not timed_out:
        # The output closes before the process exits when the command closed its own stdout.
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            timed_out = True
    return bytes(data), timed_out, truncated


class _PidsCgroup:
    """A pids cgroup for one command: its process cap, and a way to kill every process in it."""

    def __init__(self, processes: int):
        self.path = tempfile.mkdtemp(prefix="mimo_sandbox_", dir=_pids_cgroup_parent())
        with open(os.path.join(self.path, "pids.max"), "w") as f:
            f.write(str(processes))
        # Opened here, written by the namespace's init: the kernel checks the opener's rights.
        self.procs_fd = os.open(os.path.join(self.path, "cgroup.procs"), os.O_WRONLY)

    def close_procs_fd(self) -> None:
        if self.procs_fd >= 0:
            os.close(self.procs_fd)
            self.procs_fd = -1

    def hit_limit(self) -> bool:
        """Whether a fork failed because of the cap."""
        with open(os.path.join(self.path, "pids.events")) as f:
            events = dict(line.split() for line in f)
        return int(events.get("max", 0)) > 0

    def remove(self) -> None:
        """Kills whatever is left in the cgroup and removes it."""
        self.close_procs_fd()
        # Processes of a dying PID namespace may take a moment to leave the cgroup.
        for _ in range(1000):
            try:
                os.rmdir(self.path)
                return
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
            with open(os.path.join(self.path, "cgroup.procs")) as f:
                for pid in f.read().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
            time.sleep(0.002)
        raise RuntimeError(f"agent sandbox: cgroup {self.path} still has processes after SIGKILL")


def _hidden_dirs(root: str) -> list[str]:
    """Directories the command must not read: the mimo-jax checkout (task suite, hidden tests,
    git history), or only the package when the interpreter or the sandbox lives in the checkout."""
    package = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
    checkout = os.path.dirname(package)
    needed = [os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.executable, root)]
    for candidate in (checkout, package):
        in_git_checkout = candidate != checkout or os.path.isdir(os.path.join(checkout, ".git"))
        if in_git_checkout and all(os.path.commonpath([candidate, p]) != candidate for p in needed):
            return [candidate]
    return []
