"""Scoring for the generation benchmarks: GSM8K answer matching and an MBPP execution sandbox.

GSM8K: a completion is correct when its final number (after the last `####`, else the last
number in the text) equals the reference number after `####`, compared in canonical form
("$1,234.50" -> "1234.5", "18.0" -> "18").

MBPP: `run_mbpp` runs solution + setup + asserts in a separate, throwaway Python process.
Layers, outermost first (defence in depth for buggy or unlucky benchmark code, NOT a
security boundary: code that exploits the interpreter or forges the result can escape):
  1. `unshare --net` (if it works here, checked once): the child has no network at all.
  2. A fresh temp dir as cwd, deleted afterwards; env stripped; stdin is /dev/null;
     stdout/stderr go to files capped by RLIMIT_FSIZE and only their tails are read back.
  3. `python -I -B -S`: no env vars, no user/site-packages (stdlib only, no .pth hooks).
  4. rlimits: CPU, address space, file size, open files, no core dumps, NPROC 0. Root
     ignores NPROC, hence:
  5. an audit hook (cannot be removed once added) that refuses process creation and
     signals, sockets, ctypes, rlimit changes, hard/symbolic links, and file writes,
     deletes, renames, chmod/chown/utime outside the temp dir. Reads stay allowed
     (imports read files). Only what CPython audits is covered (e.g. not os.mkfifo), and
     disk use is bounded per file, not in total.
  6. A wall-clock timeout that SIGKILLs the whole process group.
Side effects happen only when the functions are called; importing this module is free.
"""
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from decimal import Decimal

# --- GSM8K: final-number extraction -------------------------------------------------------

# Optional sign (only when not glued to a word, so "10-3" is 3), optional "$", then either
# a comma-grouped number, a plain number, or ".5". A trailing "." is never part of it.
_NUMBER = re.compile(r"(?:(?<![\w.])(-))?\$?(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")


def _canonical(match: re.Match) -> str:
    """'-', '1,234.50' -> '-1234.5': no commas, no trailing zeros, no '.0', no '-0'."""
    value = Decimal((match.group(1) or "") + match.group(2).replace(",", ""))
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_gsm8k_answer(text: str) -> str | None:
    """The first number after the last '####', else the last number anywhere; None if none."""
    _, sep, tail = text.rpartition("####")
    if sep and (match := _NUMBER.search(tail)):
        return _canonical(match)
    matches = list(_NUMBER.finditer(text))
    return _canonical(matches[-1]) if matches else None


def gsm8k_reference(answer_field: str) -> str:
    """The canonical number after '####' in a GSM8K reference answer."""
    _, sep, tail = answer_field.rpartition("####")
    match = _NUMBER.search(tail) if sep else None
    if match is None:
        raise ValueError(f"no '#### <number>' in reference answer {answer_field[-80:]!r}")
    return _canonical(match)


def gsm8k_correct(generated: str, reference_answer_field: str) -> bool:
    """Whether the completion's final number equals the reference number."""
    return extract_gsm8k_answer(generated) == gsm8k_reference(reference_answer_field)


# --- MBPP: code extraction ----------------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
# Top-level lines after which a completion is no longer the solution: closing fences, end
# markers, demo code (asserts and prints may be wrong and would fail the sample), tests.
_CODE_END = re.compile(r"^(```|\[DONE\]|</s>|<\|endoftext\|>|<\|im_end\|>|if __name__|assert\b"
                       r"|print\(|# ?[Tt]ests?\b)")


def extract_code(generated: str) -> str:
    """The solution in a completion: its first ```python block, else the text up to an end line."""
    blocks = _FENCE.findall(generated)
    python = [body for lang, body in blocks if lang.lower() in ("python", "python3", "py")]
    plain = [body for lang, body in blocks if not lang]
    text = (python or plain or [generated.replace("[BEGIN]", "", 1)])[0]
    lines = []
    for line in text.splitlines():
        if _CODE_END.match(line):
            break
        lines.append(line)
    return "\n".join(lines).strip("\n") + "\n"


# --- MBPP: sandboxed execution ------------------------------------------------------------

