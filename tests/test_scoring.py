"""Tests for scoring.py and harness/sandbox.py: GSM8K extraction against the real references;
MBPP code extraction; the sandbox against the real reference solutions, broken solutions, and
hostile programs of every class the hardening issue found, each checked for no effect on the
host, a live host, no process left behind and no false pass, with the kernel layer alone and
with the audit hook on top; forged passes; and the refusal to run without isolation."""
import ctypes
import json
import os
import random
import re
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from harness import sandbox, scoring
from harness.sandbox import SandboxUnavailable, run_sandboxed
from harness.scoring import (extract_code, extract_gsm8k_answer, gsm8k_correct, gsm8k_reference,
                             run_mbpp)

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FLORA_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
GSM8K_TEST = DATA / "gsm8k" / "test.jsonl"
MBPP = DATA / "mbpp" / "mbpp.jsonl"


def _load_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        pytest.skip(f"{path} not present")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- GSM8K ----------------------------------------------------------------------------------

def test_every_gsm8k_reference_extracts_to_its_own_number():
    rows = _load_jsonl(GSM8K_TEST)
    assert len(rows) == 1319
    for row in rows:
        ref = row["answer"]
        got = extract_gsm8k_answer(ref)
        assert got == gsm8k_reference(ref), ref
        # Independent check: the raw text after '####', parsed by float().
        assert float(got) == float(ref.split("####")[-1].strip().replace(",", "")), ref
        assert gsm8k_correct(ref, ref)


@pytest.mark.parametrize("text, expected", [
    ("The answer is 18.", "18"),
    ("The answer is 18.\n\n", "18"),
    ("#### 1,234", "1234"),
    ("So $1,450,000.", "1450000"),
    ("She pays $18.00 in total", "18"),
    ("18 dollars", "18"),
    ("It grew by 50%.", "50"),
    ("The temperature is -3 degrees", "-3"),
    ("It lost -$5", "-5"),
    ("16-3-4=9", "9"),          # minus between numbers is subtraction, not a sign
    ("10-3", "3"),
    ("costs $3.50", "3.5"),
    ("4.0", "4"),
    ("0.50", "0.5"),
    (".5 cups", "0.5"),
    ("-0", "0"),
    ("x=18apples", "18"),       # glued to text
    ("abc18def", "18"),
    ("answers: 1,2,3", "3"),    # commas not in groups of three are separators
    ("The total is 1,000, not 900", "900"),
    ("#### 18\nBut 99 later", "18"),      # the number after the LAST ####
    ("#### 5\n#### 7 apples", "7"),
    ("#### \nthe answer is 12", "12"),
    ("she had 18 ####", "18"),             # nothing after ####: fall back to the last number
    ("<<2*9=18>>18", "18"),
    ("no numbers here", None),
    ("", None),
])
def test_extract_gsm8k_answer_table(text, expected):
    assert extract_gsm8k_answer(text) == expected


def test_equivalent_spellings_compare_equal():
    spellings = ["18", "18.0", "18.00", "$18", "#### 18", "18."]
    assert {extract_gsm8k_answer(s) for s in spellings} == {"18"}
    assert gsm8k_correct("so the answer is $1,600.00", "blah\n#### 1,600")
    assert not gsm8k_correct("so the answer is 1601", "blah\n#### 1,600")
    assert not gsm8k_correct("I don't know", "#### 3")


def test_gsm8k_reference_without_marker_raises():
    with pytest.raises(ValueError, match="####"):
        gsm8k_reference("The answer is 3")


@given(st.integers(-10**12, 10**12), st.integers(0, 99),
       st.sampled_from(["{}", "The answer is {}.", "#### {}", "So she pays {} dollars.", "{}%",
                        "Total: {}\n", "a 3 b {}"]),
       st.booleans(), st.booleans())
def test_extract_recovers_formatted_numbers(whole, cents, template, commas, decimals):
    digits = f"{abs(whole):,}" if commas else str(abs(whole))
    number = ("-" if whole < 0 else "") + digits + (f".{cents:02d}" if decimals else "")
    got = extract_gsm8k_answer(template.format(number))
    assert float(got) == float(number.replace(",", ""))
    # Canonical: no grouping commas, no trailing zeros or '.', no '-0'.
    assert "," not in got and not got.endswith(".") and got != "-0"
    assert "." not in got or not got.endswith("0")


