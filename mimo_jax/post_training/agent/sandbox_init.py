"""The init process of a sandboxed command (``sandbox.py``): run by ``unshare`` inside the
command's fresh user, network, mount and PID namespaces as ``python -I -S sandbox_init.py SPEC``.

It remounts every mount read-only, puts a private tmpfs on ``/tmp``, covers the hidden
directories, binds the sandbox directory read-write, locks all of it with a nested user + mount
namespace, applies the resource limits and runs the command as ``SANDBOX_UID``. Standard library
only: it runs isolated (``-I -S``), without the package on its path.
"""

import ctypes
import json
import os
import re
import resource
import signal
import sys

# uid and gid the command sees; everything else (host root included) shows as "nobody".
SANDBOX_UID = 1000
SETUP_FAILED = 125  # the init's exit code when confinement could not be set up

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_REMOUNT, _MS_BIND = 1, 2, 4, 32, 4096
# mountinfo per-mount options -> mount(2) flags
_MOUNT_FLAGS = {"ro": 1, "nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024}
_MOUNT_FLAGS |= {"nodiratime": 2048, "relatime": 1 << 21}
_CLONE_NEWNS, _CLONE_NEWUSER = 0x00020000, 0x10000000


def mounts() -> list[dict[str, str]]:
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
    for mount in mounts():
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
    for mount in mounts():
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
        os._exit(SETUP_FAILED)
    if child == 0:
        try:
            _exec_command(spec)
        except OSError as e:
            print(f"agent sandbox: cannot run {spec['argv'][0]}: {e}", file=sys.stderr)
        os._exit(SETUP_FAILED)
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            os._exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    _init_main(json.loads(sys.argv[1]))
