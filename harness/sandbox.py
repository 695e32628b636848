"""A sandbox for untrusted Python (model-written MBPP solutions): isolation from the kernel,
and a verdict the program cannot forge.

Isolation. Each run is a fresh bubblewrap sandbox (`bwrap`, Debian package `bubblewrap`):
  - Its own mount namespace. The root is read-only and holds only /usr (with the /bin, /lib
    links), the Python installation, a fresh /proc and a minimal /dev; the one writable place
    is /tmp, a tmpfs of TMPFS_BYTES. The host's other files (the project, data, home
    directories, the host's /tmp) are not there at all.
  - Its own network (loopback only), PID, IPC, UTS and cgroup namespaces: no network, and it
    sees only its own processes, so the host's /proc/<pid>/environ does not exist for it.
  - An unprivileged uid. As root, bwrap keeps only CAP_SETUID and CAP_SETGID, which the prelude
    uses to drop to uid/gid SANDBOX_UID with no groups before any untrusted code exists; that
    clears every capability and makes the kernel mark the process non-dumpable, which closes
    even its own /proc/self/mem to it. As a normal user, bwrap maps the user to SANDBOX_UID in
    a new user namespace with no capabilities and no nested user namespaces. NO_NEW_PRIVS is
    set either way, so setuid binaries do not elevate.
  - Resource limits: CPU seconds, address space, file size, open files, no core files, and
    RLIMIT_NPROC 0 once the worker thread runs: no new thread or process.
  - A clean environment, stdin /dev/null, stdout and stderr read by the parent (which keeps a
    tail and kills the run past OUTPUT_LIMIT bytes), --new-session, --die-with-parent, and a
    wall-clock deadline that SIGKILLs bwrap's process group; when the namespace's init dies the
    kernel kills every process in it, so nothing outlives the run.
The audit hook of harness/sandbox_child.py is a second layer: it refuses process creation and
signals, sockets, ctypes, tracing, gc walks, links, and file changes outside /tmp. It is
tamper-proof: its tables are immutable values in its closure, it calls nothing the program can
redefine, and nothing but the interpreter references it.

The verdict. A run passes only when the parent sees, before the deadline, exit status 0 and,
on a pipe whose read end only the parent holds, exactly `passed <token>`, the token being 128
random bits drawn for this run. The prelude reads the token from a payload descriptor, empties
and closes it before untrusted code exists, and leaves the pass line in the buffer of an
unflushed BufferedWriter on that pipe. The one reference to that writer sits on the value stack
of a primed generator, the vault, which no Python API exposes: gc's object walks are refused
by the hook, and raw memory is out of reach (ctypes refused; /proc/self/mem refused by the hook
and, as root, closed by the kernel). The vault flushes the writer only if the worker frame that
primed it is, when it resumes, back on the line it primed it from: the report call, which that
frame reaches only after the solution and then the tests returned, with callee and arguments
loaded before the program ran. On every other way out (resumed early, thrown into, closed,
collected) the pipe is closed before the writer, so the line is dropped. The program runs in
that worker thread, which cannot install Python signal handlers, and can start no other thread
or process. Hence `open('.passed', 'w')`, os._exit(0) or sys.exit(0) before the asserts,
printing or writing "passed ..." to any descriptor, resuming or closing the vault, rerunning
the worker's code, or a weakref callback or finalizer that fires between the solution and the
tests all end unpassed.

What it cannot do. The asserts share the interpreter with the solution, so a solution can make
them vacuous: a return value whose __eq__ is always True, or shadowed builtins. Those false
passes belong to assert-based tests, not to the sandbox. A program that exploited a
memory-safety bug of CPython itself could read the token; the kernel sandbox still holds then.

Without a working bwrap, run_sandboxed refuses (SandboxUnavailable, naming the package) unless
the caller passes allow_unisolated=True: then the program runs in a plain child process with
the same limits, hook, verdict and deadline but no namespaces, so it can read what the user
can read, the hook alone guards the file system, and as root RLIMIT_NPROC does not apply.
The tests run under CPython 3.11; the forgeries among them also fail under 3.12 and 3.13.
"""
import functools
import json
import math
import os
import re
import secrets
import select
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