# --- MBPP: code extraction ------------------------------------------------------------------

F = "def f(x):\n    return x\n"


@pytest.mark.parametrize("completion, expected", [
    (F, F),
    (f"Here you go:\n```python\n{F}```\nThis returns x.", F),
    (f"```\n{F}```", F),
    ("```text\nnot code\n```\n```py\ndef f():\n    pass\n```", "def f():\n    pass\n"),
    ("```python\ndef f():\n    pass\n", "def f():\n    pass\n"),  # truncated, no closing fence
    (f"{F}[DONE]\nmore text", F),
    (f"[BEGIN]\n{F}[DONE]", F),
    ("def f(x):\n    assert x\n    return x\nassert f(1) == 2\n",   # indented asserts stay
     "def f(x):\n    assert x\n    return x\n"),
    (f"{F}\nprint(f(3))\n", F),
    (f"{F}if __name__ == '__main__':\n    f(input())", F),
    (f"{F}# Test cases\nf(1)", F),
])
def test_extract_code_table(completion, expected):
    assert extract_code(completion) == expected


# --- MBPP: honest code passes, broken code fails ----------------------------------------------

# Task 123's reference solution (amicable numbers below 9999) needs about the 10 s limit, more on
# a loaded machine; every other reference solution passes (973 or 974 of 974, as before the
# sandbox was hardened).
REFERENCE_TOO_SLOW = {123}
# A fixed sample keeps the suite short; FLORA_MBPP_SAMPLE=0 runs all 974 (about a minute on
# 2 cores).
REFERENCE_SAMPLE = int(os.environ.get("FLORA_MBPP_SAMPLE", "300"))


def test_mbpp_reference_solutions_pass():
    tasks = _load_jsonl(MBPP)
    assert len(tasks) == 974
    if REFERENCE_SAMPLE:
        sample = {t["task_id"] for t in random.Random(0).sample(tasks, REFERENCE_SAMPLE)}
        tasks = [t for t in tasks if t["task_id"] in sample | REFERENCE_TOO_SLOW]
    start = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(
            lambda t: run_mbpp(t["code"], t["test_list"], t["test_setup_code"]), tasks))
    failing = {t["task_id"]: r.status for t, r in zip(tasks, results) if not r.passed}
    print(f"MBPP reference solutions: {len(tasks) - len(failing)} of {len(tasks)} pass in "
          f"{time.monotonic() - start:.1f}s; failing: {failing}")
    assert all(r.isolated for r in results)
    assert set(failing) <= REFERENCE_TOO_SLOW and set(failing.values()) <= {"timeout"}, failing


def _task(task_id: int) -> dict:
    return next(t for t in _load_jsonl(MBPP) if t["task_id"] == task_id)


@pytest.mark.parametrize("task_id, old, new", [
    (2, "&", "|"),                     # union instead of intersection
    (3, "result = True", "result = False"),
    (17, "4*a", "3*a"),
    (19, "!=", "=="),
])
def test_broken_reference_solutions_fail(task_id, old, new):
    task = _task(task_id)
    assert old in task["code"]
    result = run_mbpp(task["code"].replace(old, new), task["test_list"], task["test_setup_code"])
    assert result.status == "failed" and not result.passed
    assert "AssertionError" in result.stderr


def test_solution_that_returns_nothing_fails():
    task = _task(18)
    name = re.match(r"assert (\w+)\(", task["test_list"][0]).group(1)
    stub = task["code"] + f"\ndef {name}(*args, **kwargs):\n    return None\n"
    assert run_mbpp(stub, task["test_list"]).status == "failed"


def test_scratch_files_and_output():
    result = run_mbpp("import os\nprint(os.getcwd())\nopen('scratch.txt', 'w').write('ok')\n"
                      "assert open('scratch.txt').read() == 'ok'\nos.remove('scratch.txt')\n"
                      "open('/dev/null', 'w').write('x')", ["assert True"])
    assert result.passed and result.status == "passed" and result.returncode == 0
    assert result.stdout == "/tmp\n" and result.isolated