# Runs inside the child (argv: cpu_seconds memory_mb); cwd is the temp dir holding program.py.
# Exit 0 + the ".passed" marker: every assert held; 1: an assert failed; 2: anything else.
# The marker is needed because untrusted code can call os._exit(0) before the asserts run.
_RUNNER = r'''
import os, resource, sys, traceback
ROOT = os.path.realpath(os.getcwd())
for res, limit in ((resource.RLIMIT_CPU, int(sys.argv[1])),
                   (resource.RLIMIT_AS, int(sys.argv[2]) << 20), (resource.RLIMIT_FSIZE, 10 << 20),
                   (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0),
                   (resource.RLIMIT_NPROC, 0)):  # NPROC 0: no new processes (root ignores it)
    resource.setrlimit(res, (limit, limit))
DENY = {"os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn",
        "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill",
        "os.link", "os.symlink", "resource.setrlimit", "resource.prlimit"}
DENY_PREFIXES = ("socket.", "ctypes.")
DENY_IMPORTS = {"_posixsubprocess", "_ctypes"}  # fork_exec is not audited; ctypes can patch memory
# event -> (path arg, dir_fd arg) pairs, following the argument order of CPython's audit events.
PATH_ARGS = {"open": [(0, None)], "os.remove": [(0, 1)], "os.rmdir": [(0, 1)],
             "os.mkdir": [(0, 2)], "os.rename": [(0, 2), (1, 3)], "os.chmod": [(0, 2)],
             "os.chown": [(0, 3)], "os.utime": [(0, 3)], "os.truncate": [(0, None)],
             "shutil.rmtree": [(0, 1)]}
WRITE = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

def inside(path, dir_fd):
    if isinstance(path, int):  # a file descriptor (fchmod, ftruncate, open(fd)): where it points
        path = f"/proc/self/fd/{path}"
    base = f"/proc/self/fd/{dir_fd}" if isinstance(dir_fd, int) and dir_fd >= 0 else os.getcwd()
    real = os.path.realpath(os.path.join(base, os.fsdecode(path)))  # follows symlinks and ".."
    return real == ROOT or real.startswith(ROOT + os.sep)

def hook(event, args):
    if event == "import" and args[0] in DENY_IMPORTS:
        raise PermissionError(f"sandbox: import {args[0]} is not allowed")
    if event in DENY or event.startswith(DENY_PREFIXES):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open":
        if not args[2] & WRITE:
            return  # reads are fine
        if args[1] is None and not isinstance(args[0], int) and not os.path.isabs(args[0]):
            # The event does not carry os.open's dir_fd, so a relative path cannot be resolved.
            raise PermissionError("sandbox: relative os.open for writing")
    for path_at, dir_fd_at in PATH_ARGS.get(event, ()):
        if not inside(args[path_at], None if dir_fd_at is None else args[dir_fd_at]):
            raise PermissionError(f"sandbox: {event} outside the sandbox: {args[path_at]!r}")

marker = os.path.join(ROOT, ".passed")
sys.addaudithook(hook)
try:
    with open("program.py") as f:
        code = compile(f.read(), "program.py", "exec")
    # Not "__main__", so a completion's `if __name__ == "__main__":` demo (input()...) is skipped.
    exec(code, {"__name__": "__sandbox__"})
except AssertionError:
    traceback.print_exc()
    status = 1
except BaseException:
    traceback.print_exc()
    status = 2
else:
    open(marker, "x").close()
    status = 0
for stream in (sys.stdout, sys.stderr):
    try:
        stream.flush()
    except BaseException:
        pass
os._exit(status)  # skip atexit handlers the untrusted code may have registered
'''

_TAIL_BYTES = 4096


@dataclass
class SandboxResult:
    """Outcome of one sandboxed run."""
    passed: bool
    status: str  # "passed" | "failed" (an assert was false) | "timeout" | "error" (anything else)
    returncode: int  # negative: killed by that signal (-9 after a timeout)
    stdout: str  # last few KB only
    stderr: str
    seconds: float


@functools.cache
def _netns_prefix() -> tuple[str, ...]:
    """('unshare', '--net') if this machine lets us create a network namespace, else ()."""
    unshare = shutil.which("unshare")
    try:
        ok = unshare is not None and subprocess.run(
            [unshare, "--net", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return (unshare, "--net") if ok else ()


def _tail(path: str) -> str:
    """The last _TAIL_BYTES of a file, decoded leniently."""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - _TAIL_BYTES))
        return f.read(_TAIL_BYTES).decode("utf-8", "replace")


def run_sandboxed(program: str, *, timeout_s: float = 10.0, memory_mb: int = 1024) -> SandboxResult:
    """Run a Python program in a throwaway, resource-limited child process (see module doc)."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sandbox-") as tmp:
        with open(os.path.join(tmp, "program.py"), "w") as f:
            f.write(program)
        out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        cmd = [*_netns_prefix(), sys.executable, "-I", "-B", "-S", "-c", _RUNNER,
               str(int(timeout_s) + 1), str(memory_mb)]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": tmp, "TMPDIR": tmp}
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=err, start_new_session=True)
        # Poll without reaping (WNOWAIT): while the leader is an unreaped zombie its process-group
        # id cannot be reused, so the killpg below can only hit the child and its descendants.
        deadline, timed_out = start + timeout_s, False
        while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.002)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        returncode = proc.wait()
        passed = returncode == 0 and not timed_out and os.path.exists(os.path.join(tmp, ".passed"))
        status = ("passed" if passed else "timeout" if timed_out
                  else "failed" if returncode == 1 else "error")
        return SandboxResult(passed, status, returncode,
                             _tail(out_path), _tail(err_path), time.monotonic() - start)


def run_mbpp(code: str, test_list: list[str], test_setup_code: str = "", *,
             timeout_s: float = 10.0, memory_mb: int = 1024) -> SandboxResult:
    """Run an MBPP solution against its asserts in the sandbox."""
    # The setup goes after the code: MBPP's setups build objects from classes the code defines.
    program = "\n".join([code, test_setup_code, *test_list]) + "\n"
    return run_sandboxed(program, timeout_s=timeout_s, memory_mb=memory_mb)