SANDBOX_UID = 65534  # "nobody"
TMPFS_BYTES = 32 << 20  # the sandbox's whole writable disk (/tmp)
FILE_BYTES = 16 << 20  # RLIMIT_FSIZE
OPEN_FILES = 64  # RLIMIT_NOFILE
OUTPUT_LIMIT = 1 << 20  # stdout + stderr bytes after which the run is killed
TAIL_BYTES = 4096  # how much of stdout and stderr a result keeps
_INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: `apt-get install bubblewrap`, Fedora: "
                 "`dnf install bubblewrap`), or opt in to running untrusted code without "
                 "isolation with allow_unisolated=True (train.py: --allow-unisolated-exec)")


class SandboxUnavailable(RuntimeError):
    """No kernel sandbox here, and the caller did not opt in to running without one."""


@dataclass
class SandboxResult:
    """Outcome of one sandboxed run."""
    passed: bool
    status: str  # "passed" | "failed" (an assert was false) | "timeout" | "error" (anything else)
    returncode: int  # negative: killed by that signal (-9 after a timeout)
    stdout: str  # the last TAIL_BYTES only
    stderr: str
    seconds: float
    isolated: bool  # False only when run without bwrap by the caller's opt-in


# --- the bwrap command line ---------------------------------------------------------------

def _find_bwrap() -> str | None:
    """The bwrap executable on PATH, or None."""
    return shutil.which("bwrap")


@functools.cache
def _child_source() -> str:
    """The prelude the sandbox runs (harness/sandbox_child.py), read once."""
    return Path(__file__).with_name("sandbox_child.py").read_text()


def _python() -> str:
    """The interpreter the sandbox runs: this one, resolved past venv symlinks."""
    return os.path.realpath(sys.executable)


def _read_only_binds() -> list[str]:
    """bwrap arguments that show the system's /usr and this Python, read-only, and nothing else."""
    args, shown = [], []
    for top in ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"):
        if os.path.islink(top):  # merged /usr: /bin -> usr/bin
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
            shown.append(top)
    python_dirs = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix),
                   os.path.dirname(os.path.dirname(_python()))}
    made = set()
    for path in sorted(python_dirs):
        if any(path == top or path.startswith(top + "/") for top in shown):
            continue
        # bwrap would create the parents (e.g. /root for a pyenv Python) as 0700, closed to
        # the sandbox uid; make them 0755 (empty apart from the way down).
        parts = path.strip("/").split("/")
        for depth in range(1, len(parts)):
            parent = "/" + "/".join(parts[:depth])
            if parent not in made:
                args += ["--perms", "0755", "--dir", parent]
                made.add(parent)
        args += ["--ro-bind", path, path]
    return args