def test_main_guard_is_not_run():
    assert run_mbpp("def f():\n    return 1\nif __name__ == '__main__':\n    f(input())",
                    ["assert f() == 1"]).passed


@pytest.mark.parametrize("code", [
    "def f(:\n  pass",
    'x = """',            # an open string cannot swallow the asserts: they are compiled apart
    "if True:\n",
])
def test_syntax_error_is_an_error(code):
    result = run_mbpp(code, ["assert False"])
    assert result.status == "error" and re.search(r"(Syntax|Indentation)Error", result.stderr)


@pytest.mark.parametrize("timeout_s, memory_mb", [(0, 256), (-1, 256), (float("nan"), 256),
                                                  (float("inf"), 256), (1, 10), (1, 256.0)])
def test_bad_limits_raise(timeout_s, memory_mb):
    with pytest.raises(ValueError, match="timeout_s|memory_mb"):
        run_mbpp("pass", [], timeout_s=timeout_s, memory_mb=memory_mb)


# --- MBPP: what the sandbox is, seen from inside (the kernel layer alone) ----------------------

def test_sandbox_view_from_inside(tmp_path):
    probe = textwrap.dedent(f"""
        import os, socket
        status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
        print(repr({{
            "root": sorted(os.listdir("/")),
            "uid": (os.getuid(), os.getgid(), os.getgroups()),
            "caps": (status["CapEff"].strip(), status["CapPrm"].strip()),
            "no_new_privs": status["NoNewPrivs"].strip(),
            "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
            "net": [line.split(":")[0].strip()
                    for line in open("/proc/net/dev").read().splitlines()[2:]],
            "hostname": socket.gethostname(),
            "env": sorted(os.environ),
            "host_dir_visible": os.path.exists({str(tmp_path)!r}),
            "repo_visible": os.path.exists({str(REPO)!r}),
        }}))
        writable = []
        for d in ["/", "/usr", "/bin", "/dev", "/dev/shm", "/proc", "/root",
                  {os.path.realpath(sys.base_prefix)!r}, "/tmp"]:
            try:
                open(os.path.join(d, "probe"), "w").close()
                writable.append(d)
            except OSError:
                pass
        print(repr(writable))
        """)
    result = run_sandboxed(probe, audit_hook=False)
    assert result.passed, result.stderr
    seen_line, writable_line = result.stdout.splitlines()
    seen = eval(seen_line)
    python_top = os.path.realpath(sys.base_prefix).split("/")[1]
    assert set(seen["root"]) <= {"bin", "dev", "lib", "lib32", "lib64", "libx32", "proc", "sbin",
                                 "tmp", "usr", python_top}
    assert seen["uid"] == (65534, 65534, [])
    assert seen["caps"] == ("0000000000000000", "0000000000000000")
    assert seen["no_new_privs"] == "1"
    assert len(seen["pids"]) <= 2       # bwrap's init and the program, nothing of the host
    assert seen["net"] == ["lo"]
    assert seen["hostname"] == "sandbox"
    assert seen["env"] == ["HOME", "LANG", "PATH", "PWD", "TMPDIR"]
    assert not seen["host_dir_visible"] and not seen["repo_visible"]
    assert eval(writable_line) == ["/tmp"]


def test_tmp_is_private_and_bounded():
    flood = textwrap.dedent("""
        import os
        chunk = b"x" * (1 << 20)
        try:
            with open("big", "wb") as f:
                for _ in range(64):
                    f.write(chunk)
        except OSError as e:
            print("big:", e.strerror, flush=True)
        os.remove("big")
        try:
            for i in range(256):
                with open(f"part{i}", "wb") as f:
                    f.write(chunk)
        except OSError as e:
            print("many:", e.strerror, flush=True)
        """)
    result = run_sandboxed(flood, audit_hook=False, timeout_s=10)
    assert result.passed, result.stderr
    assert result.stdout.splitlines() == ["big: File too large", "many: No space left on device"]
    assert run_sandboxed("import os\nassert os.listdir('/tmp') == []").passed  # a fresh /tmp


# --- MBPP: hostile programs ---------------------------------------------------------------------

PR_SET_CHILD_SUBREAPER = 36


def _descendants(pid: int) -> set[int]:
    """Live (not zombie) processes below pid."""
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


