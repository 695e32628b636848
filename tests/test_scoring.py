"""Tests for scoring.py: GSM8K extraction against the real references, then the MBPP sandbox
against the real reference solutions, broken solutions, and hostile snippets."""
import json
import os
import re
import socket
import stat
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from harness import scoring
from harness.scoring import extract_code, extract_gsm8k_answer, gsm8k_correct, gsm8k_reference, run_mbpp

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


# --- MBPP: the sandbox runs honest code -----------------------------------------------------

def test_mbpp_reference_solutions_pass():
    tasks = _load_jsonl(MBPP)
    start = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(
            lambda t: run_mbpp(t["code"], t["test_list"], t["test_setup_code"]), tasks))
    failing = [(t["task_id"], r.status) for t, r in zip(tasks, results) if not r.passed]
    rate = 1 - len(failing) / len(tasks)
    print(f"MBPP reference pass rate {rate:.4f} over {len(tasks)} tasks in "
          f"{time.monotonic() - start:.1f}s; failing: {failing}")
    assert rate >= 0.99, failing


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


def test_output_captured_and_temp_dir_removed():
    result = run_mbpp("import os\nprint(os.getcwd())\nopen('scratch.txt', 'w').write('ok')\n"
                      "assert open('scratch.txt').read() == 'ok'\nos.remove('scratch.txt')", [])
    assert result.passed and result.status == "passed" and result.returncode == 0
    workdir = result.stdout.strip()
    assert workdir and not os.path.exists(workdir)  # writes inside the temp dir are fine


@pytest.mark.parametrize("code", [
    "import sys\nsys.exit(0)",
    "import os\nos._exit(0)",          # exits 0 before the asserts: the missing marker catches it
    "raise SystemExit",
])
def test_exiting_early_is_not_a_pass(code):
    result = run_mbpp(code, ["assert False"])
    assert not result.passed and result.status == "error"


def test_main_guard_is_not_run():
    assert run_mbpp("def f():\n    return 1\nif __name__ == '__main__':\n    f(input())",
                    ["assert f() == 1"]).passed


def test_syntax_error_is_an_error():
    assert run_mbpp("def f(:\n  pass", ["assert f() is None"]).status == "error"


# --- MBPP: hostile code fails, and nothing outside the temp dir changes ---------------------

# (snippet, what stops it): "timeout", or a text in stderr ("sandbox:" = the audit hook).
# {d} is a directory outside the sandbox and {s} a sentinel file in it.
HOSTILE = [
    ("while True: pass", "timeout"),
    ("import time\ntime.sleep(60)", "timeout"),                        # wall clock, not CPU
    ("x = bytearray(10 * 1024**3)", "MemoryError"),
    ("a = []\nwhile True: a.append(bytearray(64 * 1024**2))", "MemoryError"),
    ("import os\nos.system('touch {d}/system.txt')", "sandbox:"),
    ("import os\nos.remove('{s}')", "sandbox:"),
    ("open('{d}/new.txt', 'w').write('x')", "sandbox:"),
    ("open('{s}', 'a').write('x')", "sandbox:"),
    ("import os\nos.rename('{s}', 'stolen')", "sandbox:"),
    ("import os\nos.chmod('{s}', 0o777)", "sandbox:"),
    ("import os\nos.utime('{s}', (0, 0))", "sandbox:"),
    ("import shutil\nshutil.rmtree('{d}')", "sandbox:"),
    ("import os\nos.mkdir('{d}/sub')", "sandbox:"),
    ("import os\nos.symlink('{s}', 'link')\nopen('link', 'w')", "sandbox:"),
    ("import os\nfd = os.open('{s}', os.O_RDONLY)\nos.ftruncate(fd, 0)", "sandbox:"),
    ("import os\nfd = os.open('{d}', os.O_RDONLY)\n"
     "os.open('new.txt', os.O_WRONLY | os.O_CREAT, dir_fd=fd)", "sandbox:"),
    ("import os\nfd = os.open('{d}', os.O_RDONLY)\nos.unlink('sentinel.txt', dir_fd=fd)", "sandbox:"),
    ("import subprocess\nsubprocess.run(['touch', '{d}/sub.txt'])", "sandbox:"),
    ("import os\nos.execv('/bin/touch', ['touch', '{d}/exec.txt'])", "sandbox:"),
    ("import os\nos.posix_spawn('/bin/touch', ['touch', '{d}/spawn.txt'], {{}})", "sandbox:"),
    ("import ctypes\nctypes.CDLL(None).system(b'touch {d}/ctypes.txt')", "sandbox:"),
    ("import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))", "sandbox:"),
    ("import os\nos.kill(os.getpid(), 9)", "sandbox:"),
]


