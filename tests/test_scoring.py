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


# --- round two: memory-level forgeries, keyrings, kernel memory floods ------------------------
#
# Every program below ends in a wrong `add` and runs against asserts the trusted path judges
# (harness/scoring.py), with the hook and with the kernel layer alone; `attempt` reports what
# was refused. Where raw memory would be reached, the forgery of the old in-sandbox verdict is
# tried too. The asserts are never sent to the sandbox, so nothing in it can know the answers.

ADD_TESTS = ["assert add(1, 2) == 3", "assert add(40, 2) == 42", "assert add(-1, 1) == 0"]
WRONG_ADD = "\ndef add(a, b):\n    return a - b\n"
assert scoring.mbpp_verdict_path(ADD_TESTS) == "trusted"

LOAD_DOTTED = """
import glob, importlib.util, sys
def load(name):
    path = glob.glob(sys.base_prefix + "/lib/python3*/lib-dynload/" + name + ".*so")[0]
    spec = importlib.util.spec_from_file_location("x." + name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    print("LOADED", name, flush=True)
    return module
"""

MEMORY_FORGERIES = [
    ("dotted_extension_loading", """
for name in ("_ctypes", "_testcapi", "_testinternalcapi", "_xxsubinterpreters"):
    attempt(lambda: load(name))
"""),
    ("heap_scan_for_the_token", """
import re, os
def scan_proc_mem():
    maps = open("/proc/self/maps").read().splitlines()
    with open("/proc/self/mem", "rb") as mem:
        for line in maps:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            mem.seek(start)
            found = re.search(rb"passed [0-9a-f]{32}", mem.read(end - start))
            if found:
                os.write(3, found.group(0) + b"\\n")
attempt(scan_proc_mem)
def scan_with_ctypes():
    ct = load("_ctypes")
    print("ctypes reachable", ct, flush=True)
attempt(scan_with_ctypes)
os._exit(0)
"""),
    ("vault_flush", """
import sys, os, types
def flush_the_vault():
    f = sys._getframe()
    while f is not None:
        for value in list(f.f_locals.values()):
            if isinstance(value, types.GeneratorType):
                print("generator", value, flush=True)
        f = f.f_back
    load("_ctypes")  # the issue's route to the writer on the vault's value stack
attempt(flush_the_vault)
os._exit(0)
"""),
    ("hook_code_replacement", """
import sys
def replace_every_reachable_code():
    f = sys._getframe()
    while f is not None:
        for value in list(f.f_locals.values()) + list(f.f_globals.values()):
            if isinstance(value, type(attempt)):
                value.__code__ = (lambda *a, **k: None).__code__
        f = f.f_back
attempt(replace_every_reachable_code)
attempt(lambda: (lambda: 0).__code__.replace(co_consts=(None,)))
attempt(lambda: type((lambda: 0).__code__)(0, 0, 0, 0, 0, 0, b"", (), (), (), "", "", "", 0,
                                            b"", b"", (), ()))
"""),
    ("subinterpreters", """
attempt(lambda: __import__("_xxsubinterpreters").create())
attempt(lambda: __import__("_testcapi").run_in_subinterp("print('SUBINTERPRETER RAN')"))
attempt(lambda: load("_xxsubinterpreters").create())
attempt(lambda: load("_testcapi").run_in_subinterp("print('SUBINTERPRETER RAN')"))
"""),
    ("return_values_that_lie", """
class Yes:
    def __eq__(self, other):
        return True
    def __repr__(self):
        return "__import__('os').system('touch HOST_DIR/ran')"
_real = lambda a, b: Yes()
"""),
]