class Host:
    """What a hostile program must leave as it was: a directory with a sentinel file, a canary
    process, a listener on localhost, a path in a read-only directory the sandbox can see, a
    secret in the environment; and no process of the run may outlive it."""

    def __init__(self, tmp_path: Path, secret: str):
        self.dir, self.secret = tmp_path, secret
        self.sentinel = tmp_path / "sentinel.txt"
        self.sentinel.write_text("keep me")
        self.sentinel_stat = self.sentinel.stat()
        self.visible = Path(os.path.realpath(sys.base_prefix)) / f"sandbox-test-{uuid.uuid4().hex}"
        self.canary = subprocess.Popen(["sleep", "600"])
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.before = _descendants(os.getpid())

    def fill(self, program: str) -> str:
        """The program with HOST_DIR, SENTINEL, VISIBLE and PORT filled in."""
        for name, value in (("HOST_DIR", self.dir), ("SENTINEL", self.sentinel),
                            ("VISIBLE", self.visible), ("PORT", self.port)):
            program = program.replace(name, str(value))
        return program

    def assert_untouched(self, result):
        assert not result.passed, result  # every hostile program runs against `assert False`
        assert sorted(p.name for p in self.dir.iterdir()) == ["sentinel.txt"]
        assert self.sentinel.read_text() == "keep me" and os.listxattr(self.sentinel) == []
        after = self.sentinel.stat()
        assert (after.st_mode, after.st_uid, after.st_mtime_ns) == (
            self.sentinel_stat.st_mode, self.sentinel_stat.st_uid, self.sentinel_stat.st_mtime_ns)
        assert not self.visible.exists()
        assert self.canary.poll() is None
        assert _descendants(os.getpid()) == self.before
        with pytest.raises(socket.timeout):
            self.listener.accept()
        assert self.secret not in result.stdout + result.stderr
        assert "ESCAPED" not in result.stdout  # printed only by a process the program started

    def close(self):
        self.canary.kill()
        self.canary.wait()
        self.listener.close()
        if self.visible.exists():
            self.visible.unlink()


@pytest.fixture
def host(tmp_path, monkeypatch):
    secret = uuid.uuid4().hex
    monkeypatch.setenv("FLORA_TEST_SECRET", secret)
    libc = ctypes.CDLL(None, use_errno=True)
    # Orphans of anything started below this process come back to it, so a process that
    # escaped the run's PID namespace would show up in _descendants.
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    h = Host(tmp_path, secret)
    yield h
    h.close()
    libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


TRY = """
def attempt(f):
    try:
        f()
    except BaseException as e:
        print(type(e).__name__, e, flush=True)
"""

