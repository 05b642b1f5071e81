"""A per-episode sandbox for agentic RL: a directory, and shell commands confined to it.

Each command runs in fresh namespaces (util-linux ``unshare``, then this file as the init):
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
import ctypes
import dataclasses
import errno
import functools
import json
import os
import re
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time

# uid and gid the command sees; everything else (host root included) shows as "nobody".
SANDBOX_UID = 1000
_MAX_COMMAND_BYTES = 64 << 10  # one argv string may not exceed 128 KiB (MAX_ARG_STRLEN)
_SETUP_FAILED = 125  # the init's exit code when confinement could not be set up

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_REMOUNT, _MS_BIND = 1, 2, 4, 32, 4096
# mountinfo per-mount options -> mount(2) flags
_MOUNT_FLAGS = {"ro": 1, "nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024}
_MOUNT_FLAGS |= {"nodiratime": 2048, "relatime": 1 << 21}
_CLONE_NEWNS, _CLONE_NEWUSER = 0x00020000, 0x10000000


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
    for mount in _mounts():
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
        *(sys.executable, "-I", "-S", os.path.abspath(__file__), json.dumps(spec)),
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


def _mounts() -> list[dict[str, str]]:
    """This process's visible mounts, from /proc/self/mountinfo (see proc(5)).

    Of several mounts stacked on one mount point only the top one, listed last, is kept: it is
    the one a path reaches."""
    mounts = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields, _, tail = line.rstrip("\n").partition(" - ")
            fields, tail = fields.split(" "), tail.split(" ")
            mount_point = _unescape(fields[4])
            mounts[mount_point] = {
                "mount_point": mount_point,
                "options": fields[5],
                "fstype": tail[0],
                "super_options": tail[2] if len(tail) > 2 else "",
            }
    return list(mounts.values())


def _unescape(path: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


# --- inside the namespaces: the init process -----------------------------------------------------


def _libc_call(name: str, *args) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}{args!r}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = ""):
    encode = lambda s: None if s is None else s.encode()  # noqa: E731
    _libc_call("mount", encode(source), encode(target), encode(fstype), flags, encode(data))


def _remount_read_only(mount: dict[str, str]) -> None:
    # Flags the parent namespace set (nosuid, nodev, noexec, atime) are locked: repeat them.
    flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY
    for option in mount["options"].split(","):
        flags |= _MOUNT_FLAGS.get(option, 0)
    _mount(None, mount["mount_point"], None, flags)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _confine(spec: dict) -> None:
    """Sets up the mounts and the nested user namespace of this init process."""
    limits = spec["limits"]
    if spec["cgroup_fd"] is not None:
        os.write(spec["cgroup_fd"], b"0")
        os.close(spec["cgroup_fd"])
    root_fd = os.open(spec["root"], os.O_PATH | os.O_DIRECTORY)
    # Exactly one more user namespace (the nested one below) may be created from here on.
    _write("/proc/sys/user/max_user_namespaces", "1")
    for mount in _mounts():
        if mount["mount_point"] != "/proc" and not mount["mount_point"].startswith("/proc/"):
            _remount_read_only(mount)
    for path in spec["hide"]:
        _mount("none", path, "tmpfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV, "size=4k,mode=555")
    size = limits["tmp_bytes"]
    _mount("none", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={size},mode=1777")
    os.makedirs(spec["root"], exist_ok=True)
    _mount(f"/proc/self/fd/{root_fd}", spec["root"], None, _MS_BIND)
    _mount(None, spec["root"], None, _MS_REMOUNT | _MS_BIND | _MS_NOSUID | _MS_NODEV)
    os.close(root_fd)
    # A user namespace nested under a new mount namespace locks every mount flag set above.
    _libc_call("unshare", _CLONE_NEWUSER | _CLONE_NEWNS)
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{SANDBOX_UID} 0 1")
    _write("/proc/self/gid_map", f"{SANDBOX_UID} 0 1")
    for mount in _mounts():
        if mount["mount_point"] == "/proc":
            _remount_read_only(mount)
    os.chdir(spec["root"])


def _exec_command(spec: dict) -> None:
    limits = spec["limits"]
    # SIGXCPU at the soft limit tells the command why it died; SIGKILL a second later.
    resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_s"], limits["cpu_s"] + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if spec["cgroup_fd"] is None:
        resource.setrlimit(resource.RLIMIT_NPROC, (limits["processes"],) * 2)
    # Python ignores these at startup and an exec keeps ignored signals; shells expect defaults.
    for signum in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(signum, signal.SIG_DFL)
    os.execve(spec["argv"][0], spec["argv"], spec["env"])


def _init_main(spec: dict) -> None:
    """PID 1 of the command's namespaces: confine, run the command, reap, exit with its status."""
    try:
        _confine(spec)
        child = os.fork()
    except OSError as e:
        print(f"agent sandbox: setup failed: {e}", file=sys.stderr)
        os._exit(_SETUP_FAILED)
    if child == 0:
        try:
            _exec_command(spec)
        except OSError as e:
            print(f"agent sandbox: cannot run {spec['argv'][0]}: {e}", file=sys.stderr)
        os._exit(_SETUP_FAILED)
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            os._exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    _init_main(json.loads(sys.argv[1]))
