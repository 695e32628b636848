"""README.md as a stranger reads it: its set-up lines are what CI runs, its size stays small, and
its generated block holds only what evidence/report.py writes. Reads files only: milliseconds."""
from __future__ import annotations

import re
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent   # the repository root
README = (HERE / "README.md").read_text()


def setup_commands() -> list[str]:
    """The indented command lines of README's "Set up" section, comments dropped."""
    section = README[README.index("## Set up"):README.index("\n## ", README.index("## Set up") + 1)]
    return [line.strip().split("  #")[0].strip() for line in section.splitlines()
            if line.startswith("    ") and line.strip()]


def test_ci_runs_the_readme_install_and_test_command_verbatim():
    ci = [line.strip() for line in (HERE / ".ci" / "run").read_text().splitlines()]
    commands = setup_commands()
    cpu_only = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
    install = [c for c in commands if c.startswith(("sudo ", "pip install")) and c != cpu_only]
    assert len(install) >= 3 and all(c in ci for c in install), install   # one more line: add it to both
    assert cpu_only in commands
    assert "torch==2.13.0" in (HERE / "requirements.txt").read_text().splitlines()
    test = [c for c in commands if "pytest" in c]
    assert test == ["python -m pytest -q"] and ci[-1] == test[0]
    assert {"bash reproduce.sh --tiny", "bash reproduce.sh",
            "python -m harness.data fetch --out data/"} <= set(commands)


def test_readme_size_and_generated_block():
    lines = README.splitlines()
    assert len(lines) <= 200 and len(README.encode()) <= 14 * 1024
    assert max(len(line) for line in lines) <= 200
    block = README[README.index("<!-- headline:start -->"):README.index("<!-- headline:end -->")]
    assert block.count("<!--") == 1 and block.splitlines()[1].startswith("From `bash reproduce.sh`")
    assert re.search(r"^\| \*\*FLoRA-NA\*\* \|", block, re.M)   # the table report.py writes