# (id, program, status the run must end with or None). Each tries every way of its class,
# continuing after each failure; `attempt` reports the failures on stdout.
HOSTILE = [
    ("hook_tampering", """
import sys, os, subprocess
m = sys.modules["__main__"]          # the tampering that switched the old hook off
for name in ("DENY", "DENY_IMPORTS", "PATH_ARGS"):
    attempt(lambda: getattr(m, name).clear())
m.DENY_PREFIXES = ("nothing.",)
f = sys._getframe()                  # and anything mutable reachable from the frames
while f is not None:
    for value in list(f.f_locals.values()):
        for cell in getattr(value, "__closure__", None) or ():
            attempt(lambda: setattr(cell, "cell_contents", None))
        if isinstance(value, (set, dict, list)) and value is not globals():
            attempt(value.clear)
    f = f.f_back
attempt(lambda: os.remove("SENTINEL"))
attempt(lambda: subprocess.run(["/bin/sh", "-c", "echo ESCAPED; touch HOST_DIR/sub"]))
attempt(lambda: __import__("ctypes").CDLL(None).system(b"echo ESCAPED"))
attempt(lambda: os.kill(os.getppid(), 9))
attempt(lambda: __import__("socket").create_connection(("127.0.0.1", PORT), timeout=1))
""", None),
    ("kill_parent", """
import os, signal
attempt(lambda: os.kill(os.getppid(), signal.SIGKILL))
attempt(lambda: signal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGKILL))
attempt(lambda: os.killpg(os.getpgid(os.getppid()), signal.SIGKILL))
for pid in range(1, 4096):
    if pid != os.getpid():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
""", None),
    ("setns_into_host_network", """
import os, socket
def join_every_network_namespace():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
            except OSError as e:
                print(pid, e, flush=True)
                continue
            joined = libc.setns(fd, 0x40000000)  # CLONE_NEWNET
            print(pid, "setns", joined, os.strerror(ctypes.get_errno()), flush=True)
attempt(join_every_network_namespace)
attempt(lambda: socket.create_connection(("127.0.0.1", PORT), timeout=1))
""", None),
    ("fork_and_subprocess", """
import os, subprocess
attempt(lambda: os.fork() == 0 and (print("ESCAPED", flush=True), os._exit(0)))
attempt(lambda: subprocess.run(["/bin/sh", "-c", "echo ESCAPED; touch HOST_DIR/ran"]))
attempt(lambda: os.posix_spawn("/bin/sh", ["sh", "-c", "echo ESCAPED"], {}))
attempt(lambda: __import__("ctypes").CDLL(None).system(b"echo ESCAPED; touch HOST_DIR/ran"))
attempt(lambda: __import__("pty").fork())
attempt(lambda: __import__("multiprocessing").Process(target=print, args=("ESCAPED",)).start())
attempt(lambda: __import__("_thread").start_new_thread(print, ("thread ran",)))
""", None),
    ("writes_outside", """
import os, sqlite3
for target in ("HOST_DIR/new", "VISIBLE"):
    attempt(lambda: open(target, "w").write("x"))
    attempt(lambda: os.mkfifo(target))
    attempt(lambda: os.mknod(target))
    attempt(lambda: sqlite3.connect(target).execute("create table t (x)"))
    attempt(lambda: os.mkdir(target))
attempt(lambda: os.setxattr("SENTINEL", "user.x", b"1"))
attempt(lambda: os.setxattr(os.path.dirname("VISIBLE"), "user.x", b"1"))
attempt(lambda: os.remove("SENTINEL"))
attempt(lambda: os.rename("SENTINEL", "stolen"))
attempt(lambda: os.chmod("SENTINEL", 0o777))
attempt(lambda: os.utime("SENTINEL", (0, 0)))
attempt(lambda: os.symlink("SENTINEL", "link") or open("link", "w").write("x"))
""", None),
    ("outlive_the_run", """
import os, subprocess, time
attempt(lambda: subprocess.Popen(["sleep", "600"], start_new_session=True))
def double_fork():
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            time.sleep(600)
        os._exit(0)
attempt(double_fork)
attempt(lambda: __import__("threading").Thread(target=time.sleep, args=(600,)).start())
""", None),
    ("read_parent_environment", """
import os
print(dict(os.environ), flush=True)
for pid in os.listdir("/proc"):
    if pid.isdigit() or pid in ("self", "thread-self"):
        for name in ("environ", "cmdline"):
            attempt(lambda: print(pid, name, open(f"/proc/{pid}/{name}", "rb").read(), flush=True))
attempt(lambda: print(open(f"/proc/{os.getppid()}/environ", "rb").read(), flush=True))
""", None),
    ("signal_masking", """
import signal
attempt(lambda: signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals()))
attempt(lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN))
while True:
    pass
""", "timeout"),
    ("cpu_bomb", "while True:\n    pass\n", "timeout"),
    ("sleep", "import time\ntime.sleep(600)\n", "timeout"),
    ("memory_bomb", "x = bytearray(10 << 30)\n", "error"),
    ("gradual_memory_bomb", "a = []\nwhile True:\n    a.append(bytearray(16 << 20))\n", "error"),
    ("fork_bomb", "import os\nwhile True:\n    os.fork()\n", "error"),
    ("stdout_flood", "while True:\n    print('x' * 1000)\n", "error"),
    ("stderr_flood", "import sys\nwhile True:\n    sys.stderr.write('y' * 1000)\n", "error"),
    ("disk_flood", "import itertools\nwith open('flood', 'wb') as f:\n"
                   "    for i in itertools.count():\n        f.write(b'z' * (1 << 20))\n", "error"),
]


