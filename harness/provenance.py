"""Where a result came from: the git commit and the machine, stored next to every result.

train.py appends one line of `record(device)` to <run>/provenance.jsonl each time a run starts
or resumes; bench_solver.py stores it in its JSON; report.py reads both, so the README can say
which commit and machine produced each table without anyone writing it by hand.
"""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from importlib import metadata

HERE = os.path.dirname(os.path.abspath(__file__))


def git_commit() -> tuple[str | None, bool]:
    """(short commit of this checkout, whether tracked files differ from it); (None, False)
    outside a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, check=True,
                                capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=HERE,
                               capture_output=True).returncode != 0
        return commit, dirty
    except (OSError, subprocess.CalledProcessError):
        return None, False


def describe_commit(commit: str | None, dirty: bool) -> str:
    if not commit:
        return "unknown"
    return commit + (" (with uncommitted changes to tracked files)" if dirty else "")


def cpu_info(field: str = "model name") -> str:
    """A field of /proc/cpuinfo ("model name", "vendor_id"); elsewhere what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(l.split(":", 1)[1].strip() for l in f if l.startswith(field))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def package_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def record(device=None) -> dict:
    """The commit, machine and library versions, as one JSON-ready dict. `device` is the
    torch.device the work runs on (None: the CPU, or the first GPU if torch sees one)."""
    import torch
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    cpu = cpu_info("model name")
    commit, dirty = git_commit()
    return {
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
        "git_commit": commit, "git_dirty": dirty,
        "device": str(device), "device_name": gpu or cpu, "gpu": gpu,
        "cpu_name": cpu, "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__,
        **{name: package_version(name) for name in ("transformers", "peft", "datasets")},
    }
