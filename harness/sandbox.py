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
  - A seccomp filter (DENIED_SYSCALLS below, built with libseccomp through pyseccomp and
    handed to `bwrap --seccomp`): keyrings, io_uring, mounts and namespaces, ptrace and other
    processes' memory, bpf, perf, modules, kexec, clocks, the xattr family, personality, and
    every syscall from clone3 (Linux 5.3) on except a few harmless ones, at least what Docker's
    default profile denies for these classes. Without it the sandbox refuses to run, as
    without bwrap, unless the caller opts in to running unisolated.
  - A memory cgroup per run where this process may make one (root with cgroup v1, or a v2
    cgroup that delegates memory): memory_mb + /tmp + MEMORY_SLACK_BYTES of memory, kernel
    memory included, so inode floods on /tmp (which no rlimit or tmpfs size bounds; bwrap 0.8
    cannot set nr_inodes) are cut at that budget. SandboxResult.peak_memory says what a run used.
  - The extension modules that reach raw memory or make subinterpreters without the audit hook
    (HIDDEN_MODULES: _ctypes, _testcapi, _xxsubinterpreters, ...) are empty files in the
    sandbox, so no name, dotted or not, loads them.
The audit hook of harness/sandbox_child.py is a second layer: it refuses process creation and
signals, sockets, ctypes, tracing, gc walks, links, and file changes outside /tmp. It is
tamper-proof: its tables are immutable values in its closure, it calls nothing the program can
redefine, and nothing but the interpreter references it.

The verdict. For MBPP, harness/scoring.py decides it outside the sandbox wherever the asserts
allow (run_calls: the sandbox only returns values); what follows is the in-sandbox verdict of
run_sandboxed, which the few other problems use. A run passes only when the parent sees, before the deadline, exit status 0 and,
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

What it cannot do. In run_sandboxed the asserts share the interpreter with the solution, so a
solution can make them vacuous (an __eq__ that is always True, shadowed builtins), and a
program that reached its own process's memory (a memory-safety bug of CPython, or a route to
raw memory the hidden modules and the hook do not cover) could forge the pass line; the kernel
sandbox still holds then. run_calls has neither weakness: its caller judges plain values.

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
import sysconfig
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
# Raw memory (ctypes, the C-API test modules), subinterpreters without the audit hook.
HIDDEN_MODULES = ("_ctypes", "_ctypes_test", "_testcapi", "_testinternalcapi", "_testbuffer",
                  "_testclinic", "_testimportmultiple", "_testmultiphase", "_xxsubinterpreters",
                  "_xxinterpchannels", "_xxtestfuzz", "xxlimited", "xxlimited_35", "xxsubtype")
TAIL_BYTES = 4096  # how much of stdout and stderr a result keeps
RESULT_LIMIT = 1 << 20  # calls mode: bytes of return values read back (beyond: not passed)
_INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: `apt-get install bubblewrap`, Fedora: "
                 "`dnf install bubblewrap`) and the seccomp bindings (`pip install "
                 "pyseccomp==0.1.2`, over the system's libseccomp2), or opt in to running "
                 "untrusted code without isolation with allow_unisolated=True (train.py: --allow-unisolated-exec)")


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
    peak_memory: int | None = None  # bytes the run's memory cgroup peaked at (None: no cgroup)
    returns: list[str] | None = None  # calls mode: what the sandbox says each call returned
    verdict: str = "in_sandbox"  # "trusted": decided by the caller from the returned values


# --- the syscall filter (seccomp) -----------------------------------------------------------

# Denied with EPERM, the classes Docker's default profile denies to a container without extra
# capabilities: keyrings (the session keyring is inherited and uid 65534's user keyring is not
# namespaced, so without this runs could read and leave keys), io_uring (a second syscall table
# no filter sees), mounts and namespaces, tracing and other processes' memory, eBPF and perf,
# kernel modules and kexec, clocks, swap, quotas, reboot, the xattr family (kernel memory no
# tmpfs size bounds), file handles, userfaultfd, NUMA policy, personality. Names this
# libseccomp does not know on this architecture are skipped; newer syscalls by number below.
DENIED_SYSCALLS = (
    "keyctl", "add_key", "request_key",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "mount", "umount", "umount2", "pivot_root", "chroot", "unshare", "setns",
    "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "bpf", "perf_event_open", "fanotify_init", "lookup_dcookie", "syslog",
    "init_module", "finit_module", "delete_module", "create_module", "kexec_load",
    "kexec_file_load", "get_kernel_syms", "query_module",
    "reboot", "swapon", "swapoff", "acct", "quotactl", "quotactl_fd", "nfsservctl",
    "settimeofday", "stime", "clock_settime", "clock_adjtime", "adjtimex",
    "sethostname", "setdomainname", "iopl", "ioperm", "vm86", "vm86old", "uselib", "vhangup",
    "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr", "fremovexattr",
    "open_by_handle_at", "name_to_handle_at", "userfaultfd",
    "mbind", "set_mempolicy", "migrate_pages", "move_pages", "personality")