@pytest.mark.parametrize("audit_hook", [True, False], ids=["with_hook", "kernel_only"])
@pytest.mark.parametrize("program, status", [pytest.param(p, s, id=name) for name, p, s in HOSTILE])
def test_hostile_program_is_contained(host, program, status, audit_hook):
    # Loops meet a short deadline; the rest get a generous one, so a loaded machine's slow start
    # cannot turn their error into a timeout.
    timeout = 2.0 if status == "timeout" else 10.0
    result = run_sandboxed(TRY + host.fill(program), "assert False", timeout_s=timeout,
                           memory_mb=256, audit_hook=audit_hook)
    host.assert_untouched(result)
    assert status is None or result.status == status, result
    assert result.seconds < timeout + 3
    assert len(result.stdout) <= sandbox.TAIL_BYTES
    assert len(result.stderr) <= sandbox.TAIL_BYTES + 100  # + the output-limit note


def test_floods_are_cut_at_the_output_limit():
    result = run_sandboxed("while True:\n    print('x' * 1000)\n", timeout_s=30)
    assert result.status == "error" and "output passed" in result.stderr
    assert result.seconds < 10  # killed at OUTPUT_LIMIT, long before the deadline


def test_audit_hook_survives_tampering():
    """After every tampering the old hook fell to, the hook still refuses every action."""
    actions = ["__import__('socket').socket()", "os.system('true')", "__import__('ctypes')",
               "open('/usr/x', 'w')", "os.remove('/usr/bin/env')", "sys.settrace(print)",
               "sys.setprofile(print)", "__import__('gc').get_objects()",
               "__import__('gc').get_referents(sys._getframe())", "sys._current_frames()",
               "open('/proc/self/mem', 'rb')", "__import__('_testcapi')",
               "__import__('_xxsubinterpreters')", "os.symlink('/etc', 'link')"]
    program = textwrap.dedent(f"""
        import sys, os
        m = sys.modules["__main__"]
        for name, value in list(vars(m).items()):
            if isinstance(value, (set, dict, list)) and name != "__builtins__":
                value.clear()
            if callable(value) and getattr(value, "__closure__", None):
                for cell in value.__closure__:
                    cell.cell_contents = None
        sys.addaudithook(lambda event, args: print("ADDED HOOK RAN", flush=True))
        for action in {actions!r}:
            try:
                eval(action)
                print("ALLOWED", action, flush=True)
            except PermissionError as e:
                print("refused" if str(e).startswith("sandbox:") else "kernel", action, flush=True)
        """)
    result = run_sandboxed(program)
    assert result.passed, result.stderr
    assert result.stdout.splitlines() == [f"refused {action}" for action in actions]


# Programs that try to pass without the asserts holding. Each runs against `assert False`.
FORGERIES = [
    ("marker_file_and_exit", "import os\nopen('.passed', 'w').close()\nos._exit(0)"),
    ("os_exit_0", "import os\nos._exit(0)"),
    ("sys_exit_0", "import sys\nsys.exit(0)"),
    ("raise_system_exit", "raise SystemExit"),
    ("thread_exit", "import _thread\n_thread.exit()"),
    ("print_passed", "import sys\nprint('passed')\nsys.stdout.flush()\nimport os\nos._exit(0)"),
    ("write_fake_lines_to_every_fd", """
import os
for fd in range(64):
    try:
        os.write(fd, b"passed " + b"0" * 32 + b"\\n")
    except OSError:
        pass
os._exit(0)
"""),
    ("resume_the_vault", """
import sys, types, os
f = sys._getframe()
while f is not None:
    for value in list(f.f_locals.values()):
        if isinstance(value, types.GeneratorType):
            print(value.gi_frame.f_locals, flush=True)  # nothing: the line is not in a local
            for poke in (lambda: next(value), lambda: value.send(None)):
                try:
                    poke()
                except BaseException as e:
                    print(type(e).__name__, flush=True)
    f = f.f_back
os._exit(0)
"""),
    ("throw_into_the_vault", """
import sys, types, os
boot = sys._getframe(1)
vault = next(v for v in boot.f_locals.values() if isinstance(v, types.GeneratorType))
try:
    vault.throw(StopIteration)
except BaseException:
    pass
os._exit(0)
"""),
    ("rerun_the_worker", """
import sys, types, os
boot = sys._getframe(1)
run = types.FunctionType(boot.f_code, boot.f_globals)
args = dict(boot.f_locals, solution=compile("pass", "s", "exec"),
            tests=compile("pass", "t", "exec"), go=__import__("_thread").allocate_lock())
sys.stdout.flush()
run(*[args[name] for name in boot.f_code.co_varnames[:boot.f_code.co_argcount]])
"""),
    ("rebind_the_workers_locals", """
import sys
boot = sys._getframe(1)
boot.f_locals["tests"] = compile("pass", "t", "exec")   # writes through on Python >= 3.13
boot.f_locals["primed"] = True
"""),
]