def _bwrap_argv(bwrap: str) -> list[str]:
    """The bwrap command line for one sandbox, options only (_run adds --info-fd and '--')."""
    argv = [bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    if os.geteuid() == 0:  # privileged bwrap: keep just what the prelude needs to become nobody
        argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv += ["--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
                 "--disable-userns"]
    return argv + [*_read_only_binds(), "--proc", "/proc", "--dev", "/dev",
                   "--perms", "1777", "--size", str(TMPFS_BYTES), "--tmpfs", "/tmp",
                   "--remount-ro", "/", "--remount-ro", "/dev",  # /dev/shm would be writable
                   "--chdir", "/tmp", "--hostname", "sandbox"]


@functools.cache
def _bwrap_problem(bwrap: str) -> str | None:
    """None if a trivial program passes in a bwrap sandbox here (checked once), else why not."""
    try:
        result = _run(_bwrap_argv(bwrap), "", "assert True", timeout_s=30.0, memory_mb=1024,
                      audit_hook=True)
    except OSError as e:
        return f"{bwrap} could not be started: {e}"
    if result.passed:
        return None
    return (f"{bwrap} is installed but a trivial program does not pass in it "
            f"(status {result.status}, exit {result.returncode}; it needs bubblewrap >= 0.8 "
            f"and, as a normal user, unprivileged user namespaces): "
            f"{result.stderr.strip()[-500:]}")


def _sandbox_prefix(allow_unisolated: bool) -> list[str]:
    """The bwrap command line to run under, [] when running unisolated by opt-in, else raise."""
    bwrap = _find_bwrap()
    problem = "bwrap was not found on PATH" if bwrap is None else _bwrap_problem(bwrap)
    if problem is None:
        return _bwrap_argv(bwrap)
    if allow_unisolated:
        return []
    raise SandboxUnavailable(f"running model-written code needs a kernel sandbox, but {problem}. "
                             f"To fix: {_INSTALL_HINT}.")


def check_isolation(allow_unisolated: bool = False) -> bool:
    """Whether runs will be sandboxed (False: unisolated, by opt-in); raises SandboxUnavailable
    otherwise. Call it before a long job that ends in MBPP scoring."""
    return bool(_sandbox_prefix(allow_unisolated))


# --- one run ---------------------------------------------------------------------------------

def _collect(proc: subprocess.Popen, result_fd: int, info_fd: int | None, deadline: float):
    """Read stdout/stderr tails, the result pipe and bwrap's --info-fd until the process exits
    and the pipes close, the deadline passes, or the output limit is hit. Returns (tails, result
    line, a pidfd on bwrap's init or None, timed_out, flooded). The process is left
    unreaped, so its group id stays reserved."""
    pidfd = os.pidfd_open(proc.pid)
    buffers = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray(),
               result_fd: bytearray()}
    if info_fd is not None:
        buffers[info_fd] = bytearray()
    selector = selectors.DefaultSelector()
    for fd in (*buffers, pidfd):
        selector.register(fd, selectors.EVENT_READ)
    init_pidfd = None
    exited = timed_out = flooded = False
    output = 0
    try:
        while not flooded and (not exited or len(selector.get_map()) > 0):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = not exited
                break
            for key, _ in selector.select(remaining):
                if key.fd == pidfd:
                    exited = True
                    selector.unregister(pidfd)
                    continue
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    selector.unregister(key.fd)
                    continue
                buffer = buffers[key.fd]
                buffer += chunk
                if key.fd == info_fd:  # bwrap writes it as soon as its init exists
                    match = re.search(rb'"child-pid": *(\d+)', buffer)
                    if match and init_pidfd is None:
                        init_pidfd = os.pidfd_open(int(match.group(1)))
                elif key.fd == result_fd:
                    del buffer[256:]  # the genuine line is 40 bytes
                else:
                    output += len(chunk)
                    del buffer[:-TAIL_BYTES]
                    flooded = output > OUTPUT_LIMIT
    finally:
        selector.close()
        os.close(pidfd)
    tails = [buffers[stream.fileno()].decode("utf-8", "replace")
             for stream in (proc.stdout, proc.stderr)]
    return tails, bytes(buffers[result_fd]), init_pidfd, timed_out, flooded


def _kill_and_wait(proc: subprocess.Popen, init_pidfd: int | None) -> None:
    """SIGKILL the run's process group, then wait (up to 5 s) until bwrap's init is gone.

    bwrap (unisolated: the Python child) leads its own group. bwrap returns as soon as it
    knows the program's exit status, so its init (PID 1 of the sandbox) may outlive it by a
    moment; it dies with bwrap (--die-with-parent) or by itself once the program is gone, and
    the kernel reports its exit only after every process of its PID namespace was killed and
    reaped, so after the wait nothing of the run is left. The leader is not reaped yet, so the
    group id cannot have been reused.
    """
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if init_pidfd is not None:
        select.select([init_pidfd], [], [], 5.0)  # readable once the init has exited
        os.close(init_pidfd)