# clone/unshare flags that make namespaces (Docker denies clone with any of them).
NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000,
                   0x40000000, 0x00000080)  # NS, CGROUP, UTS, IPC, USER, PID, NET, TIME
# Since Linux 5.1 every new syscall has one number on every architecture. From clone3 (435) on,
# all are refused with ENOSYS (so libc falls back to the old call, as under Docker for clone3),
# except these, which a Python program may need and which reach nothing the filter denies.
FIRST_NEW_SYSCALL, LAST_NEW_SYSCALL = 435, 600
NEW_SYSCALLS_ALLOWED = {436: "close_range", 437: "openat2", 439: "faccessat2",
                        441: "epoll_pwait2", 449: "futex_waitv", 452: "fchmodat2",
                        454: "futex_wake", 455: "futex_wait", 456: "futex_requeue"}


@functools.cache
def _seccomp_program() -> bytes:
    """The BPF program of the filter (built once with libseccomp through pyseccomp).

    Raises ImportError or OSError where pyseccomp or the system's libseccomp is missing."""
    import errno
    import pyseccomp as sc
    syscall_filter = sc.SyscallFilter(sc.ALLOW)  # other architectures' calls: killed (default)
    for name in DENIED_SYSCALLS:
        if sc.resolve_syscall(sc.Arch.NATIVE, name) != -1:  # -1: unknown to this libseccomp
            syscall_filter.add_rule(sc.ERRNO(errno.EPERM), name)
    for flag in NAMESPACE_FLAGS:
        syscall_filter.add_rule(sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    for number in range(FIRST_NEW_SYSCALL, LAST_NEW_SYSCALL + 1):
        if number not in NEW_SYSCALLS_ALLOWED:
            syscall_filter.add_rule(sc.ERRNO(errno.ENOSYS), number)
    with tempfile.TemporaryFile() as f:
        syscall_filter.export_bpf(f)
        f.seek(0)
        return f.read()


def _seccomp_fd() -> int:
    """A fresh descriptor, at offset 0, on the filter's BPF program, for `bwrap --seccomp FD`."""
    fd = os.memfd_create("sandbox-seccomp", os.MFD_CLOEXEC)
    os.write(fd, _seccomp_program())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


# --- the memory cgroup -----------------------------------------------------------------------

MEMORY_SLACK_BYTES = 64 << 20  # the budget beyond memory_mb and /tmp: bwrap, page tables, slab


@functools.cache
def _memory_cgroup_parent() -> tuple[str, str] | None:
    """(directory, version) of a cgroup this process may make memory-limited children in, or
    None: v1's memory hierarchy, or v2 where this cgroup delegates the memory controller."""
    mounts = {}  # "memory" (v1) / "v2" -> mount point
    try:
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            sep = fields.index("-")
            fstype, options = fields[sep + 1], fields[sep + 3].split(",")
            if fstype == "cgroup" and "memory" in options:
                mounts.setdefault("v1", fields[4])
            elif fstype == "cgroup2":
                mounts.setdefault("v2", fields[4])
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(",") and "v1" in mounts:
                directory, version = mounts["v1"] + path, "v1"
            elif controllers == "" and "v2" in mounts:
                directory, version = mounts["v2"] + path, "v2"
                if "memory" not in Path(directory, "cgroup.subtree_control").read_text().split():
                    continue
            else:
                continue
            probe = os.path.join(directory, f"flora-sandbox-probe-{os.getpid()}")
            os.mkdir(probe)
            os.rmdir(probe)
            return directory, version
    except (OSError, ValueError, IndexError):
        return None
    return None


def _make_memory_cgroup(limit_bytes: int) -> tuple[str, str] | None:
    """A fresh cgroup limited to limit_bytes of memory (kernel memory included, no swap), or None
    where this host gives none. Returns (its directory, the file its processes are listed in)."""
    parent = _memory_cgroup_parent()
    if parent is None:
        return None
    directory = os.path.join(parent[0], f"flora-sandbox-{secrets.token_hex(8)}")
    os.mkdir(directory)
    if parent[1] == "v1":
        limits = (("memory.limit_in_bytes", limit_bytes), ("memory.memsw.limit_in_bytes", limit_bytes))
    else:
        limits = (("memory.max", limit_bytes), ("memory.swap.max", 0))
    for name, value in limits:
        try:
            Path(directory, name).write_text(str(value))
        except FileNotFoundError:  # no swap accounting on this kernel: nothing to limit
            if "swap" not in name:
                raise
    return directory, os.path.join(directory, "cgroup.procs")


def _memory_peak(directory: str) -> int | None:
    """The most memory the run's cgroup ever held, in bytes (None where the kernel does not say)."""
    for name in ("memory.max_usage_in_bytes", "memory.peak"):
        try:
            return int(Path(directory, name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return None


def _remove_cgroup(directory: str) -> None:
    """Remove a run's cgroup once its processes are gone (they may take a moment to leave it)."""
    for _ in range(100):
        try:
            os.rmdir(directory)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.01)


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
    # Extension modules that reach raw memory or run code without the audit hook are empty
    # files in the sandbox, under any name they are loaded by (dotted names included).
    dynload = Path(sysconfig.get_path("platstdlib")) / "lib-dynload"
    for name in HIDDEN_MODULES:
        for path in sorted(dynload.glob(f"{name}.*so")) + sorted(dynload.glob(f"{name}.so")):
            args += ["--ro-bind", "/dev/null", os.path.realpath(path)]
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


def _seccomp_problem() -> str | None:
    """None if the syscall filter can be built here, else why not."""
    try:
        _seccomp_program()
    except (ImportError, OSError, RuntimeError) as e:
        return f"the seccomp filter cannot be built ({type(e).__name__}: {e})"
    return None


def _sandbox_prefix(allow_unisolated: bool) -> list[str]:
    """The bwrap command line to run under, [] when running unisolated by opt-in, else raise."""
    bwrap = _find_bwrap()
    problem = ("bwrap was not found on PATH" if bwrap is None
               else _seccomp_problem() or _bwrap_problem(bwrap))
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

def _collect(proc: subprocess.Popen, result_fd: int, info_fd: int | None, deadline: float,
             result_limit: int):
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
                    del buffer[result_limit:]  # the genuine pass line is 40 bytes
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
         audit_hook: bool, calls: list | None = None) -> SandboxResult:
    """Run solution then tests under `prefix` (a bwrap command line, or [] for no isolation).

    calls: [(function name, repr of args tuple, repr of kwargs dict), ...] to make instead of
    running tests; each return value's repr comes back in SandboxResult.returns."""
    start = time.monotonic()
    token = secrets.token_hex(16)
    isolated = bool(prefix)
    budget = (memory_mb << 20) + TMPFS_BYTES + MEMORY_SLACK_BYTES
    workdir = nullcontext() if isolated else tempfile.TemporaryDirectory(prefix="sandbox-")
    with workdir as host_dir:  # unisolated: the run's directory on the host
        root = "/tmp" if isolated else os.path.realpath(host_dir)
        payload = {"solution": solution, "tests": tests, "calls": calls, "token": token,
                   "root": root, "audit_hook": audit_hook,
                   "uid": SANDBOX_UID if isolated and os.geteuid() == 0 else None,
                   "limits": {"cpu_seconds": math.ceil(timeout_s) + 1,
                              "memory_bytes": memory_mb << 20, "file_bytes": FILE_BYTES,
                              "open_files": OPEN_FILES}}
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": root, "TMPDIR": root}
        result_read, result_write = os.pipe()
        info_read, info_write = os.pipe() if isolated else (None, None)
        seccomp = _seccomp_fd() if isolated else None
        cgroup = _make_memory_cgroup(budget)
        try:
            with tempfile.TemporaryFile() as payload_file:
                payload_file.write(json.dumps(payload).encode())
                payload_file.seek(0)
                fds = (payload_file.fileno(), result_write)
                bwrap = ([*prefix, "--seccomp", str(seccomp), "--info-fd", str(info_write), "--"]
                         if isolated else [])
                # The shell moves itself into the run's cgroup, then becomes bwrap: everything
                # of the run is charged to the cgroup from its first instruction.
                enter = ["/bin/sh", "-c", 'echo 0 > "$0" && exec "$@"', cgroup[1]] if cgroup else []
                proc = subprocess.Popen(
                    [*enter, *bwrap, _python(), "-I", "-B", "-S", "-c", _child_source(),
                     *map(str, fds)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    pass_fds=fds + ((info_write, seccomp) if isolated else ()), env=env,
                    cwd=host_dir or "/", start_new_session=True)
            for fd in (result_write, info_write, seccomp):
                if fd is not None:
                    os.close(fd)
            result_write = info_write = seccomp = None
            with proc:
                (stdout, stderr), line, init_pidfd, timed_out, flooded = _collect(
                    proc, result_read, info_read, start + timeout_s,
                    RESULT_LIMIT if calls is not None else 256)
                _kill_and_wait(proc, init_pidfd)
                returncode = proc.wait()
        finally:
            for fd in (result_read, result_write, info_read, info_write, seccomp):
                if fd is not None:
                    os.close(fd)
            peak = _memory_peak(cgroup[0]) if cgroup else None
            if cgroup:
                _remove_cgroup(cgroup[0])
    if flooded:
        stderr += f"\n[sandbox: output passed {OUTPUT_LIMIT} bytes; run killed]"
    if calls is not None:  # the caller judges the values; here only: did every call return?
        returns = line.decode("utf-8", "replace").split("\n")[:-1]  # a cut last line is dropped
        complete = (not timed_out and not flooded and returncode == 0
                    and len(returns) == len(calls) and len(line) < RESULT_LIMIT)
        status = "passed" if complete else "timeout" if timed_out else "error"
        return SandboxResult(complete, status, returncode, stdout, stderr,
                             time.monotonic() - start, isolated, peak, returns)
    passed = (not timed_out and not flooded and returncode == 0
              and line == f"passed {token}\n".encode())
    status = ("passed" if passed else "timeout" if timed_out
              else "failed" if returncode == 1 and not flooded else "error")
    return SandboxResult(passed, status, returncode, stdout, stderr, time.monotonic() - start,
                         isolated, peak)


def _check_limits(timeout_s: float, memory_mb: int) -> None:
    if not timeout_s > 0 or not math.isfinite(timeout_s):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if not isinstance(memory_mb, int) or memory_mb < 64:
        raise ValueError(f"memory_mb must be an int of at least 64 (Python itself needs that), "
                         f"got {memory_mb!r}")


def run_sandboxed(solution: str, tests: str = "", *, timeout_s: float = 10.0,
                  memory_mb: int = 1024, allow_unisolated: bool = False,
                  audit_hook: bool = True) -> SandboxResult:
    """Run `solution`, then `tests` (e.g. asserts) in the same namespace, in a fresh sandbox.

    Passed means both ran to their end (see the module docstring for what that guarantees).
    Raises SandboxUnavailable without a working bwrap unless allow_unisolated=True.
    audit_hook=False leaves out the second layer; tests use it to check the kernel layer alone.
    """
    _check_limits(timeout_s, memory_mb)
    return _run(_sandbox_prefix(allow_unisolated), solution, tests, timeout_s=timeout_s,
                memory_mb=memory_mb, audit_hook=audit_hook)


def run_calls(solution: str, calls: list[tuple[str, str, str]], *, timeout_s: float = 10.0,
              memory_mb: int = 1024, allow_unisolated: bool = False,
              audit_hook: bool = True) -> SandboxResult:
    """Run `solution` in a fresh sandbox, then call its functions: calls are (name, repr of an
    args tuple, repr of a kwargs dict), all Python literals. `returns` holds, per call made,
    what the sandbox says it returned: a JSON string holding repr(value). Untrusted data: the
    caller judges it (harness/scoring.py). `passed` only says every call returned."""
    _check_limits(timeout_s, memory_mb)
    return _run(_sandbox_prefix(allow_unisolated), solution, "", timeout_s=timeout_s,
                memory_mb=memory_mb, audit_hook=audit_hook, calls=[list(c) for c in calls])