@pytest.mark.parametrize("isolated", [True, False], ids=["bwrap", "unisolated"])
@pytest.mark.parametrize("program", [pytest.param(p, id=name) for name, p in FORGERIES])
def test_forged_pass_fails(monkeypatch, program, isolated):
    if not isolated:
        monkeypatch.setattr(sandbox, "_find_bwrap", lambda: None)
    result = run_sandboxed(program, "assert False", allow_unisolated=not isolated, timeout_s=10)
    assert result.isolated == isolated
    assert not result.passed and result.status != "passed", result


WEAKREF_FORGERY = """
import os, sys, types, gc, weakref
boot = sys._getframe(1)
vault = next(v for v in boot.f_locals.values() if isinstance(v, types.GeneratorType))
def resume_then_exit(ref):
    print("collected under", sys._getframe(1).f_code.co_name, flush=True)
    try:
        vault.send(None)
    except StopIteration:
        pass
    os._exit(0)
class Cycle:
    pass
c = Cycle()   # garbage that dies at the next collection, which comes at the worker's next
c.self = c    # allocation, after the solution returned and before the tests start
ref = weakref.ref(c, resume_then_exit)
del c
gc.set_threshold(1)
"""


def test_weakref_callback_between_solution_and_tests_cannot_pass():
    """A collection that runs while the worker itself is the current frame, between the solution
    and the tests, fires a callback that resumes the vault and exits 0: the vault refuses, since
    the worker is not on its report line, so the run ends without the pass line."""
    result = run_sandboxed(WEAKREF_FORGERY, "assert False", timeout_s=10)
    assert "collected under _boot" in result.stdout, result
    assert not result.passed and result.status == "error" and result.returncode == 0


# --- without isolation ----------------------------------------------------------------------

def test_refuses_without_bwrap_unless_opted_in(monkeypatch):
    monkeypatch.setattr(sandbox, "_find_bwrap", lambda: None)
    with pytest.raises(SandboxUnavailable, match="bubblewrap") as error:
        run_mbpp("def f():\n    return 1\n", ["assert f() == 1"])
    assert "apt-get install bubblewrap" in str(error.value)
    assert "allow_unisolated=True" in str(error.value)
    assert "--allow-unisolated-exec" in str(error.value)
    with pytest.raises(SandboxUnavailable):
        scoring.check_isolation()
    assert scoring.check_isolation(allow_unisolated=True) is False
    result = run_mbpp("def f():\n    return 1\n", ["assert f() == 1"], allow_unisolated=True)
    assert result.passed and not result.isolated
    assert run_mbpp("def f():\n    return 1\n", ["assert f() == 2"],
                    allow_unisolated=True).status == "failed"


def test_refuses_when_bwrap_does_not_work(monkeypatch, tmp_path):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: setting up uid map: Permission denied' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sandbox, "_find_bwrap", lambda: str(fake))
    with pytest.raises(SandboxUnavailable, match="uid map: Permission denied"):
        run_mbpp("pass", [])
    assert run_mbpp("pass", [], allow_unisolated=True).passed


def test_unisolated_run_is_still_guarded_by_the_hook(monkeypatch, tmp_path):
    """Without namespaces the hook alone guards the file system; the run's directory is removed."""
    monkeypatch.setattr(sandbox, "_find_bwrap", lambda: None)
    target = tmp_path / "outside.txt"
    result = run_sandboxed(f"import os\nprint(os.getcwd(), flush=True)\nopen({str(target)!r}, 'w')",
                           allow_unisolated=True)
    assert result.status == "error" and "sandbox: open outside" in result.stderr
    assert not target.exists()
    workdir = result.stdout.strip()
    assert Path(workdir).name.startswith("sandbox-") and not os.path.exists(workdir)