@pytest.mark.parametrize("snippet, stopper", HOSTILE)
def test_hostile_snippet_fails_without_side_effects(tmp_path, snippet, stopper):
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("keep me")
    before = sentinel.stat()
    # 128 MB so the gradual memory bomb hits the limit quickly even where page faults are slow.
    timeout = 2.0
    result = run_mbpp(snippet.format(d=tmp_path, s=sentinel), ["assert True"], timeout_s=timeout,
                      memory_mb=128)
    assert not result.passed, result
    if stopper == "timeout":
        assert result.status == "timeout"
    else:
        assert result.status == "error" and stopper in result.stderr, result.stderr
    assert result.seconds < timeout + 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sentinel.txt"]
    after = sentinel.stat()
    assert sentinel.read_text() == "keep me"
    assert stat.S_IMODE(after.st_mode) == stat.S_IMODE(before.st_mode)
    assert after.st_mtime_ns == before.st_mtime_ns


def test_os_system_in_tmp_is_blocked():
    target = f"/tmp/xyz-{uuid.uuid4().hex}"
    result = run_mbpp(f"import os\nos.system('touch {target}')", [], timeout_s=2)
    assert result.status == "error" and "os.system" in result.stderr
    assert not os.path.exists(target)


def _group_members(pgid: int) -> list[int]:
    """Live pids whose process group is pgid (field 5 of /proc/<pid>/stat)."""
    members = []
    for entry in os.listdir("/proc"):
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if entry.isdigit() and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


@pytest.mark.parametrize("bomb", [
    "while True: os.fork()",
    "import multiprocessing\nwhile True: multiprocessing.Process(target=print).start()",
    "import pty\nwhile True: pty.fork()",
])
def test_fork_bomb_is_contained(bomb):
    # The snippet reports its pid, which is also its process-group id (start_new_session).
    result = run_mbpp(f"import os\nprint(os.getpid(), flush=True)\n{bomb}", [], timeout_s=3)
    assert result.status == "error" and "sandbox:" in result.stderr  # blocked, not just limited
    assert result.seconds < 5
    assert _group_members(int(result.stdout.split()[0])) == []


@pytest.mark.parametrize("with_netns", [True, False])
def test_socket_to_localhost_is_blocked(monkeypatch, with_netns):
    if not with_netns:  # the audit hook alone must stop it too
        monkeypatch.setattr(scoring, "_netns_prefix", lambda: ())
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.2)
        port = server.getsockname()[1]
        connect = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)"
        result = run_mbpp(connect, [], timeout_s=2)
        with pytest.raises(socket.timeout):
            server.accept()
    assert result.status == "error" and "sandbox: socket" in result.stderr


def test_network_namespace_has_only_loopback():
    if not scoring._netns_prefix():
        pytest.skip("unshare --net does not work here")
    interfaces = "import re\nprint(re.findall(r'^ *(\\w+):', open('/proc/net/dev').read(), re.M))"
    assert run_mbpp(interfaces, []).stdout.strip() == "['lo']"


@pytest.mark.parametrize("loop", ["while True: print('x' * 1000)",
                                  "import sys\nwhile True: sys.stderr.write('y' * 1000)"])
def test_printing_forever_is_bounded(loop):
    result = run_mbpp(loop, [], timeout_s=3)
    assert not result.passed and result.status in ("error", "timeout")
    assert len(result.stdout) <= 4096 and len(result.stderr) <= 4096
    assert result.seconds < 5