@pytest.mark.parametrize("audit_hook", [True, False], ids=["with_hook", "kernel_only"])
@pytest.mark.parametrize("program", [pytest.param(p, id=name) for name, p in MEMORY_FORGERIES])
def test_memory_level_forgery_cannot_pass(host, program, audit_hook, monkeypatch):
    """Trusted path: the sandbox only returns values; a wrong function fails whatever it does.
    In-sandbox path: the modules that reach raw memory are absent in any name."""
    code = TRY + LOAD_DOTTED + host.fill(program) + WRONG_ADD
    calls = [("add", "(1, 2)", "{}"), ("add", "(40, 2)", "{}"), ("add", "(-1, 1)", "{}")]
    run = sandbox.run_calls(code, calls, timeout_s=10, memory_mb=256, audit_hook=audit_hook)
    result = scoring._judge(scoring._plan(ADD_TESTS, ""), run)
    host.assert_untouched(result)
    forged = run_sandboxed(code, "\n".join(ADD_TESTS), timeout_s=10, memory_mb=256,
                           audit_hook=audit_hook)
    host.assert_untouched(forged)
    for output in (run.stdout, forged.stdout):
        assert "LOADED" not in output and "SUBINTERPRETER RAN" not in output
        assert "ctypes reachable" not in output


def test_value_with_lying_eq_fails_on_the_trusted_path():
    code = "class Yes:\n    def __eq__(self, other):\n        return True\n" \
           "def add(a, b):\n    return Yes()\n"
    result = run_mbpp(code, ADD_TESTS)
    assert result.verdict == "trusted" and not result.passed and result.status == "failed"
    assert "not a Python literal" in result.stderr
    # Plain stdlib containers come back as the literals they equal.
    counter = "from collections import Counter\ndef add(a, b):\n    return Counter({a + b: 1})\n"
    assert run_mbpp(counter, ["assert add(1, 2) == {3: 1}"]).passed


def test_verdict_paths_of_mbpp_are_counted():
    tasks = _load_jsonl(MBPP)
    in_sandbox = [t["task_id"] for t in tasks
                  if scoring.mbpp_verdict_path(t["test_list"], t["test_setup_code"]) != "trusted"]
    print(f"MBPP problems judged in the sandbox: {len(in_sandbox)} of {len(tasks)}: {in_sandbox}")
    assert len(in_sandbox) <= 10


KEYCTL = """
import glob, importlib.util, sys
path = glob.glob(sys.base_prefix + "/lib/python3*/lib-dynload/_ctypes.*so")[0]
print("ctypes", bool(path), flush=True)
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
KEY_SPEC_SESSION, KEY_SPEC_USER = -3, -4
for keyring in (KEY_SPEC_SESSION, KEY_SPEC_USER):
    made = libc.syscall(248, b"user", b"flora-sandbox-test", b"LEFT BY RUN", 11, keyring)
    print("add_key", keyring, made, ctypes.get_errno(), flush=True)
    found = libc.syscall(250, 10, keyring, b"user", b"flora-sandbox-test", 0)  # KEYCTL_SEARCH
    print("search", keyring, found, ctypes.get_errno(), flush=True)
    buffer = ctypes.create_string_buffer(4096)
    print("read", libc.syscall(250, 11, keyring, buffer, 4096), ctypes.get_errno(), flush=True)
print(open("/proc/keys").read() if __import__("os").path.exists("/proc/keys") else "", flush=True)
"""


X86_64 = pytest.mark.skipif(__import__("platform").machine() != "x86_64",
                            reason="the probes use x86_64 syscall numbers")


@X86_64
def test_keyrings_are_out_of_reach(monkeypatch):
    """Kernel layer alone, with ctypes put back: every keyring call is refused by the filter,
    in the session keyring and uid 65534's user keyring, and nothing crosses to a second run."""
    monkeypatch.setattr(sandbox, "HIDDEN_MODULES", ())
    keys_before = Path("/proc/keys").read_text() if Path("/proc/keys").exists() else ""
    outputs = [run_sandboxed(KEYCTL, audit_hook=False, timeout_s=10) for _ in range(2)]
    for result in outputs:
        assert result.passed, result.stderr
        calls = [line.split() for line in result.stdout.splitlines()
                 if line.split()[:1] in (["add_key"], ["search"], ["read"])]
        assert len(calls) == 6 and all(c[-2:] == ["-1", "1"] for c in calls), result.stdout  # EPERM
        assert "LEFT BY RUN" not in result.stdout and "flora-sandbox-test" not in result.stdout
    keys_after = Path("/proc/keys").read_text() if Path("/proc/keys").exists() else ""
    assert "flora-sandbox-test" not in keys_after
    assert len(keys_after.splitlines()) == len(keys_before.splitlines())