def _run(prefix: list[str], solution: str, tests: str, *, timeout_s: float, memory_mb: int,
         audit_hook: bool) -> SandboxResult:
    """Run solution then tests under `prefix` (a bwrap command line, or [] for no isolation)."""
    start = time.monotonic()
    token = secrets.token_hex(16)
    isolated = bool(prefix)
    workdir = nullcontext() if isolated else tempfile.TemporaryDirectory(prefix="sandbox-")
    with workdir as host_dir:  # unisolated: the run's directory on the host
        root = "/tmp" if isolated else os.path.realpath(host_dir)
        payload = {"solution": solution, "tests": tests, "token": token, "root": root,
                   "audit_hook": audit_hook,
                   "uid": SANDBOX_UID if isolated and os.geteuid() == 0 else None,
                   "limits": {"cpu_seconds": math.ceil(timeout_s) + 1,
                              "memory_bytes": memory_mb << 20, "file_bytes": FILE_BYTES,
                              "open_files": OPEN_FILES}}
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": root, "TMPDIR": root}
        result_read, result_write = os.pipe()
        info_read, info_write = os.pipe() if isolated else (None, None)
        try:
            with tempfile.TemporaryFile() as payload_file:
                payload_file.write(json.dumps(payload).encode())
                payload_file.seek(0)
                fds = (payload_file.fileno(), result_write)
                bwrap = [*prefix, "--info-fd", str(info_write), "--"] if isolated else []
                proc = subprocess.Popen(
                    [*bwrap, _python(), "-I", "-B", "-S", "-c", _child_source(), *map(str, fds)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    pass_fds=fds + ((info_write,) if isolated else ()), env=env,
                    cwd=host_dir or "/", start_new_session=True)
            for fd in (result_write, info_write):
                if fd is not None:
                    os.close(fd)
            result_write = info_write = None
            with proc:
                (stdout, stderr), line, init_pidfd, timed_out, flooded = _collect(
                    proc, result_read, info_read, start + timeout_s)
                _kill_and_wait(proc, init_pidfd)
                returncode = proc.wait()
        finally:
            for fd in (result_read, result_write, info_read, info_write):
                if fd is not None:
                    os.close(fd)
    passed = (not timed_out and not flooded and returncode == 0
              and line == f"passed {token}\n".encode())
    if flooded:
        stderr += f"\n[sandbox: output passed {OUTPUT_LIMIT} bytes; run killed]"
    status = ("passed" if passed else "timeout" if timed_out
              else "failed" if returncode == 1 and not flooded else "error")
    return SandboxResult(passed, status, returncode, stdout, stderr, time.monotonic() - start,
                         isolated)


def run_sandboxed(solution: str, tests: str = "", *, timeout_s: float = 10.0,
                  memory_mb: int = 1024, allow_unisolated: bool = False,
                  audit_hook: bool = True) -> SandboxResult:
    """Run `solution`, then `tests` (e.g. asserts) in the same namespace, in a fresh sandbox.

    Passed means both ran to their end (see the module docstring for what that guarantees).
    Raises SandboxUnavailable without a working bwrap unless allow_unisolated=True.
    audit_hook=False leaves out the second layer; tests use it to check the kernel layer alone.
    """
    if not timeout_s > 0 or not math.isfinite(timeout_s):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if not isinstance(memory_mb, int) or memory_mb < 64:
        raise ValueError(f"memory_mb must be an int of at least 64 (Python itself needs that), "
                         f"got {memory_mb!r}")
    return _run(_sandbox_prefix(allow_unisolated), solution, tests, timeout_s=timeout_s,
                memory_mb=memory_mb, audit_hook=audit_hook)