SYSCALL_PROBE = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
for name, number, args in [("io_uring_setup", 425, (1, 0)), ("unshare", 272, (0x10000000,)),
                           ("ptrace", 101, (16, 1)), ("bpf", 321, (0, 0, 0)),
                           ("perf_event_open", 298, (0, 0, -1, -1, 0)), ("personality", 135, (0x0040000,)),
                           ("setxattr", 188, (b"/tmp", b"user.x", b"1", 1, 0)),
                           ("mount", 165, (b"none", b"/tmp", b"tmpfs", 0, 0)),
                           ("clone3", 435, (0, 0)), ("setxattrat", 463, (0, 0, 0, 0, 0, 0))]:
    print(name, libc.syscall(number, *args), ctypes.get_errno(), flush=True)
print("Seccomp", open("/proc/self/status").read().split("Seccomp:")[1].split()[0], flush=True)
"""


@X86_64
def test_syscall_filter_refuses(monkeypatch):
    monkeypatch.setattr(sandbox, "HIDDEN_MODULES", ())
    result = run_sandboxed(SYSCALL_PROBE, audit_hook=False, timeout_s=10)
    assert result.passed, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert lines.pop("Seccomp") == "2"  # a filter is on
    for name, outcome in lines.items():
        assert outcome == ("-1 38" if name in ("clone3", "setxattrat") else "-1 1"), (name, outcome)


def test_sandbox_refuses_without_the_filter_unless_opted_in(monkeypatch):
    def missing():
        raise ImportError("No module named 'pyseccomp'")
    monkeypatch.setattr(sandbox, "_seccomp_program", missing)
    with pytest.raises(SandboxUnavailable, match="seccomp.*pyseccomp"):
        run_mbpp("def f():\n    return 1\n", ["assert f() == 1"])
    result = run_mbpp("def f():\n    return 1\n", ["assert f() == 1"], allow_unisolated=True)
    assert result.passed and not result.isolated


def _available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no MemAvailable in /proc/meminfo")


XATTR_FLOOD = """
import os
refused = 0
for i in range(20000):
    path = f"f{i % 64}"
    open(path, "a").close()
    try:
        os.setxattr(path, f"user.k{i}", b"v" * 4000)
    except OSError:
        refused += 1
print("refused", refused, flush=True)
"""
INODE_FLOOD = """
import os
for i in range(10 ** 8):
    os.close(os.open(f"f{i}", os.O_CREAT | os.O_WRONLY))
"""


@pytest.mark.skipif(sandbox._memory_cgroup_parent() is None,
                    reason="no memory cgroup can be made here (not root, or v2 without delegation)")
def test_kernel_memory_floods_are_bounded():
    """xattrs are refused by the filter; an inode flood, which no rlimit or tmpfs size stops,
    is bound by the run's memory cgroup: host memory drops by at most the run's budget."""
    result = run_sandboxed(XATTR_FLOOD, audit_hook=False, timeout_s=10, memory_mb=64)
    assert result.passed and result.stdout.strip() == "refused 20000", result
    budget = (64 << 20) + sandbox.TMPFS_BYTES + sandbox.MEMORY_SLACK_BYTES
    before, lowest = _available_bytes(), [None]

    def watch():
        lowest[0] = _available_bytes()
        while not done:
            lowest[0] = min(lowest[0], _available_bytes())
            time.sleep(0.02)
    done = False
    with ThreadPoolExecutor(1) as pool:
        watcher = pool.submit(watch)
        result = run_sandboxed(INODE_FLOOD, audit_hook=False, timeout_s=8, memory_mb=64)
        done = True
        watcher.result()
    print(f"inode flood: {result.status} after {result.seconds:.1f}s, cgroup peak "
          f"{result.peak_memory / 2**20:.0f} MiB of {budget / 2**20:.0f}; host available fell by "
          f"{(before - lowest[0]) / 2**20:.0f} MiB")
    assert not result.passed
    assert result.peak_memory <= budget
    assert before - lowest[0] < budget + (256 << 20)  # other processes' noise allowed
